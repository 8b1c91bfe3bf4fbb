//! The job bus in-process: the real handshake, scheduler and job logs behind the real bus
//! socket, over in-memory streams instead of TCP, with the test playing the agents.

use std::sync::Arc;
use std::time::Duration;

use buildpool_core::bus::{HeldAttempt, SlotOffer};
use buildpool_core::{JobEnd, JobEvent, JobId, JobKind, JobSpec, RunEnv, Source};
use buildpool_proto::frame::BusMessage;
use buildpool_proto::socket::AgentSocket;
use futures_util::SinkExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::*;
use crate::config::CoordinatorConfig;
use crate::repo::Repo;
use crate::server::access::Access;
use crate::server::active::{ActiveJob, JobOrigin};
use crate::server::dispatch::Dispatch;
use crate::server::joblog;
use crate::server::jobs::{Jobs, Records, Snapshots};
use crate::server::scheduler::{Scheduler, SchedulerConfig};

const TOKEN: &str = "secret-token";
const WAIT: Duration = Duration::from_secs(10);

/// A coordinator's shared state with no listeners: the bus is reached through
/// [`handle_stream`] directly.
struct Bus {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Bus {
    fn new() -> Self {
        Self::build(false)
    }

    /// A bus whose coordinator stores its jobs, in a job store of its own.
    fn with_store() -> Self {
        Self::build(true)
    }

    fn build(with_store: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = with_store.then(|| {
            super::super::store::Store::open(dir.path())
                .expect("job store")
                .0
        });
        let config = CoordinatorConfig {
            websocket_addr: None,
            git_daemon: None,
            control_addr: "127.0.0.1:0".into(),
            http_addr: None,
            token_file: dir.path().join("token"),
            allow_insecure: false,
            tls: crate::config::TlsFiles::default(),
            log_max_bytes: 1024 * 1024,
            local_fallback: false,
            local_max_jobs: 1,
            local_worktree_dir: dir.path().join("local"),
            job_default_timeout: Duration::from_secs(300),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(30),
            reattach_grace: Duration::from_secs(15),
            unroutable_wait: Duration::from_secs(60),
            max_lost_attempts: 3,
            client_grace: Duration::from_secs(10),
            affinity: true,
            private_logs: false,
        };
        let records_dir = dir.path().to_owned();
        let logs = joblog::LogDir::open(dir.path(), &Default::default()).expect("log dir");
        // Tests end no job through the control API, so no ended ref is ever deleted.
        let (records, _ended_refs) = Records::new(records_dir, logs, store.map(Arc::new), 1);
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let dispatch = Arc::new(Dispatch::new(
            Scheduler::new(SchedulerConfig::default()),
            records.store_handle(),
        ));
        let jobs = Arc::new(Jobs {
            dispatch: Arc::clone(&dispatch),
            records,
            snapshots: Snapshots::new(dir.path().to_owned(), "test".into(), String::new(), None),
            metrics: Arc::clone(&metrics),
            client_grace: config.client_grace,
            log_max_bytes: config.log_max_bytes,
            shutdown: shutdown.clone(),
        });
        let shared = Arc::new(Shared {
            id: "test-coordinator".into(),
            repo: Repo {
                worktree: dir.path().to_owned(),
                common_dir: dir.path().to_owned(),
                id: "repo".into(),
                plain: false,
                index_file: None,
            },
            access: Access::new(crate::auth::Authenticator::new(
                crate::auth::Token {
                    value: TOKEN.into(),
                    file: None,
                    generated: false,
                },
                crate::auth::CredentialStore::next_to(&dir.path().join("token")),
            )),
            config,
            tls: None,
            dispatch,
            jobs,
            artifacts: crate::server::artifacts::ArtifactStore::open(&dir.path().join("artifacts"))
                .map(Arc::new)
                .expect("artifact dir"),
            metrics,
            websocket_addr: None,
            git_daemon_port: None,
            shutdown,
        });
        let shutdown = shared.shutdown.clone();
        Self {
            shared,
            shutdown,
            _dir: dir,
        }
    }

    /// A new in-memory connection served by the bus as if from a remote `peer`; returns the
    /// agent's end.
    fn serve_memory(&self, peer: &str) -> tokio::io::DuplexStream {
        let (coordinator_end, agent_end) = tokio::io::duplex(256 * 1024);
        tokio::spawn(handle_stream(
            Arc::clone(&self.shared),
            coordinator_end,
            Peer::Remote(peer.parse().expect("a socket address")),
            self.shutdown.clone(),
            None,
        ));
        agent_end
    }

