//! Rendering answers: a short text for the model plus structured content with the same facts.

use std::fmt::Write;

use buildpool_core::status::{CoordinatorStatus, JobPlace};
use buildpool_core::time::millis;
use buildpool_core::{JobEnd, JobKind, JobResult};
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Value, json};

use super::report::{Diagnostic, Report};
use crate::session::Timings;

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

fn kind_name(kind: JobKind) -> &'static str {
    kind.cargo_subcommand()
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

fn location(diagnostic: &Diagnostic) -> String {
    match (&diagnostic.file, diagnostic.line, diagnostic.column) {
        (Some(file), Some(line), Some(column)) => format!("{file}:{line}:{column}"),
        (Some(file), _, _) => file.clone(),
        _ => String::new(),
    }
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

/// A result with text and structured content.
pub fn plain(text: String, value: Value, is_error: bool) -> CallToolResult {
    let mut result = if is_error {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    };
    result.structured_content = Some(value);
    result
}

/// The job has no result to report: it could not start (snapshot, coordinator), or the
/// session ended before its result arrived (lost coordinator, unconfirmed cancel).
pub fn no_result(kind: JobKind, reason: &str) -> CallToolResult {
    let text = format!("{} could not run: {reason}", kind_name(kind));
    plain(
        text,
        json!({ "kind": kind_name(kind), "outcome": "error", "error": reason }),
        true,
    )
}

pub fn worker_status(status: &CoordinatorStatus) -> CallToolResult {
    let workers: Vec<Value> = status
        .agents
        .iter()
        .filter(|a| !a.local)
        .map(|a| {
            json!({
                "id": a.id, "max_jobs": a.slots_total, "active_jobs": a.slots_used, "labels": a.labels,
                "system": a.system, "draining": a.draining, "connected_since_unix_ms": a.connected_since_unix_ms,
            })
        })
        .collect();
    let queued = status
        .jobs
        .iter()
        .filter(|j| j.place == JobPlace::Queued)
        .count();
    let running = status.jobs.len() - queued;
    let value = json!({
        "workers": workers,
        "queued_jobs": queued,
        "running_jobs": running,
        "local_fallback_enabled": status.local_fallback_enabled,
        "local_fallback_active": status.local_fallback_active,
    });
    let slots: u32 = status
        .agents
        .iter()
        .filter(|a| !a.local)
        .map(|a| a.slots_total)
        .sum();
    let used: u32 = status
        .agents
        .iter()
        .filter(|a| !a.local)
        .map(|a| a.slots_used)
        .sum();
    let text = format!(
        "{} ({used}/{slots} slots busy), {queued} queued, {running} running; local fallback {}",
        plural(workers.len(), "worker"),
        if status.local_fallback_active {
            "in use now"
        } else if status.local_fallback_enabled {
            "idle"
        } else {
            "disabled"
        }
    );
    plain(text, value, false)
}

impl ToolAnswer {
    /// The outcome word, exit code, signal and a detail for the header.
    fn outcome(&self) -> (&'static str, Option<i32>, Option<i32>, String) {
        match &self.result.completion.end {
            JobEnd::Exited { code: 0 } => ("succeeded", Some(0), None, String::new()),
            JobEnd::Exited { code } => ("failed", Some(*code), None, format!("exit {code}")),
            JobEnd::Signalled { signal } => (
                "failed",
                None,
                Some(*signal),
                format!("killed by signal {signal}"),
            ),
            JobEnd::TimedOut => ("timed_out", None, None, "timed out".to_owned()),
            JobEnd::Cancelled => ("cancelled", None, None, "cancelled".to_owned()),
            JobEnd::Failed { reason } => ("error", None, None, reason.clone()),
        }
    }

    pub fn into_result(self) -> CallToolResult {
        let completion = &self.result.completion;
        let env = completion.env.map_or("", |env| env.label());
        let (queue_ms, run_ms) = (millis(self.result.queue_time), millis(completion.duration));
        let (outcome, exit_code, signal, detail) = self.outcome();
        let report = &self.report;
        let kind = kind_name(self.kind);
        let mut value = json!({
            "job_id": self.job_id,
            "kind": kind,
            "outcome": outcome,
            "ran_on": self.placement.label(),
            "env": env,
            "queue_ms": queue_ms,
            "run_ms": run_ms,
            "errors": report.errors,
            "warnings": report.warnings,
        });
        let object = value.as_object_mut().expect("a JSON object");
        let mut put = |key: &str, item: Value| {
            object.insert(key.to_owned(), item);
        };
        if let Some(code) = exit_code {
            put("exit_code", json!(code));
        }
        if let Some(signal) = signal {
            put("signal", json!(signal));
        }
        if outcome == "error" {
            put("error", json!(detail));
        }
        if let Placement::Unreachable(reason) = &self.placement {
            put("fallback_reason", json!(reason));
        }
        if let Some(note) = &self.snapshot_note {
            put("snapshot_note", json!(note));
        }
        if let Some(note) = &self.coordinator_note {
            put("coordinator_note", json!(note));
        }
        let timings: serde_json::Map<String, Value> = self
            .timings
            .named()
            .iter()
            .map(|(name, duration)| (format!("{name}_ms"), json!(millis(*duration))))
            .collect();
        put("timings", Value::Object(timings));
        if !report.diagnostics.is_empty() {
            put("diagnostics", json!(report.diagnostics));
        }
        if report.diagnostics_omitted > 0 {
            put("diagnostics_omitted", json!(report.diagnostics_omitted));
        }
        if let Some(tests) = &report.tests {
            put("tests", json!(tests));
        }
        if !report.failures.is_empty() {
            put("failures", json!(report.failures));
        }
        if report.failures_omitted > 0 {
            put("failures_omitted", json!(report.failures_omitted));
        }
        let explained = !report.diagnostics.is_empty() || !report.failures.is_empty();
        if outcome != "succeeded" && !explained && !report.stderr_tail.is_empty() {
            put("stderr_tail", json!(report.stderr_tail));
        }

        // Header: outcome, counts, where, how long.
        let mut text = format!("{kind} {outcome}");
        if !detail.is_empty() && outcome == "failed" {
            let _ = write!(text, " ({detail})");
        } else if outcome == "error" {
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
            counts.push(format!(
                "{} passed, {} failed, {} ignored",
                tests.passed, tests.failed, tests.ignored
            ));
        }
        if !counts.is_empty() {
            let _ = write!(text, " · {}", counts.join(", "));
        }
        let env = if env.is_empty() {
            String::new()
        } else {
            format!(" · env {env}")
        };
        let _ = write!(
            text,
            " · job {} on {}{env} · queued {}, ran {}",
            self.job_id,
            self.placement.label(),
            secs(queue_ms),
            secs(run_ms)
        );
        for note in [&self.snapshot_note, &self.coordinator_note]
            .into_iter()
            .flatten()
        {
            let _ = write!(text, "\n{note}");
        }
        if outcome == "succeeded" {
            return plain(text, value, false);
        }
        for diagnostic in &report.diagnostics {
            let code = diagnostic
                .code
                .as_deref()
                .map(|c| format!("[{c}]"))
                .unwrap_or_default();
            let _ = write!(
                text,
                "\n{}{code} {}: {}",
                diagnostic.level,
                location(diagnostic),
                diagnostic.message
            );
            if let Some(snippet) = &diagnostic.snippet {
                let _ = write!(text, "\n    {snippet}");
            }
        }
        if report.diagnostics_omitted > 0 {
            let _ = write!(
                text,
                "\n… {} more diagnostics (job_log job_id={})",
                report.diagnostics_omitted, self.job_id
            );
        }
        for failure in &report.failures {
            let _ = write!(
                text,
                "\nFAILED {}: {}",
                failure.name,
                one_line(&failure.message)
            );
        }
        if report.failures_omitted > 0 {
            let _ = write!(
                text,
                "\n… {} more failing tests (job_log job_id={})",
                report.failures_omitted, self.job_id
            );
        }
        if !explained {
            for line in &report.stderr_tail {
                let _ = write!(text, "\n{line}");
            }
        }
        plain(text, value, true)
    }
}
