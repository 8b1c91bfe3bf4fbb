//! A hostile tenant against a real agent: what the red team of issue 25 did to jobs, each
//! attack tried by a real job on a real `build-agent` (run as root in CI, and as whoever
//! runs the tests elsewhere), each shown to fail. The same probes on an unsandboxed agent
//! do succeed, so they are real.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, Owned, RunOutput, wait_until};

/// The prying crate's test: every attack on the agent's host that a job can try from
/// inside, each finding a line of the returned list.
const PRY: &str = r#"
use std::io::Write;

fn status_field(name: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(name).map(|rest| rest.trim().to_owned()))
        .unwrap_or_default()
}

fn run(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn pry() -> Vec<String> {
    let mut found = Vec::new();
    // Root and capabilities.
    let uid = status_field("Uid:");
    if uid.split_whitespace().any(|id| id == "0") {
        found.push(format!("runs as root ({uid})"));
    }
    for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
        let caps = status_field(set);
        if caps.trim_start_matches('0').len() > 0 {
            found.push(format!("{set} {caps}"));
        }
    }
    if status_field("NoNewPrivs:") != "1" {
        found.push("no_new_privs is off".into());
    }
    if std::fs::read("/etc/shadow").is_ok() {
        found.push("read /etc/shadow".into());
    }
    // Changes to the host are tried only in a sandbox: on an unsandboxed root agent they
    // would really happen.
    if CONTAINED {
        let workspace = std::env::current_dir().unwrap_or_default();
        if run("umount", &[&workspace.to_string_lossy()]) {
            found.push("unmounted the workspace".into());
        }
        if run("mount", &["-o", "remount,rw", "/usr"]) {
            found.push("remounted /usr read-write".into());
        }
        if std::fs::write("/usr/written-by-a-job", "x").is_ok() {
            found.push("wrote /usr".into());
        }
        // The agent runs git in the checkout after the job: a `.git` pointing at a
        // repository of the job's would let it choose what git runs (core.fsmonitor).
        let git_link = workspace.join(".git");
        if std::fs::write(&git_link, "gitdir: /build/evil\n").is_ok()
            || std::fs::remove_file(&git_link).is_ok()
        {
            found.push("rewrote the checkout's .git link".into());
        }
    }
    // The agent user's home and the coordinator's secrets when they share a user.
    for secret in SECRETS {
        if std::fs::read(secret).is_ok() {
            found.push(format!("read {secret}"));
        }
    }
    // The sandbox's own command line names host paths.
    let cmdline = String::from_utf8_lossy(&std::fs::read("/proc/1/cmdline").unwrap_or_default())
        .replace('\0', " ");
    if cmdline.contains("--bind") || cmdline.contains(SCRATCH) {
        found.push(format!("/proc/1/cmdline shows the mounts: {cmdline}"));
    }
    found
}

/// A cargo message naming `executable`, forged whole: the agent reads only messages of
/// the shape cargo writes.
fn forged_artifact(executable: &str) -> String {
    format!(
        "{{\"reason\":\"compiler-artifact\",\"package_id\":\"prying 0.1.0\",\
         \"manifest_path\":\"Cargo.toml\",\"target\":{{\"kind\":[\"bin\"],\
         \"crate_types\":[\"bin\"],\"name\":\"prying\",\"src_path\":\"src/main.rs\",\
         \"edition\":\"2021\",\"doc\":true,\"doctest\":false,\"test\":true}},\
         \"profile\":{{\"opt_level\":\"0\",\"debuginfo\":2,\"debug_assertions\":true,\
         \"overflow_checks\":true,\"test\":false}},\"features\":[],\"filenames\":[],\
         \"executable\":{executable:?},\"fresh\":false}}"
    )
}

