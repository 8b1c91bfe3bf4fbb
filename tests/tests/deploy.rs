//! Deployment files: the NixOS module parses, and the example config and systemd unit
//! lines are accepted by the real binaries.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn check_config(args: &[String]) -> std::process::Output {
    Command::new(buildpool_tests::agent_bin())
        .args(args)
        .arg("--check-config")
        .env("BUILDPOOL_TOKEN", "test-token")
        .output()
        .expect("build-agent runs")
}

#[test]
fn the_example_agent_config_is_valid() {
    let config = repo_file("deploy/build-agent.toml");
    let output = check_config(&["--config".into(), config.display().to_string()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("agent build-1 with 8 slots"), "{stdout}");
    assert!(
        stdout.contains("wss://workstation-b:8081/ws (bob)"),
        "{stdout}"
    );
    assert!(stdout.contains("sandbox bwrap: starts"), "{stdout}");
}

#[test]
fn check_config_says_when_the_sandbox_cannot_start() {
    // A PATH without bwrap: the agent cannot sandbox and says what to do.
    let empty = tempfile::tempdir().expect("temp dir");
    let output = Command::new(buildpool_tests::agent_bin())
        .args(["--server", "ws://127.0.0.1:1/ws", "--check-config"])
        .env("BUILDPOOL_TOKEN", "test-token")
        .env("PATH", empty.path())
        .output()
        .expect("build-agent runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("bubblewrap (bwrap) is not installed")
            && stderr.contains("mode = \"none\""),
        "{stderr}"
    );
    let unsandboxed = Command::new(buildpool_tests::agent_bin())
        .args(["--server", "ws://127.0.0.1:1/ws", "--sandbox", "none"])
        .arg("--check-config")
        .env("BUILDPOOL_TOKEN", "test-token")
        .env("PATH", empty.path())
        .output()
        .expect("build-agent runs");
    let stdout = String::from_utf8_lossy(&unsandboxed.stdout);
    assert!(unsandboxed.status.success(), "{stdout}");
    assert!(stdout.contains("UNSANDBOXED"), "{stdout}");
}

#[test]
fn the_systemd_unit_runs_flags_the_agent_accepts() {
    let unit =
        std::fs::read_to_string(repo_file("deploy/systemd/build-agent.service")).expect("unit");
    let example = repo_file("deploy/build-agent.toml").display().to_string();
    for key in ["ExecStartPre=", "ExecStart="] {
        let line = unit
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} missing"));
        let args: Vec<String> = line[key.len()..]
            .split_whitespace()
            .skip(1)
            .filter(|arg| *arg != "--check-config")
            .map(|arg| {
                if arg == "/etc/build-agent/config.toml" {
                    example.clone()
                } else {
                    arg.to_owned()
                }
            })
            .collect();
        let output = check_config(&args);
        assert!(
            output.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn units_wait_for_readiness_and_have_a_watchdog() {
    for unit in ["build-agent.service", "buildpool@.service"] {
        let text =
            std::fs::read_to_string(repo_file(&format!("deploy/systemd/{unit}"))).expect("unit");
        assert!(text.lines().any(|l| l == "Type=notify"), "{unit}");
        assert!(
            text.lines().any(|l| l.starts_with("WatchdogSec=")),
            "{unit}"
        );
    }
    let module = std::fs::read_to_string(repo_file("nix/build-agent.nix")).expect("module");
    assert!(module.contains("Type = \"notify\";"), "{module}");
    assert!(module.contains("WatchdogSec = "), "{module}");
}

#[test]
fn a_broken_agent_config_is_reported_with_its_location() {
    let dir = tempfile::tempdir().expect("temp");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[worker]\nmax_jobs = \"many\"\n").expect("write");
    let output = check_config(&[
        "--config".into(),
        config.display().to_string(),
        "--server".into(),
        "ws://x:1/ws".into(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("bad.toml") && stderr.contains("max_jobs"),
        "{stderr}"
    );
}

/// The flake and both NixOS modules parse. nixpkgs cannot be fetched here, so they are
/// not evaluated: parsing is what can be checked offline.
#[test]
fn the_flake_and_both_nixos_modules_parse() {
    assert!(
        buildpool_tests::dir_of_program("nix-instantiate").is_some(),
        "needs nix (apt-get install nix-bin)"
    );
    for file in ["flake.nix", "nix/build-agent.nix", "nix/coordinator.nix"] {
        let output = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(repo_file(file))
            .output()
            .expect("nix-instantiate runs");
        assert!(
            output.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let flake = std::fs::read_to_string(repo_file("flake.nix")).expect("flake");
    for output in [
        "build-agent = import ./nix/build-agent.nix;",
        "coordinator = import ./nix/coordinator.nix;",
        "cargoLock.lockFile = ./Cargo.lock;",
        "devShells = ",
        "apps = ",
    ] {
        assert!(flake.contains(output), "flake.nix lacks {output}");
    }
    let coordinator = std::fs::read_to_string(repo_file("nix/coordinator.nix")).expect("module");
    assert!(coordinator.contains("Type = \"notify\";"), "{coordinator}");
    assert!(coordinator.contains("WatchdogSec = "), "{coordinator}");
}

#[test]
fn the_sandbox_starts_for_an_unprivileged_agent_too() {
    // The systemd unit runs the agent as a dynamic user: bwrap then needs a user namespace.
    assert!(
        buildpool_tests::dir_of_program("setpriv").is_some(),
        "needs setpriv (util-linux)"
    );
    // A copy the unprivileged user can reach, wherever the build tree lives.
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = dir.path().join("build-agent");
    std::fs::copy(buildpool_tests::agent_bin(), &agent).expect("copy");
    for path in [dir.path(), agent.as_path()] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&agent)
        .args(["--server", "ws://127.0.0.1:1/ws", "--check-config"])
        .env("BUILDPOOL_TOKEN", "test-token")
        .env("HOME", "/nonexistent")
        .output()
        .expect("setpriv runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("sandbox bwrap: starts"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
