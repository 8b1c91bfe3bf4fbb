//! Offloading without changing habits: the real `buildpool hook claude` on Claude Code's
//! events, `hook install/uninstall` on settings files, `hook explain`, and the cargo shim
//! (alone, and put on a session's `PATH` by the hook) running end to end against a real
//! coordinator and agent.

use std::path::{Path, PathBuf};
use std::process::Command;

use buildpool_tests::{
    Cluster, Fixture, RunOutput, bash_event, buildpool_bin, local_cargo, run_hook, test_counts,
};
use serde_json::{Value, json};

/// `sh -c command` in `dir` with the fixture's environment and, if given, this `PATH`.
fn shell(fixture: &Fixture, dir: &Path, command: &str, path: Option<&str>) -> RunOutput {
    let mut sh = Command::new("/bin/sh");
    sh.arg("-c").arg(command).current_dir(dir);
    fixture.apply_env(&mut sh);
    if let Some(path) = path {
        sh.env("PATH", path);
    }
    sh.output().expect("sh runs").into()
}

/// Claude Code's permission rules judge the very line the model wrote: the hook never
/// answers a Bash call (an older install's PreToolUse entry still calls it), so it can
/// neither skip a prompt nor cause one, whatever the line.
#[test]
fn the_hook_never_answers_a_bash_call() {
    let fixture = Fixture::new().expect("fixture");
    let root = fixture.root();
    for command in [
        "cargo test",
        "RUST_BACKTRACE=1 cargo test -p app",
        "cargo test 2>&1 | tail -20",
        "cargo build --config build.rustc-wrapper=/bin/true",
        "cargo run",
        "git status",
    ] {
        let out = run_hook(&bash_event(command, &root), &[]).expect("hook runs");
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (Some(0), ""),
            "{command:?}: {out}"
        );
    }
    for garbage in ["", "not json", "{\"tool_name\": 3}"] {
        let out = run_hook(garbage, &[]).expect("hook runs");
        assert_eq!((out.code, out.stdout.as_str()), (Some(0), ""), "{out}");
    }
}

/// `hook explain` names each program of a line and where the shim will run it, and why.
#[test]
fn explain_says_where_each_program_of_a_line_runs() {
    let fixture = Fixture::new().expect("fixture");
    let explain = |line: &str| {
        let out = fixture.run(&["hook", "explain", line]).expect("runs");
        assert_eq!(out.code, Some(0), "{out}");
        out.stdout
            .lines()
            .map(|line| {
                let (typed, verdict) = line.split_once(" -> ").expect("typed -> verdict");
                (typed.trim_end().to_owned(), verdict.to_owned())
            })
            .collect::<Vec<_>>()
    };
    let said = explain("cargo fmt && cargo clippy 2>&1 | tail -20");
    assert_eq!(said[0].0, "cargo fmt");
    assert!(
        said[0].1.starts_with("here: cargo fmt runs here"),
        "{said:?}"
    );
    assert_eq!(
        said[1],
        (
            "cargo clippy 2>&1".into(),
            "pool: buildpool run clippy".into()
        )
    );
    assert_eq!(said[2], ("tail -20".into(), "here: not cargo".into()));

    let said = explain("cd app && timeout 300 cargo test -q");
    assert_eq!(
        said[1].1,
        "pool: buildpool run test -- --manifest-path app/Cargo.toml -q"
    );
    let said = explain("bash -c 'cargo build' & wait");
    assert_eq!(said[1].0, "  cargo build", "nested one level: {said:?}");
    assert!(
        said[1].1.starts_with("here: started in the background"),
        "{said:?}"
    );
    let said = explain("cargo +nightly test; cargo run");
    assert!(said[0].1.contains("+toolchain"), "{said:?}");
    assert!(said[1].1.contains("cargo run runs here"), "{said:?}");

    let unreadable = fixture
        .run(&["hook", "explain", "cargo test 'unterminated"])
        .expect("runs");
    assert!(
        unreadable
            .stdout
            .starts_with("runs as typed, not a command line bash can read"),
        "{unreadable}"
    );
}

