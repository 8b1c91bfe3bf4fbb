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
    /// Plain `ws://` agents and a git daemon beyond loopback are accepted (trusted
    /// networks, seed-era configs); the coordinator warns at every start.
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

/// Command-line overrides.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub websocket_port: Option<u16>,
    pub websocket_listen_addr: Option<String>,
    pub git_daemon_port: Option<u16>,
    pub git_daemon_listen_addr: Option<String>,
    pub control_addr: Option<String>,
    pub http_addr: Option<String>,
    pub token_file: Option<PathBuf>,
    pub allow_insecure: bool,
    pub tls: TlsFiles,
    pub no_local_fallback: bool,
    pub local_max_jobs: Option<u32>,
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

fn secs(value: Option<u64>, default: u64, name: &str) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::Invalid(format!("{name} must be at least 1"))),
        secs => Ok(Duration::from_secs(secs)),
    }
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

impl CoordinatorConfig {
    /// Loads the configuration for a coordinator serving the repository at `worktree`.
    pub fn load(worktree: &Path, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut table = toml::Table::new();
        let explicit = overrides.config.clone();
        let files = match explicit {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::Read(path, std::io::ErrorKind::NotFound.into()));
                }
                vec![path]
            }
            None => vec![user_config_file(), worktree.join(".buildpool.toml")],
        };
        for file in &files {
            if let Some(layer) = read_table(file)? {
                merge(&mut table, layer);
            }
        }
        let file: FileConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    ConfigError::Parse(files.last().cloned().unwrap_or_default(), e.to_string())
                })?;
        Self::resolve(file.build_pool, overrides)
    }

    fn resolve(pool: BuildPoolSection, overrides: Overrides) -> Result<Self, ConfigError> {
        let heartbeat_interval = secs(
            pool.timeouts.heartbeat_interval_secs,
            3,
            "heartbeat_interval_secs",
        )?;
        let heartbeat_timeout = secs(
            pool.timeouts.heartbeat_timeout_secs,
            10,
            "heartbeat_timeout_secs",
        )?;
        if heartbeat_timeout <= heartbeat_interval {
            return Err(ConfigError::Invalid(
                "heartbeat_timeout_secs must be longer than heartbeat_interval_secs".into(),
            ));
        }
        let websocket_host = overrides
            .websocket_listen_addr
            .or(pool.websocket_listen_addr)
            .unwrap_or_default();
        let websocket_port = overrides
            .websocket_port
            .or(pool.websocket_port)
            .unwrap_or(8081);
        let allow_insecure = overrides.allow_insecure || pool.allow_insecure.unwrap_or(false);
        let git_host = overrides
            .git_daemon_listen_addr
            .or(pool.git_daemon_listen_addr)
            .unwrap_or_else(|| "127.0.0.1".into());
        if !is_loopback(&git_host) && !allow_insecure {
            return Err(ConfigError::Invalid(format!(
                "git_daemon_listen_addr = {git_host:?} would serve every snapshot to anyone who \
                 can reach the port; agents fetch through the authenticated tunnel on the job \
                 bus port instead. For a trusted network, also set allow_insecure = true."
            )));
        }
        let tls = TlsFiles {
            cert_file: overrides.tls.cert_file.or(pool.tls_cert_file),
            key_file: overrides.tls.key_file.or(pool.tls_key_file),
            client_ca_file: overrides.tls.client_ca_file.or(pool.tls_client_ca_file),
        };
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert_file and tls_key_file go together: set both or neither".into(),
            ));
        }
        let git_port = overrides
            .git_daemon_port
            .or(pool.git_daemon_port)
            .unwrap_or(9418);
        let local_max_jobs = overrides
            .local_max_jobs
            .or(pool.local_fallback.max_jobs)
            .unwrap_or(2);
        if local_max_jobs == 0 {
            return Err(ConfigError::Invalid(
                "local_fallback.max_jobs must be at least 1".into(),
            ));
        }
        Ok(Self {
            websocket_addr: Some(join_addr(&websocket_host, websocket_port)),
            git_daemon: Some((git_host, git_port)),
            control_addr: overrides
                .control_addr
                .or(pool.control_listen_addr)
                .unwrap_or_else(|| "127.0.0.1:0".into()),
            http_addr: Some(
                overrides
                    .http_addr
                    .or(pool.http_listen_addr)
                    .unwrap_or_else(|| "127.0.0.1:0".into()),
            ),
            token_file: overrides
                .token_file
                .or(pool.token_file)
                .unwrap_or_else(crate::auth::default_token_file),
            allow_insecure,
            tls,
            log_max_bytes: pool.log_max_bytes.unwrap_or(64 * 1024 * 1024),
            local_fallback: !overrides.no_local_fallback
                && pool.local_fallback.enabled.unwrap_or(true),
            local_max_jobs,
            local_worktree_dir: overrides
                .local_worktree_dir
                .or(pool.local_fallback.worktree_dir)
                .unwrap_or_else(|| cache_home().join("buildpool").join("local")),
            job_default_timeout: secs(pool.timeouts.job_default_secs, 300, "job_default_secs")?,
            heartbeat_interval,
            heartbeat_timeout,
            reattach_grace: secs(pool.timeouts.reattach_grace_secs, 15, "reattach_grace_secs")?,
            unroutable_wait: secs(
                pool.timeouts.unroutable_wait_secs,
                60,
                "unroutable_wait_secs",
            )?,
            max_lost_attempts: match pool.timeouts.max_lost_attempts.unwrap_or(3) {
                0 => {
                    return Err(ConfigError::Invalid(
                        "max_lost_attempts must be at least 1".into(),
                    ));
                }
                n => n,
            },
            client_grace: secs(pool.timeouts.client_grace_secs, 10, "client_grace_secs")?,
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
                    config: Some(file),
                    ..Overrides::default()
                }
            )
            .is_err()
        );
    }
}
