//! Making a submission a job: its checks, its log, the store and the scheduler.

use std::sync::Arc;
use std::time::Instant;

use buildpool_core::status::Submission;
use buildpool_core::time::unix_millis;
use buildpool_core::{JobEvent, JobId, JobResult, JobSpec, SnapshotPack};
use tokio::sync::{oneshot, watch};

use super::context::Jobs;
use super::error::JobError;
use super::supervise;
use crate::server::active::{ActiveJob, JobOrigin, Watching};
use crate::server::joblog;
use crate::server::store::{Store, WritePosition};
use crate::snapshot::SNAPSHOT_REF_PREFIX;

/// A job just admitted: its id, its submitter counted as its first watcher, and its phase
/// as the submitter will follow it from the start.
pub(crate) struct Admitted {
    pub job_id: JobId,
    pub watching: Watching,
    pub phase: watch::Receiver<JobEvent>,
}

/// Checks a submission and makes it a job.
///
/// The job is stored and scheduled by a task of its own: a client that hangs up meanwhile
/// (its call is then dropped) must not leave a stored job that was never scheduled. Its
/// job runs, unwatched, and is cancelled after the client grace like any job nobody
/// follows.
pub(crate) async fn admit(jobs: &Arc<Jobs>, submission: Submission) -> Result<Admitted, JobError> {
    check(&submission)?;
    jobs.snapshots
        .check_ref(&submission.git_ref, &submission.commit)
        .await?;
    let (admitted, admission) = oneshot::channel();
    let jobs = Arc::clone(jobs);
    tokio::spawn(async move {
        let _ = admitted.send(record_and_schedule(&jobs, submission).await);
    });
    admission.await.map_err(|_| JobError::Dropped)?
}

/// What a submission must be, beyond decoding: a valid spec, full object ids, a snapshot
/// ref.
fn check(submission: &Submission) -> Result<(), JobError> {
    buildpool_core::spec::validate(&submission.spec)
        .map_err(|error| JobError::Invalid(error.to_string()))?;
    if !buildpool_core::git::is_object_id(&submission.commit) {
        return Err(JobError::Invalid(
            "commit must be a full object id".to_owned(),
        ));
    }
    let base = &submission.base_commit;
    if !base.is_empty() && !buildpool_core::git::is_object_id(base) {
        return Err(JobError::Invalid(
            "base_commit must be empty or a full object id".to_owned(),
        ));
    }
    if !submission.git_ref.starts_with(SNAPSHOT_REF_PREFIX) {
        return Err(JobError::Invalid(format!(
            "git_ref must be under {SNAPSHOT_REF_PREFIX}"
        )));
    }
    Ok(())
}

