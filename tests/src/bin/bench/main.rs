//! Benchmarks reported in closing notes (figures, not assertions):
//!
//! 1. latency from `buildpool run check` to cargo's first output line, warm agent;
//! 2. remote warm incremental build vs local incremental build after the same one-line change,
//!    and where the remote build's time went, phase by phase (`run -v`);
//! 3. cancel latency: client Ctrl-C to the job's process group being gone, and to the
//!    client's exit (the agent confirmed);
//! 4. dead-link detection and reattach after a silent network cut (heartbeat timeout 3 s).
//!
//! 1 and 2 run once with a sandboxed agent (the default) and once without, reporting the
//! sandbox's overhead per job and the incremental ratio with and without it.
//!
//! `security` instead measures, side by side in one run: a snapshot fetch through the
//! authenticated tunnel against one straight from the git daemon; submit to first cargo
//! output with agents fetching each way; and the cost of TLS per bus connection.
//!
//! `crate NAME` measures on a published crate's source (from cargo's registry cache, or
//! fetched like any dependency): a fresh worktree's `cargo test` through a warm agent
//! against a local cold one, and a one-line change through the pool against a local
//! incremental run.
//!
//! `affinity` (affinity.rs) compares the coordinator's workspace affinity on and off: two
//! agents, four worktrees on branches of their own taking turns, warm hits and the median
//! cargo phase.
//!
//! `scale` (scale.rs) runs simulated agents on real job bus connections against one
//! `buildpool serve` and submits jobs through the control API: jobs per second from
//! closed-loop clients, submit-to-assign latency at 5,000 jobs a second offered, the
//! coordinator's RSS and CPU. `--idle` (or `--jobs 0`) only connects the agents and reports
//! the idle coordinator's RSS.
//!
//! `growth` (growth.rs) reports how the snapshot and submit-to-first-output grow with the
//! repository's size and with the number of snapshot refs.
//!
//! `sccache` measures the sccache hit rate when a second slot builds the snapshot the first
//! built, with the sandbox's stable path and without the sandbox.
//!
//! `spread [ROUNDS]` (spread.rs) times `run test --spread 1|2|4` on four agents against
//! local `cargo test`, on I/O-bound tests after a one-line change.
//!
//! `shared-cache [CRATE]` (shared_cache.rs) times a published crate's first build on a new
//! agent with the fleet's shared sccache store against a cold agent's.
//!
//! `hook` measures what offloading adds to a Claude Code session: the SessionStart hook,
//! and the cargo shim against the real cargo.
//!
//! `soak` (soak.rs) runs real jobs through real agents while it kills and restarts the
//! coordinator and agents, cuts links and freezes agents: jobs lost and duplicated (both
//! must be 0), reruns, and how long clients waited.
//!
//! Run: `cargo run --release -p buildpool-tests --bin bench [-- ROUNDS]`,
//! `... --bin bench -- security [ROUNDS]`, `... --bin bench -- crate memchr [ROUNDS] [--unsandboxed] [--one-line-only]`,
//! `... --bin bench -- scale --agents 1000 --jobs 20000 [--slots N] [--clients N | --rate
//! JOBS_PER_S] [--connections N] [--plain] [--cpu-idle]`, `... -- scale --agents 10000 --idle`,
//! `... --bin bench -- growth [ROUNDS]`, `... -- hook [ROUNDS]`, `... -- sccache` or
//! `... -- soak [--agents 3] [--jobs 24] [--clients 4] [--chaos coordinator,agent,cut,stop]`
//! `... --bin bench -- affinity [ROUNDS]`

mod affinity;
mod growth;
mod hook;
mod scale;
mod sccache;
mod shared_cache;
mod soak;
mod spread;

use std::io::{BufRead, BufReader};
use std::path::Path;
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
    Ok(first_cargo_line_and_notes(fixture, args)?.0)
}

