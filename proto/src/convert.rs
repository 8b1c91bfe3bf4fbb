//! The one place where domain types become protobuf messages and back.
//!
//! Encoding cannot fail. Decoding can: a missing message field or an enum value this side
//! does not know is a [`DecodeError`] naming the field, never a silent default. (proto3 has
//! no "missing" for scalars; where zero means "not set" on the wire, the domain type says so
//! with an `Option`.)

use std::time::Duration;

use buildpool_core::bus::{
    AgentMessage, Assignment, CoordinatorMessage, DiskUsage, HeldAttempt, Hello, PROTOCOL_VERSION,
    Reject, RejectCode, SlotOffer, Welcome,
};
use buildpool_core::status::{
    AgentStatus, CancelReply, CoordinatorStatus, JobPlace, JobStatus, LogPage, LogRequest,
    Submission,
};
use buildpool_core::time::millis;
use buildpool_core::{
    AgentPhases, ArtifactChunk, AttemptKey, Completion, EnvMode, EnvVar, JobEnd, JobEvent, JobId,
    JobKind, JobResult, JobSpec, OutputStream, RunEnv, SnapshotPack, Source,
};

use crate::{agent_frame, coordinator_frame, job_event};

/// A wire message that does not make a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{field} has the unknown value {value}")]
    Unknown { field: &'static str, value: i32 },
    #[error("{field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// An assignment whose key is readable but whose spec or source is not: the receiver
    /// can fail that one attempt instead of the whole connection.
    #[error("assignment of {key}: {error}")]
    Assignment {
        key: AttemptKey,
        error: Box<DecodeError>,
    },
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    value.ok_or(DecodeError::Missing(field))
}

fn millis_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

// ---- enums -------------------------------------------------------------------------------

/// Declares the one-to-one mapping between a domain enum and its wire enum, whose variants
/// have the same names: `From` for encoding, and a decode function for which any other wire
/// value (the "unspecified" zero, or a number from a newer peer) is an error.
macro_rules! wire_enum {
    ($decode:ident, $field:literal, $name:ident { $($variant:ident),+ $(,)? }) => {
        impl From<$name> for crate::$name {
            fn from(value: $name) -> Self {
                match value {
                    $($name::$variant => Self::$variant,)+
                }
            }
        }

        fn $decode(value: i32) -> Result<$name, DecodeError> {
            match crate::$name::try_from(value) {
                $(Ok(crate::$name::$variant) => Ok($name::$variant),)+
                _ => Err(DecodeError::Unknown { field: $field, value }),
            }
        }
    };
}

wire_enum!(
    decode_kind,
    "job kind",
    JobKind {
        Build,
        Test,
        Clippy,
        Check,
        Nextest,
        NextestArchive
    }
);
wire_enum!(decode_env_mode, "env mode", EnvMode { Auto, Nix, Host });
wire_enum!(
    decode_stream,
    "output stream",
    OutputStream { Stdout, Stderr }
);
wire_enum!(
    decode_reject_code,
    "reject code",
    RejectCode {
        BadToken,
        UnsupportedVersion,
        BadHello,
        IdTaken
    }
);

fn encode_stream(stream: OutputStream) -> i32 {
    crate::OutputStream::from(stream).into()
}

/// An output stream where "unspecified" means "both streams" (log requests).
fn decode_stream_filter(value: i32) -> Result<Option<OutputStream>, DecodeError> {
    if value == i32::from(crate::OutputStream::Unspecified) {
        Ok(None)
    } else {
        decode_stream(value).map(Some)
    }
}

// ---- jobs --------------------------------------------------------------------------------

impl From<JobSpec> for crate::JobSpec {
    fn from(spec: JobSpec) -> Self {
        Self {
            kind: crate::JobKind::from(spec.kind).into(),
            cargo_args: spec.cargo_args,
            env: spec
                .env
                .into_iter()
                .map(|var| crate::EnvVar {
                    name: var.name,
                    value: var.value,
                })
                .collect(),
            timeout_secs: spec.timeout.map_or(0, |timeout| {
                u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX)
            }),
            env_mode: crate::EnvMode::from(spec.env_mode).into(),
            required_labels: spec.required_labels,
            collect_executables: spec.collect_executables,
            archive_from: spec.archive_from.unwrap_or(0),
        }
    }
}

impl TryFrom<crate::JobSpec> for JobSpec {
    type Error = DecodeError;

    fn try_from(spec: crate::JobSpec) -> Result<Self, DecodeError> {
        Ok(Self {
            kind: decode_kind(spec.kind)?,
            cargo_args: spec.cargo_args,
            env: spec
                .env
                .into_iter()
                .map(|var| EnvVar {
                    name: var.name,
                    value: var.value,
                })
                .collect(),
            timeout: (spec.timeout_secs > 0)
                .then(|| Duration::from_secs(u64::from(spec.timeout_secs))),
            env_mode: decode_env_mode(spec.env_mode)?,
            required_labels: spec.required_labels,
            collect_executables: spec.collect_executables,
            archive_from: (spec.archive_from > 0).then_some(spec.archive_from),
        })
    }
}

