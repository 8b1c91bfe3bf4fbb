//! Jobs on a shared build host are contained: a hostile repository's build script and test
//! find nothing of the agent (token, credentials, config, caches) or of another tenant, and
//! cannot write outside their workspace, see the agent's processes or signal it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, Owned, SIGTERM, ServeOptions, process_alive, wait_until};

/// Every escape the hostile crate tries, in both its build script and its test. Each finding
/// is a line in the returned list; the crate fails its build or test on any.
const ESCAPES: &str = r#"
fn escapes() -> Vec<String> {
    let mut leaks = Vec::new();
    for (name, value) in std::env::vars() {
        if value.contains(TOKEN) || name == "BUILDPOOL_TOKEN" || name == "CREDENTIALS_DIRECTORY" {
            leaks.push(format!("the agent's environment: {name}"));
        }
    }
    for file in TOKEN_FILES {
        if std::fs::read_to_string(file).is_ok_and(|text| text.contains(TOKEN)) {
            leaks.push(format!("read the token from {file}"));
        }
    }
    for dir in AGENT_DIRS.iter().chain([&OTHER_REPOSITORY]) {
        if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
            leaks.push(format!("listed {dir}"));
        }
        let probe = format!("{dir}/written-by-a-hostile-job");
        if std::fs::write(&probe, "x").is_ok() {
            leaks.push(format!("wrote {probe}"));
        }
    }
    let other = format!("{OTHER_REPOSITORY}/slot-0/src/Cargo.toml");
    if std::fs::read_to_string(&other).is_ok() {
        leaks.push(format!("read {other}"));
    }
    for outside in ["/written-by-a-hostile-job", "/etc/written-by-a-hostile-job"] {
        if std::fs::write(outside, "x").is_ok() {
            leaks.push(format!("wrote {outside}"));
        }
    }
    // Writing /tmp works, in the sandbox's own /tmp; the test checks the host's stays clean.
    let _ = std::fs::write(HOST_TMP_MARKER, "escaped");
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("build-agent") {
                leaks.push(format!("saw the agent's process {:?}", entry.file_name()));
            }
        }
    }
    // Signal 0 asks whether a signal could be delivered, without sending one.
    let signalled = std::process::Command::new("kill")
        .args(["-0", &AGENT_PID.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if signalled {
        leaks.push(format!("could signal the agent (pid {AGENT_PID})"));
    }
    leaks
}
"#;

/// What the hostile crate knows of the host: everything a tenant could guess or learn.
struct Targets {
    token: String,
    token_files: Vec<PathBuf>,
    agent_dirs: Vec<PathBuf>,
    other_repository: PathBuf,
    agent_pid: u32,
    host_tmp_marker: PathBuf,
}

/// `escapes.rs`: the targets as constants, then [`ESCAPES`].
fn escapes_source(targets: &Targets) -> String {
    let list = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|path| format!("{:?}", path.display().to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "const TOKEN: &str = {:?};\nconst TOKEN_FILES: &[&str] = &[{}];\n\
         const AGENT_DIRS: &[&str] = &[{}];\nconst OTHER_REPOSITORY: &str = {:?};\n\
         const AGENT_PID: u32 = {};\nconst HOST_TMP_MARKER: &str = {:?};\n{ESCAPES}",
        targets.token,
        list(&targets.token_files),
        list(&targets.agent_dirs),
        targets.other_repository.display().to_string(),
        targets.agent_pid,
        targets.host_tmp_marker.display().to_string(),
    )
}

/// A crate whose build script and test try every escape; `escapes.rs` is written later,
/// once the targets are known (uncommitted edits are what gets built).
fn hostile_fixture() -> Fixture {
    let unknown = Targets {
        token: "unknown".into(),
        token_files: Vec::new(),
        agent_dirs: Vec::new(),
        other_repository: "/nonexistent".into(),
        agent_pid: 0,
        host_tmp_marker: "/nonexistent".into(),
    };
    Fixture::with_files(&[
        (
            "Cargo.toml",
            "[package]\nname = \"hostile\"\nversion = \"0.1.0\"\nedition = \"2021\"\n".into(),
        ),
        ("escapes.rs", escapes_source(&unknown)),
        (
            "build.rs",
            "include!(\"escapes.rs\");\nfn main() {\n    let leaks = escapes();\n    \
             assert!(leaks.is_empty(), \"LEAKED from build.rs: {leaks:?}\");\n}\n"
                .into(),
        ),
        (
            "src/lib.rs",
            "#[cfg(test)]\nmod tests {\n    include!(\"../escapes.rs\");\n    #[test]\n    \
             fn finds_nothing_outside_its_sandbox() {\n        let leaks = escapes();\n        \
             assert!(leaks.is_empty(), \"LEAKED from a test: {leaks:?}\");\n    }\n}\n"
                .into(),
        ),
    ])
    .expect("hostile fixture")
}

/// The one repository directory (`<id>`) under an agent's workspace directory.
fn repository_dir(workspaces: &Path) -> PathBuf {
    std::fs::read_dir(workspaces)
        .expect("workspaces")
        .flatten()
        .find(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .expect("a repository workspace")
        .path()
}

#[test]
fn a_hostile_job_finds_nothing_of_the_agent_or_another_tenant() {
    // Two tenants, each with its coordinator (same token), and one agent serving both. The
    // agent has its token in its environment, in a token file and as a systemd credential.
    let victim = Cluster::start(Fixture::new().expect("fixture"), 0, 1).expect("cluster");
    let hostile = Cluster::start_with(
        hostile_fixture(),
        0,
        1,
        &ServeOptions {
            token_file: Some(victim.fixture.token_file()),
            ..ServeOptions::default()
        },
    )
    .expect("hostile cluster");
    let token = std::fs::read_to_string(victim.fixture.token_file()).expect("token");
    let token = token.trim().to_owned();
    let scratch = victim.fixture.scratch();
    let credentials = scratch.join("credentials");
    std::fs::create_dir_all(&credentials).expect("credentials dir");
    std::fs::write(credentials.join("token"), &token).expect("credential");
    let mut command = victim.agent_command(
        "shared",
        2,
        &[
            "--server",
            &victim.bus_url(),
            "--server",
            &hostile.bus_url(),
        ],
    );
    command
        .env("BUILDPOOL_TOKEN", &token)
        .env("CREDENTIALS_DIRECTORY", &credentials);
    let agent = Owned::spawn(command, scratch.join("shared.log")).expect("agent");
    for cluster in [&victim, &hostile] {
        assert!(
            wait_until(Duration::from_secs(20), || cluster.agent_ids()
                == ["shared"]),
            "{}",
            agent.log_text()
        );
    }
    let victim_run = victim.fixture.run(&["run", "build"]).expect("runs");
    assert_eq!(victim_run.code, Some(0), "{victim_run}");
    let workspaces = scratch.join("shared/workspaces");
    let other_repository = repository_dir(&workspaces);

    let host_tmp_marker =
        std::env::temp_dir().join(format!("buildpool-escaped-{}", std::process::id()));
    let targets = Targets {
        token: token.clone(),
        token_files: vec![victim.fixture.token_file(), credentials.join("token")],
        agent_dirs: vec![
            workspaces.clone(),
            scratch.join("shared/cache"),
            credentials.clone(),
        ],
        other_repository: other_repository.clone(),
        agent_pid: agent.pid(),
        host_tmp_marker: host_tmp_marker.clone(),
    };
    hostile
        .fixture
        .write("escapes.rs", &escapes_source(&targets))
        .expect("escapes.rs");

    let run = hostile.fixture.run(&["run", "test"]).expect("runs");
    assert_eq!(run.code, Some(0), "every escape must fail: {run}");
    assert!(run.stdout.contains("1 passed"), "{run}");
    assert!(
        !host_tmp_marker.exists(),
        "the job wrote the host's /tmp: {}",
        host_tmp_marker.display()
    );
    assert!(
        !other_repository
            .join("slot-0/src/written-by-a-hostile-job")
            .exists(),
        "the job wrote another tenant's workspace"
    );
    assert!(process_alive(i32::try_from(agent.pid()).expect("pid fits")));

    // The agent keeps serving the other tenant.
    let again = victim.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(again.code, Some(0), "{again}");

    // The same job on an unsandboxed agent does find the secrets: the probes are real.
    let mut agent = agent;
    agent.signal(SIGTERM);
    assert!(agent.wait_timeout(Duration::from_secs(30)).is_some());
    let token_file = victim.fixture.token_file();
    let token_file = token_file.to_str().expect("utf-8 path");
    let command = hostile.agent_command(
        "unsandboxed",
        1,
        &["--sandbox", "none", "--token-file", token_file],
    );
    let unsandboxed = Owned::spawn(command, scratch.join("unsandboxed.log")).expect("agent");
    assert!(
        wait_until(Duration::from_secs(20), || hostile.agent_ids()
            == ["unsandboxed"]),
        "{}",
        unsandboxed.log_text()
    );
    let exposed = hostile.fixture.run(&["run", "test"]).expect("runs");
    assert_ne!(exposed.code, Some(0), "{exposed}");
    assert!(
        exposed.stderr.contains("LEAKED") && exposed.stderr.contains("read the token from"),
        "{exposed}"
    );
    // Unsandboxed (and as root in CI) its writes outside really happened.
    for written in [
        host_tmp_marker,
        PathBuf::from("/written-by-a-hostile-job"),
        PathBuf::from("/etc/written-by-a-hostile-job"),
    ] {
        let _ = std::fs::remove_file(written);
    }
}

/// Workspace directories of one repository on an agent: `slot-N` entries.
fn slots_of(repository: &Path) -> Vec<String> {
    std::fs::read_dir(repository)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("slot-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_tiny_disk_budget_evicts_idle_workspaces_but_never_a_running_job() {
    // Unsandboxed: the running job is the fixture's sleeping test, watched from the host.
    let first = Cluster::start_with(
        Fixture::new().expect("fixture"),
        0,
        1,
        &ServeOptions::unsandboxed(),
    )
    .expect("cluster");
    let second = Cluster::start_with(
        Fixture::new().expect("fixture"),
        0,
        1,
        &ServeOptions {
            token_file: Some(first.fixture.token_file()),
            ..ServeOptions::unsandboxed()
        },
    )
    .expect("cluster");
    // A budget of 100 kB: any built workspace is over it.
    let command = first.agent_command(
        "tight",
        2,
        &[
            "--server",
            &first.bus_url(),
            "--server",
            &second.bus_url(),
            "--max-disk-gb",
            "0.0001",
        ],
    );
    let agent = Owned::spawn(command, first.fixture.scratch().join("tight.log")).expect("agent");
    for cluster in [&first, &second] {
        assert!(
            wait_until(Duration::from_secs(20), || cluster.agent_ids() == ["tight"]),
            "{}",
            agent.log_text()
        );
    }
    let workspaces = first.fixture.scratch().join("tight/workspaces");

    // A finished job's workspace is idle: over budget, it goes.
    let built = second.fixture.run(&["run", "build"]).expect("runs");
    assert_eq!(built.code, Some(0), "{built}");
    let second_repository = repository_dir(&workspaces);
    assert!(
        wait_until(Duration::from_secs(20), || slots_of(&second_repository)
            .is_empty()),
        "the idle workspace was not evicted: {}",
        agent.log_text()
    );

    // A running job's workspace stays while other jobs end and eviction runs around it.
    std::fs::write(first.fixture.sleep_file(), "8").expect("sleep file");
    let mut running = Owned::spawn(
        first
            .fixture
            .command_in(&first.fixture.root(), &Fixture::brief_job()),
        first.fixture.scratch().join("running.log"),
    )
    .expect("run starts");
    assert!(
        wait_until(Duration::from_secs(60), || first.fixture.starts() == 1),
        "{}",
        running.log_text()
    );
    let first_repository = std::fs::read_dir(&workspaces)
        .expect("workspaces")
        .flatten()
        .map(|entry| entry.path())
        .find(|path| !slots_of(path).is_empty())
        .expect("the running job's workspace");
    for _ in 0..2 {
        let other = second.fixture.run(&["run", "check"]).expect("runs");
        assert_eq!(other.code, Some(0), "{other}");
    }
    assert_eq!(slots_of(&first_repository), ["slot-0"]);
    let status = running
        .wait_timeout(Duration::from_secs(120))
        .expect("the running job ends");
    assert_eq!(status.code(), Some(0), "{}", running.log_text());
    assert_eq!(first.fixture.starts(), 1, "the job ran once, whole");

    // Status shows the budget and that this agent runs jobs unsandboxed.
    let status = first.status().expect("status");
    let tight = status["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|agent| agent["id"] == "tight")
        .expect("the agent in status");
    assert_eq!(tight["disk_budget_bytes"], 100_000, "{status}");
    assert_eq!(tight["sandboxed"], false, "{status}");
    // The last job's workspace is measured and evicted after it ends: wait for that.
    let status_text = || {
        let output = first.fixture.buildpool(&["status"]).expect("status");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(
        wait_until(Duration::from_secs(20), || status_text()
            .contains("kB/100 kB")),
        "{}",
        status_text()
    );
    assert!(status_text().contains("UNSANDBOXED"), "{}", status_text());
}