/// Plants links to the agent's secrets and a FIFO among the executables, and names them
/// in forged cargo messages on stdout, for `--artifacts`.
fn plant_artifacts() {
    let exe = std::env::current_exe().expect("current exe");
    let debug = exe.parent().and_then(|deps| deps.parent()).expect("target/debug");
    let plant = |name: &str, target: &str| {
        let _ = std::fs::remove_file(debug.join(name));
        std::os::unix::fs::symlink(target, debug.join(name)).expect("link");
    };
    plant("token-link", TOKEN_FILE);
    plant("environ-link", "/proc/self/environ");
    plant("root-link", "/");
    let fifo = debug.join("fifo-exe");
    let _ = std::fs::remove_file(&fifo);
    assert!(run("mkfifo", &[&fifo.to_string_lossy()]), "mkfifo");
    // libtest captures print!, not writes to the stdout handle.
    let mut stdout = std::io::stdout().lock();
    for name in ["token-link", "environ-link", "fifo-exe", "root-link/etc/passwd"] {
        let path = debug.join(name);
        writeln!(stdout, "{}", forged_artifact(&path.to_string_lossy())).expect("forged message");
    }
    let climbing = format!("{}/../../../..{}", debug.display(), TOKEN_FILE);
    writeln!(stdout, "{}", forged_artifact(&climbing)).expect("forged message");
}

#[test]
fn pries() {
    plant_artifacts();
    let found = pry();
    assert!(found.is_empty(), "FOUND: {found:?}");
}
"#;

/// The prying crate; `targets.rs` names what it pries at, written once known.
fn prying_fixture() -> Fixture {
    Fixture::with_files(&[
        (
            "Cargo.toml",
            "[package]\nname = \"prying\"\nversion = \"0.1.0\"\nedition = \"2021\"\n".into(),
        ),
        (
            "src/targets.rs",
            targets_source(Path::new("/nonexistent"), &[], "/nonexistent", false),
        ),
        (
            "src/lib.rs",
            format!("#[cfg(test)]\nmod tests {{\n    include!(\"targets.rs\");\n{PRY}}}\n"),
        ),
    ])
    .expect("prying fixture")
}

fn targets_source(
    token_file: &Path,
    secrets: &[PathBuf],
    scratch: &str,
    contained: bool,
) -> String {
    let secrets: Vec<String> = secrets
        .iter()
        .map(|path| format!("{:?}", path.display().to_string()))
        .collect();
    format!(
        "const TOKEN_FILE: &str = {:?};\nconst SECRETS: &[&str] = &[{}];\n\
         const SCRATCH: &str = {scratch:?};\nconst CONTAINED: bool = {contained};\n",
        token_file.display().to_string(),
        secrets.join(", "),
    )
}

/// A home for the agent in `dir` with the secrets a real one holds: an SSH key, and the
/// coordinator's token, key and credentials when the two share a user.
fn agent_home(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let home = dir.join("agent-home");
    let secrets = [
        ".ssh/id_ed25519",
        ".config/buildpool/token",
        ".config/buildpool/tls-key.pem",
        ".config/buildpool/credentials.json",
    ]
    .map(|rel| home.join(rel));
    for secret in &secrets {
        std::fs::create_dir_all(secret.parent().expect("parent")).expect("dir");
        std::fs::write(secret, "canary").expect("canary");
    }
    (home, secrets.to_vec())
}

/// Where rustup keeps toolchains for this process, so an agent with another `HOME` still
/// finds the same one.
fn rustup_home() -> Option<PathBuf> {
    std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".rustup")))
        .filter(|dir| dir.is_dir())
}

/// A directory outside `/tmp`, as an agent's home or state is on a real host: a sandbox
/// always has a private `/tmp`, so a secret there would prove nothing.
fn outside_tmp(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("a directory in /var/tmp");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("open it");
    dir
}

/// Starts agent `id` of `cluster` with a home (in `dir`) full of secrets; returns it and
/// the secrets.
fn start_agent(cluster: &Cluster, dir: &Path, id: &str, extra: &[&str]) -> (Owned, Vec<PathBuf>) {
    let scratch = cluster.fixture.scratch();
    let (home, secrets) = agent_home(dir);
    let mut command = cluster.agent_command(id, 1, extra);
    command.env("HOME", &home);
    if let Some(rustup) = rustup_home() {
        command.env("RUSTUP_HOME", rustup);
    }
    let agent = Owned::spawn(command, scratch.join(format!("{id}.log"))).expect("agent");
    assert!(
        wait_until(Duration::from_secs(20), || cluster.agent_ids() == [id]),
        "{}",
        agent.log_text()
    );
    (agent, secrets)
}

