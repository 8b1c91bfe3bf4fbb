//! The build pool end to end: a real coordinator process with its git daemon, real build
//! agents connected over WebSocket, real cargo on a fixture workspace.

use std::collections::HashMap;
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, Owned, SIGINT, ServeOptions, process_alive, wait_until};

fn cluster(agents: usize, slots: u32) -> Cluster {
    Cluster::start(Fixture::new().expect("fixture"), agents, slots).expect("cluster starts")
}

/// A cluster whose agents run jobs unsandboxed, for tests that watch the fixture's sleeping
/// tests from the host (see `buildpool_tests::UNSANDBOXED`).
fn watched_cluster() -> Cluster {
    Cluster::start_with(
        Fixture::new().expect("fixture"),
        1,
        1,
        &ServeOptions::unsandboxed(),
    )
    .expect("cluster starts")
}

/// `compiler-artifact` messages of a `--message-format=json` build: crate name -> fresh.
fn freshness(stdout: &str) -> HashMap<String, bool> {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter_map(|message| {
            Some((
                message["target"]["name"].as_str()?.to_owned(),
                message["fresh"].as_bool()?,
            ))
        })
        .collect()
}

#[test]
fn build_test_and_clippy_run_on_agents_and_a_failing_test_exits_101() {
    let cluster = cluster(2, 1);
    let fixture = &cluster.fixture;

    let build = fixture.run(&["run", "build"]).expect("runs");
    assert_eq!(build.code, Some(0), "{build}");
    assert!(build.stderr.contains("running on worker-"), "{build}");
    assert!(
        build.stderr.contains("Compiling app") || build.stderr.contains("Finished"),
        "{build}"
    );

    let test = fixture.run(&["run", "test"]).expect("runs");
    assert_eq!(test.code, Some(0), "{test}");
    assert!(
        test.stdout.contains("test tests::quadruples ... ok"),
        "{test}"
    );

    let clippy = fixture
        .run(&[
            "run",
            "clippy",
            "--",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .expect("runs");
    assert_eq!(clippy.code, Some(0), "{clippy}");

    fixture
        .write(
            "app/tests/fails.rs",
            "#[test]\nfn two_is_three() {\n    assert_eq!(2, 3, \"arithmetic broke\");\n}\n",
        )
        .expect("write");
    let failing = fixture.run(&["run", "test"]).expect("runs");
    assert_eq!(failing.code, Some(101), "{failing}");
    assert!(failing.stdout.contains("two_is_three"), "{failing}");
    assert!(failing.stderr.contains("exit code 101"), "{failing}");
}

#[test]
fn uncommitted_edits_and_untracked_files_are_what_gets_built() {
    let cluster = cluster(1, 1);
    let fixture = &cluster.fixture;
    // Uncommitted edit of a tracked file, plus a new untracked module it uses.
    let lib = std::fs::read_to_string(fixture.root().join("app/src/lib.rs")).expect("read");
    let lib = lib.replace(
        "pub const GREETING: &str = \"hello\";",
        "pub const GREETING: &str = \"edited\";\npub mod extra;",
    );
    fixture.write("app/src/lib.rs", &lib).expect("write");
    fixture.write("app/src/extra.rs", "#[test]\nfn sees_the_uncommitted_edit() {\n    assert_eq!(crate::GREETING, \"edited\");\n}\n").expect("write");
    let head = fixture.git(&["rev-parse", "HEAD"]).expect("head");
    let status = fixture.git(&["status", "--porcelain"]).expect("status");

    let test = fixture.run(&["run", "test"]).expect("runs");
    assert_eq!(test.code, Some(0), "{test}");
    assert!(
        test.stdout
            .contains("extra::sees_the_uncommitted_edit ... ok"),
        "{test}"
    );

    // The user's repository is exactly as it was.
    assert_eq!(fixture.git(&["rev-parse", "HEAD"]).expect("head"), head);
    assert_eq!(
        fixture.git(&["status", "--porcelain"]).expect("status"),
        status
    );
    assert_eq!(fixture.git(&["stash", "list"]).expect("stash"), "");
    // The job's snapshot ref is removed once the job has ended.
    assert!(wait_until(Duration::from_secs(5), || {
        fixture
            .git(&["for-each-ref", "refs/buildpool/"])
            .expect("refs")
            .is_empty()
    }));
}

#[test]
fn a_second_build_after_a_one_line_change_is_incremental() {
    let cluster = cluster(1, 1);
    let fixture = &cluster.fixture;
    let first = fixture
        .run(&["run", "build", "--", "--message-format=json"])
        .expect("runs");
    assert_eq!(first.code, Some(0), "{first}");
    assert_eq!(
        freshness(&first.stdout).get("util"),
        Some(&false),
        "cold build compiles util:\n{first}"
    );

    let lib = std::fs::read_to_string(fixture.root().join("app/src/lib.rs")).expect("read");
    fixture
        .write(
            "app/src/lib.rs",
            &lib.replace("\"hello\"", "\"hello again\""),
        )
        .expect("write");
    let second = fixture
        .run(&["run", "build", "--", "--message-format=json"])
        .expect("runs");
    assert_eq!(second.code, Some(0), "{second}");
    let fresh = freshness(&second.stdout);
    assert_eq!(
        fresh.get("util"),
        Some(&true),
        "the unchanged crate must not be recompiled:\n{second}"
    );
    assert_eq!(
        fresh.get("app"),
        Some(&false),
        "the changed crate must be recompiled:\n{second}"
    );
    assert!(second.stderr.contains("(warm)"), "{second}");
    // The agent lacked the base commit for the first job, and holds it for the second: that
    // snapshot came with the job as a pack, and nothing was fetched.
    assert!(first.stderr.contains("fetched in"), "{first}");
    assert!(second.stderr.contains("applied from its pack"), "{second}");
}

#[test]
fn a_job_runs_under_real_nix_develop() {
    assert!(
        buildpool_tests::dir_of_program("nix").is_some(),
        "this test needs nix (`apt-get install nix-bin`; .ci/run installs it)"
    );
    let cluster = cluster(1, 1);
    let fixture = &cluster.fixture;
    fixture
        .write("flake.nix", &Fixture::flake())
        .expect("flake");
    // The test passes only inside the dev shell, whose derivation sets this variable.
    fixture.write("app/tests/in_shell.rs", "#[test]\nfn runs_in_the_dev_shell() {\n    assert_eq!(std::env::var(\"BUILDPOOL_FIXTURE_SHELL\").as_deref(), Ok(\"nix\"));\n}\n").expect("write");
    let test = fixture
        .run(&["run", "test", "--env", "nix", "--timeout", "300"])
        .expect("runs");
    assert_eq!(test.code, Some(0), "{test}");
    assert!(
        test.stdout.contains("runs_in_the_dev_shell ... ok"),
        "{test}"
    );
    assert!(
        test.stderr.contains("env nix (dev shell evaluated in"),
        "{test}"
    );
    // The dev shell is evaluated once per flake; the next job reuses it.
    let again = fixture.run(&["run", "test", "--env", "nix"]).expect("runs");
    assert_eq!(again.code, Some(0), "{again}");
    assert!(
        again.stderr.contains("env nix (dev shell cached)"),
        "{again}"
    );
}

/// Whether the coordinator lists no running job within `timeout`.
fn jobs_end_within(cluster: &Cluster, timeout: Duration) -> bool {
    wait_until(timeout, || {
        cluster
            .status()
            .is_ok_and(|s| s["jobs"].as_array().is_some_and(Vec::is_empty))
    })
}

fn job_with_grandchild(fixture: &Fixture, extra: &[&str]) -> Owned {
    let args = Fixture::ignored_test_job("sleeps_with_a_child", extra);
    let command = fixture.command_in(&fixture.root(), &args);
    Owned::spawn(command, fixture.scratch().join("run.log")).expect("run starts")
}

fn grandchild_pid(fixture: &Fixture, run: &Owned) -> i32 {
    let mut pid = None;
    let started = wait_until(Duration::from_secs(60), || {
        pid = fixture.grandchild_pid();
        pid.is_some()
    });
    assert!(
        started,
        "the test never started its child:\n{}",
        run.log_text()
    );
    pid.expect("pid")
}

#[test]
fn cancel_kills_the_jobs_grandchildren() {
    let cluster = watched_cluster();
    let fixture = &cluster.fixture;
    let mut run = job_with_grandchild(fixture, &[]);
    let grandchild = grandchild_pid(fixture, &run);
    assert!(process_alive(grandchild));

    // Ctrl-C on the client cancels the job on the agent.
    run.signal(SIGINT);
    let status = run
        .wait_timeout(Duration::from_secs(30))
        .expect("client exits after cancel");
    assert_eq!(status.code(), Some(130), "{}", run.log_text());
    assert!(run.log_text().contains("cancelled"), "{}", run.log_text());
    assert!(
        wait_until(Duration::from_secs(10), || !process_alive(grandchild)),
        "grandchild {grandchild} survived"
    );

    // The slot is free again: the next job runs.
    let next = fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(next.code, Some(0), "{next}");
}

/// A job whose client is gone without cancelling it (killed) and that nobody follows again
/// within the client grace is cancelled: nobody waits for its result any more.
#[test]
fn a_job_nobody_follows_any_more_is_cancelled_after_the_client_grace() {
    let options = ServeOptions {
        config: Some("[build_pool.timeouts]\nclient_grace_secs = 2\n".into()),
        ..ServeOptions::unsandboxed()
    };
    let cluster = Cluster::start_with(Fixture::new().expect("fixture"), 1, 1, &options)
        .expect("cluster starts");
    let fixture = &cluster.fixture;
    let mut run = job_with_grandchild(fixture, &[]);
    let grandchild = grandchild_pid(fixture, &run);
    run.kill_hard();
    assert!(
        wait_until(Duration::from_secs(60), || !process_alive(grandchild)),
        "grandchild {grandchild} of the unwatched job survived"
    );
    assert!(
        jobs_end_within(&cluster, Duration::from_secs(10)),
        "the job is still running"
    );
}

/// A client that follows a running job again (`Watch`, as after a lost connection) gets the
/// output the job printed so far at once, not only once the job prints more or ends.
#[tokio::test]
async fn a_client_following_a_running_job_again_gets_its_output_so_far_at_once() {
    use buildpool::client::Client;
    use buildpool::repo::Repo;
    use buildpool_core::JobEvent;

    let cluster = watched_cluster();
    let fixture = &cluster.fixture;
    let mut run = job_with_grandchild(fixture, &[]);
    grandchild_pid(fixture, &run);
    // The first client has shown output: the job's log holds it. The job now sleeps.
    assert!(
        wait_until(Duration::from_secs(30), || run
            .log_text()
            .contains("Running")),
        "{}",
        run.log_text()
    );
    let status = cluster.status().expect("status");
    let job_id = status["jobs"][0]["job_id"].as_u64().expect("a running job");
    let repo = Repo::discover(&fixture.root()).await.expect("repo");
    let (client, _) = Client::connect_to_running(&repo).await.expect("client");
    let mut events = client.watch(job_id, 0).await.expect("watch");
    let first_output = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.next().await.expect("events") {
                Some((_, JobEvent::Output { data, .. })) => return data,
                Some((_, JobEvent::Finished(result))) => panic!("the job ended: {result:?}"),
                Some(_) => {}
                None => panic!("the stream ended"),
            }
        }
    })
    .await
    .expect("the output so far arrives while the job still runs");
    assert!(!first_output.is_empty());

    run.signal(SIGINT);
    let status = run
        .wait_timeout(Duration::from_secs(30))
        .expect("client exits after cancel");
    assert_eq!(status.code(), Some(130), "{}", run.log_text());
}

