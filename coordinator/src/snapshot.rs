//! Turning a worktree's current state into a commit, without touching it.
//!
//! Committing the worktree for real (`git commit -am`) would run hooks, miss untracked files
//! and change the user's history. Instead the worktree (committed, staged, unstaged and
//! untracked-but-not-ignored files) is added to a temporary index, written as a tree and a
//! parentless-or-HEAD-parented commit object, and stored under a hidden ref the git daemon
//! serves. HEAD, the index, branches and the stash are never written, and no hook runs.
//!
//! Worktrees of coding agents hold big, growing, untracked state (orchestrator logs, run
//! logs). Hashing and storing that on every job would cost seconds and disk, so untracked
//! files over [`MAX_UNTRACKED_BYTES`] and paths matching `.buildpoolignore` stay out, and the
//! caller is told which files were skipped and how to include them.

use std::path::Path;
use std::time::Duration;

use buildpool_core::SnapshotPack;
use buildpool_core::git::{Git, GitError, is_plain_ref_component};
use buildpool_core::time::unix_millis;

use crate::repo::Repo;

pub const SNAPSHOT_REF_PREFIX: &str = "refs/buildpool/snapshots/";
/// The author and committer date of every snapshot commit.
const FIXED_DATE: &str = "2000-01-01T00:00:00Z";
/// Snapshot refs kept at most; older ones are pruned when a new one is made.
const KEPT_SNAPSHOTS: usize = 200;
/// Snapshots older than this are pruned even below the count limit.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Untracked files larger than this stay out of snapshots. Tracked files, and files marked
/// with `git add -N`, are never skipped.
pub const MAX_UNTRACKED_BYTES: u64 = 16 * 1024 * 1024;
/// Gitignore-style patterns of untracked paths that stay out of snapshots (but not out of
/// git, as `.gitignore` would).
pub const IGNORE_FILE: &str = ".buildpoolignore";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub commit: String,
    pub git_ref: String,
    /// The snapshot's parent: the worktree's `HEAD`, `None` before the first commit.
    pub base_commit: Option<String>,
    /// Untracked files left out for their size.
    pub skipped: Vec<SkippedFile>,
}

/// An untracked file a snapshot left out for its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFile {
    /// Relative to the worktree.
    pub path: String,
    pub bytes: u64,
}

