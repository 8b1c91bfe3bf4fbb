//! One bare cache repository per source repository.
//!
//! Each repository (by its identity, not its URL) has its own cache, so repositories never
//! see each other's objects; fetches are serialised by a file lock, so two agent processes
//! sharing a cache directory are safe too; and fetched snapshots are kept under refs, not
//! just in `FETCH_HEAD`, so the next fetch negotiates from them and transfers only what
//! changed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use buildpool_core::SnapshotPack;
use buildpool_core::git::{
    Git, GitError, has_loose_object, is_object_id, is_plain_ref_component, write_loose_ref,
};

/// How many fetched snapshot refs a cache keeps to negotiate incremental fetches from.
const KEPT_FETCHED_REFS: usize = 32;
/// Deadline for one fetch from a coordinator.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a job waits for another fetch into the same cache.
const LOCK_TIMEOUT: Duration = Duration::from_secs(900);
/// Loose objects in one of the 256 object directories beyond which a fetch lets git's
/// automatic maintenance run: git's own estimate (`gc.auto`, 6700 loose objects in all)
/// over 256. Below it, and with few packs, maintenance has nothing to do, and asking costs
/// a git process per job.
const LOOSE_IN_ONE_DIRECTORY: usize = 6700 / 256;
/// Packs beyond which maintenance repacks (git's `gc.autoPackLimit`).
const PACKS: usize = 50;

/// Deadline for applying a snapshot pack (at most a few hundred KiB).
const APPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// A file in a cache repository while objects are written into it. Found there, it says
/// an earlier fetch or pack did not finish (a cancelled job, a dropped tunnel, a crash) and
/// may have left objects without everything they link to: a non-strict unpack writes a
/// commit before its trees and blobs. No ref names such objects, so `git prune` drops
/// exactly them before anything trusts an object for being there.
const UNFINISHED: &str = "buildpool-unfinished";

/// How the cache came to hold a snapshot's commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obtained {
    /// It was there already.
    Held,
    /// From the pack sent with the job.
    Applied,
    /// Fetched from the coordinator.
    Fetched,
}

/// A snapshot's pack and the base commit it needs.
#[derive(Debug, Clone, Copy)]
pub struct PackOverBase<'a> {
    pub base: &'a str,
    pub pack: &'a SnapshotPack,
}

/// Where and how to fetch a coordinator's snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRemote {
    pub url: String,
    /// Extra environment for git, e.g. the tunnel's proxy command and its settings.
    pub env: GitEnv,
}

impl GitRemote {
    /// A URL git reaches by itself.
    pub fn plain(url: String) -> Self {
        Self {
            url,
            env: GitEnv::default(),
        }
    }
}

/// Environment variables for git. They may hold a credential, so only their names are
/// ever shown.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct GitEnv(pub Vec<(String, String)>);

impl std::fmt::Debug for GitEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("repository id {0:?} is not a safe directory name")]
    BadRepoId(String),
    #[error("snapshot ref {0:?} is not under refs/buildpool/")]
    BadRef(String),
    #[error("commit {0:?} is not an object id")]
    BadCommit(String),
    #[error("fetched {git_ref} but it points at {found}, not the expected {expected}")]
    Mismatch {
        git_ref: String,
        expected: String,
        found: String,
    },
    #[error("timed out waiting for the lock of git cache {0}")]
    LockTimeout(PathBuf),
    #[error("git cache I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Git(#[from] GitError),
}

/// The directory of all bare caches.
#[derive(Debug, Clone)]
pub struct GitCache {
    root: PathBuf,
}

/// A held exclusive lock on one cache repository; released on drop.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

/// Checks that a repository id can be used as a directory name.
pub fn check_repo_id(repo_id: &str) -> Result<(), CacheError> {
    let safe = !repo_id.is_empty()
        && repo_id.len() <= 100
        && !repo_id.starts_with('.')
        && repo_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if safe {
        Ok(())
    } else {
        Err(CacheError::BadRepoId(repo_id.to_owned()))
    }
}

