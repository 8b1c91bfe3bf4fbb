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
    CoordinatorSocket, HANDSHAKE_TIMEOUT, Outbox, SocketError, Transport, Upgrade,
};
use buildpool_proto::tunnel::Tunnel;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::active::ActiveJob;
use super::dispatch::Connection;
use super::git_daemon::RequestFilter;
use super::scheduler::{AgentRegistration, ConnId, LOCAL_AGENT_ID};
use super::shared::Shared;
use crate::auth::{CredentialName, Scope};

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
        connections.spawn(handle_tcp(
            Arc::clone(&shared),
            stream,
            peer,
            shutdown.clone(),
            ticket,
        ));
    }
    while connections.join_next().await.is_some() {}
}

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a plain-text client of a TLS-only bus reads.
const TLS_REQUIRED: &str = "this coordinator accepts TLS only: connect to wss://HOST:PORT/ws \
     and pin the fingerprint `buildpool serve` printed (--tls-fingerprint)";

/// Serves one TCP connection on the bus port: TLS (or, where allowed, plain text), then
/// [`handle_stream`]. Everything before the upgrade shares the handshake deadline.
async fn handle_tcp(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    shutdown: CancellationToken,
    ticket: HandshakeTicket,
) {
    let secured = async {
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            Ok(Ok(_)) => return Err("closed before saying anything".to_owned()),
            Ok(Err(error)) => return Err(error.to_string()),
            Err(_) => return Err("said nothing within the handshake timeout".to_owned()),
        }
        if first[0] == TLS_HANDSHAKE_RECORD {
            let Some(tls) = &shared.tls else {
                return Err("a TLS client, but this coordinator has no certificate".to_owned());
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.bus));
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => Ok(Box::new(stream) as Box<dyn Transport>),
                Ok(Err(error)) => Err(format!("TLS handshake failed: {error}")),
                Err(_) => Err("TLS handshake timed out".to_owned()),
            }
        } else if shared.config.allow_insecure {
            Ok(Box::new(tcp) as Box<dyn Transport>)
        } else {
            refuse_plain_text(tcp).await;
            Err("plain-text connection refused: this bus requires TLS".to_owned())
        }
    };
    let stream = tokio::select! {
        secured = secured => match secured {
            Ok(stream) => stream,
            Err(reason) => {
                tracing::warn!(%peer, "{reason}");
                return;
            }
        },
        () = ticket.evicted.cancelled() => {
            tracing::warn!(%peer, "handshake evicted by newer connections (too many pending)");
            return;
        }
    };
    handle_stream(shared, stream, Peer::Remote(peer), shutdown, Some(ticket)).await;
}

/// Answers a plain HTTP request on a TLS-only port with a reason a person can act on.
async fn refuse_plain_text(mut tcp: tokio::net::TcpStream) {
    let response = format!(
        "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{TLS_REQUIRED}",
        TLS_REQUIRED.len()
    );
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        // The request must be read, or closing with unread data resets the connection
        // before the client reads the answer.
        let mut request = [0u8; 4096];
        let _ = tcp.read(&mut request).await;
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await;
}

/// Who is on the other end of a bus connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Peer {
    Remote(std::net::SocketAddr),
    /// The coordinator's embedded agent, over an in-memory stream.
    Local,
}

impl Peer {
    fn ip(self) -> Option<std::net::IpAddr> {
        match self {
            Peer::Remote(addr) => Some(addr.ip()),
            Peer::Local => None,
        }
    }

    fn is_local(self) -> bool {
        matches!(self, Peer::Local)
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Remote(addr) => write!(f, "{addr}"),
            Peer::Local => f.write_str(LOCAL_AGENT_ID),
        }
    }
}

