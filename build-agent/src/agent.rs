//! The agent runtime: one job table and one executor, shared by all coordinator links.
//!
//! Jobs belong to the agent, not to a connection: when a link drops mid-job the job keeps
//! running, its output is kept (bounded, see [`crate::output`]) and its result is held
//! until the coordinator acknowledges it. The decisions (admission within the offer, slot
//! leases, cancel, held results) are made by the pure [`JobTable`]; this module carries
//! them out: it starts job tasks, keeps their cancel tokens and unsent output, and knows
//! each link's current connection. The transport (`connection.rs`) only calls in here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use buildpool_core::bus::{
    AgentMessage, Assignment, DiskUsage, Hello, PROTOCOL_VERSION, SlotOffer,
};
use buildpool_core::{AttemptKey, Completion, JobEnd};
use buildpool_proto::socket::Outbox;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::archives::ArchiveSource;
use crate::artifacts::Executables;
use crate::executor::{Executor, ExecutorConfig, JobRequest};
use crate::git_cache::GitRemote;
use crate::job_table::{Admission, CancelEffect, Decline, Delivery, JobTable, LinkId, PoolView};
use crate::metrics::{AgentGauges, AgentMetrics, NotReady, Scrape};
use crate::output::{self, LinkOutbox};

/// How long jobs get to end after they were told to stop, before the agent exits anyway.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// Output chunks buffered between one job's process and its forwarder.
const JOB_OUTPUT_CAPACITY: usize = 16;

/// Who this agent is and what it offers.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub id: String,
    pub labels: Vec<String>,
    /// Nix system double, e.g. `x86_64-linux`.
    pub system: String,
    pub token: String,
    /// The identity key ([`crate::identity`]); empty for the coordinator's embedded agent,
    /// which proves nothing.
    pub key: Vec<u8>,
}

/// The Nix system double of this machine.
pub fn local_system() -> String {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    format!("{}-{os}", std::env::consts::ARCH)
}

/// One coordinator link of an agent, stable across reconnects; from
/// [`Agent::register_link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link(LinkId);

/// An attempt as the runtime tracks it next to the table.
type Slot = (LinkId, AttemptKey);

/// What the runtime keeps beside the table, under the same lock so the two never disagree.
#[derive(Debug, Default)]
struct State {
    table: JobTable,
    /// Stops a running attempt.
    cancels: HashMap<Slot, CancellationToken>,
    /// Output of ended attempts that could not be sent yet; sent before their result.
    unsent: HashMap<Slot, Vec<AgentMessage>>,
    /// Each link's current connection; a job's output follows it across reconnects.
    outboxes: Vec<watch::Sender<Option<Outbox<AgentMessage>>>>,
    /// Each link's proof of the identity key, made for its coordinator.
    proofs: Vec<String>,
    /// Each link's coordinator URL, for the metrics' `coordinator` label.
    coordinators: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    identity: AgentIdentity,
    executor: Executor,
    state: Mutex<State>,
    /// The pool as the table last left it; every connection watches it to announce offers.
    pool: watch::Sender<PoolView>,
    /// Every job task, so shutdown and drain can wait for them.
    tracker: TaskTracker,
    /// Cancels every job (shutdown).
    stop_jobs: CancellationToken,
    /// A coordinator asked this agent to drain.
    drain_requested: CancellationToken,
    metrics: AgentMetrics,
}

