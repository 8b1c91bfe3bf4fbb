//! Coordinator configuration: the seed's `[build_pool]` keys.
//!
//! Sources, later ones winning: defaults, the user's `$XDG_CONFIG_HOME/buildpool/config.toml`,
//! the repository's `.buildpool.toml` (so two repositories on one host can use different
//! ports), then command-line flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("invalid config {0}: {1}")]
    Parse(PathBuf, String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    build_pool: BuildPoolSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildPoolSection {
    /// Accepted for compatibility with the seed; the coordinator runs when started.
    #[allow(dead_code)]
    enabled: Option<bool>,
    websocket_port: Option<u16>,
    websocket_listen_addr: Option<String>,
    git_daemon_port: Option<u16>,
    git_daemon_listen_addr: Option<String>,
    control_listen_addr: Option<String>,
    http_listen_addr: Option<String>,
    token_file: Option<PathBuf>,
    allow_insecure: Option<bool>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_client_ca_file: Option<PathBuf>,
    log_max_bytes: Option<u64>,
    affinity: Option<bool>,
    #[serde(default)]
    local_fallback: LocalFallbackSection,
    #[serde(default)]
    timeouts: TimeoutsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalFallbackSection {
    enabled: Option<bool>,
    max_jobs: Option<u32>,
    worktree_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsSection {
    job_default_secs: Option<u64>,
    heartbeat_interval_secs: Option<u64>,
    heartbeat_timeout_secs: Option<u64>,
    reattach_grace_secs: Option<u64>,
    unroutable_wait_secs: Option<u64>,
    max_lost_attempts: Option<u32>,
    client_grace_secs: Option<u64>,
}

/// The settled configuration of one coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Job bus address for agents; `None` runs without one (the in-process coordinator).
    pub websocket_addr: Option<String>,
    /// Git daemon `(listen address, port)`; `None` runs without one. Loopback unless
    /// `allow_insecure`: agents reach it through the tunnel on the job bus port.
    pub git_daemon: Option<(String, u16)>,
    pub control_addr: String,
    /// Dashboard and `/metrics`; `None` runs without (the in-process coordinator).
    pub http_addr: Option<String>,
    pub token_file: PathBuf,
    /// Plain `ws://` agents and a git daemon beyond loopback are accepted, for trusted
    /// networks and for configs in the seed's format, which knew neither TLS nor the
    /// tunnel; the coordinator warns at every start.
    pub allow_insecure: bool,
    pub tls: TlsFiles,
    pub log_max_bytes: u64,
    pub local_fallback: bool,
    pub local_max_jobs: u32,
    pub local_worktree_dir: PathBuf,
    pub job_default_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// How long a vanished agent's attempts wait for it to reconnect and reattach them.
    pub reattach_grace: Duration,
    /// How long a job no connected agent could run waits before it fails.
    pub unroutable_wait: Duration,
    /// Lost attempts (agent gone mid-job) before a job fails.
    pub max_lost_attempts: u32,
    /// How long a job nobody follows (its client went away, or the coordinator restarted)
    /// waits for a client to come back before it is cancelled.
    pub client_grace: Duration,
    /// Jobs go to the agent whose workspace last built their worktree (default); off, to
    /// the agent with the most free slots (to measure what affinity saves).
    pub affinity: bool,
    /// Keep job logs in a directory of this process's own, deleted at shutdown. Set for
    /// in-process coordinators, so two of them (say, two MCP sessions) never share job ids.
    pub private_logs: bool,
}

/// The coordinator's own certificate and key (default: a generated self-signed pair next
/// to the token file), and the CA that client certificates must chain to (mutual TLS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
}

/// The command line's part of the configuration: which file to read, and values that win
/// over the files. `None` (or `false`) means "not given", so the files or the defaults
/// decide. Flattened into `buildpool serve`, so each flag is declared only here.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Config file (default: ~/.config/buildpool/config.toml, then the repository's .buildpool.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Job bus port for agents (0 picks a free one).
    #[arg(long)]
    pub websocket_port: Option<u16>,
    /// Job bus listen address (default: all interfaces).
    #[arg(long)]
    pub websocket_listen_addr: Option<String>,
    /// git daemon port (0 picks a free one).
    #[arg(long)]
    pub git_daemon_port: Option<u16>,
    /// git daemon listen address (default: 127.0.0.1; agents fetch through the tunnel on
    /// the job bus port). Beyond loopback it needs --allow-insecure.
    #[arg(long)]
    pub git_daemon_listen_addr: Option<String>,
    /// Control API address (default: 127.0.0.1:0).
    #[arg(long)]
    pub control_addr: Option<String>,
    /// Dashboard and Prometheus `/metrics` address (default: 127.0.0.1:0). Beyond loopback
    /// it is HTTPS and needs a client credential.
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Token file shared with agents (default: ~/.config/buildpool/token, created if missing).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Accept plain ws:// agents and a git daemon beyond loopback (trusted networks only).
    #[arg(long)]
    pub allow_insecure: bool,
    /// Certificate (PEM chain) to serve instead of the generated self-signed one.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Key of --tls-cert-file.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Require agent and client certificates signed by this CA (mutual TLS).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Never run jobs on this machine, even with no agent connected.
    #[arg(long)]
    pub no_local_fallback: bool,
    /// Concurrent jobs of the embedded local agent.
    #[arg(long)]
    pub local_jobs: Option<u32>,
    /// Workspace directory of the embedded local agent.
    #[arg(long)]
    pub local_worktree_dir: Option<PathBuf>,
}

