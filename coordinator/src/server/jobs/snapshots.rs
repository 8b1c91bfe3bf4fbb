//! The snapshots jobs are built from: where agents fetch them, which are confirmed, and the
//! packs sent with assignments.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use buildpool_core::{SnapshotPack, Source};

use super::error::JobError;

/// Commits remembered as verified at most.
const MAX_VERIFIED_COMMITS: usize = 4096;

/// Snapshot packs remembered at most.
const KEPT_SNAPSHOT_PACKS: usize = 8;

/// The repository's snapshots as jobs need them.
#[derive(Debug)]
pub(crate) struct Snapshots {
    /// The repository's common git directory, which holds the snapshot refs.
    common_dir: PathBuf,
    repo_id: String,
    /// Where agents fetch: the git daemon's path, and its port when they fetch from it
    /// directly rather than through the tunnel.
    git_path: String,
    direct_git_port: Option<u16>,
    /// Snapshot commits this coordinator confirmed with git (they exist and are commits),
    /// so a later submission of the same commit needs no git process: a workstation submits
    /// the same content-addressed snapshot again and again. Object types never change, so
    /// an entry never goes stale; the set is bounded by starting over when full.
    verified: Mutex<HashSet<String>>,
    /// Packs of the newest snapshots ([`crate::snapshot::pack`]) by commit and base, and
    /// which could not be made: the jobs of one snapshot (`build`, then `test`, then
    /// `clippy`) try once.
    packs: Mutex<VecDeque<PackEntry>>,
}

#[derive(Debug)]
struct PackEntry {
    commit: String,
    base: String,
    pack: Option<SnapshotPack>,
}

impl Snapshots {
    pub fn new(
        common_dir: PathBuf,
        repo_id: String,
        git_path: String,
        direct_git_port: Option<u16>,
    ) -> Self {
        Self {
            common_dir,
            repo_id,
            git_path,
            direct_git_port,
            verified: Mutex::default(),
            packs: Mutex::default(),
        }
    }

    /// Where agents fetch the snapshot `commit` held by `git_ref` of this repository.
    pub fn source(&self, commit: String, git_ref: String, base_commit: String) -> Source {
        Source {
            repo_id: self.repo_id.clone(),
            git_path: self.git_path.clone(),
            git_port: self.direct_git_port,
            commit,
            git_ref,
            base_commit,
            pack: None,
        }
    }

    /// Checks that `git_ref` holds `commit`, a commit: what agents will fetch is what the
    /// client snapshotted. A loose ref naming a commit verified before, or a loose commit
    /// object, is read without git (a process per submission would cap the job rate and
    /// cost every job its time); anything else (a packed or unknown object, another ref
    /// storage) asks git.
    pub async fn check_ref(&self, git_ref: &str, commit: &str) -> Result<(), JobError> {
        let common_dir = &self.common_dir;
        if crate::snapshot::loose_ref_target(common_dir, git_ref)
            .is_some_and(|target| target == commit)
        {
            if lock(&self.verified).contains(commit) {
                return Ok(());
            }
            if crate::snapshot::is_loose_commit(common_dir, commit) {
                self.verified(commit);
                return Ok(());
            }
        }
        let resolved = buildpool_core::git::Git::new(common_dir)
            .args([
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{git_ref}^{{commit}}"),
            ])
            .output()
            .await
            .map_err(|_| {
                JobError::Snapshot(format!(
                    "{git_ref} does not exist in {}",
                    common_dir.display()
                ))
            })?;
        if resolved != commit {
            return Err(JobError::Snapshot(format!(
                "{git_ref} points at {resolved}, not {commit}"
            )));
        }
        self.verified(commit);
        Ok(())
    }

    fn verified(&self, commit: &str) {
        let mut commits = lock(&self.verified);
        if commits.len() >= MAX_VERIFIED_COMMITS {
            commits.clear();
        }
        commits.insert(commit.to_owned());
    }

    /// The pack of `commit` over `base`, made or remembered; `None` when there is no base
    /// or git could not make one small enough in time, and the agent fetches.
    pub async fn pack(&self, commit: &str, base: &str) -> Option<SnapshotPack> {
        if base.is_empty() || base == commit {
            return None;
        }
        if let Some(entry) = lock(&self.packs)
            .iter()
            .find(|entry| entry.commit == commit && entry.base == base)
        {
            return entry.pack.clone();
        }
        let pack = crate::snapshot::pack(&self.common_dir, commit, base)
            .await
            .inspect_err(|error| tracing::debug!("no snapshot pack, agents fetch: {error}"))
            .ok();
        let mut packs = lock(&self.packs);
        if packs.len() >= KEPT_SNAPSHOT_PACKS {
            packs.pop_front();
        }
        packs.push_back(PackEntry {
            commit: commit.to_owned(),
            base: base.to_owned(),
            pack: pack.clone(),
        });
        pack
    }
}

/// A panic while holding one of these locks leaves a valid set behind, so poisoning is
/// ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
