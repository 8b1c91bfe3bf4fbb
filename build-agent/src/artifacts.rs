//! Executables a job built, sent back on request (`JobSpec::collect_executables`).
//!
//! cargo runs with `--message-format json-render-diagnostics`: diagnostics stay human on
//! stderr, and stdout carries its JSON messages, whose `compiler-artifact` entries name the
//! executables. Those messages are read here and not forwarded as output. After a
//! successful run the executables are copied out of the workspace (the next job may rebuild
//! them) and sent over the bus in chunks, each file with its SHA-256, bounded per job.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use buildpool_core::bus::AgentMessage;
use buildpool_core::chunks::FileChunks;
use buildpool_core::{ArtifactChunk, AttemptKey, OutputStream};
use buildpool_proto::socket::{Outbox, SendError};
use bytes::Bytes;
use cargo_metadata::{Artifact, Message};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::process::OutputChunk;

/// Bytes of executables one job sends back at most; the rest are skipped with a note.
pub const MAX_ARTIFACT_BYTES: u64 = 512 * 1024 * 1024;
/// A stdout line starting with `{` is held until its newline up to this length, to tell a
/// cargo message from program output; longer ones are output.
const MAX_MESSAGE_LINE: usize = 1024 * 1024;

/// Executables one job may name; a workspace has a few hundred at most.
const MAX_EXECUTABLES: usize = 4096;

/// The cargo arguments that make its messages readable here.
pub const MESSAGE_FORMAT_ARGS: [&str; 2] = ["--message-format", "json-render-diagnostics"];

/// Splits cargo's stdout into its JSON messages (read, not forwarded) and everything else.
#[derive(Debug, Default)]
struct MessageFilter {
    /// The start of a line that may be a cargo message.
    partial: Vec<u8>,
    executables: Vec<PathBuf>,
    /// Executables named past [`MAX_EXECUTABLES`].
    beyond_bound: usize,
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

