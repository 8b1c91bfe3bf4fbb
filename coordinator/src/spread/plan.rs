//! What a spread run's parts run and how their reports add up. Pure: no job is started
//! here.

use std::collections::BTreeMap;
use std::fmt;

use buildpool_core::job::{EXIT_CANCELLED, JobEnd};
use buildpool_core::{EnvVar, JobId, JobKind, JobSpec};

use crate::report::{MAX_FAILURES, Report, TestCounts, TestFailure};

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
            // Every doctest runs, as in the slices; cargo refuses the flag given twice.
            let fail_fast = (!self
                .test
                .cargo_args
                .iter()
                .any(|arg| arg == "--no-fail-fast"))
            .then_some("--no-fail-fast");
            doctests.cargo_args = std::iter::once("--doc")
                .chain(fail_fast)
                .map(str::to_owned)
                .chain(self.test.cargo_args.iter().cloned())
                .collect();
            parts.push((Part::Doctests, doctests));
        }
        parts
    }

    /// The slices, each running its share of the archive `archive_job` built: test
    /// binaries balanced by how long they ran before (`history`, milliseconds by nextest
    /// binary id) when that can balance them, else nextest's partitions by count.
    pub fn slices(
        &self,
        archive_job: JobId,
        history: &BTreeMap<String, u64>,
    ) -> Vec<(Part, JobSpec)> {
        let count = self.slices;
        let shares = balance(history, count);
        (1..=count)
            .map(|index| {
                let mut slice = self.base(JobKind::Nextest);
                slice.archive_from = Some(archive_job);
                // Every test runs, as `cargo test --no-fail-fast` would: counts add up
                // only over whole slices.
                let mut args = vec!["--no-fail-fast".to_owned()];
                match &shares {
                    Some(shares) => args.extend(shares[index as usize - 1].iter().cloned()),
                    None => {
                        args.extend(["--partition".to_owned(), format!("count:{index}/{count}")])
                    }
                }
                // Results come as libtest's JSON events on stdout; nextest's own lines
                // stay on stderr.
                args.extend(["--message-format", "libtest-json-plus"].map(str::to_owned));
                args.extend(self.run_args.iter().cloned());
                slice.cargo_args = args;
                slice.env.push(EnvVar {
                    name: "NEXTEST_EXPERIMENTAL_LIBTEST_JSON".to_owned(),
                    value: "1".to_owned(),
                });
                (Part::Slice { index, count }, slice)
            })
            .collect()
    }

    /// Whether `history` balances the slices (see [`Plan::slices`]).
    pub fn balances(&self, history: &BTreeMap<String, u64>) -> bool {
        balance(history, self.slices).is_some()
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

/// The bytes of one `-E` filterset argument at most (a job's argument is 4096 at most).
const MAX_FILTERSET_BYTES: usize = 3072;

/// Each slice's filterset arguments (`-E EXPR`, ORed by nextest) when the test binaries
/// that ran before can be shared out evenly by their durations, longest first to the
/// least loaded slice; nextest's own partitions count tests and ignore how long they run.
/// The least loaded slice also takes every binary not seen before, so each test runs in
/// exactly one slice. `None` (partition by count) without enough binaries to balance, or
/// when one binary alone would outlast an even share.
fn balance(history: &BTreeMap<String, u64>, slices: u32) -> Option<Vec<Vec<String>>> {
    let slices = slices as usize;
    let total: u64 = history.values().sum();
    let longest = history.values().copied().max()?;
    if history.len() < 2 * slices || total == 0 || longest * slices as u64 > total {
        return None;
    }
    let mut binaries: Vec<(&String, u64)> = history.iter().map(|(id, ms)| (id, *ms)).collect();
    binaries.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut loads = vec![(0u64, Vec::new()); slices];
    for (id, ms) in binaries {
        let (load, ids) = loads.iter_mut().min_by_key(|(load, _)| *load)?;
        *load += ms;
        ids.push(format!("binary_id(={id})"));
    }
    let newcomers = format!(
        "not ({})",
        history
            .keys()
            .map(|id| format!("binary_id(={id})"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    if newcomers.len() > MAX_FILTERSET_BYTES {
        return None;
    }
    let least = loads
        .iter()
        .enumerate()
        .min_by_key(|(_, (load, _))| *load)
        .map(|(at, _)| at)?;
    let mut shares = Vec::with_capacity(slices);
    for (at, (_, ids)) in loads.into_iter().enumerate() {
        let mut args = Vec::new();
        let mut expression = String::new();
        for id in ids {
            if !expression.is_empty() && expression.len() + id.len() + 3 > MAX_FILTERSET_BYTES {
                args.extend(["-E".to_owned(), std::mem::take(&mut expression)]);
            }
            if !expression.is_empty() {
                expression.push_str(" | ");
            }
            expression.push_str(&id);
        }
        args.extend(["-E".to_owned(), expression]);
        if at == least {
            args.extend(["-E".to_owned(), newcomers.clone()]);
        }
        shares.push(args);
    }
    Some(shares)
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
    /// Milliseconds each test binary's tests ran, over every slice.
    millis_by_binary: BTreeMap<String, u64>,
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
                for (binary, millis) in &report.millis_by_binary {
                    *self.millis_by_binary.entry(binary.clone()).or_default() += millis;
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

    /// How long each test binary's tests ran, in milliseconds, over every slice.
    pub fn millis_by_binary(&self) -> &BTreeMap<String, u64> {
        &self.millis_by_binary
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
    use crate::report::ReportBuilder;
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
        let given = [
            "--message-format=json",
            "--no-fail-fast",
            "-p",
            "app",
            "--release",
            "parse",
            "--",
            "--exact",
        ];
        let mut test = JobSpec::new(JobKind::Test);
        test.cargo_args = args(&given);
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
        // `--no-fail-fast` once: cargo refuses it twice.
        let mut expected = vec!["--doc"];
        expected.extend(given);
        assert_eq!(doctests.cargo_args, args(&expected));
        let bare = Plan::new(&JobSpec::new(JobKind::Test), 2).first_parts();
        assert_eq!(bare[1].1.cargo_args, args(&["--doc", "--no-fail-fast"]));

        let slices = plan.slices(41, &BTreeMap::new());
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
    fn slices_share_the_binaries_by_how_long_they_ran_and_new_ones_go_to_the_lightest() {
        let history: BTreeMap<String, u64> = [
            ("app", 9000),
            ("app::api", 7000),
            ("app::db", 5000),
            ("app::cli", 3000),
            ("app::bin/tool", 1000),
            ("util", 1000),
        ]
        .map(|(id, ms)| (id.to_owned(), ms))
        .into();
        let shares = balance(&history, 2).expect("balanced");
        // Longest first to the lightest: 9+3+1 against 7+5+1, 13 s each; the first of
        // the lightest also takes the binaries never seen.
        assert_eq!(
            shares[0],
            args(&[
                "-E",
                "binary_id(=app) | binary_id(=app::cli) | binary_id(=app::bin/tool)",
                "-E",
                "not (binary_id(=app) | binary_id(=app::api) | binary_id(=app::bin/tool) | \
                 binary_id(=app::cli) | binary_id(=app::db) | binary_id(=util))",
            ])
        );
        assert_eq!(
            shares[1],
            args(&[
                "-E",
                "binary_id(=app::api) | binary_id(=app::db) | binary_id(=util)",
            ])
        );
        let mut test = JobSpec::new(JobKind::Test);
        test.cargo_args = args(&["--", "--exact"]);
        let (_, slice) = &Plan::new(&test, 2).slices(7, &history)[0];
        assert_eq!(
            slice.cargo_args[..3],
            args(&["--no-fail-fast", "-E", &shares[0][1]])
        );
        assert!(!slice.cargo_args.contains(&"--partition".to_owned()));
    }

    #[test]
    fn without_enough_binaries_to_balance_the_slices_count_tests() {
        let few: BTreeMap<String, u64> = [("app", 10), ("app::api", 10), ("util", 10)]
            .map(|(id, ms)| (id.to_owned(), ms))
            .into();
        assert_eq!(balance(&few, 2), None);
        let dominated: BTreeMap<String, u64> = [
            ("app", 10_000),
            ("app::api", 10),
            ("app::db", 10),
            ("util", 10),
        ]
        .map(|(id, ms)| (id.to_owned(), ms))
        .into();
        assert_eq!(balance(&dominated, 2), None);
        assert_eq!(balance(&BTreeMap::new(), 2), None);
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