#[test]
fn a_timeout_is_reported_as_timed_out_not_as_an_exit_code() {
    let cluster = watched_cluster();
    let fixture = &cluster.fixture;
    let mut run = job_with_grandchild(fixture, &["--timeout", "20"]);
    let grandchild = grandchild_pid(fixture, &run);
    let status = run
        .wait_timeout(Duration::from_secs(90))
        .expect("the job times out");
    assert_eq!(status.code(), Some(124), "{}", run.log_text());
    assert!(run.log_text().contains("timed out"), "{}", run.log_text());
    assert!(
        wait_until(Duration::from_secs(10), || !process_alive(grandchild)),
        "grandchild {grandchild} survived"
    );
}

#[test]
fn with_no_agent_the_local_agent_runs_the_job_and_says_so() {
    let cluster = cluster(0, 1);
    let run = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stderr.contains("local agent"), "{run}");
}

#[test]
fn with_no_coordinator_run_works_in_process_from_any_worktree() {
    let fixture = Fixture::new().expect("fixture");
    let worktree = fixture.add_worktree("feature").expect("worktree");
    std::fs::create_dir_all(worktree.join("app/tests")).expect("mkdir");
    std::fs::write(
        worktree.join("app/tests/feature.rs"),
        "#[test]\nfn only_in_the_feature_worktree() {}\n",
    )
    .expect("write");
    let output: buildpool_tests::RunOutput = fixture
        .command_in(&worktree, &["run", "test"])
        .output()
        .expect("runs")
        .into();
    assert_eq!(output.code, Some(0), "{output}");
    assert!(output.stderr.contains("no coordinator running"), "{output}");
    assert!(
        output
            .stdout
            .contains("only_in_the_feature_worktree ... ok"),
        "{output}"
    );
}