/// Runs `buildpool` with `args` in the fixture: the time until the first line of cargo's
/// own output, and buildpool's notes (its `[buildpool] ` lines, without the prefix).
fn first_cargo_line_and_notes(
    fixture: &Fixture,
    args: &[&str],
) -> anyhow::Result<(Duration, Vec<String>)> {
    let started = Instant::now();
    let mut child = fixture
        .command_in(&fixture.root(), args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut first = None;
    let mut notes = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        match line.strip_prefix("[buildpool] ") {
            Some(note) => notes.push(note.to_owned()),
            None => {
                first.get_or_insert_with(|| started.elapsed());
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{args:?} failed: {status}");
    }
    Ok((first.context("cargo printed nothing")?, notes))
}

/// Runs git in `dir` with `input` on its standard input (e.g. `update-ref --stdin`).
fn git_with_input(dir: &Path, args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("git's stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
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

/// The phases of `buildpool run -v` jobs, sample by sample.
#[derive(Debug, Default)]
struct PhaseSamples(std::collections::BTreeMap<usize, (String, Vec<Duration>)>);

impl PhaseSamples {
    /// Adds the phases of one job from its stderr's timings line.
    fn add(&mut self, stderr: &str) -> anyhow::Result<()> {
        // "[buildpool] timings: snapshot 9 ms, submit 2 ms, ..."
        let line = stderr
            .lines()
            .find_map(|line| line.strip_prefix("[buildpool] timings: "))
            .context("no timings line")?;
        for (index, part) in line.split(", ").enumerate() {
            let (name, value) = part.split_once(' ').context("phase")?;
            let ms: u64 = value.trim_end_matches(" ms").parse()?;
            let entry = self
                .0
                .entry(index)
                .or_insert_with(|| (name.to_owned(), Vec::new()));
            entry.1.push(Duration::from_millis(ms));
        }
        Ok(())
    }

    /// The median of one phase.
    fn median_of(&self, phase: &str) -> Option<Duration> {
        self.0
            .values()
            .find(|(name, _)| name == phase)
            .map(|(_, samples)| median(samples.clone()))
    }

    /// "snapshot 9, submit 2, ...": each phase's median in ms.
    fn medians(&self) -> String {
        let parts: Vec<String> = self
            .0
            .values()
            .map(|(name, samples)| format!("{name} {:.0}", ms(median(samples.clone()))))
            .collect();
        parts.join(", ")
    }
}

/// What [`incremental`] measured.
struct Incremental {
    first_line: Duration,
    ratio: f64,
}

/// Latency to cargo's first line and a one-line change's incremental build, remote against
/// local, with the remote build's phases.
fn incremental(cluster: &Cluster, rounds: usize, label: &str) -> anyhow::Result<Incremental> {
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
    let mut phases = PhaseSamples::default();
    for round in 1..=rounds {
        local.push(local_build(round)?);
        edit(fixture, round)?;
        let started = Instant::now();
        let out = fixture.run(&["run", "-v", "build"])?;
        if out.code != Some(0) {
            bail!("remote build failed: {out}");
        }
        remote.push(started.elapsed());
        phases.add(&out.stderr)?;
    }

    println!("{label}: {rounds} rounds, 1 agent with 1 slot on this host");
    let first_line = summary(
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
    let ratio = remote_median.as_secs_f64() / local_median.as_secs_f64();
    println!("ratio remote/local: {ratio:.2}");
    println!(
        "remote incremental build, median ms per phase (run -v): {}",
        phases.medians()
    );
    Ok(Incremental { first_line, ratio })
}

/// A mode's ROUNDS argument, `default` when it is not given.
fn rounds(arg: Option<&String>, default: usize, usage: &str) -> anyhow::Result<usize> {
    arg.map_or(Ok(default), |arg| {
        arg.parse()
            .with_context(|| format!("ROUNDS must be a whole number, not {arg:?}; {usage}"))
    })
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // Each further mode lives in its own module beside this file and takes its arguments.
    if args.first().is_some_and(|arg| arg == "sccache") {
        return sccache::run();
    }
    if args.first().is_some_and(|arg| arg == "spread") {
        return spread::run(rounds(args.get(1), 3, "bench spread [ROUNDS]")?);
    }
    if args.first().is_some_and(|arg| arg == "shared-cache") {
        return shared_cache::run(&args[1..]);
    }
    if args.first().is_some_and(|arg| arg == "hook") {
        let rounds = rounds(args.get(1), 200, "bench hook [ROUNDS]")?;
        return hook::hook(rounds);
    }
    if args.first().is_some_and(|arg| arg == "crate") {
        let usage = "bench crate NAME [ROUNDS] [--unsandboxed] [--one-line-only]";
        let name = args.get(1).context(usage)?.clone();
        let mut count = None;
        let mut options = CrateOptions::default();
        for arg in args.iter().skip(2) {
            match arg.as_str() {
                "--unsandboxed" => options.unsandboxed = true,
                "--one-line-only" => options.one_line_only = true,
                flag if flag.starts_with('-') => bail!("unknown flag {flag}; {usage}"),
                _ if count.is_none() => count = Some(arg),
                other => bail!("unexpected {other}; {usage}"),
            }
        }
        return real_crate(&name, rounds(count, 3, usage)?, &options);
    }
    if args.first().is_some_and(|arg| arg == "affinity") {
        return affinity::run(rounds(args.get(1), 3, "bench affinity [ROUNDS]")?);
    }
    if args.first().is_some_and(|arg| arg == "scale") {
        return scale::run(&args[1..]);
    }
    if args.first().is_some_and(|arg| arg == "soak") {
        return soak::run(&args[1..]);
    }
    if args.first().is_some_and(|arg| arg == "growth") {
        return growth::run(rounds(args.get(1), 3, "bench growth [ROUNDS]")?);
    }
    let security_only = args.first().is_some_and(|arg| arg == "security");
    if security_only {
        args.remove(0);
    }
    let rounds = rounds(args.first(), 9, "bench [security] [ROUNDS]")?;
    if security_only {
        return security(rounds);
    }
    // The same fixture work through a sandboxed agent (the default) and an unsandboxed one.
    let sandboxed = Cluster::start(Fixture::new()?, 1, 1)?;
    let with_sandbox = incremental(&sandboxed, rounds, "sandbox bwrap")?;
    drop(sandboxed);
    // Unsandboxed also for the cancel rounds: they watch the job's grandchild from the host.
    let cluster = Cluster::start_with(Fixture::new()?, 1, 1, &ServeOptions::unsandboxed())?;
    let fixture = &cluster.fixture;
    let without_sandbox = incremental(&cluster, rounds, "sandbox none")?;
    println!(
        "sandbox overhead per job (run check -> first cargo line, medians): {:.0} ms; \
         incremental ratio remote/local {:.2} with the sandbox, {:.2} without",
        ms(with_sandbox
            .first_line
            .saturating_sub(without_sandbox.first_line)),
        with_sandbox.ratio,
        without_sandbox.ratio
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
        ..ServeOptions::unsandboxed()
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

/// A fresh bare repository fetching the coordinator's snapshots (all an agent is offered),
/// through the tunnel when a credential is given, else from the daemon directly.
fn timed_fetch(
    cluster: &Cluster,
    dir: &Path,
    tunnel_credential: Option<&str>,
) -> anyhow::Result<Duration> {
    let _ = std::fs::remove_dir_all(dir);
    let status = Command::new("git")
        .args(["init", "--quiet", "--bare"])
        .arg(dir)
        .status()?;
    if !status.success() {
        bail!("git init failed");
    }
    let mut fetch = Command::new("git");
    fetch
        .arg("-C")
        .arg(dir)
        .args(["-c", "protocol.version=1", "fetch", "--quiet"]);
    match tunnel_credential {
        Some(credential) => {
            fetch.arg(buildpool_tests::TUNNEL_REPO_URL);
            cluster.through_tunnel(&mut fetch, credential)?;
        }
        None => {
            fetch.arg(format!("git://127.0.0.1:{}/.git", cluster.git_daemon_port));
        }
    }
    fetch.arg("+refs/buildpool/snapshots/*:refs/snapshots/*");
    let started = Instant::now();
    let output = fetch.output()?;
    if !output.status.success() {
        bail!("fetch failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let elapsed = started.elapsed();
    let fetched = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["for-each-ref", "refs/snapshots/"])
        .output()?;
    if fetched.stdout.is_empty() {
        bail!("the fetch brought no snapshot");
    }
    Ok(elapsed)
}

fn security(rounds: usize) -> anyhow::Result<()> {
    // The default (tunnel) and a trusted-network coordinator whose agents fetch directly.
    let tunnelled = Cluster::start(Fixture::new()?, 1, 1)?;
    let direct_options = ServeOptions {
        extra_args: ["--allow-insecure", "--git-daemon-listen-addr", "0.0.0.0"]
            .map(str::to_owned)
            .to_vec(),
        ..ServeOptions::default()
    };
    let direct = Cluster::start_with(Fixture::new()?, 1, 1, &direct_options)?;

    // 1. One fetch of the fixture's snapshot (a job makes it), both ways, from the same
    // daemon.
    let made = tunnelled.fixture.run(&["run", "check"])?;
    if made.code != Some(0) {
        bail!("the snapshot's job failed: {made}");
    }
    let scratch = tunnelled.fixture.scratch();
    let token = std::fs::read_to_string(tunnelled.fixture.token_file())?;
    let token = token.trim();
    let (mut through, mut straight) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let dir = scratch.join(format!("fetch-{round}"));
        through.push(timed_fetch(&tunnelled, &dir, Some(token))?);
        straight.push(timed_fetch(&tunnelled, &dir, None)?);
    }

    // 2. Submit -> first cargo output line, each round after a one-line change so every
    // job fetches a new snapshot.
    for cluster in [&tunnelled, &direct] {
        let out = cluster.fixture.run(&["run", "check"])?;
        if out.code != Some(0) {
            bail!("warm-up failed: {out}");
        }
    }
    let (mut first_tunnelled, mut first_direct) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for (cluster, samples) in [
            (&tunnelled, &mut first_tunnelled),
            (&direct, &mut first_direct),
        ] {
            edit(&cluster.fixture, round)?;
            samples.push(time_to_first_cargo_line(
                &cluster.fixture,
                &["run", "check"],
            )?);
        }
    }

    // 3. TLS per agent connection: connect and upgrade, TLS against plain text, on the
    // coordinator that accepts both.
    let runtime = tokio::runtime::Runtime::new()?;
    let (mut with_tls, mut plain) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        for _ in 0..rounds.max(20) {
            let started = Instant::now();
            let socket = direct.raw_websocket("/ws").await?;
            with_tls.push(started.elapsed());
            drop(socket);
            let started = Instant::now();
            let (socket, _) =
                tokio_tungstenite::connect_async(format!("ws://{}/ws", direct.websocket_addr))
                    .await?;
            plain.push(started.elapsed());
            drop(socket);
        }
        anyhow::Ok(())
    })?;

    println!("buildpool security benchmarks ({rounds} rounds, everything on this host)");
    let tunnel_fetch = summary(
        "fetch of the fixture repository through the tunnel",
        &through,
    );
    let direct_fetch = summary("the same fetch straight from git daemon", &straight);
    println!(
        "ratio tunnel/direct fetch: {:.2}",
        tunnel_fetch.as_secs_f64() / direct_fetch.as_secs_f64()
    );
    let tunnel_first = summary(
        "run check -> first cargo output, agent fetching through the tunnel",
        &first_tunnelled,
    );
    let direct_first = summary(
        "run check -> first cargo output, agent fetching from git daemon directly",
        &first_direct,
    );
    println!(
        "ratio tunnel/direct submit-to-output: {:.2}",
        tunnel_first.as_secs_f64() / direct_first.as_secs_f64()
    );
    let tls = summary("agent connection: TCP + TLS + WebSocket upgrade", &with_tls);
    let clear = summary("agent connection: TCP + WebSocket upgrade (plain)", &plain);
    println!(
        "TLS handshake cost per agent connection: {:.2} ms",
        ms(tls.saturating_sub(clear))
    );
    Ok(())
}

/// The newest version of `name` in cargo's registry cache, fetched there first if missing.
fn crate_source(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let find = || -> Option<std::path::PathBuf> {
        let home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
        let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(home.join("registry/src"))
            .ok()?
            .flatten()
            .flat_map(|index| {
                std::fs::read_dir(index.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(name)?.strip_prefix('-'))
                    .is_some_and(|version| version.starts_with(|c: char| c.is_ascii_digit()))
            })
            .collect();
        found.sort();
        found.pop()
    };
    if let Some(source) = find() {
        return Ok(source);
    }
    let project = tempfile::tempdir()?;
    std::fs::write(
        project.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"fetcher\"\nversion = \"0.0.0\"\nedition = \"2021\"\n[dependencies]\n{name} = \"*\"\n"
        ),
    )?;
    std::fs::create_dir_all(project.path().join("src"))?;
    std::fs::write(project.path().join("src/lib.rs"), "")?;
    let fetched = Command::new("cargo")
        .arg("fetch")
        .current_dir(project.path())
        .status()?;
    if !fetched.success() {
        bail!("cargo fetch of {name} failed");
    }
    find().context("the crate is not in the registry cache after cargo fetch")
}

fn timed_command(mut command: Command) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let output = command.output()?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(started.elapsed())
}

/// `buildpool run -v test` in `dir`: its wall time and stderr (notes and timings).
fn pool_test(fixture: &Fixture, dir: &Path) -> anyhow::Result<(Duration, String)> {
    let mut command = fixture.command_in(dir, &["run", "-v", "test"]);
    command.env("CARGO_TERM_COLOR", "never");
    let started = Instant::now();
    let output = command.output()?;
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        bail!("buildpool run test in {} failed: {stderr}", dir.display());
    }
    Ok((elapsed, stderr))
}

/// `cargo test` in `dir`, timed: the command the pool runs, as a developer types it (the
/// `cargo` on `PATH`, as the job finds it, not the one that may have started the benchmark)
/// with the worktree's own target dir (not one the benchmark's environment may name).
fn local_test(dir: &Path) -> anyhow::Result<Duration> {
    let mut command = Command::new("cargo");
    command
        .arg("test")
        .current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_TERM_COLOR", "never");
    timed_command(command)
}

/// Appends a comment line to `dir`'s `src/lib.rs` (its text as committed is `original`).
fn one_line_change(dir: &Path, original: &str, line: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join("src/lib.rs"), format!("{original}\n// {line}\n"))?;
    Ok(())
}

