//! `buildpool run test --spread N|auto` on a terminal or in a pipeline: the run's notes and
//! its parts' lines on stderr, each line behind its agent's name; the failing tests and the
//! one `test result:` line over every part at the end, the last line on stdout.

use std::io::Write;

use buildpool_core::job::EXIT_CANCELLED;
use buildpool_core::{JobSpec, OutputStream};
use tokio_util::sync::CancellationToken;

use super::run::{Stops, say};
use crate::session::JobClient;
use crate::spread::{Observer, Tally};

/// How a spread run ended, for `run`.
#[derive(Debug)]
pub enum SpreadEnd {
    /// The exit code `cargo test` would have given.
    Exited(u8),
    /// This agent has no cargo-nextest: the run is to go to one agent as `cargo test`.
    NoNextest { agent: String },
}

/// Prints what the run says.
struct Printer {
    notes: bool,
}

impl Observer for Printer {
    fn note(&mut self, text: &str) {
        say(self.notes, format_args!("{text}"));
    }

    fn lines(&mut self, agent: &str, _stream: OutputStream, lines: &[u8]) {
        let mut err = std::io::stderr().lock();
        for line in lines.split_inclusive(|byte| *byte == b'\n') {
            let _ = write!(err, "[{agent}] ");
            let _ = err.write_all(line);
        }
        let _ = err.flush();
    }
}

/// Runs `test` spread over `slices` slices. The first stop cancels every part; a second
/// leaves at once.
pub async fn run(
    jobs: &JobClient,
    test: &JobSpec,
    slices: u32,
    force_local: bool,
    notes: bool,
    interrupts: &mut Stops,
) -> anyhow::Result<SpreadEnd> {
    let cancel = CancellationToken::new();
    let mut printer = Printer { notes };
    let running = crate::spread::run(
        jobs,
        test,
        slices,
        force_local,
        &mut printer,
        cancel.clone(),
    );
    tokio::pin!(running);
    let outcome = loop {
        tokio::select! {
            outcome = &mut running => break outcome?,
            () = interrupts.next() => {
                if cancel.is_cancelled() {
                    say(notes, format_args!("interrupted again; leaving without waiting for the parts' ends"));
                    return Ok(SpreadEnd::Exited(EXIT_CANCELLED));
                }
                say(notes, format_args!("cancelling every part (Ctrl-C again to leave at once)"));
                cancel.cancel();
            }
        }
    };
    if let Some(agent) = outcome.missing_nextest {
        return Ok(SpreadEnd::NoNextest { agent });
    }
    print_tally(&outcome.tally);
    Ok(SpreadEnd::Exited(outcome.exit_code()))
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