/// A build agent. Cheap to clone; clones share the job table and jobs.
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl Agent {
    pub fn new(identity: AgentIdentity, executor: ExecutorConfig) -> Self {
        let table = JobTable::new(u32::try_from(executor.slots).unwrap_or(u32::MAX));
        let pool = watch::channel(table.view()).0;
        Self {
            inner: Arc::new(Inner {
                identity,
                executor: Executor::new(executor),
                state: Mutex::new(State {
                    table,
                    ..State::default()
                }),
                pool,
                tracker: TaskTracker::new(),
                stop_jobs: CancellationToken::new(),
                drain_requested: CancellationToken::new(),
                metrics: AgentMetrics::new(),
            }),
        }
    }

    /// Disk use against the budget, for coordinators' status.
    pub fn disk_usage(&self) -> DiskUsage {
        self.inner.executor.disk_usage()
    }

    pub fn id(&self) -> &str {
        &self.inner.identity.id
    }

    /// The event metrics, for the transport to count reconnects in.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.inner.metrics
    }

    /// One line for the service manager's status: the slot pool now.
    pub fn status_line(&self) -> String {
        let pool = self.inner.pool.borrow();
        let draining = if pool.draining { ", draining" } else { "" };
        format!("{} of {} slots used{draining}", pool.used, pool.total)
    }

    /// The credential it presents to coordinators.
    pub fn token(&self) -> &str {
        &self.inner.identity.token
    }

    /// Locks the state. A panic under the lock is a bug, but it must not take every other
    /// job down with poisoned-lock panics, so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `change` on the table and publishes the pool if it changed. Publishing happens
    /// under the lock, so views are published in the order the table took them.
    fn with_table<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.state();
        let result = change(&mut state);
        let view = state.table.view();
        self.inner.pool.send_if_modified(|pool| {
            let changed = *pool != view;
            *pool = view;
            changed
        });
        result
    }

    /// Registers a link to the coordinator at `coordinator_url`; it keys fair slot sharing
    /// and held results. Only this hands out links, so every link the agent is given has
    /// its place in the state.
    pub fn register_link(&self, coordinator_url: &str) -> Link {
        let proof = if self.inner.identity.key.is_empty() {
            String::new()
        } else {
            crate::identity::proof(&self.inner.identity.key, coordinator_url)
        };
        let mut state = self.state();
        state.proofs.push(proof);
        state.coordinators.push(coordinator_url.to_owned());
        state.outboxes.push(watch::channel(None).0);
        Link(state.outboxes.len() - 1)
    }

    /// Watches the pool, to announce this agent's offer to a coordinator when it changes.
    pub fn watch_pool(&self) -> watch::Receiver<PoolView> {
        self.inner.pool.subscribe()
    }

    /// The offer to `link` in `pool`, as the bus carries it.
    pub fn offer(pool: &PoolView, Link(link): Link) -> SlotOffer {
        SlotOffer {
            free: pool.offer(link),
            total: pool.total,
            draining: pool.draining,
        }
    }

    /// The hello for a new connection of `link`: identity, offer and the attempts it holds.
    pub fn hello(&self, link: Link) -> Hello {
        let state = self.state();
        let identity = &self.inner.identity;
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: identity.id.clone(),
            token: identity.token.clone(),
            labels: identity.labels.clone(),
            system: identity.system.clone(),
            slots: Self::offer(&state.table.view(), link),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            attempts: state.table.held_attempts(link.0),
            sandboxed: self.inner.executor.sandboxed(),
            disk: self.inner.executor.disk_usage(),
            identity: state.proofs.get(link.0).cloned().unwrap_or_default(),
        }
    }

    /// A connection of `link` was welcomed: it carries the link from now on. Returns the
    /// messages it must send first: the results that ended while the link was down, each
    /// after its unsent output. Installing the connection and collecting them happen under
    /// one lock, as recording a result does, so no result falls between the two.
    pub fn link_up(&self, Link(link): Link, outbox: Outbox<AgentMessage>) -> Vec<AgentMessage> {
        self.with_table(|state| {
            let mut messages = Vec::new();
            for (key, completion) in state.table.link_up(link) {
                messages.extend(state.unsent.remove(&(link, key)).unwrap_or_default());
                messages.push(AgentMessage::Finished { key, completion });
            }
            if let Some(current) = state.outboxes.get(link) {
                current.send_replace(Some(outbox));
            }
            messages
        })
    }

    /// The connection of `link` ended. Its jobs keep running; their output waits.
    pub fn link_down(&self, Link(link): Link) {
        self.with_table(|state| {
            state.table.link_down(link);
            if let Some(current) = state.outboxes.get(link) {
                current.send_replace(None);
            }
        });
    }

    /// An assignment from `link`: starts the job within the link's offer, or says why not.
    /// `remote` is where this link's snapshots are fetched from.
    pub fn assign(
        &self,
        Link(link): Link,
        assignment: Assignment,
        remote: GitRemote,
        archives: Option<Arc<dyn ArchiveSource>>,
    ) -> Result<(), Decline> {
        let Assignment {
            key,
            spec,
            source,
            worktree,
        } = assignment;
        let missing: Vec<String> = spec
            .required_labels
            .iter()
            .filter(|label| !self.inner.identity.labels.contains(label))
            .cloned()
            .collect();
        // A job that cannot fit in the disk budget goes back to the coordinator whole,
        // before anything of it runs.
        let refusal = if missing.is_empty() {
            self.inner
                .executor
                .admit(&source.repo_id)
                .err()
                .map(|refusal| Decline::DiskBudget(refusal.to_string()))
        } else {
            Some(Decline::MissingLabels(missing))
        };
        let started = self
            .with_table(|state| match state.table.assign(link, key, refusal) {
                Admission::Start => {
                    let cancel = self.inner.stop_jobs.child_token();
                    state.cancels.insert((link, key), cancel.clone());
                    // Links come from `register_link`, so the outbox is there; were it not, the
                    // job would still run and end (its output unsent) rather than hold a slot.
                    let outbox = state
                        .outboxes
                        .get(link)
                        .map_or_else(|| watch::channel(None).1, watch::Sender::subscribe);
                    Ok(Some((cancel, outbox)))
                }
                Admission::AlreadyKnown => Ok(None),
                Admission::Declined(decline) => Err(decline),
            })
            .inspect_err(|decline| self.inner.metrics.declined(decline))?;
        if let Some((cancel, outbox)) = started {
            let request = JobRequest {
                key,
                spec,
                source,
                worktree,
                remote,
                archives,
            };
            let agent = self.clone();
            self.inner
                .tracker
                .spawn(async move { agent.run_job(link, request, cancel, outbox).await });
        }
        Ok(())
    }

    /// Runs one attempt to its end, then records its result. The executor returns only once
    /// the job's processes and workspace are gone, so the slot is freed after both. The
    /// attempt runs in a task of its own, so even a panic in it ends the attempt (failed)
    /// and frees its slot instead of holding it forever.
    async fn run_job(
        &self,
        link: LinkId,
        request: JobRequest,
        cancel: CancellationToken,
        outbox: LinkOutbox,
    ) {
        let (key, kind) = (request.key, request.spec.kind);
        let executor = self.inner.executor.clone();
        let attempt = tokio::spawn(async move {
            let (chunks, output) = mpsc::channel(JOB_OUTPUT_CAPACITY);
            let run = executor.run(&request, chunks, cancel);
            tokio::join!(run, output::forward(outbox, key, output))
        });
        let ((completion, executables), unsent) = match attempt.await {
            Ok(ended) => ended,
            Err(error) => {
                tracing::error!(
                    job_id = key.job_id,
                    attempt = key.attempt,
                    "job task failed: {error}"
                );
                (
                    (
                        Completion::failed(format!("the agent's job task failed: {error}")),
                        None,
                    ),
                    Vec::new(),
                )
            }
        };
        self.inner.metrics.job_ended(kind, &completion);
        if let JobEnd::Failed { reason } = &completion.end {
            tracing::warn!(
                job_id = key.job_id,
                attempt = key.attempt,
                "job failed: {reason}"
            );
        }
        self.attempt_ended(link, key, completion, unsent, executables)
            .await;
    }

    /// Records an attempt's end and delivers its result: now if the link is connected, else
    /// with the link's next connection. The result stays held until acknowledged either way.
    /// Executables go only with a result sent now: the coordinator then knows it has all of
    /// them or that some are missing, and the client says so instead of copying part.
    async fn attempt_ended(
        &self,
        link: LinkId,
        key: AttemptKey,
        completion: Completion,
        unsent: Vec<AgentMessage>,
        executables: Option<Executables>,
    ) {
        let mut unsent = Some(unsent);
        let send_now = self.with_table(|state| {
            state.cancels.remove(&(link, key));
            let delivery = state.table.attempt_ended(link, key, completion.clone());
            let outbox = state
                .outboxes
                .get(link)
                .and_then(|current| current.borrow().clone());
            match (delivery, outbox) {
                (Delivery::SendNow, Some(outbox)) if !outbox.is_closed() => Some(outbox),
                (Delivery::Dropped, _) => None,
                // Held, or connected through a connection that is already closing: the
                // output waits for the next connection, which also re-sends the result.
                _ => {
                    state
                        .unsent
                        .insert((link, key), unsent.take().unwrap_or_default());
                    None
                }
            }
        });
        let Some(outbox) = send_now else { return };
        let messages = unsent.unwrap_or_default().into_iter();
        let mut kept = Vec::new();
        let mut closed = false;
        let mut executables = executables;
        for message in messages.chain([AgentMessage::Finished { key, completion }]) {
            if let (false, AgentMessage::Finished { .. }, Some(executables)) =
                (closed, &message, executables.take())
            {
                closed = executables.send(&outbox, key).await.is_err();
            }
            if !closed {
                match outbox.reserve().await {
                    Ok(permit) => {
                        permit.send(message);
                        continue;
                    }
                    Err(_) => closed = true,
                }
            }
            // The result itself is held by the table and re-sent by the next connection.
            if matches!(message, AgentMessage::Output { .. }) {
                kept.push(message);
            }
        }
        if !kept.is_empty() {
            // The connection closed under us: the next one sends this output first.
            self.with_table(|state| {
                let held = state.table.held_attempts(link);
                if held
                    .iter()
                    .any(|attempt| attempt.key == key && attempt.finished)
                {
                    state.unsent.insert((link, key), kept);
                }
            });
        }
    }

    /// The coordinator of `link` cancels an attempt: stop it if it runs, forget its result if
    /// it ended.
    pub fn cancel(&self, Link(link): Link, key: AttemptKey) {
        self.with_table(|state| match state.table.cancel(link, key) {
            CancelEffect::Stop => {
                tracing::info!(job_id = key.job_id, attempt = key.attempt, "cancelling");
                if let Some(cancel) = state.cancels.get(&(link, key)) {
                    cancel.cancel();
                }
            }
            CancelEffect::Forgotten => {
                state.unsent.remove(&(link, key));
            }
            CancelEffect::Unknown => {}
        });
    }

    /// The coordinator of `link` has the result of `key`; it need not be kept any longer.
    pub fn result_acked(&self, Link(link): Link, key: AttemptKey) {
        self.with_table(|state| {
            state.table.result_acked(link, key);
            if !state.table.is_running(link, key) {
                state.unsent.remove(&(link, key));
            }
        });
    }

    /// The coordinator of `link` has `queued` jobs this agent could run.
    pub fn set_demand(&self, Link(link): Link, queued: u32) {
        self.with_table(|state| state.table.set_demand(link, queued));
    }

    /// A coordinator asked this agent to drain; the binary decides what that means.
    pub fn request_drain(&self) {
        self.inner.drain_requested.cancel();
    }

    /// Resolves when a coordinator asks this agent to drain.
    pub async fn drain_requested(&self) {
        self.inner.drain_requested.cancelled().await;
    }

    /// Stops taking jobs and waits up to `timeout` for the running ones to end and their
    /// results to be acknowledged; then stops whatever still runs. Returns whether every
    /// job ended on its own and every result got through.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.with_table(|state| state.table.set_draining());
        self.inner.tracker.close();
        let deadline = tokio::time::Instant::now() + timeout;
        let finished = tokio::time::timeout_at(deadline, self.inner.tracker.wait())
            .await
            .is_ok();
        if !finished {
            tracing::warn!("drain timeout of {timeout:?} reached; stopping the remaining jobs");
            self.stop().await;
            return false;
        }
        // Links keep reconnecting meanwhile, so a result held for a briefly lost
        // coordinator still gets through.
        while !self.state().table.is_idle() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    "drain timeout reached with results not acknowledged by their coordinators"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// Stops every job now and waits (briefly) for their groups to be gone.
    pub async fn stop(&self) {
        self.with_table(|state| state.table.set_draining());
        self.inner.stop_jobs.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(STOP_WAIT, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!("jobs did not stop within {STOP_WAIT:?}");
        }
    }
}

