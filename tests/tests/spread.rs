//! `buildpool run test --spread N`: one test run as nextest slices on several real agents,
//! the doctests beside them, one `test result:` line over all of them that says what
//! local `cargo test --no-fail-fast` says, and its exit code.

use std::time::Duration;

use buildpool_tests::{
    Cluster, Fixture, Owned, ServeOptions, local_cargo, test_counts, test_totals, wait_until,
};

/// A library with unit tests (one ignored, one failing when `failing`), an integration
/// test binary with an ignored test, and two doctests (one ignored). With `slow`, every
/// unit test takes 4 s.
fn fixture_with(failing: bool, slow: bool) -> Fixture {
    let verdict = if failing { "3" } else { "2" };
    let pause = if slow {
        "std::thread::sleep(std::time::Duration::from_secs(4));"
    } else {
        ""
    };
    let lib = format!(
        "/// ```\n/// assert_eq!(spreadme::two(), 2);\n/// ```\n\
         /// ```ignore\n/// not compiled\n/// ```\n\
         pub fn two() -> u32 {{ 2 }}\n\n\
         #[cfg(test)]\nmod tests {{\n\
         #[test] fn one() {{ {pause} assert_eq!(super::two() - 1, 1); }}\n\
         #[test] fn two() {{ {pause} assert_eq!(super::two(), {verdict}, \"two is not {verdict}\"); }}\n\
         #[test] fn three() {{ {pause} }}\n\
         #[test] fn four() {{ {pause} }}\n\
         #[test] fn five() {{ {pause} }}\n\
         #[test] #[ignore] fn slow() {{}}\n}}\n"
    );
    Fixture::with_files(&[
        (
            "Cargo.toml",
            "[package]\nname = \"spreadme\"\nversion = \"0.1.0\"\nedition = \"2021\"\n".into(),
        ),
        ("src/lib.rs", lib),
        (
            "tests/api.rs",
            "#[test] fn api_one() {}\n#[test] fn api_two() {}\n#[test] #[ignore] fn api_slow() {}\n"
                .into(),
        ),
        ("tests/db.rs", "#[test] fn db_one() {}\n".into()),
        ("tests/cli.rs", "#[test] fn cli_one() {}\n#[test] fn cli_two() {}\n".into()),
    ])
    .expect("fixture")
}

fn fixture(failing: bool) -> Fixture {
    fixture_with(failing, false)
}

fn expected_line(stdout: &str) -> String {
    let (ok, [passed, failed, ignored]) = test_totals(stdout);
    format!(
        "test result: {}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; 0 \
         filtered out",
        if ok { "ok" } else { "FAILED" }
    )
}

#[test]
fn a_spread_run_counts_what_local_cargo_test_counts_over_every_agent() {
    let cluster = Cluster::start(fixture(false), 2, 1).expect("cluster starts");
    let root = cluster.fixture.root();
    let local = local_cargo(&root, &["test", "--no-fail-fast"]);
    assert_eq!(local.code, Some(0), "{local}");

    let spread = cluster
        .fixture
        .run(&["run", "test", "--spread", "2"])
        .expect("runs");
    assert_eq!(spread.code, Some(0), "{spread}");
    assert_eq!(
        spread.stdout.lines().last(),
        Some(expected_line(&local.stdout).as_str()),
        "{spread}"
    );
    // Each slice ran on an agent of its own, and said which.
    for slice in [
        "slice 1/2 running on worker-",
        "slice 2/2 running on worker-",
    ] {
        assert!(spread.stderr.contains(slice), "{spread}");
    }
    assert!(spread.stderr.contains("[worker-1] "), "{spread}");
    assert!(spread.stderr.contains("[worker-2] "), "{spread}");
    assert!(
        spread.stderr.contains("doctests running on worker-"),
        "{spread}"
    );

    // The second run, one slice per idle agent, shares the four test binaries out by how
    // long each ran in the first.
    let history = root.join(".git/buildpool/test-durations.json");
    let recorded = std::fs::read_to_string(&history).expect("durations recorded");
    for binary in ["spreadme", "spreadme::api", "spreadme::db", "spreadme::cli"] {
        assert!(recorded.contains(&format!("\"{binary}\"")), "{recorded}");
    }
    // These tests take milliseconds, whose noise decides whether they can be balanced:
    // durations as a longer suite's.
    std::fs::write(
        &history,
        r#"{"spreadme": 4000, "spreadme::api": 3000, "spreadme::cli": 2000, "spreadme::db": 1000}"#,
    )
    .expect("history");
    let again = cluster
        .fixture
        .run(&["run", "test", "--spread", "auto"])
        .expect("runs");
    assert_eq!(again.code, Some(0), "{again}");
    assert!(
        again.stderr.contains("slice 2/2 running on worker-"),
        "{again}"
    );
    assert!(
        again
            .stderr
            .contains("slices balanced by how long 4 test binaries ran before"),
        "{again}"
    );
    assert_eq!(
        again.stdout.lines().last(),
        Some(expected_line(&local.stdout).as_str()),
        "{again}"
    );
}

