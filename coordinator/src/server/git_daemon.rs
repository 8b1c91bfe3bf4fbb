//! Supervision of `git daemon`, which serves the repository's snapshots to agents.
//!
//! The daemon exports exactly one directory (the repository's common git dir) thanks to
//! `--strict-paths` with that single directory whitelisted. It runs in its own process group,
//! is restarted if it dies, is killed with its whole group when the coordinator stops, and
//! is killed by the kernel when the coordinator dies (parent-death signal, see
//! [`launcher`]).
//!
//! It offers snapshots only. An agent credential is for running jobs, and a job's snapshot
//! is all an agent needs; the repository's branches, tags and stash (work in progress, a
//! private branch) are no business of a build host's. So upload-pack advertises only the
//! refs under [`SNAPSHOT_REF_PREFIX`] and serves only what they reach
//! ([`UPLOAD_PACK_CONFIG`]), and a tunnelled request is made to speak protocol v0, whose
//! wants upload-pack checks against what it advertised ([`RequestFilter`]).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::snapshot::SNAPSHOT_REF_PREFIX;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const RESTART_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start git daemon: {0}")]
    Spawn(io::Error),
    #[error(
        "git daemon did not start listening on port {port} within {READY_TIMEOUT:?} (port in use by another repository's coordinator?); set git_daemon_port or --git-daemon-port"
    )]
    NotReady { port: u16 },
    #[error("cannot find a free port for git daemon: {0}")]
    NoPort(io::Error),
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

/// upload-pack's configuration: everything hidden (`refs/`, and `HEAD`, which is no ref
/// under `refs/`), then the snapshots shown again (a later `hideRefs` entry overrides an
/// earlier one; `!` un-hides). Wants by object id are allowed only for advertised tips:
/// git's defaults, restated so that no repository or user configuration can widen them.
/// The snapshots' history (their base commits) is served as what they reach.
const UPLOAD_PACK_CONFIG: [(&str, &str); 5] = [
    ("uploadpack.hideRefs", "refs/"),
    ("uploadpack.hideRefs", "HEAD"),
    ("uploadpack.allowTipSHA1InWant", "false"),
    ("uploadpack.allowReachableSHA1InWant", "false"),
    ("uploadpack.allowAnySHA1InWant", "false"),
];

