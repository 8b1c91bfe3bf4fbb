//! Agent configuration: the seed's TOML keys and flags.
//!
//! Precedence: command-line flags, then the config file (`--config`, else
//! `/etc/build-agent/config.toml`, else `/etc/build-agent.toml`), then defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use buildpool_core::EnvMode;
use serde::Deserialize;

use buildpool_proto::socket::ServerUrl;
use buildpool_proto::tls::{ClientCertFiles, ServerTrust, TlsError};

use crate::connection::ServerEndpoint;
use crate::git_proxy::EndpointTls;
use crate::sandbox::{JobUser, SandboxMode};

pub const DEFAULT_CONFIG_PATHS: &[&str] =
    &["/etc/build-agent/config.toml", "/etc/build-agent.toml"];
pub const DEFAULT_TOKEN_FILE: &str = "/etc/build-agent/token";
pub const TOKEN_ENV: &str = "BUILDPOOL_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The config file as written by users (seed format plus buildpool's additions).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: Option<ServerEntry>,
    #[serde(default)]
    pub servers: Vec<ServerEntry>,
    #[serde(default)]
    pub worker: WorkerSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub nix: NixSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub sandbox: SandboxSection,
    #[serde(default)]
    pub cache: CacheSection,
    #[serde(default)]
    pub metrics: MetricsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Where to serve Prometheus `/metrics` (plain HTTP, no credential); unset: nowhere.
    pub listen_addr: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSection {
    /// `bwrap` (default) or `none`.
    pub mode: Option<String>,
    /// Whether jobs reach the network (cargo fetches crates); default true.
    pub network: Option<bool>,
    /// Who a root agent's jobs run as: a user name, or `uid[:gid]`; default `nobody`.
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Compile through sccache when it is installed; one disk cache per repository.
    #[serde(default)]
    pub sccache: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    pub url: String,
    #[serde(default)]
    pub name: Option<String>,
    /// The coordinator certificate's `sha256:` fingerprint (`buildpool serve` prints it).
    #[serde(default)]
    pub tls_fingerprint: Option<String>,
    /// Or: a CA file the coordinator's certificate must chain to.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub id: Option<String>,
    pub max_jobs: Option<u32>,
    #[serde(default)]
    pub labels: Vec<String>,
    /// How long a drain (SIGTERM or a coordinator's request) waits for running jobs.
    pub drain_timeout_secs: Option<u64>,
    /// Time between TERM and KILL when a job is stopped.
    pub kill_grace_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub git_cache_dir: Option<PathBuf>,
    pub worktree_dir: Option<PathBuf>,
    /// Budget for workspaces and caches together; default half the free space at start.
    pub max_disk_gb: Option<f64>,
    /// Repositories not built for this many days lose their workspaces and caches.
    pub workspace_ttl_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NixSection {
    #[serde(default)]
    pub prewarm_packages: Vec<String>,
    /// `auto` (default), `nix` or `host`.
    pub env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub token_file: Option<PathBuf>,
    /// A client certificate and key, for coordinators that require mutual TLS.
    pub tls_client_cert_file: Option<PathBuf>,
    pub tls_client_key_file: Option<PathBuf>,
}

/// Values given on the command line; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub servers: Vec<String>,
    pub id: Option<String>,
    pub jobs: Option<u32>,
    pub labels: Vec<String>,
    pub git_cache_dir: Option<PathBuf>,
    pub worktree_dir: Option<PathBuf>,
    pub env: Option<String>,
    pub token_file: Option<PathBuf>,
    pub drain_timeout_secs: Option<u64>,
    /// For every server without a pin or CA file of its own.
    pub tls_fingerprint: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_client_cert_file: Option<PathBuf>,
    pub tls_client_key_file: Option<PathBuf>,
    pub sandbox: Option<String>,
    pub max_disk_gb: Option<f64>,
    pub metrics_addr: Option<String>,
}

