//! `soak`: real jobs under chaos. One `buildpool serve`, K real build agents each behind a
//! TCP proxy of its own, N jobs (the fixture's `sleeps_briefly`) submitted by concurrent
//! `buildpool run` clients, while at random moments the coordinator is killed with
//! `kill -9` and restarted, an agent is killed with `kill -9` and restarted, an agent's
//! link is cut (silenced, like a half-open connection) or an agent is frozen with SIGSTOP
//! for longer than the heartbeat timeout, then thawed.
//!
//! Figures: jobs submitted and completed, jobs lost (a client without a successful result:
//! must be 0), duplicated results (a client that printed more than one: must be 0), reruns
//! (starts the fixture recorded beyond one per job), the longest time a client waited past
//! its job's end, and the time from each coordinator restart until each waiting client
//! streams again (from the clients' "reconnected" lines).
//!
//! `--chaos coordinator,agent,cut,stop` picks the kinds (round robin, in that order),
//! `--max-chaos M` bounds the events; the tests run a short bounded soak this way.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use buildpool_tests::{Cluster, Fixture, Owned, Proxy, SIGCONT, SIGSTOP, ServeOptions, wait_until};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chaos {
    Coordinator,
    Agent,
    Cut,
    Stop,
}

#[derive(Debug)]
struct SoakArgs {
    agents: usize,
    jobs: usize,
    clients: usize,
    /// Seconds each job sleeps.
    sleep: u64,
    /// Mean seconds between two chaos events.
    every: f64,
    chaos: Vec<Chaos>,
    max_chaos: usize,
}

impl SoakArgs {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut parsed = Self {
            agents: 3,
            jobs: 24,
            clients: 4,
            sleep: 3,
            every: 6.0,
            chaos: vec![Chaos::Coordinator, Chaos::Agent, Chaos::Cut, Chaos::Stop],
            max_chaos: usize::MAX,
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--agents" => parsed.agents = value.parse()?,
                "--jobs" => parsed.jobs = value.parse()?,
                "--clients" => parsed.clients = value.parse()?,
                "--sleep" => parsed.sleep = value.parse()?,
                "--every" => parsed.every = value.parse()?,
                "--max-chaos" => parsed.max_chaos = value.parse()?,
                "--chaos" => {
                    parsed.chaos = value
                        .split(',')
                        .map(|kind| match kind {
                            "coordinator" => Ok(Chaos::Coordinator),
                            "agent" => Ok(Chaos::Agent),
                            "cut" => Ok(Chaos::Cut),
                            "stop" => Ok(Chaos::Stop),
                            other => bail!("unknown chaos {other:?}"),
                        })
                        .collect::<anyhow::Result<_>>()?;
                }
                other => bail!(
                    "unknown flag {other}; soak [--agents K] [--jobs N] [--clients C] [--sleep S] \
                     [--every SECS] [--chaos coordinator,agent,cut,stop] [--max-chaos M]"
                ),
            }
        }
        if parsed.agents == 0 || parsed.clients == 0 || parsed.chaos.is_empty() {
            bail!("soak needs at least one agent, one client and one kind of chaos");
        }
        Ok(parsed)
    }
}

/// Heartbeats that find a frozen or cut link in seconds, a reattach grace that outlasts a
/// coordinator restart, and enough lost attempts allowed that chaos alone fails no job.
fn options() -> ServeOptions {
    ServeOptions {
        config: Some(
            "[build_pool.timeouts]\nheartbeat_interval_secs = 1\nheartbeat_timeout_secs = 3\n\
             reattach_grace_secs = 20\nmax_lost_attempts = 10\n"
                .to_owned(),
        ),
        ..ServeOptions::unsandboxed()
    }
}

/// One build agent behind its own proxy, so its link can be cut alone.
struct SoakAgent {
    id: String,
    proxy: Proxy,
    process: Owned,
}

fn spawn_agent(
    cluster: &Cluster,
    id: &str,
    proxy: &Proxy,
    generation: usize,
) -> anyhow::Result<Owned> {
    let command = cluster.agent_command(id, 1, &["--server", &proxy.bus_url()]);
    Owned::spawn(
        command,
        cluster
            .fixture
            .scratch()
            .join(format!("{id}-{generation}.log")),
    )
}

