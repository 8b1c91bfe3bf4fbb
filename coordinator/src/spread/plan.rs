//! What a spread run's parts run and how their reports add up. Pure: no job is started
//! here.

use std::collections::BTreeMap;
use std::fmt;

use buildpool_core::job::{EXIT_CANCELLED, JobEnd};
use buildpool_core::{EnvVar, JobId, JobKind, JobSpec};

use crate::mcp::report::{MAX_FAILURES, Report, TestCounts, TestFailure};

/// What `cargo test` exits with when a test failed or the tests did not build.
pub const EXIT_TESTS_FAILED: u8 = 101;

/// cargo's target selections: with one of them `cargo test` runs no doctests, and
/// `cargo test --doc` refuses the mix.
const TARGET_SELECTIONS: &[&str] = &[
    "--lib",
    "--bin",
    "--bins",
    "--test",
    "--tests",
    "--example",
    "--examples",
    "--bench",
    "--benches",
    "--all-targets",
];

/// `cargo test`'s options about running the tests, not building them: the slices say
/// their own, and `cargo nextest archive` takes none.
const RUN_OPTIONS: &[&str] = &["--no-fail-fast", "--no-run"];

/// `cargo test`'s options that take a value as the next word: that word is no test name.
const OPTIONS_WITH_VALUES: &[&str] = &[
    "-p",
    "--package",
    "--exclude",
    "--bin",
    "--example",
    "--test",
    "--bench",
    "-F",
    "--features",
    "-j",
    "--jobs",
    "--profile",
    "--target",
    "--target-dir",
    "--manifest-path",
    "--message-format",
    "--color",
    "--config",
    "-Z",
    "--lockfile-path",
];

/// One part of a spread run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `cargo nextest archive`: the tests, built once.
    Archive,
    /// `cargo nextest run --partition count:INDEX/COUNT` (1-based, as nextest counts) from
    /// the archive.
    Slice { index: u32, count: u32 },
    /// `cargo test --doc`.
    Doctests,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Archive => f.write_str("test build (nextest archive)"),
            Part::Slice { index, count } => write!(f, "slice {index}/{count}"),
            Part::Doctests => f.write_str("doctests"),
        }
    }
}

/// What a `cargo test` with given arguments becomes when spread.
#[derive(Debug, Clone)]
pub struct Plan {
    test: JobSpec,
    slices: u32,
    /// What builds the tests: cargo's options (packages, features, profile, targets).
    build_args: Vec<String>,
    /// What selects tests when they run: test names before `--`, then `--` and the test
    /// binary's arguments, which nextest takes as `cargo test` does.
    run_args: Vec<String>,
    doctests: bool,
}

impl Plan {
    /// The plan for `test` (a `cargo test` job's spec) over `slices` slices.
    pub fn new(test: &JobSpec, slices: u32) -> Self {
        let (options, trailing) = match test.cargo_args.iter().position(|arg| arg == "--") {
            Some(at) => test.cargo_args.split_at(at),
            None => (&test.cargo_args[..], &[][..]),
        };
        let mut build_args = Vec::new();
        let mut names = Vec::new();
        let mut takes_value = false;
        for arg in options {
            if !takes_value && RUN_OPTIONS.contains(&arg.as_str()) {
                continue;
            }
            if takes_value || arg.starts_with('-') {
                // nextest names cargo's message format for what it builds this way.
                build_args.push(match arg.strip_prefix("--message-format") {
                    Some(rest) if !takes_value => format!("--cargo-message-format{rest}"),
                    _ => arg.clone(),
                });
                takes_value = !takes_value && OPTIONS_WITH_VALUES.contains(&arg.as_str());
            } else {
                names.push(arg.clone());
            }
        }
        let selects_targets = build_args
            .iter()
            .map(|arg| arg.split('=').next().unwrap_or(arg))
            .any(|arg| TARGET_SELECTIONS.contains(&arg));
        Self {
            test: test.clone(),
            slices: slices.max(1),
            build_args,
            run_args: names.into_iter().chain(trailing.iter().cloned()).collect(),
            doctests: !selects_targets,
        }
    }

