//! One agent-to-coordinator connection: dial, handshake, then frames both ways.
//!
//! The transport is a thin adapter: frames in, frames out. Writes go through a bounded
//! queue drained by a writer task that gives every write a deadline, so a half-open
//! coordinator is detected instead of blocking the agent.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use buildpool_proto::{
    AgentFrame, AttemptRef, CancelAck, Completion, CoordinatorFrame, Declined, Heartbeat, Hello,
    JobFinished, JobOutput, Outcome, PROTOCOL_VERSION, RejectCode, SlotsUpdate, agent_frame,
    coordinator_frame, frame,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, ServerEndpoint};
use crate::executor::JobRequest;
use crate::slots::SlotState;

/// Deadline for connecting and for the hello/welcome exchange.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for one frame write.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting for the writer. Output beyond this waits in the job's pipe (backpressure).
const OUTBOUND_CAPACITY: usize = 64;
/// Output chunks buffered between one job's process and the connection.
const JOB_OUTPUT_CAPACITY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("the coordinator rejected this agent ({code}): {message}")]
    Rejected { code: String, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the coordinator sent nothing for {0:?}; connection presumed dead")]
    HeartbeatTimeout(Duration),
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// How the agent finds the git daemon that serves a coordinator's snapshots.
#[derive(Debug, Clone)]
pub enum GitLocator {
    /// `git://HOST:<port from the assignment><path from the assignment>`, where HOST is the
    /// host the agent dialled for the job bus.
    DaemonOn(String),
    /// A fixed URL, e.g. `file:///path/to/repo` for the coordinator's embedded agent.
    Fixed(String),
}

impl GitLocator {
    fn url(&self, source: &buildpool_proto::Source) -> String {
        match self {
            GitLocator::DaemonOn(host) => format!("git://{host}:{}{}", source.git_port, source.git_path),
            GitLocator::Fixed(url) => url.clone(),
        }
    }
}

pub(crate) fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(frame::MAX_FRAME_BYTES))
        .max_frame_size(Some(frame::MAX_FRAME_BYTES))
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn host_of(url: &str) -> Result<String, SessionError> {
    let bad = |reason: &str| SessionError::BadUrl { url: url.to_owned(), reason: reason.to_owned() };
    let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => return Err(bad("wss is not supported; terminate TLS in front of the agent")),
        _ => return Err(bad("the scheme must be ws://")),
    }
    uri.host().map(str::to_owned).ok_or_else(|| bad("no host"))
}

/// Dials `endpoint` and serves the connection until it ends or `shutdown`.
pub(crate) async fn dial_and_serve(
    agent: &Agent,
    endpoint: &ServerEndpoint,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let host = host_of(&endpoint.url)?;
    let connect = tokio_tungstenite::connect_async_with_config(&endpoint.url, Some(websocket_config()), true);
    let (ws, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| SessionError::Timeout("connecting"))?
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    serve(agent, ws, GitLocator::DaemonOn(host), shutdown).await
}

/// Runs the WebSocket client handshake over an established stream, then serves it.
pub(crate) async fn serve_raw_stream<S>(
    agent: &Agent,
    stream: S,
    git: GitLocator,
    shutdown: CancellationToken,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = tokio_tungstenite::client_async_with_config("ws://localhost/ws", stream, Some(websocket_config()));
    let (ws, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| SessionError::Timeout("websocket handshake"))?
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    serve(agent, ws, git, shutdown).await
}

fn encode(msg: agent_frame::Msg) -> Message {
    Message::Binary(frame::encode(&AgentFrame::from(msg)).into())
}

/// Reads the next coordinator frame, skipping WebSocket control frames.
async fn next_frame<S>(stream: &mut futures_util::stream::SplitStream<WebSocketStream<S>>) -> Result<Option<coordinator_frame::Msg>, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match stream.next().await {
            None | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Err(error)) => return Err(error.into()),
            Some(Ok(Message::Binary(bytes))) => {
                return CoordinatorFrame::decode_frame(&bytes)
                    .map(Some)
                    .map_err(|e| SessionError::Protocol(e.to_string()));
            }
            Some(Ok(Message::Text(_))) => return Err(SessionError::Protocol("unexpected text frame".into())),
            Some(Ok(_)) => {}
        }
    }
}

