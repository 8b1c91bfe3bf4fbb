//! `buildpool run <kind> [-- cargo args]`

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use buildpool_proto::{
    CancelRequest, Completion, EnvMode, EnvVar, JobKind, JobResult, JobSpec, Outcome, OutputStream,
    SubmitRequest, job_event,
};
use clap::Args;

use crate::client::CALL_TIMEOUT;
use crate::repo::Repo;
use crate::session::{Fallback, Route, Via};

/// Exit code when the job timed out (as `timeout(1)` does).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit code when buildpool could not run the job at all.
pub const EXIT_FAILED: u8 = 125;
/// Exit code when the job was cancelled.
pub const EXIT_CANCELLED: u8 = 130;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// build, test, clippy or check.
    kind: String,
    /// Job timeout in seconds (default: the coordinator's job_default_secs).
    #[arg(long)]
    timeout: Option<u32>,
    /// Environment on the agent: auto (nix develop when the repository has a flake.nix), nix or host.
    #[arg(long, default_value = "auto")]
    env: String,
    /// Run only on agents with this label (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Run here through an in-process coordinator even if one is running.
    #[arg(long)]
    local: bool,
    /// Arguments passed to cargo after the subcommand.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

impl RunArgs {
    /// `run test --local`: what `buildpool demo` runs.
    pub fn local_test() -> Self {
        Self {
            kind: "test".to_owned(),
            timeout: None,
            env: "auto".to_owned(),
            labels: Vec::new(),
            local: true,
            cargo_args: Vec::new(),
        }
    }
}

fn env_mode(text: &str) -> anyhow::Result<EnvMode> {
    Ok(match text {
        "auto" => EnvMode::Auto,
        "nix" => EnvMode::Nix,
        "host" => EnvMode::Host,
        other => bail!("--env must be auto, nix or host, not {other:?}"),
    })
}

/// Allow-listed variables set in the caller's environment travel with the job.
fn forwarded_env() -> Vec<EnvVar> {
    let mut vars: Vec<EnvVar> = std::env::vars()
        .filter(|(name, _)| buildpool_proto::spec::env_name_allowed(name))
        .map(|(name, value)| EnvVar { name, value })
        .collect();
    vars.sort_by(|a, b| a.name.cmp(&b.name));
    vars
}