/// What a client needs to start `buildpool run`, copied out of the fixture so the clients'
/// threads need no borrow of the cluster the chaos thread changes.
#[derive(Clone)]
struct RunCommand {
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, Option<String>)>,
    logs: PathBuf,
}

impl RunCommand {
    fn new(fixture: &Fixture) -> Self {
        let args = Fixture::ignored_test_job("sleeps_briefly", &[]);
        let mut args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        args.push("--nocapture".to_owned());
        let template = fixture.command_in(&fixture.root(), &[]);
        let mut all: Vec<String> = template
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        all.extend(args);
        Self {
            program: PathBuf::from(template.get_program()),
            args: all,
            envs: template
                .get_envs()
                .map(|(name, value)| {
                    (
                        name.to_string_lossy().into_owned(),
                        value.map(|v| v.to_string_lossy().into_owned()),
                    )
                })
                .collect(),
            logs: fixture.scratch(),
        }
    }

    fn spawn(&self, index: usize) -> anyhow::Result<Owned> {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (name, value) in &self.envs {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        Owned::spawn(command, self.logs.join(format!("client-{index}.log")))
    }
}

/// What one client saw of its job.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    results: usize,
    /// Client exit minus the job's end (its last `fixture-end-unix-ms`).
    waited_past_end: Option<Duration>,
    /// Wall-clock times (unix ms) of its "reconnected" lines.
    resumed_at: Vec<u64>,
    log: String,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Unix milliseconds of a tracing line's leading `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC).
fn line_time(line: &str) -> Option<u64> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.split('-').map(str::parse::<i64>);
    let (y, m, d) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let mut clock = time.split(':');
    let (h, min) = (
        clock.next()?.parse::<i64>().ok()?,
        clock.next()?.parse::<i64>().ok()?,
    );
    let secs: f64 = clock.next()?.parse().ok()?;
    // Days since the epoch of a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = (days * 86_400 + h * 3600 + min * 60) * 1000 + (secs * 1000.0) as i64;
    u64::try_from(ms).ok()
}

