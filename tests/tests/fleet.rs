//! Build agents in a fleet: one agent serving several coordinators from one slot pool,
//! reconnects, reattach after a network cut, lost agents, drain.

use std::time::{Duration, Instant};

use buildpool_tests::{Cluster, Fixture, Owned, Proxy, RunOutput, ServeOptions, wait_until};

/// Short heartbeats so dead links are found in seconds, and the given reattach grace.
/// Agents run jobs unsandboxed: these tests count the fixture's starts from the host.
fn timeouts(reattach_grace_secs: u64) -> ServeOptions {
    let config = format!(
        "[build_pool.timeouts]\nheartbeat_interval_secs = 1\nheartbeat_timeout_secs = 3\nreattach_grace_secs = {reattach_grace_secs}\n"
    );
    ServeOptions {
        config: Some(config),
        ..ServeOptions::unsandboxed()
    }
}

/// A grace long enough to reattach after any cut in these tests.
fn fast() -> ServeOptions {
    timeouts(20)
}

/// A coordinator with `agents` agents of one slot each, started as `options` say.
fn cluster(agents: usize, options: &ServeOptions) -> Cluster {
    Cluster::start_with(Fixture::new().expect("fixture"), agents, 1, options).expect("cluster")
}

fn spawn_run(fixture: &Fixture, args: &[&str], name: &str) -> Owned {
    Owned::spawn(
        fixture.command_in(&fixture.root(), args),
        fixture.scratch().join(format!("{name}.log")),
    )
    .expect("run starts")
}

/// Runs `sleeps_briefly` for `sleep_secs` seconds and waits until it has started.
fn start_brief_job(fixture: &Fixture, sleep_secs: &str, name: &str) -> Owned {
    std::fs::write(fixture.sleep_file(), sleep_secs).expect("sleep file");
    let run = spawn_run(fixture, &Fixture::brief_job(), name);
    assert!(
        wait_until(Duration::from_secs(60), || fixture.starts() == 1),
        "{}",
        run.log_text()
    );
    run
}

/// A job running on worker-1 under short heartbeats, and an idle worker-2 to take it over.
fn job_with_a_standby_agent(sleep_secs: &str, name: &str) -> (Cluster, Owned) {
    let mut cluster = cluster(1, &timeouts(2));
    let run = start_brief_job(&cluster.fixture, sleep_secs, name);
    cluster.add_agent("worker-2", 1, &[]).expect("second agent");
    (cluster, run)
}

fn finish(run: &mut Owned, timeout: Duration) -> (i32, String) {
    let status = run
        .wait_timeout(timeout)
        .unwrap_or_else(|| panic!("run did not finish:\n{}", run.log_text()));
    (status.code().unwrap_or(-1), run.log_text())
}

/// Waits for `run`: attempt 2, on worker-2, gave the job's one and only result.
fn finish_as_attempt_2_on_worker_2(run: &mut Owned, timeout: Duration) {
    let (code, log) = finish(run, timeout);
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("on worker-2") && log.contains("attempt 2"),
        "{log}"
    );
    assert_eq!(
        log.matches("[buildpool] job 1 exit code").count(),
        1,
        "exactly one result:\n{log}"
    );
}

/// Waits up to `timeout` for `process`'s log to contain `text`.
fn log_shows(process: &Owned, text: &str, timeout: Duration) -> bool {
    wait_until(timeout, || process.log_text().contains(text))
}

/// Waits for an agent asked to stop to exit with 0.
fn exits_0(agent: &mut Owned, expect: &str) {
    let status = agent.wait_timeout(Duration::from_secs(20)).expect(expect);
    assert_eq!(status.code(), Some(0), "{}", agent.log_text());
}

