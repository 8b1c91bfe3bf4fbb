//! `buildpool run test --spread N|auto`: the parts of [`crate::spread`] as jobs on one
//! snapshot, followed at once; their output streams with each line's agent named, and
//! their reports add up to one `test result:` line, the last line on stdout.

use std::io::Write;
use std::str::FromStr;

use buildpool_core::job::EXIT_FAILED;
use buildpool_core::{JobEnd, JobEvent, JobSpec, OutputStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::run::{Stops, say};
use crate::mcp::report::ReportBuilder;
use crate::session::{JobClient, JobSession, SessionError};
use crate::spread::{Part, Tally};

/// How many slices `--spread` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    Slices(u32),
    /// One slice per idle agent.
    EveryIdleAgent,
}

impl FromStr for Spread {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Spread::EveryIdleAgent),
            number => match number.parse::<u32>() {
                Ok(count @ 1..=256) => Ok(Spread::Slices(count)),
                _ => Err(format!(
                    "--spread takes a number of slices from 1 to 256, or auto, not {number:?}"
                )),
            },
        }
    }
}

impl Spread {
    /// The number of slices: as asked, or the agents with no job right now (at least one).
    pub async fn slices(self, jobs: &JobClient, force_local: bool) -> anyhow::Result<u32> {
        match self {
            Spread::Slices(count) => Ok(count),
            Spread::EveryIdleAgent => {
                let status = jobs.route(force_local).await?.client.status().await?;
                let idle = status
                    .agents
                    .iter()
                    .filter(|agent| !agent.local && !agent.draining && agent.slots_used == 0)
                    .count();
                Ok(u32::try_from(idle).unwrap_or(u32::MAX).clamp(1, 256))
            }
        }
    }
}

/// How a spread run ended.
#[derive(Debug)]
pub enum SpreadEnd {
    /// The exit code `cargo test` would have given.
    Exited(u8),
    /// This agent has no cargo-nextest: the run is to go to one agent as `cargo test`.
    NoNextest { agent: String },
}

/// What one part's follower hands the run: an event, or how following it failed.
type PartEvent = (usize, Result<JobEvent, SessionError>);

/// One part as the run sees it.
struct Following {
    part: Part,
    agent: String,
    report: ReportBuilder,
    /// Each stream's unfinished line, written when its end comes.
    held: [Vec<u8>; 2],
    done: bool,
}

impl Following {
    /// Writes `data`'s whole lines to our stderr, each behind its agent's name: parts run
    /// at once, and a line must say where it ran.
    fn forward(&mut self, stream: OutputStream, data: &[u8]) {
        let held = &mut self.held[usize::from(stream == OutputStream::Stderr)];
        held.extend_from_slice(data);
        let Some(end) = held.iter().rposition(|byte| *byte == b'\n') else {
            return;
        };
        let rest = held.split_off(end + 1);
        let lines = std::mem::replace(held, rest);
        let mut err = std::io::stderr().lock();
        for line in lines.split_inclusive(|byte| *byte == b'\n') {
            let _ = write!(err, "[{}] ", self.agent);
            let _ = err.write_all(line);
        }
        let _ = err.flush();
    }

    /// Writes what is held of an unfinished last line: the part ended.
    fn finish(&mut self) {
        for stream in [OutputStream::Stdout, OutputStream::Stderr] {
            let held = &self.held[usize::from(stream == OutputStream::Stderr)];
            if !held.is_empty() && !held.ends_with(b"\n") {
                self.forward(stream, b"\n");
            }
        }
    }

    /// Whether this part's stream of `stream` is program output to show: a slice's stdout
    /// is nextest's JSON events, read for the tally and not shown.
    fn shows(&self, stream: OutputStream) -> bool {
        !(matches!(self.part, Part::Slice { .. }) && stream == OutputStream::Stdout)
    }
}

/// Follows one job until its end or its consumer goes; cancels it when `cancel` fires.
async fn follow(
    index: usize,
    mut session: JobSession,
    events: mpsc::Sender<PartEvent>,
    cancel: CancellationToken,
) {
    let mut cancelled = false;
    loop {
        let event = tokio::select! {
            event = session.next_event() => event,
            () = cancel.cancelled(), if !cancelled => {
                cancelled = true;
                session.cancel();
                continue;
            }
        };
        let last = !matches!(event, Ok(ref event) if !matches!(event, JobEvent::Finished(_)));
        if events.send((index, event)).await.is_err() {
            session.cancel();
            session.cancel_delivered().await;
            return;
        }
        if last {
            return;
        }
    }
}

