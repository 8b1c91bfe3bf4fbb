//! Where cargo would run, as `buildpool run` can say it: a job always runs cargo at the
//! top of the snapshot, so a command started in a subdirectory becomes one with
//! `--manifest-path`, when that means the same.
//!
//! This is the only part of offloading that looks at files: a few `stat` calls, no git
//! process, so the hook stays fast.

use std::path::{Path, PathBuf};

use super::PassThrough;

/// What running in a given directory adds to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The manifest cargo would find from there, relative to the top of the worktree;
    /// `None` when it is the top-level one.
    pub manifest: Option<String>,
}

/// The top of the git worktree holding `dir` (the nearest directory with a `.git`).
pub fn worktree_top(dir: &Path) -> Option<&Path> {
    dir.ancestors()
        .find(|ancestor| ancestor.join(".git").exists())
}

/// Files that change what cargo or rustup do when found in a directory on the way up:
/// below the top of the worktree they would apply here and not on the agent.
const LOCAL_CONFIG: &[&str] = &[
    ".cargo/config.toml",
    ".cargo/config",
    "rust-toolchain.toml",
    "rust-toolchain",
];

/// Looks at `dir` (absolute) and its parents up to the top of its worktree.
pub fn place(dir: &Path) -> Result<Placement, PassThrough> {
    let dir: PathBuf = dir.canonicalize().map_err(|_| PassThrough::NoDirectory)?;
    let top = worktree_top(&dir).ok_or(PassThrough::NotInRepository)?;
    let mut manifest_dir = None;
    for ancestor in dir.ancestors().take_while(|ancestor| *ancestor != top) {
        if LOCAL_CONFIG
            .iter()
            .any(|config| ancestor.join(config).is_file())
        {
            return Err(PassThrough::SubdirectoryConfig);
        }
        if manifest_dir.is_none() && ancestor.join("Cargo.toml").is_file() {
            manifest_dir = Some(ancestor);
        }
    }
    match manifest_dir {
        None if top.join("Cargo.toml").is_file() => Ok(Placement { manifest: None }),
        None => Err(PassThrough::NoManifest),
        Some(found) => {
            let relative = found
                .strip_prefix(top)
                .ok()
                .and_then(Path::to_str)
                .ok_or(PassThrough::NoManifest)?;
            Ok(Placement {
                manifest: Some(format!("{relative}/Cargo.toml")),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for file in files {
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
            std::fs::write(path, "").expect("write");
        }
        dir
    }

    #[test]
    fn the_top_and_directories_without_a_manifest_of_their_own_need_nothing() {
        let repo = tree(&[".git/HEAD", "Cargo.toml", "src/lib.rs"]);
        let top = Ok(Placement { manifest: None });
        assert_eq!(place(repo.path()), top);
        assert_eq!(place(&repo.path().join("src")), top);
    }

    #[test]
    fn a_member_directory_becomes_its_manifest_path() {
        let repo = tree(&[
            ".git",
            "Cargo.toml",
            "crates/util/Cargo.toml",
            "crates/util/src/x",
        ]);
        let util = Ok(Placement {
            manifest: Some("crates/util/Cargo.toml".into()),
        });
        assert_eq!(place(&repo.path().join("crates/util")), util);
        assert_eq!(place(&repo.path().join("crates/util/src")), util);
        // A linked worktree has a `.git` file; its top is where that file is.
        let worktree = tree(&[".git", "Cargo.toml", "app/Cargo.toml"]);
        assert_eq!(
            place(&worktree.path().join("app")).map(|p| p.manifest),
            Ok(Some("app/Cargo.toml".into()))
        );
    }

    #[test]
    fn local_configuration_below_the_top_no_repository_or_no_manifest_pass_through() {
        let repo = tree(&[
            ".git/HEAD",
            "Cargo.toml",
            "a/.cargo/config.toml",
            "a/Cargo.toml",
            "b/rust-toolchain.toml",
            ".cargo/config.toml",
        ]);
        assert_eq!(
            place(&repo.path().join("a")),
            Err(PassThrough::SubdirectoryConfig)
        );
        assert_eq!(
            place(&repo.path().join("b")),
            Err(PassThrough::SubdirectoryConfig)
        );
        // Configuration at the top travels with the snapshot.
        assert_eq!(place(repo.path()), Ok(Placement { manifest: None }));
        assert_eq!(
            place(&repo.path().join("missing")),
            Err(PassThrough::NoDirectory)
        );
        let plain = tree(&["Cargo.toml"]);
        assert_eq!(place(plain.path()), Err(PassThrough::NotInRepository));
        let no_manifest = tree(&[".git/HEAD", "README"]);
        assert_eq!(place(no_manifest.path()), Err(PassThrough::NoManifest));
    }
}
