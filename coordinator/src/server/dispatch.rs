//! The scheduler, the agent connections and the active jobs, behind one lock, and the
//! scheduler's actions carried out under it.
//!
//! All scheduling state sits behind one synchronous mutex, and nothing under it does I/O:
//! transports turn frames and requests into scheduler calls, and the scheduler's actions are
//! carried out by pushing frames into each connection's bounded queue (`try_send`). A queue
//! that is full means a wedged agent; that connection is closed and its jobs requeued, so
//! one half-open agent can never freeze dispatch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use buildpool_core::bus::{CoordinatorMessage, Welcome};
use buildpool_core::{AttemptKey, JobEvent, JobId};
use buildpool_proto::socket::{Outbox, SendError};

use super::active::ActiveJob;
use super::scheduler::{self, Action, ConnId, Scheduler};
use super::store::Store;

/// One agent connection, as the scheduler's actions reach it.
pub(crate) struct Connection {
    pub outbox: Outbox<CoordinatorMessage>,
    pub agent_id: String,
    /// What the agent presented, re-checked so a revoked credential ends its connections.
    pub credential: Option<String>,
}

/// Leaves the credential out.
impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("agent_id", &self.agent_id)
            .field("closed", &self.outbox.is_closed())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(crate) struct State {
    pub scheduler: Scheduler,
    pub connections: HashMap<ConnId, Connection>,
    pub jobs: HashMap<JobId, Arc<ActiveJob>>,
}

/// The one lock over scheduling, and what carries its actions out.
#[derive(Debug)]
pub(crate) struct Dispatch {
    state: Mutex<State>,
    next_conn: AtomicU64,
    /// Records the transitions a restart needs; `None` for an in-process coordinator.
    store: Option<Arc<Store>>,
}

impl Dispatch {
    pub fn new(scheduler: Scheduler, store: Option<Arc<Store>>) -> Self {
        Self {
            state: Mutex::new(State {
                scheduler,
                connections: HashMap::new(),
                jobs: HashMap::new(),
            }),
            next_conn: AtomicU64::new(1),
            store,
        }
    }

    /// Locks the state. A panic while holding the lock is a bug, but it must not take the
    /// whole coordinator down with poisoned-lock panics, so poisoning is ignored.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a connection and its agent in one step, so no action can find one without
    /// the other.
    ///
    /// Refused, with the reason, when the agent id belongs to another agent
    /// ([`Scheduler::refusal`]): the check and the registration are one step, so two
    /// claims on one id cannot both pass. `welcome` is queued first when it is not.
    pub fn register(
        &self,
        conn: ConnId,
        connection: Connection,
        registration: scheduler::AgentRegistration,
        reports: &[AttemptKey],
        welcome: Welcome,
    ) -> Result<(), String> {
        let mut state = self.state();
        if let Some(reason) = state.scheduler.refusal(&registration, Instant::now()) {
            return Err(reason);
        }
        let _ = connection
            .outbox
            .try_send(CoordinatorMessage::Welcome(welcome));
        state.connections.insert(conn, connection);
        let actions = state
            .scheduler
            .agent_connected(conn, registration, reports, Instant::now());
        self.apply(&mut state, actions);
        Ok(())
    }

    /// Removes a connection and its agent in one step (see [`Dispatch::register`]).
    pub fn unregister(&self, conn: ConnId) {
        let mut state = self.state();
        state.connections.remove(&conn);
        let actions = state.scheduler.agent_disconnected(conn, Instant::now());
        self.apply(&mut state, actions);
    }

    /// Runs one scheduler step and carries out its actions, all under the lock.
    pub fn step<R>(&self, f: impl FnOnce(&mut Scheduler) -> (R, Vec<Action>)) -> R {
        let mut state = self.state();
        let (result, actions) = f(&mut state.scheduler);
        self.apply(&mut state, actions);
        result
    }

    /// Carries out actions under the lock: frames go to connection queues and job state
    /// changes to the store's queue (neither waits). The store records what a restart needs:
    /// a job's assignment, its requeue and its end.
    fn apply(&self, state: &mut State, actions: Vec<Action>) {
        for action in actions {
            if let (Some(store), Action::Event { job_id, event }) = (&self.store, &action) {
                match event {
                    JobEvent::Assigned {
                        agent_id, attempt, ..
                    } => store.assigned(*job_id, agent_id, *attempt),
                    JobEvent::Queued { .. } => {
                        if let Some((attempt, lost)) = state.scheduler.attempts(*job_id) {
                            store.requeued(*job_id, attempt, lost);
                        }
                    }
                    JobEvent::Finished(result) => store.finished(*job_id, result),
                    JobEvent::Output { .. } => {}
                }
            }
            match action {
                Action::Assign { conn, assignment } => {
                    Self::send(
                        state,
                        conn,
                        CoordinatorMessage::Assign(Box::new(assignment)),
                    );
                }
                Action::Cancel { conn, key } => {
                    Self::send(state, conn, CoordinatorMessage::Cancel(key));
                }
                Action::Demand { conn, queued } => {
                    Self::send(state, conn, CoordinatorMessage::Demand { queued });
                }
                Action::Drain { conn } => Self::send(state, conn, CoordinatorMessage::Drain),
                Action::Close { conn } => {
                    if let Some(connection) = state.connections.get(&conn) {
                        tracing::info!(conn, agent_id = %connection.agent_id, "superseded by a newer connection of the same agent; closing");
                        connection.outbox.close();
                    }
                }
                Action::Event { job_id, event } => {
                    let job = if matches!(event, JobEvent::Finished(_)) {
                        state.jobs.remove(&job_id)
                    } else {
                        state.jobs.get(&job_id).cloned()
                    };
                    if let Some(job) = job {
                        // A job's one line at the default level is written by its own
                        // task when it ends (`jobs::supervise`), not here under the lock.
                        tracing::debug!(job_id, ?event, "job event");
                        job.phase.send_replace(event);
                    }
                }
            }
        }
    }

    /// Queues a frame for a connection without waiting. A full queue means the agent stopped
    /// reading: close it rather than wait; its attempts are then orphaned like any lost link's.
    /// (Registration and removal are atomic with the scheduler, so an action never names a
    /// connection that is gone.)
    fn send(state: &State, conn: ConnId, message: CoordinatorMessage) {
        match state.connections.get(&conn) {
            Some(connection) => match connection.outbox.try_send(message) {
                Ok(()) | Err(SendError::Closed) => {}
                Err(SendError::Full) => {
                    tracing::warn!(conn, agent_id = %connection.agent_id, "agent stopped reading (queue full); closing the connection");
                    connection.outbox.close();
                }
            },
            None => tracing::error!(conn, "no connection for a scheduler action; this is a bug"),
        }
    }
}