#[test]
fn status_lists_agents_and_logs_outlive_the_job() {
    let mut cluster = cluster(1, 2);
    cluster
        .add_agent("labelled", 1, &["--label", "gpu"])
        .expect("agent");
    let status = cluster.status().expect("status");
    let agents = status["agents"].as_array().expect("agents");
    let labelled = agents
        .iter()
        .find(|a| a["id"] == "labelled")
        .expect("listed");
    assert_eq!(labelled["labels"], serde_json::json!(["gpu"]));
    assert_eq!(labelled["slots_total"], 1);
    assert!(
        agents
            .iter()
            .any(|a| a["id"] == "worker-1" && a["slots_total"] == 2)
    );

    let fixture = &cluster.fixture;
    let run = fixture
        .run(&["run", "test", "--label", "gpu"])
        .expect("runs");
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stderr.contains("running on labelled"), "{run}");
    let job_id = run
        .stderr
        .split("[buildpool] job ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("job id");
    let logs = fixture.run(&["logs", job_id]).expect("logs");
    assert_eq!(logs.code, Some(0), "{logs}");
    assert!(
        logs.stdout.contains("test tests::quadruples ... ok"),
        "{logs}"
    );
}

#[test]
fn git_daemon_exports_only_this_repository() {
    let cluster = cluster(0, 1);
    let base = format!("git://127.0.0.1:{}", cluster.git_daemon_port);
    let ls = |path: &str| {
        std::process::Command::new("git")
            .args(["ls-remote", &format!("{base}{path}")])
            .output()
            .expect("git")
    };
    assert!(ls("/.git").status.success());
    assert!(!ls("/").status.success());
    assert!(!ls("/../../etc").status.success());
    assert!(!ls("/.git/..").status.success());
}

