//! Running one command as an owned process group.
//!
//! Killing only the direct child would leave grandchildren (test binaries, build scripts,
//! `sleep` in a test) running and holding the output pipes open. So every job is the leader
//! of its own process group, and the group is what gets signalled: TERM, a grace period,
//! then KILL. Output is read as raw byte chunks (no line-length limit) into a
//! bounded channel, so a slow consumer stalls the process instead of growing memory.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use buildpool_core::OutputStream;
use buildpool_core::bus::MAX_OUTPUT_CHUNK_BYTES;
use buildpool_core::process::{alive, kill_group, terminate_group};
use bytes::Bytes;
use command_fds::{CommandFdExt, FdMapping};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long the output pipes may stay open after the process group is gone. Only a process
/// that escaped the group (`setsid`) can hold them; we stop reading rather than hang.
const PIPE_DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// One chunk of a job's output, as read from the pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: OutputStream,
    pub data: Bytes,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub program: OsString,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    pub env: Vec<(OsString, OsString)>,
    /// Start from an empty environment: `env` is all the process gets. Build hosts run jobs
    /// this way so nothing of the agent's environment (its token) reaches them.
    pub clear_env: bool,
    /// A directory where the running group is recorded, so a later agent can kill it if
    /// this one dies without cleaning up (see [`reap_orphans`]).
    pub registry: Option<PathBuf>,
    /// Bytes the process reads on descriptor 3 (a pipe, closed after them): bwrap's
    /// `--args 3`, so the sandbox's mount options, full of host paths, are on no process's
    /// command line, where a job could read them from `/proc`.
    pub options_on_fd3: Option<Vec<u8>>,
}

/// Name of the registry directory inside an agent's worktree directory.
pub const REGISTRY_DIR: &str = ".running";

/// A record of one running group: removed when the group is gone.
#[derive(Debug)]
struct Registration(PathBuf);

impl Registration {
    fn create(dir: &std::path::Path, pgid: i32) -> Option<Self> {
        std::fs::create_dir_all(dir).ok()?;
        let path = dir.join(format!("{}-{pgid}", std::process::id()));
        std::fs::write(&path, b"").ok()?;
        Some(Self(path))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Members of process group `pgid` whose working directory is under `root`.
fn group_members_under(pgid: i32, root: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name: state ppid pgrp ...
            let group = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(2))
                .and_then(|g| g.parse::<i32>().ok());
            group == Some(pgid)
                && std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.starts_with(root))
        })
        .count()
}

/// Kills job process groups left behind by an agent that died (e.g. `kill -9`): recorded in
/// `<worktree_dir>/.running` by a process that no longer exists, and still running in that
/// worktree directory (so a reused group id of an unrelated process is left alone).
pub fn reap_orphans(worktree_dir: &std::path::Path) -> usize {
    let dir = worktree_dir.join(REGISTRY_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut reaped = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((agent, pgid)) = name.to_str().and_then(|n| n.split_once('-')) else {
            continue;
        };
        let (Ok(agent), Ok(pgid)) = (agent.parse::<i32>(), pgid.parse::<i32>()) else {
            continue;
        };
        if alive(agent) {
            continue;
        }
        if group_members_under(pgid, worktree_dir) > 0 {
            tracing::warn!(
                pgid,
                "killing a job left running by a previous agent process"
            );
            kill_group(pgid);
            reaped += 1;
        }
        let _ = std::fs::remove_file(entry.path());
    }
    reaped
}

/// Limits a run is held to.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    pub timeout: Duration,
    /// Time between TERM and KILL when the job is stopped.
    pub kill_grace: Duration,
}

/// How a process run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessEnd {
    Exited { code: i32 },
    Signalled { signal: i32 },
    TimedOut,
    Cancelled,
}

impl From<ProcessEnd> for buildpool_core::JobEnd {
    fn from(end: ProcessEnd) -> Self {
        match end {
            ProcessEnd::Exited { code } => Self::Exited { code },
            ProcessEnd::Signalled { signal } => Self::Signalled { signal },
            ProcessEnd::TimedOut => Self::TimedOut,
            ProcessEnd::Cancelled => Self::Cancelled,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ProcessResult {
    pub end: ProcessEnd,
    pub duration: Duration,
}

/// Kills the whole group when dropped, so no code path (panic, task abort, early return)
/// leaves a job's processes running.
#[derive(Debug)]
struct GroupGuard {
    pgid: i32,
}

impl GroupGuard {}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.pgid);
    }
}

