//! The coordinator's HTTP address: `/metrics` for Prometheus and the live dashboard.
//!
//! Plain HTTP on loopback, where anyone who can connect is already on this host. Anywhere
//! else it is HTTPS with the bus's certificate and every request needs a client-scoped
//! credential, like the control API: as a bearer token (Prometheus' `authorization`), or,
//! for a browser, once as `?token=` in the URL `buildpool ui` prints, which is then kept in
//! an HTTP-only cookie (an `EventSource` cannot send headers).

use std::net::SocketAddr;
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

use super::tls_accept::{self, TlsStream};
use super::{Shared, dashboard};
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
    let state = shared.state();
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
    build_agent::metrics::response(headers.get(header::ACCEPT), text)
}

/// Lets every request through on loopback; elsewhere asks for a client credential.
async fn authorize(
    State(http): State<Http>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    if http.open {
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
            Some(config) => {
                Accepted::Tls(tls_accept::accept(listener, config, "dashboard", shutdown))
            }
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
