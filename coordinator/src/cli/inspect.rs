//! `buildpool status`, `logs` and `cancel`: read-only views and control of a running coordinator.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use buildpool_core::OutputStream;
use buildpool_core::bus::human_bytes;
use buildpool_core::status::{CancelReply, CoordinatorStatus, JobPlace, LogRequest};
use buildpool_core::time::unix_millis;
use clap::Args;

use crate::client::Client;
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
    let (client, _) = Client::connect_to_running(&repo).await?;
    Ok(client)
}

fn ago(unix_ms: u64) -> String {
    let secs = unix_millis().saturating_sub(unix_ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        _ => format!("{}h{}m ago", secs / 3600, secs / 60 % 60),
    }
}

/// The agent and attempt of a running job.
fn running_on(place: &JobPlace) -> Option<(&str, u32)> {
    match place {
        JobPlace::Running { agent_id, attempt } => Some((agent_id, *attempt)),
        JobPlace::Queued => None,
    }
}

fn status_json(status: &CoordinatorStatus) -> serde_json::Value {
    serde_json::json!({
        "coordinator_id": status.coordinator_id,
        "repository": status.repository,
        "websocket_addr": status.websocket_addr.clone().unwrap_or_default(),
        "git_daemon_port": status.git_daemon_port.unwrap_or(0),
        "local_fallback_enabled": status.local_fallback_enabled,
        "local_fallback_active": status.local_fallback_active,
        "agents": status.agents.iter().map(|a| serde_json::json!({
            "id": a.id, "slots_total": a.slots_total, "slots_used": a.slots_used, "labels": a.labels,
            "system": a.system, "connected_since_unix_ms": a.connected_since_unix_ms, "local": a.local,
            "draining": a.draining, "address": a.address, "sandboxed": a.sandboxed,
            "disk_used_bytes": a.disk.used_bytes, "disk_budget_bytes": a.disk.budget_bytes,
        })).collect::<Vec<_>>(),
        "jobs": status.jobs.iter().map(|j| {
            let running = running_on(&j.place);
            serde_json::json!({
                "job_id": j.job_id, "kind": j.kind.cargo_subcommand(),
                "state": if running.is_some() { "running" } else { "queued" },
                "agent_id": running.map_or("", |(agent, _)| agent),
                "attempt": running.map_or(0, |(_, attempt)| attempt),
                "submitted_unix_ms": j.submitted_unix_ms,
                "worktree": j.worktree, "cargo_args": j.cargo_args,
            })
        }).collect::<Vec<_>>(),
    })
}

pub async fn status(dir: &Path, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = connect(dir).await?;
    let status = client.status().await.context("status failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "coordinator {} for {}",
        status.coordinator_id, status.repository
    );
    if let Some(websocket_addr) = &status.websocket_addr {
        println!(
            "job bus {websocket_addr}, git daemon port {}",
            status.git_daemon_port.unwrap_or(0)
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
        let running = running_on(&job.place);
        let agent = running.map_or_else(
            || "-".to_owned(),
            |(agent, attempt)| format!("{agent} #{attempt}"),
        );
        println!(
            "{:<8} {:<8} {:<7} {agent:<20} {:<11} {}",
            job.job_id,
            if running.is_some() {
                "running"
            } else {
                "queued"
            },
            job.kind.cargo_subcommand(),
            ago(job.submitted_unix_ms),
            job.worktree
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(dir: &Path, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let stream = match args.stream.as_deref() {
        None => None,
        Some("stdout") => Some(OutputStream::Stdout),
        Some("stderr") => Some(OutputStream::Stderr),
        Some(other) => anyhow::bail!("--stream must be stdout or stderr, not {other:?}"),
    };
    let client = connect(dir).await?;
    let mut offset = 0;
    let mut out = std::io::stdout().lock();
    loop {
        let request = LogRequest {
            job_id: args.job_id,
            offset,
            limit: None,
            stream,
        };
        let page = client.job_log(request).await?;
        out.write_all(&page.data)?;
        if page.data.is_empty() || page.complete {
            break;
        }
        offset = page.next_offset;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(dir: &Path, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let client = connect(dir).await?;
    match client.cancel(args.job_id).await? {
        CancelReply::Cancelling => println!("job {}: cancelling", args.job_id),
        CancelReply::AlreadyFinished => println!("job {} already finished", args.job_id),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_agents(status: &CoordinatorStatus) {
    println!("\nAGENT                SLOTS  LABELS                 DISK              CONNECTED");
    for agent in &status.agents {
        let name = if agent.local {
            format!("{} (local)", agent.id)
        } else {
            agent.id.clone()
        };
        let draining = if agent.draining { " draining" } else { "" };
        // The embedded agent runs the developer's own jobs on their machine: no sandbox
        // is expected there.
        let unsandboxed = if agent.sandboxed || agent.local {
            ""
        } else {
            " UNSANDBOXED"
        };
        let disk = if agent.disk.budget_bytes == 0 {
            "-".to_owned()
        } else {
            format!(
                "{}/{}",
                human_bytes(agent.disk.used_bytes),
                human_bytes(agent.disk.budget_bytes)
            )
        };
        println!(
            "{name:<20} {:>2}/{:<3} {:<22} {disk:<17} {}{draining}{unsandboxed}",
            agent.slots_used,
            agent.slots_total,
            agent.labels.join(","),
            ago(agent.connected_since_unix_ms)
        );
    }
}

pub async fn agents(dir: &Path, args: AgentsArgs) -> anyhow::Result<ExitCode> {
    let client = connect(dir).await?;
    match args.action {
        None => {
            let status = client.status().await.context("status failed")?;
            print_agents(&status);
        }
        Some(AgentsAction::Drain { agent_id }) => {
            client.drain_agent(&agent_id).await?;
            println!("agent {agent_id}: draining (finishes its running jobs, then exits)");
        }
    }
    Ok(ExitCode::SUCCESS)
}