/// How `bench crate` runs.
#[derive(Debug, Default)]
struct CrateOptions {
    /// An agent without the sandbox, to tell what the sandbox costs.
    unsandboxed: bool,
    /// Only the one-line change rounds (no four-worktrees part).
    one_line_only: bool,
}

fn real_crate(name: &str, rounds: usize, options: &CrateOptions) -> anyhow::Result<()> {
    let source = crate_source(name)?;
    let serve = if options.unsandboxed {
        ServeOptions::unsandboxed()
    } else {
        ServeOptions::default()
    };
    let cluster = Cluster::start_with(Fixture::from_source(&source)?, 1, 2, &serve)?;
    let fixture = &cluster.fixture;

    // The agent builds the crate once, from the main worktree.
    let (warm_up, _) = pool_test(fixture, &fixture.root())?;
    // A fresh worktree: its first test run locally (cold target dir) and through the pool.
    let fresh = fixture.add_worktree("fresh")?;
    let local_cold = local_test(&fresh)?;
    let other = fixture.add_worktree("other")?;
    let (pool_fresh, _) = pool_test(fixture, &other)?;

    // One-line changes in the fresh worktree: local incremental against the pool.
    let original = std::fs::read_to_string(fresh.join("src/lib.rs"))?;
    let (mut local, mut pool) = (Vec::new(), Vec::new());
    let mut phases = PhaseSamples::default();
    for round in 1..=rounds {
        one_line_change(&fresh, &original, &format!("round {round}"))?;
        local.push(local_test(&fresh)?);
        one_line_change(&fresh, &original, &format!("round {round} (pool)"))?;
        let (elapsed, stderr) = pool_test(fixture, &fresh)?;
        pool.push(elapsed);
        phases.add(&stderr)?;
    }

    println!(
        "buildpool real-crate benchmark: {} (1 agent, 2 slots, this host{})",
        source.file_name().and_then(|n| n.to_str()).unwrap_or(name),
        if options.unsandboxed {
            ", no sandbox"
        } else {
            ""
        }
    );
    println!(
        "agent's first build and test (warm-up): {:.0} ms",
        ms(warm_up)
    );
    println!(
        "fresh worktree: local cold cargo test {:.0} ms, through the warm pool {:.0} ms, ratio pool/local {:.2}",
        ms(local_cold),
        ms(pool_fresh),
        pool_fresh.as_secs_f64() / local_cold.as_secs_f64()
    );
    let local_median = summary("one-line change, local incremental cargo test", &local);
    let pool_median = summary("one-line change, through the pool", &pool);
    // Each round runs local then pool back to back: its own ratio is spared the machine's
    // drift between rounds (other tenants, frequency), which the medians are not.
    let mut ratios: Vec<f64> = local
        .iter()
        .zip(&pool)
        .map(|(local, pool)| pool.as_secs_f64() / local.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio pool/local incremental: {:.2} (of the medians), {:.2} (median of each round's ratio)",
        pool_median.as_secs_f64() / local_median.as_secs_f64(),
        ratios[ratios.len() / 2]
    );
    println!(
        "one-line change through the pool, median ms per phase (run -v): {}",
        phases.medians()
    );
    if options.one_line_only {
        return Ok(());
    }
    four_at_once(fixture, &original, rounds)
}

/// Four worktrees, each after a one-line change, run `cargo test` at the same moment:
/// through the pool (one agent, two slots) against four local cargo processes.
fn four_at_once(fixture: &Fixture, original: &str, rounds: usize) -> anyhow::Result<()> {
    let dirs: Vec<std::path::PathBuf> = (1..=4)
        .map(|n| fixture.add_worktree(&format!("four-{n}")))
        .collect::<anyhow::Result<_>>()?;
    // Each worktree built once both ways first: warm local target dirs and agent slots.
    for dir in &dirs {
        local_test(dir)?;
        pool_test(fixture, dir)?;
    }
    let all_at_once = |run: &(dyn Fn(&Path) -> anyhow::Result<()> + Sync)| {
        let started = Instant::now();
        std::thread::scope(|scope| {
            let runs: Vec<_> = dirs
                .iter()
                .map(|dir| scope.spawn(move || run(dir)))
                .collect();
            runs.into_iter()
                .map(|run| run.join().map_err(|_| anyhow::anyhow!("a run panicked"))?)
                .collect::<anyhow::Result<Vec<()>>>()
        })?;
        anyhow::Ok(started.elapsed())
    };
    let (mut local, mut pool) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for dir in &dirs {
            one_line_change(dir, original, &format!("together {round}"))?;
        }
        local.push(all_at_once(&|dir| local_test(dir).map(drop))?);
        for dir in &dirs {
            one_line_change(dir, original, &format!("together {round} (pool)"))?;
        }
        pool.push(all_at_once(&|dir| pool_test(fixture, dir).map(drop))?);
    }
    let local_median = summary(
        "four worktrees at once, one-line change each, four local cargo test",
        &local,
    );
    let pool_median = summary(
        "four worktrees at once through the pool (1 agent, 2 slots)",
        &pool,
    );
    println!(
        "ratio pool/local, four worktrees at once: {:.2}",
        pool_median.as_secs_f64() / local_median.as_secs_f64()
    );
    Ok(())
}
