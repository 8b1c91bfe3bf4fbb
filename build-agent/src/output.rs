//! The output policy of a running job: stream while connected, keep the newest while not.
//!
//! Connected: output is buffered up to [`CONNECTED_BUFFER`] bytes, then backpressure reaches
//! the job's pipes, so a slow coordinator slows the job instead of growing memory.
//! Disconnected: the job keeps running and the newest [`DISCONNECTED_BUFFER`] bytes are
//! kept; older output is dropped and the gap is reported when the link is back.

use std::collections::VecDeque;

use buildpool_core::bus::AgentMessage;
use buildpool_core::{AttemptKey, OutputStream};
use buildpool_proto::socket::{Outbox, SendError};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::process::OutputChunk;

/// Output bytes one job buffers while connected before backpressure reaches its pipes.
const CONNECTED_BUFFER: usize = 256 * 1024;
/// Output bytes one job keeps while its coordinator is unreachable (the newest).
pub(crate) const DISCONNECTED_BUFFER: usize = 4 * 1024 * 1024;

/// The current connection of a link, if it has one.
pub(crate) type LinkOutbox = watch::Receiver<Option<Outbox<AgentMessage>>>;

/// Moves a job's output to whichever connection its link has, until the job's output ends.
/// Returns the output still unsent when the job ended while disconnected: the next
/// connection sends it before the result.
pub(crate) async fn forward(
    mut link: LinkOutbox,
    key: AttemptKey,
    mut output: mpsc::Receiver<OutputChunk>,
) -> Vec<AgentMessage> {
    let mut pending: VecDeque<(usize, AgentMessage)> = VecDeque::new();
    let mut pending_bytes = 0usize;
    let mut dropped = 0u64;
    let mut input_open = true;
    let mut dead_outbox = false;
    let message = |stream: OutputStream, data: Bytes| {
        (data.len(), AgentMessage::Output { key, stream, data })
    };
    let gap_note = |dropped: u64| {
        let note = format!(
            "[buildpool] {dropped} bytes of output were dropped while the coordinator was unreachable\n"
        );
        message(OutputStream::Stderr, Bytes::from(note))
    };
    loop {
        let outbox = link.borrow_and_update().clone();
        let connected = outbox.is_some() && !dead_outbox;
        if connected && dropped > 0 {
            let note = gap_note(dropped);
            pending_bytes += note.0;
            pending.push_front(note);
            dropped = 0;
        }
        if !input_open && (pending.is_empty() || !connected) {
            if dropped > 0 {
                pending.push_front(gap_note(dropped));
            }
            return pending.into_iter().map(|(_, message)| message).collect();
        }
        let can_read = input_open && (!connected || pending_bytes < CONNECTED_BUFFER);
        tokio::select! {
            chunk = output.recv(), if can_read => match chunk {
                None => input_open = false,
                Some(chunk) => {
                    let entry = message(chunk.stream, chunk.data);
                    pending_bytes += entry.0;
                    pending.push_back(entry);
                    while !connected && pending_bytes > DISCONNECTED_BUFFER {
                        let Some((size, _)) = pending.pop_front() else { break };
                        pending_bytes = pending_bytes.saturating_sub(size);
                        dropped += size as u64;
                    }
                }
            },
            permit = reserve(outbox.as_ref()), if connected && !pending.is_empty() => match permit {
                Ok(permit) => {
                    if let Some((size, message)) = pending.pop_front() {
                        pending_bytes = pending_bytes.saturating_sub(size);
                        permit.send(message);
                    }
                }
                // The connection is going away; wait for the link to change.
                Err(SendError::Closed | SendError::Full) => dead_outbox = true,
            },
            changed = link.changed() => {
                if changed.is_err() {
                    return pending.into_iter().map(|(_, message)| message).collect();
                }
                dead_outbox = false;
            }
        }
    }
}

