//! The job bus and the control API under bad input: wrong tokens, garbage, oversized frames,
//! silent peers and submissions of snapshots that are not there get a clear rejection and
//! never crash or wedge the coordinator.
//!
//! The bus tests speak the wire format itself (generated protobuf types over a raw
//! WebSocket), as a hostile or buggy peer would, rather than the agent's typed socket.

use std::io::Write;
use std::time::Duration;

use buildpool_core::bus::PROTOCOL_VERSION;
use buildpool_proto::{
    AgentFrame, CoordinatorFrame, Hello, RejectCode, agent_frame, coordinator_frame, frame,
};
use buildpool_tests::{Cluster, Fixture, Owned, wait_until};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<buildpool_tests::RawTls>;

fn hello(token: &str) -> Message {
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: "raw-client".into(),
        token: token.into(),
        slots_total: 1,
        slots_free: 1,
        ..Hello::default()
    };
    let frame = AgentFrame {
        msg: Some(agent_frame::Msg::Hello(hello)),
    };
    Message::Binary(frame.encode_to_vec().into())
}

/// Decodes a coordinator frame into its message.
fn decode(bytes: &[u8]) -> Option<coordinator_frame::Msg> {
    CoordinatorFrame::decode(bytes)
        .expect("coordinator frames decode")
        .msg
}

/// Reads frames until the coordinator closes the connection; returns the decoded ones.
async fn frames_until_close(socket: &mut Socket) -> Vec<coordinator_frame::Msg> {
    let mut frames = Vec::new();
    let read = async {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Binary(bytes) = message {
                frames.extend(decode(&bytes));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("the coordinator closes the connection");
    frames
}

async fn connect(cluster: &Cluster) -> Socket {
    cluster
        .raw_websocket("/ws")
        .await
        .expect("websocket connects")
}

fn assert_still_serving(cluster: &Cluster) {
    let check = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(
        check.code,
        Some(0),
        "the coordinator stopped serving:\n{check}\n{}",
        cluster.coordinator.log_text()
    );
}

#[test]
fn a_wrong_token_is_rejected_clearly_on_both_sides() {
    let cluster = Cluster::start(Fixture::new().expect("fixture"), 0, 1).expect("cluster");
    let wrong = cluster.fixture.scratch().join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").expect("write");
    let command = cluster.agent_command(
        "intruder",
        1,
        &["--token-file", wrong.to_str().expect("utf-8")],
    );
    let agent =
        Owned::spawn(command, cluster.fixture.scratch().join("intruder.log")).expect("spawn");
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .log_text()
            .contains("rejected this agent (bad token): invalid credential")),
        "agent log:\n{}",
        agent.log_text()
    );
    assert!(
        cluster
            .coordinator
            .log_text()
            .contains("rejected agent: invalid credential"),
        "{}",
        cluster.coordinator.log_text()
    );
    assert!(
        cluster.agent_ids().is_empty(),
        "a rejected agent must not be registered"
    );
}

#[test]
fn the_embedded_agents_id_is_reserved() {
    let cluster = Cluster::start(Fixture::new().expect("fixture"), 0, 1).expect("cluster");
    let command = cluster.agent_command("local", 1, &[]);
    let agent =
        Owned::spawn(command, cluster.fixture.scratch().join("impostor.log")).expect("spawn");
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .log_text()
            .contains("\"local\" is reserved")),
        "{}",
        agent.log_text()
    );
}

#[tokio::test]
async fn garbled_oversized_and_silent_connections_do_not_wedge_the_coordinator() {
    let cluster = Cluster::start(Fixture::new().expect("fixture"), 1, 1).expect("cluster");
    let token = std::fs::read_to_string(cluster.fixture.token_file())
        .expect("token")
        .trim()
        .to_owned();

    // A peer that connects and never says anything holds no lock and blocks nobody.
    let _silent = tokio::net::TcpStream::connect(&cluster.websocket_addr)
        .await
        .expect("tcp");

    // Not HTTP at all.
    let mut junk = std::net::TcpStream::connect(&cluster.websocket_addr).expect("tcp");
    junk.write_all(b"\x00\x01GARBAGE\r\n\r\n").expect("write");

    // Garbage instead of a hello: rejected as a bad hello.
    let mut socket = connect(&cluster).await;
    socket
        .send(Message::Binary(vec![0xff, 0xfe, 0xfd, 0x00, 0x13].into()))
        .await
        .expect("send");
    let frames = frames_until_close(&mut socket).await;
    assert!(
        matches!(frames.as_slice(), [coordinator_frame::Msg::Reject(r)] if r.code == RejectCode::BadHello as i32),
        "{frames:?}"
    );

    // A valid hello, then garbage: a protocol error, then the connection ends.
    let mut socket = connect(&cluster).await;
    socket.send(hello(&token)).await.expect("send");
    let Some(Ok(Message::Binary(welcome))) = socket.next().await else {
        panic!("no welcome")
    };
    assert!(matches!(
        decode(&welcome),
        Some(coordinator_frame::Msg::Welcome(_))
    ));
    socket
        .send(Message::Binary(
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f].into(),
        ))
        .await
        .expect("send");
    let frames = frames_until_close(&mut socket).await;
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, coordinator_frame::Msg::Error(_))),
        "{frames:?}"
    );

    // A frame over the size limit ends the connection without reading it into memory.
    let mut socket = connect(&cluster).await;
    socket.send(hello(&token)).await.expect("send");
    let _welcome = socket.next().await;
    let oversized = vec![0u8; frame::MAX_FRAME_BYTES * 2];
    let _ = socket.send(Message::Binary(oversized.into())).await;
    frames_until_close(&mut socket).await;

    // A wrong path gets a 404, not an upgrade.
    assert!(cluster.raw_websocket("/other").await.is_err());

    tokio::task::spawn_blocking(move || {
        assert_still_serving(&cluster);
        let status = cluster.status().expect("status");
        let ids: Vec<&str> = status["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .filter_map(|a| a["id"].as_str())
            .collect();
        assert!(
            !ids.contains(&"raw-client"),
            "closed connections are unregistered: {ids:?}"
        );
        assert!(ids.contains(&"worker-1"), "{ids:?}");
    })
    .await
    .expect("checks pass");
}

