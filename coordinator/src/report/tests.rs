use super::*;

/// Real `cargo build --message-format=json` output of a crate with three errors (its unused
/// variable draws no warning: rustc stops before the lint), and real `cargo test` output with two failing tests.
const THREE_ERRORS: &str = include_str!("testdata/three_errors.jsonl");
const FAILING_TESTS: &str = include_str!("testdata/failing_tests.out");
/// Real output of cargo-nextest 0.9.143 run as the `test` tool runs it
/// (`NEXTEST_EXPERIMENTAL_LIBTEST_JSON=1 cargo nextest run --cargo-message-format json
/// --message-format libtest-json-plus --no-fail-fast`) on the same tests plus an
/// integration test: stdout (cargo's messages and the test events) and stderr (nextest's
/// human report).
const NEXTEST_STDOUT: &str = include_str!("testdata/nextest_failing.jsonl");
const NEXTEST_STDERR: &str = include_str!("testdata/nextest_failing.stderr");
/// Real stderr of `cargo nextest run` where cargo-nextest is not installed.
const NEXTEST_MISSING: &str = include_str!("testdata/nextest_missing.stderr");

/// The package and target cargo names in each message of a one-crate build.
fn origin() -> serde_json::Value {
    serde_json::json!({
        "package_id": "path+file:///tmp/sample#0.1.0",
        "manifest_path": "/tmp/sample/Cargo.toml",
        "target": {"kind": ["lib"], "crate_types": ["lib"], "name": "sample",
            "src_path": "/tmp/sample/src/lib.rs", "edition": "2024",
            "doc": true, "doctest": true, "test": true},
    })
}

/// A span of rustc's at `file`:`line`:`column`, showing `snippet`.
pub(crate) fn span(file: &str, line: usize, column: usize, snippet: &str) -> serde_json::Value {
    serde_json::json!({
        "file_name": file, "byte_start": 0, "byte_end": 1,
        "line_start": line, "line_end": line, "column_start": column, "column_end": column + 1,
        "is_primary": true, "label": null, "suggested_replacement": null,
        "suggestion_applicability": null, "expansion": null,
        "text": [{"text": snippet, "highlight_start": column, "highlight_end": column + 1}],
    })
}

/// A `compiler-message` line as cargo writes it, without its newline.
pub(crate) fn compiler_message(
    level: &str,
    message: &str,
    code: Option<&str>,
    spans: &[serde_json::Value],
) -> String {
    let mut line = origin();
    line["reason"] = "compiler-message".into();
    line["message"] = serde_json::json!({
        "$message_type": "diagnostic", "level": level, "message": message,
        "code": code.map(|code| serde_json::json!({"code": code, "explanation": null})),
        "spans": spans, "children": [], "rendered": format!("{level}: {message}\n"),
    });
    line.to_string()
}

/// A `compiler-artifact` line as cargo writes it, without its newline.
fn compiler_artifact(fresh: bool) -> String {
    let mut line = origin();
    line["reason"] = "compiler-artifact".into();
    line["profile"] = serde_json::json!({"opt_level": "0", "debuginfo": 2,
        "debug_assertions": true, "overflow_checks": true, "test": false});
    line["features"] = serde_json::json!([]);
    line["filenames"] = serde_json::json!(["/tmp/sample-target/debug/deps/libsample.rlib"]);
    line["executable"] = serde_json::Value::Null;
    line["fresh"] = fresh.into();
    line.to_string()
}

fn report_of(stdout: &str) -> Report {
    let mut builder = ReportBuilder::new();
    // Odd chunk sizes: lines cross chunk boundaries.
    for chunk in stdout.as_bytes().chunks(97) {
        builder.feed(OutputStream::Stdout, chunk);
    }
    builder.finish()
}

#[test]
fn compiler_errors_come_first_with_location_code_and_snippet() {
    let report = report_of(THREE_ERRORS);
    assert_eq!(
        (report.errors, report.warnings),
        (3, 0),
        "rustc's closing notes are not diagnostics"
    );
    let levels: Vec<&str> = report
        .diagnostics
        .iter()
        .map(|d| d.level.as_str())
        .collect();
    assert_eq!(levels, ["error", "error", "error"]);
    let mismatched = report
        .diagnostics
        .iter()
        .find(|d| d.code.as_deref() == Some("E0308"))
        .expect("E0308");
    assert_eq!(mismatched.file.as_deref(), Some("src/lib.rs"));
    assert_eq!((mismatched.line, mismatched.column), (Some(3), Some(18)));
    assert_eq!(mismatched.message, "mismatched types");
    assert_eq!(
        mismatched.snippet.as_deref(),
        Some("let a: i32 = \"text\";")
    );
    assert!(
        report
            .diagnostics
            .iter()
            .any(|d| d.code.as_deref() == Some("E0425") && d.line == Some(4))
    );
    assert!(
        report
            .diagnostics
            .iter()
            .any(|d| d.message.contains("undefined_function"))
    );
    assert_eq!(report.diagnostics_omitted, 0);
}

