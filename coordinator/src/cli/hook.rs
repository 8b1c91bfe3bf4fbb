//! `buildpool hook`: Claude Code's hooks and their entries in Claude Code's settings.
//!
//! - `SessionStart`: puts the cargo shim first on the session's `PATH` (an `export` line in
//!   the file `$CLAUDE_ENV_FILE` names, which Claude Code applies to every later Bash
//!   command). Every cargo a command line runs, at any depth (`cargo test 2>&1 | tail`,
//!   `cargo check && cargo test`, `bash -c`, `timeout`), then decides for itself, by the
//!   shim's rules, and the line itself is untouched, so the user's permission rules see
//!   exactly what the model wrote.
//! - `PreToolUse` (Bash): turns a plain cargo command it can vouch for into `buildpool run`.
//!
//! `hook claude` never stands in the way: it answers only when it rewrites, and any doubt
//! or failure lets the command run as typed. It starts no async runtime and no process,
//! so it costs a few milliseconds per Bash call.

mod settings;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::shim;
use crate::offload::{self, PassThrough, place};

/// Set to `off` to let every command through untouched.
const OFF_ENV: &str = "BUILDPOOL_HOOK";

/// An event larger than this is no Bash call we rewrite.
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
    /// Answer one PreToolUse event on stdin: what Claude Code runs before each Bash call.
    Claude,
    /// Add the hook to Claude Code's settings (idempotent; other settings are kept).
    Install(Scope),
    /// Remove the hook from Claude Code's settings, and nothing else.
    Uninstall(Scope),
    /// Show what the hook makes of COMMAND typed in the current directory, and why.
    Explain { command: String },
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
        HookAction::Explain { command } => {
            explain(dir, &command)?;
            Ok(ExitCode::SUCCESS)
        }
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

/// Reads the event and prints an answer only for a rewrite. Failures are silent on
/// purpose: the command then runs as typed, which is always right.
fn claude() {
    let mut event = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(MAX_EVENT_BYTES + 1)
        .read_to_end(&mut event);
    if read.is_err() || event.len() as u64 > MAX_EVENT_BYTES || switched_off() {
        return;
    }
    if is_session_start(&event) {
        // Nothing is printed: a SessionStart hook's output becomes the model's context.
        if let Some(env_file) = std::env::var_os(ENV_FILE_ENV)
            && let Err(error) = start_session(Path::new(&env_file))
        {
            eprintln!("buildpool hook: the cargo shim is not on this session's PATH: {error:#}");
        }
        return;
    }
    let Ok(buildpool) = this_buildpool() else {
        return;
    };
    if let Some(answer) = answer(&event, &buildpool, place::place) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{answer}").and_then(|()| stdout.flush());
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

/// The answer to one PreToolUse event, `None` to let the call through untouched.
///
/// Every answer allows the command without Claude Code's prompt, so only what
/// [`offload::vouch`] vouches for is rewritten. Anything else gets no answer rather than a
/// rewrite without a decision, so Claude Code's rules, written for `cargo`, judge the
/// very command the model wrote, as they would without the hook.
///
/// `updatedInput` replaces the tool's whole input, so it carries every field of the
/// original (`description`, `timeout`, `run_in_background`, ...) with only `command` new.
fn answer(
    event: &[u8],
    buildpool: &str,
    place: impl FnOnce(&Path) -> Result<place::Placement, PassThrough>,
) -> Option<Value> {
    let event: Value = serde_json::from_slice(event).ok()?;
    let event_name = event.get("hook_event_name").and_then(Value::as_str);
    if event_name.is_some_and(|name| name != "PreToolUse") || event["tool_name"] != "Bash" {
        return None;
    }
    let tool_input = event["tool_input"].as_object()?;
    let command = tool_input.get("command")?.as_str()?;
    let cwd = event["cwd"].as_str()?;
    let rewritten = offload::rewrite_shell(command, Path::new(cwd), buildpool, place).ok()?;
    let mut updated_input = tool_input.clone();
    updated_input.insert("command".to_owned(), Value::String(rewritten));
    Some(json!({
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "allow",
            "permissionDecisionReason": "buildpool: the same cargo command, run on the build pool",
            "updatedInput": updated_input,
        }
    }))
}

