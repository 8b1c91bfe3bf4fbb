//! `run test --spread N`: one `cargo test` spread over agents. The tests are built once,
//! as `cargo nextest archive` on one agent (the coordinator picks the warmest); N slices
//! then run `cargo nextest run --partition count:i/N` from that archive on as many
//! agents; the doctests run beside them as `cargo test --doc` (nextest runs none). Their
//! reports add up to the one `test result:` line that scripts and agents read.
//!
//! [`plan`] is pure: the parts' job specs, the slices balanced by earlier durations, and
//! the tally; [`run`] starts and follows them; [`history`] keeps the durations.

mod history;
mod plan;
mod run;

pub use plan::{EXIT_TESTS_FAILED, Part, Plan, Tally};
pub use run::{MAX_SLICES, Observer, Outcome, PartRecord, Spread, run};
