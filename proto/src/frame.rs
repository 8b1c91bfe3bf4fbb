//! Framing of the agent job bus: one protobuf message per WebSocket binary frame.

use prost::Message;

/// Largest frame either side accepts. Output is sent in chunks far below this, so a larger
/// frame is a broken or hostile peer, and rejecting it keeps memory bounded.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Largest output chunk an agent puts into one frame.
pub const MAX_OUTPUT_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES} byte limit")]
    TooLarge(usize),
    #[error("frame is not a valid protobuf message: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("frame holds no message (unknown message type from a newer peer?)")]
    Empty,
}

/// Decodes one frame, refusing oversized input before parsing it.
pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    Ok(M::decode(bytes)?)
}

/// Encodes one frame.
pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    message.encode_to_vec()
}

impl crate::AgentFrame {
    /// Decodes an agent frame; a frame with no known message is an error, not a no-op.
    pub fn decode_frame(bytes: &[u8]) -> Result<crate::agent_frame::Msg, FrameError> {
        decode::<Self>(bytes)?.msg.ok_or(FrameError::Empty)
    }
}

impl crate::CoordinatorFrame {
    /// Decodes a coordinator frame; a frame with no known message is an error.
    pub fn decode_frame(bytes: &[u8]) -> Result<crate::coordinator_frame::Msg, FrameError> {
        decode::<Self>(bytes)?.msg.ok_or(FrameError::Empty)
    }
}

impl From<crate::agent_frame::Msg> for crate::AgentFrame {
    fn from(msg: crate::agent_frame::Msg) -> Self {
        Self { msg: Some(msg) }
    }
}

impl From<crate::coordinator_frame::Msg> for crate::CoordinatorFrame {
    fn from(msg: crate::coordinator_frame::Msg) -> Self {
        Self { msg: Some(msg) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentFrame, Heartbeat, agent_frame::Msg};

    #[test]
    fn round_trips_a_frame() {
        let frame = AgentFrame::from(Msg::Heartbeat(Heartbeat { sent_at_unix_ms: 7 }));
        let decoded = AgentFrame::decode_frame(&encode(&frame)).expect("decodes");
        assert_eq!(decoded, Msg::Heartbeat(Heartbeat { sent_at_unix_ms: 7 }));
    }

    #[test]
    fn rejects_garbage_oversize_and_empty_frames() {
        assert!(matches!(
            AgentFrame::decode_frame(&[0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            AgentFrame::decode_frame(&vec![0; MAX_FRAME_BYTES + 1]),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            AgentFrame::decode_frame(&[]),
            Err(FrameError::Empty)
        ));
    }
}