    /// A new in-memory connection to the bus, as an agent sees it.
    async fn connect(&self) -> AgentSocket {
        AgentSocket::client(self.serve_memory("192.0.2.1:1"))
            .await
            .expect("websocket handshake")
    }

    /// A new in-memory connection that speaks raw WebSocket frames, as a broken peer would.
    async fn raw(&self) -> WebSocketStream<tokio::io::DuplexStream> {
        let (raw, _) =
            tokio_tungstenite::client_async("ws://localhost/ws", self.serve_memory("192.0.2.2:1"))
                .await
                .expect("websocket handshake");
        raw
    }

    /// Connects and says hello as `agent_id` with `slots` slots; returns the answer.
    async fn hello(
        &self,
        agent_id: &str,
        token: &str,
        slots: u32,
    ) -> (AgentSocket, CoordinatorMessage) {
        let mut socket = self.connect().await;
        socket
            .send(AgentMessage::Hello(hello(agent_id, token, slots)))
            .await
            .expect("hello sent");
        let answer = socket
            .recv_within(WAIT)
            .await
            .expect("an answer")
            .expect("not closed");
        (socket, answer)
    }

    /// A welcomed agent.
    async fn agent(&self, agent_id: &str) -> AgentSocket {
        let (socket, answer) = self.hello(agent_id, TOKEN, 1).await;
        assert!(
            matches!(answer, CoordinatorMessage::Welcome(_)),
            "{answer:?}"
        );
        socket
    }

    /// Submits a job straight to the scheduler, with a real job log; returns its phase.
    async fn submit(&self) -> (JobId, Arc<ActiveJob>) {
        let job_id = self
            .shared
            .jobs
            .records
            .take_job_id()
            .await
            .expect("job id");
        let log = joblog::JobLog::create(self.shared.jobs.records.logs(), job_id, 1024 * 1024)
            .await
            .expect("log");
        let origin = JobOrigin {
            kind: JobKind::Check,
            worktree: String::new(),
            cargo_args: Vec::new(),
        };
        let job = ActiveJob::queued(log, String::new(), origin);
        self.shared
            .dispatch
            .state()
            .jobs
            .insert(job_id, Arc::clone(&job));
        let source = Source {
            repo_id: "repo".into(),
            git_path: "/repo".into(),
            git_port: None,
            commit: "0".repeat(40),
            git_ref: "refs/buildpool/snapshots/test".into(),
            base_commit: String::new(),
            pack: None,
        };
        let spec = JobSpec::new(JobKind::Check);
        let now = Instant::now();
        self.shared
            .dispatch
            .step(|s| ((), s.submit(job_id, spec, source, String::new(), now, 0)));
        (job_id, job)
    }

    /// Takes the job store's write lock as another writer, until the returned connection
    /// commits or is dropped: the store's commits wait meanwhile, and fail after its busy
    /// timeout.
    fn hold_store(&self) -> rusqlite::Connection {
        let store = self
            .shared
            .jobs
            .records
            .store()
            .expect("a bus with a store");
        let blocker = rusqlite::Connection::open(store.path()).expect("open the store");
        blocker
            .execute_batch("BEGIN IMMEDIATE")
            .expect("take the store's write lock");
        blocker
    }

