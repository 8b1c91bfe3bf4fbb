//! What the cargo shim will do with each program a command line starts: `hook explain`.
//!
//! The shim decides each cargo as it starts, from its real arguments and directory; this
//! says the same beforehand, from the line as [`line`] reads it. It decides nothing.

use std::fmt;
use std::path::Path;

use super::cargo::CargoJob;
use super::line::{self, Invocation, Unreadable};
use super::place::Placement;
use super::{PassThrough, offload_argv, run_args};

/// Where one program of a line runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// On the pool, as this job.
    Pool(CargoJob),
    /// Here, as typed.
    Here(Here),
    /// Decided when it starts: a word or its directory is known only then.
    WhenItStarts,
}

/// Why a program runs here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Here {
    NotCargo,
    /// Started with `&`, where no one waits for it.
    Background,
    Cargo(PassThrough),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pool(job) => write!(f, "pool: buildpool {}", run_args(job).join(" ")),
            Self::Here(Here::NotCargo) => write!(f, "here: not cargo"),
            Self::Here(Here::Background) => write!(
                f,
                "here: started in the background (&), where a pool job would hold a slot \
                 no one watches"
            ),
            Self::Here(Here::Cargo(reason)) => write!(f, "here: {reason}"),
            Self::WhenItStarts => write!(
                f,
                "decided when it starts: a word or its directory is known only then"
            ),
        }
    }
}

/// One program of the line and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub invocation: Invocation,
    pub verdict: Verdict,
}

/// Every program `line` (typed in `cwd`, absolute) starts, and where each runs.
pub fn explain(
    line: &str,
    cwd: &Path,
    mut place: impl FnMut(&Path) -> Result<Placement, PassThrough>,
) -> Result<Vec<Step>, Unreadable> {
    let steps = line::invocations(line, cwd)?
        .into_iter()
        .map(|invocation| {
            let verdict = verdict(&invocation, &mut place);
            Step {
                invocation,
                verdict,
            }
        })
        .collect();
    Ok(steps)
}

fn verdict(
    invocation: &Invocation,
    place: &mut impl FnMut(&Path) -> Result<Placement, PassThrough>,
) -> Verdict {
    let Some(program) = invocation.program() else {
        return match invocation.name.as_deref() {
            Some(name) if name != "cargo" && !line::is_wrapper(name) => {
                Verdict::Here(Here::NotCargo)
            }
            _ => Verdict::WhenItStarts,
        };
    };
    let Some((name, args)) = program.split_first() else {
        return Verdict::Here(Here::NotCargo);
    };
    if name != "cargo" {
        return Verdict::Here(Here::NotCargo);
    }
    // `timeout` gives its child SIGINT and SIGQUIT back, so the shim cannot tell that
    // `timeout 300 cargo test &` is in the background (see the shim's `started_in_background`).
    let wrappers = invocation
        .argv
        .as_deref()
        .map_or(&[][..], |argv| &argv[..argv.len() - program.len()]);
    if invocation.background && !wrappers.iter().any(|wrapper| wrapper == "timeout") {
        return Verdict::Here(Here::Background);
    }
    let Some(dir) = &invocation.dir else {
        return Verdict::WhenItStarts;
    };
    match offload_argv(args, dir, &mut *place) {
        Ok(job) => Verdict::Pool(job),
        Err(reason) => Verdict::Here(Here::Cargo(reason)),
    }
}

#[cfg(test)]
mod tests {
    use buildpool_core::JobKind;

    use super::*;

    fn verdicts(line: &str) -> Vec<(String, Verdict)> {
        explain(line, Path::new("/repo"), |_| {
            Ok(Placement { manifest: None })
        })
        .expect("readable")
        .into_iter()
        .map(|step| (step.invocation.typed, step.verdict))
        .collect()
    }

    fn pool(kind: JobKind, args: &[&str]) -> Verdict {
        Verdict::Pool(CargoJob {
            kind,
            cargo_args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        })
    }

    #[test]
    fn each_cargo_of_a_compound_line_is_judged_alone() {
        assert_eq!(
            verdicts("cargo fmt && cargo clippy 2>&1 | tail -20"),
            [
                (
                    "cargo fmt".to_owned(),
                    Verdict::Here(Here::Cargo(PassThrough::Subcommand("fmt".into())))
                ),
                ("cargo clippy 2>&1".to_owned(), pool(JobKind::Clippy, &[])),
                ("tail -20".to_owned(), Verdict::Here(Here::NotCargo)),
            ]
        );
        assert_eq!(
            verdicts("timeout 300 cargo test -p app")[0].1,
            pool(JobKind::Test, &["-p", "app"])
        );
    }

    #[test]
    fn background_toolchains_and_run_time_words_are_said_so() {
        assert_eq!(
            verdicts("cargo test & wait")[0].1,
            Verdict::Here(Here::Background)
        );
        assert_eq!(
            verdicts("timeout 300 cargo test & wait")[0].1,
            pool(JobKind::Test, &[])
        );
        assert_eq!(
            verdicts("cargo +nightly test")[0].1,
            Verdict::Here(Here::Cargo(PassThrough::Toolchain))
        );
        assert_eq!(
            verdicts("for p in a b; do cargo test -p $p; done")[0].1,
            Verdict::WhenItStarts
        );
        assert_eq!(verdicts("echo $HOME")[0].1, Verdict::Here(Here::NotCargo));
    }

    #[test]
    fn the_directory_a_cd_leaves_is_where_cargo_is_placed() {
        let mut asked = Vec::new();
        explain("cd app && cargo test", Path::new("/repo"), |dir| {
            asked.push(dir.to_owned());
            Ok(Placement {
                manifest: Some("app/Cargo.toml".into()),
            })
        })
        .expect("readable");
        assert_eq!(asked, [Path::new("/repo/app")]);
    }
}
