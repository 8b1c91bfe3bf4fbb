//! The job bus, agent side: dial a coordinator, handshake, then carry messages both ways.
//!
//! Transport only. Every decision about jobs is the [`Agent`]'s; this module turns the
//! coordinator's messages into calls on it, announces the agent's offer when it changes,
//! keeps the link alive with heartbeats and reconnects with backoff. Framing, the bounded
//! outbound queue and write deadlines belong to [`buildpool_proto::socket`].

use std::sync::Arc;
use std::time::Duration;

use buildpool_core::bus::{AgentMessage, CoordinatorMessage, RejectCode, SlotOffer};
use buildpool_core::time::unix_millis;
use buildpool_core::{Completion, Source};
use buildpool_proto::convert::DecodeError;
use buildpool_proto::frame::FrameError;
use buildpool_proto::socket::{
    AgentSocket, HANDSHAKE_TIMEOUT, Inbox, Outbox, ServerUrl, SocketError, Transport,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, Link};
use crate::archives::{ArchiveSource, TunnelArchives};
use crate::backoff::Backoff;
use crate::git_cache::{GitEnv, GitRemote};
use crate::git_proxy::EndpointTls;
use crate::job_table::PoolView;

/// Messages waiting for the writer. Output beyond this waits in the job's pipe
/// (backpressure).
const OUTBOUND_CAPACITY: usize = 64;
/// The shortest heartbeat interval and timeout an agent accepts from a coordinator, so a
/// misconfigured one cannot make it spin.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("the coordinator rejected this agent ({code}): {message}")]
    Rejected { code: RejectCode, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the coordinator sent nothing for {0:?}; connection presumed dead")]
    HeartbeatTimeout(Duration),
    #[error("connection lost while writing")]
    WriteFailed,
}

impl SessionError {
    /// Whether only a change of configuration can make the next attempt succeed.
    fn needs_an_operator(&self) -> bool {
        matches!(
            self,
            SessionError::Rejected { .. }
                | SessionError::Socket(SocketError::PinMismatch(_) | SocketError::Refused { .. })
        )
    }
}

/// A coordinator to connect to.
#[derive(Debug, Clone)]
pub struct ServerEndpoint {
    pub url: ServerUrl,
    /// For logs; defaults to the URL.
    pub name: String,
    /// How to trust it; `None` for a plain `ws://` URL.
    pub tls: Option<EndpointTls>,
}

/// How the agent fetches the snapshots of one coordinator.
#[derive(Debug, Clone)]
pub enum GitLocator {
    /// A coordinator across the network: through the authenticated tunnel on its bus
    /// port, or straight from its git daemon when the assignment names the daemon's port
    /// (an insecure setup the coordinator must allow).
    Coordinator {
        /// The host the agent dialled for the job bus.
        host: String,
        /// Environment that makes git fetch through the tunnel (`GIT_PROXY_COMMAND`).
        tunnel_env: GitEnv,
    },
    /// A fixed URL, e.g. `file:///path/to/repo` for the coordinator's embedded agent.
    Fixed(String),
}

/// Where an agent's jobs take what they need from one coordinator: the snapshot through
/// git, and a spread test run's archive.
#[derive(Debug, Clone)]
pub struct JobSources {
    pub git: GitLocator,
    /// `None` where no archive can come from (a test's bare bus).
    pub archives: Option<Arc<dyn ArchiveSource>>,
}

/// The host name git sees for tunnelled fetches; the proxy command ignores it.
const TUNNEL_HOST: &str = "buildpool-tunnel";

impl GitLocator {
    fn remote(&self, source: &Source) -> GitRemote {
        match self {
            GitLocator::Coordinator { host, tunnel_env } => match source.git_port {
                Some(port) => {
                    let host = if host.contains(':') {
                        format!("[{host}]")
                    } else {
                        host.clone()
                    };
                    GitRemote::plain(format!("git://{host}:{port}{}", source.git_path))
                }
                None => GitRemote {
                    url: format!("git://{TUNNEL_HOST}{}", source.git_path),
                    env: tunnel_env.clone(),
                },
            },
            GitLocator::Fixed(url) => GitRemote::plain(url.clone()),
        }
    }
}

