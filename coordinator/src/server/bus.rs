//! The agent job bus: WebSocket connections carrying one protobuf message per frame.
//!
//! A thin adapter between sockets and the scheduler. Each connection has a reader (this
//! task) and a writer task draining a bounded queue with a deadline on every write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use buildpool_proto::{
    AgentFrame, CoordinatorFrame, Heartbeat, Hello, OutputStream, PROTOCOL_VERSION, ProtocolError,
    Reject, RejectCode, ResultAck, Welcome, agent_frame, coordinator_frame, frame,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::scheduler::{AgentRegistration, AttemptReport, ConnId};
use super::{Connection, Shared, unix_millis};

/// Deadline for the WebSocket upgrade and the hello frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for one frame write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for one agent. Only control frames go this way, so a full queue means the
/// agent stopped reading.
const OUTBOUND_CAPACITY: usize = 256;
/// Connections that have not finished their handshake, at most.
const MAX_PENDING_HANDSHAKES: usize = 64;

fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(frame::MAX_FRAME_BYTES))
        .max_frame_size(Some(frame::MAX_FRAME_BYTES))
}

/// Accepts agent connections until shutdown.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!("accepting an agent connection failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
            tracing::warn!(%peer, "too many pending handshakes; dropping connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(handle_stream(
            Arc::clone(&shared),
            stream,
            peer.to_string(),
            false,
            shutdown.clone(),
            Some(permit),
        ));
    }
    while connections.join_next().await.is_some() {}
}

fn encode(msg: coordinator_frame::Msg) -> Message {
    Message::Binary(frame::encode(&CoordinatorFrame::from(msg)).into())
}

/// Serves one agent connection: upgrade, authenticate, then frames until it ends.
pub(crate) async fn handle_stream<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: String,
    local: bool,
    shutdown: CancellationToken,
    handshake_permit: Option<tokio::sync::OwnedSemaphorePermit>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The callback's error type is tungstenite's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let only_ws_path = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() == "/ws" {
            Ok(response)
        } else {
            let mut error =
                ErrorResponse::new(Some("buildpool agents connect at /ws\n".to_owned()));
            *error.status_mut() = StatusCode::NOT_FOUND;
            Err(error)
        }
    };
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        only_ws_path,
        Some(websocket_config()),
    );
    let ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(error)) => {
            tracing::warn!(%peer, "websocket upgrade failed: {error}");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "websocket upgrade timed out");
            return;
        }
    };
    let (mut sink, mut stream) = ws.split();

    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(Message::Binary(bytes)))) => {
            AgentFrame::decode_frame(&bytes).map_err(|e| e.to_string())
        }
        Ok(Some(Ok(other))) => Err(format!("expected a binary hello frame, got {other:?}")),
        Ok(Some(Err(error))) => Err(error.to_string()),
        Ok(None) => Err("closed before hello".to_owned()),
        Err(_) => Err("no hello within the handshake timeout".to_owned()),
    };
    let hello = hello.and_then(|message| match message {
        agent_frame::Msg::Hello(hello) => Ok(hello),
        other => Err(format!("expected hello, got {other:?}")),
    });
    let hello = match hello {
        Ok(hello) => hello,
        Err(error) => {
            tracing::warn!(%peer, "bad handshake: {error}");
            let reject = Reject {
                code: RejectCode::BadHello as i32,
                message: error,
            };
            let _ = tokio::time::timeout(
                WRITE_TIMEOUT,
                sink.send(encode(coordinator_frame::Msg::Reject(reject))),
            )
            .await;
            return;
        }
    };
    if let Err(reject) = check_hello(&shared, &hello, local) {
        tracing::warn!(%peer, agent_id = %hello.agent_id, "rejected agent: {}", reject.message);
        let _ = tokio::time::timeout(
            WRITE_TIMEOUT,
            sink.send(encode(coordinator_frame::Msg::Reject(reject))),
        )
        .await;
        let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
        return;
    }
    drop(handshake_permit);

    let conn = shared.next_conn_id();
    let span = tracing::info_span!("agent", agent_id = %hello.agent_id, conn, %peer);
    serve_agent(shared, conn, hello, peer, local, sink, stream, shutdown)
        .instrument(span)
        .await;
}

