//! Files sent in chunks: the executables a job sends back travel this way twice, from the
//! agent to the coordinator and from the coordinator to the client, cut the same way.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Data per chunk: within gRPC's default message size and well within a bus frame.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// One piece of a file.
#[derive(Debug)]
pub struct FileChunk {
    /// Where `data` starts in the file.
    pub offset: u64,
    pub data: Bytes,
    /// The file's last chunk: shorter than [`CHUNK_BYTES`], possibly empty.
    pub last: bool,
}

/// Reads a file as full chunks of [`CHUNK_BYTES`] and a shorter last one, so a reader
/// knows a file has ended from its chunks alone.
#[derive(Debug)]
pub struct FileChunks<R> {
    reader: R,
    offset: u64,
    done: bool,
}

impl<R: AsyncRead + Unpin> FileChunks<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            offset: 0,
            done: false,
        }
    }

    /// The next chunk; `None` after the last.
    pub async fn next(&mut self) -> std::io::Result<Option<FileChunk>> {
        if self.done {
            return Ok(None);
        }
        let mut data = vec![0; CHUNK_BYTES];
        let mut filled = 0;
        while filled < CHUNK_BYTES {
            match self.reader.read(&mut data[filled..]).await? {
                0 => break,
                read => filled += read,
            }
        }
        data.truncate(filled);
        let chunk = FileChunk {
            offset: self.offset,
            data: Bytes::from(data),
            last: filled < CHUNK_BYTES,
        };
        self.offset += filled as u64;
        self.done = chunk.last;
        Ok(Some(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn cut(len: usize) -> Vec<(u64, usize, bool)> {
        let file = vec![7u8; len];
        let mut chunks = FileChunks::new(file.as_slice());
        let mut cuts = Vec::new();
        while let Some(chunk) = chunks.next().await.expect("reads") {
            cuts.push((chunk.offset, chunk.data.len(), chunk.last));
        }
        cuts
    }

    #[tokio::test]
    async fn a_file_is_full_chunks_then_a_shorter_last_one() {
        assert_eq!(cut(0).await, [(0, 0, true)]);
        assert_eq!(cut(10).await, [(0, 10, true)]);
        assert_eq!(
            cut(CHUNK_BYTES).await,
            [(0, CHUNK_BYTES, false), (CHUNK_BYTES as u64, 0, true)]
        );
        assert_eq!(
            cut(CHUNK_BYTES + 1).await,
            [(0, CHUNK_BYTES, false), (CHUNK_BYTES as u64, 1, true)]
        );
    }
}
