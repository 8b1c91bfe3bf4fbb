//! Security across a network, with real sockets: the job bus and (beyond loopback) the
//! control API speak TLS and agents pin the coordinator's certificate; git is reachable only
//! through the authenticated tunnel on the bus port; credentials have scopes and rotate.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, Owned, ServeOptions, TUNNEL_REPO_URL, wait_until};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn cluster(agents: usize) -> Cluster {
    Cluster::start(Fixture::new().expect("fixture"), agents, 1).expect("cluster")
}

/// Starts an agent that is expected not to get in; returns it once its log says `expected`.
fn refused_agent(cluster: &Cluster, id: &str, extra: &[&str], expected: &[&str]) -> Owned {
    let agent = Owned::spawn(
        cluster.agent_command(id, 1, extra),
        cluster.fixture.scratch().join(format!("{id}.log")),
    )
    .expect("agent starts");
    let said = wait_until(Duration::from_secs(20), || {
        let log = agent.log_text();
        expected.iter().all(|part| log.contains(part))
    });
    assert!(
        said,
        "the agent's log does not explain the refusal ({expected:?}):\n{}",
        agent.log_text()
    );
    assert!(
        !cluster.agent_ids().contains(&id.to_owned()),
        "{id} was admitted"
    );
    agent
}

/// `buildpool token create --scope SCOPE`: the new secret.
fn create_credential(fixture: &Fixture, scope: &str) -> String {
    let created = fixture
        .run(&["token", "create", "--scope", scope])
        .expect("runs");
    assert_eq!(created.code, Some(0), "{created}");
    created.stdout.lines().next().expect("a secret").to_owned()
}

/// A file holding `secret`, for an agent's --token-file.
fn credential_file(fixture: &Fixture, name: &str, secret: &str) -> PathBuf {
    let path = fixture.scratch().join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("write");
    path
}

/// `buildpool <args>` presenting `secret` instead of the token file.
fn run_with_credential(fixture: &Fixture, secret: &str, args: &[&str]) -> std::process::Output {
    fixture
        .command_in(&fixture.root(), args)
        .env("BUILDPOOL_TOKEN", secret)
        .output()
        .expect("runs")
}

/// The addresses listening on TCP `port`, from the kernel's socket tables.
fn listeners_on(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Field 1 is local ADDRESS:PORT in hex; field 3 the state, 0A = LISTEN.
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((address, hex_port)) = local.split_once(':') else {
                continue;
            };
            if *state == "0A" && u16::from_str_radix(hex_port, 16).ok() == Some(port) {
                found.push(address.to_owned());
            }
        }
    }
    found
}

#[test]
fn an_agent_pinning_the_coordinator_runs_a_job_fetching_through_the_tunnel() {
    let cluster = cluster(1);
    assert!(cluster.bus_url().starts_with("wss://"), "TLS by default");
    let check = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(check.code, Some(0), "{check}");
    assert!(check.stderr.contains("running on worker-1"), "{check}");
    let log = cluster.coordinator.log_text();
    assert!(
        log.contains("git fetch through the tunnel"),
        "the snapshot came through the tunnel:\n{log}"
    );
}

#[test]
fn with_defaults_only_loopback_listens_on_the_git_daemon_port() {
    let cluster = cluster(0);
    let listeners = listeners_on(cluster.git_daemon_port);
    assert!(!listeners.is_empty(), "the git daemon listens");
    // 127.0.0.1 in /proc's byte order.
    assert!(
        listeners.iter().all(|address| address == "0100007F"),
        "git daemon listens beyond loopback: {listeners:?}"
    );
    // And from this host's other addresses, nothing answers on the port.
    let hostname = Command::new("hostname")
        .arg("-I")
        .output()
        .expect("hostname");
    for address in String::from_utf8_lossy(&hostname.stdout).split_whitespace() {
        let Ok(ip) = address.parse::<std::net::IpAddr>() else {
            continue;
        };
        let target = std::net::SocketAddr::new(ip, cluster.git_daemon_port);
        assert!(
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_err(),
            "git daemon reachable at {target}"
        );
    }
}

#[test]
fn a_wrong_pin_is_refused_naming_both_fingerprints() {
    let cluster = cluster(0);
    let wrong = format!("sha256:{}", "00".repeat(32));
    refused_agent(
        &cluster,
        "pinned-wrong",
        &["--tls-fingerprint", &wrong],
        &[&wrong, &cluster.tls_fingerprint],
    );
}

#[test]
fn plain_websocket_against_the_tls_bus_is_refused() {
    let cluster = cluster(0);
    let plain = format!("ws://{}/ws", cluster.websocket_addr);
    refused_agent(
        &cluster,
        "plain",
        &["--server", &plain],
        &["HTTP 426", "accepts TLS only"],
    );
}

