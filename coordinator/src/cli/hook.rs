//! `buildpool hook`: Claude Code's hooks and their entries in Claude Code's settings.
//!
//! - `SessionStart`: puts the cargo shim first on the session's `PATH` (an `export` line in
//!   the file `$CLAUDE_ENV_FILE` names, which Claude Code applies to every later Bash
//!   command). Every cargo a command line runs, at any depth (`cargo test 2>&1 | tail`,
//!   `cargo check && cargo test`, `bash -c`, `timeout`), then decides for itself, by the
//!   shim's rules, and the line itself is untouched, so the user's permission rules see
//!   exactly what the model wrote.
//!
//! There is no `PreToolUse` hook: one that rewrote a command line would change what
//! Claude Code's permission rules judge, and one that answered "allow" would skip prompts
//! the user asked for. An installation of an older buildpool had one; `hook install`
//! removes it, and `hook claude` answers such events with nothing, so the line runs as
//! typed.
//!
//! `hook claude` never stands in the way: any doubt or failure lets the session go on
//! without the shim. It starts no async runtime and no process.

mod settings;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::shim;
use crate::offload::{self, place};

/// Set to `off` to let every command through untouched.
const OFF_ENV: &str = "BUILDPOOL_HOOK";

/// An event larger than this is none we answer.
const MAX_EVENT_BYTES: u64 = 1024 * 1024;

/// Mode of a settings file we create (an existing one keeps its own).
const NEW_SETTINGS_MODE: u32 = 0o644;

#[derive(Debug, Args)]
pub struct HookArgs {
    #[command(subcommand)]
    action: HookAction,
}

#[derive(Debug, Subcommand)]
enum HookAction {
    /// Answer one event of Claude Code's on stdin (SessionStart: put the shim on PATH).
    Claude,
    /// Add the hook to Claude Code's settings (idempotent; other settings are kept).
    Install(Scope),
    /// Remove the hook from Claude Code's settings, and nothing else.
    Uninstall(Scope),
    /// Show where each program of LINE, typed in the current directory, runs, and why.
    Explain { line: String },
}

#[derive(Debug, Args)]
struct Scope {
    /// `.claude/settings.json` at the top of this worktree: commit it, and every worktree
    /// and clone has the hook (the default).
    #[arg(long, conflicts_with = "user")]
    project: bool,
    /// `~/.claude/settings.json` (or `$CLAUDE_CONFIG_DIR/settings.json`): every project of
    /// this user on this machine.
    #[arg(long)]
    user: bool,
}

pub fn hook(dir: &Path, args: HookArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        HookAction::Claude => {
            claude();
            Ok(ExitCode::SUCCESS)
        }
        HookAction::Install(scope) => install(dir, &scope),
        HookAction::Uninstall(scope) => uninstall(dir, &scope),
        HookAction::Explain { line } => explain(dir, &line),
    }
}

fn switched_off() -> bool {
    std::env::var(OFF_ENV).is_ok_and(|value| value == "off")
}

/// The running executable as the rewritten command names it: the very binary Claude Code
/// started, so the job runs with the same buildpool whatever `PATH` the shell has.
fn this_buildpool() -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot tell where this buildpool is")?;
    exe.into_os_string()
        .into_string()
        .map_err(|exe| anyhow::anyhow!("the path of this buildpool is not UTF-8: {exe:?}"))
}

/// Reads the event and, for a SessionStart, puts the shim on the session's `PATH`. It never
/// prints: the output of a SessionStart hook becomes the model's context.
fn claude() {
    let mut event = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(MAX_EVENT_BYTES + 1)
        .read_to_end(&mut event);
    if read.is_err() || event.len() as u64 > MAX_EVENT_BYTES || switched_off() {
        return;
    }
    if !is_session_start(&event) {
        return;
    }
    // Nothing is printed: a SessionStart hook's output becomes the model's context.
    if let Some(env_file) = std::env::var_os(ENV_FILE_ENV)
        && let Err(error) = start_session(Path::new(&env_file))
    {
        eprintln!("buildpool hook: the cargo shim is not on this session's PATH: {error:#}");
    }
}

/// Names the file whose `export` lines Claude Code applies to the session's Bash commands;
/// set for `SessionStart` hooks.
const ENV_FILE_ENV: &str = "CLAUDE_ENV_FILE";

fn is_session_start(event: &[u8]) -> bool {
    serde_json::from_slice::<Value>(event)
        .is_ok_and(|event| event["hook_event_name"] == "SessionStart")
}

