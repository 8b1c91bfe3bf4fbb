//! The coordinator: scheduler, job bus, control API, git daemon and embedded local agent.
//!
//! Each part owns its state: [`dispatch`] the scheduler, the agents' connections and the
//! active jobs behind one lock; [`jobs`] a job's life and what is kept of it; [`access`]
//! credentials. Transports ([`bus`], [`control`], [`http`]) are adapters over them, and
//! [`shared::Shared`] hands the owners to the tasks. This module starts and stops it all.

mod access;
mod active;
mod artifacts;
pub mod bus;
pub mod control;
pub mod dashboard;
mod dispatch;
pub mod git_daemon;
pub mod history;
pub mod http;
pub mod joblog;
pub mod jobs;
pub mod local_agent;
pub mod scheduler;
mod shared;
pub mod store;
mod threads;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use buildpool_core::JobId;
use buildpool_proto::tls::{Fingerprint, TlsError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, CredentialStore, Token};
use crate::config::CoordinatorConfig;
use crate::repo::Repo;
use scheduler::{ConnId, Scheduler, SchedulerConfig};
use shared::Shared;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen for agents on {addr}: {source}{hint}")]
    WebSocketBind {
        addr: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("cannot listen for clients on {addr}: {source}")]
    ControlBind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen for the dashboard and metrics on {addr}: {source}")]
    HttpBind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    GitDaemon(#[from] git_daemon::DaemonError),
    #[error("coordinator state directory: {0}")]
    State(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    shared: Arc<Shared>,
    pub control_addr: SocketAddr,
    /// Dashboard and `/metrics`, when the coordinator serves them.
    pub http_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    git_daemon: Option<git_daemon::GitDaemon>,
}

impl Coordinator {
    /// Starts every part of a coordinator for `repo`. Listeners are bound before this returns,
    /// so the addresses it reports accept connections at once.
    pub async fn start(
        repo: Repo,
        config: CoordinatorConfig,
        token: Token,
    ) -> Result<Self, StartError> {
        let (records, ended_refs, unfinished) = open_records(&repo, &config)?;
        let listeners = Listeners::bind(&config).await?;
        let tls = listeners
            .need_tls()
            .then(|| tls::CoordinatorTls::load(&config))
            .transpose()?;
        let git_daemon = match &config.git_daemon {
            Some((listen, port)) => Some(
                git_daemon::GitDaemon::start(repo.common_dir.clone(), listen.clone(), *port)
                    .await?,
            ),
            None => None,
        };
        let artifacts = Arc::new(artifacts::ArtifactStore::open(
            &records.log_dir().join("artifacts"),
        )?);
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let dispatch = Arc::new(dispatch::Dispatch::new(
            scheduler(&config),
            records.store_handle(),
        ));
        let jobs = Arc::new(jobs::Jobs {
            dispatch: Arc::clone(&dispatch),
            snapshots: snapshots(&repo, &config, git_daemon.as_ref()),
            records,
            metrics: Arc::clone(&metrics),
            client_grace: config.client_grace,
            log_max_bytes: config.log_max_bytes,
            shutdown: shutdown.clone(),
        });
        let shared = Arc::new(Shared {
            id: format!("{}-{:x}", std::process::id(), fastrand::u32(..)),
            git_daemon_port: git_daemon.as_ref().map(|d| d.port),
            websocket_addr: listeners.websocket_addr,
            repo,
            access: access::Access::new(Authenticator::new(
                token,
                CredentialStore::next_to(&config.token_file),
            )),
            config,
            tls,
            dispatch,
            jobs,
            artifacts,
            metrics,
            shutdown,
        });
        jobs::restore(&shared.jobs, unfinished).await;
        let tasks = spawn_tasks(
            &shared,
            listeners.websocket,
            listeners.control,
            listeners.http,
            ended_refs,
        );
        tracing::info!(coordinator_id = %shared.id, control = %listeners.control_addr, websocket = ?listeners.websocket_addr, http = ?listeners.http_addr, "coordinator started");
        Ok(Self {
            shutdown: shared.shutdown.clone(),
            shared,
            control_addr: listeners.control_addr,
            http_addr: listeners.http_addr,
            tasks,
            git_daemon,
        })
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.shared.websocket_addr
    }

    pub fn git_daemon_port(&self) -> Option<u16> {
        self.shared.git_daemon_port
    }

    /// The fingerprint agents pin; `None` when nothing is served over TLS.
    pub fn tls_fingerprint(&self) -> Option<Fingerprint> {
        self.shared.tls.as_ref().map(|tls| tls.fingerprint)
    }

    /// The base URL of the dashboard and `/metrics` (HTTPS beyond loopback); an unspecified
    /// listen address is shown as this host's name.
    pub fn http_url(&self) -> Option<String> {
        let addr = self.http_addr?;
        let scheme = if addr.ip().is_loopback() {
            "http"
        } else {
            "https"
        };
        let host = match addr.ip() {
            ip if ip.is_unspecified() => crate::config::hostname(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        Some(format!("{scheme}://{host}:{}", addr.port()))
    }

    /// The coordinator's status in one line, for the service manager (`STATUS=`): a
    /// function, so a notifier task can call it on every tick.
    pub fn status_line(&self) -> impl Fn() -> String + Send + 'static {
        let shared = Arc::clone(&self.shared);
        move || {
            let state = shared.dispatch.state();
            let (queued, running) = state.scheduler.job_counts();
            let agents = state
                .scheduler
                .agents()
                .iter()
                .filter(|agent| !agent.local)
                .count();
            drop(state);
            let plural = if agents == 1 { "" } else { "s" };
            format!("{agents} agent{plural}, {running} running, {queued} queued")
        }
    }

    /// Whether any job is queued or running, and when a client last made a request (unix
    /// milliseconds): what tells a background coordinator it is idle.
    pub fn activity(&self) -> (bool, u64) {
        let busy = !self.shared.dispatch.state().jobs.is_empty();
        (busy, self.shared.access.last_request())
    }

    /// Whether the control API is served over TLS (it listens beyond loopback).
    pub fn control_tls(&self) -> bool {
        !self.control_addr.ip().is_loopback()
    }

    /// Stops everything: listeners, connections, the local agent's jobs, the git daemon.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let drained = tokio::time::timeout(Duration::from_secs(15), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("coordinator tasks did not stop in time; aborting them");
            self.tasks.abort_all();
        }
        if let Some(daemon) = self.git_daemon.take() {
            daemon.shutdown().await;
        }
        self.shared.jobs.records.flush().await;
        if self.shared.config.private_logs {
            let _ = std::fs::remove_dir_all(self.shared.jobs.records.log_dir());
        }
    }
}

