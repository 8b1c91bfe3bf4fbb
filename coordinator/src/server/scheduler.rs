//! The scheduler: a pure state machine of agents, slots, jobs and attempts.
//!
//! No I/O, no clock, no locks: every input is a method call carrying `now`, every effect is
//! an [`Action`] the caller carries out. That keeps dispatch testable in isolation and makes
//! the fencing rule easy to see: a job's output and result are accepted only from the
//! connection that holds its current attempt.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use buildpool_core::bus::{Assignment, DiskUsage};
use buildpool_core::status::{AgentStatus, JobPlace, JobStatus};
use buildpool_core::{AttemptKey, Completion, JobEnd, JobEvent, JobId, JobResult, JobSpec, Source};

/// The agent id of the coordinator's embedded local agent; no remote agent may use it.
pub const LOCAL_AGENT_ID: &str = "local";
/// Identifies one agent connection; a reconnecting agent gets a new one, so the cleanup of
/// a stale connection can never touch its successor.
pub type ConnId = u64;

/// What an agent told us in its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRegistration {
    pub agent_id: String,
    pub labels: Vec<String>,
    pub system: String,
    pub slots_total: u32,
    pub slots_free: u32,
    pub draining: bool,
    /// The coordinator's embedded agent: used only while no other agent is connected.
    pub local: bool,
    pub address: String,
    pub connected_at_unix_ms: u64,
    /// Whether its jobs run in a sandbox.
    pub sandboxed: bool,
    /// Its disk use and budget, as last reported.
    pub disk: DiskUsage,
    /// What it holds that an impostor does not: its credential's name and the proof of
    /// its identity key. The agent id belongs to the first identity that registered it.
    pub identity: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Lost attempts (agent gone mid-job) before a job fails instead of being requeued.
    pub max_lost_attempts: u32,
    /// How long after a cancel the agent may take to confirm before we give up on it.
    pub cancel_grace: Duration,
    /// Extra time beyond a job's own timeout before the coordinator stops waiting.
    pub timeout_grace: Duration,
    /// Timeout of jobs that do not set one.
    pub default_timeout: Duration,
    /// How long the attempts of a vanished agent wait for it to reconnect and reattach them
    /// before they are requeued: a network blip must not rerun a five-minute build.
    pub reattach_grace: Duration,
    /// How long a job that no connected agent could run waits before it fails.
    pub unroutable_wait: Duration,
    /// Send a job to the agent whose workspace last built its worktree (or its base
    /// commit). Off, jobs go to the agent with the most free slots (for comparisons).
    pub affinity: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_lost_attempts: 3,
            cancel_grace: Duration::from_secs(10),
            timeout_grace: Duration::from_secs(30),
            default_timeout: Duration::from_secs(300),
            reattach_grace: Duration::from_secs(15),
            unroutable_wait: Duration::from_secs(60),
            affinity: true,
        }
    }
}

/// An effect for the caller to carry out, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Assign {
        conn: ConnId,
        assignment: Assignment,
    },
    Cancel {
        conn: ConnId,
        key: AttemptKey,
    },
    Event {
        job_id: JobId,
        event: JobEvent,
    },
    /// The agent should tell its coordinator-facing slot offer how much work waits here.
    Demand {
        conn: ConnId,
        queued: u32,
    },
    /// Stop taking jobs, finish the running ones, exit.
    Drain {
        conn: ConnId,
    },
    /// The connection is superseded (its agent reconnected); close it.
    Close {
        conn: ConnId,
    },
}

#[derive(Debug)]
struct Agent {
    registration: AgentRegistration,
    free: u32,
    running: u32,
    /// Last demand sent to this agent.
    demand_sent: Option<u32>,
    /// What its workspaces of this repository last built, as far as we know.
    workspaces: Workspaces,
}

/// A model of one agent's workspaces of this repository: what each last built (the agent
/// keeps one per slot and runs a job in the one that last built its worktree, else its
/// base commit, else the least recently used), so the scheduler can send a job where its
/// `target/` is warm. At most one entry per slot; the agent's own choice is the truth, this
/// is the best guess that needs no word from it.
#[derive(Debug, Clone, Default)]
struct Workspaces {
    built: Vec<Built>,
}

#[derive(Debug, Clone)]
struct Built {
    worktree: String,
    base_commit: String,
    /// The scheduler's assignment sequence number when it was last used: higher is newer.
    last_used: u64,
}

/// How warm an agent's workspaces are for one job; the greatest wins. Variants are in
/// ascending order of preference (the derived order compares them first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Warmth {
    /// Nothing related built there: its least recently used workspace is taken, and the
    /// older that is (a never used slot is oldest of all) the less warm work it throws away.
    Cold(Reverse<u64>),
    /// A workspace built the same base commit, most recently at this sequence number.
    SameBase(u64),
    /// A workspace built this worktree, most recently at this sequence number.
    SameWorktree(u64),
}

