//! The gRPC control API: submit, cancel, status, job log.
//!
//! Listens on loopback by default and requires the same token as agents, so only the
//! workstation's user can queue work.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use buildpool_proto::control_server::{Control, ControlServer};
use buildpool_proto::{
    AgentInfo, CancelReply, CancelRequest, DrainAgentReply, DrainAgentRequest, JobAssigned,
    JobEvent as WireEvent, JobInfo, JobLogReply, JobLogRequest, JobOutputChunk, JobQueued,
    JobResult as WireResult, JobState, OutputStream, Source, StatusReply, StatusRequest,
    SubmitRequest, job_event,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::scheduler::{JobEvent, JobId};
use super::{ActiveJob, Shared, joblog, unix_millis};
use crate::snapshot::SNAPSHOT_REF_PREFIX;

/// Events buffered per streaming client; beyond this the client's own pace sets the speed.
const EVENT_BUFFER: usize = 32;
/// Largest page `JobLog` returns.
const MAX_LOG_PAGE: usize = 1024 * 1024;
const DEFAULT_LOG_PAGE: usize = 64 * 1024;

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    let token = shared.token.clone();
    let service =
        ControlServer::with_interceptor(ControlService { shared }, move |request: Request<()>| {
            let presented = request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .unwrap_or("");
            if crate::auth::matches(&token, presented) {
                Ok(request)
            } else {
                Err(Status::unauthenticated("invalid or missing token"))
            }
        });
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    if let Err(error) = result {
        tracing::error!("control API stopped: {error}");
    }
}

#[derive(Debug)]
struct ControlService {
    shared: Arc<Shared>,
}

type EventStream = Pin<Box<dyn futures_util::Stream<Item = Result<WireEvent, Status>> + Send>>;