/// Two coordinators (separate repositories) and one agent with one slot connected to both.
fn two_coordinators_one_slot() -> (Cluster, Cluster, Owned) {
    let first = cluster(0, &fast());
    let shared_token = ServeOptions {
        token_file: Some(first.fixture.token_file()),
        ..fast()
    };
    let second = cluster(0, &shared_token);
    let command = first.agent_command(
        "shared",
        1,
        &["--server", &first.bus_url(), "--server", &second.bus_url()],
    );
    let agent =
        Owned::spawn(command, first.fixture.scratch().join("shared-agent.log")).expect("agent");
    for cluster in [&first, &second] {
        assert!(
            wait_until(Duration::from_secs(20), || cluster.agent_ids()
                == ["shared"]),
            "{}",
            agent.log_text()
        );
    }
    (first, second, agent)
}

#[test]
fn one_slot_shared_by_two_coordinators_loses_no_job_under_racing_submissions() {
    let (first, second, agent) = two_coordinators_one_slot();
    let mut runs = Vec::new();
    for round in 0..3 {
        for (name, cluster) in [("a", &first), ("b", &second)] {
            runs.push(spawn_run(
                &cluster.fixture,
                &["run", "check"],
                &format!("{name}{round}"),
            ));
        }
    }
    for mut run in runs {
        let (code, log) = finish(&mut run, Duration::from_secs(120));
        assert_eq!(code, 0, "{log}\nagent:\n{}", agent.log_text());
        assert!(log.contains("running on shared"), "{log}");
    }
}

#[test]
fn two_busy_coordinators_share_the_slot_fairly() {
    let (first, second, agent) = two_coordinators_one_slot();
    for cluster in [&first, &second] {
        std::fs::write(cluster.fixture.sleep_file(), "1").expect("sleep file");
        // Warm both workspaces so build time does not skew the order.
        let warm = cluster.fixture.run(&Fixture::brief_job()).expect("warm");
        assert_eq!(warm.code, Some(0), "{warm}");
    }
    let mut runs: Vec<(char, Owned)> = Vec::new();
    for round in 0..4 {
        runs.push((
            'a',
            spawn_run(&first.fixture, &Fixture::brief_job(), &format!("fa{round}")),
        ));
        runs.push((
            'b',
            spawn_run(
                &second.fixture,
                &Fixture::brief_job(),
                &format!("fb{round}"),
            ),
        ));
    }
    let mut order = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !runs.is_empty() && Instant::now() < deadline {
        runs.retain_mut(
            |(name, run)| match run.wait_timeout(Duration::from_millis(10)) {
                Some(status) => {
                    assert_eq!(status.code(), Some(0), "{}", run.log_text());
                    order.push(*name);
                    false
                }
                None => true,
            },
        );
    }
    assert!(
        runs.is_empty(),
        "jobs did not finish: {order}\n{}",
        agent.log_text()
    );
    // Round robin: neither coordinator waits while the other runs everything.
    let head: String = order.chars().take(4).collect();
    assert_eq!(head.matches('a').count(), 2, "completion order {order}");
    assert_eq!(head.matches('b').count(), 2, "completion order {order}");
}

#[test]
fn an_agent_reconnects_to_a_coordinator_restarted_after_kill_9() {
    let mut cluster = cluster(1, &fast());
    cluster.coordinator.kill_hard();
    std::thread::sleep(Duration::from_millis(500));
    cluster
        .restart_coordinator(&fast())
        .expect("restarts on the same ports");
    assert!(
        wait_until(Duration::from_secs(30), || cluster.agent_ids()
            == ["worker-1"]),
        "the agent did not come back:\n{}",
        cluster.agents[0].log_text()
    );
    let run = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stderr.contains("running on worker-1"), "{run}");
}