    /// The parts that start at once: the archive, and the doctests unless the arguments
    /// select targets (then `cargo test` runs none).
    pub fn first_parts(&self) -> Vec<(Part, JobSpec)> {
        let mut archive = self.base(JobKind::NextestArchive);
        archive.cargo_args.clone_from(&self.build_args);
        let mut parts = vec![(Part::Archive, archive)];
        if self.doctests {
            let mut doctests = self.base(JobKind::Test);
            doctests.cargo_args = ["--doc", "--no-fail-fast"]
                .map(str::to_owned)
                .into_iter()
                .chain(self.test.cargo_args.iter().cloned())
                .collect();
            parts.push((Part::Doctests, doctests));
        }
        parts
    }

    /// The slices, each running its share of the archive `archive_job` built.
    pub fn slices(&self, archive_job: JobId) -> Vec<(Part, JobSpec)> {
        let count = self.slices;
        (1..=count)
            .map(|index| {
                let mut slice = self.base(JobKind::Nextest);
                slice.archive_from = Some(archive_job);
                // Every test runs, as `cargo test --no-fail-fast` would: counts add up
                // only over whole slices. Results come as libtest's JSON events on
                // stdout; nextest's own lines stay on stderr.
                slice.cargo_args = [
                    "--no-fail-fast",
                    "--partition",
                    &format!("count:{index}/{count}"),
                    "--message-format",
                    "libtest-json-plus",
                ]
                .map(str::to_owned)
                .into_iter()
                .chain(self.run_args.iter().cloned())
                .collect();
                slice.env.push(EnvVar {
                    name: "NEXTEST_EXPERIMENTAL_LIBTEST_JSON".to_owned(),
                    value: "1".to_owned(),
                });
                (Part::Slice { index, count }, slice)
            })
            .collect()
    }

    fn base(&self, kind: JobKind) -> JobSpec {
        JobSpec {
            kind,
            cargo_args: Vec::new(),
            collect_executables: false,
            archive_from: None,
            ..self.test.clone()
        }
    }
}

/// How the parts of a run ended, added up.
#[derive(Debug, Default)]
pub struct Tally {
    passed: u64,
    failed: u64,
    /// Ignored tests per test binary: every slice reports every binary's, so they are
    /// taken once per binary.
    ignored_in_slices: BTreeMap<String, u64>,
    ignored_doctests: u64,
    failures: Vec<TestFailure>,
    /// The exit code that stands for the first part that did not run its tests to the
    /// end (cancelled, timed out, failed to start), if any.
    broken: Option<u8>,
    /// A part whose cargo exited non-zero (a failing test, or tests that did not build).
    failed_part: bool,
    /// What the test build said: its compiler diagnostics, the end of its stderr.
    build: Report,
}

impl Tally {
    /// Adds what `part` reported and how its job ended.
    pub fn add(&mut self, part: Part, report: &Report, end: &JobEnd) {
        let counts = report.tests.clone().unwrap_or_default();
        self.passed += counts.passed;
        self.failed += counts.failed;
        match part {
            Part::Slice { .. } => {
                for (binary, ignored) in &report.ignored_by_binary {
                    let count = self.ignored_in_slices.entry(binary.clone()).or_default();
                    *count = (*count).max(*ignored);
                }
            }
            Part::Doctests => self.ignored_doctests += counts.ignored.unwrap_or(0),
            Part::Archive => self.build = report.clone(),
        }
        self.failures.extend(report.failures.iter().cloned());
        match end {
            JobEnd::Exited { code: 0 } => {}
            JobEnd::Exited { .. } if part == Part::Doctests && no_library(report) => {}
            JobEnd::Exited { .. } => self.failed_part = true,
            other => {
                self.broken.get_or_insert(other.exit_code());
            }
        }
    }

    /// Whether every part ran and every test passed.
    pub fn ok(&self) -> bool {
        self.failed == 0 && !self.failed_part && self.broken.is_none()
    }

    /// libtest's closing line, over every part: `test result: ok. P passed; F failed; I
    /// ignored; 0 measured; 0 filtered out`.
    pub fn result_line(&self) -> String {
        let ignored = self.ignored();
        format!(
            "test result: {}. {} passed; {} failed; {ignored} ignored; 0 measured; 0 filtered out",
            if self.ok() { "ok" } else { "FAILED" },
            self.passed,
            self.failed
        )
    }

    /// The failing tests, with their panic messages.
    pub fn failures(&self) -> &[TestFailure] {
        &self.failures
    }

    /// The run as one report: the test build's diagnostics, and every part's tests.
    pub fn report(&self) -> Report {
        let shown = self.failures.len().min(MAX_FAILURES);
        Report {
            tests: Some(TestCounts {
                passed: self.passed,
                failed: self.failed,
                ignored: Some(self.ignored()),
                skipped: None,
            }),
            failures: self.failures[..shown].to_vec(),
            failures_omitted: usize::try_from(self.failed)
                .unwrap_or(usize::MAX)
                .saturating_sub(shown),
            ..self.build.clone()
        }
    }

