//! `scale`: one real coordinator (a `buildpool serve` process, so its memory and CPU are
//! its own) against many simulated agents on real job bus connections, fed by concurrent
//! clients of the real control API.
//!
//! The simulated agents speak the agent protocol through the same `BusSocket` the real
//! agent uses: hello with the credential and a slot offer, then for each assignment at once
//! a line of output, a successful result and the restored offer, as a real agent reports a
//! job that ended; they count the `ResultAck`s. They fetch nothing. Clients and agents
//! share this process, so one clock measures submit (the client's call) to assign (the
//! agent reading the assignment).
//!
//! Two phases by default, since one load cannot answer both questions: the throughput
//! phase (256 closed loops) finds the most jobs a second the coordinator sustains, and its
//! latency there is queueing (256 jobs in flight at 10,000 a second wait 25 ms whatever the
//! coordinator does); the latency phase offers 5,000 jobs a second, the goal's rate, and
//! measures submit-to-assign at that load. The summary line takes jobs per second and CPU
//! from the first, latency from the second; `--clients N` or `--rate R` runs one phase.
//!
//! Every job needs a snapshot ref the coordinator can resolve, and the coordinator deletes
//! it when the job ends, so one ref per job is made up front (all on the same commit).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use buildpool::client::Client;
use buildpool_core::bus::{
    AgentMessage, CoordinatorMessage, DiskUsage, Hello, PROTOCOL_VERSION, SlotOffer,
};
use buildpool_core::status::Submission;
use buildpool_core::{Completion, JobEnd, JobEvent, JobId, JobKind, JobSpec, OutputStream};
use buildpool_proto::socket::{AgentSocket, HANDSHAKE_TIMEOUT, ServerUrl};
use buildpool_proto::tls::{self, ServerTrust};
use buildpool_tests::{Cluster, Fixture, ServeOptions, wait_until};
use tokio::sync::Semaphore;

/// How one phase of `scale` loads the coordinator.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// Closed loops, each submitting its next job when the last ended: the most the
    /// coordinator sustains (and, at saturation, latency that is only queueing).
    Closed { clients: usize },
    /// Jobs submitted at `rate` per second whatever the coordinator's pace (an open loop):
    /// the latency at that load.
    Open { rate: f64 },
}

/// Offered load of the latency phase by default: the throughput goal.
const DEFAULT_RATE: f64 = 5000.0;
/// Closed loops of the throughput phase by default.
const DEFAULT_CLIENTS: usize = 256;

/// What `scale` was asked to do.
#[derive(Debug, Clone)]
struct ScaleArgs {
    agents: usize,
    /// Jobs each phase runs.
    jobs: usize,
    /// Slots each simulated agent offers.
    slots: u32,
    /// The phases, in order: by default the throughput phase and the latency phase;
    /// `--clients` or `--rate` runs that one alone.
    loads: Vec<Load>,
    /// HTTP/2 connections the clients share.
    connections: usize,
    /// Plain `ws://` agents against an `--allow-insecure` coordinator instead of TLS.
    plain: bool,
    /// Let idle CPUs sleep as usual (see [`CpusAwake`]).
    cpu_idle: bool,
}

impl ScaleArgs {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut parsed = Self {
            agents: 1000,
            jobs: 20_000,
            slots: 2,
            loads: vec![
                Load::Closed {
                    clients: DEFAULT_CLIENTS,
                },
                Load::Open { rate: DEFAULT_RATE },
            ],
            connections: 16,
            plain: false,
            cpu_idle: false,
        };
        let mut clients = None;
        let mut rate = None;
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let mut value = || -> anyhow::Result<usize> {
                let text = args
                    .next()
                    .with_context(|| format!("{flag} needs a value"))?;
                text.parse()
                    .with_context(|| format!("{flag} {text}: not a number"))
            };
            match flag.as_str() {
                "--agents" => parsed.agents = value()?,
                "--jobs" => parsed.jobs = value()?,
                "--slots" => parsed.slots = u32::try_from(value()?)?,
                "--clients" => clients = Some(value()?.max(1)),
                "--connections" => parsed.connections = value()?.max(1),
                "--idle" => parsed.jobs = 0,
                "--plain" => parsed.plain = true,
                "--cpu-idle" => parsed.cpu_idle = true,
                "--rate" => {
                    let jobs_per_s = value()?;
                    if jobs_per_s == 0 {
                        bail!("--rate must be at least 1 job per second");
                    }
                    rate = Some(jobs_per_s as f64);
                }
                other => bail!(
                    "scale: unknown argument {other:?}; expected --agents N --jobs N [--slots N] \
                     [--clients N | --rate JOBS_PER_S] [--connections N] [--idle] [--plain] \
                     [--cpu-idle]"
                ),
            }
        }
        match (clients, rate) {
            (Some(_), Some(_)) => {
                bail!("scale: --clients runs the throughput phase alone, --rate the latency phase")
            }
            (Some(clients), None) => parsed.loads = vec![Load::Closed { clients }],
            (None, Some(rate)) => parsed.loads = vec![Load::Open { rate }],
            (None, None) => {}
        }
        Ok(parsed)
    }
}

