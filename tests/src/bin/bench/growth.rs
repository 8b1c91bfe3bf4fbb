//! `growth`: how a job's fixed costs grow with the repository, so a big monorepo or a
//! long-lived coordinator shows no cost that grows faster than it should.
//!
//! Two series on the fixture workspace with one warm agent: the repository grows by
//! generated tracked files (1k, 10k, 50k), and the number of snapshot refs under
//! `refs/buildpool/snapshots/` grows (0, 200, 2000, set again before every round, since
//! each snapshot prunes them to the newest 200: with 2000, a snapshot deletes 1801).
//! Each round follows a one-line change, so every job has a new snapshot to take and to
//! fetch. Measured: the snapshot (from `run -v`) and the time from launching
//! `buildpool run -v check` to cargo's first output line (snapshot included), medians over
//! the rounds.

use std::time::{Duration, Instant};

use anyhow::Context;
use buildpool_tests::{Cluster, Fixture};

/// Generated files in each repository of the size series.
const REPOSITORY_FILES: [usize; 3] = [1_000, 10_000, 50_000];
/// Snapshot refs present before each job of the ref series.
const SNAPSHOT_REFS: [usize; 3] = [0, 200, 2_000];
/// Generated files in the repository of the ref series.
const REF_SERIES_FILES: usize = 1_000;

/// Medians of one configuration.
#[derive(Debug)]
struct Row {
    files: usize,
    refs: usize,
    /// The agent's first job: a full fetch and checkout of the repository.
    cold_first_output: Duration,
    snapshot: Duration,
    first_output: Duration,
}

/// Adds `count` small tracked files to the fixture, 1000 to a directory, and commits them.
fn generate_files(fixture: &Fixture, count: usize) -> anyhow::Result<()> {
    let root = fixture.root();
    for index in 0..count {
        let dir = root.join(format!("generated/d{:03}", index / 1000));
        if index % 1000 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::write(
            dir.join(format!("f{index}.txt")),
            format!("generated file {index}\n"),
        )?;
    }
    fixture.git(&["add", "generated"])?;
    fixture.git(&[
        "-c",
        "user.name=bench",
        "-c",
        "user.email=bench@localhost",
        "commit",
        "--quiet",
        "-m",
        "generated files",
    ])?;
    Ok(())
}

/// Leaves exactly `count` snapshot refs, on HEAD, named as clients name them and a minute
/// old, so the next snapshot's pruning treats them as it would real ones.
fn make_snapshot_refs(fixture: &Fixture, count: usize) -> anyhow::Result<()> {
    let existing = fixture.git(&[
        "for-each-ref",
        "--format=delete %(refname)",
        "refs/buildpool/snapshots/",
    ])?;
    let head = fixture.git(&["rev-parse", "HEAD"])?;
    let millis = buildpool_core::time::unix_millis() - 60_000;
    let mut script: String = existing.lines().map(|line| format!("{line}\n")).collect();
    script.extend(
        (0..count)
            .map(|index| format!("create refs/buildpool/snapshots/{millis}-{index:08x} {head}\n")),
    );
    if script.is_empty() {
        return Ok(());
    }
    super::git_with_input(&fixture.root(), &["update-ref", "--stdin"], &script)
}

/// One job after a one-line change: submit to cargo's first output, and the snapshot time
/// `run -v` reports.
fn timed_job(fixture: &Fixture, round: usize) -> anyhow::Result<(Duration, Duration)> {
    super::edit(fixture, round)?;
    let (first_output, notes) =
        super::first_cargo_line_and_notes(fixture, &["run", "-v", "check"])?;
    // "timings: snapshot 9 ms, submit 2 ms, ..."
    let snapshot_ms: u64 = notes
        .iter()
        .find_map(|note| note.strip_prefix("timings: snapshot "))
        .and_then(|rest| rest.split(' ').next())
        .context("no timings line from run -v")?
        .parse()?;
    Ok((first_output, Duration::from_millis(snapshot_ms)))
}

/// Measures one configuration on a fresh cluster.
fn measure(files: usize, refs: usize, rounds: usize) -> anyhow::Result<Row> {
    let fixture = Fixture::new()?;
    let generated = Instant::now();
    generate_files(&fixture, files)?;
    eprintln!(
        "{files} files generated and committed in {:.1} s",
        generated.elapsed().as_secs_f64()
    );
    let cluster = Cluster::start(fixture, 1, 1)?;
    let fixture = &cluster.fixture;
    let (cold_first_output, _) = timed_job(fixture, 0)?;
    let (mut snapshots, mut first_outputs) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        make_snapshot_refs(fixture, refs)?;
        let (first_output, snapshot) = timed_job(fixture, round)?;
        first_outputs.push(first_output);
        snapshots.push(snapshot);
    }
    Ok(Row {
        files,
        refs,
        cold_first_output,
        snapshot: super::median(snapshots),
        first_output: super::median(first_outputs),
    })
}

pub fn run(rounds: usize) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for files in REPOSITORY_FILES {
        rows.push(measure(files, 0, rounds)?);
    }
    for refs in SNAPSHOT_REFS.into_iter().filter(|refs| *refs > 0) {
        rows.push(measure(REF_SERIES_FILES, refs, rounds)?);
    }
    println!(
        "buildpool growth benchmark ({rounds} rounds each, 1 agent with 1 slot on this host; \
         the fixture workspace plus generated files)"
    );
    println!(
        "{:>8} {:>6} {:>14} {:>16} {:>22}",
        "files", "refs", "snapshot ms", "first output ms", "cold first output ms"
    );
    for row in &rows {
        println!(
            "{:>8} {:>6} {:>14.0} {:>16.0} {:>22.0}",
            row.files,
            row.refs,
            super::ms(row.snapshot),
            super::ms(row.first_output),
            super::ms(row.cold_first_output)
        );
    }
    let find = |files: usize, refs: usize| {
        rows.iter()
            .find(|row| row.files == files && row.refs == refs)
            .context("a measured row")
    };
    let (small, large) = (find(1_000, 0)?, find(50_000, 0)?);
    let (no_refs, many_refs) = (find(REF_SERIES_FILES, 0)?, find(REF_SERIES_FILES, 2_000)?);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-3);
    println!(
        "50x the files: snapshot x{:.1}, first output x{:.1}; 2000 refs against none: \
         snapshot x{:.1}, first output x{:.1}",
        ratio(large.snapshot, small.snapshot),
        ratio(large.first_output, small.first_output),
        ratio(many_refs.snapshot, no_refs.snapshot),
        ratio(many_refs.first_output, no_refs.first_output)
    );
    Ok(())
}
