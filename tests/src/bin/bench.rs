//! Benchmarks reported in closing notes (figures, not assertions):
//!
//! 1. latency from `buildpool run check` to cargo's first output line, warm agent;
//! 2. remote warm incremental build vs local incremental build after the same one-line change;
//! 3. cancel latency: client Ctrl-C to the job's process group being gone, and to the
//!    client's exit (the agent confirmed);
//! 4. dead-link detection and reattach after a silent network cut (heartbeat timeout 3 s).
//!
//! Run: `cargo run --release -p buildpool-tests --bin bench [-- ROUNDS]`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use buildpool_tests::{Cluster, Fixture, Owned, Proxy, ServeOptions, process_alive, wait_until};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn summary(name: &str, samples: &[Duration]) -> Duration {
    let med = median(samples.to_vec());
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    println!(
        "{name}: median {:.0} ms (min {:.0}, max {:.0}, n={})",
        ms(med),
        ms(min),
        ms(max),
        samples.len()
    );
    med
}

/// Time until the first line of cargo's own output (not buildpool's notes).
fn time_to_first_cargo_line(fixture: &Fixture, args: &[&str]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = fixture
        .command_in(&fixture.root(), args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut first = None;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if first.is_none() && !line.starts_with("[buildpool]") {
            first = Some(started.elapsed());
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{args:?} failed: {status}");
    }
    first.context("cargo printed nothing")
}

fn edit(fixture: &Fixture, round: usize) -> anyhow::Result<()> {
    fixture.write(
        "app/src/extra_constant.rs",
        &format!("pub const ROUND: usize = {round};\n"),
    )?;
    let lib = std::fs::read_to_string(fixture.root().join("app/src/lib.rs"))?;
    if !lib.contains("mod extra_constant;") {
        fixture.write(
            "app/src/lib.rs",
            &format!("{lib}\npub mod extra_constant;\n"),
        )?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(9);
    let cluster = Cluster::start(Fixture::new()?, 1, 1)?;
    let fixture = &cluster.fixture;

    // Warm the agent and the local target dir.
    for args in [&["run", "check"][..], &["run", "build"][..]] {
        let out = fixture.run(args)?;
        if out.code != Some(0) {
            bail!("warm-up failed: {out}");
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let local_build = |round: usize| -> anyhow::Result<Duration> {
        edit(fixture, round)?;
        let started = Instant::now();
        let status = Command::new(&cargo)
            .arg("build")
            .arg("--quiet")
            .current_dir(fixture.root())
            .status()?;
        if !status.success() {
            bail!("local cargo build failed");
        }
        Ok(started.elapsed())
    };
    local_build(0)?;

    let mut first_line = Vec::new();
    for _ in 0..rounds {
        first_line.push(time_to_first_cargo_line(fixture, &["run", "check"])?);
    }

    let (mut remote, mut local) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        local.push(local_build(round)?);
        edit(fixture, round)?;
        let started = Instant::now();
        let out = fixture.run(&["run", "build"])?;
        if out.code != Some(0) {
            bail!("remote build failed: {out}");
        }
        remote.push(started.elapsed());
    }

    println!("buildpool benchmarks ({rounds} rounds, 1 agent with 1 slot on this host)");
    summary(
        "run check -> first cargo output line (warm agent)",
        &first_line,
    );
    let remote_median = summary(
        "remote incremental build after a one-line change (buildpool run build)",
        &remote,
    );
    let local_median = summary(
        "local incremental build after the same change (cargo build)",
        &local,
    );
    println!(
        "ratio remote/local: {:.2}",
        remote_median.as_secs_f64() / local_median.as_secs_f64()
    );

    let (mut gone, mut confirmed) = (Vec::new(), Vec::new());
    for round in 0..rounds.min(5) {
        let _ = std::fs::remove_file(fixture.pid_file());
        let args = Fixture::ignored_test_job("sleeps_with_a_child", &[]);
        let mut run = Owned::spawn(
            fixture.command_in(&fixture.root(), &args),
            fixture.scratch().join(format!("cancel{round}.log")),
        )?;
        let mut pid = None;
        if !wait_until(Duration::from_secs(60), || {
            pid = fixture.grandchild_pid();
            pid.is_some()
        }) {
            bail!("the job did not start: {}", run.log_text());
        }
        let pid = pid.context("pid")?;
        let started = Instant::now();
        run.signal(buildpool_tests::SIGINT);
        wait_until(Duration::from_secs(30), || !process_alive(pid));
        gone.push(started.elapsed());
        if run.wait_timeout(Duration::from_secs(30)).is_none() {
            bail!(
                "the client did not exit after the cancel:\n{}\nagent:\n{}\ncoordinator:\n{}",
                run.log_text(),
                cluster.agents[0].log_text(),
                cluster.coordinator.log_text()
            );
        }
        confirmed.push(started.elapsed());
    }
    summary("cancel: Ctrl-C -> job's process group gone", &gone);
    summary(
        "cancel: Ctrl-C -> client exits with the agent's confirmation",
        &confirmed,
    );
    drop(cluster);

    let fast = ServeOptions {
        config: Some("[build_pool.timeouts]\nheartbeat_interval_secs = 1\nheartbeat_timeout_secs = 3\nreattach_grace_secs = 20\n".into()),
        ..ServeOptions::default()
    };
    let (mut detected, mut reattached) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let mut cluster = Cluster::start_with(Fixture::new()?, 0, 1, &fast)?;
        let proxy = Proxy::start(&cluster.websocket_addr)?;
        cluster.add_agent("behind-proxy", 1, &["--server", &proxy.bus_url()])?;
        let fixture = &cluster.fixture;
        std::fs::write(fixture.sleep_file(), "10")?;
        let mut run = Owned::spawn(
            fixture.command_in(&fixture.root(), &Fixture::brief_job()),
            fixture.scratch().join(format!("cut{round}.log")),
        )?;
        if !wait_until(Duration::from_secs(60), || fixture.starts() == 1) {
            bail!("the job did not start:\n{}", run.log_text());
        }
        let cut = Instant::now();
        proxy.cut();
        let log = || cluster.coordinator.log_text();
        // Whichever comes first: the coordinator's own timeout, or the agent's reconnect
        // superseding the silent connection.
        if !wait_until(Duration::from_secs(30), || {
            log().contains("agent disconnected")
        }) {
            bail!("the cut was not detected:\n{}", log());
        }
        detected.push(cut.elapsed());
        if !wait_until(Duration::from_secs(30), || log().contains("reported=1")) {
            bail!("no reattach:\n{}", log());
        }
        reattached.push(cut.elapsed());
        run.wait_timeout(Duration::from_secs(60))
            .context("job ends")?;
        if fixture.starts() != 1 {
            bail!("the job was rerun");
        }
    }
    summary(
        "network cut -> coordinator drops the dead link (heartbeat timeout 3 s)",
        &detected,
    );
    summary(
        "network cut -> agent reconnected and its attempt reattached",
        &reattached,
    );
    Ok(())
}
