//! What agents and coordinators say to each other on the job bus.
//!
//! One [`AgentMessage`] or [`CoordinatorMessage`] travels in each WebSocket frame; the
//! `proto` crate encodes them. The agent's first message is a [`AgentMessage::Hello`]; the
//! coordinator answers [`CoordinatorMessage::Welcome`] or [`CoordinatorMessage::Reject`].

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use crate::job::{ArtifactChunk, AttemptKey, Completion, JobSpec, OutputStream, Source};

/// Version of the agent job bus. Bumped on any incompatible change; the coordinator rejects
/// agents speaking another version with a clear message instead of misreading their frames.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest output chunk an agent puts into one message; far below the frame size limit.
pub const MAX_OUTPUT_CHUNK_BYTES: usize = 64 * 1024;

/// The first message of an agent connection: who it is, what it offers, what it still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub agent_id: String,
    pub token: String,
    pub labels: Vec<String>,
    /// Nix system double, e.g. `x86_64-linux`.
    pub system: String,
    pub slots: SlotOffer,
    pub agent_version: String,
    /// Attempts this agent still runs or holds an unacknowledged result for, so the
    /// coordinator can reattach them after a reconnect.
    pub attempts: Vec<HeldAttempt>,
    /// Whether its jobs run in a sandbox; coordinators mark agents that do not.
    pub sandboxed: bool,
    pub disk: DiskUsage,
    /// Proof of the agent's identity key for this coordinator (the agent's
    /// `identity::proof`); empty from the embedded agent.
    pub identity: String,
}

/// An agent's disk use for workspaces and caches, against its budget. All zero when the
/// agent keeps no budget (the coordinator's embedded agent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub used_bytes: u64,
    pub budget_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldAttempt {
    pub key: AttemptKey,
    /// The attempt has ended; its result is sent (again) after the welcome.
    pub finished: bool,
}

/// The slots an agent offers one coordinator right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotOffer {
    pub free: u32,
    pub total: u32,
    pub draining: bool,
}

/// Bytes for people: `1.5 GB`, `20 MB`, `300 kB`.
pub fn human_bytes(bytes: u64) -> String {
    // Display only: the precision a float keeps is plenty.
    #[allow(clippy::cast_precision_loss)]
    let value = bytes as f64;
    if value >= 1e9 {
        format!("{:.1} GB", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.0} MB", value / 1e6)
    } else {
        format!("{:.0} kB", value / 1e3)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub protocol_version: u32,
    pub coordinator_id: String,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCode {
    BadToken,
    UnsupportedVersion,
    BadHello,
    /// The agent id belongs to another agent.
    IdTaken,
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectCode::BadToken => "bad token",
            RejectCode::UnsupportedVersion => "unsupported version",
            RejectCode::BadHello => "bad hello",
            RejectCode::IdTaken => "agent id taken",
        })
    }
}

/// Sent instead of a welcome; the coordinator closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: RejectCode,
    pub message: String,
}

/// One attempt given to one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub key: AttemptKey,
    pub spec: JobSpec,
    pub source: Source,
    /// The worktree the snapshot was taken from: the agent runs the job in the workspace
    /// that last built it, whose `target/` is the warmest for it.
    pub worktree: String,
}

/// Every message an agent sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    Hello(Hello),
    /// Any message proves liveness; this one is sent when there is nothing else to say.
    Heartbeat {
        sent_at_unix_ms: u64,
    },
    /// The offer to this coordinator changed.
    Slots(SlotOffer),
    /// The agent's disk use changed (sent with a heartbeat when it did).
    Disk(DiskUsage),
    /// The agent could not take an assignment (no free slot, draining, missing label).
    Declined {
        key: AttemptKey,
        reason: String,
    },
    Output {
        key: AttemptKey,
        stream: OutputStream,
        data: Bytes,
    },
    /// Part of an executable the attempt built; all are sent after its output and before
    /// its result, and only while connected (never dropped-oldest like output).
    Artifact {
        key: AttemptKey,
        chunk: ArtifactChunk,
    },
    Finished {
        key: AttemptKey,
        completion: Completion,
    },
    CancelAck(AttemptKey),
}

/// Every message a coordinator sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorMessage {
    Welcome(Welcome),
    Reject(Reject),
    Heartbeat {
        sent_at_unix_ms: u64,
    },
    /// Boxed: the largest message by far, and the rarest besides output.
    Assign(Box<Assignment>),
    /// Stop the attempt (kill its process group) or, if it has ended, forget its result.
    /// Also sent after a reconnect for attempts the coordinator gave to someone else.
    Cancel(AttemptKey),
    /// The coordinator could not understand a frame; it closes the connection after this.
    ProtocolError(String),
    /// Stop taking jobs, finish the running ones (up to the agent's drain timeout), exit.
    Drain,
    /// How many queued jobs this coordinator has that the agent could run; the agent
    /// shares its slots among coordinators with demand.
    Demand {
        queued: u32,
    },
    /// The coordinator has the attempt's result; the agent may forget it.
    ResultAck(AttemptKey),
}
