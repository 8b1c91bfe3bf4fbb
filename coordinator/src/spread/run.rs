//! A spread run's parts as jobs on one snapshot (a snapshot ref per job): the archive and
//! the doctests at once, the slices when the archive is built, all followed at once. What
//! the run says goes to an [`Observer`]: `run` prints it, `mcp` sends it as progress.

use std::collections::BTreeMap;
use std::str::FromStr;

use buildpool_core::job::EXIT_FAILED;
use buildpool_core::{JobEnd, JobEvent, JobId, JobSpec, OutputStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::plan::{Part, Plan, Tally};
use crate::lines::WholeLines;
use crate::report::ReportBuilder;
use crate::session::{JobClient, JobSession, SessionError, Snapshotted, StartError};

/// How many slices a spread run is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    Slices(u32),
    /// One slice per idle agent.
    EveryIdleAgent,
}

/// The most slices a run is spread over.
pub const MAX_SLICES: u32 = 256;

impl FromStr for Spread {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Spread::EveryIdleAgent),
            number => match number.parse::<u32>() {
                Ok(count @ 1..=MAX_SLICES) => Ok(Spread::Slices(count)),
                _ => Err(format!(
                    "spread takes a number of slices from 1 to {MAX_SLICES}, or auto, not \
                     {number:?}"
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
                Ok(u32::try_from(idle).unwrap_or(u32::MAX).clamp(1, MAX_SLICES))
            }
        }
    }
}

/// Who hears what a spread run says while it runs.
pub trait Observer: Send {
    /// A line of buildpool's own about the run, e.g. `slice 1/2 running on worker-1`.
    fn note(&mut self, text: &str);
    /// Whole lines (each ending in a newline) of a part's output shown to the user, and
    /// the agent that ran them: parts run at once, and a line must say where it ran.
    fn lines(&mut self, agent: &str, stream: OutputStream, lines: &[u8]);
}

/// One part of a finished run.
#[derive(Debug, Clone)]
pub struct PartRecord {
    pub part: Part,
    /// Its job, once the coordinator said it.
    pub job_id: Option<JobId>,
    /// The agent of its last attempt (the part's name until one was assigned).
    pub agent: String,
}

/// How a spread run ended.
#[derive(Debug)]
pub struct Outcome {
    pub tally: Tally,
    pub parts: Vec<PartRecord>,
    /// An agent without cargo-nextest: the run is to go to one agent as `cargo test`.
    pub missing_nextest: Option<String>,
    /// Whether every part it started came to an end it could read.
    all_ended: bool,
}

impl Outcome {
    /// What `cargo test` would have exited with.
    pub fn exit_code(&self) -> u8 {
        if self.all_ended {
            self.tally.exit_code()
        } else {
            EXIT_FAILED
        }
    }
}

/// What one part's follower hands the run: the part's index, its job's id once known, and
/// an event or how following it failed.
type PartEvent = (usize, Option<JobId>, Result<JobEvent, SessionError>);

/// One part as the run sees it.
struct Following {
    part: Part,
    job_id: Option<JobId>,
    agent: String,
    /// The attempt whose output counts: the latest assigned.
    attempt: u32,
    report: ReportBuilder,
    /// Each stream's unfinished line, handed on when its end comes.
    held: WholeLines,
    done: bool,
}

impl Following {
    fn new(part: Part) -> Self {
        Self {
            part,
            job_id: None,
            agent: part.to_string(),
            attempt: 0,
            report: ReportBuilder::new(),
            held: WholeLines::default(),
            done: false,
        }
    }

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
                self.held = WholeLines::default();
            }
            self.attempt = attempt;
        }
        true
    }

    /// Hands `data`'s whole lines to the observer. A slice's stdout is nextest's JSON
    /// events, read for the tally and not shown.
    fn show(&mut self, stream: OutputStream, data: &[u8], observer: &mut dyn Observer) {
        if matches!(self.part, Part::Slice { .. }) && stream == OutputStream::Stdout {
            return;
        }
        if let Some(lines) = self.held.push(stream, data) {
            hand_on(&self.agent, stream, lines, observer);
        }
    }

    /// Hands on what is held of an unfinished last line: the part ended.
    fn finish(&mut self, observer: &mut dyn Observer) {
        for (stream, rest) in self.held.rest() {
            hand_on(&self.agent, stream, rest, observer);
        }
    }
}

/// Hands `lines` to the observer as whole lines: one cut short (its part ended, or it
/// outgrew the holder) gets its line end.
fn hand_on(agent: &str, stream: OutputStream, mut lines: Vec<u8>, observer: &mut dyn Observer) {
    if lines.last() != Some(&b'\n') {
        lines.push(b'\n');
    }
    observer.lines(agent, stream, &lines);
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
struct Run<'a> {
    snapshot: &'a Snapshotted,
    following: Vec<Following>,
    /// Held while parts may still start; the loop ends when the last part's follower ends.
    events: Option<mpsc::Sender<PartEvent>>,
    cancel: CancellationToken,
    tally: Tally,
    /// The first agent found without cargo-nextest.
    missing_nextest: Option<String>,
}

