//! Supervision of `git daemon`, which serves the repository's snapshots to agents.
//!
//! The daemon exports exactly one directory (the repository's common git dir) thanks to
//! `--strict-paths` with that single directory whitelisted. It runs in its own process group,
//! is restarted if it dies, is killed with its whole group when the coordinator stops, and
//! is killed by the kernel when the coordinator dies (parent-death signal, see
//! [`launcher`]).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const RESTART_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start git daemon: {0}")]
    Spawn(std::io::Error),
    #[error(
        "git daemon did not start listening on port {port} within {READY_TIMEOUT:?} (port in use by another repository's coordinator?); set git_daemon_port or --git-daemon-port"
    )]
    NotReady { port: u16 },
    #[error("cannot find a free port for git daemon: {0}")]
    NoPort(std::io::Error),
}

/// A supervised git daemon.
#[derive(Debug)]
pub struct GitDaemon {
    pub port: u16,
    /// The path agents ask for, e.g. `/.git`.
    pub git_path: String,
    stop: CancellationToken,
    supervisor: tokio::task::JoinHandle<()>,
}

fn listen_host(addr: &str) -> &str {
    if addr.is_empty() { "0.0.0.0" } else { addr }
}

/// How the daemon is started: the program and the arguments before git daemon's own.
#[derive(Debug, Clone)]
struct Launcher {
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
}

/// Finds how to start the daemon so that the kernel kills it when the coordinator dies,
/// however it dies: a `kill -9`ed coordinator must not leave a daemon serving the
/// repository. `setpriv --pdeathsig KILL` (util-linux) gives the daemon a parent-death
/// signal. It has to exec `git-daemon` itself: `git daemon` runs it as a child, which the
/// signal would not reach. Without setpriv the daemon still stops with the coordinator,
/// just not when the coordinator is killed outright.
async fn launcher(common_dir: &Path) -> Launcher {
    let setpriv = buildpool_core::process::find_on_path("setpriv");
    let exec_path = buildpool_core::git::Git::new(common_dir)
        .arg("--exec-path")
        .output()
        .await;
    match (setpriv, exec_path) {
        (Some(setpriv), Ok(exec_path)) => {
            let daemon = Path::new(&exec_path).join("git-daemon");
            Launcher {
                program: setpriv.into(),
                args: vec![
                    "--pdeathsig".into(),
                    "KILL".into(),
                    "--".into(),
                    daemon.into(),
                ],
            }
        }
        (setpriv, exec_path) => {
            tracing::warn!(
                "git daemon runs without a parent-death signal (setpriv: {}, git --exec-path: {}); \
                 it outlives a coordinator that is killed with SIGKILL",
                if setpriv.is_some() {
                    "found"
                } else {
                    "missing"
                },
                exec_path.as_deref().unwrap_or("unknown")
            );
            Launcher {
                program: "git".into(),
                args: vec!["daemon".into()],
            }
        }
    }
}

/// The daemon's command line. It runs in a process group of its own, so signals to the
/// coordinator's group do not reach it unasked; the coordinator stops it explicitly.
fn daemon_command(
    launcher: &Launcher,
    common_dir: &Path,
    listen: &str,
    port: u16,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&launcher.program);
    let base = common_dir.parent().unwrap_or(common_dir);
    command
        .args(&launcher.args)
        .arg("--reuseaddr")
        .arg("--strict-paths")
        .arg("--export-all")
        .arg("--informative-errors")
        .arg("--init-timeout=10")
        .arg("--timeout=120")
        .arg("--max-connections=64")
        .arg(format!("--base-path={}", base.display()))
        .arg(format!("--port={port}"));
    // Options must come before the directory: git daemon takes every argument after the
    // first directory as another directory, so a `--listen` there was silently ignored.
    if !listen.is_empty() {
        command.arg(format!("--listen={listen}"));
    }
    command
        .arg(common_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    command
}

