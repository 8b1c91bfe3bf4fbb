//! Hostile configuration: whatever a config file says, both parsers answer with a
//! configuration or a clear error, never a panic. The files are generated from the real
//! sections and keys with values of every type, so the checks after parsing run too, not
//! only the TOML parser.

use std::path::Path;

use build_agent::config::{AgentConfig, Environment, FileConfig, Overrides as AgentOverrides};
use buildpool::config::{CoordinatorConfig, Overrides as CoordinatorOverrides};
use proptest::prelude::*;

/// The agent's sections and keys (seed keys and ours), plus one that does not exist.
const AGENT_KEYS: &[(&str, &[&str])] = &[
    ("server", &["url", "name", "tls_fingerprint", "tls_ca_file"]),
    (
        "[servers]",
        &["url", "name", "tls_fingerprint", "tls_ca_file"],
    ),
    (
        "worker",
        &[
            "id",
            "max_jobs",
            "labels",
            "drain_timeout_secs",
            "kill_grace_ms",
        ],
    ),
    ("storage", &["git_cache_dir", "worktree_dir"]),
    ("nix", &["prewarm_packages", "env"]),
    (
        "auth",
        &["token_file", "tls_client_cert_file", "tls_client_key_file"],
    ),
    ("bogus", &["key"]),
];

/// The coordinator's sections and keys, plus one that does not exist.
const COORDINATOR_KEYS: &[(&str, &[&str])] = &[
    (
        "build_pool",
        &[
            "enabled",
            "websocket_port",
            "websocket_listen_addr",
            "git_daemon_port",
            "git_daemon_listen_addr",
            "control_listen_addr",
            "token_file",
            "allow_insecure",
            "tls_cert_file",
            "tls_key_file",
            "tls_client_ca_file",
            "log_max_bytes",
        ],
    ),
    (
        "build_pool.local_fallback",
        &["enabled", "max_jobs", "worktree_dir"],
    ),
    (
        "build_pool.timeouts",
        &[
            "job_default_secs",
            "heartbeat_interval_secs",
            "heartbeat_timeout_secs",
            "reattach_grace_secs",
            "unroutable_wait_secs",
            "max_lost_attempts",
        ],
    ),
    ("build_pool", &["no_such_key"]),
];

/// A TOML value of any type, with the edge cases configs get wrong.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop_oneof![Just(0i64), Just(-1), Just(65_536), Just(u32::MAX.into())]
            .prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "\\PC{0,30}".prop_map(|text| format!("{text:?}")),
        prop_oneof![
            Just("\"ws://127.0.0.1:8081/ws\""),
            Just("\"wss://127.0.0.1:8081/ws\""),
            Just("\"sha256:00:11\""),
            Just("\"auto\""),
            Just("\"/\""),
            Just("1.5")
        ]
        .prop_map(str::to_owned),
        proptest::collection::vec("[a-z0-9:]{0,8}", 0..3).prop_map(|items| format!("{items:?}")),
    ]
}

/// A document of random sections from `keys`, each with random keys and values.
fn document(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = String> {
    let entry = (0..keys.len()).prop_flat_map(move |section| {
        let (name, names) = keys[section];
        (
            Just(name),
            proptest::collection::vec((proptest::sample::select(names), value()), 0..5),
        )
    });
    proptest::collection::vec(entry, 0..5).prop_map(|sections| {
        sections
            .into_iter()
            .map(|(name, pairs)| {
                let body: String = pairs
                    .iter()
                    .map(|(key, value)| format!("{key} = {value}\n"))
                    .collect();
                format!("[{name}]\n{body}")
            })
            .collect()
    })
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn the_agent_config_never_panics(text in document(AGENT_KEYS)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let token = write(dir.path(), "token", "secret\n");
        let path = write(dir.path(), "config.toml", &text);
        if let Ok(file) = build_agent::config::read_file(&path) {
            let file: FileConfig = file;
            let overrides = AgentOverrides { token_file: Some(token), ..AgentOverrides::default() };
            let _ = AgentConfig::resolve(file, &Environment::default(), overrides);
        }
    }

    #[test]
    fn the_coordinator_config_never_panics(text in document(COORDINATOR_KEYS)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write(dir.path(), "coordinator.toml", &text);
        let overrides = CoordinatorOverrides { config: Some(path), ..CoordinatorOverrides::default() };
        let _ = CoordinatorConfig::load(dir.path(), overrides);
    }
}
