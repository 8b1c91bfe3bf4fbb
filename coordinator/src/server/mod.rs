//! The coordinator: scheduler, job bus, control API, git daemon and embedded local agent.
//!
//! All scheduling state sits behind one synchronous mutex, and nothing under it does I/O:
//! transports turn frames and requests into scheduler calls, and the scheduler's actions are
//! carried out by pushing frames into each connection's bounded queue (`try_send`). A queue
//! that is full means a wedged agent; that connection is closed and its jobs requeued, so
//! one half-open agent can never freeze dispatch.

mod artifacts;
pub mod bus;
pub mod control;
pub mod dashboard;
pub mod git_daemon;
pub mod history;
pub mod http;
pub mod joblog;
pub mod jobs;
pub mod local_agent;
pub mod scheduler;
pub mod store;
mod threads;
mod tls_accept;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use buildpool_core::bus::{CoordinatorMessage, Welcome};
use buildpool_core::{AttemptKey, JobEvent, JobId};
use buildpool_proto::socket::{Outbox, SendError};
use buildpool_proto::tls::{self, Fingerprint, ServerIdentity};
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Authenticator, CredentialName, CredentialStore, Scope, Token};
use crate::config::CoordinatorConfig;
use crate::repo::Repo;
use scheduler::{Action, ConnId, Scheduler, SchedulerConfig};

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
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
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
    fn load(config: &CoordinatorConfig) -> Result<Self, StartError> {
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
            bus: tls::server_config(&identity, client_ca, &[])?,
            // Clients prove themselves with a client credential; client certificates are
            // for agents (the CLI presents none).
            control: tls::server_config(&identity, None, &[b"h2"])?,
            http: tls::server_config(&identity, None, &[b"http/1.1"])?,
            fingerprint: identity.fingerprint,
        })
    }
}

/// One agent connection, as the scheduler's actions reach it.
pub(crate) struct Connection {
    pub outbox: Outbox<CoordinatorMessage>,
    pub agent_id: String,
    /// What the agent presented, re-checked so a revoked credential ends its connections.
    pub credential: Option<String>,
}

/// Leaves the credential out.
impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("agent_id", &self.agent_id)
            .field("closed", &self.outbox.is_closed())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(crate) struct State {
    pub scheduler: Scheduler,
    pub connections: HashMap<ConnId, Connection>,
    pub jobs: HashMap<JobId, Arc<jobs::ActiveJob>>,
}

/// Everything the coordinator's tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub id: String,
    pub repo: Repo,
    pub config: CoordinatorConfig,
    pub auth: Authenticator,
    /// `None` for an in-process coordinator: no job bus, control API on loopback.
    pub tls: Option<CoordinatorTls>,
    pub log_dir: PathBuf,
    /// The job logs in `log_dir`, and which may be reused.
    pub logs: joblog::LogDir,
    /// Executables jobs sent back, in `log_dir/artifacts`. Shared with the blocking tasks
    /// that write them, so a bus task never waits on the disk.
    pub artifacts: Arc<artifacts::ArtifactStore>,
    pub git_daemon_port: Option<u16>,
    pub websocket_addr: Option<SocketAddr>,
    /// Cancelled when the coordinator stops; per-job tasks end with it.
    pub shutdown: CancellationToken,
    /// The repository's snapshots as jobs need them.
    pub snapshots: jobs::Snapshots,
    /// Snapshot refs of ended jobs, for [`delete_ended_refs`] to delete in batches.
    pub ended_refs: tokio::sync::mpsc::Sender<String>,
    state: Mutex<State>,
    next_conn: AtomicU64,
    next_job: AtomicU64,
    pub metrics: crate::metrics::Metrics,
    /// The last jobs that ended, for the dashboard.
    pub history: history::History,
    /// When the control API last admitted a request (unix milliseconds): a coordinator
    /// started in the background stops only after clients fell silent.
    pub last_request: AtomicU64,
    /// The durable job table; `None` for an in-process coordinator, whose jobs end with
    /// the one process that submits and follows them.
    pub store: Option<store::Store>,
}