    /// Whether `line` is a cargo message; records the executable it names, up to
    /// [`MAX_EXECUTABLES`] of them (the job writes these lines, and may write millions).
    ///
    /// Parsed with `from_slice`, which keeps serde_json's nesting limit: the line is the
    /// job's, and may nest deep enough to overflow the stack (`Message::parse_stream`
    /// lifts the limit).
    fn read_message(&mut self, line: &[u8]) -> bool {
        let Ok(message) = serde_json::from_slice::<Message>(line) else {
            return false;
        };
        if let Message::CompilerArtifact(Artifact {
            executable: Some(executable),
            ..
        }) = message
        {
            if self.executables.len() < MAX_EXECUTABLES {
                self.executables.push(executable.into_std_path_buf());
            } else {
                self.beyond_bound += 1;
            }
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
    let beyond_bound = filter.beyond_bound;
    let (rest, executables) = filter.finish();
    if !rest.is_empty() {
        let _ = output
            .send(OutputChunk {
                stream: OutputStream::Stdout,
                data: Bytes::from(rest),
            })
            .await;
    }
    if beyond_bound > 0 {
        let note = format!(
            "[buildpool] the job named more than {MAX_EXECUTABLES} executables; {beyond_bound} more are not sent\n"
        );
        let _ = output
            .send(OutputChunk {
                stream: OutputStream::Stderr,
                data: Bytes::from(note),
            })
            .await;
    }
    executables
}

/// An executable found in the target directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    rel_path: String,
    size: u64,
    mode: u32,
}

impl AsRef<Found> for Found {
    fn as_ref(&self) -> &Found {
        self
    }
}

/// Splits `found` into the files that fit in `bound` bytes together (in order) and a note
/// naming those that do not.
fn within_bound<F: AsRef<Found>>(found: Vec<F>, bound: u64) -> (Vec<F>, Option<String>) {
    let mut total = 0u64;
    let (kept, skipped): (Vec<F>, Vec<F>) = found.into_iter().partition(|file| {
        let size = file.as_ref().size;
        let fits = total.saturating_add(size) <= bound;
        if fits {
            total += size;
        }
        fits
    });
    let note = (!skipped.is_empty()).then(|| {
        let names: Vec<String> = skipped
            .iter()
            .map(|file| format!("{} ({})", file.as_ref().rel_path, mib(file.as_ref().size)))
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

/// A file cargo named that was not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refused {
    /// The path as the job's output named it.
    named: String,
    why: &'static str,
}

/// How many refusals a note names; the rest are counted.
const REFUSALS_NAMED: usize = 10;

/// The note for the job's output naming what was refused.
fn refusal_note(refused: &[Refused]) -> Option<String> {
    let (named, rest) = refused.split_at(refused.len().min(REFUSALS_NAMED));
    let mut text = named
        .iter()
        .map(|refusal| format!("{} ({})", refusal.named, refusal.why))
        .collect::<Vec<_>>()
        .join(", ");
    if !rest.is_empty() {
        text.push_str(&format!(" and {} more", rest.len()));
    }
    (!refused.is_empty()).then(|| format!("artifacts refused: {text}"))
}

/// The path of `named` relative to the target directory the job saw, when it lies beneath
/// it in plain components only (no `..`, `.` or root), the one shape taken.
fn beneath(named: &Path, visible_target: &Path) -> Option<PathBuf> {
    let rel = named.strip_prefix(visible_target).ok()?;
    let plain = rel
        .components()
        .all(|component| matches!(component, std::path::Component::Normal(_)));
    (plain && rel.components().next().is_some() && rel.to_str().is_some()).then(|| rel.to_owned())
}

/// Opens `rel` beneath the directory `root` for reading, and returns it with its metadata
/// when it is a regular file.
///
/// The job controls everything in its target directory, so nothing there is trusted: each
/// directory is opened by name from its parent's descriptor with `O_NOFOLLOW`, so a link at
/// any step (or a directory swapped for one meanwhile) fails the open instead of leading
/// out of the target directory, as `openat2`'s `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
/// would, on every kernel. `O_NONBLOCK` makes a FIFO open at once; it is then refused by
/// its type and never read.
fn open_beneath(root: &OwnedFd, rel: &Path) -> Result<(File, rustix::fs::Stat), &'static str> {
    use rustix::fs::{FileType, Mode, OFlags, fstat, openat};
    use rustix::io::Errno;
    let refused = |error: Errno| match error {
        Errno::LOOP | Errno::NOTDIR => "a symbolic link, or beneath one",
        Errno::NOENT => "no such file",
        Errno::NXIO => "not a regular file",
        _ => "cannot be opened",
    };
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let mut components = rel.components().peekable();
    let mut dir: Option<OwnedFd> = None;
    while let Some(component) = components.next() {
        let parent = dir.as_ref().unwrap_or(root);
        let name = component.as_os_str();
        if components.peek().is_some() {
            dir = Some(
                openat(parent, name, flags | OFlags::DIRECTORY, Mode::empty()).map_err(refused)?,
            );
            continue;
        }
        let file = openat(parent, name, flags | OFlags::NOCTTY, Mode::empty()).map_err(refused)?;
        let stat = fstat(&file).map_err(|_| "cannot be read")?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err("not a regular file");
        }
        return Ok((File::from(file), stat));
    }
    Err("names no file")
}

/// An executable opened for staging.
struct Opened {
    found: Found,
    file: File,
}

impl AsRef<Found> for Opened {
    fn as_ref(&self) -> &Found {
        &self.found
    }
}

/// Copies of a job's executables, out of its workspace, ready to send.
#[derive(Debug)]
pub struct Executables {
    dir: tempfile::TempDir,
    /// The staged copies: what each was, and where its copy is.
    files: Vec<(Found, PathBuf)>,
}

/// Copies the executables cargo named (as it saw them, under `visible_target`) from the
/// workspace's `host_target` into a new directory under `staging`. Returns them and notes
/// for the job's output on what was refused or is not sent.
///
/// The names come from the job's stdout, which the job controls: only regular files
/// beneath the target directory, reached without a link, are taken (see
/// [`open_beneath`]); anything else is refused by name. Nothing here blocks on what the
/// job left behind.
pub(crate) fn stage(
    named: &[PathBuf],
    visible_target: &Path,
    host_target: &Path,
    staging: &Path,
) -> std::io::Result<(Executables, Vec<String>)> {
    use rustix::fs::{Mode, OFlags, openat};
    let root = openat(
        rustix::fs::CWD,
        host_target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut unique = BTreeMap::new();
    let mut refused = Vec::new();
    for path in named {
        match beneath(path, visible_target) {
            Some(rel) => {
                unique.insert(rel.to_string_lossy().into_owned(), rel);
            }
            None => refused.push(Refused {
                named: path.to_string_lossy().into_owned(),
                why: "not beneath the target directory",
            }),
        }
    }
    let mut opened = Vec::new();
    for (rel_path, rel) in unique {
        match open_beneath(&root, &rel) {
            Ok((file, stat)) => opened.push(Opened {
                found: Found {
                    rel_path,
                    size: u64::try_from(stat.st_size).unwrap_or(0),
                    mode: stat.st_mode & 0o777,
                },
                file,
            }),
            Err(why) => refused.push(Refused {
                named: rel_path,
                why,
            }),
        }
    }
    let (kept, skipped) = within_bound(opened, MAX_ARTIFACT_BYTES);
    std::fs::create_dir_all(staging)?;
    let dir = tempfile::Builder::new()
        .prefix("artifacts-")
        .tempdir_in(staging)?;
    let mut files = Vec::with_capacity(kept.len());
    for (index, Opened { found, file }) in kept.into_iter().enumerate() {
        let copy = dir.path().join(index.to_string());
        // At most the size it had when opened: a file cannot grow the set past its bound.
        let mut source = file.take(found.size);
        let copied = std::io::copy(&mut source, &mut File::create(&copy)?)?;
        files.push((
            Found {
                size: copied,
                ..found
            },
            copy,
        ));
    }
    let notes = refusal_note(&refused).into_iter().chain(skipped).collect();
    Ok((Executables { dir, files }, notes))
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
        for (index, (file, copy)) in (0..count).zip(&self.files) {
            let reader = match tokio::fs::File::open(copy).await {
                Ok(reader) => reader,
                Err(error) => {
                    // The copy is ours; losing it ends the sending, and the coordinator sees
                    // the files as incomplete.
                    tracing::error!(dir = %self.dir.path().display(), "cannot read a staged executable: {error}");
                    return Err(SendError::Closed);
                }
            };
            let mut hasher = Sha256::new();
            let mut chunks = FileChunks::new(reader);
            loop {
                let chunk = match chunks.next().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(error) => {
                        tracing::error!("cannot read a staged executable: {error}");
                        return Err(SendError::Closed);
                    }
                };
                hasher.update(&chunk.data);
                let sha256 = chunk.last.then(|| hex::encode(hasher.clone().finalize()));
                send(ArtifactChunk {
                    index,
                    count,
                    rel_path: file.rel_path.clone(),
                    mode: file.mode,
                    offset: chunk.offset,
                    data: chunk.data,
                    sha256,
                })
                .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn found(rel_path: &str, size: u64) -> Found {
        Found {
            rel_path: rel_path.to_owned(),
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

    /// The attacks of a hostile job on `--artifacts`: links out of the target directory (to
    /// a file, through a directory), a FIFO that would block a reader, names that climb out
    /// or lie elsewhere. Only the real executable is staged; each of the others is named.
    #[test]
    fn only_regular_files_beneath_the_target_are_staged_and_the_rest_is_named() {
        let root = tempfile::tempdir().expect("temp dir");
        let target = root.path().join("target");
        let secret = root.path().join("token");
        std::fs::write(&secret, "secret").expect("secret");
        std::fs::create_dir_all(target.join("debug/deps")).expect("dirs");
        std::fs::write(target.join("debug/app"), "binary").expect("app");
        std::os::unix::fs::symlink(&secret, target.join("debug/token")).expect("link");
        std::os::unix::fs::symlink(root.path(), target.join("debug/up")).expect("dir link");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            target.join("debug/fifo"),
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        )
        .expect("fifo");
        let visible = Path::new("/build/app/target");
        let named: Vec<PathBuf> = [
            "debug/app",
            "debug/token",
            "debug/up/token",
            "debug/fifo",
            "debug/../../token",
            "debug/deps",
        ]
        .iter()
        .map(|rel| visible.join(rel))
        .chain([PathBuf::from("/proc/self/environ")])
        .collect();
        let staging = root.path().join("staging");
        // A reader blocked on the FIFO never returns: the test's deadline says so.
        let (done, staged) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(stage(&named, visible, &target, &staging));
        });
        let (executables, notes) = staged
            .recv_timeout(Duration::from_secs(30))
            .expect("staging returns without blocking on a FIFO")
            .expect("staged");
        let staged: Vec<&str> = executables
            .files
            .iter()
            .map(|(found, _)| found.rel_path.as_str())
            .collect();
        assert_eq!(staged, ["debug/app"]);
        assert_eq!(
            std::fs::read_to_string(&executables.files[0].1).expect("copy"),
            "binary"
        );
        assert_eq!(
            notes,
            [
                "artifacts refused: /build/app/target/debug/../../token (not beneath the target directory), \
                 /proc/self/environ (not beneath the target directory), \
                 debug/deps (not a regular file), debug/fifo (not a regular file), \
                 debug/token (a symbolic link, or beneath one), \
                 debug/up/token (a symbolic link, or beneath one)"
            ]
        );
    }

    /// A `compiler-artifact` message as cargo writes it, naming `executable`.
    fn artifact_line(executable: &str) -> String {
        format!(
            r#"{{"reason":"compiler-artifact","package_id":"path+file:///build/app#0.1.0","manifest_path":"/build/app/Cargo.toml","target":{{"kind":["bin"],"crate_types":["bin"],"name":"app","src_path":"/build/app/src/main.rs","edition":"2024","doc":true,"doctest":false,"test":true}},"profile":{{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":false}},"features":[],"filenames":["{executable}"],"executable":"{executable}","fresh":false}}"#
        )
    }

    /// Lines as a hostile job prints them: real and forged cargo messages, JSON that is no
    /// message, broken JSON, plain text, with or without their newline.
    fn stdout_line() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "[a-z {}\\\"/.:]{0,40}\n",
            "/build/t/target/[a-z./]{0,20}".prop_map(|path| artifact_line(&path) + "\n"),
            "\\{\"reason\":\"compiler-artifact\",\"executable\":\"/build/t/target/[a-z./]{0,20}\"\\}\n",
            "\\{\"reason\":\"build-finished\",\"success\":true\\}\n",
            "\\{\"reason\":[0-9]{1,3},\"executable\":null\\}\n",
            "\\{\"rea[a-z\"]{0,10}\n",
            "\\{[^\n]{0,60}",
        ]
    }

