//! What a coordinator reports about itself, its agents, its jobs and their logs.

use crate::bus::DiskUsage;
use crate::job::{JobId, JobKind, JobSpec, OutputStream};

/// A job as a client submits it: the spec plus the snapshot to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub spec: JobSpec,
    /// Snapshot commit and the hidden ref that holds it, in the coordinator's repository.
    pub commit: String,
    pub git_ref: String,
    /// The worktree the snapshot was taken from, for display and workspace affinity.
    pub worktree: String,
    /// The snapshot's parent commit (the worktree's `HEAD`); empty when it has none.
    pub base_commit: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    pub id: String,
    pub slots_total: u32,
    pub slots_used: u32,
    pub labels: Vec<String>,
    pub system: String,
    pub connected_since_unix_ms: u64,
    /// The coordinator's embedded local agent.
    pub local: bool,
    pub draining: bool,
    pub address: String,
    pub sandboxed: bool,
    pub disk: DiskUsage,
}

/// Where a job that has not ended is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobPlace {
    Queued,
    Running { agent_id: String, attempt: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    pub job_id: JobId,
    pub kind: JobKind,
    pub place: JobPlace,
    pub submitted_unix_ms: u64,
    pub worktree: String,
    pub cargo_args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorStatus {
    pub coordinator_id: String,
    pub repository: String,
    pub agents: Vec<AgentStatus>,
    /// Queued jobs in queue order, then running jobs.
    pub jobs: Vec<JobStatus>,
    pub local_fallback_enabled: bool,
    /// The embedded local agent is running a job right now.
    pub local_fallback_active: bool,
    pub websocket_addr: Option<String>,
    pub git_daemon_port: Option<u16>,
}

/// A request for a page of a job's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRequest {
    pub job_id: JobId,
    /// Byte offset into the selected stream(s).
    pub offset: u64,
    /// Most bytes to return; `None`: the coordinator's default page.
    pub limit: Option<u32>,
    /// `None`: both streams, in arrival order.
    pub stream: Option<OutputStream>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    pub data: Vec<u8>,
    pub next_offset: u64,
    /// The job has ended and `next_offset` is the end of its log.
    pub complete: bool,
    /// Bytes dropped because the log hit its size cap.
    pub truncated_bytes: u64,
}

/// What a cancel request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReply {
    /// The job was queued or running and is being cancelled.
    Cancelling,
    /// The job had already ended.
    AlreadyFinished,
}
