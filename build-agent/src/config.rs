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
use crate::shared_cache::SharedCache;

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
    /// One sccache store for the whole fleet (`redis://`, `memcached://`, `s3://`,
    /// `webdav+https://`); turns sccache on. Unset: each agent's own disk cache.
    pub shared: Option<String>,
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

/// The command line's part of the configuration: which file to read, and values that win
/// over the file. `None` (or empty) means "not given", so the file or the default decides.
/// Flattened into the `build-agent` command line, so each flag is declared only here.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Coordinator job-bus URL, e.g. wss://coordinator:8081/ws (repeatable). A
    /// `#sha256:...` suffix pins that coordinator's certificate.
    #[arg(long = "server", value_name = "URL")]
    pub servers: Vec<String>,
    /// Agent id shown by coordinators (default: hostname).
    #[arg(long)]
    pub id: Option<String>,
    /// Concurrent jobs, shared by all coordinators.
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Config file (default: /etc/build-agent/config.toml, then /etc/build-agent.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Label advertised to coordinators (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    #[arg(long)]
    pub git_cache_dir: Option<PathBuf>,
    #[arg(long)]
    pub worktree_dir: Option<PathBuf>,
    /// Job environment: auto, nix or host.
    #[arg(long)]
    pub env: Option<String>,
    /// File holding the shared token (default: /etc/build-agent/token; BUILDPOOL_TOKEN wins).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Seconds a drain (SIGTERM, or `buildpool agents drain`) waits for running jobs.
    #[arg(long)]
    pub drain_timeout: Option<u64>,
    /// The coordinator certificate's fingerprint, as `buildpool serve` prints it
    /// (sha256:...). Once: for every server without a pin of its own; once per --server:
    /// each pins the --server at its place.
    #[arg(long = "tls-fingerprint", value_name = "SHA256")]
    pub tls_fingerprints: Vec<String>,
    /// Trust coordinators whose certificate chains to this CA (PEM) instead of a pin.
    #[arg(long, value_name = "FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for coordinators that require mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// Key of the client certificate.
    #[arg(long, value_name = "FILE", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// How jobs are contained: bwrap (default) or none.
    #[arg(long, value_name = "MODE")]
    pub sandbox: Option<String>,
    /// Disk budget for workspaces and caches, in GB (default: half the free space).
    #[arg(long, value_name = "GB")]
    pub max_disk_gb: Option<f64>,
    /// Serve Prometheus /metrics here, e.g. 127.0.0.1:9464 (default: [metrics] listen_addr,
    /// else not at all).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// One sccache store for the whole fleet, as `[cache] shared`.
    #[arg(long, value_name = "URL")]
    pub cache_shared: Option<String>,
}

/// The environment's part of the configuration, read once, so that
/// [`AgentConfig::resolve`] depends on its arguments alone.
#[derive(Debug, Default, Clone)]
pub struct Environment {
    /// `BUILDPOOL_TOKEN`, trimmed; `None` when unset or blank.
    pub token: Option<String>,
    /// systemd's `CREDENTIALS_DIRECTORY` (`LoadCredential=`): its `token` file is a token
    /// source, and the whole directory is a secret no job may see.
    pub credentials_dir: Option<PathBuf>,
}

impl Environment {
    /// The variables of this process.
    pub fn from_process() -> Self {
        Self {
            token: std::env::var(TOKEN_ENV)
                .ok()
                .map(|token| token.trim().to_owned())
                .filter(|token| !token.is_empty()),
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        }
    }
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
    /// The fleet's shared sccache store (`[cache] shared`); implies `sccache`.
    pub shared_cache: Option<SharedCache>,
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
fn load_token(environment: &Environment, token_file: Option<&Path>) -> Result<String, ConfigError> {
    if let Some(token) = &environment.token {
        return Ok(token.clone());
    }
    let credential = environment
        .credentials_dir
        .as_ref()
        .map(|dir| dir.join("token"))
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

/// How a `wss://` server without trust settings of its own trusts its coordinator: the
/// command line's pin or CA file.
#[derive(Debug, Clone, Copy)]
struct DefaultTrust<'a> {
    fingerprint: Option<&'a str>,
    ca_file: Option<&'a Path>,
}

/// The servers to connect to: the command line's replace the file's, which are the seed's
/// single `[server]` followed by `[[servers]]`. A command-line URL may carry its pin as a
/// `#sha256:...` suffix, and `--tls-fingerprint`, given once per `--server`, pins each in
/// order.
fn server_entries(
    server: Option<ServerEntry>,
    servers: Vec<ServerEntry>,
    flag_urls: Vec<String>,
    flag_fingerprints: &[String],
) -> Result<Vec<ServerEntry>, ConfigError> {
    let paired = flag_fingerprints.len() > 1;
    if flag_urls.is_empty() {
        if paired {
            return Err(ConfigError::Invalid(
                "several --tls-fingerprint flags pair with --server flags, and there are none"
                    .into(),
            ));
        }
        return Ok(server.into_iter().chain(servers).collect());
    }
    if paired && flag_fingerprints.len() != flag_urls.len() {
        return Err(ConfigError::Invalid(format!(
            "{} --tls-fingerprint flags for {} --server flags: give one for all of them, or \
             one per --server in the same order (or pin a server as URL#sha256:...)",
            flag_fingerprints.len(),
            flag_urls.len()
        )));
    }
    flag_urls
        .into_iter()
        .enumerate()
        .map(|(at, url)| {
            let (url, suffix) = match url.split_once('#') {
                Some((url, pin)) => (url.to_owned(), Some(pin.to_owned())),
                None => (url, None),
            };
            let flag = paired.then(|| flag_fingerprints[at].clone());
            let tls_fingerprint = match (suffix, flag) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::Invalid(format!(
                        "server {url}: pinned twice, by its #sha256: suffix and by \
                         --tls-fingerprint; keep one"
                    )));
                }
                (suffix, flag) => suffix.or(flag),
            };
            Ok(ServerEntry {
                url,
                name: None,
                tls_fingerprint,
                tls_ca_file: None,
            })
        })
        .collect()
}

