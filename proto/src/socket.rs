//! The one framed socket type of the job bus, used by both ends.
//!
//! A [`BusSocket`] is a WebSocket that carries one [`BusMessage`] per binary frame, with the
//! frame size limit on both directions. During the handshake it is used directly (`send`,
//! `recv`, each with a deadline). Then [`BusSocket::start`] splits it: an [`Outbox`] (a
//! bounded queue, cloneable, never blocking a caller that uses `try_send`) drained by a
//! writer task that gives every frame and every flush [`WRITE_TIMEOUT`], and an [`Inbox`] to
//! read from.
//! A write that fails or times out closes the socket, and the [`Outbox`] says so, so a
//! half-open peer is detected instead of blocking anyone.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use buildpool_core::bus::{AgentMessage, CoordinatorMessage};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::frame::BusMessage;
use crate::tunnel::{ARCHIVE_PATH, TUNNEL_PATH, Tunnel};
use crate::websocket::{Stream, deadline, dial, upgrade_client, websocket_config};
// The bus's users find the whole of it here, its transport's settings and errors included.
pub use crate::websocket::{
    BUS_PATH, HANDSHAKE_TIMEOUT, ServerUrl, SocketError, Transport, WRITE_TIMEOUT,
};

/// The socket a coordinator holds: reads agent messages, writes coordinator messages.
pub type CoordinatorSocket = BusSocket<AgentMessage, CoordinatorMessage>;
/// The socket an agent holds.
pub type AgentSocket = BusSocket<CoordinatorMessage, AgentMessage>;

/// A job bus connection during its handshake; see the module documentation.
pub struct BusSocket<In, Out> {
    ws: Stream,
    _messages: PhantomData<fn(Out) -> In>,
}

impl<In, Out> std::fmt::Debug for BusSocket<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusSocket").finish_non_exhaustive()
    }
}

/// What an accepted connection asked for.
pub enum Upgrade {
    /// An agent, at [`BUS_PATH`].
    Bus(CoordinatorSocket),
    /// A git tunnel, at [`TUNNEL_PATH`], with the credential it presented (empty if none).
    Tunnel { tunnel: Tunnel, bearer: String },
    /// A tunnel for job `job_id`'s test archive, at [`ARCHIVE_PATH`], with the credential
    /// it presented.
    Archive {
        tunnel: Tunnel,
        bearer: String,
        job_id: u64,
    },
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upgrade::Bus(_) => f.write_str("Upgrade::Bus"),
            Upgrade::Tunnel { .. } => f.write_str("Upgrade::Tunnel"),
            Upgrade::Archive { job_id, .. } => write!(f, "Upgrade::Archive({job_id})"),
        }
    }
}

/// Server side, where only the bus is served (tests, tools): like [`accept`], with a git
/// tunnel request an error.
pub async fn accept_bus(stream: impl Transport) -> Result<CoordinatorSocket, SocketError> {
    match accept(stream).await? {
        Upgrade::Bus(socket) => Ok(socket),
        Upgrade::Tunnel { .. } | Upgrade::Archive { .. } => Err(SocketError::Refused {
            status: 404,
            message: format!("only the bus is served here, at {BUS_PATH}"),
        }),
    }
}

/// What an upgrade request's path asks for.
#[derive(Debug, Clone, Copy, Default)]
enum Route {
    #[default]
    Bus,
    Git,
    Archive(u64),
}

impl Route {
    /// The route of `path`; `None` for a path nothing is served at.
    fn of(path: &str) -> Option<Self> {
        match path {
            BUS_PATH => Some(Route::Bus),
            TUNNEL_PATH => Some(Route::Git),
            _ => path
                .strip_prefix(ARCHIVE_PATH)
                .and_then(|job| job.parse().ok())
                .map(Route::Archive),
        }
    }
}