#[test]
fn a_job_survives_a_cut_connection_and_is_reattached_not_rerun() {
    let mut cluster = cluster(0, &fast());
    let proxy = Proxy::start(&cluster.websocket_addr).expect("proxy");
    cluster
        .add_agent("behind-proxy", 1, &["--server", &proxy.bus_url()])
        .expect("agent");
    let fixture = &cluster.fixture;
    let mut run = start_brief_job(fixture, "12", "reattach");

    let cut_at = Instant::now();
    proxy.cut();
    let coordinator = &cluster.coordinator;
    assert!(
        log_shows(coordinator, "reported=1", Duration::from_secs(15)),
        "the agent did not reconnect and report its attempt:\n{}\nagent:\n{}",
        coordinator.log_text(),
        cluster.agents[0].log_text()
    );
    let reattached_after = cut_at.elapsed();
    let (code, log) = finish(&mut run, Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    assert_eq!(fixture.starts(), 1, "the job was rerun");
    assert_eq!(
        log.matches("[buildpool] job 1 exit code 0").count(),
        1,
        "exactly one result:\n{log}"
    );
    assert!(log.contains("attempt 1"), "{log}");
    assert!(
        log.contains("test tests::sleeps_briefly ... ok"),
        "the output after the cut arrived:\n{log}"
    );
    eprintln!(
        "reattached {:.1} s after the cut",
        reattached_after.as_secs_f64()
    );
}

#[test]
fn a_job_of_an_agent_killed_with_kill_9_finishes_elsewhere_as_attempt_2() {
    let (mut cluster, mut run) = job_with_a_standby_agent("3", "killed");
    cluster.agents[0].kill_hard();
    finish_as_attempt_2_on_worker_2(&mut run, Duration::from_secs(90));
}

#[test]
fn sigterm_drains_an_agent_which_finishes_its_job_and_exits_0() {
    let mut cluster = cluster(1, &fast());
    let fixture = &cluster.fixture;
    let mut run = start_brief_job(fixture, "5", "drained");
    cluster.agents[0].signal(buildpool_tests::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || cluster.status().is_ok_and(
            |s| s["agents"].as_array().is_some_and(|a| a
                .iter()
                .any(|a| a["id"] == "worker-1" && a["draining"] == true))
        )),
        "the coordinator does not show the agent draining"
    );
    let (code, log) = finish(&mut run, Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("on worker-1"), "{log}");
    exits_0(&mut cluster.agents[0], "agent exits after draining");
    assert_eq!(fixture.starts(), 1);
}

#[test]
fn a_coordinator_can_drain_an_agent_by_id() {
    let cluster = cluster(1, &fast());
    let drained: RunOutput = cluster
        .fixture
        .run(&["agents", "drain", "worker-1"])
        .expect("runs");
    assert_eq!(drained.code, Some(0), "{drained}");
    let unknown: RunOutput = cluster
        .fixture
        .run(&["agents", "drain", "nobody"])
        .expect("runs");
    assert_ne!(unknown.code, Some(0));
    assert!(unknown.stderr.contains("no agent \"nobody\""), "{unknown}");
    let mut cluster = cluster;
    exits_0(&mut cluster.agents[0], "the agent exits");
}

#[test]
fn a_job_no_connected_agent_can_run_fails_with_the_reason() {
    let options = ServeOptions {
        config: Some("[build_pool.timeouts]\nunroutable_wait_secs = 2\n".into()),
        ..ServeOptions::default()
    };
    let cluster = cluster(1, &options);
    let started = Instant::now();
    let run = cluster
        .fixture
        .run(&["run", "check", "--label", "gpu"])
        .expect("runs");
    assert_eq!(run.code, Some(125), "{run}");
    assert!(
        run.stderr.contains("no connected agent can run this job"),
        "{run}"
    );
    assert!(run.stderr.contains("gpu"), "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it waited {:?}",
        started.elapsed()
    );
}