async fn serve<S>(
    agent: &Agent,
    ws: WebSocketStream<S>,
    git: GitLocator,
    shutdown: CancellationToken,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let inner = &agent.inner;
    let (mut sink, mut stream) = ws.split();
    let mut slots = inner.slots.subscribe();
    let initial = *slots.borrow_and_update();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: inner.identity.id.clone(),
        token: inner.identity.token.clone(),
        labels: inner.identity.labels.clone(),
        system: inner.identity.system.clone(),
        slots_total: initial.total,
        slots_free: initial.free,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        draining: initial.draining,
        attempts: Vec::<AttemptRef>::new(),
    };
    tokio::time::timeout(WRITE_TIMEOUT, sink.send(encode(agent_frame::Msg::Hello(hello))))
        .await
        .map_err(|_| SessionError::Timeout("sending hello"))??;
    let welcome = match tokio::time::timeout(HANDSHAKE_TIMEOUT, next_frame(&mut stream))
        .await
        .map_err(|_| SessionError::Timeout("waiting for welcome"))??
    {
        Some(coordinator_frame::Msg::Welcome(welcome)) => welcome,
        Some(coordinator_frame::Msg::Reject(reject)) => {
            let code = RejectCode::try_from(reject.code).unwrap_or(RejectCode::Unspecified);
            return Err(SessionError::Rejected {
                code: code.as_str_name().trim_start_matches("REJECT_CODE_").to_ascii_lowercase().replace('_', " "),
                message: reject.message,
            });
        }
        Some(other) => return Err(SessionError::Protocol(format!("expected welcome, got {other:?}"))),
        None => return Err(SessionError::Protocol("connection closed during handshake".into())),
    };
    let heartbeat_interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    let heartbeat_timeout = Duration::from_millis(u64::from(welcome.heartbeat_timeout_ms.max(500)));
    tracing::info!(coordinator = %welcome.coordinator_id, "connected");

    let (outbound, mut outbound_rx) = mpsc::channel::<Message>(OUTBOUND_CAPACITY);
    let writer_done = CancellationToken::new();
    let writer = {
        let writer_done = writer_done.clone();
        tokio::spawn(async move {
            while let Some(message) = outbound_rx.recv().await {
                match tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!("write failed: {error}");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("write timed out after {WRITE_TIMEOUT:?}");
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
            writer_done.cancel();
        })
    };

    let session_jobs = CancellationToken::new();
    let mut running: HashMap<(u64, u32), CancellationToken> = HashMap::new();
    let mut jobs: JoinSet<(u64, u32)> = JoinSet::new();
    let mut heartbeat = tokio::time::interval(heartbeat_interval);
    let mut last_heard = tokio::time::Instant::now();
    let mut announced: SlotState = initial;

    let result = loop {
        let silence = tokio::time::sleep_until(last_heard + heartbeat_timeout);
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            () = writer_done.cancelled() => break Err(SessionError::Protocol("connection lost while writing".into())),
            () = silence => break Err(SessionError::HeartbeatTimeout(heartbeat_timeout)),
            _ = heartbeat.tick() => {
                // A full queue is already proof of life to the coordinator; skip this beat.
                let _ = outbound.try_send(encode(agent_frame::Msg::Heartbeat(Heartbeat { sent_at_unix_ms: unix_millis() })));
            }
            changed = slots.changed() => {
                if changed.is_err() { break Ok(()); }
                let state = *slots.borrow_and_update();
                if state != announced {
                    announced = state;
                    let update = SlotsUpdate { slots_free: state.free, slots_total: state.total, draining: state.draining };
                    if outbound.send(encode(agent_frame::Msg::Slots(update))).await.is_err() {
                        break Err(SessionError::Protocol("connection lost while writing".into()));
                    }
                }
            }
            Some(done) = jobs.join_next() => {
                if let Ok(key) = done { running.remove(&key); }
            }
            frame = next_frame(&mut stream) => {
                last_heard = tokio::time::Instant::now();
                match frame {
                    Err(error) => break Err(error),
                    Ok(None) => break Ok(()),
                    Ok(Some(message)) => handle_frame(agent, message, &git, &outbound, &mut running, &mut jobs, &session_jobs).await,
                }
            }
        }
    };

    // Jobs of a lost connection cannot report anywhere: stop them and free their slots.
    session_jobs.cancel();
    while jobs.join_next().await.is_some() {}
    drop(outbound);
    let _ = tokio::time::timeout(WRITE_TIMEOUT, writer).await;
    result
}

