//! `buildpool status`, `logs` and `cancel`: read-only views and control of a running coordinator.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use buildpool_proto::{
    CancelRequest, DrainAgentRequest, JobKind, JobLogRequest, JobState, OutputStream, StatusReply,
    StatusRequest,
};
use clap::Args;

use crate::client::{self, CALL_TIMEOUT, Client};
use crate::repo::Repo;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    job_id: u64,
    /// Only stdout or stderr.
    #[arg(long)]
    stream: Option<String>,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    job_id: u64,
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(subcommand)]
    action: Option<AgentsAction>,
}

#[derive(Debug, clap::Subcommand)]
enum AgentsAction {
    /// Stop giving the agent jobs; it finishes its running ones (up to its drain timeout) and exits.
    Drain { agent_id: String },
}

async fn connect(dir: &Path) -> anyhow::Result<Client> {
    let repo = Repo::discover(dir).await?;
    let (client, _) = client::connect_to_running(&repo).await?;
    Ok(client)
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

fn ago(unix_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(unix_ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        _ => format!("{}h{}m ago", secs / 3600, secs / 60 % 60),
    }
}

fn kind_name(kind: i32) -> &'static str {
    JobKind::try_from(kind)
        .ok()
        .and_then(JobKind::cargo_subcommand)
        .unwrap_or("?")
}

fn status_json(status: &StatusReply) -> serde_json::Value {
    serde_json::json!({
        "coordinator_id": status.coordinator_id,
        "repository": status.repository,
        "websocket_addr": status.websocket_addr,
        "git_daemon_port": status.git_daemon_port,
        "local_fallback_enabled": status.local_fallback_enabled,
        "local_fallback_active": status.local_fallback_active,
        "agents": status.agents.iter().map(|a| serde_json::json!({
            "id": a.id, "slots_total": a.slots_total, "slots_used": a.slots_used, "labels": a.labels,
            "system": a.system, "connected_since_unix_ms": a.connected_since_unix_ms, "local": a.local,
            "draining": a.draining, "address": a.address,
        })).collect::<Vec<_>>(),
        "jobs": status.jobs.iter().map(|j| serde_json::json!({
            "job_id": j.job_id, "kind": kind_name(j.kind),
            "state": if j.state == JobState::Running as i32 { "running" } else { "queued" },
            "agent_id": j.agent_id, "attempt": j.attempt, "submitted_unix_ms": j.submitted_unix_ms,
            "worktree": j.worktree, "cargo_args": j.cargo_args,
        })).collect::<Vec<_>>(),
    })
}

pub async fn status(dir: &Path, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(dir).await?;
    let status = client
        .status(request(StatusRequest {}))
        .await
        .context("status failed")?
        .into_inner();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "coordinator {} for {}",
        status.coordinator_id, status.repository
    );
    if !status.websocket_addr.is_empty() {
        println!(
            "job bus {}, git daemon port {}",
            status.websocket_addr, status.git_daemon_port
        );
    }
    let fallback = match (status.local_fallback_enabled, status.local_fallback_active) {
        (false, _) => "disabled",
        (true, true) => "enabled, running a job now",
        (true, false) => "enabled, idle",
    };
    println!("local fallback: {fallback}");
    print_agents(&status);
    println!("\nJOB      STATE    KIND    AGENT                SUBMITTED   WORKTREE");
    for job in &status.jobs {
        let running = job.state == JobState::Running as i32;
        let agent = if running {
            format!("{} #{}", job.agent_id, job.attempt)
        } else {
            "-".to_owned()
        };
        println!(
            "{:<8} {:<8} {:<7} {agent:<20} {:<11} {}",
            job.job_id,
            if running { "running" } else { "queued" },
            kind_name(job.kind),
            ago(job.submitted_unix_ms),
            job.worktree
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(dir: &Path, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let stream = match args.stream.as_deref() {
        None => OutputStream::Unspecified,
        Some("stdout") => OutputStream::Stdout,
        Some("stderr") => OutputStream::Stderr,
        Some(other) => anyhow::bail!("--stream must be stdout or stderr, not {other:?}"),
    };
    let mut client = connect(dir).await?;
    let mut offset = 0;
    let mut out = std::io::stdout().lock();
    loop {
        let page = client
            .job_log(request(JobLogRequest {
                job_id: args.job_id,
                offset,
                limit: 0,
                stream: stream as i32,
            }))
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))?
            .into_inner();
        out.write_all(&page.data)?;
        if page.data.is_empty() || page.complete {
            break;
        }
        offset = page.next_offset;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(dir: &Path, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(dir).await?;
    let reply = client
        .cancel(request(CancelRequest {
            job_id: args.job_id,
        }))
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner();
    if reply.cancelled {
        println!("job {}: cancelling", args.job_id);
    } else {
        println!("job {} already {}", args.job_id, reply.state);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_agents(status: &StatusReply) {
    println!("\nAGENT                SLOTS  LABELS                 CONNECTED");
    for agent in &status.agents {
        let name = if agent.local {
            format!("{} (local)", agent.id)
        } else {
            agent.id.clone()
        };
        let draining = if agent.draining { " draining" } else { "" };
        println!(
            "{name:<20} {:>2}/{:<3} {:<22} {}{draining}",
            agent.slots_used,
            agent.slots_total,
            agent.labels.join(","),
            ago(agent.connected_since_unix_ms)
        );
    }
}

pub async fn agents(dir: &Path, args: AgentsArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(dir).await?;
    match args.action {
        None => {
            let status = client
                .status(request(StatusRequest {}))
                .await
                .context("status failed")?
                .into_inner();
            print_agents(&status);
        }
        Some(AgentsAction::Drain { agent_id }) => {
            client
                .drain_agent(request(DrainAgentRequest {
                    agent_id: agent_id.clone(),
                }))
                .await
                .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
            println!("agent {agent_id}: draining (finishes its running jobs, then exits)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