/// The process exit code that represents a job's result.
pub fn exit_code(completion: &Completion) -> u8 {
    match Outcome::try_from(completion.outcome).unwrap_or(Outcome::Unspecified) {
        Outcome::Exited => match (completion.exit_code, completion.signal) {
            (Some(code), _) => u8::try_from(code).unwrap_or(1),
            (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
            (None, None) => 1,
        },
        Outcome::TimedOut => EXIT_TIMED_OUT,
        Outcome::Cancelled => EXIT_CANCELLED,
        Outcome::Failed | Outcome::Unspecified => EXIT_FAILED,
    }
}

/// One line describing how a job ended.
pub fn describe(result: &JobResult) -> String {
    let completion = result.completion.clone().unwrap_or_default();
    let outcome = match Outcome::try_from(completion.outcome).unwrap_or(Outcome::Unspecified) {
        Outcome::Exited => match (completion.exit_code, completion.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "exited".to_owned(),
        },
        Outcome::TimedOut => "timed out".to_owned(),
        Outcome::Cancelled => "cancelled".to_owned(),
        Outcome::Failed => format!("failed: {}", completion.error),
        Outcome::Unspecified => "ended".to_owned(),
    };
    let place = if result.agent_id.is_empty() {
        String::new()
    } else if result.local {
        " on the local agent".to_owned()
    } else {
        format!(" on {}", result.agent_id)
    };
    let env = if completion.env.is_empty() {
        String::new()
    } else {
        format!(", env {}", completion.env)
    };
    format!(
        "{outcome} after {:.1} s{place}{env}, queued {:.1} s, attempt {}",
        completion.duration_ms as f64 / 1000.0,
        result.queue_ms as f64 / 1000.0,
        result.attempt
    )
}

pub async fn run(dir: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    // First, so a Ctrl-C at any point after start is ours to handle (and cancels the job).
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let kind = JobKind::from_subcommand(&args.kind).with_context(|| {
        format!(
            "unknown job kind {:?}: use build, test, clippy or check",
            args.kind
        )
    })?;
    let spec = JobSpec {
        kind: kind as i32,
        cargo_args: args.cargo_args,
        env: forwarded_env(),
        timeout_secs: args.timeout.unwrap_or(0),
        env_mode: env_mode(&args.env)? as i32,
        required_labels: args.labels,
    };
    buildpool_proto::spec::validate(&spec)?;
    let repo = Repo::discover(dir).await?;
    let snapshot = crate::snapshot::create(&repo)
        .await
        .context("cannot snapshot the worktree")?;

    let fallback = Fallback::default();
    let Route { mut client, via } = fallback.route(&repo, args.local).await?;
    if let Via::InProcess(reason) = &via
        && !args.local
    {
        eprintln!("[buildpool] {reason}; running the job here");
    }

    let request = SubmitRequest {
        spec: Some(spec),
        commit: snapshot.commit,
        git_ref: snapshot.git_ref,
        worktree: repo.worktree.display().to_string(),
    };
    let mut events = client
        .submit(request)
        .await
        .context("the coordinator refused the job")?
        .into_inner();
    let mut job_id = None;
    let mut cancel_requested = false;
    let code = loop {
        let event = tokio::select! {
            event = events.message() => event,
            _ = interrupts.recv() => {
                if cancel_requested {
                    eprintln!("[buildpool] interrupted again; leaving without waiting");
                    break EXIT_CANCELLED;
                }
                cancel_requested = true;
                if let Some(job_id) = job_id {
                    eprintln!("[buildpool] cancelling job {job_id} (Ctrl-C again to leave at once)");
                    let mut request = tonic::Request::new(CancelRequest { job_id });
                    request.set_timeout(CALL_TIMEOUT);
                    if let Err(error) = client.cancel(request).await {
                        eprintln!("[buildpool] cancel failed: {}", error.message());
                    }
                }
                continue;
            }
        };
        let Some(event) = event.context("lost the coordinator while the job ran")? else {
            bail!("the coordinator closed the stream before the job ended");
        };
        if job_id.is_none() && cancel_requested {
            // Ctrl-C came before we knew the job's id: cancel it now.
            eprintln!(
                "[buildpool] cancelling job {} (Ctrl-C again to leave at once)",
                event.job_id
            );
            let mut request = tonic::Request::new(CancelRequest {
                job_id: event.job_id,
            });
            request.set_timeout(CALL_TIMEOUT);
            if let Err(error) = client.cancel(request).await {
                eprintln!("[buildpool] cancel failed: {}", error.message());
            }
        }
        job_id = Some(event.job_id);
        match event.event {
            Some(job_event::Event::Queued(queued)) => {
                let reason = if queued.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", queued.reason)
                };
                eprintln!("[buildpool] job {} queued{reason}", event.job_id);
            }
            Some(job_event::Event::Assigned(assigned)) => {
                if assigned.local {
                    eprintln!(
                        "[buildpool] job {} running on the coordinator's local agent (no build agent connected)",
                        event.job_id
                    );
                } else {
                    eprintln!(
                        "[buildpool] job {} running on {} (attempt {})",
                        event.job_id, assigned.agent_id, assigned.attempt
                    );
                }
            }
            Some(job_event::Event::Output(chunk)) => {
                let result = if chunk.stream == OutputStream::Stdout as i32 {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&chunk.data).and_then(|()| out.flush())
                } else {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&chunk.data).and_then(|()| err.flush())
                };
                if let Err(error) = result {
                    // Our own output is gone (closed pipe): the job has nobody to report to.
                    bail!("cannot write output: {error}");
                }
            }
            Some(job_event::Event::Finished(result)) => {
                eprintln!("[buildpool] job {} {}", event.job_id, describe(&result));
                break exit_code(&result.completion.unwrap_or_default());
            }
            None => {}
        }
    };
    drop(events);
    fallback.shutdown().await;
    Ok(ExitCode::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_distinct_exit_codes() {
        let exited = |code| Completion {
            outcome: Outcome::Exited as i32,
            exit_code: Some(code),
            ..Completion::default()
        };
        assert_eq!(exit_code(&exited(0)), 0);
        assert_eq!(exit_code(&exited(101)), 101);
        let signalled = Completion {
            outcome: Outcome::Exited as i32,
            signal: Some(9),
            ..Completion::default()
        };
        assert_eq!(exit_code(&signalled), 137);
        let timed_out = Completion {
            outcome: Outcome::TimedOut as i32,
            ..Completion::default()
        };
        assert_eq!(exit_code(&timed_out), EXIT_TIMED_OUT);
        let failed = Completion {
            outcome: Outcome::Failed as i32,
            ..Completion::default()
        };
        assert_eq!(exit_code(&failed), EXIT_FAILED);
    }

    #[test]
    fn a_summary_names_outcome_place_and_env() {
        let result = JobResult {
            completion: Some(Completion {
                outcome: Outcome::Exited as i32,
                exit_code: Some(101),
                duration_ms: 2500,
                env: "nix".into(),
                ..Completion::default()
            }),
            agent_id: "worker-1".into(),
            attempt: 1,
            local: false,
            queue_ms: 100,
        };
        assert_eq!(
            describe(&result),
            "exit code 101 after 2.5 s on worker-1, env nix, queued 0.1 s, attempt 1"
        );
    }
}