/// Keeps idle CPUs polling instead of sleeping while it lives, as `cyclictest` does by
/// default: it holds `/dev/cpu_dma_latency` at 0 (the kernel's PM QoS; closing the file
/// lifts it).
///
/// Why: on a virtual machine a sleeping virtual CPU gives its host CPU back, and waking it
/// waits for the host. On the 2-core VM this was measured on, half the runs of the latency
/// phase met a stall of ~100 ms in which the coordinator's tick did not run and no CPU was
/// busy; with idle CPUs polling, none did (p99 5.1-5.8 ms against 8-688 ms, six runs
/// each). That is the host's wake-up, not the coordinator's work; `--cpu-idle` measures
/// with it.
struct CpusAwake {
    _latency: std::fs::File,
}

impl CpusAwake {
    fn hold() -> std::io::Result<Self> {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")?;
        file.write_all(&0i32.to_ne_bytes())?;
        Ok(Self { _latency: file })
    }
}

/// Handshakes in flight at once: the coordinator evicts the oldest beyond 64 pending.
const CONCURRENT_CONNECTS: usize = 32;

/// The coordinator's memory and CPU, from `/proc`.
#[derive(Debug, Clone, Copy)]
struct ProcessUsage {
    rss_kb: u64,
    peak_rss_kb: u64,
    cpu: Duration,
}

impl ProcessUsage {
    fn read(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .with_context(|| format!("{name} in /proc/{pid}/status"))?;
            Ok(line.trim().trim_end_matches("kB").trim().parse()?)
        };
        // Fields after the command name: state is field 3, then utime, stime and the
        // waited-for children's cutime and cstime are fields 14 to 17. Children count:
        // the coordinator's git calls are part of its cost.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("stat")?
            .1
            .split_whitespace()
            .collect();
        let mut ticks = 0;
        for index in 11..=14 {
            ticks += fields.get(index).context("CPU times")?.parse::<u64>()?;
        }
        Ok(Self {
            rss_kb: field("VmRSS:")?,
            peak_rss_kb: field("VmHWM:")?,
            cpu: Duration::from_millis(ticks * 1000 / clock_ticks_per_second()),
        })
    }

    fn rss_mb(kb: u64) -> f64 {
        kb as f64 / 1024.0
    }
}

/// The kernel's clock ticks per second, as `getconf` reports it (100 nearly everywhere).
fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// Raises this process's open-file limit to its hard limit; the coordinator, spawned
/// afterwards, inherits it. Returns the limit now in force.
fn raise_file_limit() -> anyhow::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit)?;
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// What every simulated agent shares with the measurement.
#[derive(Debug, Default)]
struct AgentBoard {
    /// When an agent read each job's first assignment.
    assigned_at: Mutex<HashMap<JobId, Instant>>,
    welcomed: AtomicUsize,
    results_sent: AtomicU64,
    acks_received: AtomicU64,
    /// Connections that failed or ended before the bench stopped them.
    lost: AtomicUsize,
}

/// How the simulated agents reach the coordinator.
#[derive(Debug, Clone)]
struct BusTarget {
    url: ServerUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: String,
    slots: u32,
}

