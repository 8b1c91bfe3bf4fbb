//! Job logs on disk, with a size cap, readable while the job runs and after it ends.
//!
//! A log is a sequence of records `[stream: u8][attempt: u32 LE][len: u32 LE][bytes]`, so
//! readers can tell stdout from stderr and one attempt from the next. Streaming clients
//! follow the file rather than an in-memory buffer: a slow client only slows itself, and
//! memory stays bounded however much a job prints.
//!
//! While a job runs, its log ends with an end marker (a record header of zeros) written
//! with every record, and its file may be longer: a reused file is overwritten, not emptied
//! (see [`LogDir`]). Readers of a running log stop at its known length or at the marker;
//! a log that ended is cut to its exact length.
//!
//! Writes go, in order, to one thread that owns the open files ([`LogDir`] starts it): at
//! thousands of jobs a second a trip to tokio's blocking pool per write cost more than the
//! write. A follower that keeps up reads the newest records from memory.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use buildpool_core::OutputStream;
use tokio::sync::{mpsc, oneshot, watch};

const HEADER: usize = 9;

/// The stream byte of a record.
fn stream_byte(stream: OutputStream) -> u8 {
    match stream {
        OutputStream::Stdout => 1,
        OutputStream::Stderr => 2,
    }
}
/// Ended logs kept on disk; beyond this the oldest one's file becomes the next new log.
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
    job_id: u64,
    path: PathBuf,
    writer: Writer,
    state: Arc<LogState>,
    cap: u64,
}

/// What a log's writers, its writer thread and its readers share.
#[derive(Debug)]
struct LogState {
    /// Bytes of complete records on disk; readers never read past it. The writer thread
    /// moves it after each write.
    length: watch::Sender<u64>,
    /// Bytes of records queued for writing (where the next record goes), and whether the
    /// log is finished (later writes, of a stale attempt, are dropped).
    queued: std::sync::Mutex<Queued>,
    /// The newest records (at most [`TAIL_BYTES`]) with their offsets, for followers.
    tail: std::sync::Mutex<Tail>,
    truncated: AtomicU64,
    /// The first write that failed, reported when the log is finished.
    failed: std::sync::Mutex<Option<String>>,
}

#[derive(Debug, Default)]
struct Queued {
    length: u64,
    closed: bool,
}

/// The newest records of a log, by offset, and their data's size (kept, not summed on
/// every append: a log of many small records would make each append walk them all).
#[derive(Debug, Default)]
struct Tail {
    records: VecDeque<(u64, Record)>,
    bytes: usize,
}

/// Bytes of the newest records a log keeps in memory for its followers.
const TAIL_BYTES: usize = 16 * 1024;
/// Writes waiting for the writer thread; beyond it, writers (the agents' connections) wait.
const WRITE_QUEUE: usize = 1024;

/// What follows the last record while a log is written: a header no record has (stream
/// byte 0), where parsing stops. A reused file's old bytes lie beyond it.
const END_MARKER: [u8; HEADER] = [0; HEADER];

/// The queue to the writer thread.
#[derive(Debug, Clone)]
struct Writer(mpsc::Sender<Write>);

#[derive(Debug)]
enum Write {
    /// Start the log at `path`, in the file `reuse` (renamed) when given.
    Open {
        job_id: u64,
        path: PathBuf,
        reuse: Option<PathBuf>,
        log: Arc<LogState>,
    },
    /// Take over a file opened elsewhere (a resumed log).
    Adopt { job_id: u64, file: std::fs::File },
    /// Write `bytes` (records and the end marker) at `at`; then `length` bytes are readable.
    Append {
        job_id: u64,
        at: u64,
        bytes: Vec<u8>,
        length: u64,
        log: Arc<LogState>,
    },
    /// Answer once everything queued before is written.
    Flush(oneshot::Sender<()>),
    /// Write `note` (a record at its offset) if any, cut the file to `length` and close it.
    Finish {
        job_id: u64,
        note: Option<(u64, Vec<u8>)>,
        length: u64,
        log: Arc<LogState>,
        done: oneshot::Sender<()>,
    },
}

impl Writer {
    fn start() -> std::io::Result<Self> {
        let (queue, writes) = mpsc::channel(WRITE_QUEUE);
        super::threads::spawn_background("job-logs", move || write_loop(writes))?;
        Ok(Self(queue))
    }

