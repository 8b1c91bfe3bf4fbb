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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::frame::{BusMessage, FrameError, MAX_FRAME_BYTES};
use crate::tls::PinMismatch;
use crate::tunnel::{TUNNEL_PATH, Tunnel};

/// The path agents connect to.
pub const BUS_PATH: &str = "/ws";
/// Deadline for connecting, for the WebSocket upgrade and for each handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for one frame write, and for each flush of the frames written.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream a bus socket can run over: TCP, or an in-memory duplex in tests and for
/// the coordinator's embedded agent.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

pub(crate) type Stream = WebSocketStream<Box<dyn Transport>>;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("text frames are not part of the protocol")]
    TextFrame,
    #[error("could not connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{0} needs TLS settings: a tls_fingerprint (or --tls-fingerprint) or a tls_ca_file")]
    NoTlsConfig(String),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error(transparent)]
    PinMismatch(PinMismatch),
    #[error("the credential cannot be sent in an HTTP header")]
    BadCredential,
    #[error("the coordinator refused the connection (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
}

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

/// The read buffer each WebSocket allocates up front. tungstenite's default, 128 KiB, would
/// be most of a coordinator's memory per idle agent (128 MiB for a fleet of 1000); one
/// TLS record's worth reads a frame of any size just as well, in more reads.
const READ_BUFFER_BYTES: usize = 16 * 1024;

pub(crate) fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

/// A coordinator's job bus address, as an agent is configured with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// `wss://` (TLS) or `ws://` (plain, only where the coordinator allows it).
    pub secure: bool,
    /// Without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

impl ServerUrl {
    /// Parses `wss://host:port/ws` or `ws://host:port/ws`; the path is ignored, since the
    /// bus and the git tunnel have fixed paths.
    pub fn parse(url: &str) -> Result<Self, SocketError> {
        let bad = |reason: &str| SocketError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: tungstenite::http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let secure = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => return Err(bad("the scheme must be wss:// (or ws:// where allowed)")),
        };
        let host = uri
            .host()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        Ok(Self { secure, host, port })
    }

    /// The URL of `path` on this server (`/ws` for the bus, `/git` for the tunnel).
    pub fn at(&self, path: &str) -> String {
        let scheme = if self.secure { "wss" } else { "ws" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}{path}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}{path}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.at(BUS_PATH))
    }
}

/// Dials `server` and upgrades to a WebSocket at `path`: over TLS with `tls` for
/// `wss://`, in the clear for `ws://`. `bearer` goes into an `Authorization` header.
pub(crate) async fn dial(
    server: &ServerUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    path: &str,
    bearer: Option<&str>,
) -> Result<Stream, SocketError> {
    let tcp = deadline(
        "connecting",
        HANDSHAKE_TIMEOUT,
        tokio::net::TcpStream::connect((server.host.as_str(), server.port)),
    )
    .await?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Transport> = match (server.secure, tls) {
        (false, _) => Box::new(tcp),
        (true, None) => return Err(SocketError::NoTlsConfig(server.to_string())),
        (true, Some(config)) => {
            let name =
                rustls::pki_types::ServerName::try_from(server.host.clone()).map_err(|_| {
                    SocketError::BadUrl {
                        url: server.to_string(),
                        reason: "the host is not a valid TLS server name".into(),
                    }
                })?;
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
                Ok(Ok(stream)) => Box::new(stream),
                Ok(Err(error)) => {
                    return Err(match PinMismatch::find(&error) {
                        Some(mismatch) => SocketError::PinMismatch(mismatch.clone()),
                        None => SocketError::Tls(error),
                    });
                }
                Err(_) => return Err(SocketError::Timeout("in the TLS handshake")),
            }
        }
    };
    let mut request = server
        .at(path)
        .into_client_request()
        .map_err(SocketError::WebSocket)?;
    if let Some(bearer) = bearer {
        let value = format!("Bearer {bearer}")
            .parse()
            .map_err(|_| SocketError::BadCredential)?;
        request.headers_mut().insert("authorization", value);
    }
    upgrade_client(stream, request).await
}