/// One simulated agent: connect (taking a place among the concurrent handshakes), hello,
/// welcome, then answer every assignment at once until the connection ends.
async fn simulated_agent(
    index: usize,
    target: Arc<BusTarget>,
    board: Arc<AgentBoard>,
    connects: Arc<Semaphore>,
) -> anyhow::Result<()> {
    let offer = SlotOffer {
        free: target.slots,
        total: target.slots,
        draining: false,
    };
    let (outbox, mut inbox, heartbeat_interval) = {
        let _place = connects.acquire().await?;
        let mut socket = AgentSocket::connect(&target.url, target.tls.as_ref()).await?;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: format!("sim-{index}"),
            token: target.token.clone(),
            labels: Vec::new(),
            system: "x86_64-linux".to_owned(),
            slots: offer,
            agent_version: "bench".to_owned(),
            attempts: Vec::new(),
            sandboxed: true,
            disk: DiskUsage::default(),
            identity: format!("sim-{index}-key"),
        };
        socket.send(AgentMessage::Hello(hello)).await?;
        let welcome = match socket.recv_within(HANDSHAKE_TIMEOUT).await? {
            Some(CoordinatorMessage::Welcome(welcome)) => welcome,
            other => bail!("agent {index}: expected a welcome, got {other:?}"),
        };
        let (outbox, inbox) = socket.start(64);
        (outbox, inbox, welcome.heartbeat_interval)
    };
    board.welcomed.fetch_add(1, Ordering::Relaxed);
    let mut heartbeat = tokio::time::interval(heartbeat_interval);
    loop {
        let message = tokio::select! {
            _ = heartbeat.tick() => {
                let _ = outbox.try_send(AgentMessage::Heartbeat { sent_at_unix_ms: 0 });
                continue;
            }
            message = inbox.recv() => message?,
        };
        let replies = match message {
            None => return Ok(()),
            Some(CoordinatorMessage::Assign(assignment)) => {
                let key = assignment.key;
                board
                    .assigned_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(key.job_id)
                    .or_insert_with(Instant::now);
                let completion = Completion::new(JobEnd::Exited { code: 0 });
                board.results_sent.fetch_add(1, Ordering::Relaxed);
                vec![
                    AgentMessage::Output {
                        key,
                        stream: OutputStream::Stdout,
                        data: bytes::Bytes::from_static(b"ok\n"),
                    },
                    AgentMessage::Finished { key, completion },
                    // The job ended, so the whole offer is free again.
                    AgentMessage::Slots(offer),
                ]
            }
            Some(CoordinatorMessage::ResultAck(_)) => {
                board.acks_received.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Some(CoordinatorMessage::Cancel(key)) => vec![AgentMessage::CancelAck(key)],
            Some(_) => continue,
        };
        for reply in replies {
            outbox
                .send(reply)
                .await
                .map_err(|error| anyhow::anyhow!("agent {index}: {error}"))?;
        }
    }
}

/// One client: takes the next job number until all are taken; submits it, follows its
/// events to the end. Returns when each of its jobs was submitted.
async fn client_loop(
    client: Client,
    refs: Arc<Vec<String>>,
    commit: Arc<str>,
    next: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
) -> Vec<(JobId, Instant)> {
    let mut submitted = Vec::new();
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        let Some(git_ref) = refs.get(index) else {
            return submitted;
        };
        let started = Instant::now();
        if let Some(job_id) = run_job(&client, &commit, git_ref, index, &failures).await {
            submitted.push((job_id, started));
        }
    }
}

/// Submits job `index` and follows it to its end; its id if it succeeded, else the failure
/// is counted (and the first few are shown).
async fn run_job(
    client: &Client,
    commit: &str,
    git_ref: &str,
    index: usize,
    failures: &AtomicUsize,
) -> Option<JobId> {
    let submission = Submission {
        spec: JobSpec::new(JobKind::Check),
        commit: commit.to_owned(),
        git_ref: git_ref.to_owned(),
        worktree: "bench".to_owned(),
        base_commit: String::new(),
    };
    match follow_job(client, submission).await {
        Ok(job_id) => Some(job_id),
        Err(error) => {
            if failures.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("job {index} failed: {error:#}");
            }
            None
        }
    }
}

/// Jobs in flight at most in the open loop: beyond it the offered rate is not kept (and the
/// summary says so) rather than memory growing without bound.
const MAX_OPEN_LOOP_IN_FLIGHT: usize = 4096;

