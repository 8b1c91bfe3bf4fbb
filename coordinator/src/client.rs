//! The control API, client side: finding and dialling a repository's coordinator, and
//! typed calls on it.
//!
//! An edge adapter like `server::control`: domain types go in and come out, protobuf stays
//! in here. Unary calls get [`CALL_TIMEOUT`]; a job's event stream is kept alive by HTTP/2
//! keepalive instead, since a build may rightly say nothing for minutes.

use std::sync::Arc;
use std::time::Duration;

use buildpool_core::status::{CancelReply, CoordinatorStatus, LogPage, LogRequest, Submission};
use buildpool_core::{ArtifactChunk, JobEvent, JobId};
use buildpool_proto::control_client::ControlClient;
use buildpool_proto::convert::{DecodeError, decode_job_event};
use buildpool_proto::tls::{self, Fingerprint, ServerTrust, TlsError};
use buildpool_proto::{
    CancelRequest, DrainAgentRequest, FetchArtifactsRequest, JobLogRequest, StatusRequest,
    SubmitRequest, WatchRequest,
};
use rustls::pki_types::ServerName;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::discovery::{self, COORDINATOR_ENV};

/// The fingerprint to pin when `BUILDPOOL_COORDINATOR` is an `https://` URL.
pub const FINGERPRINT_ENV: &str = "BUILDPOOL_TLS_FINGERPRINT";
use crate::repo::Repo;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline for unary calls (status, cancel, log pages, drain).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline for fetching a job's executables (up to 512 MiB).
const ARTIFACTS_TIMEOUT: Duration = Duration::from_secs(600);

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

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no coordinator is running for {0}")]
    NotRunning(String),
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(transparent)]
    Token(#[from] crate::auth::TokenError),
    #[error("the token is not valid in an HTTP header")]
    BadToken,
    #[error(
        "{0} is TLS: set {FINGERPRINT_ENV}=sha256:... to the fingerprint `buildpool serve` printed"
    )]
    NoFingerprint(String),
    #[error(transparent)]
    Tls(TlsError),
    #[error(
        "{0} is plain text beyond loopback, where the credential would cross the network \
         unencrypted; use the https:// URL of a coordinator whose control API listens there"
    )]
    PlainTextRemote(String),
    /// The coordinator answered with an error; its message says why (and is all a user
    /// needs to read).
    #[error("{message}")]
    Call { refusal: Refusal, message: String },
    #[error("the coordinator sent an answer this client cannot read: {0}")]
    Decode(DecodeError),
}

impl From<DecodeError> for ClientError {
    fn from(error: DecodeError) -> Self {
        ClientError::Decode(error)
    }
}

/// What kind of "no" the coordinator answered, as far as a client acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such job (any more): a client that was following it cannot come back to it.
    NotFound,
    Other,
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let refusal = match status.code() {
            tonic::Code::NotFound => Refusal::NotFound,
            _ => Refusal::Other,
        };
        ClientError::Call {
            refusal,
            message: status.message().to_owned(),
        }
    }
}

/// A connection to one coordinator's control API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: ControlClient<InterceptedService<Channel, Bearer>>,
}

/// Whether `url` (`http://HOST:PORT`) stays on this host.
fn plain_text_is_local(url: &str) -> bool {
    url.parse::<tonic::codegen::http::Uri>()
        .ok()
        .and_then(|uri| uri.host().map(crate::config::is_loopback))
        .unwrap_or(false)
}

/// Why a connection failed, in words: a certificate pin mismatch (naming both
/// fingerprints) when that is the cause, else the error and its first cause.
fn connect_failure(error: &tonic::transport::Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(mismatch) = current
            .downcast_ref::<std::io::Error>()
            .and_then(tls::PinMismatch::find)
        {
            return mismatch.to_string();
        }
        cause = current.source();
    }
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// A request with the unary-call deadline.
fn timed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

