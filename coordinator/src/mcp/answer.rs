//! Rendering answers: structured content holding every fact, plus the same as short text.
//!
//! Claude Code shows the model only a result's structured content when it has one, so the
//! structured content is the answer: each tool declares its type's schema as its
//! `outputSchema`, and every answer is bounded. A job answer fits in [`MAX_JOB_ANSWER`]
//! bytes whatever the output; diagnostics and failures that do not fit are counted in a
//! "N more" note that says where the rest is. The answer types are serialized only;
//! `deny_unknown_fields` is there for their schemas, which then allow no undeclared field.

use std::fmt::Write;

use buildpool_core::status::{AgentStatus, CoordinatorStatus, JobPlace};
use buildpool_core::time::millis;
use buildpool_core::{JobEnd, JobKind, JobResult};
use rmcp::model::{CallToolResult, ContentBlock};
use schemars::JsonSchema;
use serde::Serialize;

use crate::report::{Diagnostic, Report, TestCounts, TestFailure, cap};
use crate::session::Timings;

/// Most bytes of a job answer's structured content (serialized JSON), whatever the output.
pub const MAX_JOB_ANSWER: usize = 4096;
/// Most bytes of one free-text field (an error, a note, a stderr line).
const MAX_NOTE: usize = 300;
/// Most bytes of one `job_log` line, and of one page of lines.
const MAX_LOG_LINE: usize = 2000;
const MAX_LOG_PAGE: usize = 32 * 1024;
/// Workers listed by `worker_status`; the rest are counted.
const MAX_WORKERS: usize = 50;
/// Files and lines per file listed by `fmt`; the rest are counted.
const MAX_FMT_FILES: usize = 50;
const MAX_FMT_LINES: usize = 10;

/// Where a job ran, as the answer names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Agent(String),
    /// The coordinator's embedded local agent (no build agent connected).
    LocalFallback,
    /// An in-process coordinator, because the repository's was unreachable.
    Unreachable(String),
}

impl Placement {
    fn label(&self) -> String {
        match self {
            Placement::Agent(id) => id.clone(),
            Placement::LocalFallback => "local fallback".to_owned(),
            Placement::Unreachable(_) => "local (coordinator unreachable)".to_owned(),
        }
    }
}

/// A finished job, ready to be answered.
#[derive(Debug)]
pub struct ToolAnswer {
    pub kind: JobKind,
    pub job_id: u64,
    pub placement: Placement,
    pub result: JobResult,
    pub report: Report,
    /// What the snapshot left out of the worktree, if anything.
    pub snapshot_note: Option<String>,
    /// That this call started the repository's coordinator in the background, if it did.
    pub coordinator_note: Option<String>,
    /// Where the time went.
    pub timings: Timings,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    /// Cargo ran and exited non-zero or was killed by a signal.
    Failed,
    TimedOut,
    Cancelled,
    /// The job could not run or gave no result; `error` says why.
    Error,
}

/// One compiler diagnostic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiagnosticItem {
    /// `error` or `warning`.
    pub level: String,
    /// The error code or lint name, e.g. `E0308`, `clippy::ptr_arg`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// `file:line:col` of the primary span, the file relative to the workspace root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    pub message: String,
    /// The primary span's source line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snippet: Option<String>,
}

impl From<&Diagnostic> for DiagnosticItem {
    fn from(diagnostic: &Diagnostic) -> Self {
        let at = match (&diagnostic.file, diagnostic.line, diagnostic.column) {
            (Some(file), Some(line), Some(column)) => Some(format!("{file}:{line}:{column}")),
            (Some(file), _, _) => Some(file.clone()),
            _ => None,
        };
        Self {
            level: diagnostic.level.clone(),
            code: diagnostic.code.clone(),
            at,
            message: diagnostic.message.clone(),
            snippet: diagnostic.snippet.clone(),
        }
    }
}