fn check_hello(shared: &Shared, hello: &Hello, local: bool) -> Result<(), Reject> {
    let reject = |code: RejectCode, message: String| Reject {
        code: code as i32,
        message,
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(reject(
            RejectCode::UnsupportedVersion,
            format!(
                "agent speaks protocol {}, this coordinator speaks {PROTOCOL_VERSION}; upgrade the older side",
                hello.protocol_version
            ),
        ));
    }
    if !crate::auth::matches(&shared.token, &hello.token) {
        return Err(reject(
            RejectCode::BadToken,
            "invalid token: copy the coordinator's token file to the agent".into(),
        ));
    }
    let id_ok = !hello.agent_id.is_empty()
        && hello.agent_id.len() <= 128
        && hello
            .agent_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@:".contains(c));
    if !id_ok {
        return Err(reject(
            RejectCode::BadHello,
            format!(
                "agent id {:?} must be 1-128 of [A-Za-z0-9-_.@:]",
                hello.agent_id
            ),
        ));
    }
    if !local && hello.agent_id == super::local_agent::LOCAL_AGENT_ID {
        return Err(reject(
            RejectCode::BadHello,
            "agent id \"local\" is reserved for the coordinator's embedded agent".into(),
        ));
    }
    if hello.slots_total == 0 || hello.slots_total > 1024 {
        return Err(reject(
            RejectCode::BadHello,
            format!("slot count {} must be 1-1024", hello.slots_total),
        ));
    }
    buildpool_proto::spec::validate_labels(&hello.labels)
        .map_err(|e| reject(RejectCode::BadHello, e.to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn serve_agent<Si, St>(
    shared: Arc<Shared>,
    conn: ConnId,
    hello: Hello,
    peer: String,
    local: bool,
    mut sink: Si,
    mut stream: St,
    shutdown: CancellationToken,
) where
    Si: futures_util::Sink<Message> + Unpin + Send + 'static,
    Si::Error: std::fmt::Display,
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let (outbound, mut outbound_rx) = mpsc::channel::<CoordinatorFrame>(OUTBOUND_CAPACITY);
    let close = CancellationToken::new();
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        coordinator_id: shared.id.clone(),
        heartbeat_interval_ms: u32::try_from(shared.config.heartbeat_interval.as_millis())
            .unwrap_or(u32::MAX),
        heartbeat_timeout_ms: u32::try_from(shared.config.heartbeat_timeout.as_millis())
            .unwrap_or(u32::MAX),
    };
    // Queued before registration, so it is the first frame the agent sees.
    let _ = outbound.try_send(CoordinatorFrame::from(coordinator_frame::Msg::Welcome(
        welcome,
    )));

    let writer = {
        let close = close.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    () = close.cancelled() => break,
                    frame = outbound_rx.recv() => match frame { Some(frame) => frame, None => break },
                };
                let message = Message::Binary(frame::encode(&frame).into());
                match tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!("write to agent failed: {error}");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("write to agent timed out after {WRITE_TIMEOUT:?}");
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
            close.cancel();
        })
    };

    let registration = AgentRegistration {
        agent_id: hello.agent_id.clone(),
        labels: hello.labels.clone(),
        system: hello.system.clone(),
        slots_total: hello.slots_total,
        slots_free: hello.slots_free,
        draining: hello.draining,
        local,
        address: peer,
        connected_at_unix_ms: unix_millis(),
    };
    let reports: Vec<AttemptReport> = hello
        .attempts
        .iter()
        .map(|a| AttemptReport {
            job_id: a.job_id,
            attempt: a.attempt,
        })
        .collect();
    let connection = Connection {
        outbound: outbound.clone(),
        close: close.clone(),
        agent_id: hello.agent_id.clone(),
    };
    shared.register(conn, connection, registration, &reports);
    tracing::info!(slots = hello.slots_total, labels = ?hello.labels, local, reported = reports.len(), "agent connected");

    let heartbeat_timeout = shared.config.heartbeat_timeout;
    let mut heartbeat = tokio::time::interval(shared.config.heartbeat_interval);
    let mut last_heard = tokio::time::Instant::now();
    let reason = loop {
        tokio::select! {
            () = shutdown.cancelled() => break "coordinator shutting down".to_owned(),
            () = close.cancelled() => break "connection closed for writing".to_owned(),
            () = tokio::time::sleep_until(last_heard + heartbeat_timeout) => {
                break format!("no frame for {heartbeat_timeout:?}; presumed dead");
            }
            _ = heartbeat.tick() => {
                let beat = coordinator_frame::Msg::Heartbeat(Heartbeat { sent_at_unix_ms: unix_millis() });
                let _ = outbound.try_send(CoordinatorFrame::from(beat));
            }
            message = stream.next() => {
                last_heard = tokio::time::Instant::now();
                let bytes = match message {
                    None | Some(Ok(Message::Close(_))) => break "agent closed the connection".to_owned(),
                    Some(Err(error)) => break format!("websocket error: {error}"),
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Text(_))) => {
                        protocol_error(&outbound, "text frames are not part of the protocol");
                        break "text frame".to_owned();
                    }
                    Some(Ok(_)) => continue,
                };
                match AgentFrame::decode_frame(&bytes) {
                    Ok(message) => match handle_frame(&shared, conn, message).await {
                        Ok(None) => {}
                        Ok(Some(reply)) => {
                            // Like every frame to an agent: a full queue means a wedged agent.
                            if outbound.try_send(CoordinatorFrame::from(reply)).is_err() {
                                break "agent queue full; closing".to_owned();
                            }
                        }
                        Err(error) => {
                            protocol_error(&outbound, &error);
                            break error;
                        }
                    },
                    Err(error) => {
                        protocol_error(&outbound, &error.to_string());
                        break format!("bad frame: {error}");
                    }
                }
            }
        }
    };
    tracing::info!("agent disconnected: {reason}");
    shared.unregister(conn);
    drop(outbound);
    if tokio::time::timeout(WRITE_TIMEOUT, writer).await.is_err() {
        close.cancel();
    }
}

