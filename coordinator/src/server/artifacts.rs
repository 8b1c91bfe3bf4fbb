//! Executables jobs sent back (`collect_executables`), kept beside the job logs until the
//! client fetches them.
//!
//! The agent sends them after a job's output and before its result, file by file, each
//! with its SHA-256 on its last chunk. The coordinator checks only bounds and order; the
//! client verifies the checksums. Only the holder of the job's current attempt may write
//! (fencing, as for output), and a newer attempt replaces what an older one sent. A job
//! whose files did not all arrive (the agent's connection dropped) answers with an error,
//! never with part of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;

use buildpool_core::chunks::FileChunks;
use buildpool_core::job::{ARCHIVE_FILE, artifact_path_is_safe};
use buildpool_core::{ArtifactChunk, AttemptKey, JobId};
use buildpool_proto::tunnel::archive_header;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Bytes of executables kept per job: the agent's bound, which it never exceeds.
const MAX_JOB_BYTES: u64 = 512 * 1024 * 1024;
/// Jobs whose executables are kept; older ones are deleted as newer ones arrive.
const KEPT_JOBS: usize = 4;

/// A file as received so far.
#[derive(Debug)]
struct File {
    rel_path: String,
    mode: u32,
    written: u64,
    /// Set by its last chunk.
    sha256: Option<String>,
}

/// What one job's attempt sent.
#[derive(Debug)]
struct Received {
    attempt: u32,
    count: u32,
    files: Vec<File>,
    bytes: u64,
    /// Why the files cannot be handed out (a broken sequence or a disk error).
    broken: Option<String>,
}

#[derive(Debug)]
pub(crate) struct ArtifactStore {
    dir: PathBuf,
    jobs: Mutex<BTreeMap<JobId, Received>>,
}

/// A job's executables in chunks, ending early with an error when a stored file cannot
/// be read.
pub(crate) type ArtifactStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<ArtifactChunk, ArtifactError>> + Send>>;

/// Why a job's executables cannot be handed out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArtifactError {
    #[error(
        "job {0} sent no executables back (it did not ask for them, they were deleted for \
         newer jobs, or the agent's connection dropped first)"
    )]
    NotFound(JobId),
    #[error("the executables of job {job_id} are unusable: {reason}")]
    Unusable { job_id: JobId, reason: String },
    #[error(
        "only {arrived} of the {count} executables of job {job_id} arrived (the agent's \
         connection dropped?)"
    )]
    Incomplete {
        job_id: JobId,
        arrived: usize,
        count: u32,
    },
    #[error("cannot read the stored executables of job {job_id}: {source}")]
    Read {
        job_id: JobId,
        source: std::io::Error,
    },
}

