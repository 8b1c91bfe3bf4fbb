//! Accepting TLS connections for the coordinator's HTTP listeners (control API, dashboard).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
