//! Test harness: a fixture cargo workspace in a temporary git repository, and real
//! `buildpool serve` / `build-agent` processes around it on 127.0.0.1 with port 0.
//!
//! Every process is started in its own process group and killed, group and all, when its
//! owner is dropped, so a failing test leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod fixture;
pub mod redis;

pub use fixture::Fixture;

/// The directory holding the workspace's binaries, built once per test process.
///
/// Integration tests of this crate cannot name other packages' binaries, so the harness
/// builds them with the cargo that runs the tests (a no-op when they are up to date).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut command = Command::new(cargo);
        command
            .args([
                "build",
                "--quiet",
                "--bins",
                "-p",
                "buildpool-coordinator",
                "-p",
                "build-agent",
                "--manifest-path",
            ])
            .arg(&manifest);
        if !cfg!(debug_assertions) {
            command.arg("--release");
        }
        let status = command.status().expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>
        let dir = exe.parent().expect("target dir");
        if dir.ends_with("deps") {
            dir.parent().expect("profile dir").to_owned()
        } else {
            dir.to_owned()
        }
    })
}

pub fn buildpool_bin() -> PathBuf {
    bin_dir().join("buildpool")
}

pub fn agent_bin() -> PathBuf {
    bin_dir().join("build-agent")
}

/// A child process whose whole process group dies with this value.
#[derive(Debug)]
pub struct Owned {
    child: Child,
    pub log: PathBuf,
}