impl GitCache {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The repositories cached here.
    pub fn repo_ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let repo_id = name.strip_suffix(".git")?;
                check_repo_id(repo_id).ok()?;
                Some(repo_id.to_owned())
            })
            .collect()
    }

    /// Path of the bare repository for `repo_id`.
    pub fn repo_dir(&self, repo_id: &str) -> PathBuf {
        self.root.join(format!("{repo_id}.git"))
    }

    /// Takes the exclusive lock of one cache repository, waiting up to a deadline.
    pub async fn lock(&self, repo_id: &str) -> Result<CacheLock, CacheError> {
        check_repo_id(repo_id)?;
        tokio::fs::create_dir_all(&self.root).await?;
        let path = self.root.join(format!("{repo_id}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let deadline = tokio::time::Instant::now() + LOCK_TIMEOUT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(CacheLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(CacheError::LockTimeout(path));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(std::fs::TryLockError::Error(error)) => return Err(error.into()),
            }
        }
    }

    /// Makes sure the cache of `repo_id` holds `commit`: from the snapshot's `pack` when it
    /// came with one and the cache holds its base, else fetching `git_ref` from `remote`.
    ///
    /// The caller must hold the cache's lock.
    pub async fn ensure_commit(
        &self,
        _lock: &CacheLock,
        repo_id: &str,
        remote: &GitRemote,
        git_ref: &str,
        commit: &str,
        pack: Option<PackOverBase<'_>>,
    ) -> Result<Obtained, CacheError> {
        if !is_object_id(commit) {
            return Err(CacheError::BadCommit(commit.to_owned()));
        }
        let leaf = git_ref
            .strip_prefix("refs/buildpool/")
            .filter(|leaf| !leaf.is_empty() && !leaf.split('/').any(|p| p == ".." || p.is_empty()))
            .ok_or_else(|| CacheError::BadRef(git_ref.to_owned()))?;
        let dir = self.repo_dir(repo_id);
        if !dir.join("HEAD").exists() {
            tokio::fs::create_dir_all(&dir).await?;
            Git::new(&dir)
                .args(["init", "--bare", "--quiet"])
                .output()
                .await?;
        }
        drop_unfinished(&dir).await?;
        // A commit the cache holds as a loose object (what small fetches leave) is told by
        // its file. Otherwise the fetch itself finds out: a new commit (the common case, a
        // changed worktree) costs no extra git process, and a packed one it already has
        // transfers nothing.
        if has_loose_object(&dir, commit) {
            return Ok(Obtained::Held);
        }
        let unfinished = dir.join(UNFINISHED);
        std::fs::write(&unfinished, "")?;
        let local_ref = format!("refs/buildpool/fetched/{leaf}");
        if let Some(pack) = pack.filter(|_| is_plain_leaf(leaf)) {
            match apply_pack(&dir, pack, commit, &local_ref).await {
                Ok(true) => {
                    std::fs::remove_file(&unfinished)?;
                    prune_fetched_refs(&dir).await?;
                    return Ok(Obtained::Applied);
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!("applying the snapshot's pack failed, fetching it: {error}");
                }
            }
        }
        let mut fetch = Git::new(&dir);
        for (key, value) in &remote.env.0 {
            fetch = fetch.env(key, value);
        }
        if !maintenance_due(&dir) {
            fetch = fetch.args(["-c", "maintenance.auto=false"]);
        }
        let fetched = fetch
            // Protocol v2 costs git:// fetches a second round trip that meets delayed ACKs
            // (measured: 90 ms against 50 ms per fetch on loopback); v1 does the same work.
            .args(["-c", "protocol.version=1"])
            .args([
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-recurse-submodules",
                "--no-write-fetch-head",
            ])
            .arg(&remote.url)
            .arg(format!("+{git_ref}:{local_ref}"))
            .timeout(FETCH_TIMEOUT)
            .output()
            .await;
        if let Err(error) = fetched {
            // The snapshot's ref may be gone from the coordinator (pruned) while the cache
            // holds its commit packed: that is no reason to fail the job. What the failed
            // fetch left goes first.
            drop_unfinished(&dir).await?;
            if has_commit(&dir, commit).await {
                return Ok(Obtained::Held);
            }
            return Err(error.into());
        }
        std::fs::remove_file(&unfinished)?;
        // The loose ref fetch just wrote answers without another git process; anything else
        // (packed, or not the commit expected) is asked of git, which names what it found.
        let loose = std::fs::read_to_string(dir.join(&local_ref)).unwrap_or_default();
        if loose.trim_end() == commit {
            prune_fetched_refs(&dir).await?;
            return Ok(Obtained::Fetched);
        }
        let found = Git::new(&dir)
            .args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("{local_ref}^{{commit}}"))
            .output()
            .await?;
        if found != commit {
            return Err(CacheError::Mismatch {
                git_ref: git_ref.to_owned(),
                expected: commit.to_owned(),
                found,
            });
        }
        prune_fetched_refs(&dir).await?;
        Ok(Obtained::Fetched)
    }
}