/// [`UPLOAD_PACK_CONFIG`] and the snapshots shown again, as `GIT_CONFIG_*` variables: git
/// daemon passes its environment to each `git upload-pack` it runs, and configuration given
/// this way comes after every file's, so it wins. Entries the coordinator inherited stay,
/// before these.
fn upload_pack_env() -> Vec<(String, String)> {
    let inherited = std::env::var("GIT_CONFIG_COUNT")
        .ok()
        .and_then(|count| count.parse::<usize>().ok())
        .unwrap_or(0);
    let shown = format!("!{SNAPSHOT_REF_PREFIX}");
    let entries = UPLOAD_PACK_CONFIG
        .into_iter()
        .chain([("uploadpack.hideRefs", shown.as_str())]);
    let mut env = Vec::new();
    let mut count = inherited;
    for (key, value) in entries {
        env.push((format!("GIT_CONFIG_KEY_{count}"), key.to_owned()));
        env.push((format!("GIT_CONFIG_VALUE_{count}"), value.to_owned()));
        count += 1;
    }
    env.push(("GIT_CONFIG_COUNT".to_owned(), count.to_string()));
    env
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
    let prefix = buildpool_core::process::parent_death_signal_prefix("KILL");
    let exec_path = buildpool_core::git::Git::new(common_dir)
        .arg("--exec-path")
        .output()
        .await;
    match (prefix, exec_path) {
        (Some(mut args), Ok(exec_path)) => {
            let program = args.remove(0);
            args.push(Path::new(&exec_path).join("git-daemon").into());
            Launcher { program, args }
        }
        (prefix, exec_path) => {
            tracing::warn!(
                "git daemon runs without a parent-death signal (setpriv: {}, git --exec-path: {}); \
                 it outlives a coordinator that is killed with SIGKILL",
                if prefix.is_some() { "found" } else { "missing" },
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
        .envs(upload_pack_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    command
}

/// Why a tunnelled request never reached the daemon.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the git request does not start with a pkt-line length: {0:?}")]
    Length(String),
    #[error("the git tunnel serves fetches (git-upload-pack) only, not {0:?}")]
    NotUploadPack(String),
}

/// The longest pkt-line git sends (`LARGE_PACKET_MAX`).
const MAX_PKT_LEN: usize = 65520;
const UPLOAD_PACK: &[u8] = b"git-upload-pack ";

/// The length a request's 4-hex-digit `header` announces, itself included: room for a
/// command, and no more than git sends.
fn pkt_len(header: &[u8]) -> Result<usize, RequestError> {
    let len = std::str::from_utf8(header)
        .ok()
        .filter(|text| text.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|text| usize::from_str_radix(text, 16).ok());
    match len {
        Some(len) if len > UPLOAD_PACK.len() + 4 && len <= MAX_PKT_LEN => Ok(len),
        _ => Err(RequestError::Length(
            String::from_utf8_lossy(header).into_owned(),
        )),
    }
}

/// The git daemon request `line` (a whole pkt-line: `git-upload-pack <path>\0host=<host>\0`,
/// then maybe `\0version=2\0` and other extra parameters) without its extra parameters.
///
/// git daemon hands a requested protocol version to upload-pack, and in protocol v2 a
/// `fetch` may want any object the repository holds ("wants can be anything and are not
/// limited to advertised objects", gitprotocol-v2): hidden refs would hide names, not
/// commits. Without the parameter upload-pack speaks v0, which serves only what the refs it
/// advertised reach; git clients asking for v1 or v2 fall back to it. Anything but a fetch
/// (an archive, a push) is refused, whatever the daemon would allow.
fn v0_request(line: &[u8]) -> Result<Vec<u8>, RequestError> {
    let payload = line.get(4..).unwrap_or_default();
    if !payload.starts_with(UPLOAD_PACK) {
        let command = payload
            .split(|&b| b == b' ' || b == 0)
            .next()
            .unwrap_or_default();
        return Err(RequestError::NotUploadPack(
            String::from_utf8_lossy(command).into_owned(),
        ));
    }
    let kept = match payload.iter().position(|&b| b == 0) {
        None => payload.len(),
        Some(path_end) => {
            let after = path_end + 1;
            match payload[after..].strip_prefix(b"host=") {
                Some(host) => {
                    let host_len = host
                        .iter()
                        .position(|&b| b == 0)
                        .map_or(host.len(), |end| end + 1);
                    after + "host=".len() + host_len
                }
                None => after,
            }
        }
    };
    let mut request = format!("{:04x}", kept + 4).into_bytes();
    request.extend_from_slice(&payload[..kept]);
    Ok(request)
}

/// The daemon's end of a git tunnel: the agent's first pkt-line, its request, is checked and
/// passed on as [`v0_request`] makes it; everything after it, and all the daemon says, passes
/// untouched. A request that is no fetch fails the write, which ends the tunnel.
#[derive(Debug)]
pub(crate) struct RequestFilter<S> {
    daemon: S,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Collecting the request (at most [`MAX_PKT_LEN`] bytes).
    Request(Vec<u8>),
    /// Writing the request as rewritten; `written` bytes of it are with the daemon.
    Forward { request: Vec<u8>, written: usize },
    /// git's own traffic.
    Through,
}

impl<S> RequestFilter<S> {
    pub(crate) fn new(daemon: S) -> Self {
        Self {
            daemon,
            phase: Phase::Request(Vec::new()),
        }
    }
}

fn invalid_data(error: RequestError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

impl<S: AsyncWrite + Unpin> RequestFilter<S> {
    /// Writes what is left of the rewritten request; ready once the daemon has all of it
    /// (at once before the request is whole or after it is written).
    fn poll_forward(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Phase::Forward { request, written } = &mut self.phase {
            if *written == request.len() {
                self.phase = Phase::Through;
                break;
            }
            let n = ready!(Pin::new(&mut self.daemon).poll_write(cx, &request[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RequestFilter<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Phase::Request(pending) = &mut this.phase {
            let wanted = match pending.get(..4) {
                Some(header) => pkt_len(header).map_err(invalid_data)?,
                None => 4,
            };
            let taken = buf.len().min(wanted - pending.len());
            pending.extend_from_slice(&buf[..taken]);
            if let Some(header) = pending.get(..4)
                && pending.len() == pkt_len(header).map_err(invalid_data)?
            {
                let request = v0_request(pending).map_err(invalid_data)?;
                this.phase = Phase::Forward {
                    request,
                    written: 0,
                };
            }
            return Poll::Ready(Ok(taken));
        }
        ready!(this.poll_forward(cx))?;
        Pin::new(&mut this.daemon).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_forward(cx))?;
        Pin::new(&mut this.daemon).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_forward(cx))?;
        Pin::new(&mut this.daemon).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RequestFilter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().daemon).poll_read(cx, buf)
    }
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn pkt(payload: &[u8]) -> Vec<u8> {
        let mut line = format!("{:04x}", payload.len() + 4).into_bytes();
        line.extend_from_slice(payload);
        line
    }

    #[test]
    fn a_request_loses_its_protocol_version_and_keeps_its_host() {
        let v0 = pkt(b"git-upload-pack /.git\0host=buildpool-tunnel\0");
        for asked in [
            pkt(b"git-upload-pack /.git\0host=buildpool-tunnel\0\0version=2\0"),
            pkt(b"git-upload-pack /.git\0host=buildpool-tunnel\0\0version=1\0"),
            v0.clone(),
        ] {
            assert_eq!(v0_request(&asked).expect("a fetch"), v0);
        }
        let hostless = pkt(b"git-upload-pack /.git\0");
        assert_eq!(
            v0_request(&pkt(b"git-upload-pack /.git\0\0version=2\0")).expect("a fetch"),
            hostless
        );
        for command in ["git-receive-pack", "git-upload-archive"] {
            let error =
                v0_request(&pkt(format!("{command} /.git\0").as_bytes())).expect_err("no fetch");
            assert_eq!(
                error.to_string(),
                format!("the git tunnel serves fetches (git-upload-pack) only, not {command:?}")
            );
        }
        assert!(pkt_len(b"0000").is_err(), "a flush is no request");
        assert!(pkt_len(b"+fff").is_err());
        assert!(pkt_len(b"fff1").is_err(), "longer than git sends");
        assert_eq!(pkt_len(b"0030").expect("a length"), 48);
    }

    #[tokio::test]
    async fn the_filter_rewrites_the_request_however_it_arrives_and_passes_the_rest() {
        let (daemon_end, mut daemon) = tokio::io::duplex(64 * 1024);
        let mut filter = RequestFilter::new(daemon_end);
        let request = pkt(b"git-upload-pack /.git\0host=x\0\0version=2\0");
        // The request in pieces, the last one sharing its write with what follows.
        filter.write_all(&request[..2]).await.expect("writes");
        filter.flush().await.expect("flushes");
        filter.write_all(&request[2..9]).await.expect("writes");
        let mut rest = request[9..].to_vec();
        rest.extend_from_slice(b"0009done\n");
        filter.write_all(&rest).await.expect("writes");
        filter.shutdown().await.expect("closes");
        let mut received = Vec::new();
        daemon.read_to_end(&mut received).await.expect("reads");
        let mut expected = pkt(b"git-upload-pack /.git\0host=x\0");
        expected.extend_from_slice(b"0009done\n");
        assert_eq!(received, expected);

        daemon.write_all(b"0008NAK\n").await.expect("answers");
        drop(daemon);
        let mut answer = Vec::new();
        filter.read_to_end(&mut answer).await.expect("reads");
        assert_eq!(answer, b"0008NAK\n");
    }

    #[tokio::test]
    async fn a_push_through_the_filter_never_reaches_the_daemon() {
        let (daemon_end, mut daemon) = tokio::io::duplex(1024);
        let mut filter = RequestFilter::new(daemon_end);
        let error = filter
            .write_all(&pkt(b"git-receive-pack /.git\0host=x\0"))
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        drop(filter);
        let mut received = Vec::new();
        daemon.read_to_end(&mut received).await.expect("reads");
        assert!(received.is_empty(), "{received:?}");
    }

    #[test]
    fn upload_pack_shows_snapshots_last() {
        let env = upload_pack_env();
        let value = |name: &str| {
            env.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        };
        let count: usize = value("GIT_CONFIG_COUNT")
            .expect("a count")
            .parse()
            .expect("a number");
        let last = count - 1;
        assert_eq!(
            value(&format!("GIT_CONFIG_KEY_{last}")).as_deref(),
            Some("uploadpack.hideRefs")
        );
        assert_eq!(
            value(&format!("GIT_CONFIG_VALUE_{last}")),
            Some(format!("!{SNAPSHOT_REF_PREFIX}"))
        );
    }
}
