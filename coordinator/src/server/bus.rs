//! The agent job bus, coordinator side: one task per agent connection.
//!
//! A thin adapter between bus sockets and the scheduler. It checks an agent's hello,
//! registers the connection, turns each message into a scheduler call and writes job
//! output to the job's log. Framing, the bounded outbound queue and write deadlines belong
//! to [`buildpool_proto::socket`]; scheduling belongs to the scheduler.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use buildpool_core::bus::{
    AgentMessage, CoordinatorMessage, Hello, PROTOCOL_VERSION, Reject, RejectCode, Welcome,
};
use buildpool_core::time::unix_millis;
use buildpool_core::{AttemptKey, Completion, OutputStream};
use buildpool_proto::socket::{
    CoordinatorSocket, HANDSHAKE_TIMEOUT, Outbox, SocketError, Transport,
};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::scheduler::{AgentRegistration, ConnId};
use super::{Connection, LOCAL_AGENT_ID, Shared};

/// Messages queued for one agent. Only control messages go this way, so a full queue means
/// the agent stopped reading.
const OUTBOUND_CAPACITY: usize = 256;
/// Connections that have not finished their handshake, at most. Past this, a new connection
/// evicts the oldest pending one (see [`Handshakes`]).
const MAX_PENDING_HANDSHAKES: usize = 64;

/// The connections still in their handshake, oldest first.
///
/// A peer that connects and says nothing holds a handshake until its deadline. Refusing new
/// connections while the table is full would let a few hundred such peers keep every real
/// agent out; evicting the oldest instead lets a real agent, whose handshake takes one round
/// trip, in at once, unless the flood outpaces a whole handshake table per round trip.
#[derive(Debug, Default)]
struct Handshakes {
    next_id: u64,
    pending: VecDeque<(u64, CancellationToken)>,
}

/// One connection's place in [`Handshakes`]; dropping it (handshake done or failed) frees it.
#[derive(Debug)]
pub(crate) struct HandshakeTicket {
    id: u64,
    evicted: CancellationToken,
    table: Arc<Mutex<Handshakes>>,
}

impl HandshakeTicket {
    /// Admits a new connection, evicting the oldest pending one if the table is full.
    fn admit(table: &Arc<Mutex<Handshakes>>, shutdown: &CancellationToken) -> Self {
        let mut handshakes = table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if handshakes.pending.len() >= MAX_PENDING_HANDSHAKES
            && let Some((_, oldest)) = handshakes.pending.pop_front()
        {
            oldest.cancel();
        }
        let id = handshakes.next_id;
        handshakes.next_id += 1;
        // Shutdown ends pending handshakes too, instead of waiting out their deadlines.
        let evicted = shutdown.child_token();
        handshakes.pending.push_back((id, evicted.clone()));
        Self {
            id,
            evicted,
            table: Arc::clone(table),
        }
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        let mut handshakes = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        handshakes.pending.retain(|(id, _)| *id != self.id);
    }
}

/// Accepts agent connections until shutdown.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
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
        let ticket = HandshakeTicket::admit(&handshakes, &shutdown);
        let _ = stream.set_nodelay(true);
        connections.spawn(handle_stream(
            Arc::clone(&shared),
            stream,
            peer.to_string(),
            false,
            shutdown.clone(),
            Some(ticket),
        ));
    }
    while connections.join_next().await.is_some() {}
}

