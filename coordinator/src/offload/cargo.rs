//! Which cargo command lines `buildpool run` carries exactly, and as what job.

use buildpool_core::{JobKind, JobSpec};

use super::PassThrough;

/// Global cargo flags that mean the same after the subcommand, where `run` puts them.
const MOVABLE_GLOBAL_FLAGS: &[&str] = &[
    "-q",
    "--quiet",
    "-v",
    "-vv",
    "--verbose",
    "--locked",
    "--offline",
    "--frozen",
];

/// Flags whose effect is on this machine's files, which a job on an agent cannot have:
/// `--fix` edits the sources, the others copy build outputs somewhere here.
const LOCAL_EFFECT_FLAGS: &[&str] = &["--fix", "--artifact-dir", "--out-dir"];

/// Flags whose value is a path, read relative to the directory cargo runs in.
pub(super) const PATH_FLAGS: &[&str] = &["--manifest-path", "--config", "--lockfile-path"];

/// What `cargo ARGS` becomes on the pool: `buildpool run KIND -- CARGO_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CargoJob {
    pub kind: JobKind,
    pub cargo_args: Vec<String>,
}

impl CargoJob {
    /// Whether an argument of cargo's own (before a bare `--`) is `flag` or `flag=...`.
    pub fn has_flag(&self, flag: &str) -> bool {
        cargo_own(&self.cargo_args).any(|arg| flag_name(arg) == flag)
    }
}

fn flag_name(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(name, _)| name)
}

/// Arguments up to a bare `--`: after it they belong to the test binary or clippy-driver.
fn cargo_own(args: &[String]) -> impl Iterator<Item = &str> {
    args.iter()
        .map(String::as_str)
        .take_while(|arg| *arg != "--")
}