fn outcome(mut run: Owned, exited_at: SystemTime, code: Option<i32>) -> Outcome {
    let log = run.log_text();
    let _ = run.wait_timeout(Duration::ZERO);
    let end = log
        .lines()
        .filter_map(|line| line.trim().strip_prefix("fixture-end-unix-ms "))
        .filter_map(|ms| ms.trim().parse::<u64>().ok())
        .max();
    let exit = unix_ms(exited_at);
    Outcome {
        code,
        results: log
            .lines()
            .filter(|line| line.starts_with("[buildpool] job ") && line.contains(" exit code "))
            .count(),
        waited_past_end: end.map(|end| Duration::from_millis(exit.saturating_sub(end))),
        resumed_at: log
            .lines()
            .filter(|line| line.contains("reconnected; following job"))
            .filter_map(line_time)
            .collect(),
        log,
    }
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let args = SoakArgs::parse(args)?;
    let mut cluster = Cluster::start_with(Fixture::new()?, 0, 1, &options())?;
    std::fs::write(cluster.fixture.sleep_file(), args.sleep.to_string())?;
    let mut agents = Vec::new();
    for index in 0..args.agents {
        let id = format!("soak-{}", index + 1);
        let proxy = Proxy::start(&cluster.websocket_addr)?;
        let process = spawn_agent(&cluster, &id, &proxy, 0)?;
        agents.push(SoakAgent { id, proxy, process });
    }
    let wanted: Vec<String> = agents.iter().map(|agent| agent.id.clone()).collect();
    if !wait_until(Duration::from_secs(30), || {
        let mut ids = cluster.agent_ids();
        ids.sort();
        ids == wanted
    }) {
        bail!("the agents did not connect: {:?}", cluster.agent_ids());
    }

    let runner = RunCommand::new(&cluster.fixture);
    let next_job = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::new());
    let clients_left = AtomicUsize::new(args.clients);
    let mut restarts: Vec<u64> = Vec::new();
    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        for _ in 0..args.clients {
            scope.spawn(|| {
                loop {
                    let index = next_job.fetch_add(1, Ordering::SeqCst);
                    if index >= args.jobs {
                        break;
                    }
                    let outcome = match runner.spawn(index) {
                        Ok(mut run) => {
                            let status = run.wait_timeout(Duration::from_secs(900));
                            outcome(run, SystemTime::now(), status.and_then(|s| s.code()))
                        }
                        Err(error) => Outcome {
                            code: None,
                            results: 0,
                            waited_past_end: None,
                            resumed_at: Vec::new(),
                            log: format!("cannot start the client: {error}"),
                        },
                    };
                    outcomes
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(outcome);
                }
                clients_left.fetch_sub(1, Ordering::SeqCst);
            });
        }
        // Chaos once jobs run, until every client is done or the events are used up.
        let fixture_starts = || cluster.fixture.starts();
        wait_until(Duration::from_secs(120), || fixture_starts() > 0);
        let mut events = 0;
        while clients_left.load(Ordering::SeqCst) > 0 && events < args.max_chaos {
            let pause = Duration::from_secs_f64(args.every * (0.5 + fastrand::f64()));
            let deadline = Instant::now() + pause;
            while Instant::now() < deadline && clients_left.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            if clients_left.load(Ordering::SeqCst) == 0 {
                break;
            }
            let kind = args.chaos[events % args.chaos.len()];
            events += 1;
            let target = fastrand::usize(..agents.len());
            match kind {
                Chaos::Coordinator => {
                    cluster.coordinator.kill_hard();
                    std::thread::sleep(Duration::from_millis(500 + fastrand::u64(..1000)));
                    restarts.push(unix_ms(SystemTime::now()));
                    cluster.restart_coordinator(&options())?;
                    *counts.entry("coordinator kills").or_default() += 1;
                }
                Chaos::Agent => {
                    let agent = &mut agents[target];
                    agent.process.kill_hard();
                    std::thread::sleep(Duration::from_millis(200 + fastrand::u64(..800)));
                    let generation = counts.get("agent kills").copied().unwrap_or(0) + 1;
                    agent.process = spawn_agent(&cluster, &agent.id, &agent.proxy, generation)?;
                    *counts.entry("agent kills").or_default() += 1;
                }
                Chaos::Cut => {
                    agents[target].proxy.cut();
                    *counts.entry("link cuts").or_default() += 1;
                }
                Chaos::Stop => {
                    let agent = &agents[target].process;
                    agent.signal(SIGSTOP);
                    std::thread::sleep(Duration::from_secs(5));
                    agent.signal(SIGCONT);
                    *counts.entry("agent stops").or_default() += 1;
                }
            }
        }
        Ok(())
    })?;
    let elapsed = started.elapsed();

    let outcomes = outcomes
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let completed = outcomes
        .iter()
        .filter(|o| o.code == Some(0) && o.results == 1)
        .count();
    let duplicated = outcomes.iter().filter(|o| o.results > 1).count();
    for lost in outcomes
        .iter()
        .filter(|o| o.code != Some(0) || o.results != 1)
    {
        let tail: Vec<&str> = lost.log.lines().rev().take(15).collect();
        eprintln!(
            "soak: a client ended with {:?} and {} result(s); its log ends:",
            lost.code, lost.results
        );
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
    }
    let starts = cluster.fixture.starts();
    let max_wait = outcomes
        .iter()
        .filter_map(|o| o.waited_past_end)
        .max()
        .unwrap_or_default();
    // Each "reconnected" line belongs to the last restart before it.
    let mut resumes: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.resumed_at.iter().copied())
        .filter_map(|at| {
            restarts
                .iter()
                .rev()
                .find(|restart| **restart <= at)
                .map(|restart| at - restart)
        })
        .collect();
    resumes.sort_unstable();
    let chaos: Vec<String> = [
        "coordinator kills",
        "agent kills",
        "link cuts",
        "agent stops",
    ]
    .iter()
    .map(|name| format!("{name} {}", counts.get(name).copied().unwrap_or(0)))
    .collect();
    println!(
        "soak: agents={} clients={} jobs={} in {:.0} s; chaos: {}",
        args.agents,
        args.clients,
        args.jobs,
        elapsed.as_secs_f64(),
        chaos.join(", ")
    );
    println!(
        "soak: submitted={} completed={completed} lost={} duplicated={duplicated} reruns={} \
         max_wait_past_end_ms={}",
        outcomes.len(),
        outcomes.len() - completed,
        starts.saturating_sub(outcomes.len()),
        max_wait.as_millis()
    );
    if !resumes.is_empty() {
        println!(
            "soak: restart to streaming again: median {} ms, max {} ms (n={})",
            resumes[resumes.len() / 2],
            resumes[resumes.len() - 1],
            resumes.len()
        );
    }
    Ok(())
}