    proptest::proptest! {
        /// Whatever the job prints, split wherever the pipe splits it: the parser never
        /// panics, and what it forwards and what it reads do not depend on the split.
        #[test]
        fn the_cargo_message_parser_reads_the_same_however_stdout_is_split(
            lines in proptest::collection::vec(stdout_line(), 0..24),
            cuts in proptest::collection::vec(any_index(), 0..8),
        ) {
            let stdout: Vec<u8> = lines.concat().into_bytes();
            let mut whole = MessageFilter::default();
            let mut forwarded_whole = whole.feed(&stdout);
            let (rest, named_whole) = whole.finish();
            forwarded_whole.extend(rest);

            let mut at: Vec<usize> = cuts.iter().map(|cut| cut.index(stdout.len() + 1)).collect();
            at.sort_unstable();
            let mut split = MessageFilter::default();
            let mut forwarded = Vec::new();
            let mut start = 0;
            for end in at.into_iter().chain([stdout.len()]) {
                forwarded.extend(split.feed(&stdout[start..end]));
                start = end;
            }
            let (rest, named) = split.finish();
            forwarded.extend(rest);
            proptest::prop_assert_eq!(forwarded, forwarded_whole);
            proptest::prop_assert_eq!(named, named_whole);
        }
    }

    fn any_index() -> impl proptest::strategy::Strategy<Value = proptest::sample::Index> {
        proptest::arbitrary::any::<proptest::sample::Index>()
    }