impl Scrape for Agent {
    /// Events so far, slots and disk use now.
    fn metrics_text(&self) -> String {
        let pool = self.inner.pool.borrow().clone();
        let demand = self
            .state()
            .coordinators
            .iter()
            .enumerate()
            .map(|(link, coordinator)| (coordinator.clone(), pool.demand(link)))
            .collect();
        self.inner.metrics.encode(&AgentGauges {
            slots_total: pool.total,
            slots_used: pool.used,
            draining: pool.draining,
            disk: self.disk_usage(),
            demand,
        })
    }

    /// Slots and links, read under the state lock every job and link change takes.
    fn liveness(&self) -> String {
        let state = self.state();
        let pool = state.table.view();
        format!(
            "{} of {} slots used, {} of {} coordinators connected{}",
            pool.used,
            pool.total,
            state.table.connected_links(),
            state.coordinators.len(),
            if pool.draining { ", draining" } else { "" }
        )
    }

    /// Ready while some coordinator can give it jobs and it takes them.
    fn readiness(&self) -> Result<(), NotReady> {
        let state = self.state();
        if state.table.view().draining {
            return Err(NotReady::Draining);
        }
        if state.table.connected_links() == 0 {
            return Err(NotReady::Disconnected {
                servers: state.coordinators.len(),
            });
        }
        Ok(())
    }
}
