//! What the hook vouches for. Its "allow" skips the prompt Claude Code would otherwise show
//! (deny and ask rules still apply), and a rewritten command may run here when no pool is
//! reachable, so a command line gets it only when no part of it can name a program to run
//! or pass flags to the compiler or linker (which can name a linker, a plugin or a library
//! to load). Running the worktree's own build scripts and tests is what `cargo test` means;
//! what the command line adds to that is what is checked here.
//!
//! Only what is known to be harmless is vouched for, so a setting cargo learns later is
//! not. The cargo shim needs none of this: it is cargo itself, run by whoever typed it.

use buildpool_core::JobKind;

use super::PassThrough;
use super::cargo::CargoJob;

/// Variables whose values name no program and reach neither compiler nor linker.
const PLAIN_ENV: &[&str] = &[
    "RUST_BACKTRACE",
    "RUST_LOG",
    "RUST_TEST_THREADS",
    "RUST_MIN_STACK",
    "CARGO_TERM_COLOR",
    "CARGO_INCREMENTAL",
    "CARGO_BUILD_JOBS",
];

/// The ends of `CARGO_PROFILE_<NAME>_<KEY>` (and of its build-override keys) whose values
/// are numbers and choices. `rustflags` and `codegen-backend` are not among them.
const PROFILE_KEYS: &[&str] = &[
    "_OPT_LEVEL",
    "_DEBUG",
    "_DEBUG_ASSERTIONS",
    "_OVERFLOW_CHECKS",
    "_LTO",
    "_PANIC",
    "_INCREMENTAL",
    "_CODEGEN_UNITS",
    "_RPATH",
    "_STRIP",
    "_SPLIT_DEBUGINFO",
];

/// Variables of compiler flags, vouched for when they only set lint levels.
const FLAGS_ENV: &[&str] = &["RUSTFLAGS", "RUSTDOCFLAGS"];

/// Compiler flags that set a lint's level: `-D warnings` or `-Dwarnings`.
const LINT_LEVELS: &[&str] = &["-D", "-W", "-A", "-F"];

/// The same, long: `--deny warnings`.
const LONG_LINT_LEVELS: &[&str] = &["--deny", "--warn", "--allow", "--forbid"];

/// nextest's flags that run or load what the worktree does not hold: test binaries from an
/// archive or a build elsewhere, and configuration files (which can name setup scripts).
const NEXTEST_FILE_FLAGS: &[&str] = &[
    "--config-file",
    "--tool-config-file",
    "--archive-file",
    "--binaries-metadata",
    "--cargo-metadata",
    "--workspace-remap",
    "--target-dir-remap",
    "--extract-to",
];

/// Whether the hook vouches for the variable `name=value` before cargo.
pub fn env(name: &str, value: &str) -> Result<(), PassThrough> {
    let vouched = if FLAGS_ENV.contains(&name) {
        // Cargo splits these at spaces; a tab or newline stays in a flag and fails the check.
        lint_levels_only(value.split(' ').filter(|flag| !flag.is_empty()))
    } else if let Some(key) = name.strip_prefix("CARGO_PROFILE_") {
        PROFILE_KEYS.iter().any(|end| key.ends_with(end))
    } else {
        PLAIN_ENV.contains(&name)
    };
    if vouched {
        Ok(())
    } else {
        Err(PassThrough::Unvouched(name.to_owned()))
    }
}