impl Owned {
    /// Spawns `command` in a new process group with stdout and stderr going to `log`.
    pub fn spawn(mut command: Command, log: PathBuf) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let file = std::fs::File::create(&log)?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal to the process (not its group).
    pub fn signal(&self, signal: i32) {
        signal_pid(self.child.id() as i32, signal);
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process group at once (like `kill -9`) and reaps the process.
    pub fn kill_hard(&mut self) {
        signal_pid(-(self.child.id() as i32), SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        if let Ok(None) = self.child.try_wait() {
            signal_pid(group, SIGTERM);
            if self.wait_timeout(Duration::from_secs(5)).is_none() {
                signal_pid(group, SIGKILL);
            }
        }
        signal_pid(group, SIGKILL);
        let _ = self.child.wait();
    }
}

pub const SIGINT: i32 = 2;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
pub const SIGCONT: i32 = 18;
pub const SIGSTOP: i32 = 19;

/// `kill(pid, signal)`; a negative pid is a process group. The `kill` command does the
/// syscall, so the harness needs no unsafe code.
pub fn signal_pid(pid: i32, signal: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A coordinator process serving a fixture, plus the agents connected to it.
#[derive(Debug)]
pub struct Cluster {
    pub fixture: Fixture,
    pub coordinator: Owned,
    pub agents: Vec<Owned>,
    pub websocket_addr: String,
    pub git_daemon_port: u16,
    /// The coordinator certificate's fingerprint, as agents pin it.
    pub tls_fingerprint: String,
    /// Arguments every agent of this cluster gets (unless a test passes its own).
    pub agent_args: Vec<String>,
}

/// The repository's URL through the tunnel (the proxy command ignores the host).
pub const TUNNEL_REPO_URL: &str = "git://buildpool-tunnel/.git";

/// A TLS stream to a coordinator's bus port.
pub type RawTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A coordinator process that wrote its discovery file.
struct Started {
    coordinator: Owned,
    websocket_addr: String,
    git_daemon_port: u16,
    tls_fingerprint: String,
}

/// How to start a coordinator in tests.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// `[build_pool]` TOML written to a config file, e.g. shorter heartbeats.
    pub config: Option<String>,
    /// Fixed ports (to restart a coordinator where it was); 0 picks free ones.
    pub websocket_port: u16,
    pub git_daemon_port: u16,
    /// Another fixture's token file, so one agent can serve several coordinators.
    pub token_file: Option<PathBuf>,
    /// More `buildpool serve` arguments.
    pub extra_args: Vec<String>,
    /// More arguments for every agent the cluster starts, e.g. [`UNSANDBOXED`].
    pub agent_args: Vec<String>,
    /// Environment of `buildpool serve`, e.g. a `NOTIFY_SOCKET`.
    pub env: Vec<(String, String)>,
}

/// Agent arguments for tests that watch a job from the host: the fixture's sleeping tests
/// write pid and start files outside their workspace, which the sandbox (rightly) forbids,
/// and a pid from inside the sandbox's PID namespace means nothing outside it.
pub const UNSANDBOXED: [&str; 2] = ["--sandbox", "none"];

impl ServeOptions {
    /// Default options with agents that run jobs unsandboxed; see [`UNSANDBOXED`].
    pub fn unsandboxed() -> Self {
        Self {
            agent_args: UNSANDBOXED.map(str::to_owned).to_vec(),
            ..Self::default()
        }
    }
}

impl Cluster {
    /// Starts a coordinator for `fixture` with `agents` build agents of `slots` slots each.
    pub fn start(fixture: Fixture, agents: usize, slots: u32) -> anyhow::Result<Self> {
        Self::start_with(fixture, agents, slots, &ServeOptions::default())
    }

    fn serve_command(fixture: &Fixture, options: &ServeOptions) -> anyhow::Result<Command> {
        let mut command = Command::new(buildpool_bin());
        command
            .arg("-C")
            .arg(fixture.root())
            .args(["serve", "--websocket-listen-addr", "127.0.0.1"])
            .args(["--websocket-port", &options.websocket_port.to_string()])
            .args(["--git-daemon-port", &options.git_daemon_port.to_string()]);
        if let Some(config) = &options.config {
            let path = fixture.scratch().join("coordinator.toml");
            std::fs::write(&path, config)?;
            command.arg("--config").arg(path);
        }
        if let Some(token_file) = &options.token_file {
            command.arg("--token-file").arg(token_file);
        }
        command.args(&options.extra_args);
        fixture.apply_env(&mut command);
        command.envs(options.env.iter().map(|(name, value)| (name, value)));
        Ok(command)
    }

    /// Starts a coordinator process for `fixture` and waits for its discovery file.
    fn spawn_coordinator(fixture: &Fixture, options: &ServeOptions) -> anyhow::Result<Started> {
        let command = Self::serve_command(fixture, options)?;
        let log = fixture
            .scratch()
            .join(format!("coordinator-{}.log", fastrand_suffix()));
        let coordinator = Owned::spawn(command, log)?;
        let discovery = fixture.root().join(".git/buildpool/coordinator.json");
        let mut found = None;
        let ready = wait_until(Duration::from_secs(20), || {
            found = std::fs::read_to_string(&discovery)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .filter(|value| value["pid"].as_u64() == Some(u64::from(coordinator.pid())));
            found.is_some()
        });
        if !ready {
            bail!("coordinator did not start:\n{}", coordinator.log_text());
        }
        let found = found.context("discovery")?;
        let websocket_addr = found["websocket_addr"]
            .as_str()
            .context("websocket_addr")?
            .to_owned();
        let git_daemon_port = found["git_daemon_port"].as_u64().context("git port")? as u16;
        let tls_fingerprint = found["tls_fingerprint"]
            .as_str()
            .context("tls_fingerprint")?
            .to_owned();
        Ok(Started {
            coordinator,
            websocket_addr,
            git_daemon_port,
            tls_fingerprint,
        })
    }

    /// Starts a coordinator as `options` say, with `agents` agents of `slots` slots.
    pub fn start_with(
        fixture: Fixture,
        agents: usize,
        slots: u32,
        options: &ServeOptions,
    ) -> anyhow::Result<Self> {
        let started = Self::spawn_coordinator(&fixture, options)?;
        let mut cluster = Self {
            fixture,
            coordinator: started.coordinator,
            agents: Vec::new(),
            websocket_addr: started.websocket_addr,
            git_daemon_port: started.git_daemon_port,
            tls_fingerprint: started.tls_fingerprint,
            agent_args: options.agent_args.clone(),
        };
        for index in 0..agents {
            cluster.add_agent(&format!("worker-{}", index + 1), slots, &[])?;
        }
        Ok(cluster)
    }

    /// The job bus URL agents connect to.
    pub fn bus_url(&self) -> String {
        format!("wss://{}/ws", self.websocket_addr)
    }

    /// Sets up `git` (a command the caller completes with `TUNNEL_REPO_URL`) to reach this
    /// coordinator's repository through its authenticated tunnel, as an agent's fetch does:
    /// `build-agent git-proxy` as the proxy command, presenting `credential`.
    pub fn through_tunnel(&self, git: &mut Command, credential: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let wrapper = self.fixture.scratch().join("git-proxy");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec '{}' git-proxy \"$@\"\n",
                agent_bin().display()
            ),
        )?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        git.env("GIT_PROXY_COMMAND", wrapper)
            .env("BUILDPOOL_TUNNEL_SERVER", self.bus_url())
            .env("BUILDPOOL_TUNNEL_FINGERPRINT", &self.tls_fingerprint)
            .env("BUILDPOOL_TOKEN", credential)
            .env("GIT_TERMINAL_PROMPT", "0");
        Ok(())
    }