async fn reserve(
    outbox: Option<&Outbox<AgentMessage>>,
) -> Result<mpsc::Permit<'_, AgentMessage>, SendError> {
    match outbox {
        Some(outbox) => outbox.reserve().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use buildpool_core::bus::CoordinatorMessage;
    use buildpool_proto::socket::{AgentSocket, CoordinatorSocket, Inbox};

    use super::*;

    fn output_bytes(message: &AgentMessage) -> Vec<u8> {
        match message {
            AgentMessage::Output { data, .. } => data.to_vec(),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn chunk(byte: u8) -> OutputChunk {
        OutputChunk {
            stream: OutputStream::Stdout,
            data: Bytes::from(vec![byte; 64 * 1024]),
        }
    }

    /// A connected pair of bus sockets over memory: the agent's started halves and the
    /// coordinator's socket to read from. The agent's inbox owns its writer; keep it.
    async fn connection() -> (
        Outbox<AgentMessage>,
        Inbox<CoordinatorMessage>,
        CoordinatorSocket,
    ) {
        let (coordinator_end, agent_end) = tokio::io::duplex(1024 * 1024);
        let accept = tokio::spawn(buildpool_proto::socket::accept_bus(coordinator_end));
        let agent = AgentSocket::client(agent_end).await.expect("client");
        let coordinator = accept.await.expect("joins").expect("accepted");
        let (outbox, inbox) = agent.start(8);
        (outbox, inbox, coordinator)
    }

    /// A job prints 6 MiB and ends while its coordinator is unreachable: the newest 4 MiB
    /// are kept for the next connection, with the gap reported first.
    #[tokio::test]
    async fn output_of_a_disconnected_job_is_bounded_and_the_gap_reported() {
        let (_link, watcher) = watch::channel(None);
        let (chunks, output) = mpsc::channel(4);
        let forwarder = tokio::spawn(forward(watcher, AttemptKey::new(1, 1), output));
        for n in 0..96u8 {
            chunks
                .send(chunk(n))
                .await
                .expect("forwarder reads while disconnected");
        }
        drop(chunks);
        let unsent = forwarder.await.expect("forwarder ends");
        // Disconnected at the end: everything kept comes back as unsent, gap note first.
        let first = output_bytes(&unsent[0]);
        assert!(
            String::from_utf8_lossy(&first).contains("bytes of output were dropped"),
            "{first:?}"
        );
        let kept: usize = unsent.iter().skip(1).map(|m| output_bytes(m).len()).sum();
        assert_eq!(kept, DISCONNECTED_BUFFER);
        assert_eq!(
            output_bytes(&unsent[1])[0],
            32,
            "the oldest chunks were dropped, the newest kept"
        );
    }

    #[tokio::test]
    async fn a_reconnected_link_receives_the_gap_note_and_new_output() {
        let (link, watcher) = watch::channel(None);
        let (chunks, output) = mpsc::channel(4);
        let forwarder = tokio::spawn(forward(watcher, AttemptKey::new(1, 1), output));
        for n in 0..80u8 {
            chunks
                .send(chunk(n))
                .await
                .expect("forwarder reads while disconnected");
        }
        let (outbox, _inbox, mut coordinator) = connection().await;
        link.send_replace(Some(outbox));
        // The coordinator side reads while the job goes on printing.
        let collector = tokio::spawn(async move {
            let mut received = Vec::new();
            while received
                .last()
                .is_none_or(|chunk: &Vec<u8>| chunk.first() != Some(&89))
            {
                let message = coordinator
                    .recv_within(Duration::from_secs(30))
                    .await
                    .expect("reads")
                    .expect("a message");
                received.push(output_bytes(&message));
            }
            received
        });
        for n in 80..90u8 {
            chunks
                .send(chunk(n))
                .await
                .expect("forwarder reads while connected");
        }
        drop(chunks);
        let received = tokio::time::timeout(Duration::from_secs(30), collector)
            .await
            .expect("no stall")
            .expect("collects");
        let note = String::from_utf8_lossy(&received[0]).into_owned();
        let dropped: usize = note
            .strip_prefix("[buildpool] ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no gap note: {note:?}"));
        // Some chunks may still have been in the pipe when the link came back; whatever was
        // not dropped arrives, oldest first, and nothing is lost beyond the reported gap.
        let chunk_size = 64 * 1024;
        assert!(
            dropped >= chunk_size && dropped.is_multiple_of(chunk_size),
            "{note}"
        );
        assert_eq!(received[1][0] as usize, dropped / chunk_size);
        let delivered: usize = received[1..].iter().map(Vec::len).sum();
        assert_eq!(delivered + dropped, 90 * chunk_size);
        assert_eq!(received.last().map(|c| c[0]), Some(89));
        assert!(
            forwarder.await.expect("ends").is_empty(),
            "everything was sent"
        );
    }
}