fn explain(dir: &Path, command: &str) -> anyhow::Result<()> {
    if switched_off() {
        println!("runs as typed: {OFF_ENV}=off");
        return Ok(());
    }
    let dir = std::path::absolute(dir)?;
    match offload::rewrite_shell(command, &dir, &this_buildpool()?, place::place) {
        Ok(rewritten) => println!("becomes: {rewritten}"),
        Err(reason) => println!("runs as typed: {reason}"),
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    const BUILDPOOL: &str = "/usr/local/bin/buildpool";

    /// A Bash PreToolUse event as Claude Code sends it, for `command` typed in `cwd`.
    fn event(command: &str, cwd: &str) -> Vec<u8> {
        let mut event: Value =
            serde_json::from_str(include_str!("hook/pre_tool_use_bash.json")).expect("sample");
        event["tool_input"]["command"] = json!(command);
        event["cwd"] = json!(cwd);
        event.to_string().into_bytes()
    }

    fn at_top(_: &Path) -> Result<place::Placement, PassThrough> {
        Ok(place::Placement { manifest: None })
    }

    fn answer_to(event: &[u8]) -> Option<Value> {
        answer(event, BUILDPOOL, at_top)
    }

    #[test]
    fn a_cargo_test_is_allowed_as_buildpool_run_with_every_other_input_field_kept() {
        let answer =
            answer_to(&event("RUST_BACKTRACE=1 cargo test -p app", "/work/app")).expect("rewrite");
        assert_eq!(
            answer,
            json!({
                "hookSpecificOutput": {
                    "hookEventName": "PreToolUse",
                    "permissionDecision": "allow",
                    "permissionDecisionReason": "buildpool: the same cargo command, run on the build pool",
                    "updatedInput": {
                        "command": "RUST_BACKTRACE=1 /usr/local/bin/buildpool run test -- -p app",
                        "description": "Run the tests",
                        "timeout": 600000
                    }
                }
            })
        );
    }

    #[test]
    fn rewrites_cover_the_forms_agents_type() {
        for (command, rewritten) in [
            ("cargo build", "/usr/local/bin/buildpool run build"),
            (
                "cargo check --all-targets",
                "/usr/local/bin/buildpool run check -- --all-targets",
            ),
            (
                "cargo clippy --workspace -- -D warnings",
                "/usr/local/bin/buildpool run clippy -- --workspace -- -D warnings",
            ),
            (
                "cargo nextest run -p app",
                "/usr/local/bin/buildpool run nextest -- -p app",
            ),
            (
                "cd /work/app && cargo test -- --nocapture",
                "cd /work/app && /usr/local/bin/buildpool run test -- -- --nocapture",
            ),
        ] {
            let answer = answer_to(&event(command, "/work/app")).expect("rewrite");
            assert_eq!(
                answer["hookSpecificOutput"]["updatedInput"]["command"], rewritten,
                "{command:?}"
            );
        }
    }

    /// "allow" skips the prompt Claude Code would show: a command line that can name a
    /// program to run, or pass flags to the compiler or linker, gets no answer at all.
    #[test]
    fn commands_that_can_name_a_program_are_not_allowed() {
        for command in [
            r#"cargo test --config 'target."cfg(all())".runner=["sh","-c","id > /tmp/x"]'"#,
            "cargo build --config build.rustc-wrapper=/tmp/w",
            "cargo check --config=build.rustc-wrapper=/tmp/w",
            "cargo test --config /tmp/evil.toml",
            "RUSTFLAGS='-C linker=/tmp/l' cargo build",
            "RUSTFLAGS=-Clinker=/tmp/l cargo build",
            "RUSTDOCFLAGS='--test-builder /tmp/b' cargo test",
            "RUSTFLAGS='-D warnings -C link-arg=-fuse-ld=/tmp/ld' cargo test",
            "CARGO_PROFILE_DEV_RUSTFLAGS='-C linker=/tmp/l' cargo build",
            "CARGO_PROFILE_DEV_CODEGEN_BACKEND=/tmp/b.so cargo build",
            "cargo clippy -- -C linker=/tmp/l",
            "cargo clippy -- --extern m=/tmp/m.so",
            "cargo clippy -- -D warnings -Zllvm-plugins=/tmp/p.so",
            "cargo -Zbuild-std test",
            "cargo test -Zbuild-std",
            "cargo test -Z build-std",
            "cargo test -qZbuild-std",
            "cargo build --target /tmp/t.json",
            "cargo build --target=t.json",
            "cargo +nightly test",
            "cargo test --target-dir /tmp/x",
            "cargo test --target-dir=../../elsewhere",
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=sh cargo test",
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=/tmp/l cargo test",
            "CARGO_BUILD_RUSTC_WRAPPER=/tmp/w cargo build",
            "RUSTC_WRAPPER=x cargo build",
            "RUSTC=/tmp/rustc cargo build",
            "CC=/tmp/cc cargo build",
            "cargo test\r",
            "cargo test\u{a0}",
            "cargo test\u{85}",
            "\u{a0}cargo test",
            "cargo\u{a0}test",
        ] {
            assert_eq!(answer_to(&event(command, "/work/app")), None, "{command:?}");
        }
    }

    #[test]
    fn other_tools_commands_events_and_broken_input_get_no_answer() {
        for command in [
            "cargo run",
            "cargo install ripgrep",
            "cargo publish",
            "cargo fmt",
            "cargo nextest list",
            "cargo +nightly test",
            "cargo test | tail -50",
            "cargo test 2>&1",
            "cargo build && ./target/debug/app",
            "buildpool run test",
            "git status",
        ] {
            assert_eq!(answer_to(&event(command, "/work/app")), None, "{command:?}");
        }
        let relative_cwd = event("cargo test", "app");
        assert_eq!(answer_to(&relative_cwd), None);
        let outside = answer(&event("cargo test", "/tmp"), BUILDPOOL, |_| {
            Err(PassThrough::NotInRepository)
        });
        assert_eq!(outside, None);
        let read = json!({
            "hook_event_name": "PreToolUse",
            "cwd": "/work/app",
            "tool_name": "Read",
            "tool_input": { "file_path": "/work/app/Cargo.toml" }
        });
        assert_eq!(answer_to(read.to_string().as_bytes()), None);
        let post = String::from_utf8(event("cargo test", "/work/app"))
            .expect("utf-8")
            .replace("\"PreToolUse\"", "\"PostToolUse\"");
        assert_eq!(answer_to(post.as_bytes()), None);
        for broken in [&b""[..], b"not json", b"[]", b"{\"tool_name\":\"Bash\"}"] {
            assert_eq!(answer_to(broken), None);
        }
    }
}