impl From<ArtifactChunk> for crate::ArtifactChunk {
    fn from(chunk: ArtifactChunk) -> Self {
        Self {
            index: chunk.index,
            count: chunk.count,
            rel_path: chunk.rel_path,
            mode: chunk.mode,
            offset: chunk.offset,
            data: chunk.data.into(),
            sha256: chunk.sha256.unwrap_or_default(),
        }
    }
}

impl From<crate::ArtifactChunk> for ArtifactChunk {
    fn from(chunk: crate::ArtifactChunk) -> Self {
        // Taken apart whole, so a field added to the wire cannot be forgotten here.
        let crate::ArtifactChunk {
            index,
            count,
            rel_path,
            mode,
            offset,
            data,
            sha256,
        } = chunk;
        Self {
            sha256: (!sha256.is_empty()).then_some(sha256),
            data: data.into(),
            index,
            count,
            rel_path,
            mode,
            offset,
        }
    }
}

impl From<Source> for crate::Source {
    fn from(source: Source) -> Self {
        Self {
            repo_id: source.repo_id,
            git_path: source.git_path,
            // 0: no direct daemon, fetch through the tunnel.
            git_port: source.git_port.map_or(0, u32::from),
            commit: source.commit,
            git_ref: source.git_ref,
            base_commit: source.base_commit,
            pack: source.pack.map(|pack| pack.0.to_vec()).unwrap_or_default(),
        }
    }
}

/// A port on the wire, where 0 means none.
fn optional_port(port: u32, field: &'static str) -> Result<Option<u16>, DecodeError> {
    match port {
        0 => Ok(None),
        port => u16::try_from(port)
            .map(Some)
            .map_err(|_| DecodeError::Invalid {
                field,
                reason: format!("{port} is not a port"),
            }),
    }
}

impl TryFrom<crate::Source> for Source {
    type Error = DecodeError;

