//! One agent-to-coordinator connection: dial, handshake, then frames both ways.
//!
//! The transport is a thin adapter: frames in, frames out. Writes go through a bounded
//! queue drained by a writer task that gives every write a deadline, so a half-open
//! coordinator is detected instead of blocking the agent.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use buildpool_proto::{
    AgentFrame, AttemptRef, CancelAck, Completion, CoordinatorFrame, Declined, Heartbeat, Hello,
    JobFinished, JobOutput, Outcome, OutputStream, PROTOCOL_VERSION, RejectCode, SlotsUpdate,
    agent_frame, coordinator_frame, frame,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, JobEntry, Link, ServerEndpoint};
use crate::executor::JobRequest;
use crate::process::OutputChunk;
use crate::slots::{LinkId, PoolState};

/// Deadline for connecting and for the hello/welcome exchange.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for one frame write.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting for the writer. Output beyond this waits in the job's pipe (backpressure).
const OUTBOUND_CAPACITY: usize = 64;
/// Output chunks buffered between one job's process and its forwarder.
const JOB_OUTPUT_CAPACITY: usize = 16;
/// Output bytes one job buffers while connected before backpressure reaches its pipes.
const CONNECTED_BUFFER: usize = 256 * 1024;
/// Output bytes one job keeps while its coordinator is unreachable (the newest).
const DISCONNECTED_BUFFER: usize = 4 * 1024 * 1024;

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
            GitLocator::DaemonOn(host) => {
                format!("git://{host}:{}{}", source.git_port, source.git_path)
            }
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
    let bad = |reason: &str| SessionError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: tokio_tungstenite::tungstenite::http::Uri =
        url.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => {
            return Err(bad(
                "wss is not supported; terminate TLS in front of the agent",
            ));
        }
        _ => return Err(bad("the scheme must be ws://")),
    }
    uri.host().map(str::to_owned).ok_or_else(|| bad("no host"))
}

/// Dials `endpoint` and serves the connection until it ends or `shutdown`.
pub(crate) async fn dial_and_serve(
    agent: &Agent,
    link: &Arc<Link>,
    endpoint: &ServerEndpoint,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let host = host_of(&endpoint.url)?;
    let connect =
        tokio_tungstenite::connect_async_with_config(&endpoint.url, Some(websocket_config()), true);
    let (ws, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| SessionError::Timeout("connecting"))?
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    serve(agent, link, ws, GitLocator::DaemonOn(host), shutdown).await
}

/// Runs the WebSocket client handshake over an established stream, then serves it.
pub(crate) async fn serve_raw_stream<S>(
    agent: &Agent,
    link: &Arc<Link>,
    stream: S,
    git: GitLocator,
    shutdown: CancellationToken,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = tokio_tungstenite::client_async_with_config(
        "ws://localhost/ws",
        stream,
        Some(websocket_config()),
    );
    let (ws, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| SessionError::Timeout("websocket handshake"))?
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    serve(agent, link, ws, git, shutdown).await
}

fn encode(msg: agent_frame::Msg) -> Message {
    Message::Binary(frame::encode(&AgentFrame::from(msg)).into())
}

/// Reads the next coordinator frame, skipping WebSocket control frames.
async fn next_frame<S>(
    stream: &mut futures_util::stream::SplitStream<WebSocketStream<S>>,
) -> Result<Option<coordinator_frame::Msg>, SessionError>
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
            Some(Ok(Message::Text(_))) => {
                return Err(SessionError::Protocol("unexpected text frame".into()));
            }
            Some(Ok(_)) => {}
        }
    }
}

fn finished_frame(job_id: u64, attempt: u32, completion: Completion) -> Message {
    encode(agent_frame::Msg::Finished(JobFinished {
        job_id,
        attempt,
        completion: Some(completion),
    }))
}

fn slots_frame(state: &PoolState, link: LinkId) -> Message {
    let update = SlotsUpdate {
        slots_free: state.offer(link),
        slots_total: state.total,
        draining: state.draining,
    };
    encode(agent_frame::Msg::Slots(update))
}