impl Workspaces {
    /// The workspace a job of `worktree` on `base_commit` reuses, and how warm it is for
    /// it: the one of the same worktree, else the newest of the same base commit.
    fn nearest(&self, worktree: &str, base_commit: &str) -> Option<(usize, Warmth)> {
        let newest = |matches: &dyn Fn(&Built) -> bool| {
            self.built
                .iter()
                .enumerate()
                .filter(|(_, built)| matches(built))
                .max_by_key(|(_, built)| built.last_used)
                .map(|(index, built)| (index, built.last_used))
        };
        if let Some((index, used)) =
            newest(&|built| !worktree.is_empty() && built.worktree == worktree)
        {
            return Some((index, Warmth::SameWorktree(used)));
        }
        newest(&|built| !base_commit.is_empty() && built.base_commit == base_commit)
            .map(|(index, used)| (index, Warmth::SameBase(used)))
    }

    fn warmth(&self, slots: u32, worktree: &str, base_commit: &str) -> Warmth {
        self.nearest(worktree, base_commit)
            .map(|(_, warmth)| warmth)
            .unwrap_or_else(|| {
                let oldest = self.least_recent(slots);
                Warmth::Cold(Reverse(oldest.map_or(0, |index| {
                    self.built.get(index).map_or(0, |built| built.last_used)
                })))
            })
    }

    /// The entry the next cold job replaces: `None` while a slot never used is left.
    fn least_recent(&self, slots: u32) -> Option<usize> {
        if self.built.len() < usize::try_from(slots).unwrap_or(usize::MAX) {
            return None;
        }
        self.built
            .iter()
            .enumerate()
            .min_by_key(|(_, built)| built.last_used)
            .map(|(index, _)| index)
    }

    /// A job of `worktree` on `base_commit` was sent there at sequence number `now`: it
    /// takes the workspace the agent picks by the same rule, [`Workspaces::nearest`], else
    /// the least recently used one.
    fn record(&mut self, slots: u32, worktree: &str, base_commit: &str, now: u64) {
        let built = Built {
            worktree: worktree.to_owned(),
            base_commit: base_commit.to_owned(),
            last_used: now,
        };
        let same = self.nearest(worktree, base_commit).map(|(index, _)| index);
        match same.or_else(|| self.least_recent(slots)) {
            Some(index) => {
                if let Some(entry) = self.built.get_mut(index) {
                    *entry = built;
                }
            }
            None => self.built.push(built),
        }
        // A slot count that shrank leaves no more entries than slots.
        while self.built.len() > usize::try_from(slots.max(1)).unwrap_or(usize::MAX) {
            if let Some(index) = self.least_recent(0) {
                self.built.swap_remove(index);
            }
        }
    }
}

/// The connected agents' workspace models inverted: for each worktree and each base
/// commit, the entries that built it by recency, with their agent's connection. A job's
/// warmest agent is then the newest entry whose agent has a free slot, found without
/// visiting the fleet: visiting every agent per job, under the state lock, makes each
/// dispatch cost grow with the fleet. Recency numbers are assignment numbers, so unique.
#[derive(Debug, Default)]
struct WarmIndex {
    by_worktree: HashMap<String, BTreeMap<u64, ConnId>>,
    by_base: HashMap<String, BTreeMap<u64, ConnId>>,
}

impl WarmIndex {
    fn add(&mut self, conn: ConnId, workspaces: &Workspaces) {
        for built in &workspaces.built {
            for (index, key) in [
                (&mut self.by_worktree, &built.worktree),
                (&mut self.by_base, &built.base_commit),
            ] {
                if !key.is_empty() {
                    index
                        .entry(key.clone())
                        .or_default()
                        .insert(built.last_used, conn);
                }
            }
        }
    }

    fn remove(&mut self, workspaces: &Workspaces) {
        for built in &workspaces.built {
            for (index, key) in [
                (&mut self.by_worktree, &built.worktree),
                (&mut self.by_base, &built.base_commit),
            ] {
                if let Some(entries) = index.get_mut(key) {
                    entries.remove(&built.last_used);
                    if entries.is_empty() {
                        index.remove(key);
                    }
                }
            }
        }
    }