/// Makes a checked submission a new job: its log, the scheduler (which may assign it at
/// once) and the store. The client hears of the job (this returns) only once it is stored,
/// but the job is not held back meanwhile: the agent that takes it starts while the store
/// commits, so a submission's commit is not part of its time to an agent. Its write is
/// queued before the scheduler can queue the assignment, so a restart never finds an
/// assignment without its job; a job whose write failed is cancelled, wherever it runs
/// (unless it already ended), and the client told why.
async fn record_and_schedule(
    jobs: &Arc<Jobs>,
    submission: Submission,
) -> Result<Admitted, JobError> {
    let job_id = jobs
        .records
        .take_job_id()
        .await
        .map_err(JobError::Unstored)?;
    let submitted_unix_ms = unix_millis();
    // The snapshot's pack, when there is a base, is made while the job is being stored.
    let pack = jobs
        .snapshots
        .pack(&submission.commit, &submission.base_commit);
    let recorded = record(jobs, job_id, &submission, submitted_unix_ms);
    let (pack, recorded) = tokio::join!(pack, recorded);
    let (log, stored) = recorded?;
    let (spec, worktree, git_ref) = (submission.spec, submission.worktree, submission.git_ref);
    let origin = JobOrigin {
        kind: spec.kind,
        worktree: worktree.clone(),
        cargo_args: spec.cargo_args.clone(),
    };
    let job = ActiveJob::queued(log, git_ref.clone(), origin);
    let mut source = jobs
        .snapshots
        .source(submission.commit, git_ref, submission.base_commit);
    source.pack = pack.filter(|pack| fits_in_assignment(pack, &spec, &worktree));
    let phase = job.phase.subscribe();
    jobs.dispatch.state().jobs.insert(job_id, Arc::clone(&job));
    // The submitter is the job's first watcher, counted before anything could cancel the
    // job as unwatched. Should it be gone before it takes its stream, the count goes with
    // the undelivered answer.
    let watching = Watching::start(&job);
    supervise::adopt(jobs, job_id, &job);
    // Debug: at the default level a job gets one line, when it ends.
    tracing::debug!(job_id, kind = %spec.kind, %worktree, "job submitted");
    let now = Instant::now();
    jobs.dispatch.step(|s| {
        (
            (),
            s.submit(job_id, spec, source, worktree, now, submitted_unix_ms),
        )
    });
    if let Some((store, write)) = stored
        && let Err(error) = store.committed(write).await
    {
        tracing::warn!(
            job_id,
            "{error}; cancelling the job its client cannot be told of"
        );
        jobs.dispatch
            .step(|s| ((), s.cancel(job_id, Instant::now()).unwrap_or_default()));
        return Err(JobError::Unstored(error));
    }
    Ok(Admitted {
        job_id,
        watching,
        phase,
    })
}

/// The job's log, created, and its submission queued for the store (with where the write
/// is, to wait for its commit).
async fn record<'a>(
    jobs: &'a Jobs,
    job_id: JobId,
    submission: &Submission,
    submitted_unix_ms: u64,
) -> Result<(joblog::JobLog, Option<(&'a Store, WritePosition)>), JobError> {
    let log = joblog::JobLog::create(jobs.records.logs(), job_id, jobs.log_max_bytes)
        .await
        .map_err(JobError::Log)?;
    jobs.metrics.job_submitted(submission.spec.kind);
    let stored = jobs.records.store().map(|store| {
        let write = store.submitted(job_id, submission, submitted_unix_ms, log.path());
        (store, write)
    });
    Ok((log, stored))
}

/// Whether `pack` leaves room in the assignment's bus frame for the rest of it; the frame
/// limit is for whole messages, and a spec may be large (validated arguments, environment
/// and labels add up to more than a frame at worst).
fn fits_in_assignment(pack: &SnapshotPack, spec: &JobSpec, worktree: &str) -> bool {
    let strings = spec.cargo_args.iter().map(String::len).sum::<usize>()
        + spec
            .env
            .iter()
            .map(|var| var.name.len() + var.value.len())
            .sum::<usize>()
        + spec.required_labels.iter().map(String::len).sum::<usize>()
        + worktree.len();
    // Field tags and lengths, the ids and the rest of the source: well under this.
    const OVERHEAD: usize = 16 * 1024;
    pack.0.len() + strings + OVERHEAD <= buildpool_proto::frame::MAX_FRAME_BYTES
}

/// A job that is no longer active: its stored result and log. Its end may still be on its
/// way to the store, so a miss waits for the store's queue once before it counts.
pub(crate) async fn finished_job(
    jobs: &Jobs,
    job_id: JobId,
) -> Result<(JobResult, std::path::PathBuf), JobError> {
    let Some(store) = jobs.records.store() else {
        return Err(JobError::NotRunning(job_id));
    };
    if let Some(found) = store.result(job_id).await.map_err(JobError::Store)? {
        return Ok(found);
    }
    store.settled().await.map_err(JobError::Store)?;
    store
        .result(job_id)
        .await
        .map_err(JobError::Store)?
        .ok_or(JobError::NotFound(job_id))
}
