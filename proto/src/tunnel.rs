//! The git tunnel: git's bytes over a WebSocket at [`TUNNEL_PATH`] on the job bus port.
//!
//! A build host then needs the one bus port, and git is as protected as the bus: the same
//! TLS, and a credential checked before a byte reaches the coordinator's git daemon, which
//! listens on loopback only. The agent's `git-proxy` command opens a tunnel for each fetch;
//! the coordinator splices it to its daemon.
//!
//! Data travels in non-empty binary messages. An empty binary message means "no more data
//! this way" (a half-close), because git's protocol needs one: the daemon closes its side
//! once the pack is sent while the client may still be writing, and a WebSocket close
//! frame would end both directions at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::websocket::{ServerUrl, SocketError, Stream, WRITE_TIMEOUT, dial};

/// Where tunnels connect on the bus port.
pub const TUNNEL_PATH: &str = "/git";
/// Where an agent fetches a job's test archive on the bus port: `/archive/<job id>`. The
/// same tunnel carries it one way: a header line `<bytes> <sha256 hex>\n`, then the file.
pub const ARCHIVE_PATH: &str = "/archive/";
/// A tunnel with no traffic either way for this long is closed: git itself never pauses
/// that long during a fetch, so the peer is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const CHUNK_BYTES: usize = 64 * 1024;

/// The line that starts an archive's transfer: its size and SHA-256 (lowercase hex).
pub fn archive_header(bytes: u64, sha256: &str) -> String {
    format!("{bytes} {sha256}\n")
}

/// Reads [`archive_header`]'s line (without its newline).
pub fn parse_archive_header(line: &str) -> Option<(u64, String)> {
    let (bytes, sha256) = line.split_once(' ')?;
    let valid = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
    Some((bytes.parse().ok()?, sha256.to_owned())).filter(|_| valid)
}
/// A close frame's payload is at most 125 bytes, two of them the code.
const MAX_CLOSE_REASON_BYTES: usize = 123;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("the coordinator refused the git tunnel: {0}")]
    Refused(String),
    #[error("git tunnel: {0}")]
    Io(#[from] std::io::Error),
    #[error("git tunnel idle for {IDLE_TIMEOUT:?}; closed")]
    Idle,
}

/// When either direction of a splice last moved, shared by both.
struct Activity {
    started: tokio::time::Instant,
    last_ms: AtomicU64,
    idle: Duration,
}

impl Activity {
    fn new(idle: Duration) -> Self {
        Self {
            started: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            idle,
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(elapsed, Ordering::Relaxed);
    }

    /// Awaits `operation` (which must be cancel-safe) until it completes, or until neither
    /// direction has moved for the idle time.
    async fn wait<T>(&self, operation: impl Future<Output = T>) -> Result<T, TunnelError> {
        let mut operation = std::pin::pin!(operation);
        loop {
            let last = self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            match tokio::time::timeout_at(last + self.idle, operation.as_mut()).await {
                Ok(output) => {
                    self.touch();
                    return Ok(output);
                }
                Err(_) => {
                    let moved =
                        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
                    if moved == last {
                        return Err(TunnelError::Idle);
                    }
                }
            }
        }
    }
}

/// Bytes carried each way by a finished splice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// From the local stream into the tunnel.
    pub sent: u64,
    /// From the tunnel to the local stream.
    pub received: u64,
}

/// One end of an open git tunnel.
pub struct Tunnel {
    ws: Stream,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

impl Tunnel {
    pub(crate) fn new(ws: Stream) -> Self {
        Self { ws }
    }

    /// Client side: opens a tunnel to `server`'s git daemon, presenting `credential`.
    pub async fn open(
        server: &ServerUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        credential: &str,
    ) -> Result<Self, SocketError> {
        dial(server, tls, TUNNEL_PATH, Some(credential))
            .await
            .map(Self::new)
    }

