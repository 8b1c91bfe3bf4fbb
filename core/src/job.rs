//! Jobs, attempts and how they end.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;

/// A job's number, unique within one coordinator.
pub type JobId = u64;

/// One attempt at a job. A job is attempted again when its agent is lost; output and
/// results count only for the attempt the coordinator currently holds (fencing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptKey {
    pub job_id: JobId,
    pub attempt: u32,
}

impl AttemptKey {
    pub fn new(job_id: JobId, attempt: u32) -> Self {
        Self { job_id, attempt }
    }
}

impl fmt::Display for AttemptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {} attempt {}", self.job_id, self.attempt)
    }
}

/// Where a `nextest-archive` job writes its archive, and a slice of a spread test run
/// finds the one it fetched: in the job's target directory itself, which a root agent has
/// handed to the job's user (a directory the agent made beneath it would not be).
pub const ARCHIVE_FILE: &str = "buildpool-nextest-archive.tar.zst";

/// The cargo subcommand a job runs. A job is never a shell string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    Build,
    Test,
    Clippy,
    Check,
    /// `cargo nextest run`: needs cargo-nextest where the job runs.
    Nextest,
    /// `cargo nextest archive`: builds the test binaries once, for a test run spread over
    /// agents; the archive goes back to the coordinator as the job's artifact.
    NextestArchive,
}

impl JobKind {
    /// The kind's name: its cargo subcommand (`nextest` for `cargo nextest run`,
    /// `nextest-archive` for `cargo nextest archive`).
    pub fn cargo_subcommand(self) -> &'static str {
        match self {
            JobKind::Build => "build",
            JobKind::Test => "test",
            JobKind::Clippy => "clippy",
            JobKind::Check => "check",
            JobKind::Nextest => "nextest",
            JobKind::NextestArchive => "nextest-archive",
        }
    }

    /// The cargo arguments that select this kind, before the job's own.
    pub fn cargo_command(self) -> &'static [&'static str] {
        match self {
            JobKind::Build => &["build"],
            JobKind::Test => &["test"],
            JobKind::Clippy => &["clippy"],
            JobKind::Check => &["check"],
            JobKind::Nextest => &["nextest", "run"],
            JobKind::NextestArchive => &["nextest", "archive"],
        }
    }

    /// Parses a cargo subcommand name as typed on the command line (aliases included).
    /// `nextest` is not one: `cargo nextest` has subcommands of its own, which the offload
    /// module does not carry.
    pub fn from_subcommand(name: &str) -> Option<Self> {
        match name {
            "build" | "b" => Some(JobKind::Build),
            "test" | "t" => Some(JobKind::Test),
            "clippy" => Some(JobKind::Clippy),
            "check" | "c" => Some(JobKind::Check),
            _ => None,
        }
    }

    /// Parses a kind by its name ([`JobKind::cargo_subcommand`], aliases included), as
    /// `buildpool run KIND` takes it: `nextest` means `cargo nextest run`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "nextest" => Some(JobKind::Nextest),
            "nextest-archive" => Some(JobKind::NextestArchive),
            other => Self::from_subcommand(other),
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cargo_subcommand())
    }
}

/// Which environment the agent runs cargo in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EnvMode {
    /// `nix develop` when the workspace has a flake.nix and nix is installed, else the host.
    #[default]
    Auto,
    Nix,
    Host,
}

impl FromStr for EnvMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(EnvMode::Auto),
            "nix" => Ok(EnvMode::Nix),
            "host" => Ok(EnvMode::Host),
            other => Err(format!("env must be auto, nix or host, not {other:?}")),
        }
    }
}

/// The environment a job actually ran in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunEnv {
    Nix,
    Host,
}

impl RunEnv {
    pub fn label(self) -> &'static str {
        match self {
            RunEnv::Nix => "nix",
            RunEnv::Host => "host",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "nix" => Some(RunEnv::Nix),
            "host" => Some(RunEnv::Host),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// A structured description of one cargo invocation; see [`crate::spec::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    pub kind: JobKind,
    /// Arguments after the subcommand, passed to cargo as argv entries.
    pub cargo_args: Vec<String>,
    /// Extra environment variables; names must be on the allowlist.
    pub env: Vec<EnvVar>,
    /// `None`: the coordinator's default.
    pub timeout: Option<Duration>,
    pub env_mode: EnvMode,
    /// The job runs only on agents carrying all of these labels.
    pub required_labels: Vec<String>,
    /// Send the executables cargo built back to the coordinator after a successful run, for
    /// the client to copy into its own `target/` (build and test jobs only).
    pub collect_executables: bool,
    /// A `nextest` job that runs the tests of this earlier `nextest-archive` job's archive
    /// (fetched from the coordinator) instead of building them: one slice of a spread run.
    pub archive_from: Option<JobId>,
}

impl JobSpec {
    /// A job of `kind` with no arguments, no extra environment and every default.
    pub fn new(kind: JobKind) -> Self {
        Self {
            kind,
            cargo_args: Vec::new(),
            env: Vec::new(),
            timeout: None,
            env_mode: EnvMode::Auto,
            required_labels: Vec::new(),
            collect_executables: false,
            archive_from: None,
        }
    }