/// `git ls-remote` of the repository through the tunnel, presenting `credential`.
fn ls_remote_through_tunnel(cluster: &Cluster, credential: &str) -> std::process::Output {
    let mut git = Command::new("git");
    git.args(["ls-remote", TUNNEL_REPO_URL]);
    cluster
        .through_tunnel(&mut git, credential)
        .expect("proxy command");
    git.output().expect("git runs")
}

#[test]
fn a_fetch_through_the_tunnel_needs_an_agent_credential() {
    let cluster = cluster(0);

    // No credential at all: the coordinator closes the tunnel and says why.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let close = runtime.block_on(async {
        let mut socket = cluster.raw_websocket("/git").await.expect("upgrade");
        tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("an answer")
    });
    match close {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Policy);
            assert!(frame.reason.contains("invalid credential"), "{frame:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let wrong = ls_remote_through_tunnel(&cluster, "not-a-credential");
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success(), "a wrong credential fetched");
    assert!(stderr.contains("refused the git tunnel"), "{stderr}");

    let client = create_credential(&cluster.fixture, "client");
    let as_client = ls_remote_through_tunnel(&cluster, &client);
    let stderr = String::from_utf8_lossy(&as_client.stderr);
    assert!(!as_client.status.success(), "a client credential fetched");
    assert!(stderr.contains("client scope"), "{stderr}");

    let agent = create_credential(&cluster.fixture, "agent");
    let right = ls_remote_through_tunnel(&cluster, &agent);
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    // Admitted, and offered snapshots only (none exist now), never the branches.
    let refs = String::from_utf8_lossy(&right.stdout);
    assert!(!refs.contains("refs/heads/"), "{refs}");
}

#[test]
fn credentials_have_scopes_and_rotate_without_downtime() {
    let mut cluster = cluster(0);
    let fixture_token = cluster.fixture.token_file();

    // Before any scoped credential, the token file admits agents (a seed-era setup).
    cluster
        .add_agent("legacy", 1, &[])
        .expect("the token file admits agents");

    let client = create_credential(&cluster.fixture, "client");
    let client_file = credential_file(&cluster.fixture, "client-credential", &client);
    let client_path = client_file.to_str().expect("utf-8");
    refused_agent(
        &cluster,
        "with-client-credential",
        &["--token-file", client_path],
        &["has the client scope"],
    );

    let first = create_credential(&cluster.fixture, "agent");
    let first_file = credential_file(&cluster.fixture, "first-credential", &first);
    let first_path = first_file.to_str().expect("utf-8");
    let submit = run_with_credential(&cluster.fixture, &first, &["run", "check"]);
    assert_ne!(
        submit.status.code(),
        Some(0),
        "an agent credential submitted"
    );
    let stderr = String::from_utf8_lossy(&submit.stderr);
    assert!(stderr.contains("has the agent scope"), "{stderr}");
    let status = run_with_credential(&cluster.fixture, &client, &["status"]);
    assert!(
        status.status.success(),
        "a client credential reads status: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    // With agent credentials in place, the token file no longer admits agents: the agent
    // admitted with it is disconnected, and a new one is refused.
    assert!(
        wait_until(Duration::from_secs(20), || !cluster
            .agent_ids()
            .contains(&"legacy".to_owned())),
        "the legacy agent is still connected: {:?}",
        cluster.agent_ids()
    );
    let legacy_path = fixture_token.to_str().expect("utf-8");
    refused_agent(
        &cluster,
        "legacy-again",
        &["--token-file", legacy_path],
        &["no longer admits agents"],
    );

    cluster
        .add_agent("rotating", 1, &["--token-file", first_path])
        .expect("an agent credential admits an agent");
    let check = cluster.fixture.run(&["run", "check"]).expect("runs");
    let logs: Vec<String> = cluster.agents.iter().map(Owned::log_text).collect();
    assert_eq!(check.code, Some(0), "{check}\n{}", logs.join("\n"));

    // Rotation: a second credential, then the first one revoked.
    let second = create_credential(&cluster.fixture, "agent");
    let second_file = credential_file(&cluster.fixture, "second-credential", &second);
    let listed = cluster.fixture.run(&["token", "list"]).expect("runs");
    let first_id = first.split('_').nth(1).expect("bp_<id>_<secret>");
    assert!(listed.stdout.contains(first_id), "{listed}");
    let revoked = cluster
        .fixture
        .run(&["token", "revoke", first_id])
        .expect("runs");
    assert_eq!(revoked.code, Some(0), "{revoked}");
    assert!(
        wait_until(Duration::from_secs(20), || !cluster
            .agent_ids()
            .contains(&"rotating".to_owned())),
        "an agent of a revoked credential is still connected"
    );
    refused_agent(
        &cluster,
        "revoked",
        &["--token-file", first_path],
        &["invalid credential"],
    );
    cluster
        .add_agent(
            "rotated",
            1,
            &["--token-file", second_file.to_str().expect("utf-8")],
        )
        .expect("the new credential admits an agent");
}

#[test]
fn the_control_api_beyond_loopback_speaks_tls() {
    let options = ServeOptions {
        extra_args: vec!["--control-addr".into(), "0.0.0.0:0".into()],
        ..ServeOptions::default()
    };
    let cluster =
        Cluster::start_with(Fixture::new().expect("fixture"), 0, 1, &options).expect("cluster");
    let discovery: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            cluster
                .fixture
                .root()
                .join(".git/buildpool/coordinator.json"),
        )
        .expect("discovery"),
    )
    .expect("json");
    let url = discovery["control_url"].as_str().expect("control_url");
    assert!(url.starts_with("https://"), "{url}");
    // Clients on this host pin the fingerprint from the discovery file.
    cluster.status().expect("status over TLS");

    // Plain HTTP/2 to the TLS port gets nowhere.
    let port = url.rsplit(':').next().expect("port");
    let plain = cluster
        .fixture
        .command_in(&cluster.fixture.root(), &["status"])
        .env("BUILDPOOL_COORDINATOR", format!("http://127.0.0.1:{port}"))
        .output()
        .expect("runs");
    assert!(!plain.status.success(), "plain text reached a TLS port");
    // A wrong pin is refused too.
    let pinned_wrong = cluster
        .fixture
        .command_in(&cluster.fixture.root(), &["status"])
        .env("BUILDPOOL_COORDINATOR", format!("https://127.0.0.1:{port}"))
        .env(
            "BUILDPOOL_TLS_FINGERPRINT",
            format!("sha256:{}", "11".repeat(32)),
        )
        .output()
        .expect("runs");
    assert!(
        !pinned_wrong.status.success(),
        "a wrong pin reached the API"
    );
    let stderr = String::from_utf8_lossy(&pinned_wrong.stderr);
    assert!(stderr.contains(&cluster.tls_fingerprint), "{stderr}");
}