    fn try_from(source: crate::Source) -> Result<Self, DecodeError> {
        let git_port = optional_port(source.git_port, "git port")?;
        Ok(Self {
            repo_id: source.repo_id,
            git_path: source.git_path,
            git_port,
            commit: source.commit,
            git_ref: source.git_ref,
            base_commit: source.base_commit,
            pack: (!source.pack.is_empty()).then(|| SnapshotPack(source.pack.into())),
        })
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl From<AgentPhases> for crate::AgentPhases {
    fn from(phases: AgentPhases) -> Self {
        Self {
            workspace_wait_us: micros(phases.workspace_wait),
            fetch_us: micros(phases.fetch),
            checkout_us: micros(phases.checkout),
            environment_us: micros(phases.environment),
            cargo_us: micros(phases.cargo),
        }
    }
}

impl From<crate::AgentPhases> for AgentPhases {
    fn from(wire: crate::AgentPhases) -> Self {
        Self {
            workspace_wait: Duration::from_micros(wire.workspace_wait_us),
            fetch: Duration::from_micros(wire.fetch_us),
            checkout: Duration::from_micros(wire.checkout_us),
            environment: Duration::from_micros(wire.environment_us),
            cargo: Duration::from_micros(wire.cargo_us),
        }
    }
}

impl From<Completion> for crate::Completion {
    fn from(completion: Completion) -> Self {
        let mut wire = Self {
            duration_ms: millis(completion.duration),
            phases: Some(completion.phases.into()),
            env: completion
                .env
                .map(RunEnv::label)
                .unwrap_or_default()
                .to_owned(),
            ..Self::default()
        };
        let outcome = match completion.end {
            JobEnd::Exited { code } => {
                wire.exit_code = Some(code);
                crate::Outcome::Exited
            }
            JobEnd::Signalled { signal } => {
                wire.signal = Some(signal);
                crate::Outcome::Exited
            }
            JobEnd::TimedOut => crate::Outcome::TimedOut,
            JobEnd::Cancelled => crate::Outcome::Cancelled,
            JobEnd::Failed { reason } => {
                wire.error = reason;
                crate::Outcome::Failed
            }
        };
        wire.outcome = outcome.into();
        wire
    }
}

impl TryFrom<crate::Completion> for Completion {
    type Error = DecodeError;

    fn try_from(wire: crate::Completion) -> Result<Self, DecodeError> {
        let end = match crate::Outcome::try_from(wire.outcome) {
            Ok(crate::Outcome::Exited) => match (wire.exit_code, wire.signal) {
                (Some(code), _) => JobEnd::Exited { code },
                (None, Some(signal)) => JobEnd::Signalled { signal },
                (None, None) => return Err(DecodeError::Missing("exit code or signal")),
            },
            Ok(crate::Outcome::TimedOut) => JobEnd::TimedOut,
            Ok(crate::Outcome::Cancelled) => JobEnd::Cancelled,
            Ok(crate::Outcome::Failed) => JobEnd::Failed { reason: wire.error },
            Ok(crate::Outcome::Unspecified) | Err(_) => {
                return Err(DecodeError::Unknown {
                    field: "outcome",
                    value: wire.outcome,
                });
            }
        };
        let env = match wire.env.as_str() {
            "" => None,
            label => Some(
                RunEnv::from_label(label).ok_or_else(|| DecodeError::Invalid {
                    field: "env",
                    reason: format!("{label:?} is neither nix nor host"),
                })?,
            ),
        };
        Ok(Self {
            end,
            duration: Duration::from_millis(wire.duration_ms),
            env,
            // Optional information: an agent that does not measure phases reports none.
            phases: wire.phases.map(AgentPhases::from).unwrap_or_default(),
        })
    }
}

impl From<JobResult> for crate::JobResult {
    fn from(result: JobResult) -> Self {
        Self {
            completion: Some(result.completion.into()),
            agent_id: result.agent_id,
            attempt: result.attempt,
            local: result.local,
            queue_ms: millis(result.queue_time),
        }
    }
}

impl TryFrom<crate::JobResult> for JobResult {
    type Error = DecodeError;

    fn try_from(wire: crate::JobResult) -> Result<Self, DecodeError> {
        Ok(Self {
            completion: required(wire.completion, "completion")?.try_into()?,
            agent_id: wire.agent_id,
            attempt: wire.attempt,
            local: wire.local,
            queue_time: Duration::from_millis(wire.queue_ms),
        })
    }
}

// ---- stored records ----------------------------------------------------------------------
//
// Job stores of schema version 1 kept submissions and results as these messages' bytes.
// The coordinator reads them once, to migrate them to its own rows; its tests write them,
// to have such a store to migrate. A record that no longer decodes is a DecodeError like
// any wire message, never a default.

/// A submission as the bytes of its `SubmitRequest`.
pub fn submission_to_bytes(submission: Submission) -> Vec<u8> {
    prost::Message::encode_to_vec(&crate::SubmitRequest::from(submission))
}

pub fn submission_from_bytes(bytes: &[u8]) -> Result<Submission, DecodeError> {
    from_bytes::<crate::SubmitRequest, _>(bytes, "submission")
}

/// A job's result as the bytes of its `JobResult`.
pub fn result_to_bytes(result: JobResult) -> Vec<u8> {
    prost::Message::encode_to_vec(&crate::JobResult::from(result))
}

pub fn result_from_bytes(bytes: &[u8]) -> Result<JobResult, DecodeError> {
    from_bytes::<crate::JobResult, _>(bytes, "result")
}

/// Decodes a stored message `Wire` and converts it like one from the wire.
fn from_bytes<Wire, T>(bytes: &[u8], field: &'static str) -> Result<T, DecodeError>
where
    Wire: prost::Message + Default,
    T: TryFrom<Wire, Error = DecodeError>,
{
    let wire = Wire::decode(bytes).map_err(|error| DecodeError::Invalid {
        field,
        reason: error.to_string(),
    })?;
    wire.try_into()
}

/// A client-facing event of job `job_id`.
pub fn encode_job_event(job_id: JobId, event: JobEvent) -> crate::JobEvent {
    let event = match event {
        JobEvent::Queued { position, reason } => {
            job_event::Event::Queued(crate::JobQueued { position, reason })
        }
        JobEvent::Assigned {
            agent_id,
            attempt,
            local,
        } => job_event::Event::Assigned(crate::JobAssigned {
            agent_id,
            attempt,
            local,
        }),
        JobEvent::Output {
            attempt,
            stream,
            data,
        } => job_event::Event::Output(crate::JobOutputChunk {
            stream: encode_stream(stream),
            data: data.into(),
            attempt,
        }),
        JobEvent::Finished(result) => job_event::Event::Finished(result.into()),
    };
    crate::JobEvent {
        job_id,
        event: Some(event),
    }
}

/// The job id and the event of a wire job event.
pub fn decode_job_event(wire: crate::JobEvent) -> Result<(JobId, JobEvent), DecodeError> {
    let event = match required(wire.event, "job event")? {
        job_event::Event::Queued(queued) => JobEvent::Queued {
            position: queued.position,
            reason: queued.reason,
        },
        job_event::Event::Assigned(assigned) => JobEvent::Assigned {
            agent_id: assigned.agent_id,
            attempt: assigned.attempt,
            local: assigned.local,
        },
        job_event::Event::Output(chunk) => JobEvent::Output {
            attempt: chunk.attempt,
            stream: decode_stream(chunk.stream)?,
            data: chunk.data.into(),
        },
        job_event::Event::Finished(result) => JobEvent::Finished(result.try_into()?),
    };
    Ok((wire.job_id, event))
}

// ---- the job bus -------------------------------------------------------------------------

impl From<AttemptKey> for crate::AttemptKey {
    fn from(key: AttemptKey) -> Self {
        Self {
            job_id: key.job_id,
            attempt: key.attempt,
        }
    }
}

fn decode_held(held: crate::AttemptRef) -> Result<HeldAttempt, DecodeError> {
    Ok(HeldAttempt {
        key: decode_key(held.key)?,
        finished: held.finished,
    })
}

fn decode_key(key: Option<crate::AttemptKey>) -> Result<AttemptKey, DecodeError> {
    let key = required(key, "attempt key")?;
    Ok(AttemptKey::new(key.job_id, key.attempt))
}

impl From<AgentMessage> for agent_frame::Msg {
    fn from(message: AgentMessage) -> Self {
        match message {
            AgentMessage::Hello(hello) => agent_frame::Msg::Hello(crate::Hello {
                protocol_version: hello.protocol_version,
                agent_id: hello.agent_id,
                token: hello.token,
                labels: hello.labels,
                system: hello.system,
                slots_total: hello.slots.total,
                slots_free: hello.slots.free,
                agent_version: hello.agent_version,
                draining: hello.slots.draining,
                attempts: hello
                    .attempts
                    .into_iter()
                    .map(|held| crate::AttemptRef {
                        key: Some(held.key.into()),
                        finished: held.finished,
                    })
                    .collect(),
                sandboxed: hello.sandboxed,
                disk: Some(hello.disk.into()),
                identity: hello.identity,
            }),
            AgentMessage::Heartbeat { sent_at_unix_ms } => {
                agent_frame::Msg::Heartbeat(crate::Heartbeat { sent_at_unix_ms })
            }
            AgentMessage::Slots(offer) => agent_frame::Msg::Slots(crate::SlotsUpdate {
                slots_free: offer.free,
                slots_total: offer.total,
                draining: offer.draining,
            }),
            AgentMessage::Declined { key, reason } => agent_frame::Msg::Declined(crate::Declined {
                key: Some(key.into()),
                reason,
            }),
            AgentMessage::Output { key, stream, data } => {
                agent_frame::Msg::Output(crate::JobOutput {
                    key: Some(key.into()),
                    stream: encode_stream(stream),
                    data: data.into(),
                })
            }
            AgentMessage::Artifact { key, chunk } => {
                agent_frame::Msg::Artifact(crate::JobArtifact {
                    key: Some(key.into()),
                    chunk: Some(chunk.into()),
                })
            }
            AgentMessage::Finished { key, completion } => {
                agent_frame::Msg::Finished(crate::JobFinished {
                    key: Some(key.into()),
                    completion: Some(completion.into()),
                })
            }
            AgentMessage::CancelAck(key) => agent_frame::Msg::CancelAck(crate::CancelAck {
                key: Some(key.into()),
            }),
            AgentMessage::Disk(usage) => agent_frame::Msg::Disk(usage.into()),
        }
    }
}

impl TryFrom<agent_frame::Msg> for AgentMessage {
    type Error = DecodeError;

    fn try_from(msg: agent_frame::Msg) -> Result<Self, DecodeError> {
        Ok(match msg {
            agent_frame::Msg::Hello(hello) => AgentMessage::Hello(Hello {
                protocol_version: hello.protocol_version,
                agent_id: hello.agent_id,
                token: hello.token,
                labels: hello.labels,
                system: hello.system,
                slots: SlotOffer {
                    free: hello.slots_free,
                    total: hello.slots_total,
                    draining: hello.draining,
                },
                agent_version: hello.agent_version,
                // Another version's attempts mean nothing here and the hello is rejected
                // for its version anyway; reading them could only hide that reason.
                attempts: if hello.protocol_version == PROTOCOL_VERSION {
                    hello
                        .attempts
                        .into_iter()
                        .map(decode_held)
                        .collect::<Result<_, _>>()?
                } else {
                    Vec::new()
                },
                sandboxed: hello.sandboxed,
                disk: hello.disk.map(DiskUsage::from).unwrap_or_default(),
                identity: hello.identity,
            }),
            agent_frame::Msg::Heartbeat(beat) => AgentMessage::Heartbeat {
                sent_at_unix_ms: beat.sent_at_unix_ms,
            },
            agent_frame::Msg::Slots(slots) => AgentMessage::Slots(SlotOffer {
                free: slots.slots_free,
                total: slots.slots_total,
                draining: slots.draining,
            }),
            agent_frame::Msg::Declined(declined) => AgentMessage::Declined {
                key: decode_key(declined.key)?,
                reason: declined.reason,
            },
            agent_frame::Msg::Output(output) => AgentMessage::Output {
                key: decode_key(output.key)?,
                stream: decode_stream(output.stream)?,
                data: output.data.into(),
            },
            agent_frame::Msg::Artifact(artifact) => AgentMessage::Artifact {
                key: decode_key(artifact.key)?,
                chunk: required(artifact.chunk, "chunk")?.into(),
            },
            agent_frame::Msg::Finished(finished) => AgentMessage::Finished {
                key: decode_key(finished.key)?,
                completion: required(finished.completion, "completion")?.try_into()?,
            },
            agent_frame::Msg::CancelAck(ack) => AgentMessage::CancelAck(decode_key(ack.key)?),
            agent_frame::Msg::Disk(usage) => AgentMessage::Disk(usage.into()),
        })
    }
}

impl From<CoordinatorMessage> for coordinator_frame::Msg {
    fn from(message: CoordinatorMessage) -> Self {
        match message {
            CoordinatorMessage::Welcome(welcome) => {
                coordinator_frame::Msg::Welcome(crate::Welcome {
                    protocol_version: welcome.protocol_version,
                    coordinator_id: welcome.coordinator_id,
                    heartbeat_interval_ms: millis_u32(welcome.heartbeat_interval),
                    heartbeat_timeout_ms: millis_u32(welcome.heartbeat_timeout),
                })
            }
            CoordinatorMessage::Reject(reject) => coordinator_frame::Msg::Reject(crate::Reject {
                code: crate::RejectCode::from(reject.code).into(),
                message: reject.message,
            }),
            CoordinatorMessage::Heartbeat { sent_at_unix_ms } => {
                coordinator_frame::Msg::Heartbeat(crate::Heartbeat { sent_at_unix_ms })
            }
            CoordinatorMessage::Assign(assignment) => {
                coordinator_frame::Msg::Assign(crate::Assign {
                    key: Some(assignment.key.into()),
                    spec: Some(assignment.spec.into()),
                    source: Some(assignment.source.into()),
                    worktree: assignment.worktree,
                })
            }
            CoordinatorMessage::Cancel(key) => coordinator_frame::Msg::Cancel(crate::Cancel {
                key: Some(key.into()),
            }),
            CoordinatorMessage::ProtocolError(message) => {
                coordinator_frame::Msg::Error(crate::ProtocolError { message })
            }
            CoordinatorMessage::Drain => coordinator_frame::Msg::Drain(crate::Drain {}),
            CoordinatorMessage::Demand { queued } => {
                coordinator_frame::Msg::Demand(crate::Demand { queued })
            }
            CoordinatorMessage::ResultAck(key) => {
                coordinator_frame::Msg::ResultAck(crate::ResultAck {
                    key: Some(key.into()),
                })
            }
        }
    }
}

impl TryFrom<coordinator_frame::Msg> for CoordinatorMessage {
    type Error = DecodeError;

    fn try_from(msg: coordinator_frame::Msg) -> Result<Self, DecodeError> {
        Ok(match msg {
            coordinator_frame::Msg::Heartbeat(beat) => CoordinatorMessage::Heartbeat {
                sent_at_unix_ms: beat.sent_at_unix_ms,
            },
            coordinator_frame::Msg::Welcome(welcome) => CoordinatorMessage::Welcome(Welcome {
                protocol_version: welcome.protocol_version,
                coordinator_id: welcome.coordinator_id,
                heartbeat_interval: Duration::from_millis(u64::from(welcome.heartbeat_interval_ms)),
                heartbeat_timeout: Duration::from_millis(u64::from(welcome.heartbeat_timeout_ms)),
            }),
            coordinator_frame::Msg::Reject(reject) => CoordinatorMessage::Reject(Reject {
                code: decode_reject_code(reject.code)?,
                message: reject.message,
            }),
            coordinator_frame::Msg::Assign(assign) => {
                let key = decode_key(assign.key)?;
                let assignment = (|| {
                    Ok(Assignment {
                        key,
                        spec: required(assign.spec, "job spec")?.try_into()?,
                        source: required(assign.source, "source")?.try_into()?,
                        worktree: assign.worktree,
                    })
                })();
                CoordinatorMessage::Assign(Box::new(assignment.map_err(|error| {
                    DecodeError::Assignment {
                        key,
                        error: Box::new(error),
                    }
                })?))
            }
            coordinator_frame::Msg::Cancel(cancel) => {
                CoordinatorMessage::Cancel(decode_key(cancel.key)?)
            }
            coordinator_frame::Msg::Error(error) => {
                CoordinatorMessage::ProtocolError(error.message)
            }
            coordinator_frame::Msg::Drain(_) => CoordinatorMessage::Drain,
            coordinator_frame::Msg::Demand(demand) => CoordinatorMessage::Demand {
                queued: demand.queued,
            },
            coordinator_frame::Msg::ResultAck(ack) => {
                CoordinatorMessage::ResultAck(decode_key(ack.key)?)
            }
        })
    }
}

// ---- the control API ---------------------------------------------------------------------

/// Both directions of a mapping whose fields are the same on both sides. A domain field
/// that is a struct of its own may stand flattened on the wire: `flattened disk:
/// DiskUsage { used_bytes: disk_used_bytes, .. }` maps `domain.disk.used_bytes` to
/// `wire.disk_used_bytes`.
macro_rules! same_fields {
    (
        $domain:ty, $wire:ty { $($field:ident),+ $(,)? }
        $(flattened $nested:ident: $nested_ty:ident { $($inner:ident: $flat:ident),+ $(,)? })?
    ) => {
        impl From<$domain> for $wire {
            fn from(value: $domain) -> Self {
                Self { $($field: value.$field,)+ $($($flat: value.$nested.$inner,)+)? }
            }
        }

        impl From<$wire> for $domain {
            fn from(value: $wire) -> Self {
                Self {
                    $($field: value.$field,)+
                    $($nested: $nested_ty { $($inner: value.$flat),+ },)?
                }
            }
        }
    };
}

same_fields!(
    AgentStatus,
    crate::AgentInfo {
        id,
        slots_total,
        slots_used,
        labels,
        system,
        connected_since_unix_ms,
        local,
        draining,
        address,
        sandboxed,
    }
    flattened disk: DiskUsage {
        used_bytes: disk_used_bytes,
        budget_bytes: disk_budget_bytes,
    }
);
same_fields!(
    DiskUsage,
    crate::DiskUsage {
        used_bytes,
        budget_bytes,
    }
);
same_fields!(
    LogPage,
    crate::JobLogReply {
        data,
        next_offset,
        complete,
        truncated_bytes
    }
);

impl From<Submission> for crate::SubmitRequest {
    fn from(submission: Submission) -> Self {
        let Submission {
            spec,
            commit,
            git_ref,
            worktree,
            base_commit,
        } = submission;
        Self {
            spec: Some(spec.into()),
            commit,
            git_ref,
            worktree,
            base_commit,
        }
    }
}

impl TryFrom<crate::SubmitRequest> for Submission {
    type Error = DecodeError;

    fn try_from(request: crate::SubmitRequest) -> Result<Self, DecodeError> {
        let spec = required(request.spec, "job spec")?.try_into()?;
        let crate::SubmitRequest {
            commit,
            git_ref,
            worktree,
            base_commit,
            ..
        } = request;
        Ok(Self {
            spec,
            commit,
            git_ref,
            worktree,
            base_commit,
        })
    }
}

impl From<JobStatus> for crate::JobInfo {
    fn from(job: JobStatus) -> Self {
        let (state, agent_id, attempt) = match job.place {
            JobPlace::Queued => (crate::JobState::Queued, String::new(), 0),
            JobPlace::Running { agent_id, attempt } => {
                (crate::JobState::Running, agent_id, attempt)
            }
        };
        Self {
            job_id: job.job_id,
            kind: crate::JobKind::from(job.kind).into(),
            state: state.into(),
            agent_id,
            attempt,
            submitted_unix_ms: job.submitted_unix_ms,
            worktree: job.worktree,
            cargo_args: job.cargo_args,
        }
    }
}

impl TryFrom<crate::JobInfo> for JobStatus {
    type Error = DecodeError;

    fn try_from(job: crate::JobInfo) -> Result<Self, DecodeError> {
        let place = match crate::JobState::try_from(job.state) {
            Ok(crate::JobState::Queued) => JobPlace::Queued,
            Ok(crate::JobState::Running) => JobPlace::Running {
                agent_id: job.agent_id,
                attempt: job.attempt,
            },
            Ok(crate::JobState::Finished | crate::JobState::Unspecified) | Err(_) => {
                return Err(DecodeError::Unknown {
                    field: "job state",
                    value: job.state,
                });
            }
        };
        Ok(Self {
            job_id: job.job_id,
            kind: decode_kind(job.kind)?,
            place,
            submitted_unix_ms: job.submitted_unix_ms,
            worktree: job.worktree,
            cargo_args: job.cargo_args,
        })
    }
}

impl From<CoordinatorStatus> for crate::StatusReply {
    fn from(status: CoordinatorStatus) -> Self {
        Self {
            coordinator_id: status.coordinator_id,
            repository: status.repository,
            agents: status.agents.into_iter().map(Into::into).collect(),
            jobs: status.jobs.into_iter().map(Into::into).collect(),
            local_fallback_enabled: status.local_fallback_enabled,
            local_fallback_active: status.local_fallback_active,
            websocket_addr: status.websocket_addr.unwrap_or_default(),
            git_daemon_port: status.git_daemon_port.map_or(0, u32::from),
        }
    }
}

impl TryFrom<crate::StatusReply> for CoordinatorStatus {
    type Error = DecodeError;

    fn try_from(status: crate::StatusReply) -> Result<Self, DecodeError> {
        Ok(Self {
            coordinator_id: status.coordinator_id,
            repository: status.repository,
            agents: status.agents.into_iter().map(Into::into).collect(),
            jobs: status
                .jobs
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            local_fallback_enabled: status.local_fallback_enabled,
            local_fallback_active: status.local_fallback_active,
            websocket_addr: Some(status.websocket_addr).filter(|addr| !addr.is_empty()),
            git_daemon_port: optional_port(status.git_daemon_port, "git daemon port")?,
        })
    }
}

impl From<LogRequest> for crate::JobLogRequest {
    fn from(request: LogRequest) -> Self {
        Self {
            job_id: request.job_id,
            offset: request.offset,
            limit: request.limit.unwrap_or(0),
            stream: request
                .stream
                .map_or(crate::OutputStream::Unspecified.into(), encode_stream),
        }
    }
}

impl TryFrom<crate::JobLogRequest> for LogRequest {
    type Error = DecodeError;

    fn try_from(request: crate::JobLogRequest) -> Result<Self, DecodeError> {
        let crate::JobLogRequest {
            job_id,
            offset,
            limit,
            stream,
        } = request;
        Ok(Self {
            stream: decode_stream_filter(stream)?,
            // 0 on the wire: the coordinator's default page.
            limit: (limit > 0).then_some(limit),
            job_id,
            offset,
        })
    }
}

impl From<CancelReply> for crate::CancelReply {
    fn from(reply: CancelReply) -> Self {
        match reply {
            CancelReply::Cancelling => Self {
                cancelled: true,
                state: "cancelling".to_owned(),
            },
            CancelReply::AlreadyFinished => Self {
                cancelled: false,
                state: "finished".to_owned(),
            },
        }
    }
}

impl From<crate::CancelReply> for CancelReply {
    fn from(reply: crate::CancelReply) -> Self {
        if reply.cancelled {
            CancelReply::Cancelling
        } else {
            CancelReply::AlreadyFinished
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            cargo_args: vec!["-p".into(), "app".into()],
            env: vec![EnvVar {
                name: "RUST_BACKTRACE".into(),
                value: "1".into(),
            }],
            timeout: Some(Duration::from_secs(60)),
            env_mode: EnvMode::Nix,
            required_labels: vec!["gpu".into()],
            ..JobSpec::new(JobKind::Clippy)
        }
    }

    fn round_trip_agent(message: AgentMessage) {
        let decoded = AgentMessage::try_from(agent_frame::Msg::from(message.clone()));
        assert_eq!(decoded, Ok(message));
    }

    fn round_trip_coordinator(message: CoordinatorMessage) {
        let decoded = CoordinatorMessage::try_from(coordinator_frame::Msg::from(message.clone()));
        assert_eq!(decoded, Ok(message));
    }

    #[test]
    fn every_bus_message_survives_the_wire() {
        let key = AttemptKey::new(7, 2);
        round_trip_agent(AgentMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: "a".into(),
            token: "t".into(),
            labels: vec!["x".into()],
            system: "x86_64-linux".into(),
            slots: SlotOffer {
                free: 1,
                total: 2,
                draining: true,
            },
            agent_version: "0.1.0".into(),
            attempts: vec![HeldAttempt {
                key,
                finished: true,
            }],
            sandboxed: true,
            disk: DiskUsage {
                used_bytes: 3,
                budget_bytes: 9,
            },
            identity: "ab".repeat(32),
        }));
        round_trip_agent(AgentMessage::Heartbeat { sent_at_unix_ms: 5 });
        round_trip_agent(AgentMessage::Disk(DiskUsage {
            used_bytes: 4,
            budget_bytes: 9,
        }));
        round_trip_agent(AgentMessage::Declined {
            key,
            reason: "busy".into(),
        });
        round_trip_agent(AgentMessage::Artifact {
            key,
            chunk: ArtifactChunk {
                index: 1,
                count: 2,
                rel_path: "debug/app".into(),
                mode: 0o755,
                offset: 4096,
                data: bytes::Bytes::from_static(b"\x7fELF"),
                sha256: Some("ab".repeat(32)),
            },
        });
        round_trip_agent(AgentMessage::Output {
            key,
            stream: OutputStream::Stderr,
            data: bytes::Bytes::from_static(b"warning"),
        });
        for end in [
            JobEnd::Exited { code: 101 },
            JobEnd::Signalled { signal: 9 },
            JobEnd::TimedOut,
            JobEnd::Cancelled,
            JobEnd::Failed {
                reason: "no flake".into(),
            },
        ] {
            let completion = Completion {
                end,
                duration: Duration::from_millis(1500),
                env: Some(RunEnv::Host),
                phases: AgentPhases {
                    workspace_wait: Duration::from_micros(1),
                    fetch: Duration::from_micros(25_000),
                    checkout: Duration::from_micros(3),
                    environment: Duration::from_micros(4),
                    cargo: Duration::from_micros(1_400_000),
                },
            };
            round_trip_agent(AgentMessage::Finished { key, completion });
        }
        round_trip_agent(AgentMessage::CancelAck(key));
        for kind in [
            JobKind::Build,
            JobKind::Test,
            JobKind::Clippy,
            JobKind::Check,
            JobKind::Nextest,
        ] {
            round_trip_coordinator(CoordinatorMessage::Assign(Box::new(Assignment {
                key,
                spec: JobSpec { kind, ..spec() },
                source: Source {
                    repo_id: "r".into(),
                    git_path: "/.git".into(),
                    git_port: Some(9418),
                    commit: "c".into(),
                    git_ref: "refs/x".into(),
                    base_commit: "b".into(),
                    pack: Some(SnapshotPack(bytes::Bytes::from_static(b"PACK"))),
                },
                worktree: "/home/dev/repo".into(),
            })));
        }
        round_trip_coordinator(CoordinatorMessage::Reject(Reject {
            code: RejectCode::BadToken,
            message: "no".into(),
        }));
        round_trip_coordinator(CoordinatorMessage::Demand { queued: 3 });
        round_trip_coordinator(CoordinatorMessage::Drain);
        round_trip_coordinator(CoordinatorMessage::ResultAck(key));
    }

    #[test]
    fn missing_or_unknown_values_are_errors_not_defaults() {
        let no_spec = coordinator_frame::Msg::Assign(crate::Assign {
            key: Some(AttemptKey::new(1, 1).into()),
            spec: None,
            source: Some(crate::Source::default()),
            worktree: String::new(),
        });
        assert_eq!(
            CoordinatorMessage::try_from(no_spec),
            Err(DecodeError::Assignment {
                key: AttemptKey::new(1, 1),
                error: Box::new(DecodeError::Missing("job spec"))
            })
        );
        let no_key = coordinator_frame::Msg::Cancel(crate::Cancel { key: None });
        assert_eq!(
            CoordinatorMessage::try_from(no_key),
            Err(DecodeError::Missing("attempt key"))
        );
        let unknown_kind = crate::JobSpec {
            kind: 42,
            ..crate::JobSpec::default()
        };
        assert!(matches!(
            JobSpec::try_from(unknown_kind),
            Err(DecodeError::Unknown {
                field: "job kind",
                value: 42
            })
        ));
        let unspecified_outcome = crate::Completion::default();
        assert!(matches!(
            Completion::try_from(unspecified_outcome),
            Err(DecodeError::Unknown {
                field: "outcome",
                ..
            })
        ));
        let unspecified_stream = agent_frame::Msg::Output(crate::JobOutput {
            key: Some(AttemptKey::new(1, 1).into()),
            ..crate::JobOutput::default()
        });
        assert!(matches!(
            AgentMessage::try_from(unspecified_stream),
            Err(DecodeError::Unknown {
                field: "output stream",
                ..
            })
        ));
    }

    /// A hello of another protocol version must still decode, so the coordinator can
    /// answer "unsupported version" instead of "bad hello".
    #[test]
    fn a_hello_of_another_version_decodes_for_its_rejection() {
        let held = crate::AttemptRef {
            key: None,
            finished: true,
        };
        let hello = |protocol_version| {
            agent_frame::Msg::Hello(crate::Hello {
                protocol_version,
                attempts: vec![held],
                ..crate::Hello::default()
            })
        };
        let Ok(AgentMessage::Hello(old)) = AgentMessage::try_from(hello(PROTOCOL_VERSION - 1))
        else {
            panic!("an old hello decodes")
        };
        assert_eq!(
            (old.protocol_version, old.attempts.len()),
            (PROTOCOL_VERSION - 1, 0)
        );
        assert_eq!(
            AgentMessage::try_from(hello(PROTOCOL_VERSION)),
            Err(DecodeError::Missing("attempt key"))
        );
    }

    #[test]
    fn zero_means_unset_only_where_the_domain_says_optional() {
        let wire = crate::JobSpec::from(JobSpec::new(JobKind::Test));
        assert_eq!(wire.timeout_secs, 0);
        assert_eq!(JobSpec::try_from(wire).map(|spec| spec.timeout), Ok(None));
        let request = LogRequest {
            job_id: 1,
            offset: 0,
            limit: None,
            stream: None,
        };
        assert_eq!(
            LogRequest::try_from(crate::JobLogRequest::from(request)),
            Ok(request)
        );
    }
}