/// Server side: completes the WebSocket upgrade of an accepted stream, for the bus, the
/// git tunnel or a test archive's tunnel. Requests for any other path get a 404 that says
/// where agents connect.
pub async fn accept(stream: impl Transport) -> Result<Upgrade, SocketError> {
    let asked = Arc::new(std::sync::Mutex::new((Route::Bus, String::new())));
    let record = Arc::clone(&asked);
    // The callback's error type is tungstenite's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let route = move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let Some(route) = Route::of(request.uri().path()) else {
            let mut error =
                ErrorResponse::new(Some(format!("buildpool agents connect at {BUS_PATH}\n")));
            *error.status_mut() = StatusCode::NOT_FOUND;
            return Err(error);
        };
        let bearer = request
            .headers()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        *record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (route, bearer.to_owned());
        Ok(response)
    };
    let stream: Box<dyn Transport> = Box::new(stream);
    let upgrade =
        tokio_tungstenite::accept_hdr_async_with_config(stream, route, Some(websocket_config()));
    let ws = deadline("upgrading to websocket", HANDSHAKE_TIMEOUT, upgrade).await?;
    let (route, bearer) = std::mem::take(
        &mut *asked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok(match route {
        Route::Bus => Upgrade::Bus(BusSocket::new(ws)),
        Route::Git => Upgrade::Tunnel {
            tunnel: Tunnel::new(ws),
            bearer,
        },
        Route::Archive(job_id) => Upgrade::Archive {
            tunnel: Tunnel::new(ws),
            bearer,
            job_id,
        },
    })
}

impl<In: BusMessage, Out: BusMessage> BusSocket<In, Out> {
    fn new(ws: Stream) -> Self {
        Self {
            ws,
            _messages: PhantomData,
        }
    }

    /// Client side: dials a coordinator's bus, over TLS configured by `tls` for `wss://`.
    pub async fn connect(
        server: &ServerUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Self, SocketError> {
        dial(server, tls, BUS_PATH, None).await.map(Self::new)
    }

    /// Client side over a stream the caller established (an in-memory duplex for the
    /// coordinator's embedded agent).
    pub async fn client(stream: impl Transport) -> Result<Self, SocketError> {
        upgrade_client(Box::new(stream), format!("ws://localhost{BUS_PATH}"))
            .await
            .map(Self::new)
    }

    /// Sends one message, within [`WRITE_TIMEOUT`].
    pub async fn send(&mut self, message: Out) -> Result<(), SocketError> {
        let frame = Message::Binary(message.encode_frame().into());
        deadline("writing a frame", WRITE_TIMEOUT, self.ws.send(frame)).await
    }

    /// Receives the next message within `timeout`; `None` when the peer closed.
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Option<In>, SocketError> {
        match tokio::time::timeout(timeout, next_message(&mut self.ws)).await {
            Ok(result) => result,
            Err(_) => Err(SocketError::Timeout("waiting for a frame")),
        }
    }

    /// Closes the connection politely, within [`WRITE_TIMEOUT`].
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, self.ws.close(None)).await;
    }

    /// Splits the socket for its working life; see the module documentation. `capacity`
    /// bounds the frames waiting for the writer.
    pub fn start(self, capacity: usize) -> (Outbox<Out>, Inbox<In>) {
        let (sink, stream) = self.ws.split();
        let (sender, queue) = mpsc::channel(capacity);
        let closed = CancellationToken::new();
        let writer = tokio::spawn(write_frames(sink, queue, closed.clone()));
        let outbox = Outbox {
            sender,
            closed: closed.clone(),
        };
        (
            outbox,
            Inbox {
                stream,
                closed,
                writer: Some(writer),
                _messages: PhantomData,
            },
        )
    }
}

async fn next_message<S, In>(stream: &mut S) -> Result<Option<In>, SocketError>
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    In: BusMessage,
{
    loop {
        match stream.next().await {
            None | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Err(error)) => return Err(error.into()),
            Some(Ok(Message::Binary(bytes))) => return Ok(Some(In::decode_frame(&bytes)?)),
            Some(Ok(Message::Text(_))) => return Err(SocketError::TextFrame),
            // Ping, pong and raw frames are the WebSocket layer's business.
            Some(Ok(_)) => {}
        }
    }
}