fn git_daemon_pids(port: u16) -> Vec<i32> {
    let output = std::process::Command::new("pgrep")
        .args(["-f", &format!("git.daemon.*--port={port}")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A coordinator killed with SIGKILL cannot stop its git daemon itself; the kernel must,
/// or the daemon would go on serving the repository (and its snapshot refs) to anyone.
#[test]
fn git_daemon_dies_with_a_coordinator_killed_by_sigkill() {
    let mut cluster = cluster(0, 1);
    let port = cluster.git_daemon_port;
    assert!(!git_daemon_pids(port).is_empty(), "git daemon is running");
    // The coordinator's own process group: the daemon has a group of its own.
    cluster.coordinator.kill_hard();
    assert!(
        wait_until(Duration::from_secs(10), || git_daemon_pids(port).is_empty()),
        "git daemon outlived its SIGKILLed coordinator: {:?}",
        git_daemon_pids(port)
    );
    let url = format!("git://127.0.0.1:{port}/.git");
    let listing = std::process::Command::new("git")
        .args(["ls-remote", &url])
        .output()
        .expect("git");
    assert!(
        !listing.status.success(),
        "nothing serves the repository any more"
    );
}

#[test]
fn git_daemon_is_restarted_when_it_dies_and_stopped_with_the_coordinator() {
    let mut cluster = cluster(0, 1);
    let port = cluster.git_daemon_port;
    let url = format!("git://127.0.0.1:{port}/.git");
    let serving = || {
        std::process::Command::new("git")
            .args(["ls-remote", &url])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let first = git_daemon_pids(port);
    assert!(!first.is_empty(), "git daemon is running");
    for pid in &first {
        buildpool_tests::signal_pid(*pid, buildpool_tests::SIGKILL);
    }
    assert!(
        wait_until(Duration::from_secs(15), || {
            let now = git_daemon_pids(port);
            !now.is_empty() && now.iter().all(|pid| !first.contains(pid)) && serving()
        }),
        "git daemon was not restarted:\n{}",
        cluster.coordinator.log_text()
    );

    // SIGTERM stops the coordinator, and its git daemon with it.
    cluster.coordinator.signal(buildpool_tests::SIGTERM);
    let status = cluster
        .coordinator
        .wait_timeout(Duration::from_secs(20))
        .expect("coordinator exits");
    assert!(status.success(), "{}", cluster.coordinator.log_text());
    assert!(
        wait_until(Duration::from_secs(5), || git_daemon_pids(port).is_empty()),
        "git daemon outlived the coordinator"
    );
    assert!(
        !cluster
            .fixture
            .root()
            .join(".git/buildpool/coordinator.json")
            .exists(),
        "discovery file left behind"
    );
}

/// The README's first command: a coordinator and a real `build-agent` process over TLS
/// on loopback, two worktrees, the second served from the slot the first warmed.
#[test]
fn the_demo_runs_two_worktrees_through_a_real_agent_process_over_tls() {
    let fixture = Fixture::new().expect("fixture");
    let demo = fixture.run(&["demo"]).expect("runs");
    assert_eq!(demo.code, Some(0), "{demo}");
    // Each worktree's own uncommitted test ran: the snapshots carried them.
    assert!(
        demo.stdout
            .contains("uncommitted_files_are_built_too ... ok"),
        "{demo}"
    );
    assert!(
        demo.stdout
            .contains("each_worktree_runs_its_own_files ... ok"),
        "{demo}"
    );
    assert!(
        demo.stderr.contains("over TLS (its certificate sha256:"),
        "{demo}"
    );
    assert!(
        demo.stderr.contains("[demo] dashboard: http://127.0.0.1:"),
        "{demo}"
    );
    // bubblewrap is installed here (`.ci/run`): the agent sandboxes its jobs.
    assert!(
        demo.stderr
            .contains("demo-agent connected: 1 slot, jobs sandboxed (bubblewrap)"),
        "{demo}"
    );
    for job in 1..=2 {
        assert!(
            demo.stderr
                .contains(&format!("job {job} exit code 0 after")),
            "{demo}"
        );
        assert!(
            demo.stderr.lines().any(|line| line
                .starts_with(&format!("[buildpool] job {job} exit code 0"))
                && line.contains("on demo-agent")),
            "job {job} did not run on the agent process: {demo}"
        );
    }
    assert!(!demo.stderr.contains("local agent"), "{demo}");
    let second = demo
        .stderr
        .split("[demo] worktree 2:")
        .nth(1)
        .expect("a second job");
    assert!(second.contains("(warm)"), "{demo}");
}

/// However the demo ends, its agent does not run on: killed outright, the kernel tells the
/// agent (a parent-death signal), which drains and exits.
#[test]
fn a_demo_killed_outright_leaves_no_agent_running() {
    let fixture = Fixture::new().expect("fixture");
    let mut command = fixture.command_in(&fixture.root(), &["demo", "--stay"]);
    // What a killed demo cannot delete stays in the fixture.
    command.env("TMPDIR", fixture.scratch());
    let mut demo = Owned::spawn(command, fixture.scratch().join("demo.log")).expect("demo starts");
    assert!(
        wait_until(Duration::from_secs(300), || demo
            .log_text()
            .contains("keep running; Ctrl-C stops them")),
        "{}",
        demo.log_text()
    );
    let text = demo.log_text();
    let dir = text
        .split("[demo] sample workspace at ")
        .nth(1)
        .and_then(|rest| rest.split("/sample,").next())
        .expect("the demo names its directory")
        .to_owned();
    let agents = || {
        let output = std::process::Command::new("pgrep")
            .args(["-f", &format!("{dir}/bin/build-agent")])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&output.stdout).lines().count()
    };
    assert_eq!(agents(), 1, "{text}");
    demo.kill_hard();
    assert!(
        wait_until(Duration::from_secs(30), || agents() == 0),
        "the demo's agent outlived it"
    );
}

#[test]
fn two_repositories_on_one_host_each_find_their_own_coordinator() {
    let first = cluster(0, 1);
    let second = cluster(0, 1);
    let id = |cluster: &Cluster| {
        cluster.status().expect("status")["coordinator_id"]
            .as_str()
            .expect("id")
            .to_owned()
    };
    assert_ne!(id(&first), id(&second));
    let repo = |cluster: &Cluster| {
        cluster.status().expect("status")["repository"]
            .as_str()
            .expect("repo")
            .to_owned()
    };
    assert!(repo(&first).starts_with(first.fixture.root().to_str().expect("utf-8")));
    assert!(repo(&second).starts_with(second.fixture.root().to_str().expect("utf-8")));
}

#[test]
fn ctrl_c_right_after_start_still_cancels_the_job() {
    let cluster = watched_cluster();
    let fixture = &cluster.fixture;
    std::fs::write(fixture.sleep_file(), "300").expect("sleep file");
    let mut run = Owned::spawn(
        fixture.command_in(&fixture.root(), &Fixture::brief_job()),
        fixture.scratch().join("early.log"),
    )
    .expect("run");
    // Before the client can know the job's id.
    std::thread::sleep(Duration::from_millis(150));
    run.signal(SIGINT);
    let status = run
        .wait_timeout(Duration::from_secs(60))
        .expect("the client ends");
    assert_eq!(status.code(), Some(130), "{}", run.log_text());
    assert!(
        jobs_end_within(&cluster, Duration::from_secs(10)),
        "the job is still running"
    );
}

/// Many library repositories ignore `Cargo.lock`. The agent must still build with the
/// developer's lockfile (their pinned versions, without resolving again), and keep the
/// lockfile it generated itself when the developer has none.
#[test]
fn an_ignored_lockfile_is_what_the_agent_builds_with() {
    let cluster = cluster(1, 1);
    let fixture = &cluster.fixture;
    fixture
        .write(".gitignore", "/target\nCargo.lock\n")
        .expect("write");
    fixture
        .git(&["rm", "--cached", "--quiet", "Cargo.lock"])
        .expect("untrack");
    fixture
        .git(&["commit", "--quiet", "-am", "ignore the lockfile"])
        .expect("commit");
    assert!(
        fixture.root().join("Cargo.lock").is_file(),
        "the developer still has one"
    );

    // `--locked` refuses to run without the lockfile, so success means the agent had it.
    let locked = fixture
        .run(&["run", "check", "--", "--locked"])
        .expect("runs");
    assert_eq!(locked.code, Some(0), "{locked}");
    assert!(locked.stderr.contains("running on worker-1"), "{locked}");

    // No lockfile at all: cargo generates one in the slot, and the next job keeps that very
    // file instead of cleaning it away and resolving again. The first one is dated back to
    // 2001 to tell it from a regenerated one (cargo leaves an up-to-date lockfile alone).
    std::fs::remove_file(fixture.root().join("Cargo.lock")).expect("remove");
    let workspaces = fixture.scratch().join("worker-1").join("workspaces");
    let slot_lock = || {
        std::fs::read_dir(&workspaces)
            .expect("workspaces")
            .flatten()
            .map(|repo| repo.path().join("slot-0/src/Cargo.lock"))
            .find(|lock| lock.is_file())
            .expect("cargo generated a lockfile in the slot")
    };
    let long_ago = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    for round in 0..2 {
        let check = fixture.run(&["run", "check"]).expect("runs");
        assert_eq!(check.code, Some(0), "{check}");
        let lock = std::fs::File::options()
            .write(true)
            .open(slot_lock())
            .expect("open");
        if round == 0 {
            lock.set_modified(long_ago).expect("date it back");
        } else {
            let modified = lock.metadata().expect("stat").modified().expect("mtime");
            assert_eq!(
                modified, long_ago,
                "the next job kept the generated lockfile"
            );
        }
    }
}

/// `run -v` ends with one line saying where the time went, phase by phase, and the phases
/// of work that happened were measured.
#[test]
fn a_verbose_run_says_where_the_time_went() {
    let cluster = cluster(1, 1);
    let run = cluster.fixture.run(&["run", "-v", "check"]).expect("runs");
    assert_eq!(run.code, Some(0), "{run}");
    let line = run
        .stderr
        .lines()
        .find_map(|line| line.strip_prefix("[buildpool] timings: "))
        .unwrap_or_else(|| panic!("no timings line:\n{run}"));
    let phases: HashMap<&str, u64> = line
        .split(", ")
        .filter_map(|part| {
            let (name, value) = part.split_once(' ')?;
            Some((name, value.strip_suffix(" ms")?.parse().ok()?))
        })
        .collect();
    for name in [
        "snapshot",
        "submit",
        "queued",
        "workspace_wait",
        "fetch",
        "checkout",
        "environment",
        "cargo",
        "rest",
        "total",
    ] {
        assert!(phases.contains_key(name), "{name} missing: {line}");
    }
    // A first job on a fresh agent fetches the snapshot and runs cargo.
    assert!(phases["fetch"] > 0 && phases["cargo"] > 0, "{line}");
    assert!(phases["total"] >= phases["cargo"], "{line}");
    let quiet = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert!(!quiet.stderr.contains("timings:"), "{quiet}");
}

#[test]
fn a_second_coordinator_for_the_same_repository_is_refused() {
    let cluster = cluster(0, 1);
    let fixture = &cluster.fixture;
    let mut second = Owned::spawn(
        fixture.command_in(
            &fixture.root(),
            &["serve", "--websocket-port", "0", "--git-daemon-port", "0"],
        ),
        fixture.scratch().join("second-serve.log"),
    )
    .expect("spawns");
    let status = second
        .wait_timeout(Duration::from_secs(30))
        .expect("the second serve exits");
    assert!(!status.success());
    assert!(
        second.log_text().contains("already running"),
        "{}",
        second.log_text()
    );
    // The first one still serves.
    let run = fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(run.code, Some(0), "{run}");
}
