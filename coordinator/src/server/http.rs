//! The coordinator's HTTP address: `/metrics` for Prometheus and the live dashboard.
//!
//! Plain HTTP on loopback, where anyone who can connect is already on this host; there a
//! request must be addressed to a loopback name (`Host`), so a web page that points a name
//! of its own at 127.0.0.1 (DNS rebinding) cannot read the pool's state or job logs. Anywhere
//! else it is HTTPS with the bus's certificate and every request needs a client-scoped
//! credential, like the control API: as a bearer token (Prometheus' `authorization`), or,
//! for a browser, once as `?token=` in the URL `buildpool ui` prints, which is then kept in
//! an HTTP-only cookie (an `EventSource` cannot send headers).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, FromRef, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::serve::{IncomingStream, Listener};
use tokio::sync::mpsc;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use super::dashboard;
use super::shared::Shared;
use super::tls::{self, TlsStream};
use crate::auth::Scope;
use crate::metrics::{AgentDisk, PoolGauges};

/// The cookie a browser keeps the credential in, beyond loopback.
const COOKIE: &str = "buildpool_token";

/// What every handler shares.
#[derive(Debug, Clone)]
struct Http {
    shared: Arc<Shared>,
    /// Listening on loopback: no credential asked.
    open: bool,
}

/// The dashboard's handlers need only the coordinator's shared state.
impl FromRef<Http> for Arc<Shared> {
    fn from_ref(http: &Http) -> Self {
        Arc::clone(&http.shared)
    }
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    let open = local.ip().is_loopback();
    let tls = shared
        .tls
        .as_ref()
        .filter(|_| !open)
        .map(|tls| Arc::clone(&tls.http));
    if !open && tls.is_none() {
        tracing::error!(%local, "the dashboard needs TLS beyond loopback; not serving it");
        return;
    }
    let http = Http { shared, open };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .merge(dashboard::routes())
        .layer(middleware::from_fn_with_state(http.clone(), authorize))
        .with_state(http);
    let incoming = HttpListener::start(listener, local, tls, shutdown.clone());
    let served = axum::serve(incoming, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::error!("dashboard and metrics stopped: {error}");
    }
}

/// The pool's gauges, copied under the state lock and encoded after it is released.
pub(crate) fn pool_gauges(shared: &Shared) -> PoolGauges {
    let state = shared.dispatch.state();
    let (queued, started) = state.scheduler.job_counts();
    let counters = state.scheduler.counters();
    let agents = state.scheduler.agents();
    drop(state);
    let remote = || agents.iter().filter(|agent| !agent.local);
    PoolGauges {
        jobs_queued: queued as u64,
        jobs_running: started as u64,
        agents_connected: remote().count() as u64,
        slots_total: remote().map(|agent| u64::from(agent.slots_total)).sum(),
        slots_used: remote().map(|agent| u64::from(agent.slots_used)).sum(),
        disk: remote()
            .map(|agent| AgentDisk {
                agent_id: agent.id.clone(),
                used_bytes: agent.disk.used_bytes,
                budget_bytes: agent.disk.budget_bytes,
            })
            .collect(),
        requeues: counters.requeues,
        lost_attempts: counters.lost_attempts,
    }
}

async fn metrics(State(http): State<Http>, headers: HeaderMap) -> Response {
    let gauges = pool_gauges(&http.shared);
    let text = http.shared.metrics.encode(&gauges);
    buildpool_service::metrics::response(headers.get(header::ACCEPT), text)
}

/// Lets requests for loopback names through on loopback; elsewhere asks for a client
/// credential.
async fn authorize(
    State(http): State<Http>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    if http.open {
        if !for_loopback(&request) {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                "this dashboard answers only requests for localhost or a loopback address\n",
            )
                .into_response();
        }
        return next.run(request).await;
    }
    let in_url = request.uri().query().and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .map(str::to_owned)
    });
    let presented = in_url
        .clone()
        .or_else(|| presented(request.headers()))
        .unwrap_or_default();
    if let Err(reason) = http
        .shared
        .access
        .authorize(&presented, Scope::Client, Some(peer.ip()))
    {
        let hint =
            "open the URL `buildpool ui` prints, or send a client credential as a bearer token";
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            format!("{reason}\n{hint}\n"),
        )
            .into_response();
    }
    match in_url {
        // Keep the credential out of the address bar, history and logs from now on.
        Some(_) => {
            let cookie = format!("{COOKIE}={presented}; Path=/; HttpOnly; Secure; SameSite=Strict");
            let mut response = Redirect::to(request.uri().path()).into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        None => next.run(request).await,
    }
}