#[test]
fn a_failing_test_is_named_with_its_message_and_fails_the_run_as_cargo_test() {
    let cluster = Cluster::start(fixture(true), 2, 1).expect("cluster starts");
    let root = cluster.fixture.root();
    let local = local_cargo(&root, &["test", "--no-fail-fast"]);
    assert_eq!(local.code, Some(101), "{local}");

    let spread = cluster
        .fixture
        .run(&["run", "test", "--spread", "2"])
        .expect("runs");
    assert_eq!(spread.code, local.code, "{spread}");
    assert_eq!(
        spread.stdout.lines().last(),
        Some(expected_line(&local.stdout).as_str()),
        "{spread}"
    );
    assert!(
        spread
            .stdout
            .contains("    tests::two: assertion `left == right` failed: two is not 3"),
        "{spread}"
    );
}

#[test]
fn spread_is_for_test_runs_and_counts_slices() {
    let fixture = fixture(false);
    for (args, error) in [
        (
            &["run", "build", "--spread", "2"][..],
            "spreads `run test` only",
        ),
        (&["run", "test", "--spread", "0"], "from 1 to 256, or auto"),
        (
            &["run", "test", "--spread", "many"],
            "from 1 to 256, or auto",
        ),
    ] {
        let out = fixture.run(args).expect("runs");
        assert_ne!(out.code, Some(0), "{out}");
        assert!(out.stderr.contains(error), "{out}");
    }
}

#[test]
fn a_slice_whose_agent_is_lost_runs_again_elsewhere_and_counts_once() {
    // A lost agent's job is requeued after the reattach grace: a short one here.
    let options = ServeOptions {
        config: Some("[build_pool.timeouts]\nreattach_grace_secs = 1\n".into()),
        ..ServeOptions::default()
    };
    let mut cluster =
        Cluster::start_with(fixture_with(false, true), 2, 1, &options).expect("cluster starts");
    let root = cluster.fixture.root();
    let local = local_cargo(&root, &["test", "--no-fail-fast"]);
    assert_eq!(local.code, Some(0), "{local}");

    let mut spread = Owned::spawn(
        cluster
            .fixture
            .command_in(&root, &["run", "test", "--spread", "2"]),
        cluster.fixture.scratch().join("spread.log"),
    )
    .expect("runs");
    // Each slice's unit tests take 4 s: the agent dies while its slice runs.
    let mut lost = None;
    assert!(
        wait_until(Duration::from_secs(120), || {
            lost = spread
                .log_text()
                .lines()
                .find_map(|line| line.strip_prefix("[buildpool] slice 1/2 running on worker-"))
                .and_then(|n| n.trim().parse::<usize>().ok());
            lost.is_some()
        }),
        "slice 1 did not start: {}",
        spread.log_text()
    );
    let lost = lost.expect("an agent");
    cluster.agents[lost - 1].kill_hard();
    let status = spread
        .wait_timeout(Duration::from_secs(180))
        .expect("the run ends");
    let log = spread.log_text();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("slice 1/2 running again (attempt 2) on worker-"),
        "{log}"
    );
    let last = log.lines().rfind(|line| line.starts_with("test result:"));
    assert_eq!(last, Some(expected_line(&local.stdout).as_str()), "{log}");
}

#[test]
fn an_agent_without_nextest_runs_cargo_test_alone_and_says_why() {
    let mut cluster = Cluster::start(fixture(false), 0, 1).expect("cluster starts");
    // cargo, rustc and rustdoc, and no cargo-nextest: a PATH of our own, outside any sandbox's view
    // (the test is of the fallback, not of the sandbox).
    let bin = cluster.fixture.scratch().join("no-nextest-bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    for tool in ["cargo", "rustc", "rustdoc"] {
        let real = buildpool_tests::dir_of_program(tool)
            .expect("on PATH")
            .join(tool);
        let real = std::fs::canonicalize(real).expect("real path");
        std::os::unix::fs::symlink(real, bin.join(tool)).expect("link");
    }
    let mut command = cluster.agent_command("plain", 2, &buildpool_tests::UNSANDBOXED);
    command.env("PATH", format!("{}:/usr/bin:/bin", bin.display()));
    cluster.add_agent_by("plain", command).expect("agent");

    let root = cluster.fixture.root();
    let local = local_cargo(&root, &["test"]);
    let spread = cluster
        .fixture
        .run(&["run", "test", "--spread", "2"])
        .expect("runs");
    assert_eq!(spread.code, Some(0), "{spread}");
    assert!(
        spread
            .stderr
            .contains("plain has no cargo-nextest (cargo install cargo-nextest): running cargo test on one agent instead"),
        "{spread}"
    );
    assert_eq!(
        test_counts(&spread.stdout),
        test_counts(&local.stdout),
        "{spread}"
    );
}