/// The settled configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub servers: Vec<ServerEndpoint>,
    pub id: String,
    pub max_jobs: u32,
    pub labels: Vec<String>,
    pub git_cache_dir: PathBuf,
    pub worktree_dir: PathBuf,
    pub env: EnvMode,
    pub prewarm_packages: Vec<String>,
    pub token: String,
    pub kill_grace: Duration,
    pub default_timeout: Duration,
    pub drain_timeout: Duration,
    pub sandbox: SandboxMode,
    pub sandbox_network: bool,
    /// Who jobs run as when the agent is root (`[sandbox] user`).
    pub sandbox_user: JobUser,
    pub sccache: bool,
    /// `None`: a share of the free space, settled when the agent starts.
    pub max_disk_bytes: Option<u64>,
    pub workspace_ttl: Duration,
    /// The agent's own files no job may see: the token's source, the client key, config.
    pub secret_paths: Vec<PathBuf>,
    /// Where Prometheus `/metrics` is served; `None`: not at all.
    pub metrics_addr: Option<String>,
}

/// Reads a config file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// Finds the config file: the explicit one, else the first default location that exists.
/// Returns it with its path, if there was one.
pub fn discover(explicit: Option<&Path>) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
    let path = explicit.map(Path::to_owned).or_else(|| {
        DEFAULT_CONFIG_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
    });
    match path {
        Some(path) => Ok((read_file(&path)?, Some(path))),
        None => Ok((FileConfig::default(), None)),
    }
}

/// Reads the shared token: `BUILDPOOL_TOKEN`, else the configured token file, else the
/// systemd credential `token` (`LoadCredential=token:...`), else `/etc/build-agent/token`.
pub fn load_token(token_file: Option<&Path>) -> Result<String, ConfigError> {
    if let Ok(token) = std::env::var(TOKEN_ENV) {
        let token = token.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|dir| PathBuf::from(dir).join("token"))
        .filter(|path| path.exists());
    let path = token_file
        .or(credential.as_deref())
        .unwrap_or(Path::new(DEFAULT_TOKEN_FILE));
    let token = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::Invalid(format!(
            "no agent token: {TOKEN_ENV} is unset and {} is unreadable ({error}). Copy the \
             coordinator's token (`buildpool serve` prints where it is) into that file.",
            path.display()
        ))
    })?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// One server entry, checked: a `wss://` URL has exactly one way to trust the coordinator
/// (its own, else the command line's), a `ws://` URL none.
fn endpoint(
    entry: ServerEntry,
    default_fingerprint: Option<&str>,
    default_ca_file: Option<&Path>,
    client_cert: Option<&ClientCertFiles>,
) -> Result<ServerEndpoint, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid(format!("server {}: {reason}", entry.url));
    let url = ServerUrl::parse(&entry.url).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let (fingerprint, ca_file) = match (entry.tls_fingerprint, entry.tls_ca_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "tls_fingerprint and tls_ca_file are two ways to trust a coordinator; choose one"
                    .into(),
            ));
        }
        (None, None) => (
            default_fingerprint.map(str::to_owned),
            default_ca_file.map(Path::to_owned),
        ),
        own => own,
    };
    let trust = match (fingerprint, ca_file) {
        (Some(fingerprint), _) => Some(ServerTrust::Pinned(
            fingerprint
                .parse()
                .map_err(|e: TlsError| invalid(e.to_string()))?,
        )),
        (None, Some(ca_file)) => Some(ServerTrust::CaFile(ca_file)),
        (None, None) => None,
    };
    let tls = match (url.secure, trust) {
        (true, Some(trust)) => Some(
            EndpointTls::new(trust, client_cert.cloned()).map_err(|e| invalid(e.to_string()))?,
        ),
        (true, None) => {
            return Err(invalid(
                "wss:// needs the coordinator's certificate fingerprint: tls_fingerprint = \
                 \"sha256:...\" (or --tls-fingerprint) as `buildpool serve` printed it, or a \
                 tls_ca_file"
                    .into(),
            ));
        }
        (false, None) => None,
        (false, Some(_)) => {
            return Err(invalid(
                "TLS settings for a plain ws:// URL; use wss://".into(),
            ));
        }
    };
    Ok(ServerEndpoint {
        name: entry.name.unwrap_or_else(|| entry.url.clone()),
        url,
        tls,
    })
}