    async fn send(&self, write: Write) -> std::io::Result<()> {
        self.0
            .send(write)
            .await
            .map_err(|_| std::io::Error::other("the job log writer stopped"))
    }
}

/// The writer thread: applies writes in the order they were queued, until every sender is
/// gone. A log whose file cannot be opened or written records the error and drops the rest.
fn write_loop(mut writes: mpsc::Receiver<Write>) {
    use std::os::unix::fs::FileExt;
    let mut files: std::collections::HashMap<u64, std::fs::File> = Default::default();
    let fail = |job_id: u64, log: &LogState, error: std::io::Error| {
        let mut failed = log.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.is_none() {
            tracing::error!(job_id, "cannot write the job's log: {error}");
            *failed = Some(error.to_string());
        }
        drop(failed);
        // Wakes whoever waits in `written`: nothing more of this log will be written.
        log.length.send_modify(|_| {});
    };
    while let Some(write) = writes.blocking_recv() {
        match write {
            Write::Open {
                job_id,
                path,
                reuse,
                log,
            } => {
                // The old log is ended first and renamed after, so a crash between the two
                // never leaves the old records under the new job's name.
                let reused = reuse.and_then(|old| {
                    let file = std::fs::OpenOptions::new().write(true).open(&old).ok()?;
                    file.write_all_at(&END_MARKER, 0).ok()?;
                    std::fs::rename(&old, &path).ok()?;
                    Some(file)
                });
                let opened = match reused {
                    Some(file) => Ok(file),
                    None => std::fs::File::create(&path),
                };
                match opened {
                    Ok(file) => {
                        files.insert(job_id, file);
                    }
                    Err(error) => fail(job_id, &log, error),
                }
            }
            Write::Adopt { job_id, file } => {
                files.insert(job_id, file);
            }
            Write::Flush(done) => {
                let _ = done.send(());
            }
            Write::Append {
                job_id,
                at,
                bytes,
                length,
                log,
            } => {
                let Some(file) = files.get(&job_id) else {
                    continue;
                };
                match file.write_all_at(&bytes, at) {
                    Ok(()) => {
                        log.length.send_replace(length);
                    }
                    Err(error) => {
                        // A torn record must not run into a reused file's old bytes.
                        let _ = file.set_len(at);
                        files.remove(&job_id);
                        fail(job_id, &log, error);
                    }
                }
            }
            Write::Finish {
                job_id,
                note,
                length,
                log,
                done,
            } => {
                if let Some(file) = files.remove(&job_id) {
                    let written = match &note {
                        Some((at, bytes)) => file.write_all_at(bytes, *at),
                        None => Ok(()),
                    };
                    match written.and_then(|()| file.set_len(length)) {
                        Ok(()) => {
                            log.length.send_replace(length);
                        }
                        Err(error) => fail(job_id, &log, error),
                    }
                }
                let _ = done.send(());
            }
        }
    }
}

pub fn log_path(dir: &Path, job_id: u64) -> PathBuf {
    dir.join(format!("{job_id}.log"))
}

/// The job logs of one directory and which of them may be reused.
///
/// Keeping the newest [`KEPT_LOGS`] ended logs by deleting the oldest and creating a file
/// per job costs an inode allocation per job, which on some filesystems (ext4 without a
/// journal scans recently deleted inodes) is most of a job's cost to the coordinator at a
/// high job rate. So once that many ended logs are kept, the oldest one's file is renamed
/// to the new log and overwritten from its start. It is not emptied: freeing its blocks and
/// writing them again (ext4 flushes a file emptied and rewritten when it is closed, and a
/// `discard` mount trims every freed block) cost more than the rename. Only ended logs are
/// reused: a running job's log is never touched, however long it runs.
#[derive(Debug)]
pub struct LogDir {
    dir: PathBuf,
    /// Ended logs, oldest first.
    ended: std::sync::Mutex<VecDeque<u64>>,
    /// The highest job id with a log when the directory was opened.
    highest_id: u64,
    writer: Writer,
}

