//! The disk budget: every repository's workspaces and caches, accounted against
//! `[storage] max_disk_gb`.
//!
//! Every repository an agent ever built keeps a full `target/` per slot plus its git cache
//! and cargo home; unbounded, that fills a build host's disk. The [`Ledger`] is the pure
//! part: sizes, last use and which items a running job holds; it decides which jobs fit and
//! what to evict. [`DiskBudget`] measures the directories, deletes what the ledger picks
//! and keeps the ledger current.
//!
//! Rules: idle workspaces go first, least recently used first, then the caches of
//! repositories that have no workspace left. An item a running job holds is never evicted.
//! A job is declined (the coordinator gives it to another agent or requeues it) when the
//! space running jobs hold plus what it needs exceeds the budget; it is never half-run.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use buildpool_core::bus::{DiskUsage, human_bytes};
use buildpool_core::time::unix_millis;

use crate::git_cache::GitCache;

/// Something on disk the agent may delete to stay within its budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Item {
    /// One slot's workspace of a repository: checkout and target directory.
    Workspace { repo: String, slot: usize },
    /// A repository's git cache, cargo home and sccache directory.
    Caches { repo: String },
}

impl Item {
    fn repo(&self) -> &str {
        match self {
            Item::Workspace { repo, .. } | Item::Caches { repo } => repo,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    bytes: u64,
    /// Unix milliseconds.
    last_used: u64,
    /// Running jobs holding it.
    holders: u32,
}

/// Why a job does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoesNotFit {
    pub held_bytes: u64,
    pub needed_bytes: u64,
    pub budget_bytes: u64,
}

impl std::fmt::Display for DoesNotFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "disk budget: running jobs hold {}, this repository needs about {}, budget {}",
            human_bytes(self.held_bytes),
            human_bytes(self.needed_bytes),
            human_bytes(self.budget_bytes)
        )
    }
}

/// Sizes, last use and holders of everything on disk; no I/O.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: BTreeMap<Item, Entry>,
}

impl Ledger {
    pub fn used(&self) -> u64 {
        self.entries.values().map(|entry| entry.bytes).sum()
    }

    /// Records a measured size (a new item is idle and was last used at `last_used`).
    pub fn measured(&mut self, item: Item, bytes: u64, last_used: u64) {
        let entry = self.entries.entry(item).or_insert(Entry {
            last_used,
            ..Entry::default()
        });
        entry.bytes = bytes;
    }

    /// A job starts using `item`.
    pub fn hold(&mut self, item: Item, now: u64) {
        let entry = self.entries.entry(item).or_default();
        entry.holders += 1;
        entry.last_used = now;
    }

    /// A job stopped using `item`.
    pub fn release(&mut self, item: &Item, now: u64) {
        if let Some(entry) = self.entries.get_mut(item) {
            entry.holders = entry.holders.saturating_sub(1);
            entry.last_used = now;
        }
    }

    pub fn forget(&mut self, item: &Item) {
        self.entries.remove(item);
    }

    /// Whether a job of `repo` fits beside what running jobs hold. Its need is the
    /// repository's largest workspace (a cold one grows to that) plus its caches when no
    /// running job holds them yet; a repository never seen needs what the average
    /// workspace takes. When nothing runs the job is admitted whatever its size: eviction
    /// then makes all the room there can be, and declining would starve it.
    pub fn admit(&self, repo: &str, budget: u64) -> Result<(), DoesNotFit> {
        let held: u64 = self
            .entries
            .values()
            .filter(|entry| entry.holders > 0)
            .map(|entry| entry.bytes)
            .sum();
        if held == 0 {
            return Ok(());
        }
        let workspaces: Vec<u64> = self
            .entries
            .iter()
            .filter(|(item, _)| matches!(item, Item::Workspace { .. }))
            .map(|(_, entry)| entry.bytes)
            .collect();
        let own_workspace = self
            .entries
            .iter()
            .filter(|(item, _)| matches!(item, Item::Workspace { .. }) && item.repo() == repo)
            .map(|(_, entry)| entry.bytes)
            .max();
        let average = match u64::try_from(workspaces.len()) {
            Ok(count) if count > 0 => workspaces.iter().sum::<u64>() / count,
            _ => 0,
        };
        let caches = self
            .entries
            .get(&Item::Caches {
                repo: repo.to_owned(),
            })
            .filter(|entry| entry.holders == 0)
            .map_or(0, |entry| entry.bytes);
        let needed = own_workspace.unwrap_or(average) + caches;
        if held + needed > budget {
            return Err(DoesNotFit {
                held_bytes: held,
                needed_bytes: needed,
                budget_bytes: budget,
            });
        }
        Ok(())
    }