/// Connects to every endpoint and serves them until `shutdown`. `git_proxy` is the
/// command git runs to fetch through a coordinator's tunnel (see [`crate::git_proxy`]).
pub async fn run(
    agent: &Agent,
    endpoints: Vec<ServerEndpoint>,
    git_proxy: &std::path::Path,
    shutdown: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        let git_proxy = git_proxy.to_owned();
        tasks.spawn(async move { serve_endpoint(&agent, endpoint, &git_proxy, shutdown).await });
    }
    while tasks.join_next().await.is_some() {}
}

/// Keeps a connection to one coordinator until `shutdown`, reconnecting with backoff.
pub async fn serve_endpoint(
    agent: &Agent,
    endpoint: ServerEndpoint,
    git_proxy: &std::path::Path,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("server", agent_id = %agent.id(), server = %endpoint.name);
    if endpoint.tls.is_none() {
        tracing::warn!(parent: &span, "{} is plain ws://: the token and every snapshot cross the network unencrypted; use wss:// with a tls_fingerprint", endpoint.url);
    }
    let link = agent.register_link(&endpoint.url.to_string());
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        let started = tokio::time::Instant::now();
        let session = dial_and_serve(agent, link, &endpoint, git_proxy, shutdown.clone());
        let result = tracing::Instrument::instrument(session, span.clone()).await;
        match &result {
            Ok(()) if shutdown.is_cancelled() => break,
            Ok(()) => tracing::warn!(parent: &span, "connection to {} closed", endpoint.url),
            Err(error) if error.needs_an_operator() => tracing::error!(parent: &span, "{error}"),
            Err(error) => tracing::warn!(parent: &span, "connection to {}: {error}", endpoint.url),
        }
        backoff.connection_ended(started.elapsed());
        agent.metrics().reconnecting(&endpoint.name);
        if result.as_ref().is_err_and(SessionError::needs_an_operator) {
            // Retrying at once cannot help; the operator must fix the credential, version,
            // pin or URL.
            backoff = Backoff::new(
                Duration::from_secs(60),
                Duration::from_secs(60),
                Duration::MAX,
            );
        }
        let delay = backoff.next_delay(fastrand::f64());
        tracing::info!(parent: &span, "reconnecting in {:.1} s", delay.as_secs_f64());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => break,
        }
    }
}

async fn dial_and_serve(
    agent: &Agent,
    link: Link,
    endpoint: &ServerEndpoint,
    git_proxy: &std::path::Path,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let tls = endpoint.tls.as_ref().map(|tls| &tls.config);
    let socket = AgentSocket::connect(&endpoint.url, tls).await?;
    let sources = JobSources {
        git: GitLocator::Coordinator {
            host: endpoint.url.host.clone(),
            tunnel_env: crate::git_proxy::environment(
                git_proxy,
                &endpoint.url,
                endpoint.tls.as_ref(),
                agent.token(),
            ),
        },
        archives: Some(Arc::new(TunnelArchives {
            server: endpoint.url.clone(),
            tls: endpoint.tls.as_ref().map(|tls| Arc::clone(&tls.config)),
            token: agent.token().to_owned(),
        })),
    };
    serve(agent, link, socket, &sources, shutdown).await
}

/// Serves one connection over a stream the caller established (the coordinator's embedded
/// agent uses an in-memory stream). `link` comes from [`Agent::register_link`] and stays
/// the same across the caller's reconnects.
pub async fn serve_stream(
    agent: &Agent,
    link: Link,
    stream: impl Transport,
    sources: &JobSources,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let socket = AgentSocket::client(stream).await?;
    serve(agent, link, socket, sources, shutdown).await
}