impl Run<'_> {
    /// Takes one event of part `index`; how the part ended, when this was its end.
    fn receive(
        &mut self,
        index: usize,
        job_id: Option<JobId>,
        event: Result<JobEvent, SessionError>,
        observer: &mut dyn Observer,
    ) -> Option<JobEnd> {
        let part = &mut self.following[index];
        part.job_id = part.job_id.or(job_id);
        let end = match event {
            Ok(JobEvent::Assigned {
                agent_id, attempt, ..
            }) => {
                let again = if attempt > 1 {
                    format!(" again (attempt {attempt})")
                } else {
                    String::new()
                };
                observer.note(&format!("{} running{again} on {agent_id}", part.part));
                part.agent = agent_id;
                part.follow_attempt(attempt);
                return None;
            }
            Ok(JobEvent::Queued { .. }) => return None,
            Ok(JobEvent::Output {
                stream,
                data,
                attempt,
            }) => {
                if part.follow_attempt(attempt) {
                    part.report.feed(stream, &data);
                    part.show(stream, &data, observer);
                }
                return None;
            }
            Ok(JobEvent::Finished(result)) => {
                part.finish(observer);
                let report = std::mem::take(&mut part.report).finish();
                if report.missing_command.as_deref() == Some("nextest")
                    && self.missing_nextest.is_none()
                {
                    self.missing_nextest = Some(part.agent.clone());
                    self.cancel.cancel();
                }
                self.tally.add(part.part, &report, &result.completion.end);
                result.completion.end
            }
            Err(error) => {
                observer.note(&format!("lost {}: {error}", part.part));
                let part = part.part;
                self.fail(part, &error);
                JobEnd::Failed {
                    reason: error.to_string(),
                }
            }
        };
        self.following[index].done = true;
        Some(end)
    }

    /// The archive job ended: when it built the archive, the slices start on it. No part
    /// starts after them, so the run lets go of its sender: the followers hold the only
    /// ones, and the run ends with the last part.
    async fn archive_ended(
        &mut self,
        plan: &Plan,
        history: &BTreeMap<String, u64>,
        end: &JobEnd,
        archive_job: Option<JobId>,
        observer: &mut dyn Observer,
    ) {
        let built = *end == (JobEnd::Exited { code: 0 }) && !self.cancel.is_cancelled();
        if let (true, Some(archive_job)) = (built, archive_job) {
            if plan.balances(history) {
                observer.note(&format!(
                    "slices balanced by how long {} test binaries ran before",
                    history.len()
                ));
            }
            for (part, spec) in plan.slices(archive_job, history) {
                self.start(part, spec, observer).await;
            }
        }
        self.events = None;
    }

    /// Submits a part on the run's snapshot and follows it; a part that cannot start
    /// counts as failed.
    async fn start(&mut self, part: Part, spec: JobSpec, observer: &mut dyn Observer) {
        let Some(events) = self.events.clone() else {
            return;
        };
        let session = match self.snapshot.submit(spec).await {
            Ok(session) => session,
            Err(error) => {
                observer.note(&format!("{part} could not start: {error}"));
                self.fail(part, &error);
                if part == Part::Archive {
                    // No slices will start either.
                    self.events = None;
                }
                return;
            }
        };
        let index = self.following.len();
        self.following.push(Following::new(part));
        tokio::spawn(follow(index, session, events, self.cancel.clone()));
    }

    fn fail(&mut self, part: Part, error: &dyn std::fmt::Display) {
        let end = JobEnd::Failed {
            reason: error.to_string(),
        };
        self.tally.add(part, &ReportBuilder::new().finish(), &end);
    }
}

/// Runs `test` (a `cargo test` job's spec) as `slices` slices of an archive built once,
/// with its doctests, until every part ended; `cancel` cancels every part.
pub async fn run(
    jobs: &JobClient,
    test: &JobSpec,
    slices: u32,
    force_local: bool,
    observer: &mut dyn Observer,
    cancel: CancellationToken,
) -> Result<Outcome, StartError> {
    let plan = Plan::new(test, slices);
    let history_file = super::history::path(jobs.repo());
    let history = super::history::load(&history_file);
    let snapshot = jobs.snapshot(force_local).await?;
    if let Some(note) = snapshot.note() {
        observer.note(note);
    }
    let (sender, mut events) = mpsc::channel::<PartEvent>(64);
    let mut run = Run {
        snapshot: &snapshot,
        following: Vec::new(),
        events: Some(sender),
        cancel,
        tally: Tally::default(),
        missing_nextest: None,
    };
    for (part, spec) in plan.first_parts() {
        run.start(part, spec, observer).await;
    }
    while let Some((index, job_id, event)) = events.recv().await {
        let Some(end) = run.receive(index, job_id, event, observer) else {
            continue;
        };
        if run.following[index].part == Part::Archive {
            let archive_job = run.following[index].job_id;
            run.archive_ended(&plan, &history, &end, archive_job, observer)
                .await;
        }
    }
    let all_ended = run.following.iter().all(|part| part.done);
    if all_ended
        && !run.cancel.is_cancelled()
        && let Err(error) = super::history::save(&history_file, run.tally.millis_by_binary())
    {
        tracing::warn!("cannot record the tests' durations: {error}");
    }
    Ok(Outcome {
        parts: run
            .following
            .iter()
            .map(|part| PartRecord {
                part: part.part,
                job_id: part.job_id,
                agent: part.agent.clone(),
            })
            .collect(),
        tally: run.tally,
        missing_nextest: run.missing_nextest,
        all_ended,
    })
}
