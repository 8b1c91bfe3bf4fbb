//! `buildpool serve`

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::auth::Token;
use crate::background;
use crate::config::{CoordinatorConfig, Overrides};
use crate::discovery::{self, Discovery};
use crate::repo::Repo;
use crate::server::Coordinator;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    overrides: Overrides,
    /// Started by a client that found no coordinator: loopback only, local agent, stops
    /// when idle or when the repository is gone (see `crate::background`).
    #[arg(long, hide = true)]
    background: bool,
    /// With --background: seconds without jobs or client requests before it stops.
    #[arg(long, hide = true, requires = "background")]
    idle_exit_secs: Option<u64>,
}

pub async fn serve(dir: &Path, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let repo = Repo::discover(dir).await?;
    // `Some(idle time before stopping)` for a coordinator a client started.
    let background = args.background.then(|| {
        args.idle_exit_secs
            .map_or(background::DEFAULT_IDLE, Duration::from_secs)
    });
    let config = match background {
        Some(_) => CoordinatorConfig::background(&repo.worktree)?,
        None => CoordinatorConfig::load(&repo.worktree, args.overrides)?,
    };
    // Held until this process exits; the kernel releases it even after kill -9, so a dead
    // coordinator's lock is simply taken over.
    let _only_coordinator = take_coordinator_lock(&repo, background.is_some()).await?;
    let token = crate::auth::load(&config.token_file, true)?;
    let coordinator = Coordinator::start(repo.clone(), config.clone(), token.clone()).await?;
    let discovery = discovery_record(&coordinator, &token, background.is_some());
    discovery::write(&repo.state_dir(), &discovery).context("cannot write the discovery file")?;
    print_banner(&repo, &config, &coordinator, &discovery, &token);

    let stop_notifying = tokio_util::sync::CancellationToken::new();
    let notifying = buildpool_service::systemd::Notifier::from_env().map(|notifier| {
        tokio::spawn(notifier.run(coordinator.status_line(), stop_notifying.clone()))
    });
    match background {
        Some(idle) => {
            let stop = background::serve_until_idle(&coordinator, &repo, idle, &discovery).await;
            println!("Build pool coordinator stopping ({stop})...");
        }
        None => {
            wait_for_signal().await;
            println!("Build pool coordinator stopping...");
        }
    }
    stop_notifying.cancel();
    if let Some(notifying) = notifying {
        let _ = notifying.await;
    }
    discovery::remove(&repo.state_dir(), coordinator.id());
    coordinator.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// The lock that makes this the repository's only coordinator. A background coordinator
/// (a client's) gives way to one started on purpose; any other running coordinator is an
/// error.
async fn take_coordinator_lock(repo: &Repo, background: bool) -> anyhow::Result<std::fs::File> {
    if let Some(lock) = discovery::lock(&repo.state_dir())? {
        return Ok(lock);
    }
    match discovery::read(&repo.state_dir()) {
        Some(running) if running.background && !background => {
            println!(
                "Stopping the background coordinator a client started (pid {}); this one replaces it",
                running.pid
            );
            background::replace(&repo.state_dir(), running.pid).await
        }
        Some(running) => bail!(
            "a coordinator for this repository is already running (pid {}, control API {})",
            running.pid,
            running.control_url
        ),
        None => bail!("a coordinator for this repository is already starting"),
    }
}

/// What clients read to find this coordinator.
pub(super) fn discovery_record(
    coordinator: &Coordinator,
    token: &Token,
    background: bool,
) -> Discovery {
    let control_scheme = if coordinator.control_tls() {
        "https"
    } else {
        "http"
    };
    Discovery {
        pid: std::process::id(),
        coordinator_id: coordinator.id().to_owned(),
        control_url: format!("{control_scheme}://{}", coordinator.control_addr),
        websocket_addr: coordinator.websocket_addr().map(|a| a.to_string()),
        git_daemon_port: coordinator.git_daemon_port(),
        token_file: token.file.clone(),
        tls_fingerprint: coordinator.tls_fingerprint().map(|f| f.to_string()),
        http_url: coordinator.http_url(),
        background,
    }
}

/// Tells the operator where everything listens and how an agent joins, and warns about
/// what `allow_insecure` opens.
fn print_banner(
    repo: &Repo,
    config: &CoordinatorConfig,
    coordinator: &Coordinator,
    discovery: &Discovery,
    token: &Token,
) {
    println!("Build pool coordinator starting...");
    println!("  Repository: {}", repo.common_dir.display());
    print_job_bus(coordinator);
    if config.allow_insecure {
        tracing::warn!(
            "allow_insecure is set: plain ws:// agents are accepted (their token and every \
             snapshot cross the network unencrypted) and the git daemon may listen beyond \
             loopback without a credential"
        );
    }
    if let (Some(port), Some((listen, _))) = (coordinator.git_daemon_port(), &config.git_daemon) {
        if crate::config::is_loopback(listen) {
            println!("  Git daemon: {listen}:{port} (loopback only)");
        } else {
            tracing::warn!(
                "the git daemon serves every snapshot without a credential on {listen}:{port}"
            );
        }
    }
    println!("  Control API: {}", discovery.control_url);
    if let Some(url) = &discovery.http_url {
        println!("  Dashboard: {url}/ (metrics at {url}/metrics; `buildpool ui` prints it)");
    }
    match (&token.file, token.generated) {
        (Some(file), true) => println!(
            "  Token: generated at {} (this host's clients use it; build hosts can too, but \
             `buildpool token create --scope agent` gives them one that cannot submit)",
            file.display()
        ),
        (Some(file), false) => println!("  Token: {}", file.display()),
        (None, _) => println!("  Token: from BUILDPOOL_TOKEN"),
    }
}

/// The job bus's URL and the command line that connects an agent to it, pin included.
fn print_job_bus(coordinator: &Coordinator) {
    let Some(addr) = coordinator.websocket_addr() else {
        return;
    };
    let host = match addr.ip() {
        ip if ip.is_unspecified() => crate::config::hostname(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    println!("  Job bus: wss://{addr}/ws (git through the tunnel at /git on the same port)");
    if let Some(fingerprint) = coordinator.tls_fingerprint() {
        println!("  TLS fingerprint: {fingerprint}");
        println!(
            "  Agents: build-agent --server wss://{host}:{}/ws --tls-fingerprint {fingerprint}",
            addr.port()
        );
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