    /// Client side: opens a tunnel that carries job `job_id`'s test archive to us (see
    /// [`ARCHIVE_PATH`]), presenting `credential`.
    pub async fn open_archive(
        server: &ServerUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        credential: &str,
        job_id: u64,
    ) -> Result<Self, SocketError> {
        dial(
            server,
            tls,
            &format!("{ARCHIVE_PATH}{job_id}"),
            Some(credential),
        )
        .await
        .map(Self::new)
    }

    /// Server side: refuses the tunnel; the client reports `reason` (its first 123 bytes,
    /// all a close frame holds).
    pub async fn refuse(mut self, reason: &str) {
        let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame {
            code: CloseCode::Policy,
            reason: reason[..end].to_owned().into(),
        };
        let _ =
            tokio::time::timeout(WRITE_TIMEOUT, self.ws.send(Message::Close(Some(frame)))).await;
    }

    /// Carries bytes both ways between the tunnel and `local` until both directions ended,
    /// one side failed, or nothing moved for [`IDLE_TIMEOUT`].
    pub async fn splice(
        self,
        local: impl AsyncRead + AsyncWrite + Unpin,
    ) -> Result<Traffic, TunnelError> {
        let (mut sink, mut stream) = self.ws.split();
        let (mut local_read, mut local_write) = tokio::io::split(local);
        // Either direction failing ends the other, which may be waiting on a quiet peer.
        let failed = CancellationToken::new();
        // One direction is quiet for long stretches (git says nothing while the pack
        // arrives), so only silence both ways counts.
        let activity = Activity::new(IDLE_TIMEOUT);

        let outbound = async {
            let mut sent = 0u64;
            let mut buffer = vec![0u8; CHUNK_BYTES];
            loop {
                let read = tokio::select! {
                    () = failed.cancelled() => return Ok::<u64, TunnelError>(sent),
                    read = activity.wait(local_read.read(&mut buffer)) => read,
                };
                let n = read?.map_err(TunnelError::Io)?;
                let message = Message::Binary(buffer[..n].to_vec().into());
                let written = tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return Err(SocketError::from(error).into()),
                    Err(_) => return Err(SocketError::Timeout("writing to the tunnel").into()),
                }
                if n == 0 {
                    return Ok(sent);
                }
                sent += n as u64;
            }
        };
        let outbound = async {
            let result = outbound.await;
            if result.is_err() {
                failed.cancel();
            }
            result
        };

        let inbound = async {
            let mut received = 0u64;
            loop {
                let next = tokio::select! {
                    () = failed.cancelled() => return Ok(received),
                    next = activity.wait(stream.next()) => next?,
                };
                match next {
                    None => break,
                    Some(Err(error)) => return Err(SocketError::from(error).into()),
                    Some(Ok(Message::Binary(data))) if data.is_empty() => break,
                    Some(Ok(Message::Binary(data))) => {
                        local_write.write_all(&data).await?;
                        // Standard output buffers; the peer may be waiting for these bytes.
                        local_write.flush().await?;
                        received += data.len() as u64;
                    }
                    Some(Ok(Message::Close(Some(frame)))) if frame.code == CloseCode::Policy => {
                        return Err(TunnelError::Refused(frame.reason.to_string()));
                    }
                    Some(Ok(Message::Close(_))) => break,
                    Some(Ok(Message::Text(_))) => {
                        return Err(SocketError::TextFrame.into());
                    }
                    // Pings and pongs are the WebSocket layer's business.
                    Some(Ok(_)) => {}
                }
            }
            local_write.flush().await?;
            local_write.shutdown().await?;
            Ok(received)
        };
        let inbound = async {
            let result = inbound.await;
            if result.is_err() {
                failed.cancel();
            }
            result
        };

