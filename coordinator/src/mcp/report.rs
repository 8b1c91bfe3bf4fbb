//! Turning a cargo job's output into a short, exact answer for a model.
//!
//! Fed incrementally with output chunks, so memory stays bounded however long the log:
//! compiler diagnostics come from cargo's JSON messages (`--message-format=json`), test
//! results from libtest's text output. Only capped summaries are kept; the full log stays
//! with the coordinator, reachable through the `job_log` tool.

use std::collections::HashSet;

use buildpool_core::OutputStream;
use serde::Serialize;

/// Diagnostics kept per answer; the rest are counted.
pub const MAX_DIAGNOSTICS: usize = 20;
/// Failing tests kept per answer; the rest are counted.
pub const MAX_FAILURES: usize = 10;
const MAX_MESSAGE: usize = 300;
const MAX_SNIPPET: usize = 160;
const MAX_TEST_OUTPUT: usize = 1200;
/// A longer output line is not a cargo message; it is skipped, not buffered without bound.
const MAX_LINE: usize = 4 * 1024 * 1024;
/// Last stderr lines kept to explain failures that produce no diagnostic.
const STDERR_TAIL: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub level: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snippet: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestFailure {
    pub name: String,
    /// The panic message (assertion text with left/right values).
    pub message: String,
    /// Captured output of the test, capped.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub output: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// Everything the answer says about the output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub errors: usize,
    pub warnings: usize,
    /// Errors first, then warnings; deduplicated; at most [`MAX_DIAGNOSTICS`].
    pub diagnostics: Vec<Diagnostic>,
    pub diagnostics_omitted: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tests: Option<TestCounts>,
    pub failures: Vec<TestFailure>,
    pub failures_omitted: usize,
    /// Last lines of stderr, for failures without diagnostics (e.g. a linker error).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stderr_tail: Vec<String>,
}

/// What a report builder has seen so far, for progress notifications.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub crates_compiled: u64,
    pub crates_fresh: u64,
    pub testing: bool,
}

#[derive(Debug, Default)]
struct LineBuffer {
    pending: Vec<u8>,
    overflow: bool,
}

impl LineBuffer {
    /// Appends bytes and returns the complete lines.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            if !self.overflow {
                self.pending.extend_from_slice(piece);
                if self.pending.len() > MAX_LINE {
                    self.pending.clear();
                    self.overflow = true;
                }
            }
            if piece.ends_with(b"\n") {
                if !self.overflow {
                    let line = String::from_utf8_lossy(&self.pending)
                        .trim_end_matches(['\n', '\r'])
                        .to_owned();
                    lines.push(line);
                }
                self.pending.clear();
                self.overflow = false;
            }
        }
        lines
    }

    fn flush(&mut self) -> Option<String> {
        let line = (!self.pending.is_empty() && !self.overflow)
            .then(|| String::from_utf8_lossy(&self.pending).into_owned());
        self.pending.clear();
        line
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

fn cap(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
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
                    self.stderr_line(&line);
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
        let trimmed = line.trim_start();
        if trimmed.starts_with("Running ") || trimmed.starts_with("Doc-tests ") {
            self.progress.testing = true;
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

    fn stdout_line(&mut self, line: &str) {
        if line.starts_with('{')
            && let Ok(message) = serde_json::from_str::<serde_json::Value>(line)
        {
            self.cargo_message(&message);
            return;
        }
        self.libtest_line(line);
    }

    fn cargo_message(&mut self, message: &serde_json::Value) {
        match message["reason"].as_str() {
            Some("compiler-artifact") => {
                if message["fresh"].as_bool() == Some(true) {
                    self.progress.crates_fresh += 1;
                } else {
                    self.progress.crates_compiled += 1;
                }
            }
            Some("compiler-message") => self.compiler_message(&message["message"]),
            _ => {}
        }
    }

    fn compiler_message(&mut self, message: &serde_json::Value) {
        let level = message["level"].as_str().unwrap_or("");
        let is_error = level.starts_with("error");
        if !is_error && level != "warning" {
            return;
        }
        let text = message["message"].as_str().unwrap_or("");
        let spans = message["spans"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
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
            .find(|span| span["is_primary"] == true)
            .or_else(|| spans.first());
        let snippet = primary
            .and_then(|span| {
                span["text"].as_array()?.first()?["text"]
                    .as_str()
                    .map(|t| cap(t.trim(), MAX_SNIPPET))
            })
            .filter(|s| !s.is_empty());
        let diagnostic = Diagnostic {
            level: if is_error { "error" } else { "warning" }.to_owned(),
            code: message["code"]["code"].as_str().map(str::to_owned),
            message: cap(text, MAX_MESSAGE),
            file: primary.and_then(|span| span["file_name"].as_str().map(str::to_owned)),
            line: primary.and_then(|span| span["line_start"].as_u64()),
            column: primary.and_then(|span| span["column_start"].as_u64()),
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
                        "ignored" => counts.ignored += number,
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
            && section.text.len() < 64 * 1024
        {
            section.text.push_str(line);
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
        let (output, message) = split_panic(&section.text);
        self.failures.push(TestFailure {
            name: section.name,
            message: cap(message.trim(), MAX_MESSAGE * 2),
            output: cap(output.trim(), MAX_TEST_OUTPUT),
        });
    }

    /// Ends the input and returns the report.
    pub fn finish(mut self) -> Report {
        if let Some(line) = self.stdout.flush() {
            self.stdout_line(&line);
        }
        if let Some(line) = self.stderr.flush() {
            self.stderr_line(&line);
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
        }
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
mod tests;