/// Serves one agent connection: upgrade, authenticate, then messages until it ends.
pub(crate) async fn handle_stream(
    shared: Arc<Shared>,
    stream: impl Transport,
    peer: String,
    local: bool,
    shutdown: CancellationToken,
    ticket: Option<HandshakeTicket>,
) {
    let evicted = ticket
        .as_ref()
        .map_or_else(CancellationToken::new, |t| t.evicted.clone());
    // The upgrade and the first message, each with its deadline; an eviction ends either.
    let handshake = async {
        let mut socket = CoordinatorSocket::accept(stream).await?;
        let first = socket.recv_within(HANDSHAKE_TIMEOUT).await;
        Ok::<_, SocketError>((socket, first))
    };
    let (mut socket, first) = tokio::select! {
        handshake = handshake => match handshake {
            Ok(handshake) => handshake,
            Err(error) => {
                tracing::warn!(%peer, "websocket upgrade failed: {error}");
                return;
            }
        },
        () = evicted.cancelled() => {
            tracing::warn!(%peer, "handshake evicted by newer connections (too many pending)");
            return;
        }
    };
    let hello = match first {
        Ok(Some(AgentMessage::Hello(hello))) => Ok(hello),
        Ok(Some(_)) => Err("expected hello as the first message".to_owned()),
        Ok(None) => Err("closed before hello".to_owned()),
        Err(SocketError::Timeout(_)) => Err("no hello within the handshake timeout".to_owned()),
        Err(error) => Err(error.to_string()),
    };
    let checked = hello
        .map_err(unreadable_hello)
        .and_then(|hello| check_hello(&shared, &hello, local).map(|()| hello));
    let hello = match checked {
        Ok(hello) => hello,
        Err(reject) => {
            tracing::warn!(%peer, "rejected agent: {}", reject.message);
            let _ = socket.send(CoordinatorMessage::Reject(reject)).await;
            socket.close().await;
            return;
        }
    };
    drop(ticket);

    let conn = shared.next_conn_id();
    let span = tracing::info_span!("agent", agent_id = %hello.agent_id, conn, %peer);
    serve_agent(shared, conn, hello, peer, local, socket, shutdown)
        .instrument(span)
        .await;
}

/// The reject for a hello that could not be read at all.
fn unreadable_hello(message: String) -> Reject {
    Reject {
        code: RejectCode::BadHello,
        message,
    }
}

fn check_hello(shared: &Shared, hello: &Hello, local: bool) -> Result<(), Reject> {
    let reject = |code: RejectCode, message: String| Reject { code, message };
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
    if !local && hello.agent_id == LOCAL_AGENT_ID {
        return Err(reject(
            RejectCode::BadHello,
            "agent id \"local\" is reserved for the coordinator's embedded agent".into(),
        ));
    }
    if hello.slots.total == 0 || hello.slots.total > 1024 {
        return Err(reject(
            RejectCode::BadHello,
            format!("slot count {} must be 1-1024", hello.slots.total),
        ));
    }
    buildpool_core::spec::validate_labels(&hello.labels)
        .map_err(|e| reject(RejectCode::BadHello, e.to_string()))
}

async fn serve_agent(
    shared: Arc<Shared>,
    conn: ConnId,
    hello: Hello,
    peer: String,
    local: bool,
    socket: CoordinatorSocket,
    shutdown: CancellationToken,
) {
    let (outbox, mut inbox) = socket.start(OUTBOUND_CAPACITY);
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        coordinator_id: shared.id.clone(),
        heartbeat_interval: shared.config.heartbeat_interval,
        heartbeat_timeout: shared.config.heartbeat_timeout,
    };
    // Queued before registration, so it is the first message the agent sees.
    let _ = outbox.try_send(CoordinatorMessage::Welcome(welcome));

    let registration = AgentRegistration {
        agent_id: hello.agent_id.clone(),
        labels: hello.labels.clone(),
        system: hello.system.clone(),
        slots_total: hello.slots.total,
        slots_free: hello.slots.free,
        draining: hello.slots.draining,
        local,
        address: peer,
        connected_at_unix_ms: unix_millis(),
    };
    let reports: Vec<AttemptKey> = hello.attempts.iter().map(|held| held.key).collect();
    let connection = Connection {
        outbox: outbox.clone(),
        agent_id: hello.agent_id.clone(),
    };
    shared.register(conn, connection, registration, &reports);
    tracing::info!(slots = hello.slots.total, labels = ?hello.labels, local, reported = reports.len(), "agent connected");

    let heartbeat_timeout = shared.config.heartbeat_timeout;
    let mut heartbeat = tokio::time::interval(shared.config.heartbeat_interval);
    let mut last_heard = tokio::time::Instant::now();
    let reason = loop {
        tokio::select! {
            () = shutdown.cancelled() => break "coordinator shutting down".to_owned(),
            () = outbox.closed() => break "connection closed for writing".to_owned(),
            () = tokio::time::sleep_until(last_heard + heartbeat_timeout) => {
                break format!("no frame for {heartbeat_timeout:?}; presumed dead");
            }
            _ = heartbeat.tick() => {
                // A full queue is already a problem the next action will notice.
                let _ = outbox.try_send(CoordinatorMessage::Heartbeat { sent_at_unix_ms: unix_millis() });
            }
            message = inbox.recv() => {
                last_heard = tokio::time::Instant::now();
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => break "agent closed the connection".to_owned(),
                    Err(SocketError::WebSocket(error)) => break format!("websocket error: {error}"),
                    Err(error) => {
                        protocol_error(&outbox, error.to_string());
                        break format!("bad frame: {error}");
                    }
                };
                match handle_message(&shared, conn, message).await {
                    Ok(None) => {}
                    Ok(Some(reply)) => {
                        // Like every message to an agent: a full queue means a wedged agent.
                        if outbox.try_send(reply).is_err() {
                            break "agent queue full; closing".to_owned();
                        }
                    }
                    Err(error) => {
                        protocol_error(&outbox, error.clone());
                        break error;
                    }
                }
            }
        }
    };
    tracing::info!("agent disconnected: {reason}");
    shared.unregister(conn);
    drop(outbox);
    inbox.finish().await;
}

