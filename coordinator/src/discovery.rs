//! How clients find the coordinator of their repository without flags.
//!
//! A running coordinator writes `coordinator.json` into `<common git dir>/buildpool/`. Every
//! worktree of a repository shares that directory, and two repositories never do, so
//! clients in any worktree find their own repository's coordinator and no other.
//! `BUILDPOOL_COORDINATOR=http://HOST:PORT` (or `https://` with
//! `BUILDPOOL_TLS_FINGERPRINT=sha256:...`) overrides the file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const COORDINATOR_ENV: &str = "BUILDPOOL_COORDINATOR";
const FILE_NAME: &str = "coordinator.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    pub pid: u32,
    pub coordinator_id: String,
    /// `http://127.0.0.1:PORT` of the gRPC control API.
    pub control_url: String,
    /// Actual job bus address (port resolved), if the coordinator runs one.
    pub websocket_addr: Option<String>,
    pub git_daemon_port: Option<u16>,
    /// Where the token lives, so clients on this host can read it.
    pub token_file: Option<PathBuf>,
    /// The certificate fingerprint agents and remote clients pin (`sha256:...`).
    #[serde(default)]
    pub tls_fingerprint: Option<String>,
    /// `http://127.0.0.1:PORT` (or `https://` beyond loopback) of the dashboard and
    /// `/metrics`.
    #[serde(default)]
    pub http_url: Option<String>,
    /// Started by a client in the background (it exits when idle), not by `buildpool serve`.
    #[serde(default)]
    pub background: bool,
}

/// Takes the repository's coordinator lock (`coordinator.lock`, an advisory file lock), or
/// returns `None` when another live process holds it. One coordinator per repository: two
/// would fight over the discovery file, the snapshot refs and the git daemon.
pub fn lock(state_dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    std::fs::create_dir_all(state_dir)?;
    try_lock(&state_dir.join("coordinator.lock"))
}

/// An advisory lock on the file `path` (created if missing), held while the returned file
/// lives; `None` when another live process holds it.
pub fn try_lock(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(error)) => Err(error),
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Reads the discovery file; a file left by a dead process counts as absent.
pub fn read(state_dir: &Path) -> Option<Discovery> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    let discovery: Discovery = serde_json::from_str(&text).ok()?;
    i32::try_from(discovery.pid)
        .is_ok_and(buildpool_core::process::alive)
        .then_some(discovery)
}

/// Writes the discovery file atomically (write then rename).
pub fn write(state_dir: &Path, discovery: &Discovery) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let temporary = state_dir.join(format!(".{FILE_NAME}.{}", std::process::id()));
    let text = serde_json::to_string_pretty(discovery).map_err(std::io::Error::other)?;
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path(state_dir))
}

/// Removes the discovery file if it is still ours.
pub fn remove(state_dir: &Path, coordinator_id: &str) {
    if std::fs::read_to_string(path(state_dir))
        .ok()
        .and_then(|text| serde_json::from_str::<Discovery>(&text).ok())
        .is_some_and(|d| d.coordinator_id == coordinator_id)
    {
        let _ = std::fs::remove_file(path(state_dir));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_holder_of_the_coordinator_lock_and_a_released_lock_is_taken_over() {
        let dir = tempfile::tempdir().expect("temp");
        let first = lock(dir.path()).expect("io").expect("free");
        assert!(lock(dir.path()).expect("io").is_none(), "held");
        drop(first);
        assert!(lock(dir.path()).expect("io").is_some(), "taken over");
    }

    #[test]
    fn a_dead_coordinators_file_is_ignored() {
        let dir = tempfile::tempdir().expect("temp");
        let mut discovery = Discovery {
            pid: std::process::id(),
            coordinator_id: "c1".into(),
            control_url: "http://127.0.0.1:1".into(),
            websocket_addr: None,
            git_daemon_port: None,
            token_file: None,
            tls_fingerprint: None,
            http_url: Some("http://127.0.0.1:2".into()),
            background: false,
        };
        write(dir.path(), &discovery).expect("write");
        assert_eq!(read(dir.path()), Some(discovery.clone()));
        discovery.pid = u32::MAX / 2;
        write(dir.path(), &discovery).expect("write");
        assert_eq!(read(dir.path()), None);
        remove(dir.path(), "other");
        assert!(path(dir.path()).exists(), "not ours to remove");
        remove(dir.path(), "c1");
        assert!(!path(dir.path()).exists());
    }
}
