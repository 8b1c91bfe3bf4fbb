//! The `build-agent` command line: runs buildpool jobs on a build host.
//!
//! It lives in the library so that `buildpool` can carry the agent too: a link to
//! `buildpool` named `build-agent` runs exactly this ([`invoked_by_name`]), which is how
//! `buildpool demo` starts a real agent process with nothing else installed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, AgentConfig, Environment, Overrides};
use crate::disk::DiskBudget;
use crate::executor::ExecutorConfig;
use crate::git_cache::GitCache;
use crate::sandbox::{Sandbox, SandboxError, SandboxMode};
use crate::{Agent, AgentIdentity};
use anyhow::Context;
use buildpool_core::bus::human_bytes;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Connects to buildpool coordinators and runs their cargo jobs.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    #[command(flatten)]
    overrides: Overrides,
    /// Validate the configuration (file, flags, token) and that the sandbox can start,
    /// print it and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, clap::Subcommand)]
enum AgentCommand {
    /// Run by git as its proxy command while the agent fetches a snapshot: carries the git
    /// protocol through the coordinator's authenticated tunnel on the job bus port.
    GitProxy {
        /// Passed by git; the tunnel's coordinator comes from the agent's environment.
        host: Option<String>,
        port: Option<String>,
    },
}

/// Splices git's fetch to the coordinator's tunnel, then exits the process.
async fn run_git_proxy() -> ! {
    // git shows what the proxy prints on stderr; nothing else may go to stdout.
    let code = match crate::git_proxy::run().await {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("build-agent git-proxy: {error}");
            1
        }
    };
    // Exit now: a read of standard input may still be pending on a blocking thread, and
    // the runtime's shutdown would wait for it while git waits for us to exit.
    std::process::exit(code);
}

/// How long the runtime's shutdown waits for blocking work still running when the agent
/// is done: an agent asked to stop exits, whatever a job left a thread waiting on.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// The program name that runs the agent when `buildpool` is started through a link.
pub const PROGRAM_NAME: &str = "build-agent";

/// Whether this process is an agent by its name even though its binary is another one's
/// (`buildpool`): started through a link named [`PROGRAM_NAME`], or by git as the agent's
/// proxy command.
pub fn invoked_by_name() -> bool {
    crate::git_proxy::invoked_as_proxy()
        || std::env::args_os().next().is_some_and(|program| {
            std::path::Path::new(&program).file_name() == Some(PROGRAM_NAME.as_ref())
        })
}

/// Runs the agent (or, started by git, its proxy command) to the end.
pub fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run());
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
    result
}

async fn run() -> anyhow::Result<()> {
    buildpool_proto::tls::install_default_provider();
    // Run by git as its proxy command: the link's name says so, git's arguments are not ours.
    if crate::git_proxy::invoked_as_proxy() {
        run_git_proxy().await;
    }
    let cli = Cli::parse();
    if let Some(AgentCommand::GitProxy { .. }) = cli.command {
        run_git_proxy().await;
    }
    buildpool_service::systemd::init_logging("info");
    let (file, config_path) = config::discover(cli.overrides.config.as_deref())?;
    let config = AgentConfig::resolve(file, &Environment::from_process(), cli.overrides)?;
    let sandbox = sandbox_for(&config, config_path);
    let sandbox_check = sandbox.probe().await;
    if cli.check_config {
        return print_checked_config(&config, &sandbox, sandbox_check);
    }
    sandbox_check?;
    serve(config, sandbox).await
}

