//! A job that has not ended yet, as the coordinator's parts share it: its phase, its log,
//! and how many clients follow it.

use std::sync::Arc;

use buildpool_core::{JobEvent, JobKind};
use tokio::sync::watch;

use super::joblog;

/// A job that has not ended yet, as transports see it.
#[derive(Debug)]
pub(crate) struct ActiveJob {
    pub phase: watch::Sender<JobEvent>,
    pub log: joblog::JobLog,
    pub git_ref: String,
    pub origin: JobOrigin,
    /// How many clients follow the job; a job nobody follows is cancelled after the
    /// client grace (see `jobs::supervise`).
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

/// One client counted among a job's watchers for as long as this lives: uncounted exactly
/// once, whichever way it goes (its stream ends, the client drops it, or the client was gone
/// before its submission's answer reached it). A job left unwatched is cancelled after the
/// client grace (see `jobs::supervise`).
pub(crate) struct Watching {
    pub job: Arc<ActiveJob>,
}

impl Watching {
    pub fn start(job: &Arc<ActiveJob>) -> Self {
        job.watchers.send_modify(|count| *count += 1);
        Self {
            job: Arc::clone(job),
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.job
            .watchers
            .send_modify(|count| *count = count.saturating_sub(1));
    }
}

impl std::ops::Deref for Watching {
    type Target = ActiveJob;

    fn deref(&self) -> &ActiveJob {
        &self.job
    }
}