/// Whether the hook vouches for `job`'s arguments: none of cargo's own is `--config`, a
/// `-Z` flag, a target given as a file or one of nextest's [`NEXTEST_FILE_FLAGS`], and
/// clippy's compiler flags only set lint levels. A test binary's arguments (after `--`) are its harness's, no compiler's.
pub fn cargo_args(job: &CargoJob) -> Result<(), PassThrough> {
    let split = job
        .cargo_args
        .iter()
        .position(|arg| arg == "--")
        .unwrap_or(job.cargo_args.len());
    let (own, after_dashes) = job.cargo_args.split_at(split);
    for (index, arg) in own.iter().enumerate() {
        if arg == "--config" || arg.starts_with("--config=") {
            return Err(PassThrough::Unvouched("--config".to_owned()));
        }
        // Short flags cluster (`-qZbuild-std`); a `Z` in a value only costs the prompt.
        if !arg.starts_with("--") && arg.starts_with('-') && arg.contains('Z') {
            return Err(PassThrough::Unvouched("-Z".to_owned()));
        }
        let target = match arg.strip_prefix("--target") {
            Some("") => Some(own.get(index + 1).map(String::as_str)),
            Some(rest) => rest.strip_prefix('=').map(Some),
            None => None,
        };
        if target.is_some_and(|name| !name.is_some_and(is_target_name)) {
            return Err(PassThrough::Unvouched("a --target file".to_owned()));
        }
        let flag = arg.split_once('=').map_or(arg.as_str(), |(name, _)| name);
        if job.kind == JobKind::Nextest && NEXTEST_FILE_FLAGS.contains(&flag) {
            return Err(PassThrough::Unvouched(flag.to_owned()));
        }
    }
    let compiler_flags = after_dashes.get(1..).unwrap_or_default();
    if job.kind == JobKind::Clippy && !lint_levels_only(compiler_flags.iter().map(String::as_str)) {
        return Err(PassThrough::Unvouched(
            "a clippy compiler flag other than a lint level".to_owned(),
        ));
    }
    Ok(())
}