async fn handle_frame(
    agent: &Agent,
    message: coordinator_frame::Msg,
    git: &GitLocator,
    outbound: &mpsc::Sender<Message>,
    running: &mut HashMap<(u64, u32), CancellationToken>,
    jobs: &mut JoinSet<(u64, u32)>,
    session_jobs: &CancellationToken,
) {
    match message {
        coordinator_frame::Msg::Heartbeat(_) => {}
        coordinator_frame::Msg::Assign(assign) => {
            let key = (assign.job_id, assign.attempt);
            if running.contains_key(&key) {
                return;
            }
            let decline = |reason: String| {
                encode(agent_frame::Msg::Declined(Declined { job_id: key.0, attempt: key.1, reason }))
            };
            let (Some(spec), Some(source)) = (assign.spec, assign.source) else {
                let _ = outbound.send(decline("assignment without spec or source".into())).await;
                return;
            };
            let missing: Vec<&String> = spec
                .required_labels
                .iter()
                .filter(|label| !agent.inner.identity.labels.contains(label))
                .collect();
            if !missing.is_empty() {
                let _ = outbound.send(decline(format!("missing labels {missing:?}"))).await;
                return;
            }
            let Some(lease) = agent.inner.slots.try_acquire() else {
                let state = agent.inner.slots.state();
                let reason = if state.draining { "draining".to_owned() } else { format!("all {} slots busy", state.total) };
                let _ = outbound.send(decline(reason)).await;
                return;
            };
            let cancel = session_jobs.child_token();
            running.insert(key, cancel.clone());
            let request = JobRequest { job_id: key.0, attempt: key.1, spec, source: source.clone(), git_url: git.url(&source) };
            let agent = agent.clone();
            let outbound = outbound.clone();
            jobs.spawn(async move {
                let completion = run_job(&agent, &request, &outbound, cancel).await;
                drop(lease);
                let finished = JobFinished { job_id: key.0, attempt: key.1, completion: Some(completion) };
                let _ = outbound.send(encode(agent_frame::Msg::Finished(finished))).await;
                key
            });
        }
        coordinator_frame::Msg::Cancel(cancel) => {
            let key = (cancel.job_id, cancel.attempt);
            if let Some(token) = running.get(&key) {
                tracing::info!(job_id = key.0, attempt = key.1, "cancelling");
                token.cancel();
            }
            let ack = CancelAck { job_id: key.0, attempt: key.1 };
            let _ = outbound.send(encode(agent_frame::Msg::CancelAck(ack))).await;
        }
        coordinator_frame::Msg::Drain(_) => {
            agent.inner.slots.set_draining();
        }
        coordinator_frame::Msg::Error(error) => {
            tracing::error!("coordinator reports a protocol error: {}", error.message);
        }
        coordinator_frame::Msg::Welcome(_) | coordinator_frame::Msg::Reject(_) => {
            tracing::warn!("ignoring a repeated handshake frame");
        }
    }
}

/// Runs the executor and forwards its output as frames. The bounded channels on both sides
/// carry backpressure from a slow connection back to the job's pipes.
async fn run_job(
    agent: &Agent,
    request: &JobRequest,
    outbound: &mpsc::Sender<Message>,
    cancel: CancellationToken,
) -> Completion {
    let (output_tx, mut output_rx) = mpsc::channel(JOB_OUTPUT_CAPACITY);
    let forward = async {
        while let Some(chunk) = output_rx.recv().await {
            let chunk: crate::process::OutputChunk = chunk;
            let output = JobOutput {
                job_id: request.job_id,
                attempt: request.attempt,
                stream: chunk.stream as i32,
                data: chunk.data.to_vec(),
            };
            if outbound.send(encode(agent_frame::Msg::Output(output))).await.is_err() {
                // The connection is gone; keep draining so the job is not blocked.
                continue;
            }
        }
    };
    let (completion, ()) = tokio::join!(agent.inner.executor.run(request, output_tx, cancel), forward);
    if completion.outcome == Outcome::Failed as i32 {
        tracing::warn!(job_id = request.job_id, "job failed: {}", completion.error);
    }
    completion
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_must_be_plain_websocket() {
        assert_eq!(host_of("ws://10.0.0.5:8081/ws").expect("valid"), "10.0.0.5");
        assert!(matches!(host_of("wss://x/ws"), Err(SessionError::BadUrl { .. })));
        assert!(matches!(host_of("http://x/ws"), Err(SessionError::BadUrl { .. })));
        assert!(matches!(host_of("not a url"), Err(SessionError::BadUrl { .. })));
    }
}
