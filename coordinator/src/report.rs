//! Turning a cargo job's output into a short, exact report: what the MCP server answers a
//! model, and what each part of a spread test run adds to the run's tally.
//!
//! Fed incrementally with output chunks, so memory stays bounded however long the log:
//! compiler diagnostics come from cargo's JSON messages (`--message-format=json`), test
//! results from libtest's text output (`cargo test`) or its JSON events (nextest's
//! `--message-format libtest-json-plus`). Only capped summaries are kept; the full log stays
//! with the coordinator, reachable through the `job_log` tool.

use std::collections::{BTreeMap, HashSet};

use buildpool_core::OutputStream;
use cargo_metadata::Message;
use cargo_metadata::diagnostic::{Diagnostic as CompilerDiagnostic, DiagnosticLevel};
use schemars::JsonSchema;
use serde::Serialize;

/// Diagnostics kept per answer; the rest are counted.
pub const MAX_DIAGNOSTICS: usize = 20;
/// Failing tests kept per answer; the rest are counted.
pub const MAX_FAILURES: usize = 10;
const MAX_MESSAGE: usize = 300;
const MAX_SNIPPET: usize = 160;
/// Most bytes of a file path, an error code or a test name.
const MAX_NAME: usize = 200;
/// The end of a failing test's captured output: what it printed last, before the panic.
const MAX_TEST_OUTPUT: usize = 600;
/// Only the head of a longer output line is kept (a test event with megabytes of captured
/// output still names its test); it is not buffered without bound.
const MAX_LINE: usize = 4 * 1024 * 1024;
/// Most bytes kept of one failing test's report section.
const MAX_SECTION: usize = 64 * 1024;
/// Last stderr lines kept to explain failures that produce no diagnostic.
const STDERR_TAIL: usize = 8;
/// Test binaries whose ignored tests are counted at most.
const MAX_BINARIES: usize = 4096;

/// One compiler diagnostic, as rustc located it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub level: String,
    pub code: Option<String>,
    pub message: String,
    pub file: Option<String>,
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub snippet: Option<String>,
}

/// A failing test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestFailure {
    /// The test's path, e.g. `tests::two_is_three`.
    pub name: String,
    /// The panic message (assertion text with left/right values).
    pub message: String,
    /// The end of the test's captured output (at most 600 bytes, `…` marks a cut).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub output: String,
}

/// Tests run, summed over every test binary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    /// `cargo test`: `#[ignore]`d tests that did not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignored: Option<u64>,
    /// nextest: tests it did not run (ignored or filtered out), as its summary counts them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
}

impl TestCounts {
    /// `passed, failed, ignored` (or `skipped`), as the summary line says them.
    pub fn describe(&self) -> String {
        let mut text = format!("{} passed, {} failed", self.passed, self.failed);
        if let Some(ignored) = self.ignored {
            text.push_str(&format!(", {ignored} ignored"));
        }
        if let Some(skipped) = self.skipped {
            text.push_str(&format!(", {skipped} skipped"));
        }
        text
    }
}

/// Everything the answer says about the output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub errors: usize,
    pub warnings: usize,
    /// Errors first, then warnings; deduplicated; at most [`MAX_DIAGNOSTICS`].
    pub diagnostics: Vec<Diagnostic>,
    pub diagnostics_omitted: usize,
    pub tests: Option<TestCounts>,
    pub failures: Vec<TestFailure>,
    pub failures_omitted: usize,
    /// Last lines of stderr, for failures without diagnostics (e.g. a linker error).
    pub stderr_tail: Vec<String>,
    /// The cargo subcommand cargo did not have (`nextest` without cargo-nextest installed).
    pub missing_command: Option<String>,
    /// nextest's ignored tests per test binary (by nextest's binary id), as its suite
    /// events count them. Every slice of a spread run reports every binary's: taken once
    /// per binary, they add up to what `cargo test` counts.
    pub ignored_by_binary: BTreeMap<String, u64>,
    /// Milliseconds the tests of each test binary ran (nextest's suite events, one per
    /// test process): what balances a later spread run's slices.
    pub millis_by_binary: BTreeMap<String, u64>,
}