/// The job's phases as the client saw them, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimingsMs {
    pub snapshot_ms: u64,
    pub submit_ms: u64,
    pub queued_ms: u64,
    pub workspace_wait_ms: u64,
    pub fetch_ms: u64,
    pub checkout_ms: u64,
    pub environment_ms: u64,
    pub cargo_ms: u64,
    pub rest_ms: u64,
    pub total_ms: u64,
}

impl From<&Timings> for TimingsMs {
    fn from(timings: &Timings) -> Self {
        let phases = &timings.phases;
        Self {
            snapshot_ms: millis(timings.snapshot),
            submit_ms: millis(timings.submit),
            queued_ms: millis(timings.queued),
            workspace_wait_ms: millis(phases.workspace_wait),
            fetch_ms: millis(phases.fetch),
            checkout_ms: millis(phases.checkout),
            environment_ms: millis(phases.environment),
            cargo_ms: millis(phases.cargo),
            rest_ms: millis(timings.rest),
            total_ms: millis(timings.total),
        }
    }
}

/// The answer of `build`, `check`, `test` and `clippy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobAnswer {
    /// The answer in one line: outcome, counts, where the job ran and for how long.
    pub summary: String,
    /// `build`, `check`, `test`, `nextest` or `clippy`.
    pub kind: String,
    pub outcome: Outcome,
    /// Why the job could not run or gave no result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `job_log` and `cancel_job`; absent when the job was never submitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
    /// The agent id, `local fallback`, or `local (coordinator unreachable)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ran_on: Option<String>,
    /// Why the repository's coordinator was not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// `host` or `nix`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<TimingsMs>,
    /// What the snapshot left out of the worktree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_note: Option<String>,
    /// That this call started the repository's coordinator in the background.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator_note: Option<String>,
    /// Distinct compiler errors, all of them (listed or not).
    pub errors: usize,
    /// Distinct compiler warnings, all of them (listed or not).
    pub warnings: usize,
    /// Errors first (in source order), then warnings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<DiagnosticItem>,
    /// "N more diagnostics: ..." when not all are listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub more_diagnostics: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tests: Option<TestCounts>,
    /// Failing tests with their panic message and the end of their captured output.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<TestFailure>,
    /// "N more failing tests: ..." when not all are listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub more_failures: Option<String>,
    /// Last stderr lines, when a failure has no diagnostic or failing test to show.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stderr_tail: Vec<String>,
    /// A run spread over agents (`spread`): each part's job and agent; `job_id` is the
    /// test build's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartItem>,
}

/// One part of a spread test run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PartItem {
    /// `test build (nextest archive)`, `slice 2/4` or `doctests`.
    pub part: String,
    /// For `job_log`; absent when the part never started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
    pub ran_on: String,
}

/// The answer of `job_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogAnswer {
    pub job_id: u64,
    /// The page of lines (each at most 2000 bytes, marked `…` when cut).
    pub lines: Vec<String>,
    /// Lines in the log after filtering.
    pub total_lines: usize,
    pub offset: usize,
    pub returned: usize,
    /// Where the next page starts, when there are more lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
    /// The job has ended, so the log is complete.
    pub job_finished: bool,
}

/// One connected build agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Worker {
    pub id: String,
    pub max_jobs: u32,
    pub active_jobs: u32,
    pub labels: Vec<String>,
    pub system: String,
    pub draining: bool,
    pub connected_since_unix_ms: u64,
}

impl From<&AgentStatus> for Worker {
    fn from(agent: &AgentStatus) -> Self {
        Self {
            id: agent.id.clone(),
            max_jobs: agent.slots_total,
            active_jobs: agent.slots_used,
            labels: agent.labels.clone(),
            system: agent.system.clone(),
            draining: agent.draining,
            connected_since_unix_ms: agent.connected_since_unix_ms,
        }
    }
}

/// The answer of `worker_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusAnswer {
    pub summary: String,
    /// Set when the repository's coordinator is unreachable: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator_unreachable: Option<String>,
    pub workers: Vec<Worker>,
    /// "N more workers" when not all are listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub more_workers: Option<String>,
    pub queued_jobs: usize,
    pub running_jobs: usize,
    pub local_fallback_enabled: bool,
    /// A job is running on the local agent right now.
    pub local_fallback_active: bool,
}