fn settings_file(dir: &Path) -> PathBuf {
    dir.join(".claude/settings.json")
}

fn read_json(file: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("JSON")
}

#[test]
fn install_and_uninstall_keep_unrelated_settings_and_are_idempotent() {
    let fixture = Fixture::new().expect("fixture");
    let root = fixture.root();
    let before = json!({
        "permissions": { "allow": ["Bash(git status)"], "deny": ["Read(./.env)"] },
        "hooks": {
            "PreToolUse": [
                { "matcher": "Bash", "hooks": [{ "type": "command", "command": "audit.sh" }] }
            ],
            "PostToolUse": [
                { "matcher": "Write", "hooks": [{ "type": "command", "command": "fmt.sh" }] }
            ]
        },
        "env": { "FOO": "bar" }
    });
    let file = settings_file(&root);
    std::fs::create_dir_all(file.parent().expect("parent")).expect("dir");
    std::fs::write(&file, serde_json::to_string_pretty(&before).expect("json")).expect("write");

    // From a subdirectory: the project file is at the top of the worktree.
    let install: RunOutput = fixture
        .command_in(&root.join("app"), &["hook", "install", "--project"])
        .output()
        .expect("runs")
        .into();
    assert_eq!(install.code, Some(0), "{install}");
    let installed = std::fs::read_to_string(&file).expect("read");
    let again = fixture.run(&["hook", "install"]).expect("runs");
    assert_eq!(again.code, Some(0), "{again}");
    assert!(again.stdout.contains("already"), "{again}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), installed);

    let settings = read_json(&file);
    assert_eq!(
        settings["hooks"]["PreToolUse"], before["hooks"]["PreToolUse"],
        "no PreToolUse entry of ours: {settings}"
    );
    assert_eq!(
        settings["hooks"]["SessionStart"][0]["hooks"][0]["command"],
        "buildpool hook claude"
    );
    assert_eq!(settings["permissions"], before["permissions"]);
    assert_eq!(
        settings["hooks"]["PostToolUse"],
        before["hooks"]["PostToolUse"]
    );

    let uninstall = fixture
        .run(&["hook", "uninstall", "--project"])
        .expect("runs");
    assert_eq!(uninstall.code, Some(0), "{uninstall}");
    assert_eq!(read_json(&file), before);
    let keys: Vec<String> = read_json(&file)
        .as_object()
        .expect("object")
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, ["permissions", "hooks", "env"]);

    // The user's file names this very binary, so it works whatever PATH Claude Code has.
    let claude_dir = fixture.scratch().join("claude");
    let mut user = fixture.command_in(&root, &["hook", "install", "--user"]);
    user.env("CLAUDE_CONFIG_DIR", &claude_dir);
    let out: RunOutput = user.output().expect("runs").into();
    assert_eq!(out.code, Some(0), "{out}");
    let user_settings = read_json(&claude_dir.join("settings.json"));
    let command = user_settings["hooks"]["SessionStart"][0]["hooks"][0]["command"]
        .as_str()
        .expect("command");
    let exe = buildpool_bin().canonicalize().expect("binary");
    assert_eq!(command, format!("{} hook claude", exe.display()));

    // A file that is not JSON is left as it is.
    std::fs::write(&file, "{ not json").expect("write");
    let refused = fixture.run(&["hook", "install"]).expect("runs");
    assert_ne!(refused.code, Some(0), "{refused}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "{ not json");
}

#[test]
fn the_cargo_shim_offloads_builds_and_tests_and_execs_the_real_cargo_for_the_rest() {
    let fixture = Fixture::new().expect("fixture");
    let root = fixture.root();
    let shim_dir = fixture.scratch().join("shim");
    let install = fixture
        .run(&["shim", "install", shim_dir.to_str().expect("utf-8")])
        .expect("runs");
    assert_eq!(install.code, Some(0), "{install}");
    let again = fixture
        .run(&["shim", "install", shim_dir.to_str().expect("utf-8")])
        .expect("runs");
    assert!(again.stdout.contains("already"), "{again}");
    let path = format!(
        "{}:{}",
        shim_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let with_shim = Some(path.as_str());
    let local = local_cargo(&root, &["test"]);
    assert_eq!(local.code, Some(0), "{local}");

    // No coordinator: the job runs in-process (the agent's note on its snapshot says so;
    // `run`'s own lines are left out), and its own cargo is the real one (the shim is
    // first on its PATH too, and must not submit the job again).
    let here = shell(&fixture, &root, "cargo test", with_shim);
    assert_eq!(here.code, Some(0), "{here}");
    assert!(here.stderr.contains("[buildpool] snapshot"), "{here}");
    assert!(!here.stderr.contains("running the job here"), "{here}");
    assert_eq!(test_counts(&here.stdout), test_counts(&local.stdout));

    // Everything else is the real cargo, untouched.
    let version = shell(&fixture, &root, "cargo --version", with_shim);
    assert_eq!(
        version.stdout,
        local_cargo(&root, &["--version"]).stdout,
        "{version}"
    );
    let off = shell(&fixture, &root, "BUILDPOOL_SHIM=off cargo test", with_shim);
    assert_eq!(off.code, Some(0), "{off}");
    assert!(!off.stderr.contains("[buildpool]"), "{off}");

    // Only the shim on PATH: a clear error, never the shim calling itself.
    let alone = shell(
        &fixture,
        &root,
        "cargo --version",
        Some(shim_dir.to_str().expect("utf-8")),
    );
    assert_eq!(alone.code, Some(127), "{alone}");
    assert!(alone.stderr.contains("no real cargo on PATH"), "{alone}");

    let cluster = Cluster::start(fixture, 1, 1).expect("cluster");
    let submitted = cluster.jobs_submitted();
    let pooled = shell(&cluster.fixture, &root, "cargo test", with_shim);
    assert_eq!(pooled.code, Some(0), "{pooled}");
    assert_eq!(cluster.jobs_submitted(), submitted + 1, "{pooled}");
    assert!(!pooled.stderr.contains("running on worker-1"), "{pooled}");
    assert_eq!(test_counts(&pooled.stdout), test_counts(&local.stdout));
}

/// A SessionStart event as Claude Code sends it when a session starts in `cwd`.
fn session_start_event(cwd: &Path) -> String {
    json!({
        "session_id": "8a0b3c5e-2f4d-4e6a-9b1c-7d2e3f4a5b6c",
        "transcript_path": "/home/dev/.claude/projects/x.jsonl",
        "cwd": cwd,
        "hook_event_name": "SessionStart",
        "source": "startup",
    })
    .to_string()
}

/// Runs the hook on a SessionStart event in `dir`, as Claude Code does when a session
/// starts, with its environment file `env_file` and the shim under `cache`.
fn start_session(dir: &Path, env_file: &Path, cache: &Path) {
    let env = [
        ("CLAUDE_ENV_FILE", env_file.to_str().expect("utf-8")),
        ("XDG_CACHE_HOME", cache.to_str().expect("utf-8")),
    ];
    let out = run_hook(&session_start_event(dir), &env).expect("hook runs");
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout, "", "nothing reaches the model's context");
}

/// `bash -c line` in `dir` as Claude Code's Bash tool runs it in a session: the session's
/// environment file applied first.
fn session_bash(fixture: &Fixture, dir: &Path, env_file: &Path, line: &str) -> RunOutput {
    let mut bash = Command::new("bash");
    bash.arg("-c")
        .arg(format!(". '{}'\n{line}", env_file.display()))
        .current_dir(dir);
    fixture.apply_env(&mut bash);
    bash.output().expect("bash runs").into()
}

/// With the hook's SessionStart entry, compound command lines (pipes, redirections, lists,
/// `bash -c`, `timeout`, a `cd` into a member) send each cargo they run to the pool, with
/// local cargo's exit status and test result lines, and the line itself is never touched.
#[test]
fn a_session_started_with_the_hook_sends_the_cargo_of_compound_lines_to_the_pool() {
    let cluster = Cluster::start(Fixture::new().expect("fixture"), 1, 1).expect("cluster");
    let fixture = &cluster.fixture;
    let root = fixture.root();
    let env_file = fixture.scratch().join("claude-env");
    let cache = fixture.scratch().join("cache");
    for _ in 0..2 {
        start_session(&root, &env_file, &cache);
    }
    let exports = std::fs::read_to_string(&env_file).expect("env file");
    assert_eq!(
        exports.lines().count(),
        1,
        "one line however often: {exports}"
    );
    assert!(exports.starts_with("export PATH="), "{exports}");

    let local = local_cargo(&root, &["test"]);
    let local_results = test_counts(&local.stdout);
    assert!(!local_results.is_empty(), "{local}");
    let mut submitted = cluster.jobs_submitted();
    for (line, jobs) in [
        ("cargo test 2>&1 | grep '^test result:'", 1),
        ("cargo check && cargo test 2>&1 | tail -n 40", 2),
        ("bash -c 'cargo test' 2>/dev/null | grep '^test result:'", 1),
        ("timeout 300 cargo test 2>&1 | grep '^test result:'", 1),
        ("cd app && cargo test 2>&1 | tail -n 40", 1),
        (
            "for kind in check build; do cargo $kind || exit 1; done 2>&1",
            2,
        ),
        ("cargo nextest run 2>&1 | tail -n 3", 1),
    ] {
        let out = session_bash(fixture, &root, &env_file, line);
        assert_eq!(out.code, Some(0), "{line}: {out}");
        let now = cluster.jobs_submitted();
        assert_eq!(
            now - submitted,
            jobs,
            "{line}: every cargo of the line on the pool: {out}"
        );
        submitted = now;
        if line.contains("grep") {
            assert_eq!(test_counts(&out.stdout), local_results, "{line}: {out}");
        }
    }
    // A failing test: the pipeline's cargo fails with local cargo's status, on the pool.
    fixture
        .write(
            "app/tests/fails.rs",
            "#[test]\nfn fails() {\n    panic!(\"boom\");\n}\n",
        )
        .expect("failing test");
    let failing = session_bash(
        fixture,
        &root,
        &env_file,
        "cargo test -p app --test fails 2>&1 | grep -E 'boom|^test result'; echo \"status ${PIPESTATUS[0]}\"",
    );
    assert!(failing.stdout.contains("status 101"), "{failing}");
    assert!(failing.stdout.contains("boom"), "{failing}");
    assert_eq!(cluster.jobs_submitted() - submitted, 1, "{failing}");
    std::fs::remove_file(root.join("app/tests/fails.rs")).expect("remove");
    // What the shim does not offload runs as typed, here.
    let version = session_bash(fixture, &root, &env_file, "cargo --version");
    assert_eq!(
        version.stdout,
        local_cargo(&root, &["--version"]).stdout,
        "{version}"
    );
}

/// A reader that quits early (`| head`) and `timeout` stop the pool's job at once: the
/// coordinator here would let an unwatched job run for five minutes, and the job's test
/// prints a flood and then sleeps for two.
#[test]
fn a_reader_that_quits_early_or_a_timeout_cancels_the_pool_job() {
    let options = buildpool_tests::ServeOptions {
        config: Some("[build_pool.timeouts]\nclient_grace_secs = 300\n".into()),
        ..buildpool_tests::ServeOptions::default()
    };
    let cluster =
        Cluster::start_with(Fixture::new().expect("fixture"), 1, 1, &options).expect("cluster");
    let fixture = &cluster.fixture;
    let root = fixture.root();
    fixture
        .write(
            "app/tests/chatty.rs",
            "#[test]\nfn chatty() {\n    use std::io::Write;\n    let mut out = std::io::stdout();\n    \
             for line in 0..200_000 {\n        let _ = writeln!(out, \"line {line}\");\n    }\n    \
             std::thread::sleep(std::time::Duration::from_secs(120));\n}\n",
        )
        .expect("chatty test");
    let env_file = fixture.scratch().join("claude-env");
    start_session(&root, &env_file, &fixture.scratch().join("cache"));
    // Within a minute the pool is idle again, or `after` left a job running.
    let assert_idle = |after: &str| {
        let idle = || {
            cluster
                .status()
                .is_ok_and(|status| status["jobs"].as_array().is_some_and(Vec::is_empty))
        };
        assert!(
            buildpool_tests::wait_until(std::time::Duration::from_secs(60), idle),
            "the job still runs after {after}: {}",
            cluster
                .status()
                .map(|status| status.to_string())
                .unwrap_or_default()
        );
    };

    for (line, expected, after) in [
        (
            "cargo test -p app --test chatty 2>&1 | grep -m 1 '^line'",
            "line 0\n",
            "its reader left",
        ),
        (
            "timeout 20 cargo test -p app --test chatty >/dev/null 2>&1; echo \"status $?\"",
            "status 124\n",
            "timeout stopped its client",
        ),
    ] {
        let out = session_bash(fixture, &root, &env_file, line);
        assert_eq!(out.stdout, expected, "{line}: {out}");
        assert_idle(after);
    }
}

/// Command lines as coding agents type them in Claude Code's Bash tool, each with the jobs
/// it should put on the pool: every cargo build, test, check, clippy and nextest run in
/// it, at any depth; none for what must stay here (a cargo started with `&` included).
const CORPUS: &[(&str, u64)] = &[
    ("cargo test", 1),
    ("cargo test 2>&1 | tail -20", 1),
    ("cargo test 2>&1 | tail -n 5", 1),
    ("cargo test 2>&1 | grep -E '^test result'", 1),
    ("cargo test --workspace 2>&1 | tail -30", 1),
    ("cargo check && cargo test", 2),
    ("cargo check 2>&1 && cargo test 2>&1 | tail -5", 2),
    ("cargo build || echo failed", 1),
    ("cargo build; cargo test", 2),
    ("cargo clippy --all-targets -- -D warnings", 1),
    ("cargo clippy --workspace 2>&1 | head -50", 1),
    ("cargo test -p app", 1),
    ("cargo test -p util -- --nocapture", 1),
    ("cd app && cargo test", 1),
    ("cd app && cargo test 2>&1 | tail -20", 1),
    ("cd crates/util && cargo build", 1),
    ("timeout 300 cargo test", 1),
    ("timeout 600 cargo test --workspace 2>&1 | tail -40", 1),
    ("env RUST_BACKTRACE=1 cargo test", 1),
    ("RUST_BACKTRACE=1 cargo test 2>&1 | tail", 1),
    ("bash -c 'cargo test'", 1),
    ("bash -c \"cargo build && cargo test\"", 2),
    ("sh -c 'cargo check'", 1),
    ("(cargo build)", 1),
    ("(cd app && cargo test)", 1),
    ("for p in app util; do cargo test -p $p; done", 2),
    (
        "cargo test > test.log 2>&1; tail -3 test.log; rm test.log",
        1,
    ),
    ("cargo test 2>test.err | tail -3; rm -f test.err", 1),
    (
        "cargo test 2>&1 | tee test.log | grep '^test result'; rm -f test.log",
        1,
    ),
    ("cargo test -q", 1),
    ("cargo test --lib", 1),
    ("cargo test --doc", 1),
    ("cargo build --release 2>&1 | tail -2", 1),
    ("cargo check --all-targets --message-format short", 1),
    ("cargo test -- --test-threads=1", 1),
    ("cargo t", 1),
    ("cargo b 2>&1 | tail -3", 1),
    ("cargo c", 1),
    ("cargo nextest run 2>&1 | grep -c PASS", 1),
    ("echo start && cargo test && echo done", 1),
    ("cargo test | cat", 1),
    (
        "n=$(cargo test 2>&1 | grep -c '^test result: ok'); echo $n",
        1,
    ),
    ("cargo build --no-such-flag; echo status $?", 1),
    ("cargo test -p no-such-package", 1),
    ("if cargo check; then cargo test; fi", 2),
    (
        "cargo check --workspace --all-targets 2>&1 | grep -E '^(warning|error)'; true",
        1,
    ),
    ("CARGO_TERM_COLOR=never cargo test 2>&1 | tail -4", 1),
    ("cargo test --no-run", 1),
    ("cd app; cargo test -q; cd ..", 1),
    ("cargo test --all-targets 2>&1 | grep '^test result'", 1),
    ("cargo --version", 0),
    ("cargo fmt --check; echo status $?", 0),
    ("cargo tree --depth 1", 0),
    (
        "cargo metadata --format-version 1 --no-deps | head -c 20",
        0,
    ),
    ("cargo run -p app", 0),
    ("cargo doc --no-deps -q", 0),
    ("cargo +stable --version", 0),
    (
        "cargo test --target-dir ../elsewhere 2>&1 | grep '^test result'",
        0,
    ),
    ("cargo pkgid -p app", 0),
    ("cargo bench --no-run -q", 0),
    ("cargo nextest list 2>/dev/null | tail -2", 0),
    ("cargo locate-project --workspace", 0),
    ("cargo test --help | head -3", 0),
    ("cargo help | head -2", 0),
    ("cargo test -q -- --test-threads=1 & wait", 0),
    ("(cargo build -q 2>&1 | tail -1) & wait; echo built", 0),
    (
        "cargo check -q & cargo test 2>&1 | grep '^test result'; wait",
        1,
    ),
];

/// `output` without what differs between two identical runs: libtest's "finished in 0.01s"
/// and cargo's "target(s) in 0.00s".
fn without_timings(output: &str) -> String {
    output
        .lines()
        .map(|line| {
            [" finished in ", " target(s) in "]
                .iter()
                .find_map(|timing| line.find(timing).map(|at| &line[..at]))
                .unwrap_or(line)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The corpus through a session with the hook's shim against a real coordinator and agent,
/// each line also run with the shim off: a line's jobs on the pool are exactly its cargo
/// commands that build or test; its exit status and its test result lines are local
/// cargo's; the lines that must stay local put nothing on the pool.
#[test]
fn a_corpus_of_agent_command_lines_reaches_the_pool_and_behaves_as_locally() {
    let cluster = Cluster::start(Fixture::new().expect("fixture"), 1, 2).expect("cluster");
    let fixture = &cluster.fixture;
    let root = fixture.root();
    let env_file = fixture.scratch().join("claude-env");
    start_session(&root, &env_file, &fixture.scratch().join("cache"));
    let mut offloadable = 0;
    let mut reached = 0;
    for (line, jobs) in CORPUS {
        let before = cluster.jobs_submitted();
        let local = session_bash(
            fixture,
            &root,
            &env_file,
            &format!("export BUILDPOOL_SHIM=off\n{line}"),
        );
        assert_eq!(
            cluster.jobs_submitted(),
            before,
            "{line}: shim off, yet a job"
        );
        let pooled = session_bash(fixture, &root, &env_file, line);
        let sent = cluster.jobs_submitted() - before;
        assert_eq!(sent, *jobs, "{line}: jobs on the pool\n{pooled}");
        assert_eq!(
            pooled.code, local.code,
            "{line}: exit status\n{pooled}\n{local}"
        );
        assert_eq!(
            test_counts(&pooled.stdout),
            test_counts(&local.stdout),
            "{line}: test results\n{pooled}\n{local}"
        );
        if *jobs == 0 {
            assert_eq!(
                without_timings(&pooled.stdout),
                without_timings(&local.stdout),
                "{line}: a local line, untouched"
            );
        } else {
            offloadable += 1;
            reached += u64::from(sent == *jobs);
        }
    }
    eprintln!("corpus: {reached} of {offloadable} offloadable lines reached the pool");
}