impl Client {
    /// Dials a coordinator's control API: `http://` on loopback, or `https://` with the
    /// certificate fingerprint to pin.
    pub async fn connect(
        url: &str,
        token: &str,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Self, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            url: url.to_owned(),
            reason,
        };
        // Over TLS, the connector below does the TLS; the endpoint itself stays http.
        let (plain_url, tls) = match url.strip_prefix("https://") {
            Some(rest) => {
                let fingerprint =
                    fingerprint.ok_or_else(|| ClientError::NoFingerprint(url.to_owned()))?;
                let config = tls::client_config(&ServerTrust::Pinned(fingerprint), None, &[b"h2"])
                    .map_err(|e| unreachable(e.to_string()))?;
                (format!("http://{rest}"), Some(config))
            }
            None if plain_text_is_local(url) => (url.to_owned(), None),
            None => return Err(ClientError::PlainTextRemote(url.to_owned())),
        };
        let endpoint = Endpoint::from_shared(plain_url)
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let connected = match tls {
            Some(config) => {
                let connector = tower::service_fn(move |uri: tonic::codegen::http::Uri| {
                    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
                    async move {
                        let host = uri.host().unwrap_or_default().to_owned();
                        let port = uri.port_u16().unwrap_or(443);
                        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                        let _ = tcp.set_nodelay(true);
                        let name = ServerName::try_from(host).map_err(|e| {
                            std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
                        })?;
                        let stream = connector.connect(name, tcp).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                });
                endpoint.connect_with_connector(connector).await
            }
            None => endpoint.connect().await,
        };
        let channel = connected.map_err(|e| unreachable(connect_failure(&e)))?;
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::BadToken)?;
        let grpc = ControlClient::with_interceptor(channel, Bearer(header))
            .max_decoding_message_size(8 * 1024 * 1024);
        Ok(Self { grpc })
    }

    /// Finds the coordinator of `repo` (or the one `BUILDPOOL_COORDINATOR` names) and dials
    /// it. Returns the client and the URL it dialled.
    pub async fn connect_to_running(repo: &Repo) -> Result<(Self, String), ClientError> {
        let (url, token_file, fingerprint) = match std::env::var(COORDINATOR_ENV) {
            Ok(url) if !url.is_empty() => (url, None, std::env::var(FINGERPRINT_ENV).ok()),
            _ => {
                let found = discovery::read(&repo.state_dir()).ok_or_else(|| {
                    ClientError::NotRunning(repo.common_dir.display().to_string())
                })?;
                (found.control_url, found.token_file, found.tls_fingerprint)
            }
        };
        let fingerprint = fingerprint
            .filter(|text| !text.is_empty())
            .map(|text| text.parse())
            .transpose()
            .map_err(ClientError::Tls)?;
        let token_file = token_file.unwrap_or_else(crate::auth::default_token_file);
        let token = crate::auth::load(&token_file, false)?;
        let client = Self::connect(&url, &token.value, fingerprint).await?;
        Ok((client, url))
    }

    /// Queues a job; its events follow on the returned stream. A job whose every stream is
    /// dropped is cancelled after the coordinator's client grace: nobody waits for it.
    pub async fn submit(&self, submission: Submission) -> Result<JobEvents, ClientError> {
        let stream = self
            .grpc
            .clone()
            .submit(SubmitRequest::from(submission))
            .await?;
        Ok(JobEvents {
            stream: stream.into_inner(),
        })
    }

    /// Follows a submitted job again: its current phase, its output after the first
    /// `from_offset` bytes, then its result.
    pub async fn watch(&self, job_id: JobId, from_offset: u64) -> Result<JobEvents, ClientError> {
        let request = WatchRequest {
            job_id,
            from_offset,
        };
        let stream = self.grpc.clone().watch(request).await?;
        Ok(JobEvents {
            stream: stream.into_inner(),
        })
    }

    pub async fn cancel(&self, job_id: JobId) -> Result<CancelReply, ClientError> {
        let reply = self
            .grpc
            .clone()
            .cancel(timed(CancelRequest { job_id }))
            .await?;
        Ok(reply.into_inner().into())
    }

    pub async fn status(&self) -> Result<CoordinatorStatus, ClientError> {
        let reply = self.grpc.clone().status(timed(StatusRequest {})).await?;
        Ok(reply.into_inner().try_into()?)
    }

    pub async fn job_log(&self, request: LogRequest) -> Result<LogPage, ClientError> {
        let reply = self
            .grpc
            .clone()
            .job_log(timed(JobLogRequest::from(request)))
            .await?;
        Ok(reply.into_inner().into())
    }

    /// Asks an agent to drain; returns how many of its connections were told.
    pub async fn drain_agent(&self, agent_id: &str) -> Result<u32, ClientError> {
        let request = DrainAgentRequest {
            agent_id: agent_id.to_owned(),
        };
        let reply = self.grpc.clone().drain_agent(timed(request)).await?;
        Ok(reply.into_inner().connections)
    }
}

impl Client {
    /// The executables a job sent back, as a stream of chunks.
    pub async fn fetch_artifacts(&self, job_id: JobId) -> Result<ArtifactChunks, ClientError> {
        let mut request = tonic::Request::new(FetchArtifactsRequest { job_id });
        request.set_timeout(ARTIFACTS_TIMEOUT);
        let stream = self.grpc.clone().fetch_artifacts(request).await?;
        Ok(ArtifactChunks {
            stream: stream.into_inner(),
        })
    }
}

/// The chunks of a job's executables, in order.
#[derive(Debug)]
pub struct ArtifactChunks {
    stream: tonic::Streaming<buildpool_proto::ArtifactChunk>,
}

impl ArtifactChunks {
    /// The next chunk; `None` at the end. [`ARTIFACTS_TIMEOUT`] bounds the whole transfer.
    pub async fn next(&mut self) -> Result<Option<ArtifactChunk>, ClientError> {
        Ok(self.stream.message().await?.map(ArtifactChunk::from))
    }
}

/// The events of one submitted job, in order.
#[derive(Debug)]
pub struct JobEvents {
    stream: tonic::Streaming<buildpool_proto::JobEvent>,
}

impl JobEvents {
    /// The next event and the job it belongs to; `None` when the coordinator ended the
    /// stream. Cancel-safe: an event is never lost by dropping the future.
    pub async fn next(&mut self) -> Result<Option<(JobId, JobEvent)>, ClientError> {
        match self.stream.message().await? {
            Some(event) => Ok(Some(decode_job_event(event)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_credential_is_never_sent_in_plain_text_beyond_loopback() {
        assert!(plain_text_is_local("http://127.0.0.1:1"));
        assert!(plain_text_is_local("http://[::1]:1"));
        assert!(plain_text_is_local("http://localhost:1"));
        assert!(!plain_text_is_local("http://192.0.2.7:1"));
        assert!(!plain_text_is_local("http://build.example:1"));
        let refused = Client::connect("http://192.0.2.7:1", "secret", None).await;
        assert!(
            matches!(refused, Err(ClientError::PlainTextRemote(_))),
            "{refused:?}"
        );
    }
}