fn wire_event(job_id: JobId, event: &JobEvent) -> WireEvent {
    let event = match event {
        JobEvent::Queued { position, reason } => job_event::Event::Queued(JobQueued {
            position: *position,
            reason: reason.clone(),
        }),
        JobEvent::Assigned {
            agent_id,
            attempt,
            local,
        } => job_event::Event::Assigned(JobAssigned {
            agent_id: agent_id.clone(),
            attempt: *attempt,
            local: *local,
        }),
        JobEvent::Finished(result) => job_event::Event::Finished(WireResult {
            completion: Some(result.completion.clone()),
            agent_id: result.agent_id.clone(),
            attempt: result.attempt,
            local: result.local,
            queue_ms: u64::try_from(result.queue_time.as_millis()).unwrap_or(u64::MAX),
        }),
    };
    WireEvent {
        job_id,
        event: Some(event),
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    type SubmitStream = EventStream;

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("missing job spec"))?;
        buildpool_proto::spec::validate(&spec)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !build_agent::git::is_object_id(&request.commit) {
            return Err(Status::invalid_argument("commit must be a full object id"));
        }
        if !request.git_ref.starts_with(SNAPSHOT_REF_PREFIX) {
            return Err(Status::invalid_argument(format!(
                "git_ref must be under {SNAPSHOT_REF_PREFIX}"
            )));
        }
        let shared = &self.shared;
        let resolved = build_agent::git::Git::new(&shared.repo.common_dir)
            .args([
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{}^{{commit}}", request.git_ref),
            ])
            .output()
            .await
            .map_err(|_| {
                Status::failed_precondition(format!(
                    "{} does not exist in {}",
                    request.git_ref,
                    shared.repo.common_dir.display()
                ))
            })?;
        if resolved != request.commit {
            return Err(Status::failed_precondition(format!(
                "{} points at {resolved}, not {}",
                request.git_ref, request.commit
            )));
        }

        let job_id = shared.next_job_id();
        if job_id.is_multiple_of(100) {
            // Keep the log directory bounded on a long-running coordinator too.
            let dir = shared.log_dir.clone();
            tokio::task::spawn_blocking(move || joblog::prune(&dir, joblog::KEPT_LOGS));
        }
        let log = joblog::JobLog::create(&shared.log_dir, job_id, shared.config.log_max_bytes)
            .await
            .map_err(|e| Status::internal(format!("cannot create job log: {e}")))?;
        let initial = JobEvent::Queued {
            position: 0,
            reason: String::new(),
        };
        let job = Arc::new(ActiveJob {
            phase: watch::channel(initial).0,
            log,
            git_ref: request.git_ref.clone(),
        });
        let source = Source {
            repo_id: shared.repo.id.clone(),
            git_path: shared.git_path.clone(),
            git_port: u32::from(shared.git_daemon_port.unwrap_or(0)),
            commit: request.commit,
            git_ref: request.git_ref,
        };
        let phase = job.phase.subscribe();
        shared.state().jobs.insert(job_id, Arc::clone(&job));
        tracing::info!(job_id, kind = spec.kind, worktree = %request.worktree, "job submitted");
        shared.step(|s| {
            (
                (),
                s.submit(
                    job_id,
                    spec,
                    source,
                    request.worktree,
                    Instant::now(),
                    unix_millis(),
                ),
            )
        });
        tokio::spawn(clean_up_when_finished(
            Arc::clone(shared),
            Arc::clone(&job),
            job.phase.subscribe(),
        ));

        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        tokio::spawn(stream_job(Arc::clone(shared), job_id, job, phase, events));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelReply>, Status> {
        let job_id = request.into_inner().job_id;
        let cancelled = self
            .shared
            .step(|s| match s.cancel(job_id, Instant::now()) {
                Some(actions) => (true, actions),
                None => (false, Vec::new()),
            });
        let state = if cancelled {
            "cancelling"
        } else if joblog::log_path(&self.shared.log_dir, job_id).exists() {
            "finished"
        } else {
            return Err(Status::not_found(format!("no job {job_id}")));
        };
        Ok(Response::new(CancelReply {
            cancelled,
            state: state.to_owned(),
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let shared = &self.shared;
        let state = shared.state();
        let agents = state
            .scheduler
            .agents()
            .into_iter()
            .map(|agent| {
                let r = agent.registration;
                AgentInfo {
                    id: r.agent_id,
                    slots_total: r.slots_total,
                    slots_used: agent.running,
                    labels: r.labels,
                    system: r.system,
                    connected_since_unix_ms: r.connected_at_unix_ms,
                    local: r.local,
                    draining: r.draining,
                    address: r.address,
                }
            })
            .collect();
        let jobs = state
            .scheduler
            .jobs()
            .into_iter()
            .map(|job| JobInfo {
                job_id: job.job_id,
                kind: job.spec.kind,
                state: if job.running_on.is_some() {
                    JobState::Running
                } else {
                    JobState::Queued
                } as i32,
                agent_id: job
                    .running_on
                    .as_ref()
                    .map(|(id, _)| id.clone())
                    .unwrap_or_default(),
                attempt: job.running_on.as_ref().map_or(0, |(_, attempt)| *attempt),
                submitted_unix_ms: job.submitted_unix_ms,
                worktree: job.worktree,
                cargo_args: job.spec.cargo_args,
            })
            .collect();
        Ok(Response::new(StatusReply {
            coordinator_id: shared.id.clone(),
            repository: shared.repo.common_dir.display().to_string(),
            agents,
            jobs,
            local_fallback_enabled: shared.config.local_fallback,
            local_fallback_active: state.scheduler.local_busy(),
            websocket_addr: shared
                .websocket_addr
                .map(|a| a.to_string())
                .unwrap_or_default(),
            git_daemon_port: u32::from(shared.git_daemon_port.unwrap_or(0)),
        }))
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
        let request = request.into_inner();
        let path = joblog::log_path(&self.shared.log_dir, request.job_id);
        let active = self.shared.state().jobs.get(&request.job_id).cloned();
        let limit = match request.limit as usize {
            0 => DEFAULT_LOG_PAGE,
            n => n.min(MAX_LOG_PAGE),
        };
        let stream = OutputStream::try_from(request.stream).unwrap_or(OutputStream::Unspecified);
        let (data, next_offset) = joblog::read_page(&path, stream, request.offset, limit)
            .await
            .map_err(|error| {
                if error.kind() == std::io::ErrorKind::NotFound {
                    Status::not_found(format!("no log for job {}", request.job_id))
                } else {
                    Status::internal(format!("cannot read log: {error}"))
                }
            })?;
        let complete = active.is_none() && (data.len() < limit);
        Ok(Response::new(JobLogReply {
            data,
            next_offset,
            complete,
            truncated_bytes: active.map_or(0, |job| job.log.truncated()),
        }))
    }
}

/// Streams one job's events and output to a client, following the log on disk.
/// If the client goes away before the job ends, the job is cancelled: nobody waits for it.
async fn stream_job(
    shared: Arc<Shared>,
    job_id: JobId,
    job: Arc<ActiveJob>,
    mut phase: watch::Receiver<JobEvent>,
    events: mpsc::Sender<Result<WireEvent, Status>>,
) {
    let mut length = job.log.subscribe();
    let mut position = 0u64;
    let initial = phase.borrow_and_update().clone();
    let mut pending_phase = Some(initial);
    loop {
        if let Some(event) = pending_phase.take() {
            let finished = matches!(event, JobEvent::Finished(_));
            if finished {
                // Everything the agent sent before its result is in the log: send it first.
                let end = *length.borrow();
                if !forward_log(&job, &mut position, end, job_id, &events).await {
                    break;
                }
                if job.log.truncated() > 0 {
                    let note = format!(
                        "[buildpool] {} bytes of output were dropped at the log cap\n",
                        job.log.truncated()
                    );
                    let chunk = JobOutputChunk {
                        stream: OutputStream::Stderr as i32,
                        data: note.into_bytes(),
                        attempt: 0,
                    };
                    let _ = events
                        .send(Ok(WireEvent {
                            job_id,
                            event: Some(job_event::Event::Output(chunk)),
                        }))
                        .await;
                }
            }
            if events.send(Ok(wire_event(job_id, &event))).await.is_err() {
                break;
            }
            if finished {
                return;
            }
        }
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() { return; }
                pending_phase = Some(phase.borrow_and_update().clone());
            }
            changed = length.changed() => {
                if changed.is_err() { return; }
                let end = *length.borrow_and_update();
                if !forward_log(&job, &mut position, end, job_id, &events).await { break; }
            }
            () = events.closed() => break,
            () = shared.shutdown.cancelled() => {
                let _ = events.send(Err(Status::unavailable("the coordinator is shutting down"))).await;
                return;
            }
        }
    }
    // The client is gone and the job has not ended.
    tracing::info!(job_id, "client disconnected; cancelling its job");
    shared.step(|s| ((), s.cancel(job_id, Instant::now()).unwrap_or_default()));
}

async fn forward_log(
    job: &ActiveJob,
    position: &mut u64,
    end: u64,
    job_id: JobId,
    events: &mpsc::Sender<Result<WireEvent, Status>>,
) -> bool {
    while *position < end {
        let (records, next) = match joblog::read_records(job.log.path(), *position, end).await {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(job_id, "cannot read job log: {error}");
                return true;
            }
        };
        if next == *position {
            tracing::error!(job_id, "job log is corrupt at byte {next}");
            return true;
        }
        *position = next;
        for record in records {
            let chunk = JobOutputChunk {
                stream: record.stream as i32,
                data: record.data,
                attempt: record.attempt,
            };
            if events
                .send(Ok(WireEvent {
                    job_id,
                    event: Some(job_event::Event::Output(chunk)),
                }))
                .await
                .is_err()
            {
                return false;
            }
        }
    }
    true
}

async fn clean_up_when_finished(
    shared: Arc<Shared>,
    job: Arc<ActiveJob>,
    mut phase: watch::Receiver<JobEvent>,
) {
    while !matches!(*phase.borrow_and_update(), JobEvent::Finished(_)) {
        tokio::select! {
            changed = phase.changed() => if changed.is_err() { break },
            // Not finished when the coordinator stops: snapshot pruning removes the ref later.
            () = shared.shutdown.cancelled() => return,
        }
    }
    if let Err(error) = job.log.finish().await {
        tracing::warn!("cannot finish job log: {error}");
    }
    if let Err(error) = crate::snapshot::delete(&shared.repo.common_dir, &job.git_ref).await {
        tracing::warn!("cannot delete snapshot ref {}: {error}", job.git_ref);
    }
}