/// Deletes private log directories of in-process coordinators that are no longer running.
fn remove_abandoned_log_dirs(parent: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let alive = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            .is_some_and(buildpool_core::process::alive);
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// How often connected agents' credentials are checked again.
const RECHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Drives the scheduler's clock (cancel and timeout backstops) and re-checks connected
/// agents' credentials.
async fn tick_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => shared.dispatch.step(|scheduler| ((), scheduler.tick(Instant::now()))),
            _ = recheck.tick() => close_revoked(&shared),
        }
    }
}

/// Closes the connections of agents whose credential no longer admits them (revoked, or
/// the token file's once agent credentials exist), so revocation takes effect on
/// established connections too. Their jobs are then orphaned like any lost link's.
fn close_revoked(shared: &Shared) {
    let admitted: Vec<(ConnId, String)> = shared
        .dispatch
        .state()
        .connections
        .iter()
        .filter_map(|(conn, c)| c.credential.clone().map(|credential| (*conn, credential)))
        .collect();
    // Checked outside the lock: the store may be re-read from disk.
    let revoked: Vec<ConnId> = admitted
        .into_iter()
        .filter(|(_, credential)| shared.access.revoked(credential))
        .map(|(conn, _)| conn)
        .collect();
    let state = shared.dispatch.state();
    for conn in revoked {
        if let Some(connection) = state.connections.get(&conn) {
            tracing::warn!(conn, agent_id = %connection.agent_id, "the agent's credential no longer admits it; closing its connection");
            connection.outbox.close();
        }
    }
}

/// Where the job logs go, the job store (none for an in-process coordinator: its jobs die
/// with its only client), and the jobs the last coordinator left unfinished.
fn open_records(
    repo: &Repo,
    config: &CoordinatorConfig,
) -> Result<
    (
        jobs::Records,
        tokio::sync::mpsc::Receiver<String>,
        Vec<store::StoredJob>,
    ),
    StartError,
