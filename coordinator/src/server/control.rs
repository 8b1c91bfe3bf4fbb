//! The gRPC control API, server side: submit, cancel, status, job log, drain.
//!
//! An edge adapter: requests are decoded into domain types here (a malformed request is an
//! `invalid_argument`, never a default), handled against the scheduler and the job logs,
//! and the answers encoded on the way out. Listens on loopback by default, and over TLS
//! with the bus's certificate wherever it listens beyond loopback; every call needs a
//! credential with the client scope.

use std::collections::VecDeque;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use buildpool_core::status::{CancelReply, CoordinatorStatus, LogPage, LogRequest, Submission};
use buildpool_core::time::unix_millis;
use buildpool_core::{JobEvent, JobId, JobSpec, OutputStream, SnapshotPack};
use buildpool_proto::control_server::{Control, ControlServer};
use buildpool_proto::convert::{DecodeError, encode_job_event};
use buildpool_proto::{
    ArtifactChunk as WireArtifactChunk, CancelRequest, DrainAgentReply, DrainAgentRequest,
    FetchArtifactsRequest, JobEvent as WireEvent, JobLogReply, JobLogRequest, StatusReply,
    StatusRequest, SubmitRequest, WatchRequest,
};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::store::StoreError;
use super::{ActiveJob, JobOrigin, Shared, joblog};
use crate::auth::Scope;
use crate::snapshot::SNAPSHOT_REF_PREFIX;

/// Events buffered per client of a finished job; beyond this the client's own pace sets the
/// speed.
const EVENT_BUFFER: usize = 32;
/// Largest page `JobLog` returns.
const MAX_LOG_PAGE: usize = 1024 * 1024;
const DEFAULT_LOG_PAGE: usize = 64 * 1024;

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    let tls = shared.tls.as_ref().map(|tls| Arc::clone(&tls.control));
    let checker = Arc::clone(&shared);
    let service =
        ControlServer::with_interceptor(ControlService { shared }, move |request: Request<()>| {
            let presented = request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .unwrap_or("");
            match checker.authorize(
                presented,
                Scope::Client,
                request.remote_addr().map(|addr| addr.ip()),
            ) {
                Ok(_) => {
                    checker
                        .last_request
                        .store(unix_millis(), std::sync::atomic::Ordering::Relaxed);
                    Ok(request)
                }
                Err(reason) => Err(Status::unauthenticated(reason)),
            }
        });
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(service);
    let beyond_loopback = listener
        .local_addr()
        .is_ok_and(|addr| !addr.ip().is_loopback());
    let result = match tls {
        Some(config) if beyond_loopback => {
            let accepted =
                super::tls_accept::accept(listener, config, "control API", shutdown.clone());
            let incoming =
                ReceiverStream::new(accepted).map(|(stream, _)| Ok::<_, std::io::Error>(stream));
            server
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
        }
        _ => {
            // No Nagle: a job's events are small writes in a row, and each would otherwise
            // wait for the client's delayed ACK of the one before (40 ms on Linux).
            let incoming =
                tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
                    accepted.inspect(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    })
                });
            server
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
        }
    };
    if let Err(error) = result {
        tracing::error!("control API stopped: {error}");
    }
}

#[derive(Debug)]
struct ControlService {
    shared: Arc<Shared>,
}

type EventStream = Pin<Box<dyn futures_util::Stream<Item = Result<WireEvent, Status>> + Send>>;
type EventSender = mpsc::Sender<Result<WireEvent, Status>>;
type ArtifactStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<WireArtifactChunk, Status>> + Send>>;

fn invalid(error: &DecodeError) -> Status {
    Status::invalid_argument(error.to_string())
}

