//! `bench -- spread [ROUNDS]`: one test run spread over agents against local `cargo test`.
//!
//! The workspace: a library and four test crates that depend on it, each with twelve
//! I/O-bound tests (each waits 1 s, as a test waiting on a database or a network peer
//! does; sleeping stands in for the wait, which takes no CPU). Locally that is about 25 s
//! with libtest's two threads on this 2-core machine. Each round makes a one-line change
//! in the library (every test crate rebuilds), then runs local `cargo test` and, on the
//! same change, `buildpool run test --spread N` for 1, 2 and 4 slices on four agents of
//! one slot each. Counts and exit codes are checked equal to local's every round; the
//! figures are wall times, medians, and their ratios.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use buildpool_tests::{Cluster, Fixture};

const TEST_CRATES: [&str; 4] = ["orders", "billing", "shipping", "accounts"];
const TESTS_PER_CRATE: usize = 12;

fn workspace() -> Vec<(String, String)> {
    let members: Vec<String> = std::iter::once("\"base\"".to_owned())
        .chain(TEST_CRATES.iter().map(|name| format!("\"{name}\"")))
        .collect();
    let mut files = vec![
        (
            "Cargo.toml".to_owned(),
            format!(
                "[workspace]\nmembers = [{}]\nresolver = \"2\"\n",
                members.join(", ")
            ),
        ),
        (
            "base/Cargo.toml".to_owned(),
            "[package]\nname = \"base\"\nversion = \"0.1.0\"\nedition = \"2021\"\n".to_owned(),
        ),
        (
            "base/src/lib.rs".to_owned(),
            "/// Waits as a test waits on a peer.\n\
             pub fn wait_for_peer() -> u32 {\n    \
             std::thread::sleep(std::time::Duration::from_millis(1000));\n    1\n}\n"
                .to_owned(),
        ),
    ];
    for name in TEST_CRATES {
        files.push((
            format!("{name}/Cargo.toml"),
            format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
                 [dependencies]\nbase = {{ path = \"../base\" }}\n"
            ),
        ));
        files.push((format!("{name}/src/lib.rs"), String::new()));
        let tests: String = (0..TESTS_PER_CRATE)
            .map(|i| {
                format!(
                    "#[test]\nfn waits_{i}() {{\n    assert_eq!(base::wait_for_peer(), 1);\n}}\n\n"
                )
            })
            .collect();
        files.push((format!("{name}/tests/io.rs"), tests));
    }
    files
}

/// Runs `command`; its wall time, exit code and the `test result:` lines' total.
fn timed(mut command: Command) -> anyhow::Result<(Duration, Option<i32>, [u64; 3])> {
    command.env("CARGO_TERM_COLOR", "never");
    let started = Instant::now();
    let output = command.output()?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (_, total) = buildpool_tests::test_totals(&stdout);
    if total == [0; 3] {
        bail!(
            "no test result in the output of {command:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((elapsed, output.status.code(), total))
}

fn local_test(root: &Path) -> Command {
    let mut command = Command::new("cargo");
    command
        .args(["test", "--no-fail-fast"])
        .current_dir(root)
        .env_remove("CARGO_TARGET_DIR");
    command
}

fn change(root: &Path, original: &str, line: &str) -> anyhow::Result<()> {
    std::fs::write(
        root.join("base/src/lib.rs"),
        format!("{original}\n// {line}\n"),
    )?;
    Ok(())
}

pub fn run(rounds: usize) -> anyhow::Result<()> {
    let files = workspace();
    let borrowed: Vec<(&str, String)> = files
        .iter()
        .map(|(path, text)| (path.as_str(), text.clone()))
        .collect();
    let cluster = Cluster::start(Fixture::with_files(&borrowed)?, 4, 1)?;
    let fixture = &cluster.fixture;
    let root = fixture.root();
    let original = std::fs::read_to_string(root.join("base/src/lib.rs"))?;
    let spread = |slices: usize| {
        fixture.command_in(&root, &["run", "test", "--spread", &slices.to_string()])
    };

    // Warm: local target dir, and every agent's workspace (each slice checks out).
    let (cold, _, expected) = timed(local_test(&root))?;
    println!("local cold cargo test: {:.1} s", cold.as_secs_f64());
    for slices in [4, 2, 1] {
        timed(spread(slices))?;
    }

    let slice_counts = [1usize, 2, 4];
    let mut local = Vec::new();
    let mut pooled: Vec<Vec<Duration>> = vec![Vec::new(); slice_counts.len()];
    for round in 1..=rounds {
        change(&root, &original, &format!("round {round} local"))?;
        let (elapsed, code, counts) = timed(local_test(&root))?;
        if code != Some(0) || counts != expected {
            bail!("local cargo test changed: exit {code:?}, counts {counts:?}");
        }
        local.push(elapsed);
        for (at, slices) in slice_counts.iter().enumerate() {
            change(&root, &original, &format!("round {round} spread {slices}"))?;
            let (elapsed, code, counts) = timed(spread(*slices))?;
            if code != Some(0) || counts != expected {
                bail!("--spread {slices}: exit {code:?}, counts {counts:?}; local {expected:?}");
            }
            pooled[at].push(elapsed);
        }
    }
    std::fs::write(root.join("base/src/lib.rs"), &original).context("restoring the library")?;

    println!(
        "spread benchmark: {} test crates x {TESTS_PER_CRATE} I/O-bound tests (1 s each), \
         4 agents of 1 slot on this host, a one-line change in the library each round, \
         {rounds} rounds; counts [passed, failed, ignored] = {expected:?} every time",
        TEST_CRATES.len()
    );
    let local_median = crate::summary("local cargo test --no-fail-fast", &local);
    for (at, slices) in slice_counts.iter().enumerate() {
        let median = crate::summary(
            &format!("buildpool run test --spread {slices}"),
            &pooled[at],
        );
        println!(
            "  --spread {slices}: ratio to local (medians) {:.2}",
            median.as_secs_f64() / local_median.as_secs_f64()
        );
    }
    Ok(())
}