    /// The connection of the newest entry for `worktree`, else for `base_commit`, among
    /// those `available` accepts.
    fn warmest(
        &self,
        worktree: &str,
        base_commit: &str,
        available: impl Fn(ConnId) -> bool,
    ) -> Option<ConnId> {
        [(&self.by_worktree, worktree), (&self.by_base, base_commit)]
            .into_iter()
            .filter(|(_, key)| !key.is_empty())
            .find_map(|(index, key)| {
                index
                    .get(key)?
                    .values()
                    .rev()
                    .copied()
                    .find(|conn| available(*conn))
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum JobState {
    Queued,
    Running {
        conn: ConnId,
        attempt: u32,
        started: Instant,
        cancel_sent: Option<Instant>,
    },
    /// The agent running the attempt disconnected; it may come back and reattach it.
    Orphaned {
        agent_id: String,
        attempt: u32,
        started: Instant,
        since: Instant,
    },
}

#[derive(Debug)]
struct Job {
    spec: JobSpec,
    source: Source,
    worktree: String,
    submitted: Instant,
    submitted_unix_ms: u64,
    first_assigned: Option<Instant>,
    attempt: u32,
    lost_attempts: u32,
    state: JobState,
    /// Since when no connected agent could run this queued job.
    unroutable_since: Option<Instant>,
}

/// A job read back from the coordinator's store after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoredJob {
    pub job_id: JobId,
    pub spec: JobSpec,
    pub source: Source,
    pub worktree: String,
    pub submitted_unix_ms: u64,
    /// The last attempt the store saw assigned.
    pub attempt: u32,
    pub lost_attempts: u32,
    /// The agent of that attempt, if it was running; `None` while queued.
    pub running_on: Option<String>,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    config: SchedulerConfig,
    /// Every job not yet ended, queued or running.
    jobs: HashMap<JobId, Job>,
    /// Queued jobs in the order they are offered: new ones at the back, a requeued one (its
    /// agent lost, or declining it) at the front, since it has waited longest.
    queue: VecDeque<JobId>,
    /// Connected agents by connection: a reconnected agent is a new connection, so an
    /// answer from its old one can never be taken for the new one's.
    agents: BTreeMap<ConnId, Agent>,
    /// Remote agents whose last demand sent was not zero (or who were sent none yet): while
    /// the queue is empty, the only ones a demand update has to visit, so an idle fleet of
    /// thousands costs nothing per job.
    demand_unsettled: BTreeSet<ConnId>,
    /// The workspace models of agents that disconnected, by agent id, taken back when they
    /// reconnect: their workspaces outlive the connection.
    departed: HashMap<String, Workspaces>,
    /// The connected agents' workspaces by what they built.
    warm: WarmIndex,
    /// Assignments made so far: the clock of workspace recency.
    assignments: u64,
    counters: Counters,
    /// Whose each remote agent id is (see [`Scheduler::refusal`]).
    claims: HashMap<String, Claim>,
}

/// The identity an agent id was registered with, and since when it is away.
#[derive(Debug)]
struct Claim {
    identity: String,
    /// `None` while a connection of the agent is up.
    away_since: Option<Instant>,
}

/// How long an agent id stays its agent's after the agent went away. Meanwhile only that
/// agent may take it (a reconnect after a blip or a restart); after it, another identity
/// may, so a reinstalled host with a new key gets its id back without a restart of the
/// coordinator. Its attempts are requeued long before (`reattach_grace`), so nothing of
/// the old agent's passes to the new one.
pub const IDENTITY_HOLD: Duration = Duration::from_secs(600);

/// Departed agents whose workspace models are kept; beyond it they are forgotten, which
/// costs those agents only their next job's affinity.
const MAX_DEPARTED: usize = 4096;

/// Events only the scheduler sees, counted since it started (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Jobs put back in the queue: declined, or their agent lost.
    pub requeues: u64,
    /// Attempts whose agent went away and did not reattach them in time.
    pub lost_attempts: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Why `registration` may not take its agent id; `None` when it may. An id belongs to
    /// the identity that registered it while that agent is connected, has attempts waiting
    /// for it to reattach them, or left less than [`IDENTITY_HOLD`] ago: an impostor holding
    /// some agent credential is refused and never takes over a connection or a job.
    pub fn refusal(&self, registration: &AgentRegistration, now: Instant) -> Option<String> {
        if registration.local {
            return None;
        }
        let claim = self.claims.get(&registration.agent_id)?;
        if claim.identity == registration.identity {
            return None;
        }
        let held = match claim.away_since {
            None => true,
            Some(since) => {
                now.saturating_duration_since(since) < IDENTITY_HOLD
                    || self.jobs.values().any(|job| {
                        matches!(&job.state, JobState::Orphaned { agent_id, .. } if *agent_id == registration.agent_id)
                    })
            }
        };
        held.then(|| {
            format!(
                "agent id {:?} belongs to another agent (it registered with another credential \
                 or identity key); give this agent an id of its own (--id). An agent whose \
                 identity key was lost may take its id {} min after the old one left",
                registration.agent_id,
                IDENTITY_HOLD.as_secs() / 60
            )
        })
    }

    /// An agent connected. If it is a reconnect, its earlier connections are closed, the
    /// attempts it reports are reattached when they are still its own, and it is told to
    /// stop the ones that are not.
    pub fn agent_connected(
        &mut self,
        conn: ConnId,
        registration: AgentRegistration,
        reports: &[AttemptKey],
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let superseded: Vec<ConnId> = self
            .agents
            .iter()
            .filter(|(_, agent)| {
                agent.registration.agent_id == registration.agent_id && !agent.registration.local
            })
            .map(|(c, _)| *c)
            .collect();
        for old in superseded {
            actions.push(Action::Close { conn: old });
            actions.extend(self.orphan_jobs_of(old, now));
        }
        let workspaces = self
            .departed
            .remove(&registration.agent_id)
            .unwrap_or_default();
        let free = registration.slots_free.min(registration.slots_total);
        let agent_id = registration.agent_id.clone();
        if !registration.local {
            self.demand_unsettled.insert(conn);
            self.claim(&registration, now);
        }
        self.warm.add(conn, &workspaces);
        self.agents.insert(
            conn,
            Agent {
                registration,
                free,
                running: 0,
                demand_sent: None,
                workspaces,
            },
        );
        for report in reports {
            let reattach = self.jobs.get(&report.job_id).is_some_and(|job| {
                matches!(&job.state, JobState::Orphaned { agent_id: a, attempt, .. } if *a == agent_id && *attempt == report.attempt)
            });
            if reattach {
                if let Some(job) = self.jobs.get_mut(&report.job_id)
                    && let JobState::Orphaned {
                        attempt, started, ..
                    } = job.state.clone()
                {
                    job.state = JobState::Running {
                        conn,
                        attempt,
                        started,
                        cancel_sent: None,
                    };
                }
                if let Some(agent) = self.agents.get_mut(&conn) {
                    agent.running += 1;
                }
            } else {
                actions.push(Action::Cancel { conn, key: *report });
            }
        }
        // Attempts this agent held but no longer reports are gone with it: requeue them now.
        let forgotten: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, job)| matches!(&job.state, JobState::Orphaned { agent_id: a, .. } if *a == agent_id))
            .map(|(id, _)| *id)
            .collect();
        for job_id in forgotten {
            actions.extend(self.lose_attempt(job_id, &agent_id, now));
        }
        actions.extend(self.dispatch(now));
        actions
    }

