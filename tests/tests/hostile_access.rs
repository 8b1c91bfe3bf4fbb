//! Hostile callers on the coordinator's own host and through the tunnel (issue 25): bad
//! credentials from an address never lock out the valid ones sent from it, a page that
//! rebinds a name of its own to 127.0.0.1 cannot read the dashboard, and an agent
//! credential reaches snapshots through the tunnel, never the repository's branches.

use std::io::{Read, Write};
use std::process::{Command, Output};
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, TUNNEL_REPO_URL};

fn cluster(agents: usize) -> Cluster {
    Cluster::start(Fixture::new().expect("fixture"), agents, 1).expect("cluster")
}

/// `buildpool <args>` presenting `secret` instead of the token file.
fn run_with_credential(fixture: &Fixture, secret: &str, args: &[&str]) -> Output {
    fixture
        .command_in(&fixture.root(), args)
        .env("BUILDPOOL_TOKEN", secret)
        .output()
        .expect("runs")
}

/// The token file's value: the owner's own credential (both scopes while no agent
/// credential exists).
fn owner_token(fixture: &Fixture) -> String {
    std::fs::read_to_string(fixture.token_file())
        .expect("token file")
        .trim()
        .to_owned()
}

/// `git <args> TUNNEL_REPO_URL <after>` through the tunnel, presenting `credential`.
fn git_through_tunnel(
    cluster: &Cluster,
    credential: &str,
    dir: &std::path::Path,
    args: &[&str],
    after: &[&str],
) -> Output {
    let mut git = Command::new("git");
    git.current_dir(dir)
        .args(args)
        .arg(TUNNEL_REPO_URL)
        .args(after);
    cluster
        .through_tunnel(&mut git, credential)
        .expect("proxy command");
    git.output().expect("git runs")
}

#[test]
fn bad_attempts_from_an_address_never_lock_out_valid_credentials_from_it() {
    let cluster = cluster(1);
    let fixture = &cluster.fixture;
    // Eleven bad attempts from 127.0.0.1, one past the limit.
    let mut last = None;
    for _ in 0..11 {
        last = Some(run_with_credential(
            fixture,
            "not-a-credential",
            &["status"],
        ));
    }
    let last = last.expect("attempted");
    assert!(!last.status.success(), "a bad credential read status");
    let stderr = String::from_utf8_lossy(&last.stderr);
    assert!(
        stderr.contains("too many failed attempts"),
        "bad attempts are still limited: {stderr}"
    );

    // The owner's CLI, from the same address, still gets in.
    let status = fixture.run(&["status"]).expect("runs");
    assert_eq!(status.code, Some(0), "the owner was locked out: {status}");

    // So does a job: submitted by the owner, fetched by the agent through the tunnel, both
    // from the limited address.
    let check = fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(check.code, Some(0), "{check}");
    assert!(check.stderr.contains("running on worker-1"), "{check}");

    // And an agent credential through the tunnel.
    let scratch = fixture.scratch();
    let listed = git_through_tunnel(
        &cluster,
        &owner_token(fixture),
        &scratch,
        &["ls-remote"],
        &[],
    );
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
}

/// `GET path` on `addr` (a loopback `host:port`) as HTTP/1.1 with `host` as its `Host`
/// header, or HTTP/1.0 without one: `(status, body)`.
fn get_with_host(addr: &str, path: &str, host: Option<&str>) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let request = match host {
        Some(host) => format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        None => format!("GET {path} HTTP/1.0\r\n\r\n"),
    };
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status");
    (status, body.to_owned())
}

