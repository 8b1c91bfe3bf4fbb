//! Framing of the agent job bus: one protobuf message per WebSocket binary frame.

use buildpool_core::bus::{AgentMessage, CoordinatorMessage};
use prost::Message;

use crate::convert::DecodeError;

/// Largest frame either side accepts. Output is sent in chunks far below this, so a larger
/// frame is a broken or hostile peer, and rejecting it keeps memory bounded.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES} byte limit")]
    TooLarge(usize),
    #[error("frame is not a valid protobuf message: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("frame does not make a valid message (from a newer peer?): {0}")]
    Invalid(#[from] DecodeError),
}

/// A message that travels in one bus frame.
pub trait BusMessage: Sized + Send + 'static {
    fn encode_frame(self) -> Vec<u8>;
    /// Decodes one frame, refusing oversized input before parsing it.
    fn decode_frame(bytes: &[u8]) -> Result<Self, FrameError>;
}

/// Decodes one frame, refusing oversized input before parsing it.
fn decode<Frame: Message + Default>(bytes: &[u8]) -> Result<Frame, FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    Ok(Frame::decode(bytes)?)
}

impl BusMessage for AgentMessage {
    fn encode_frame(self) -> Vec<u8> {
        crate::AgentFrame {
            msg: Some(self.into()),
        }
        .encode_to_vec()
    }

    fn decode_frame(bytes: &[u8]) -> Result<Self, FrameError> {
        let frame: crate::AgentFrame = decode(bytes)?;
        let message = frame.msg.ok_or(DecodeError::Missing("agent message"))?;
        Ok(message.try_into()?)
    }
}

impl BusMessage for CoordinatorMessage {
    fn encode_frame(self) -> Vec<u8> {
        crate::CoordinatorFrame {
            msg: Some(self.into()),
        }
        .encode_to_vec()
    }

    fn decode_frame(bytes: &[u8]) -> Result<Self, FrameError> {
        let frame: crate::CoordinatorFrame = decode(bytes)?;
        let message = frame
            .msg
            .ok_or(DecodeError::Missing("coordinator message"))?;
        Ok(message.try_into()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_frame() {
        let heartbeat = AgentMessage::Heartbeat { sent_at_unix_ms: 7 };
        let decoded =
            AgentMessage::decode_frame(&heartbeat.clone().encode_frame()).expect("decodes");
        assert_eq!(decoded, heartbeat);
    }

    #[test]
    fn rejects_garbage_oversize_and_empty_frames() {
        assert!(matches!(
            AgentMessage::decode_frame(&[0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            AgentMessage::decode_frame(&vec![0; MAX_FRAME_BYTES + 1]),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            AgentMessage::decode_frame(&[]),
            Err(FrameError::Invalid(DecodeError::Missing(_)))
        ));
    }
}

/// Hostile input: whatever bytes arrive, decoding answers with a value or an error, never a
/// panic, and never allocates more than the frame it was given.
#[cfg(test)]
mod properties {
    use std::time::Duration;

    use buildpool_core::bus::{AgentMessage, Assignment, CoordinatorMessage};
    use buildpool_core::{AttemptKey, Completion, JobEnd, JobKind, JobSpec, RunEnv, Source};
    use proptest::prelude::*;

    use super::*;

    /// Valid frames of every interesting shape, to mutate.
    fn valid_frames() -> Vec<Vec<u8>> {
        let key = AttemptKey::new(7, 2);
        let assign = CoordinatorMessage::Assign(Box::new(Assignment {
            key,
            spec: JobSpec {
                cargo_args: vec!["-p".into(), "app".into()],
                required_labels: vec!["gpu".into()],
                ..JobSpec::new(JobKind::Test)
            },
            source: Source {
                repo_id: "repo".into(),
                git_path: "/repo.git".into(),
                git_port: Some(9418),
                commit: "0".repeat(40),
                git_ref: "refs/buildpool/snapshots/x".into(),
                base_commit: "1".repeat(40),
                pack: Some(buildpool_core::SnapshotPack(bytes::Bytes::from_static(
                    b"PACK\0\0\0\x02",
                ))),
            },
            worktree: "/home/dev/repo".into(),
        }));
        let finished = AgentMessage::Finished {
            key,
            completion: Completion {
                end: JobEnd::Exited { code: 101 },
                duration: Duration::from_millis(1200),
                env: Some(RunEnv::Nix),
                phases: buildpool_core::AgentPhases::default(),
            },
        };
        let output = AgentMessage::Output {
            key,
            stream: buildpool_core::OutputStream::Stderr,
            data: bytes::Bytes::from_static(b"warning: unused"),
        };
        vec![
            assign.encode_frame(),
            finished.encode_frame(),
            output.encode_frame(),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = AgentMessage::decode_frame(&bytes);
            let _ = CoordinatorMessage::decode_frame(&bytes);
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            which in 0usize..3,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut frame = valid_frames().swap_remove(which);
            for (at, byte) in flips {
                let index = at.index(frame.len());
                frame[index] = byte;
            }
            frame.truncate(cut.index(frame.len() + 1));
            let _ = AgentMessage::decode_frame(&frame);
            let _ = CoordinatorMessage::decode_frame(&frame);
        }
    }

    /// A length prefix claiming far more than the frame holds is an error, not a 2 GiB
    /// allocation.
    #[test]
    fn a_lying_length_prefix_is_refused() {
        // Field 1 (the hello), length-delimited, claiming 2^31 bytes.
        let frame = [0x0a, 0x80, 0x80, 0x80, 0x80, 0x08, 0x00];
        assert!(matches!(
            AgentMessage::decode_frame(&frame),
            Err(FrameError::Malformed(_))
        ));
    }
}
