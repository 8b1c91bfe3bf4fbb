//! Prometheus metrics of a build agent, served at `/metrics` on `[metrics] listen_addr`
//! (`--metrics-addr`); off by default. The same listener answers an orchestrator's probes
//! (deploy/kubernetes):
//!
//! - `/healthz` (liveness): 200 and one line about the agent whenever its runtime answers
//!   and its state can be read. It does not depend on any coordinator: restarting an agent
//!   whose coordinators are unreachable would not reach them, and would kill its jobs.
//! - `/readyz` (readiness): 200 while the agent is connected to at least one coordinator
//!   and not draining; otherwise 503 with the reason on one line.
//!
//! Events (a job's end, a decline, a reconnect) are counted where they happen with atomic
//! increments; slots and disk use are read at each scrape from the job table's published
//! view and the disk ledger, so nothing is kept up to date in between. The endpoint is
//! plain HTTP without a credential, like most exporters: it tells job counts and disk
//! use, nothing about what the jobs build.

use axum::http::{HeaderMap, StatusCode, header};
use buildpool_core::bus::DiskUsage;
use buildpool_core::job::OUTCOME_HELP;
use buildpool_core::{Completion, JobKind};
use buildpool_service::metrics::{response, seconds_histogram};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::job_table::Decline;

type KindLabels = [(&'static str, &'static str); 1];
type EndLabels = [(&'static str, &'static str); 2];
type ServerLabels = [(&'static str, String); 1];

/// What the agent looks like at one scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentGauges {
    pub slots_total: u32,
    pub slots_used: u32,
    pub draining: bool,
    pub disk: DiskUsage,
    /// Each coordinator (by URL) and the jobs waiting there that this agent could take.
    pub demand: Vec<(String, u32)>,
}

/// The agent's event metrics.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    jobs: Family<EndLabels, Counter>,
    run_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    fetch_duration: Histogram,
    checkout_duration: Histogram,
    declines: Family<KindLabels, Counter>,
    reconnects: Family<ServerLabels, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("build_agent");
        let jobs = Family::default();
        registry.register("jobs", OUTCOME_HELP, jobs.clone());
        let run_duration: Family<KindLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        registry.register_with_unit(
            "job_run_duration",
            "Run time of ended attempts (fetch, checkout, environment and cargo)",
            Unit::Seconds,
            run_duration.clone(),
        );
        let fetch_duration = seconds_histogram();
        registry.register_with_unit(
            "snapshot_fetch_duration",
            "Time to fetch a job's snapshot into the git cache (zero when it was there)",
            Unit::Seconds,
            fetch_duration.clone(),
        );
        let checkout_duration = seconds_histogram();
        registry.register_with_unit(
            "checkout_duration",
            "Time to check a job's snapshot out into its workspace",
            Unit::Seconds,
            checkout_duration.clone(),
        );
        let declines = Family::default();
        registry.register(
            "declines",
            "Assignments declined, by reason (draining, offered_elsewhere, busy, \
             missing_labels, disk_budget)",
            declines.clone(),
        );
        let reconnects = Family::default();
        registry.register(
            "reconnects",
            "Connections to a coordinator that ended and are dialled again, by server",
            reconnects.clone(),
        );
        Self {
            registry,
            jobs,
            run_duration,
            fetch_duration,
            checkout_duration,
            declines,
            reconnects,
        }
    }

    pub fn job_ended(&self, kind: JobKind, completion: &Completion) {
        let kind = kind.cargo_subcommand();
        self.jobs
            .get_or_create(&[("kind", kind), ("outcome", completion.end.outcome())])
            .inc();
        self.run_duration
            .get_or_create(&[("kind", kind)])
            .observe(completion.duration.as_secs_f64());
        self.fetch_duration
            .observe(completion.phases.fetch.as_secs_f64());
        self.checkout_duration
            .observe(completion.phases.checkout.as_secs_f64());
    }

    pub fn declined(&self, decline: &Decline) {
        let reason = match decline {
            Decline::Draining => "draining",
            Decline::OfferedElsewhere => "offered_elsewhere",
            Decline::Busy { .. } => "busy",
            Decline::MissingLabels(_) => "missing_labels",
            Decline::DiskBudget(_) => "disk_budget",
        };
        self.declines.get_or_create(&[("reason", reason)]).inc();
    }

    /// A connection to the server named `server` ended; the agent dials it again.
    pub fn reconnecting(&self, server: &str) {
        self.reconnects
            .get_or_create(&[("server", server.to_owned())])
            .inc();
    }

    /// The OpenMetrics text of every metric, `gauges` included.
    pub fn encode(&self, gauges: &AgentGauges) -> String {
        let mut now = Registry::with_prefix("build_agent");
        let gauge = |value: u64| {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            gauge
        };
        now.register("slots", "Job slots", gauge(u64::from(gauges.slots_total)));
        now.register(
            "slots_used",
            "Job slots running a job",
            gauge(u64::from(gauges.slots_used)),
        );
        now.register(
            "draining",
            "1 while the agent drains (takes no new jobs)",
            gauge(u64::from(gauges.draining)),
        );
        now.register_with_unit(
            "disk_used",
            "Disk used by workspaces and caches",
            Unit::Bytes,
            gauge(gauges.disk.used_bytes),
        );
        now.register_with_unit(
            "disk_budget",
            "Disk budget for workspaces and caches",
            Unit::Bytes,
            gauge(gauges.disk.budget_bytes),
        );
        // Every agent of a coordinator hears the same demand: an autoscaler takes the
        // maximum per coordinator and sums those (see deploy/kubernetes).
        let demand = Family::<ServerLabels, Gauge>::default();
        for (coordinator, jobs) in &gauges.demand {
            demand
                .get_or_create(&[("coordinator", coordinator.clone())])
                .set(i64::from(*jobs));
        }
        now.register(
            "demand",
            "Jobs waiting at a coordinator that this agent could take, at most its slots \
             (what the coordinator last said, less the ones taken since), by coordinator",
            demand,
        );
        let mut text = String::with_capacity(4 * 1024);
        // Writing into a String cannot fail; the encoder's errors are `fmt::Error`s.
        let _ = encode_registry(&mut text, &self.registry)
            .and_then(|()| encode_registry(&mut text, &now))
            .and_then(|()| encode_eof(&mut text));
        text
    }
}

