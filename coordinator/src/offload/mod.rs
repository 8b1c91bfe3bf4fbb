//! Offloading the cargo commands coding agents type: which ones `buildpool run` runs
//! exactly as local cargo would, and the `buildpool run` command line that does.
//!
//! Shared by the Claude Code hook (which gets a shell command) and the cargo shim (which
//! gets an argv). Everything here is pure except [`place::place`], which looks at a few
//! files; callers pass it in, so tests can pass their own.

pub mod cargo;
pub mod place;
pub mod shell;
pub mod vouch;

use std::path::Path;

use cargo::CargoJob;
use place::Placement;

/// Why a command is left to run as it is. Nothing here is an error: passing through is
/// always safe, so every doubt ends here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassThrough {
    #[error(
        "not a single command read with certainty (pipes, redirections, lists, expansions, globs, ...)"
    )]
    NotCertain,
    #[error("not a cargo command")]
    NotCargo,
    #[error("a +toolchain override: the agent has its own toolchain")]
    Toolchain,
    #[error("no cargo subcommand")]
    NoSubcommand,
    #[error("cargo flag {0} before the subcommand")]
    GlobalFlag(String),
    #[error("cargo {0} runs here: only build, test, check and clippy go to the pool")]
    Subcommand(String),
    #[error("asks for help")]
    Help,
    #[error("{0} changes files here")]
    LocalEffect(String),
    #[error("buildpool run cannot carry it: {0}")]
    NotCarried(String),
    #[error("{0} would not reach the job: only allow-listed variables travel")]
    EnvNotCarried(String),
    #[error(
        "the hook does not vouch for {0}: only for settings known to name no program and pass \
         no flags to the compiler or linker; Claude Code's own permission rules decide"
    )]
    Unvouched(String),
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