    /// The job's own timeout, or `default` when it set none.
    pub fn timeout_or(&self, default: Duration) -> Duration {
        self.timeout.unwrap_or(default)
    }
}

/// Where an agent fetches the exact snapshot to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Stable identity of the source repository; keys the agent's git cache and workspaces.
    pub repo_id: String,
    /// Path of the repository as exported by the coordinator's git daemon.
    pub git_path: String,
    /// Port of the coordinator's git daemon, on the host the agent dialled, when the
    /// coordinator serves git directly (trusted networks only); `None` means through the
    /// authenticated tunnel on the job bus port, the default.
    pub git_port: Option<u16>,
    /// The snapshot commit (full object id) and the hidden ref that holds it.
    pub commit: String,
    pub git_ref: String,
    /// The commit the snapshot was taken on (its parent, the worktree's `HEAD`); empty when
    /// it has none. Workspaces that built the same base are the next warmest after the
    /// same worktree's.
    pub base_commit: String,
    /// What the snapshot adds to `base_commit`, when the coordinator made it small enough
    /// to send along: an agent that holds the base applies it instead of fetching.
    pub pack: Option<SnapshotPack>,
}

/// A git pack of the objects a snapshot commit has beyond its base commit (thin: deltas
/// may refer to the base's objects).
///
/// A one-line change makes a pack of a few hundred bytes; applying it costs the agent one
/// or two git processes, where a fetch through the tunnel costs several and a handful of
/// round trips (on small crates such as itoa and semver, a fetch phase of about 4 ms
/// against 26-31 ms).
#[derive(Clone, PartialEq, Eq)]
pub struct SnapshotPack(pub Bytes);

impl fmt::Debug for SnapshotPack {
    /// Its size, not its bytes: sources appear in logs.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "SnapshotPack({} bytes)", self.0.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Exit code when the job timed out (as `timeout(1)` does).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit code when buildpool could not run the job at all.
pub const EXIT_FAILED: u8 = 125;
/// Exit code when the job was cancelled.
pub const EXIT_CANCELLED: u8 = 130;

/// How a job attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// cargo ran to the end with this exit code.
    Exited {
        code: i32,
    },
    /// cargo was killed by a signal nobody in buildpool sent.
    Signalled {
        signal: i32,
    },
    TimedOut,
    Cancelled,
    /// The job could not run (fetch failed, no environment, agents lost too often, ...).
    Failed {
        reason: String,
    },
}

impl JobEnd {
    /// The exit code of a process that stands for this job (`buildpool run`, the cargo shim).
    pub fn exit_code(&self) -> u8 {
        match self {
            JobEnd::Exited { code } => u8::try_from(*code).unwrap_or(1),
            JobEnd::Signalled { signal } => u8::try_from(128 + signal).unwrap_or(1),
            JobEnd::TimedOut => EXIT_TIMED_OUT,
            JobEnd::Cancelled => EXIT_CANCELLED,
            JobEnd::Failed { .. } => EXIT_FAILED,
        }
    }
}

/// Help of the jobs-by-outcome counters of agent and coordinator alike, naming every
/// [`JobEnd::outcome`].
pub const OUTCOME_HELP: &str = "Jobs ended, by cargo subcommand and outcome (success, failure, \
                                signalled, timed_out, cancelled, error)";

impl JobEnd {
    /// A metric label for how the job ended: one of a small fixed set, so it never makes
    /// series without bound.
    pub fn outcome(&self) -> &'static str {
        match self {
            JobEnd::Exited { code: 0 } => "success",
            JobEnd::Exited { .. } => "failure",
            JobEnd::Signalled { .. } => "signalled",
            JobEnd::TimedOut => "timed_out",
            JobEnd::Cancelled => "cancelled",
            JobEnd::Failed { .. } => "error",
        }
    }
}

impl fmt::Display for JobEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobEnd::Exited { code } => write!(f, "exit code {code}"),
            JobEnd::Signalled { signal } => write!(f, "killed by signal {signal}"),
            JobEnd::TimedOut => f.write_str("timed out"),
            JobEnd::Cancelled => f.write_str("cancelled"),
            JobEnd::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// Where an attempt's time went on its agent, phase by phase; a phase the attempt never
/// reached is zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentPhases {
    /// Waiting for a free workspace of the repository.
    pub workspace_wait: Duration,
    /// Fetching the snapshot into the agent's git cache, and meanwhile cleaning the
    /// workspace of the last job's leftovers (the clean alone when the snapshot was cached).
    pub fetch: Duration,
    /// Checking the snapshot out into the workspace.
    pub checkout: Duration,
    /// Choosing and preparing the environment (the nix dev shell).
    pub environment: Duration,
    /// cargo itself, from spawn until its output is drained.
    pub cargo: Duration,
}