    /// A connection ended. Its attempts wait `reattach_grace` for the agent to come back.
    pub fn agent_disconnected(&mut self, conn: ConnId, now: Instant) -> Vec<Action> {
        let mut actions = self.orphan_jobs_of(conn, now);
        actions.extend(self.dispatch(now));
        actions
    }

    /// Records that `registration`'s identity holds its agent id, forgetting claims long
    /// expired once there are many.
    fn claim(&mut self, registration: &AgentRegistration, now: Instant) {
        if self.claims.len() >= MAX_DEPARTED {
            self.claims.retain(|_, claim| {
                claim
                    .away_since
                    .is_none_or(|since| now.saturating_duration_since(since) < IDENTITY_HOLD)
            });
        }
        self.claims.insert(
            registration.agent_id.clone(),
            Claim {
                identity: registration.identity.clone(),
                away_since: None,
            },
        );
    }

    fn orphan_jobs_of(&mut self, conn: ConnId, now: Instant) -> Vec<Action> {
        let Some(mut agent) = self.agents.remove(&conn) else {
            return Vec::new();
        };
        let agent_id = &agent.registration.agent_id;
        if !self
            .agents
            .values()
            .any(|other| other.registration.agent_id == *agent_id)
            && let Some(claim) = self.claims.get_mut(agent_id)
        {
            claim.away_since = Some(now);
        }
        self.demand_unsettled.remove(&conn);
        self.warm.remove(&agent.workspaces);
        if self.departed.len() >= MAX_DEPARTED {
            self.departed.clear();
        }
        self.departed.insert(
            agent.registration.agent_id.clone(),
            std::mem::take(&mut agent.workspaces),
        );
        let mut actions = Vec::new();
        let mut held: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, job)| matches!(job.state, JobState::Running { conn: c, .. } if c == conn))
            .map(|(id, _)| *id)
            .collect();
        held.sort_unstable();
        for job_id in held {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            let JobState::Running {
                attempt,
                started,
                cancel_sent,
                ..
            } = job.state
            else {
                continue;
            };
            if cancel_sent.is_some() {
                // It was being cancelled anyway.
                let completion = Completion::new(JobEnd::Cancelled);
                let ran_on = &agent.registration;
                actions.push(self.finish(job_id, completion, &ran_on.agent_id, ran_on.local, now));
            } else {
                job.state = JobState::Orphaned {
                    agent_id: agent.registration.agent_id.clone(),
                    attempt,
                    started,
                    since: now,
                };
            }
        }
        actions
    }

    /// The attempt is lost for good: requeue the job, or fail it after too many losses.
    fn lose_attempt(&mut self, job_id: JobId, agent_id: &str, now: Instant) -> Vec<Action> {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Vec::new();
        };
        job.lost_attempts += 1;
        self.counters.lost_attempts += 1;
        if job.lost_attempts >= self.config.max_lost_attempts {
            let error = format!(
                "agent {agent_id} was lost during attempt {}; gave up after {} lost attempts",
                job.attempt, job.lost_attempts
            );
            return vec![self.finish(job_id, Completion::failed(error), agent_id, false, now)];
        }
        job.state = JobState::Queued;
        self.queue.push_front(job_id);
        self.counters.requeues += 1;
        vec![Action::Event {
            job_id,
            event: JobEvent::Queued {
                position: 0,
                reason: format!("agent {agent_id} was lost; requeued"),
            },
        }]
    }

    /// Takes back the unfinished jobs of the coordinator that ran before this one, in
    /// submission order. Queued ones queue again. Running ones wait, like a lost link's
    /// attempts, `reattach_grace` from `now` for their agent to report them; those it does
    /// not report are requeued within the lost-attempt cap. A queued job's next attempt
    /// skips a number: the store may have missed an assignment that reached an agent just
    /// before the stop, and that attempt must not share a key with the next.
    pub fn restore(
        &mut self,
        jobs: Vec<RestoredJob>,
        now: Instant,
        now_unix_ms: u64,
    ) -> Vec<Action> {
        for restored in jobs {
            let age = Duration::from_millis(now_unix_ms.saturating_sub(restored.submitted_unix_ms));
            let (attempt, state) = match restored.running_on {
                Some(agent_id) => (
                    restored.attempt,
                    JobState::Orphaned {
                        agent_id,
                        attempt: restored.attempt,
                        started: now,
                        since: now,
                    },
                ),
                None => {
                    self.queue.push_back(restored.job_id);
                    (restored.attempt + 1, JobState::Queued)
                }
            };
            self.jobs.insert(
                restored.job_id,
                Job {
                    spec: restored.spec,
                    source: restored.source,
                    worktree: restored.worktree,
                    submitted: now.checked_sub(age).unwrap_or(now),
                    submitted_unix_ms: restored.submitted_unix_ms,
                    first_assigned: None,
                    attempt,
                    lost_attempts: restored.lost_attempts,
                    state,
                    unroutable_since: None,
                },
            );
        }
        self.dispatch(now)
    }

    /// A job's current attempt number and lost attempts, for the store.
    pub fn attempts(&self, job_id: JobId) -> Option<(u32, u32)> {
        self.jobs
            .get(&job_id)
            .map(|job| (job.attempt, job.lost_attempts))
    }

    /// The agent on `conn` reported its disk use; shown in status, it changes no decision.
    pub fn disk_changed(&mut self, conn: ConnId, disk: DiskUsage) {
        if let Some(agent) = self.agents.get_mut(&conn) {
            agent.registration.disk = disk;
        }
    }

    pub fn slots_changed(
        &mut self,
        conn: ConnId,
        free: u32,
        total: u32,
        draining: bool,
        now: Instant,
    ) -> Vec<Action> {
        if let Some(agent) = self.agents.get_mut(&conn) {
            agent.registration.slots_total = total;
            agent.registration.draining = draining;
            agent.free = free.min(total);
        }
        self.dispatch(now)
    }

    /// The connection is closing while its last results are applied: no job is placed on
    /// it any more (its offer is not read again).
    pub fn closing(&mut self, conn: ConnId) {
        if let Some(agent) = self.agents.get_mut(&conn) {
            agent.free = 0;
        }
    }

    pub fn submit(
        &mut self,
        job_id: JobId,
        spec: JobSpec,
        source: Source,
        worktree: String,
        now: Instant,
        now_unix_ms: u64,
    ) -> Vec<Action> {
        self.jobs.insert(
            job_id,
            Job {
                spec,
                source,
                worktree,
                submitted: now,
                submitted_unix_ms: now_unix_ms,
                first_assigned: None,
                attempt: 0,
                lost_attempts: 0,
                state: JobState::Queued,
                unroutable_since: None,
            },
        );
        self.queue.push_back(job_id);
        let mut actions = self.dispatch(now);
        if let Some(position) = self.queue.iter().position(|id| *id == job_id) {
            let reason = self.wait_reason(job_id);
            actions.insert(
                0,
                Action::Event {
                    job_id,
                    event: JobEvent::Queued {
                        position: u32::try_from(position).unwrap_or(u32::MAX),
                        reason,
                    },
                },
            );
        }
        actions
    }

    /// The agent could not take the attempt: the job goes back to the front of the queue,
    /// never to a failure. The agent gets no more work until it announces free slots.
    pub fn declined(&mut self, conn: ConnId, key: AttemptKey, now: Instant) -> Vec<Action> {
        if !self.holds(conn, key) {
            return Vec::new();
        }
        let job_id = key.job_id;
        if let Some(agent) = self.agents.get_mut(&conn) {
            agent.free = 0;
            agent.running = agent.running.saturating_sub(1);
        }
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.state = JobState::Queued;
            self.queue.push_front(job_id);
            self.counters.requeues += 1;
        }
        self.dispatch(now)
    }

    /// Whether `conn` holds attempt `key`, the job's current one: the fencing rule for
    /// output and results.
    pub fn holds(&self, conn: ConnId, key: AttemptKey) -> bool {
        self.jobs.get(&key.job_id).is_some_and(|job| {
            matches!(job.state, JobState::Running { conn: c, attempt: a, .. } if c == conn && a == key.attempt)
        })
    }

    /// A result arrived. It counts only if `conn` holds the job's current attempt.
    pub fn finished(
        &mut self,
        conn: ConnId,
        key: AttemptKey,
        completion: Completion,
        now: Instant,
    ) -> Vec<Action> {
        if !self.holds(conn, key) {
            return Vec::new();
        }
        let Some((agent_id, local)) = self.agent_of(conn) else {
            return Vec::new();
        };
        let mut actions = vec![self.finish(key.job_id, completion, &agent_id, local, now)];
        actions.extend(self.dispatch(now));
        actions
    }

    /// Cancels a job. Returns `None` if the job is unknown (or already ended).
    pub fn cancel(&mut self, job_id: JobId, now: Instant) -> Option<Vec<Action>> {
        let job = self.jobs.get_mut(&job_id)?;
        match job.state.clone() {
            JobState::Queued => {
                self.queue.retain(|id| *id != job_id);
                let completion = Completion::new(JobEnd::Cancelled);
                let mut actions = vec![self.finish_unassigned(job_id, completion, now)];
                actions.extend(self.dispatch(now));
                Some(actions)
            }
            JobState::Running {
                conn,
                attempt,
                started,
                cancel_sent: None,
            } => {
                job.state = JobState::Running {
                    conn,
                    attempt,
                    started,
                    cancel_sent: Some(now),
                };
                Some(vec![Action::Cancel {
                    conn,
                    key: AttemptKey::new(job_id, attempt),
                }])
            }
            JobState::Running { .. } => Some(Vec::new()),
            JobState::Orphaned { .. } => {
                // Its agent is gone; should it come back, the attempt is unknown and killed.
                let completion = Completion::new(JobEnd::Cancelled);
                Some(vec![self.finish_unassigned(job_id, completion, now)])
            }
        }
    }

    /// Asks every connection of `agent_id` to drain. Returns how many there were.
    pub fn drain(&mut self, agent_id: &str, now: Instant) -> (usize, Vec<Action>) {
        let mut actions = Vec::new();
        for (conn, agent) in &mut self.agents {
            if agent.registration.agent_id == agent_id && !agent.registration.local {
                agent.registration.draining = true;
                actions.push(Action::Drain { conn: *conn });
            }
        }
        let count = actions.len();
        actions.extend(self.dispatch(now));
        (count, actions)
    }

    /// Time passes: give up on agents that do not confirm a cancel, and on jobs far past
    /// their timeout (the agent enforces the timeout; this is the backstop).
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut overdue: Vec<(JobId, JobEnd)> = Vec::new();
        let mut lost: Vec<(JobId, String)> = Vec::new();
        for (job_id, job) in &self.jobs {
            match &job.state {
                JobState::Running {
                    started,
                    cancel_sent,
                    ..
                } => {
                    let timeout = job.spec.timeout_or(self.config.default_timeout);
                    if cancel_sent
                        .is_some_and(|sent| now.duration_since(sent) >= self.config.cancel_grace)
                    {
                        overdue.push((*job_id, JobEnd::Cancelled));
                    } else if now.duration_since(*started) >= timeout + self.config.timeout_grace {
                        overdue.push((*job_id, JobEnd::TimedOut));
                    }
                }
                JobState::Orphaned {
                    agent_id, since, ..
                } if now.duration_since(*since) >= self.config.reattach_grace => {
                    lost.push((*job_id, agent_id.clone()));
                }
                _ => {}
            }
        }
        overdue.sort_unstable_by_key(|(id, _)| *id);
        lost.sort_unstable();
        // The agent did not report the end in time: the job ends as it would have on the
        // agent, and the agent is told to stop it should it still run.
        for (job_id, end) in overdue {
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            let JobState::Running { conn, attempt, .. } = job.state else {
                continue;
            };
            let Some((agent_id, local)) = self.agent_of(conn) else {
                continue;
            };
            actions.push(Action::Cancel {
                conn,
                key: AttemptKey::new(job_id, attempt),
            });
            actions.push(self.finish(job_id, Completion::new(end), &agent_id, local, now));
        }
        for (job_id, agent_id) in lost {
            actions.extend(self.lose_attempt(job_id, &agent_id, now));
        }
        actions.extend(self.fail_unroutable(now));
        if !actions.is_empty() {
            actions.extend(self.dispatch(now));
        }
        actions
    }

    /// Fails queued jobs that no connected agent could ever run, once they waited long enough.
    fn fail_unroutable(&mut self, now: Instant) -> Vec<Action> {
        let remote = self.remote_available();
        let mut expired = Vec::new();
        for job_id in &self.queue {
            let Some(job) = self.jobs.get(job_id) else {
                continue;
            };
            let routable = self
                .agents
                .values()
                .any(|agent| self.could_run(agent, job, remote));
            let since = if routable {
                None
            } else {
                Some(job.unroutable_since.unwrap_or(now))
            };
            if since.is_some_and(|since| now.duration_since(since) >= self.config.unroutable_wait) {
                expired.push(*job_id);
            }
            if let Some(job) = self.jobs.get_mut(job_id) {
                job.unroutable_since = since;
            }
        }
        let mut actions = Vec::new();
        for job_id in expired {
            let reason = self.wait_reason(job_id);
            self.queue.retain(|id| *id != job_id);
            let error = format!(
                "no connected agent can run this job ({reason}); waited {} s",
                self.config.unroutable_wait.as_secs()
            );
            actions.push(self.finish_unassigned(job_id, Completion::failed(error), now));
        }
        actions
    }

    /// The id of the agent on `conn` and whether it is the embedded local agent.
    fn agent_of(&self, conn: ConnId) -> Option<(String, bool)> {
        let agent = self.agents.get(&conn)?;
        Some((
            agent.registration.agent_id.clone(),
            agent.registration.local,
        ))
    }

    pub fn agents(&self) -> Vec<AgentStatus> {
        self.agents
            .values()
            .map(|agent| {
                let registration = &agent.registration;
                AgentStatus {
                    id: registration.agent_id.clone(),
                    slots_total: registration.slots_total,
                    slots_used: agent.running,
                    labels: registration.labels.clone(),
                    system: registration.system.clone(),
                    connected_since_unix_ms: registration.connected_at_unix_ms,
                    local: registration.local,
                    draining: registration.draining,
                    address: registration.address.clone(),
                    sandboxed: registration.sandboxed,
                    disk: registration.disk,
                }
            })
            .collect()
    }

    /// Queued jobs in queue order, then running jobs by id.
    pub fn jobs(&self) -> Vec<JobStatus> {
        let summary = |job_id: JobId, job: &Job| JobStatus {
            job_id,
            kind: job.spec.kind,
            place: match job.state {
                JobState::Running { conn, attempt, .. } => {
                    self.agents
                        .get(&conn)
                        .map_or(JobPlace::Queued, |agent| JobPlace::Running {
                            agent_id: agent.registration.agent_id.clone(),
                            attempt,
                        })
                }
                JobState::Orphaned { .. } | JobState::Queued => JobPlace::Queued,
            },
            submitted_unix_ms: job.submitted_unix_ms,
            worktree: job.worktree.clone(),
            cargo_args: job.spec.cargo_args.clone(),
        };
        let mut running: Vec<JobStatus> = self
            .jobs
            .iter()
            .filter(|(_, job)| job.state != JobState::Queued)
            .map(|(id, job)| summary(*id, job))
            .collect();
        running.sort_unstable_by_key(|job| job.job_id);
        self.queue
            .iter()
            .filter_map(|id| self.jobs.get(id).map(|job| summary(*id, job)))
            .chain(running)
            .collect()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// `(queued, started)` jobs, without copying them: queued ones wait in the queue, the
    /// others run or wait for their agent to reconnect.
    pub fn job_counts(&self) -> (usize, usize) {
        let queued = self.queue.len();
        (queued, self.jobs.len().saturating_sub(queued))
    }

    /// Whether the embedded local agent is running a job right now.
    pub fn local_busy(&self) -> bool {
        self.agents
            .values()
            .any(|agent| agent.registration.local && agent.running > 0)
    }

    fn remote_available(&self) -> bool {
        self.agents
            .values()
            .any(|agent| !agent.registration.local && !agent.registration.draining)
    }

    /// Whether the agent could ever run the job (labels, local-fallback rule).
    fn could_run(&self, agent: &Agent, job: &Job, remote_available: bool) -> bool {
        Self::could_run_with(agent, &job.spec.required_labels, remote_available)
    }

    /// [`Scheduler::could_run`] for any job requiring `labels`.
    fn could_run_with(agent: &Agent, labels: &[String], remote_available: bool) -> bool {
        (!agent.registration.local || !remote_available)
            && labels
                .iter()
                .all(|label| agent.registration.labels.contains(label))
    }

    /// Whether the agent may be given the job now.
    fn eligible(&self, agent: &Agent, job: &Job, remote_available: bool) -> bool {
        Self::eligible_for(agent, &job.spec.required_labels, remote_available)
    }

    /// [`Scheduler::eligible`] for any job requiring `labels`.
    fn eligible_for(agent: &Agent, labels: &[String], remote_available: bool) -> bool {
        !agent.registration.draining && Self::could_run_with(agent, labels, remote_available)
    }

    fn wait_reason(&self, job_id: JobId) -> String {
        let Some(job) = self.jobs.get(&job_id) else {
            return String::new();
        };
        let remote = self.remote_available();
        let capable: Vec<&Agent> = self
            .agents
            .values()
            .filter(|a| self.eligible(a, job, remote))
            .collect();
        if self.agents.is_empty() {
            "no agents connected".to_owned()
        } else if capable.is_empty() {
            format!(
                "no connected agent has the labels {:?}",
                job.spec.required_labels
            )
        } else {
            let slots: u32 = capable.iter().map(|a| a.registration.slots_total).sum();
            format!("all {slots} slots of {} agent(s) busy", capable.len())
        }
    }

    /// The agent for `job` among those with a free slot: with affinity the warmest (see
    /// [`Warmth`]), then the one with the most free slots. A warm agent is looked up in the
    /// index; only when none is free are all agents visited.
    fn pick(&self, job: &Job, remote: bool) -> Option<ConnId> {
        let base_commit = &job.source.base_commit;
        if self.config.affinity {
            let available = |conn| {
                self.agents
                    .get(&conn)
                    .is_some_and(|agent| agent.free > 0 && self.eligible(agent, job, remote))
            };
            if let Some(conn) = self.warm.warmest(&job.worktree, base_commit, available) {
                return Some(conn);
            }
        }
        self.pick_by_visiting_all(job, remote)
    }

    /// [`Scheduler::pick`] by visiting every agent: the rule itself.
    fn pick_by_visiting_all(&self, job: &Job, remote: bool) -> Option<ConnId> {
        let base_commit = &job.source.base_commit;
        self.agents
            .iter()
            .filter(|(_, agent)| agent.free > 0 && self.eligible(agent, job, remote))
            .max_by_key(|(conn, agent)| {
                let warmth = self.config.affinity.then(|| {
                    let slots = agent.registration.slots_total;
                    agent.workspaces.warmth(slots, &job.worktree, base_commit)
                });
                (warmth, agent.free, Reverse(**conn))
            })
            .map(|(conn, _)| *conn)
    }

    /// Assigns queued jobs, first come first served, each to the agent [`Scheduler::pick`]
    /// chooses.
    ///
    /// Once no agent has a free slot, nothing more can be placed; and a job whose labels
    /// found no free agent tells the same of every later job with those labels (agents only
    /// fill up during one pass). Without these two, a long queue against a busy fleet cost a
    /// visit to every agent for every queued job at every event, under the state lock: at
    /// a thousand agents the coordinator fell behind its own queue and never caught up.
    fn dispatch(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let remote = self.remote_available();
        // Counted once a job finds no agent, not before: most passes place every job they
        // visit, and a walk over every agent at every event showed at a thousand agents.
        let mut free_slots: Option<u64> = None;
        let mut unplaceable: HashSet<Vec<String>> = HashSet::new();
        let mut index = 0;
        while index < self.queue.len() && free_slots != Some(0) {
            let job_id = self.queue[index];
            let Some(job) = self.jobs.get(&job_id) else {
                self.queue.remove(index);
                continue;
            };
            if unplaceable.contains(&job.spec.required_labels) {
                index += 1;
                continue;
            }
            let Some(conn) = self.pick(job, remote) else {
                unplaceable.insert(job.spec.required_labels.clone());
                free_slots.get_or_insert_with(|| {
                    self.agents
                        .values()
                        .map(|agent| u64::from(agent.free))
                        .sum()
                });
                index += 1;
                continue;
            };
            self.queue.remove(index);
            let Some(agent) = self.agents.get_mut(&conn) else {
                continue;
            };
            agent.free -= 1;
            agent.running += 1;
            if let Some(free) = &mut free_slots {
                *free -= 1;
            }
            // The agent counts an assignment it takes against the demand it was told.
            agent.demand_sent = agent.demand_sent.map(|sent| sent.saturating_sub(1));
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            self.assignments += 1;
            let slots = agent.registration.slots_total;
            self.warm.remove(&agent.workspaces);
            agent.workspaces.record(
                slots,
                &job.worktree,
                &job.source.base_commit,
                self.assignments,
            );
            self.warm.add(conn, &agent.workspaces);
            job.attempt += 1;
            job.first_assigned.get_or_insert(now);
            job.state = JobState::Running {
                conn,
                attempt: job.attempt,
                started: now,
                cancel_sent: None,
            };
            actions.push(Action::Event {
                job_id,
                event: JobEvent::Assigned {
                    agent_id: agent.registration.agent_id.clone(),
                    attempt: job.attempt,
                    local: agent.registration.local,
                },
            });
            actions.push(Action::Assign {
                conn,
                assignment: Assignment {
                    key: AttemptKey::new(job_id, job.attempt),
                    spec: job.spec.clone(),
                    source: job.source.clone(),
                    worktree: job.worktree.clone(),
                },
            });
        }
        actions.extend(self.demand_updates(remote));
        actions
    }

    /// Tells each agent how many queued jobs it could take here, when that changed. Agents
    /// shared with other coordinators use it to share their slots fairly.
    ///
    /// The count goes up to the agent's slots: it cannot take more at once, and beyond that
    /// a queue that grows or shrinks tells it nothing. Uncapped, every change of a long
    /// queue was a word to every agent: with a thousand agents and thousands of jobs a
    /// second their queues filled and the coordinator closed them all as stopped reading.
    fn demand_updates(&mut self, remote: bool) -> Vec<Action> {
        let demands: Vec<(ConnId, u32)> = if self.queue.is_empty() {
            // Everyone's demand is zero: only those not told so yet need a word.
            self.demand_unsettled
                .iter()
                .map(|conn| (*conn, 0))
                .collect()
        } else {
            // Agents differ only in the labels they lack, so count the queue once per set
            // of required labels rather than once per agent.
            let mut by_labels: HashMap<&[String], u32> = HashMap::new();
            for job in self.queue.iter().filter_map(|id| self.jobs.get(id)) {
                *by_labels.entry(&job.spec.required_labels).or_default() += 1;
            }
            self.agents
                .iter()
                .filter(|(_, agent)| !agent.registration.local)
                .map(|(conn, agent)| {
                    let queued: u32 = by_labels
                        .iter()
                        .filter(|(labels, _)| Self::eligible_for(agent, labels, remote))
                        .map(|(_, count)| *count)
                        .sum();
                    (*conn, queued.min(agent.registration.slots_total))
                })
                .collect()
        };
        let mut actions = Vec::new();
        for (conn, queued) in demands {
            if let Some(agent) = self.agents.get_mut(&conn)
                && agent.demand_sent != Some(queued)
            {
                agent.demand_sent = Some(queued);
                actions.push(Action::Demand { conn, queued });
            }
            if queued == 0 {
                self.demand_unsettled.remove(&conn);
            } else {
                self.demand_unsettled.insert(conn);
            }
        }
        actions
    }

    fn finish(
        &mut self,
        job_id: JobId,
        completion: Completion,
        agent_id: &str,
        local: bool,
        now: Instant,
    ) -> Action {
        let Some(job) = self.jobs.remove(&job_id) else {
            return Action::Event {
                job_id,
                event: JobEvent::Finished(JobResult {
                    completion,
                    agent_id: agent_id.to_owned(),
                    attempt: 0,
                    local,
                    queue_time: Duration::ZERO,
                }),
            };
        };
        if let JobState::Running { conn, .. } = job.state
            && let Some(holder) = self.agents.get_mut(&conn)
        {
            holder.running = holder.running.saturating_sub(1);
        }
        let queue_time = job
            .first_assigned
            .unwrap_or(now)
            .duration_since(job.submitted);
        Action::Event {
            job_id,
            event: JobEvent::Finished(JobResult {
                completion,
                agent_id: agent_id.to_owned(),
                attempt: job.attempt,
                local,
                queue_time,
            }),
        }
    }

    fn finish_unassigned(&mut self, job_id: JobId, completion: Completion, now: Instant) -> Action {
        let job = self.jobs.remove(&job_id);
        let queue_time = job.map_or(Duration::ZERO, |job| now.duration_since(job.submitted));
        Action::Event {
            job_id,
            event: JobEvent::Finished(JobResult {
                completion,
                agent_id: String::new(),
                attempt: 0,
                local: false,
                queue_time,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
