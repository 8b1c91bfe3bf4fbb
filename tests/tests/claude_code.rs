//! The real Claude Code CLI (npm `@anthropic-ai/claude-code`, in tests/claude/) with the
//! hook installed as the README says, in a worktree served by a real coordinator and agent.
//!
//! Only the model is a stand-in: it cannot be reached here, so `tests/claude/standin.py`
//! answers the Messages API with scripted Bash tool calls, the compound command lines
//! agents type. Claude Code's hooks, its Bash tool and its permission checks are the real
//! ones, run headless (`claude -p --allowedTools Bash`) as orchestrators run agents.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, Owned, RunOutput, bin_dir, wait_until};

fn claude_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("claude")
}

fn claude_bin() -> PathBuf {
    claude_dir().join("node_modules/.bin/claude")
}

/// Starts the stand-in model with `commands` to script; returns it and its address.
fn stand_in(fixture: &Fixture, commands: &[&str], log: &Path) -> (Owned, String) {
    let mut command = Command::new("python3");
    command
        .arg(claude_dir().join("standin.py"))
        .arg("0")
        .arg(serde_json::to_string(commands).expect("json"))
        .arg(log);
    let output = fixture.scratch().join("standin.out");
    let server = Owned::spawn(command, output.clone()).expect("python3 runs the stand-in");
    let mut port = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            port = std::fs::read_to_string(&output).unwrap_or_default();
            port.trim().parse::<u16>().is_ok()
        }),
        "the stand-in did not start: {}",
        server.log_text()
    );
    let url = format!("http://127.0.0.1:{}", port.trim());
    (server, url)
}

#[test]
fn compound_cargo_lines_from_the_real_claude_code_reach_the_pool() {
    assert!(
        claude_bin().exists(),
        "the Claude Code CLI is not installed: npm ci --prefix {}",
        claude_dir().display()
    );
    let cluster = Cluster::start(Fixture::new().expect("fixture"), 1, 2).expect("cluster");
    let fixture = &cluster.fixture;
    let root = fixture.root();
    // `buildpool` on PATH, as the committed settings name it.
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let install: RunOutput = fixture
        .command_in(&root, &["hook", "install", "--project"])
        .env("PATH", &path)
        .output()
        .expect("hook install")
        .into();
    assert_eq!(install.code, Some(0), "{install}");

    let lines = [
        "cargo test 2>&1 | tail -n 5",
        "cargo check && cargo test -p app 2>&1 | grep '^test result'",
        "cd app && timeout 300 cargo test 2>&1 | tail -n 3",
        "bash -c 'cargo clippy' 2>&1 | tail -n 1",
    ];
    let jobs = 5;
    let log = fixture.scratch().join("standin.log");
    let (_model, url) = stand_in(fixture, &lines, &log);
    let home = fixture.scratch().join("claude-home");
    std::fs::create_dir_all(&home).expect("home");
    let submitted = cluster.jobs_submitted();
    let mut claude = Command::new(claude_bin());
    claude
        .args(["-p", "run the checks", "--allowedTools", "Bash"])
        .args(["--output-format", "json"])
        .current_dir(&root);
    fixture.apply_env(&mut claude);
    if let Some(rustup) = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".rustup")))
    {
        // A home of its own for Claude Code, the toolchain of this machine.
        claude.env("RUSTUP_HOME", rustup);
    }
    claude
        .env("HOME", &home)
        .env("PATH", &path)
        .env("ANTHROPIC_BASE_URL", &url)
        .env("ANTHROPIC_API_KEY", "sk-stand-in")
        .env("DISABLE_TELEMETRY", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env_remove("CLAUDE_ENV_FILE");
    let ran: RunOutput = claude.output().expect("claude runs").into();
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(ran.code, Some(0), "{ran}\n{said}");
    for line in lines {
        assert!(said.contains(&format!("TOOL_USE {line}")), "{line}: {said}");
    }
    assert_eq!(
        said.matches("TOOL_RESULT").count(),
        lines.len(),
        "every scripted command ran: {said}"
    );
    assert!(said.contains("test result: ok. 1 passed"), "{said}");
    assert!(
        !said.contains("\"is_error\": true"),
        "a command failed: {said}"
    );
    assert_eq!(
        cluster.jobs_submitted() - submitted,
        jobs,
        "every cargo of the lines ran on the pool: {said}"
    );
}
