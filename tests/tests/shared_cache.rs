//! `[cache] shared` (`--cache-shared URL`): every agent's sccache reads and writes one
//! store, so a new agent's first build hits what another agent compiled. The store is a
//! real `redis-server` on loopback, owned by the test; sccache is the real one, built with
//! its Redis backend (`.ci/run` installs both).

use std::time::Duration;

use buildpool_tests::redis::Redis;
use buildpool_tests::{Cluster, Fixture, wait_until};

/// A crate with two small registry dependencies. Cargo builds those without incremental
/// compilation, which is what sccache caches; the crate itself too, on a cold slot with
/// the shared store.
fn fixture() -> Fixture {
    Fixture::with_files(&[
        (
            "Cargo.toml",
            "[package]\nname = \"fleetcached\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nitoa = \"1\"\nryu = \"1\"\n"
                .into(),
        ),
        (
            "src/lib.rs",
            "pub fn show(n: u64, x: f64) -> String {\n    \
             format!(\"{} {}\", itoa::Buffer::new().format(n), ryu::Buffer::new().format(x))\n}\n"
                .into(),
        ),
    ])
    .expect("fixture")
}

fn require_sccache() {
    assert!(
        buildpool_tests::dir_of_program("sccache").is_some(),
        "sccache with its Redis backend must be on PATH \
         (cargo install sccache --no-default-features --features redis)"
    );
}

#[test]
fn a_new_agents_first_build_hits_what_another_agent_compiled() {
    require_sccache();
    let mut cluster = Cluster::start(fixture(), 0, 1).expect("coordinator starts");
    let redis = Redis::start(&cluster.fixture.scratch()).expect("redis-server starts");
    let url = redis.url();
    let shared = ["--cache-shared", url.as_str()];

    cluster.add_agent("first", 1, &shared).expect("first agent");
    let first = cluster.fixture.run(&["run", "build"]).expect("runs");
    assert_eq!(first.code, Some(0), "{first}");
    assert!(first.stderr.contains("running on first"), "{first}");
    let stored = redis.keys().expect("DBSIZE");
    // itoa, ryu and the crate itself, each as one entry at least (sccache may add a check
    // key of its own). The crate's own entry needs its first build without incremental.
    assert!(stored >= 3, "the first build stored {stored} entries");

    // A new agent, as an autoscaler would start one: no workspace, no cache of its own.
    drop(cluster.agents.remove(0));
    assert!(wait_until(Duration::from_secs(20), || cluster
        .agent_ids()
        .is_empty()));
    cluster
        .add_agent("second", 1, &shared)
        .expect("second agent");
    let hits_before = redis.hits().expect("INFO");
    let second = cluster.fixture.run(&["run", "build"]).expect("runs");
    assert_eq!(second.code, Some(0), "{second}");
    assert!(second.stderr.contains("running on second"), "{second}");
    assert!(second.stderr.contains("(cold)"), "{second}");
    let hits = redis.hits().expect("INFO") - hits_before;
    assert!(hits >= 3, "the second agent's build read {hits} entries");
    assert_eq!(
        redis.keys().expect("DBSIZE"),
        stored,
        "the second agent compiled again what the store held"
    );
    assert!(!second.stderr.contains("unreachable"), "{second}");
    let incremental = || incremental_state(&cluster.fixture.scratch().join("second"));
    assert!(
        !incremental(),
        "a cold slot's first build kept incremental state"
    );

    // The slot is warm now: its next build has incremental compilation back.
    std::fs::write(
        cluster.fixture.root().join("src/lib.rs"),
        "pub fn show(n: u64) -> String {\n    itoa::Buffer::new().format(n).to_owned()\n}\n",
    )
    .expect("edit");
    let third = cluster.fixture.run(&["run", "build"]).expect("runs");
    assert_eq!(third.code, Some(0), "{third}");
    assert!(third.stderr.contains("(warm)"), "{third}");
    assert!(
        incremental(),
        "a warm slot's build went without incremental state"
    );
}

/// Whether an agent's workspaces under `agent_dir` hold incremental state of the crate.
fn incremental_state(agent_dir: &std::path::Path) -> bool {
    let workspaces = std::fs::read_dir(agent_dir.join("workspaces")).expect("workspaces");
    workspaces.flatten().any(|repo| {
        std::fs::read_dir(repo.path().join("slot-0/target/debug/incremental")).is_ok_and(
            |entries| {
                entries.flatten().any(|entry| {
                    entry
                        .file_name()
                        .to_string_lossy()
                        .starts_with("fleetcached-")
                })
            },
        )
    })
}

#[test]
fn a_store_that_is_down_costs_a_line_not_the_job() {
    require_sccache();
    let mut cluster = Cluster::start(fixture(), 0, 1).expect("coordinator starts");
    // A port nothing listens on: the store is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    cluster
        .add_agent("cached", 1, &["--cache-shared", &url])
        .expect("agent");
    let build = cluster.fixture.run(&["run", "build"]).expect("runs");
    assert_eq!(build.code, Some(0), "{build}");
    let line = format!(
        "[buildpool] shared compilation cache {url} unreachable (Connection refused (os \
         error 111)): compiling with this agent's own cache"
    );
    assert!(build.stderr.contains(&line), "{build}");
    assert!(build.stderr.contains("Finished"), "{build}");
}
