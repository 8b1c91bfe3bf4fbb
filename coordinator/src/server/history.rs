//! The last jobs that ended, for the dashboard: a bounded ring in memory.
//!
//! The scheduler forgets a job when it ends and the job log keeps only its output, so the
//! facts the dashboard shows about finished jobs (where, which attempt, how long) are kept
//! here. Each job's own clean-up task records it, off the dispatch path and outside the
//! state lock; the ring has its own small lock.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use buildpool_core::{JobId, JobKind, JobResult};

/// Finished jobs kept.
pub const KEPT: usize = 100;

/// One job that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedJob {
    pub job_id: JobId,
    pub kind: JobKind,
    pub worktree: String,
    /// The worktree's branch when the job ended; `None` for a detached HEAD or a worktree
    /// this host cannot read.
    pub branch: Option<String>,
    pub cargo_args: Vec<String>,
    /// Empty when the job never ran.
    pub agent_id: String,
    pub local: bool,
    pub attempt: u32,
    /// The `outcome` label of the job's metrics (`success`, `failure`, ...).
    pub outcome: &'static str,
    /// How it ended, in words (`exit code 101`, `timed out`, ...).
    pub end: String,
    pub queue_time: Duration,
    pub run_time: Duration,
    pub finished_unix_ms: u64,
}

impl FinishedJob {
    /// The facts of a job that ended with `result`.
    pub(crate) fn new(
        job_id: JobId,
        origin: &super::active::JobOrigin,
        result: &JobResult,
        finished_unix_ms: u64,
    ) -> Self {
        Self {
            job_id,
            kind: origin.kind,
            branch: branch_of(Path::new(&origin.worktree)),
            worktree: origin.worktree.clone(),
            cargo_args: origin.cargo_args.clone(),
            agent_id: result.agent_id.clone(),
            local: result.local,
            attempt: result.attempt,
            outcome: result.completion.end.outcome(),
            end: result.completion.end.to_string(),
            queue_time: result.queue_time,
            run_time: result.completion.duration,
            finished_unix_ms,
        }
    }
}

/// The ring of the last [`KEPT`] finished jobs.
#[derive(Debug, Default)]
pub struct History {
    jobs: Mutex<VecDeque<FinishedJob>>,
}

impl History {
    pub fn record(&self, job: FinishedJob) {
        let mut jobs = self.lock();
        if jobs.len() == KEPT {
            jobs.pop_front();
        }
        jobs.push_back(job);
    }

    /// The kept jobs, most recent first.
    pub fn recent(&self) -> Vec<FinishedJob> {
        self.lock().iter().rev().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FinishedJob>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The branch checked out in `worktree`, read from git's files (no process per job): the
/// worktree's `.git` is a directory (the main worktree) or a `gitdir:` file (a linked one).
pub fn branch_of(worktree: &Path) -> Option<String> {
    let dot_git = worktree.join(".git");
    let git_dir = if dot_git.is_dir() {
        dot_git
    } else {
        let text = std::fs::read_to_string(&dot_git).ok()?;
        worktree.join(text.strip_prefix("gitdir:")?.trim())
    };
    let head = std::fs::read_to_string(git_dir.join("HEAD")).ok()?;
    head.trim()
        .strip_prefix("ref: refs/heads/")
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_latest_jobs_newest_first() {
        let history = History::default();
        for job_id in 0..(KEPT as u64 + 5) {
            history.record(FinishedJob {
                job_id,
                kind: JobKind::Build,
                worktree: String::new(),
                branch: None,
                cargo_args: Vec::new(),
                agent_id: String::new(),
                local: false,
                attempt: 1,
                outcome: "success",
                end: "exit code 0".into(),
                queue_time: Duration::ZERO,
                run_time: Duration::ZERO,
                finished_unix_ms: 0,
            });
        }
        let recent = history.recent();
        assert_eq!(recent.len(), KEPT);
        assert_eq!(recent[0].job_id, KEPT as u64 + 4);
        assert_eq!(recent[KEPT - 1].job_id, 5);
    }

    #[test]
    fn branches_are_read_from_main_and_linked_worktrees() {
        let dir = tempfile::tempdir().expect("temp");
        let main = dir.path().join("main");
        std::fs::create_dir_all(main.join(".git/worktrees/feature")).expect("dirs");
        std::fs::write(main.join(".git/HEAD"), "ref: refs/heads/trunk\n").expect("head");
        let linked = dir.path().join("feature");
        std::fs::create_dir_all(&linked).expect("dir");
        std::fs::write(
            linked.join(".git"),
            format!(
                "gitdir: {}\n",
                main.join(".git/worktrees/feature").display()
            ),
        )
        .expect("gitdir");
        std::fs::write(
            main.join(".git/worktrees/feature/HEAD"),
            "ref: refs/heads/feature/x\n",
        )
        .expect("head");
        assert_eq!(branch_of(&main).as_deref(), Some("trunk"));
        assert_eq!(branch_of(&linked).as_deref(), Some("feature/x"));
        std::fs::write(main.join(".git/HEAD"), "0123abcd\n").expect("detached");
        assert_eq!(branch_of(&main), None);
    }
}
