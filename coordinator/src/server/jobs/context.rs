//! What a job's life needs from the rest of the coordinator.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Records, Snapshots};
use crate::metrics::Metrics;
use crate::server::dispatch::Dispatch;

/// Everything a job's life needs, and nothing else: the dispatcher it is scheduled
/// through, what is kept of it, the snapshots it is built from.
#[derive(Debug)]
pub(crate) struct Jobs {
    pub dispatch: Arc<Dispatch>,
    pub records: Records,
    pub snapshots: Snapshots,
    pub metrics: Arc<Metrics>,
    /// How long a job nobody follows keeps running.
    pub client_grace: Duration,
    /// The most output a job's log keeps.
    pub log_max_bytes: u64,
    /// Cancelled when the coordinator stops; per-job tasks end with it.
    pub shutdown: CancellationToken,
}