        let (sent, received) = tokio::join!(outbound, inbound);
        if let Ok(mut ws) = sink.reunite(stream) {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, ws.close(None)).await;
        }
        // The inbound error first: a refusal is what the user needs to read.
        let received = received?;
        Ok(Traffic {
            sent: sent?,
            received,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::{Transport, upgrade_client, websocket_config};

    /// A tunnel over an in-memory pipe: (server end, client end). How the bus port tells a
    /// tunnel from the bus is [`crate::socket::accept`]'s, and tested there.
    async fn pair() -> (Tunnel, Tunnel) {
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        let server_end: Box<dyn Transport> = Box::new(server_end);
        let server = tokio::spawn(tokio_tungstenite::accept_async_with_config(
            server_end,
            Some(websocket_config()),
        ));
        let client = upgrade_client(Box::new(client_end), format!("ws://localhost{TUNNEL_PATH}"))
            .await
            .expect("client handshake");
        let server = server.await.expect("joins").expect("server handshake");
        (Tunnel::new(server), Tunnel::new(client))
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_each_side_half_closes() {
        let (server, client) = pair().await;

        // The "daemon" answers once it has read the whole request, then closes; the "git"
        // client sends its request, closes its side and reads the answer to the end.
        let (daemon_end, mut daemon) = tokio::io::duplex(1024);
        let daemon = tokio::spawn(async move {
            let mut request = Vec::new();
            daemon.read_to_end(&mut request).await.expect("reads");
            daemon.write_all(b"PACK for ").await.expect("writes");
            daemon.write_all(&request).await.expect("writes");
            daemon.shutdown().await.expect("closes");
        });
        let (git_end, mut git) = tokio::io::duplex(1024);
        let git = tokio::spawn(async move {
            git.write_all(b"want abc").await.expect("writes");
            git.shutdown().await.expect("half-closes");
            let mut answer = Vec::new();
            git.read_to_end(&mut answer).await.expect("reads");
            answer
        });
        let (served, fetched) = tokio::join!(server.splice(daemon_end), client.splice(git_end));
        assert_eq!(
            served.expect("server splice"),
            Traffic {
                sent: 17,
                received: 8
            }
        );
        assert_eq!(
            fetched.expect("client splice"),
            Traffic {
                sent: 8,
                received: 17
            }
        );
        assert_eq!(git.await.expect("joins"), b"PACK for want abc");
        daemon.await.expect("joins");
    }

    #[tokio::test]
    async fn a_quiet_direction_lives_as_long_as_the_other_moves() {
        let activity = Activity::new(Duration::from_millis(300));
        // The other direction moves at 200 ms: this wait outlives the idle time...
        let waited = tokio::join!(
            activity.wait(tokio::time::sleep(Duration::from_millis(450))),
            async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                activity.touch();
            }
        )
        .0;
        assert!(waited.is_ok(), "cut while the other direction moved");
        // ...but with nothing moving at all, it ends.
        let idle = activity
            .wait(tokio::time::sleep(Duration::from_secs(10)))
            .await;
        assert!(matches!(idle, Err(TunnelError::Idle)), "{idle:?}");
    }

    #[tokio::test]
    async fn a_refusal_reaches_the_client_with_its_reason() {
        let (server, client) = pair().await;
        tokio::spawn(server.refuse("invalid credential"));
        let (git_end, _git) = tokio::io::duplex(1024);
        let error = client.splice(git_end).await.expect_err("refused");
        assert!(
            matches!(&error, TunnelError::Refused(reason) if reason == "invalid credential"),
            "{error}"
        );

        // A reason longer than a close frame holds is cut, not a protocol error.
        let (server, client) = pair().await;
        let long = format!("é{}", "x".repeat(200));
        tokio::spawn(async move { server.refuse(&long).await });
        let (git_end, _git) = tokio::io::duplex(1024);
        match client.splice(git_end).await {
            Err(TunnelError::Refused(reason)) => {
                assert!(reason.starts_with("éxx") && reason.len() <= 123, "{reason}");
            }
            other => panic!("not a refusal: {other:?}"),
        }
    }
}