async fn serve<S>(
    agent: &Agent,
    link: &Arc<Link>,
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
    let initial = slots.borrow_and_update().clone();
    let attempts: Vec<AttemptRef> = link
        .jobs()
        .iter()
        .map(|(key, entry)| AttemptRef {
            job_id: key.0,
            attempt: key.1,
            finished: entry.finished.is_some(),
        })
        .collect();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: inner.identity.id.clone(),
        token: inner.identity.token.clone(),
        labels: inner.identity.labels.clone(),
        system: inner.identity.system.clone(),
        slots_total: initial.total,
        slots_free: initial.offer(link.id),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        draining: initial.draining,
        attempts,
    };
    tokio::time::timeout(
        WRITE_TIMEOUT,
        sink.send(encode(agent_frame::Msg::Hello(hello))),
    )
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
                code: code
                    .as_str_name()
                    .trim_start_matches("REJECT_CODE_")
                    .to_ascii_lowercase()
                    .replace('_', " "),
                message: reject.message,
            });
        }
        Some(other) => {
            return Err(SessionError::Protocol(format!(
                "expected welcome, got {other:?}"
            )));
        }
        None => {
            return Err(SessionError::Protocol(
                "connection closed during handshake".into(),
            ));
        }
    };
    let heartbeat_interval =
        Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
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
    // Results that ended while we were away go first; running jobs resume streaming
    // through the link as soon as it is set.
    // Collect the results that ended while we were away and install this connection in one
    // step under the jobs lock (see the job task): no result can fall between the two.
    let held: Vec<Message> = {
        let mut jobs = link.jobs();
        let held = jobs
            .iter_mut()
            .filter_map(|(key, entry)| {
                let completion = entry.finished.clone()?;
                let mut messages: Vec<Message> = std::mem::take(&mut entry.unsent).into();
                messages.push(finished_frame(key.0, key.1, completion));
                Some(messages)
            })
            .flatten()
            .collect();
        link.outbound.send_replace(Some(outbound.clone()));
        held
    };
    for message in held {
        if outbound.send(message).await.is_err() {
            break;
        }
    }

    let mut heartbeat = tokio::time::interval(heartbeat_interval);
    let mut last_heard = tokio::time::Instant::now();
    let mut announced = (initial.offer(link.id), initial.draining);
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
                let state = slots.borrow_and_update().clone();
                let offer = (state.offer(link.id), state.draining);
                if offer != announced {
                    announced = offer;
                    if outbound.send(slots_frame(&state, link.id)).await.is_err() {
                        break Err(SessionError::Protocol("connection lost while writing".into()));
                    }
                }
            }
            frame = next_frame(&mut stream) => {
                last_heard = tokio::time::Instant::now();
                match frame {
                    Err(error) => break Err(error),
                    Ok(None) => break Ok(()),
                    Ok(Some(message)) => {
                        let assignment = matches!(message, coordinator_frame::Msg::Assign(_));
                        handle_frame(agent, link, message, &git, &outbound).await;
                        if assignment {
                            // The coordinator counted the assignment against our offer (or
                            // zeroed it on a decline): always tell it the real offer now, so a
                            // take-and-release too quick to be seen as a change cannot leave
                            // it believing in fewer free slots than there are.
                            let state = slots.borrow_and_update().clone();
                            announced = (state.offer(link.id), state.draining);
                            if outbound.send(slots_frame(&state, link.id)).await.is_err() {
                                break Err(SessionError::Protocol("connection lost while writing".into()));
                            }
                        }
                    }
                }
            }
        }
    };

    // Jobs keep running; their output waits (bounded) for the next connection.
    link.outbound.send_replace(None);
    inner.slots.set_demand(link.id, 0);
    drop(outbound);
    let _ = tokio::time::timeout(WRITE_TIMEOUT, writer).await;
    result
}

