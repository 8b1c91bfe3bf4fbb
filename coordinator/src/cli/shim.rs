//! The `cargo` shim, for agents that are not Claude Code: `buildpool shim install DIR`
//! makes `DIR/cargo` a symlink to buildpool, and buildpool started under the name `cargo`
//! offloads what the hook offloads and execs the real cargo for everything else.
//!
//! A symlink rather than a script: it needs no shell, cannot drift from the binary it
//! points at, and the offloading rules are the hook's own (`crate::offload`).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::offload::{self, place};

/// Set to `off` to make the shim run the real cargo for everything.
pub const OFF_ENV: &str = "BUILDPOOL_SHIM";

/// What shell convention says for "command not found".
const EXIT_NOT_FOUND: u8 = 127;

#[derive(Debug, Args)]
pub struct ShimArgs {
    #[command(subcommand)]
    action: ShimAction,
}

#[derive(Debug, Subcommand)]
enum ShimAction {
    /// Write DIR/cargo (a symlink to this buildpool); put DIR first on the agent's PATH.
    Install { dir: PathBuf },
}

/// Whether this process was started as `cargo`, through the shim.
pub fn started_as_cargo() -> bool {
    std::env::args_os().next().is_some_and(|argv0| {
        Path::new(&argv0)
            .file_name()
            .is_some_and(|name| name == "cargo")
    })
}

/// This buildpool, as the shim links to it.
pub fn this_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe()
        .and_then(|exe| exe.canonicalize())
        .context("cannot tell where this buildpool is")
}

/// Makes `dir/cargo` a symlink to `exe`. `Ok(false)` when it is one already; an error when
/// something else has the name.
pub fn link(dir: &Path, exe: &Path) -> anyhow::Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let link = dir.join("cargo");
    if std::fs::symlink_metadata(&link).is_ok() {
        if link.canonicalize().is_ok_and(|target| target == exe) {
            return Ok(false);
        }
        bail!(
            "{} exists and is not the buildpool cargo shim; remove it first",
            link.display()
        );
    }
    // Made under a temporary name and renamed into place, so `cargo` is never half there
    // (sessions starting at once may race here: the last rename wins, with the same link).
    let temp = dir.join(format!(".cargo.buildpool-{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    std::os::unix::fs::symlink(exe, &temp)
        .with_context(|| format!("cannot create a symlink in {}", dir.display()))?;
    std::fs::rename(&temp, &link).with_context(|| format!("cannot create {}", link.display()))?;
    Ok(true)
}

/// Where a Claude Code session's shim lives: one directory per buildpool binary, under
/// `$XDG_CACHE_HOME/buildpool/shim/`, named by a digest of the binary's path so two
/// installed versions never take each other's link.
pub fn session_dir(exe: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(exe.as_os_str().as_encoded_bytes());
    let name = hex::encode(&digest[..6]);
    crate::config::cache_home()
        .join("buildpool")
        .join("shim")
        .join(name)
}

pub fn shim(args: ShimArgs) -> anyhow::Result<ExitCode> {
    let ShimAction::Install { dir } = args.action;
    let exe = this_binary()?;
    let link_path = dir.join("cargo");
    if !link(&dir, &exe)? {
        println!(
            "{} is already the buildpool cargo shim",
            link_path.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let link = link_path;
    println!(
        "installed the cargo shim {} -> {}\nput it first on PATH: export PATH=\"{}:$PATH\"",
        link.display(),
        exe.display(),
        std::path::absolute(&dir)?.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The first `cargo` on `PATH` that is not this binary under another name: the shim's own
/// directory and any other link to buildpool are skipped, so the shim never runs itself.
fn real_cargo(exe: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("cargo"))
        .filter(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            candidate
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
        .find(|candidate| candidate.canonicalize().is_ok_and(|target| target != exe))
}

/// Whether our parent is buildpool or a build agent, i.e. this cargo is a job's: it must be
/// the real one, or a job would submit itself again.
fn started_by_a_job() -> bool {
    let Some(parent) = rustix::process::getppid() else {
        return false;
    };
    std::fs::read_link(format!("/proc/{}/exe", parent.as_raw_nonzero())).is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|name| name == "buildpool" || name == "build-agent")
    })
}

/// Programs whose SIGINT and SIGQUIT being ignored means a background list.
const SHELLS: &[&str] = &["bash", "sh", "dash", "zsh", "ksh"];

/// Whether this cargo was started in the background (`cargo test &`): the real cargo runs
/// it. A background cargo outlives the line that started it, so on the pool it would hold a
/// slot that no one watches and nothing stops.
///
/// A shell without job control (Claude Code's, a script's) starts a background command
/// with SIGINT and SIGQUIT ignored, as POSIX requires, and nothing else does both: Claude
/// Code starts its shell with every signal at its default (tests/claude_code.rs runs the
/// real CLI both ways). A background
/// subshell or group (`(cargo build | tail) &`) ignores them itself while its children
/// do not, so the shells this cargo runs under are asked too.
///
/// Not recognised, so sent to the pool: `timeout 300 cargo test &` (timeout catches those
/// signals, and its child gets them back at their default), and `cargo test &` typed at an
/// interactive prompt with job control. The terminal's foreground process group would tell
/// the latter, but an agent that starts its commands in a process group of their own while
/// the terminal is still theirs would then see every cargo kept here.
fn started_in_background() -> bool {
    let bit = |signal: rustix::process::Signal| 1u64 << (signal.as_raw() - 1);
    let both = bit(rustix::process::Signal::INT) | bit(rustix::process::Signal::QUIT);
    let mut pid = "self".to_owned();
    // A line nests shells a few deep at most; the bound only guards against a loop.
    for _ in 0..16 {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return false;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
        };
        let ignored = field("SigIgn:").and_then(|mask| u64::from_str_radix(mask, 16).ok());
        if ignored.is_some_and(|mask| mask & both == both) {
            return true;
        }
        let Some(parent) = field("PPid:") else {
            return false;
        };
        let is_shell = std::fs::read_link(format!("/proc/{parent}/exe")).is_ok_and(|exe| {
            exe.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| SHELLS.contains(&name))
        });
        if !is_shell {
            return false;
        }
        pid = parent.to_owned();
    }
    false
}

