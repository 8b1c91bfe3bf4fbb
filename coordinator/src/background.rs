//! A coordinator started on demand: the first client that finds none starts one in the
//! background, and every client joins it (as sccache's clients do its server).
//!
//! Several coding agents in worktrees of one repository, and nobody ran `buildpool serve`:
//! were each client to start its own in-process coordinator, each would have its own queue
//! over the same local workspaces and all but the first few would fail. So a client that
//! finds no coordinator starts `buildpool serve --background` for the repository, detached
//! (its own process group, stdio to [`LOG_FILE`]), and submits to it like every other
//! client: one queue, logs, `status` and the dashboard. It listens on loopback only and
//! runs jobs on its embedded local agent (see `CoordinatorConfig::background`).
//!
//! One is started however many clients race: a client starts one only while it holds
//! `background.lock` in the state directory, and the coordinator itself holds
//! `coordinator.lock` as `serve` does. The others wait, up to [`START_TIMEOUT`], for its
//! discovery file. It stops after [`IDLE_ENV`] seconds (default [`DEFAULT_IDLE`]) without
//! jobs and without client requests, and as soon as its repository is gone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use buildpool_core::time::unix_millis;

use crate::client::{Client, ClientError};
use crate::discovery;
use crate::repo::Repo;
use crate::server::Coordinator;

/// `off`: clients never start a background coordinator; they run jobs through an
/// in-process one, as `--local` does.
pub const ENV: &str = "BUILDPOOL_BACKGROUND";
/// Seconds a background coordinator stays up without jobs or client requests.
pub const IDLE_ENV: &str = "BUILDPOOL_IDLE_EXIT_SECS";
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// The background coordinator's stdout and stderr, in the state directory.
pub const LOG_FILE: &str = "background.log";
/// A log beyond this is moved to `background.log.old` when the next one starts.
const LOG_KEEP_BYTES: u64 = 1024 * 1024;
/// How long a client waits for a background coordinator to be ready, its own or another's.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);
/// How often a background coordinator looks at its activity and its repository.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How long an idle background coordinator still serves after taking its discovery file
/// away: a client that read it a moment before dials and submits within milliseconds.
const LATE_CLIENT_GRACE: Duration = Duration::from_secs(1);
/// What a client says when it runs a job without a coordinator of the repository.
const NOT_RUNNING: &str = "no coordinator running for this repository";

/// A background coordinator this client started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub pid: u32,
    pub idle: Duration,
    pub log: PathBuf,
}

impl std::fmt::Display for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{NOT_RUNNING}; started one in the background (pid {}, exits after {} s idle; log {})",
            self.pid,
            self.idle.as_secs(),
            self.log.display()
        )
    }
}

/// The idle time of background coordinators: [`IDLE_ENV`], else [`DEFAULT_IDLE`].
fn idle_time() -> Duration {
    std::env::var(IDLE_ENV)
        .ok()
        .and_then(|secs| secs.trim().parse().ok())
        .map_or(DEFAULT_IDLE, Duration::from_secs)
}

/// Whether clients may start a background coordinator ([`ENV`] is not `off`).
pub fn enabled() -> bool {
    std::env::var(ENV).map_or(true, |value| value != "off")
}