impl Snapshot {
    /// One line naming what was left out and how to include it; `None` if nothing was.
    pub fn skipped_note(&self) -> Option<String> {
        let (first, rest) = self.skipped.split_first()?;
        let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let more = if rest.is_empty() {
            String::new()
        } else {
            format!(" and {} more", rest.len())
        };
        Some(format!(
            "not in the snapshot: untracked {} ({:.0} MB){more}, over the {:.0} MB limit for \
             untracked files; `git add -N <path>` includes a file, {IGNORE_FILE} silences this",
            first.path,
            mb(first.bytes),
            mb(MAX_UNTRACKED_BYTES)
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Git(#[from] GitError),
}

/// The lockfile at the top of the worktree; see [`create`].
const LOCKFILE: &str = "Cargo.lock";

/// Snapshots the worktree at `repo.worktree`.
pub async fn create(repo: &Repo) -> Result<Snapshot, SnapshotError> {
    create_limited(repo, MAX_UNTRACKED_BYTES).await
}

/// [`create`] with another size limit for untracked files.
async fn create_limited(repo: &Repo, max_untracked: u64) -> Result<Snapshot, SnapshotError> {
    let state_dir = repo.state_dir();
    tokio::fs::create_dir_all(&state_dir).await?;
    // Same filesystem as the real index, so the copy is cheap; removed on drop.
    let temporary = tempfile::Builder::new()
        .prefix("snapshot-index-")
        .tempfile_in(&state_dir)?;
    let index = temporary.path().to_owned();
    // Tracked files as they are now (modified, deleted, staged), into a copy of the real
    // index: its stat cache spares unchanged files a re-hash. A missing index (fresh
    // repository) just means starting empty.
    let stage_tracked = async |real_index: &Path| {
        if tokio::fs::copy(real_index, &index).await.is_err() {
            tokio::fs::remove_file(&index).await.ok();
        }
        repo.git()
            .env("GIT_INDEX_FILE", &index)
            // The whole worktree (git runs at its top); no pathspec, which would be an
            // error when nothing is tracked yet.
            .args(["add", "--update"])
            .output()
            .await
    };
    // The reads of the repository as it is, at once (each git call costs a process), and
    // the staging too when discovery named the index.
    let staged = async {
        match &repo.index_file {
            Some(real_index) => stage_tracked(real_index).await.map(Some),
            None => Ok(None),
        }
    };
    let parent = repo
        .git()
        .args(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])
        .output();
    let has_lockfile = repo.worktree.join(LOCKFILE).is_file();
    let lockfile_tracked = async {
        if !has_lockfile {
            return Ok(String::new());
        }
        repo.git()
            .args(["ls-files", "--cached", "--", LOCKFILE])
            .output()
            .await
    };
    let (staged, parent, untracked, lockfile_tracked) =
        tokio::join!(staged, parent, list_untracked(repo), lockfile_tracked);
    let (parent, untracked) = (parent.ok(), untracked?);
    let lockfile_tracked = !lockfile_tracked?.is_empty();
    if staged?.is_none() {
        let real_index = repo
            .git()
            .args(["rev-parse", "--path-format=absolute", "--git-path", "index"])
            .output()
            .await?;
        stage_tracked(Path::new(&real_index)).await?;
    }
    let (mut added, skipped) = sort_untracked(repo, &untracked, max_untracked);
    // Library repositories often ignore Cargo.lock, but the developer's lockfile is what
    // their local builds use: without it the agent would resolve other dependency versions
    // (and spend time doing so). So it travels with the snapshot, ignored or not. (A
    // tracked one is in already: `add --update` took its changes; an untracked one that is
    // not ignored is among the untracked files.)
    if has_lockfile && !lockfile_tracked && !added.contains(&LOCKFILE) {
        added.push(LOCKFILE);
    }
    add_paths(repo, &index, &state_dir, &added).await?;
    let tree = repo
        .git()
        .env("GIT_INDEX_FILE", &index)
        .arg("write-tree")
        .output()
        .await?;
    let message = format!("buildpool snapshot of {}", repo.worktree.display());
    // A fixed date makes the commit a function of the content: an unchanged worktree gives
    // the same commit, which an agent that built it before already has (no fetch at all).
    let mut commit_tree = repo
        .git()
        .env("GIT_AUTHOR_DATE", FIXED_DATE)
        .env("GIT_COMMITTER_DATE", FIXED_DATE)
        // Never signed, whatever `commit.gpgSign` says: a snapshot is no commit of the
        // developer's, and signing would cost every job a gpg run, or a prompt.
        .args(["commit-tree", "--no-gpg-sign", &tree, "-m", &message]);
    if let Some(parent) = &parent {
        commit_tree = commit_tree.args(["-p", parent]);
    }
    let commit = commit_tree.output().await?;
    let git_ref = new_ref_name();
    // Pruning at the same time: it keeps the newest refs and the one being created is the
    // newest, so the two never meet.
    let pruned = async {
        let common_dir = repo.common_dir.clone();
        let needed = tokio::task::spawn_blocking(move || prune_needed(&common_dir))
            .await
            .unwrap_or(true);
        if needed {
            prune(&repo.common_dir).await
        } else {
            Ok(0)
        }
    };
    let (created, pruned) = tokio::join!(create_ref(repo, &git_ref, &commit), pruned);
    created?;
    drop(temporary);
    if let Err(error) = pruned {
        tracing::warn!("pruning old snapshot refs failed: {error}");
    }
    Ok(Snapshot {
        commit,
        git_ref,
        base_commit: parent,
        skipped,
    })
}

/// A new snapshot ref's name: its creation time (what pruning reads) and a random part.
fn new_ref_name() -> String {
    format!(
        "{SNAPSHOT_REF_PREFIX}{}-{:08x}",
        unix_millis(),
        fastrand::u32(..)
    )
}

/// Another snapshot ref at the commit of a snapshot taken before; returns its name. Every
/// job holds a ref of its own, deleted when the job ends, so jobs on one snapshot (the
/// parts of a spread test run) need one each.
pub async fn another_ref(repo: &Repo, commit: &str) -> Result<String, GitError> {
    let git_ref = new_ref_name();
    create_ref(repo, &git_ref, commit).await?;
    Ok(git_ref)
}

/// Creates the new snapshot ref `git_ref` at `commit`.
///
/// In the files ref storage a plain, new name is written as git writes a loose ref (a
/// `.lock` file renamed into place, no reflog), which spares the snapshot a git process.
/// Whatever that cannot do (another ref storage, no snapshot ref directory yet, a failed
/// write) goes to `git update-ref`, which says what is wrong. The directory is left to git
/// to make, with the permissions a shared repository asks for.
async fn create_ref(repo: &Repo, git_ref: &str, commit: &str) -> Result<(), GitError> {
    let common_dir = repo.common_dir.clone();
    let (name, id) = (git_ref.to_owned(), commit.to_owned());
    let written = tokio::task::spawn_blocking(move || write_loose_ref(&common_dir, &name, &id))
        .await
        .is_ok_and(|written| written.is_ok());
    if written {
        return Ok(());
    }
    repo.git()
        .args(["update-ref", git_ref, commit])
        .output()
        .await
        .map(drop)
}

fn write_loose_ref(common_dir: &Path, git_ref: &str, commit: &str) -> std::io::Result<()> {
    if !is_plain_snapshot_ref(git_ref) || common_dir.join("reftable").exists() {
        return Err(std::io::ErrorKind::Unsupported.into());
    }
    // Exclusive, as git takes a ref's lock: a name is never written by two at once.
    buildpool_core::git::write_loose_ref(common_dir, git_ref, commit)
}

/// Whether [`prune`] has anything to do. Told without git from the loose snapshot refs
/// (their names carry their creation time) unless `packed-refs` holds snapshot refs or the
/// refs are stored otherwise: then git is asked.
fn prune_needed(common_dir: &Path) -> bool {
    if common_dir.join("reftable").exists() {
        return true;
    }
    match std::fs::read_to_string(common_dir.join("packed-refs")) {
        Ok(packed) if packed.contains(SNAPSHOT_REF_PREFIX) => return true,
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return true,
    }
    let Ok(entries) = std::fs::read_dir(common_dir.join(SNAPSHOT_REF_PREFIX)) else {
        return false;
    };
    let oldest_kept = unix_millis().saturating_sub(buildpool_core::time::millis(SNAPSHOT_MAX_AGE));
    let mut count = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(leaf) = name.to_str().filter(|leaf| is_plain_ref_component(leaf)) else {
            // Not a ref git lists (a lock file, say): nothing for the prune to remove.
            continue;
        };
        count += 1;
        let created = leaf
            .split('-')
            .next()
            .and_then(|millis| millis.parse::<u64>().ok());
        // A ref past its age, or whose name tells none, is git's to list and prune.
        if count > KEPT_SNAPSHOTS || created.is_none_or(|created| created < oldest_kept) {
            return true;
        }
    }
    false
}

/// The untracked files that are not ignored (by git's rules or `.buildpoolignore`), as
/// `git ls-files -z` lists them.
async fn list_untracked(repo: &Repo) -> Result<String, GitError> {
    let mut listing = repo
        .git()
        .args(["ls-files", "-z", "--others", "--exclude-standard"]);
    let ignore_file = repo.worktree.join(IGNORE_FILE);
    if ignore_file.is_file() {
        listing = listing.arg(format!("--exclude-from={}", ignore_file.display()));
    }
    listing.output().await
}

/// Splits a listing of untracked files into those to add and those over `max_bytes`
/// (largest first).
fn sort_untracked<'a>(
    repo: &Repo,
    listing: &'a str,
    max_bytes: u64,
) -> (Vec<&'a str>, Vec<SkippedFile>) {
    let mut included = Vec::new();
    let mut skipped = Vec::new();
    for path in listing.split('\0').filter(|path| !path.is_empty()) {
        if path.contains(char::REPLACEMENT_CHARACTER) {
            // Not UTF-8: the name cannot be handed back to git as read, so leave it out
            // rather than fail the whole snapshot.
            tracing::warn!("not in the snapshot: untracked file with a non-UTF-8 name: {path}");
            continue;
        }
        let bytes = std::fs::symlink_metadata(repo.worktree.join(path)).map_or(0, |m| m.len());
        if bytes > max_bytes {
            skipped.push(SkippedFile {
                path: path.to_owned(),
                bytes,
            });
        } else {
            included.push(path);
        }
    }
    skipped.sort_by_key(|file| std::cmp::Reverse(file.bytes));
    (included, skipped)
}

/// Adds `paths` to the snapshot index in one git call. `--force`, because the lockfile may
/// be ignored; every other path is untracked and not ignored already.
async fn add_paths(
    repo: &Repo,
    index: &Path,
    state_dir: &Path,
    paths: &[&str],
) -> Result<(), SnapshotError> {
    if paths.is_empty() {
        return Ok(());
    }
    let pathspecs = tempfile::Builder::new()
        .prefix("snapshot-paths-")
        .tempfile_in(state_dir)?;
    std::fs::write(pathspecs.path(), paths.join("\0"))?;
    repo.git()
        .env("GIT_INDEX_FILE", index)
        .env("GIT_LITERAL_PATHSPECS", "1")
        .args(["add", "--force"])
        .arg(format!(
            "--pathspec-from-file={}",
            pathspecs.path().display()
        ))
        .arg("--pathspec-file-nul")
        .output()
        .await?;
    Ok(())
}

/// Deletes snapshot refs (names outside [`SNAPSHOT_REF_PREFIX`] are left alone); refs
/// already gone are no error.
///
/// A plain loose ref that is not also packed is deleted by removing its file, as git does
/// once it holds the ref's lock. Git itself would create and remove a lock file per ref and
/// lock `packed-refs`: at thousands of jobs a second that was nearly half the coordinator's
/// CPU (an inode allocation per ref, slow on ext4 without a journal). Nothing writes a
/// snapshot ref again after its client created it, so there is no update to lose; the one
/// race, `git pack-refs` packing a ref between our look at `packed-refs` and the removal,
/// leaves that ref packed for [`prune`] to delete later. Everything else (packed refs,
/// another ref storage) goes to git in one call; should that batch fail as a whole (one
/// name git refuses), each ref is deleted on its own.
pub async fn delete_all(common_dir: &Path, git_refs: &[String]) -> Result<(), GitError> {
    let snapshot_refs: Vec<String> = git_refs
        .iter()
        .filter(|name| name.starts_with(SNAPSHOT_REF_PREFIX))
        .cloned()
        .collect();
    if snapshot_refs.is_empty() {
        return Ok(());
    }
    let dir = common_dir.to_owned();
    let all = snapshot_refs.clone();
    let left = tokio::task::spawn_blocking(move || remove_loose_refs(&dir, all))
        .await
        .unwrap_or(snapshot_refs);
    delete_with_git(common_dir, &left).await
}

/// Removes the files of the plain loose refs among `git_refs` that `packed-refs` does not
/// also hold; returns the refs left for git.
fn remove_loose_refs(common_dir: &Path, git_refs: Vec<String>) -> Vec<String> {
    let packed = match std::fs::read_to_string(common_dir.join("packed-refs")) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        // Cannot tell what is packed: git decides.
        Err(_) => return git_refs,
    };
    let packed: std::collections::HashSet<&str> = packed
        .lines()
        .filter_map(|line| line.split_once(' ').map(|(_, name)| name))
        .collect();
    // Reflogs of snapshot refs exist only where `core.logAllRefUpdates=always` made them,
    // and then under this directory; every ref here was created (with its reflog) before
    // this look, so where it is missing there is no reflog to remove, and no failing
    // removal per ref.
    let reflogs = common_dir.join("logs").join(SNAPSHOT_REF_PREFIX);
    let reflogs = reflogs.is_dir().then(|| common_dir.join("logs"));
    git_refs
        .into_iter()
        .filter(|name| {
            if packed.contains(name.as_str()) || !is_plain_snapshot_ref(name) {
                return true;
            }
            match std::fs::remove_file(common_dir.join(name)) {
                Ok(()) => {
                    if let Some(reflogs) = &reflogs {
                        let _ = std::fs::remove_file(reflogs.join(name));
                    }
                    false
                }
                // Not a loose ref (already gone, or another ref storage): git decides.
                Err(_) => true,
            }
        })
        .collect()
}

