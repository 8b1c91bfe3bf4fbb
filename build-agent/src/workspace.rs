//! Persistent per-slot workspaces, so `target/` stays warm.
//!
//! A fresh worktree per job would make every build a cold build. Instead a repository gets
//! up to one workspace per slot, each a git worktree of the repository's bare cache plus a
//! target directory beside it.
//! A job checks its snapshot out into an idle workspace: git rewrites only the files that
//! changed, their mtimes move, and cargo rebuilds only what depends on them. Which idle
//! workspace matters: the one that last built the job's worktree differs from the snapshot
//! by the developer's last edits only, so each workspace remembers what it built (a small
//! file beside its checkout) and a job takes the warmest one (see [`preference`]).

use std::cmp::Reverse;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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

/// Where a job's snapshot comes from, as far as choosing a workspace goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// The developer's worktree the snapshot was taken from; empty when unknown.
    pub worktree: String,
    /// The snapshot's parent commit; empty when it has none.
    pub base_commit: String,
}

/// What a workspace last built, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub lineage: Lineage,
    pub at: SystemTime,
}

/// The file in a slot's directory that says what its workspace last built.
const BUILT_FILE: &str = "built";

/// The order in which a job of `lineage` tries a repository's slots, given what each last
/// built (`None`: never used). First the slot that built the same worktree (its `target/`
/// is off by the last edits only), then those that built the same base commit, newest
/// first; then the least recently used, never used ones first, so the warm workspace of
/// another worktree is taken last. Lower slot numbers break ties.
pub fn preference(built: &[Option<Built>], lineage: &Lineage) -> Vec<usize> {
    let same = |theirs: &str, ours: &str| !ours.is_empty() && theirs == ours;
    let mut order: Vec<usize> = (0..built.len()).collect();
    order.sort_by_key(|slot| match built.get(*slot).and_then(Option::as_ref) {
        Some(b) if same(&b.lineage.worktree, &lineage.worktree) => (0, Reverse(b.at), None),
        Some(b) if same(&b.lineage.base_commit, &lineage.base_commit) => (1, Reverse(b.at), None),
        Some(b) => (2, Reverse(SystemTime::UNIX_EPOCH), Some(b.at)),
        None => (2, Reverse(SystemTime::UNIX_EPOCH), None),
    });
    order
}

