//! The agent runtime: one slot pool and one executor, any number of coordinator connections.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::connection::{self, GitLocator, SessionError};
use crate::executor::{Executor, ExecutorConfig};
use crate::slots::SlotPool;

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

#[derive(Debug)]
pub(crate) struct AgentInner {
    pub(crate) identity: AgentIdentity,
    pub(crate) executor: Executor,
    pub(crate) slots: SlotPool,
}

/// A build agent. Cheap to clone; clones share the slot pool.
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
            inner: Arc::new(AgentInner { identity, executor: Executor::new(executor), slots }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.identity.id
    }

    pub fn slots(&self) -> &SlotPool {
        &self.inner.slots
    }

    /// Keeps a connection to one coordinator until `shutdown`, reconnecting with backoff.
    pub async fn serve_endpoint(&self, endpoint: ServerEndpoint, shutdown: CancellationToken) {
        let span = tracing::info_span!("server", agent_id = %self.id(), server = %endpoint.name);
        let _enter = span.enter();
        drop(_enter);
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            let started = tokio::time::Instant::now();
            let result = tracing::Instrument::instrument(
                connection::dial_and_serve(self, &endpoint, shutdown.clone()),
                span.clone(),
            )
            .await;
            let uptime = started.elapsed();
            match &result {
                Ok(()) if shutdown.is_cancelled() => break,
                Ok(()) => tracing::warn!(parent: &span, "connection to {} closed", endpoint.url),
                Err(error @ SessionError::Rejected { .. }) => {
                    tracing::error!(parent: &span, "{error}");
                }
                Err(error) => tracing::warn!(parent: &span, "connection to {}: {error}", endpoint.url),
            }
            backoff.connection_ended(uptime);
            if matches!(result, Err(SessionError::Rejected { .. })) {
                // Retrying at once cannot help; the operator must fix the token or version.
                backoff = Backoff::new(Duration::from_secs(60), Duration::from_secs(60), Duration::MAX);
            }
            let delay = backoff.next_delay(fastrand::f64());
            tracing::info!(parent: &span, "reconnecting in {:.1} s", delay.as_secs_f64());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => break,
            }
        }
    }

    /// Serves a connection the caller already established, e.g. the coordinator's embedded
    /// local agent over an in-memory stream.
    pub async fn serve_stream<S>(
        &self,
        stream: S,
        git: GitLocator,
        shutdown: CancellationToken,
    ) -> Result<(), SessionError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        connection::serve_raw_stream(self, stream, git, shutdown).await
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
}