    /// Only what cargo writes is a message: a forged short one is output and names
    /// nothing, and a line nested past serde_json's limit is output, not a stack overflow.
    #[test]
    fn forged_and_deeply_nested_lines_are_output() {
        let mut filter = MessageFilter::default();
        let forged = "{\"reason\":\"compiler-artifact\",\"executable\":\"/etc/passwd\"}\n";
        let nested = format!(
            "{{\"reason\":\"compiler-message\",\"message\":{}\n",
            "[".repeat(100_000)
        );
        let mut forwarded = filter.feed(forged.as_bytes());
        forwarded.extend(filter.feed(nested.as_bytes()));
        let (rest, executables) = filter.finish();
        forwarded.extend(rest);
        assert_eq!(forwarded, [forged, nested.as_str()].concat().into_bytes());
        assert!(executables.is_empty());
    }

    #[test]
    fn a_flood_of_artifact_messages_is_bounded() {
        let mut filter = MessageFilter::default();
        let line = artifact_line("/build/t/target/x") + "\n";
        for _ in 0..MAX_EXECUTABLES + 5 {
            assert!(filter.feed(line.as_bytes()).is_empty());
        }
        assert_eq!(filter.beyond_bound, 5);
        assert_eq!(filter.finish().1.len(), MAX_EXECUTABLES);
    }

    #[test]
    fn cargo_messages_are_read_and_other_stdout_passes() {
        let mut filter = MessageFilter::default();
        let artifact = artifact_line("/build/1/target/debug/app");
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
