//! `buildpool demo`: the real path on loopback, on an embedded sample workspace, with
//! nothing to configure.
//!
//! Writes a two-crate cargo workspace into a temporary git repository with a second
//! worktree, each with an uncommitted test file of its own (the snapshot carries it). Then
//! it starts what a user runs: a coordinator (job bus over TLS with its generated
//! certificate, git daemon, dashboard), and a `build-agent` *process* that pins that
//! certificate, sandboxed with bubblewrap where it can start. Its embedded local agent is
//! off, so the jobs must go through the agent. `cargo test` runs in the first worktree,
//! then in the second, which the agent serves from the same warm slot.
//!
//! The agent is this very binary started through a link named `build-agent`
//! ([`build_agent::cli`]), so the demo needs nothing installed beside `buildpool`.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use build_agent::sandbox::{JobUser, Sandbox, SandboxMode};
use buildpool_core::git::Git;
use buildpool_core::status::AgentStatus;
use clap::Args;

use super::run::{self, RunArgs};
use crate::client::Client;
use crate::config::CoordinatorConfig;
use crate::discovery;
use crate::repo::Repo;
use crate::server::Coordinator;

const FILES: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        "[workspace]\nresolver = \"2\"\nmembers = [\"app\", \"util\"]\n",
    ),
    (".gitignore", "/target\n"),
    (
        "util/Cargo.toml",
        "[package]\nname = \"util\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    ),
    (
        "util/src/lib.rs",
        "/// Doubles a number.\npub fn double(x: i32) -> i32 {\n    x * 2\n}\n",
    ),
    (
        "app/Cargo.toml",
        "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\nutil = { path = \"../util\" }\n",
    ),
    (
        "app/src/lib.rs",
        "/// Quadruples a number.\npub fn quadruple(x: i32) -> i32 {\n    util::double(util::double(x))\n}\n\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn quadruples() {\n        assert_eq!(super::quadruple(2), 8);\n    }\n}\n",
    ),
];

/// Uncommitted in the first worktree when its job runs: the snapshot includes it anyway.
const UNCOMMITTED: (&str, &str) = (
    "app/tests/uncommitted.rs",
    "#[test]\nfn uncommitted_files_are_built_too() {\n    assert_eq!(app::quadruple(1), 4);\n}\n",
);

/// Uncommitted in the second worktree: each worktree's job sees its own files.
const SECOND_UNCOMMITTED: (&str, &str) = (
    "app/tests/second_worktree.rs",
    "#[test]\nfn each_worktree_runs_its_own_files() {\n    assert_eq!(app::quadruple(3), 12);\n}\n",
);

/// The demo agent's name, as the coordinator and its dashboard show it.
const AGENT_ID: &str = "demo-agent";

/// How long the agent gets to connect, and to drain and exit at the end.
const AGENT_START: Duration = Duration::from_secs(30);
const AGENT_STOP: Duration = Duration::from_secs(20);

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the sample repository instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// After the jobs, keep the coordinator and agent running (for the dashboard) until
    /// Ctrl-C.
    #[arg(long)]
    stay: bool,
}

