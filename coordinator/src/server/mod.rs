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
pub mod local_agent;
pub mod scheduler;
pub mod store;
mod tls_accept;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use buildpool_core::bus::{CoordinatorMessage, Welcome};
use buildpool_core::{AttemptKey, JobEvent, JobId, JobKind};
use buildpool_proto::socket::{Outbox, SendError};
use buildpool_proto::tls::{self, Fingerprint, ServerIdentity};
use tokio::sync::watch;
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

/// The agent id of the coordinator's embedded local agent; no remote agent may use it.
pub const LOCAL_AGENT_ID: &str = "local";

/// A job that has not ended yet, as transports see it.
#[derive(Debug)]
pub(crate) struct ActiveJob {
    pub phase: watch::Sender<JobEvent>,
    pub log: joblog::JobLog,
    pub git_ref: String,
    pub origin: JobOrigin,
    /// How many clients follow the job; a job nobody follows is cancelled after the
    /// client grace (see `control::supervise`).
    pub watchers: watch::Sender<usize>,
}

/// What a job is and where it came from, kept for its metrics and history when it ends.
#[derive(Debug, Clone)]
pub(crate) struct JobOrigin {
    pub kind: JobKind,
    pub worktree: String,
    pub cargo_args: Vec<String>,
}

impl ActiveJob {
    /// A job just submitted: queued, with its log open.
    pub fn queued(log: joblog::JobLog, git_ref: String, origin: JobOrigin) -> Arc<Self> {
        let initial = JobEvent::Queued {
            position: 0,
            reason: String::new(),
        };
        Self::new(log, git_ref, origin, initial)
    }

