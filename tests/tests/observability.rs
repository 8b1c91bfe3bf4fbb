//! What operators and people see of a running pool: Prometheus metrics of the coordinator
//! and of an agent after a real job, what both tell systemd, and `buildpool run`'s
//! progress line on a terminal.

use std::process::{Command, Stdio};
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, http_get, wait_until};

/// The value of the sample `series` (name and labels, exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

/// `promtool check metrics` accepts the text.
fn promtool_accepts(text: &str) {
    let promtool = buildpool_core::process::find_on_path("promtool")
        .expect("promtool is not installed (apt-get install prometheus; .ci/run does)");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("promtool ends");
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn metrics_of_coordinator_and_agent_count_a_real_job() {
    let mut cluster = Cluster::start(Fixture::new().expect("fixture"), 0, 1).expect("cluster");
    cluster
        .add_agent("worker-1", 2, &["--metrics-addr", "127.0.0.1:0"])
        .expect("agent");
    let build = cluster.fixture.run(&["run", "build"]).expect("runs");
    assert_eq!(build.code, Some(0), "{build}");

    let url = format!("{}/metrics", cluster.http_url().expect("http url"));
    let (status, text) = http_get(&url).expect("scrape");
    assert_eq!(status, 200, "{text}");
    for (series, value) in [
        ("buildpool_jobs_submitted_total{kind=\"build\"}", 1.0),
        (
            "buildpool_jobs_finished_total{kind=\"build\",outcome=\"success\"}",
            1.0,
        ),
        (
            "buildpool_job_queue_wait_seconds_count{kind=\"build\"}",
            1.0,
        ),
        (
            "buildpool_job_run_duration_seconds_count{kind=\"build\"}",
            1.0,
        ),
        ("buildpool_snapshot_fetch_duration_seconds_count", 1.0),
        ("buildpool_checkout_duration_seconds_count", 1.0),
        ("buildpool_workspace_wait_duration_seconds_count", 1.0),
        ("buildpool_environment_duration_seconds_count", 1.0),
        (
            "buildpool_cargo_duration_seconds_count{kind=\"build\"}",
            1.0,
        ),
        ("buildpool_job_delivery_duration_seconds_count", 1.0),
        ("buildpool_jobs_queued", 0.0),
        ("buildpool_jobs_running", 0.0),
        ("buildpool_agents_connected", 1.0),
        ("buildpool_slots", 2.0),
        ("buildpool_slots_used", 0.0),
        ("buildpool_agent_connections_total", 1.0),
        ("buildpool_agent_reconnects_total", 0.0),
        ("buildpool_declines_total", 0.0),
        ("buildpool_requeues_total", 0.0),
        ("buildpool_lost_attempts_total", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    let positive = |series: &str| sample(&text, series).is_some_and(|v| v > 0.0);
    assert!(positive("buildpool_output_bytes_total"), "{text}");
    assert!(
        positive("buildpool_agent_disk_budget_bytes{agent=\"worker-1\"}"),
        "{text}"
    );
    assert!(
        positive("buildpool_job_run_duration_seconds_sum{kind=\"build\"}"),
        "{text}"
    );
    assert!(
        positive("buildpool_cargo_duration_seconds_sum{kind=\"build\"}"),
        "{text}"
    );
    promtool_accepts(&text);

    let agent = &cluster.agents[0];
    let mut agent_url = None;
    let logged = wait_until(Duration::from_secs(10), || {
        agent_url = agent.log_text().lines().find_map(|line| {
            let start = line.find("metrics at http://")? + "metrics at ".len();
            Some(line[start..].trim().to_owned())
        });
        agent_url.is_some()
    });
    assert!(
        logged,
        "agent did not log its metrics address:\n{}",
        agent.log_text()
    );
    let (status, text) = http_get(&agent_url.expect("url")).expect("scrape agent");
    assert_eq!(status, 200, "{text}");
    for (series, value) in [
        (
            "build_agent_jobs_total{kind=\"build\",outcome=\"success\"}",
            1.0,
        ),
        (
            "build_agent_job_run_duration_seconds_count{kind=\"build\"}",
            1.0,
        ),
        ("build_agent_snapshot_fetch_duration_seconds_count", 1.0),
        ("build_agent_checkout_duration_seconds_count", 1.0),
        ("build_agent_slots", 2.0),
        ("build_agent_slots_used", 0.0),
        ("build_agent_draining", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    assert!(
        sample(&text, "build_agent_disk_budget_bytes").is_some_and(|v| v > 0.0),
        "{text}"
    );
    promtool_accepts(&text);
}

/// Datagrams on a notify socket the test binds itself, as systemd would.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    path: String,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path, name: &str) -> Self {
        let path = dir.join(name);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Self {
            socket,
            path: path.display().to_string(),
            seen: Vec::new(),
        }
    }

    /// The environment systemd gives a `Type=notify` service with `WatchdogSec=1`.
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NOTIFY_SOCKET".into(), self.path.clone()),
            ("WATCHDOG_USEC".into(), "1000000".into()),
        ]
    }

    /// Reads messages until one line satisfies `wanted`.
    fn wait_for(&mut self, wanted: impl Fn(&str) -> bool) -> bool {
        let mut buffer = [0u8; 4096];
        wait_until(Duration::from_secs(30), || {
            if let Ok(length) = self.socket.recv(&mut buffer) {
                let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
                self.seen.extend(message.lines().map(str::to_owned));
            }
            self.seen.iter().any(|line| wanted(line))
        })
    }
}

/// The agent's address for `/metrics`, from its log.
fn agent_metrics_url(agent: &buildpool_tests::Owned) -> String {
    let mut url = None;
    let logged = wait_until(Duration::from_secs(10), || {
        url = agent.log_text().lines().find_map(|line| {
            let start = line.find("metrics at http://")? + "metrics at ".len();
            Some(line[start..].trim().to_owned())
        });
        url.is_some()
    });
    assert!(logged, "no metrics address in:\n{}", agent.log_text());
    url.expect("url")
}

/// What an autoscaler reads (deploy/kubernetes/keda-scaledobject.yaml): the agent's busy
/// slots and the demand it hears from its coordinator follow real queued and running jobs.
#[test]
fn the_demand_an_autoscaler_reads_follows_queued_and_running_jobs() {
    let mut cluster = Cluster::start_with(
        Fixture::new().expect("fixture"),
        0,
        1,
        &buildpool_tests::ServeOptions::unsandboxed(),
    )
    .expect("cluster");
    cluster
        .add_agent("worker-1", 2, &["--metrics-addr", "127.0.0.1:0"])
        .expect("agent");
    let url = agent_metrics_url(&cluster.agents[0]);
    let coordinator = format!("wss://{}/ws", cluster.websocket_addr);
    let demand_series = format!("build_agent_demand{{coordinator=\"{coordinator}\"}}");
    let scrape = || http_get(&url).map(|(_, text)| text).unwrap_or_default();
    let reads = |used: f64, demand: f64| {
        let text = scrape();
        sample(&text, "build_agent_slots_used") == Some(used)
            && sample(&text, &demand_series) == Some(demand)
    };
    assert!(
        wait_until(Duration::from_secs(10), || reads(0.0, 0.0)),
        "{}",
        scrape()
    );

    // Two jobs run in the agent's two slots, one waits. (A coordinator tells an agent at
    // most as many waiting jobs as it has slots.)
    let fixture = &cluster.fixture;
    std::fs::write(fixture.sleep_file(), "120").expect("sleep file");
    let clients: Vec<buildpool_tests::Owned> = (0..3)
        .map(|n| {
            buildpool_tests::Owned::spawn(
                fixture.command_in(&fixture.root(), &Fixture::brief_job()),
                fixture.scratch().join(format!("client-{n}.log")),
            )
            .expect("client")
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(120), || reads(2.0, 1.0)),
        "two running and one queued, not:\n{}",
        scrape()
    );
    // The clients go (their jobs are cancelled): nothing runs, nothing waits.
    drop(clients);
    assert!(
        wait_until(Duration::from_secs(60), || reads(0.0, 0.0)),
        "{}",
        scrape()
    );
}

/// The probes an orchestrator asks (deploy/kubernetes): `/readyz` is 503 with the reason
/// until a coordinator welcomes the agent, 200 then, and 503 again once it drains, while
/// `/healthz` answers 200 throughout, coordinator or not.
#[test]
fn readiness_follows_the_coordinator_link_and_the_drain() {
    let cluster = Cluster::start_with(
        Fixture::new().expect("fixture"),
        0,
        1,
        &buildpool_tests::ServeOptions::unsandboxed(),
    )
    .expect("cluster");
    // A stopped coordinator accepts the agent's TCP connection and answers nothing.
    cluster.coordinator.signal(buildpool_tests::SIGSTOP);
    let command = cluster.agent_command("worker-1", 1, &["--metrics-addr", "127.0.0.1:0"]);
    let log = cluster.fixture.scratch().join("worker-1.log");
    let mut agent = buildpool_tests::Owned::spawn(command, log).expect("agent starts");
    let metrics = agent_metrics_url(&agent);
    let base = metrics.strip_suffix("/metrics").expect("a /metrics URL");
    let probe = |path: &str| http_get(&format!("{base}{path}")).unwrap_or_default();
    let (status, reason) = probe("/readyz");
    assert_eq!(
        (status, reason.as_str()),
        (503, "not connected to any coordinator (1 configured)\n")
    );
    let (status, line) = probe("/healthz");
    assert_eq!(status, 200, "{line}");
    assert!(line.contains("0 of 1 coordinators connected"), "{line}");

    cluster.coordinator.signal(buildpool_tests::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(60), || probe("/readyz")
            == (200, "ready\n".to_owned())),
        "{:?}\n{}",
        probe("/readyz"),
        agent.log_text()
    );

    // A job runs; SIGTERM drains: no longer ready, still alive while the job finishes.
    let fixture = &cluster.fixture;
    std::fs::write(fixture.sleep_file(), "120").expect("sleep file");
    let client = buildpool_tests::Owned::spawn(
        fixture.command_in(&fixture.root(), &Fixture::brief_job()),
        fixture.scratch().join("client.log"),
    )
    .expect("client");
    assert!(
        wait_until(Duration::from_secs(120), || probe("/healthz")
            .1
            .starts_with("1 of 1 slots used")),
        "{:?}\n{}",
        probe("/healthz"),
        client.log_text()
    );
    agent.signal(buildpool_tests::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (status, reason) = probe("/readyz");
            status == 503 && reason.starts_with("draining")
        }),
        "{:?}",
        probe("/readyz")
    );
    let (status, line) = probe("/healthz");
    assert_eq!(status, 200, "{line}");
    assert!(line.trim_end().ends_with(", draining"), "{line}");
    // The client goes (cancelling its job), and the drained agent exits.
    drop(client);
    let exited = agent.wait_timeout(Duration::from_secs(90));
    assert!(
        exited.is_some_and(|status| status.success()),
        "{exited:?}\n{}",
        agent.log_text()
    );
}