/// What `cancel_job` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelState {
    Cancelling,
    Finished,
}

/// The answer of `cancel_job`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelAnswer {
    pub job_id: u64,
    /// The job was still queued or running and is being cancelled now.
    pub cancelled: bool,
    pub state: CancelState,
}

/// How a formatting check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FmtOutcome {
    /// Every file is formatted.
    Formatted,
    /// `files` need `cargo fmt`.
    Unformatted,
    /// The check could not run (no rustfmt, a parse error); `error` says why.
    Error,
}

/// A file `cargo fmt` would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FmtFile {
    /// Relative to the worktree.
    pub file: String,
    /// Lines (1-based, in the file as it is) where changes start; at most 10.
    pub lines: Vec<u64>,
}

/// The answer of `fmt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FmtAnswer {
    pub summary: String,
    pub outcome: FmtOutcome,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FmtFile>,
    /// "N more files" when not all are listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub more_files: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn kind_name(kind: JobKind) -> &'static str {
    kind.cargo_subcommand()
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn plural(count: usize, word: &str) -> String {
    format!("{count} {word}{}", if count == 1 { "" } else { "s" })
}

fn json_len(value: &impl Serialize) -> usize {
    serde_json::to_string(value).map_or(usize::MAX, |json| json.len())
}

/// Moves items into `into` while the serialized answer stays within `budget` bytes (each
/// item costs its JSON and a comma); returns how many did not fit.
fn fill<T: Serialize>(
    into: &mut Vec<T>,
    items: impl IntoIterator<Item = T>,
    budget: &mut usize,
) -> usize {
    let mut left_out = 0;
    for item in items {
        let cost = json_len(&item) + 1;
        if left_out == 0 && cost <= *budget {
            *budget -= cost;
            into.push(item);
        } else {
            left_out += 1;
        }
    }
    left_out
}

/// A result whose structured content is `value` and whose text says the same.
pub fn structured(text: String, value: &impl Serialize, is_error: bool) -> CallToolResult {
    let mut result = if is_error {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    };
    result.structured_content = Some(serde_json::to_value(value).unwrap_or_default());
    result
}

impl JobAnswer {
    /// An answer with the header facts only.
    fn bare(kind: JobKind, outcome: Outcome, summary: String) -> Self {
        Self {
            summary,
            kind: kind_name(kind).to_owned(),
            outcome,
            error: None,
            job_id: None,
            ran_on: None,
            fallback_reason: None,
            env: None,
            exit_code: None,
            signal: None,
            queue_ms: None,
            run_ms: None,
            timings: None,
            snapshot_note: None,
            coordinator_note: None,
            errors: 0,
            warnings: 0,
            diagnostics: Vec::new(),
            more_diagnostics: None,
            tests: None,
            failures: Vec::new(),
            more_failures: None,
            stderr_tail: Vec::new(),
            parts: Vec::new(),
        }
    }

    /// The job has no result to report: it could not start (snapshot, coordinator), or
    /// the session ended before its result arrived (lost coordinator, unconfirmed cancel).
    pub fn no_result(kind: JobKind, job_id: Option<u64>, reason: &str) -> Self {
        let reason = cap(reason, MAX_NOTE);
        let mut answer = Self::bare(
            kind,
            Outcome::Error,
            cap(
                &format!("{} could not run: {reason}", kind_name(kind)),
                MAX_NOTE * 2,
            ),
        );
        answer.error = Some(reason);
        answer.job_id = job_id;
        answer
    }