pub fn cache_home() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// The user's config file location.
pub fn user_config_file() -> PathBuf {
    crate::auth::config_home()
        .join("buildpool")
        .join("config.toml")
}

fn read_table(path: &Path) -> Result<Option<toml::Table>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .parse::<toml::Table>()
            .map(Some)
            .map_err(|e| ConfigError::Parse(path.to_owned(), e.to_string())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(ConfigError::Read(path.to_owned(), error)),
    }
}

/// Merges `over` into `base`, tables key by key.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => merge(inner, value),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A duration in seconds, as configured or its default; zero is refused.
fn secs(value: Option<u64>, default: u64, name: &str) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(at_least_one(
        value.unwrap_or(default),
        name,
    )?))
}

/// A count or duration that must not be zero, named in the error.
fn at_least_one<T: Default + PartialEq>(value: T, name: &str) -> Result<T, ConfigError> {
    if value == T::default() {
        return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
    }
    Ok(value)
}

/// This host's name, for certificates and messages.
pub fn hostname() -> String {
    buildpool_core::host::hostname().unwrap_or_else(|| "localhost".to_owned())
}

/// Whether a listen address (host, or host:port) is on loopback only. An empty host means
/// all interfaces.
pub fn is_loopback(addr: &str) -> bool {
    let host = match addr.parse::<std::net::SocketAddr>() {
        Ok(socket) => return socket.ip().is_loopback(),
        Err(_) => addr.trim_start_matches('[').trim_end_matches(']'),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn join_addr(host: &str, port: u16) -> String {
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The files' `[build_pool]` settings: `explicit` alone, or the user's file with the
/// repository's `.buildpool.toml` layered over it, key by key.
fn read_files(worktree: &Path, explicit: Option<PathBuf>) -> Result<BuildPoolSection, ConfigError> {
    let files = match explicit {
        Some(path) => {
            if !path.exists() {
                return Err(ConfigError::Read(path, std::io::ErrorKind::NotFound.into()));
            }
            vec![path]
        }
        None => vec![user_config_file(), worktree.join(".buildpool.toml")],
    };
    let mut table = toml::Table::new();
    for file in &files {
        if let Some(layer) = read_table(file)? {
            merge(&mut table, layer);
        }
    }
    let file: FileConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| {
            ConfigError::Parse(files.last().cloned().unwrap_or_default(), e.to_string())
        })?;
    Ok(file.build_pool)
}

/// The heartbeat interval and the silence after which an agent counts as gone, which must
/// be longer than one interval.
fn heartbeats(timeouts: &TimeoutsSection) -> Result<(Duration, Duration), ConfigError> {
    let interval = secs(
        timeouts.heartbeat_interval_secs,
        3,
        "heartbeat_interval_secs",
    )?;
    let timeout = secs(
        timeouts.heartbeat_timeout_secs,
        10,
        "heartbeat_timeout_secs",
    )?;
    if timeout <= interval {
        return Err(ConfigError::Invalid(
            "heartbeat_timeout_secs must be longer than heartbeat_interval_secs".into(),
        ));
    }
    Ok((interval, timeout))
}

/// Where the git daemon listens: loopback, unless insecure setups are allowed, because
/// the daemon serves every snapshot without a credential.
fn git_daemon_host(
    configured: Option<String>,
    allow_insecure: bool,
) -> Result<String, ConfigError> {
    let host = configured.unwrap_or_else(|| "127.0.0.1".into());
    if !is_loopback(&host) && !allow_insecure {
        return Err(ConfigError::Invalid(format!(
            "git_daemon_listen_addr = {host:?} would serve every snapshot to anyone who \
             can reach the port; agents fetch through the authenticated tunnel on the job \
             bus port instead. For a trusted network, also set allow_insecure = true."
        )));
    }
    Ok(host)
}

impl TlsFiles {
    /// The files, if a certificate comes with its key.
    fn checked(self) -> Result<Self, ConfigError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert_file and tls_key_file go together: set both or neither".into(),
            ));
        }
        Ok(self)
    }
}

