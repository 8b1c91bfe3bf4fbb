//! Why a job could not be admitted, found or followed.

use buildpool_core::JobId;

use crate::server::store::StoreError;

/// Why a job could not be admitted, found or followed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    /// The submission itself is wrong; sending it again will not help.
    #[error("{0}")]
    Invalid(String),
    /// The submission names a snapshot this repository does not hold as it says.
    #[error("{0}")]
    Snapshot(String),
    #[error("cannot store the job: {0}")]
    Unstored(StoreError),
    #[error("cannot create job log: {0}")]
    Log(std::io::Error),
    #[error("job store: {0}")]
    Store(StoreError),
    #[error("no job {0}")]
    NotFound(JobId),
    #[error("no job {0} is running")]
    NotRunning(JobId),
    #[error("the submission was dropped")]
    Dropped,
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}
