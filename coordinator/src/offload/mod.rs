//! Offloading the cargo commands coding agents type: which ones `buildpool run` runs
//! exactly as local cargo would, and the `buildpool run` arguments that do.
//!
//! The cargo shim decides each cargo as it starts, from its real arguments
//! ([`offload_argv`]); `hook explain` says beforehand what the shim will do with each
//! program of a command line ([`explain`]). Everything here is pure except
//! [`place::place`], which looks at a few files; callers pass it in, so tests can pass
//! their own.

pub mod cargo;
pub mod explain;
pub mod line;
pub mod place;
pub mod shell;

use std::path::Path;

use cargo::CargoJob;
use place::Placement;

/// Why a command is left to run as it is. Nothing here is an error: passing through is
/// always safe, so every doubt ends here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassThrough {
    #[error("a +toolchain override: the agent has its own toolchain")]
    Toolchain,
    #[error("no cargo subcommand")]
    NoSubcommand,
    #[error("cargo flag {0} before the subcommand")]
    GlobalFlag(String),
    #[error("cargo {0} runs here: only build, test, check, clippy and nextest run go to the pool")]
    Subcommand(String),
    #[error("asks for help")]
    Help,
    #[error("{0} changes files here")]
    LocalEffect(String),
    #[error("buildpool run cannot carry it: {0}")]
    NotCarried(String),
    #[error("the directory does not exist")]
    NoDirectory,
    #[error("not inside a git repository")]
    NotInRepository,
    #[error("no Cargo.toml between the directory and the top of its worktree")]
    NoManifest,
    #[error("cargo or rustup configuration below the top of the worktree would apply here only")]
    SubdirectoryConfig,
    #[error("a path argument in a subdirectory would be read from the top of the worktree")]
    PathInSubdirectory,
}

/// `cargo ARGS` run in `dir`, as a job: `args` classified, then placed.
pub fn offload_argv(
    args: &[String],
    dir: &Path,
    place: impl FnOnce(&Path) -> Result<Placement, PassThrough>,
) -> Result<CargoJob, PassThrough> {
    let mut job = cargo::classify(args)?;
    if let Some(manifest) = place(dir)?.manifest {
        if cargo::PATH_FLAGS.iter().any(|flag| job.has_flag(flag)) {
            return Err(PassThrough::PathInSubdirectory);
        }
        job.cargo_args
            .splice(0..0, ["--manifest-path".to_owned(), manifest]);
    }
    Ok(job)
}

/// The arguments of `buildpool` that run `job`.
pub fn run_args(job: &CargoJob) -> Vec<String> {
    let mut args = vec!["run".to_owned(), job.kind.cargo_subcommand().to_owned()];
    if !job.cargo_args.is_empty() {
        args.push("--".to_owned());
        args.extend(job.cargo_args.iter().cloned());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_top(_: &Path) -> Result<Placement, PassThrough> {
        Ok(Placement { manifest: None })
    }

    fn offload(command: &[&str]) -> Result<Vec<String>, PassThrough> {
        let args: Vec<String> = command.iter().map(|arg| (*arg).to_owned()).collect();
        offload_argv(&args, Path::new("/repo"), at_top).map(|job| run_args(&job))
    }

    #[test]
    fn cargo_commands_become_the_same_job() {
        for (command, run) in [
            (&["test"][..], &["run", "test"][..]),
            (&["t"], &["run", "test"]),
            (
                &["test", "-p", "app", "--", "--nocapture"],
                &["run", "test", "--", "-p", "app", "--", "--nocapture"],
            ),
            (
                &["clippy", "--", "-D", "warnings"],
                &["run", "clippy", "--", "--", "-D", "warnings"],
            ),
            (&["-q", "check"], &["run", "check", "--", "-q"]),
            (
                &["nextest", "run", "-p", "app"],
                &["run", "nextest", "--", "-p", "app"],
            ),
        ] {
            assert_eq!(
                offload(command),
                Ok(run.iter().map(|arg| (*arg).to_owned()).collect()),
                "{command:?}"
            );
        }
    }

    #[test]
    fn what_must_stay_here_says_why() {
        for (command, reason) in [
            (&["run"][..], PassThrough::Subcommand("run".into())),
            (&["fmt"], PassThrough::Subcommand("fmt".into())),
            (&["+nightly", "test"], PassThrough::Toolchain),
            (
                &["-Zbuild-std", "test"],
                PassThrough::GlobalFlag("-Zbuild-std".into()),
            ),
        ] {
            assert_eq!(offload(command), Err(reason), "{command:?}");
        }
        for command in [
            &["test", "--target-dir", "/tmp/x"][..],
            &["test", "--target-dir=../../elsewhere"],
        ] {
            assert!(
                matches!(offload(command), Err(PassThrough::NotCarried(_))),
                "{command:?}"
            );
        }
    }

    #[test]
    fn a_subdirectory_is_placed_by_its_manifest() {
        let in_member = |_: &Path| {
            Ok(Placement {
                manifest: Some("crates/util/Cargo.toml".into()),
            })
        };
        let args = ["test".to_owned()];
        let job = offload_argv(&args, Path::new("/repo/crates/util"), in_member).expect("job");
        assert_eq!(
            job.cargo_args,
            ["--manifest-path", "crates/util/Cargo.toml"]
        );
        let with_path = [
            "test".to_owned(),
            "--config".to_owned(),
            "x.toml".to_owned(),
        ];
        assert_eq!(
            offload_argv(&with_path, Path::new("/repo/crates/util"), in_member),
            Err(PassThrough::PathInSubdirectory)
        );
        let refused = offload_argv(&args, Path::new("/r"), |_| {
            Err(PassThrough::NotInRepository)
        });
        assert_eq!(refused, Err(PassThrough::NotInRepository));
    }
}