async fn handle_frame(
    agent: &Agent,
    link: &Arc<Link>,
    message: coordinator_frame::Msg,
    git: &GitLocator,
    outbound: &mpsc::Sender<Message>,
) {
    match message {
        coordinator_frame::Msg::Heartbeat(_) => {}
        coordinator_frame::Msg::Assign(assign) => {
            let key = (assign.job_id, assign.attempt);
            if link.jobs().contains_key(&key) {
                return;
            }
            let decline = |reason: String| {
                encode(agent_frame::Msg::Declined(Declined {
                    job_id: key.0,
                    attempt: key.1,
                    reason,
                }))
            };
            let (Some(spec), Some(source)) = (assign.spec, assign.source) else {
                let _ = outbound
                    .send(decline("assignment without spec or source".into()))
                    .await;
                return;
            };
            let missing: Vec<&String> = spec
                .required_labels
                .iter()
                .filter(|label| !agent.inner.identity.labels.contains(label))
                .collect();
            if !missing.is_empty() {
                let _ = outbound
                    .send(decline(format!("missing labels {missing:?}")))
                    .await;
                return;
            }
            let Some(lease) = agent.inner.slots.try_acquire(link.id) else {
                let state = agent.inner.slots.state();
                let reason = if state.draining {
                    "draining".to_owned()
                } else if state.free() > 0 {
                    "the free slots are offered to other coordinators now".to_owned()
                } else {
                    format!("all {} slots busy", state.total)
                };
                let _ = outbound.send(decline(reason)).await;
                return;
            };
            let cancel = agent.inner.stop_jobs.child_token();
            link.jobs().insert(
                key,
                JobEntry {
                    cancel: cancel.clone(),
                    finished: None,
                    unsent: VecDeque::new(),
                },
            );
            let request = JobRequest {
                job_id: key.0,
                attempt: key.1,
                spec,
                source: source.clone(),
                git_url: git.url(&source),
            };
            let agent = agent.clone();
            let link = Arc::clone(link);
            agent.inner.tracker.clone().spawn(async move {
                let (completion, unsent) = run_job(&agent, &link, &request, cancel).await;
                drop(lease);
                // Recording the result and reading the link happen under the jobs lock, as
                // installing a new connection and collecting held results do: so either that
                // connection sends this result from the entry, or we send it here.
                let delivery = {
                    let mut jobs = link.jobs();
                    match jobs.get_mut(&key) {
                        Some(entry) => {
                            entry.finished = Some(completion.clone());
                            let sender = link.outbound.borrow().clone();
                            if sender.is_some() {
                                Some((
                                    sender,
                                    std::mem::take(&mut entry.unsent)
                                        .into_iter()
                                        .chain(unsent)
                                        .collect::<Vec<_>>(),
                                ))
                            } else {
                                entry.unsent.extend(unsent);
                                None
                            }
                        }
                        None => None,
                    }
                };
                if let Some((Some(sender), unsent)) = delivery {
                    for message in unsent {
                        let _ = sender.send(message).await;
                    }
                    let _ = sender.send(finished_frame(key.0, key.1, completion)).await;
                }
            });
        }
        coordinator_frame::Msg::Cancel(cancel) => {
            let key = (cancel.job_id, cancel.attempt);
            {
                let mut jobs = link.jobs();
                match jobs.get(&key).map(|entry| entry.finished.is_some()) {
                    // Ended already: forget the result nobody wants.
                    Some(true) => {
                        jobs.remove(&key);
                    }
                    // Running: stop it; its result (cancelled) is reported as usual.
                    Some(false) => {
                        tracing::info!(job_id = key.0, attempt = key.1, "cancelling");
                        if let Some(entry) = jobs.get(&key) {
                            entry.cancel.cancel();
                        }
                    }
                    None => {}
                }
            }
            let ack = CancelAck {
                job_id: key.0,
                attempt: key.1,
            };
            let _ = outbound
                .send(encode(agent_frame::Msg::CancelAck(ack)))
                .await;
        }
        coordinator_frame::Msg::ResultAck(ack) => {
            let key = (ack.job_id, ack.attempt);
            let mut jobs = link.jobs();
            if jobs.get(&key).is_some_and(|entry| entry.finished.is_some()) {
                jobs.remove(&key);
            }
        }
        coordinator_frame::Msg::Demand(demand) => {
            agent.inner.slots.set_demand(link.id, demand.queued)
        }
        coordinator_frame::Msg::Drain(_) => {
            tracing::info!("the coordinator asked this agent to drain");
            agent.inner.drain_requested.cancel();
        }
        coordinator_frame::Msg::Error(error) => {
            tracing::error!("coordinator reports a protocol error: {}", error.message);
        }
        coordinator_frame::Msg::Welcome(_) | coordinator_frame::Msg::Reject(_) => {
            tracing::warn!("ignoring a repeated handshake frame");
        }
    }
}

