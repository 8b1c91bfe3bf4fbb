//! What the coordinator's tasks share: the owners of its state, each behind its own
//! interface, and the facts every part may read.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::access::Access;
use super::artifacts::ArtifactStore;
use super::dispatch::Dispatch;
use super::jobs::Jobs;
use super::tls::CoordinatorTls;
use crate::config::CoordinatorConfig;
use crate::metrics::Metrics;
use crate::repo::Repo;

#[derive(Debug)]
pub(crate) struct Shared {
    /// This coordinator's run, as agents and clients tell coordinators apart.
    pub id: String,
    pub repo: Repo,
    pub config: CoordinatorConfig,
    /// Credentials, and when a client was last seen.
    pub access: Access,
    /// The scheduler, the agents' connections and the active jobs, behind one lock.
    pub dispatch: Arc<Dispatch>,
    /// A job's life: admission, supervision, following, what is kept of it.
    pub jobs: Arc<Jobs>,
    /// Executables jobs sent back. Shared with the blocking tasks that write them, so a bus
    /// task never waits on the disk.
    pub artifacts: Arc<ArtifactStore>,
    pub metrics: Arc<Metrics>,
    /// `None` for an in-process coordinator: no job bus, control API on loopback.
    pub tls: Option<CoordinatorTls>,
    pub websocket_addr: Option<SocketAddr>,
    pub git_daemon_port: Option<u16>,
    /// Cancelled when the coordinator stops; per-job tasks end with it.
    pub shutdown: CancellationToken,
}