/// Hello, welcome (or reject), then the connection's working life.
async fn serve(
    agent: &Agent,
    link: Link,
    mut socket: AgentSocket,
    sources: &JobSources,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let mut pool = agent.watch_pool();
    pool.mark_unchanged();
    let hello = agent.hello(link);
    let announced = hello.slots;
    socket.send(AgentMessage::Hello(hello)).await?;
    let welcome = match socket.recv_within(HANDSHAKE_TIMEOUT).await? {
        Some(CoordinatorMessage::Welcome(welcome)) => welcome,
        Some(CoordinatorMessage::Reject(reject)) => {
            return Err(SessionError::Rejected {
                code: reject.code,
                message: reject.message,
            });
        }
        Some(_) => return Err(SessionError::Protocol("expected a welcome first".into())),
        None => {
            return Err(SessionError::Protocol(
                "connection closed during handshake".into(),
            ));
        }
    };
    tracing::info!(coordinator = %welcome.coordinator_id, "connected");
    let (outbox, inbox) = socket.start(OUTBOUND_CAPACITY);
    let mut session = Session {
        agent,
        link,
        sources,
        heartbeat_interval: welcome.heartbeat_interval.max(MIN_HEARTBEAT_INTERVAL),
        heartbeat_timeout: welcome.heartbeat_timeout.max(MIN_HEARTBEAT_TIMEOUT),
        outbox,
        inbox,
        pool,
    };
    let result = session.converse(announced, &shutdown).await;
    // Jobs keep running; their output waits (bounded) for the next connection.
    agent.link_down(link);
    let Session { outbox, inbox, .. } = session;
    drop(outbox);
    inbox.finish().await;
    result
}

/// One welcomed connection of a link.
struct Session<'a> {
    agent: &'a Agent,
    link: Link,
    sources: &'a JobSources,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    outbox: Outbox<AgentMessage>,
    inbox: Inbox<CoordinatorMessage>,
    pool: watch::Receiver<PoolView>,
}

impl Session<'_> {
    async fn send(&self, message: AgentMessage) -> Result<(), SessionError> {
        self.outbox
            .send(message)
            .await
            .map_err(|_| SessionError::WriteFailed)
    }

    /// The offer as it stands, marked as seen.
    fn current_offer(&mut self) -> SlotOffer {
        Agent::offer(&self.pool.borrow_and_update(), self.link)
    }

    /// The working life of the connection, until it ends or `shutdown`. `announced` is the
    /// offer the hello carried; a change since then is sent at once.
    async fn converse(
        &mut self,
        mut announced: SlotOffer,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        // Results that ended while we were away go first; running jobs resume streaming
        // through the link as soon as it is up.
        for message in self.agent.link_up(self.link, self.outbox.clone()) {
            self.send(message).await?;
        }
        let offer = self.current_offer();
        if offer != announced {
            announced = offer;
            self.send(AgentMessage::Slots(offer)).await?;
        }
        let mut heartbeat = tokio::time::interval(self.heartbeat_interval);
        let mut last_heard = tokio::time::Instant::now();
        let mut reported_disk = self.agent.disk_usage();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = self.outbox.closed() => return Err(SessionError::WriteFailed),
                () = tokio::time::sleep_until(last_heard + self.heartbeat_timeout) => {
                    return Err(SessionError::HeartbeatTimeout(self.heartbeat_timeout));
                }
                _ = heartbeat.tick() => {
                    // A full queue is already proof of life to the coordinator; skip this beat.
                    let beat = AgentMessage::Heartbeat { sent_at_unix_ms: unix_millis() };
                    let _ = self.outbox.try_send(beat);
                    // Disk use changes with every job; the beat's pace is news enough.
                    let disk = self.agent.disk_usage();
                    if disk != reported_disk && self.outbox.try_send(AgentMessage::Disk(disk)).is_ok() {
                        reported_disk = disk;
                    }
                }
                changed = self.pool.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let offer = self.current_offer();
                    if offer != announced {
                        announced = offer;
                        self.send(AgentMessage::Slots(offer)).await?;
                    }
                }
                message = self.inbox.recv() => {
                    last_heard = tokio::time::Instant::now();
                    let message = match message {
                        Ok(Some(message)) => message,
                        Ok(None) => return Ok(()),
                        Err(error) => match unreadable_assignment(&error) {
                            // One assignment this agent cannot read fails that job alone.
                            Some(failed) => {
                                self.send(failed).await?;
                                announced = self.current_offer();
                                self.send(AgentMessage::Slots(announced)).await?;
                                continue;
                            }
                            None => return Err(error.into()),
                        },
                    };
                    let assignment = matches!(message, CoordinatorMessage::Assign(_));
                    if let Some(reply) = handle_message(self.agent, self.link, message, self.sources) {
                        self.send(reply).await?;
                    }
                    if assignment {
                        // The coordinator counted the assignment against our offer (or zeroed
                        // it on a decline): always tell it the real offer now, so a
                        // take-and-release too quick to be seen as a change cannot leave it
                        // believing in fewer free slots than there are.
                        announced = self.current_offer();
                        self.send(AgentMessage::Slots(announced)).await?;
                    }
                }
            }
        }
    }
}

