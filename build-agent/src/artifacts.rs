//! Executables a job built, sent back on request (`JobSpec::collect_executables`).
//!
//! cargo runs with `--message-format json-render-diagnostics`: diagnostics stay human on
//! stderr, and stdout carries its JSON messages, whose `compiler-artifact` entries name the
//! executables. Those messages are read here and not forwarded as output. After a
//! successful run the executables are copied out of the workspace (the next job may rebuild
//! them) and sent over the bus in chunks, each file with its SHA-256, bounded per job.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use buildpool_core::bus::AgentMessage;
use buildpool_core::{ArtifactChunk, AttemptKey, OutputStream};
use buildpool_proto::socket::{Outbox, SendError};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::process::OutputChunk;

/// Bytes of executables one job sends back at most; the rest are skipped with a note.
pub const MAX_ARTIFACT_BYTES: u64 = 512 * 1024 * 1024;
/// Data per bus frame, well within the frame size limit.
const CHUNK_BYTES: usize = 256 * 1024;
/// A stdout line starting with `{` is held until its newline up to this length, to tell a
/// cargo message from program output; longer ones are output.
const MAX_MESSAGE_LINE: usize = 1024 * 1024;

/// The cargo arguments that make its messages readable here.
pub const MESSAGE_FORMAT_ARGS: [&str; 2] = ["--message-format", "json-render-diagnostics"];

/// Splits cargo's stdout into its JSON messages (read, not forwarded) and everything else.
#[derive(Debug, Default)]
struct MessageFilter {
    /// The start of a line that may be a cargo message.
    partial: Vec<u8>,
    executables: Vec<PathBuf>,
}

impl MessageFilter {
    /// Takes a piece of stdout and returns what is to be forwarded as output.
    fn feed(&mut self, mut data: &[u8]) -> Vec<u8> {
        let mut forward = Vec::new();
        while !data.is_empty() {
            if self.partial.is_empty() && data.first() != Some(&b'{') {
                // Not a message: forward up to and including the end of this line.
                let end = data
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(data.len(), |at| at + 1);
                let (line, rest) = data.split_at(end);
                forward.extend_from_slice(line);
                data = rest;
                continue;
            }
            match data.iter().position(|b| *b == b'\n') {
                Some(at) => {
                    let (line, rest) = data.split_at(at + 1);
                    self.partial.extend_from_slice(line);
                    data = rest;
                    let line = std::mem::take(&mut self.partial);
                    if !self.read_message(&line) {
                        forward.extend_from_slice(&line);
                    }
                }
                None => {
                    self.partial.extend_from_slice(data);
                    data = &[];
                    if self.partial.len() > MAX_MESSAGE_LINE {
                        forward.append(&mut self.partial);
                    }
                }
            }
        }
        forward
    }

    /// Whether `line` is a cargo message; records the executable it names.
    fn read_message(&mut self, line: &[u8]) -> bool {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            return false;
        };
        let Some(reason) = message.get("reason").and_then(serde_json::Value::as_str) else {
            return false;
        };
        if reason == "compiler-artifact"
            && let Some(executable) = message
                .get("executable")
                .and_then(serde_json::Value::as_str)
        {
            self.executables.push(PathBuf::from(executable));
        }
        true
    }

    /// The output still held at the end, and the executables found.
    fn finish(mut self) -> (Vec<u8>, Vec<PathBuf>) {
        let rest = std::mem::take(&mut self.partial);
        let forward = if self.read_message(&rest) {
            Vec::new()
        } else {
            rest
        };
        (forward, self.executables)
    }
}

/// Forwards a job's output from `input` to `output`, taking cargo's messages out of stdout,
/// and returns the executables they named.
pub(crate) async fn filter_messages(
    mut input: mpsc::Receiver<OutputChunk>,
    output: mpsc::Sender<OutputChunk>,
) -> Vec<PathBuf> {
    let mut filter = MessageFilter::default();
    while let Some(chunk) = input.recv().await {
        let data = match chunk.stream {
            OutputStream::Stdout => Bytes::from(filter.feed(&chunk.data)),
            OutputStream::Stderr => chunk.data,
        };
        if !data.is_empty() {
            // Output nobody reads any more is dropped; the job still runs to its end.
            let _ = output
                .send(OutputChunk {
                    stream: chunk.stream,
                    data,
                })
                .await;
        }
    }
    let (rest, executables) = filter.finish();
    if !rest.is_empty() {
        let _ = output
            .send(OutputChunk {
                stream: OutputStream::Stdout,
                data: Bytes::from(rest),
            })
            .await;
    }
    executables
}

/// An executable found in the target directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    rel_path: String,
    path: PathBuf,
    size: u64,
    mode: u32,
}

/// Splits `found` into the files that fit in `bound` bytes together (in order) and a note
/// naming those that do not.
fn within_bound(found: Vec<Found>, bound: u64) -> (Vec<Found>, Option<String>) {
    let mut total = 0u64;
    let (kept, skipped): (Vec<Found>, Vec<Found>) = found.into_iter().partition(|file| {
        let fits = total.saturating_add(file.size) <= bound;
        if fits {
            total += file.size;
        }
        fits
    });
    let note = (!skipped.is_empty()).then(|| {
        let names: Vec<String> = skipped
            .iter()
            .map(|file| format!("{} ({})", file.rel_path, mib(file.size)))
            .collect();
        format!(
            "artifacts over the {} bound were not sent: {}",
            mib(bound),
            names.join(", ")
        )
    });
    (kept, note)
}

fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // a size to read, not to compute with
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib.fract() == 0.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{mib:.1} MiB")
    }
}