fn protocol_error(outbound: &mpsc::Sender<CoordinatorFrame>, message: &str) {
    let error = coordinator_frame::Msg::Error(ProtocolError {
        message: message.to_owned(),
    });
    let _ = outbound.try_send(CoordinatorFrame::from(error));
}

/// Applies one agent frame, returning the reply to send, if any. An error ends the
/// connection.
async fn handle_frame(
    shared: &Shared,
    conn: ConnId,
    message: agent_frame::Msg,
) -> Result<Option<coordinator_frame::Msg>, String> {
    let now = Instant::now();
    match message {
        agent_frame::Msg::Heartbeat(_) => {}
        agent_frame::Msg::Slots(slots) => {
            shared.step(|s| {
                (
                    (),
                    s.slots_changed(
                        conn,
                        slots.slots_free,
                        slots.slots_total,
                        slots.draining,
                        now,
                    ),
                )
            });
        }
        agent_frame::Msg::Declined(declined) => {
            tracing::info!(
                job_id = declined.job_id,
                attempt = declined.attempt,
                "agent declined: {}",
                declined.reason
            );
            shared.step(|s| ((), s.declined(conn, declined.job_id, declined.attempt, now)));
        }
        agent_frame::Msg::Output(output) => {
            // Fencing: only the holder of the current attempt may write to the job's log.
            let job = {
                let state = shared.state();
                state
                    .scheduler
                    .holds(conn, output.job_id, output.attempt)
                    .then(|| state.jobs.get(&output.job_id).cloned())
                    .flatten()
            };
            match job {
                Some(job) => {
                    let stream =
                        OutputStream::try_from(output.stream).unwrap_or(OutputStream::Unspecified);
                    if let Err(error) = job.log.append(stream, output.attempt, &output.data).await {
                        tracing::error!(job_id = output.job_id, "cannot write job log: {error}");
                    }
                }
                None => tracing::debug!(
                    job_id = output.job_id,
                    attempt = output.attempt,
                    "dropped output of a stale attempt"
                ),
            }
        }
        agent_frame::Msg::Finished(finished) => {
            let completion = finished.completion.unwrap_or_default();
            let accepted = shared.step(|s| {
                let actions = s.finished(conn, finished.job_id, finished.attempt, completion, now);
                (!actions.is_empty(), actions)
            });
            if !accepted {
                tracing::info!(
                    job_id = finished.job_id,
                    attempt = finished.attempt,
                    "ignored the result of a stale attempt"
                );
            }
            // Accepted or stale, the agent need not keep it any longer.
            let ack = ResultAck {
                job_id: finished.job_id,
                attempt: finished.attempt,
            };
            return Ok(Some(coordinator_frame::Msg::ResultAck(ack)));
        }
        agent_frame::Msg::CancelAck(ack) => {
            tracing::debug!(
                job_id = ack.job_id,
                attempt = ack.attempt,
                "agent confirmed cancel"
            );
        }
        agent_frame::Msg::Hello(_) => return Err("hello sent twice".to_owned()),
    }
    Ok(None)
}
