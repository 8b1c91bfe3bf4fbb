//! `buildpool run test --spread N|auto`: the parts of [`crate::spread`] as jobs on one
//! snapshot: the archive and the doctests at once, the slices when the archive is built.
//! Their output streams with each line's agent named, and their reports add up to one
//! `test result:` line, the last line on stdout.

use std::io::Write;
use std::str::FromStr;

use buildpool_core::job::{EXIT_CANCELLED, EXIT_FAILED};
use buildpool_core::{JobEnd, JobEvent, JobId, JobSpec, OutputStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::run::{Stops, say};
use crate::mcp::report::ReportBuilder;
use crate::session::{JobClient, JobSession, SessionError, Snapshotted, StartError};
use crate::spread::{Part, Plan, Tally};

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

/// What one part's follower hands the run: the part's index, its job's id once known, and
/// an event or how following it failed.
type PartEvent = (usize, Option<JobId>, Result<JobEvent, SessionError>);

/// One part as the run sees it.
struct Following {
    part: Part,
    agent: String,
    /// The attempt whose output counts: the latest assigned.
    attempt: u32,
    report: ReportBuilder,
    /// Each stream's unfinished line, written when its end comes.
    held: [Vec<u8>; 2],
    done: bool,
}

impl Following {
    /// Takes note of the attempt an event is of; whether the event counts. A newer attempt
    /// means the agent of the earlier one was lost: what that one reported is dropped, or
    /// the part's tests would count twice.
    fn follow_attempt(&mut self, attempt: u32) -> bool {
        if attempt < self.attempt {
            return false;
        }
        if attempt > self.attempt {
            if self.attempt != 0 {
                self.report = ReportBuilder::new();
                self.held = [Vec::new(), Vec::new()];
            }
            self.attempt = attempt;
        }
        true
    }

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
        if events.send((index, session.job_id(), event)).await.is_err() {
            session.cancel();
            session.cancel_delivered().await;
            return;
        }
        if last {
            return;
        }
    }
}

/// The parts of a run as they start and end.
struct Run {
    following: Vec<Following>,
    events: mpsc::Sender<PartEvent>,
    cancel: CancellationToken,
}

impl Run {
    /// Submits a part on the run's snapshot and follows it.
    async fn start(
        &mut self,
        snapshot: &Snapshotted,
        part: Part,
        spec: JobSpec,
    ) -> Result<(), StartError> {
        let session = snapshot.submit(spec).await?;
        let index = self.following.len();
        self.following.push(Following {
            part,
            agent: part.to_string(),
            attempt: 0,
            report: ReportBuilder::new(),
            held: [Vec::new(), Vec::new()],
            done: false,
        });
        tokio::spawn(follow(
            index,
            session,
            self.events.clone(),
            self.cancel.clone(),
        ));
        Ok(())
    }
}

/// Runs `test` (a `cargo test` job's spec) as `slices` slices of an archive built once,
/// and its doctests.
pub async fn run(
    jobs: &JobClient,
    test: &JobSpec,
    slices: u32,
    force_local: bool,
    notes: bool,
    interrupts: &mut Stops,
) -> anyhow::Result<SpreadEnd> {
    let plan = Plan::new(test, slices);
    let snapshot = jobs.snapshot(force_local).await?;
    if let Some(note) = snapshot.note() {
        say(notes, format_args!("{note}"));
    }
    let (sender, mut events) = mpsc::channel::<PartEvent>(64);
    let mut run = Run {
        following: Vec::new(),
        events: sender,
        cancel: CancellationToken::new(),
    };
    for (part, spec) in plan.first_parts() {
        run.start(&snapshot, part, spec).await?;
    }

    let mut tally = Tally::default();
    let mut no_nextest = None;
    let mut interrupted = false;
    // The slices start once the archive is built; until then the run holds a sender.
    let mut waiting_for_archive = true;
    loop {
        let (index, job_id, event) = tokio::select! {
            next = events.recv() => match next {
                Some(next) => next,
                None => break,
            },
            () = interrupts.next() => {
                if interrupted {
                    say(notes, format_args!("interrupted again; leaving without waiting for the parts' ends"));
                    return Ok(SpreadEnd::Exited(EXIT_CANCELLED));
                }
                interrupted = true;
                say(notes, format_args!("cancelling every part (Ctrl-C again to leave at once)"));
                run.cancel.cancel();
                continue;
            }
        };
        let part = &mut run.following[index];
        let ended = match event {
            Ok(JobEvent::Assigned {
                agent_id, attempt, ..
            }) => {
                if attempt > 1 {
                    say(
                        notes,
                        format_args!(
                            "{} running again on {agent_id} (attempt {attempt})",
                            part.part
                        ),
                    );
                } else {
                    say(notes, format_args!("{} running on {agent_id}", part.part));
                }
                part.agent = agent_id;
                part.follow_attempt(attempt);
                continue;
            }
            Ok(JobEvent::Queued { .. }) => continue,
            Ok(JobEvent::Output {
                stream,
                data,
                attempt,
            }) => {
                if !part.follow_attempt(attempt) {
                    continue;
                }
                part.report.feed(stream, &data);
                if part.shows(stream) {
                    part.forward(stream, &data);
                }
                continue;
            }
            Ok(JobEvent::Finished(result)) => {
                part.finish();
                let report = std::mem::take(&mut part.report).finish();
                if report.missing_command.as_deref() == Some("nextest") && no_nextest.is_none() {
                    no_nextest = Some(part.agent.clone());
                    run.cancel.cancel();
                }
                tally.add(part.part, &report, &result.completion.end);
                (result.completion.end, job_id)
            }
            Err(error) => {
                say(notes, format_args!("lost {}: {error}", part.part));
                let end = JobEnd::Failed {
                    reason: error.to_string(),
                };
                tally.add(part.part, &ReportBuilder::new().finish(), &end);
                (end, None)
            }
        };
        part.done = true;
        if part.part == Part::Archive {
            waiting_for_archive = false;
            let (end, archive_job) = ended;
            let go_on = end == (JobEnd::Exited { code: 0 }) && !run.cancel.is_cancelled();
            if let (true, Some(archive_job)) = (go_on, archive_job) {
                for (part, spec) in plan.slices(archive_job) {
                    if let Err(error) = run.start(&snapshot, part, spec).await {
                        say(notes, format_args!("{part} could not start: {error}"));
                        let end = JobEnd::Failed {
                            reason: error.to_string(),
                        };
                        tally.add(part, &ReportBuilder::new().finish(), &end);
                    }
                }
            }
        }
        if !waiting_for_archive {
            // Only the followers hold senders now: the loop ends with the last part.
            run.events = mpsc::channel(1).0;
        }
    }
    if let Some(agent) = no_nextest {
        return Ok(SpreadEnd::NoNextest { agent });
    }
    print_tally(&tally);
    let all_ended = run.following.iter().all(|part| part.done);
    Ok(SpreadEnd::Exited(if all_ended {
        tally.exit_code()
    } else {
        EXIT_FAILED
    }))
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