impl CoordinatorConfig {
    /// Loads the configuration for a coordinator serving the repository at `worktree`.
    pub fn load(worktree: &Path, overrides: Overrides) -> Result<Self, ConfigError> {
        let pool = read_files(worktree, overrides.config.clone())?;
        Self::resolve(pool, overrides)
    }

    /// Merges the flags over the files' settings over the defaults, and validates the
    /// result.
    fn resolve(pool: BuildPoolSection, flags: Overrides) -> Result<Self, ConfigError> {
        let (heartbeat_interval, heartbeat_timeout) = heartbeats(&pool.timeouts)?;
        let allow_insecure = flags.allow_insecure || pool.allow_insecure.unwrap_or(false);
        let git_host = git_daemon_host(
            flags.git_daemon_listen_addr.or(pool.git_daemon_listen_addr),
            allow_insecure,
        )?;
        let tls = TlsFiles {
            cert_file: flags.tls_cert_file.or(pool.tls_cert_file),
            key_file: flags.tls_key_file.or(pool.tls_key_file),
            client_ca_file: flags.tls_client_ca_file.or(pool.tls_client_ca_file),
        }
        .checked()?;
        let local_max_jobs = at_least_one(
            flags
                .local_jobs
                .or(pool.local_fallback.max_jobs)
                .unwrap_or(2),
            "local_fallback.max_jobs",
        )?;
        let websocket_host = flags
            .websocket_listen_addr
            .or(pool.websocket_listen_addr)
            .unwrap_or_default();
        let websocket_port = flags.websocket_port.or(pool.websocket_port).unwrap_or(8081);
        let timeouts = &pool.timeouts;
        Ok(Self {
            websocket_addr: Some(join_addr(&websocket_host, websocket_port)),
            git_daemon: Some((
                git_host,
                flags
                    .git_daemon_port
                    .or(pool.git_daemon_port)
                    .unwrap_or(9418),
            )),
            control_addr: flags
                .control_addr
                .or(pool.control_listen_addr)
                .unwrap_or_else(|| "127.0.0.1:0".into()),
            http_addr: Some(
                flags
                    .http_addr
                    .or(pool.http_listen_addr)
                    .unwrap_or_else(|| "127.0.0.1:0".into()),
            ),
            token_file: flags
                .token_file
                .or(pool.token_file)
                .unwrap_or_else(crate::auth::default_token_file),
            allow_insecure,
            tls,
            log_max_bytes: pool.log_max_bytes.unwrap_or(64 * 1024 * 1024),
            local_fallback: !flags.no_local_fallback && pool.local_fallback.enabled.unwrap_or(true),
            local_max_jobs,
            local_worktree_dir: flags
                .local_worktree_dir
                .or(pool.local_fallback.worktree_dir)
                .unwrap_or_else(|| cache_home().join("buildpool").join("local")),
            job_default_timeout: secs(timeouts.job_default_secs, 300, "job_default_secs")?,
            heartbeat_interval,
            heartbeat_timeout,
            reattach_grace: secs(timeouts.reattach_grace_secs, 15, "reattach_grace_secs")?,
            unroutable_wait: secs(timeouts.unroutable_wait_secs, 60, "unroutable_wait_secs")?,
            max_lost_attempts: at_least_one(
                timeouts.max_lost_attempts.unwrap_or(3),
                "max_lost_attempts",
            )?,
            client_grace: secs(timeouts.client_grace_secs, 10, "client_grace_secs")?,
            affinity: pool.affinity.unwrap_or(true),
            private_logs: false,
        })
    }

    /// A configuration for the in-process coordinator `buildpool run` starts when none is
    /// running: no job bus, no git daemon, only the embedded local agent.
    pub fn in_process(worktree: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::load(worktree, Overrides::default())?;
        config.websocket_addr = None;
        config.git_daemon = None;
        config.control_addr = "127.0.0.1:0".into();
        config.http_addr = None;
        config.local_fallback = true;
        config.private_logs = true;
        Ok(config)
    }

    /// The coordinator `buildpool demo` runs: every listener on loopback on a free port,
    /// TLS on the job bus with the generated certificate, the token in `token_file`, and no
    /// embedded local agent, so its jobs go to the demo's build agent process. No file is
    /// read: the demo runs on the embedded defaults alone, whatever the user configured.
    pub fn demo(token_file: PathBuf) -> Result<Self, ConfigError> {
        Self::resolve(
            BuildPoolSection::default(),
            Overrides {
                websocket_listen_addr: Some("127.0.0.1".into()),
                websocket_port: Some(0),
                git_daemon_port: Some(0),
                token_file: Some(token_file),
                no_local_fallback: true,
                ..Overrides::default()
            },
        )
    }

