//! What a long-running service of buildpool needs, the same for `build-agent` and
//! `buildpool serve`: life under systemd ([`systemd`]: journald logging, readiness, status
//! and the watchdog) and the Prometheus conventions of their `/metrics` ([`metrics`]).
//!
//! It knows nothing of jobs or the bus, so neither binary borrows it from the other.

pub mod metrics;
pub mod systemd;