/// Why an agent should not be given work now: `/readyz` answers 503 with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// Draining (SIGTERM, or a coordinator asked): it takes no new jobs.
    #[error("draining: no new jobs, running ones finish")]
    Draining,
    /// No coordinator has welcomed this agent (yet, or since its links dropped).
    #[error("not connected to any coordinator ({servers} configured)")]
    Disconnected { servers: usize },
}

/// What `/metrics`, `/healthz` and `/readyz` serve. The agent, which owns its metrics and
/// state, provides it: the endpoints need nothing else of the agent, and this module stays
/// beneath it.
pub trait Scrape {
    /// The metrics text of one scrape.
    fn metrics_text(&self) -> String;
    /// One line about the agent, read under the lock its work takes: a wedged agent's
    /// probe times out instead of answering.
    fn liveness(&self) -> String;
    /// Whether the agent can take jobs now, or why not.
    fn readiness(&self) -> Result<(), NotReady>;
}

/// Serves `/metrics`, `/healthz` and `/readyz` of `source` on `listener` until `shutdown`.
pub async fn serve(
    source: impl Scrape + Clone + Send + Sync + 'static,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let app = router(source);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::error!("metrics endpoint stopped: {error}");
    }
}

/// The routes of the metrics listener. Probe answers are plain text, one line.
fn router(source: impl Scrape + Clone + Send + Sync + 'static) -> axum::Router {
    let (live, ready) = (source.clone(), source.clone());
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move |headers: HeaderMap| {
                let text = source.metrics_text();
                async move { response(headers.get(header::ACCEPT), text) }
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || {
                let line = live.liveness();
                async move { (StatusCode::OK, format!("{line}\n")) }
            }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || {
                let answer = match ready.readiness() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                };
                async move { answer }
            }),
        )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use buildpool_core::{AgentPhases, JobEnd};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An agent as the endpoints see it, its readiness set by the test.
    #[derive(Clone)]
    struct Probed(Arc<Mutex<Result<(), NotReady>>>);

    impl Scrape for Probed {
        fn metrics_text(&self) -> String {
            AgentMetrics::new().encode(&AgentGauges::default())
        }

        fn liveness(&self) -> String {
            "0 of 2 slots used".to_owned()
        }

        fn readiness(&self) -> Result<(), NotReady> {
            self.0.lock().expect("lock").clone()
        }
    }

    /// `GET path` over HTTP/1.0: (status, body).
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a header end");
        let status = head.split(' ').nth(1).and_then(|code| code.parse().ok());
        (status.expect("a status"), body.to_owned())
    }

    #[tokio::test]
    async fn probes_answer_liveness_always_and_readiness_with_the_reason() {
        let readiness = Arc::new(Mutex::new(Err(NotReady::Disconnected { servers: 2 })));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let serving = tokio::spawn(serve(
            Probed(Arc::clone(&readiness)),
            listener,
            shutdown.clone(),
        ));

        // No coordinator reached: not ready, but alive (a restart would not reach one).
        assert_eq!(
            get(addr, "/readyz").await,
            (
                503,
                "not connected to any coordinator (2 configured)\n".to_owned()
            )
        );
        assert_eq!(
            get(addr, "/healthz").await,
            (200, "0 of 2 slots used\n".to_owned())
        );

        *readiness.lock().expect("lock") = Ok(());
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));

        // Draining: no new jobs, so not ready; alive, so its running jobs may finish.
        *readiness.lock().expect("lock") = Err(NotReady::Draining);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(
            body.starts_with("draining") && body.lines().count() == 1,
            "{body}"
        );
        assert_eq!(get(addr, "/healthz").await.0, 200);

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("build_agent_slots_used 0"), "{body}");
        assert_eq!(get(addr, "/nothing").await.0, 404);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("the endpoint stops")
            .expect("no panic");
    }

    #[test]
    fn events_and_gauges_appear_in_the_text() {
        let metrics = AgentMetrics::new();
        metrics.job_ended(
            JobKind::Build,
            &Completion {
                end: JobEnd::Exited { code: 0 },
                duration: Duration::from_secs(2),
                env: None,
                phases: AgentPhases {
                    checkout: Duration::from_millis(500),
                    ..AgentPhases::default()
                },
            },
        );
        metrics.declined(&Decline::Busy { total: 2 });
        metrics.reconnecting("main");
        let text = metrics.encode(&AgentGauges {
            slots_total: 4,
            slots_used: 1,
            draining: false,
            disk: DiskUsage {
                used_bytes: 10,
                budget_bytes: 100,
            },
            demand: vec![("wss://ws-host:8081/ws".to_owned(), 3)],
        });
        for line in [
            "build_agent_jobs_total{kind=\"build\",outcome=\"success\"} 1",
            "build_agent_job_run_duration_seconds_sum{kind=\"build\"} 2.0",
            "build_agent_checkout_duration_seconds_sum 0.5",
            "build_agent_declines_total{reason=\"busy\"} 1",
            "build_agent_reconnects_total{server=\"main\"} 1",
            "build_agent_slots 4",
            "build_agent_slots_used 1",
            "build_agent_disk_used_bytes 10",
            "build_agent_disk_budget_bytes 100",
            "build_agent_demand{coordinator=\"wss://ws-host:8081/ws\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