    /// What to delete, in order, to bring the total within `budget`: idle workspaces least
    /// recently used first, then the idle caches of repositories left with no workspace.
    pub fn evictions(&self, budget: u64) -> Vec<Item> {
        let mut used = self.used();
        let mut chosen = Vec::new();
        if used <= budget {
            return chosen;
        }
        let mut idle_workspaces: Vec<(&Item, &Entry)> = self
            .entries
            .iter()
            .filter(|(item, entry)| matches!(item, Item::Workspace { .. }) && entry.holders == 0)
            .collect();
        idle_workspaces.sort_by_key(|(_, entry)| entry.last_used);
        for (item, entry) in idle_workspaces {
            if used <= budget {
                return chosen;
            }
            used = used.saturating_sub(entry.bytes);
            chosen.push(item.clone());
        }
        let kept_workspaces: HashSet<&str> = self
            .entries
            .keys()
            .filter(|item| matches!(item, Item::Workspace { .. }) && !chosen.contains(item))
            .map(Item::repo)
            .collect();
        let mut idle_caches: Vec<(&Item, &Entry)> = self
            .entries
            .iter()
            .filter(|(item, entry)| {
                matches!(item, Item::Caches { .. })
                    && entry.holders == 0
                    && !kept_workspaces.contains(item.repo())
            })
            .collect();
        idle_caches.sort_by_key(|(_, entry)| entry.last_used);
        for (item, entry) in idle_caches {
            if used <= budget {
                break;
            }
            used = used.saturating_sub(entry.bytes);
            chosen.push(item.clone());
        }
        chosen
    }

    /// Idle items of repositories whose last use (of any of their items) is older than
    /// `ttl`: workspaces first, so a cache goes only with its repository's workspaces.
    pub fn expired(&self, now: u64, ttl: Duration) -> Vec<Item> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let mut last_use: BTreeMap<&str, (u64, bool)> = BTreeMap::new();
        for (item, entry) in &self.entries {
            let repo = last_use.entry(item.repo()).or_insert((0, false));
            repo.0 = repo.0.max(entry.last_used);
            repo.1 |= entry.holders > 0;
        }
        let mut items: Vec<Item> = self
            .entries
            .keys()
            .filter(|item| {
                last_use
                    .get(item.repo())
                    .is_some_and(|(last, held)| !held && now.saturating_sub(*last) > ttl_ms)
            })
            .cloned()
            .collect();
        items.sort_by_key(|item| matches!(item, Item::Caches { .. }));
        items
    }
}