#[test]
fn the_loopback_dashboard_answers_only_to_loopback_names() {
    let cluster = cluster(0);
    let url = cluster.http_url().expect("http url");
    let addr = url.strip_prefix("http://").expect("plain HTTP on loopback");
    let port = addr.rsplit(':').next().expect("port");

    // What a DNS-rebinding page's requests carry: its own name.
    for host in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("[::1].evil.example:{port}"),
    ] {
        for path in ["/api/state", "/jobs/1/log", "/metrics", "/"] {
            let (status, body) = get_with_host(addr, path, Some(&host));
            assert_eq!(status, 421, "Host: {host} read {path}: {body}");
            assert!(body.contains("loopback"), "{body}");
        }
    }

    // The names the dashboard is really reached by.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "localhost".to_owned(),
        format!("LocalHost:{port}"),
        format!("127.0.0.2:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (status, body) = get_with_host(addr, "/api/state", Some(&host));
        assert_eq!(status, 200, "Host: {host}: {body}");
    }
    let (status, body) = get_with_host(addr, "/metrics", None);
    assert_eq!(status, 200, "HTTP/1.0 without a Host header: {body}");
}

#[test]
fn the_tunnel_offers_an_agent_only_snapshots() {
    let cluster = cluster(1);
    let fixture = &cluster.fixture;
    let credential = owner_token(fixture);
    // A private branch with a commit of its own, a tag, and a snapshot ref.
    let private = fixture
        .git(&[
            "commit-tree",
            "HEAD^{tree}",
            "-p",
            "HEAD",
            "-m",
            "private work",
        ])
        .expect("commit")
        .trim()
        .to_owned();
    fixture
        .git(&["update-ref", "refs/heads/private-wip", &private])
        .expect("branch");
    fixture.git(&["tag", "v1"]).expect("tag");
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let snapshot = format!("refs/buildpool/snapshots/{millis}-0000abcd");
    fixture
        .git(&["update-ref", &snapshot, "HEAD"])
        .expect("snapshot ref");
    let scratch = fixture.scratch();

    for version in ["2", "1", "0"] {
        let protocol = format!("protocol.version={version}");
        let listed = git_through_tunnel(
            &cluster,
            &credential,
            &scratch,
            &["-c", &protocol, "ls-remote"],
            &[],
        );
        let stdout = String::from_utf8_lossy(&listed.stdout);
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let names: Vec<&str> = stdout
            .lines()
            .filter_map(|line| line.split('\t').nth(1))
            .collect();
        assert_eq!(names, [snapshot.as_str()], "protocol v{version}");
    }

    // Neither a branch's commit by id, in any protocol version...
    let cache = scratch.join("fetcher.git");
    let init = Command::new("git")
        .args(["init", "--quiet", "--bare"])
        .arg(&cache)
        .status()
        .expect("git init");
    assert!(init.success());
    for version in ["2", "1", "0"] {
        let protocol = format!("protocol.version={version}");
        let fetched = git_through_tunnel(
            &cluster,
            &credential,
            &cache,
            &["-c", &protocol, "fetch", "--quiet"],
            &[&format!("{private}:refs/stolen")],
        );
        assert!(
            !fetched.status.success(),
            "protocol v{version} fetched a private branch's commit"
        );
        let held = Command::new("git")
            .arg("-C")
            .arg(&cache)
            .args(["cat-file", "-e", &private])
            .status()
            .expect("git cat-file");
        assert!(!held.success(), "protocol v{version}: the commit arrived");
    }
    // ...nor a branch by name.
    let by_name = git_through_tunnel(
        &cluster,
        &credential,
        &cache,
        &["fetch", "--quiet"],
        &["refs/heads/private-wip:refs/stolen"],
    );
    assert!(!by_name.status.success(), "fetched a private branch");

    // The snapshot itself, as agents fetch it, comes through.
    let fetched = git_through_tunnel(
        &cluster,
        &credential,
        &cache,
        &["-c", "protocol.version=1", "fetch", "--quiet"],
        &[&format!("+{snapshot}:refs/buildpool/fetched/x")],
    );
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );

    // And jobs still run through it.
    let check = fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(check.code, Some(0), "{check}");
    assert!(check.stderr.contains("running on worker-1"), "{check}");
}