/// The answer to an assignment whose spec or source this agent cannot read (a newer
/// coordinator's job kind, say): the job fails with the reason instead of the link
/// dropping, which would only make the coordinator retry it, here or elsewhere.
fn unreadable_assignment(error: &SocketError) -> Option<AgentMessage> {
    let SocketError::Frame(FrameError::Invalid(DecodeError::Assignment { key, error })) = error
    else {
        return None;
    };
    tracing::warn!(
        job_id = key.job_id,
        attempt = key.attempt,
        "cannot read an assignment: {error}"
    );
    let reason = format!("the agent cannot read this assignment: {error}");
    Some(AgentMessage::Finished {
        key: *key,
        completion: Completion::failed(reason),
    })
}

/// Carries out one coordinator message; returns the reply to send, if any.
fn handle_message(
    agent: &Agent,
    link: Link,
    message: CoordinatorMessage,
    sources: &JobSources,
) -> Option<AgentMessage> {
    match message {
        CoordinatorMessage::Heartbeat { .. } => None,
        CoordinatorMessage::Assign(assignment) => {
            let key = assignment.key;
            let remote = sources.git.remote(&assignment.source);
            match agent.assign(link, *assignment, remote, sources.archives.clone()) {
                Ok(()) => None,
                Err(decline) => Some(AgentMessage::Declined {
                    key,
                    reason: decline.to_string(),
                }),
            }
        }
        CoordinatorMessage::Cancel(key) => {
            agent.cancel(link, key);
            Some(AgentMessage::CancelAck(key))
        }
        CoordinatorMessage::ResultAck(key) => {
            agent.result_acked(link, key);
            None
        }
        CoordinatorMessage::Demand { queued } => {
            agent.set_demand(link, queued);
            None
        }
        CoordinatorMessage::Drain => {
            tracing::info!("the coordinator asked this agent to drain");
            agent.request_drain();
            None
        }
        CoordinatorMessage::ProtocolError(message) => {
            tracing::error!("coordinator reports a protocol error: {message}");
            None
        }
        CoordinatorMessage::Welcome(_) | CoordinatorMessage::Reject(_) => {
            tracing::warn!("ignoring a repeated handshake message");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use buildpool_core::bus::{PROTOCOL_VERSION, Welcome};
    use buildpool_core::{AttemptKey, EnvMode, JobEnd};
    use buildpool_proto::frame::BusMessage;
    use futures_util::{SinkExt, StreamExt};
    use prost::Message as _;
    use tokio::io::DuplexStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;

    use super::*;
    use crate::agent::AgentIdentity;
    use crate::executor::ExecutorConfig;
    use crate::metrics::{NotReady, Scrape};

    /// The agent's next message that is not a heartbeat or an offer.
    async fn next_message(coordinator: &mut WebSocketStream<DuplexStream>) -> AgentMessage {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), coordinator.next())
                .await
                .expect("the agent talks")
                .expect("open")
                .expect("a frame");
            if let Message::Binary(bytes) = frame {
                let message = AgentMessage::decode_frame(&bytes).expect("decodes");
                if !matches!(
                    message,
                    AgentMessage::Heartbeat { .. } | AgentMessage::Slots(_)
                ) {
                    return message;
                }
            }
        }
    }

    /// A coordinator that sends an assignment this agent cannot read (no spec) gets that
    /// job failed with the reason, and the link stays up.
    #[tokio::test]
    async fn an_unreadable_assignment_fails_that_job_and_keeps_the_link() {
        let dir = tempfile::tempdir().expect("temp dir");
        let agent = Agent::new(
            AgentIdentity {
                id: "agent".into(),
                labels: Vec::new(),
                system: "x86_64-linux".into(),
                token: "token".into(),
                key: Vec::new(),
            },
            ExecutorConfig {
                git_cache_dir: dir.path().join("cache"),
                worktree_dir: dir.path().join("work"),
                slots: 1,
                env_mode: EnvMode::Host,
                default_timeout: Duration::from_secs(60),
                kill_grace: Duration::from_secs(1),
                sandbox: None,
                sccache: false,
                shared_cache: None,
                disk: None,
            },
        );
        let (coordinator_end, agent_end) = tokio::io::duplex(64 * 1024);
        let shutdown = CancellationToken::new();
        let link = agent.register_link("memory");
        let serving = tokio::spawn({
            let (agent, shutdown) = (agent.clone(), shutdown.clone());
            let sources = JobSources {
                git: GitLocator::Fixed("file:///nowhere".into()),
                archives: None,
            };
            async move { serve_stream(&agent, link, agent_end, &sources, shutdown).await }
        });
        let mut coordinator = tokio_tungstenite::accept_async(coordinator_end)
            .await
            .expect("upgrade");
        let hello = next_message(&mut coordinator).await;
        assert!(matches!(hello, AgentMessage::Hello(_)), "{hello:?}");
        // Not welcomed yet: not ready (`/readyz`).
        assert_eq!(
            agent.readiness(),
            Err(NotReady::Disconnected { servers: 1 })
        );
        let welcome = CoordinatorMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            coordinator_id: "coordinator".into(),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(30),
        });
        let frame = Message::Binary(welcome.encode_frame().into());
        coordinator.send(frame).await.expect("welcome");

        let key = AttemptKey::new(7, 1);
        let unreadable = buildpool_proto::CoordinatorFrame {
            msg: Some(buildpool_proto::coordinator_frame::Msg::Assign(
                buildpool_proto::Assign {
                    key: Some(key.into()),
                    spec: None,
                    source: None,
                    worktree: String::new(),
                },
            )),
        };
        let frame = Message::Binary(unreadable.encode_to_vec().into());
        coordinator.send(frame).await.expect("assign");
        let answer = next_message(&mut coordinator).await;
        let AgentMessage::Finished {
            key: answered,
            completion,
        } = answer
        else {
            panic!("the job fails: {answer:?}")
        };
        assert_eq!(answered, key);
        let JobEnd::Failed { reason } = completion.end else {
            panic!("{completion:?}")
        };
        assert!(reason.contains("job spec is missing"), "{reason}");
        // Like after any assignment, the agent re-announces its (unchanged) offer, so the
        // coordinator does not go on counting a slot that was never taken.
        let offer = loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), coordinator.next())
                .await
                .expect("the agent talks")
                .expect("open")
                .expect("a frame");
            if let Message::Binary(bytes) = frame
                && let AgentMessage::Slots(offer) =
                    AgentMessage::decode_frame(&bytes).expect("decodes")
            {
                break offer;
            }
        };
        assert_eq!((offer.free, offer.total), (1, 1));
        assert!(!serving.is_finished(), "the link stays up");
        assert_eq!(agent.readiness(), Ok(()), "{}", agent.liveness());
        assert_eq!(
            agent.liveness(),
            "0 of 1 slots used, 1 of 1 coordinators connected"
        );
        // Draining (nothing runs, the result acknowledged, so at once): alive, and no
        // longer ready.
        let ack = CoordinatorMessage::ResultAck(key);
        let frame = Message::Binary(ack.encode_frame().into());
        coordinator.send(frame).await.expect("ack");
        assert!(agent.drain(Duration::from_secs(10)).await);
        assert_eq!(agent.readiness(), Err(NotReady::Draining));
        assert!(agent.liveness().ends_with(", draining"));

        shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(10), serving).await;
        assert!(ended.is_ok(), "the connection ends on shutdown");
    }
}
