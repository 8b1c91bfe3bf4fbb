//! The agent runtime: one slot pool and one executor, any number of coordinator links.
//!
//! Jobs belong to the agent, not to a connection: when a link drops mid-job the job keeps
//! running, its output is kept (bounded) and its result held until the coordinator
//! acknowledges it. On reconnect the agent reports its attempts in the hello; the
//! coordinator reattaches them or tells the agent to stop them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use buildpool_proto::Completion;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::connection::{self, GitLocator, SessionError};
use crate::executor::{Executor, ExecutorConfig};
use crate::slots::{LinkId, SlotPool};

/// How long jobs get to end after they were told to stop, before the agent exits anyway.
const STOP_WAIT: Duration = Duration::from_secs(15);

/// Who this agent is and what it offers.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub id: String,
    pub labels: Vec<String>,
    /// Nix system double, e.g. `x86_64-linux`.
    pub system: String,
    pub token: String,
}

/// A coordinator to connect to.
#[derive(Debug, Clone)]
pub struct ServerEndpoint {
    /// `ws://host:port/ws`
    pub url: String,
    /// For logs; defaults to the URL.
    pub name: String,
}

/// One attempt this agent runs or ran for a coordinator.
#[derive(Debug)]
pub(crate) struct JobEntry {
    pub cancel: CancellationToken,
    /// Set when the attempt ended; kept until the coordinator acknowledges the result.
    pub finished: Option<Completion>,
    /// Output that could not be sent before the attempt ended (link down); sent before the
    /// result on the next connection.
    pub unsent: VecDeque<Message>,
}

/// Everything the agent keeps about one coordinator, across reconnects.
#[derive(Debug)]
pub(crate) struct Link {
    pub id: LinkId,
    /// The outbound queue of the current connection, if connected.
    pub outbound: watch::Sender<Option<mpsc::Sender<Message>>>,
    pub jobs: Mutex<HashMap<(u64, u32), JobEntry>>,
}

impl Link {
    pub fn jobs(&self) -> MutexGuard<'_, HashMap<(u64, u32), JobEntry>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A handle on one coordinator link, for callers that bring their own streams.
#[derive(Debug, Clone)]
pub struct LinkHandle(pub(crate) Arc<Link>);

#[derive(Debug)]
pub(crate) struct AgentInner {
    pub(crate) identity: AgentIdentity,
    pub(crate) executor: Executor,
    pub(crate) slots: SlotPool,
    links: Mutex<Vec<Arc<Link>>>,
    /// Every job task, so shutdown and drain can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Cancels every job (shutdown).
    pub(crate) stop_jobs: CancellationToken,
    /// A coordinator asked this agent to drain.
    pub(crate) drain_requested: CancellationToken,
}

/// A build agent. Cheap to clone; clones share the slot pool and jobs.
#[derive(Debug, Clone)]
pub struct Agent {
    pub(crate) inner: Arc<AgentInner>,
}

/// The Nix system double of this machine.
pub fn local_system() -> String {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    format!("{}-{os}", std::env::consts::ARCH)
}

impl Agent {
    pub fn new(identity: AgentIdentity, executor: ExecutorConfig) -> Self {
        let slots = SlotPool::new(u32::try_from(executor.slots).unwrap_or(u32::MAX));
        Self {
            inner: Arc::new(AgentInner {
                identity,
                executor: Executor::new(executor),
                slots,
                links: Mutex::new(Vec::new()),
                tracker: TaskTracker::new(),
                stop_jobs: CancellationToken::new(),
                drain_requested: CancellationToken::new(),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.identity.id
    }

    /// Registers a coordinator link; its id keys the slot pool's fair sharing.
    pub fn link(&self) -> LinkHandle {
        let mut links = self
            .inner
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let link = Arc::new(Link {
            id: links.len(),
            outbound: watch::channel(None).0,
            jobs: Mutex::new(HashMap::new()),
        });
        links.push(Arc::clone(&link));
        LinkHandle(link)
    }

    /// Resolves when a coordinator asks this agent to drain.
    pub async fn drain_requested(&self) {
        self.inner.drain_requested.cancelled().await;
    }

    /// Keeps a connection to one coordinator until `shutdown`, reconnecting with backoff.
    pub async fn serve_endpoint(&self, endpoint: ServerEndpoint, shutdown: CancellationToken) {
        let span = tracing::info_span!("server", agent_id = %self.id(), server = %endpoint.name);
        let link = self.link();
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            let started = tokio::time::Instant::now();
            let session = connection::dial_and_serve(self, &link.0, &endpoint, shutdown.clone());
            let result = tracing::Instrument::instrument(session, span.clone()).await;
            match &result {
                Ok(()) if shutdown.is_cancelled() => break,
                Ok(()) => tracing::warn!(parent: &span, "connection to {} closed", endpoint.url),
                Err(error @ SessionError::Rejected { .. }) => {
                    tracing::error!(parent: &span, "{error}")
                }
                Err(error) => {
                    tracing::warn!(parent: &span, "connection to {}: {error}", endpoint.url)
                }
            }
            backoff.connection_ended(started.elapsed());
            if matches!(result, Err(SessionError::Rejected { .. })) {
                // Retrying at once cannot help; the operator must fix the token or version.
                backoff = Backoff::new(
                    Duration::from_secs(60),
                    Duration::from_secs(60),
                    Duration::MAX,
                );
            }
            let delay = backoff.next_delay(fastrand::f64());
            tracing::info!(parent: &span, "reconnecting in {:.1} s", delay.as_secs_f64());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => break,
            }
        }
    }

    /// Serves a connection the caller already established (the coordinator's embedded
    /// local agent uses an in-memory stream).
    pub async fn serve_stream<S>(
        &self,
        link: &LinkHandle,
        stream: S,
        git: GitLocator,
        shutdown: CancellationToken,
    ) -> Result<(), SessionError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        connection::serve_raw_stream(self, &link.0, stream, git, shutdown).await
    }

    /// Connects to every endpoint and serves them until `shutdown`.
    pub async fn run(&self, endpoints: Vec<ServerEndpoint>, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for endpoint in endpoints {
            let agent = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move { agent.serve_endpoint(endpoint, shutdown).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Stops taking jobs and waits up to `timeout` for the running ones to end; then stops
    /// whatever still runs. Returns whether every job ended on its own.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.inner.slots.set_draining();
        self.inner.tracker.close();
        let deadline = tokio::time::Instant::now() + timeout;
        let finished = tokio::time::timeout_at(deadline, self.inner.tracker.wait())
            .await
            .is_ok();
        if !finished {
            tracing::warn!("drain timeout of {timeout:?} reached; stopping the remaining jobs");
            self.stop().await;
            return false;
        }
        // A result is delivered when its coordinator acknowledged it; links keep
        // reconnecting meanwhile, so a result held for a briefly lost coordinator gets through.
        while !self.all_results_acknowledged() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    "drain timeout reached with results not acknowledged by their coordinators"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    fn all_results_acknowledged(&self) -> bool {
        let links = self
            .inner
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        links.iter().all(|link| link.jobs().is_empty())
    }

    /// Stops every job now and waits (briefly) for their groups to be gone.
    pub async fn stop(&self) {
        self.inner.slots.set_draining();
        self.inner.stop_jobs.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(STOP_WAIT, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!("jobs did not stop within {STOP_WAIT:?}");
        }
    }
}