#[test]
fn errors_come_before_warnings_whatever_the_order_of_arrival() {
    let warning = compiler_message(
        "warning",
        "unused variable: `x`",
        Some("unused_variables"),
        &[],
    );
    let mut builder = ReportBuilder::new();
    builder.feed(OutputStream::Stdout, format!("{warning}\n").as_bytes());
    builder.feed(OutputStream::Stdout, THREE_ERRORS.as_bytes());
    let report = builder.finish();
    let levels: Vec<&str> = report
        .diagnostics
        .iter()
        .map(|d| d.level.as_str())
        .collect();
    assert_eq!(levels, ["error", "error", "error", "warning"]);
    assert_eq!(
        report.diagnostics[3].code.as_deref(),
        Some("unused_variables")
    );
}

#[test]
fn repeated_diagnostics_are_counted_once_and_the_list_is_capped() {
    let line = THREE_ERRORS
        .lines()
        .find(|l| l.contains("\"level\":\"error\""))
        .expect("an error line");
    let mut builder = ReportBuilder::new();
    for _ in 0..3 {
        builder.feed(OutputStream::Stdout, format!("{line}\n").as_bytes());
    }
    assert_eq!(builder.finish().errors, 1);

    let mut builder = ReportBuilder::new();
    for n in 0..(MAX_DIAGNOSTICS + 5) {
        let message = compiler_message("warning", &format!("warning {n}"), None, &[]);
        builder.feed(OutputStream::Stdout, format!("{message}\n").as_bytes());
    }
    let report = builder.finish();
    assert_eq!(
        (
            report.warnings,
            report.diagnostics.len(),
            report.diagnostics_omitted
        ),
        (25, 20, 5)
    );
}

#[test]
fn failing_tests_carry_name_panic_message_and_output() {
    let report = report_of(FAILING_TESTS);
    assert_eq!(
        report.tests,
        Some(TestCounts {
            passed: 1,
            failed: 2,
            ignored: Some(1),
            skipped: None
        })
    );
    assert_eq!(report.failures.len(), 2);
    let arithmetic = report
        .failures
        .iter()
        .find(|f| f.name == "tests::two_is_three")
        .expect("failure");
    assert_eq!(
        arithmetic.message,
        "assertion `left == right` failed: arithmetic broke\n  left: 2\n right: 3"
    );
    assert_eq!(arithmetic.output, "some captured output");
    let plain = report
        .failures
        .iter()
        .find(|f| f.name == "tests::panics_plainly")
        .expect("failure");
    assert_eq!(plain.message, "plain panic message");
    assert_eq!(report.failures_omitted, 0);
}

#[test]
fn progress_counts_crates_and_notices_tests() {
    let mut builder = ReportBuilder::new();
    let artifacts = format!(
        "{}\n{}\n",
        compiler_artifact(false),
        compiler_artifact(true)
    );
    builder.feed(OutputStream::Stdout, artifacts.as_bytes());
    assert_eq!(builder.progress().crates_compiled, 1);
    assert_eq!(builder.progress().crates_fresh, 1);
    assert!(!builder.progress().testing);
    builder.feed(
        OutputStream::Stderr,
        b"     Running unittests src/lib.rs (target/debug/deps/x)\n",
    );
    assert!(builder.progress().testing);
}

#[test]
fn stderr_keeps_only_a_short_tail_without_cargo_status_lines() {
    let mut builder = ReportBuilder::new();
    builder.feed(
        OutputStream::Stderr,
        b"   Compiling x v0.1.0\n[buildpool] snapshot abc\n",
    );
    for n in 0..20 {
        builder.feed(OutputStream::Stderr, format!("error line {n}\n").as_bytes());
    }
    let report = builder.finish();
    assert_eq!(report.stderr_tail.len(), STDERR_TAIL);
    assert_eq!(
        report.stderr_tail.last().map(String::as_str),
        Some("error line 19")
    );
}

#[test]
fn an_endless_line_is_cut_not_buffered() {
    let mut builder = ReportBuilder::new();
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..8 {
        builder.feed(OutputStream::Stdout, &chunk);
    }
    assert!(builder.stdout.pending.len() <= MAX_LINE);
    builder.feed(
        OutputStream::Stdout,
        b"\ntest result: ok. 3 passed; 0 failed; 0 ignored\n",
    );
    assert_eq!(
        builder.finish().tests,
        Some(TestCounts {
            passed: 3,
            failed: 0,
            ignored: Some(0),
            skipped: None
        })
    );
}