pub(crate) async fn upgrade_client(
    stream: Box<dyn Transport>,
    request: impl IntoClientRequest + Unpin,
) -> Result<Stream, SocketError> {
    let handshake =
        tokio_tungstenite::client_async_with_config(request, stream, Some(websocket_config()));
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(response))) => Err(SocketError::Refused {
            status: response.status().as_u16(),
            message: response
                .body()
                .as_deref()
                .map(|body| String::from_utf8_lossy(body).trim().to_owned())
                .unwrap_or_default(),
        }),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(SocketError::Timeout("in the websocket handshake")),
    }
}

/// What an accepted connection asked for.
pub enum Upgrade {
    /// An agent, at [`BUS_PATH`].
    Bus(CoordinatorSocket),
    /// A git tunnel, at [`TUNNEL_PATH`], with the credential it presented (empty if none).
    Tunnel { tunnel: Tunnel, bearer: String },
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upgrade::Bus(_) => f.write_str("Upgrade::Bus"),
            Upgrade::Tunnel { .. } => f.write_str("Upgrade::Tunnel"),
        }
    }
}

/// Server side, where only the bus is served (tests, tools): like [`accept`], with a git
/// tunnel request an error.
pub async fn accept_bus(stream: impl Transport) -> Result<CoordinatorSocket, SocketError> {
    match accept(stream).await? {
        Upgrade::Bus(socket) => Ok(socket),
        Upgrade::Tunnel { .. } => Err(SocketError::Refused {
            status: 404,
            message: format!("only the bus is served here, at {BUS_PATH}"),
        }),
    }
}

/// Server side: completes the WebSocket upgrade of an accepted stream, for the bus or the
/// git tunnel. Requests for any other path get a 404 that says where agents connect.
pub async fn accept(stream: impl Transport) -> Result<Upgrade, SocketError> {
    let asked = Arc::new(std::sync::Mutex::new((String::new(), String::new())));
    let record = Arc::clone(&asked);
    // The callback's error type is tungstenite's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let route = move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let path = request.uri().path();
        if path == BUS_PATH || path == TUNNEL_PATH {
            let bearer = request
                .headers()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .unwrap_or_default();
            *record
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                (path.to_owned(), bearer.to_owned());
            Ok(response)
        } else {
            let mut error =
                ErrorResponse::new(Some(format!("buildpool agents connect at {BUS_PATH}\n")));
            *error.status_mut() = StatusCode::NOT_FOUND;
            Err(error)
        }
    };
    let stream: Box<dyn Transport> = Box::new(stream);
    let upgrade =
        tokio_tungstenite::accept_hdr_async_with_config(stream, route, Some(websocket_config()));
    let ws = deadline("upgrading to websocket", HANDSHAKE_TIMEOUT, upgrade).await?;
    let (path, bearer) = std::mem::take(
        &mut *asked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok(if path == TUNNEL_PATH {
        Upgrade::Tunnel {
            tunnel: Tunnel::new(ws),
            bearer,
        }
    } else {
        Upgrade::Bus(BusSocket::new(ws))
    })
}

pub(crate) async fn deadline<T, E>(
    what: &'static str,
    duration: Duration,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, SocketError>
where
    SocketError: From<E>,
{
    match tokio::time::timeout(duration, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SocketError::Timeout(what)),
    }
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
/// a flush per frame was a TLS record and a system call each, on both ends.
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

    #[test]
    fn server_urls_are_websocket_urls() {
        let secure = ServerUrl::parse("wss://build.example:8081/ws").expect("valid");
        assert_eq!(
            secure,
            ServerUrl {
                secure: true,
                host: "build.example".into(),
                port: 8081
            }
        );
        assert_eq!(secure.at("/git"), "wss://build.example:8081/git");
        let plain = ServerUrl::parse("ws://[::1]:9/ws").expect("valid");
        assert_eq!((plain.secure, plain.host.as_str()), (false, "::1"));
        assert_eq!(plain.to_string(), "ws://[::1]:9/ws");
        assert_eq!(ServerUrl::parse("wss://x/ws").expect("valid").port, 443);
        for bad in ["http://x/ws", "not a url", "wss:///ws"] {
            assert!(
                matches!(ServerUrl::parse(bad), Err(SocketError::BadUrl { .. })),
                "{bad}"
            );
        }
    }
}