    fn agent_ids(&self) -> Vec<String> {
        self.shared
            .dispatch
            .state()
            .scheduler
            .agents()
            .into_iter()
            .map(|agent| agent.id)
            .collect()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn hello(agent_id: &str, token: &str, slots: u32) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: agent_id.into(),
        token: token.into(),
        labels: Vec::new(),
        system: "x86_64-linux".into(),
        slots: SlotOffer {
            free: slots,
            total: slots,
            draining: false,
        },
        agent_version: "test".into(),
        attempts: Vec::<HeldAttempt>::new(),
        sandboxed: true,
        disk: buildpool_core::bus::DiskUsage::default(),
        identity: format!("key of {agent_id}"),
    }
}

/// The next message that is not a heartbeat, slot demand or the like: what the test waits for.
async fn next_assignment_or_ack(socket: &mut AgentSocket) -> CoordinatorMessage {
    loop {
        let message = socket
            .recv_within(WAIT)
            .await
            .expect("a message")
            .expect("not closed");
        if !matches!(
            message,
            CoordinatorMessage::Heartbeat { .. } | CoordinatorMessage::Demand { .. }
        ) {
            return message;
        }
    }
}

/// Reads until the coordinator closes the connection; returns what it said before.
async fn until_closed(socket: &mut AgentSocket) -> Vec<CoordinatorMessage> {
    let mut said = Vec::new();
    while let Ok(Some(message)) = socket.recv_within(WAIT).await {
        said.push(message);
    }
    said
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_agent_with_the_token_is_welcomed_and_registered() {
    let bus = Bus::new();
    let (_socket, answer) = bus.hello("worker-1", TOKEN, 2).await;
    let CoordinatorMessage::Welcome(welcome) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(welcome.coordinator_id, "test-coordinator");
    assert_eq!(welcome.protocol_version, PROTOCOL_VERSION);
    wait_for(|| bus.agent_ids() == ["worker-1"]).await;
}

#[tokio::test]
async fn a_wrong_token_or_version_is_rejected_with_the_reason_and_the_connection_closed() {
    let bus = Bus::new();
    let (mut socket, answer) = bus.hello("worker-1", "wrong", 1).await;
    let CoordinatorMessage::Reject(reject) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(reject.code, RejectCode::BadToken);
    assert!(
        reject.message.contains("invalid credential"),
        "{}",
        reject.message
    );
    assert!(until_closed(&mut socket).await.is_empty());

    let mut socket = bus.connect().await;
    let mut old = hello("worker-1", TOKEN, 1);
    old.protocol_version = PROTOCOL_VERSION + 1;
    socket.send(AgentMessage::Hello(old)).await.expect("sent");
    let answer = socket
        .recv_within(WAIT)
        .await
        .expect("answer")
        .expect("not closed");
    assert!(
        matches!(&answer, CoordinatorMessage::Reject(r) if r.code == RejectCode::UnsupportedVersion),
        "{answer:?}"
    );
    assert!(bus.agent_ids().is_empty(), "nobody was registered");
}

#[tokio::test]
async fn a_garbled_frame_gets_a_protocol_error_and_ends_only_that_connection() {
    let bus = Bus::new();
    let _healthy = bus.agent("healthy").await;

    let mut raw = bus.raw().await;
    let hello = AgentMessage::Hello(hello("garbler", TOKEN, 1)).encode_frame();
    raw.send(Message::Binary(hello.into()))
        .await
        .expect("hello");
    wait_for(|| bus.agent_ids().len() == 2).await;
    raw.send(Message::Binary(
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f].into(),
    ))
    .await
    .expect("garbage");

    let mut said = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(WAIT, raw.next()).await {
        if let Message::Binary(bytes) = message {
            said.push(CoordinatorMessage::decode_frame(&bytes).expect("decodes"));
        }
    }
    assert!(
        said.iter()
            .any(|m| matches!(m, CoordinatorMessage::ProtocolError(_))),
        "{said:?}"
    );
    wait_for(|| bus.agent_ids() == ["healthy"]).await;
}

#[tokio::test]
async fn a_declined_assignment_goes_to_another_agent_and_the_stale_attempt_is_fenced() {
    let bus = Bus::new();
    let mut first = bus.agent("first").await;
    wait_for(|| bus.agent_ids().len() == 1).await;
    let mut second = bus.agent("second").await;
    wait_for(|| bus.agent_ids().len() == 2).await;
    let (job_id, job) = bus.submit().await;
    let mut phase = job.phase.subscribe();

    // Both offer one slot; the first connection wins the tie and declines.
    let CoordinatorMessage::Assign(assignment) = next_assignment_or_ack(&mut first).await else {
        panic!("the first agent gets the job")
    };
    assert_eq!(assignment.key, AttemptKey::new(job_id, 1));
    first
        .send(AgentMessage::Declined {
            key: assignment.key,
            reason: "busy".into(),
        })
        .await
        .expect("sent");
    let CoordinatorMessage::Assign(retry) = next_assignment_or_ack(&mut second).await else {
        panic!("the declined job is requeued to the second agent")
    };
    assert_eq!(retry.key, AttemptKey::new(job_id, 2));

    // The first agent's late output and result of attempt 1 are not the job's any more.
    let stale = assignment.key;
    first
        .send(AgentMessage::Output {
            key: stale,
            stream: OutputStream::Stdout,
            data: "stale\n".into(),
        })
        .await
        .expect("sent");
    let finished = Completion {
        end: JobEnd::Exited { code: 1 },
        duration: Duration::ZERO,
        env: Some(RunEnv::Host),
        phases: buildpool_core::AgentPhases::default(),
    };
    first
        .send(AgentMessage::Finished {
            key: stale,
            completion: finished,
        })
        .await
        .expect("sent");
    assert_eq!(
        next_assignment_or_ack(&mut first).await,
        CoordinatorMessage::ResultAck(stale)
    );
    assert!(matches!(
        *phase.borrow_and_update(),
        JobEvent::Assigned { attempt: 2, .. }
    ));

    // The holder's output and result count.
    second
        .send(AgentMessage::Output {
            key: retry.key,
            stream: OutputStream::Stdout,
            data: "fresh\n".into(),
        })
        .await
        .expect("sent");
    let completion = Completion {
        end: JobEnd::Exited { code: 0 },
        duration: Duration::ZERO,
        env: Some(RunEnv::Host),
        phases: buildpool_core::AgentPhases::default(),
    };
    second
        .send(AgentMessage::Finished {
            key: retry.key,
            completion: completion.clone(),
        })
        .await
        .expect("sent");
    assert_eq!(
        next_assignment_or_ack(&mut second).await,
        CoordinatorMessage::ResultAck(retry.key)
    );
    let result = match &*phase.borrow_and_update() {
        JobEvent::Finished(result) => result.clone(),
        other => panic!("the job ended, not {other:?}"),
    };
    assert_eq!(
        (result.agent_id.as_str(), result.attempt, &result.completion),
        ("second", 2, &completion)
    );
    job.log.written().await;
    let log = std::fs::read(job.log.path()).expect("log");
    let records = joblog::parse(&log);
    let text: Vec<&[u8]> = records
        .iter()
        .map(|record| record.data.as_slice())
        .collect();
    assert_eq!(
        text,
        [b"fresh\n".as_slice()],
        "only the holder's output is in the log"
    );
}

/// An agent id belongs to the agent that registered it. A second agent holding the same
/// credential but another identity key is refused with the reason, and the first keeps its
/// connection and its running job; the first agent reconnecting takes over its own id at
/// once, as after a blip.
#[tokio::test]
async fn an_impostor_of_an_agent_id_is_refused_and_the_real_agent_keeps_its_job() {
    let bus = Bus::new();
    let mut real = bus.agent("worker-2").await;
    wait_for(|| bus.agent_ids() == ["worker-2"]).await;
    let (job_id, job) = bus.submit().await;
    let CoordinatorMessage::Assign(assignment) = next_assignment_or_ack(&mut real).await else {
        panic!("the real agent gets the job")
    };
    assert_eq!(assignment.key, AttemptKey::new(job_id, 1));

    let mut impostor = bus.connect().await;
    let mut forged = hello("worker-2", TOKEN, 4);
    forged.identity = "another key".into();
    forged.attempts = vec![HeldAttempt {
        key: assignment.key,
        finished: false,
    }];
    impostor
        .send(AgentMessage::Hello(forged))
        .await
        .expect("hello sent");
    let answer = impostor.recv_within(WAIT).await.expect("an answer");
    let Some(CoordinatorMessage::Reject(reject)) = answer else {
        panic!("the impostor is rejected, not {answer:?}")
    };
    assert_eq!(reject.code, RejectCode::IdTaken);
    assert!(
        reject.message.contains("belongs to another agent"),
        "{}",
        reject.message
    );
    assert_eq!(bus.agent_ids(), ["worker-2"]);
    assert!(matches!(
        *job.phase.borrow(),
        JobEvent::Assigned { attempt: 1, .. }
    ));
    // The real agent still holds the attempt: its result is taken.
    real.send(AgentMessage::Finished {
        key: assignment.key,
        completion: Completion {
            end: JobEnd::Exited { code: 0 },
            duration: Duration::ZERO,
            env: Some(RunEnv::Host),
            phases: buildpool_core::AgentPhases::default(),
        },
    })
    .await
    .expect("sent");
    assert_eq!(
        next_assignment_or_ack(&mut real).await,
        CoordinatorMessage::ResultAck(assignment.key)
    );

    // The real agent reconnecting (same key) takes over its own id at once.
    let (_again, answer) = bus.hello("worker-2", TOKEN, 1).await;
    assert!(
        matches!(answer, CoordinatorMessage::Welcome(_)),
        "{answer:?}"
    );
    wait_for(|| bus.agent_ids() == ["worker-2"]).await;
}

/// A result is acknowledged once it is stored. While the store is slow, the agent's other
/// messages are still read: output of its other job, here, reaches that job's log before
/// the first result is acknowledged. (Read in turn, a connection took at most one result
/// per store commit, and its other jobs waited behind each.)
#[tokio::test]
async fn while_a_result_waits_for_the_store_the_agent_is_still_heard() {
    let bus = Bus::with_store();
    let (mut agent, welcome) = bus.hello("agent", TOKEN, 2).await;
    assert!(
        matches!(welcome, CoordinatorMessage::Welcome(_)),
        "{welcome:?}"
    );
    wait_for(|| bus.agent_ids().len() == 1).await;
    let (_, first_job) = bus.submit().await;
    let (_, second_job) = bus.submit().await;
    let mut keys = Vec::new();
    for _ in 0..2 {
        let CoordinatorMessage::Assign(assignment) = next_assignment_or_ack(&mut agent).await
        else {
            panic!("the agent gets both jobs")
        };
        keys.push(assignment.key);
    }
    let first = keys[0];
    let second = keys[1];

    // Another writer holds the store, so the first result cannot be stored for now.
    let blocker = bus.hold_store();
    agent
        .send(AgentMessage::Finished {
            key: first,
            completion: Completion::new(JobEnd::Exited { code: 0 }),
        })
        .await
        .expect("sent");
    agent
        .send(AgentMessage::Output {
            key: second,
            stream: OutputStream::Stdout,
            data: "still heard\n".into(),
        })
        .await
        .expect("sent");
    let mut second_log = second_job.log.subscribe();
    tokio::time::timeout(WAIT, second_log.wait_for(|length| *length > 0))
        .await
        .expect("the second job's output is read while the first result waits")
        .expect("the log is open");

    // Once the store is free again, the result is stored and acknowledged.
    blocker.execute_batch("COMMIT").expect("release the store");
    assert_eq!(
        next_assignment_or_ack(&mut agent).await,
        CoordinatorMessage::ResultAck(first)
    );
    assert!(matches!(*first_job.phase.borrow(), JobEvent::Finished(_)));
}

/// Hostile handshakes: a stream of random first frames (garbage, truncated or mutated
/// hellos) each gets a reject or a closed connection, never a panic or a registration, and a
/// real agent is welcomed afterwards.
#[tokio::test]
async fn random_first_frames_are_refused_and_a_real_agent_still_gets_in() {
    let bus = Bus::new();
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let valid = AgentMessage::Hello(hello("fuzzed", TOKEN, 1)).encode_frame();
    for round in 0..200 {
        let mut frame = if round % 2 == 0 {
            (0..rng.usize(0..512))
                .map(|_| rng.u8(..))
                .collect::<Vec<u8>>()
        } else {
            valid.clone()
        };
        if round % 2 == 1 {
            for _ in 0..rng.usize(1..6) {
                let at = rng.usize(..frame.len());
                frame[at] = rng.u8(..);
            }
            frame.truncate(rng.usize(0..=frame.len()));
        }
        let mut raw = bus.raw().await;
        raw.send(Message::Binary(frame.into())).await.expect("sent");
        let answer = tokio::time::timeout(WAIT, raw.next())
            .await
            .expect("the coordinator answers or closes in time");
        if let Some(Ok(Message::Binary(bytes))) = answer {
            let message = CoordinatorMessage::decode_frame(&bytes).expect("decodes");
            // A mutation may leave a valid hello with the right token: that one is welcomed.
            assert!(
                matches!(
                    message,
                    CoordinatorMessage::Reject(_) | CoordinatorMessage::Welcome(_)
                ),
                "round {round}: {message:?}"
            );
        }
    }
    let mut registered = bus.agent_ids();
    registered.retain(|id| id != "fuzzed");
    assert!(
        registered.is_empty(),
        "only intact hellos register: {registered:?}"
    );
    let _agent = bus.agent("real").await;
    wait_for(|| bus.agent_ids().contains(&"real".to_owned())).await;
}