/// The client certificate for mutual TLS: both files or neither.
fn client_cert_files(
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> Result<Option<ClientCertFiles>, ConfigError> {
    match (cert_file, key_file) {
        (Some(cert_file), Some(key_file)) => Ok(Some(ClientCertFiles {
            cert_file,
            key_file,
        })),
        (None, None) => Ok(None),
        _ => Err(ConfigError::Invalid(
            "tls_client_cert_file and tls_client_key_file go together: set both or neither".into(),
        )),
    }
}

/// Every server entry checked (see [`endpoint`]); at least one is needed.
fn server_endpoints(
    entries: Vec<ServerEntry>,
    default_trust: DefaultTrust<'_>,
    client_cert: Option<&ClientCertFiles>,
) -> Result<Vec<ServerEndpoint>, ConfigError> {
    let servers = entries
        .into_iter()
        .map(|entry| endpoint(entry, default_trust, client_cert))
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(ConfigError::Invalid(
            "no coordinator to connect to: pass --server wss://HOST:8081/ws or set [server] url / [[servers]] in the config".into(),
        ));
    }
    Ok(servers)
}

/// One server entry, checked: a `wss://` URL has exactly one way to trust the coordinator
/// (its own, else the command line's), a `ws://` URL none.
fn endpoint(
    entry: ServerEntry,
    default_trust: DefaultTrust<'_>,
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
            default_trust.fingerprint.map(str::to_owned),
            default_trust.ca_file.map(Path::to_owned),
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

/// The slot count: as given, else one per CPU; between 1 and 1024.
fn max_jobs(given: Option<u32>) -> Result<u32, ConfigError> {
    let max_jobs = given.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
    });
    if max_jobs == 0 || max_jobs > 1024 {
        return Err(ConfigError::Invalid(format!(
            "max_jobs must be between 1 and 1024, not {max_jobs}"
        )));
    }
    Ok(max_jobs)
}