/// Serves one bus connection: upgrade, then an agent (authenticated, then messages until
/// it ends) or a git tunnel.
pub(crate) async fn handle_stream(
    shared: Arc<Shared>,
    stream: impl Transport,
    peer: Peer,
    shutdown: CancellationToken,
    ticket: Option<HandshakeTicket>,
) {
    let evicted = ticket
        .as_ref()
        .map_or_else(CancellationToken::new, |t| t.evicted.clone());
    // The upgrade and the first message, each with its deadline; an eviction ends either.
    let handshake = async {
        let mut socket = match buildpool_proto::socket::accept(stream).await? {
            Upgrade::Bus(socket) => socket,
            tunnel => return Ok(Err(tunnel)),
        };
        let first = socket.recv_within(HANDSHAKE_TIMEOUT).await;
        Ok::<_, SocketError>(Ok((socket, first)))
    };
    let (mut socket, first) = tokio::select! {
        handshake = handshake => match handshake {
            Ok(Ok(handshake)) => handshake,
            Ok(Err(tunnel)) => {
                drop(ticket);
                tokio::select! {
                    () = serve_tunnel(&shared, tunnel, peer) => {}
                    () = shutdown.cancelled() => {}
                }
                return;
            }
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
        .and_then(|hello| check_hello(&shared, &hello, peer).map(|identity| (hello, identity)));
    let (hello, identity) = match checked {
        Ok(checked) => checked,
        Err(reject) => {
            tracing::warn!(%peer, "rejected agent: {}", reject.message);
            let _ = socket.send(CoordinatorMessage::Reject(reject)).await;
            socket.close().await;
            return;
        }
    };
    drop(ticket);

    let conn = shared.dispatch.next_conn_id();
    let span = tracing::info_span!("agent", agent_id = %hello.agent_id, conn, %peer);
    serve_agent(shared, conn, hello, identity, peer, socket, shutdown)
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

/// Splices an authenticated git tunnel to the loopback git daemon, its request made one
/// that fetches only what the snapshot refs reach ([`RequestFilter`]).
async fn serve_tunnel(shared: &Shared, upgrade: Upgrade, peer: Peer) {
    let (tunnel, bearer, archive) = match upgrade {
        Upgrade::Tunnel { tunnel, bearer } => (tunnel, bearer, None),
        Upgrade::Archive {
            tunnel,
            bearer,
            job_id,
        } => (tunnel, bearer, Some(job_id)),
        Upgrade::Bus(_) => return,
    };
    if let Err(reason) = shared.access.authorize(&bearer, Scope::Agent, peer.ip()) {
        tracing::warn!(%peer, "tunnel refused: {reason}");
        tunnel.refuse(&reason).await;
        return;
    }
    match archive {
        Some(job_id) => serve_archive(shared, tunnel, job_id, peer).await,
        None => serve_git(shared, tunnel, peer).await,
    }
}

/// Sends job `job_id`'s test archive down an agent's tunnel: a slice of a spread test run
/// takes the tests the archive job built, rather than building them again.
async fn serve_archive(shared: &Shared, tunnel: Tunnel, job_id: u64, peer: Peer) {
    let archive = match shared.artifacts.archive(job_id).await {
        Ok(archive) => archive,
        Err(error) => {
            tracing::warn!(job_id, "test archive refused: {error}");
            tunnel.refuse(&error.to_string()).await;
            return;
        }
    };
    let started = Instant::now();
    match tunnel
        .splice(tokio::io::join(archive, tokio::io::sink()))
        .await
    {
        Ok(traffic) => tracing::info!(
            %peer,
            job_id,
            bytes_to_agent = traffic.sent,
            elapsed_ms = started.elapsed().as_millis(),
            "test archive sent"
        ),
        Err(error) => tracing::warn!(%peer, job_id, "test archive: {error}"),
    }
}

/// Splices an agent's tunnel to the git daemon, for one fetch.
async fn serve_git(shared: &Shared, tunnel: Tunnel, peer: Peer) {
    let (Some(port), Some((listen, _))) = (shared.git_daemon_port, &shared.config.git_daemon)
    else {
        tunnel.refuse("this coordinator runs no git daemon").await;
        return;
    };
    // Where the daemon listens: loopback (v4, v6 or by name) unless direct git is allowed,
    // when an empty address means every interface, loopback included.
    let host = if listen.is_empty() {
        "127.0.0.1"
    } else {
        listen.as_str()
    };
    let daemon = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)),
    )
    .await
    {
        Ok(Ok(daemon)) => daemon,
        Ok(Err(error)) => {
            tracing::error!(%peer, "git tunnel: cannot reach the git daemon on port {port}: {error}");
            tunnel
                .refuse("the coordinator's git daemon is not reachable")
                .await;
            return;
        }
        Err(_) => {
            tunnel
                .refuse("the coordinator's git daemon did not answer")
                .await;
            return;
        }
    };
    let _ = daemon.set_nodelay(true);
    let started = Instant::now();
    match tunnel.splice(RequestFilter::new(daemon)).await {
        Ok(traffic) => tracing::info!(
            %peer,
            bytes_to_agent = traffic.sent,
            bytes_from_agent = traffic.received,
            elapsed_ms = started.elapsed().as_millis(),
            "git fetch through the tunnel"
        ),
        Err(error) => tracing::warn!(%peer, "git tunnel: {error}"),
    }
}

/// Checks a hello and returns the identity the agent id is bound to: the proof of the
/// agent's key, or for an agent that shows none (an older one) its credential's name.
fn check_hello(shared: &Shared, hello: &Hello, peer: Peer) -> Result<String, Reject> {
    let local = peer.is_local();
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
    let credential = if local {
        CredentialName::Legacy
    } else {
        shared
            .access
            .authorize(&hello.token, Scope::Agent, peer.ip())
            .map_err(|reason| reject(RejectCode::BadToken, reason))?
    };
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
        .map_err(|e| reject(RejectCode::BadHello, e.to_string()))?;
    Ok(if hello.identity.is_empty() {
        format!("credential {credential}")
    } else {
        format!("key {}", hello.identity)
    })
}