#[tonic::async_trait]
impl Control for ControlService {
    type SubmitStream = EventStream;

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let Submission {
            spec,
            commit,
            git_ref,
            worktree,
            base_commit,
        } = Submission::try_from(request.into_inner()).map_err(|e| invalid(&e))?;
        buildpool_core::spec::validate(&spec)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !buildpool_core::git::is_object_id(&commit) {
            return Err(Status::invalid_argument("commit must be a full object id"));
        }
        if !base_commit.is_empty() && !buildpool_core::git::is_object_id(&base_commit) {
            return Err(Status::invalid_argument(
                "base_commit must be empty or a full object id",
            ));
        }
        if !git_ref.starts_with(SNAPSHOT_REF_PREFIX) {
            return Err(Status::invalid_argument(format!(
                "git_ref must be under {SNAPSHOT_REF_PREFIX}"
            )));
        }
        check_snapshot_ref(&self.shared, &git_ref, &commit).await?;
        // The job is stored and scheduled by a task of its own: a client that hangs up
        // meanwhile (tonic then drops this call) must not leave a stored job that was
        // never scheduled. Its job runs, unwatched, and is cancelled after the client
        // grace like any job nobody follows.
        let (admitted, admission) = oneshot::channel();
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let outcome = admit(&shared, spec, commit, git_ref, worktree, base_commit).await;
            let _ = admitted.send(outcome);
        });
        let (job_id, watching, phase) = admission
            .await
            .map_err(|_| Status::internal("the submission was dropped"))??;
        Ok(stream_to_watcher(&self.shared, job_id, watching, phase, 0))
    }

    type WatchStream = EventStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<EventStream>, Status> {
        let WatchRequest {
            job_id,
            from_offset,
        } = request.into_inner();
        let shared = &self.shared;
        let active = shared.state().jobs.get(&job_id).cloned();
        if let Some(job) = active {
            tracing::info!(job_id, from_offset, "a client follows the job again");
            let phase = job.phase.subscribe();
            let watching = Watching::start(&job);
            return Ok(stream_to_watcher(
                shared,
                job_id,
                watching,
                phase,
                from_offset,
            ));
        }
        let (result, log) = finished_job(shared, job_id).await?;
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
                    if !send_event(&events, job_id, chunk).await {
                        return;
                    }
                }
            }
            send_event(&events, job_id, JobEvent::Finished(result)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<buildpool_proto::CancelReply>, Status> {
        let job_id = request.into_inner().job_id;
        let cancelled = self
            .shared
            .step(|s| match s.cancel(job_id, Instant::now()) {
                Some(actions) => (true, actions),
                None => (false, Vec::new()),
            });
        let reply = if cancelled {
            CancelReply::Cancelling
        } else if joblog::log_path(&self.shared.log_dir, job_id).exists() {
            CancelReply::AlreadyFinished
        } else {
            return Err(Status::not_found(format!("no job {job_id}")));
        };
        Ok(Response::new(reply.into()))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let shared = &self.shared;
        let state = shared.state();
        let status = CoordinatorStatus {
            coordinator_id: shared.id.clone(),
            repository: shared.repo.common_dir.display().to_string(),
            agents: state.scheduler.agents(),
            jobs: state.scheduler.jobs(),
            local_fallback_enabled: shared.config.local_fallback,
            local_fallback_active: state.scheduler.local_busy(),
            websocket_addr: shared.websocket_addr.map(|addr| addr.to_string()),
            git_daemon_port: shared.git_daemon_port,
        };
        Ok(Response::new(status.into()))
    }

    async fn drain_agent(
        &self,
        request: Request<DrainAgentRequest>,
    ) -> Result<Response<DrainAgentReply>, Status> {
        let agent_id = request.into_inner().agent_id;
        let connections = self.shared.step(|s| s.drain(&agent_id, Instant::now()));
        if connections == 0 {
            return Err(Status::not_found(format!(
                "no agent {agent_id:?} is connected"
            )));
        }
        tracing::info!(%agent_id, "asked the agent to drain");
        Ok(Response::new(DrainAgentReply {
            connections: u32::try_from(connections).unwrap_or(u32::MAX),
        }))
    }

    async fn job_log(
        &self,
        request: Request<JobLogRequest>,
    ) -> Result<Response<JobLogReply>, Status> {
        let request = LogRequest::try_from(request.into_inner()).map_err(|e| invalid(&e))?;
        let path = joblog::log_path(&self.shared.log_dir, request.job_id);
        let active = self.shared.state().jobs.get(&request.job_id).cloned();
        let limit = request
            .limit
            .map_or(DEFAULT_LOG_PAGE, |limit| (limit as usize).min(MAX_LOG_PAGE));
        let ended = active.is_none();
        let (data, next_offset) =
            joblog::read_page(&path, request.stream, ended, request.offset, limit)
                .await
                .map_err(|error| {
                    if error.kind() == std::io::ErrorKind::NotFound {
                        Status::not_found(format!("no log for job {}", request.job_id))
                    } else {
                        Status::internal(format!("cannot read log: {error}"))
                    }
                })?;
        let complete = ended && (data.len() < limit);
        let page = LogPage {
            data,
            next_offset,
            complete,
            truncated_bytes: active.map_or(0, |job| job.log.truncated()),
        };
        Ok(Response::new(page.into()))
    }

    type FetchArtifactsStream = ArtifactStream;

    async fn fetch_artifacts(
        &self,
        request: Request<FetchArtifactsRequest>,
    ) -> Result<Response<ArtifactStream>, Status> {
        let job_id = request.into_inner().job_id;
        let chunks = self.shared.artifacts.fetch(job_id)?;
        Ok(Response::new(Box::pin(
            chunks.map(|chunk| chunk.map(Into::into)),
        )))
    }
}