impl ArtifactStore {
    /// A store in `dir`, emptied: what an earlier coordinator kept belongs to its jobs.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        match std::fs::remove_dir_all(dir) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            jobs: Mutex::new(BTreeMap::new()),
        })
    }

    fn job_dir(&self, job_id: JobId) -> PathBuf {
        self.dir.join(job_id.to_string())
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<JobId, Received>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores a chunk of the current attempt `key` (the caller checked it holds the job).
    pub fn receive(&self, key: AttemptKey, chunk: &ArtifactChunk) {
        let job_dir = self.job_dir(key.job_id);
        let mut jobs = self.jobs();
        let fresh = jobs
            .get(&key.job_id)
            .is_none_or(|received| received.attempt != key.attempt);
        if fresh {
            // A newer attempt replaces what an older one sent.
            let _ = std::fs::remove_dir_all(&job_dir);
            jobs.insert(
                key.job_id,
                Received {
                    attempt: key.attempt,
                    count: chunk.count,
                    files: Vec::new(),
                    bytes: 0,
                    broken: None,
                },
            );
            while jobs.len() > KEPT_JOBS {
                let Some((old, _)) = jobs.pop_first() else {
                    break;
                };
                let _ = std::fs::remove_dir_all(self.job_dir(old));
            }
        }
        let Some(received) = jobs.get_mut(&key.job_id) else {
            return;
        };
        if received.broken.is_some() {
            return;
        }
        if let Err(reason) = append(received, &job_dir, chunk) {
            tracing::warn!(job_id = key.job_id, "executables refused: {reason}");
            received.broken = Some(reason);
        }
    }

    /// A job's files, all arrived and intact, or an error saying why not.
    fn complete(
        jobs: &BTreeMap<JobId, Received>,
        job_id: JobId,
    ) -> Result<&Received, ArtifactError> {
        let received = jobs.get(&job_id).ok_or(ArtifactError::NotFound(job_id))?;
        if let Some(broken) = &received.broken {
            return Err(ArtifactError::Unusable {
                job_id,
                reason: broken.clone(),
            });
        }
        let arrived = received.files.iter().filter(|f| f.sha256.is_some()).count();
        if arrived != received.count as usize {
            return Err(ArtifactError::Incomplete {
                job_id,
                arrived,
                count: received.count,
            });
        }
        Ok(received)
    }

    /// The test archive a `nextest-archive` job sent, as the archive tunnel carries it:
    /// the header line with its size and SHA-256, then the file.
    pub async fn archive(
        &self,
        job_id: JobId,
    ) -> Result<impl tokio::io::AsyncRead + Unpin + Send + use<>, ArtifactError> {
        let (path, bytes, sha256) = {
            let jobs = self.jobs();
            let received = Self::complete(&jobs, job_id)?;
            received
                .files
                .iter()
                .enumerate()
                .find(|(_, file)| file.rel_path == ARCHIVE_FILE)
                .and_then(|(index, file)| {
                    let sha256 = file.sha256.clone()?;
                    Some((
                        self.job_dir(job_id).join(index.to_string()),
                        file.written,
                        sha256,
                    ))
                })
                .ok_or(ArtifactError::NotFound(job_id))?
        };
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| ArtifactError::Read { job_id, source })?;
        let header = std::io::Cursor::new(archive_header(bytes, &sha256).into_bytes());
        Ok(tokio::io::AsyncReadExt::chain(header, file))
    }

    /// Streams a job's executables, all of them or an error saying why not.
    pub fn fetch(&self, job_id: JobId) -> Result<ArtifactStream, ArtifactError> {
        let files: Vec<(PathBuf, ArtifactChunk)> = {
            let jobs = self.jobs();
            let received = Self::complete(&jobs, job_id)?;
            let job_dir = self.job_dir(job_id);
            (0..received.count)
                .zip(&received.files)
                .map(|(index, file)| {
                    (
                        job_dir.join(index.to_string()),
                        ArtifactChunk {
                            index,
                            count: received.count,
                            rel_path: file.rel_path.clone(),
                            mode: file.mode,
                            offset: 0,
                            data: Bytes::new(),
                            sha256: file.sha256.clone(),
                        },
                    )
                })
                .collect()
        };
        let (chunks, stream) = mpsc::channel(4);
        tokio::spawn(async move {
            if let Err(source) = send_files(files, &chunks).await {
                let _ = chunks
                    .send(Err(ArtifactError::Read { job_id, source }))
                    .await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(stream)))
    }
}

/// Appends one chunk to a job's files, refusing anything out of sequence or over the bound.
fn append(received: &mut Received, job_dir: &Path, chunk: &ArtifactChunk) -> Result<(), String> {
    if chunk.count != received.count {
        return Err("the file count changed between chunks".to_owned());
    }
    if chunk.count == 0 {
        return Ok(());
    }
    let next = received.files.len() as u32;
    let continues = received
        .files
        .last()
        .is_some_and(|file| file.sha256.is_none() && chunk.index + 1 == next);
    if !continues {
        if chunk.index != next || chunk.index >= chunk.count || chunk.offset != 0 {
            return Err(format!("chunk of file {} out of sequence", chunk.index));
        }
        if !artifact_path_is_safe(&chunk.rel_path) {
            return Err(format!("unsafe path {:?}", chunk.rel_path));
        }
        received.files.push(File {
            rel_path: chunk.rel_path.clone(),
            mode: chunk.mode & 0o777,
            written: 0,
            sha256: None,
        });
    }
    let Some(file) = received.files.last_mut() else {
        return Err("no file".to_owned());
    };
    if chunk.offset != file.written || chunk.rel_path != file.rel_path {
        return Err(format!("chunk of {} out of sequence", file.rel_path));
    }
    received.bytes += chunk.data.len() as u64;
    if received.bytes > MAX_JOB_BYTES {
        return Err(format!("more than {MAX_JOB_BYTES} bytes"));
    }
    std::fs::create_dir_all(job_dir).map_err(|e| e.to_string())?;
    let path = job_dir.join(chunk.index.to_string());
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot store {}: {e}", file.rel_path))?;
    std::io::Write::write_all(&mut out, &chunk.data)
        .map_err(|e| format!("cannot store {}: {e}", file.rel_path))?;
    file.written += chunk.data.len() as u64;
    file.sha256.clone_from(&chunk.sha256);
    Ok(())
}