/// The open loop: job `i` is due at `i / rate` seconds and submitted then, on its own task,
/// whatever the jobs before it are doing. Its latency counts from when it was due, so a
/// submission this process could not make in time (the in-flight cap reached, or a stall
/// here) counts against the coordinator rather than vanishing from the figures. Returns the
/// jobs that succeeded with the times they were due, and the latest any submission was
/// made past its time.
async fn open_loop(
    clients: Vec<Client>,
    refs: Arc<Vec<String>>,
    commit: Arc<str>,
    rate: f64,
    failures: Arc<AtomicUsize>,
) -> anyhow::Result<(Vec<(JobId, Instant)>, Duration)> {
    let in_flight = Arc::new(Semaphore::new(MAX_OPEN_LOOP_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    let mut behind = Duration::ZERO;
    for (index, git_ref) in refs.iter().enumerate() {
        let due = start + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(due).await;
        let place = Arc::clone(&in_flight).acquire_owned().await?;
        behind = behind.max(tokio::time::Instant::now().saturating_duration_since(due));
        let client = clients[index % clients.len()].clone();
        let (commit, git_ref) = (Arc::clone(&commit), git_ref.clone());
        let failures = Arc::clone(&failures);
        tasks.spawn(async move {
            let _place = place;
            let job_id = run_job(&client, &commit, &git_ref, index, &failures).await?;
            Some((job_id, due.into_std()))
        });
    }
    let mut submitted = Vec::new();
    while let Some(done) = tasks.join_next().await {
        submitted.extend(done?);
    }
    Ok((submitted, behind))
}

/// Submits one job and reads its events until it finished; its id if it succeeded.
async fn follow_job(client: &Client, submission: Submission) -> anyhow::Result<JobId> {
    let mut events = client.submit(submission).await?;
    let mut output = false;
    while let Some((job_id, event)) = events.next().await? {
        match event {
            JobEvent::Output { .. } => output = true,
            JobEvent::Finished(result) => {
                if result.completion.end != (JobEnd::Exited { code: 0 }) || !output {
                    bail!("job {job_id} ended {result:?} (output seen: {output})");
                }
                return Ok(job_id);
            }
            JobEvent::Queued { .. } | JobEvent::Assigned { .. } => {}
        }
    }
    bail!("the event stream ended before the job did")
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Makes one snapshot ref per job on the fixture's HEAD, in one git call.
fn make_snapshot_refs(fixture: &Fixture, count: usize) -> anyhow::Result<(String, Vec<String>)> {
    let commit = fixture.git(&["rev-parse", "HEAD"])?;
    let millis = buildpool_core::time::unix_millis();
    let refs: Vec<String> = (0..count)
        .map(|index| format!("refs/buildpool/snapshots/{millis}-{index:08x}"))
        .collect();
    let script: String = refs
        .iter()
        .map(|name| format!("create {name} {commit}\n"))
        .collect();
    crate::git_with_input(&fixture.root(), &["update-ref", "--stdin"], &script)?;
    Ok((commit, refs))
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let args = ScaleArgs::parse(args)?;
    let _awake = if args.cpu_idle {
        println!("idle CPUs sleep as usual (--cpu-idle): their wake-up is in the figures");
        None
    } else {
        match CpusAwake::hold() {
            Ok(awake) => {
                println!(
                    "idle CPUs poll instead of sleeping during the run (/dev/cpu_dma_latency \
                     held at 0, as cyclictest does; --cpu-idle to measure with sleeping CPUs)"
                );
                Some(awake)
            }
            Err(error) => {
                println!(
                    "idle CPUs sleep as usual: cannot hold /dev/cpu_dma_latency at 0 ({error}); \
                     their wake-up is in the figures"
                );
                None
            }
        }
    };
    let file_limit = raise_file_limit()?;
    println!(
        "open-file limit raised to {file_limit} (soft = hard) for this process and the coordinator"
    );
    let mut extra_args = vec!["--no-local-fallback".to_owned()];
    if args.plain {
        extra_args.push("--allow-insecure".to_owned());
    }
    let options = ServeOptions {
        extra_args,
        ..ServeOptions::default()
    };
    let cluster = Cluster::start_with(Fixture::new()?, 0, 1, &options)?;
    let fixture = &cluster.fixture;
    let pid = cluster.coordinator.pid();
    let prepared = Instant::now();
    let (commit, refs) = make_snapshot_refs(fixture, args.jobs * args.loads.len())?;
    println!(
        "{} snapshot refs made in {:.1} s",
        refs.len(),
        prepared.elapsed().as_secs_f64()
    );
    let token = std::fs::read_to_string(fixture.token_file())?
        .trim()
        .to_owned();
    let discovery: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixture.root().join(".git/buildpool/coordinator.json"),
    )?)?;
    let control_url = discovery["control_url"]
        .as_str()
        .context("control_url")?
        .to_owned();
    let scheme = if args.plain { "ws" } else { "wss" };
    let target = Arc::new(BusTarget {
        url: ServerUrl::parse(&format!("{scheme}://{}/ws", cluster.websocket_addr))?,
        tls: if args.plain {
            None
        } else {
            let trust = ServerTrust::Pinned(cluster.tls_fingerprint.parse()?);
            Some(tls::client_config(&trust, None, &[])?)
        },
        token: token.clone(),
        slots: args.slots,
    });

    let runtime = tokio::runtime::Runtime::new()?;
    let board = Arc::new(AgentBoard::default());
    let before_connect = ProcessUsage::read(pid)?;
    let connect_started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    let connects = Arc::new(Semaphore::new(CONCURRENT_CONNECTS));
    {
        let _runtime = runtime.enter();
        for index in 0..args.agents {
            let (target, board, connects) = (
                Arc::clone(&target),
                Arc::clone(&board),
                Arc::clone(&connects),
            );
            agents.spawn(async move {
                let served = simulated_agent(index, target, Arc::clone(&board), connects).await;
                if let Err(error) = served {
                    let lost_before = board.lost.fetch_add(1, Ordering::Relaxed);
                    if lost_before < 5 {
                        eprintln!("simulated agent {index}: {error:#}");
                    }
                }
            });
        }
    }
    let all_welcomed = wait_until(Duration::from_secs(600), || {
        board.welcomed.load(Ordering::Relaxed) + board.lost.load(Ordering::Relaxed) >= args.agents
    });
    let connect_time = connect_started.elapsed();
    let welcomed = board.welcomed.load(Ordering::Relaxed);
    if !all_welcomed || welcomed < args.agents {
        bail!(
            "only {welcomed} of {} agents connected ({} lost)",
            args.agents,
            board.lost.load(Ordering::Relaxed)
        );
    }
    // Let registration and the first offers settle before measuring the idle coordinator.
    std::thread::sleep(Duration::from_secs(2));
    let connected = ProcessUsage::read(pid)?;
    println!(
        "{} agents ({} slots each, {}) connected in {:.1} s; coordinator RSS {:.0} MB \
         (peak {:.0} MB), CPU for the connections {:.2} s",
        args.agents,
        args.slots,
        if args.plain { "plain ws" } else { "TLS" },
        connect_time.as_secs_f64(),
        ProcessUsage::rss_mb(connected.rss_kb),
        ProcessUsage::rss_mb(connected.peak_rss_kb),
        (connected.cpu - before_connect.cpu).as_secs_f64()
    );

    let mut phases = Vec::new();
    if args.jobs > 0 {
        let clients = runtime.block_on(async {
            let mut clients = Vec::new();
            for _ in 0..args.connections {
                clients.push(Client::connect(&control_url, &token, None).await?);
            }
            anyhow::Ok(clients)
        })?;
        let commit: Arc<str> = Arc::from(commit);
        let mut refs = refs.into_iter();
        for load in &args.loads {
            let phase = Phase {
                load: *load,
                clients: &clients,
                refs: Arc::new(refs.by_ref().take(args.jobs).collect()),
                commit: Arc::clone(&commit),
                board: &board,
                coordinator: pid,
            };
            phases.push((*load, runtime.block_on(phase.run())?));
        }
    }
    let lost = board.lost.load(Ordering::Relaxed);
    if lost > 0 {
        println!("agent connections lost during the run: {lost}");
    }
    let end = ProcessUsage::read(pid)?;
    agents.abort_all();
    drop(runtime);
    // Throughput (and its CPU) from the closed loop, latency from the open one; with one
    // phase, both from it.
    let throughput = phases
        .iter()
        .find(|(load, _)| matches!(load, Load::Closed { .. }))
        .or(phases.first())
        .map(|(_, outcome)| outcome);
    let latency = phases
        .iter()
        .find(|(load, _)| matches!(load, Load::Open { .. }))
        .or(phases.first())
        .map(|(_, outcome)| outcome);
    let cpu = throughput.map_or(connected.cpu - before_connect.cpu, |outcome| outcome.cpu);
    println!(
        "scale: agents={} jobs={} jobs_per_s={:.0} p50_assign_ms={:.2} p99_assign_ms={:.2} \
         rss_mb={:.0} cpu_s={:.2}",
        args.agents,
        args.jobs,
        throughput.map_or(0.0, |outcome| outcome.jobs_per_s),
        super::ms(latency.map_or(Duration::ZERO, |outcome| outcome.p50)),
        super::ms(latency.map_or(Duration::ZERO, |outcome| outcome.p99)),
        ProcessUsage::rss_mb(end.peak_rss_kb),
        cpu.as_secs_f64()
    );
    Ok(())
}

/// One phase: its jobs (one snapshot ref each) under one load.
struct Phase<'a> {
    load: Load,
    clients: &'a [Client],
    refs: Arc<Vec<String>>,
    commit: Arc<str>,
    board: &'a AgentBoard,
    coordinator: u32,
}