/// Makes a validated submission a new job: its log, the scheduler (which may assign it at
/// once) and the store. The client hears of the job (this returns) only once it is stored,
/// but the job is not held back meanwhile: the agent that takes it starts while the store
/// commits, so a submission's commit is not part of its time to an agent (on a loaded
/// coordinator, the commit was two thirds of it). Its write is queued before the scheduler
/// can queue the assignment, so a restart never finds an assignment without its job; a
/// job whose write failed is cancelled, wherever it runs (unless it already ended), and
/// the client told why.
/// Returns the job's id, its submitter counted as its first watcher, and its phase as the
/// submitter will follow it from the start.
async fn admit(
    shared: &Arc<Shared>,
    spec: JobSpec,
    commit: String,
    git_ref: String,
    worktree: String,
    base_commit: String,
) -> Result<(JobId, Watching, watch::Receiver<JobEvent>), Status> {
    let unstored =
        |error: StoreError| Status::unavailable(format!("cannot store the job: {error}"));
    let job_id = shared.take_job_id().await.map_err(unstored)?;
    let submitted_unix_ms = unix_millis();
    let origin = JobOrigin {
        kind: spec.kind,
        worktree: worktree.clone(),
        cargo_args: spec.cargo_args.clone(),
    };
    // The snapshot's pack, when there is a base, is made while the job is being stored.
    let pack = shared
        .snapshot_packs
        .get(&shared.repo.common_dir, &commit, &base_commit);
    let recorded = async {
        let log = joblog::JobLog::create(&shared.logs, job_id, shared.config.log_max_bytes)
            .await
            .map_err(|e| Status::internal(format!("cannot create job log: {e}")))?;
        shared.metrics.job_submitted(spec.kind);
        let stored = shared.store.as_ref().map(|store| {
            let submission = Submission {
                spec: spec.clone(),
                commit: commit.clone(),
                git_ref: git_ref.clone(),
                worktree: worktree.clone(),
                base_commit: base_commit.clone(),
            };
            (
                store,
                store.submitted(job_id, submission, submitted_unix_ms, log.path()),
            )
        });
        Ok::<_, Status>((log, stored))
    };
    let (pack, recorded) = tokio::join!(pack, recorded);
    let (log, stored) = recorded?;
    let job = ActiveJob::queued(log, git_ref.clone(), origin);
    let mut source = shared.source(commit, git_ref, base_commit);
    source.pack = pack.filter(|pack| fits_in_assignment(pack, &spec, &worktree));
    let phase = job.phase.subscribe();
    shared.state().jobs.insert(job_id, Arc::clone(&job));
    // The submitter is the job's first watcher, counted before anything could cancel the
    // job as unwatched. Should it be gone before it takes its stream, the count goes with
    // the undelivered answer.
    let watching = Watching::start(&job);
    adopt(shared, job_id, &job);
    // Debug: at the default level a job gets one line, when it ends.
    tracing::debug!(job_id, kind = %spec.kind, %worktree, "job submitted");
    let now = Instant::now();
    shared.step(|s| {
        (
            (),
            s.submit(job_id, spec, source, worktree, now, submitted_unix_ms),
        )
    });
    if let Some((store, write)) = stored
        && let Err(error) = store.committed(write).await
    {
        tracing::warn!(
            job_id,
            "{error}; cancelling the job its client cannot be told of"
        );
        shared.step(|s| ((), s.cancel(job_id, Instant::now()).unwrap_or_default()));
        return Err(unstored(error));
    }
    Ok((job_id, watching, phase))
}