#[test]
fn serve_and_agent_notify_readiness_status_and_the_watchdog() {
    let dir = tempfile::tempdir().expect("temp");
    let mut coordinator = NotifySocket::bind(dir.path(), "coordinator.sock");
    let mut env = coordinator.env();
    // Inherited from a service whose stderr was the journal, but this stderr is a file:
    // logs stay on stderr.
    env.push(("JOURNAL_STREAM".into(), "1:1".into()));
    let options = buildpool_tests::ServeOptions {
        env,
        ..buildpool_tests::ServeOptions::default()
    };
    let mut cluster =
        Cluster::start_with(Fixture::new().expect("fixture"), 0, 1, &options).expect("cluster");
    assert!(
        cluster
            .coordinator
            .log_text()
            .contains("coordinator started"),
        "{}",
        cluster.coordinator.log_text()
    );
    assert!(
        coordinator.wait_for(|line| line == "READY=1"),
        "{:?}",
        coordinator.seen
    );
    assert!(
        coordinator.wait_for(|line| line == "STATUS=0 agents, 0 running, 0 queued"),
        "{:?}",
        coordinator.seen
    );
    assert!(
        coordinator.wait_for(|line| line == "WATCHDOG=1"),
        "{:?}",
        coordinator.seen
    );

    let mut agent_socket = NotifySocket::bind(dir.path(), "agent.sock");
    let mut command = cluster.agent_command("worker-1", 2, &[]);
    command.envs(agent_socket.env());
    let agent =
        buildpool_tests::Owned::spawn(command, dir.path().join("agent.log")).expect("agent starts");
    cluster.agents.push(agent);
    assert!(
        agent_socket.wait_for(|line| line == "READY=1"),
        "{:?}\n{}",
        agent_socket.seen,
        cluster.agents[0].log_text()
    );
    assert!(
        agent_socket.wait_for(|line| line == "STATUS=0 of 2 slots used"),
        "{:?}",
        agent_socket.seen
    );
    assert!(
        agent_socket.wait_for(|line| line == "WATCHDOG=1"),
        "{:?}",
        agent_socket.seen
    );
    assert!(
        coordinator.wait_for(|line| line == "STATUS=1 agent, 0 running, 0 queued"),
        "{:?}",
        coordinator.seen
    );

    cluster.coordinator.signal(buildpool_tests::SIGTERM);
    assert!(
        coordinator.wait_for(|line| line == "STOPPING=1"),
        "{:?}",
        coordinator.seen
    );
}