    /// A configuration for the coordinator a client starts in the background when none is
    /// running (see `crate::background`): like the in-process one, it listens on loopback
    /// only and runs jobs on the embedded local agent, but it has the dashboard, and its
    /// logs are the repository's. Nobody asked for a job bus, so no port opens beyond this
    /// host: a fleet needs `buildpool serve`.
    pub fn background(worktree: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::in_process(worktree)?;
        config.http_addr = Some("127.0.0.1:0".into());
        config.private_logs = false;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_keys_are_read_and_layered() {
        let dir = tempfile::tempdir().expect("temp");
        let user = dir.path().join("user.toml");
        std::fs::write(
            &user,
            r#"
            [build_pool]
            enabled = true
            websocket_port = 8081
            git_daemon_port = 9418
            git_daemon_listen_addr = "127.0.0.1"

            [build_pool.local_fallback]
            enabled = true
            max_jobs = 3
            worktree_dir = "/tmp/build-pool/local"

            [build_pool.timeouts]
            job_default_secs = 300
            heartbeat_interval_secs = 30
            heartbeat_timeout_secs = 90
        "#,
        )
        .expect("write");
        let overrides = Overrides {
            config: Some(user),
            websocket_port: Some(9000),
            ..Overrides::default()
        };
        let config = CoordinatorConfig::load(dir.path(), overrides).expect("valid");
        assert_eq!(config.websocket_addr.as_deref(), Some("0.0.0.0:9000"));
        assert_eq!(config.git_daemon, Some(("127.0.0.1".to_owned(), 9418)));
        assert_eq!(config.local_max_jobs, 3);
        assert_eq!(config.heartbeat_timeout, Duration::from_secs(90));
        assert!(!config.allow_insecure);
    }

    #[test]
    fn git_is_served_on_loopback_unless_insecure_is_allowed() {
        let dir = tempfile::tempdir().expect("temp");
        let file = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&file, text).expect("write");
            CoordinatorConfig::load(
                dir.path(),
                Overrides {
                    config: Some(file.clone()),
                    ..Overrides::default()
                },
            )
        };
        let defaults = load("").expect("valid");
        assert_eq!(defaults.git_daemon, Some(("127.0.0.1".to_owned(), 9418)));
        let error = load("[build_pool]\ngit_daemon_listen_addr = \"0.0.0.0\"\n")
            .expect_err("direct git needs allow_insecure");
        assert!(error.to_string().contains("allow_insecure"), "{error}");
        let direct = load("[build_pool]\ngit_daemon_listen_addr = \"\"\nallow_insecure = true\n")
            .expect("allowed");
        assert!(direct.allow_insecure);
        let half = load("[build_pool]\ntls_cert_file = \"/etc/cert.pem\"\n");
        assert!(half.is_err(), "a certificate without its key");
        for (addr, loopback) in [
            ("127.0.0.1", true),
            ("127.0.0.1:0", true),
            ("[::1]:5", true),
            ("localhost", true),
            ("", false),
            ("0.0.0.0:1", false),
            ("10.0.0.5", false),
        ] {
            assert_eq!(is_loopback(addr), loopback, "{addr}");
        }
    }

    #[test]
    fn mistakes_are_reported() {
        let dir = tempfile::tempdir().expect("temp");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[build_pool]\nwebsocket_prot = 1\n").expect("write");
        let error = CoordinatorConfig::load(
            dir.path(),
            Overrides {
                config: Some(file.clone()),
                ..Overrides::default()
            },
        )
        .expect_err("typo");
        assert!(error.to_string().contains("websocket_prot"), "{error}");
        std::fs::write(
            &file,
            "[build_pool.timeouts]\nheartbeat_interval_secs = 10\nheartbeat_timeout_secs = 5\n",
        )
        .expect("write");
        assert!(
            CoordinatorConfig::load(
                dir.path(),
                Overrides {
                    config: Some(file.clone()),
                    ..Overrides::default()
                }
            )
            .is_err()
        );
        for (text, named) in [
            (
                "[build_pool.local_fallback]\nmax_jobs = 0\n",
                "local_fallback.max_jobs",
            ),
            (
                "[build_pool.timeouts]\nmax_lost_attempts = 0\n",
                "max_lost_attempts",
            ),
            (
                "[build_pool.timeouts]\nclient_grace_secs = 0\n",
                "client_grace_secs",
            ),
        ] {
            std::fs::write(&file, text).expect("write");
            let overrides = Overrides {
                config: Some(file.clone()),
                ..Overrides::default()
            };
            let error = CoordinatorConfig::load(dir.path(), overrides).expect_err("zero");
            assert!(
                error
                    .to_string()
                    .ends_with(&format!("{named} must be at least 1")),
                "{error}"
            );
        }
    }
}