/// `run --artifacts` of the prying crate named each planted entry as refused, and none of
/// them arrived in the workstation's `target/`.
fn assert_planted_artifacts_refused(cluster: &Cluster, run: &RunOutput) {
    for refused in [
        "debug/environ-link (a symbolic link, or beneath one)",
        "debug/token-link (a symbolic link, or beneath one)",
        "debug/root-link/etc/passwd (a symbolic link, or beneath one)",
        "debug/fifo-exe (not a regular file)",
        "(not beneath the target directory)",
    ] {
        assert!(run.stderr.contains(refused), "{refused:?} not named: {run}");
    }
    let debug = cluster.fixture.root().join("target/debug");
    for planted in ["token-link", "environ-link", "fifo-exe", "root-link"] {
        assert!(
            std::fs::symlink_metadata(debug.join(planted)).is_err(),
            "{planted} arrived in the workstation's target/"
        );
    }
}

#[test]
fn a_hostile_job_gets_no_root_no_secret_and_no_artifact_but_its_own() {
    let cluster = Cluster::start(prying_fixture(), 0, 1).expect("cluster");
    let scratch = cluster.fixture.scratch();
    let homes = outside_tmp("buildpool-agent-home-");
    let (mut agent, secrets) = start_agent(&cluster, homes.path(), "pried", &[]);
    let token_file = cluster.fixture.token_file();
    cluster
        .fixture
        .write(
            "src/targets.rs",
            &targets_source(&token_file, &secrets, &scratch.display().to_string(), true),
        )
        .expect("targets");

    let run = cluster
        .fixture
        .run(&["run", "test", "--artifacts"])
        .expect("runs");
    assert_eq!(run.code, Some(0), "every attack must fail: {run}");
    // --artifacts: the links and the FIFO are refused by name, the job does not hang, and
    // only what cargo built arrives.
    assert_planted_artifacts_refused(&cluster, &run);
    let debug = cluster.fixture.root().join("target/debug");
    let token = std::fs::read_to_string(&token_file).expect("token");
    let delivered: Vec<PathBuf> = std::fs::read_dir(debug.join("deps"))
        .expect("the test executable arrived")
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert!(
        delivered.iter().any(|path| path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("prying-"))),
        "{delivered:?}"
    );
    for path in &delivered {
        let bytes = std::fs::read(path).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(token.trim()),
            "{} holds the agent's token",
            path.display()
        );
    }

    // The probes are real: the same job on an unsandboxed agent finds what they look for.
    agent.kill_hard();
    cluster
        .fixture
        .write(
            "src/targets.rs",
            &targets_source(&token_file, &secrets, &scratch.display().to_string(), false),
        )
        .expect("targets");
    let (_unsandboxed, _) = start_agent(
        &cluster,
        homes.path(),
        "unsandboxed",
        &["--sandbox", "none"],
    );
    let exposed = cluster.fixture.run(&["run", "test"]).expect("runs");
    assert_ne!(exposed.code, Some(0), "{exposed}");
    assert!(
        exposed.stdout.contains("FOUND") && exposed.stdout.contains("agent-home"),
        "{exposed}"
    );
}

/// `command` run as `uid`:`gid` with no supplementary group, through `setpriv`.
fn as_user(command: &Command, uid: u32, gid: u32) -> Command {
    let mut wrapped = Command::new("setpriv");
    wrapped
        .args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_owned(),
            "--".to_owned(),
        ])
        .arg(command.get_program())
        .args(command.get_args());
    for (name, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(name, value),
            None => wrapped.env_remove(name),
        };
    }
    wrapped
}