/// Runs the executor and forwards its output to whichever connection the link has.
/// Returns the completion and any output that could not be sent yet.
async fn run_job(
    agent: &Agent,
    link: &Arc<Link>,
    request: &JobRequest,
    cancel: CancellationToken,
) -> (Completion, VecDeque<Message>) {
    let (output_tx, output_rx) = mpsc::channel(JOB_OUTPUT_CAPACITY);
    let forward = forward_output(link, request.job_id, request.attempt, output_rx);
    let (completion, unsent) = tokio::join!(
        agent.inner.executor.run(request, output_tx, cancel),
        forward
    );
    if completion.outcome == Outcome::Failed as i32 {
        tracing::warn!(job_id = request.job_id, "job failed: {}", completion.error);
    }
    (completion, unsent)
}

/// Moves a job's output to the link's current connection.
///
/// Connected: bounded buffering, then backpressure into the job's pipes. Disconnected: the
/// job keeps running and the newest [`DISCONNECTED_BUFFER`] bytes are kept; older output is
/// dropped and the gap is reported when the link is back. Returns the output still unsent
/// when the job ended while disconnected; the next connection sends it before the result.
async fn forward_output(
    link: &Link,
    job_id: u64,
    attempt: u32,
    mut output: mpsc::Receiver<OutputChunk>,
) -> VecDeque<Message> {
    let mut current = link.outbound.subscribe();
    let mut pending: VecDeque<(usize, Message)> = VecDeque::new();
    let mut pending_bytes = 0usize;
    let mut dropped = 0u64;
    let mut input_open = true;
    let mut dead_sender = false;
    let chunk_frame = |stream: OutputStream, data: Vec<u8>| {
        encode(agent_frame::Msg::Output(JobOutput {
            job_id,
            attempt,
            stream: stream as i32,
            data,
        }))
    };
    loop {
        let sender = current.borrow_and_update().clone();
        let connected = sender.is_some() && !dead_sender;
        let gap_note = |dropped: u64| {
            let note = format!(
                "[buildpool] {dropped} bytes of output were dropped while the coordinator was unreachable\n"
            );
            (
                note.len(),
                chunk_frame(OutputStream::Stderr, note.into_bytes()),
            )
        };
        if connected && dropped > 0 {
            let (size, note) = gap_note(dropped);
            pending_bytes += size;
            pending.push_front((size, note));
            dropped = 0;
        }
        if !input_open && (pending.is_empty() || !connected) {
            if dropped > 0 {
                pending.push_front(gap_note(dropped));
            }
            return pending.into_iter().map(|(_, message)| message).collect();
        }
        let can_read = input_open && (!connected || pending_bytes < CONNECTED_BUFFER);
        tokio::select! {
            chunk = output.recv(), if can_read => match chunk {
                None => input_open = false,
                Some(chunk) => {
                    pending_bytes += chunk.data.len();
                    pending.push_back((chunk.data.len(), chunk_frame(chunk.stream, chunk.data.to_vec())));
                    while !connected && pending_bytes > DISCONNECTED_BUFFER {
                        let Some((size, _)) = pending.pop_front() else { break };
                        pending_bytes = pending_bytes.saturating_sub(size);
                        dropped += size as u64;
                    }
                }
            },
            permit = reserve(sender.as_ref()), if connected && !pending.is_empty() => match permit {
                Ok(permit) => {
                    if let Some((size, message)) = pending.pop_front() {
                        pending_bytes = pending_bytes.saturating_sub(size);
                        permit.send(message);
                    }
                }
                // The connection is going away; wait for the link to change.
                Err(()) => dead_sender = true,
            },
            changed = current.changed() => {
                if changed.is_err() {
                    return pending.into_iter().map(|(_, message)| message).collect();
                }
                dead_sender = false;
            }
        }
    }
}