/// What a report builder has seen so far, for progress notifications.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub crates_compiled: u64,
    pub crates_fresh: u64,
    pub testing: bool,
}

/// One complete output line; `truncated` when only its first [`MAX_LINE`] bytes were kept.
#[derive(Debug)]
struct Line {
    text: String,
    truncated: bool,
}

#[derive(Debug, Default)]
struct LineBuffer {
    pending: Vec<u8>,
    overflow: bool,
}

impl LineBuffer {
    /// Appends bytes and returns the complete lines.
    fn push(&mut self, bytes: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            if !self.overflow {
                let room = MAX_LINE - self.pending.len();
                self.pending
                    .extend_from_slice(&piece[..piece.len().min(room)]);
                self.overflow = piece.len() > room;
            }
            if piece.ends_with(b"\n") {
                lines.push(self.take());
            }
        }
        lines
    }

    fn take(&mut self) -> Line {
        let line = Line {
            text: String::from_utf8_lossy(&self.pending)
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            truncated: self.overflow,
        };
        self.pending.clear();
        self.overflow = false;
        line
    }

    fn flush(&mut self) -> Option<Line> {
        (!self.pending.is_empty()).then(|| self.take())
    }
}

/// An open `---- name stdout ----` section of libtest's failure report.
#[derive(Debug)]
struct FailureSection {
    name: String,
    text: String,
}

#[derive(Debug, Default)]
pub struct ReportBuilder {
    stdout: LineBuffer,
    stderr: LineBuffer,
    seen: HashSet<Diagnostic>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    error_count: usize,
    warning_count: usize,
    tests: Option<TestCounts>,
    failed_names: Vec<String>,
    failures: Vec<TestFailure>,
    section: Option<FailureSection>,
    stderr_tail: std::collections::VecDeque<String>,
    missing_command: Option<String>,
    ignored_by_binary: BTreeMap<String, u64>,
    millis_by_binary: BTreeMap<String, u64>,
    /// nextest's summary line was seen: its tally replaces the one from test events.
    nextest_summary: bool,
    progress: Progress,
}

impl std::hash::Hash for Diagnostic {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (
            &self.level,
            &self.code,
            &self.message,
            &self.file,
            self.line,
            self.column,
        )
            .hash(state);
    }
}

/// nextest's id of a test binary, as its filtersets take it (`binary_id(=...)`): the
/// crate for a library's (or proc macro's) unit tests, `crate::name` for an integration
/// test, `crate::kind/name` for a binary's, an example's or a bench's.
pub fn binary_id(krate: &str, binary: &str, kind: &str) -> String {
    match kind {
        "lib" | "proc-macro" => krate.to_owned(),
        "test" => format!("{krate}::{binary}"),
        other => format!("{krate}::{other}/{binary}"),
    }
}

