//! The client side of a job, written once: snapshot, route, submit, events, cancel.
//!
//! `buildpool run` and the MCP server (and every later client) start jobs through a
//! [`JobClient`], so "no coordinator running" behaves the same for all of them: the first
//! client starts one in the background and the others join it (`crate::background`); if
//! that fails, the job still runs, through an in-process coordinator with its embedded
//! local agent (same snapshot, fetch, workspace and env code path). Either way the caller
//! is told why.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use buildpool_core::status::Submission;
use buildpool_core::{AgentPhases, JobEvent, JobId, JobResult, JobSpec};

use crate::client::{Client, ClientError, JobEvents, Refusal};
use crate::config::CoordinatorConfig;
use crate::repo::Repo;
use crate::server::Coordinator;

/// Where jobs submitted through a [`Route`] run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// The repository's coordinator (`buildpool serve`, or one another client started in
    /// the background).
    Coordinator,
    /// A coordinator this client just started in the background, because none was running
    /// (what it says about it: pid, idle time, log).
    Started(String),
    /// An in-process coordinator, because the repository's was unreachable (the reason).
    InProcess(String),
}

/// A connected client plus what it is connected to.
#[derive(Debug)]
pub struct Route {
    pub client: Client,
    pub via: Via,
}

/// Why a job could not be started. The texts are what a user or a model reads.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    InvalidSpec(#[from] buildpool_core::spec::SpecError),
    #[error("cannot snapshot the worktree: {0:#}")]
    Snapshot(anyhow::Error),
    #[error("cannot start a local coordinator: {0:#}")]
    Route(anyhow::Error),
    #[error("the coordinator refused the job: {0}")]
    Refused(ClientError),
}

/// Why a running job's session ended without a result.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("lost the coordinator while the job ran: {0}")]
    Lost(ClientError),
    #[error("the coordinator closed the stream before the job ended")]
    Closed,
    #[error(
        "lost the coordinator while job {job_id} ran and it did not come back within {} s \
         ({RECONNECT_TIMEOUT_ENV}); the job may still run: `buildpool logs {job_id}` once the \
         coordinator is back. Last error: {last}",
        waited.as_secs()
    )]
    Gone {
        job_id: JobId,
        waited: Duration,
        last: String,
    },
    #[error("the coordinator came back without job {0}: {1}")]
    Forgotten(JobId, ClientError),
}

/// Seconds a client waits for a lost coordinator to come back (default 60).
pub const RECONNECT_TIMEOUT_ENV: &str = "BUILDPOOL_RECONNECT_TIMEOUT";
const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest pause between two reconnect attempts.
const RECONNECT_BACKOFF_CAP: Duration = Duration::from_secs(2);
/// How long a reached coordinator may take to answer a Watch.
const WATCH_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client waits for a lost coordinator: [`RECONNECT_TIMEOUT_ENV`] or 60 s.
pub fn reconnect_timeout() -> Duration {
    std::env::var(RECONNECT_TIMEOUT_ENV)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RECONNECT_TIMEOUT, Duration::from_secs)
}

/// One attempt to reach the repository's coordinator again, found afresh through its
/// discovery file (a restarted coordinator may listen on other ports).
async fn reconnect(repo: &Repo) -> Result<Client, ClientError> {
    Client::connect_to_running(repo)
        .await
        .map(|(client, _)| client)
}

/// Starts jobs of one worktree; keeps a lazily started in-process coordinator for the
/// client's lifetime, so repeated jobs reuse its warm local agent.
#[derive(Debug)]
pub struct JobClient {
    repo: Repo,
    fallback: tokio::sync::Mutex<Option<(Coordinator, Client)>>,
}