/// Streams stored files in chunks: the first chunk of each names it, the last carries its
/// SHA-256 as the agent sent it.
async fn send_files(
    files: Vec<(PathBuf, ArtifactChunk)>,
    chunks: &mpsc::Sender<Result<ArtifactChunk, ArtifactError>>,
) -> std::io::Result<()> {
    for (path, head) in files {
        let mut file = FileChunks::new(tokio::fs::File::open(&path).await?);
        while let Some(piece) = file.next().await? {
            let chunk = ArtifactChunk {
                offset: piece.offset,
                data: piece.data,
                sha256: if piece.last {
                    head.sha256.clone()
                } else {
                    None
                },
                ..head.clone()
            };
            if chunks.send(Ok(chunk)).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u32, count: u32, data: &'static [u8], last: bool) -> ArtifactChunk {
        ArtifactChunk {
            index,
            count,
            rel_path: format!("debug/bin{index}"),
            mode: 0o755,
            offset: 0,
            data: Bytes::from_static(data),
            sha256: last.then(|| "00".repeat(32)),
        }
    }

    proptest::proptest! {
        /// Whatever chunks an agent sends (paths that climb or are absolute, attempts,
        /// indexes and offsets in any order, any sizes), the store never panics and writes
        /// nothing outside its directory.
        #[test]
        fn hostile_chunks_stay_in_the_store(
            chunks in proptest::collection::vec(
                (
                    1u64..3,
                    1u32..3,
                    0u32..3,
                    0u32..3,
                    proptest::prop_oneof![
                        proptest::strategy::Just("debug/app".to_owned()),
                        proptest::strategy::Just("../../escaped".to_owned()),
                        proptest::strategy::Just("/tmp/escaped".to_owned()),
                        "[a-z./]{0,12}",
                    ],
                    0u64..8,
                    proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..8),
                    proptest::arbitrary::any::<bool>(),
                ),
                0..16,
            ),
        ) {
            // `fetch` starts its stream's reading on the runtime.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _inside = runtime.enter();
            let root = tempfile::tempdir().expect("temp");
            let dir = root.path().join("store");
            let store = ArtifactStore::open(&dir).expect("open");
            for (job_id, attempt, index, count, rel_path, offset, data, last) in chunks {
                store.receive(
                    AttemptKey::new(job_id, attempt),
                    &ArtifactChunk {
                        index,
                        count,
                        rel_path,
                        mode: 0o755,
                        offset,
                        data: Bytes::from(data),
                        sha256: last.then(|| "00".repeat(32)),
                    },
                );
            }
            let _ = store.fetch(1);
            let _ = store.fetch(2);
            let outside: Vec<_> = std::fs::read_dir(root.path())
                .expect("root")
                .flatten()
                .map(|entry| entry.file_name())
                .filter(|name| name != "store")
                .collect();
            proptest::prop_assert!(outside.is_empty(), "{outside:?}");
        }
    }

    #[tokio::test]
    async fn only_a_complete_set_of_the_newest_attempt_is_handed_out() {
        let dir = tempfile::tempdir().expect("temp");
        let store = ArtifactStore::open(dir.path()).expect("open");
        let missing = store.fetch(1).err().expect("nothing sent");
        assert!(matches!(missing, ArtifactError::NotFound(1)), "{missing:?}");

        // Attempt 1 sent one of two files, then its connection dropped.
        store.receive(AttemptKey::new(1, 1), &chunk(0, 2, b"a", true));
        let partial = store.fetch(1).err().expect("incomplete");
        assert!(
            matches!(
                partial,
                ArtifactError::Incomplete {
                    arrived: 1,
                    count: 2,
                    ..
                }
            ),
            "{partial:?}"
        );
        assert!(
            partial.to_string().contains("only 1 of the 2"),
            "{partial:?}"
        );

        // Attempt 2 replaces it and sends everything.
        store.receive(AttemptKey::new(1, 2), &chunk(0, 1, b"b", true));
        let mut stream = store.fetch(1).expect("complete");
        let first = futures_util::StreamExt::next(&mut stream)
            .await
            .expect("a chunk")
            .expect("ok");
        assert_eq!(first.data, Bytes::from_static(b"b"));
        assert!(futures_util::StreamExt::next(&mut stream).await.is_none());

        // A chunk out of sequence makes the set unusable.
        store.receive(AttemptKey::new(2, 1), &chunk(1, 2, b"c", true));
        let broken = store.fetch(2).err().expect("broken");
        assert!(broken.to_string().contains("out of sequence"), "{broken:?}");
    }
}