/// Drains the queue until every [`Outbox`] is gone or the socket is closed, giving each
/// frame and each flush [`WRITE_TIMEOUT`]; then closes the WebSocket and marks the socket
/// closed.
///
/// What was queued meanwhile goes out with the frame that woke the writer, in one flush
/// (more is taken until [`FLUSH_AFTER_BYTES`] are fed): a job's last output, its result
/// and the agent's new slot offer are one write to the socket rather than three, and so
/// are an acknowledgement and the demand that follows it. At thousands of jobs a second,
/// a flush per frame would cost a TLS record and a system call each, on both ends.
async fn write_frames<Out: BusMessage>(
    mut sink: SplitSink<Stream, Message>,
    mut queue: mpsc::Receiver<Out>,
    closed: CancellationToken,
) {
    let frame = |message: Out| Message::Binary(message.encode_frame().into());
    'writing: loop {
        let message = tokio::select! {
            () = closed.cancelled() => break,
            message = queue.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let mut fed = frame(message);
        let mut fed_bytes = 0;
        loop {
            fed_bytes += fed.len();
            if let Err(error) = deadline("writing a frame", WRITE_TIMEOUT, sink.feed(fed)).await {
                tracing::warn!("write to the peer failed: {error}");
                break 'writing;
            }
            if fed_bytes >= FLUSH_AFTER_BYTES {
                break;
            }
            match queue.try_recv() {
                Ok(message) => fed = frame(message),
                Err(_) => break,
            }
        }
        if let Err(error) = deadline("flushing frames", WRITE_TIMEOUT, sink.flush()).await {
            tracing::warn!("write to the peer failed: {error}");
            break;
        }
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
    closed.cancel();
}

/// Bytes fed to the socket after which it is flushed even if more frames are queued (the
/// frame that crosses it is the last): a peer that reads slowly gets its frames in pieces of
/// a bounded size, each flush within [`WRITE_TIMEOUT`].
const FLUSH_AFTER_BYTES: usize = 256 * 1024;

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue is full: the peer stopped reading.
    #[error("the outbound queue is full")]
    Full,
    #[error("the connection is closed")]
    Closed,
}

/// The sending half of a started socket. Cheap to clone.
#[derive(Debug)]
pub struct Outbox<Out> {
    sender: mpsc::Sender<Out>,
    closed: CancellationToken,
}

impl<Out> Clone for Outbox<Out> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
            closed: self.closed.clone(),
        }
    }
}

impl<Out> Outbox<Out> {
    /// Queues a message without waiting; the caller decides what a full queue means.
    pub fn try_send(&self, message: Out) -> Result<(), SendError> {
        if self.closed.is_cancelled() {
            return Err(SendError::Closed);
        }
        self.sender.try_send(message).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Queues a message, waiting for room (backpressure).
    pub async fn send(&self, message: Out) -> Result<(), SendError> {
        tokio::select! {
            sent = self.sender.send(message) => sent.map_err(|_| SendError::Closed),
            () = self.closed.cancelled() => Err(SendError::Closed),
        }
    }

    /// Waits for room for one message.
    pub async fn reserve(&self) -> Result<mpsc::Permit<'_, Out>, SendError> {
        tokio::select! {
            permit = self.sender.reserve() => permit.map_err(|_| SendError::Closed),
            () = self.closed.cancelled() => Err(SendError::Closed),
        }
    }

    /// Closes the socket now, dropping whatever is still queued.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Resolves when the socket is closed (by [`Outbox::close`] or a failed write).
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }
}

/// The receiving half of a started socket; it also owns the writer task.
pub struct Inbox<In> {
    stream: SplitStream<Stream>,
    closed: CancellationToken,
    writer: Option<tokio::task::JoinHandle<()>>,
    _messages: PhantomData<fn() -> In>,
}

impl<In> std::fmt::Debug for Inbox<In> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl<In: BusMessage> Inbox<In> {
    /// The next message; `None` when the peer closed the connection.
    pub async fn recv(&mut self) -> Result<Option<In>, SocketError> {
        next_message(&mut self.stream).await
    }

    /// Waits (within [`WRITE_TIMEOUT`]) for the writer to send what is queued and close the
    /// connection, which it does once every [`Outbox`] clone is dropped; past the deadline
    /// the socket is closed with whatever is still queued.
    pub async fn finish(mut self) {
        if let Some(writer) = self.writer.take()
            && tokio::time::timeout(WRITE_TIMEOUT, writer).await.is_err()
        {
            self.closed.cancel();
        }
    }
}