/// The file's labels and the command line's together: a flag adds a label, it does not
/// replace the file's.
fn labels(file: Vec<String>, flags: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut labels = file;
    labels.extend(flags);
    buildpool_core::spec::validate_labels(&labels)
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    Ok(labels)
}

/// A named choice (`auto`/`nix`/`host`, `bwrap`/`none`) as given, else its default.
fn choice<T: std::str::FromStr<Err = String>>(
    given: Option<&str>,
    default: &str,
) -> Result<T, ConfigError> {
    given
        .unwrap_or(default)
        .parse()
        .map_err(ConfigError::Invalid)
}

/// The disk budget in bytes; `None` leaves it to the agent's start (a share of the free
/// space).
fn max_disk_bytes(max_disk_gb: Option<f64>) -> Result<Option<u64>, ConfigError> {
    let Some(gb) = max_disk_gb else {
        return Ok(None);
    };
    if !(gb.is_finite() && gb > 0.0) {
        return Err(ConfigError::Invalid(format!(
            "max_disk_gb must be a positive number of gigabytes, not {gb}"
        )));
    }
    // The cast saturates; the value was checked positive and finite.
    Ok(Some((gb * 1e9) as u64))
}

/// The fleet's shared compilation cache, if one is configured. sccache runs inside the
/// job's sandbox, so the store is out of reach when jobs have no network.
fn shared_cache(url: Option<&str>, network: bool) -> Result<Option<SharedCache>, ConfigError> {
    let Some(url) = url else {
        return Ok(None);
    };
    let cache = url
        .parse::<SharedCache>()
        .map_err(|error| ConfigError::Invalid(error.to_string()))?;
    if !network {
        return Err(ConfigError::Invalid(format!(
            "[cache] shared = \"{cache}\" needs [sandbox] network = true: each job's \
             sccache reaches the store from inside the job's sandbox"
        )));
    }
    Ok(Some(cache))
}

/// Who a root agent's jobs run as: the configured user, else `nobody`.
fn sandbox_user(configured: Option<&str>) -> Result<JobUser, ConfigError> {
    configured.map_or_else(
        || Ok(JobUser::nobody()),
        |user| JobUser::find(user).map_err(ConfigError::Invalid),
    )
}

/// The agent's secrets a job must not see: every place a token may come from, and the
/// client key with its certificate.
fn secret_paths(
    token_file: Option<PathBuf>,
    environment: &Environment,
    client_cert: Option<&ClientCertFiles>,
) -> Vec<PathBuf> {
    let mut secret_paths: Vec<PathBuf> = token_file.into_iter().collect();
    secret_paths.push(DEFAULT_TOKEN_FILE.into());
    secret_paths.extend(environment.credentials_dir.clone());
    if let Some(cert) = client_cert {
        secret_paths.extend([cert.cert_file.clone(), cert.key_file.clone()]);
    }
    secret_paths
}

