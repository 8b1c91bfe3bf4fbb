//! The job store's own schema for what it keeps of a job: the submission and the result,
//! as JSON of the types here, converted from and to `core`'s at this edge. The control
//! API's messages are not the schema: the wire may change without a migration here, and
//! this without a new protocol version. Unknown fields and missing ones are errors, never
//! defaults.

use std::time::Duration;

use buildpool_core::status::Submission;
use buildpool_core::{
    AgentPhases, Completion, EnvMode, EnvVar, JobEnd, JobKind, JobResult, JobSpec, RunEnv,
};
use serde::{Deserialize, Serialize};

/// A stored row that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RowError(String);

impl From<serde_json::Error> for RowError {
    fn from(error: serde_json::Error) -> Self {
        Self(error.to_string())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSubmission {
    spec: StoredSpec,
    commit: String,
    git_ref: String,
    worktree: String,
    base_commit: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSpec {
    /// `JobKind`'s name (`build`, `test`, `clippy`, `check`, `nextest`,
    /// `nextest-archive`).
    kind: String,
    cargo_args: Vec<String>,
    env: Vec<(String, String)>,
    timeout_ns: Option<u64>,
    /// `auto`, `nix` or `host`.
    env_mode: String,
    required_labels: Vec<String>,
    collect_executables: bool,
    /// Rows written before spread test runs have none.
    #[serde(default)]
    archive_from: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredResult {
    end: StoredEnd,
    duration_ns: u64,
    /// `nix` or `host`; `None` when the job never reached an environment.
    env: Option<String>,
    phases: StoredPhases,
    agent_id: String,
    attempt: u32,
    local: bool,
    queue_time_ns: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum StoredEnd {
    Exited { code: i32 },
    Signalled { signal: i32 },
    TimedOut,
    Cancelled,
    Failed { reason: String },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPhases {
    workspace_wait_ns: u64,
    fetch_ns: u64,
    checkout_ns: u64,
    environment_ns: u64,
    cargo_ns: u64,
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn env_mode_name(mode: EnvMode) -> &'static str {
    match mode {
        EnvMode::Auto => "auto",
        EnvMode::Nix => "nix",
        EnvMode::Host => "host",
    }
}

pub fn submission_to_text(submission: &Submission) -> String {
    let spec = &submission.spec;
    let stored = StoredSubmission {
        spec: StoredSpec {
            kind: spec.kind.cargo_subcommand().to_owned(),
            cargo_args: spec.cargo_args.clone(),
            env: spec
                .env
                .iter()
                .map(|var| (var.name.clone(), var.value.clone()))
                .collect(),
            timeout_ns: spec.timeout.map(nanos),
            env_mode: env_mode_name(spec.env_mode).to_owned(),
            required_labels: spec.required_labels.clone(),
            collect_executables: spec.collect_executables,
            archive_from: spec.archive_from,
        },
        commit: submission.commit.clone(),
        git_ref: submission.git_ref.clone(),
        worktree: submission.worktree.clone(),
        base_commit: submission.base_commit.clone(),
    };
    serde_json::to_string(&stored).unwrap_or_default()
}

pub fn submission_from_text(text: &str) -> Result<Submission, RowError> {
    let stored: StoredSubmission = serde_json::from_str(text)?;
    let spec = stored.spec;
    Ok(Submission {
        spec: JobSpec {
            kind: JobKind::from_name(&spec.kind)
                .ok_or_else(|| RowError(format!("unknown job kind {:?}", spec.kind)))?,
            cargo_args: spec.cargo_args,
            env: spec
                .env
                .into_iter()
                .map(|(name, value)| EnvVar { name, value })
                .collect(),
            timeout: spec.timeout_ns.map(Duration::from_nanos),
            env_mode: spec.env_mode.parse().map_err(RowError)?,
            required_labels: spec.required_labels,
            collect_executables: spec.collect_executables,
            archive_from: spec.archive_from,
        },
        commit: stored.commit,
        git_ref: stored.git_ref,
        worktree: stored.worktree,
        base_commit: stored.base_commit,
    })
}

pub fn result_to_text(result: &JobResult) -> String {
    let completion = &result.completion;
    let phases = &completion.phases;
    let stored = StoredResult {
        end: match &completion.end {
            JobEnd::Exited { code } => StoredEnd::Exited { code: *code },
            JobEnd::Signalled { signal } => StoredEnd::Signalled { signal: *signal },
            JobEnd::TimedOut => StoredEnd::TimedOut,
            JobEnd::Cancelled => StoredEnd::Cancelled,
            JobEnd::Failed { reason } => StoredEnd::Failed {
                reason: reason.clone(),
            },
        },
        duration_ns: nanos(completion.duration),
        env: completion.env.map(|env| env.label().to_owned()),
        phases: StoredPhases {
            workspace_wait_ns: nanos(phases.workspace_wait),
            fetch_ns: nanos(phases.fetch),
            checkout_ns: nanos(phases.checkout),
            environment_ns: nanos(phases.environment),
            cargo_ns: nanos(phases.cargo),
        },
        agent_id: result.agent_id.clone(),
        attempt: result.attempt,
        local: result.local,
        queue_time_ns: nanos(result.queue_time),
    };
    serde_json::to_string(&stored).unwrap_or_default()
}

pub fn result_from_text(text: &str) -> Result<JobResult, RowError> {
    let stored: StoredResult = serde_json::from_str(text)?;
    let phases = stored.phases;
    Ok(JobResult {
        completion: Completion {
            end: match stored.end {
                StoredEnd::Exited { code } => JobEnd::Exited { code },
                StoredEnd::Signalled { signal } => JobEnd::Signalled { signal },
                StoredEnd::TimedOut => JobEnd::TimedOut,
                StoredEnd::Cancelled => JobEnd::Cancelled,
                StoredEnd::Failed { reason } => JobEnd::Failed { reason },
            },
            duration: Duration::from_nanos(stored.duration_ns),
            env: stored
                .env
                .map(|label| {
                    RunEnv::from_label(&label)
                        .ok_or_else(|| RowError(format!("unknown environment {label:?}")))
                })
                .transpose()?,
            phases: AgentPhases {
                workspace_wait: Duration::from_nanos(phases.workspace_wait_ns),
                fetch: Duration::from_nanos(phases.fetch_ns),
                checkout: Duration::from_nanos(phases.checkout_ns),
                environment: Duration::from_nanos(phases.environment_ns),
                cargo: Duration::from_nanos(phases.cargo_ns),
            },
        },
        agent_id: stored.agent_id,
        attempt: stored.attempt,
        local: stored.local,
        queue_time: Duration::from_nanos(stored.queue_time_ns),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_of_a_submission_and_a_result_reads_back_the_same() {
        let mut spec = JobSpec::new(JobKind::Nextest);
        spec.cargo_args = vec!["-p".into(), "app".into()];
        spec.env = vec![EnvVar {
            name: "RUST_LOG".into(),
            value: "debug".into(),
        }];
        spec.timeout = Some(Duration::from_millis(1500));
        spec.env_mode = EnvMode::Host;
        spec.required_labels = vec!["os=linux".into()];
        spec.collect_executables = true;
        spec.archive_from = Some(7);
        let submission = Submission {
            spec,
            commit: "a".repeat(40),
            git_ref: "refs/buildpool/snapshots/x".into(),
            worktree: "/w".into(),
            base_commit: String::new(),
        };
        let read = submission_from_text(&submission_to_text(&submission)).expect("reads");
        assert_eq!(read, submission);
        for end in [
            JobEnd::Failed {
                reason: "no agent".into(),
            },
            JobEnd::Cancelled,
            JobEnd::Exited { code: 101 },
            JobEnd::TimedOut,
            JobEnd::Signalled { signal: 9 },
        ] {
            let mut completion = Completion::new(end);
            completion.duration = Duration::from_nanos(1_234_567);
            completion.env = Some(RunEnv::Nix);
            completion.phases.cargo = Duration::from_millis(7);
            let result = JobResult {
                completion,
                agent_id: "a1".into(),
                attempt: 3,
                local: true,
                queue_time: Duration::from_micros(42),
            };
            let read = result_from_text(&result_to_text(&result)).expect("reads");
            assert_eq!(read, result);
        }
    }

    #[test]
    fn a_row_with_a_missing_or_unknown_field_is_an_error() {
        assert!(submission_from_text("{}").is_err());
        let text = submission_to_text(&Submission {
            spec: JobSpec::new(JobKind::Test),
            commit: String::new(),
            git_ref: String::new(),
            worktree: String::new(),
            base_commit: String::new(),
        });
        let extra = text.replacen('{', r#"{"surprise":1,"#, 1);
        assert!(submission_from_text(&extra).is_err(), "{extra}");
        let unknown_kind = text.replace(r#""kind":"test""#, r#""kind":"bench""#);
        assert!(
            submission_from_text(&unknown_kind).is_err(),
            "{unknown_kind}"
        );
    }
}
