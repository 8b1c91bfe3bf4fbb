//! `bench -- shared-cache [CRATE]`: what `[cache] shared` saves a new agent. A published
//! crate's `buildpool run build`, each on an agent of its own with nothing built yet: a
//! cold agent without the shared cache (the baseline); a cold agent with it, which fills
//! a real `redis-server` store; and a new agent with it, which reads what the second one
//! stored. Every agent downloads the crate's dependencies itself, as a new agent would.

use std::time::{Duration, Instant};

use anyhow::bail;
use buildpool_tests::redis::Redis;
use buildpool_tests::{Cluster, Fixture};

/// The crate measured when none is named: a library with a few dozen dependencies, most
/// of its build theirs.
const DEFAULT_CRATE: &str = "tracing-subscriber";

/// A new agent `id` with `args` builds the snapshot; returns the build's wall time.
fn first_build(cluster: &mut Cluster, id: &str, args: &[&str]) -> anyhow::Result<Duration> {
    cluster.agents.clear();
    cluster.add_agent(id, 1, args)?;
    let started = Instant::now();
    let out = cluster.fixture.run(&["run", "build"])?;
    let elapsed = started.elapsed();
    if out.code != Some(0) || !out.stderr.contains(&format!("running on {id}")) {
        bail!("{id}'s build failed or ran elsewhere: {out}");
    }
    if out.stderr.contains("unreachable") {
        bail!("{id} did not reach the store: {out}");
    }
    Ok(elapsed)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let name = args.first().map_or(DEFAULT_CRATE, String::as_str);
    if buildpool_tests::dir_of_program("sccache").is_none() {
        bail!(
            "sccache is not installed (cargo install sccache --no-default-features --features redis)"
        );
    }
    let source = crate::crate_source(name)?;
    let mut cluster = Cluster::start(Fixture::from_source(&source)?, 0, 1)?;
    let redis = Redis::start(&cluster.fixture.scratch())?;
    let url = redis.url();
    let shared = ["--cache-shared", url.as_str()];

    let cold = first_build(&mut cluster, "cold", &[])?;
    let filling = first_build(&mut cluster, "filling", &shared)?;
    let stored = redis.keys()?;
    let new = first_build(&mut cluster, "new", &shared)?;
    println!(
        "shared cache: {} first build on a new agent: without the shared cache {:.1} s, \
         filling it {:.1} s ({stored} entries), with it {:.1} s; ratio new/cold {:.2}",
        source.file_name().and_then(|n| n.to_str()).unwrap_or(name),
        cold.as_secs_f64(),
        filling.as_secs_f64(),
        new.as_secs_f64(),
        new.as_secs_f64() / cold.as_secs_f64()
    );
    Ok(())
}