async fn serve_agent(
    shared: Arc<Shared>,
    conn: ConnId,
    hello: Hello,
    identity: String,
    peer: Peer,
    socket: CoordinatorSocket,
    shutdown: CancellationToken,
) {
    let local = peer.is_local();
    let (outbox, mut inbox) = socket.start(OUTBOUND_CAPACITY);
    let reported = match register(&shared, conn, &hello, identity, &peer, &outbox) {
        Ok(reported) => reported,
        Err(reason) => {
            tracing::warn!("rejected agent: {reason}");
            let _ = outbox.try_send(CoordinatorMessage::Reject(Reject {
                code: RejectCode::IdTaken,
                message: reason,
            }));
            // Sent before the connection closes: the writer sends what is queued once its
            // last outbox is gone.
            drop(outbox);
            inbox.finish().await;
            return;
        }
    };
    if !local {
        shared.metrics.agent_connected(&hello.agent_id);
    }
    tracing::info!(slots = hello.slots.total, labels = ?hello.labels, local, reported, "agent connected");

    let heartbeat_timeout = shared.config.heartbeat_timeout;
    let mut heartbeat = tokio::time::interval(shared.config.heartbeat_interval);
    let mut last_heard = tokio::time::Instant::now();
    // Results being stored before they are acknowledged. They wait beside the connection,
    // not in its way: an agent's other messages (output of its other jobs, offers,
    // heartbeats) are read meanwhile. Waiting for each in turn made one connection take
    // at most one result per store commit, and jobs queued behind it.
    let mut results = FuturesUnordered::new();
    let reason = loop {
        tokio::select! {
            () = shutdown.cancelled() => break "coordinator shutting down".to_owned(),
            Some(acknowledgement) = results.next(), if !results.is_empty() => {
                // Like every message to an agent: a full queue means a wedged agent.
                if let Some(reply) = acknowledgement
                    && outbox.try_send(reply).is_err()
                {
                    break "agent queue full; closing".to_owned();
                }
            }
            () = outbox.closed() => break "connection closed for writing".to_owned(),
            () = tokio::time::sleep_until(last_heard + heartbeat_timeout) => {
                break format!("no frame for {heartbeat_timeout:?}; presumed dead");
            }
            _ = heartbeat.tick() => {
                // A full queue is already a problem the next action will notice.
                let _ = outbox.try_send(CoordinatorMessage::Heartbeat { sent_at_unix_ms: unix_millis() });
            }
            message = inbox.recv(), if results.len() < MAX_RESULTS_BEING_STORED => {
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
                    Ok(Some(ReportedResult { key, completion })) => {
                        results.push(accept_result(&shared, conn, key, completion, Instant::now()));
                    }
                    Err(error) => {
                        protocol_error(&outbox, error.clone());
                        break error;
                    }
                }
            }
        }
    };
    // Results already received are applied before the agent counts as gone, as they were
    // when each was handled in turn: its jobs end rather than run again. Nothing new is
    // placed on it meanwhile: an assignment would be lost on the closed connection.
    if !results.is_empty() {
        shared.dispatch.step(|s| {
            s.closing(conn);
            ((), Vec::new())
        });
    }
    while let Some(acknowledgement) = results.next().await {
        if let Some(reply) = acknowledgement {
            let _ = outbox.try_send(reply);
        }
    }
    tracing::info!("agent disconnected: {reason}");
    shared.dispatch.unregister(conn);
    drop(outbox);
    inbox.finish().await;
}

/// Registers the agent of `hello` on connection `conn`, with the attempts it reports
/// holding (their number is returned); the reason when its id belongs to another agent.
fn register(
    shared: &Shared,
    conn: ConnId,
    hello: &Hello,
    identity: String,
    peer: &Peer,
    outbox: &Outbox<CoordinatorMessage>,
) -> Result<usize, String> {
    let local = peer.is_local();
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        coordinator_id: shared.id.clone(),
        heartbeat_interval: shared.config.heartbeat_interval,
        heartbeat_timeout: shared.config.heartbeat_timeout,
    };
    let registration = AgentRegistration {
        agent_id: hello.agent_id.clone(),
        labels: hello.labels.clone(),
        system: hello.system.clone(),
        slots_total: hello.slots.total,
        slots_free: hello.slots.free,
        draining: hello.slots.draining,
        local,
        address: peer.to_string(),
        connected_at_unix_ms: unix_millis(),
        sandboxed: hello.sandboxed,
        disk: hello.disk,
        identity,
    };
    let reports: Vec<AttemptKey> = hello.attempts.iter().map(|held| held.key).collect();
    let connection = Connection {
        outbox: outbox.clone(),
        agent_id: hello.agent_id.clone(),
        // The embedded agent presents none; it is never re-checked.
        credential: (!local).then(|| hello.token.clone()),
    };
    shared
        .dispatch
        .register(conn, connection, registration, &reports, welcome)?;
    Ok(reports.len())
}