#[test]
fn nextest_results_are_counted_from_test_events_with_each_failure() {
    let mut builder = ReportBuilder::new();
    for chunk in NEXTEST_STDERR.as_bytes().chunks(61) {
        builder.feed(OutputStream::Stderr, chunk);
    }
    for chunk in NEXTEST_STDOUT.as_bytes().chunks(97) {
        builder.feed(OutputStream::Stdout, chunk);
    }
    assert!(builder.progress().testing);
    let report = builder.finish();
    // nextest's own tally, from its summary line.
    assert_eq!(
        report.tests,
        Some(TestCounts {
            passed: 2,
            failed: 2,
            ignored: None,
            skipped: Some(1)
        })
    );
    let names: Vec<&str> = report.failures.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["tests::panics_plainly", "tests::two_is_three"]);
    assert_eq!(report.failures[0].message, "plain panic message");
    assert_eq!(report.failures[0].output, "");
    assert_eq!(
        report.failures[1].message,
        "assertion `left == right` failed: arithmetic broke\n  left: 2\n right: 3"
    );
    assert_eq!(report.failures[1].output, "some captured output");
    assert_eq!((report.errors, report.failures_omitted), (0, 0));
    assert_eq!(report.missing_command, None);
}

#[test]
fn a_missing_cargo_subcommand_is_named() {
    let mut builder = ReportBuilder::new();
    builder.feed(OutputStream::Stderr, NEXTEST_MISSING.as_bytes());
    let report = builder.finish();
    assert_eq!(report.missing_command.as_deref(), Some("nextest"));
    assert_eq!(report.tests, None);
}

#[test]
fn a_test_event_too_long_to_keep_still_names_its_failure() {
    let output = "o".repeat(MAX_LINE + 1024);
    let event = serde_json::json!({"type": "test", "event": "failed",
        "name": "app::app$tests::\"quoted\"", "stdout": output});
    let mut builder = ReportBuilder::new();
    builder.feed(OutputStream::Stdout, format!("{event}\n").as_bytes());
    let report = builder.finish();
    assert_eq!(
        report.tests,
        Some(TestCounts {
            passed: 0,
            failed: 1,
            ignored: None,
            skipped: None
        })
    );
    assert_eq!(report.failures[0].name, "tests::\"quoted\"");
    assert!(report.failures[0].output.contains("job_log"));
}

#[test]
fn captured_output_keeps_its_end_and_names_are_capped() {
    let output = format!("{}\nlast words", "early ".repeat(1000));
    let event = serde_json::json!({"type": "test", "event": "failed",
        "name": format!("app::app$tests::{}", "n".repeat(1000)),
        "stdout": format!("{output}\nthread 'x' panicked at src/lib.rs:1:1:\nboom\n")});
    let mut builder = ReportBuilder::new();
    builder.feed(OutputStream::Stdout, format!("{event}\n").as_bytes());
    let failure = &builder.finish().failures[0];
    assert!(failure.output.ends_with("last words"), "{}", failure.output);
    assert!(failure.output.len() <= MAX_TEST_OUTPUT + '…'.len_utf8());
    assert!(failure.name.len() <= MAX_NAME + '…'.len_utf8());
    assert_eq!(failure.message, "boom");
}

#[test]
fn nextest_counts_come_from_its_events_until_its_summary_says_otherwise() {
    let mut builder = ReportBuilder::new();
    // Without a summary (the job was killed), the events are all there is.
    builder.feed(OutputStream::Stdout, NEXTEST_STDOUT.as_bytes());
    let from_events = builder.finish().tests;
    assert_eq!(
        from_events,
        Some(TestCounts {
            passed: 2,
            failed: 2,
            ignored: None,
            skipped: None
        })
    );
    // The summary may come before the last events; they are not counted twice, and their
    // failures still are listed.
    let mut builder = ReportBuilder::new();
    builder.feed(
        OutputStream::Stderr,
        b"     Summary [   1.001s] 5 tests run: 1 passed (1 slow), 2 failed, 1 timed out, 1 flaky, 3 skipped\n",
    );
    builder.feed(OutputStream::Stdout, NEXTEST_STDOUT.as_bytes());
    let report = builder.finish();
    assert_eq!(
        report.tests,
        Some(TestCounts {
            passed: 1,
            failed: 3,
            ignored: None,
            skipped: Some(3)
        })
    );
    assert_eq!(report.failures.len(), 2);
}