/// `--check-config`: prints the settled configuration, or fails when the sandbox cannot
/// start, so a deployment is checked before it is started.
fn print_checked_config(
    config: &AgentConfig,
    sandbox: &Sandbox,
    sandbox_check: Result<(), SandboxError>,
) -> anyhow::Result<()> {
    println!(
        "configuration OK: agent {} with {} slots",
        config.id, config.max_jobs
    );
    for server in &config.servers {
        let trust = match &server.tls {
            Some(tls) => format!("{:?}", tls.trust),
            None => "plain text".to_owned(),
        };
        println!("  server {} ({}), {trust}", server.url, server.name);
    }
    println!("  labels {:?}, env {:?}", config.labels, config.env);
    println!(
        "  git cache {}, workspaces {}",
        config.git_cache_dir.display(),
        config.worktree_dir.display()
    );
    match (sandbox_check, sandbox.mode()) {
        (Err(error), _) => anyhow::bail!("the sandbox cannot start: {error}"),
        (Ok(()), SandboxMode::Bwrap) => println!(
            "  sandbox bwrap: starts (network {})",
            if config.sandbox_network { "on" } else { "off" }
        ),
        (Ok(()), SandboxMode::None) => println!("  sandbox none: jobs run UNSANDBOXED"),
    }
    Ok(())
}

/// Runs the agent until a signal, or a coordinator, asks it to drain, then drains.
async fn serve(config: AgentConfig, sandbox: Sandbox) -> anyhow::Result<()> {
    if sandbox.mode() == SandboxMode::None {
        tracing::warn!(
            "[sandbox] mode = \"none\": jobs run unsandboxed and can read everything this \
             agent can, other repositories' workspaces included"
        );
    }
    for dir in [&config.git_cache_dir, &config.worktree_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Bound before anything starts, so a taken address fails the start, not a later scrape.
    let metrics = bind_metrics(config.metrics_addr.as_deref()).await?;
    let git_proxy = crate::git_proxy::install_proxy_command(&config.git_cache_dir)
        .context("cannot write the git proxy command into the git cache directory")?;
    let disk = scan_disk(&config).await?;
    let agent = new_agent(&config, sandbox, Arc::clone(&disk))?;
    // Repositories nobody builds any more expire even on an idle agent.
    let expiry = tokio::spawn(enforce_disk_budget_hourly(disk));
    crate::process::reap_orphans(&config.worktree_dir);
    tracing::info!(agent_id = %config.id, slots = config.max_jobs, servers = config.servers.len(), "build agent starting");
    let prewarm = tokio::spawn(crate::nix::prewarm(config.prewarm_packages.clone()));

    let shutdown = CancellationToken::new();
    let serving = tokio::spawn({
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        async move {
            crate::connection::run(&agent, config.servers, &git_proxy, shutdown).await;
        }
    });
    // Scrapes keep working while the agent drains; the endpoint stops with the agent.
    if let Some(listener) = metrics {
        tracing::info!("metrics at http://{}/metrics", listener.local_addr()?);
        tokio::spawn(crate::metrics::serve(
            agent.clone(),
            listener,
            shutdown.clone(),
        ));
    }
    if let Some(notifier) = buildpool_service::systemd::Notifier::from_env() {
        let agent = agent.clone();
        tokio::spawn(notifier.run(move || agent.status_line(), shutdown.clone()));
    }
    drain_when_asked(&agent, config.drain_timeout).await?;
    shutdown.cancel();
    prewarm.abort();
    expiry.abort();
    let _ = tokio::time::timeout(Duration::from_secs(15), serving).await;
    Ok(())
}

/// The listener for Prometheus `/metrics`, when an address is configured.
async fn bind_metrics(addr: Option<&str>) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    Ok(Some(listener))
}