/// Runs `test` (a `cargo test` job's spec) as `slices` slices and its doctests.
pub async fn run(
    jobs: &JobClient,
    test: &JobSpec,
    slices: u32,
    force_local: bool,
    notes: bool,
    interrupts: &mut Stops,
) -> anyhow::Result<SpreadEnd> {
    let parts = crate::spread::parts(slices, &test.cargo_args);
    let specs = parts.iter().map(|part| part.spec(test)).collect();
    let sessions = jobs.start_all(specs, force_local).await?;
    if let Some(note) = sessions.first().and_then(JobSession::snapshot_note) {
        say(notes, format_args!("{note}"));
    }
    let cancel = CancellationToken::new();
    let (sender, mut events) = mpsc::channel::<PartEvent>(64);
    let mut following: Vec<Following> = Vec::with_capacity(parts.len());
    for (index, (session, part)) in sessions.into_iter().zip(parts).enumerate() {
        following.push(Following {
            part,
            agent: part.to_string(),
            report: ReportBuilder::new(),
            held: [Vec::new(), Vec::new()],
            done: false,
        });
        tokio::spawn(follow(index, session, sender.clone(), cancel.clone()));
    }
    drop(sender);

    let mut tally = Tally::default();
    let mut no_nextest = None;
    let mut interrupted = false;
    loop {
        let (index, event) = tokio::select! {
            next = events.recv() => match next {
                Some(next) => next,
                None => break,
            },
            () = interrupts.next() => {
                if interrupted {
                    say(notes, format_args!("interrupted again; leaving without waiting for the parts' ends"));
                    return Ok(SpreadEnd::Exited(buildpool_core::job::EXIT_CANCELLED));
                }
                interrupted = true;
                say(notes, format_args!("cancelling every part (Ctrl-C again to leave at once)"));
                cancel.cancel();
                continue;
            }
        };
        let part = &mut following[index];
        match event {
            Ok(JobEvent::Assigned { agent_id, .. }) => {
                say(notes, format_args!("{} running on {agent_id}", part.part));
                part.agent = agent_id;
            }
            Ok(JobEvent::Queued { .. }) => {}
            Ok(JobEvent::Output { stream, data, .. }) => {
                part.report.feed(stream, &data);
                if part.shows(stream) {
                    part.forward(stream, &data);
                }
            }
            Ok(JobEvent::Finished(result)) => {
                part.finish();
                let report = std::mem::take(&mut part.report).finish();
                if report.missing_command.as_deref() == Some("nextest") && no_nextest.is_none() {
                    no_nextest = Some(part.agent.clone());
                    cancel.cancel();
                }
                tally.add(part.part, &report, &result.completion.end);
                part.done = true;
            }
            Err(error) => {
                say(notes, format_args!("lost {}: {error}", part.part));
                let end = JobEnd::Failed {
                    reason: error.to_string(),
                };
                tally.add(part.part, &ReportBuilder::new().finish(), &end);
                part.done = true;
            }
        }
    }
    if let Some(agent) = no_nextest {
        return Ok(SpreadEnd::NoNextest { agent });
    }
    print_tally(&tally);
    Ok(SpreadEnd::Exited(
        if following.iter().all(|part| part.done) {
            tally.exit_code()
        } else {
            EXIT_FAILED
        },
    ))
}

/// The failing tests, then the `test result:` line, last on stdout as `cargo test` ends.
fn print_tally(tally: &Tally) {
    let mut out = std::io::stdout().lock();
    if !tally.failures().is_empty() {
        let _ = writeln!(out, "\nfailures:");
        for failure in tally.failures() {
            let message = failure.message.lines().next().unwrap_or_default();
            let _ = writeln!(out, "    {}: {message}", failure.name);
        }
    }
    let _ = writeln!(out, "\n{}", tally.result_line());
    let _ = out.flush();
}
