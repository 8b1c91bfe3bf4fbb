//! Job logs on disk, with a size cap, readable while the job runs and after it ends.
//!
//! A log is a sequence of records `[stream: u8][attempt: u32 LE][len: u32 LE][bytes]`, so
//! readers can tell stdout from stderr and one attempt from the next. Streaming clients
//! follow the file rather than an in-memory buffer: a slow client only slows itself, and
//! memory stays bounded however much a job prints.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use buildpool_core::OutputStream;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{Mutex, watch};

const HEADER: usize = 9;

/// The stream byte of a record.
fn stream_byte(stream: OutputStream) -> u8 {
    match stream {
        OutputStream::Stdout => 1,
        OutputStream::Stderr => 2,
    }
}
/// Logs kept on disk; older ones are deleted when a coordinator starts.
pub const KEPT_LOGS: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub stream: OutputStream,
    pub attempt: u32,
    pub data: Vec<u8>,
}

/// The log of one job, being written.
#[derive(Debug)]
pub struct JobLog {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
    /// Bytes of complete records on disk; readers never read past it.
    length: watch::Sender<u64>,
    cap: u64,
    truncated: AtomicU64,
}

pub fn log_path(dir: &Path, job_id: u64) -> PathBuf {
    dir.join(format!("{job_id}.log"))
}

impl JobLog {
    pub async fn create(dir: &Path, job_id: u64, cap: u64) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(dir).await?;
        let path = log_path(dir, job_id);
        let file = tokio::fs::File::create(&path).await?;
        Ok(Self {
            path,
            file: Mutex::new(file),
            length: watch::channel(0).0,
            cap,
            truncated: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one chunk, or counts it as dropped once the log is at its cap.
    pub async fn append(
        &self,
        stream: OutputStream,
        attempt: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        let mut file = self.file.lock().await;
        let length = *self.length.borrow();
        let record = (HEADER + data.len()) as u64;
        if length + record > self.cap {
            self.truncated
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(HEADER + data.len());
        bytes.push(stream_byte(stream));
        bytes.extend_from_slice(&attempt.to_le_bytes());
        bytes.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
        bytes.extend_from_slice(data);
        file.write_all(&bytes).await?;
        file.flush().await?;
        self.length.send_replace(length + record);
        Ok(())
    }

    /// Bytes dropped at the cap.
    pub fn truncated(&self) -> u64 {
        self.truncated.load(Ordering::Relaxed)
    }

    /// Watches the readable length of the log.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.length.subscribe()
    }

    /// Writes the closing note about dropped output, if any.
    pub async fn finish(&self) -> std::io::Result<()> {
        let dropped = self.truncated();
        if dropped > 0 {
            let note = format!(
                "[buildpool] log cap of {} bytes reached: {dropped} bytes of output were not kept\n",
                self.cap
            );
            self.cap_exempt_append(note.as_bytes()).await?;
        }
        Ok(())
    }

    async fn cap_exempt_append(&self, data: &[u8]) -> std::io::Result<()> {
        let mut file = self.file.lock().await;
        let mut bytes = vec![stream_byte(OutputStream::Stderr)];
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
        bytes.extend_from_slice(data);
        file.write_all(&bytes).await?;
        file.flush().await?;
        self.length
            .send_modify(|length| *length += bytes.len() as u64);
        Ok(())
    }
}

/// Largest read a follower makes at once: two maximal frames, so at least one whole record.
pub const READ_WINDOW: u64 = 2 * buildpool_proto::frame::MAX_FRAME_BYTES as u64 + 2 * HEADER as u64;

/// Reads whole records from byte position `from`, up to `to` and at most [`READ_WINDOW`]
/// bytes. Returns them with the position after the last whole record.
pub async fn read_records(path: &Path, from: u64, to: u64) -> std::io::Result<(Vec<Record>, u64)> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(from)).await?;
    let window = to.saturating_sub(from).min(READ_WINDOW);
    let mut bytes = vec![0u8; usize::try_from(window).unwrap_or(0)];
    file.read_exact(&mut bytes).await?;
    let (records, consumed) = parse_prefix(&bytes);
    Ok((records, from + consumed as u64))
}

/// Parses whole records; a torn tail (a crash mid-write) is ignored.
pub fn parse(bytes: &[u8]) -> Vec<Record> {
    parse_prefix(bytes).0
}