/// How one attempt ended, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub end: JobEnd,
    pub duration: Duration,
    /// Where cargo ran; `None` when the job ended before an environment was chosen.
    pub env: Option<RunEnv>,
    pub phases: AgentPhases,
}

impl Completion {
    /// An end decided without the job running further (cancel, failure, backstop).
    pub fn new(end: JobEnd) -> Self {
        Self {
            end,
            duration: Duration::ZERO,
            env: None,
            phases: AgentPhases::default(),
        }
    }

    pub fn failed(reason: impl Into<String>) -> Self {
        Self::new(JobEnd::Failed {
            reason: reason.into(),
        })
    }
}

/// How a job ended, as its client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResult {
    pub completion: Completion,
    /// The agent of the last attempt; empty when the job never ran.
    pub agent_id: String,
    /// 0 when the job never ran.
    pub attempt: u32,
    /// The coordinator's embedded local agent ran it.
    pub local: bool,
    /// From submission to the first assignment.
    pub queue_time: Duration,
}

impl JobResult {
    /// One line saying how the job ended, where and how long it took.
    pub fn describe(&self) -> String {
        let place = if self.agent_id.is_empty() {
            String::new()
        } else if self.local {
            " on the local agent".to_owned()
        } else {
            format!(" on {}", self.agent_id)
        };
        let env = self
            .completion
            .env
            .map(|env| format!(", env {}", env.label()))
            .unwrap_or_default();
        format!(
            "{} after {:.1} s{place}{env}, queued {:.1} s, attempt {}",
            self.completion.end,
            self.completion.duration.as_secs_f64(),
            self.queue_time.as_secs_f64(),
            self.attempt
        )
    }
}

/// What a client sees of its job, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    Queued {
        /// Jobs ahead of this one.
        position: u32,
        /// Why it waits, e.g. "all 4 agent slots busy".
        reason: String,
    },
    Assigned {
        agent_id: String,
        attempt: u32,
        /// The coordinator's embedded local agent runs the job.
        local: bool,
    },
    Output {
        attempt: u32,
        stream: OutputStream,
        data: Bytes,
    },
    Finished(JobResult),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_map_to_distinct_exit_codes() {
        assert_eq!(JobEnd::Exited { code: 0 }.exit_code(), 0);
        assert_eq!(JobEnd::Exited { code: 101 }.exit_code(), 101);
        assert_eq!(JobEnd::Signalled { signal: 9 }.exit_code(), 137);
        assert_eq!(JobEnd::TimedOut.exit_code(), EXIT_TIMED_OUT);
        assert_eq!(JobEnd::Cancelled.exit_code(), EXIT_CANCELLED);
        assert_eq!(
            JobEnd::Failed { reason: "x".into() }.exit_code(),
            EXIT_FAILED
        );
    }

    #[test]
    fn a_summary_names_outcome_place_and_env() {
        let result = JobResult {
            completion: Completion {
                end: JobEnd::Exited { code: 101 },
                duration: Duration::from_millis(2500),
                env: Some(RunEnv::Nix),
                phases: AgentPhases::default(),
            },
            agent_id: "worker-1".into(),
            attempt: 1,
            local: false,
            queue_time: Duration::from_millis(100),
        };
        assert_eq!(
            result.describe(),
            "exit code 101 after 2.5 s on worker-1, env nix, queued 0.1 s, attempt 1"
        );
    }

    #[test]
    fn kinds_parse_their_aliases() {
        for kind in [
            JobKind::Build,
            JobKind::Test,
            JobKind::Clippy,
            JobKind::Check,
        ] {
            assert_eq!(
                JobKind::from_subcommand(kind.cargo_subcommand()),
                Some(kind)
            );
        }
        assert_eq!(JobKind::from_subcommand("t"), Some(JobKind::Test));
        assert_eq!(JobKind::from_subcommand("run"), None);
        assert_eq!(JobKind::from_subcommand("nextest"), None);
        assert_eq!(JobKind::from_name("nextest"), Some(JobKind::Nextest));
        assert_eq!(JobKind::from_name("c"), Some(JobKind::Check));
    }
}

/// Whether an artifact's path stays inside the directory it is joined to: relative, with
/// no empty, `.` or `..` component.
pub fn artifact_path_is_safe(rel_path: &str) -> bool {
    !rel_path.is_empty()
        && !rel_path.starts_with('/')
        && rel_path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// One piece of an executable a job built, as the agent sends it and the client fetches it.
/// The files of a job are numbered `0..count`; each is sent from offset 0 up, and its last
/// chunk carries the SHA-256 of the whole file, so a receiver knows what is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactChunk {
    pub index: u32,
    /// Files the job sent in all; 0 (with an empty path) when it built none.
    pub count: u32,
    /// Path relative to the target directory, e.g. `debug/app`.
    pub rel_path: String,
    /// Unix permission bits of the file.
    pub mode: u32,
    pub offset: u64,
    pub data: Bytes,
    /// Lowercase hex SHA-256 of the whole file; only on its last chunk.
    pub sha256: Option<String>,
}