/// Runs as `cargo`: execs `buildpool run` for what the hook would offload, the real cargo
/// for everything else. Returns only when neither could be started.
pub fn run_as_cargo() -> ExitCode {
    let exe = match std::env::current_exe().and_then(|exe| exe.canonicalize()) {
        Ok(exe) => exe,
        Err(error) => {
            eprintln!("buildpool cargo shim: cannot tell where buildpool is: {error}");
            return ExitCode::from(EXIT_NOT_FOUND);
        }
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let Some(cargo) = real_cargo(&exe) else {
        eprintln!(
            "buildpool cargo shim: no real cargo on PATH (every cargo found is this shim, {})",
            exe.display()
        );
        return ExitCode::from(EXIT_NOT_FOUND);
    };
    let error = match offloaded(&args) {
        // A job's own cargo (with an in-process coordinator) finds the shim on PATH too: the
        // variable makes that one the real cargo.
        Some(run_args) => Command::new(&exe).args(run_args).env(OFF_ENV, "off").exec(),
        None => Command::new(&cargo).args(&args).exec(),
    };
    eprintln!("buildpool cargo shim: cannot run: {error}");
    ExitCode::from(EXIT_NOT_FOUND)
}

/// The `buildpool` arguments that run `cargo ARGS` on the pool, or `None` to run cargo.
fn offloaded(args: &[OsString]) -> Option<Vec<String>> {
    let switched_off = std::env::var(OFF_ENV).is_ok_and(|value| value == "off");
    if switched_off || started_by_a_job() || started_in_background() {
        return None;
    }
    let args: Vec<String> = args
        .iter()
        .map(|arg| arg.clone().into_string().ok())
        .collect::<Option<_>>()?;
    let dir = std::env::current_dir().ok()?;
    let job = offload::offload_argv(&args, &dir, place::place).ok()?;
    let mut run_args = offload::run_args(&job);
    // `run KIND --silent -- ARGS`: the pipeline this cargo is in sees cargo's streams and
    // nothing of ours.
    run_args.insert(2, "--silent".to_owned());
    Some(run_args)
}
