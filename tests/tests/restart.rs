//! A coordinator restarted mid-job loses nothing: `kill -9` of `buildpool serve` while a
//! job runs or waits, a corrupt job store, and a coordinator that never comes back.

use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, Owned, ServeOptions, wait_until};

/// Short heartbeats, a reattach grace that covers the restart, agents unsandboxed (these
/// tests count the fixture's starts from the host).
fn options() -> ServeOptions {
    ServeOptions {
        config: Some(
            "[build_pool.timeouts]\nheartbeat_interval_secs = 1\nheartbeat_timeout_secs = 3\nreattach_grace_secs = 20\n"
                .to_owned(),
        ),
        ..ServeOptions::unsandboxed()
    }
}

fn cluster(agents: usize) -> Cluster {
    Cluster::start_with(Fixture::new().expect("fixture"), agents, 1, &options()).expect("cluster")
}

/// `buildpool run` of the fixture's `sleeps_briefly`, sleeping `secs`.
fn spawn_brief_job(fixture: &Fixture, secs: &str, name: &str, env: &[(&str, &str)]) -> Owned {
    std::fs::write(fixture.sleep_file(), secs).expect("sleep file");
    let mut command = fixture.command_in(&fixture.root(), &Fixture::brief_job());
    command.envs(env.iter().copied());
    Owned::spawn(command, fixture.scratch().join(format!("{name}.log"))).expect("run starts")
}

fn finish(run: &mut Owned) -> (i32, String) {
    let status = run
        .wait_timeout(Duration::from_secs(120))
        .unwrap_or_else(|| panic!("run did not finish:\n{}", run.log_text()));
    (status.code().unwrap_or(-1), run.log_text())
}

/// kill -9, a moment of absence, and a new `serve` on the same bus port (its control port
/// changes: clients must find it again through the discovery file).
fn crash_and_restart(cluster: &mut Cluster) {
    cluster.coordinator.kill_hard();
    std::thread::sleep(Duration::from_secs(1));
    cluster.restart_coordinator(&options()).expect("restarts");
}

#[test]
fn a_run_outlives_kill_9_of_its_coordinator_with_one_start_and_all_its_output() {
    let mut cluster = cluster(1);
    let fixture = &cluster.fixture;
    let mut run = spawn_brief_job(fixture, "8", "survivor", &[]);
    // The crash comes once the client has shown the test's first line: output still on its
    // way to the coordinator when it dies is not what this test is about.
    assert!(
        wait_until(Duration::from_secs(60), || fixture.starts() == 1
            && run.log_text().contains("running 1 test")),
        "{}",
        run.log_text()
    );
    crash_and_restart(&mut cluster);
    let (code, log) = finish(&mut run);
    assert_eq!(
        code,
        0,
        "{log}\ncoordinator:\n{}",
        cluster.coordinator.log_text()
    );
    assert_eq!(cluster.fixture.starts(), 1, "the job was rerun:\n{log}");
    assert_eq!(
        log.matches("[buildpool] job 1 exit code 0").count(),
        1,
        "exactly one result:\n{log}"
    );
    assert_eq!(
        log.matches("running 1 test").count(),
        1,
        "output before the crash, once:\n{log}"
    );
    assert_eq!(
        log.matches("test tests::sleeps_briefly ... ok").count(),
        1,
        "output after the restart, once:\n{log}"
    );
}

#[test]
fn a_queued_job_survives_a_restart_and_runs_once_after_the_running_one() {
    let mut cluster = cluster(1);
    let fixture = &cluster.fixture;
    let mut first = spawn_brief_job(fixture, "6", "first", &[]);
    assert!(wait_until(Duration::from_secs(60), || fixture.starts() == 1));
    let mut second = spawn_brief_job(fixture, "1", "second", &[]);
    assert!(
        wait_until(Duration::from_secs(20), || second
            .log_text()
            .contains("queued")),
        "{}",
        second.log_text()
    );
    crash_and_restart(&mut cluster);
    let (code, log) = finish(&mut first);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("[buildpool] job 1 exit code 0"), "{log}");
    let (code, log) = finish(&mut second);
    assert_eq!(
        code,
        0,
        "{log}\ncoordinator:\n{}",
        cluster.coordinator.log_text()
    );
    assert_eq!(
        log.matches("[buildpool] job 2 exit code 0").count(),
        1,
        "{log}"
    );
    assert_eq!(cluster.fixture.starts(), 2, "each job started once");
}

#[test]
fn a_corrupt_job_store_is_moved_aside_and_the_coordinator_starts() {
    let fixture = Fixture::new().expect("fixture");
    let state = fixture.root().join(".git/buildpool");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("jobs.db"), vec![0x5a; 16 * 1024]).expect("garbage");
    let cluster =
        Cluster::start_with(fixture, 0, 1, &ServeOptions::default()).expect("starts anyway");
    let aside = std::fs::read_dir(&state)
        .expect("list")
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("jobs.db.corrupt-")
        })
        .count();
    assert_eq!(aside, 1);
    let log = cluster.coordinator.log_text();
    assert!(
        log.contains("cannot be used") && log.contains("moved it to"),
        "{log}"
    );
    let run = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(run.code, Some(0), "{run}");
}

#[test]
fn a_job_its_coordinator_cannot_store_is_refused_and_cancelled_though_an_agent_took_it() {
    let cluster = cluster(1);
    let fixture = &cluster.fixture;
    // Another process takes the job table away: the coordinator's next write fails.
    let intruder = rusqlite::Connection::open(fixture.root().join(".git/buildpool/jobs.db"))
        .expect("the store");
    intruder
        .execute_batch("ALTER TABLE jobs RENAME TO jobs_aside")
        .expect("rename");
    let refused = fixture.run(&["run", "check"]).expect("runs");
    assert_ne!(refused.code, Some(0), "{refused}");
    assert!(
        refused.to_string().contains("cannot store the job"),
        "{refused}"
    );
    // The idle agent took the job while it was being stored, and was told to stop it.
    let cancelled_on_its_agent = |log: &str| {
        log.lines().any(|line| {
            line.contains("job finished")
                && line.contains("job_id=1 ")
                && line.contains("end=Cancelled")
                && !line.contains("agent_id= ")
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || cancelled_on_its_agent(
            &cluster.coordinator.log_text()
        )),
        "{}",
        cluster.coordinator.log_text()
    );
    intruder
        .execute_batch("ALTER TABLE jobs_aside RENAME TO jobs")
        .expect("rename back");
    let run = fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(run.code, Some(0), "{run}");
}

#[test]
fn a_client_whose_coordinator_does_not_come_back_says_so_and_exits_non_zero() {
    let mut cluster = cluster(1);
    let fixture = &cluster.fixture;
    let mut run = spawn_brief_job(
        fixture,
        "30",
        "abandoned",
        &[("BUILDPOOL_RECONNECT_TIMEOUT", "3")],
    );
    assert!(wait_until(Duration::from_secs(60), || fixture.starts() == 1));
    cluster.coordinator.kill_hard();
    let (code, log) = finish(&mut run);
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("did not come back within 3 s"), "{log}");
}

#[test]
fn a_short_soak_with_a_coordinator_and_an_agent_killed_loses_and_duplicates_no_job() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["soak", "--agents", "2", "--jobs", "6", "--clients", "2"])
        .args(["--sleep", "4", "--every", "2"])
        .args(["--chaos", "coordinator,agent", "--max-chaos", "2"])
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("chaos: coordinator kills 1, agent kills 1"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("submitted=6 completed=6 lost=0 duplicated=0"),
        "{stdout}\n{stderr}"
    );
}