impl LogDir {
    /// Opens `dir`, creating it, and deletes all but the newest [`KEPT_LOGS`] ended logs in
    /// it. The logs of `unfinished` jobs (an earlier coordinator's, resumed) are neither
    /// deleted nor reused.
    pub fn open(dir: &Path, unfinished: &std::collections::HashSet<u64>) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let all: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|entry| log_id(&entry.ok()?))
            .collect();
        let highest_id = all.iter().copied().max().unwrap_or(0);
        let mut ids: Vec<u64> = all
            .into_iter()
            .filter(|id| !unfinished.contains(id))
            .collect();
        ids.sort_unstable();
        let excess = ids.len().saturating_sub(KEPT_LOGS);
        for id in ids.drain(..excess) {
            std::fs::remove_file(log_path(dir, id))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            highest_id,
            ended: std::sync::Mutex::new(ids.into()),
            writer: Writer::start()?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The highest job id with a log at opening, so ids keep increasing across restarts.
    pub fn highest_id(&self) -> u64 {
        self.highest_id
    }

    /// Waits until every write queued so far is done (at shutdown: no output is lost that
    /// an agent sent before it).
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.writer.send(Write::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    /// The log of `job_id` ended; its file may be reused once it is among the oldest.
    pub fn ended(&self, job_id: u64) {
        self.lock_ended().push_back(job_id);
    }

    /// The oldest ended log, when more than [`KEPT_LOGS`] would be kept with a new one.
    fn take_reusable(&self) -> Option<u64> {
        let mut ended = self.lock_ended();
        if ended.len() >= KEPT_LOGS {
            ended.pop_front()
        } else {
            None
        }
    }

    fn lock_ended(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        self.ended.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl JobLog {
    /// Starts the log of `job_id`, in the file of the oldest ended log when enough are
    /// kept (see [`LogDir`]). The file is opened by the writer thread; an error there is
    /// logged and reported by [`JobLog::finish`].
    pub async fn create(logs: &LogDir, job_id: u64, cap: u64) -> std::io::Result<Self> {
        let log = Self::writing(logs, job_id, 0, cap);
        let reuse = logs.take_reusable().map(|old| log_path(&logs.dir, old));
        log.writer
            .send(Write::Open {
                job_id,
                path: log.path.clone(),
                reuse,
                log: Arc::clone(&log.state),
            })
            .await?;
        Ok(log)
    }

    fn writing(logs: &LogDir, job_id: u64, length: u64, cap: u64) -> Self {
        Self {
            job_id,
            path: log_path(&logs.dir, job_id),
            writer: logs.writer.clone(),
            state: Arc::new(LogState {
                length: watch::channel(length).0,
                queued: std::sync::Mutex::new(Queued {
                    length,
                    closed: false,
                }),
                tail: std::sync::Mutex::default(),
                truncated: AtomicU64::new(0),
                failed: std::sync::Mutex::default(),
            }),
            cap,
        }
    }

    /// Reopens the log of a job resumed after a restart, to append after its last whole
    /// record (a record torn by the crash, and anything after the end marker, is cut off);
    /// a missing file starts empty.
    pub async fn reopen(logs: &LogDir, job_id: u64, cap: u64) -> std::io::Result<Self> {
        let opened = log_path(&logs.dir, job_id);
        let (file, length) = tokio::task::spawn_blocking(move || {
            let bytes = match std::fs::read(&opened) {
                Ok(bytes) => bytes,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(error) => return Err(error),
            };
            let whole = parse_prefix(&bytes).1 as u64;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&opened)?;
            file.set_len(whole)?;
            Ok((file, whole))
        })
        .await
        .map_err(std::io::Error::other)??;
        let log = Self::writing(logs, job_id, length, cap);
        log.writer.send(Write::Adopt { job_id, file }).await?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one chunk, or counts it as dropped once the log is at its cap (or
    /// finished: a stale attempt's output). Returns once the write is queued; followers see
    /// it when it is on disk.
    pub async fn append(
        &self,
        stream: OutputStream,
        attempt: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        let permit = self
            .writer
            .0
            .reserve()
            .await
            .map_err(|_| std::io::Error::other("the job log writer stopped"))?;
        // Offsets are taken and writes queued under one lock, so they queue in offset order.
        let mut queued = self.lock_queued();
        let record = (HEADER + data.len()) as u64;
        if queued.closed {
            return Ok(());
        }
        if queued.length + record > self.cap {
            self.state
                .truncated
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let at = queued.length;
        queued.length += record;
        let mut bytes = encode_record(stream, attempt, data);
        bytes.extend_from_slice(&END_MARKER);
        self.remember(at, stream, attempt, data);
        permit.send(Write::Append {
            job_id: self.job_id,
            at,
            bytes,
            length: queued.length,
            log: Arc::clone(&self.state),
        });
        Ok(())
    }

    fn lock_queued(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.state
            .queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps the record at `at` among the newest in memory.
    fn remember(&self, at: u64, stream: OutputStream, attempt: u32, data: &[u8]) {
        let mut tail = self
            .state
            .tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if data.len() > TAIL_BYTES {
            *tail = Tail::default();
            return;
        }
        while tail.bytes + data.len() > TAIL_BYTES
            && let Some((_, oldest)) = tail.records.pop_front()
        {
            tail.bytes -= oldest.data.len();
        }
        tail.bytes += data.len();
        tail.records.push_back((
            at,
            Record {
                stream,
                attempt,
                data: data.to_vec(),
            },
        ));
    }

    /// Whole records from byte position `from` up to `to` (at most the readable length),
    /// with the position after the last: from memory when they are among the newest, else
    /// from the file.
    pub async fn read(&self, from: u64, to: u64) -> std::io::Result<(Vec<Record>, u64)> {
        let in_memory = {
            let tail = self
                .state
                .tail
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Offsets ascend, and a follower asks from a record's start.
            let start = tail.records.binary_search_by_key(&from, |(at, _)| *at).ok();
            start.map(|start| {
                let mut end = from;
                let records: Vec<Record> = tail
                    .records
                    .range(start..)
                    .take_while(|(at, record)| {
                        let fits = *at == end && at + (HEADER + record.data.len()) as u64 <= to;
                        if fits {
                            end = at + (HEADER + record.data.len()) as u64;
                        }
                        fits
                    })
                    .map(|(_, record)| record.clone())
                    .collect();
                (records, end)
            })
        };
        match in_memory {
            Some(read) => Ok(read),
            None => read_records(&self.path, from, to).await,
        }
    }

    /// Bytes dropped at the cap.
    pub fn truncated(&self) -> u64 {
        self.state.truncated.load(Ordering::Relaxed)
    }

    /// Watches the readable length of the log.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.state.length.subscribe()
    }

    /// Ends the log: the closing note about dropped output, if any, and the file cut to
    /// its records (no end marker, nothing of a reused file's past); nothing is written to
    /// it after. Returns once that is done, with the first error any write of this log met.
    pub async fn finish(&self) -> std::io::Result<()> {
        let permit = self
            .writer
            .0
            .reserve()
            .await
            .map_err(|_| std::io::Error::other("the job log writer stopped"))?;
        let (done, finished) = oneshot::channel();
        {
            let mut queued = self.lock_queued();
            if queued.closed {
                return Ok(());
            }
            queued.closed = true;
            let dropped = self.truncated();
            let note = (dropped > 0).then(|| {
                let text = format!(
                    "[buildpool] log cap of {} bytes reached: {dropped} bytes of output were not kept\n",
                    self.cap
                );
                let at = queued.length;
                let bytes = encode_record(OutputStream::Stderr, 0, text.as_bytes());
                queued.length += bytes.len() as u64;
                (at, bytes)
            });
            permit.send(Write::Finish {
                job_id: self.job_id,
                note,
                length: queued.length,
                log: Arc::clone(&self.state),
                done,
            });
        }
        finished
            .await
            .map_err(|_| std::io::Error::other("the job log writer stopped"))?;
        match self
            .state
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            Some(error) => Err(std::io::Error::other(error)),
            None => Ok(()),
        }
    }

    /// Waits until everything queued so far is on disk: a job's result may be handled
    /// before its last output is written, and its followers must read that output first.
    pub async fn written(&self) {
        let queued = self.lock_queued().length;
        let failed = || {
            self.state
                .failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
        };
        // A log that failed is as written as it will get.
        let _ = self
            .subscribe()
            .wait_for(|length| *length >= queued || failed())
            .await;
    }
}

/// One record: header and data.
fn encode_record(stream: OutputStream, attempt: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(2 * HEADER + data.len());
    bytes.push(stream_byte(stream));
    bytes.extend_from_slice(&attempt.to_le_bytes());
    bytes.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Where a follower reads a job's records.
#[derive(Debug, Clone, Copy)]
pub enum LogReader<'a> {
    /// A log being written: its newest records come from memory.
    Writing(&'a JobLog),
    /// The file of a log that ended.
    Ended(&'a Path),
}

impl LogReader<'_> {
    /// See [`read_records`].
    pub async fn read(self, from: u64, to: u64) -> std::io::Result<(Vec<Record>, u64)> {
        match self {
            Self::Writing(log) => log.read(from, to).await,
            Self::Ended(path) => read_records(path, from, to).await,
        }
    }
}

/// Largest read a follower makes at once: two maximal frames, so at least one whole record.
pub const READ_WINDOW: u64 = 2 * buildpool_proto::frame::MAX_FRAME_BYTES as u64 + 2 * HEADER as u64;

/// Reads whole records from byte position `from`, up to `to` and at most [`READ_WINDOW`]
/// bytes. Returns them with the position after the last whole record.
pub async fn read_records(path: &Path, from: u64, to: u64) -> std::io::Result<(Vec<Record>, u64)> {
    use std::os::unix::fs::FileExt;
    let path = path.to_owned();
    // One trip to the blocking pool for the open and the read, not one each.
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(path)?;
        let window = to.saturating_sub(from).min(READ_WINDOW);
        let mut bytes = vec![0u8; usize::try_from(window).unwrap_or(0)];
        file.read_exact_at(&mut bytes, from)?;
        let (records, consumed) = parse_prefix(&bytes);
        if bytes[consumed..].starts_with(&END_MARKER) {
            // A log read before it was cut to size: nothing follows the marker.
            return Ok((records, to));
        }
        Ok((records, from + consumed as u64))
    })
    .await
    .map_err(std::io::Error::other)?
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

/// One page of a log: `limit` bytes from `offset` of the selected stream, or of both as
/// [`MergedText`] merges them (with the unfinished lines of a log that `ended`).
pub async fn read_page(
    path: &Path,
    stream: Option<OutputStream>,
    ended: bool,
    offset: u64,
    limit: usize,
) -> std::io::Result<(Vec<u8>, u64)> {
    let bytes = tokio::fs::read(path).await?;
    let records = parse(&bytes);
    let text: Vec<u8> = match stream {
        Some(wanted) => records
            .iter()
            .filter(|record| record.stream == wanted)
            .flat_map(|record| record.data.iter().copied())
            .collect(),
        None => MergedText::of(&records, ended),
    };
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(text.len());
    let page = text[start..text.len().min(start.saturating_add(limit))].to_vec();
    let next = offset + page.len() as u64;
    Ok((page, next))
}

/// An unfinished line longer than this shows without waiting for its end.
const MAX_UNFINISHED_LINE: usize = 64 * 1024;

/// Both streams of a log as one text, merged a line at a time.
///
/// stdout and stderr come through separate pipes, so one stream's output can arrive while
/// the other is mid-line: libtest prints `test name ... ` and only later `ok`, and cargo's
/// next `Running` line can land in between. Joined record by record, such lines splice
/// (and a UTF-8 character split across records breaks). Here every line shows whole, in
/// the order its end arrived.
///
/// A running job's unfinished lines wait for their end, so the text of the start of a log
/// is the start of the text of the whole log: pages and tails taken while it grows agree
/// with it. Unfinished lines show when the log ends ([`Self::finish`]), when a new attempt
/// begins (the old one will not finish them), or once longer than [`MAX_UNFINISHED_LINE`].
#[derive(Debug, Default)]
pub struct MergedText {
    /// Each stream's unfinished line: stdout's, stderr's.
    unfinished: [Vec<u8>; 2],
    attempt: u32,
}

impl MergedText {
    /// The text of `records` read at once: with their unfinished lines if the log `ended`.
    pub fn of(records: &[Record], ended: bool) -> Vec<u8> {
        let mut text = Vec::new();
        let mut merged = Self::default();
        for record in records {
            merged.push(record, &mut text);
        }
        if ended {
            merged.finish(&mut text);
        }
        text
    }

    /// Takes the next record of the log, writing to `out` the lines it completes.
    pub fn push(&mut self, record: &Record, out: &mut Vec<u8>) {
        if record.attempt != self.attempt {
            self.flush(out, true);
            self.attempt = record.attempt;
        }
        let unfinished = &mut self.unfinished[usize::from(record.stream == OutputStream::Stderr)];
        match record.data.iter().rposition(|&byte| byte == b'\n') {
            Some(last_end) => {
                out.append(unfinished);
                out.extend_from_slice(&record.data[..=last_end]);
                unfinished.extend_from_slice(&record.data[last_end + 1..]);
            }
            None => unfinished.extend_from_slice(&record.data),
        }
        if unfinished.len() > MAX_UNFINISHED_LINE {
            out.append(unfinished);
            out.push(b'\n');
        }
    }

    /// The log ended: writes its unfinished lines, stdout's first.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        self.flush(out, false);
    }

    /// Writes the unfinished lines, each ended with a newline except, unless `end_all`,
    /// the last: nothing follows it to splice.
    fn flush(&mut self, out: &mut Vec<u8>, end_all: bool) {
        let mut lines = self
            .unfinished
            .iter_mut()
            .filter(|line| !line.is_empty())
            .peekable();
        while let Some(line) = lines.next() {
            out.append(line);
            if end_all || lines.peek().is_some() {
                out.push(b'\n');
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_keep_streams_apart_and_pages_cover_everything() {
        let dir = tempfile::tempdir().expect("temp");
        let logs = LogDir::open(dir.path(), &Default::default()).expect("open");
        let log = JobLog::create(&logs, 1, 1 << 20).await.expect("create");
        log.append(OutputStream::Stdout, 1, b"hello ")
            .await
            .expect("append");
        log.append(OutputStream::Stderr, 1, b"warning\n")
            .await
            .expect("append");
        log.append(OutputStream::Stdout, 1, b"world\n")
            .await
            .expect("append");
        log.written().await;
        let length = *log.subscribe().borrow();
        let (records, end) = read_records(log.path(), 0, length).await.expect("read");
        assert_eq!((records.len(), end), (3, length));
        // Followers read the newest records from memory: the same records, the same ends.
        assert_eq!(log.read(0, length).await.expect("read"), (records, end));
        let second = (HEADER + 6) as u64;
        let (rest, _) = log.read(second, length).await.expect("read");
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].data, b"warning\n");
        let (partial, end) = log.read(0, length - 1).await.expect("read");
        assert_eq!(
            partial.len(),
            2,
            "a record past `to` waits for the next read"
        );
        assert_eq!(end, length - (HEADER + 6) as u64);
        let (partial, end) = read_records(log.path(), 0, length - 1).await.expect("read");
        assert_eq!(partial.len(), 2, "a torn record is left for the next read");
        assert!(end < length - 1);
        let (stdout, next) = read_page(log.path(), Some(OutputStream::Stdout), false, 0, 1000)
            .await
            .expect("page");
        assert_eq!((stdout.as_slice(), next), (&b"hello world\n"[..], 12));
        // Both streams: whole lines, in the order they ended.
        let (both, _) = read_page(log.path(), None, false, 0, 1000)
            .await
            .expect("page");
        assert_eq!(both, b"warning\nhello world\n");
        let (both, next) = read_page(log.path(), None, false, 3, 8)
            .await
            .expect("page");
        assert_eq!((both.as_slice(), next), (&b"ning\nhel"[..], 11));
    }

    fn record(stream: OutputStream, attempt: u32, data: &[u8]) -> Record {
        Record {
            stream,
            attempt,
            data: data.to_vec(),
        }
    }

    fn merged(records: &[Record], ended: bool) -> String {
        String::from_utf8(MergedText::of(records, ended)).expect("whole characters")
    }

    #[test]
    fn merged_text_never_splices_a_line_of_one_stream_into_the_other() {
        use OutputStream::{Stderr, Stdout};
        // As cargo test printed it, libtest's line in two writes, cargo's between them.
        let records = [
            record(Stdout, 1, b"test tests::quadruples ... "),
            record(Stderr, 1, b"     Running unittests src/lib.rs\n   Doc"),
            record(Stdout, 1, b"ok\n\ntest result: ok"),
            record(Stderr, 1, b"-tests app\n"),
            // A character split across two records of one stream stays whole.
            record(Stdout, 1, &"passed \u{2713}".as_bytes()[..8]),
            record(Stdout, 1, &"passed \u{2713}".as_bytes()[8..]),
        ];
        let whole = merged(&records, true);
        assert_eq!(
            whole,
            "     Running unittests src/lib.rs\ntest tests::quadruples ... ok\n\n   \
             Doc-tests app\ntest result: okpassed \u{2713}"
        );
        // While the log grows, each reading is the start of the next: pages agree.
        for cut in 0..records.len() {
            assert!(whole.starts_with(&merged(&records[..cut], false)), "{cut}");
        }
        assert!(!merged(&records[..3], false).contains("test result"));
    }

    #[test]
    fn merged_text_ends_a_line_cut_off_by_a_new_attempt_or_its_length() {
        use OutputStream::{Stderr, Stdout};
        let records = [
            record(Stdout, 1, b"compiling"),
            record(Stderr, 1, b"warn"),
            record(Stdout, 2, b"again\n"),
        ];
        assert_eq!(merged(&records, false), "compiling\nwarn\nagain\n");
        let long = vec![b'x'; MAX_UNFINISHED_LINE + 1];
        let records = [record(Stdout, 1, &long), record(Stderr, 1, b"error\n")];
        let text = merged(&records, false);
        assert!(text.ends_with("x\nerror\n"), "a long line shows at once");
        assert_eq!(text.len(), MAX_UNFINISHED_LINE + 8);
        assert_eq!(
            merged(
                &[record(Stdout, 1, b"out"), record(Stderr, 1, b"err")],
                true
            ),
            "out\nerr",
            "the last unfinished line of an ended log gets no newline of its own"
        );
    }

    #[tokio::test]
    async fn the_cap_drops_output_and_says_so() {
        let dir = tempfile::tempdir().expect("temp");
        let logs = LogDir::open(dir.path(), &Default::default()).expect("open");
        let log = JobLog::create(&logs, 2, 100).await.expect("create");
        for _ in 0..10 {
            log.append(OutputStream::Stdout, 1, &[b'x'; 40])
                .await
                .expect("append");
        }
        log.finish().await.expect("finish");
        let (text, _) = read_page(log.path(), None, true, 0, 10_000)
            .await
            .expect("page");
        let text = String::from_utf8_lossy(&text);
        assert_eq!(text.matches('x').count(), 80);
        assert!(text.contains("320 bytes of output were not kept"), "{text}");
    }

    #[tokio::test]
    async fn a_resumed_log_keeps_its_records_and_loses_only_a_torn_one() {
        let dir = tempfile::tempdir().expect("temp");
        let logs = LogDir::open(dir.path(), &Default::default()).expect("open");
        let log = JobLog::create(&logs, 7, 1 << 20).await.expect("create");
        log.append(OutputStream::Stdout, 1, b"before ")
            .await
            .expect("append");
        log.written().await;
        drop(log);
        // A crash in the middle of a record.
        let path = log_path(dir.path(), 7);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(&[1, 1, 0, 0, 0, 50, 0, 0, 0, b'x']);
        std::fs::write(&path, bytes).expect("write");

        let unfinished = std::iter::once(7).collect();
        let logs = LogDir::open(dir.path(), &unfinished).expect("reopen dir");
        assert!(
            !logs.lock_ended().contains(&7),
            "an unfinished log is never reused"
        );
        let log = JobLog::reopen(&logs, 7, 1 << 20).await.expect("reopen");
        log.append(OutputStream::Stdout, 2, b"after\n")
            .await
            .expect("append");
        log.written().await;
        let (text, _) = read_page(log.path(), Some(OutputStream::Stdout), true, 0, 1000)
            .await
            .expect("page");
        assert_eq!(text, b"before after\n");
    }

    #[tokio::test]
    async fn nothing_is_written_after_the_end_and_an_uncut_end_reads_as_the_end() {
        let dir = tempfile::tempdir().expect("temp");
        let logs = LogDir::open(dir.path(), &Default::default()).expect("open");
        let log = JobLog::create(&logs, 1, 1 << 20).await.expect("create");
        log.append(OutputStream::Stdout, 1, b"done")
            .await
            .expect("append");
        log.written().await;
        // Before the log is cut, a reader of the file up to its size stops at the marker.
        let size = std::fs::metadata(log.path()).expect("stat").len();
        assert_eq!(size, (2 * HEADER + 4) as u64);
        let (records, next) = read_records(log.path(), 0, size).await.expect("read");
        assert_eq!((records.len(), next), (1, size), "the marker ends the log");
        log.finish().await.expect("finish");
        // A stale attempt's output arriving after the end is dropped.
        log.append(OutputStream::Stdout, 2, b"late")
            .await
            .expect("append");
        log.written().await;
        let (text, _) = read_page(log.path(), None, true, 0, 1000)
            .await
            .expect("page");
        assert_eq!(text, b"done");
        assert_eq!(
            std::fs::metadata(log.path()).expect("stat").len(),
            (HEADER + 4) as u64
        );
    }

    #[tokio::test]
    async fn a_log_that_cannot_be_written_says_so_when_it_ends() {
        let dir = tempfile::tempdir().expect("temp");
        let logs = LogDir::open(&dir.path().join("logs"), &Default::default()).expect("open");
        std::fs::remove_dir(dir.path().join("logs")).expect("remove");
        let log = JobLog::create(&logs, 1, 1 << 20).await.expect("create");
        log.append(OutputStream::Stdout, 1, b"lost")
            .await
            .expect("queued");
        // Followers waiting for the output to be written are let go.
        tokio::time::timeout(std::time::Duration::from_secs(10), log.written())
            .await
            .expect("written() returns for a log that failed");
        let error = log
            .finish()
            .await
            .expect_err("the file could not be created");
        assert!(error.to_string().contains("No such file"), "{error}");
    }

    #[test]
    fn opening_keeps_the_newest_logs() {
        let dir = tempfile::tempdir().expect("temp");
        let ids: Vec<u64> = (1..=KEPT_LOGS as u64 + 2).collect();
        for id in &ids {
            std::fs::write(log_path(dir.path(), *id), b"").expect("write");
        }
        let logs = LogDir::open(dir.path(), &Default::default()).expect("open");
        assert!(!log_path(dir.path(), 1).exists());
        assert!(!log_path(dir.path(), 2).exists());
        assert!(log_path(dir.path(), 3).exists());
        assert_eq!(logs.highest_id(), KEPT_LOGS as u64 + 2);
    }

    #[tokio::test]
    async fn the_oldest_ended_log_becomes_the_next_one_and_running_logs_stay() {
        let dir = tempfile::tempdir().expect("temp");
        let logs = LogDir::open(dir.path(), &Default::default()).expect("open");
        let running = JobLog::create(&logs, 1, 1 << 20).await.expect("create");
        for id in 2..=KEPT_LOGS as u64 + 1 {
            let log = JobLog::create(&logs, id, 1 << 20).await.expect("create");
            // Records as long as the new job's first, so the old ones after it would
            // read as its own without the end marker.
            for old in [b"old", b"out", b"put"] {
                log.append(OutputStream::Stdout, 1, old)
                    .await
                    .expect("append");
            }
            log.finish().await.expect("finish");
            logs.ended(id);
        }
        let files = || std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(files(), KEPT_LOGS + 1);
        let next = KEPT_LOGS as u64 + 2;
        let log = JobLog::create(&logs, next, 1 << 20).await.expect("create");
        log.append(OutputStream::Stdout, 1, b"new")
            .await
            .expect("append");
        log.written().await;
        assert_eq!(files(), KEPT_LOGS + 1, "a file was reused, none added");
        assert!(
            !log_path(dir.path(), 2).exists(),
            "the oldest ended log went"
        );
        assert!(
            log_path(dir.path(), 1).exists(),
            "the running job's log stays"
        );
        let (text, _) = read_page(log.path(), None, true, 0, 1000)
            .await
            .expect("page");
        assert_eq!(text, b"new", "nothing of the old log shows");
        // A crash now: the resumed log holds only what the new job wrote.
        let unfinished = std::iter::once(next).collect();
        let resumed = JobLog::reopen(
            &LogDir::open(dir.path(), &unfinished).expect("dir"),
            next,
            1 << 20,
        )
        .await
        .expect("reopen");
        assert_eq!(*resumed.subscribe().borrow(), (HEADER + 3) as u64);
        let (text, _) = read_page(log.path(), None, true, 0, 1000)
            .await
            .expect("page");
        assert_eq!(text, b"new");
        drop(resumed);
        log.finish().await.expect("finish");
        assert_eq!(
            std::fs::metadata(log.path()).expect("stat").len(),
            (HEADER + 3) as u64,
            "an ended log is cut to its records"
        );
        running
            .append(OutputStream::Stdout, 1, b"still mine")
            .await
            .expect("append");
        running.written().await;
        let (text, _) = read_page(running.path(), None, true, 0, 1000)
            .await
            .expect("page");
        assert_eq!(text, b"still mine");
    }
}
