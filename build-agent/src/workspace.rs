//! Persistent per-slot workspaces, so `target/` stays warm.
//!
//! A fresh worktree per job would make every build a cold build. Instead a repository gets
//! up to one workspace per slot, each a git worktree of the repository's bare cache plus a
//! target directory beside it.
//! A job checks its snapshot out into an idle workspace: git rewrites only the files that
//! changed, their mtimes move, and cargo rebuilds only what depends on them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::git_cache::{CacheError, CacheLock, check_repo_id};
use buildpool_core::git::{Git, GitError};

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("all {0} workspaces of this repository are in use by other processes")]
    Exhausted(usize),
    #[error("workspace I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Git(#[from] GitError),
}

/// All workspaces of this agent, under one directory.
#[derive(Debug, Clone)]
pub struct WorkspacePool {
    root: PathBuf,
    /// Upper bound on workspaces per repository; normally the agent's slot count.
    per_repo: usize,
}

/// An exclusively held workspace. The lock is a file lock, so it also excludes another
/// agent process that was (mis)configured with the same directory.
#[derive(Debug)]
pub struct Workspace {
    pub repo_id: String,
    pub slot: usize,
    /// The checkout cargo runs in.
    pub src: PathBuf,
    /// `CARGO_TARGET_DIR`; outside the checkout so cleaning the checkout keeps it.
    pub target: PathBuf,
    _lock: File,
}

impl WorkspacePool {
    pub fn new(root: PathBuf, per_repo: usize) -> Self {
        Self {
            root,
            per_repo: per_repo.max(1),
        }
    }

    /// Takes the lowest-numbered idle workspace of a repository. Lower numbers are used most,
    /// so they are the warmest.
    pub fn acquire(&self, repo_id: &str) -> Result<Workspace, WorkspaceError> {
        check_repo_id(repo_id)?;
        let repo_root = self.root.join(repo_id);
        std::fs::create_dir_all(&repo_root)?;
        for slot in 0..self.per_repo {
            let dir = repo_root.join(format!("slot-{slot}"));
            std::fs::create_dir_all(&dir)?;
            let lock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(".lock"))?;
            match lock.try_lock() {
                Ok(()) => {
                    return Ok(Workspace {
                        repo_id: repo_id.to_owned(),
                        slot,
                        src: dir.join("src"),
                        target: dir.join("target"),
                        _lock: lock,
                    });
                }
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(error)) => return Err(error.into()),
            }
        }
        Err(WorkspaceError::Exhausted(self.per_repo))
    }

    /// Like [`WorkspacePool::acquire`], but a busy pool makes the caller wait for a
    /// workspace to be released instead of failing. The agent never runs more jobs than it
    /// has slots, so this waits only for a job that is ending, or for another process that
    /// shares the directory; the job's own timeout and cancellation bound the wait.
    pub async fn acquire_waiting(&self, repo_id: &str) -> Result<Workspace, WorkspaceError> {
        let mut pause = Duration::from_millis(20);
        loop {
            match self.acquire(repo_id) {
                Err(WorkspaceError::Exhausted(count)) => {
                    tracing::debug!("all {count} workspaces busy; waiting for one");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }
}

impl Workspace {
    /// The directory of the workspace's repository: its slots and shared directories.
    pub fn repo_dir(&self) -> PathBuf {
        self.src
            .parent()
            .and_then(Path::parent)
            .map_or_else(PathBuf::new, Path::to_owned)
    }

    /// Whether a previous job left build output here.
    pub fn is_warm(&self) -> bool {
        self.target.join("CACHEDIR.TAG").exists() || self.target.join("debug").exists()
    }

    /// Checks `commit` out, leaving exactly the snapshot's files (plus the outside target).
    ///
    /// Creating the worktree touches the cache's worktree list, so the caller holds the
    /// cache lock for the whole call.
    pub async fn checkout(
        &self,
        _lock: &CacheLock,
        cache_repo: &Path,
        commit: &str,
    ) -> Result<(), WorkspaceError> {
        if self.src.join(".git").exists() {
            let switched = Git::new(&self.src)
                .args(["checkout", "--quiet", "--detach", "--force", commit])
                .output()
                .await;
            if switched.is_ok() {
                Git::new(&self.src)
                    // A lockfile cargo generated here stays when the snapshot has none, so
                    // the next job does not resolve every dependency again. (One the
                    // snapshot carries is checked out over it.)
                    .args(["clean", "-ffdxq", "--exclude=/Cargo.lock"])
                    .output()
                    .await?;
                return Ok(());
            }
            tracing::warn!(src = %self.src.display(), "workspace is broken; recreating it");
        }
        if self.src.exists() {
            tokio::fs::remove_dir_all(&self.src).await?;
        }
        Git::new(cache_repo)
            .args(["worktree", "prune"])
            .output()
            .await?;
        Git::new(cache_repo)
            .args(["worktree", "add", "--quiet", "--detach", "--force"])
            .arg(&self.src)
            .arg(commit)
            .output()
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_workspaces_are_skipped_and_freed_on_drop() {
        let root = tempfile::tempdir().expect("temp dir");
        let pool = WorkspacePool::new(root.path().to_owned(), 2);
        let first = pool.acquire("repo").expect("first");
        let second = pool.acquire("repo").expect("second");
        assert_eq!((first.slot, second.slot), (0, 1));
        assert!(matches!(
            pool.acquire("repo"),
            Err(WorkspaceError::Exhausted(2))
        ));
        drop(first);
        assert_eq!(pool.acquire("repo").expect("freed").slot, 0);
        assert!(pool.acquire("../escape").is_err());
    }

    #[tokio::test]
    async fn a_busy_pool_makes_the_next_job_wait_for_a_release() {
        let root = tempfile::tempdir().expect("temp dir");
        let pool = WorkspacePool::new(root.path().to_owned(), 1);
        let held = pool.acquire("repo").expect("first");
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire_waiting("repo").await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiter.is_finished(),
            "waits while the only workspace is held"
        );
        drop(held);
        let workspace = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("gets the released workspace")
            .expect("joins")
            .expect("acquired");
        assert_eq!(workspace.slot, 0);
    }
}