/// What a short command printed, and how it ended.
#[derive(Debug)]
pub struct Collected {
    pub end: ProcessEnd,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Bytes of each stream [`collect`] keeps; a probe's answer is a few lines.
const COLLECTED_BYTES: usize = 64 * 1024;

/// Runs a short command (a probe, a check) like [`run`] and collects the start of its
/// output (at most [`COLLECTED_BYTES`] of each stream).
pub async fn collect(spec: CommandSpec, timeout: Duration) -> std::io::Result<Collected> {
    let (sender, mut receiver) = mpsc::channel::<OutputChunk>(16);
    let limits = RunLimits {
        timeout,
        kill_grace: Duration::from_millis(200),
    };
    let gather = async move {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(chunk) = receiver.recv().await {
            let kept: &mut Vec<u8> = match chunk.stream {
                OutputStream::Stdout => &mut stdout,
                OutputStream::Stderr => &mut stderr,
            };
            let room = COLLECTED_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
        }
        (stdout, stderr)
    };
    let (result, (stdout, stderr)) =
        tokio::join!(run(spec, limits, sender, CancellationToken::new()), gather);
    Ok(Collected {
        end: result?.end,
        stdout,
        stderr,
    })
}

/// Runs `spec` to completion, streaming its output into `output`.
///
/// Returns when the process has ended and its group is gone. Cancellation and the timeout
/// both stop the whole group: TERM, then KILL after `limits.kill_grace`.
pub async fn run(
    spec: CommandSpec,
    limits: RunLimits,
    output: mpsc::Sender<OutputChunk>,
    cancel: CancellationToken,
) -> std::io::Result<ProcessResult> {
    let started = Instant::now();
    let mut command = tokio::process::Command::new(&spec.program);
    if spec.clear_env {
        command.env_clear();
    }
    command
        .args(&spec.args)
        .current_dir(&spec.cwd)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let options = match spec.options_on_fd3 {
        Some(options) => {
            let (reader, writer) = std::io::pipe()?;
            command
                .fd_mappings(vec![FdMapping {
                    parent_fd: reader.into(),
                    child_fd: 3,
                }])
                .map_err(std::io::Error::other)?;
            Some((writer, options))
        }
        None => None,
    };
    let mut child = command.spawn()?;
    // The child holds its end of the pipe now. Ours must go: while it is open, writing to a
    // child that died would block for ever instead of failing.
    drop(command);
    if let Some((mut writer, options)) = options {
        // More than a pipe holds would block: written beside the process, which reads it
        // at start. A process that exits first ends the write with an error, ignored.
        tokio::task::spawn_blocking(move || {
            let _ = std::io::Write::write_all(&mut writer, &options);
        });
    }
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| std::io::Error::other("spawned process has no pid"))?;
    let guard = GroupGuard { pgid: pid };
    let registration = spec
        .registry
        .as_deref()
        .and_then(|dir| Registration::create(dir, pid));

