//! The repository a coordinator serves and a client builds.

use std::path::{Path, PathBuf};

use buildpool_core::git::{Git, GitError, is_object_id};

/// Where a repository's root commit is remembered, in its state directory.
const ROOT_COMMIT_FILE: &str = "root-commit";

/// Where a repository lives and how agents identify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    /// Top of the worktree the command runs in.
    pub worktree: PathBuf,
    /// The git dir shared by all worktrees: refs, objects and buildpool's own state live here.
    pub common_dir: PathBuf,
    /// Stable identity: the same project gets the same agent cache and workspaces.
    pub id: String,
    /// A plain directory, not a git repository: `common_dir` is a private repository
    /// buildpool keeps for it (see [`Repo::plain`]), and git runs with `GIT_DIR` and
    /// `GIT_WORK_TREE` ([`Repo::git`]).
    pub plain: bool,
    /// The worktree's index file as git names it (`None`: not asked at discovery). Told
    /// with the rest in one git process, so a snapshot can start staging at once.
    pub index_file: Option<PathBuf>,
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
    /// Finds the repository containing `dir`; a directory in no git repository at all is
    /// a plain one ([`Repo::plain`]).
    pub async fn discover(dir: &Path) -> Result<Self, RepoError> {
        let output = match Git::new(dir)
            .args([
                "rev-parse",
                "--path-format=absolute",
                "--show-toplevel",
                "--git-common-dir",
                "--git-path",
                "index",
            ])
            .output()
            .await
        {
            Ok(output) => output,
            // Told apart by the absence of `.git` rather than git's (translated) message.
            Err(GitError::Failed { .. })
                if dir.is_dir() && !dir.ancestors().any(|d| d.join(".git").exists()) =>
            {
                return Self::plain(dir).await;
            }
            Err(error) => return Err(RepoError::NotARepository(dir.to_owned(), error.to_string())),
        };
        let mut lines = output.lines();
        let (Some(worktree), Some(common_dir), Some(index_file)) =
            (lines.next(), lines.next(), lines.next())
        else {
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
        let root = root_commit(&worktree, &common_dir)
            .await
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
            plain: false,
            index_file: Some(PathBuf::from(index_file)),
        })
    }

    /// A project directory that is no git repository, as some orchestrators give their
    /// agents. Snapshots go into a private repository buildpool keeps for it under
    /// `$XDG_CACHE_HOME/buildpool/plain/`, with the directory as its work tree: the
    /// directory itself gets no `.git`. Its `.gitignore` applies, and `/target/` is always
    /// ignored. The top is the outermost of the directories holding a `Cargo.toml` from
    /// the nearest one up (a workspace member's directory finds its workspace); with no
    /// `Cargo.toml` there is no project to build.
    pub async fn plain(dir: &Path) -> Result<Self, RepoError> {
        Self::plain_under(dir, &crate::config::cache_home()).await
    }

    /// [`Repo::plain`] with the private repositories under `cache` instead.
    pub(crate) async fn plain_under(dir: &Path, cache: &Path) -> Result<Self, RepoError> {
        let not_a_repo =
            |error: std::io::Error| RepoError::NotARepository(dir.to_owned(), error.to_string());
        let dir = dir.canonicalize().map_err(not_a_repo)?;
        // Only a cargo project: a snapshot of, say, a home directory would hash all of it.
        let worktree = dir
            .ancestors()
            .skip_while(|d| !d.join("Cargo.toml").is_file())
            .take_while(|d| d.join("Cargo.toml").is_file())
            .last()
            .ok_or_else(|| {
                RepoError::NotARepository(
                    dir.clone(),
                    "nor in a cargo project: no Cargo.toml here or above".into(),
                )
            })?
            .to_owned();
        let name = sanitize(
            &worktree
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let hash = fnv1a(&worktree.display().to_string());
        let home = cache
            .join("buildpool")
            .join("plain")
            .join(format!("{name}-{hash:016x}"));
        let common_dir = home.join("repo.git");
        if !common_dir.join("HEAD").is_file() {
            init_private(&home, &common_dir, &worktree).await?;
        }
        Ok(Self {
            worktree,
            common_dir,
            id: format!("{name}-{:012x}", hash & 0xffff_ffff_ffff),
            plain: true,
            index_file: None,
        })
    }

    /// git in the worktree: for a plain directory, on its private repository.
    pub fn git(&self) -> Git {
        let git = Git::new(&self.worktree);
        if self.plain {
            git.env("GIT_DIR", &self.common_dir)
                .env("GIT_WORK_TREE", &self.worktree)
        } else {
            git
        }
    }

    /// For a plain directory, one line saying where its snapshots go.
    pub fn plain_note(&self) -> Option<String> {
        self.plain.then(|| {
            format!(
                "{} is not a git repository: snapshots go to buildpool's private repository {} \
                 (the directory itself is left as it is; .gitignore applies, target/ is ignored)",
                self.worktree.display(),
                self.common_dir.display()
            )
        })
    }

    /// buildpool's state directory inside the common git dir (discovery file, logs).
    pub fn state_dir(&self) -> PathBuf {
        self.common_dir.join("buildpool")
    }
}