> {
    let log_dir = if config.private_logs {
        let parent = repo.state_dir().join("in-process");
        remove_abandoned_log_dirs(&parent);
        parent.join(std::process::id().to_string())
    } else {
        repo.state_dir().join("logs")
    };
    let (store, loaded) = if config.private_logs {
        (None, store::Loaded::default())
    } else {
        let (store, loaded) = store::Store::open(&repo.state_dir())?;
        (Some(Arc::new(store)), loaded)
    };
    let unfinished: std::collections::HashSet<JobId> =
        loaded.unfinished.iter().map(|job| job.job_id).collect();
    let logs = joblog::LogDir::open(&log_dir, &unfinished)?;
    // Job ids never repeat: past the highest the store reserved or stored, or the log
    // directory has seen.
    let first_job = logs.highest_id().max(loaded.highest_id) + 1;
    let (records, ended_refs) = jobs::Records::new(log_dir, logs, store, first_job);
    Ok((records, ended_refs, loaded.unfinished))
}

fn scheduler(config: &CoordinatorConfig) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        default_timeout: config.job_default_timeout,
        reattach_grace: config.reattach_grace,
        unroutable_wait: config.unroutable_wait,
        max_lost_attempts: config.max_lost_attempts,
        affinity: config.affinity,
        ..SchedulerConfig::default()
    })
}

/// The repository's snapshots as agents fetch them: from the git daemon directly only
/// when it listens beyond loopback (an insecure setup), otherwise through the tunnel.
fn snapshots(
    repo: &Repo,
    config: &CoordinatorConfig,
    git_daemon: Option<&git_daemon::GitDaemon>,
) -> jobs::Snapshots {
    let direct = config
        .git_daemon
        .as_ref()
        .is_some_and(|(listen, _)| !crate::config::is_loopback(listen));
    jobs::Snapshots::new(
        repo.common_dir.clone(),
        repo.id.clone(),
        git_daemon.map(|d| d.git_path.clone()).unwrap_or_default(),
        git_daemon.map(|d| d.port).filter(|_| direct),
    )
}

/// The coordinator's listeners, bound, with their addresses.
struct Listeners {
    websocket: Option<TcpListener>,
    websocket_addr: Option<SocketAddr>,
    control: TcpListener,
    control_addr: SocketAddr,
    http: Option<TcpListener>,
    http_addr: Option<SocketAddr>,
}

impl Listeners {
    async fn bind(config: &CoordinatorConfig) -> Result<Self, StartError> {
        let websocket =
            match &config.websocket_addr {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| {
                    StartError::WebSocketBind {
                        addr: addr.clone(),
                        hint: if source.kind() == std::io::ErrorKind::AddrInUse {
                            " (another repository's coordinator? give this one its own \
                         websocket_port in .buildpool.toml or --websocket-port)"
                        } else {
                            ""
                        },
                        source,
                    }
                })?),
                None => None,
            };
        let control = TcpListener::bind(&config.control_addr)
            .await
            .map_err(|source| StartError::ControlBind {
                addr: config.control_addr.clone(),
                source,
            })?;
        let http = match &config.http_addr {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| StartError::HttpBind {
                            addr: addr.clone(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        Ok(Self {
            websocket_addr: websocket
                .as_ref()
                .map(TcpListener::local_addr)
                .transpose()?,
            control_addr: control.local_addr()?,
            http_addr: http.as_ref().map(TcpListener::local_addr).transpose()?,
            websocket,
            control,
            http,
        })
    }

    /// Whether anything is served beyond loopback, or to agents: then over TLS.
    fn need_tls(&self) -> bool {
        self.websocket.is_some()
            || !self.control_addr.ip().is_loopback()
            || self.http_addr.is_some_and(|addr| !addr.ip().is_loopback())
    }
}

/// Starts the coordinator's tasks: the listeners' loops, the scheduler's clock, the
/// deletion of ended jobs' refs and the embedded local agent.
fn spawn_tasks(
    shared: &Arc<Shared>,
    websocket: Option<TcpListener>,
    control: TcpListener,
    http: Option<TcpListener>,
    ended_refs: tokio::sync::mpsc::Receiver<String>,
) -> tokio::task::JoinSet<()> {
    let shutdown = &shared.shutdown;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(listener) = websocket {
        tasks.spawn(bus::accept_loop(
            Arc::clone(shared),
            listener,
            shutdown.clone(),
        ));
    }
    tasks.spawn(control::serve(
        Arc::clone(shared),
        control,
        shutdown.clone(),
    ));
    if let Some(listener) = http {
        tasks.spawn(http::serve(Arc::clone(shared), listener, shutdown.clone()));
    }
    tasks.spawn(tick_loop(Arc::clone(shared), shutdown.clone()));
    tasks.spawn(jobs::delete_ended_refs(
        shared.repo.common_dir.clone(),
        ended_refs,
        shutdown.clone(),
    ));
    if shared.config.local_fallback {
        tasks.spawn(local_agent::run(Arc::clone(shared), shutdown.clone()));
    }
    tasks
}