/// Adds `pack` to the bare repository `dir` when it holds the pack's base, and keeps
/// `commit` under `local_ref` as a fetch would. `Ok(false)`: the base is not here.
///
/// `unpack-objects --strict` refuses objects that link to what neither the pack nor the
/// repository has, so the cache stays complete: every object in it came with everything it
/// links to, by a fetch (which checks that) or by a pack applied over a base it held.
async fn apply_pack(
    dir: &Path,
    PackOverBase { base, pack }: PackOverBase<'_>,
    commit: &str,
    local_ref: &str,
) -> Result<bool, CacheError> {
    if !is_object_id(base) || !(has_loose_object(dir, base) || has_commit(dir, base).await) {
        return Ok(false);
    }
    Git::new(dir)
        .args(["unpack-objects", "-q", "--strict"])
        .input(pack.0.to_vec())
        .timeout(APPLY_TIMEOUT)
        .output()
        .await?;
    // Loose, as unpacking writes it; or packed already (an unchanged worktree's snapshot
    // is the same commit), which unpacking skips.
    if !has_loose_object(dir, commit) && !has_commit(dir, commit).await {
        return Err(CacheError::Mismatch {
            git_ref: "the snapshot's pack".to_owned(),
            expected: commit.to_owned(),
            found: "no such commit in it".to_owned(),
        });
    }
    write_fetched_ref(dir, local_ref, commit)?;
    // What a fetch would let git do when loose objects pile up (it runs in the background).
    if maintenance_due(dir) {
        Git::new(dir)
            .args(["maintenance", "run", "--auto", "--quiet"])
            .output()
            .await?;
    }
    Ok(true)
}

/// Prunes what an unfinished fetch or pack left in `dir` (see [`UNFINISHED`]).
async fn drop_unfinished(dir: &Path) -> Result<(), CacheError> {
    let marker = dir.join(UNFINISHED);
    if !marker.exists() {
        return Ok(());
    }
    tracing::info!(
        "a fetch into {} did not finish; pruning what it left",
        dir.display()
    );
    Git::new(dir)
        .args(["prune", "--expire=now"])
        .output()
        .await?;
    std::fs::remove_file(&marker)?;
    Ok(())
}

/// Whether a snapshot ref's leaf (`snapshots/<millis>-<hex>` as clients make them) is a
/// name this cache writes as a file itself; anything else is fetched, and git checks it.
fn is_plain_leaf(leaf: &str) -> bool {
    leaf.split('/').all(is_plain_ref_component)
}

/// Writes the fetched ref `name` as a loose ref, making its directory. A lock file left by
/// a crash is no writer's: the cache lock the caller holds keeps out every other.
fn write_fetched_ref(dir: &Path, name: &str, id: &str) -> std::io::Result<()> {
    if let Some(parent) = dir.join(name).parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(dir.join(format!("{name}.lock")));
    write_loose_ref(dir, name, id)
}