/// The first root commit of `HEAD`'s history, remembered in the repository's state
/// directory once found: every client starts by discovering its repository, and this
/// spares each a git process. A repository keeps the identity it was first given, even
/// should a worktree later check out unrelated history.
async fn root_commit(worktree: &Path, common_dir: &Path) -> Option<String> {
    let remembered = common_dir.join("buildpool").join(ROOT_COMMIT_FILE);
    if let Ok(text) = std::fs::read_to_string(&remembered)
        && is_object_id(text.trim_end())
    {
        return Some(text.trim_end().to_owned());
    }
    let roots = Git::new(worktree)
        .args(["rev-list", "--max-parents=0", "HEAD"])
        .output()
        .await
        .ok()?;
    let root = roots.lines().last()?.to_owned();
    // Best effort: without it, the next discovery asks git again. A shallow clone's root
    // is only its boundary, which a deeper fetch moves: not remembered.
    if !common_dir.join("shallow").exists()
        && let Some(dir) = remembered.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let _ = crate::atomic_file::write(&remembered, root.as_bytes(), 0o644);
    }
    Some(root)
}

/// Creates the private repository of a plain directory: made aside and renamed into
/// place, so clients starting at once never see half of one.
async fn init_private(home: &Path, common_dir: &Path, worktree: &Path) -> Result<(), RepoError> {
    let io = |error: std::io::Error| {
        RepoError::NotARepository(worktree.to_owned(), format!("{}: {error}", home.display()))
    };
    std::fs::create_dir_all(home).map_err(io)?;
    let making = home.join(format!(
        ".init-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    Git::new(home)
        .args(["init", "--quiet", "--bare"])
        .arg(&making)
        .output()
        .await?;
    std::fs::create_dir_all(making.join("info")).map_err(io)?;
    std::fs::write(making.join("info").join("exclude"), "/target/\n").map_err(io)?;
    std::fs::write(home.join("directory"), worktree.display().to_string()).map_err(io)?;
    if std::fs::rename(&making, common_dir).is_err() {
        // Another client made it first.
        let _ = std::fs::remove_dir_all(&making);
        if !common_dir.join("HEAD").is_file() {
            return Err(io(std::io::ErrorKind::AlreadyExists.into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_plain_directory_gets_a_private_repository_and_no_dot_git() {
        let dir = tempfile::tempdir().expect("temp");
        let project = dir.path().join("project");
        std::fs::create_dir_all(project.join("app/src")).expect("mkdir");
        std::fs::write(project.join("Cargo.toml"), "[workspace]\n").expect("write");
        std::fs::write(project.join("app/Cargo.toml"), "[package]\n").expect("write");
        let cache = dir.path().join("cache");
        let from_member = Repo::plain_under(&project.join("app/src"), &cache)
            .await
            .expect("plain");
        let top = project.canonicalize().expect("canonical");
        assert_eq!(from_member.worktree, top, "a member finds its workspace");
        assert!(from_member.plain && from_member.common_dir.starts_with(&cache));
        assert!(from_member.common_dir.join("HEAD").is_file());
        assert!(!project.join(".git").exists());
        let again = Repo::plain_under(&project, &cache).await.expect("plain");
        assert_eq!(again, from_member, "the same private repository");
        let lone = dir.path().join("lone");
        std::fs::create_dir_all(&lone).expect("mkdir");
        let refused = Repo::plain_under(&lone, &cache).await;
        assert!(
            refused.is_err_and(|e| e.to_string().contains("no Cargo.toml")),
            "not a cargo project"
        );
        std::fs::write(lone.join("Cargo.toml"), "[package]\n").expect("write");
        let lone = Repo::plain_under(&lone, &cache).await.expect("plain");
        assert_ne!(lone.id, from_member.id);
        assert_ne!(lone.common_dir, from_member.common_dir);
    }

    #[tokio::test]
    async fn a_repository_keeps_the_identity_of_its_first_root_commit() {
        let dir = tempfile::tempdir().expect("temp");
        let root = dir.path();
        let git = |args: &'static [&'static str]| {
            Git::new(root)
                .args(["-c", "user.name=t", "-c", "user.email=t@localhost"])
                .args(args)
                .output()
        };
        git(&["init", "--quiet"]).await.expect("init");
        git(&["commit", "--quiet", "--allow-empty", "-m", "first"])
            .await
            .expect("commit");
        let first_root = git(&["rev-parse", "HEAD"]).await.expect("root");
        let repo = Repo::discover(root).await.expect("repo");
        let remembered = repo.state_dir().join(ROOT_COMMIT_FILE);
        assert_eq!(
            std::fs::read_to_string(&remembered).expect("remembered"),
            first_root
        );
        // Unrelated history checked out later: discovery reads the remembered root, not git.
        git(&["checkout", "--quiet", "--orphan", "other"])
            .await
            .expect("orphan");
        git(&["commit", "--quiet", "--allow-empty", "-m", "other root"])
            .await
            .expect("commit");
        let again = Repo::discover(root).await.expect("repo");
        assert_eq!(again.id, repo.id);
        std::fs::remove_file(&remembered).expect("forget");
        let asked = Repo::discover(root).await.expect("repo");
        assert_ne!(asked.id, repo.id, "git is asked when nothing is remembered");
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize("my repo!"), "my-repo");
        assert_eq!(sanitize("..."), "repo");
        assert_ne!(fnv1a("a"), fnv1a("b"));
    }
}
