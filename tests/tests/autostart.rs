//! With nobody running `buildpool serve`: clients start one coordinator in the background
//! and share it, it goes away when idle or when its repository does, `serve` takes over
//! from it; and a project directory that is no git repository at all.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use buildpool_tests::{
    Cluster, Fixture, RunOutput, http_get, local_cargo, process_alive, signal_pid, test_counts,
    wait_until,
};

/// A short idle time, so the background coordinator's exit is seen within the test.
const IDLE_SECS: &str = "3";
const STARTED: &str = "started one in the background (pid ";

/// `buildpool ARGS` in `dir` as a user would run it: background coordinators allowed.
fn client(fixture: &Fixture, dir: &Path, args: &[&str], idle_secs: &str) -> Command {
    let mut command = fixture.command_in(dir, args);
    command
        .env_remove("BUILDPOOL_BACKGROUND")
        .env("BUILDPOOL_IDLE_EXIT_SECS", idle_secs);
    command
}

fn output(mut command: Command) -> RunOutput {
    command.output().expect("buildpool runs").into()
}

/// The pid a client's "started one in the background" line names.
fn started_pid(stderr: &str) -> Option<i32> {
    let rest = &stderr[stderr.find(STARTED)? + STARTED.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The process group of `pid`, from `/proc/PID/stat`.
fn process_group(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state, ppid, pgrp.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// Kills the background coordinators a test saw, whatever its outcome.
#[derive(Default)]
struct Reaper(Vec<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            signal_pid(*pid, 9);
        }
    }
}

#[test]
fn clients_in_six_worktrees_share_one_background_coordinator_that_exits_when_idle() {
    let fixture = Fixture::new().expect("fixture");
    let local = local_cargo(&fixture.root(), &["test"]);
    assert_eq!(local.code, Some(0), "{local}");
    let worktrees: Vec<PathBuf> = (0..6)
        .map(|i| {
            fixture
                .add_worktree(&format!("agent-{i}"))
                .expect("worktree")
        })
        .collect();
    let runs: Vec<RunOutput> = std::thread::scope(|scope| {
        let handles: Vec<_> = worktrees
            .iter()
            .map(|dir| {
                let command = client(&fixture, dir, &["run", "test"], IDLE_SECS);
                scope.spawn(move || output(command))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("client thread"))
            .collect()
    });
    let mut reaper = Reaper::default();
    reaper
        .0
        .extend(runs.iter().filter_map(|run| started_pid(&run.stderr)));
    for run in &runs {
        assert_eq!(run.code, Some(0), "{run}");
        assert_eq!(
            test_counts(&run.stdout),
            test_counts(&local.stdout),
            "{run}"
        );
        assert!(!run.stderr.contains("running the job here"), "{run}");
        assert!(
            run.stderr
                .contains("running on the coordinator's local agent"),
            "{run}"
        );
    }
    assert_eq!(reaper.0.len(), 1, "one client started it: {runs:#?}");
    let pid = reaper.0[0];
    let state = fixture.root().join(".git/buildpool");
    let log = std::fs::read_to_string(state.join("background.log")).expect("its log");
    assert_eq!(
        log.matches("Build pool coordinator starting").count(),
        1,
        "one coordinator ever started:\n{log}"
    );
    assert_eq!(
        process_group(pid),
        Some(pid),
        "its own process group: a Ctrl-C on a client is not for it"
    );
    // Status and the dashboard work as with `serve`, from any worktree.
    let status = output(client(&fixture, &worktrees[1], &["status"], IDLE_SECS));
    assert_eq!(status.code, Some(0), "{status}");
    let ui = output(client(&fixture, &worktrees[2], &["ui"], IDLE_SECS));
    assert_eq!(ui.code, Some(0), "{ui}");
    let (code, _) = http_get(ui.stdout.trim()).expect("dashboard");
    assert_eq!(code, 200, "{ui}");

    assert!(
        wait_until(Duration::from_secs(60), || !process_alive(pid)),
        "still running after its idle time:\n{log}"
    );
    let log = std::fs::read_to_string(state.join("background.log")).expect("its log");
    assert!(log.contains("stopping (idle for 3 s)"), "{log}");
    assert!(!state.join("coordinator.json").exists());
}

#[test]
fn a_background_coordinator_exits_when_its_repository_is_gone_and_serve_replaces_one() {
    let fixture = Fixture::new().expect("fixture");
    let lib = fixture.root().join("app/src/lib.rs");
    let mut text = std::fs::read_to_string(&lib).expect("read");
    text.push_str("\n#[cfg(buildpool_leak)]\ncompile_error!(\"leaked\");\n");
    std::fs::write(&lib, text).expect("write");
    // The client that starts the coordinator has RUSTFLAGS; its job gets them ...
    let mut command = client(&fixture, &fixture.root(), &["run", "check"], "600");
    command.env("RUSTFLAGS", "--cfg buildpool_leak");
    let first = output(command);
    let mut reaper = Reaper::default();
    reaper.0.extend(started_pid(&first.stderr));
    assert_eq!(first.code, Some(101), "{first}");
    assert!(first.stderr.contains("leaked"), "{first}");
    let pid = started_pid(&first.stderr).expect("started one");
    // ... and the next client's job, without them, does not.
    let mut command = client(&fixture, &fixture.root(), &["run", "check"], "600");
    command.env_remove("RUSTFLAGS");
    let next = output(command);
    assert_eq!(next.code, Some(0), "{next}");

    // `buildpool serve` stops it and takes the repository over.
    let cluster = Cluster::start(fixture, 1, 1).expect("serve replaces it");
    assert!(wait_until(Duration::from_secs(20), || !process_alive(pid)));
    let on_agent = output(client(
        &cluster.fixture,
        &cluster.fixture.root(),
        &["run", "check"],
        "600",
    ));
    assert_eq!(on_agent.code, Some(0), "{on_agent}");
    assert!(
        on_agent.stderr.contains("running on worker-1"),
        "{on_agent}"
    );
    drop(cluster);

    // Once its repository is deleted, a background coordinator goes too.
    let fixture = Fixture::new().expect("fixture");
    let second = output(client(&fixture, &fixture.root(), &["run", "check"], "600"));
    reaper.0.extend(started_pid(&second.stderr));
    let pid = started_pid(&second.stderr).expect("started one");
    assert!(process_alive(pid), "{second}");
    std::fs::remove_dir_all(fixture.root()).expect("remove the repository");
    assert!(
        wait_until(Duration::from_secs(30), || !process_alive(pid)),
        "outlived its repository"
    );
}

#[test]
fn a_plain_directory_builds_through_a_private_repository_and_gets_no_dot_git() {
    // The fixture gives the environment (cache, config); the project is a plain copy of
    // its workspace beside it, with no git at all.
    let fixture = Fixture::new().expect("fixture");
    let project = fixture.scratch().join("plain-project");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(fixture.root())
        .arg(&project)
        .status()
        .expect("cp");
    assert!(copied.success());
    std::fs::remove_dir_all(project.join(".git")).expect("no git");
    std::fs::write(project.join(".env"), "SECRET=1\n").expect("write");
    std::fs::write(project.join(".gitignore"), "/target\n.env\n").expect("write");
    let local = local_cargo(&project, &["test"]);
    assert_eq!(local.code, Some(0), "{local}");

    let run = output(client(&fixture, &project, &["run", "test"], IDLE_SECS));
    let mut reaper = Reaper::default();
    reaper.0.extend(started_pid(&run.stderr));
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(
        test_counts(&run.stdout),
        test_counts(&local.stdout),
        "{run}"
    );
    assert!(
        run.stderr
            .contains("is not a git repository: snapshots go to buildpool's private repository"),
        "{run}"
    );
    assert!(!project.join(".git").exists(), "the directory got a .git");
    // The private repository is in the cache (what it holds: the snapshot unit tests).
    let private = std::fs::read_dir(fixture.scratch().join("cache/buildpool/plain"))
        .expect("private repositories")
        .flatten()
        .map(|entry| entry.path().join("repo.git"))
        .collect::<Vec<_>>();
    assert_eq!(private.len(), 1, "{private:?}");
    assert!(private[0].join("HEAD").is_file());
}