/// Measures the workspaces and caches already on disk, on a blocking thread (a walk of
/// every file), and logs the result against the budget.
async fn scan_disk(config: &AgentConfig) -> anyhow::Result<Arc<DiskBudget>> {
    let scanned = std::time::Instant::now();
    let disk = tokio::task::spawn_blocking({
        let (worktree_dir, cache) = (
            config.worktree_dir.clone(),
            GitCache::new(config.git_cache_dir.clone()),
        );
        let (configured, ttl) = (config.max_disk_bytes, config.workspace_ttl);
        move || DiskBudget::scan(worktree_dir, cache, configured, ttl)
    })
    .await
    .context("scanning the workspaces failed")?;
    let usage = disk.usage();
    tracing::info!(
        "disk: workspaces and caches use {} of a {} budget{} (scanned in {} ms)",
        human_bytes(usage.used_bytes),
        human_bytes(usage.budget_bytes),
        if config.max_disk_bytes.is_some() {
            ""
        } else {
            " (half the free space)"
        },
        scanned.elapsed().as_millis()
    );
    Ok(Arc::new(disk))
}

/// The agent runtime: its identity towards coordinators and the executor its jobs run in.
fn new_agent(
    config: &AgentConfig,
    sandbox: Sandbox,
    disk: Arc<DiskBudget>,
) -> anyhow::Result<Agent> {
    if config.sccache && crate::sandbox::find_on_path("sccache").is_none() {
        tracing::warn!(
            "[cache] asks for sccache, but none is on PATH: jobs compile without a cache"
        );
    } else if let Some(shared) = &config.shared_cache {
        tracing::info!(%shared, "jobs compile through the fleet's shared sccache store");
    }
    Ok(Agent::new(
        AgentIdentity {
            id: config.id.clone(),
            labels: config.labels.clone(),
            system: crate::agent::local_system(),
            token: config.token.clone(),
            key: crate::identity::load_or_create(&config.git_cache_dir)?,
        },
        ExecutorConfig {
            git_cache_dir: config.git_cache_dir.clone(),
            worktree_dir: config.worktree_dir.clone(),
            slots: config.max_jobs as usize,
            env_mode: config.env,
            default_timeout: config.default_timeout,
            kill_grace: config.kill_grace,
            sandbox: Some(sandbox),
            sccache: config.sccache,
            shared_cache: config.shared_cache.clone(),
            disk: Some(disk),
        },
    ))
}

/// Expires idle workspaces and caches once an hour, for as long as the task runs.
async fn enforce_disk_budget_hourly(disk: Arc<DiskBudget>) {
    let mut hourly = tokio::time::interval(Duration::from_secs(3600));
    loop {
        hourly.tick().await;
        disk.enforce().await;
    }
}

/// Waits for SIGTERM, SIGINT or a coordinator's drain request, then drains: no new jobs,
/// the running ones finish within `drain_timeout`; a second signal stops them at once.
async fn drain_when_asked(agent: &Agent, drain_timeout: Duration) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let reason = tokio::select! {
        name = signals.next() => format!("{name} received"),
        () = agent.drain_requested() => "a coordinator asked for it".to_owned(),
    };
    tracing::info!("draining ({reason}): finishing running jobs for up to {drain_timeout:?}");
    tokio::select! {
        _ = agent.drain(drain_timeout) => tracing::info!("drained"),
        name = signals.next() => {
            tracing::warn!("{name} received again: stopping running jobs now");
            agent.stop().await;
        }
    }
    Ok(())
}

/// The sandbox for this agent's jobs, hiding everything of the agent's own: its config,
/// secrets, caches, workspaces and the credentials of its cargo home.
fn sandbox_for(config: &AgentConfig, config_path: Option<PathBuf>) -> Sandbox {
    let mut hidden = config.secret_paths.clone();
    hidden.extend(config_path);
    hidden.extend(config::DEFAULT_CONFIG_PATHS.iter().map(PathBuf::from));
    hidden.extend([config.git_cache_dir.clone(), config.worktree_dir.clone()]);
    if let Some(cargo_home) = crate::sandbox::agent_cargo_home() {
        hidden.extend(["credentials.toml", "credentials"].map(|name| cargo_home.join(name)));
    }
    Sandbox::new(config.sandbox, config.sandbox_network, hidden).run_jobs_as(config.sandbox_user)
}

/// SIGTERM and SIGINT, as a stream of signal names.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