/// Copies of a job's executables, out of its workspace, ready to send.
#[derive(Debug)]
pub struct Executables {
    dir: tempfile::TempDir,
    files: Vec<Found>,
}

/// Copies the executables cargo named (as it saw them, under `visible_target`) from the
/// workspace's `host_target` into a new directory under `staging`. Returns them and a note
/// for the job's output when some are not sent.
pub(crate) fn stage(
    named: &[PathBuf],
    visible_target: &Path,
    host_target: &Path,
    staging: &Path,
) -> std::io::Result<(Executables, Option<String>)> {
    let mut unique = BTreeMap::new();
    for path in named {
        // Executables outside the target directory have no place in the client's target/.
        if let Ok(rel) = path.strip_prefix(visible_target)
            && let Some(rel_path) = rel.to_str()
        {
            unique.insert(rel_path.to_owned(), host_target.join(rel));
        }
    }
    let mut found = Vec::new();
    for (rel_path, path) in unique {
        let metadata = std::fs::metadata(&path)?;
        found.push(Found {
            rel_path,
            path,
            size: metadata.len(),
            mode: metadata.permissions().mode() & 0o7777,
        });
    }
    let (kept, note) = within_bound(found, MAX_ARTIFACT_BYTES);
    std::fs::create_dir_all(staging)?;
    let dir = tempfile::Builder::new()
        .prefix("artifacts-")
        .tempdir_in(staging)?;
    let mut files = Vec::with_capacity(kept.len());
    for (index, file) in kept.into_iter().enumerate() {
        let copy = dir.path().join(index.to_string());
        std::fs::copy(&file.path, &copy)?;
        files.push(Found { path: copy, ..file });
    }
    Ok((Executables { dir, files }, note))
}

impl Executables {
    /// Sends every file in chunks through `outbox`, waiting for room (never dropping).
    pub(crate) async fn send(
        &self,
        outbox: &Outbox<AgentMessage>,
        key: AttemptKey,
    ) -> Result<(), SendError> {
        let count = u32::try_from(self.files.len()).unwrap_or(u32::MAX);
        let send = |chunk: ArtifactChunk| async move {
            outbox
                .reserve()
                .await?
                .send(AgentMessage::Artifact { key, chunk });
            Ok::<_, SendError>(())
        };
        if self.files.is_empty() {
            return send(ArtifactChunk {
                index: 0,
                count: 0,
                rel_path: String::new(),
                mode: 0,
                offset: 0,
                data: Bytes::new(),
                sha256: None,
            })
            .await;
        }
        for (index, file) in (0..count).zip(&self.files) {
            let mut reader = match tokio::fs::File::open(&file.path).await {
                Ok(reader) => reader,
                Err(error) => {
                    // The copy is ours; losing it ends the sending, and the coordinator sees
                    // the files as incomplete.
                    tracing::error!(dir = %self.dir.path().display(), "cannot read a staged executable: {error}");
                    return Err(SendError::Closed);
                }
            };
            let mut hasher = Sha256::new();
            let mut offset = 0u64;
            loop {
                let mut data = vec![0; CHUNK_BYTES];
                let mut filled = 0;
                while filled < CHUNK_BYTES {
                    match reader.read(&mut data[filled..]).await {
                        Ok(0) => break,
                        Ok(read) => filled += read,
                        Err(error) => {
                            tracing::error!("cannot read a staged executable: {error}");
                            return Err(SendError::Closed);
                        }
                    }
                }
                data.truncate(filled);
                hasher.update(&data);
                let last = filled < CHUNK_BYTES;
                let sha256 = last.then(|| hex(&hasher.clone().finalize()));
                send(ArtifactChunk {
                    index,
                    count,
                    rel_path: file.rel_path.clone(),
                    mode: file.mode,
                    offset,
                    data: Bytes::from(data),
                    sha256,
                })
                .await?;
                offset += filled as u64;
                if last {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(rel_path: &str, size: u64) -> Found {
        Found {
            rel_path: rel_path.to_owned(),
            path: PathBuf::from(rel_path),
            size,
            mode: 0o755,
        }
    }

    #[test]
    fn files_over_the_bound_are_skipped_with_a_note_naming_them() {
        let mib = 1024 * 1024;
        let (kept, note) = within_bound(
            vec![
                found("debug/small", 100 * mib),
                found("debug/huge", 600 * mib),
                found("debug/deps/t-1", 300 * mib),
            ],
            MAX_ARTIFACT_BYTES,
        );
        assert_eq!(
            kept,
            vec![
                found("debug/small", 100 * mib),
                found("debug/deps/t-1", 300 * mib)
            ]
        );
        assert_eq!(
            note.as_deref(),
            Some("artifacts over the 512 MiB bound were not sent: debug/huge (600 MiB)")
        );
        assert_eq!(within_bound(vec![found("a", 1)], 1).1, None);
    }

    #[test]
    fn cargo_messages_are_read_and_other_stdout_passes() {
        let mut filter = MessageFilter::default();
        let artifact = r#"{"reason":"compiler-artifact","executable":"/build/1/target/debug/app","fresh":false}"#;
        let mut forwarded = filter.feed(b"running 1 test\n{\"reason\":\"build-");
        forwarded.extend(filter.feed(b"finished\",\"success\":true}\n"));
        forwarded.extend(filter.feed(format!("{artifact}\n{{not json\n").as_bytes()));
        forwarded.extend(filter.feed(b"tail without newline"));
        let (rest, executables) = filter.finish();
        forwarded.extend(rest);
        assert_eq!(
            String::from_utf8_lossy(&forwarded),
            "running 1 test\n{not json\ntail without newline"
        );
        assert_eq!(
            executables,
            vec![PathBuf::from("/build/1/target/debug/app")]
        );
    }
}
