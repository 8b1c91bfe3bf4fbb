//! The control API client: finding and dialling a repository's coordinator.

use std::time::Duration;

use buildpool_proto::control_client::ControlClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::discovery::{self, COORDINATOR_ENV};
use crate::repo::Repo;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline for unary calls (status, cancel, log pages); streams are kept alive by HTTP/2
/// keepalive instead.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Adds the bearer token to every request.
#[derive(Debug, Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Client = ControlClient<InterceptedService<Channel, Bearer>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no coordinator is running for {0}")]
    NotRunning(String),
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("token: {0}")]
    Token(#[from] crate::auth::TokenError),
    #[error("the token is not valid in an HTTP header")]
    BadToken,
}

/// Dials a coordinator's control API.
pub async fn connect(url: &str, token: &str) -> Result<Client, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        url: url.to_owned(),
        reason,
    };
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| unreachable(format!("{e} ({:?})", std::error::Error::source(&e))))?;
    let header = format!("Bearer {token}")
        .parse()
        .map_err(|_| ClientError::BadToken)?;
    Ok(ControlClient::with_interceptor(channel, Bearer(header))
        .max_decoding_message_size(8 * 1024 * 1024))
}

/// Finds the coordinator of `repo` (or the one `BUILDPOOL_COORDINATOR` names) and dials it.
pub async fn connect_to_running(repo: &Repo) -> Result<(Client, String), ClientError> {
    let (url, token_file) = match std::env::var(COORDINATOR_ENV) {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let found = discovery::read(&repo.state_dir())
                .ok_or_else(|| ClientError::NotRunning(repo.common_dir.display().to_string()))?;
            (found.control_url, found.token_file)
        }
    };
    let token_file = token_file.unwrap_or_else(crate::auth::default_token_file);
    let token = crate::auth::load(&token_file, false)?;
    let client = connect(&url, &token.value).await?;
    Ok((client, url))
}
