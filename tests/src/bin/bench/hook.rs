//! `hook [ROUNDS]`: what offloading adds to a Claude Code session, side by side.
//!
//! - Per session: one `buildpool hook claude` process on the SessionStart event, which puts
//!   the cargo shim on the session's `PATH`.
//! - Per Bash call: nothing of ours runs (there is no PreToolUse hook). An older install's
//!   PreToolUse entry still starts `hook claude`, which answers nothing; its cost is shown.
//! - Per cargo: the shim deciding, then starting the real cargo, against starting the real
//!   cargo directly, for `cargo --version`, which stays here.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use buildpool_tests::{Fixture, RunOutput, bash_event, buildpool_bin, run_hook};

pub fn hook(rounds: usize) -> anyhow::Result<()> {
    let fixture = Fixture::new()?;
    let root = fixture.root();
    let env_file = fixture.scratch().join("claude-env");
    let cache = fixture.scratch().join("cache");
    let session_start = serde_json::json!({
        "session_id": "bench",
        "cwd": root,
        "hook_event_name": "SessionStart",
        "source": "startup",
    })
    .to_string();
    let session_env = [
        ("CLAUDE_ENV_FILE", env_file.to_str().context("utf-8")?),
        ("XDG_CACHE_HOME", cache.to_str().context("utf-8")?),
    ];
    println!("{rounds} calls each:");
    let session = measure(rounds, || {
        let out = run_hook(&session_start, &session_env)?;
        expect_silent(&out, "SessionStart")
    })?;
    report("hook claude, SessionStart (once per session)", &session);
    let retired = measure(rounds, || {
        let out = run_hook(&bash_event("cargo test 2>&1 | tail -20", &root), &[])?;
        expect_silent(&out, "PreToolUse")
    })?;
    report("hook claude, PreToolUse of an older install", &retired);

    let shim_dir = fixture.scratch().join("shim");
    let installed: RunOutput = Command::new(buildpool_bin())
        .args(["shim", "install"])
        .arg(&shim_dir)
        .output()?
        .into();
    if installed.code != Some(0) {
        bail!("shim install failed: {installed}");
    }
    let path = format!(
        "{}:{}",
        shim_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cargo = |through_shim: bool| {
        let mut command = Command::new("cargo");
        command.arg("--version").current_dir(&root);
        if through_shim {
            command.env("PATH", &path);
        }
        move || -> anyhow::Result<()> {
            let out: RunOutput = command.output()?.into();
            if out.code != Some(0) || !out.stdout.starts_with("cargo ") {
                bail!("cargo --version failed: {out}");
            }
            Ok(())
        }
    };
    let direct = measure(rounds, cargo(false))?;
    let shimmed = measure(rounds, cargo(true))?;
    report("cargo --version, the real cargo", &direct);
    report("cargo --version, through the shim", &shimmed);
    println!(
        "  the shim adds {:.2} ms per cargo (median against median)",
        super::ms(median(&shimmed)) - super::ms(median(&direct))
    );
    check_shim_dir(&shim_dir)
}

fn check_shim_dir(dir: &Path) -> anyhow::Result<()> {
    let link = std::fs::read_link(dir.join("cargo")).context("the shim is a link")?;
    if link.file_name() != Some("buildpool".as_ref()) {
        bail!("the shim links to {}", link.display());
    }
    Ok(())
}

fn expect_silent(out: &RunOutput, event: &str) -> anyhow::Result<()> {
    if out.code != Some(0) || !out.stdout.is_empty() {
        bail!("unexpected answer to {event}: {out}");
    }
    Ok(())
}

/// `rounds` timings of `call`, after one untimed call that puts the binaries in the page
/// cache as a session's later calls find them.
fn measure(
    rounds: usize,
    mut call: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    call()?;
    (0..rounds)
        .map(|_| {
            let started = Instant::now();
            call().map(|()| started.elapsed())
        })
        .collect()
}

fn median(samples: &[Duration]) -> Duration {
    super::median(samples.to_vec())
}

fn report(what: &str, samples: &[Duration]) {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    println!(
        "  {what}: median {:.2} ms (min {:.2}, max {:.2})",
        super::ms(median(samples)),
        super::ms(min),
        super::ms(max),
    );
}