/// Whether git's automatic maintenance of the bare repository `dir` would find work: told
/// as git tells it, by the loose objects in one object directory and the packs.
fn maintenance_due(dir: &Path) -> bool {
    let entries = |sub: &str| {
        std::fs::read_dir(dir.join("objects").join(sub))
            .into_iter()
            .flatten()
            .flatten()
    };
    entries("17").count() > LOOSE_IN_ONE_DIRECTORY
        || entries("pack")
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "pack"))
            .count()
            > PACKS
}

async fn has_commit(dir: &Path, commit: &str) -> bool {
    Git::new(dir)
        .args(["cat-file", "-e"])
        .arg(format!("{commit}^{{commit}}"))
        .succeeds()
        .await
}

/// Loose files under `dir`, at most `limit` + 1 of them counted.
fn count_files(dir: &Path, limit: usize) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut count = 0;
    for entry in entries.flatten() {
        if count > limit {
            break;
        }
        count += match entry.file_type() {
            Ok(kind) if kind.is_dir() => count_files(&entry.path(), limit - count),
            _ => 1,
        };
    }
    count
}

/// Keeps the newest fetched refs so the cache stays bounded but fetches stay incremental.
async fn prune_fetched_refs(dir: &Path) -> Result<(), CacheError> {
    // Within bounds as long as every fetched ref is a loose file and they are few: told
    // by a directory listing, so most fetches run no git for this.
    let fetched = dir.join("refs/buildpool/fetched");
    if !dir.join("packed-refs").exists()
        && count_files(&fetched, KEPT_FETCHED_REFS) <= KEPT_FETCHED_REFS
    {
        return Ok(());
    }
    let refs = Git::new(dir)
        // Snapshot ref names start with their creation time, so names order them by age.
        .args([
            "for-each-ref",
            "--sort=-refname",
            "--format=%(refname)",
            "refs/buildpool/fetched/",
        ])
        .output()
        .await?;
    // Rare and few (the overflow of one fetch), so one `update-ref -d` each is fine.
    for stale in refs.lines().skip(KEPT_FETCHED_REFS) {
        Git::new(dir)
            .args(["update-ref", "-d", stale])
            .output()
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn git(dir: &Path, args: &[&str]) -> String {
        Git::new(dir).args(args).output().await.expect("git runs")
    }

    /// A source repository with one commit under a snapshot ref; returns the commit.
    async fn source_with_snapshot(source: &Path, git_ref: &str) -> String {
        std::fs::create_dir_all(source).expect("dir");
        git(source, &["init", "--quiet"]).await;
        std::fs::write(source.join("file.txt"), "content\n").expect("write");
        git(source, &["add", "file.txt"]).await;
        git(
            source,
            &[
                "-c",
                "user.name=test",
                "-c",
                "user.email=test@localhost",
                "commit",
                "--quiet",
                "-m",
                "first",
            ],
        )
        .await;
        let commit = git(source, &["rev-parse", "HEAD"]).await;
        git(source, &["update-ref", git_ref, &commit]).await;
        commit
    }

    #[tokio::test]
    async fn a_commit_is_fetched_once_and_found_later_loose_or_packed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("source");
        let git_ref = "refs/buildpool/snapshots/1-00000000";
        let commit = source_with_snapshot(&source, git_ref).await;
        let cache = GitCache::new(dir.path().join("cache"));
        let remote = GitRemote::plain(source.display().to_string());
        let gone = GitRemote::plain(dir.path().join("gone").display().to_string());
        let lock = cache.lock("repo").await.expect("lock");
        let ensure = |remote: &GitRemote| {
            let (cache, lock, remote) = (&cache, &lock, remote.clone());
            let commit = commit.clone();
            async move {
                cache
                    .ensure_commit(lock, "repo", &remote, git_ref, &commit, None)
                    .await
                    .map(|obtained| obtained == Obtained::Fetched)
            }
        };

        let missing = ensure(&gone).await;
        assert!(missing.is_err(), "neither held nor fetchable: {missing:?}");
        assert!(
            ensure(&remote).await.expect("fetch"),
            "a new commit is fetched"
        );
        // Held loose: told by its file, without asking the remote (which is gone, or
        // whose ref has moved on: a fetch would find another commit).
        assert!(
            !ensure(&gone).await.expect("held"),
            "no fetch for a held commit"
        );
        let tree = git(&source, &["rev-parse", "HEAD^{tree}"]).await;
        let moved = git(&source, &["commit-tree", &tree, "-m", "moved"]).await;
        git(&source, &["update-ref", git_ref, &moved]).await;
        assert!(
            !ensure(&remote).await.expect("held"),
            "no fetch for a held commit"
        );
        git(&source, &["update-ref", git_ref, &commit]).await;

        // Packed: the fetch finds it has it; with the remote gone, git is asked.
        let cached = cache.repo_dir("repo");
        git(&cached, &["repack", "-a", "-d", "-q"]).await;
        git(&cached, &["prune-packed"]).await;
        assert!(
            !has_loose_object(&cached, &commit),
            "the commit is packed now"
        );
        assert!(ensure(&remote).await.expect("packed, fetchable"));
        assert!(!ensure(&gone).await.expect("packed, remote gone"));
    }

    /// `git pack-objects` in `source`, fed `input` (object names, or revisions with
    /// `--revs`).
    async fn pack_objects(source: &Path, args: &[&str], input: String) -> SnapshotPack {
        let bytes = Git::new(source)
            .args(["pack-objects", "--stdout", "--quiet"])
            .args(args)
            .input(input)
            .output_bytes(1 << 20)
            .await
            .expect("pack-objects");
        SnapshotPack(bytes.into())
    }

    #[tokio::test]
    async fn a_snapshot_pack_is_applied_over_a_held_base_and_anything_else_is_fetched() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("source");
        let base_ref = "refs/buildpool/snapshots/1-00000000";
        let base = source_with_snapshot(&source, base_ref).await;
        let cache = GitCache::new(dir.path().join("cache"));
        let remote = GitRemote::plain(source.display().to_string());
        let gone = GitRemote::plain(dir.path().join("gone").display().to_string());
        let lock = cache.lock("repo").await.expect("lock");
        let cached = cache.repo_dir("repo");

        // A snapshot over the base: one changed file, one new directory.
        let git_ref = "refs/buildpool/snapshots/2-00000000";
        std::fs::write(source.join("file.txt"), "changed\n").expect("write");
        std::fs::create_dir_all(source.join("src")).expect("dir");
        std::fs::write(source.join("src/lib.rs"), "pub fn f() {}\n").expect("write");
        git(&source, &["add", "-A"]).await;
        let tree = git(&source, &["write-tree"]).await;
        let commit = git(&source, &["commit-tree", &tree, "-p", &base, "-m", "snap"]).await;
        git(&source, &["update-ref", git_ref, &commit]).await;
        let thin = pack_objects(
            &source,
            &["--revs", "--thin"],
            format!("{commit}\n^{base}\n"),
        )
        .await;
        // Only the commit: its tree and the new blobs are missing.
        let incomplete = pack_objects(&source, &[], format!("{commit}\n")).await;
        let torn = SnapshotPack(thin.0.slice(..thin.0.len() / 2));
        let over = |pack| PackOverBase { base: &base, pack };
        let ensure = async |remote: &GitRemote, pack: Option<PackOverBase<'_>>| {
            cache
                .ensure_commit(&lock, "repo", remote, git_ref, &commit, pack)
                .await
        };

        // The cache lacks the base: the pack is no use, and the fetch is what fails.
        let without_base = ensure(&gone, Some(over(&thin))).await;
        assert!(without_base.is_err(), "{without_base:?}");
        cache
            .ensure_commit(&lock, "repo", &remote, base_ref, &base, None)
            .await
            .expect("the base is fetched");

        // A pack that does not complete the snapshot is refused, not half taken.
        for bad in [&incomplete, &torn] {
            let refused = ensure(&gone, Some(over(bad))).await;
            assert!(refused.is_err(), "{refused:?}");
            assert!(!has_loose_object(&cached, &commit));
        }

        // An unfinished fetch left the snapshot's commit without its tree (a plain unpack
        // writes commits first). Its marker makes the next job drop that, not trust it.
        Git::new(&cached)
            .args(["unpack-objects", "-q"])
            .input(incomplete.0.to_vec())
            .output()
            .await
            .expect("a partial unpack");
        assert!(has_loose_object(&cached, &commit));
        std::fs::write(cached.join(UNFINISHED), "").expect("marker");

        // Over the base it holds, the cache takes the pack and asks no remote.
        assert_eq!(
            ensure(&gone, Some(over(&thin))).await.expect("applied"),
            Obtained::Applied
        );
        let kept = git(
            &cached,
            &["rev-parse", "refs/buildpool/fetched/snapshots/2-00000000"],
        )
        .await;
        assert_eq!(kept, commit, "kept under a ref, as a fetch keeps it");
        git(&cached, &["fsck", "--connectivity-only", "--no-dangling"]).await;
        let listed = git(&cached, &["ls-tree", "-r", "--name-only", &commit]).await;
        assert_eq!(listed, "file.txt\nsrc/lib.rs");
        assert_eq!(
            ensure(&gone, Some(over(&thin))).await.expect("held"),
            Obtained::Held
        );
    }

    #[test]
    fn maintenance_is_due_when_loose_objects_or_packs_pile_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        let objects = dir.path().join("objects");
        std::fs::create_dir_all(objects.join("17")).expect("dir");
        std::fs::create_dir_all(objects.join("pack")).expect("dir");
        assert!(!maintenance_due(dir.path()));
        for n in 0..=LOOSE_IN_ONE_DIRECTORY {
            std::fs::write(objects.join("17").join(format!("{n:038}")), "").expect("object");
        }
        assert!(maintenance_due(dir.path()), "loose objects");
        std::fs::remove_dir_all(objects.join("17")).expect("rm");
        for n in 0..=PACKS {
            std::fs::write(objects.join("pack").join(format!("pack-{n}.pack")), "").expect("pack");
            std::fs::write(objects.join("pack").join(format!("pack-{n}.idx")), "").expect("idx");
        }
        assert!(maintenance_due(dir.path()), "packs");
    }

    #[tokio::test]
    async fn fetched_refs_beyond_the_bound_are_pruned_oldest_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = dir.path().join("cache.git");
        std::fs::create_dir_all(&repo).expect("dir");
        git(&repo, &["init", "--bare", "--quiet"]).await;
        let empty_tree = Git::new(&repo)
            .env("GIT_INDEX_FILE", dir.path().join("index"))
            .arg("write-tree")
            .output()
            .await
            .expect("write-tree");
        let name = |n: usize| format!("refs/buildpool/fetched/snapshots/{n:04}-00000000");
        for n in 0..KEPT_FETCHED_REFS {
            git(&repo, &["update-ref", &name(n), &empty_tree]).await;
        }
        let listed = || {
            git(
                &repo,
                &["for-each-ref", "--format=%(refname)", "refs/buildpool/"],
            )
        };
        prune_fetched_refs(&repo).await.expect("prune");
        assert_eq!(listed().await.lines().count(), KEPT_FETCHED_REFS);
        for n in KEPT_FETCHED_REFS..KEPT_FETCHED_REFS + 3 {
            git(&repo, &["update-ref", &name(n), &empty_tree]).await;
        }
        prune_fetched_refs(&repo).await.expect("prune");
        let kept = listed().await;
        assert_eq!(kept.lines().count(), KEPT_FETCHED_REFS);
        assert!(
            !kept.contains(&name(2)) && kept.contains(&name(3)),
            "{kept}"
        );
    }
}