    let mut pumps = tokio::task::JoinSet::new();
    if let Some(stdout) = child.stdout.take() {
        pumps.spawn(pump(stdout, OutputStream::Stdout, output.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        pumps.spawn(pump(stderr, OutputStream::Stderr, output));
    }

    let deadline = tokio::time::sleep(limits.timeout);
    tokio::pin!(deadline);
    let end = tokio::select! {
        status = child.wait() => Some(status?),
        () = &mut deadline => None,
        () = cancel.cancelled() => None,
    };
    let end = match end {
        Some(status) => match status.code() {
            Some(code) => ProcessEnd::Exited { code },
            None => ProcessEnd::Signalled {
                signal: status.signal().unwrap_or(0),
            },
        },
        None => {
            let end = if cancel.is_cancelled() {
                ProcessEnd::Cancelled
            } else {
                ProcessEnd::TimedOut
            };
            terminate_group(guard.pgid);
            if tokio::time::timeout(limits.kill_grace, child.wait())
                .await
                .is_err()
            {
                kill_group(guard.pgid);
                child.wait().await?;
            }
            end
        }
    };
    // The job is over: anything its group left behind goes too, closing the pipes.
    drop(guard);
    drop(registration);
    let drained = tokio::time::timeout(PIPE_DRAIN_DEADLINE, async {
        while pumps.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("output pipes still open after the process group ended; stop reading");
        pumps.abort_all();
    }
    Ok(ProcessResult {
        end,
        duration: started.elapsed(),
    })
}

async fn pump(
    mut reader: impl AsyncRead + Unpin,
    stream: OutputStream,
    output: mpsc::Sender<OutputChunk>,
) {
    let mut buffer = vec![0u8; MAX_OUTPUT_CHUNK_BYTES];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let chunk = OutputChunk {
                    stream,
                    data: Bytes::copy_from_slice(&buffer[..n]),
                };
                // A closed receiver means nobody wants the output any more; keep draining
                // the pipe so the process does not block on a full pipe.
                let _ = output.send(chunk).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> CommandSpec {
        CommandSpec {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: Vec::new(),
            clear_env: false,
            registry: None,
            options_on_fd3: None,
        }
    }

    fn limits(timeout_ms: u64) -> RunLimits {
        RunLimits {
            timeout: Duration::from_millis(timeout_ms),
            kill_grace: Duration::from_millis(500),
        }
    }

    async fn collect(mut rx: mpsc::Receiver<OutputChunk>) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(chunk) = rx.recv().await {
            match chunk.stream {
                OutputStream::Stderr => err.extend_from_slice(&chunk.data),
                _ => out.extend_from_slice(&chunk.data),
            }
        }
        (out, err)
    }

    #[tokio::test]
    async fn reports_exit_code_and_both_streams() {
        let (tx, rx) = mpsc::channel(4);
        let reader = tokio::spawn(collect(rx));
        let result = run(
            sh("echo out; echo err >&2; exit 3"),
            limits(10_000),
            tx,
            CancellationToken::new(),
        )
        .await
        .expect("runs");
        assert_eq!(result.end, ProcessEnd::Exited { code: 3 });
        let (out, err) = reader.await.expect("collects");
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
    }

    #[tokio::test]
    async fn a_line_far_longer_than_a_chunk_arrives_whole() {
        let (tx, rx) = mpsc::channel(1);
        let reader = tokio::spawn(collect(rx));
        run(
            sh("head -c 1000000 /dev/zero | tr '\\0' x"),
            limits(10_000),
            tx,
            CancellationToken::new(),
        )
        .await
        .expect("runs");
        let (out, _) = reader.await.expect("collects");
        assert_eq!(out.len(), 1_000_000);
    }

    #[tokio::test]
    async fn cancel_kills_grandchildren_too() {
        let pid_file = tempfile::NamedTempFile::new().expect("temp file");
        let script = format!("sleep 300 & echo $! > {}; wait", pid_file.path().display());
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(collect(rx));
        let cancel = CancellationToken::new();
        let job = tokio::spawn(run(sh(&script), limits(60_000), tx, cancel.clone()));
        let grandchild = loop {
            if let Ok(text) = std::fs::read_to_string(pid_file.path())
                && let Ok(pid) = text.trim().parse::<i32>()
            {
                break pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(alive(grandchild));
        cancel.cancel();
        let result = job.await.expect("joins").expect("runs");
        assert_eq!(result.end, ProcessEnd::Cancelled);
        // The grandchild was killed; give the kernel a moment to reap it (it is reparented).
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            !alive(grandchild) || zombie(grandchild)
        });
        assert!(gone, "grandchild {grandchild} survived the cancel");
    }

    fn zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    }

    #[tokio::test]
    async fn a_timeout_is_reported_as_such_and_escalates_to_kill() {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(collect(rx));
        // The script ignores TERM, so only KILL after the grace period ends it.
        let result = run(
            sh("trap '' TERM; sleep 30"),
            limits(200),
            tx,
            CancellationToken::new(),
        )
        .await
        .expect("runs");
        assert_eq!(result.end, ProcessEnd::TimedOut);
        assert!(
            result.duration < Duration::from_secs(10),
            "{:?}",
            result.duration
        );
    }

    #[tokio::test]
    async fn a_slow_consumer_gets_backpressure_not_memory() {
        // The channel holds one chunk; the consumer reads nothing until the writer is blocked.
        let (tx, mut rx) = mpsc::channel(1);
        let job = tokio::spawn(run(
            sh("head -c 4000000 /dev/zero; echo done >&2"),
            limits(30_000),
            tx,
            CancellationToken::new(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !job.is_finished(),
            "the writer should be blocked by backpressure"
        );
        let mut total = 0;
        while let Some(chunk) = rx.recv().await {
            if chunk.stream == OutputStream::Stdout {
                total += chunk.data.len();
            }
        }
        assert_eq!(total, 4_000_000);
        assert_eq!(
            job.await.expect("joins").expect("runs").end,
            ProcessEnd::Exited { code: 0 }
        );
    }
}

#[cfg(test)]
mod reap_tests {
    use super::*;

    #[test]
    fn groups_of_a_dead_agent_are_killed_only_when_they_run_in_its_directory() {
        let root = tempfile::tempdir().expect("temp");
        let inside = root.path().join("slot-0");
        std::fs::create_dir_all(&inside).expect("mkdir");
        let spawn = |cwd: &std::path::Path| {
            let mut command = std::process::Command::new("sleep");
            command.arg("300").current_dir(cwd);
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            command.spawn().expect("sleep")
        };
        let mut orphan = spawn(&inside);
        let mut unrelated = spawn(&std::env::temp_dir());
        let registry = root.path().join(REGISTRY_DIR);
        std::fs::create_dir_all(&registry).expect("mkdir");
        // A pid that is certainly dead (beyond pid_max) stands for the crashed agent.
        for child in [&orphan, &unrelated] {
            std::fs::write(registry.join(format!("{}-{}", 99_999_999, child.id())), b"")
                .expect("write");
        }
        // A live agent's record is left alone.
        std::fs::write(
            registry.join(format!("{}-{}", std::process::id(), orphan.id())),
            b"",
        )
        .expect("write");
        assert_eq!(reap_orphans(root.path()), 1);
        let status = orphan.wait().expect("reaped");
        assert_eq!(status.signal(), Some(9));
        assert!(
            unrelated.try_wait().expect("status").is_none(),
            "an unrelated group was killed"
        );
        unrelated.kill().expect("kill");
        let _ = unrelated.wait();
        assert_eq!(
            std::fs::read_dir(&registry).expect("dir").count(),
            1,
            "only the live agent's record stays"
        );
    }
}