    /// The short text saying the same as the structured content.
    pub fn text(&self) -> String {
        let mut text = self.summary.clone();
        for note in [&self.snapshot_note, &self.coordinator_note]
            .into_iter()
            .flatten()
        {
            let _ = write!(text, "\n{note}");
        }
        if self.outcome == Outcome::Succeeded {
            return text;
        }
        for diagnostic in &self.diagnostics {
            let code = diagnostic
                .code
                .as_deref()
                .map(|c| format!("[{c}]"))
                .unwrap_or_default();
            let at = diagnostic.at.as_deref().unwrap_or_default();
            let _ = write!(
                text,
                "\n{}{code} {at}: {}",
                diagnostic.level, diagnostic.message
            );
            if let Some(snippet) = &diagnostic.snippet {
                let _ = write!(text, "\n    {snippet}");
            }
        }
        if let Some(more) = &self.more_diagnostics {
            let _ = write!(text, "\n… {more}");
        }
        for failure in &self.failures {
            let _ = write!(
                text,
                "\nFAILED {}: {}",
                failure.name,
                one_line(&failure.message)
            );
        }
        if let Some(more) = &self.more_failures {
            let _ = write!(text, "\n… {more}");
        }
        for line in &self.stderr_tail {
            let _ = write!(text, "\n{line}");
        }
        text
    }

    pub fn into_result(self) -> CallToolResult {
        structured(self.text(), &self, self.outcome != Outcome::Succeeded)
    }
}

impl ToolAnswer {
    /// The outcome, exit code, signal and a detail for the summary.
    fn outcome(&self) -> (Outcome, Option<i32>, Option<i32>, String) {
        let code = match &self.result.completion.end {
            JobEnd::Exited { code } => Some(*code),
            _ => None,
        };
        if let Some(command) = &self.report.missing_command {
            let where_ = match &self.placement {
                Placement::Agent(id) => format!(" ({id})"),
                _ => String::new(),
            };
            return (
                Outcome::Error,
                code,
                None,
                format!("cargo-{command} is not installed where the job ran{where_}"),
            );
        }
        match &self.result.completion.end {
            JobEnd::Exited { code: 0 } => (Outcome::Succeeded, code, None, String::new()),
            JobEnd::Exited { code } => (Outcome::Failed, Some(*code), None, format!("exit {code}")),
            JobEnd::Signalled { signal } => (
                Outcome::Failed,
                None,
                Some(*signal),
                format!("killed by signal {signal}"),
            ),
            JobEnd::TimedOut => (Outcome::TimedOut, None, None, "timed out".to_owned()),
            JobEnd::Cancelled => (Outcome::Cancelled, None, None, "cancelled".to_owned()),
            JobEnd::Failed { reason } => (Outcome::Error, None, None, cap(reason, MAX_NOTE)),
        }
    }