async fn write(root: &Path, (path, text): (&str, &str)) -> anyhow::Result<()> {
    let path = root.join(path);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::write(&path, text)
        .await
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the sample repository under `dir` and adds a second worktree beside it; returns
/// both worktrees.
async fn sample(dir: &Path) -> anyhow::Result<[PathBuf; 2]> {
    // A fixed directory name and commit date give every demo the same repository id, so
    // repeated demos reuse one warm workspace instead of leaving a new one each time.
    let first = dir.join("sample");
    let second = dir.join("sample-2");
    for file in FILES {
        write(&first, *file).await?;
    }
    Git::new(&first)
        .args(["init", "--quiet", "-b", "main"])
        .output()
        .await?;
    Git::new(&first).args(["add", "."]).output().await?;
    Git::new(&first)
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .args(["commit", "--quiet", "-m", "sample workspace"])
        .output()
        .await?;
    Git::new(&first)
        .args(["worktree", "add", "--quiet", "--detach"])
        .arg(&second)
        .output()
        .await?;
    write(&first, UNCOMMITTED).await?;
    write(&second, SECOND_UNCOMMITTED).await?;
    Ok([first, second])
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("buildpool-demo-")
        .tempdir()?;
    let worktrees = sample(dir.path()).await?;
    say(format_args!(
        "sample workspace at {}, a second worktree at {} (each with an uncommitted test file \
         of its own)",
        worktrees[0].display(),
        worktrees[1].display()
    ));
    let pool = DemoPool::start(&worktrees[0], dir.path()).await?;
    let outcome = pool.run_jobs(&worktrees).await;
    if args.stay && outcome.is_ok() {
        say(format_args!(
            "the coordinator and {AGENT_ID} keep running; Ctrl-C stops them"
        ));
        match run::Stops::new() {
            Ok(mut stops) => stops.next().await,
            Err(error) => say(format_args!("cannot wait for Ctrl-C ({error}); stopping")),
        }
    }
    pool.stop().await;
    if args.keep {
        let kept = dir.keep();
        say(format_args!("kept {}", kept.display()));
    }
    outcome
}

/// A line of the demo's own, told apart from the jobs' output and `[buildpool]` notes.
fn say(text: std::fmt::Arguments<'_>) {
    eprintln!("[demo] {text}");
}

/// The demo's coordinator, in this process, and its build agent, a process of its own.
struct DemoPool {
    coordinator: Coordinator,
    repo: Repo,
    agent: tokio::process::Child,
    agent_log: PathBuf,
}

impl DemoPool {
    /// Starts the coordinator for the repository of `worktree` and an agent connected to
    /// it; `dir` holds the token, the link the agent runs as and its log.
    async fn start(worktree: &Path, dir: &Path) -> anyhow::Result<Self> {
        let repo = Repo::discover(worktree).await?;
        let token_file = dir.join("token");
        // BUILDPOOL_TOKEN wins over the file, as it does for every client: the agent then
        // gets the same value through the file.
        let token = crate::auth::load(&token_file, true)?;
        if token.file.is_none() {
            crate::atomic_file::write(&token_file, format!("{}\n", token.value).as_bytes(), 0o600)?;
        }
        let config = CoordinatorConfig::demo(token_file.clone())?;
        let coordinator = Coordinator::start(repo.clone(), config, token.clone()).await?;
        let (agent, agent_log) = match start_agent(&coordinator, &repo, &token, dir).await {
            Ok(started) => started,
            Err(error) => {
                discovery::remove(&repo.state_dir(), coordinator.id());
                coordinator.shutdown().await;
                return Err(error);
            }
        };
        let mut pool = Self {
            coordinator,
            repo,
            agent,
            agent_log,
        };
        match pool.wait_for_agent(&token.value).await {
            Ok(agent) => {
                say(format_args!(
                    "{} connected: {} slot, {}",
                    agent.id,
                    agent.slots_total,
                    if agent.sandboxed {
                        "jobs sandboxed (bubblewrap)"
                    } else {
                        "jobs unsandboxed"
                    }
                ));
                Ok(pool)
            }
            Err(error) => {
                pool.stop().await;
                Err(error)
            }
        }
    }

    /// The agent once the coordinator counts it connected; fails, with the end of the
    /// agent's log, when it exits or takes too long.
    async fn wait_for_agent(&mut self, token: &str) -> anyhow::Result<AgentStatus> {
        let url = format!("http://{}", self.coordinator.control_addr);
        let client = Client::connect(&url, token, None).await?;
        let deadline = Instant::now() + AGENT_START;
        loop {
            if let Some(agent) = client
                .status()
                .await?
                .agents
                .into_iter()
                .find(|agent| agent.id == AGENT_ID)
            {
                return Ok(agent);
            }
            if let Some(status) = self.agent.try_wait()? {
                bail!(
                    "the build agent exited ({status}) before it connected:\n{}",
                    log_tail(&self.agent_log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the build agent did not connect within {AGENT_START:?}:\n{}",
                    log_tail(&self.agent_log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `cargo test` in each worktree, one after the other, as `buildpool run test` runs it;
    /// the exit code is the first failure's, else success.
    async fn run_jobs(&self, worktrees: &[PathBuf; 2]) -> anyhow::Result<ExitCode> {
        let mut took = Vec::new();
        for (number, worktree) in worktrees.iter().enumerate() {
            say(format_args!(
                "worktree {}: buildpool run test{}",
                number + 1,
                if number == 0 {
                    ""
                } else {
                    " (the same slot, warm from the job before)"
                }
            ));
            let started = Instant::now();
            let code = run::run(worktree, RunArgs::test()).await?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
            took.push(started.elapsed());
        }
        say(format_args!(
            "worktree 1 took {:.1} s, worktree 2 {:.1} s; both ran on {AGENT_ID}",
            took[0].as_secs_f64(),
            took[1].as_secs_f64()
        ));
        Ok(ExitCode::SUCCESS)
    }

    /// Asks the agent to drain and exit (SIGTERM), kills its group if it does not, then
    /// stops the coordinator.
    async fn stop(mut self) {
        if let Some(pid) = self.agent.id().and_then(|pid| i32::try_from(pid).ok()) {
            buildpool_core::process::terminate_group(pid);
            if tokio::time::timeout(AGENT_STOP, self.agent.wait())
                .await
                .is_err()
            {
                buildpool_core::process::kill_group(pid);
                let _ = self.agent.wait().await;
            }
        }
        discovery::remove(&self.repo.state_dir(), self.coordinator.id());
        self.coordinator.shutdown().await;
    }
}

/// Makes the demo's coordinator findable (its discovery file), says where it listens, and
/// starts the agent process; returns it with its log's path.
async fn start_agent(
    coordinator: &Coordinator,
    repo: &Repo,
    token: &crate::auth::Token,
    dir: &Path,
) -> anyhow::Result<(tokio::process::Child, PathBuf)> {
    discovery::write(
        &repo.state_dir(),
        &super::serve::discovery_record(coordinator, token, false),
    )
    .context("cannot write the discovery file")?;
    let (Some(bus), Some(fingerprint)) =
        (coordinator.websocket_addr(), coordinator.tls_fingerprint())
    else {
        bail!("the demo coordinator has no job bus over TLS");
    };
    say(format_args!(
        "coordinator: job bus wss://{bus}/ws over TLS (its certificate {fingerprint}), \
         control API http://{}",
        coordinator.control_addr
    ));
    if let Some(url) = coordinator.http_url() {
        say(format_args!(
            "dashboard: {url}/ (while the demo runs; --stay keeps it up)"
        ));
    }
    let sandbox = agent_sandbox().await;
    let agent_dir = crate::config::cache_home().join("buildpool").join("demo");
    let args = agent_args(
        &format!("wss://{bus}/ws"),
        &fingerprint.to_string(),
        dir,
        &agent_dir,
        sandbox,
    )?;
    let agent_log = dir.join("build-agent.log");
    say(format_args!(
        "build agent, a process of its own: build-agent {} (log: {})",
        args.join(" "),
        agent_log.display()
    ));
    let agent = spawn_agent(dir, &args, &agent_log)?;
    Ok((agent, agent_log))
}

/// The agent's command line: the demo's coordinator pinned by its fingerprint, its token
/// and an empty config file in `dir` (so a build host's `/etc/build-agent` config stays
/// out), one slot, and its workspaces and git cache kept in `state` across demos (so later
/// demos start warm).
fn agent_args(
    server: &str,
    fingerprint: &str,
    dir: &Path,
    state: &Path,
    sandbox: SandboxMode,
) -> anyhow::Result<Vec<String>> {
    let config = dir.join("build-agent.toml");
    std::fs::write(
        &config,
        "# buildpool demo: every setting is on the command line\n",
    )?;
    let args = [
        ("--server", server.to_owned()),
        ("--tls-fingerprint", fingerprint.to_owned()),
        ("--token-file", dir.join("token").display().to_string()),
        ("--config", config.display().to_string()),
        ("--id", AGENT_ID.to_owned()),
        ("--jobs", "1".to_owned()),
        ("--git-cache-dir", state.join("repos").display().to_string()),
        (
            "--worktree-dir",
            state.join("workspaces").display().to_string(),
        ),
        ("--drain-timeout", "10".to_owned()),
        (
            "--sandbox",
            match sandbox {
                SandboxMode::Bwrap => "bwrap",
                SandboxMode::None => "none",
            }
            .to_owned(),
        ),
    ];
    Ok(args
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect())
}

/// Starts the agent: this binary through a link named `build-agent` in `dir`, in a process
/// group of its own (Ctrl-C cancels the job through the client, and the demo stops the
/// agent after), with a parent-death signal where setpriv is there, so that it drains and
/// exits even when the demo is killed.
fn spawn_agent(dir: &Path, args: &[String], log: &Path) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("cannot tell where this buildpool is")?;
    let link = dir.join("bin").join(build_agent::cli::PROGRAM_NAME);
    std::fs::create_dir_all(dir.join("bin"))?;
    std::os::unix::fs::symlink(&exe, &link)
        .with_context(|| format!("cannot link {} to {}", link.display(), exe.display()))?;
    let mut command = match buildpool_core::process::parent_death_signal_prefix("TERM") {
        Some(prefix) => {
            let mut command = tokio::process::Command::new(&prefix[0]);
            command.args(&prefix[1..]).arg(&link);
            command
        }
        None => tokio::process::Command::new(&link),
    };
    let output =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    command
        .args(args)
        .env_remove(build_agent::config::TOKEN_ENV)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output)
        .process_group(0)
        .kill_on_drop(true);
    command.spawn().context("cannot start the build agent")
}

/// bubblewrap when a sandbox can start here and its jobs can reach the toolchain, else
/// none, saying why.
async fn agent_sandbox() -> SandboxMode {
    let sandbox = Sandbox::new(SandboxMode::Bwrap, true, Vec::new());
    if let Err(error) = sandbox.probe().await {
        say(format_args!("jobs run unsandboxed: {error}"));
        return SandboxMode::None;
    }
    // A root agent runs its jobs as `nobody`, who must be able to run cargo.
    if let Some(user) = sandbox.job_user()
        && let Some(blocked) = build_agent::sandbox::find_on_path("cargo")
            .and_then(|cargo| closed_to_others(&cargo, user))
    {
        say(format_args!(
            "jobs run unsandboxed: as root the sandbox runs them as uid {}, who cannot enter \
             {} to reach cargo (`chmod o+x {}` lets it)",
            user.uid,
            blocked.display(),
            blocked.display()
        ));
        return SandboxMode::None;
    }
    SandboxMode::Bwrap
}

/// The first directory above `path` (its link's and its target's) that `user` cannot
/// enter, going by the bits for others.
fn closed_to_others(path: &Path, user: JobUser) -> Option<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let target = path.canonicalize().ok();
    [Some(path), target.as_deref()]
        .into_iter()
        .flatten()
        .flat_map(|path| path.ancestors().skip(1))
        .filter_map(|dir| Some((dir, dir.metadata().ok()?)))
        .find(|(_, meta)| {
            meta.uid() != user.uid
                && meta.gid() != user.gid
                && meta.permissions().mode() & 0o001 == 0
        })
        .map(|(dir, _)| dir.to_owned())
}

/// The last lines of the agent's log, for an error that says why it did not connect.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
