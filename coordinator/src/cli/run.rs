//! `buildpool run <kind> [-- cargo args]`: one job of this worktree, its output on our
//! stdout and stderr, its result as our exit code.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use buildpool_core::job::EXIT_CANCELLED;
use buildpool_core::{EnvMode, EnvVar, JobEvent, JobId, JobKind, JobSpec, OutputStream};
use clap::Args;

use super::artifacts;
use super::spread::SpreadEnd;
use crate::client::Client;
use crate::lines::WholeLines;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::session::{JobClient, Via};
use crate::spread::Spread;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// build, test, clippy, check, or nextest (`cargo nextest run`).
    kind: String,
    /// Job timeout in seconds; 0 or none: the coordinator's job_default_secs.
    #[arg(long)]
    timeout: Option<u32>,
    /// Environment on the agent: auto (nix develop when the repository has a flake.nix), nix or host.
    #[arg(long, default_value = "auto")]
    env: String,
    /// Run only on agents with this label (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Run here through an in-process coordinator even if one is running.
    #[arg(long)]
    local: bool,
    /// At the end, say where the time went: snapshot, submit, queue, the agent's phases.
    #[arg(short, long)]
    verbose: bool,
    /// No progress line (it is shown only when stdout and stderr are terminals).
    #[arg(short, long)]
    quiet: bool,
    /// Print only the job's own output, as cargo would: no `[buildpool]` lines and no
    /// progress line (buildpool's own failures are still reported). The cargo shim runs
    /// jobs this way, so a pipeline (`cargo test 2>&1 | tail -20`) sees cargo's streams.
    #[arg(long)]
    silent: bool,
    /// After a successful build or test, copy the executables it built into this
    /// worktree's target/ at the same paths (checksum-verified, up to 512 MiB per job).
    #[arg(long)]
    artifacts: bool,
    /// `test` only: run the tests as N nextest slices on as many agents at once (`auto`:
    /// one per idle agent), the doctests beside them, and end with one `test result:` line
    /// over all of them. Needs cargo-nextest on the agents; without it, one agent runs
    /// `cargo test`.
    #[arg(long, value_name = "N|auto")]
    spread: Option<Spread>,
    /// Arguments passed to cargo after the subcommand.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

impl RunArgs {
    /// `run test`: what `buildpool demo` runs in each of its worktrees.
    pub fn test() -> Self {
        Self {
            kind: "test".to_owned(),
            timeout: None,
            env: "auto".to_owned(),
            labels: Vec::new(),
            local: false,
            verbose: false,
            quiet: false,
            silent: false,
            artifacts: false,
            spread: None,
            cargo_args: Vec::new(),
        }
    }

    fn spec(self) -> anyhow::Result<JobSpec> {
        let kind = JobKind::from_name(&self.kind).with_context(|| {
            format!(
                "unknown job kind {:?}: use build, test, clippy, check or nextest",
                self.kind
            )
        })?;
        let env_mode: EnvMode = self.env.parse().map_err(|e| anyhow::anyhow!("--{e}"))?;
        Ok(JobSpec {
            kind,
            cargo_args: self.cargo_args,
            env: forwarded_env(),
            // 0, like no --timeout, means the coordinator's default.
            timeout: self
                .timeout
                .filter(|secs| *secs > 0)
                .map(|secs| std::time::Duration::from_secs(u64::from(secs))),
            env_mode,
            required_labels: self.labels,
            collect_executables: self.artifacts,
            archive_from: None,
        })
    }
}

/// Allow-listed variables set in the caller's environment travel with the job.
fn forwarded_env() -> Vec<EnvVar> {
    let mut vars: Vec<EnvVar> = std::env::vars()
        .filter(|(name, _)| buildpool_core::spec::env_name_allowed(name))
        .map(|(name, value)| EnvVar { name, value })
        .collect();
    vars.sort_by(|a, b| a.name.cmp(&b.name));
    vars
}

/// What `run` exits with when its reader went away mid-job (`| head`): what a shell reports
/// for a program stopped by a broken pipe (128 + SIGPIPE).
const EXIT_BROKEN_PIPE: u8 = 141;

/// A line of buildpool's own on stderr, unless `$notes` is off (`--silent`). Never fails:
/// with `2>&1 | head` stderr may be a closed pipe too, and a failed note must not end the
/// job's follower before its cancel.
macro_rules! note {
    ($notes:expr, $($arg:tt)*) => {
        say($notes, format_args!($($arg)*))
    };
}

pub(super) fn say(notes: bool, text: std::fmt::Arguments<'_>) {
    if notes {
        let _ = writeln!(std::io::stderr().lock(), "[buildpool] {text}");
    }
}

/// Writes a job's output as local cargo's would arrive. Its two streams come as chunks of
/// their own; where both go to one file (`2>&1 | tail`), a chunk of one written in the
/// middle of a line of the other would splice the two, as no local cargo does. There each
/// stream's output is written a whole line at a time (a partial line waits for its end, at
/// most [`crate::lines::HELD_BYTES`]); on a terminal, or to separate files, as it comes.
#[derive(Debug)]
struct JobOutput {
    /// Each stream's unfinished line, while both go to one file.
    merged: Option<WholeLines>,
}