/// The same attacks on an agent run by an unprivileged user (here `nobody`, as a build
/// host's service user): its jobs run in a user namespace of that user, and find nothing of
/// its home, its token or its caches. Needs root to start the agent as another user, and a
/// toolchain that user can run (`.ci/run` makes root's reachable).
#[test]
fn a_hostile_job_of_an_unprivileged_agent_gets_nothing_either() {
    const NOBODY: u32 = 65534;
    let Some(cargo) = buildpool_tests::dir_of_program("cargo").map(|dir| dir.join("cargo")) else {
        panic!("cargo is on PATH");
    };
    // The toolchain and this build's agent binary, run as that user.
    let runs_as_nobody = |program: &Path| {
        Command::new("setpriv")
            .args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}")])
            .args(["--clear-groups", "--"])
            .arg(program)
            .arg("--version")
            .env("RUSTUP_HOME", rustup_home().unwrap_or_default())
            .output()
            .is_ok_and(|output| output.status.success())
    };
    let agent_binary = buildpool_tests::agent_bin();
    for program in [&cargo, &agent_binary] {
        if !runs_as_nobody(program) {
            eprintln!(
                "skipped: needs root, and user {NOBODY} able to run {}",
                program.display()
            );
            return;
        }
    }
    let cluster = Cluster::start(prying_fixture(), 0, 1).expect("cluster");
    let scratch = cluster.fixture.scratch();
    // The agent's own directory, which the test's private scratch directory would hide.
    let base = outside_tmp("buildpool-unprivileged-");
    let dir = base.path().join("agent");
    let (home, secrets) = agent_home(&dir);
    let token_file = dir.join("token");
    std::fs::copy(cluster.fixture.token_file(), &token_file).expect("token");
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).expect("chown");
    let chowned = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(&dir)
        .status()
        .expect("chown -R");
    assert!(chowned.success());
    let token_arg = token_file.to_string_lossy().into_owned();
    let mut command =
        cluster.agent_command_in(&dir, "unprivileged", 1, &["--token-file", &token_arg]);
    command.env("HOME", &home);
    if let Some(rustup) = rustup_home() {
        command.env("RUSTUP_HOME", rustup);
    }
    let agent = Owned::spawn(
        as_user(&command, NOBODY, NOBODY),
        scratch.join("unprivileged.log"),
    )
    .expect("agent");
    assert!(
        wait_until(Duration::from_secs(20), || cluster.agent_ids()
            == ["unprivileged"]),
        "{}",
        agent.log_text()
    );
    cluster
        .fixture
        .write(
            "src/targets.rs",
            &targets_source(
                &token_file,
                &secrets,
                &base.path().display().to_string(),
                true,
            ),
        )
        .expect("targets");
    let run = cluster
        .fixture
        .run(&["run", "test", "--artifacts"])
        .expect("runs");
    assert_eq!(
        run.code,
        Some(0),
        "every attack must fail: {run}\n{}",
        agent.log_text()
    );
    assert_planted_artifacts_refused(&cluster, &run);
}

/// A second agent holding a valid agent credential takes the id of a connected one: it is
/// refused, told why, and the real agent keeps its connection and runs the next job.
#[test]
fn an_impostor_agent_is_refused_the_id_of_a_connected_one() {
    let cluster = Cluster::start(Fixture::new().expect("fixture"), 1, 1).expect("cluster");
    let scratch = cluster.fixture.scratch();
    // Its own state, so its own identity key; the same credential.
    let impostor = Owned::spawn(
        cluster.agent_command_in(&scratch.join("impostor"), "worker-1", 1, &[]),
        scratch.join("impostor.log"),
    )
    .expect("impostor");
    assert!(
        wait_until(Duration::from_secs(20), || impostor
            .log_text()
            .contains("belongs to another agent")),
        "{}",
        impostor.log_text()
    );
    assert_eq!(cluster.agent_ids(), ["worker-1"]);
    let run = cluster.fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stderr.contains("on worker-1"), "{run}");
    let real = std::fs::read_to_string(scratch.join("worker-1.log")).expect("agent log");
    assert!(real.contains("connected coordinator"), "{real}");
    assert!(
        !impostor.log_text().contains("connected coordinator"),
        "the impostor never got in: {}",
        impostor.log_text()
    );
}