#[test]
fn a_second_signal_during_a_drain_stops_the_job_at_once() {
    let mut cluster = cluster(1, &fast());
    let fixture = &cluster.fixture;
    let mut run = start_brief_job(fixture, "300", "interrupted");
    let agent = &mut cluster.agents[0];
    agent.signal(buildpool_tests::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    agent.signal(buildpool_tests::SIGINT);
    exits_0(agent, "the agent stops at once");
    assert!(
        agent.log_text().contains("stopping running jobs now"),
        "{}",
        agent.log_text()
    );
    let (code, log) = finish(&mut run, Duration::from_secs(30));
    assert_eq!(code, 130, "the job ended as cancelled:\n{log}");
}

#[test]
fn a_failing_prewarm_is_logged_not_fatal() {
    let mut cluster = cluster(0, &fast());
    let config = cluster.fixture.scratch().join("agent.toml");
    std::fs::write(
        &config,
        "[nix]\nprewarm_packages = [\"path:/nonexistent-flake#nothing\"]\n",
    )
    .expect("config");
    cluster
        .add_agent(
            "prewarmed",
            1,
            &["--config", config.to_str().expect("utf-8")],
        )
        .expect("the agent starts anyway");
    let agent = &cluster.agents[0];
    assert!(
        log_shows(agent, "prewarm failed", Duration::from_secs(30)),
        "{}",
        agent.log_text()
    );
    let run = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(run.code, Some(0), "{run}");
}

#[test]
fn a_late_result_from_a_frozen_agents_superseded_attempt_is_ignored() {
    let (cluster, mut run) = job_with_a_standby_agent("6", "frozen");
    let fixture = &cluster.fixture;
    // Freeze the agent (not its job): its link goes silent, the job runs on and ends.
    cluster.agents[0].signal(buildpool_tests::SIGSTOP);
    assert!(
        wait_until(Duration::from_secs(30), || fixture.starts() == 2),
        "attempt 2 never started:\n{}",
        cluster.coordinator.log_text()
    );
    std::thread::sleep(Duration::from_secs(5));
    // Thawed, the agent reconnects and reports its finished attempt 1: the coordinator
    // tells it to forget the result, and the job's outcome stays attempt 2's.
    cluster.agents[0].signal(buildpool_tests::SIGCONT);
    finish_as_attempt_2_on_worker_2(&mut run, Duration::from_secs(60));
    let coordinator = &cluster.coordinator;
    assert!(
        log_shows(
            coordinator,
            "ignored the result of a stale attempt",
            Duration::from_secs(20)
        ),
        "the thawed agent's result of attempt 1 never arrived to be ignored:\n{}",
        coordinator.log_text()
    );
}

/// The agent a `buildpool run` job ran on, from its "running on AGENT" note.
fn ran_on(run: &RunOutput) -> String {
    run.stderr
        .lines()
        .find_map(|line| Some(line.split_once(" running on ")?.1.split_once(" (")?.0))
        .unwrap_or_else(|| panic!("no 'running on' note in {run}"))
        .to_owned()
}

#[test]
fn jobs_of_a_worktree_return_to_the_agent_that_built_it_last() {
    let cluster = cluster(2, &ServeOptions::default());
    let fixture = &cluster.fixture;
    let other = fixture.add_worktree("other").expect("worktree");
    // A commit of its own: the other worktree shares no base commit with the main one.
    let other_dir = other.to_str().expect("utf-8 path");
    fixture
        .git(&[
            "-C",
            other_dir,
            "commit",
            "--quiet",
            "--allow-empty",
            "-m",
            "other",
        ])
        .expect("commit");
    let check_in = |dir: &std::path::Path| -> RunOutput {
        let run: RunOutput = fixture
            .command_in(dir, &["run", "check"])
            .output()
            .expect("runs")
            .into();
        assert_eq!(run.code, Some(0), "{run}");
        run
    };
    let main_agent = ran_on(&check_in(&fixture.root()));
    // Both agents idle: the other worktree takes the agent with a never used workspace,
    // not the main worktree's, and comes back to it; so does the main worktree.
    let first = ran_on(&check_in(&other));
    assert_ne!(first, main_agent);
    let lib = other.join("app/src/lib.rs");
    let text = std::fs::read_to_string(&lib).expect("read");
    std::fs::write(&lib, format!("{text}\n// changed\n")).expect("edit");
    assert_eq!(ran_on(&check_in(&other)), first);
    assert_eq!(ran_on(&check_in(&fixture.root())), main_agent);
}
