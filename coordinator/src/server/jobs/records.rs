//! What the coordinator keeps of its jobs: their logs, the durable store, the history of
//! the last ones that ended, job ids, and the snapshot refs of ended jobs until they are
//! deleted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use buildpool_core::JobId;
use tokio_util::sync::CancellationToken;

use crate::server::history::History;
use crate::server::joblog;
use crate::server::store::{Store, StoreError};

#[derive(Debug)]
pub(crate) struct Records {
    log_dir: PathBuf,
    /// The job logs in `log_dir`, and which may be reused.
    logs: joblog::LogDir,
    /// The durable job table; `None` for an in-process coordinator, whose jobs end with
    /// the one process that submits and follows them.
    store: Option<Arc<Store>>,
    /// The last jobs that ended, for the dashboard.
    history: History,
    next_job: AtomicU64,
    /// Snapshot refs of ended jobs, for [`delete_ended_refs`] to delete in batches.
    pub(super) ended_refs: tokio::sync::mpsc::Sender<String>,
}

impl Records {
    /// Records kept in `log_dir` (with `logs` opened there) and `store`, handing out job
    /// ids from `first_job`; also returns the queue of ended refs for
    /// [`delete_ended_refs`].
    pub fn new(
        log_dir: PathBuf,
        logs: joblog::LogDir,
        store: Option<Arc<Store>>,
        first_job: JobId,
    ) -> (Self, tokio::sync::mpsc::Receiver<String>) {
        let (ended_refs, ended_refs_queue) = tokio::sync::mpsc::channel(ENDED_REFS_QUEUE);
        let records = Self {
            log_dir,
            logs,
            store,
            history: History::default(),
            next_job: AtomicU64::new(first_job),
            ended_refs,
        };
        (records, ended_refs_queue)
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Where job `job_id`'s log is, or was.
    pub fn log_path(&self, job_id: JobId) -> PathBuf {
        joblog::log_path(&self.log_dir, job_id)
    }

    pub fn logs(&self) -> &joblog::LogDir {
        &self.logs
    }

    pub fn store(&self) -> Option<&Store> {
        self.store.as_deref()
    }

    /// The store, for the dispatcher that records the transitions a restart needs.
    pub fn store_handle(&self) -> Option<Arc<Store>> {
        self.store.clone()
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// A new job id, never handed out before, nor again after a crash (see
    /// [`Store::reserve_id`]).
    pub async fn take_job_id(&self) -> Result<JobId, StoreError> {
        let job_id = self.next_job.fetch_add(1, Ordering::Relaxed);
        if let Some(store) = &self.store {
            store.reserve_id(job_id).await?;
        }
        Ok(job_id)
    }

    /// Writes out what the logs and the store still hold in memory or in their queues.
    pub async fn flush(&self) {
        self.logs.flush().await;
        if let Some(store) = &self.store
            && let Err(error) = store.settled().await
        {
            tracing::warn!("{error}");
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
pub(crate) async fn delete_ended_refs(
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