/// A built-in target's name, which names no file: a JSON target specification can name a
/// linker (toolchains before `-Zjson-target-spec` read one without asking).
fn is_target_name(name: &str) -> bool {
    !name.is_empty()
        && !name.ends_with(".json")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Whether compiler `flags` only set lint levels (`-D warnings`, `-Aclippy::all`,
/// `--warn unused`): any other flag may name a linker, a plugin, a library or a file of
/// more flags.
fn lint_levels_only<'a>(flags: impl IntoIterator<Item = &'a str>) -> bool {
    let mut flags = flags.into_iter();
    while let Some(flag) = flags.next() {
        let lint = if LINT_LEVELS.contains(&flag) || LONG_LINT_LEVELS.contains(&flag) {
            flags.next()
        } else {
            LINT_LEVELS
                .iter()
                .find_map(|level| flag.strip_prefix(level))
        };
        if !lint.is_some_and(is_lint_name) {
            return false;
        }
    }
    true
}

fn is_lint_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: JobKind, args: &str) -> CargoJob {
        CargoJob {
            kind,
            cargo_args: args.split_whitespace().map(str::to_owned).collect(),
        }
    }

    #[test]
    fn plain_variables_profile_choices_and_lint_levels_are_vouched_for() {
        for (name, value) in [
            ("RUST_BACKTRACE", "1"),
            ("RUST_LOG", "debug"),
            ("CARGO_INCREMENTAL", "0"),
            ("CARGO_PROFILE_DEV_DEBUG", "0"),
            ("CARGO_PROFILE_RELEASE_LTO", "thin"),
            ("CARGO_PROFILE_DEV_BUILD_OVERRIDE_OPT_LEVEL", "3"),
            ("RUSTFLAGS", "-D warnings"),
            (
                "RUSTFLAGS",
                "  -Dwarnings   -A clippy::all --warn unused-imports ",
            ),
            ("RUSTFLAGS", ""),
            ("RUSTDOCFLAGS", "-D rustdoc::broken-intra-doc-links"),
        ] {
            assert_eq!(env(name, value), Ok(()), "{name}={value:?}");
        }
    }

    #[test]
    fn compiler_flags_beyond_lint_levels_and_program_settings_are_not() {
        for (name, value) in [
            ("RUSTFLAGS", "-C linker=/tmp/l"),
            ("RUSTFLAGS", "-Clinker=/tmp/l"),
            ("RUSTFLAGS", "-D warnings -C link-arg=-fuse-ld=/tmp/ld"),
            ("RUSTFLAGS", "-Zllvm-plugins=/tmp/p.so"),
            ("RUSTFLAGS", "@/tmp/flags"),
            ("RUSTFLAGS", "-D"),
            ("RUSTFLAGS", "-W -Clinker=/tmp/l"),
            ("RUSTFLAGS", "-D\twarnings"),
            ("RUSTFLAGS", "--deny=warnings"),
            ("RUSTDOCFLAGS", "--test-builder /tmp/b"),
            ("RUSTDOCFLAGS", "--runtool /tmp/r"),
            ("CARGO_PROFILE_DEV_RUSTFLAGS", "-D warnings"),
            ("CARGO_PROFILE_DEV_CODEGEN_BACKEND", "/tmp/b.so"),
            ("CARGO_PROFILE_DEBUG", "0"),
            ("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sh"),
            ("RUSTC_WRAPPER", "x"),
            ("CARGO_BUILD_JOBS_EXTRA", "1"),
        ] {
            assert_eq!(
                env(name, value),
                Err(PassThrough::Unvouched(name.to_owned())),
                "{name}={value:?}"
            );
        }
    }

    #[test]
    fn ordinary_arguments_are_vouched_for() {
        for (kind, args) in [
            (JobKind::Test, ""),
            (
                JobKind::Test,
                "-p app --release --features=a,b -- --nocapture",
            ),
            (
                JobKind::Test,
                "-- -Z unstable-options --format json --config x",
            ),
            (JobKind::Build, "--target x86_64-unknown-linux-gnu"),
            (JobKind::Build, "--target=thumbv8m.main-none-eabi"),
            (
                JobKind::Check,
                "--manifest-path app/Cargo.toml -q --message-format=short",
            ),
            (
                JobKind::Clippy,
                "--all-targets -- -D warnings -Wclippy::pedantic",
            ),
            (JobKind::Clippy, "--"),
            (JobKind::Nextest, "-p app --no-fail-fast -E test(quad)"),
        ] {
            assert_eq!(cargo_args(&job(kind, args)), Ok(()), "{kind} {args:?}");
        }
    }

    #[test]
    fn config_unstable_flags_target_files_and_clippy_compiler_flags_are_not() {
        for (kind, args, what) in [
            (JobKind::Test, "--config x.toml", "--config"),
            (
                JobKind::Test,
                "-p a --config=build.rustc-wrapper=/w",
                "--config",
            ),
            (JobKind::Test, "--config -- --nocapture", "--config"),
            (JobKind::Test, "-Zbuild-std", "-Z"),
            (JobKind::Test, "-Z build-std", "-Z"),
            (JobKind::Build, "-qZbuild-std", "-Z"),
            (JobKind::Build, "--target /tmp/t.json", "a --target file"),
            (JobKind::Build, "--target=t.json", "a --target file"),
            (JobKind::Build, "--target=../t", "a --target file"),
            (JobKind::Build, "--target", "a --target file"),
            (
                JobKind::Clippy,
                "-- -C linker=/tmp/l",
                "a clippy compiler flag other than a lint level",
            ),
            (
                JobKind::Clippy,
                "-- -D warnings --extern m=/tmp/m.so",
                "a clippy compiler flag other than a lint level",
            ),
            (
                JobKind::Nextest,
                "--archive-file /tmp/a.tar.zst",
                "--archive-file",
            ),
            (
                JobKind::Nextest,
                "--no-fail-fast --config-file=/tmp/n.toml",
                "--config-file",
            ),
        ] {
            assert_eq!(
                cargo_args(&job(kind, args)),
                Err(PassThrough::Unvouched(what.to_owned())),
                "{kind} {args:?}"
            );
        }
    }
}