/// Waits until the daemon serves the repository: a real `git ls-remote`, not just a port
/// probe, so a daemon that listens but cannot export is caught here.
async fn wait_serving(common_dir: &Path, host: &str, port: u16, git_path: &str) -> bool {
    let host = match host {
        "0.0.0.0" => "127.0.0.1".to_owned(),
        "::" => "[::1]".to_owned(),
        v6 if v6.contains(':') && !v6.starts_with('[') => format!("[{v6}]"),
        other => other.to_owned(),
    };
    let url = format!("git://{host}:{port}{git_path}");
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        let probe = buildpool_core::git::Git::new(common_dir)
            .args(["ls-remote", "--heads", &url])
            .timeout(Duration::from_secs(5));
        if probe.succeeds().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Where the running daemon's pid is recorded, so a coordinator that was killed without
/// cleaning up (`kill -9`) has its daemon stopped by the next one.
fn pid_file(common_dir: &Path) -> PathBuf {
    common_dir.join("buildpool").join("git-daemon.pid")
}

fn record_pid(common_dir: &Path, child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::fs::create_dir_all(common_dir.join("buildpool"));
        let _ = std::fs::write(pid_file(common_dir), pid.to_string());
    }
}

/// Kills a git daemon left behind by a previous coordinator of this repository, if the
/// recorded pid still is a git daemon serving this repository.
fn kill_stale(common_dir: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file(common_dir))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    if cmdline.contains("daemon") && cmdline.contains(&*common_dir.to_string_lossy()) {
        tracing::warn!(
            pid,
            "stopping a git daemon left behind by a previous coordinator"
        );
        buildpool_core::process::kill_group(pid);
    }
    let _ = std::fs::remove_file(pid_file(common_dir));
}

impl GitDaemon {
    /// Starts the daemon and waits until it accepts connections. Port 0 picks a free port.
    pub async fn start(
        common_dir: PathBuf,
        listen: String,
        port: u16,
    ) -> Result<Self, DaemonError> {
        kill_stale(&common_dir);
        let port = if port == 0 {
            let probe: SocketAddr = format!("{}:0", listen_host(&listen))
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            TcpListener::bind(probe)
                .and_then(|l| l.local_addr())
                .map_err(DaemonError::NoPort)?
                .port()
        } else {
            port
        };
        let git_path = format!(
            "/{}",
            common_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let launcher = launcher(&common_dir).await;
        let mut child = daemon_command(&launcher, &common_dir, &listen, port)
            .spawn()
            .map_err(DaemonError::Spawn)?;
        record_pid(&common_dir, &child);
        if !wait_serving(&common_dir, listen_host(&listen), port, &git_path).await {
            kill_group(&child);
            let _ = child.kill().await;
            return Err(DaemonError::NotReady { port });
        }
        tracing::info!(port, "git daemon serving {}", common_dir.display());
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(
            child,
            launcher,
            common_dir,
            listen,
            port,
            stop.clone(),
        ));
        Ok(Self {
            port,
            git_path,
            stop,
            supervisor,
        })
    }

    /// Stops the daemon and waits for it to be gone.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.supervisor.await;
    }
}

fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        buildpool_core::process::kill_group(pid);
    }
}

/// Restarts the daemon whenever it exits, until `stop`; then kills its whole group.
async fn supervise(
    mut child: tokio::process::Child,
    launcher: Launcher,
    common_dir: PathBuf,
    listen: String,
    port: u16,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                kill_group(&child);
                let _ = child.wait().await;
                let _ = std::fs::remove_file(pid_file(&common_dir));
                return;
            }
            status = child.wait() => {
                kill_group(&child);
                tracing::warn!("git daemon exited ({status:?}); restarting");
            }
        }
        // Keep trying: agents cannot fetch without it.
        child = loop {
            tokio::select! {
                () = tokio::time::sleep(RESTART_DELAY) => {}
                () = stop.cancelled() => return,
            }
            match daemon_command(&launcher, &common_dir, &listen, port).spawn() {
                Ok(next) => {
                    record_pid(&common_dir, &next);
                    break next;
                }
                Err(error) => tracing::error!("cannot restart git daemon: {error}"),
            }
        };
    }
}