impl<In> Drop for Inbox<In> {
    fn drop(&mut self) {
        if self.writer.is_some() {
            // Not finished: nobody reads any more, so the connection is over.
            self.closed.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameError;

    async fn pair() -> (CoordinatorSocket, AgentSocket) {
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(accept_bus(server_end));
        let client = AgentSocket::client(client_end)
            .await
            .expect("client handshake");
        (
            server.await.expect("joins").expect("server handshake"),
            client,
        )
    }

    #[tokio::test]
    async fn messages_cross_in_both_directions_and_close_ends_the_stream() {
        let (mut server, mut client) = pair().await;
        client
            .send(AgentMessage::Heartbeat { sent_at_unix_ms: 1 })
            .await
            .expect("sends");
        let received = server
            .recv_within(Duration::from_secs(5))
            .await
            .expect("receives");
        assert_eq!(
            received,
            Some(AgentMessage::Heartbeat { sent_at_unix_ms: 1 })
        );

        let (outbox, _inbox) = server.start(4);
        outbox.try_send(CoordinatorMessage::Drain).expect("queued");
        assert_eq!(
            client
                .recv_within(Duration::from_secs(5))
                .await
                .expect("receives"),
            Some(CoordinatorMessage::Drain)
        );
        // The last outbox gone, the writer sends what is queued and closes the connection.
        drop(outbox);
        assert_eq!(
            client
                .recv_within(Duration::from_secs(5))
                .await
                .expect("clean close"),
            None
        );
    }

    #[tokio::test]
    async fn a_full_queue_is_reported_not_waited_for() {
        let (server, _client) = pair().await;
        let (outbox, _inbox) = server.start(1);
        // The client never reads; the writer takes one message and the queue holds one more.
        let mut results = Vec::new();
        for _ in 0..64 {
            results.push(outbox.try_send(CoordinatorMessage::Demand { queued: 1 }));
        }
        assert!(results.contains(&Err(SendError::Full)), "{results:?}");
    }

    #[tokio::test]
    async fn garbled_and_text_frames_are_errors() {
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(accept_bus(server_end));
        let stream: Box<dyn Transport> = Box::new(client_end);
        let (mut raw, _) = tokio_tungstenite::client_async("ws://localhost/ws", stream)
            .await
            .expect("handshake");
        let mut server = server.await.expect("joins").expect("server handshake");
        raw.send(Message::Binary(vec![0xff, 0xff, 0xff].into()))
            .await
            .expect("sends");
        assert!(matches!(
            server.recv_within(Duration::from_secs(5)).await,
            Err(SocketError::Frame(FrameError::Malformed(_)))
        ));
        raw.send(Message::Text("hello".into()))
            .await
            .expect("sends");
        assert!(matches!(
            server.recv_within(Duration::from_secs(5)).await,
            Err(SocketError::TextFrame)
        ));
    }

    #[tokio::test]
    async fn other_paths_are_refused() {
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(accept(server_end));
        let client = upgrade_client(Box::new(client_end), "ws://localhost/other").await;
        match client {
            Err(SocketError::Refused { status, message }) => {
                assert_eq!(status, 404);
                assert!(message.contains(BUS_PATH), "{message}");
            }
            Err(other) => panic!("not a refusal: {other}"),
            Ok(_) => panic!("upgraded"),
        }
        assert!(server.await.expect("joins").is_err());
    }

    #[tokio::test]
    async fn a_git_tunnel_is_told_from_the_bus_and_keeps_its_credential() {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(accept(server_end));
        let mut request = format!("ws://localhost{TUNNEL_PATH}")
            .into_client_request()
            .expect("request");
        request
            .headers_mut()
            .insert("authorization", "Bearer secret".parse().expect("header"));
        let _client = upgrade_client(Box::new(client_end), request)
            .await
            .expect("client handshake");
        match server.await.expect("joins").expect("server handshake") {
            Upgrade::Tunnel { bearer, .. } => assert_eq!(bearer, "secret"),
            other => panic!("a git tunnel taken for {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_archive_tunnel_names_its_job_and_a_path_without_one_is_refused() {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        for (path, job) in [("/archive/42", Some(42)), ("/archive/last", None)] {
            let (server_end, client_end) = tokio::io::duplex(64 * 1024);
            let server = tokio::spawn(accept(server_end));
            let mut request = format!("ws://localhost{path}")
                .into_client_request()
                .expect("request");
            request
                .headers_mut()
                .insert("authorization", "Bearer secret".parse().expect("header"));
            let client = upgrade_client(Box::new(client_end), request).await;
            match (server.await.expect("joins"), job) {
                (Ok(Upgrade::Archive { bearer, job_id, .. }), Some(job)) => {
                    assert!(client.is_ok());
                    assert_eq!((bearer.as_str(), job_id), ("secret", job));
                }
                (Err(_), None) => assert!(client.is_err(), "{path} upgraded"),
                (other, _) => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_archive_header_carries_a_size_and_a_sha256() {
        let sha = "ab".repeat(32);
        let line = crate::tunnel::archive_header(1234, &sha);
        let parsed = crate::tunnel::parse_archive_header(line.trim_end());
        assert_eq!(parsed, Some((1234, sha)));
        for bad in [
            "1234",
            "x abc",
            &format!("12 {}", "zz".repeat(32)),
            "12 abc",
        ] {
            assert_eq!(crate::tunnel::parse_archive_header(bad), None, "{bad}");
        }
    }
}