    /// A job in phase `initial` (a restored one may already be assigned).
    pub fn new(
        log: joblog::JobLog,
        git_ref: String,
        origin: JobOrigin,
        initial: JobEvent,
    ) -> Arc<Self> {
        Arc::new(Self {
            phase: watch::channel(initial).0,
            log,
            git_ref,
            origin,
            watchers: watch::channel(0).0,
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
    pub jobs: HashMap<JobId, Arc<ActiveJob>>,
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
    /// Whether agents fetch from the git daemon directly (it listens beyond loopback, an
    /// insecure setup) instead of through the tunnel.
    pub direct_git: bool,
    pub git_path: String,
    pub websocket_addr: Option<SocketAddr>,
    /// Cancelled when the coordinator stops; per-job tasks end with it.
    pub shutdown: CancellationToken,
    /// Snapshot commits a full git check confirmed (see [`control::VerifiedCommits`]).
    pub verified_commits: control::VerifiedCommits,
    /// Packs of recent snapshots, sent with their jobs (see [`control::SnapshotPacks`]).
    pub snapshot_packs: control::SnapshotPacks,
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

    /// Where agents fetch the snapshot `commit` held by `git_ref` of this repository.
    pub fn source(
        &self,
        commit: String,
        git_ref: String,
        base_commit: String,
    ) -> buildpool_core::Source {
        buildpool_core::Source {
            repo_id: self.repo.id.clone(),
            git_path: self.git_path.clone(),
            git_port: self.git_daemon_port.filter(|_| self.direct_git),
            commit,
            git_ref,
            base_commit,
            pack: None,
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
        let shared = Arc::new(Shared {
            id: format!("{}-{:x}", std::process::id(), fastrand::u32(..)),
            git_daemon_port: git_daemon.as_ref().map(|d| d.port),
            direct_git: config
                .git_daemon
                .as_ref()
                .is_some_and(|(listen, _)| !crate::config::is_loopback(listen)),
            git_path: git_daemon
                .as_ref()
                .map(|d| d.git_path.clone())
                .unwrap_or_default(),
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
            verified_commits: control::VerifiedCommits::default(),
            snapshot_packs: control::SnapshotPacks::default(),
            ended_refs,
            last_request: AtomicU64::new(buildpool_core::time::unix_millis()),
            store,
        });
        restore(&shared, loaded.unfinished).await;
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

/// Takes back the jobs the previous coordinator left unfinished: their logs are reopened
/// for appending, queued ones queue again, and running ones wait for their agents to report
/// them (see [`Scheduler::restore`]). Each is cancelled if no client comes back to follow it
/// within the client grace, counted from now.
async fn restore(shared: &Arc<Shared>, unfinished: Vec<store::StoredJob>) {
    if unfinished.is_empty() {
        return;
    }
    let mut restored = Vec::with_capacity(unfinished.len());
    for stored in unfinished {
        let job_id = stored.job_id;
        let log =
            match joblog::JobLog::reopen(&shared.logs, job_id, shared.config.log_max_bytes).await {
                Ok(log) => log,
                Err(error) => {
                    tracing::error!(job_id, "cannot reopen the job's log ({error}); not resumed");
                    continue;
                }
            };
        let submission = stored.submission;
        let origin = JobOrigin {
            kind: submission.spec.kind,
            worktree: submission.worktree.clone(),
            cargo_args: submission.spec.cargo_args.clone(),
        };
        let initial = match &stored.agent_id {
            Some(agent_id) => JobEvent::Assigned {
                agent_id: agent_id.clone(),
                attempt: stored.attempt,
                local: agent_id == LOCAL_AGENT_ID,
            },
            None => JobEvent::Queued {
                position: 0,
                reason: "requeued after the coordinator restarted".to_owned(),
            },
        };
        let job = ActiveJob::new(log, submission.git_ref.clone(), origin, initial);
        shared.state().jobs.insert(job_id, Arc::clone(&job));
        control::adopt(shared, job_id, &job);
        restored.push(scheduler::RestoredJob {
            job_id,
            source: shared.source(
                submission.commit,
                submission.git_ref,
                submission.base_commit,
            ),
            spec: submission.spec,
            worktree: submission.worktree,
            submitted_unix_ms: stored.submitted_unix_ms,
            attempt: stored.attempt,
            lost_attempts: stored.lost_attempts,
            running_on: stored.agent_id,
        });
    }
    let (queued, running) = restored
        .iter()
        .fold((0, 0), |(q, r), job| match job.running_on {
            Some(_) => (q, r + 1),
            None => (q + 1, r),
        });
    tracing::info!(
        queued,
        running,
        "resumed the jobs of the previous coordinator"
    );
    let now = Instant::now();
    let now_unix = buildpool_core::time::unix_millis();
    shared.step(|s| ((), s.restore(restored, now, now_unix)));
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

/// How much nicer than the rest the coordinator's background writer threads are (see
/// [`spawn_background`]).
#[cfg(target_os = "linux")]
const BACKGROUND_NICER: i32 = 10;

/// Starts a thread for background file work (the job logs' writer, the job store's
/// checkpoints) at a lower priority than the tokio workers. Their work is queued to them
/// and can wait a little; the workers' cannot: a submission is dispatched, a frame sent, by
/// a worker. On a busy two-core machine the job logs' writer (a sixth of the coordinator's
/// CPU at 5,000 jobs a second: a file per job) taking the CPU from the workers was a large
/// part of the p99 submit-to-assign (`bench scale`: 3.9-4.0 ms with this, 4.2-5.1 ms
/// without). The price is paid only when other programs keep every CPU busy: then output
/// reaches followers, and so a job's end its client, a few milliseconds later. The store's
/// writer is not one of these: answers to submissions and acknowledgements of results wait
/// for its commits. Linux keeps nice values per thread and raising one needs no privilege
/// (a coordinator started niced stays below: 10 more, at most 19); elsewhere the thread
/// keeps the process's priority.
pub(crate) fn spawn_background(
    name: &str,
    work: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // Who 0 is the calling thread on Linux; best effort.
            #[cfg(target_os = "linux")]
            if let Ok(nice) = rustix::process::getpriority_process(None) {
                let _ = rustix::process::setpriority_process(None, nicer(nice));
            }
            work();
        })
}

/// The nice value of a background thread started by one at `nice`.
#[cfg(target_os = "linux")]
fn nicer(nice: i32) -> i32 {
    (nice + BACKGROUND_NICER).min(19)
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn background_threads_run_at_a_lower_priority_than_the_rest() {
        let own = rustix::process::getpriority_process(None).expect("own priority");
        let background = super::spawn_background("test-background", move || {
            let nice = rustix::process::getpriority_process(None).expect("priority");
            assert_eq!(nice, super::nicer(own));
            assert!(own == 19 || nice > own, "{nice} is not below {own}");
        })
        .expect("spawns")
        .join();
        assert!(background.is_ok(), "the background thread's check failed");
        assert_eq!(
            rustix::process::getpriority_process(None).expect("own priority"),
            own,
            "only the background thread was lowered"
        );
    }
}
