//! The task every active job has, from its admission (or its restoring after a restart)
//! to its clean-up.

use std::sync::Arc;
use std::time::Instant;

use buildpool_core::JobEvent;
use buildpool_core::JobId;
use buildpool_core::time::unix_millis;
use tokio::sync::watch;

use super::context::Jobs;
use crate::server::active::{ActiveJob, JobOrigin};
use crate::server::joblog;
use crate::server::scheduler::{self, LOCAL_AGENT_ID};
use crate::server::store;

/// Starts the task every active job has: it cancels the job once nobody has followed it for
/// the client grace, and cleans up when the job ends. One task for both: at thousands of
/// jobs a second, a second task and its wake-up at each of the job's phases showed.
pub(crate) fn adopt(jobs: &Arc<Jobs>, job_id: JobId, job: &Arc<ActiveJob>) {
    tokio::spawn(supervise(Arc::clone(jobs), job_id, Arc::clone(job)));
}

/// The grace lets a client that lost its stream (a network blip, a coordinator restart)
/// come back with `Watch` without losing its job; after a restart it counts from the
/// restart, since every job starts there unwatched. A job that ends is cleaned up
/// ([`clean_up`]); one still running when the coordinator stops is not (snapshot pruning
/// removes its ref later).
async fn supervise(jobs: Arc<Jobs>, job_id: JobId, job: Arc<ActiveJob>) {
    let mut phase = job.phase.subscribe();
    let mut watchers = job.watchers.subscribe();
    let grace = jobs.client_grace;
    let unwatched_deadline = |count: usize| (count == 0).then(|| Instant::now() + grace);
    // When the job is cancelled for want of a client; `None` while one follows it.
    let mut cancel_at = unwatched_deadline(*watchers.borrow_and_update());
    // When the current attempt was assigned, as this task saw it (for the delivery metric).
    let mut assigned_at = None;
    let mut watching = true;
    loop {
        match &*phase.borrow_and_update() {
            JobEvent::Finished(_) => break,
            JobEvent::Assigned { .. } => assigned_at = Some(Instant::now()),
            _ => {}
        }
        let unwatched_for_long = async {
            match cancel_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = phase.changed() => if changed.is_err() { break },
            changed = watchers.changed(), if watching => {
                // Each time the last client leaves, the grace starts over.
                cancel_at = match changed {
                    Ok(()) => unwatched_deadline(*watchers.borrow_and_update()),
                    Err(_) => { watching = false; None }
                };
            }
            () = unwatched_for_long => {
                tracing::info!(job_id, "no client followed the job for {grace:?}; cancelling it");
                jobs.dispatch.step(|s| ((), s.cancel(job_id, Instant::now()).unwrap_or_default()));
                cancel_at = None;
            }
            () = jobs.shutdown.cancelled() => return,
        }
    }
    clean_up(&jobs, job_id, &job, &phase, assigned_at).await;
}

/// Records an ended job (metrics, history), ends its log and hands its snapshot ref over
/// for deletion.
async fn clean_up(
    jobs: &Jobs,
    job_id: JobId,
    job: &ActiveJob,
    phase: &watch::Receiver<JobEvent>,
    assigned_at: Option<Instant>,
) {
    let ended = match &*phase.borrow() {
        JobEvent::Finished(result) => Some(result.clone()),
        _ => None,
    };
    if let Some(result) = ended {
        // One line per job at the default level, written here by the job's own task: at
        // thousands of jobs a second, a line per event would be most of the log, and writing
        // it while dispatching held the scheduler's lock through a write to stderr.
        tracing::info!(
            job_id,
            kind = %job.origin.kind,
            worktree = %job.origin.worktree,
            agent_id = %result.agent_id,
            attempt = result.attempt,
            end = ?result.completion.end,
            "job finished"
        );
        // Recorded here, by the job's own task, so the dispatch path under the lock does none
        // of it.
        let since_assigned = assigned_at.map(|at: Instant| at.elapsed());
        jobs.metrics
            .job_finished(job.origin.kind, &result, since_assigned);
        let finished =
            crate::server::history::FinishedJob::new(job_id, &job.origin, &result, unix_millis());
        jobs.records.history().record(finished);
    }
    if let Err(error) = job.log.finish().await {
        tracing::warn!("cannot finish job log: {error}");
    }
    jobs.records.logs().ended(job_id);
    // Deleted in a batch with other ended jobs' refs (see `delete_ended_refs`).
    let _ = jobs.records.ended_refs.send(job.git_ref.clone()).await;
}

/// Takes back the jobs the previous coordinator left unfinished: their logs are reopened
/// for appending, queued ones queue again, and running ones wait for their agents to report
/// them (see [`crate::server::scheduler::Scheduler::restore`]). Each is cancelled if no client comes back to follow it
/// within the client grace, counted from now.
pub(crate) async fn restore(jobs: &Arc<Jobs>, unfinished: Vec<store::StoredJob>) {
    if unfinished.is_empty() {
        return;
    }
    let mut restored = Vec::with_capacity(unfinished.len());
    for stored in unfinished {
        let job_id = stored.job_id;
        let log =
            match joblog::JobLog::reopen(jobs.records.logs(), job_id, jobs.log_max_bytes).await {
                Ok(log) => log,
                Err(error) => {
                    tracing::error!(job_id, "cannot reopen the job's log ({error}); not resumed");
                    continue;
                }
            };
        let submission = stored.submission;
        let origin = JobOrigin {
            kind: submission.spec.kind,
            worktree: submission.worktree.clone(),
            cargo_args: submission.spec.cargo_args.clone(),
        };
        let initial = match &stored.agent_id {
            Some(agent_id) => JobEvent::Assigned {
                agent_id: agent_id.clone(),
                attempt: stored.attempt,
                local: agent_id == LOCAL_AGENT_ID,
            },
            None => JobEvent::Queued {
                position: 0,
                reason: "requeued after the coordinator restarted".to_owned(),
            },
        };
        let job = ActiveJob::new(log, submission.git_ref.clone(), origin, initial);
        jobs.dispatch.state().jobs.insert(job_id, Arc::clone(&job));
        adopt(jobs, job_id, &job);
        restored.push(scheduler::RestoredJob {
            job_id,
            source: jobs.snapshots.source(
                submission.commit,
                submission.git_ref,
                submission.base_commit,
            ),
            spec: submission.spec,
            worktree: submission.worktree,
            submitted_unix_ms: stored.submitted_unix_ms,
            attempt: stored.attempt,
            lost_attempts: stored.lost_attempts,
            running_on: stored.agent_id,
        });
    }
    let (queued, running) = restored
        .iter()
        .fold((0, 0), |(q, r), job| match job.running_on {
            Some(_) => (q, r + 1),
            None => (q + 1, r),
        });
    tracing::info!(
        queued,
        running,
        "resumed the jobs of the previous coordinator"
    );
    let now = Instant::now();
    let now_unix = unix_millis();
    jobs.dispatch
        .step(|s| ((), s.restore(restored, now, now_unix)));
}