/// Space a directory tree takes on disk (allocated blocks), each hard-linked file once.
pub fn measure(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut pending = vec![path.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total += meta.blocks() * 512;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    total
}

/// The budget when none is configured: what the agent already uses plus half the space
/// still free on the workspaces' filesystem at start.
pub fn default_budget(worktree_dir: &Path, already_used: u64) -> u64 {
    let available = rustix::fs::statvfs(worktree_dir)
        .map(|stat| stat.f_bavail.saturating_mul(stat.f_frsize))
        .unwrap_or(0);
    already_used + available / 2
}

/// The agent's disk: the ledger plus the directories it describes.
#[derive(Debug)]
pub struct DiskBudget {
    worktree_dir: PathBuf,
    cache: GitCache,
    budget: Mutex<u64>,
    /// Repositories not built for this long lose their workspaces and caches.
    ttl: Duration,
    ledger: Mutex<Ledger>,
    /// One enforcement at a time: every job starts one, and two at once would plan and
    /// measure the same evictions twice.
    enforcing: tokio::sync::Mutex<()>,
}

/// A running job's hold on its workspace and its repository's caches; released on drop,
/// whatever way the job ends.
#[derive(Debug)]
pub struct DiskHold {
    disk: Arc<DiskBudget>,
    items: [Item; 2],
}

impl Drop for DiskHold {
    fn drop(&mut self) {
        let now = unix_millis();
        let mut ledger = self.disk.ledger();
        for item in &self.items {
            ledger.release(item, now);
        }
    }
}

impl DiskBudget {
    /// Scans what is on disk now (blocking: call it off the runtime's threads) and settles
    /// the budget: `configured`, else [`default_budget`].
    pub fn scan(
        worktree_dir: PathBuf,
        cache: GitCache,
        configured: Option<u64>,
        ttl: Duration,
    ) -> Self {
        let mut ledger = Ledger::default();
        let now = unix_millis();
        for (repo, repo_dir) in subdirectories(&worktree_dir) {
            remove_evicted_leftovers(&repo_dir);
            for (name, slot_dir) in subdirectories(&repo_dir) {
                if let Some(slot) = name.strip_prefix("slot-").and_then(|n| n.parse().ok()) {
                    let last_used = modified_ms(&slot_dir.join(".lock")).unwrap_or(now);
                    let item = Item::Workspace {
                        repo: repo.clone(),
                        slot,
                    };
                    ledger.measured(item, measure(&slot_dir), last_used);
                }
            }
        }
        let repos: HashSet<String> = subdirectories(&worktree_dir)
            .into_iter()
            .map(|(repo, _)| repo)
            .chain(cache.repo_ids())
            .collect();
        for repo in repos {
            let bytes = caches_of(&worktree_dir, &cache, &repo)
                .iter()
                .map(|dir| measure(dir))
                .sum();
            let last_used = modified_ms(&cache.repo_dir(&repo)).unwrap_or(now);
            ledger.measured(Item::Caches { repo }, bytes, last_used);
        }
        let budget = configured.unwrap_or_else(|| default_budget(&worktree_dir, ledger.used()));
        Self {
            worktree_dir,
            cache,
            budget: Mutex::new(budget),
            ttl,
            ledger: Mutex::new(ledger),
            enforcing: tokio::sync::Mutex::new(()),
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn budget(&self) -> u64 {
        *self.budget.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn usage(&self) -> DiskUsage {
        DiskUsage {
            used_bytes: self.ledger().used(),
            budget_bytes: self.budget(),
        }
    }

    /// Whether a job of `repo` fits now.
    pub fn admit(&self, repo: &str) -> Result<(), DoesNotFit> {
        self.ledger().admit(repo, self.budget())
    }

    /// A job takes workspace `slot` of `repo`.
    pub fn hold(self: &Arc<Self>, repo: &str, slot: usize) -> DiskHold {
        let items = [
            Item::Workspace {
                repo: repo.to_owned(),
                slot,
            },
            Item::Caches {
                repo: repo.to_owned(),
            },
        ];
        let now = unix_millis();
        let mut ledger = self.ledger();
        for item in &items {
            ledger.hold(item.clone(), now);
        }
        DiskHold {
            disk: Arc::clone(self),
            items,
        }
    }

    /// Measures a repository's workspace `slot` and caches after a job changed them.
    pub async fn remeasure(&self, repo: &str, slot: usize) {
        let slot_dir = self.worktree_dir.join(repo).join(format!("slot-{slot}"));
        let caches = caches_of(&self.worktree_dir, &self.cache, repo);
        let measured = tokio::task::spawn_blocking(move || {
            (
                measure(&slot_dir),
                caches.iter().map(|dir| measure(dir)).sum::<u64>(),
            )
        })
        .await;
        let Ok((workspace, caches)) = measured else {
            return;
        };
        let now = unix_millis();
        let mut ledger = self.ledger();
        let repo = repo.to_owned();
        ledger.measured(
            Item::Workspace {
                repo: repo.clone(),
                slot,
            },
            workspace,
            now,
        );
        ledger.measured(Item::Caches { repo }, caches, now);
    }

    /// Evicts until the total is within budget, then removes what outlived the TTL.
    /// Returns what was removed.
    pub async fn enforce(&self) -> Vec<Item> {
        let _one_at_a_time = self.enforcing.lock().await;
        let mut plan = self.ledger().evictions(self.budget());
        plan.extend(self.ledger().expired(unix_millis(), self.ttl));
        let mut removed = Vec::new();
        for item in plan {
            if removed.contains(&item) {
                continue;
            }
            match self.evict(&item).await {
                Ok(true) => {
                    tracing::info!(?item, "evicted to stay within the disk budget");
                    self.ledger().forget(&item);
                    removed.push(item);
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(?item, "cannot evict: {error}"),
            }
        }
        removed
    }

    /// Deletes one item unless something uses it after all: a workspace whose lock another
    /// job (or process) holds, caches of a repository that still has a workspace.
    async fn evict(&self, item: &Item) -> std::io::Result<bool> {
        match item {
            Item::Workspace { repo, slot } => {
                let slot_dir = self.worktree_dir.join(repo).join(format!("slot-{slot}"));
                let lock = match std::fs::File::options()
                    .write(true)
                    .open(slot_dir.join(".lock"))
                {
                    Ok(lock) => lock,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(true);
                    }
                    Err(error) => return Err(error),
                };
                if lock.try_lock().is_err() {
                    return Ok(false);
                }
                let held_by_ledger = self
                    .ledger()
                    .entries
                    .get(item)
                    .is_some_and(|entry| entry.holders > 0);
                if held_by_ledger {
                    return Ok(false);
                }
                // Moved aside while locked, so a job taking the slot from now on gets a fresh
                // directory instead of one being deleted under it.
                let trash = self
                    .worktree_dir
                    .join(repo)
                    .join(format!("{EVICTED_PREFIX}{slot}-{}", unix_millis()));
                std::fs::rename(&slot_dir, &trash)?;
                drop(lock);
                tokio::task::spawn_blocking(move || remove_dir_if_exists(&trash))
                    .await
                    .map_err(std::io::Error::other)??;
                Ok(true)
            }
            Item::Caches { repo } => {
                let has_workspace = subdirectories(&self.worktree_dir.join(repo))
                    .iter()
                    .any(|(name, _)| name.starts_with("slot-"));
                if has_workspace {
                    return Ok(false);
                }
                let lock = self.cache.lock(repo).await.map_err(std::io::Error::other)?;
                let dirs = caches_of(&self.worktree_dir, &self.cache, repo);
                tokio::task::spawn_blocking(move || {
                    let result = dirs.iter().try_for_each(|dir| remove_dir_if_exists(dir));
                    drop(lock);
                    result
                })
                .await
                .map_err(std::io::Error::other)??;
                Ok(true)
            }
        }
    }
}

/// Name prefix of a workspace moved aside for deletion.
const EVICTED_PREFIX: &str = ".evicted-slot-";

/// A repository's caches: its bare git cache, cargo home and sccache directory.
fn caches_of(worktree_dir: &Path, cache: &GitCache, repo: &str) -> Vec<PathBuf> {
    let repo_dir = worktree_dir.join(repo);
    vec![
        cache.repo_dir(repo),
        repo_dir.join("cargo-home"),
        repo_dir.join("sccache"),
    ]
}

/// Workspaces an agent moved aside for deletion but did not finish deleting (it died).
fn remove_evicted_leftovers(repo_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(repo_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(EVICTED_PREFIX)
        {
            let _ = remove_dir_if_exists(&entry.path());
        }
    }
}

fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Directories under `dir` with names a repository id may have (never dot-names).
fn subdirectories(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            (!name.starts_with('.')).then(|| (name, entry.path()))
        })
        .collect()
}

fn modified_ms(path: &Path) -> Option<u64> {
    let modified = path.metadata().ok()?.modified().ok()?;
    let since = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn workspace(repo: &str, slot: usize) -> Item {
        Item::Workspace {
            repo: repo.into(),
            slot,
        }
    }

    fn caches(repo: &str) -> Item {
        Item::Caches { repo: repo.into() }
    }

    #[test]
    fn idle_workspaces_go_least_recently_used_first_then_orphaned_caches() {
        let mut ledger = Ledger::default();
        ledger.measured(workspace("a", 0), 40 * MB, 1);
        ledger.measured(workspace("b", 0), 40 * MB, 3);
        ledger.measured(workspace("c", 0), 40 * MB, 2);
        ledger.measured(caches("a"), 10 * MB, 1);
        ledger.measured(caches("b"), 10 * MB, 3);
        assert_eq!(ledger.used(), 140 * MB);
        assert!(ledger.evictions(200 * MB).is_empty());
        assert_eq!(ledger.evictions(100 * MB), [workspace("a", 0)]);
        // Down to 15 MB: all three workspaces, then a's caches (its workspace is gone and
        // it is the least recently used); b's caches are not needed.
        assert_eq!(
            ledger.evictions(15 * MB),
            [
                workspace("a", 0),
                workspace("c", 0),
                workspace("b", 0),
                caches("a")
            ]
        );
    }

    #[test]
    fn what_a_running_job_holds_is_never_evicted() {
        let mut ledger = Ledger::default();
        ledger.measured(workspace("a", 0), 40 * MB, 1);
        ledger.measured(caches("a"), 10 * MB, 1);
        ledger.measured(workspace("b", 0), 40 * MB, 2);
        ledger.hold(workspace("a", 0), 5);
        ledger.hold(caches("a"), 5);
        assert_eq!(ledger.evictions(0), [workspace("b", 0)]);
        ledger.release(&workspace("a", 0), 6);
        ledger.release(&caches("a"), 6);
        assert_eq!(
            ledger.evictions(0),
            [workspace("b", 0), workspace("a", 0), caches("a")]
        );
    }

    #[test]
    fn a_job_that_cannot_fit_beside_running_ones_is_declined() {
        let mut ledger = Ledger::default();
        ledger.measured(workspace("big", 0), 80 * MB, 1);
        ledger.measured(workspace("small", 0), 10 * MB, 1);
        // Nothing runs: everything can be evicted, so every job is admitted.
        assert!(ledger.admit("big", 50 * MB).is_ok());
        ledger.hold(workspace("small", 0), 2);
        let refused = ledger.admit("big", 50 * MB).expect_err("does not fit");
        assert_eq!(
            (refused.held_bytes, refused.needed_bytes),
            (10 * MB, 80 * MB)
        );
        assert!(refused.to_string().contains("disk budget"));
        assert!(ledger.admit("big", 100 * MB).is_ok());
        // An unknown repository is expected to need an average workspace (45 MB).
        assert!(ledger.admit("new", 60 * MB).is_ok());
        assert!(ledger.admit("new", 50 * MB).is_err());
    }

    #[test]
    fn repositories_unused_past_the_ttl_expire_workspaces_first() {
        let mut ledger = Ledger::default();
        let day = 24 * 3600 * 1000;
        ledger.measured(caches("old"), MB, day);
        ledger.measured(workspace("old", 1), MB, day);
        ledger.measured(workspace("recent", 0), MB, 10 * day);
        ledger.measured(workspace("held", 0), MB, day);
        ledger.hold(workspace("held", 0), day);
        let expired = ledger.expired(12 * day, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(expired, [workspace("old", 1), caches("old")]);
    }

    #[tokio::test]
    async fn enforcing_deletes_idle_workspaces_and_orphaned_caches_but_not_held_ones() {
        let root = tempfile::tempdir().expect("temp dir");
        let worktrees = root.path().join("work");
        let cache = GitCache::new(root.path().join("cache"));
        for repo in ["idle", "busy"] {
            let slot = worktrees.join(repo).join("slot-0");
            std::fs::create_dir_all(slot.join("target")).expect("slot");
            std::fs::write(slot.join(".lock"), "").expect("lock");
            std::fs::write(slot.join("target/big"), vec![1u8; 2_000_000]).expect("file");
            std::fs::create_dir_all(cache.repo_dir(repo)).expect("cache");
        }
        let disk = Arc::new(DiskBudget::scan(
            worktrees.clone(),
            cache.clone(),
            Some(MB),
            Duration::from_secs(3600),
        ));
        assert!(disk.usage().used_bytes >= 4 * MB, "{:?}", disk.usage());
        let hold = disk.hold("busy", 0);
        let removed = disk.enforce().await;
        assert_eq!(removed, [workspace("idle", 0), caches("idle")]);
        assert!(!worktrees.join("idle/slot-0").exists());
        assert!(!cache.repo_dir("idle").exists());
        assert!(worktrees.join("busy/slot-0/target/big").exists());
        drop(hold);
        // Its workspace alone brings the total within budget; its caches may stay.
        let removed = disk.enforce().await;
        assert_eq!(removed, [workspace("busy", 0)]);
        assert!(disk.usage().used_bytes < MB);
    }

    #[test]
    fn sizes_count_blocks_and_hard_links_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("sub")).expect("sub");
        std::fs::write(dir.path().join("sub/file"), vec![7u8; 100_000]).expect("file");
        let before = measure(dir.path());
        assert!(before >= 100_000, "{before}");
        std::fs::hard_link(dir.path().join("sub/file"), dir.path().join("link")).expect("link");
        assert_eq!(measure(dir.path()), before);
    }
}
