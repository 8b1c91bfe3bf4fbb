//! The Prometheus conventions of our services' `/metrics`: how a scrape is answered, and
//! the buckets every duration histogram shares so that agent and coordinator series line
//! up on one dashboard.

use std::collections::HashSet;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// The content type of OpenMetrics text, which Prometheus asks for first.
pub const OPEN_METRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic Prometheus text format, for every other client.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets for durations from a tenth of a second to about an hour and a half, for every
/// duration histogram of agent and coordinator.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.5, 12))
}

/// The answer to a scrape: OpenMetrics `text` as is when the client accepts it (Prometheus
/// does), else in the classic text format (`promtool check metrics`, curl, older scrapers).
pub fn response(accept: Option<&HeaderValue>, text: String) -> Response {
    let open_metrics = accept
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if open_metrics {
        ([(header::CONTENT_TYPE, OPEN_METRICS)], text).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            classic_text(&text),
        )
            .into_response()
    }
}

/// OpenMetrics text in the classic format: a counter's family is named with its `_total`
/// suffix there, and `# UNIT` and `# EOF` do not exist.
pub fn classic_text(open_metrics: &str) -> String {
    let counters: HashSet<&str> = open_metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match descriptor {
            Some(renamed) => text.push_str(&renamed),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::{Registry, Unit};

    use super::*;

    #[test]
    fn the_classic_text_names_counters_with_total_and_drops_units_and_eof() {
        let mut registry = Registry::with_prefix("service");
        let jobs = Counter::<u64>::default();
        jobs.inc();
        registry.register("jobs", "Jobs", jobs);
        registry.register("slots", "Slots", Gauge::<i64>::default());
        registry.register_with_unit("wait", "Wait", Unit::Seconds, seconds_histogram());
        let mut text = String::new();
        encode(&mut text, &registry).expect("encodes");
        let classic = classic_text(&text);
        for line in [
            "# TYPE service_jobs_total counter",
            "# HELP service_jobs_total Jobs.",
            "# TYPE service_slots gauge",
            "service_jobs_total 1",
            "service_wait_seconds_count 0",
        ] {
            assert!(
                classic.lines().any(|l| l == line),
                "{line} missing in\n{classic}"
            );
        }
        assert!(
            !classic.contains("# EOF") && !classic.contains("# UNIT"),
            "{classic}"
        );
    }
}