/// Streams the job to a client counted among its watchers (`watching`), uncounted when the
/// stream ends or the client drops it. The output the log already holds beyond
/// `from_offset` bytes comes first.
///
/// The stream is the follower itself, polled by the client's HTTP/2 stream: no task and no
/// channel of its own between the job and the client (at thousands of jobs a second, the
/// extra task and its wake-up per event showed), and a client that reads slowly holds
/// back only its own reading.
fn stream_to_watcher(
    shared: &Arc<Shared>,
    job_id: JobId,
    watching: Watching,
    mut phase: watch::Receiver<JobEvent>,
    from_offset: u64,
) -> Response<EventStream> {
    let mut length = watching.job.log.subscribe();
    let end = *length.borrow_and_update();
    let pending_phase = Some(phase.borrow_and_update().clone());
    let follower = Follower {
        shared: Arc::clone(shared),
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
    let events = futures_util::StreamExt::flatten(batches);
    Response::new(Box::pin(events))
}

/// A job that is no longer active: its stored result and log. Its end may still be on its
/// way to the store, so a miss waits for the store's queue once before it counts.
async fn finished_job(
    shared: &Shared,
    job_id: JobId,
) -> Result<(buildpool_core::JobResult, std::path::PathBuf), Status> {
    let Some(store) = &shared.store else {
        return Err(Status::not_found(format!("no job {job_id} is running")));
    };
    let internal = |e: StoreError| Status::internal(e.to_string());
    if let Some(found) = store.result(job_id).await.map_err(internal)? {
        return Ok(found);
    }
    store.settled().await.map_err(internal)?;
    store
        .result(job_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| Status::not_found(format!("no job {job_id}")))
}

/// Starts the task every active job has: it cancels the job once nobody has followed it for
/// the client grace, and cleans up when the job ends. One task for both: at thousands of
/// jobs a second, a second task and its wake-up at each of the job's phases showed.
pub(crate) fn adopt(shared: &Arc<Shared>, job_id: JobId, job: &Arc<ActiveJob>) {
    tokio::spawn(supervise(Arc::clone(shared), job_id, Arc::clone(job)));
}

/// The grace lets a client that lost its stream (a network blip, a coordinator restart)
/// come back with `Watch` without losing its job; after a restart it counts from the
/// restart, since every job starts there unwatched. A job that ends is cleaned up
/// ([`clean_up`]); one still running when the coordinator stops is not (snapshot pruning
/// removes its ref later).
async fn supervise(shared: Arc<Shared>, job_id: JobId, job: Arc<ActiveJob>) {
    let mut phase = job.phase.subscribe();
    let mut watchers = job.watchers.subscribe();
    let grace = shared.config.client_grace;
    let unwatched_deadline = |count: usize| (count == 0).then(|| Instant::now() + grace);
    // When the job is cancelled for want of a client; `None` while one follows it.
    let mut cancel_at = unwatched_deadline(*watchers.borrow_and_update());
    // When the current attempt was assigned, as this task saw it (for the delivery metric).
    let mut assigned_at = None;
    let mut watching = true;
    loop {
        match &*phase.borrow_and_update() {
            JobEvent::Finished(_) => break,
            JobEvent::Assigned { .. } => assigned_at = Some(Instant::now()),
            _ => {}
        }
        let unwatched_for_long = async {
            match cancel_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = phase.changed() => if changed.is_err() { break },
            changed = watchers.changed(), if watching => {
                // Each time the last client leaves, the grace starts over.
                cancel_at = match changed {
                    Ok(()) => unwatched_deadline(*watchers.borrow_and_update()),
                    Err(_) => { watching = false; None }
                };
            }
            () = unwatched_for_long => {
                tracing::info!(job_id, "no client followed the job for {grace:?}; cancelling it");
                shared.step(|s| ((), s.cancel(job_id, Instant::now()).unwrap_or_default()));
                cancel_at = None;
            }
            () = shared.shutdown.cancelled() => return,
        }
    }
    clean_up(&shared, job_id, &job, &phase, assigned_at).await;
}

/// Sends one event to a streaming client; false when the client is gone.
async fn send_event(events: &EventSender, job_id: JobId, event: JobEvent) -> bool {
    events
        .send(Ok(encode_job_event(job_id, event)))
        .await
        .is_ok()
}

/// One client counted among a job's watchers for as long as this lives: uncounted exactly
/// once, whichever way it goes (its stream ends, the client drops it, or the client was gone
/// before its submission's answer reached it). A job left unwatched is cancelled after the
/// client grace (see [`supervise`]).
struct Watching {
    job: Arc<ActiveJob>,
}

impl Watching {
    fn start(job: &Arc<ActiveJob>) -> Self {
        job.watchers.send_modify(|count| *count += 1);
        Self {
            job: Arc::clone(job),
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.job
            .watchers
            .send_modify(|count| *count = count.saturating_sub(1));
    }
}

impl std::ops::Deref for Watching {
    type Target = ActiveJob;

    fn deref(&self) -> &ActiveJob {
        &self.job
    }
}

/// One client following a running job: its events and its output, read from the log from
/// the output the client already has on.
struct Follower {
    shared: Arc<Shared>,
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
    async fn next_batch(&mut self) -> Option<Vec<Result<WireEvent, Status>>> {
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
                return Some(encode_all(job_id, chunks));
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
                return Some(encode_all(job_id, batch));
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
                () = self.shared.shutdown.cancelled() => {
                    self.done = true;
                    return Some(vec![Err(Status::unavailable("the coordinator is shutting down"))]);
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

fn encode_all(job_id: JobId, events: Vec<JobEvent>) -> Vec<Result<WireEvent, Status>> {
    events
        .into_iter()
        .map(|event| Ok(encode_job_event(job_id, event)))
        .collect()
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

/// Records an ended job (metrics, history), ends its log and hands its snapshot ref over
/// for deletion.
async fn clean_up(
    shared: &Shared,
    job_id: JobId,
    job: &ActiveJob,
    phase: &watch::Receiver<JobEvent>,
    assigned_at: Option<Instant>,
) {
    let ended = match &*phase.borrow() {
        JobEvent::Finished(result) => Some(result.clone()),
        _ => None,
    };
    if let Some(result) = ended {
        // One line per job at the default level, written here by the job's own task: at
        // thousands of jobs a second, a line per event would be most of the log, and writing
        // it while dispatching held the scheduler's lock through a write to stderr.
        tracing::info!(
            job_id,
            kind = %job.origin.kind,
            worktree = %job.origin.worktree,
            agent_id = %result.agent_id,
            attempt = result.attempt,
            end = ?result.completion.end,
            "job finished"
        );
        // Recorded here, by the job's own task: the dispatch path does no more than before.
        let since_assigned = assigned_at.map(|at: Instant| at.elapsed());
        shared
            .metrics
            .job_finished(job.origin.kind, &result, since_assigned);
        let finished =
            super::history::FinishedJob::new(job_id, &job.origin, &result, unix_millis());
        shared.history.record(finished);
    }
    if let Err(error) = job.log.finish().await {
        tracing::warn!("cannot finish job log: {error}");
    }
    shared.logs.ended(job_id);
    // Deleted in a batch with other ended jobs' refs (see `delete_ended_refs`).
    let _ = shared.ended_refs.send(job.git_ref.clone()).await;
}

/// Snapshot commits this coordinator confirmed with git (they exist and are commits), so
/// a later submission of the same commit needs no git process: a workstation submits the
/// same content-addressed snapshot again and again. Object types never change, so an entry
/// never goes stale; the set is bounded by starting over when full.
#[derive(Debug, Default)]
pub(crate) struct VerifiedCommits(std::sync::Mutex<std::collections::HashSet<String>>);

/// Commits remembered at most.
const MAX_VERIFIED_COMMITS: usize = 4096;

impl VerifiedCommits {
    fn contains(&self, commit: &str) -> bool {
        self.lock().contains(commit)
    }

    fn insert(&self, commit: &str) {
        let mut commits = self.lock();
        if commits.len() >= MAX_VERIFIED_COMMITS {
            commits.clear();
        }
        commits.insert(commit.to_owned());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Packs of the newest snapshots ([`crate::snapshot::pack`]) by commit and base, and which
/// could not be made: the jobs of one snapshot (`build`, then `test`, then `clippy`) try
/// once.
#[derive(Debug, Default)]
pub(crate) struct SnapshotPacks(std::sync::Mutex<VecDeque<PackEntry>>);

#[derive(Debug)]
struct PackEntry {
    commit: String,
    base: String,
    pack: Option<SnapshotPack>,
}

/// Snapshot packs remembered at most.
const KEPT_SNAPSHOT_PACKS: usize = 8;

impl SnapshotPacks {
    /// The pack of `commit` over `base`, made or remembered; `None` when there is no base
    /// or git could not make one small enough in time, and the agent fetches.
    async fn get(&self, common_dir: &Path, commit: &str, base: &str) -> Option<SnapshotPack> {
        if base.is_empty() || base == commit {
            return None;
        }
        if let Some(entry) = self
            .lock()
            .iter()
            .find(|entry| entry.commit == commit && entry.base == base)
        {
            return entry.pack.clone();
        }
        let pack = crate::snapshot::pack(common_dir, commit, base)
            .await
            .inspect_err(|error| tracing::debug!("no snapshot pack, agents fetch: {error}"))
            .ok();
        let mut packs = self.lock();
        if packs.len() >= KEPT_SNAPSHOT_PACKS {
            packs.pop_front();
        }
        packs.push_back(PackEntry {
            commit: commit.to_owned(),
            base: base.to_owned(),
            pack: pack.clone(),
        });
        pack
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<PackEntry>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether `pack` leaves room in the assignment's bus frame for the rest of it; the frame
/// limit is for whole messages, and a spec may be large (validated arguments, environment
/// and labels add up to more than a frame at worst).
fn fits_in_assignment(pack: &SnapshotPack, spec: &JobSpec, worktree: &str) -> bool {
    let strings = spec.cargo_args.iter().map(String::len).sum::<usize>()
        + spec
            .env
            .iter()
            .map(|var| var.name.len() + var.value.len())
            .sum::<usize>()
        + spec.required_labels.iter().map(String::len).sum::<usize>()
        + worktree.len();
    // Field tags and lengths, the ids and the rest of the source: well under this.
    const OVERHEAD: usize = 16 * 1024;
    pack.0.len() + strings + OVERHEAD <= buildpool_proto::frame::MAX_FRAME_BYTES
}

/// Checks that `git_ref` holds `commit`, a commit: what agents will fetch is what the
/// client snapshotted. A loose ref naming a commit verified before, or a loose commit
/// object, is read without git (a process per submission would cap the job rate and cost
/// every job its time); anything else asks git.
async fn check_snapshot_ref(shared: &Shared, git_ref: &str, commit: &str) -> Result<(), Status> {
    let common_dir = &shared.repo.common_dir;
    // The common case needs no git: the ref is a loose file naming the commit, and the
    // commit was verified before or is a loose commit object (as the client's snapshot just
    // wrote it). A packed or unknown object, another ref storage: git answers.
    if crate::snapshot::loose_ref_target(common_dir, git_ref).is_some_and(|target| target == commit)
    {
        if shared.verified_commits.contains(commit) {
            return Ok(());
        }
        if crate::snapshot::is_loose_commit(common_dir, commit) {
            shared.verified_commits.insert(commit);
            return Ok(());
        }
    }
    let resolved = buildpool_core::git::Git::new(common_dir)
        .args([
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{git_ref}^{{commit}}"),
        ])
        .output()
        .await
        .map_err(|_| {
            Status::failed_precondition(format!(
                "{git_ref} does not exist in {}",
                common_dir.display()
            ))
        })?;
    if resolved != commit {
        return Err(Status::failed_precondition(format!(
            "{git_ref} points at {resolved}, not {commit}"
        )));
    }
    shared.verified_commits.insert(commit);
    Ok(())
}
