//! The domain of buildpool, apart from any wire format.
//!
//! Jobs, attempts, how they end, what clients see of them and what agents and coordinators
//! say to each other on the job bus are plain Rust types here. The scheduler, the executor,
//! the agent's job table and every client speak these; only the `proto` crate (and the gRPC
//! adapters) translate them to and from protobuf, so a missing or unknown wire value is a
//! decode error at the edge instead of a silent default deep inside.
//!
//! Helpers both the agent and the coordinator need (git with deadlines, process liveness
//! and group kills, wall-clock time, the host name) live here too, so neither crate borrows from the other.

pub mod bus;
pub mod chunks;
pub mod git;
pub mod host;
pub mod job;
pub mod process;
pub mod spec;
pub mod status;
pub mod time;

pub use job::{
    AgentPhases, ArtifactChunk, AttemptKey, Completion, EnvMode, EnvVar, JobEnd, JobEvent, JobId,
    JobKind, JobResult, JobSpec, OutputStream, RunEnv, SnapshotPack, Source,
};
