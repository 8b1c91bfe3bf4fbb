use std::time::Duration;

use buildpool_core::{AgentPhases, Completion, RunEnv};

use super::*;
use crate::report::ReportBuilder;
use crate::report::tests::{compiler_message, span};

fn timings() -> Timings {
    let ms = Duration::from_millis;
    Timings {
        snapshot: ms(9),
        submit: ms(2),
        queued: ms(0),
        phases: AgentPhases {
            cargo: ms(1200),
            ..AgentPhases::default()
        },
        rest: ms(8),
        total: ms(1300),
    }
}

fn finished(kind: JobKind, end: JobEnd, report: Report, placement: Placement) -> ToolAnswer {
    ToolAnswer {
        kind,
        job_id: 12_345,
        placement,
        result: JobResult {
            completion: Completion {
                end,
                duration: Duration::from_millis(1234),
                env: Some(RunEnv::Host),
                phases: AgentPhases::default(),
            },
            agent_id: "worker-1".to_owned(),
            attempt: 1,
            local: false,
            queue_time: Duration::from_millis(5),
        },
        report,
        snapshot_note: None,
        coordinator_note: None,
        timings: timings(),
    }
}

fn size(answer: &JobAnswer) -> usize {
    serde_json::to_string(answer).expect("serializes").len()
}

/// A report of `count` distinct errors and warnings, each message and snippet `width` long.
fn huge_report(count: usize, width: usize) -> Report {
    let mut builder = ReportBuilder::new();
    for n in 0..count {
        let level = if n % 2 == 0 { "error" } else { "warning" };
        let message = compiler_message(
            level,
            &format!("{n} {}", "m".repeat(width)),
            Some(&format!("E{n:04}")),
            &[span(
                &format!("{}/src/lib.rs", "d".repeat(width)),
                n,
                1,
                &"s".repeat(width),
            )],
        );
        builder.feed(
            buildpool_core::OutputStream::Stdout,
            format!("{message}\n").as_bytes(),
        );
    }
    builder.finish()
}

#[test]
fn any_output_gives_an_answer_within_the_bound_with_the_rest_counted() {
    let mut report = huge_report(400, 20_000);
    report.failures = (0..10)
        .map(|n| TestFailure {
            name: format!("tests::case_{n}_{}", "n".repeat(5000)),
            message: "x".repeat(600),
            output: "y".repeat(600),
        })
        .collect();
    report.failures_omitted = 90;
    report.tests = Some(TestCounts {
        passed: 1,
        failed: 100,
        ignored: Some(0),
        skipped: None,
    });
    report.stderr_tail = vec!["z".repeat(10_000); 8];
    let mut finished = finished(
        JobKind::Test,
        JobEnd::Exited { code: 101 },
        report,
        Placement::Unreachable("r".repeat(100_000)),
    );
    finished.snapshot_note = Some("s".repeat(100_000));
    finished.coordinator_note = Some("c".repeat(100_000));
    let answer = finished.answer();
    assert!(size(&answer) <= MAX_JOB_ANSWER, "{} bytes", size(&answer));
    assert_eq!((answer.errors, answer.warnings), (200, 200));
    let listed = answer.diagnostics.len();
    assert!(listed >= 1, "the first error is always shown: {answer:?}");
    assert_eq!(
        answer.more_diagnostics.as_deref(),
        Some(
            format!(
                "{} more diagnostics: job_log job_id=12345 filter=\"error\"",
                400 - listed
            )
            .as_str()
        )
    );
    let more_failures = answer.more_failures.as_deref().expect("failures counted");
    assert!(
        more_failures.ends_with("more failing tests: job_log job_id=12345 filter=\"FAIL\""),
        "{more_failures}"
    );
    let shown_failures = answer.failures.len();
    assert!(more_failures.starts_with(&format!("{} ", 100 - shown_failures)));
}

#[test]
fn a_failure_without_diagnostics_shows_the_end_of_stderr_within_the_bound() {
    let report = Report {
        stderr_tail: vec!["linker `cc` not found".to_owned(); 8],
        ..Report::default()
    };
    let answer = finished(
        JobKind::Build,
        JobEnd::Exited { code: 101 },
        report,
        Placement::Agent("worker-1".to_owned()),
    )
    .answer();
    assert_eq!(answer.stderr_tail.len(), 8);
    assert_eq!(answer.outcome, Outcome::Failed);
    assert!(answer.text().ends_with("linker `cc` not found"));
}

#[test]
fn a_missing_runner_is_an_error_that_names_it_and_the_agent() {
    let report = Report {
        missing_command: Some("nextest".to_owned()),
        ..Report::default()
    };
    let answer = finished(
        JobKind::Nextest,
        JobEnd::Exited { code: 101 },
        report,
        Placement::Agent("worker-1".to_owned()),
    )
    .answer();
    assert_eq!(answer.outcome, Outcome::Error);
    assert_eq!(
        answer.error.as_deref(),
        Some("cargo-nextest is not installed where the job ran (worker-1)")
    );
    assert!(
        answer
            .summary
            .starts_with("nextest error: cargo-nextest is not installed where the job ran"),
        "{}",
        answer.summary
    );
}

#[test]
fn a_log_page_is_bounded_yet_always_moves_on() {
    let long = "l".repeat(10_000);
    let lines: Vec<&str> = std::iter::repeat_n(long.as_str(), 100).collect();
    let page = log_page(1, &lines, 0, 2000, true);
    assert!(
        page.lines
            .iter()
            .all(|l| l.len() <= MAX_LOG_LINE + '…'.len_utf8())
    );
    let bytes: usize = page.lines.iter().map(|l| l.len() + 1).sum();
    assert!(bytes <= MAX_LOG_PAGE + MAX_LOG_LINE, "{bytes}");
    assert_eq!(page.next_offset, Some(page.returned));
    let last = log_page(1, &lines, 99, 2000, true);
    assert_eq!((last.returned, last.next_offset), (1, None));
}

#[test]
fn fmt_lists_files_with_lines_and_counts_the_rest() {
    let files: Vec<(String, Vec<u64>)> = (0..60)
        .map(|n| (format!("src/f{n}.rs"), (1..=20).collect()))
        .collect();
    let answer = FmtAnswer::of(files);
    assert_eq!(answer.outcome, FmtOutcome::Unformatted);
    assert_eq!(answer.files.len(), MAX_FMT_FILES);
    assert_eq!(answer.files[0].lines.len(), MAX_FMT_LINES);
    assert_eq!(answer.more_files.as_deref(), Some("10 more files"));
    assert_eq!(answer.summary, "fmt: 60 files need cargo fmt");
    assert_eq!(FmtAnswer::of(Vec::new()).outcome, FmtOutcome::Formatted);
}