    fn summary(&self, outcome: Outcome, detail: &str, queue_ms: u64, run_ms: u64) -> String {
        let report = &self.report;
        let kind = kind_name(self.kind);
        let word = serde_json::to_value(outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut text = format!("{kind} {word}");
        if outcome == Outcome::Failed && !detail.is_empty() {
            let _ = write!(text, " ({detail})");
        } else if outcome == Outcome::Error {
            let _ = write!(text, ": {detail}");
        }
        let mut counts = Vec::new();
        if report.errors > 0 {
            counts.push(plural(report.errors, "error"));
        }
        if report.warnings > 0 {
            counts.push(plural(report.warnings, "warning"));
        }
        if let Some(tests) = &report.tests {
            counts.push(tests.describe());
        }
        if !counts.is_empty() {
            let _ = write!(text, " · {}", counts.join(", "));
        }
        let env = self
            .result
            .completion
            .env
            .map(|env| format!(" · env {}", env.label()))
            .unwrap_or_default();
        let _ = write!(
            text,
            " · job {} on {}{env} · queued {}, ran {}",
            self.job_id,
            self.placement.label(),
            secs(queue_ms),
            secs(run_ms)
        );
        text
    }

    /// The answer, within [`MAX_JOB_ANSWER`] bytes.
    pub fn answer(&self) -> JobAnswer {
        let completion = &self.result.completion;
        let (queue_ms, run_ms) = (millis(self.result.queue_time), millis(completion.duration));
        let (outcome, exit_code, signal, detail) = self.outcome();
        let report = &self.report;
        let mut answer = JobAnswer::bare(
            self.kind,
            outcome,
            self.summary(outcome, &detail, queue_ms, run_ms),
        );
        answer.error = (outcome == Outcome::Error).then_some(detail);
        answer.job_id = Some(self.job_id);
        answer.ran_on = Some(self.placement.label());
        if let Placement::Unreachable(reason) = &self.placement {
            answer.fallback_reason = Some(cap(reason, MAX_NOTE));
        }
        answer.env = completion.env.map(|env| env.label().to_owned());
        answer.exit_code = exit_code;
        answer.signal = signal;
        answer.queue_ms = Some(queue_ms);
        answer.run_ms = Some(run_ms);
        answer.timings = Some(TimingsMs::from(&self.timings));
        answer.snapshot_note = self.snapshot_note.as_deref().map(|n| cap(n, MAX_NOTE));
        answer.coordinator_note = self.coordinator_note.as_deref().map(|n| cap(n, MAX_NOTE));
        answer.errors = report.errors;
        answer.warnings = report.warnings;
        answer.tests = report.tests.clone();

        // Room for the lists: what is left after the header and the two "N more" notes.
        let note_room = 2 * 80;
        let mut budget = MAX_JOB_ANSWER.saturating_sub(json_len(&answer) + note_room + 64);
        let diagnostics = report.diagnostics.iter().map(DiagnosticItem::from);
        let left_out =
            fill(&mut answer.diagnostics, diagnostics, &mut budget) + report.diagnostics_omitted;
        if left_out > 0 {
            answer.more_diagnostics = Some(format!(
                "{left_out} more diagnostics: job_log job_id={} filter=\"error\"",
                self.job_id
            ));
        }
        let left_out = fill(
            &mut answer.failures,
            report.failures.iter().cloned(),
            &mut budget,
        ) + report.failures_omitted;
        if left_out > 0 {
            answer.more_failures = Some(format!(
                "{left_out} more failing tests: job_log job_id={} filter=\"FAIL\"",
                self.job_id
            ));
        }
        let explained = !answer.diagnostics.is_empty() || !answer.failures.is_empty();
        if outcome != Outcome::Succeeded && !explained {
            let tail = report.stderr_tail.iter().map(|line| cap(line, MAX_NOTE));
            fill(&mut answer.stderr_tail, tail, &mut budget);
        }
        answer
    }
}

/// One page of a job's (filtered) log lines, within [`MAX_LOG_PAGE`] bytes.
pub fn log_page(
    job_id: u64,
    lines: &[&str],
    offset: usize,
    limit: usize,
    complete: bool,
) -> LogAnswer {
    let offset = offset.min(lines.len());
    let mut page = Vec::new();
    let mut bytes = 0;
    for line in lines[offset..].iter().take(limit) {
        let line = cap(line, MAX_LOG_LINE);
        // A page always moves on by one line, however long.
        if !page.is_empty() && bytes + line.len() > MAX_LOG_PAGE {
            break;
        }
        bytes += line.len() + 1;
        page.push(line);
    }
    let next = offset + page.len();
    LogAnswer {
        job_id,
        total_lines: lines.len(),
        offset,
        returned: page.len(),
        next_offset: (next < lines.len()).then_some(next),
        job_finished: complete,
        lines: page,
    }
}

impl LogAnswer {
    pub fn into_result(self) -> CallToolResult {
        let mut text = self.lines.join("\n");
        if let Some(next) = self.next_offset {
            let _ = write!(
                text,
                "\n… {} more lines (offset {next})",
                self.total_lines - next
            );
        }
        structured(text, &self, false)
    }
}

impl StatusAnswer {
    /// The repository's coordinator is unreachable; `next` says where the next job runs
    /// (a background coordinator it starts, or an in-process one).
    pub fn unreachable(error: &str, next: &str, local_active: bool) -> Self {
        let now = if local_active {
            "a local job is running now"
        } else {
            "no local job running"
        };
        let error = cap(error, MAX_NOTE);
        Self {
            summary: format!("coordinator unreachable ({error}); {next}; {now}"),
            coordinator_unreachable: Some(error),
            workers: Vec::new(),
            more_workers: None,
            queued_jobs: 0,
            running_jobs: 0,
            local_fallback_enabled: true,
            local_fallback_active: local_active,
        }
    }

