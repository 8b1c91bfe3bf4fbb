//! `bench -- sccache`: the sccache hit rate when a second slot builds the snapshot the first
//! slot built, with the sandbox's stable `/build/<repo>` path and without the sandbox (each
//! slot at its own host path).
//!
//! The fixture depends on `regex` (registry crates: cargo builds them without incremental
//! compilation, which is what sccache caches). Slot 0 builds it cold and fills the
//! repository's sccache directory; then, while slot 0 is held by a sleeping test, slot 1
//! builds the same snapshot cold. The hit rate is the share of slot 0's cache entries that
//! slot 1 did not have to write again.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use buildpool_tests::{Cluster, Fixture, Owned, ServeOptions, wait_until};

const MANIFEST: &str = "[package]\nname = \"cached\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\nregex = \"1\"\n";
const LIB: &str = r#"pub fn words(text: &str) -> usize {
    regex::Regex::new(r"\w+").map_or(0, |re| re.find_iter(text).count())
}

#[cfg(test)]
mod tests {
    #[test]
    #[ignore]
    fn holds_the_slot() {
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}
"#;

/// Files under `dir`, recursively: sccache's disk cache keeps one file per entry.
fn entries(dir: &Path) -> usize {
    let Ok(read) = std::fs::read_dir(dir) else {
        return 0;
    };
    read.flatten()
        .map(|entry| {
            if entry.path().is_dir() {
                entries(&entry.path())
            } else {
                1
            }
        })
        .sum()
}

fn timed_build(fixture: &Fixture) -> anyhow::Result<(Duration, String)> {
    let started = Instant::now();
    let out = fixture.run(&["run", "build"])?;
    if out.code != Some(0) {
        bail!("build failed: {out}");
    }
    Ok((started.elapsed(), out.stderr))
}

/// One agent with two slots and `[cache] sccache = true`; returns the hit rate of slot 1.
fn second_slot_hits(sandboxed: bool) -> anyhow::Result<()> {
    let options = if sandboxed {
        ServeOptions::default()
    } else {
        ServeOptions::unsandboxed()
    };
    let mut cluster = Cluster::start_with(
        Fixture::with_files(&[("Cargo.toml", MANIFEST.into()), ("src/lib.rs", LIB.into())])?,
        0,
        1,
        &options,
    )?;
    let config = cluster.fixture.scratch().join("sccache-agent.toml");
    std::fs::write(&config, "[cache]\nsccache = true\n")?;
    let config = config.to_str().context("utf-8 path")?.to_owned();
    cluster.add_agent("cached", 2, &["--config", &config])?;
    let fixture = &cluster.fixture;
    let label = if sandboxed {
        "sandbox bwrap"
    } else {
        "sandbox none"
    };

    let (first, first_log) = timed_build(fixture)?;
    if !first_log.contains("workspace slot 0") {
        bail!("the first build did not run on slot 0: {first_log}");
    }
    let workspaces = fixture.scratch().join("cached/workspaces");
    let repo_dir = std::fs::read_dir(&workspaces)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.join("sccache").is_dir())
        .context("no sccache directory: is sccache installed?")?;
    let cache = repo_dir.join("sccache");
    let after_first = entries(&cache);

    let mut holder = Owned::spawn(
        fixture.command_in(
            &fixture.root(),
            &["run", "test", "--", "--", "--ignored", "holds_the_slot"],
        ),
        fixture.scratch().join("holder.log"),
    )?;
    if !wait_until(Duration::from_secs(300), || {
        holder.log_text().contains("running 1 test")
    }) {
        bail!("the slot holder did not start: {}", holder.log_text());
    }
    let (second, second_log) = timed_build(fixture)?;
    if !second_log.contains("workspace slot 1 (cold)") {
        bail!("the second build did not run cold on slot 1: {second_log}");
    }
    holder.signal(buildpool_tests::SIGINT);
    let _ = holder.wait_timeout(Duration::from_secs(30));
    let written_again = entries(&cache).saturating_sub(after_first);
    // Counts of cache files: far below f64's exact range.
    #[allow(clippy::cast_precision_loss)]
    let hit_rate = 1.0 - written_again as f64 / after_first.max(1) as f64;
    println!(
        "{label}: slot 0 cold build {:.1} s wrote {after_first} cache entries; slot 1 cold \
         build {:.1} s wrote {written_again} more: hit rate {:.0}%",
        first.as_secs_f64(),
        second.as_secs_f64(),
        hit_rate * 100.0
    );
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    if buildpool_tests::dir_of_program("sccache").is_none() {
        bail!("sccache is not installed (apt-get install sccache)");
    }
    second_slot_hits(true)?;
    second_slot_hits(false)
}
