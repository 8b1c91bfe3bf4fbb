//! The real Claude Code CLI (npm `@anthropic-ai/claude-code`, in tests/claude/) with the
//! hook installed as the README says, in a worktree served by a real coordinator and agent.
//!
//! Only the model is a stand-in: it cannot be reached here, so `tests/claude/standin.py`
//! answers the Messages API with scripted Bash tool calls, the compound command lines
//! agents type. Claude Code's hooks, its Bash tool and its permission checks are the real
//! ones, run headless (`claude -p`) as orchestrators run agents, with their permission
//! flags.

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

/// A worktree served by a real coordinator and agent, with the hook installed as the README
/// says (`buildpool` on `PATH`, as the committed settings name it).
struct Session {
    cluster: Cluster,
    path: String,
}

impl Session {
    fn start() -> Session {
        assert!(
            claude_bin().exists(),
            "the Claude Code CLI is not installed: npm ci --prefix {}",
            claude_dir().display()
        );
        let cluster = Cluster::start(Fixture::new().expect("fixture"), 1, 2).expect("cluster");
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let install: RunOutput = cluster
            .fixture
            .command_in(&cluster.fixture.root(), &["hook", "install", "--project"])
            .env("PATH", &path)
            .output()
            .expect("hook install")
            .into();
        assert_eq!(install.code, Some(0), "{install}");
        Session { cluster, path }
    }

    /// Runs `claude -p` with `permissions` (its permission flags) while the stand-in model
    /// asks for `lines`, one Bash call each. Returns what Claude Code printed, the stand-in's
    /// log (each Bash call and its result) and the jobs the pool got meanwhile.
    fn claude(&self, permissions: &[&str], lines: &[&str]) -> (RunOutput, String, u64) {
        let fixture = &self.cluster.fixture;
        let log = fixture
            .scratch()
            .join(format!("standin-{}.log", fastrand::u32(..)));
        let (_model, url) = stand_in(fixture, lines, &log);
        let home = fixture.scratch().join("claude-home");
        std::fs::create_dir_all(&home).expect("home");
        let submitted = self.cluster.jobs_submitted();
        let mut claude = Command::new(claude_bin());
        claude
            .args(["-p", "run the checks"])
            .args(permissions)
            .args(["--output-format", "json"])
            .current_dir(fixture.root());
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
            .env("PATH", &self.path)
            .env("ANTHROPIC_BASE_URL", &url)
            .env("ANTHROPIC_API_KEY", "sk-stand-in")
            .env("DISABLE_TELEMETRY", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            // Claude Code refuses to bypass permissions as root outside a sandbox it is told
            // of; CI runs as root on a throwaway machine.
            .env("IS_SANDBOX", "1")
            .env_remove("CLAUDE_ENV_FILE");
        let ran: RunOutput = claude.output().expect("claude runs").into();
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        for line in lines {
            assert!(said.contains(&format!("TOOL_USE {line}")), "{line}: {said}");
        }
        let jobs = self.cluster.jobs_submitted() - submitted;
        (ran, said, jobs)
    }
}

/// The result Claude Code sent back for the `number`th Bash call (from 0).
fn tool_result(said: &str, number: usize) -> serde_json::Value {
    let line = said
        .lines()
        .filter_map(|line| line.strip_prefix("TOOL_RESULT "))
        .nth(number)
        .unwrap_or_else(|| panic!("no result for call {number}: {said}"));
    serde_json::from_str(line).expect("a JSON tool result")
}

#[test]
fn compound_cargo_lines_from_the_real_claude_code_reach_the_pool() {
    let session = Session::start();
    let lines = [
        "cargo test 2>&1 | tail -n 5",
        "cargo check && cargo test -p app 2>&1 | grep '^test result'",
        "cd app && timeout 300 cargo test 2>&1 | tail -n 3",
        "bash -c 'cargo clippy' 2>&1 | tail -n 1",
        "cargo build -q & wait; echo built here",
    ];
    let (ran, said, jobs) = session.claude(&["--allowedTools", "Bash"], &lines);
    assert_eq!(ran.code, Some(0), "{ran}\n{said}");
    assert_eq!(
        said.matches("TOOL_RESULT").count(),
        lines.len(),
        "every scripted command ran: {said}"
    );
    assert!(said.contains("test result: ok. 1 passed"), "{said}");
    assert!(said.contains("built here"), "{said}");
    assert!(
        !said.contains("\"is_error\": true"),
        "a command failed: {said}"
    );
    assert_eq!(
        jobs, 5,
        "every cargo of the lines ran on the pool, but the one in the background: {said}"
    );
}

/// Claude Code's permission rules see the line exactly as the model wrote it: a rule for
/// `cargo test` lets `cargo test` run (on the pool) and still stops a `cargo build` it does
/// not cover, and with permissions bypassed, as orchestrators run agents, lines run and
/// reach the pool.
#[test]
fn permission_rules_judge_the_line_as_the_model_wrote_it() {
    let session = Session::start();
    let (ran, said, jobs) = session.claude(
        &["--allowedTools", "Bash(cargo test:*)"],
        &["cargo test -p app", "cargo build"],
    );
    assert_eq!(ran.code, Some(0), "{ran}\n{said}");
    let allowed = tool_result(&said, 0);
    assert_ne!(allowed["is_error"], true, "{said}");
    assert!(allowed.to_string().contains("test result: ok"), "{said}");
    let refused = tool_result(&said, 1);
    assert_eq!(
        refused["is_error"], true,
        "no rule covers cargo build: {said}"
    );
    assert!(
        refused["content"]
            .as_str()
            .is_some_and(|content| content.contains("requires approval")),
        "the prompt Claude Code would show: {said}"
    );
    assert_eq!(jobs, 1, "only the allowed line ran, on the pool: {said}");

    let (ran, said, jobs) = session.claude(
        &["--permission-mode", "bypassPermissions"],
        &["cargo check 2>&1 | tail -n 1 && cargo test 2>&1 | grep '^test result'"],
    );
    assert_eq!(ran.code, Some(0), "{ran}\n{said}");
    assert_ne!(tool_result(&said, 0)["is_error"], true, "{said}");
    assert_eq!(jobs, 2, "{said}");
}