#[test]
fn run_on_a_terminal_shows_one_progress_line_and_clears_it_at_the_end() {
    let cluster = Cluster::start(Fixture::new().expect("fixture"), 1, 1).expect("cluster");
    let fixture = &cluster.fixture;
    // `script` (util-linux) gives the run a pseudo-terminal for stdout and stderr alike.
    let command_line = format!(
        "'{}' -C '{}' run build",
        buildpool_tests::buildpool_bin().display(),
        fixture.root().display()
    );
    let mut script = Command::new("script");
    script.args(["-qec", &command_line, "/dev/null"]);
    fixture.apply_env(&mut script);
    let output = script.output().expect("script runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    const CLEAR: &str = "\r\x1b[2K";
    assert!(
        text.contains(&format!("{CLEAR}[buildpool] assigned to worker-1")),
        "{text:?}"
    );
    // The fixture's lockfile names two packages: util and app.
    let compiling = text
        .rfind(&format!("{CLEAR}[buildpool] compiling "))
        .unwrap_or_else(|| panic!("no compiling progress in {text:?}"));
    assert!(text[compiling..].contains("/2 crates"), "{text:?}");
    // The final line is written on a cleared line, and nothing is drawn after it.
    let summary = text
        .rfind("[buildpool] job 1 exit code 0")
        .expect("the final line");
    assert!(text[..summary].ends_with(CLEAR), "{text:?}");
    assert!(!text[summary..].contains(CLEAR), "{text:?}");

    // Piped, or with --quiet, there is no progress line.
    let piped = fixture.run(&["run", "build"]).expect("runs");
    assert!(!piped.stderr.contains(CLEAR), "{piped}");
    let mut quiet = Command::new("script");
    quiet.args(["-qec", &format!("{command_line} --quiet"), "/dev/null"]);
    fixture.apply_env(&mut quiet);
    let quiet = quiet.output().expect("script runs");
    let text = String::from_utf8_lossy(&quiet.stdout);
    assert!(quiet.status.success(), "{text}");
    assert!(!text.contains(CLEAR), "{text:?}");
}