/// What the workspace in `slot_dir` last built; `None` if it never recorded a build.
fn read_built(slot_dir: &Path) -> Option<Built> {
    let path = slot_dir.join(BUILT_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let at = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    let (worktree, base_commit) = text.split_once('\0')?;
    Some(Built {
        lineage: Lineage {
            worktree: worktree.to_owned(),
            base_commit: base_commit.to_owned(),
        },
        at,
    })
}

/// An exclusively held workspace. The lock is a file lock, so it also excludes another
/// agent process that was (mis)configured with the same directory.
#[derive(Debug)]
pub struct Workspace {
    pub repo_id: String,
    pub slot: usize,
    /// The slot's directory: the checkout, the target and what it last built.
    dir: PathBuf,
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

    /// Takes the warmest idle workspace of a repository for a job of `lineage`, in the
    /// order of [`preference`].
    pub fn acquire(&self, repo_id: &str, lineage: &Lineage) -> Result<Workspace, WorkspaceError> {
        check_repo_id(repo_id)?;
        let repo_root = self.root.join(repo_id);
        std::fs::create_dir_all(&repo_root)?;
        let slot_dir = |slot: usize| repo_root.join(format!("slot-{slot}"));
        let built: Vec<Option<Built>> = (0..self.per_repo)
            .map(|slot| read_built(&slot_dir(slot)))
            .collect();
        for slot in preference(&built, lineage) {
            let dir = slot_dir(slot);
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
                        dir,
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
    pub async fn acquire_waiting(
        &self,
        repo_id: &str,
        lineage: &Lineage,
    ) -> Result<Workspace, WorkspaceError> {
        let mut pause = Duration::from_millis(20);
        loop {
            match self.acquire(repo_id, lineage) {
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

    /// Records that this workspace now holds a checkout of `lineage`, for [`preference`].
    /// The file's mtime is when.
    pub fn record_built(&self, lineage: &Lineage) -> std::io::Result<()> {
        let text = format!("{}\0{}", lineage.worktree, lineage.base_commit);
        std::fs::write(self.dir.join(BUILT_FILE), text)
    }

    /// Whether a previous job left build output here.
    pub fn is_warm(&self) -> bool {
        self.target.join("CACHEDIR.TAG").exists() || self.target.join("debug").exists()
    }

    /// Removes what the last job left in the checkout beside its snapshot's files
    /// (untracked and ignored files), keeping a lockfile cargo generated there. Needs no
    /// cache lock, so it runs while the next snapshot is fetched. `Ok(false)` when there is
    /// no checkout yet.
    pub async fn clean(&self) -> Result<bool, GitError> {
        if !self.src.join(".git").exists() {
            return Ok(false);
        }
        in_checkout(&self.src)
            // A lockfile cargo generated here stays when the snapshot has none, so the next
            // job does not resolve every dependency again. (One the snapshot carries is
            // checked out over it.)
            .args(["clean", "-ffdxq", "--exclude=/Cargo.lock"])
            .output()
            .await?;
        Ok(true)
    }

    /// Records the checkout's files as they are now in git's index. Giving them to another
    /// owner (a root agent's job user) changes their status, which git compares: without
    /// this, the next checkout would take them for modified and write them again, and cargo
    /// would rebuild what they belong to.
    pub async fn refresh_index(&self) -> Result<(), GitError> {
        in_checkout(&self.src)
            .args(["update-index", "-q", "--refresh"])
            .output()
            .await
            .map(drop)
    }

    /// Checks `commit` out, leaving exactly the snapshot's files (plus the outside target).
    /// A checkout [`Workspace::clean`] cleaned before (`cleaned`) is not cleaned again:
    /// switching commits removes and writes tracked files only, and there are no others.
    ///
    /// Creating the worktree touches the cache's worktree list, so the caller holds the
    /// cache lock for the whole call.
    pub async fn checkout(
        &self,
        _lock: &CacheLock,
        cache_repo: &Path,
        commit: &str,
        cleaned: bool,
    ) -> Result<(), WorkspaceError> {
        if self.src.join(".git").exists() {
            let lockfile = self.src.join(LOCKFILE);
            let last_lockfile = tokio::fs::read(&lockfile).await.ok();
            let switched = in_checkout(&self.src)
                .args(["checkout", "--quiet", "--detach", "--force", commit])
                .output()
                .await;
            if switched.is_ok() {
                if !cleaned {
                    self.clean().await?;
                }
                // A snapshot without a lockfile (a worktree whose repository ignores it)
                // starts from the one this slot last used: cargo keeps the versions that
                // still fit the manifests, so the warm target stays warm. Switching from a
                // snapshot that carried one deleted it; one the snapshot carries wins.
                if let Some(last) = last_lockfile
                    && !tokio::fs::try_exists(&lockfile).await.unwrap_or(true)
                {
                    tokio::fs::write(&lockfile, last).await?;
                }
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

/// Cargo's lockfile at the top of a checkout.
const LOCKFILE: &str = "Cargo.lock";

/// git in a slot's checkout. A root agent's jobs own the checkout (see
/// `Sandbox::hand_over`), which git would refuse as "dubious ownership"; the agent trusts
/// it because the one thing there that steers git, the `.git` link to the cache, is
/// read-only to jobs.
fn in_checkout(src: &Path) -> Git {
    Git::new(src).args(["-c", "safe.directory=*"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_workspaces_are_skipped_and_freed_on_drop() {
        let root = tempfile::tempdir().expect("temp dir");
        let pool = WorkspacePool::new(root.path().to_owned(), 2);
        let first = pool.acquire("repo", &Lineage::default()).expect("first");
        let second = pool.acquire("repo", &Lineage::default()).expect("second");
        assert_eq!((first.slot, second.slot), (0, 1));
        assert!(matches!(
            pool.acquire("repo", &Lineage::default()),
            Err(WorkspaceError::Exhausted(2))
        ));
        drop(first);
        // A process another test spawns at this moment holds a copy of the lock's file
        // descriptor until it execs, and with it the lock: freed means freed soon after.
        let mut freed = pool.acquire("repo", &Lineage::default());
        for _ in 0..100 {
            if freed.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            freed = pool.acquire("repo", &Lineage::default());
        }
        assert_eq!(freed.expect("freed").slot, 0);
        assert!(pool.acquire("../escape", &Lineage::default()).is_err());
    }

    fn lineage(worktree: &str, base_commit: &str) -> Lineage {
        Lineage {
            worktree: worktree.to_owned(),
            base_commit: base_commit.to_owned(),
        }
    }

    fn built(worktree: &str, base_commit: &str, secs: u64) -> Option<Built> {
        Some(Built {
            lineage: lineage(worktree, base_commit),
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        })
    }

    #[test]
    fn the_workspace_of_the_same_worktree_comes_first_then_the_same_base_then_the_oldest() {
        let slots = [
            built("/w1", "a", 10),
            None,
            built("/w2", "b", 20),
            built("/w3", "b", 30),
            built("/w4", "c", 5),
        ];
        assert_eq!(preference(&slots, &lineage("/w2", "a")), [2, 0, 1, 4, 3]);
        // Same base: newest first; then never used, then least recently used.
        assert_eq!(preference(&slots, &lineage("/new", "b")), [3, 2, 1, 4, 0]);
        assert_eq!(preference(&slots, &lineage("/new", "z")), [1, 4, 0, 2, 3]);
        // Unknown lineage (an older coordinator): never used first, then oldest.
        assert_eq!(preference(&slots, &Lineage::default()), [1, 4, 0, 2, 3]);
        assert_eq!(preference(&[None, None], &lineage("/w1", "a")), [0, 1]);
    }

    #[test]
    fn a_job_takes_the_workspace_that_last_built_its_worktree() {
        let root = tempfile::tempdir().expect("temp dir");
        let pool = WorkspacePool::new(root.path().to_owned(), 2);
        let (w1, w2) = (lineage("/w1", "base-1"), lineage("/w2", "base-2"));
        let first = pool.acquire("repo", &w1).expect("w1");
        first.record_built(&w1).expect("record");
        drop(first);
        // Another worktree takes the never used slot rather than w1's warm one.
        let second = pool.acquire("repo", &w2).expect("w2");
        assert_eq!(second.slot, 1);
        second.record_built(&w2).expect("record");
        drop(second);
        for (lineage, slot) in [(&w1, 0), (&w2, 1), (&w2, 1), (&w1, 0)] {
            let workspace = pool.acquire("repo", lineage).expect("acquired");
            assert_eq!(workspace.slot, slot, "{lineage:?}");
            workspace.record_built(lineage).expect("record");
        }
        // Its workspace busy, a job takes the next warmest one.
        let held = pool.acquire("repo", &w1).expect("w1");
        assert_eq!(held.slot, 0);
        assert_eq!(pool.acquire("repo", &w1).expect("other").slot, 1);
    }

    #[tokio::test]
    async fn a_busy_pool_makes_the_next_job_wait_for_a_release() {
        let root = tempfile::tempdir().expect("temp dir");
        let pool = WorkspacePool::new(root.path().to_owned(), 1);
        let held = pool.acquire("repo", &Lineage::default()).expect("first");
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire_waiting("repo", &Lineage::default()).await }
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

    async fn git(cwd: &Path, args: &[&str]) -> String {
        Git::new(cwd)
            .args(["-c", "user.name=t", "-c", "user.email=t@localhost"])
            .args(args)
            .output()
            .await
            .expect("git runs")
    }

    /// A repository of one commit per entry of `commits` (each writes its files with their
    /// contents, or deletes those given `None`), cloned into a git cache as `repo`; returns
    /// the cache, its repository and the commits.
    async fn cached_repo(
        dir: &Path,
        commits: &[&[(&str, Option<&str>)]],
    ) -> (crate::git_cache::GitCache, PathBuf, Vec<String>) {
        let source = dir.join("source");
        std::fs::create_dir_all(&source).expect("dir");
        git(&source, &["init", "--quiet"]).await;
        let mut ids = Vec::new();
        for files in commits {
            for (name, content) in *files {
                match content {
                    Some(content) => std::fs::write(source.join(name), content).expect("write"),
                    None => std::fs::remove_file(source.join(name)).expect("remove"),
                }
            }
            git(&source, &["add", "--all"]).await;
            git(&source, &["commit", "--quiet", "-m", "next"]).await;
            ids.push(git(&source, &["rev-parse", "HEAD"]).await);
        }
        let cache = crate::git_cache::GitCache::new(dir.join("cache"));
        let cache_repo = cache.repo_dir("repo");
        Git::new(dir)
            .args(["clone", "--quiet", "--bare"])
            .arg(&source)
            .arg(&cache_repo)
            .output()
            .await
            .expect("clone");
        (cache, cache_repo, ids)
    }

    #[tokio::test]
    async fn a_checkout_holds_exactly_the_snapshot_whether_cleaned_before_or_after() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cache, cache_repo, commits) = cached_repo(
            dir.path(),
            &[
                &[("first.txt", Some("first\n"))],
                &[("first.txt", None), ("second.txt", Some("second\n"))],
            ],
        )
        .await;
        let [first, second] = commits.as_slice() else {
            panic!("two commits");
        };
        let lock = cache.lock("repo").await.expect("lock");
        let pool = WorkspacePool::new(dir.path().join("workspaces"), 1);
        let workspace = pool
            .acquire("repo", &Lineage::default())
            .expect("workspace");
        let files = || {
            let mut names: Vec<String> = std::fs::read_dir(&workspace.src)
                .expect("checkout")
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name != ".git")
                .collect();
            names.sort();
            names
        };
        let leave_leftovers = || {
            std::fs::write(workspace.src.join("junk.txt"), "left by a job\n").expect("junk");
            std::fs::create_dir_all(workspace.src.join("out")).expect("dir");
            std::fs::write(workspace.src.join("out/generated.rs"), "\n").expect("generated");
            std::fs::write(workspace.src.join("Cargo.lock"), "# generated\n").expect("lock");
        };

        assert!(
            !workspace.clean().await.expect("clean"),
            "nothing to clean before the first checkout"
        );
        workspace
            .checkout(&lock, &cache_repo, first, false)
            .await
            .expect("first checkout");
        assert_eq!(files(), ["first.txt"]);

        leave_leftovers();
        assert!(workspace.clean().await.expect("clean"));
        workspace
            .checkout(&lock, &cache_repo, second, true)
            .await
            .expect("cleaned before");
        assert_eq!(
            files(),
            ["Cargo.lock", "second.txt"],
            "a generated lockfile stays"
        );

        leave_leftovers();
        workspace
            .checkout(&lock, &cache_repo, first, false)
            .await
            .expect("cleaned after");
        assert_eq!(files(), ["Cargo.lock", "first.txt"]);
    }

    /// A repository that ignores its lockfile: the main worktree's snapshot carries one, a
    /// new worktree's does not, and its job must start from the slot's last lockfile rather
    /// than resolve every dependency anew.
    #[tokio::test]
    async fn a_snapshot_without_a_lockfile_starts_from_the_slots_last_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cache, cache_repo, commits) = cached_repo(
            dir.path(),
            &[
                &[("Cargo.lock", Some("locked\n")), ("lib.rs", Some("\n"))],
                &[("Cargo.lock", None)],
                &[("Cargo.lock", Some("relocked\n"))],
            ],
        )
        .await;
        let [locked, unlocked, relocked] = commits.as_slice() else {
            panic!("three commits");
        };
        let lock = cache.lock("repo").await.expect("lock");
        let pool = WorkspacePool::new(dir.path().join("workspaces"), 1);
        let workspace = pool
            .acquire("repo", &Lineage::default())
            .expect("workspace");
        let lockfile = || std::fs::read_to_string(workspace.src.join(LOCKFILE)).ok();
        for (commit, cleaned, expected) in [
            (locked, false, "locked\n"),
            (unlocked, false, "locked\n"),
            (relocked, true, "relocked\n"),
            (unlocked, true, "relocked\n"),
        ] {
            workspace
                .checkout(&lock, &cache_repo, commit, cleaned)
                .await
                .expect("checkout");
            assert_eq!(lockfile().as_deref(), Some(expected), "{commit}");
        }
        // What cargo wrote there last is what the next lockless snapshot starts from, and a
        // snapshot's own lockfile still wins over it.
        std::fs::write(workspace.src.join(LOCKFILE), "updated by cargo\n").expect("write");
        workspace
            .checkout(&lock, &cache_repo, unlocked, false)
            .await
            .expect("checkout");
        assert_eq!(lockfile().as_deref(), Some("updated by cargo\n"));
        workspace
            .checkout(&lock, &cache_repo, locked, false)
            .await
            .expect("checkout");
        assert_eq!(lockfile().as_deref(), Some("locked\n"));
    }
}