fn protocol_error(outbox: &Outbox<CoordinatorMessage>, message: String) {
    let _ = outbox.try_send(CoordinatorMessage::ProtocolError(message));
}

/// Applies one agent message, returning the reply to send, if any. An error ends the
/// connection.
async fn handle_message(
    shared: &Shared,
    conn: ConnId,
    message: AgentMessage,
) -> Result<Option<CoordinatorMessage>, String> {
    let now = Instant::now();
    match message {
        AgentMessage::Heartbeat { .. } => {}
        AgentMessage::Slots(offer) => {
            shared.step(|s| {
                (
                    (),
                    s.slots_changed(conn, offer.free, offer.total, offer.draining, now),
                )
            });
        }
        AgentMessage::Declined { key, reason } => {
            tracing::info!(
                job_id = key.job_id,
                attempt = key.attempt,
                "agent declined: {reason}"
            );
            shared.step(|s| ((), s.declined(conn, key, now)));
        }
        AgentMessage::Output { key, stream, data } => {
            append_output(shared, conn, key, stream, &data).await
        }
        AgentMessage::Finished { key, completion } => {
            return Ok(Some(accept_result(shared, conn, key, completion, now)));
        }
        AgentMessage::CancelAck(key) => {
            tracing::debug!(
                job_id = key.job_id,
                attempt = key.attempt,
                "agent confirmed cancel"
            );
        }
        AgentMessage::Hello(_) => return Err("hello sent twice".to_owned()),
    }
    Ok(None)
}

/// Fencing: only the holder of the current attempt may write to the job's log.
async fn append_output(
    shared: &Shared,
    conn: ConnId,
    key: AttemptKey,
    stream: OutputStream,
    data: &Bytes,
) {
    let job = {
        let state = shared.state();
        state
            .scheduler
            .holds(conn, key)
            .then(|| state.jobs.get(&key.job_id).cloned())
            .flatten()
    };
    match job {
        Some(job) => {
            if let Err(error) = job.log.append(stream, key.attempt, data).await {
                tracing::error!(job_id = key.job_id, "cannot write job log: {error}");
            }
        }
        None => tracing::debug!(
            job_id = key.job_id,
            attempt = key.attempt,
            "dropped output of a stale attempt"
        ),
    }
}

/// Records a result if `conn` holds the attempt, and acknowledges it either way: a stale
/// result is of no use to anyone, so the agent need not keep it.
fn accept_result(
    shared: &Shared,
    conn: ConnId,
    key: AttemptKey,
    completion: Completion,
    now: Instant,
) -> CoordinatorMessage {
    let accepted = shared.step(|s| {
        let actions = s.finished(conn, key, completion, now);
        (!actions.is_empty(), actions)
    });
    if !accepted {
        tracing::info!(
            job_id = key.job_id,
            attempt = key.attempt,
            "ignored the result of a stale attempt"
        );
    }
    CoordinatorMessage::ResultAck(key)
}

#[cfg(test)]
mod tests;