    /// A raw WebSocket to `path` on the bus port, over TLS with the coordinator pinned: for
    /// tests that speak the wire protocol themselves.
    pub async fn raw_websocket(
        &self,
        path: &str,
    ) -> anyhow::Result<tokio_tungstenite::WebSocketStream<RawTls>> {
        let stream = self.raw_tls().await?;
        let url = format!("wss://{}{path}", self.websocket_addr);
        let (socket, _) = tokio_tungstenite::client_async(url, stream).await?;
        Ok(socket)
    }

    /// A TLS connection to the bus port, coordinator pinned, nothing sent yet.
    pub async fn raw_tls(&self) -> anyhow::Result<RawTls> {
        use buildpool_proto::tls;
        let trust = tls::ServerTrust::Pinned(self.tls_fingerprint.parse()?);
        let config = tls::client_config(&trust, None, &[])?;
        let tcp = tokio::net::TcpStream::connect(&self.websocket_addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        Ok(tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?)
    }

    /// Starts the coordinator again on the same ports (after it was killed).
    pub fn restart_coordinator(&mut self, options: &ServeOptions) -> anyhow::Result<()> {
        let port = self
            .websocket_addr
            .rsplit(':')
            .next()
            .context("port")?
            .parse()?;
        let options = ServeOptions {
            websocket_port: port,
            git_daemon_port: self.git_daemon_port,
            ..options.clone()
        };
        let started = Self::spawn_coordinator(&self.fixture, &options)?;
        self.coordinator = started.coordinator;
        Ok(())
    }

    /// The command for a build agent with its own cache and workspaces under the scratch dir.
    pub fn agent_command(&self, id: &str, slots: u32, extra: &[&str]) -> Command {
        self.agent_command_in(&self.fixture.scratch().join(id), id, slots, extra)
    }

    /// [`Cluster::agent_command`] with the agent's caches and workspaces under `dir`.
    pub fn agent_command_in(&self, dir: &Path, id: &str, slots: u32, extra: &[&str]) -> Command {
        let mut command = Command::new(agent_bin());
        if !extra.contains(&"--server") {
            command.args(["--server", &self.bus_url()]);
        }
        let plain = extra.iter().any(|arg| arg.starts_with("ws://"));
        if !plain && !extra.contains(&"--tls-fingerprint") {
            command.args(["--tls-fingerprint", &self.tls_fingerprint]);
        }
        command.args(["--id", id, "--jobs", &slots.to_string()]);
        if !extra.contains(&"--token-file") {
            command.arg("--token-file").arg(self.fixture.token_file());
        }
        command
            .arg("--git-cache-dir")
            .arg(dir.join("cache"))
            .arg("--worktree-dir")
            .arg(dir.join("workspaces"))
            .args(extra)
            .args(
                self.agent_args
                    .iter()
                    .filter(|_| !extra.contains(&"--sandbox")),
            )
            .env_remove("BUILDPOOL_TOKEN")
            .env("NIX_CONFIG", fixture::NIX_CONFIG);
        command
    }

    /// Starts an agent and waits until the coordinator lists it.
    pub fn add_agent(&mut self, id: &str, slots: u32, extra: &[&str]) -> anyhow::Result<()> {
        let command = self.agent_command(id, slots, extra);
        self.add_agent_by(id, command)
    }

    /// Starts agent `id` by `command` (an [`Cluster::agent_command`] the caller changed)
    /// and waits until the coordinator lists it.
    pub fn add_agent_by(&mut self, id: &str, command: Command) -> anyhow::Result<()> {
        let agent = Owned::spawn(command, self.fixture.scratch().join(format!("{id}.log")))?;
        let listed = wait_until(Duration::from_secs(20), || {
            self.agent_ids().iter().any(|a| a == id)
        });
        if !listed {
            bail!(
                "agent {id} did not register:\n{}\ncoordinator:\n{}",
                agent.log_text(),
                self.coordinator.log_text()
            );
        }
        self.agents.push(agent);
        Ok(())
    }

    /// `buildpool status --json`.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let output = self.fixture.buildpool(&["status", "--json"])?;
        if !output.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// Ids of the connected non-local agents.
    pub fn agent_ids(&self) -> Vec<String> {
        self.status()
            .map(|status| {
                status["agents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|agent| agent["local"] == false)
                    .filter_map(|agent| agent["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Cluster {
    /// The coordinator's dashboard and metrics URL, from its discovery file.
    /// Jobs the coordinator was given so far, from its metrics.
    pub fn jobs_submitted(&self) -> u64 {
        let url = format!("{}/metrics", self.http_url().expect("http url"));
        let (status, body) = http_get(&url).expect("metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|line| line.starts_with("buildpool_jobs_submitted_total"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    pub fn http_url(&self) -> anyhow::Result<String> {
        let discovery = self.fixture.root().join(".git/buildpool/coordinator.json");
        let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(discovery)?)?;
        Ok(value["http_url"]
            .as_str()
            .context("no http_url")?
            .to_owned())
    }
}

/// `GET url` over plain HTTP/1.0 (the connection closes after the answer, so the body
/// is whatever follows the headers): `(status, body)`.
pub fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("http:// URLs only")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status")?;
    Ok((status, body.to_owned()))
}

/// The result of a `buildpool` invocation, with text for assertions.
#[derive(Debug)]
pub struct RunOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for RunOutput {
    fn from(output: Output) -> Self {
        Self {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for RunOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Every `test result:` line of `stdout` added up: whether all said `ok`, and the
/// `[passed, failed, ignored]` counts over them.
pub fn test_totals(stdout: &str) -> (bool, [u64; 3]) {
    let mut total = [0; 3];
    let mut ok = true;
    for line in stdout.lines().filter(|l| l.starts_with("test result:")) {
        ok &= line.starts_with("test result: ok.");
        for (slot, word) in total.iter_mut().zip(["passed", "failed", "ignored"]) {
            *slot += line
                .split([';', '.'])
                .find_map(|part| part.trim().strip_suffix(&format!(" {word}")))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (ok, total)
}

/// The summary line of each test binary, without its timing: what "the same tests ran
/// with the same results" means for two runs.
pub fn test_counts(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|line| line.starts_with("test result:"))
        .map(|line| {
            line.split("; finished in")
                .next()
                .unwrap_or(line)
                .to_owned()
        })
        .collect()
}

/// `cargo <args>` run locally in `dir`, as the agent's shell would without buildpool.
pub fn local_cargo(dir: &Path, args: &[&str]) -> RunOutput {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cargo runs");
    out.into()
}

/// A Bash PreToolUse event as Claude Code sends it to a hook, for `command` typed in `cwd`
/// (the sample the hook's unit tests use).
pub fn bash_event(command: &str, cwd: &Path) -> String {
    let mut event: serde_json::Value =
        serde_json::from_str(include_str!("pre_tool_use_bash.json")).expect("the sample is JSON");
    event["tool_input"]["command"] = serde_json::json!(command);
    event["cwd"] = serde_json::json!(cwd);
    event.to_string()
}

/// Runs the real `buildpool hook claude` with `event` on its stdin, as Claude Code does.
pub fn run_hook(event: &str, env: &[(&str, &str)]) -> anyhow::Result<RunOutput> {
    use std::io::Write;
    let mut child = Command::new(buildpool_bin())
        .args(["hook", "claude"])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(event.as_bytes())?;
    Ok(child.wait_with_output()?.into())
}

/// The directory holding `program` on `PATH`.
pub fn dir_of_program(program: &str) -> Option<PathBuf> {
    buildpool_core::process::find_on_path(program).and_then(|path| path.parent().map(PathBuf::from))
}

/// A short random suffix for log file names (restarted processes get new logs).
fn fastrand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed).to_string()
}

/// A TCP proxy for cutting a connection without closing it: after [`Proxy::cut`], the
/// connections open until then go silent (bytes are swallowed, sockets stay open, like a
/// half-open link); connections made afterwards are forwarded normally.
#[derive(Debug)]
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    frozen_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub fn start(upstream: &str) -> anyhow::Result<Self> {
        use std::io::{Read, Write};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let frozen_below = Arc::new(AtomicU64::new(0));
        let next_id = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_owned();
        let (frozen, ids) = (Arc::clone(&frozen_below), Arc::clone(&next_id));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let id = ids.fetch_add(1, Ordering::SeqCst);
                for (mut from, mut to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    let frozen = Arc::clone(&frozen);
                    std::thread::spawn(move || {
                        let mut buffer = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buffer) {
                            if n == 0 {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            if id >= frozen.load(Ordering::SeqCst)
                                && to.write_all(&buffer[..n]).is_err()
                            {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Ok(Self {
            addr,
            frozen_below,
            next_id,
        })
    }

    /// Silences every connection open now.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.frozen_below
            .store(self.next_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// The job bus URL through this proxy (TLS passes through it untouched).
    pub fn bus_url(&self) -> String {
        format!("wss://{}/ws", self.addr)
    }
}