/// The shell command that runs `command` (typed in `cwd`, absolute) through `buildpool`
/// (the program to name) instead, or why it stays as it is.
///
/// A leading `cd DIR &&` and allow-listed `NAME=VALUE` prefixes are kept as they are:
/// `buildpool run` then starts in the same directory and forwards those variables to the
/// job, as cargo would have seen them.
///
/// Only the hook rewrites shell commands, and it allows every rewrite without asking, so
/// a command it cannot vouch for ([`vouch`]) stays as typed: Claude Code then applies its
/// own rules to the very command the model wrote, as it would without the hook.
pub fn rewrite_shell(
    command: &str,
    cwd: &Path,
    buildpool: &str,
    place: impl FnOnce(&Path) -> Result<Placement, PassThrough>,
) -> Result<String, PassThrough> {
    let parsed = shell::parse(command).map_err(|_| PassThrough::NotCertain)?;
    let (program, args) = parsed.argv.split_first().ok_or(PassThrough::NotCertain)?;
    if program != "cargo" {
        return Err(PassThrough::NotCargo);
    }
    for (name, value) in &parsed.env {
        if !buildpool_core::spec::env_name_allowed(name) {
            return Err(PassThrough::EnvNotCarried(name.clone()));
        }
        vouch::env(name, value)?;
    }
    if !cwd.is_absolute() {
        return Err(PassThrough::NoDirectory);
    }
    let dir = match &parsed.cd {
        Some(dir) => cwd.join(dir),
        None => cwd.to_owned(),
    };
    let job = offload_argv(args, &dir, place)?;
    vouch::cargo_args(&job)?;
    let mut words = Vec::new();
    if let Some(dir) = &parsed.cd {
        words.extend([
            "cd".to_owned(),
            shell::quote(dir).into_owned(),
            "&&".to_owned(),
        ]);
    }
    words.extend(
        parsed
            .env
            .iter()
            .map(|(name, value)| format!("{name}={}", shell::quote(value))),
    );
    words.push(shell::quote(buildpool).into_owned());
    words.extend(
        run_args(&job)
            .iter()
            .map(|arg| shell::quote(arg).into_owned()),
    );
    Ok(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUILDPOOL: &str = "/opt/bin/buildpool";

    fn at_top(_: &Path) -> Result<Placement, PassThrough> {
        Ok(Placement { manifest: None })
    }

    fn rewrite(command: &str) -> Result<String, PassThrough> {
        rewrite_shell(command, Path::new("/repo"), BUILDPOOL, at_top)
    }

    #[test]
    fn cargo_commands_become_the_same_job() {
        for (command, rewritten) in [
            ("cargo test", "/opt/bin/buildpool run test"),
            ("cargo t", "/opt/bin/buildpool run test"),
            (
                "cargo test -p app -- --nocapture",
                "/opt/bin/buildpool run test -- -p app -- --nocapture",
            ),
            (
                "cargo clippy --all-targets -- -D warnings",
                "/opt/bin/buildpool run clippy -- --all-targets -- -D warnings",
            ),
            (
                "cargo build --release",
                "/opt/bin/buildpool run build -- --release",
            ),
            ("cargo -q check", "/opt/bin/buildpool run check -- -q"),
            (
                "cargo test 'name with space'",
                "/opt/bin/buildpool run test -- 'name with space'",
            ),
            (
                "RUST_BACKTRACE=1 cargo test",
                "RUST_BACKTRACE=1 /opt/bin/buildpool run test",
            ),
            (
                "RUSTFLAGS=\"-D warnings\" CARGO_PROFILE_DEV_DEBUG=0 cargo build",
                "RUSTFLAGS='-D warnings' CARGO_PROFILE_DEV_DEBUG=0 /opt/bin/buildpool run build",
            ),
            (
                "cd /repo/sub && cargo check",
                "cd /repo/sub && /opt/bin/buildpool run check",
            ),
            (
                "cd 'my dir' && RUST_LOG=debug cargo test it\\'s",
                "cd 'my dir' && RUST_LOG=debug /opt/bin/buildpool run test -- 'it'\\''s'",
            ),
        ] {
            assert_eq!(rewrite(command).as_deref(), Ok(rewritten), "{command:?}");
        }
        // The program to run is quoted like any word.
        let spaced = rewrite_shell("cargo c", Path::new("/r"), "/my bin/buildpool", at_top);
        assert_eq!(spaced.as_deref(), Ok("'/my bin/buildpool' run check"));
    }

    #[test]
    fn everything_else_passes_through() {
        for (command, reason) in [
            ("cargo run", PassThrough::Subcommand("run".into())),
            ("cargo test 2>&1 | tail -20", PassThrough::NotCertain),
            ("cargo test; echo done", PassThrough::NotCertain),
            ("FOO=1 cargo test", PassThrough::EnvNotCarried("FOO".into())),
            (
                "CARGO_TARGET_DIR=/t cargo build",
                PassThrough::EnvNotCarried("CARGO_TARGET_DIR".into()),
            ),
            ("buildpool run test", PassThrough::NotCargo),
            (
                "/opt/bin/buildpool run test -- -p app",
                PassThrough::NotCargo,
            ),
            ("/usr/bin/cargo test", PassThrough::NotCargo),
            ("ls -la", PassThrough::NotCargo),
            ("RUST_LOG=1", PassThrough::NotCertain),
        ] {
            assert_eq!(rewrite(command), Err(reason), "{command:?}");
        }
        let relative_cwd = rewrite_shell("cargo test", Path::new("repo"), BUILDPOOL, at_top);
        assert_eq!(relative_cwd, Err(PassThrough::NoDirectory));
    }

    #[test]
    fn what_the_hook_cannot_vouch_for_passes_through_and_says_why() {
        let unvouched = |what: &str| PassThrough::Unvouched(what.to_owned());
        for (command, reason) in [
            (
                r#"cargo test --config 'target."cfg(all())".runner=["sh","-c","id > /tmp/x"]'"#,
                unvouched("--config"),
            ),
            (
                "cargo build --config build.rustc-wrapper=/tmp/w",
                unvouched("--config"),
            ),
            (
                "RUSTFLAGS='-C linker=/tmp/l' cargo build",
                unvouched("RUSTFLAGS"),
            ),
            ("cargo test -Zbuild-std", unvouched("-Z")),
            (
                "cargo -Zbuild-std test",
                PassThrough::GlobalFlag("-Zbuild-std".into()),
            ),
            ("cargo +nightly test", PassThrough::Toolchain),
            (
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=sh cargo test",
                PassThrough::EnvNotCarried("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER".into()),
            ),
            (
                "RUSTC_WRAPPER=x cargo build",
                PassThrough::EnvNotCarried("RUSTC_WRAPPER".into()),
            ),
            ("cargo test\r", PassThrough::NotCertain),
            ("cargo test\u{a0}", PassThrough::NotCertain),
            ("cargo test\u{85}", PassThrough::NotCertain),
        ] {
            assert_eq!(rewrite(command), Err(reason), "{command:?}");
        }
        for command in [
            "cargo test --target-dir /tmp/x",
            "cargo test --target-dir=../../elsewhere",
        ] {
            assert!(
                matches!(rewrite(command), Err(PassThrough::NotCarried(_))),
                "{command:?}"
            );
        }
    }

    #[test]
    fn a_subdirectory_is_placed_where_cd_leads() {
        let mut asked = None;
        let rewritten = rewrite_shell(
            "cd crates/util && cargo test",
            Path::new("/repo"),
            BUILDPOOL,
            |dir| {
                asked = Some(dir.to_owned());
                Ok(Placement {
                    manifest: Some("crates/util/Cargo.toml".into()),
                })
            },
        );
        assert_eq!(asked.as_deref(), Some(Path::new("/repo/crates/util")));
        assert_eq!(
            rewritten.as_deref(),
            Ok(
                "cd crates/util && /opt/bin/buildpool run test -- --manifest-path crates/util/Cargo.toml"
            )
        );
        let in_member = |_: &Path| {
            Ok(Placement {
                manifest: Some("a/Cargo.toml".into()),
            })
        };
        let with_path = rewrite_shell(
            "cargo test --config x.toml",
            Path::new("/r/a"),
            BUILDPOOL,
            in_member,
        );
        assert_eq!(with_path, Err(PassThrough::PathInSubdirectory));
        let refused = rewrite_shell("cargo test", Path::new("/r"), BUILDPOOL, |_| {
            Err(PassThrough::NotInRepository)
        });
        assert_eq!(refused, Err(PassThrough::NotInRepository));
    }
}
