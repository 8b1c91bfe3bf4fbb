//! The gRPC control API, server side: submit, cancel, status, job log, drain.
//!
//! An edge adapter: requests are decoded into domain types here (a malformed request is an
//! `invalid_argument`, never a default), handled against the scheduler and the job logs,
//! and the answers encoded on the way out. Listens on loopback by default, and over TLS
//! with the bus's certificate wherever it listens beyond loopback; every call needs a
//! credential with the client scope.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use buildpool_core::JobId;
use buildpool_core::status::{CancelReply, CoordinatorStatus, LogPage, LogRequest, Submission};
use buildpool_proto::control_server::{Control, ControlServer};
use buildpool_proto::convert::{DecodeError, encode_job_event};
use buildpool_proto::{
    ArtifactChunk as WireArtifactChunk, CancelRequest, DrainAgentReply, DrainAgentRequest,
    FetchArtifactsRequest, JobEvent as WireEvent, JobLogReply, JobLogRequest, StatusReply,
    StatusRequest, SubmitRequest, WatchRequest,
};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::active::Watching;
use super::artifacts::ArtifactError;
use super::joblog;
use super::jobs::{self, JobError};
use super::shared::Shared;
use crate::auth::Scope;

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
            match checker.access.authorize(
                presented,
                Scope::Client,
                request.remote_addr().map(|addr| addr.ip()),
            ) {
                Ok(_) => {
                    checker.access.client_seen();
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
            let accepted = super::tls::accept(listener, config, "control API", shutdown.clone());
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
type ArtifactStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<WireArtifactChunk, Status>> + Send>>;

fn invalid(error: &DecodeError) -> Status {
    Status::invalid_argument(error.to_string())
}

impl From<JobError> for Status {
    fn from(error: JobError) -> Self {
        let message = error.to_string();
        match error {
            JobError::Invalid(_) => Status::invalid_argument(message),
            JobError::Snapshot(_) => Status::failed_precondition(message),
            JobError::Unstored(_) | JobError::ShuttingDown => Status::unavailable(message),
            JobError::NotFound(_) | JobError::NotRunning(_) => Status::not_found(message),
            JobError::Log(_) | JobError::Store(_) | JobError::Dropped => Status::internal(message),
        }
    }
}

impl From<ArtifactError> for Status {
    fn from(error: ArtifactError) -> Self {
        let message = error.to_string();
        match error {
            ArtifactError::NotFound(_) => Status::not_found(message),
            ArtifactError::Unusable { .. } | ArtifactError::Incomplete { .. } => {
                Status::data_loss(message)
            }
            ArtifactError::Read { .. } => Status::internal(message),
        }
    }
}

/// The control API's stream of a job's events, encoded for the wire.
fn to_wire(job_id: JobId, events: jobs::EventStream) -> Response<EventStream> {
    let encoded = events.map(move |event| {
        event
            .map(|event| encode_job_event(job_id, event))
            .map_err(Status::from)
    });
    Response::new(Box::pin(encoded))
}

#[tonic::async_trait]
impl Control for ControlService {
    type SubmitStream = EventStream;

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let submission = Submission::try_from(request.into_inner()).map_err(|e| invalid(&e))?;
        let admitted = jobs::admit(&self.shared.jobs, submission).await?;
        let events = jobs::follow(
            &self.shared.jobs,
            admitted.job_id,
            admitted.watching,
            admitted.phase,
            0,
        );
        Ok(to_wire(admitted.job_id, events))
    }

    type WatchStream = EventStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<EventStream>, Status> {
        let WatchRequest {
            job_id,
            from_offset,
        } = request.into_inner();
        let shared = &self.shared;
        let active = shared.dispatch.state().jobs.get(&job_id).cloned();
        if let Some(job) = active {
            tracing::info!(job_id, from_offset, "a client follows the job again");
            let phase = job.phase.subscribe();
            let watching = Watching::start(&job);
            let events = jobs::follow(&shared.jobs, job_id, watching, phase, from_offset);
            return Ok(to_wire(job_id, events));
        }
        let (result, log) = jobs::finished_job(&shared.jobs, job_id).await?;
        Ok(to_wire(
            job_id,
            jobs::replay(job_id, result, log, from_offset),
        ))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<buildpool_proto::CancelReply>, Status> {
        let job_id = request.into_inner().job_id;
        let cancelled = self
            .shared
            .dispatch
            .step(|s| match s.cancel(job_id, Instant::now()) {
                Some(actions) => (true, actions),
                None => (false, Vec::new()),
            });
        let reply = if cancelled {
            CancelReply::Cancelling
        } else if self.shared.jobs.records.log_path(job_id).exists() {
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
        let state = shared.dispatch.state();
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
        let connections = self
            .shared
            .dispatch
            .step(|s| s.drain(&agent_id, Instant::now()));
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
        let path = self.shared.jobs.records.log_path(request.job_id);
        let active = self
            .shared
            .dispatch
            .state()
            .jobs
            .get(&request.job_id)
            .cloned();
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
            chunks.map(|chunk| chunk.map(Into::into).map_err(Status::from)),
        )))
    }
}