/// `text` cut to at most `limit` bytes at a character boundary, marked when cut.
pub fn cap(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The last `limit` bytes of `text` (at a character boundary), marked when cut.
fn cap_tail(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// The string value of `"key":"..."` in the head of a JSON object cut short, unescaped
/// only as far as names need.
fn json_string_in_head(head: &str, key: &str) -> Option<String> {
    let start = head.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = head[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
    None
}

impl ReportBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// Feeds one output chunk.
    pub fn feed(&mut self, stream: OutputStream, bytes: &[u8]) {
        match stream {
            OutputStream::Stderr => {
                for line in self.stderr.push(bytes) {
                    self.stderr_line(&line.text);
                }
            }
            _ => {
                for line in self.stdout.push(bytes) {
                    self.stdout_line(&line);
                }
            }
        }
    }

    fn stderr_line(&mut self, line: &str) {
        if line.trim().is_empty() || line.starts_with("[buildpool]") {
            return;
        }
        if let Some(command) = line
            .strip_prefix("error: no such command: `")
            .and_then(|rest| rest.strip_suffix('`'))
        {
            self.missing_command = Some(cap(command, 64));
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with("Running ")
            || trimmed.starts_with("Doc-tests ")
            || trimmed.starts_with("Starting ")
        {
            self.progress.testing = true;
        }
        if self.nextest_summary_line(trimmed) {
            return;
        }
        if trimmed.starts_with("Compiling ")
            || trimmed.starts_with("Checking ")
            || trimmed.starts_with("Running ")
            || trimmed.starts_with("Doc-tests ")
            || trimmed.starts_with("Finished ")
        {
            return;
        }
        if self.stderr_tail.len() == STDERR_TAIL {
            self.stderr_tail.pop_front();
        }
        self.stderr_tail.push_back(cap(line, MAX_MESSAGE));
    }

    fn stdout_line(&mut self, line: &Line) {
        let text = line.text.as_str();
        if text.starts_with('{') {
            // One parse tells a test event (`type`) from a cargo message (`reason`); a JSON
            // line that is neither is no libtest text either.
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
                if value["type"].is_string() {
                    self.test_event(&value);
                } else if let Ok(message) = serde_json::from_value::<Message>(value) {
                    self.cargo_message(message);
                }
                return;
            }
            if line.truncated && text.starts_with("{\"type\":\"test\"") {
                self.truncated_test_event(text);
                return;
            }
        }
        self.libtest_line(text);
    }

    /// One of libtest's JSON events, as nextest writes them (`libtest-json-plus`, still
    /// experimental in nextest 0.9). Tests are counted from their own `ok` and `failed`
    /// events until nextest's summary line gives its own tally: its suite events repeat per
    /// test process with tallies that overlap, and a skipped test may or may not get an
    /// `ignored` event, so neither is counted.
    fn test_event(&mut self, event: &serde_json::Value) {
        self.progress.testing = true;
        if event["type"] == "suite" {
            self.suite_event(event);
            return;
        }
        if event["type"] != "test" {
            return;
        }
        let name = event["name"].as_str().unwrap_or("");
        let output = event["stdout"].as_str().unwrap_or("");
        self.test_outcome(event["event"].as_str().unwrap_or(""), name, output);
    }

    /// A suite event: nextest writes one per test process, with the process's time and
    /// its binary's count of ignored tests (alike in each).
    fn suite_event(&mut self, event: &serde_json::Value) {
        let (Some(ignored), Some(binary)) = (event["ignored"].as_u64(), event.get("nextest"))
        else {
            return;
        };
        let binary = binary_id(
            binary["crate"].as_str().unwrap_or(""),
            binary["test_binary"].as_str().unwrap_or(""),
            binary["kind"].as_str().unwrap_or(""),
        );
        if self.ignored_by_binary.len() >= MAX_BINARIES
            && !self.ignored_by_binary.contains_key(&binary)
        {
            return;
        }
        let count = self.ignored_by_binary.entry(binary.clone()).or_default();
        *count = (*count).max(ignored);
        // Seconds as a float: at most a day's worth of milliseconds, far inside f64.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let millis = (event["exec_time"].as_f64().unwrap_or(0.0).max(0.0) * 1000.0) as u64;
        *self.millis_by_binary.entry(binary).or_default() += millis;
    }

    /// A test event whose line was too long to keep whole: its name and outcome come
    /// first, its captured output (the long part) is cut.
    fn truncated_test_event(&mut self, head: &str) {
        let (Some(event), Some(name)) = (
            json_string_in_head(head, "event"),
            json_string_in_head(head, "name"),
        ) else {
            return;
        };
        self.test_outcome(&event, &name, "[captured output too long: see job_log]");
    }

    fn test_outcome(&mut self, event: &str, name: &str, output: &str) {
        // Events read after nextest's summary (stdout and stderr arrive side by side) are
        // already in its tally.
        let counts = self.tests.get_or_insert_with(TestCounts::default);
        let count = u64::from(!self.nextest_summary);
        match event {
            "ok" => counts.passed += count,
            "failed" => {
                counts.failed += count;
                if self.failures.len() < MAX_FAILURES {
                    // nextest names a test `crate::binary$path`; the path is what filters take.
                    let name = name.rsplit_once('$').map_or(name, |(_, path)| path);
                    self.failures.push(failure(name, output));
                }
            }
            // "started", "ignored" (see above), and libtest's "timeout" (a slow-test
            // warning, not an end).
            _ => {}
        }
    }

    /// nextest's closing tally on stderr, e.g. `Summary [   0.201s] 2 tests run: 1 passed,
    /// 1 failed, 2 skipped` (also `3 timed out`, `1 passed (1 slow)`, `1 flaky`, ...).
    /// Returns whether `line` was one.
    fn nextest_summary_line(&mut self, line: &str) -> bool {
        let Some(rest) = line.strip_prefix("Summary [") else {
            return false;
        };
        let Some((_, tally)) = rest.split_once("] ") else {
            return false;
        };
        let Some((run, parts)) = tally.split_once(" run: ") else {
            return false;
        };
        if !(run.ends_with(" tests") || run.ends_with(" test")) {
            return false;
        }
        let mut counts = TestCounts {
            skipped: Some(0),
            ..TestCounts::default()
        };
        for part in parts.split(", ") {
            let Some((number, what)) = part.split_once(' ') else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            let what = what.split(" (").next().unwrap_or(what);
            match what {
                "passed" => counts.passed += number,
                "failed" | "timed out" | "exec failed" => counts.failed += number,
                "skipped" => counts.skipped = Some(number),
                _ => {}
            }
        }
        self.tests = Some(counts);
        self.nextest_summary = true;
        true
    }

    fn cargo_message(&mut self, message: Message) {
        match message {
            Message::CompilerArtifact(artifact) => {
                if artifact.fresh {
                    self.progress.crates_fresh += 1;
                } else {
                    self.progress.crates_compiled += 1;
                }
            }
            Message::CompilerMessage(message) => self.compiler_message(&message.message),
            _ => {}
        }
    }

    fn compiler_message(&mut self, message: &CompilerDiagnostic) {
        let is_error = match message.level {
            DiagnosticLevel::Error | DiagnosticLevel::Ice => true,
            DiagnosticLevel::Warning => false,
            _ => return,
        };
        let text = message.message.as_str();
        let spans = message.spans.as_slice();
        // rustc's own tallies ("aborting due to 3 previous errors", "2 warnings emitted").
        if spans.is_empty()
            && (text.starts_with("aborting due to")
                || text.ends_with("warnings emitted")
                || text.ends_with("warning emitted"))
        {
            return;
        }
        let primary = spans
            .iter()
            .find(|span| span.is_primary)
            .or_else(|| spans.first());
        let snippet = primary
            .and_then(|span| span.text.first())
            .map(|line| cap(line.text.trim(), MAX_SNIPPET))
            .filter(|s| !s.is_empty());
        let diagnostic = Diagnostic {
            level: if is_error { "error" } else { "warning" }.to_owned(),
            code: message.code.as_ref().map(|code| cap(&code.code, MAX_NAME)),
            message: cap(text, MAX_MESSAGE),
            // The end of a path names the file.
            file: primary.map(|span| cap_tail(&span.file_name, MAX_NAME)),
            line: primary.and_then(|span| u64::try_from(span.line_start).ok()),
            column: primary.and_then(|span| u64::try_from(span.column_start).ok()),
            snippet,
        };
        if !self.seen.insert(diagnostic.clone()) {
            return;
        }
        if is_error {
            self.error_count += 1;
            if self.errors.len() < MAX_DIAGNOSTICS {
                self.errors.push(diagnostic);
            }
        } else {
            self.warning_count += 1;
            if self.warnings.len() < MAX_DIAGNOSTICS {
                self.warnings.push(diagnostic);
            }
        }
    }

    fn libtest_line(&mut self, line: &str) {
        if line.starts_with("running ") && line.ends_with(" tests")
            || line.ends_with(" test") && line.starts_with("running ")
        {
            self.progress.testing = true;
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            self.close_section();
            let counts = self.tests.get_or_insert_with(TestCounts::default);
            for part in rest.split(';') {
                let part = part
                    .trim()
                    .trim_start_matches("ok.")
                    .trim_start_matches("FAILED.")
                    .trim();
                let mut words = part.split_whitespace();
                if let (Some(number), Some(what)) = (words.next(), words.next())
                    && let Ok(number) = number.parse::<u64>()
                {
                    match what {
                        "passed" => counts.passed += number,
                        "failed" => counts.failed += number,
                        "ignored" => *counts.ignored.get_or_insert(0) += number,
                        _ => {}
                    }
                }
            }
            return;
        }
        if let Some(rest) = line.strip_prefix("test ")
            && let Some(name) = rest.strip_suffix(" ... FAILED")
        {
            self.failed_names.push(name.to_owned());
            return;
        }
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|rest| rest.strip_suffix(" stdout ----"))
        {
            self.close_section();
            self.section = Some(FailureSection {
                name: name.to_owned(),
                text: String::new(),
            });
            return;
        }
        if line == "failures:" || line == "successes:" {
            self.close_section();
            return;
        }
        if let Some(section) = &mut self.section
            && section.text.len() < MAX_SECTION
        {
            section
                .text
                .push_str(&cap(line, MAX_SECTION - section.text.len()));
            section.text.push('\n');
        }
    }

    fn close_section(&mut self) {
        let Some(section) = self.section.take() else {
            return;
        };
        if self.failures.len() >= MAX_FAILURES {
            return;
        }
        self.failures.push(failure(&section.name, &section.text));
    }

    /// Ends the input and returns the report.
    pub fn finish(mut self) -> Report {
        if let Some(line) = self.stdout.flush() {
            self.stdout_line(&line);
        }
        if let Some(line) = self.stderr.flush() {
            self.stderr_line(&line.text);
        }
        self.close_section();
        // A failing test whose section never came (e.g. the binary crashed) still counts.
        for name in std::mem::take(&mut self.failed_names) {
            if !self.failures.iter().any(|f| f.name == name) && self.failures.len() < MAX_FAILURES {
                self.failures.push(TestFailure {
                    name,
                    message: String::new(),
                    output: String::new(),
                });
            }
        }
        let failed = self.tests.as_ref().map_or(0, |t| t.failed) as usize;
        let failures_omitted = failed.saturating_sub(self.failures.len());
        // Source order within each level, so the same failure always reads the same, whatever
        // order parallel rustc processes reported it in.
        let by_place = |d: &Diagnostic| (d.file.clone(), d.line, d.column);
        let mut diagnostics = self.errors;
        diagnostics.sort_by_key(by_place);
        let mut warnings = self.warnings;
        warnings.sort_by_key(by_place);
        let room = MAX_DIAGNOSTICS.saturating_sub(diagnostics.len());
        diagnostics.extend(warnings.into_iter().take(room));
        let diagnostics_omitted =
            (self.error_count + self.warning_count).saturating_sub(diagnostics.len());
        Report {
            errors: self.error_count,
            warnings: self.warning_count,
            diagnostics,
            diagnostics_omitted,
            tests: self.tests,
            failures: self.failures,
            failures_omitted,
            stderr_tail: self.stderr_tail.into_iter().collect(),
            missing_command: self.missing_command,
            ignored_by_binary: self.ignored_by_binary,
            millis_by_binary: self.millis_by_binary,
        }
    }
}

/// A failing test from its name and what it printed, the panic included.
fn failure(name: &str, text: &str) -> TestFailure {
    let (output, message) = split_panic(text);
    TestFailure {
        name: cap(name, MAX_NAME),
        message: cap(message.trim(), MAX_MESSAGE * 2),
        output: cap_tail(output.trim(), MAX_TEST_OUTPUT),
    }
}

/// Splits a failure section into captured output and the panic message.
fn split_panic(text: &str) -> (&str, &str) {
    match text.find("thread '") {
        Some(start) if text[start..].contains("panicked at") => {
            let panic = &text[start..];
            // The message starts on the line after "panicked at <location>:".
            let message = panic.split_once('\n').map_or(panic, |(_, rest)| rest);
            let message = [
                "\nstack backtrace:",
                "\nnote: run with `RUST_BACKTRACE",
                "\nnote: Some details are omitted",
            ]
            .iter()
            .fold(message, |message, marker| {
                message.split(marker).next().unwrap_or(message)
            });
            (&text[..start], message)
        }
        _ => (text, ""),
    }
}

#[cfg(test)]
pub(crate) mod tests;
