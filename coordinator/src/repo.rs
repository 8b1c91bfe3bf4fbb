//! The repository a coordinator serves and a client builds.

use std::path::{Path, PathBuf};

use buildpool_core::git::{Git, GitError};

/// Where a repository lives and how agents identify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    /// Top of the worktree the command runs in.
    pub worktree: PathBuf,
    /// The git dir shared by all worktrees: refs, objects and buildpool's own state live here.
    pub common_dir: PathBuf,
    /// Stable identity: the same project gets the same agent cache and workspaces.
    pub id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0} is not inside a git repository ({1})")]
    NotARepository(PathBuf, String),
    #[error(transparent)]
    Git(#[from] GitError),
}

/// FNV-1a: a stable, dependency-free hash for naming; not for security.
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn sanitize(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let clean = clean.trim_matches('-').to_owned();
    if clean.is_empty() {
        "repo".to_owned()
    } else {
        clean
    }
}

impl Repo {
    /// Finds the repository containing `dir`.
    pub async fn discover(dir: &Path) -> Result<Self, RepoError> {
        let output = Git::new(dir)
            .args([
                "rev-parse",
                "--path-format=absolute",
                "--show-toplevel",
                "--git-common-dir",
            ])
            .output()
            .await
            .map_err(|error| RepoError::NotARepository(dir.to_owned(), error.to_string()))?;
        let mut lines = output.lines();
        let (Some(worktree), Some(common_dir)) = (lines.next(), lines.next()) else {
            return Err(RepoError::NotARepository(
                dir.to_owned(),
                "bare repositories have no worktree to build".into(),
            ));
        };
        let worktree = PathBuf::from(worktree);
        let common_dir = PathBuf::from(common_dir);
        // The main worktree's directory name, for a readable id; same for all worktrees.
        let name = if common_dir.file_name().is_some_and(|n| n == ".git") {
            common_dir.parent().and_then(Path::file_name)
        } else {
            common_dir.file_stem()
        }
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
        // The first root commit identifies a project across clones; an empty repository
        // falls back to its location.
        let root = Git::new(&worktree)
            .args(["rev-list", "--max-parents=0", "HEAD"])
            .output()
            .await
            .ok()
            .and_then(|roots| roots.lines().last().map(str::to_owned))
            .unwrap_or_else(|| common_dir.display().to_string());
        let id = format!(
            "{}-{:012x}",
            sanitize(&name),
            fnv1a(&root) & 0xffff_ffff_ffff
        );
        Ok(Self {
            worktree,
            common_dir,
            id,
        })
    }

    /// buildpool's state directory inside the common git dir (discovery file, logs).
    pub fn state_dir(&self) -> PathBuf {
        self.common_dir.join("buildpool")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize("my repo!"), "my-repo");
        assert_eq!(sanitize("..."), "repo");
        assert_ne!(fnv1a("a"), fnv1a("b"));
    }
}