/// Deletes refs with git, in one call when it accepts them all, else one by one.
async fn delete_with_git(common_dir: &Path, git_refs: &[String]) -> Result<(), GitError> {
    if git_refs.is_empty() {
        return Ok(());
    }
    let commands: String = git_refs
        .iter()
        .map(|name| format!("delete {name}\n"))
        .collect();
    let batch = Git::new(common_dir)
        .args(["update-ref", "--stdin"])
        .input(commands)
        .output()
        .await;
    if batch.is_ok() || git_refs.len() == 1 {
        return batch.map(drop);
    }
    let mut first_error = None;
    for name in git_refs {
        let deleted = Git::new(common_dir)
            .args(["update-ref", "-d", name])
            .output()
            .await;
        if let Err(error) = deleted {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Whether a snapshot ref has the plain `<prefix><leaf>` form clients make, so its loose
/// file lies at `<common dir>/<name>` (no `..`, no nested directories, no lock).
fn is_plain_snapshot_ref(git_ref: &str) -> bool {
    git_ref
        .strip_prefix(SNAPSHOT_REF_PREFIX)
        .is_some_and(is_plain_ref_component)
}

/// The object id a snapshot ref holds, read from its loose ref file without running git.
///
/// `None` whenever that is not the whole answer: a name outside the plain
/// `<prefix><leaf>` form clients make, a packed or symbolic ref, another ref storage. The
/// caller then asks git. (A loose ref, when present, is what git reads first too.)
///
/// A plain read, not a trip to the blocking pool: the file is 41 bytes the client just
/// wrote, in the page cache, and the trip (two thread wake-ups) cost more than the read at
/// thousands of submissions a second.
pub fn loose_ref_target(common_dir: &Path, git_ref: &str) -> Option<String> {
    use std::io::Read;
    if !is_plain_snapshot_ref(git_ref) {
        return None;
    }
    // An object id (SHA-256 at most), its newline, and one byte more to tell a longer file.
    let mut text = [0u8; 66];
    let mut file = std::fs::File::open(common_dir.join(git_ref)).ok()?;
    let mut length = 0;
    while length < text.len() {
        match file.read(&mut text[length..]) {
            Ok(0) => break,
            Ok(read) => length += read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let id = std::str::from_utf8(&text[..length]).ok()?.trim_end();
    buildpool_core::git::is_object_id(id).then(|| id.to_owned())
}

/// Whether `id` is a commit stored as a loose object in `common_dir`, told by the object
/// file's header (`commit <size>`) without running git. `false` says nothing: the object
/// may be packed, or not a commit.
pub fn is_loose_commit(common_dir: &Path, id: &str) -> bool {
    use std::io::Read;
    thread_local! {
        /// Reset for each object: a new inflater allocates and clears tens of KiB, which
        /// showed in the coordinator's profile once per submission.
        static INFLATER: std::cell::RefCell<flate2::Decompress> =
            std::cell::RefCell::new(flate2::Decompress::new(true));
    }
    let Some(Ok(mut file)) =
        buildpool_core::git::loose_object_path(common_dir, id).map(std::fs::File::open)
    else {
        return false;
    };
    // The header comes out of the zlib stream's first bytes, or after a block's code
    // tables (a few hundred bytes at most): read until it does.
    let mut header = [0u8; 7];
    INFLATER.with_borrow_mut(|inflater| {
        inflater.reset(true);
        let mut compressed = [0u8; 512];
        while inflater.total_out() < header.len() as u64 {
            let Ok(read @ 1..) = file.read(&mut compressed) else {
                return false;
            };
            let mut input = &compressed[..read];
            while !input.is_empty() && inflater.total_out() < header.len() as u64 {
                let (before_in, before_out) = (inflater.total_in(), inflater.total_out());
                let out = &mut header[before_out as usize..];
                if inflater
                    .decompress(input, out, flate2::FlushDecompress::None)
                    .is_err()
                {
                    return false;
                }
                let consumed = (inflater.total_in() - before_in) as usize;
                if consumed == 0 && inflater.total_out() == before_out {
                    // Needs more input than this chunk's rest: read on.
                    break;
                }
                input = &input[consumed..];
            }
        }
        &header == b"commit "
    })
}

/// The largest snapshot pack sent along with a job; a bigger change is fetched.
pub const MAX_PACK_BYTES: usize = 256 * 1024;
/// How long a submission waits for its snapshot's pack. A one-line change takes a few
/// ms; a big one (git compresses all of it before writing the first byte) is fetched
/// instead, and this bounds what the attempt costs the snapshot's first job.
const PACK_TIMEOUT: Duration = Duration::from_millis(500);

/// The objects `commit` has beyond `base`, as a thin pack for an agent that holds `base`
/// (see [`SnapshotPack`]); an error when git cannot make it or it exceeds
/// [`MAX_PACK_BYTES`] or [`PACK_TIMEOUT`]. One `pack-objects`, as `upload-pack` would run
/// for a fetch.
pub async fn pack(common_dir: &Path, commit: &str, base: &str) -> Result<SnapshotPack, GitError> {
    Git::new(common_dir)
        .args([
            "pack-objects",
            "--revs",
            "--thin",
            "--stdout",
            "--quiet",
            "--delta-base-offset",
        ])
        .input(format!("{commit}\n^{base}\n"))
        .timeout(PACK_TIMEOUT)
        .output_bytes(MAX_PACK_BYTES)
        .await
        .map(|bytes| SnapshotPack(bytes.into()))
}

/// Keeps the snapshot refs bounded: the newest `KEPT_SNAPSHOTS`, none older than a day.
/// Ref names start with their creation time in milliseconds, so names order them by age.
pub async fn prune(common_dir: &Path) -> Result<usize, GitError> {
    let listing = Git::new(common_dir)
        .args([
            "for-each-ref",
            "--sort=-refname",
            "--format=%(refname)",
            SNAPSHOT_REF_PREFIX,
        ])
        .output()
        .await?;
    let now = unix_millis();
    let expired: Vec<String> = listing
        .lines()
        .enumerate()
        .filter(|(index, name)| {
            let created = name
                .strip_prefix(SNAPSHOT_REF_PREFIX)
                .and_then(|leaf| leaf.split('-').next())
                .and_then(|millis| millis.parse::<u64>().ok())
                .unwrap_or(0);
            let age = now.saturating_sub(created);
            *index >= KEPT_SNAPSHOTS || age > buildpool_core::time::millis(SNAPSHOT_MAX_AGE)
        })
        .map(|(_, name)| name.to_owned())
        .collect();
    delete_all(common_dir, &expired).await?;
    Ok(expired.len())
}

/// Counts snapshot refs.
#[cfg(test)]
async fn count(repo_dir: &Path) -> Result<usize, GitError> {
    let listing = Git::new(repo_dir)
        .args(["for-each-ref", "--format=%(refname)", SNAPSHOT_REF_PREFIX])
        .output()
        .await?;
    Ok(listing.lines().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn git(dir: &Path, args: &[&str]) -> String {
        Git::new(dir).args(args).output().await.expect("git runs")
    }

    async fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp");
        let root = dir.path();
        git(root, &["init", "--quiet", "-b", "main"]).await;
        std::fs::write(root.join(".gitignore"), "ignored.txt\n").expect("write");
        std::fs::write(root.join("tracked.txt"), "v1\n").expect("write");
        git(root, &["add", "."]).await;
        git(root, &["commit", "--quiet", "-m", "init"]).await;
        // A hook that would leave a trace if anything ran it.
        let hook = root.join(".git/hooks/pre-commit");
        std::fs::write(&hook, "#!/bin/sh\ntouch \"$GIT_DIR/../hook-ran\"\nexit 1\n").expect("hook");
        let mut mode = std::fs::metadata(&hook).expect("meta").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut mode, 0o755);
        std::fs::set_permissions(&hook, mode).expect("chmod");
        dir
    }

    #[tokio::test]
    async fn a_snapshot_is_never_signed_whatever_the_repository_asks() {
        let dir = fixture().await;
        let root = dir.path();
        git(root, &["config", "commit.gpgSign", "true"]).await;
        // A signer that always fails: a snapshot that tried to sign would fail with it.
        git(root, &["config", "gpg.program", "false"]).await;
        std::fs::write(root.join("tracked.txt"), "v2\n").expect("write");
        let repo = Repo::discover(root).await.expect("repo");
        let snapshot = create(&repo).await.expect("snapshot");
        let commit = git(root, &["cat-file", "commit", &snapshot.commit]).await;
        assert!(!commit.contains("gpgsig"), "{commit}");
    }

    #[tokio::test]
    async fn a_snapshot_packs_what_it_adds_to_its_base_within_a_size_limit() {
        let dir = fixture().await;
        let root = dir.path();
        let common_dir = root.join(".git");
        let repo = Repo::discover(root).await.expect("repo");
        let base = git(root, &["rev-parse", "HEAD"]).await;
        std::fs::write(root.join("tracked.txt"), "v2\n").expect("write");
        let small = create(&repo).await.expect("snapshot");
        let small_pack = pack(&common_dir, &small.commit, &base).await.expect("pack");
        // What it holds: exactly the snapshot's commit, its tree and the changed file.
        let listing = tempfile::tempdir().expect("temp");
        let pack_file = listing.path().join("snapshot.pack");
        std::fs::write(&pack_file, &small_pack.0).expect("write");
        let index = git(listing.path(), &["index-pack", "snapshot.pack"]).await;
        assert!(!index.is_empty());
        let objects = git(listing.path(), &["verify-pack", "-v", "snapshot.idx"]).await;
        let kinds: Vec<&str> = objects
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter(|kind| ["commit", "tree", "blob"].contains(kind))
            .collect();
        assert_eq!(kinds.len(), 3, "{objects}");
        assert!(objects.contains(&small.commit), "{objects}");

        // A change too big to send is fetched instead, and git is stopped early.
        // Incompressible: xorshift64.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let noise: Vec<u8> = (0..MAX_PACK_BYTES * 2)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        std::fs::write(root.join("noise.bin"), noise).expect("write");
        let big = create(&repo).await.expect("snapshot");
        let too_large = pack(&common_dir, &big.commit, &base).await;
        // Over the size, or (on a machine slowed by other tests) over the time allowed.
        assert!(
            matches!(
                too_large,
                Err(GitError::TooLarge { .. } | GitError::TimedOut { .. })
            ),
            "{too_large:?}"
        );
        let unknown_base = pack(&common_dir, &small.commit, &"1".repeat(40)).await;
        assert!(unknown_base.is_err(), "{unknown_base:?}");
    }

    #[tokio::test]
    async fn captures_uncommitted_and_untracked_but_not_ignored_files_and_touches_nothing() {
        let dir = fixture().await;
        let root = dir.path();
        std::fs::write(root.join("tracked.txt"), "v2 uncommitted\n").expect("write");
        std::fs::write(root.join("staged.txt"), "staged\n").expect("write");
        git(root, &["add", "staged.txt"]).await;
        std::fs::write(root.join("untracked.txt"), "new\n").expect("write");
        std::fs::write(root.join("ignored.txt"), "secret\n").expect("write");
        let head = git(root, &["rev-parse", "HEAD"]).await;
        let status = git(root, &["status", "--porcelain"]).await;
        let index = std::fs::read(root.join(".git/index")).expect("index");

        let repo = Repo::discover(root).await.expect("repo");
        let snapshot = create(&repo).await.expect("snapshot");

        let show = |path: &str| format!("{}:{path}", snapshot.commit);
        assert_eq!(
            git(root, &["show", &show("tracked.txt")]).await,
            "v2 uncommitted"
        );
        assert_eq!(git(root, &["show", &show("staged.txt")]).await, "staged");
        assert_eq!(git(root, &["show", &show("untracked.txt")]).await, "new");
        assert!(
            Git::new(root)
                .args(["show", &show("ignored.txt")])
                .output()
                .await
                .is_err()
        );
        assert_eq!(
            git(root, &["rev-parse", &format!("{}^", snapshot.commit)]).await,
            head
        );
        assert_eq!(
            git(root, &["rev-parse", &snapshot.git_ref]).await,
            snapshot.commit
        );

        assert_eq!(git(root, &["rev-parse", "HEAD"]).await, head, "HEAD moved");
        assert_eq!(
            git(root, &["status", "--porcelain"]).await,
            status,
            "worktree state changed"
        );
        assert_eq!(
            std::fs::read(root.join(".git/index")).expect("index"),
            index,
            "index written"
        );
        assert_eq!(git(root, &["stash", "list"]).await, "");
        assert!(!root.join("hook-ran").exists(), "a hook ran");
    }

    #[tokio::test]
    async fn big_untracked_files_and_buildpoolignored_paths_stay_out() {
        let dir = fixture().await;
        let root = dir.path();
        std::fs::write(root.join("small.log"), vec![b'x'; 100]).expect("write");
        std::fs::write(root.join("huge.log"), vec![b'x'; 5000]).expect("write");
        std::fs::write(root.join("wanted.bin"), vec![b'y'; 5000]).expect("write");
        git(root, &["add", "-N", "wanted.bin"]).await;
        std::fs::create_dir_all(root.join(".orchestrator/logs")).expect("mkdir");
        std::fs::write(root.join(".orchestrator/logs/run.log"), "noise\n").expect("write");
        std::fs::write(root.join(IGNORE_FILE), ".orchestrator/\n").expect("write");
        std::fs::write(root.join("odd [name]*.txt"), "literal\n").expect("write");

        let repo = Repo::discover(root).await.expect("repo");
        let snapshot = create_limited(&repo, 1000).await.expect("snapshot");
        let files = git(root, &["ls-tree", "-r", "--name-only", &snapshot.commit]).await;
        let files: Vec<&str> = files.lines().collect();
        for present in [
            "small.log",
            "wanted.bin",
            "tracked.txt",
            IGNORE_FILE,
            "odd [name]*.txt",
        ] {
            assert!(files.contains(&present), "{present} missing from {files:?}");
        }
        for absent in ["huge.log", ".orchestrator/logs/run.log", "ignored.txt"] {
            assert!(!files.contains(&absent), "{absent} in {files:?}");
        }
        assert_eq!(
            snapshot.skipped,
            [SkippedFile {
                path: "huge.log".into(),
                bytes: 5000
            }]
        );
        let note = snapshot.skipped_note().expect("a note");
        assert!(
            note.contains("huge.log") && note.contains("git add -N"),
            "{note}"
        );
    }

    #[tokio::test]
    async fn an_ignored_lockfile_travels_with_the_snapshot() {
        let dir = fixture().await;
        let root = dir.path();
        std::fs::write(root.join(".gitignore"), "ignored.txt\nCargo.lock\n").expect("write");
        std::fs::write(root.join("Cargo.lock"), "# the developer's pins\n").expect("write");
        let repo = Repo::discover(root).await.expect("repo");
        let snapshot = create(&repo).await.expect("snapshot");
        let lock = git(root, &["show", &format!("{}:Cargo.lock", snapshot.commit)]).await;
        assert_eq!(lock, "# the developer's pins");
        assert_eq!(
            git(root, &["status", "--porcelain", "--ignored", "Cargo.lock"]).await,
            "!! Cargo.lock",
            "still ignored (and untracked) in the worktree"
        );
    }

    #[tokio::test]
    async fn a_tracked_lockfile_travels_as_it_is_in_the_worktree() {
        let dir = fixture().await;
        let root = dir.path();
        std::fs::write(root.join("Cargo.lock"), "# committed\n").expect("write");
        git(root, &["add", "Cargo.lock"]).await;
        git(
            root,
            &["commit", "--quiet", "--no-verify", "-m", "lockfile"],
        )
        .await;
        std::fs::write(root.join("Cargo.lock"), "# edited, not staged\n").expect("write");
        let repo = Repo::discover(root).await.expect("repo");
        let snapshot = create(&repo).await.expect("snapshot");
        let lock = git(root, &["show", &format!("{}:Cargo.lock", snapshot.commit)]).await;
        assert_eq!(lock, "# edited, not staged");
    }

    #[tokio::test]
    async fn works_in_a_linked_worktree_and_keeps_refs_bounded() {
        let dir = fixture().await;
        let root = dir.path();
        let linked = root.join("linked");
        git(
            root,
            &[
                "worktree",
                "add",
                "--quiet",
                "-b",
                "feature",
                linked.to_str().expect("utf8"),
            ],
        )
        .await;
        std::fs::write(linked.join("feature.txt"), "feature\n").expect("write");
        let repo = Repo::discover(&linked).await.expect("repo");
        assert_eq!(repo.common_dir, root.join(".git"));
        let snapshot = create(&repo).await.expect("snapshot");
        assert_eq!(
            git(root, &["show", &format!("{}:feature.txt", snapshot.commit)]).await,
            "feature"
        );

        for _ in 0..3 {
            create(&repo).await.expect("snapshot");
        }
        assert_eq!(count(root).await.expect("count"), 4);
        delete_all(&root.join(".git"), std::slice::from_ref(&snapshot.git_ref))
            .await
            .expect("delete");
        assert_eq!(count(root).await.expect("count"), 3);

        // Refs a day old are pruned by their name's timestamp.
        let old = format!(
            "{SNAPSHOT_REF_PREFIX}{}-00000000",
            unix_millis() - 25 * 3600 * 1000
        );
        git(root, &["update-ref", &old, &snapshot.commit]).await;
        assert_eq!(prune(&root.join(".git")).await.expect("prune"), 1);
        assert_eq!(count(root).await.expect("count"), 3);
    }

    #[tokio::test]
    async fn a_loose_commit_is_told_from_other_objects_by_its_header() {
        let dir = fixture().await;
        let root = dir.path();
        let common_dir = root.join(".git");
        let commit = git(root, &["rev-parse", "HEAD"]).await;
        let tree = git(root, &["rev-parse", "HEAD^{tree}"]).await;
        assert!(is_loose_commit(&common_dir, &commit));
        assert!(!is_loose_commit(&common_dir, &tree), "a tree is no commit");
        assert!(!is_loose_commit(&common_dir, &"0".repeat(40)), "absent");
        // Varied text makes zlib start with a block's code tables, so the header comes out
        // only after more than the first 64 bytes (measured: 78).
        let mut state = 7_u32;
        let message: String = (0..300)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                char::from_u32(0x400 + (state >> 16) % 0x100).unwrap_or('x')
            })
            .collect();
        let unusual = git(root, &["commit-tree", &tree, "-m", &message]).await;
        assert!(is_loose_commit(&common_dir, &unusual));
        git(root, &["gc", "--quiet"]).await;
        assert!(
            !is_loose_commit(&common_dir, &commit),
            "packed: git is asked"
        );
    }

    #[tokio::test]
    async fn a_snapshot_writes_its_ref_as_git_reads_it_and_prunes_only_when_needed() {
        let dir = fixture().await;
        let root = dir.path();
        let common_dir = root.join(".git");
        let repo = Repo::discover(root).await.expect("repo");
        let snapshot = create(&repo).await.expect("snapshot");
        let resolved = git(root, &["rev-parse", "--verify", &snapshot.git_ref]).await;
        assert_eq!(
            resolved, snapshot.commit,
            "git reads the ref written without it"
        );
        assert!(
            !common_dir
                .join(format!("{}.lock", snapshot.git_ref))
                .exists(),
            "no lock file stays"
        );
        assert!(!prune_needed(&common_dir), "one fresh loose ref");
        let stray = common_dir.join(format!("{SNAPSHOT_REF_PREFIX}1-00000000.lock"));
        std::fs::write(&stray, "").expect("stray lock");
        assert!(
            !prune_needed(&common_dir),
            "a stray lock file is no ref to prune"
        );
        std::fs::remove_file(&stray).expect("rm");
        // Written without git while the directory exists (the first went to git).
        let direct = format!("{SNAPSHOT_REF_PREFIX}{}-0000000d", unix_millis());
        write_loose_ref(&common_dir, &direct, &snapshot.commit).expect("written directly");
        let resolved = git(root, &["rev-parse", "--verify", &direct]).await;
        assert_eq!(resolved, snapshot.commit);
        git(root, &["update-ref", "-d", &direct]).await;

        // A ref past its age, loose: the next snapshot prunes it.
        let old = format!(
            "{SNAPSHOT_REF_PREFIX}{}-00000000",
            unix_millis() - 25 * 3600 * 1000
        );
        git(root, &["update-ref", &old, &snapshot.commit]).await;
        assert!(prune_needed(&common_dir));
        create(&repo).await.expect("snapshot");
        assert_eq!(count(root).await.expect("count"), 2, "the old ref is gone");

        // Packed, its age is not in a file name: git is asked, and prunes it.
        git(root, &["update-ref", &old, &snapshot.commit]).await;
        git(root, &["pack-refs", "--all"]).await;
        assert!(prune_needed(&common_dir));
        create(&repo).await.expect("snapshot");
        let left = git(root, &["for-each-ref", "--format=%(refname)", &old]).await;
        assert!(left.is_empty(), "the packed old ref is gone: {left}");
    }

    #[tokio::test]
    async fn a_plain_directory_is_snapshotted_without_its_ignored_files_or_a_dot_git() {
        let dir = tempfile::tempdir().expect("temp");
        let project = dir.path().join("project");
        for (path, text) in [
            ("Cargo.toml", "[package]\n"),
            ("src/lib.rs", "\n"),
            (".gitignore", ".env\n"),
            (".env", "SECRET=1\n"),
            ("target/debug/junk", "x\n"),
            ("notes/target/kept.txt", "x\n"),
        ] {
            let path = project.join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        let repo = Repo::plain_under(&project, &dir.path().join("cache"))
            .await
            .expect("plain");
        let snapshot = create(&repo).await.expect("snapshot");
        let files = git(
            &repo.common_dir,
            &["ls-tree", "-r", "--name-only", &snapshot.commit],
        )
        .await;
        let files: Vec<&str> = files.lines().collect();
        assert_eq!(
            files,
            [
                ".gitignore",
                "Cargo.toml",
                "notes/target/kept.txt",
                "src/lib.rs"
            ]
        );
        assert!(!project.join(".git").exists());
        // Unchanged, the same commit; a change, another.
        assert_eq!(
            create(&repo).await.expect("snapshot").commit,
            snapshot.commit
        );
        std::fs::write(project.join("src/lib.rs"), "// changed\n").expect("write");
        assert_ne!(
            create(&repo).await.expect("snapshot").commit,
            snapshot.commit
        );
    }

    #[tokio::test]
    async fn an_unchanged_worktree_gives_the_same_commit() {
        let dir = fixture().await;
        let repo = Repo::discover(dir.path()).await.expect("repo");
        std::fs::write(dir.path().join("untracked.txt"), "x\n").expect("write");
        let first = create(&repo).await.expect("snapshot");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = create(&repo).await.expect("snapshot");
        assert_eq!(
            first.commit, second.commit,
            "same content, same commit: agents need not fetch"
        );
        assert_ne!(first.git_ref, second.git_ref);
        std::fs::write(dir.path().join("untracked.txt"), "y\n").expect("write");
        assert_ne!(create(&repo).await.expect("snapshot").commit, first.commit);
    }

    #[tokio::test]
    async fn refs_are_read_without_git_when_loose_and_deleted_in_one_batch() {
        let dir = fixture().await;
        let root = dir.path();
        let head = git(root, &["rev-parse", "HEAD"]).await;
        let name = |leaf: &str| format!("{SNAPSHOT_REF_PREFIX}{leaf}");
        for leaf in ["1-packed", "2-loose", "3-packed"] {
            git(root, &["update-ref", &name(leaf), &head]).await;
        }
        git(root, &["pack-refs", "--include", &name("*-packed")]).await;
        let common = root.join(".git");
        // Packed, and loose again after an update: removing the loose file alone would
        // bring the packed value back.
        git(root, &["update-ref", &name("5-both"), &head]).await;
        git(root, &["pack-refs", "--include", &name("5-both")]).await;
        let next = git(
            root,
            &["commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", "next"],
        )
        .await;
        git(root, &["update-ref", &name("5-both"), &next]).await;
        assert!(common.join(name("5-both")).is_file());
        git(
            root,
            &["update-ref", "--create-reflog", &name("6-logged"), &head],
        )
        .await;
        assert_eq!(
            loose_ref_target(&common, &name("2-loose")),
            Some(head.clone())
        );
        assert_eq!(
            loose_ref_target(&common, &name("1-packed")),
            None,
            "a packed ref is left to git"
        );
        for unusual in ["../../HEAD", "", "x.lock", "a/b"] {
            assert_eq!(loose_ref_target(&common, &name(unusual)), None, "{unusual}");
        }
        assert_eq!(loose_ref_target(&common, "refs/heads/main"), None);

        // One batch: refs already gone and refs outside the snapshot namespace are no error,
        // and the latter are left alone.
        let batch = [
            name("1-packed"),
            name("2-loose"),
            name("5-both"),
            name("6-logged"),
            name("4-never-made"),
            "refs/heads/main".to_owned(),
        ];
        delete_all(&common, &batch).await.expect("delete");
        assert_eq!(count(root).await.expect("count"), 1);
        assert!(!common.join(name("2-loose")).exists());
        assert!(!common.join("logs").join(name("6-logged")).exists());
        for gone in ["1-packed", "5-both"] {
            assert_eq!(
                git(root, &["for-each-ref", "--format=%(refname)", &name(gone)]).await,
                "",
                "{gone}: deleted from packed-refs too, not only its loose file"
            );
        }
        assert_eq!(git(root, &["rev-parse", "refs/heads/main"]).await, head);
        // A name git refuses fails its batch as a whole; then each ref goes on its own.
        let refused = [name("bad..name"), name("3-packed")];
        delete_all(&common, &refused).await.expect("one by one");
        assert_eq!(count(root).await.expect("count"), 0);
    }
}
