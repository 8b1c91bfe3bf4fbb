//! The one framed socket type of the job bus, used by both ends.
//!
//! A [`BusSocket`] is a WebSocket that carries one [`BusMessage`] per binary frame, with the
//! frame size limit on both directions. During the handshake it is used directly (`send`,
//! `recv`, each with a deadline). Then [`BusSocket::start`] splits it: an [`Outbox`] (a
//! bounded queue, cloneable, never blocking a caller that uses `try_send`) drained by a
//! writer task that gives every frame [`WRITE_TIMEOUT`], and an [`Inbox`] to read from.
//! A write that fails or times out closes the socket, and the [`Outbox`] says so, so a
//! half-open peer is detected instead of blocking anyone.

use std::marker::PhantomData;
use std::time::Duration;

use buildpool_core::bus::{AgentMessage, CoordinatorMessage};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::frame::{BusMessage, FrameError, MAX_FRAME_BYTES};

/// The path agents connect to.
pub const BUS_PATH: &str = "/ws";
/// Deadline for connecting, for the WebSocket upgrade and for each handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for one frame write.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream a bus socket can run over: TCP, or an in-memory duplex in tests and for
/// the coordinator's embedded agent.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

type Stream = WebSocketStream<Box<dyn Transport>>;

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

fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

/// The host part of a `ws://host:port/ws` URL: where the agent also finds the git daemon.
pub fn host_of(url: &str) -> Result<String, SocketError> {
    let bad = |reason: &str| SocketError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: tungstenite::http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
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

async fn deadline<T, E>(
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

    /// Server side: completes the WebSocket upgrade of an accepted stream. Requests for any
    /// path but [`BUS_PATH`] get a 404 that says where agents connect.
    pub async fn accept(stream: impl Transport) -> Result<Self, SocketError> {
        // The callback's error type is tungstenite's; its size is not ours to choose.
        #[allow(clippy::result_large_err)]
        let only_bus_path = |request: &Request,
                             response: Response|
         -> Result<Response, ErrorResponse> {
            if request.uri().path() == BUS_PATH {
                Ok(response)
            } else {
                let mut error =
                    ErrorResponse::new(Some(format!("buildpool agents connect at {BUS_PATH}\n")));
                *error.status_mut() = StatusCode::NOT_FOUND;
                Err(error)
            }
        };
        let stream: Box<dyn Transport> = Box::new(stream);
        let upgrade = tokio_tungstenite::accept_hdr_async_with_config(
            stream,
            only_bus_path,
            Some(websocket_config()),
        );
        deadline("upgrading to websocket", HANDSHAKE_TIMEOUT, upgrade)
            .await
            .map(Self::new)
    }

    /// Client side: dials `url` (`ws://host:port/ws`).
    pub async fn connect(url: &str) -> Result<Self, SocketError> {
        host_of(url)?;
        let bad = |reason: String| SocketError::BadUrl {
            url: url.to_owned(),
            reason,
        };
        let uri: tungstenite::http::Uri = url.parse().map_err(|_| bad("not a URL".into()))?;
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let tcp = deadline(
            "connecting",
            HANDSHAKE_TIMEOUT,
            tokio::net::TcpStream::connect((host, port)),
        )
        .await?;
        let _ = tcp.set_nodelay(true);
        Self::client(tcp, url).await
    }

    /// Client side over a stream the caller established (an in-memory duplex for the
    /// coordinator's embedded agent).
    pub async fn client(stream: impl Transport, url: &str) -> Result<Self, SocketError> {
        let stream: Box<dyn Transport> = Box::new(stream);
        let handshake =
            tokio_tungstenite::client_async_with_config(url, stream, Some(websocket_config()));
        let (ws, _) = deadline("in the websocket handshake", HANDSHAKE_TIMEOUT, handshake).await?;
        Ok(Self::new(ws))
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
/// frame [`WRITE_TIMEOUT`]; then closes the WebSocket and marks the socket closed.
async fn write_frames<Out: BusMessage>(
    mut sink: SplitSink<Stream, Message>,
    mut queue: mpsc::Receiver<Out>,
    closed: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = closed.cancelled() => break,
            message = queue.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let frame = Message::Binary(message.encode_frame().into());
        match tokio::time::timeout(WRITE_TIMEOUT, sink.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!("write to the peer failed: {error}");
                break;
            }
            Err(_) => {
                tracing::warn!("write to the peer timed out after {WRITE_TIMEOUT:?}");
                break;
            }
        }
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
    closed.cancel();
}

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
        let server = tokio::spawn(CoordinatorSocket::accept(server_end));
        let client = AgentSocket::client(client_end, "ws://localhost/ws")
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
        let server = tokio::spawn(CoordinatorSocket::accept(server_end));
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
        let server = tokio::spawn(CoordinatorSocket::accept(server_end));
        let client = AgentSocket::client(client_end, "ws://localhost/other").await;
        assert!(client.is_err());
        assert!(server.await.expect("joins").is_err());
    }

    #[test]
    fn server_urls_must_be_plain_websocket() {
        assert_eq!(host_of("ws://10.0.0.5:8081/ws").expect("valid"), "10.0.0.5");
        assert!(matches!(
            host_of("wss://x/ws"),
            Err(SocketError::BadUrl { .. })
        ));
        assert!(matches!(
            host_of("http://x/ws"),
            Err(SocketError::BadUrl { .. })
        ));
        assert!(matches!(
            host_of("not a url"),
            Err(SocketError::BadUrl { .. })
        ));
    }
}