impl JobClient {
    pub fn new(repo: Repo) -> Self {
        Self {
            repo,
            fallback: tokio::sync::Mutex::new(None),
        }
    }

    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// A client to the repository's coordinator if one answers, else to one it starts in
    /// the background, else (that failing, or `BUILDPOOL_BACKGROUND=off`) to the in-process
    /// one.
    pub async fn route(&self, force_local: bool) -> anyhow::Result<Route> {
        let reason = if force_local {
            "requested".to_owned()
        } else {
            match Client::connect_to_running(&self.repo).await {
                Ok((client, _)) => {
                    return Ok(Route {
                        client,
                        via: Via::Coordinator,
                    });
                }
                Err(ClientError::NotRunning(_)) => {
                    match crate::background::join(&self.repo).await {
                        Ok((client, started)) => {
                            let via =
                                started.map_or(Via::Coordinator, |s| Via::Started(s.to_string()));
                            return Ok(Route { client, via });
                        }
                        Err(reason) => reason,
                    }
                }
                Err(error) => error.to_string(),
            }
        };
        let mut fallback = self.fallback.lock().await;
        let client = match &*fallback {
            Some((_, client)) => client.clone(),
            None => {
                // A token of its own: only this process knows it.
                let token = crate::auth::Token {
                    value: crate::auth::generate()?,
                    file: None,
                    generated: true,
                };
                let config = CoordinatorConfig::in_process(&self.repo.worktree)?;
                let coordinator =
                    Coordinator::start(self.repo.clone(), config, token.clone()).await?;
                let url = format!("http://{}", coordinator.control_addr);
                let client = Client::connect(&url, &token.value, None).await?;
                fallback.insert((coordinator, client)).1.clone()
            }
        };
        Ok(Route {
            client,
            via: Via::InProcess(reason),
        })
    }

    /// Snapshots the worktree as it is now, routes and submits a job of `spec`.
    pub async fn start(&self, spec: JobSpec, force_local: bool) -> Result<JobSession, StartError> {
        buildpool_core::spec::validate(&spec)?;
        self.snapshot(force_local).await?.submit(spec).await
    }

    /// Snapshots the worktree as it is now and routes: jobs submitted through the answer
    /// all see that snapshot (the parts of one run see the same code).
    pub async fn snapshot(&self, force_local: bool) -> Result<Snapshotted, StartError> {
        let started = Instant::now();
        // The snapshot and dialling the coordinator need nothing of each other: at once,
        // the connection costs the job no time of its own.
        let snapshot = async {
            let snapshot = crate::snapshot::create(&self.repo).await;
            (snapshot, started.elapsed())
        };
        let ((snapshot, snapshot_time), route) = tokio::join!(snapshot, self.route(force_local));
        let snapshot = snapshot.map_err(|e| StartError::Snapshot(e.into()))?;
        let Route { client, via } = route.map_err(StartError::Route)?;
        Ok(Snapshotted {
            client,
            via,
            repo: self.repo.clone(),
            note: snapshot.skipped_note(),
            commit: snapshot.commit,
            git_ref: snapshot.git_ref,
            base_commit: snapshot.base_commit.unwrap_or_default(),
            started,
            snapshot_time,
            ready: started.elapsed(),
            ref_taken: AtomicBool::new(false),
        })
    }

    /// The in-process coordinator's client, if one is running.
    pub async fn fallback_client(&self) -> Option<Client> {
        self.fallback
            .lock()
            .await
            .as_ref()
            .map(|(_, client)| client.clone())
    }

    /// Stops the in-process coordinator, if one was started.
    pub async fn shutdown(&self) {
        if let Some((coordinator, _)) = self.fallback.lock().await.take() {
            coordinator.shutdown().await;
        }
    }
}

/// A snapshot taken and a coordinator reached: jobs on that snapshot are submitted here.
#[derive(Debug)]
pub struct Snapshotted {
    client: Client,
    via: Via,
    repo: Repo,
    note: Option<String>,
    commit: String,
    git_ref: String,
    base_commit: String,
    started: Instant,
    snapshot_time: Duration,
    /// When both the snapshot and the route were there, since `started`.
    ready: Duration,
    /// Whether a job holds `git_ref` already: each further one gets a ref of its own.
    ref_taken: AtomicBool,
}

impl Snapshotted {
    /// Submits a job of `spec` on the snapshot.
    pub async fn submit(&self, spec: JobSpec) -> Result<JobSession, StartError> {
        buildpool_core::spec::validate(&spec)?;
        let submitting = Instant::now();
        let git_ref = if self.ref_taken.swap(true, Ordering::Relaxed) {
            crate::snapshot::another_ref(&self.repo, &self.commit)
                .await
                .map_err(|error| StartError::Snapshot(error.into()))?
        } else {
            self.git_ref.clone()
        };
        let submission = Submission {
            spec,
            commit: self.commit.clone(),
            git_ref,
            worktree: self.repo.worktree.display().to_string(),
            base_commit: self.base_commit.clone(),
        };
        let events = self
            .client
            .submit(submission)
            .await
            .map_err(StartError::Refused)?;
        Ok(JobSession {
            client: self.client.clone(),
            via: self.via.clone(),
            repo: self.repo.clone(),
            events,
            job_id: None,
            output_seen: 0,
            lost_since: None,
            reconnect_timeout: reconnect_timeout(),
            cancel_requested: false,
            cancel_sent: None,
            snapshot_note: self.note.clone(),
            started: self.started,
            snapshot_time: self.snapshot_time,
            // Routing (what of it outlasted the snapshot) and this submit call.
            submit_time: self.ready.saturating_sub(self.snapshot_time) + submitting.elapsed(),
        })
    }