/// Reads the arguments after `cargo`. Only commands that build or check without changing
/// anything here are offloaded, and only when a job spec carries every argument.
pub fn classify(args: &[String]) -> Result<CargoJob, PassThrough> {
    let mut global_flags = Vec::new();
    let mut rest = args.iter();
    let subcommand = loop {
        let arg = rest.next().ok_or(PassThrough::NoSubcommand)?;
        if arg.starts_with('+') {
            return Err(PassThrough::Toolchain);
        } else if MOVABLE_GLOBAL_FLAGS.contains(&arg.as_str()) || arg.starts_with("--color=") {
            global_flags.push(arg.clone());
        } else if arg == "--color" {
            let value = rest.next().ok_or(PassThrough::NoSubcommand)?;
            global_flags.extend([arg.clone(), value.clone()]);
        } else if arg.starts_with('-') {
            return Err(PassThrough::GlobalFlag(arg.clone()));
        } else {
            break arg;
        }
    };
    let kind = if subcommand == "nextest" {
        // `cargo nextest run` only: its other subcommands (list, archive, ...) run here.
        match rest.next() {
            Some(run) if run == "run" || run == "r" => JobKind::Nextest,
            other => {
                return Err(PassThrough::Subcommand(format!(
                    "nextest {}",
                    other.map_or("", String::as_str)
                )));
            }
        }
    } else {
        JobKind::from_subcommand(subcommand)
            .ok_or_else(|| PassThrough::Subcommand(subcommand.clone()))?
    };
    let mut cargo_args = global_flags;
    cargo_args.extend(rest.cloned());
    for arg in cargo_own(&cargo_args) {
        if arg == "-h" || arg == "--help" {
            return Err(PassThrough::Help);
        }
        if LOCAL_EFFECT_FLAGS.contains(&flag_name(arg)) {
            return Err(PassThrough::LocalEffect(flag_name(arg).to_owned()));
        }
    }
    let job = CargoJob { kind, cargo_args };
    let spec = JobSpec {
        cargo_args: job.cargo_args.clone(),
        ..JobSpec::new(kind)
    };
    buildpool_core::spec::validate(&spec)
        .map_err(|error| PassThrough::NotCarried(error.0.clone()))?;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classified(args: &str) -> Result<CargoJob, PassThrough> {
        let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        classify(&args)
    }

    fn job(kind: JobKind, args: &[&str]) -> Result<CargoJob, PassThrough> {
        Ok(CargoJob {
            kind,
            cargo_args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        })
    }

    #[test]
    fn the_offloaded_subcommands_and_their_aliases_keep_every_argument() {
        assert_eq!(classified("test"), job(JobKind::Test, &[]));
        assert_eq!(classified("t -p app"), job(JobKind::Test, &["-p", "app"]));
        assert_eq!(
            classified("build --release"),
            job(JobKind::Build, &["--release"])
        );
        assert_eq!(classified("b"), job(JobKind::Build, &[]));
        assert_eq!(
            classified("check --all-targets"),
            job(JobKind::Check, &["--all-targets"])
        );
        assert_eq!(classified("c"), job(JobKind::Check, &[]));
        assert_eq!(
            classified("clippy --workspace --all-targets -- -D warnings"),
            job(
                JobKind::Clippy,
                &["--workspace", "--all-targets", "--", "-D", "warnings"]
            )
        );
        assert_eq!(
            classified("test -- --nocapture --test-threads=1"),
            job(JobKind::Test, &["--", "--nocapture", "--test-threads=1"])
        );
        assert_eq!(
            classified("nextest run -p app --no-fail-fast -- some_filter"),
            job(
                JobKind::Nextest,
                &["-p", "app", "--no-fail-fast", "--", "some_filter"]
            )
        );
        assert_eq!(classified("nextest r"), job(JobKind::Nextest, &[]));
        // After `--` the arguments are the test binary's, whatever they look like.
        assert_eq!(
            classified("test -- --fix --help"),
            job(JobKind::Test, &["--", "--fix", "--help"])
        );
    }

    #[test]
    fn global_flags_that_mean_the_same_after_the_subcommand_move_there() {
        assert_eq!(
            classified("-q --locked test --lib"),
            job(JobKind::Test, &["-q", "--locked", "--lib"])
        );
        assert_eq!(
            classified("--color always check"),
            job(JobKind::Check, &["--color", "always"])
        );
        assert_eq!(
            classified("--color=never build"),
            job(JobKind::Build, &["--color=never"])
        );
    }

    #[test]
    fn other_commands_toolchains_and_local_effects_pass_through() {
        for (args, reason) in [
            ("run", PassThrough::Subcommand("run".into())),
            ("install ripgrep", PassThrough::Subcommand("install".into())),
            ("publish", PassThrough::Subcommand("publish".into())),
            ("fmt", PassThrough::Subcommand("fmt".into())),
            ("fix", PassThrough::Subcommand("fix".into())),
            (
                "nextest list",
                PassThrough::Subcommand("nextest list".into()),
            ),
            (
                "nextest archive",
                PassThrough::Subcommand("nextest archive".into()),
            ),
            ("nextest", PassThrough::Subcommand("nextest ".into())),
            ("", PassThrough::NoSubcommand),
            ("-q", PassThrough::NoSubcommand),
            ("--version", PassThrough::GlobalFlag("--version".into())),
            (
                "-Zunstable-options test",
                PassThrough::GlobalFlag("-Zunstable-options".into()),
            ),
            ("+nightly test", PassThrough::Toolchain),
            ("test --help", PassThrough::Help),
            ("clippy --fix", PassThrough::LocalEffect("--fix".into())),
            (
                "build --artifact-dir=out",
                PassThrough::LocalEffect("--artifact-dir".into()),
            ),
        ] {
            assert_eq!(classified(args), Err(reason), "{args:?}");
        }
    }

    #[test]
    fn what_a_job_spec_cannot_carry_passes_through() {
        for args in [
            "build --target-dir /tmp/t",
            "test --target-dir=x",
            "test --manifest-path /abs/Cargo.toml",
            "check --manifest-path ../other/Cargo.toml",
        ] {
            assert!(
                matches!(classified(args), Err(PassThrough::NotCarried(_))),
                "{args:?}"
            );
        }
    }

    #[test]
    fn flags_are_found_only_among_cargo_own_arguments() {
        let job = classified("test --manifest-path=a/Cargo.toml -- --config").expect("offloaded");
        assert!(job.has_flag("--manifest-path"));
        assert!(!job.has_flag("--config"));
    }
}
