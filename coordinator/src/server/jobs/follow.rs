//! Following a job: its phases and its output, read from its log, in order, from where a
//! client that comes back left off.

use std::path::PathBuf;
use std::pin::Pin;

use buildpool_core::{JobEvent, JobId, JobResult, OutputStream};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::context::Jobs;
use super::error::JobError;
use crate::server::active::Watching;
use crate::server::joblog;

/// A job's events as a client follows them.
pub(crate) type EventStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<JobEvent, JobError>> + Send>>;

/// Events buffered per client of a finished job; beyond this the client's own pace sets the
/// speed.
const EVENT_BUFFER: usize = 32;

/// Streams the job to a client counted among its watchers (`watching`), uncounted when the
/// stream ends or the client drops it. The output the log already holds beyond
/// `from_offset` bytes comes first.
///
/// The stream is the follower itself, polled by the client's own stream: no task and no
/// channel of its own between the job and the client (at thousands of jobs a second, an
/// extra task and its wake-up per event would cost more than the event), and a client that
/// reads slowly holds back only its own reading.
pub(crate) fn follow(
    jobs: &Jobs,
    job_id: JobId,
    watching: Watching,
    mut phase: watch::Receiver<JobEvent>,
    from_offset: u64,
) -> EventStream {
    let mut length = watching.job.log.subscribe();
    let end = *length.borrow_and_update();
    let pending_phase = Some(phase.borrow_and_update().clone());
    let follower = Follower {
        shutdown: jobs.shutdown.clone(),
        job_id,
        job: watching,
        phase,
        length,
        output: OutputCursor::from_offset(from_offset),
        end,
        pending_phase,
        drained_for_end: false,
        done: false,
    };
    let batches = futures_util::stream::unfold(follower, |mut follower| async move {
        let batch = follower.next_batch().await?;
        Some((futures_util::stream::iter(batch), follower))
    });
    Box::pin(futures_util::StreamExt::flatten(batches))
}

/// The events of a job that ended: its output beyond `from_offset` bytes, read from its
/// log, then its result.
pub(crate) fn replay(
    job_id: JobId,
    result: JobResult,
    log: PathBuf,
    from_offset: u64,
) -> EventStream {
    let (events, receiver) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move {
        let end = tokio::fs::metadata(&log).await.map_or(0, |m| m.len());
        let mut output = OutputCursor::from_offset(from_offset);
        while output.position < end {
            let log = joblog::LogReader::Ended(&log);
            let Some(chunks) = output.read(log, end, job_id).await else {
                break;
            };
            for chunk in chunks {
                if events.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        }
        let _ = events.send(Ok(JobEvent::Finished(result))).await;
    });
    Box::pin(ReceiverStream::new(receiver))
}

/// One client following a running job: its events and its output, read from the log from
/// the output the client already has on.
struct Follower {
    /// The coordinator's shutdown, which ends every stream.
    shutdown: CancellationToken,
    job_id: JobId,
    job: Watching,
    phase: watch::Receiver<JobEvent>,
    /// The log's readable length, as its writer moves it.
    length: watch::Receiver<u64>,
    output: OutputCursor,
    /// How far the log is known to be readable.
    end: u64,
    /// A phase not yet sent.
    pending_phase: Option<JobEvent>,
    /// Whether the log was read to its end after the job finished.
    drained_for_end: bool,
    /// The job's end (or the coordinator's) was sent: nothing follows.
    done: bool,
}

impl Follower {
    /// The next events for the client, in order: output as the log grows, each phase as it
    /// changes, and at the end all output before the result. `None` once everything is sent.
    async fn next_batch(&mut self) -> Option<Vec<Result<JobEvent, JobError>>> {
        let job_id = self.job_id;
        loop {
            if self.done {
                return None;
            }
            if self.output.position < self.end {
                let log = joblog::LogReader::Writing(&self.job.log);
                let Some(chunks) = self.output.read(log, self.end, job_id).await else {
                    // Unreadable there: wait for the log to grow, or for the job's end.
                    self.end = self.output.position;
                    continue;
                };
                if chunks.is_empty() {
                    continue;
                }
                return Some(chunks.into_iter().map(Ok).collect());
            }
            if let Some(event) = self.pending_phase.take() {
                let finished = matches!(event, JobEvent::Finished(_));
                if finished && !self.drained_for_end {
                    // Everything the agent sent before its result is queued for the log:
                    // once it is written, it is sent first.
                    self.job.log.written().await;
                    self.end = *self.length.borrow();
                    self.drained_for_end = true;
                    self.pending_phase = Some(event);
                    continue;
                }
                let mut batch = Vec::new();
                if finished {
                    self.done = true;
                    let truncated = self.job.log.truncated();
                    if truncated > 0 {
                        batch.push(dropped_output_note(truncated));
                    }
                }
                batch.push(event);
                return Some(batch.into_iter().map(Ok).collect());
            }
            tokio::select! {
                changed = self.phase.changed() => {
                    if changed.is_err() { return None; }
                    self.pending_phase = Some(self.phase.borrow_and_update().clone());
                }
                changed = self.length.changed() => {
                    if changed.is_err() { return None; }
                    self.end = *self.length.borrow_and_update();
                }
                () = self.shutdown.cancelled() => {
                    self.done = true;
                    return Some(vec![Err(JobError::ShuttingDown)]);
                }
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!(job_id = self.job_id, "a client stopped following the job");
        }
    }
}

/// The line a client sees when output was dropped at the log cap.
fn dropped_output_note(truncated: u64) -> JobEvent {
    JobEvent::Output {
        attempt: 0,
        stream: OutputStream::Stderr,
        data: Bytes::from(format!(
            "[buildpool] {truncated} bytes of output were dropped at the log cap\n"
        )),
    }
}

/// Where a client is in a job's log: the byte position of the next record, and how many
/// bytes of output it has still to skip (what it already had when it came back).
#[derive(Debug)]
struct OutputCursor {
    position: u64,
    skip: u64,
}

impl OutputCursor {
    fn from_offset(skip: u64) -> Self {
        Self { position: 0, skip }
    }

    /// Reads the next records before `end` (one read window at most) as output events,
    /// leaving out what is to be skipped. `None` when the log cannot be read there (logged;
    /// the position stays).
    async fn read(
        &mut self,
        log: joblog::LogReader<'_>,
        end: u64,
        job_id: JobId,
    ) -> Option<Vec<JobEvent>> {
        let (records, next) = match log.read(self.position, end).await {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(job_id, "cannot read job log: {error}");
                return None;
            }
        };
        if next == self.position {
            tracing::error!(job_id, "job log is corrupt at byte {next}");
            return None;
        }
        self.position = next;
        let mut chunks = Vec::with_capacity(records.len());
        for record in records {
            let mut data = Bytes::from(record.data);
            let seen = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(data.len());
            self.skip -= seen as u64;
            if seen == data.len() {
                continue;
            }
            chunks.push(JobEvent::Output {
                attempt: record.attempt,
                stream: record.stream,
                data: data.split_off(seen),
            });
        }
        Some(chunks)
    }
}