/// Hundreds of connections that never finish their handshake, kept up by a peer that opens
/// new ones as fast as the old ones time out, do not keep a real agent out: it connects and
/// runs a job. (The flood is bounded: at most 5000 connections, 300 open at a time.)
#[test]
fn a_flood_of_silent_connections_does_not_keep_a_real_agent_out() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let mut cluster = Cluster::start(Fixture::new().expect("fixture"), 0, 1).expect("cluster");
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = std::thread::spawn({
        let (stop, opened) = (Arc::clone(&stop), Arc::clone(&opened));
        let addr = cluster.websocket_addr.clone();
        move || {
            let mut open = std::collections::VecDeque::new();
            while !stop.load(Ordering::Relaxed) && opened.load(Ordering::Relaxed) < 5000 {
                if let Ok(silent) = std::net::TcpStream::connect(&addr) {
                    open.push_back(silent);
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                if open.len() > 300 {
                    open.pop_front();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    assert!(
        wait_until(Duration::from_secs(20), || opened.load(Ordering::Relaxed)
            >= 200),
        "the flood is under way"
    );

    let joined = cluster.add_agent("steady", 1, &[]);
    let check = joined
        .as_ref()
        .ok()
        .map(|()| cluster.fixture.run(&["run", "check"]).expect("runs"));
    stop.store(true, Ordering::Relaxed);
    flood.join().expect("flood thread");
    joined.expect("the agent gets in despite the flood");
    let check = check.expect("a job ran");
    assert_eq!(check.code, Some(0), "{check}");
    assert!(check.stderr.contains("running on steady"), "{check}");
}

/// A submission names its snapshot by ref and commit. The coordinator takes it only when
/// the ref holds that commit, whether git keeps them as loose files (read without git) or
/// packed (git is asked).
#[tokio::test]
async fn a_submission_is_taken_only_when_its_snapshot_ref_holds_its_commit() {
    use buildpool::client::Client;
    use buildpool::repo::Repo;
    use buildpool_core::status::Submission;
    use buildpool_core::{JobKind, JobSpec};

    let cluster = Cluster::start(Fixture::new().expect("fixture"), 0, 1).expect("cluster");
    let fixture = &cluster.fixture;
    let repo = Repo::discover(&fixture.root()).await.expect("repo");
    let (client, _) = Client::connect_to_running(&repo).await.expect("client");
    let head = fixture.git(&["rev-parse", "HEAD"]).expect("head");
    let tree = fixture.git(&["rev-parse", "HEAD^{tree}"]).expect("tree");
    let other = fixture
        .git(&["commit-tree", &tree, "-m", "other"])
        .expect("commit");
    let submit = |git_ref: &str, commit: &str| {
        let mut spec = JobSpec::new(JobKind::Check);
        // Runs nowhere: the test is about taking the job, not running it.
        spec.required_labels = vec!["no-such-label".to_owned()];
        let submission = Submission {
            spec,
            commit: commit.to_owned(),
            git_ref: git_ref.to_owned(),
            worktree: fixture.root().display().to_string(),
            base_commit: String::new(),
        };
        let client = client.clone();
        async move { client.submit(submission).await.map(drop) }
    };

    let missing = submit("refs/buildpool/snapshots/1-missing", &head).await;
    let error = missing.expect_err("no such ref").to_string();
    assert!(error.contains("does not exist"), "{error}");

    let git_ref = "refs/buildpool/snapshots/2-moved";
    fixture.git(&["update-ref", git_ref, &other]).expect("ref");
    let error = submit(git_ref, &head)
        .await
        .expect_err("ref elsewhere")
        .to_string();
    assert!(error.contains(&format!("points at {other}")), "{error}");

    let loose = "refs/buildpool/snapshots/3-loose";
    fixture.git(&["update-ref", loose, &other]).expect("ref");
    submit(loose, &other)
        .await
        .expect("a loose ref and object are taken");

    let not_a_commit = "refs/buildpool/snapshots/5-tree";
    fixture
        .git(&["update-ref", not_a_commit, &tree])
        .expect("ref");
    let refused = submit(not_a_commit, &tree).await;
    assert!(refused.is_err(), "a tree is no snapshot");

    let packed = "refs/buildpool/snapshots/4-packed";
    fixture.git(&["update-ref", packed, &head]).expect("ref");
    fixture.git(&["gc", "--quiet"]).expect("gc");
    submit(packed, &head)
        .await
        .expect("a packed ref and object are taken");
    let error = submit(packed, &other)
        .await
        .expect_err("packed, elsewhere")
        .to_string();
    assert!(error.contains(&format!("points at {head}")), "{error}");
}
