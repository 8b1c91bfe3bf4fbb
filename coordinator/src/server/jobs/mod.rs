//! A job's life in the coordinator, from admission to clean-up, apart from any transport:
//! admission checks and storage ([`admit`]), the task every active job has
//! ([`supervise`]), following a job's events and output ([`follow`]), and the snapshots
//! jobs are built from ([`snapshots`]).
//!
//! Errors are [`JobError`]s; the control API maps them to its status codes. A job's life
//! reaches the rest of the coordinator only through [`Jobs`].

mod admit;
mod context;
mod error;
mod follow;
mod records;
mod snapshots;
mod supervise;

pub(crate) use admit::{admit, finished_job};
pub(crate) use context::Jobs;
pub(crate) use error::JobError;
pub(crate) use follow::{EventStream, follow, replay};
pub(crate) use records::{Records, delete_ended_refs};
pub(crate) use snapshots::Snapshots;
pub(crate) use supervise::restore;