#[test]
fn with_mutual_tls_only_an_agent_with_a_client_certificate_gets_in_and_fetches() {
    let fixture = Fixture::new().expect("fixture");
    // A self-signed client certificate is its own CA.
    let client_dir = fixture.scratch().join("client-cert");
    let client =
        buildpool_proto::tls::ServerIdentity::load_or_create(&client_dir, &["agent".into()])
            .expect("client certificate");
    let cert = client.cert_file.display().to_string();
    let key = client_dir
        .join(buildpool_proto::tls::GENERATED_KEY_FILE)
        .display()
        .to_string();
    let options = ServeOptions {
        extra_args: vec!["--tls-client-ca-file".into(), cert.clone()],
        ..ServeOptions::default()
    };
    let mut cluster = Cluster::start_with(fixture, 0, 1, &options).expect("cluster");
    refused_agent(&cluster, "no-client-cert", &[], &["CertificateRequired"]);
    cluster
        .add_agent(
            "with-client-cert",
            1,
            &["--tls-client-cert", &cert, "--tls-client-key", &key],
        )
        .expect("admitted with a client certificate");
    // The snapshot comes through the tunnel, which needs the client certificate too.
    let check = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(check.code, Some(0), "{check}");
    assert!(
        check.stderr.contains("running on with-client-cert"),
        "{check}"
    );
}

#[test]
fn with_allow_insecure_a_seed_era_agent_connects_in_plain_text_and_fetches_directly() {
    let options = ServeOptions {
        extra_args: ["--allow-insecure", "--git-daemon-listen-addr", "0.0.0.0"]
            .map(str::to_owned)
            .to_vec(),
        ..ServeOptions::default()
    };
    let mut cluster =
        Cluster::start_with(Fixture::new().expect("fixture"), 0, 1, &options).expect("cluster");
    let plain = format!("ws://{}/ws", cluster.websocket_addr);
    cluster
        .add_agent("seed-era", 1, &["--server", &plain])
        .expect("a plain ws:// agent is admitted where allowed");
    let check = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(check.code, Some(0), "{check}");
    let log = cluster.coordinator.log_text();
    assert!(
        log.contains("allow_insecure is set"),
        "warns at start:\n{log}"
    );
    assert!(
        !log.contains("git fetch through the tunnel"),
        "the agent fetched from the daemon directly:\n{log}"
    );
    assert!(
        cluster.agents[0].log_text().contains("is plain ws://"),
        "the agent warns too:\n{}",
        cluster.agents[0].log_text()
    );
}