fn protocol_error(outbox: &Outbox<CoordinatorMessage>, message: String) {
    let _ = outbox.try_send(CoordinatorMessage::ProtocolError(message));
}

/// A job's result as an agent reported it, to be stored and then acknowledged
/// ([`accept_result`]).
struct ReportedResult {
    key: AttemptKey,
    completion: Completion,
}

/// Results of one connection being stored at once; beyond it, the connection is read again
/// once one is acknowledged. It bounds what one peer can have the coordinator hold; the
/// store commits within a few ms, so a real agent's results rarely come near it.
const MAX_RESULTS_BEING_STORED: usize = 256;

/// Applies one agent message; a result is returned to be stored beside the connection. An
/// error ends the connection.
async fn handle_message(
    shared: &Shared,
    conn: ConnId,
    message: AgentMessage,
) -> Result<Option<ReportedResult>, String> {
    let now = Instant::now();
    match message {
        AgentMessage::Heartbeat { .. } => {}
        AgentMessage::Disk(usage) => shared.dispatch.step(|s| {
            s.disk_changed(conn, usage);
            ((), Vec::new())
        }),
        AgentMessage::Slots(offer) => {
            shared.dispatch.step(|s| {
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
            shared.metrics.declined();
            shared.dispatch.step(|s| ((), s.declined(conn, key, now)));
        }
        AgentMessage::Output { key, stream, data } => {
            append_output(shared, conn, key, stream, &data).await
        }
        AgentMessage::Artifact { key, chunk } => {
            if shared.dispatch.state().scheduler.holds(conn, key) {
                // Chunks of up to 256 KiB and whole directories removed: file work that must
                // not stall the runtime thread serving this and other agents' connections.
                // Awaited, so the chunks of a connection are still stored in order.
                let store = Arc::clone(&shared.artifacts);
                if let Err(error) =
                    tokio::task::spawn_blocking(move || store.receive(key, &chunk)).await
                {
                    tracing::warn!(job_id = key.job_id, "storing executables failed: {error}");
                }
            } else {
                tracing::debug!(
                    job_id = key.job_id,
                    attempt = key.attempt,
                    "dropped executables of a stale attempt"
                );
            }
        }
        AgentMessage::Finished { key, completion } => {
            return Ok(Some(ReportedResult { key, completion }));
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

/// The job whose current attempt `key` is, if `conn` holds it.
fn held_job(shared: &Shared, conn: ConnId, key: AttemptKey) -> Option<Arc<ActiveJob>> {
    let state = shared.dispatch.state();
    state
        .scheduler
        .holds(conn, key)
        .then(|| state.jobs.get(&key.job_id).cloned())
        .flatten()
}

/// Fencing: only the holder of the current attempt may write to the job's log.
async fn append_output(
    shared: &Shared,
    conn: ConnId,
    key: AttemptKey,
    stream: OutputStream,
    data: &Bytes,
) {
    match held_job(shared, conn, key) {
        Some(job) => {
            shared.metrics.output(data.len());
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
/// result is of no use to anyone, so the agent need not keep it. An accepted result is
/// acknowledged only once it is stored: until then the agent keeps it, and reports it
/// again to a restarted coordinator. (`None`: the store failed; no acknowledgement.)
async fn accept_result(
    shared: &Shared,
    conn: ConnId,
    key: AttemptKey,
    completion: Completion,
    now: Instant,
) -> Option<CoordinatorMessage> {
    // The output the agent sent before its result is queued for the log; it is written
    // first, so followers get the whole output before the end and an acknowledged result
    // never outruns its output.
    if let Some(job) = held_job(shared, conn, key) {
        job.log.written().await;
    }
    // The result is queued for the store inside the step: what the acknowledgement waits for.
    let from = shared
        .jobs
        .records
        .store()
        .map(super::store::Store::position);
    let accepted = shared.dispatch.step(|s| {
        let actions = s.finished(conn, key, completion, now);
        (!actions.is_empty(), actions)
    });
    if !accepted {
        tracing::info!(
            job_id = key.job_id,
            attempt = key.attempt,
            "ignored the result of a stale attempt"
        );
    } else if let (Some(store), Some(from)) = (shared.jobs.records.store(), from)
        && let Err(error) = store.committed_since(from).await
    {
        tracing::error!(job_id = key.job_id, "result not acknowledged: {error}");
        return None;
    }
    Some(CoordinatorMessage::ResultAck(key))
}

#[cfg(test)]
mod tests;
