//! The WebSocket connections of the bus port, beneath the job bus socket
//! ([`crate::socket`]) and the git tunnel ([`crate::tunnel`]) alike: a coordinator's
//! address, dialling over TCP and TLS, the upgrade, and the deadlines of each step.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::frame::{FrameError, MAX_FRAME_BYTES};
use crate::tls::PinMismatch;

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

#[cfg(test)]
mod tests {
    use super::*;

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