impl AgentConfig {
    /// Merges flags over the file over defaults, and validates the result.
    pub fn resolve(file: FileConfig, overrides: Overrides) -> Result<Self, ConfigError> {
        let entries: Vec<ServerEntry> = if overrides.servers.is_empty() {
            file.server.into_iter().chain(file.servers).collect()
        } else {
            overrides
                .servers
                .iter()
                .map(|url| ServerEntry {
                    url: url.clone(),
                    name: None,
                    tls_fingerprint: None,
                    tls_ca_file: None,
                })
                .collect()
        };
        let client_cert = match (
            overrides
                .tls_client_cert_file
                .or(file.auth.tls_client_cert_file),
            overrides
                .tls_client_key_file
                .or(file.auth.tls_client_key_file),
        ) {
            (Some(cert_file), Some(key_file)) => Some(ClientCertFiles {
                cert_file,
                key_file,
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "tls_client_cert_file and tls_client_key_file go together: set both or neither"
                        .into(),
                ));
            }
        };
        let servers = entries
            .into_iter()
            .map(|entry| {
                endpoint(
                    entry,
                    overrides.tls_fingerprint.as_deref(),
                    overrides.tls_ca_file.as_deref(),
                    client_cert.as_ref(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(ConfigError::Invalid(
                "no coordinator to connect to: pass --server wss://HOST:8081/ws or set [server] url / [[servers]] in the config".into(),
            ));
        }
        let max_jobs = overrides.jobs.or(file.worker.max_jobs).unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
        });
        if max_jobs == 0 || max_jobs > 1024 {
            return Err(ConfigError::Invalid(format!(
                "max_jobs must be between 1 and 1024, not {max_jobs}"
            )));
        }
        let mut labels = file.worker.labels;
        labels.extend(overrides.labels);
        buildpool_core::spec::validate_labels(&labels)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let env: EnvMode = overrides
            .env
            .as_deref()
            .or(file.nix.env.as_deref())
            .unwrap_or("auto")
            .parse()
            .map_err(ConfigError::Invalid)?;
        let token_file = overrides.token_file.or(file.auth.token_file);
        let token = load_token(token_file.as_deref())?;
        let sandbox: SandboxMode = overrides
            .sandbox
            .as_deref()
            .or(file.sandbox.mode.as_deref())
            .unwrap_or("bwrap")
            .parse()
            .map_err(ConfigError::Invalid)?;
        let max_disk_gb = overrides.max_disk_gb.or(file.storage.max_disk_gb);
        if let Some(gb) = max_disk_gb
            && !(gb.is_finite() && gb > 0.0)
        {
            return Err(ConfigError::Invalid(format!(
                "max_disk_gb must be a positive number of gigabytes, not {gb}"
            )));
        }
        let mut secret_paths: Vec<PathBuf> = token_file.into_iter().collect();
        secret_paths.push(DEFAULT_TOKEN_FILE.into());
        secret_paths.extend(std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from));
        if let Some(cert) = &client_cert {
            secret_paths.extend([cert.cert_file.clone(), cert.key_file.clone()]);
        }
        Ok(Self {
            servers,
            id: overrides.id.or(file.worker.id).unwrap_or_else(|| {
                buildpool_core::host::hostname().unwrap_or_else(|| "build-agent".to_owned())
            }),
            max_jobs,
            labels,
            git_cache_dir: overrides
                .git_cache_dir
                .or(file.storage.git_cache_dir)
                .unwrap_or_else(|| "/var/cache/build-agent/repos".into()),
            worktree_dir: overrides
                .worktree_dir
                .or(file.storage.worktree_dir)
                .unwrap_or_else(|| "/tmp/build-agent/jobs".into()),
            env,
            prewarm_packages: file.nix.prewarm_packages,
            token,
            kill_grace: Duration::from_millis(file.worker.kill_grace_ms.unwrap_or(1500)),
            default_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(
                overrides
                    .drain_timeout_secs
                    .or(file.worker.drain_timeout_secs)
                    .unwrap_or(600),
            ),
            sandbox,
            metrics_addr: overrides.metrics_addr.or(file.metrics.listen_addr),
            sandbox_network: file.sandbox.network.unwrap_or(true),
            sandbox_user: match &file.sandbox.user {
                Some(user) => JobUser::find(user).map_err(ConfigError::Invalid)?,
                None => JobUser::nobody(),
            },
            sccache: file.cache.sccache,
            // The cast saturates; the value was checked positive and finite.
            max_disk_bytes: max_disk_gb.map(|gb| (gb * 1e9) as u64),
            workspace_ttl: Duration::from_secs(
                file.storage.workspace_ttl_days.unwrap_or(14) * 24 * 3600,
            ),
            secret_paths,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_MULTI: &str = r#"
        [[servers]]
        url = "ws://orchestrator1:8081/ws"
        name = "project-a"

        [[servers]]
        url = "ws://orchestrator2:8081/ws"

        [worker]
        id = "shared-worker"
        max_jobs = 8

        [storage]
        git_cache_dir = "/var/cache/build-agent/repos"
        worktree_dir = "/tmp/build-agent/jobs"

        [nix]
        prewarm_packages = ["nixpkgs#rustc"]
    "#;

    fn with_token() -> Overrides {
        let file = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(file.path(), "secret\n").expect("write");
        let (_, path) = file.keep().expect("keep");
        Overrides {
            token_file: Some(path),
            ..Overrides::default()
        }
    }

    #[test]
    fn reads_the_seed_multi_server_config() {
        let file: FileConfig = toml::from_str(SEED_MULTI).expect("parses");
        let config = AgentConfig::resolve(file, with_token()).expect("valid");
        assert_eq!(config.servers.len(), 2);
        assert_eq!(config.servers[0].name, "project-a");
        assert_eq!(config.servers[1].name, "ws://orchestrator2:8081/ws");
        assert_eq!((config.id.as_str(), config.max_jobs), ("shared-worker", 8));
        assert_eq!(config.prewarm_packages, ["nixpkgs#rustc"]);
        assert_eq!(config.token, "secret");
    }

    #[test]
    fn flags_override_the_file_and_bad_values_are_named() {
        let file: FileConfig =
            toml::from_str("[server]\nurl = \"ws://a:8081/ws\"\n[worker]\nmax_jobs = 2")
                .expect("parses");
        let overrides = Overrides {
            jobs: Some(5),
            servers: vec!["ws://b:1/ws".into()],
            ..with_token()
        };
        let config = AgentConfig::resolve(file, overrides).expect("valid");
        assert_eq!(config.max_jobs, 5);
        assert_eq!(config.servers[0].url.to_string(), "ws://b:1/ws");

        let typo = toml::from_str::<FileConfig>("[worker]\nmax_job = 2");
        assert!(typo.is_err(), "unknown keys are rejected, not ignored");
        let none =
            AgentConfig::resolve(FileConfig::default(), with_token()).expect_err("no server");
        assert!(none.to_string().contains("--server"));
        let zero = AgentConfig::resolve(
            FileConfig::default(),
            Overrides {
                jobs: Some(0),
                servers: vec!["ws://a/ws".into()],
                ..with_token()
            },
        );
        assert!(zero.is_err());
    }
}
