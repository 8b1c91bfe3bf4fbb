//! Nix: store prewarming at start-up and the dev-shell environment, cached per flake.
//!
//! Evaluating a flake's dev shell costs seconds; doing it for every job would make each job
//! pay. The environment `nix print-dev-env` reports is cached per hash of `flake.nix` and
//! `flake.lock`, and cargo then runs directly in that environment, as `nix develop
//! --command` would run it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `nix` with the flakes features enabled whatever the host's nix.conf says.
const NIX_FEATURES: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];
const EVAL_TIMEOUT: Duration = Duration::from_secs(600);
const PREWARM_TIMEOUT: Duration = Duration::from_secs(1800);

/// Variables `nix develop` does not take from the dev shell (nix's own list).
const IGNORED_VARS: &[&str] = &[
    "BASHOPTS",
    "HOME",
    "NIX_BUILD_TOP",
    "NIX_ENFORCE_PURITY",
    "NIX_LOG_FD",
    "NIX_REMOTE",
    "PPID",
    "SHELLOPTS",
    "SSL_CERT_FILE",
    "TEMP",
    "TEMPDIR",
    "TERM",
    "TMP",
    "TMPDIR",
    "TZ",
    "UID",
];

pub type DevEnv = Arc<Vec<(OsString, OsString)>>;

/// Dev-shell environments by flake hash.
#[derive(Debug, Default)]
pub struct DevEnvCache {
    envs: Mutex<HashMap<u64, DevEnv>>,
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cache key of a checkout: its `flake.nix` and `flake.lock`.
pub fn flake_key(src: &Path) -> u64 {
    let nix = std::fs::read(src.join("flake.nix")).unwrap_or_default();
    let lock = std::fs::read(src.join("flake.lock")).unwrap_or_default();
    fnv1a(&lock, fnv1a(&nix, 0xcbf2_9ce4_8422_2325) ^ 0x2f)
}

/// Turns `nix print-dev-env --json` output into the variables cargo runs with. The dev
/// shell's `PATH` comes first, the agent's own `PATH` after it, as in `nix develop`.
pub fn parse_dev_env(
    json: &str,
    outer_path: Option<&std::ffi::OsStr>,
) -> Result<Vec<(OsString, OsString)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("unreadable print-dev-env output: {e}"))?;
    let variables = value["variables"]
        .as_object()
        .ok_or("print-dev-env output has no variables")?;
    let mut env = Vec::new();
    for (name, variable) in variables {
        if variable["type"] != "exported" || IGNORED_VARS.contains(&name.as_str()) {
            continue;
        }
        let Some(text) = variable["value"].as_str() else {
            continue;
        };
        let mut value = OsString::from(text);
        if name == "PATH"
            && let Some(outer) = outer_path
        {
            value.push(":");
            value.push(outer);
        }
        env.push((OsString::from(name), value));
    }
    Ok(env)
}

impl DevEnvCache {
    /// The dev-shell environment of the flake in `src`, evaluated once per flake hash.
    pub async fn get(&self, src: &Path) -> Result<(DevEnv, bool), String> {
        let key = flake_key(src);
        if let Some(env) = self
            .envs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return Ok((Arc::clone(env), true));
        }
        let mut flake = OsString::from("path:");
        flake.push(src);
        let mut command = tokio::process::Command::new("nix");
        command
            .args(NIX_FEATURES)
            .args(["print-dev-env", "--json"])
            .arg(flake)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(EVAL_TIMEOUT, command.output())
            .await
            .map_err(|_| format!("nix print-dev-env timed out after {EVAL_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot run nix: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!("nix print-dev-env failed: {}", tail.join("\n")));
        }
        let env = Arc::new(parse_dev_env(
            &String::from_utf8_lossy(&output.stdout),
            std::env::var_os("PATH").as_deref(),
        )?);
        self.envs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, Arc::clone(&env));
        Ok((env, false))
    }
}

/// Whether `nix` is on this agent's `PATH`.
pub fn installed() -> bool {
    buildpool_core::process::find_on_path("nix").is_some()
}

/// Realises `[nix] prewarm_packages` so the first job does not download toolchains. A
/// failure is logged, never fatal: jobs still run, only slower.
pub async fn prewarm(packages: Vec<String>) {
    if packages.is_empty() {
        return;
    }
    if !installed() {
        tracing::warn!("prewarm_packages are configured but nix is not installed; skipping");
        return;
    }
    for package in packages {
        let mut command = tokio::process::Command::new("nix");
        command
            .args(NIX_FEATURES)
            .args(["build", "--no-link", &package])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match tokio::time::timeout(PREWARM_TIMEOUT, command.output()).await {
            Ok(Ok(output)) if output.status.success() => tracing::info!(%package, "prewarmed"),
            Ok(Ok(output)) => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                tracing::warn!(%package, "prewarm failed: {}", stderr.lines().last().unwrap_or("no output"));
            }
            Ok(Err(error)) => tracing::warn!(%package, "prewarm failed: {error}"),
            Err(_) => tracing::warn!(%package, "prewarm timed out after {PREWARM_TIMEOUT:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_variables_become_the_job_environment() {
        let json = r#"{"variables": {
            "PATH": {"type": "exported", "value": "/nix/store/x-cargo/bin"},
            "RUSTFLAGS": {"type": "exported", "value": "-C opt-level=1"},
            "HOME": {"type": "exported", "value": "/homeless-shelter"},
            "TMPDIR": {"type": "exported", "value": "/tmp/nix-build"},
            "BASH": {"type": "var", "value": "/bin/bash"},
            "ARRAY": {"type": "array", "value": ["a"]}
        }}"#;
        let env = parse_dev_env(json, Some(std::ffi::OsStr::new("/usr/bin"))).expect("parses");
        assert_eq!(
            env,
            vec![
                (
                    OsString::from("PATH"),
                    OsString::from("/nix/store/x-cargo/bin:/usr/bin")
                ),
                (
                    OsString::from("RUSTFLAGS"),
                    OsString::from("-C opt-level=1")
                ),
            ]
        );
        assert!(parse_dev_env("not json", None).is_err());
    }

    #[test]
    fn the_cache_key_follows_flake_nix_and_flake_lock() {
        let dir = tempfile::tempdir().expect("temp");
        std::fs::write(dir.path().join("flake.nix"), "a").expect("write");
        let first = flake_key(dir.path());
        std::fs::write(dir.path().join("other.rs"), "changes nothing").expect("write");
        assert_eq!(flake_key(dir.path()), first);
        std::fs::write(dir.path().join("flake.lock"), "{}").expect("write");
        assert_ne!(flake_key(dir.path()), first);
    }
}