impl JobOutput {
    fn new() -> Self {
        use std::io::IsTerminal;
        use std::os::fd::AsFd;
        let same_file = match (
            rustix::fs::fstat(std::io::stdout().as_fd()),
            rustix::fs::fstat(std::io::stderr().as_fd()),
        ) {
            (Ok(out), Ok(err)) => out.st_dev == err.st_dev && out.st_ino == err.st_ino,
            _ => false,
        };
        Self {
            merged: (same_file && !std::io::stdout().is_terminal()).then(WholeLines::default),
        }
    }

    fn write(&mut self, stream: OutputStream, data: &[u8]) -> std::io::Result<()> {
        match &mut self.merged {
            None => emit(stream, data),
            Some(held) => match held.push(stream, data) {
                Some(lines) => emit(stream, &lines),
                None => Ok(()),
            },
        }
    }

    /// Writes what is still held: the job ended.
    fn finish(&mut self) -> std::io::Result<()> {
        if let Some(held) = &mut self.merged {
            for (stream, rest) in held.rest() {
                emit(stream, &rest)?;
            }
        }
        Ok(())
    }
}

fn emit(stream: OutputStream, data: &[u8]) -> std::io::Result<()> {
    match stream {
        OutputStream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(data).and_then(|()| out.flush())
        }
        OutputStream::Stderr => {
            let mut err = std::io::stderr().lock();
            err.write_all(data).and_then(|()| err.flush())
        }
    }
}

/// The signals that stop `run` and cancel its job: Ctrl-C, `timeout`'s and `kill`'s
/// SIGTERM, and a closed terminal's SIGHUP. A job left running by its client would hold a
/// slot until the coordinator's grace for unwatched jobs ran out.
pub(super) struct Stops {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Stops {
    pub(super) fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    pub(super) async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = self.hangup.recv() => {}
        }
    }
}

pub async fn run(dir: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    // First, so a stop at any point after start is ours to handle (and cancels the job).
    let mut interrupts = Stops::new()?;
    let (force_local, verbose, quiet) = (args.local, args.verbose, args.quiet);
    let notes = !args.silent;
    let spread = args.spread;
    let spec = args.spec()?;
    if spread.is_some() && (spec.kind != JobKind::Test || spec.collect_executables) {
        anyhow::bail!("--spread spreads `run test` only, and without --artifacts");
    }
    let jobs = JobClient::new(Repo::discover(dir).await?);
    if let Some(note) = jobs.repo().plain_note() {
        note!(notes, "{note}");
    }
    let outcome = async {
        if let Some(spread) = spread {
            let slices = spread.slices(&jobs, force_local).await?;
            if slices > 1 {
                let end =
                    super::spread::run(&jobs, &spec, slices, force_local, notes, &mut interrupts)
                        .await?;
                match end {
                    SpreadEnd::Exited(code) => return Ok(code),
                    SpreadEnd::NoNextest { agent } => note!(
                        notes,
                        "{agent} has no cargo-nextest (cargo install cargo-nextest): running \
                         cargo test on one agent instead"
                    ),
                }
            } else {
                note!(notes, "one slice: running cargo test on one agent");
            }
        }
        let line = TerminalLine::new(!quiet && notes, &jobs.repo().worktree);
        run_job(
            &jobs,
            spec,
            force_local,
            verbose,
            notes,
            line,
            &mut interrupts,
        )
        .await
    }
    .await;
    jobs.shutdown().await;
    outcome.map(ExitCode::from)
}