    pub fn of(status: &CoordinatorStatus) -> Self {
        let agents: Vec<&AgentStatus> = status.agents.iter().filter(|a| !a.local).collect();
        let queued = status
            .jobs
            .iter()
            .filter(|j| j.place == JobPlace::Queued)
            .count();
        let running = status.jobs.len() - queued;
        let slots: u32 = agents.iter().map(|a| a.slots_total).sum();
        let used: u32 = agents.iter().map(|a| a.slots_used).sum();
        let summary = format!(
            "{} ({used}/{slots} slots busy), {queued} queued, {running} running; local fallback {}",
            plural(agents.len(), "worker"),
            if status.local_fallback_active {
                "in use now"
            } else if status.local_fallback_enabled {
                "idle"
            } else {
                "disabled"
            }
        );
        let more = agents.len().saturating_sub(MAX_WORKERS);
        Self {
            summary,
            coordinator_unreachable: None,
            workers: agents
                .iter()
                .take(MAX_WORKERS)
                .map(|a| Worker::from(*a))
                .collect(),
            more_workers: (more > 0).then(|| format!("{more} more workers")),
            queued_jobs: queued,
            running_jobs: running,
            local_fallback_enabled: status.local_fallback_enabled,
            local_fallback_active: status.local_fallback_active,
        }
    }

    pub fn into_result(self) -> CallToolResult {
        structured(self.summary.clone(), &self, false)
    }
}

impl CancelAnswer {
    pub fn into_result(self) -> CallToolResult {
        let text = if self.cancelled {
            format!("job {} cancelling", self.job_id)
        } else {
            format!("job {} already finished", self.job_id)
        };
        structured(text, &self, false)
    }
}

impl FmtAnswer {
    /// The answer for files needing formatting, each with the lines where changes start.
    pub fn of(files: Vec<(String, Vec<u64>)>) -> Self {
        let total = files.len();
        let files: Vec<FmtFile> = files
            .into_iter()
            .take(MAX_FMT_FILES)
            .map(|(file, mut lines)| {
                lines.truncate(MAX_FMT_LINES);
                FmtFile {
                    file: cap(&file, MAX_NOTE),
                    lines,
                }
            })
            .collect();
        let more = total - files.len();
        let (outcome, summary) = if total == 0 {
            (
                FmtOutcome::Formatted,
                "fmt: every file is formatted".to_owned(),
            )
        } else {
            (
                FmtOutcome::Unformatted,
                format!(
                    "fmt: {} {} cargo fmt",
                    plural(total, "file"),
                    if total == 1 { "needs" } else { "need" }
                ),
            )
        };
        Self {
            summary,
            outcome,
            files,
            more_files: (more > 0).then(|| format!("{more} more files")),
            error: None,
        }
    }

    pub fn error(reason: &str) -> Self {
        let reason = cap(reason, MAX_NOTE * 4);
        Self {
            summary: cap(&format!("fmt could not run: {reason}"), MAX_NOTE * 4),
            outcome: FmtOutcome::Error,
            files: Vec::new(),
            more_files: None,
            error: Some(reason),
        }
    }

    pub fn into_result(self) -> CallToolResult {
        let mut text = self.summary.clone();
        for file in &self.files {
            let lines: Vec<String> = file.lines.iter().map(u64::to_string).collect();
            let _ = write!(text, "\n{} (lines {})", file.file, lines.join(", "));
        }
        if let Some(more) = &self.more_files {
            let _ = write!(text, "\n… {more}");
        }
        let failed = self.outcome != FmtOutcome::Formatted;
        structured(text, &self, failed)
    }
}

#[cfg(test)]
mod tests;
