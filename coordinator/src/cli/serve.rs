//! `buildpool serve`

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::background;
use crate::config::{CoordinatorConfig, Overrides, TlsFiles};
use crate::discovery::{self, Discovery};
use crate::repo::Repo;
use crate::server::Coordinator;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file (default: ~/.config/buildpool/config.toml, then the repository's .buildpool.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Job bus port for agents (0 picks a free one).
    #[arg(long)]
    websocket_port: Option<u16>,
    /// Job bus listen address (default: all interfaces).
    #[arg(long)]
    websocket_listen_addr: Option<String>,
    /// git daemon port (0 picks a free one).
    #[arg(long)]
    git_daemon_port: Option<u16>,
    /// git daemon listen address (default: 127.0.0.1; agents fetch through the tunnel on
    /// the job bus port). Beyond loopback it needs --allow-insecure.
    #[arg(long)]
    git_daemon_listen_addr: Option<String>,
    /// Control API address (default: 127.0.0.1:0).
    #[arg(long)]
    control_addr: Option<String>,
    /// Dashboard and Prometheus `/metrics` address (default: 127.0.0.1:0). Beyond loopback
    /// it is HTTPS and needs a client credential.
    #[arg(long)]
    http_addr: Option<String>,
    /// Token file shared with agents (default: ~/.config/buildpool/token, created if missing).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Accept plain ws:// agents and a git daemon beyond loopback (trusted networks only).
    #[arg(long)]
    allow_insecure: bool,
    /// Certificate (PEM chain) to serve instead of the generated self-signed one.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// Key of --tls-cert-file.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Require agent and client certificates signed by this CA (mutual TLS).
    #[arg(long, value_name = "FILE")]
    tls_client_ca_file: Option<PathBuf>,
    /// Never run jobs on this machine, even with no agent connected.
    #[arg(long)]
    no_local_fallback: bool,
    /// Concurrent jobs of the embedded local agent.
    #[arg(long)]
    local_jobs: Option<u32>,
    /// Workspace directory of the embedded local agent.
    #[arg(long)]
    local_worktree_dir: Option<PathBuf>,
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
    let background = args.background.then(|| {
        args.idle_exit_secs
            .map_or(background::DEFAULT_IDLE, Duration::from_secs)
    });
    let config = if background.is_some() {
        CoordinatorConfig::background(&repo.worktree)?
    } else {
        CoordinatorConfig::load(
            &repo.worktree,
            Overrides {
                config: args.config,
                websocket_port: args.websocket_port,
                websocket_listen_addr: args.websocket_listen_addr,
                git_daemon_port: args.git_daemon_port,
                git_daemon_listen_addr: args.git_daemon_listen_addr,
                control_addr: args.control_addr,
                http_addr: args.http_addr,
                token_file: args.token_file,
                allow_insecure: args.allow_insecure,
                tls: TlsFiles {
                    cert_file: args.tls_cert_file,
                    key_file: args.tls_key_file,
                    client_ca_file: args.tls_client_ca_file,
                },
                no_local_fallback: args.no_local_fallback,
                local_max_jobs: args.local_jobs,
                local_worktree_dir: args.local_worktree_dir,
            },
        )?
    };
    // Held until this process exits; the kernel releases it even after kill -9, so a dead
    // coordinator's lock is simply taken over.
    let _only_coordinator = match discovery::lock(&repo.state_dir())? {
        Some(lock) => lock,
        None => match discovery::read(&repo.state_dir()) {
            Some(running) if running.background && background.is_none() => {
                println!(
                    "Stopping the background coordinator a client started (pid {}); this one replaces it",
                    running.pid
                );
                background::replace(&repo.state_dir(), running.pid).await?
            }
            Some(running) => bail!(
                "a coordinator for this repository is already running (pid {}, control API {})",
                running.pid,
                running.control_url
            ),
            None => bail!("a coordinator for this repository is already starting"),
        },
    };
    let token = crate::auth::load(&config.token_file, true)?;
    let token_file = token.file.clone();
    let coordinator = Coordinator::start(repo.clone(), config.clone(), token.clone()).await?;
    let control_scheme = if coordinator.control_tls() {
        "https"
    } else {
        "http"
    };
    let fingerprint = coordinator.tls_fingerprint();
    let discovery = Discovery {
        pid: std::process::id(),
        coordinator_id: coordinator.id().to_owned(),
        control_url: format!("{control_scheme}://{}", coordinator.control_addr),
        websocket_addr: coordinator.websocket_addr().map(|a| a.to_string()),
        git_daemon_port: coordinator.git_daemon_port(),
        token_file: token_file.clone(),
        tls_fingerprint: fingerprint.map(|f| f.to_string()),
        http_url: coordinator.http_url(),
        background: background.is_some(),
    };
    discovery::write(&repo.state_dir(), &discovery).context("cannot write the discovery file")?;

    println!("Build pool coordinator starting...");
    println!("  Repository: {}", repo.common_dir.display());
    if let Some(addr) = coordinator.websocket_addr() {
        let host = match addr.ip() {
            ip if ip.is_unspecified() => crate::config::hostname(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        println!("  Job bus: wss://{addr}/ws (git through the tunnel at /git on the same port)");
        if let Some(fingerprint) = fingerprint {
            println!("  TLS fingerprint: {fingerprint}");
            println!(
                "  Agents: build-agent --server wss://{host}:{}/ws --tls-fingerprint {fingerprint}",
                addr.port()
            );
        }
    }
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
    match (&token_file, token.generated) {
        (Some(file), true) => println!(
            "  Token: generated at {} (this host's clients use it; build hosts can too, but \
             `buildpool token create --scope agent` gives them one that cannot submit)",
            file.display()
        ),
        (Some(file), false) => println!("  Token: {}", file.display()),
        (None, _) => println!("  Token: from BUILDPOOL_TOKEN"),
    }

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
