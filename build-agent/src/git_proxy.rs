//! Fetching through a coordinator's git tunnel.
//!
//! For `git://` URLs git runs a proxy command (`GIT_PROXY_COMMAND`) and speaks the git
//! protocol over its stdin and stdout. Ours is `build-agent git-proxy`: it opens an
//! authenticated tunnel on the coordinator's job bus port, over the same TLS as the bus,
//! and splices it to stdin and stdout. git runs the command with no arguments of ours, so
//! the command is a symlink to the agent's binary whose name says what to do
//! ([`install_proxy_command`], [`invoked_as_proxy`]): no shell runs per fetch. The agent
//! passes the coordinator, its trust settings and the credential in the environment of
//! the one git process that fetches (never a job's).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use buildpool_proto::socket::{ServerUrl, SocketError};
use buildpool_proto::tls::{self, ClientCertFiles, ServerTrust, TlsError};
use buildpool_proto::tunnel::{Tunnel, TunnelError};

use crate::git_cache::GitEnv;

const ENV_SERVER: &str = "BUILDPOOL_TUNNEL_SERVER";
const ENV_FINGERPRINT: &str = "BUILDPOOL_TUNNEL_FINGERPRINT";
const ENV_CA_FILE: &str = "BUILDPOOL_TUNNEL_CA_FILE";
const ENV_CLIENT_CERT: &str = "BUILDPOOL_TUNNEL_CLIENT_CERT";
const ENV_CLIENT_KEY: &str = "BUILDPOOL_TUNNEL_CLIENT_KEY";
const ENV_TOKEN: &str = "BUILDPOOL_TOKEN";
/// The proxy command's name in the git cache directory (repository ids never start with a
/// dot).
const PROXY_COMMAND_NAME: &str = ".git-proxy";

#[derive(Debug, thiserror::Error)]
pub enum GitProxyError {
    #[error("{0} is not set; `build-agent git-proxy` is run by git for the agent, not by hand")]
    Unset(&'static str),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

/// How an agent trusts one coordinator, with the client config built from it.
#[derive(Debug, Clone)]
pub struct EndpointTls {
    pub trust: ServerTrust,
    pub client_cert: Option<ClientCertFiles>,
    pub config: Arc<rustls::ClientConfig>,
}

impl EndpointTls {
    pub fn new(trust: ServerTrust, client_cert: Option<ClientCertFiles>) -> Result<Self, TlsError> {
        let config = tls::client_config(&trust, client_cert.as_ref(), &[])?;
        Ok(Self {
            trust,
            client_cert,
            config,
        })
    }
}

/// Makes the agent's proxy command in `dir`: a symlink to the agent's binary, which
/// [`invoked_as_proxy`] recognises by its name. Returns its path.
pub fn install_proxy_command(dir: &Path) -> std::io::Result<PathBuf> {
    let agent = std::env::current_exe()?;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(PROXY_COMMAND_NAME);
    let temporary = dir.join(format!("{PROXY_COMMAND_NAME}.{}", std::process::id()));
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    std::os::unix::fs::symlink(agent, &temporary)?;
    std::fs::rename(&temporary, &path)?;
    Ok(path)
}

/// Whether git runs this process as its proxy command (through the link
/// [`install_proxy_command`] makes), rather than someone running `build-agent`.
pub fn invoked_as_proxy() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|program| Path::new(&program).file_name() == Some(PROXY_COMMAND_NAME.as_ref()))
}

/// The environment that makes git fetch from `server` through its tunnel.
pub fn environment(
    proxy_command: &Path,
    server: &ServerUrl,
    tls: Option<&EndpointTls>,
    token: &str,
) -> GitEnv {
    let mut env = vec![
        (
            "GIT_PROXY_COMMAND".to_owned(),
            proxy_command.display().to_string(),
        ),
        (ENV_SERVER.to_owned(), server.to_string()),
        (ENV_TOKEN.to_owned(), token.to_owned()),
    ];
    if let Some(tls) = tls {
        env.push(match &tls.trust {
            ServerTrust::Pinned(fingerprint) => {
                (ENV_FINGERPRINT.to_owned(), fingerprint.to_string())
            }
            ServerTrust::CaFile(path) => (ENV_CA_FILE.to_owned(), path.display().to_string()),
        });
        if let Some(files) = &tls.client_cert {
            env.push((
                ENV_CLIENT_CERT.to_owned(),
                files.cert_file.display().to_string(),
            ));
            env.push((
                ENV_CLIENT_KEY.to_owned(),
                files.key_file.display().to_string(),
            ));
        }
    }
    GitEnv(env)
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// `build-agent git-proxy HOST PORT`: splices stdin and stdout to the tunnel of the
/// coordinator the environment names (git's HOST and PORT are placeholders).
pub async fn run() -> Result<(), GitProxyError> {
    let server = ServerUrl::parse(&var(ENV_SERVER).ok_or(GitProxyError::Unset(ENV_SERVER))?)?;
    let token = var(ENV_TOKEN).ok_or(GitProxyError::Unset(ENV_TOKEN))?;
    let trust = match (var(ENV_FINGERPRINT), var(ENV_CA_FILE)) {
        (Some(fingerprint), _) => Some(ServerTrust::Pinned(fingerprint.parse()?)),
        (None, Some(ca_file)) => Some(ServerTrust::CaFile(ca_file.into())),
        (None, None) => None,
    };
    let client_cert = match (var(ENV_CLIENT_CERT), var(ENV_CLIENT_KEY)) {
        (Some(cert), Some(key)) => Some(ClientCertFiles {
            cert_file: cert.into(),
            key_file: key.into(),
        }),
        _ => None,
    };
    let tls = trust
        .map(|trust| EndpointTls::new(trust, client_cert))
        .transpose()?;
    let tunnel = Tunnel::open(&server, tls.as_ref().map(|tls| &tls.config), &token).await?;
    let stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    tunnel.splice(stdio).await?;
    Ok(())
}