/// What a phase measured.
struct PhaseOutcome {
    jobs_per_s: f64,
    p50: Duration,
    p99: Duration,
    /// The coordinator's CPU during the phase.
    cpu: Duration,
}

impl Phase<'_> {
    /// Runs the phase's jobs and prints what it measured.
    async fn run(self) -> anyhow::Result<PhaseOutcome> {
        let board = self.board;
        let before = ProcessUsage::read(self.coordinator)?;
        let (sent_before, acked_before) = (
            board.results_sent.load(Ordering::Relaxed),
            board.acks_received.load(Ordering::Relaxed),
        );
        let failures = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut behind = Duration::ZERO;
        let submitted = match self.load {
            Load::Open { rate } => {
                let (submitted, late) = open_loop(
                    self.clients.to_vec(),
                    Arc::clone(&self.refs),
                    Arc::clone(&self.commit),
                    rate,
                    Arc::clone(&failures),
                )
                .await?;
                behind = late;
                submitted
            }
            Load::Closed { clients } => {
                let next = Arc::new(AtomicUsize::new(0));
                let mut tasks = tokio::task::JoinSet::new();
                for index in 0..clients {
                    tasks.spawn(client_loop(
                        self.clients[index % self.clients.len()].clone(),
                        Arc::clone(&self.refs),
                        Arc::clone(&self.commit),
                        Arc::clone(&next),
                        Arc::clone(&failures),
                    ));
                }
                let mut submitted = Vec::new();
                while let Some(done) = tasks.join_next().await {
                    submitted.extend(done?);
                }
                submitted
            }
        };
        let elapsed = started.elapsed();
        let after = ProcessUsage::read(self.coordinator)?;
        let failed = failures.load(Ordering::Relaxed);
        let sent = board.results_sent.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while board.acks_received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let acked = board.acks_received.load(Ordering::Relaxed);
        let mut latencies: Vec<Duration> = {
            let assigned_at = board
                .assigned_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            submitted
                .iter()
                .filter_map(|(job_id, submitted)| {
                    Some(
                        assigned_at
                            .get(job_id)?
                            .saturating_duration_since(*submitted),
                    )
                })
                .collect()
        };
        latencies.sort_unstable();
        let load = match self.load {
            Load::Open { rate } => format!(
                "latency phase: offered at {rate:.0} jobs/s (submitted at most {:.1} ms past \
                 their time)",
                super::ms(behind)
            ),
            Load::Closed { clients } => format!("throughput phase: {clients} closed loops"),
        };
        println!(
            "{load}: {} jobs succeeded, {failed} failed, in {:.2} s ({:.0} jobs/s) over {} \
             HTTP/2 connections; results acknowledged: {} of {}{}",
            submitted.len(),
            elapsed.as_secs_f64(),
            submitted.len() as f64 / elapsed.as_secs_f64(),
            self.clients.len(),
            acked - acked_before,
            sent - sent_before,
            if acked >= sent { "" } else { " (missing acks)" }
        );
        println!(
            "  submit -> assign: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
            super::ms(percentile(&latencies, 0.5)),
            super::ms(percentile(&latencies, 0.9)),
            super::ms(percentile(&latencies, 0.99)),
            super::ms(latencies.last().copied().unwrap_or_default()),
            latencies.len()
        );
        let cpu = after.cpu - before.cpu;
        println!(
            "  coordinator: CPU {:.2} s with its git calls ({:.0} µs per job), RSS {:.0} MB now, \
             peak {:.0} MB",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / submitted.len().max(1) as f64,
            ProcessUsage::rss_mb(after.rss_kb),
            ProcessUsage::rss_mb(after.peak_rss_kb)
        );
        Ok(PhaseOutcome {
            jobs_per_s: submitted.len() as f64 / elapsed.as_secs_f64(),
            p50: percentile(&latencies, 0.5),
            p99: percentile(&latencies, 0.99),
            cpu,
        })
    }
}
