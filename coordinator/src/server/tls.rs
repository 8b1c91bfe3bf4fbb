//! The coordinator's TLS: its certificate and server configurations, and accepting TLS
//! connections for its HTTP listeners (control API, dashboard).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use buildpool_proto::tls::{self as proto_tls, Fingerprint, ServerIdentity, TlsError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::CoordinatorConfig;

pub(crate) type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Accepted connections after their TLS handshakes, with their peers. Handshakes run
/// concurrently (with a deadline each) so one slow client never holds up the next; `what`
/// names the listener in the log.
pub(crate) fn accept(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    what: &'static str,
    shutdown: CancellationToken,
) -> mpsc::Receiver<(TlsStream, SocketAddr)> {
    let (sender, receiver) = mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                () = sender.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!("{what}: accept failed: {error}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, sender) = (acceptor.clone(), sender.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(
                    buildpool_proto::socket::HANDSHAKE_TIMEOUT,
                    acceptor.accept(tcp),
                );
                match handshake.await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send((stream, peer)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%peer, "{what}: TLS handshake failed: {error}")
                    }
                    Err(_) => tracing::warn!(%peer, "{what}: TLS handshake timed out"),
                }
            });
        }
    });
    receiver
}

/// The coordinator's TLS: one certificate, for the job bus and (beyond loopback) the
/// control API. Mutual TLS, if configured, applies to the job bus and the git tunnel.
#[derive(Debug)]
pub(crate) struct CoordinatorTls {
    /// For the job bus and the git tunnel (WebSocket over TLS).
    pub bus: Arc<rustls::ServerConfig>,
    /// For the control API (gRPC: HTTP/2 by ALPN).
    pub control: Arc<rustls::ServerConfig>,
    /// For the dashboard and metrics beyond loopback (HTTP/1.1).
    pub http: Arc<rustls::ServerConfig>,
    pub fingerprint: Fingerprint,
}

impl CoordinatorTls {
    /// The configured certificate and key, else the generated pair next to the token file.
    pub fn load(config: &CoordinatorConfig) -> Result<Self, TlsError> {
        let identity = match (&config.tls.cert_file, &config.tls.key_file) {
            (Some(cert), Some(key)) => ServerIdentity::load(cert, key)?,
            _ => {
                let dir = config
                    .token_file
                    .parent()
                    .map_or_else(|| PathBuf::from("."), PathBuf::from);
                let names = vec![
                    crate::config::hostname(),
                    "localhost".to_owned(),
                    "127.0.0.1".to_owned(),
                    "::1".to_owned(),
                ];
                ServerIdentity::load_or_create(&dir, &names)?
            }
        };
        let client_ca = config.tls.client_ca_file.as_deref();
        Ok(Self {
            bus: proto_tls::server_config(&identity, client_ca, &[])?,
            // Clients prove themselves with a client credential; client certificates are
            // for agents (the CLI presents none).
            control: proto_tls::server_config(&identity, None, &[b"h2"])?,
            http: proto_tls::server_config(&identity, None, &[b"http/1.1"])?,
            fingerprint: identity.fingerprint,
        })
    }
}