/// Puts this buildpool's cargo shim first on the session's `PATH`: makes the shim's
/// directory (see [`shim::session_dir`]) and adds its `export` line to `env_file`, once
/// (the event comes again on resume, clear and compaction).
fn start_session(env_file: &Path) -> anyhow::Result<()> {
    let exe = shim::this_binary()?;
    let dir = shim::session_dir(&exe);
    shim::link(&dir, &exe)?;
    let dir = dir.to_str().context("the shim's directory is not UTF-8")?;
    let line = format!("export PATH={}:\"$PATH\"", offload::shell::quote(dir));
    let present = std::fs::read_to_string(env_file).unwrap_or_default();
    if present.lines().any(|existing| existing == line) {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env_file)
        .with_context(|| format!("cannot open {}", env_file.display()))?;
    let separator = if present.is_empty() || present.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    writeln!(file, "{separator}{line}")
        .with_context(|| format!("cannot write {}", env_file.display()))
}

/// Prints each program `line` starts, indented by depth, and where it runs.
fn explain(dir: &Path, line: &str) -> anyhow::Result<ExitCode> {
    let dir = std::path::absolute(dir)?;
    let steps = match offload::explain::explain(line, &dir, place::place) {
        Ok(steps) => steps,
        Err(unreadable) => {
            println!(
                "runs as typed, {unreadable}; each cargo it starts still decides as it starts"
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    let width = steps
        .iter()
        .map(|step| 2 * step.invocation.depth + step.invocation.typed.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for step in &steps {
        let indent = "  ".repeat(step.invocation.depth);
        let typed = format!("{indent}{}", step.invocation.typed);
        writeln!(out, "{typed:<width$}  -> {}", step.verdict)?;
    }
    if switched_off() || std::env::var(shim::OFF_ENV).is_ok_and(|value| value == "off") {
        writeln!(
            out,
            "(the hook or the shim is off here: {OFF_ENV}=off or {}=off)",
            shim::OFF_ENV
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The settings file of `scope`, and the hook command to write there.
///
/// The project file is committed and shared between machines and people, so it names
/// `buildpool` on `PATH`; where it is missing, Claude Code reports a failed hook and runs
/// the command as typed. The user file belongs to this machine, so it names this very
/// binary and works whatever `PATH` Claude Code was started with.
fn target(dir: &Path, scope: &Scope) -> anyhow::Result<(PathBuf, String)> {
    if scope.user {
        let config_dir = match std::env::var_os("CLAUDE_CONFIG_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".claude")
            }
        };
        let command = format!("{} hook claude", offload::shell::quote(&this_buildpool()?));
        Ok((config_dir.join("settings.json"), command))
    } else {
        let dir = std::path::absolute(dir)?;
        let top = place::worktree_top(&dir).with_context(|| {
            format!(
                "{} is not inside a git repository; use --user, or run this in the repository",
                dir.display()
            )
        })?;
        let file = top.join(".claude").join("settings.json");
        Ok((file, "buildpool hook claude".to_owned()))
    }
}

fn read_settings(file: &Path) -> anyhow::Result<Value> {
    match std::fs::read_to_string(file) {
        Ok(text) if text.trim().is_empty() => Ok(json!({})),
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON; left untouched", file.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(json!({})),
        Err(error) => Err(error).with_context(|| format!("cannot read {}", file.display())),
    }
}

fn write_settings(file: &Path, settings: &Value) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file)
        .map(|meta| meta.permissions().mode() & 0o7777)
        .unwrap_or(NEW_SETTINGS_MODE);
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let text = format!("{}\n", serde_json::to_string_pretty(settings)?);
    crate::atomic_file::write(file, text.as_bytes(), mode)
        .with_context(|| format!("cannot write {}", file.display()))
}

fn install(dir: &Path, scope: &Scope) -> anyhow::Result<ExitCode> {
    let (file, command) = target(dir, scope)?;
    let mut current = read_settings(&file)?;
    let changed = settings::install(&mut current, &command)
        .with_context(|| format!("in {}", file.display()))?;
    if changed {
        write_settings(&file, &current)?;
        println!("installed the buildpool hook in {}", file.display());
    } else {
        println!("the buildpool hook is already in {}", file.display());
    }
    if !scope.user && buildpool_core::process::find_on_path("buildpool").is_none() {
        eprintln!(
            "note: no buildpool on PATH here; Claude Code runs `{command}` through PATH, and until \
             it finds it, cargo commands run as typed"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn uninstall(dir: &Path, scope: &Scope) -> anyhow::Result<ExitCode> {
    let (file, _) = target(dir, scope)?;
    if !file.exists() {
        println!("no {}: nothing to remove", file.display());
        return Ok(ExitCode::SUCCESS);
    }
    let mut current = read_settings(&file)?;
    if settings::uninstall(&mut current).with_context(|| format!("in {}", file.display()))? {
        write_settings(&file, &current)?;
        println!("removed the buildpool hook from {}", file.display());
    } else {
        println!("the buildpool hook is not in {}", file.display());
    }
    Ok(ExitCode::SUCCESS)
}