impl AgentConfig {
    /// Merges the sources, flags over the environment's token over the file over
    /// defaults, and validates the result.
    pub fn resolve(
        file: FileConfig,
        environment: &Environment,
        flags: Overrides,
    ) -> Result<Self, ConfigError> {
        let entries = server_entries(
            file.server,
            file.servers,
            flags.servers,
            &flags.tls_fingerprints,
        )?;
        let client_cert = client_cert_files(
            flags.tls_client_cert.or(file.auth.tls_client_cert_file),
            flags.tls_client_key.or(file.auth.tls_client_key_file),
        )?;
        let default_trust = DefaultTrust {
            // One pin for all; several were paired with the servers above.
            fingerprint: match flags.tls_fingerprints.as_slice() {
                [one] => Some(one.as_str()),
                _ => None,
            },
            ca_file: flags.tls_ca_file.as_deref(),
        };
        let servers = server_endpoints(entries, default_trust, client_cert.as_ref())?;
        let max_jobs = max_jobs(flags.jobs.or(file.worker.max_jobs))?;
        let labels = labels(file.worker.labels, flags.labels)?;
        let env = choice(flags.env.as_deref().or(file.nix.env.as_deref()), "auto")?;
        let token_file = flags.token_file.or(file.auth.token_file);
        let token = load_token(environment, token_file.as_deref())?;
        let sandbox = choice(
            flags.sandbox.as_deref().or(file.sandbox.mode.as_deref()),
            "bwrap",
        )?;
        let max_disk_bytes = max_disk_bytes(flags.max_disk_gb.or(file.storage.max_disk_gb))?;
        let sandbox_user = sandbox_user(file.sandbox.user.as_deref())?;
        let sandbox_network = file.sandbox.network.unwrap_or(true);
        let shared_cache = shared_cache(
            flags.cache_shared.or(file.cache.shared).as_deref(),
            sandbox_network,
        )?;
        Ok(Self {
            servers,
            id: flags.id.or(file.worker.id).unwrap_or_else(|| {
                buildpool_core::host::hostname().unwrap_or_else(|| "build-agent".to_owned())
            }),
            max_jobs,
            labels,
            git_cache_dir: flags
                .git_cache_dir
                .or(file.storage.git_cache_dir)
                .unwrap_or_else(|| "/var/cache/build-agent/repos".into()),
            worktree_dir: flags
                .worktree_dir
                .or(file.storage.worktree_dir)
                .unwrap_or_else(|| "/tmp/build-agent/jobs".into()),
            env,
            prewarm_packages: file.nix.prewarm_packages,
            token,
            kill_grace: Duration::from_millis(file.worker.kill_grace_ms.unwrap_or(1500)),
            default_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(
                flags
                    .drain_timeout
                    .or(file.worker.drain_timeout_secs)
                    .unwrap_or(600),
            ),
            sandbox,
            metrics_addr: flags.metrics_addr.or(file.metrics.listen_addr),
            sandbox_network,
            sandbox_user,
            sccache: file.cache.sccache || shared_cache.is_some(),
            shared_cache,
            max_disk_bytes,
            workspace_ttl: Duration::from_secs(
                file.storage.workspace_ttl_days.unwrap_or(14) * 24 * 3600,
            ),
            secret_paths: secret_paths(token_file, environment, client_cert.as_ref()),
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
        let config =
            AgentConfig::resolve(file, &Environment::default(), with_token()).expect("valid");
        assert_eq!(config.servers.len(), 2);
        assert_eq!(config.servers[0].name, "project-a");
        assert_eq!(config.servers[1].name, "ws://orchestrator2:8081/ws");
        assert_eq!((config.id.as_str(), config.max_jobs), ("shared-worker", 8));
        assert_eq!(config.prewarm_packages, ["nixpkgs#rustc"]);
        assert_eq!(config.token, "secret");
    }

    #[test]
    fn the_environment_token_wins_and_the_credentials_stay_hidden() {
        let file: FileConfig =
            toml::from_str("[server]\nurl = \"ws://a:8081/ws\"").expect("parses");
        let credentials = PathBuf::from("/run/credentials/build-agent.service");
        let environment = Environment {
            token: Some("from-the-environment".into()),
            credentials_dir: Some(credentials.clone()),
        };
        let config = AgentConfig::resolve(file, &environment, with_token()).expect("valid");
        assert_eq!(config.token, "from-the-environment");
        assert!(config.secret_paths.contains(&credentials));
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
        let config = AgentConfig::resolve(file, &Environment::default(), overrides).expect("valid");
        assert_eq!(config.max_jobs, 5);
        assert_eq!(config.servers[0].url.to_string(), "ws://b:1/ws");

        let typo = toml::from_str::<FileConfig>("[worker]\nmax_job = 2");
        assert!(typo.is_err(), "unknown keys are rejected, not ignored");
        let none =
            AgentConfig::resolve(FileConfig::default(), &Environment::default(), with_token())
                .expect_err("no server");
        assert!(none.to_string().contains("--server"));
        let zero = AgentConfig::resolve(
            FileConfig::default(),
            &Environment::default(),
            Overrides {
                jobs: Some(0),
                servers: vec!["ws://a/ws".into()],
                ..with_token()
            },
        );
        assert!(zero.is_err());
    }

    #[test]
    fn a_shared_cache_turns_sccache_on_and_needs_the_jobs_network() {
        let file = |extra: &str| -> FileConfig {
            toml::from_str(&format!("[server]\nurl = \"ws://a:8081/ws\"\n{extra}")).expect("parses")
        };
        let config = AgentConfig::resolve(
            file("[cache]\nshared = \"redis://cache.lan\""),
            &Environment::default(),
            with_token(),
        )
        .expect("valid");
        assert!(config.sccache);
        assert_eq!(
            config.shared_cache.map(|cache| cache.to_string()),
            Some("redis://cache.lan".into())
        );

        let flag = AgentConfig::resolve(
            file(""),
            &Environment::default(),
            Overrides {
                cache_shared: Some("memcached://m:11211".into()),
                ..with_token()
            },
        )
        .expect("valid");
        assert!(flag.shared_cache.is_some() && flag.sccache);

        let offline = AgentConfig::resolve(
            file("[cache]\nshared = \"redis://cache.lan\"\n[sandbox]\nnetwork = false"),
            &Environment::default(),
            with_token(),
        )
        .expect_err("no network, no store");
        assert!(offline.to_string().contains("network = true"), "{offline}");
        let unknown = AgentConfig::resolve(
            file("[cache]\nshared = \"ftp://cache.lan\""),
            &Environment::default(),
            with_token(),
        )
        .expect_err("unknown scheme");
        assert!(unknown.to_string().contains("unknown scheme"), "{unknown}");
    }

    #[test]
    fn each_server_on_the_command_line_takes_its_own_pin() {
        let (x, y) = (
            format!("sha256:{}", "a".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
        );
        let pins = |config: AgentConfig| -> Vec<String> {
            config
                .servers
                .iter()
                .map(|server| match server.tls.as_ref().map(|tls| &tls.trust) {
                    Some(ServerTrust::Pinned(pin)) => pin.to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        let resolve = |servers: Vec<String>, fingerprints: Vec<String>| {
            AgentConfig::resolve(
                FileConfig::default(),
                &Environment::default(),
                Overrides {
                    servers,
                    tls_fingerprints: fingerprints,
                    ..with_token()
                },
            )
        };
        let (a, b) = ("wss://a:8081/ws".to_owned(), "wss://b:8081/ws".to_owned());
        let in_order = resolve(vec![a.clone(), b.clone()], vec![x.clone(), y.clone()]);
        assert_eq!(pins(in_order.expect("paired")), [x.clone(), y.clone()]);
        let one_for_all = resolve(vec![a.clone(), b.clone()], vec![x.clone()]);
        assert_eq!(pins(one_for_all.expect("shared")), [x.clone(), x.clone()]);
        let suffixed = resolve(vec![format!("{a}#{y}"), b.clone()], vec![x.clone()]);
        assert_eq!(pins(suffixed.expect("suffix")), [y.clone(), x.clone()]);

        let three = resolve(
            vec![a.clone(), b.clone()],
            vec![x.clone(), y.clone(), x.clone()],
        );
        assert!(
            three
                .expect_err("3 for 2")
                .to_string()
                .contains("same order")
        );
        let twice = resolve(vec![format!("{a}#{y}"), b], vec![x.clone(), y]);
        assert!(
            twice
                .expect_err("twice")
                .to_string()
                .contains("pinned twice")
        );
        let none = resolve(Vec::new(), vec![x.clone(), x]);
        assert!(
            none.expect_err("no servers")
                .to_string()
                .contains("there are none")
        );
    }
}