    /// What the snapshot left out of the worktree, if anything.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// Where the jobs run.
    pub fn via(&self) -> &Via {
        &self.via
    }
}

/// Where a job's time went, as its client saw it: the client's own steps, the queue, the
/// agent's phases, and the rest (assignment, the result's trip back, output draining).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub snapshot: Duration,
    pub submit: Duration,
    pub queued: Duration,
    pub phases: AgentPhases,
    pub rest: Duration,
    pub total: Duration,
}

impl Timings {
    /// Each phase with its name, in order.
    pub fn named(&self) -> [(&'static str, Duration); 10] {
        let phases = &self.phases;
        [
            ("snapshot", self.snapshot),
            ("submit", self.submit),
            ("queued", self.queued),
            ("workspace_wait", phases.workspace_wait),
            ("fetch", phases.fetch),
            ("checkout", phases.checkout),
            ("environment", phases.environment),
            ("cargo", phases.cargo),
            ("rest", self.rest),
            ("total", self.total),
        ]
    }
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .named()
            .iter()
            .map(|(name, duration)| format!("{name} {} ms", duration.as_millis()))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// One submitted job, from its first event to its result. Dropping it before the job ends
/// cancels the job (the coordinator cancels a job no client follows, after a grace). When
/// the repository's coordinator is lost mid-job, the session finds it again and resumes
/// the job's events where it left off (see [`JobSession::next_event`]).
#[derive(Debug)]
pub struct JobSession {
    client: Client,
    via: Via,
    repo: Repo,
    events: JobEvents,
    job_id: Option<JobId>,
    /// Output bytes received, both streams: where a resumed stream starts.
    output_seen: u64,
    /// Since when the coordinator is lost, while reconnecting.
    lost_since: Option<Instant>,
    reconnect_timeout: Duration,
    cancel_requested: bool,
    /// The cancel call in flight, if one was sent.
    cancel_sent: Option<tokio::task::JoinHandle<()>>,
    snapshot_note: Option<String>,
    started: Instant,
    snapshot_time: Duration,
    /// Routing (what of it outlasted the snapshot, which runs beside it) and the submit call.
    submit_time: Duration,
}

impl JobSession {
    /// What the snapshot left out of the worktree, if anything, in one line for the user.
    pub fn snapshot_note(&self) -> Option<&str> {
        self.snapshot_note.as_deref()
    }

    /// Where the time of a finished job went, from the snapshot to now.
    pub fn timings(&self, result: &JobResult) -> Timings {
        let total = self.started.elapsed();
        let phases = result.completion.phases;
        let accounted = self.snapshot_time
            + self.submit_time
            + result.queue_time
            + phases.workspace_wait
            + phases.fetch
            + phases.checkout
            + phases.environment
            + phases.cargo;
        Timings {
            snapshot: self.snapshot_time,
            submit: self.submit_time,
            queued: result.queue_time,
            phases,
            rest: total.saturating_sub(accounted),
            total,
        }
    }

    /// The connection the job was submitted through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Where the job was submitted.
    pub fn via(&self) -> &Via {
        &self.via
    }

    /// The job's id, once the coordinator has said it.
    pub fn job_id(&self) -> Option<JobId> {
        self.job_id
    }

    /// The next event; the last one is [`JobEvent::Finished`]. Cancel-safe, so it can race
    /// a Ctrl-C or a cancelled request in `select!`: an event is never lost, and an
    /// interrupted reconnect keeps its deadline.
    ///
    /// When the stream from the repository's coordinator breaks before the result, the
    /// session reconnects with backoff (rediscovering the coordinator) and resumes the job
    /// from the output it already has, so no output is repeated or missed; after
    /// [`reconnect_timeout`] without a coordinator it gives up with [`SessionError::Gone`].
    /// An in-process coordinator shares this process's fate: nothing to reconnect to.
    pub async fn next_event(&mut self) -> Result<JobEvent, SessionError> {
        loop {
            let lost = match self.events.next().await {
                Ok(Some((job_id, event))) => return Ok(self.received(job_id, event)),
                Ok(None) => SessionError::Closed,
                Err(error) => SessionError::Lost(error),
            };
            match (self.job_id, &self.via) {
                (Some(job_id), Via::Coordinator | Via::Started(_)) => {
                    self.resume(job_id, &lost).await?;
                }
                _ => return Err(lost),
            }
        }
    }

    /// Reconnects to the repository's coordinator until it follows the job again, within
    /// the reconnect deadline.
    async fn resume(&mut self, job_id: JobId, lost: &SessionError) -> Result<(), SessionError> {
        let since = *self.lost_since.get_or_insert_with(|| {
            tracing::warn!(
                job_id,
                "{lost}; reconnecting (for up to {} s)",
                self.reconnect_timeout.as_secs()
            );
            Instant::now()
        });
        let mut delay = Duration::from_millis(100);
        loop {
            let last = match reconnect(&self.repo).await {
                // The answer to a watch is its response headers: a coordinator that accepts
                // but never answers must not hold the client past its deadline.
                Ok(client) => match tokio::time::timeout(
                    WATCH_ANSWER_TIMEOUT,
                    client.watch(job_id, self.output_seen),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(ClientError::Unreachable {
                        url: "the coordinator".to_owned(),
                        reason: format!("no answer to Watch within {WATCH_ANSWER_TIMEOUT:?}"),
                    })
                }) {
                    Ok(events) => {
                        // A warning's pair: the user saw the loss, and reads that it is over.
                        tracing::warn!(
                            job_id,
                            "reconnected; following job {job_id} again after {} ms",
                            since.elapsed().as_millis()
                        );
                        self.client = client;
                        self.events = events;
                        return Ok(());
                    }
                    Err(
                        error @ ClientError::Call {
                            refusal: Refusal::NotFound,
                            ..
                        },
                    ) => {
                        return Err(SessionError::Forgotten(job_id, error));
                    }
                    Err(error) => error.to_string(),
                },
                Err(error) => error.to_string(),
            };
            let left = self.reconnect_timeout.saturating_sub(since.elapsed());
            if left.is_zero() {
                return Err(SessionError::Gone {
                    job_id,
                    waited: since.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(RECONNECT_BACKOFF_CAP);
        }
    }

    /// Takes note of an event before handing it out.
    fn received(&mut self, job_id: JobId, event: JobEvent) -> JobEvent {
        self.lost_since = None;
        if let JobEvent::Output { data, .. } = &event {
            self.output_seen += data.len() as u64;
        }
        if self.job_id.is_none() {
            self.job_id = Some(job_id);
            if self.cancel_requested {
                // The cancel came before the job had an id: send it now.
                self.send_cancel(job_id);
            }
        }
        event
    }

    /// Asks the coordinator to cancel the job, now or as soon as the job has an id. The
    /// session goes on: the job's end (usually cancelled) still arrives through
    /// [`JobSession::next_event`]. Returns the job id if it is known yet.
    pub fn cancel(&mut self) -> Option<JobId> {
        self.cancel_requested = true;
        let job_id = self.job_id?;
        self.send_cancel(job_id);
        Some(job_id)
    }

    /// Sends the cancel in a task of its own (bounded by the call deadline), so that
    /// neither an event nor the cancel is lost when the caller's `select!` moves on.
    fn send_cancel(&mut self, job_id: JobId) {
        let client = self.client.clone();
        self.cancel_sent = Some(tokio::spawn(async move {
            if let Err(error) = client.cancel(job_id).await {
                tracing::warn!(job_id, "cancel failed: {error}");
            }
        }));
    }

    /// Waits until the cancel sent, if any, reached the coordinator (or its call failed):
    /// a client leaving without waiting for the job's end leaves no job running. (`timeout`
    /// signals its command and then the command's whole process group: two signals at
    /// once, the second of which leaves.)
    pub async fn cancel_delivered(&mut self) {
        if let Some(sent) = self.cancel_sent.take() {
            let _ = sent.await;
        }
    }
}
