//! Process liveness and process-group kills.
//!
//! Several parts of buildpool record a pid on disk (the discovery file, the git daemon's pid
//! file, the agent's running-job registry, private log directories) and must later tell a
//! live owner from a dead one, or kill what a dead owner left behind. These are the
//! primitives they share.

use std::path::PathBuf;

use rustix::process::{Pid, Signal, kill_process_group, test_kill_process};

/// The executable `program` on `PATH`, as the shell would find it.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The command that runs a program so that the kernel sends it `signal` (`KILL`, `TERM`)
/// when its parent dies, however the parent dies, `kill -9` included: `setpriv --pdeathsig
/// SIGNAL --` (util-linux), to be followed by the program and its arguments. `None` without
/// setpriv. The signal follows the thread that spawns the child, so spawn it from one that
/// lives as long as the parent (a runtime worker, not a blocking-pool thread).
pub fn parent_death_signal_prefix(signal: &str) -> Option<Vec<std::ffi::OsString>> {
    let setpriv = find_on_path("setpriv")?;
    Some(vec![
        setpriv.into(),
        "--pdeathsig".into(),
        signal.into(),
        "--".into(),
    ])
}

/// Whether a process with this pid exists (and we may signal it).
pub fn alive(pid: i32) -> bool {
    Pid::from_raw(pid).is_some_and(|pid| test_kill_process(pid).is_ok())
}

/// Asks every process of group `pgid` to stop (SIGTERM).
pub fn terminate_group(pgid: i32) {
    signal_group(pgid, Signal::TERM);
}

/// Kills every process of group `pgid` (SIGKILL).
pub fn kill_group(pgid: i32) {
    signal_group(pgid, Signal::KILL);
}

/// A group that is already gone (ESRCH) is not an error: it is what every caller wants.
fn signal_group(pgid: i32, signal: Signal) {
    if let Some(group) = Pid::from_raw(pgid) {
        let _ = kill_process_group(group, signal);
    }
}