impl Shared {
    /// Locks the state. A panic while holding the lock is a bug, but it must not take the
    /// whole coordinator down with poisoned-lock panics, so poisoning is ignored.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks a credential presented for `scope` from `peer` (`None`: in-process) and
    /// names the credential it was; the error is what the peer is told. Failures are
    /// logged by the authenticator.
    pub fn authorize(
        &self,
        presented: &str,
        scope: Scope,
        peer: Option<std::net::IpAddr>,
    ) -> Result<CredentialName, String> {
        match self.auth.check(presented, scope, peer) {
            Ok(principal) => Ok(principal.credential),
            Err(AuthError::Invalid) => Err(match scope {
                Scope::Agent => "invalid credential: give the agent a credential from \
                                 `buildpool token create --scope agent` (or the coordinator's token file)",
                Scope::Client => "invalid credential: use a credential from \
                                  `buildpool token create --scope client` (or the coordinator's token file)",
            }
            .to_owned()),
            Err(AuthError::WrongScope {
                credential,
                has,
                needs,
            }) if credential == CredentialName::Legacy.to_string() => Err(format!(
                "the coordinator's token file no longer admits {needs}s since {needs} credentials \
                 exist (it keeps the {has} scope): run `buildpool token create --scope {needs}` \
                 and install the new credential here"
            )),
            Err(AuthError::Store(error)) => {
                tracing::error!("credential store: {error}");
                Err("the coordinator cannot read its credential store; see its log".to_owned())
            }
            Err(error) => Err(error.to_string()),
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// A new job id, never handed out before, nor again after a crash (see
    /// [`store::Store::reserve_id`]).
    pub async fn take_job_id(&self) -> Result<JobId, store::StoreError> {
        let job_id = self.next_job.fetch_add(1, Ordering::Relaxed);
        if let Some(store) = &self.store {
            store.reserve_id(job_id).await?;
        }
        Ok(job_id)
    }

    /// Registers a connection and its agent in one step, so no action can find one without
    /// the other.
    ///
    /// Refused, with the reason, when the agent id belongs to another agent
    /// ([`Scheduler::refusal`]): the check and the registration are one step, so two
    /// claims on one id cannot both pass. `welcome` is queued first when it is not.
    pub fn register(
        &self,
        conn: ConnId,
        connection: Connection,
        registration: scheduler::AgentRegistration,
        reports: &[AttemptKey],
        welcome: Welcome,
    ) -> Result<(), String> {
        let mut state = self.state();
        if let Some(reason) = state.scheduler.refusal(&registration, Instant::now()) {
            return Err(reason);
        }
        let _ = connection
            .outbox
            .try_send(CoordinatorMessage::Welcome(welcome));
        state.connections.insert(conn, connection);
        let actions = state
            .scheduler
            .agent_connected(conn, registration, reports, Instant::now());
        self.apply(&mut state, actions);
        Ok(())
    }

    /// Removes a connection and its agent in one step (see [`Shared::register`]).
    pub fn unregister(&self, conn: ConnId) {
        let mut state = self.state();
        state.connections.remove(&conn);
        let actions = state.scheduler.agent_disconnected(conn, Instant::now());
        self.apply(&mut state, actions);
    }

    /// Runs one scheduler step and carries out its actions, all under the lock.
    pub fn step<R>(&self, f: impl FnOnce(&mut Scheduler) -> (R, Vec<Action>)) -> R {
        let mut state = self.state();
        let (result, actions) = f(&mut state.scheduler);
        self.apply(&mut state, actions);
        result
    }

    /// Carries out actions under the lock: frames go to connection queues and job state
    /// changes to the store's queue (neither waits). The store records what a restart needs:
    /// a job's assignment, its requeue and its end.
    fn apply(&self, state: &mut State, actions: Vec<Action>) {
        for action in actions {
            if let (Some(store), Action::Event { job_id, event }) = (&self.store, &action) {
                match event {
                    JobEvent::Assigned {
                        agent_id, attempt, ..
                    } => store.assigned(*job_id, agent_id, *attempt),
                    JobEvent::Queued { .. } => {
                        if let Some((attempt, lost)) = state.scheduler.attempts(*job_id) {
                            store.requeued(*job_id, attempt, lost);
                        }
                    }
                    JobEvent::Finished(result) => store.finished(*job_id, result.clone()),
                    JobEvent::Output { .. } => {}
                }
            }
            match action {
                Action::Assign { conn, assignment } => {
                    Self::send(
                        state,
                        conn,
                        CoordinatorMessage::Assign(Box::new(assignment)),
                    );
                }
                Action::Cancel { conn, key } => {
                    Self::send(state, conn, CoordinatorMessage::Cancel(key));
                }
                Action::Demand { conn, queued } => {
                    Self::send(state, conn, CoordinatorMessage::Demand { queued });
                }
                Action::Drain { conn } => Self::send(state, conn, CoordinatorMessage::Drain),
                Action::Close { conn } => {
                    if let Some(connection) = state.connections.get(&conn) {
                        tracing::info!(conn, agent_id = %connection.agent_id, "superseded by a newer connection of the same agent; closing");
                        connection.outbox.close();
                    }
                }
                Action::Event { job_id, event } => {
                    let job = if matches!(event, JobEvent::Finished(_)) {
                        state.jobs.remove(&job_id)
                    } else {
                        state.jobs.get(&job_id).cloned()
                    };
                    if let Some(job) = job {
                        // A job's one line at the default level is written by its own
                        // task when it ends (`control::clean_up`), not here under the lock.
                        tracing::debug!(job_id, ?event, "job event");
                        job.phase.send_replace(event);
                    }
                }
            }
        }
    }

    /// Queues a frame for a connection without waiting. A full queue means the agent stopped
    /// reading: close it rather than wait; its attempts are then orphaned like any lost link's.
    /// (Registration and removal are atomic with the scheduler, so an action never names a
    /// connection that is gone.)
    fn send(state: &State, conn: ConnId, message: CoordinatorMessage) {
        match state.connections.get(&conn) {
            Some(connection) => match connection.outbox.try_send(message) {
                Ok(()) | Err(SendError::Closed) => {}
                Err(SendError::Full) => {
                    tracing::warn!(conn, agent_id = %connection.agent_id, "agent stopped reading (queue full); closing the connection");
                    connection.outbox.close();
                }
            },
            None => tracing::error!(conn, "no connection for a scheduler action; this is a bug"),
        }
    }
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
        let log_dir = if config.private_logs {
            let parent = repo.state_dir().join("in-process");
            remove_abandoned_log_dirs(&parent);
            parent.join(std::process::id().to_string())
        } else {
            repo.state_dir().join("logs")
        };
        // The in-process coordinator keeps no store: its jobs die with its only client.
        let (store, loaded) = if config.private_logs {
            (None, store::Loaded::default())
        } else {
            let (store, loaded) = store::Store::open(&repo.state_dir())?;
            (Some(store), loaded)
        };
        let unfinished: std::collections::HashSet<JobId> =
            loaded.unfinished.iter().map(|job| job.job_id).collect();
        let logs = joblog::LogDir::open(&log_dir, &unfinished)?;
        // Job ids never repeat: past the highest the store reserved or stored, or the log
        // directory has seen.
        let first_job = logs.highest_id().max(loaded.highest_id) + 1;
        let artifacts = Arc::new(artifacts::ArtifactStore::open(&log_dir.join("artifacts"))?);

        let websocket = match &config.websocket_addr {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::WebSocketBind {
                addr: addr.clone(),
                hint: if source.kind() == std::io::ErrorKind::AddrInUse {
                    " (another repository's coordinator? give this one its own websocket_port in .buildpool.toml or --websocket-port)"
                } else {
                    ""
                },
                source,
            })?),
            None => None,
        };
        let control = tokio::net::TcpListener::bind(&config.control_addr)
            .await
            .map_err(|source| StartError::ControlBind {
                addr: config.control_addr.clone(),
                source,
            })?;
        let control_addr = control.local_addr()?;
        let http =
            match &config.http_addr {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(
                    |source| StartError::HttpBind {
                        addr: addr.clone(),
                        source,
                    },
                )?),
                None => None,
            };
        let http_addr = http
            .as_ref()
            .map(tokio::net::TcpListener::local_addr)
            .transpose()?;
        let needs_tls = websocket.is_some()
            || !control_addr.ip().is_loopback()
            || http_addr.is_some_and(|addr| !addr.ip().is_loopback());
        let tls = needs_tls
            .then(|| CoordinatorTls::load(&config))
            .transpose()?;
        let git_daemon = match &config.git_daemon {
            Some((listen, port)) => Some(
                git_daemon::GitDaemon::start(repo.common_dir.clone(), listen.clone(), *port)
                    .await?,
            ),
            None => None,
        };
        let scheduler = Scheduler::new(SchedulerConfig {
            default_timeout: config.job_default_timeout,
            reattach_grace: config.reattach_grace,
            unroutable_wait: config.unroutable_wait,
            max_lost_attempts: config.max_lost_attempts,
            affinity: config.affinity,
            ..SchedulerConfig::default()
        });
        let websocket_addr = websocket
            .as_ref()
            .map(tokio::net::TcpListener::local_addr)
            .transpose()?;
        let (ended_refs, ended_refs_queue) = tokio::sync::mpsc::channel(ENDED_REFS_QUEUE);
        // Agents fetch from the git daemon directly only when it listens beyond loopback (an
        // insecure setup); otherwise through the tunnel.
        let direct_git_port = git_daemon.as_ref().map(|d| d.port).filter(|_| {
            config
                .git_daemon
                .as_ref()
                .is_some_and(|(listen, _)| !crate::config::is_loopback(listen))
        });
        let snapshots = jobs::Snapshots::new(
            repo.common_dir.clone(),
            repo.id.clone(),
            git_daemon
                .as_ref()
                .map(|d| d.git_path.clone())
                .unwrap_or_default(),
            direct_git_port,
        );
        let shared = Arc::new(Shared {
            id: format!("{}-{:x}", std::process::id(), fastrand::u32(..)),
            git_daemon_port: git_daemon.as_ref().map(|d| d.port),
            websocket_addr,
            repo,
            auth: Authenticator::new(token, CredentialStore::next_to(&config.token_file)),
            config,
            tls,
            log_dir,
            logs,
            artifacts,
            state: Mutex::new(State {
                scheduler,
                connections: HashMap::new(),
                jobs: HashMap::new(),
            }),
            next_conn: AtomicU64::new(1),
            next_job: AtomicU64::new(first_job),
            shutdown: CancellationToken::new(),
            metrics: crate::metrics::Metrics::new(),
            history: history::History::default(),
            snapshots,
            ended_refs,
            last_request: AtomicU64::new(buildpool_core::time::unix_millis()),
            store,
        });
        jobs::restore(&shared, loaded.unfinished).await;
        let shutdown = shared.shutdown.clone();
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = websocket {
            tasks.spawn(bus::accept_loop(
                Arc::clone(&shared),
                listener,
                shutdown.clone(),
            ));
        }
        tasks.spawn(control::serve(
            Arc::clone(&shared),
            control,
            shutdown.clone(),
        ));
        if let Some(listener) = http {
            tasks.spawn(http::serve(Arc::clone(&shared), listener, shutdown.clone()));
        }
        tasks.spawn(tick_loop(Arc::clone(&shared), shutdown.clone()));
        tasks.spawn(delete_ended_refs(
            shared.repo.common_dir.clone(),
            ended_refs_queue,
            shutdown.clone(),
        ));
        if shared.config.local_fallback {
            tasks.spawn(local_agent::run(Arc::clone(&shared), shutdown.clone()));
        }
        tracing::info!(coordinator_id = %shared.id, control = %control_addr, websocket = ?websocket_addr, http = ?http_addr, "coordinator started");
        Ok(Self {
            shared,
            control_addr,
            http_addr,
            shutdown,
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
            let state = shared.state();
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
        let busy = !self.shared.state().jobs.is_empty();
        (busy, self.shared.last_request.load(Ordering::Relaxed))
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
        self.shared.logs.flush().await;
        if let Some(store) = &self.shared.store
            && let Err(error) = store.settled().await
        {
            tracing::warn!("{error}");
        }
        if self.shared.config.private_logs {
            let _ = std::fs::remove_dir_all(&self.shared.log_dir);
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

/// Ended jobs' snapshot refs waiting to be deleted; beyond this, the jobs' clean-up tasks
/// wait their turn.
const ENDED_REFS_QUEUE: usize = 4096;
/// Most refs deleted in one git call.
const MAX_REF_BATCH: usize = 1024;
/// How long the first ended ref of a batch waits for others: a git call costs milliseconds
/// of CPU, so at a moderate job rate a batch of one would still cost most of a job.
const REF_BATCH_GATHERING: Duration = Duration::from_millis(100);

/// Deletes the snapshot refs of ended jobs in batches: the refs that end within
/// [`REF_BATCH_GATHERING`] of the first, and whatever accumulated while the previous batch
/// ran, go in one git call. On shutdown, what is queued still goes.
async fn delete_ended_refs(
    repo_dir: PathBuf,
    mut ended: tokio::sync::mpsc::Receiver<String>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_REF_BATCH);
    loop {
        batch.clear();
        let stopping = tokio::select! {
            received = ended.recv_many(&mut batch, MAX_REF_BATCH) => {
                if received == 0 {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(REF_BATCH_GATHERING) => false,
                    () = shutdown.cancelled() => true,
                }
            }
            () = shutdown.cancelled() => true,
        };
        while batch.len() < MAX_REF_BATCH
            && let Ok(name) = ended.try_recv()
        {
            batch.push(name);
        }
        if let Err(error) = crate::snapshot::delete_all(&repo_dir, &batch).await {
            tracing::warn!("cannot delete {} snapshot ref(s): {error}", batch.len());
        }
        if stopping {
            return;
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
            _ = interval.tick() => shared.step(|scheduler| ((), scheduler.tick(Instant::now()))),
            _ = recheck.tick() => close_revoked(&shared),
        }
    }
}

/// Closes the connections of agents whose credential no longer admits them (revoked, or
/// the token file's once agent credentials exist), so revocation takes effect on
/// established connections too. Their jobs are then orphaned like any lost link's.
fn close_revoked(shared: &Shared) {
    let admitted: Vec<(ConnId, String)> = shared
        .state()
        .connections
        .iter()
        .filter_map(|(conn, c)| c.credential.clone().map(|credential| (*conn, credential)))
        .collect();
    // Checked outside the lock: the store may be re-read from disk.
    let revoked: Vec<ConnId> = admitted
        .into_iter()
        // Only a definite refusal counts: an unreadable store must not disconnect everyone.
        .filter(|(_, credential)| {
            matches!(
                shared.auth.check(credential, Scope::Agent, None),
                Err(AuthError::Invalid | AuthError::WrongScope { .. })
            )
        })
        .map(|(conn, _)| conn)
        .collect();
    let state = shared.state();
    for conn in revoked {
        if let Some(connection) = state.connections.get(&conn) {
            tracing::warn!(conn, agent_id = %connection.agent_id, "the agent's credential no longer admits it; closing its connection");
            connection.outbox.close();
        }
    }
}
