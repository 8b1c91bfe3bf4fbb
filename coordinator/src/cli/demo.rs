//! `buildpool demo`: the whole pipeline on an embedded sample workspace, for a first look.
//!
//! Writes a two-crate cargo workspace into a temporary git repository, leaves one file
//! uncommitted (to show that the snapshot carries it), and runs `cargo test` on it through
//! an in-process coordinator and its local agent: snapshot, fetch, warm workspace, cargo.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use buildpool_core::git::Git;
use clap::Args;

use super::run::{self, RunArgs};

const FILES: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        "[workspace]\nresolver = \"2\"\nmembers = [\"app\", \"util\"]\n",
    ),
    (".gitignore", "/target\n"),
    (
        "util/Cargo.toml",
        "[package]\nname = \"util\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    ),
    (
        "util/src/lib.rs",
        "/// Doubles a number.\npub fn double(x: i32) -> i32 {\n    x * 2\n}\n",
    ),
    (
        "app/Cargo.toml",
        "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\nutil = { path = \"../util\" }\n",
    ),
    (
        "app/src/lib.rs",
        "/// Quadruples a number.\npub fn quadruple(x: i32) -> i32 {\n    util::double(util::double(x))\n}\n\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn quadruples() {\n        assert_eq!(super::quadruple(2), 8);\n    }\n}\n",
    ),
];

/// Uncommitted when the job runs: the snapshot includes it anyway.
const UNCOMMITTED: (&str, &str) = (
    "app/tests/uncommitted.rs",
    "#[test]\nfn uncommitted_files_are_built_too() {\n    assert_eq!(app::quadruple(1), 4);\n}\n",
);

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the sample repository instead of deleting it.
    #[arg(long)]
    keep: bool,
}

async fn write(root: &Path, (path, text): (&str, &str)) -> anyhow::Result<()> {
    let path = root.join(path);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::write(&path, text)
        .await
        .with_context(|| format!("writing {}", path.display()))
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("buildpool-demo-")
        .tempdir()?;
    // A fixed directory name and commit date give every demo the same repository id, so
    // repeated demos reuse one warm workspace instead of leaving a new one each time.
    let root = &dir.path().join("sample");
    for file in FILES {
        write(root, *file).await?;
    }
    Git::new(root)
        .args(["init", "--quiet", "-b", "main"])
        .output()
        .await?;
    Git::new(root).args(["add", "."]).output().await?;
    Git::new(root)
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .args(["commit", "--quiet", "-m", "sample workspace"])
        .output()
        .await?;
    write(root, UNCOMMITTED).await?;
    eprintln!(
        "[buildpool] sample workspace at {} (one test file uncommitted)",
        root.display()
    );

    let code = run::run(root, RunArgs::local_test()).await?;
    if args.keep {
        let kept = dir.keep();
        eprintln!("[buildpool] kept {}", kept.display());
    }
    Ok(code)
}