    fn ignored(&self) -> u64 {
        self.ignored_in_slices.values().sum::<u64>() + self.ignored_doctests
    }

    /// What `cargo test` would exit with: 0, 101 for failing (or unbuildable) tests, or
    /// the code of a part that was cancelled or timed out.
    pub fn exit_code(&self) -> u8 {
        match self.broken {
            Some(code) => code,
            None if self.ok() => 0,
            None => EXIT_TESTS_FAILED,
        }
    }

    /// Whether the run was cancelled rather than failed.
    pub fn cancelled(&self) -> bool {
        self.broken == Some(EXIT_CANCELLED)
    }
}

/// `cargo test --doc` in a package without a library: there are no doctests to run.
fn no_library(report: &Report) -> bool {
    report
        .stderr_tail
        .iter()
        .any(|line| line.contains("no library targets found"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::report::ReportBuilder;
    use buildpool_core::OutputStream;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| (*arg).to_owned()).collect()
    }

    fn report(stream: OutputStream, text: &str) -> Report {
        let mut builder = ReportBuilder::new();
        builder.feed(stream, text.as_bytes());
        builder.finish()
    }

    /// What nextest 0.9.143 wrote (events trimmed) for slice 1/2 of a crate with tests
    /// a..e (c ignored, d failing) and an integration test binary with it1 and it2
    /// (ignored). Only some ignored tests get an event of their own; every suite event
    /// counts its binary's.
    const SLICE_1: &str = r#"{"type":"test","event":"ignored","name":"nx::nx$tests::c"}
{"type":"test","event":"ok","name":"nx::nx$tests::a","exec_time":0.01}
{"type":"suite","event":"ok","passed":1,"failed":0,"ignored":1,"measured":0,"filtered_out":2,"exec_time":0.01,"nextest":{"crate":"nx","test_binary":"nx","kind":"lib"}}
{"type":"suite","event":"ok","passed":0,"failed":0,"ignored":1,"measured":0,"filtered_out":1,"exec_time":0,"nextest":{"crate":"nx","test_binary":"it","kind":"test"}}
{"type":"test","event":"ok","name":"nx::it$it1","exec_time":0.01}
{"type":"suite","event":"ok","passed":1,"failed":0,"ignored":1,"measured":0,"filtered_out":1,"exec_time":0.01,"nextest":{"crate":"nx","test_binary":"it","kind":"test"}}
{"type":"test","event":"failed","name":"nx::nx$tests::d","exec_time":0.1,"stdout":"\nthread 'tests::d' panicked at src/lib.rs:11:22:\nboom d\n"}
{"type":"suite","event":"failed","passed":0,"failed":1,"ignored":1,"measured":0,"filtered_out":3,"exec_time":0.1,"nextest":{"crate":"nx","test_binary":"nx","kind":"lib"}}
"#;
    const SLICE_2: &str = r#"{"type":"suite","event":"ok","passed":0,"failed":0,"ignored":1,"measured":0,"filtered_out":1,"exec_time":0,"nextest":{"crate":"nx","test_binary":"it","kind":"test"}}
{"type":"test","event":"ok","name":"nx::nx$tests::b","exec_time":0.01}
{"type":"suite","event":"ok","passed":1,"failed":0,"ignored":1,"measured":0,"filtered_out":2,"exec_time":0.01,"nextest":{"crate":"nx","test_binary":"nx","kind":"lib"}}
{"type":"test","event":"ok","name":"nx::nx$tests::e","exec_time":0.02}
{"type":"suite","event":"ok","passed":1,"failed":0,"ignored":1,"measured":0,"filtered_out":2,"exec_time":0.02,"nextest":{"crate":"nx","test_binary":"nx","kind":"lib"}}
"#;
    const DOCTESTS: &str = "running 2 tests\ntest src/lib.rs - two (line 2) ... ok\n\
        test src/lib.rs - three (line 9) ... ignored\n\n\
        test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.20s\n";

    #[test]
    fn the_tests_build_once_and_slices_run_their_share_of_the_archive() {
        let mut test = JobSpec::new(JobKind::Test);
        test.cargo_args = args(&[
            "--message-format=json",
            "--no-fail-fast",
            "-p",
            "app",
            "--release",
            "parse",
            "--",
            "--exact",
        ]);
        let plan = Plan::new(&test, 2);
        let first = plan.first_parts();
        let (part, archive) = &first[0];
        assert_eq!(*part, Part::Archive);
        assert_eq!(archive.kind, JobKind::NextestArchive);
        assert_eq!(
            archive.cargo_args,
            args(&["--cargo-message-format=json", "-p", "app", "--release"])
        );
        let (part, doctests) = &first[1];
        assert_eq!(*part, Part::Doctests);
        assert_eq!(
            doctests.cargo_args,
            args(&[
                "--doc",
                "--no-fail-fast",
                "--message-format=json",
                "--no-fail-fast",
                "-p",
                "app",
                "--release",
                "parse",
                "--",
                "--exact"
            ])
        );

        let slices = plan.slices(41);
        assert_eq!(slices.len(), 2);
        let (part, slice) = &slices[1];
        assert_eq!(*part, Part::Slice { index: 2, count: 2 });
        assert_eq!(
            (slice.kind, slice.archive_from),
            (JobKind::Nextest, Some(41))
        );
        assert_eq!(
            slice.cargo_args,
            args(&[
                "--no-fail-fast",
                "--partition",
                "count:2/2",
                "--message-format",
                "libtest-json-plus",
                "parse",
                "--",
                "--exact"
            ])
        );
        assert!(
            slice
                .env
                .iter()
                .any(|var| var.name == "NEXTEST_EXPERIMENTAL_LIBTEST_JSON")
        );
        for (_, spec) in first.iter().chain(&slices) {
            buildpool_core::spec::validate(spec).expect("a valid job");
        }
    }

    #[test]
    fn selected_targets_run_no_doctests_as_cargo_test_runs_none() {
        let doctests = |list: &[&str]| {
            let mut test = JobSpec::new(JobKind::Test);
            test.cargo_args = args(list);
            Plan::new(&test, 3)
                .first_parts()
                .iter()
                .any(|(part, _)| *part == Part::Doctests)
        };
        for selection in [
            &["--lib"][..],
            &["--test=api"],
            &["--all-targets", "-p", "a"],
        ] {
            assert!(!doctests(selection), "{selection:?}");
        }
        // After `--` the words are the test binary's, not cargo's.
        assert!(doctests(&["--", "--lib"]));
    }

    #[test]
    fn counts_add_up_over_slices_with_ignored_tests_counted_once() {
        let mut tally = Tally::default();
        let failed = JobEnd::Exited { code: 100 };
        tally.add(
            Part::Slice { index: 1, count: 2 },
            &report(OutputStream::Stdout, SLICE_1),
            &failed,
        );
        let ok = JobEnd::Exited { code: 0 };
        tally.add(
            Part::Slice { index: 2, count: 2 },
            &report(OutputStream::Stdout, SLICE_2),
            &ok,
        );
        tally.add(Part::Doctests, &report(OutputStream::Stdout, DOCTESTS), &ok);
        // Locally: 4 passed, 1 failed, 2 ignored in the crate; 1 passed, 1 ignored doctest.
        assert_eq!(
            tally.result_line(),
            "test result: FAILED. 5 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out"
        );
        assert_eq!(tally.exit_code(), EXIT_TESTS_FAILED);
        assert_eq!(tally.failures()[0].name, "tests::d");
        assert!(tally.failures()[0].message.contains("boom d"));
    }

    #[test]
    fn a_clean_run_is_ok_and_a_cancelled_part_gives_the_cancel_code() {
        let ok = JobEnd::Exited { code: 0 };
        let mut tally = Tally::default();
        tally.add(
            Part::Slice { index: 1, count: 1 },
            &report(OutputStream::Stdout, SLICE_2),
            &ok,
        );
        let no_lib = report(
            OutputStream::Stderr,
            "error: no library targets found in package `app`\n",
        );
        tally.add(Part::Doctests, &no_lib, &JobEnd::Exited { code: 101 });
        assert!(tally.ok(), "{}", tally.result_line());
        assert_eq!(tally.exit_code(), 0);
        assert!(
            tally
                .result_line()
                .starts_with("test result: ok. 2 passed; 0 failed; 2 ignored")
        );

        tally.add(
            Part::Slice { index: 1, count: 1 },
            &Report::default(),
            &JobEnd::Cancelled,
        );
        assert!(tally.cancelled());
        assert_eq!(tally.exit_code(), EXIT_CANCELLED);
    }
}
