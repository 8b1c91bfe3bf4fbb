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
