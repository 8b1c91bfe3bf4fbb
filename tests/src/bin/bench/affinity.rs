//! `bench affinity [ROUNDS]`: what sending a job where its worktree was built last saves.
//! Two agents of two slots each; four worktrees of the fixture workspace, each on a branch
//! commit of its own that changes the `util` crate every other crate depends on (as
//! branches do), take turns, each after a one-line change in `app`, once with the coordinator's affinity on and once off
//! (`affinity = false`: the agent with most free slots), each in a fresh cluster. A warm
//! hit is a job whose workspace last built the same worktree (only `app` rebuilds); a miss
//! rebuilds `util` too. After the first round every job could be a hit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use buildpool_tests::{Cluster, Fixture, ServeOptions};

use crate::{PhaseSamples, median, ms, pool_test};

/// What one cluster measured.
struct Outcome {
    hits: usize,
    jobs: usize,
    cargo: Duration,
    total: Duration,
}

pub fn run(rounds: usize) -> anyhow::Result<()> {
    let on = measure(rounds, true)?;
    let off = measure(rounds, false)?;
    println!(
        "buildpool affinity benchmark: fixture workspace (2 agents x 2 slots, 4 worktrees in turn, {rounds} rounds after the first)"
    );
    for (label, outcome) in [("affinity on ", &on), ("affinity off", &off)] {
        println!(
            "{label}: warm hits {}/{}, median cargo phase {:.0} ms, median job {:.0} ms",
            outcome.hits,
            outcome.jobs,
            ms(outcome.cargo),
            ms(outcome.total)
        );
    }
    println!(
        "cargo phase off/on: {:.2}, job off/on: {:.2}",
        off.cargo.as_secs_f64() / on.cargo.as_secs_f64(),
        off.total.as_secs_f64() / on.total.as_secs_f64()
    );
    Ok(())
}

fn measure(rounds: usize, affinity: bool) -> anyhow::Result<Outcome> {
    let options = ServeOptions {
        config: (!affinity).then(|| "[build_pool]\naffinity = false\n".to_owned()),
        ..ServeOptions::default()
    };
    let cluster = Cluster::start_with(Fixture::new()?, 2, 2, &options)?;
    let fixture = &cluster.fixture;
    let mut worktrees: Vec<PathBuf> = Vec::new();
    for n in 1..=4 {
        let worktree = fixture.add_worktree(&format!("w{n}"))?;
        // A branch commit of its own that changes the crate everything depends on.
        let util = worktree.join("crates/util/src/lib.rs");
        let text = std::fs::read_to_string(&util)?;
        std::fs::write(&util, format!("{text}pub const BRANCH: u32 = {n};\n"))?;
        let dir = worktree.to_str().context("utf-8 path")?;
        fixture.git(&["-C", dir, "commit", "--quiet", "-am", "branch"])?;
        worktrees.push(worktree);
    }
    let original = std::fs::read_to_string(fixture.root().join("app/src/lib.rs"))?;
    // (agent, slot) -> the worktree its workspace last built.
    let mut last_built: HashMap<(String, u32), PathBuf> = HashMap::new();
    let (mut hits, mut jobs, mut totals) = (0, 0, Vec::new());
    let mut phases = PhaseSamples::default();
    for round in 0..=rounds {
        for worktree in &worktrees {
            let edited = format!("{original}\n// round {round} in {}\n", worktree.display());
            std::fs::write(worktree.join("app/src/lib.rs"), edited)?;
            let (elapsed, stderr) = pool_test(fixture, worktree)?;
            let place = placement(&stderr)?;
            let hit = last_built.get(&place) == Some(worktree);
            eprintln!(
                "affinity {}: {} on {} slot {} ({}), {:.0} ms",
                if affinity { "on" } else { "off" },
                worktree.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                place.0,
                place.1,
                if hit { "hit" } else { "miss" },
                ms(elapsed)
            );
            last_built.insert(place, worktree.clone());
            // The first round builds every worktree once: nothing to hit yet.
            if round > 0 {
                jobs += 1;
                hits += usize::from(hit);
                totals.push(elapsed);
                phases.add(&stderr)?;
            }
        }
    }
    Ok(Outcome {
        hits,
        jobs,
        cargo: phases.median_of("cargo").context("no cargo phase")?,
        total: median(totals),
    })
}

/// The agent and workspace slot a job ran in, from `run`'s and the agent's notes:
/// "job 3 running on worker-1 (attempt 1)", "...; workspace slot 1 (warm); ...".
fn placement(stderr: &str) -> anyhow::Result<(String, u32)> {
    let agent = stderr
        .lines()
        .find_map(|line| {
            let rest = line.split_once(" running on ")?.1;
            Some(rest.split_once(" (attempt")?.0.to_owned())
        })
        .context("no 'running on' note")?;
    let slot = stderr
        .lines()
        .find_map(|line| {
            let rest = line.split_once("workspace slot ")?.1;
            rest.split_once(' ')?.0.parse().ok()
        })
        .context("no workspace slot note")?;
    Ok((agent, slot))
}