/// Whether every name `request` is addressed to (its `Host` headers, the authority of an
/// absolute URI or of HTTP/2) is a loopback one. A browser always sends the name of the
/// page's origin, so a rebinding page is refused however its name resolves; a request
/// naming nothing (HTTP/1.0 without `Host`) is no browser's and passes.
fn for_loopback(request: &Request) -> bool {
    let headers = request.headers().get_all(header::HOST).iter();
    let named = headers.map(|value| value.to_str().is_ok_and(loopback_authority));
    let in_uri = request
        .uri()
        .authority()
        .map(|authority| loopback_authority(authority.as_str()));
    named.chain(in_uri).all(|loopback| loopback)
}

/// Whether `authority` (`host[:port]`, as in `Host`) names this host: `localhost` (any
/// case), an IPv4 address in 127.0.0.0/8 or `[::1]`.
fn loopback_authority(authority: &str) -> bool {
    let (host, port) = match authority.rfind(':') {
        Some(colon) if !authority[colon..].contains(']') => {
            (&authority[..colon], Some(&authority[colon + 1..]))
        }
        _ => (authority, None),
    };
    let port_ok = port.is_none_or(|port| {
        (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit())
    });
    let loopback = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback()),
        None => {
            host.eq_ignore_ascii_case("localhost")
                || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        }
    };
    port_ok && loopback
}

/// The credential a request carries in its `Authorization` header or its cookie.
fn presented(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let cookie = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .find_map(|pair| {
                pair.trim()
                    .strip_prefix(&format!("{COOKIE}="))
                    .map(str::to_owned)
            })
    };
    bearer.map(str::to_owned).or_else(cookie)
}

/// The address a request came from.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

impl Connected<IncomingStream<'_, HttpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, HttpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

type Io = Either<tokio::net::TcpStream, TlsStream>;

/// The dashboard's connections: plain on loopback, else after their TLS handshakes.
#[derive(Debug)]
struct HttpListener {
    accepted: Accepted,
    local: SocketAddr,
}

#[derive(Debug)]
enum Accepted {
    Plain(tokio::net::TcpListener),
    Tls(mpsc::Receiver<(TlsStream, SocketAddr)>),
}

impl HttpListener {
    fn start(
        listener: tokio::net::TcpListener,
        local: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: CancellationToken,
    ) -> Self {
        let accepted = match tls {
            Some(config) => Accepted::Tls(tls::accept(listener, config, "dashboard", shutdown)),
            None => Accepted::Plain(listener),
        };
        Self { accepted, local }
    }
}

impl Listener for HttpListener {
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match &mut self.accepted {
            // axum's own accept for TCP retries (and logs) failed accepts.
            Accepted::Plain(listener) => {
                let (tcp, peer) = Listener::accept(listener).await;
                (Either::Left(tcp), peer)
            }
            Accepted::Tls(accepted) => match accepted.recv().await {
                Some((stream, peer)) => (Either::Right(stream), peer),
                // The accept task ended (shutdown): nothing more will come.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(host: Option<&str>, uri: &str) -> Request {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        builder.body(axum::body::Body::empty()).expect("request")
    }

    #[test]
    fn only_loopback_names_reach_the_open_dashboard() {
        for host in [
            "localhost",
            "localhost:8080",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(for_loopback(&request(Some(host), "/api/state")), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.evil.example:8080",
            "evil.localhost",
            "user@evil.example",
            "10.0.0.1:8080",
            "[::2]:8080",
            "localhost:port",
            "localhost:",
            "::1",
            "",
        ] {
            assert!(!for_loopback(&request(Some(host), "/api/state")), "{host}");
        }
        assert!(
            for_loopback(&request(None, "/metrics")),
            "HTTP/1.0 names nothing"
        );
        // An absolute URI names its host too, whatever the header says.
        assert!(!for_loopback(&request(
            Some("localhost"),
            "http://evil.example/api/state"
        )));
        assert!(for_loopback(&request(None, "http://127.0.0.1:9/api/state")));
    }
}