async fn reserve(sender: Option<&mpsc::Sender<Message>>) -> Result<mpsc::Permit<'_, Message>, ()> {
    match sender {
        Some(sender) => sender.reserve().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_bytes(message: &Message) -> Vec<u8> {
        let Message::Binary(bytes) = message else {
            panic!("binary frames only")
        };
        match AgentFrame::decode_frame(bytes).expect("decodes") {
            agent_frame::Msg::Output(output) => output.data,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A job prints 6 MiB and ends while its coordinator is unreachable: the newest 4 MiB
    /// are kept for the next connection, with the gap reported first.
    #[tokio::test]
    async fn output_of_a_disconnected_job_is_bounded_and_the_gap_reported() {
        let link = Link {
            id: 0,
            outbound: tokio::sync::watch::channel(None).0,
            jobs: Default::default(),
        };
        let (chunks, output) = mpsc::channel(4);
        let forwarder = tokio::spawn(async move {
            let unsent = forward_output(&link, 1, 1, output).await;
            (link, unsent)
        });
        let chunk = |byte: u8| OutputChunk {
            stream: OutputStream::Stdout,
            data: bytes::Bytes::from(vec![byte; 64 * 1024]),
        };
        for n in 0..96u8 {
            chunks
                .send(chunk(n))
                .await
                .expect("forwarder reads while disconnected");
        }
        drop(chunks);
        let (_link, unsent) = forwarder.await.expect("forwarder ends");
        // Disconnected at the end: everything kept comes back as unsent, gap note first.
        let first = output_bytes(&unsent[0]);
        assert!(
            String::from_utf8_lossy(&first).contains("bytes of output were dropped"),
            "{first:?}"
        );
        let kept: usize = unsent.iter().skip(1).map(|m| output_bytes(m).len()).sum();
        assert_eq!(kept, DISCONNECTED_BUFFER);
        assert_eq!(
            output_bytes(&unsent[1])[0],
            32,
            "the oldest chunks were dropped, the newest kept"
        );
    }

    #[tokio::test]
    async fn a_reconnected_link_receives_the_gap_note_and_new_output() {
        let link = Arc::new(Link {
            id: 0,
            outbound: tokio::sync::watch::channel(None).0,
            jobs: Default::default(),
        });
        let (chunks, output) = mpsc::channel(4);
        let forwarder = tokio::spawn({
            let link = Arc::clone(&link);
            async move { forward_output(&link, 1, 1, output).await }
        });
        let chunk = |byte: u8| OutputChunk {
            stream: OutputStream::Stdout,
            data: bytes::Bytes::from(vec![byte; 64 * 1024]),
        };
        for n in 0..80u8 {
            chunks
                .send(chunk(n))
                .await
                .expect("forwarder reads while disconnected");
        }
        let (tx, mut rx) = mpsc::channel::<Message>(8);
        link.outbound.send_replace(Some(tx));
        // The coordinator side reads while the job goes on printing.
        let collector = tokio::spawn(async move {
            let mut received = Vec::new();
            while received
                .last()
                .is_none_or(|chunk: &Vec<u8>| chunk.first() != Some(&89))
            {
                received.push(output_bytes(&rx.recv().await.expect("frame")));
            }
            received
        });
        for n in 80..90u8 {
            chunks
                .send(chunk(n))
                .await
                .expect("forwarder reads while connected");
        }
        drop(chunks);
        let received = tokio::time::timeout(Duration::from_secs(30), collector)
            .await
            .expect("no stall")
            .expect("collects");
        let note = String::from_utf8_lossy(&received[0]).into_owned();
        let dropped: usize = note
            .strip_prefix("[buildpool] ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no gap note: {note:?}"));
        // Some chunks may still have been in the pipe when the link came back; whatever was
        // not dropped arrives, oldest first, and nothing is lost beyond the reported gap.
        let chunk_size = 64 * 1024;
        assert!(
            dropped >= chunk_size && dropped.is_multiple_of(chunk_size),
            "{note}"
        );
        assert_eq!(received[1][0] as usize, dropped / chunk_size);
        let delivered: usize = received[1..].iter().map(Vec::len).sum();
        assert_eq!(delivered + dropped, 90 * chunk_size);
        assert_eq!(received.last().map(|c| c[0]), Some(89));
        assert!(
            forwarder.await.expect("ends").is_empty(),
            "everything was sent"
        );
    }

    #[test]
    fn server_urls_must_be_plain_websocket() {
        assert_eq!(host_of("ws://10.0.0.5:8081/ws").expect("valid"), "10.0.0.5");
        assert!(matches!(
            host_of("wss://x/ws"),
            Err(SessionError::BadUrl { .. })
        ));
        assert!(matches!(
            host_of("http://x/ws"),
            Err(SessionError::BadUrl { .. })
        ));
        assert!(matches!(
            host_of("not a url"),
            Err(SessionError::BadUrl { .. })
        ));
    }
}