/// Parses the whole records at the start of `bytes`, returning how many bytes they cover.
fn parse_prefix(all: &[u8]) -> (Vec<Record>, usize) {
    let mut bytes = all;
    let mut records = Vec::new();
    while bytes.len() >= HEADER {
        let stream = match bytes[0] {
            1 => OutputStream::Stdout,
            2 => OutputStream::Stderr,
            // Only a damaged file holds anything else; what follows cannot be trusted.
            _ => break,
        };
        let attempt = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let len = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
        let Some(data) = bytes.get(HEADER..HEADER + len) else {
            break;
        };
        records.push(Record {
            stream,
            attempt,
            data: data.to_vec(),
        });
        bytes = &bytes[HEADER + len..];
    }
    (records, all.len() - bytes.len())
}

/// One page of a log: `limit` bytes from `offset` of the selected stream (or of both).
pub async fn read_page(
    path: &Path,
    stream: Option<OutputStream>,
    offset: u64,
    limit: usize,
) -> std::io::Result<(Vec<u8>, u64)> {
    let bytes = tokio::fs::read(path).await?;
    let mut position = 0u64;
    let mut page = Vec::new();
    for record in parse(&bytes) {
        if stream.is_some_and(|wanted| record.stream != wanted) {
            continue;
        }
        let end = position + record.data.len() as u64;
        if end > offset && page.len() < limit {
            let skip = usize::try_from(offset.saturating_sub(position)).unwrap_or(usize::MAX);
            let take = (limit - page.len()).min(record.data.len().saturating_sub(skip));
            page.extend_from_slice(&record.data[skip..skip + take]);
        }
        position = end;
    }
    let next = offset + page.len() as u64;
    Ok((page, next))
}

/// The job id of a log file, from its name (`<id>.log`); `None` for anything else.
fn log_id(entry: &std::fs::DirEntry) -> Option<u64> {
    entry
        .file_name()
        .to_str()?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// Deletes all but the newest `keep` logs in `dir`.
pub fn prune(dir: &Path, keep: usize) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut ids: Vec<u64> = entries.filter_map(|entry| log_id(&entry.ok()?)).collect();
    ids.sort_unstable();
    let excess = ids.len().saturating_sub(keep);
    for id in &ids[..excess] {
        std::fs::remove_file(log_path(dir, *id))?;
    }
    Ok(())
}

/// The highest job id with a log in `dir`, so ids keep increasing across restarts.
pub fn highest_id(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| log_id(&entry.ok()?))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_keep_streams_apart_and_pages_cover_everything() {
        let dir = tempfile::tempdir().expect("temp");
        let log = JobLog::create(dir.path(), 1, 1 << 20)
            .await
            .expect("create");
        log.append(OutputStream::Stdout, 1, b"hello ")
            .await
            .expect("append");
        log.append(OutputStream::Stderr, 1, b"warning\n")
            .await
            .expect("append");
        log.append(OutputStream::Stdout, 1, b"world\n")
            .await
            .expect("append");
        let length = *log.subscribe().borrow();
        let (records, end) = read_records(log.path(), 0, length).await.expect("read");
        assert_eq!((records.len(), end), (3, length));
        let (partial, end) = read_records(log.path(), 0, length - 1).await.expect("read");
        assert_eq!(partial.len(), 2, "a torn record is left for the next read");
        assert!(end < length - 1);
        let (stdout, next) = read_page(log.path(), Some(OutputStream::Stdout), 0, 1000)
            .await
            .expect("page");
        assert_eq!((stdout.as_slice(), next), (&b"hello world\n"[..], 12));
        let (both, _) = read_page(log.path(), None, 3, 8).await.expect("page");
        assert_eq!(both, b"lo warni");
    }

    #[tokio::test]
    async fn the_cap_drops_output_and_says_so() {
        let dir = tempfile::tempdir().expect("temp");
        let log = JobLog::create(dir.path(), 2, 100).await.expect("create");
        for _ in 0..10 {
            log.append(OutputStream::Stdout, 1, &[b'x'; 40])
                .await
                .expect("append");
        }
        log.finish().await.expect("finish");
        let (text, _) = read_page(log.path(), None, 0, 10_000).await.expect("page");
        let text = String::from_utf8_lossy(&text);
        assert_eq!(text.matches('x').count(), 80);
        assert!(text.contains("320 bytes of output were not kept"), "{text}");
    }

    #[test]
    fn pruning_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("temp");
        for id in [3, 10, 7] {
            std::fs::write(log_path(dir.path(), id), b"").expect("write");
        }
        prune(dir.path(), 2).expect("prune");
        assert!(!log_path(dir.path(), 3).exists());
        assert_eq!(highest_id(dir.path()), 10);
    }
}
