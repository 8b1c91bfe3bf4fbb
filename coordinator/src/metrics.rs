//! Prometheus metrics of a coordinator, served at `/metrics` on its HTTP address.
//!
//! Events are counted where they happen, with nothing but atomic increments (a job's end
//! is recorded by its own clean-up task, off the dispatch path). Gauges (queue depth,
//! agents, slots, disk) are not kept up to date at all: each scrape takes a [`PoolGauges`]
//! from the scheduler, briefly under the state lock, and encodes it after the lock is
//! released, so a scrape costs the pool one short lock and no bookkeeping in between.

use std::collections::HashSet;
use std::sync::Mutex;

use buildpool_core::job::OUTCOME_HELP;
use buildpool_core::{JobKind, JobResult};
use buildpool_service::metrics::seconds_histogram;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

type KindLabels = [(&'static str, &'static str); 1];
type EndLabels = [(&'static str, &'static str); 2];
type AgentLabels = [(&'static str, String); 1];
type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

/// What the pool looks like at one scrape; see the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolGauges {
    pub jobs_queued: u64,
    pub jobs_running: u64,
    /// Build agents, the embedded local agent left out.
    pub agents_connected: u64,
    pub slots_total: u64,
    pub slots_used: u64,
    /// Per agent id (the embedded local agent keeps no budget and is left out).
    pub disk: Vec<AgentDisk>,
    pub requeues: u64,
    pub lost_attempts: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentDisk {
    pub agent_id: String,
    pub used_bytes: u64,
    pub budget_bytes: u64,
}

/// The coordinator's event metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs_submitted: Family<KindLabels, Counter>,
    jobs_finished: Family<EndLabels, Counter>,
    queue_wait: Histograms<KindLabels>,
    run_duration: Histograms<KindLabels>,
    fetch_duration: Histogram,
    checkout_duration: Histogram,
    workspace_wait_duration: Histogram,
    environment_duration: Histogram,
    cargo_duration: Histograms<KindLabels>,
    delivery_duration: Histogram,
    agent_connections: Counter,
    agent_reconnects: Counter,
    declines: Counter,
    output_bytes: Counter,
    /// Agent ids seen since the coordinator started: a hello from one of them is a
    /// reconnect. Bounded by the fleet's size.
    seen_agents: Mutex<HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("buildpool");
        let jobs_submitted = Family::default();
        registry.register(
            "jobs_submitted",
            "Jobs submitted, by cargo subcommand",
            jobs_submitted.clone(),
        );
        let jobs_finished = Family::default();
        registry.register("jobs_finished", OUTCOME_HELP, jobs_finished.clone());
        let queue_wait: Histograms<KindLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register_with_unit(
            "job_queue_wait",
            "Time from submission to the first assignment, of ended jobs",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let run_duration: Histograms<KindLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register_with_unit(
            "job_run_duration",
            "Run time of ended jobs on their agent (fetch, checkout, environment and cargo)",
            Unit::Seconds,
            run_duration.clone(),
        );
        let fetch_duration = seconds_histogram();
        registry.register_with_unit(
            "snapshot_fetch_duration",
            "Time agents took to fetch a job's snapshot (zero when they had it)",
            Unit::Seconds,
            fetch_duration.clone(),
        );
        let checkout_duration = seconds_histogram();
        registry.register_with_unit(
            "checkout_duration",
            "Time agents took to check a job's snapshot out into its workspace",
            Unit::Seconds,
            checkout_duration.clone(),
        );
        let workspace_wait_duration = seconds_histogram();
        registry.register_with_unit(
            "workspace_wait_duration",
            "Time jobs waited on their agent for a workspace still held by an ending job",
            Unit::Seconds,
            workspace_wait_duration.clone(),
        );
        let environment_duration = seconds_histogram();
        registry.register_with_unit(
            "environment_duration",
            "Time agents took to choose and prepare a job's environment (the nix dev shell)",
            Unit::Seconds,
            environment_duration.clone(),
        );
        let cargo_duration: Histograms<KindLabels> =
            Family::new_with_constructor(seconds_histogram);
        registry.register_with_unit(
            "cargo_duration",
            "Time cargo itself ran on the agent, from spawn until its output was drained",
            Unit::Seconds,
            cargo_duration.clone(),
        );
        let delivery_duration = seconds_histogram();
        registry.register_with_unit(
            "job_delivery_duration",
            "Time from a job's assignment to its result beyond its run time on the agent: \
             sending the assignment and the result, and the agent starting the job",
            Unit::Seconds,
            delivery_duration.clone(),
        );
        let agent_connections = Counter::default();
        registry.register(
            "agent_connections",
            "Agent connections accepted (hello checked)",
            agent_connections.clone(),
        );
        let agent_reconnects = Counter::default();
        registry.register(
            "agent_reconnects",
            "Agent connections from an agent id seen before since the coordinator started",
            agent_reconnects.clone(),
        );
        let declines = Counter::default();
        registry.register(
            "declines",
            "Assignments agents declined (the job was requeued)",
            declines.clone(),
        );
        let output_bytes = Counter::default();
        registry.register_with_unit(
            "output",
            "Job output received from agents (stdout and stderr)",
            Unit::Bytes,
            output_bytes.clone(),
        );
        Self {
            registry,
            jobs_submitted,
            jobs_finished,
            queue_wait,
            run_duration,
            fetch_duration,
            checkout_duration,
            workspace_wait_duration,
            environment_duration,
            cargo_duration,
            delivery_duration,
            agent_connections,
            agent_reconnects,
            declines,
            output_bytes,
            seen_agents: Mutex::new(HashSet::new()),
        }
    }

    pub fn job_submitted(&self, kind: JobKind) {
        self.jobs_submitted
            .get_or_create(&[("kind", kind.cargo_subcommand())])
            .inc();
    }

    /// Records a job's end: outcome, its queue and run times, and its agent's phases.
    /// `since_assigned` is the time from its last assignment to its result, when known.
    pub fn job_finished(
        &self,
        kind: JobKind,
        result: &JobResult,
        since_assigned: Option<std::time::Duration>,
    ) {
        let kind_label = [("kind", kind.cargo_subcommand())];
        let completion = &result.completion;
        self.jobs_finished
            .get_or_create(&[
                ("kind", kind.cargo_subcommand()),
                ("outcome", completion.end.outcome()),
            ])
            .inc();
        if result.attempt == 0 {
            // It never ran: no queue time that ended, no run.
            return;
        }
        self.queue_wait
            .get_or_create(&kind_label)
            .observe(result.queue_time.as_secs_f64());
        self.run_duration
            .get_or_create(&kind_label)
            .observe(completion.duration.as_secs_f64());
        if completion.duration > std::time::Duration::ZERO {
            // Ended on its agent (not by a coordinator-side backstop): its phases are real.
            self.fetch_duration
                .observe(completion.phases.fetch.as_secs_f64());
            let phases = &completion.phases;
            self.checkout_duration
                .observe(phases.checkout.as_secs_f64());
            self.workspace_wait_duration
                .observe(phases.workspace_wait.as_secs_f64());
            self.environment_duration
                .observe(phases.environment.as_secs_f64());
            self.cargo_duration
                .get_or_create(&kind_label)
                .observe(phases.cargo.as_secs_f64());
            if let Some(since_assigned) = since_assigned {
                self.delivery_duration.observe(
                    since_assigned
                        .saturating_sub(completion.duration)
                        .as_secs_f64(),
                );
            }
        }
    }

    /// An agent's hello was accepted; the embedded local agent is not counted.
    pub fn agent_connected(&self, agent_id: &str) {
        self.agent_connections.inc();
        let known = !self
            .seen_agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(agent_id.to_owned());
        if known {
            self.agent_reconnects.inc();
        }
    }

    pub fn declined(&self) {
        self.declines.inc();
    }

    pub fn output(&self, bytes: usize) {
        self.output_bytes.inc_by(bytes as u64);
    }

    /// The OpenMetrics text of every metric, `gauges` included.
    pub fn encode(&self, gauges: &PoolGauges) -> String {
        let mut text = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail; the encoder's errors are `fmt::Error`s.
        let _ = encode_registry(&mut text, &self.registry)
            .and_then(|()| encode_registry(&mut text, &gauges.registry()))
            .and_then(|()| encode_eof(&mut text));
        text
    }
}

impl PoolGauges {
    /// A registry holding this scrape's values, encoded right after the event metrics.
    fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("buildpool");
        let gauge = |value: u64| {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            gauge
        };
        registry.register(
            "jobs_queued",
            "Jobs waiting for an agent (queue depth)",
            gauge(self.jobs_queued),
        );
        registry.register(
            "jobs_running",
            "Jobs assigned to an agent (or waiting for theirs to reconnect)",
            gauge(self.jobs_running),
        );
        registry.register(
            "agents_connected",
            "Connected build agents (the embedded local agent not counted)",
            gauge(self.agents_connected),
        );
        registry.register(
            "slots",
            "Job slots of the connected build agents",
            gauge(self.slots_total),
        );
        registry.register(
            "slots_used",
            "Job slots of the connected build agents running a job",
            gauge(self.slots_used),
        );
        let used = Family::<AgentLabels, Gauge>::default();
        let budget = Family::<AgentLabels, Gauge>::default();
        for disk in &self.disk {
            let labels = [("agent", disk.agent_id.clone())];
            used.get_or_create(&labels)
                .set(i64::try_from(disk.used_bytes).unwrap_or(i64::MAX));
            budget
                .get_or_create(&labels)
                .set(i64::try_from(disk.budget_bytes).unwrap_or(i64::MAX));
        }
        registry.register_with_unit(
            "agent_disk_used",
            "Disk used by an agent's workspaces and caches, as it last reported",
            Unit::Bytes,
            used,
        );
        registry.register_with_unit(
            "agent_disk_budget",
            "An agent's disk budget for workspaces and caches",
            Unit::Bytes,
            budget,
        );
        let counter = |value: u64| {
            let counter = Counter::<u64>::default();
            counter.inc_by(value);
            counter
        };
        registry.register(
            "requeues",
            "Jobs put back in the queue after a decline or a lost agent",
            counter(self.requeues),
        );
        registry.register(
            "lost_attempts",
            "Attempts whose agent went away and did not reattach them in time",
            counter(self.lost_attempts),
        );
        registry
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use buildpool_core::{AgentPhases, Completion, JobEnd};

    use super::*;

    #[test]
    fn a_finished_job_and_the_gauges_appear_in_the_text() {
        let metrics = Metrics::new();
        metrics.job_submitted(JobKind::Test);
        metrics.job_finished(
            JobKind::Test,
            &JobResult {
                completion: Completion {
                    end: JobEnd::Exited { code: 101 },
                    duration: Duration::from_secs(3),
                    env: None,
                    phases: AgentPhases {
                        fetch: Duration::from_millis(200),
                        environment: Duration::from_millis(250),
                        cargo: Duration::from_millis(2500),
                        ..AgentPhases::default()
                    },
                },
                agent_id: "worker-1".into(),
                attempt: 1,
                local: false,
                queue_time: Duration::from_millis(50),
            },
            Some(Duration::from_millis(3500)),
        );
        metrics.agent_connected("worker-1");
        metrics.agent_connected("worker-1");
        metrics.output(10);
        let text = metrics.encode(&PoolGauges {
            jobs_queued: 2,
            disk: vec![AgentDisk {
                agent_id: "worker-1".into(),
                used_bytes: 5,
                budget_bytes: 9,
            }],
            lost_attempts: 4,
            ..PoolGauges::default()
        });
        for line in [
            "buildpool_jobs_submitted_total{kind=\"test\"} 1",
            "buildpool_jobs_finished_total{kind=\"test\",outcome=\"failure\"} 1",
            "buildpool_job_run_duration_seconds_count{kind=\"test\"} 1",
            "buildpool_job_run_duration_seconds_sum{kind=\"test\"} 3.0",
            "buildpool_snapshot_fetch_duration_seconds_sum 0.2",
            "buildpool_environment_duration_seconds_sum 0.25",
            "buildpool_cargo_duration_seconds_sum{kind=\"test\"} 2.5",
            "buildpool_workspace_wait_duration_seconds_count 1",
            "buildpool_job_delivery_duration_seconds_sum 0.5",
            "buildpool_agent_connections_total 2",
            "buildpool_agent_reconnects_total 1",
            "buildpool_output_bytes_total 10",
            "buildpool_jobs_queued 2",
            "buildpool_agent_disk_used_bytes{agent=\"worker-1\"} 5",
            "buildpool_lost_attempts_total 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