/// Joins the repository's coordinator, starting one in the background if none runs. The
/// `Started` is there when this client started it. The error is the one-line reason to
/// run the job in-process instead.
pub async fn join(repo: &Repo) -> Result<(Client, Option<Started>), String> {
    if !enabled() {
        return Err(NOT_RUNNING.to_owned());
    }
    let state = repo.state_dir();
    std::fs::create_dir_all(&state)
        .map_err(|e| format!("{NOT_RUNNING}, and {}: {e}", state.display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if discovery::read(&state).is_some() {
            match Client::connect_to_running(repo).await {
                Ok((client, _)) => return Ok((client, None)),
                // Stopped between the read and the dial: look again.
                Err(ClientError::NotRunning(_)) => {}
                Err(error) => return Err(error.to_string()),
            }
        } else if let Some(_starting) = discovery::try_lock(&state.join("background.lock"))
            .map_err(|e| format!("{NOT_RUNNING}, and its start lock: {e}"))?
        {
            // Nobody else is starting one; a `serve` that is starting holds the
            // coordinator lock, and then we wait for it instead.
            let free = discovery::lock(&state)
                .map_err(|e| format!("{NOT_RUNNING}, and its lock: {e}"))?
                .is_some();
            if free && discovery::read(&state).is_none() {
                match start(repo, &state, deadline).await {
                    Ok(Some(started)) => {
                        let (client, _) = Client::connect_to_running(repo)
                            .await
                            .map_err(|e| format!("{started}, but: {e}"))?;
                        return Ok((client, Some(started)));
                    }
                    // Another coordinator took the lock first: join that one.
                    Ok(None) => {}
                    Err(reason) => return Err(format!("{NOT_RUNNING}, and {reason}")),
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{NOT_RUNNING}, and none became ready within {} s",
                START_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Starts `buildpool serve --background` for `repo` and waits until its discovery file
/// names it. `Ok(None)`: it exited because another coordinator of the repository runs.
async fn start(repo: &Repo, state: &Path, deadline: Instant) -> Result<Option<Started>, String> {
    let log_path = state.join(LOG_FILE);
    let log =
        open_log(&log_path).map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let err_log = log
        .try_clone()
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot tell where buildpool is to start a coordinator: {e}"))?;
    let idle = idle_time();
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("-C")
        .arg(&repo.worktree)
        .args(["serve", "--background", "--idle-exit-secs"])
        .arg(idle.as_secs().to_string())
        // Its own process group: a Ctrl-C on this client's terminal is not for it.
        .process_group(0)
        // Holds no worktree busy; the state directory goes with the repository.
        .current_dir(state)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err_log);
    // The client's service manager and credential are not the coordinator's: it would
    // notify readiness in the client's name, and a BUILDPOOL_TOKEN is for a remote
    // coordinator (the repository's own clients read the token file).
    for name in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "JOURNAL_STREAM",
        crate::auth::TOKEN_ENV,
    ] {
        command.env_remove(name);
    }
    // Every job brings its own allow-listed variables; this client's must not become
    // every later job's (RUSTFLAGS, say), as they would in the local agent's environment.
    for (name, _) in std::env::vars_os() {
        if name
            .to_str()
            .is_some_and(buildpool_core::spec::env_name_allowed)
        {
            command.env_remove(name);
        }
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start a background coordinator: {e}"))?;
    let pid = child.id().unwrap_or_default();
    loop {
        if discovery::read(state).is_some_and(|found| found.pid == pid) {
            // Dropped without waiting: tokio reaps it when it exits.
            return Ok(Some(Started {
                pid,
                idle,
                log: log_path,
            }));
        }
        if let Ok(Some(status)) = child.try_wait() {
            if discovery::read(state).is_some() {
                return Ok(None);
            }
            return Err(format!(
                "the background coordinator exited before it was ready ({status}); see {}",
                log_path.display()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the background coordinator (pid {pid}) was not ready within {} s; see {}",
                START_TIMEOUT.as_secs(),
                log_path.display()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The log file, appended to; a big one is set aside first so logs stay bounded.
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if std::fs::metadata(path).is_ok_and(|meta| meta.len() > LOG_KEEP_BYTES) {
        std::fs::rename(path, path.with_extension("log.old"))?;
    }
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
}

/// Why a background coordinator stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    Signal,
    Idle(Duration),
    RepositoryGone(PathBuf),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Signal => f.write_str("stopped by a signal"),
            Stop::Idle(idle) => write!(f, "idle for {} s", idle.as_secs()),
            Stop::RepositoryGone(dir) => write!(f, "{} is gone", dir.display()),
        }
    }
}

/// Runs until a signal, `idle` without a job or a client request, or the repository's
/// removal. A hangup is ignored: the terminal of the client that started it may close.
///
/// Idle, it first takes its discovery file away, then waits [`LATE_CLIENT_GRACE`]: a client
/// that read the file just before gets its job run (the file is put back) instead of a
/// coordinator going away under it.
pub async fn serve_until_idle(
    coordinator: &Coordinator,
    repo: &Repo,
    idle: Duration,
    found_as: &discovery::Discovery,
) -> Stop {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return Stop::Signal;
    };
    let mut last_busy = unix_millis();
    loop {
        tokio::select! {
            _ = term.recv() => return Stop::Signal,
            _ = int.recv() => return Stop::Signal,
            _ = hangup.recv() => {}
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
        // A plain directory's private repository lives elsewhere: the directory counts too.
        for dir in [&repo.common_dir, &repo.worktree] {
            if (dir == &repo.common_dir || repo.plain) && !dir.is_dir() {
                return Stop::RepositoryGone(dir.clone());
            }
        }
        let now = unix_millis();
        let (busy, last_request) = coordinator.activity();
        if busy {
            last_busy = now;
        }
        let quiet = now.saturating_sub(last_busy.max(last_request));
        if Duration::from_millis(quiet) >= idle {
            let state = repo.state_dir();
            discovery::remove(&state, coordinator.id());
            tokio::time::sleep(LATE_CLIENT_GRACE).await;
            let (busy, latest) = coordinator.activity();
            if !busy && latest == last_request {
                return Stop::Idle(idle);
            }
            last_busy = unix_millis();
            if let Err(error) = discovery::write(&state, found_as) {
                tracing::error!("cannot write the discovery file again: {error}");
                return Stop::Idle(idle);
            }
        }
    }
}

/// Stops the background coordinator `pid` (the leader of its own process group) so that
/// `buildpool serve` can take the repository over; returns the coordinator lock once it
/// is free. Its running local jobs end as cancelled.
pub async fn replace(state: &Path, pid: u32) -> anyhow::Result<std::fs::File> {
    let group = i32::try_from(pid)?;
    buildpool_core::process::terminate_group(group);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(lock) = discovery::lock(state)? {
            return Ok(lock);
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the background coordinator (pid {pid}) did not stop within {} s",
                START_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