async fn run_job(
    jobs: &JobClient,
    spec: JobSpec,
    force_local: bool,
    verbose: bool,
    notes: bool,
    mut line: TerminalLine,
    interrupts: &mut Stops,
) -> anyhow::Result<u8> {
    let collect = spec.collect_executables;
    let mut session = jobs.start(spec, force_local).await?;
    match session.via() {
        Via::InProcess(reason) if !force_local => {
            note!(notes, "{reason}; running the job here");
        }
        Via::Started(note) => note!(notes, "{note}"),
        _ => {}
    }
    if let Some(note) = session.snapshot_note() {
        note!(notes, "{note}");
    }
    let mut cancel_requested = false;
    let mut cancel_announced = false;
    // Our reader went away (`| head -5` read enough): the job is cancelled, its output from
    // then on dropped, and its end awaited so that nothing of it stays running.
    let mut reader_gone = false;
    let mut output = JobOutput::new();
    loop {
        let event = tokio::select! {
            event = session.next_event() => event?,
            () = interrupts.next() => {
                line.clear();
                if cancel_requested {
                    note!(notes, "interrupted again; leaving without waiting for the job's end");
                    session.cancel_delivered().await;
                    return Ok(EXIT_CANCELLED);
                }
                cancel_requested = true;
                if let Some(job_id) = session.cancel() {
                    note!(notes, "cancelling job {job_id} (Ctrl-C again to leave at once)");
                    cancel_announced = true;
                }
                continue;
            }
        };
        if cancel_requested && !cancel_announced {
            // Ctrl-C came before the job had an id; the session cancels it now.
            let job_id = session.job_id().unwrap_or_default();
            note!(
                notes,
                "cancelling job {job_id} (Ctrl-C again to leave at once)"
            );
            cancel_announced = true;
        }
        let job_id = session.job_id().unwrap_or_default();
        line.clear();
        line.follow(&event);
        match event {
            JobEvent::Queued { reason, .. } => {
                let reason = if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({reason})")
                };
                note!(notes, "job {job_id} queued{reason}");
            }
            JobEvent::Assigned {
                agent_id,
                attempt,
                local,
            } => {
                if local {
                    note!(
                        notes,
                        "job {job_id} running on the coordinator's local agent (no build agent connected)"
                    );
                } else {
                    note!(
                        notes,
                        "job {job_id} running on {agent_id} (attempt {attempt})"
                    );
                }
            }
            JobEvent::Output { .. } if reader_gone => {}
            JobEvent::Output { stream, data, .. } => {
                // Our own output is gone (closed pipe): the job has nobody to report to.
                if output.write(stream, &data).is_err() {
                    reader_gone = true;
                    cancel_requested = true;
                    cancel_announced = true;
                    session.cancel();
                }
            }
            JobEvent::Finished(result) => {
                if output.finish().is_err() {
                    reader_gone = true;
                }
                if reader_gone {
                    return Ok(EXIT_BROKEN_PIPE);
                }
                note!(notes, "job {job_id} {}", result.describe());
                if verbose {
                    note!(notes, "timings: {}", session.timings(&result));
                }
                let code = result.completion.end.exit_code();
                if collect && code == 0 {
                    copy_executables(session.client(), job_id, &jobs.repo().worktree, notes)
                        .await?;
                }
                return Ok(code);
            }
        }
        line.draw();
    }
}

/// Fetches a finished job's executables into `worktree`'s `target/`.
async fn copy_executables(
    client: &Client,
    job_id: JobId,
    worktree: &Path,
    notes: bool,
) -> anyhow::Result<()> {
    let mut chunks = client
        .fetch_artifacts(job_id)
        .await
        .context("cannot fetch the job's executables")?;
    let mut receiver = artifacts::Receiver::new(&worktree.join("target"));
    while let Some(chunk) = chunks
        .next()
        .await
        .context("the transfer of the job's executables failed")?
    {
        receiver.take(&chunk)?;
    }
    let (count, bytes) = receiver.finish()?;
    #[allow(clippy::cast_precision_loss)] // a size to read, not to compute with
    let mib = bytes as f64 / (1024.0 * 1024.0);
    note!(
        notes,
        "copied {count} executables ({mib:.1} MiB) into target/"
    );
    Ok(())
}

/// The progress line at the bottom of the terminal: drawn on stderr after each event,
/// cleared before anything else is written and at the end (on drop). Only drawn when
/// stdout and stderr are terminals, and only at the start of a line of output.
struct TerminalLine {
    progress: Option<Progress>,
    drawn: bool,
    at_line_start: bool,
}

impl TerminalLine {
    fn new(wanted: bool, worktree: &Path) -> Self {
        use std::io::IsTerminal;
        let shown = wanted && std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        let crates = std::fs::read_to_string(worktree.join("Cargo.lock"))
            .map_or(0, |lock| crate::progress::lockfile_packages(&lock));
        Self {
            progress: shown.then(|| Progress::new(crates)),
            drawn: false,
            at_line_start: true,
        }
    }

    fn follow(&mut self, event: &JobEvent) {
        let Some(progress) = &mut self.progress else {
            return;
        };
        match event {
            JobEvent::Queued { reason, .. } => progress.queued(reason),
            JobEvent::Assigned { agent_id, .. } => progress.assigned(agent_id),
            JobEvent::Output { data, .. } => {
                progress.output(data);
                self.at_line_start = data.ends_with(b"\n");
            }
            JobEvent::Finished(_) => {}
        }
    }

    fn draw(&mut self) {
        if let Some(progress) = &self.progress
            && self.at_line_start
        {
            let text: String = progress.render().chars().take(LINE_WIDTH).collect();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{text}").and_then(|()| err.flush());
            self.drawn = true;
        }
    }

    fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K").and_then(|()| err.flush());
            self.drawn = false;
        }
    }
}

impl Drop for TerminalLine {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The progress line is cut to fit an 80-column terminal.
const LINE_WIDTH: usize = 79;

#[cfg(test)]
mod tests {
    use super::*;

    fn args(timeout: Option<u32>) -> RunArgs {
        RunArgs {
            timeout,
            ..RunArgs::test()
        }
    }

    #[test]
    fn a_zero_timeout_means_the_default_and_others_are_kept() {
        assert_eq!(args(Some(0)).spec().expect("valid").timeout, None);
        assert_eq!(args(None).spec().expect("valid").timeout, None);
        let timeout = args(Some(90)).spec().expect("valid").timeout;
        assert_eq!(timeout, Some(std::time::Duration::from_secs(90)));
    }
}
