//! Deployment files: the NixOS module parses, and the example config and systemd unit
//! lines are accepted by the real binaries. The Kubernetes manifests and the Containerfile
//! pass deploy/validate.py (which fails on broken copies), and what they say agrees with
//! the agent: its config, its drain, the metrics the autoscaler reads.

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

/// Both modules' options evaluate (with a stand-in for nixpkgs' `lib`, which cannot be
/// fetched here): each has a type and a description, the defaults are the agent's, and the
/// README names every one.
#[test]
fn every_nixos_module_option_evaluates_and_the_readme_names_it() {
    let output = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(repo_file("tests/nix/module-options.nix"))
        .arg("--arg")
        .arg("root")
        .arg(repo_file("."))
        .output()
        .expect("nix-instantiate runs (apt-get install nix-bin)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let modules: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("README");
    let nixos = readme
        .split("- **NixOS**")
        .nth(1)
        .and_then(|rest| rest.split("- **Nix flake**").next())
        .expect("the README's NixOS bullet");
    for (module, documented) in [("agent", "`{}`"), ("coordinator", " {};")] {
        let options = modules[module].as_object().expect("options");
        for (name, option) in options {
            assert!(
                option["type"].is_string()
                    && option["description"].as_str().is_some_and(|d| d.len() > 10),
                "{module} option {name}: {option}"
            );
            let named = if module == "agent" && name == "enable" {
                "`services.build-agent.enable`".to_owned()
            } else {
                documented.replace("{}", name)
            };
            assert!(
                nixos.contains(&named),
                "the README does not name {module} option {name}"
            );
        }
    }
    let agent = &modules["agent"];
    // The module's defaults are the agent's own (build-agent/src/config.rs).
    assert_eq!(agent["sandbox"]["default"], "bwrap");
    assert_eq!(agent["sandboxNetwork"]["default"], true);
    assert_eq!(agent["env"]["default"], "auto");
    assert_eq!(agent["workspaceTtlDays"]["default"], 14);
    assert!(
        agent["tokenFile"].get("default").is_none(),
        "the token has no default"
    );
    let coordinator = &modules["coordinator"];
    assert_eq!(coordinator["websocketPort"]["default"], 8081);
    assert_eq!(coordinator["gitDaemonPort"]["default"], 9418);
    assert_eq!(coordinator["tlsCertFile"]["type"], "null or path");
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

/// The virtual environment of deploy/validate.py's tools (kubernetes-validate, KEDA's
/// models, hadolint), where .ci/run makes it.
fn validator_python() -> PathBuf {
    let venv = std::env::var_os("BUILDPOOL_DEPLOY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            Path::new(&home).join(".cache/buildpool/deploy-venv")
        });
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "deploy/validate.py's tools are not installed: run bash .ci/run, or python3 -m venv {0} \
         && {0}/bin/pip install -r deploy/requirements.txt",
        venv.display()
    );
    python
}

/// deploy/validate.py on `deploy_dir` (a copy of deploy/, or deploy/ itself).
fn validate(deploy_dir: &Path) -> std::process::Output {
    let output = Command::new(validator_python())
        .arg(repo_file("deploy/validate.py"))
        .arg("--deploy-dir")
        .arg(deploy_dir)
        .output()
        .expect("the validator runs");
    // 2: a tool is missing, which is no verdict on the files.
    assert_ne!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn the_kubernetes_manifests_and_the_containerfile_pass_their_validators() {
    let output = validate(&repo_file("deploy"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for object in [
        "statefulset.yaml: StatefulSet build-agent",
        "keda-scaledobject.yaml: ScaledObject build-agent",
        "configmap.yaml: ConfigMap build-agent-config",
        "service.yaml: Service build-agent",
        "poddisruptionbudget.yaml: PodDisruptionBudget build-agent",
        "serviceaccount.yaml: ServiceAccount build-agent",
        "secret.example.yaml: Secret build-agent-token",
    ] {
        assert!(stdout.contains(&format!("checked {object}\n")), "{stdout}");
    }
}

/// deploy/kubernetes and deploy/container copied into a temporary directory.
fn copy_of_deploy() -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("temp dir");
    for dir in ["kubernetes", "container"] {
        std::fs::create_dir(copy.path().join(dir)).expect("mkdir");
        for entry in std::fs::read_dir(repo_file(&format!("deploy/{dir}"))).expect("read dir") {
            let path = entry.expect("entry").path();
            std::fs::copy(
                &path,
                copy.path().join(dir).join(path.file_name().expect("name")),
            )
            .expect("copy");
        }
    }
    copy
}

/// Each breakage is caught, with the place and the reason: the validator can fail.
#[test]
fn the_validators_refuse_broken_manifests_with_the_reason() {
    let cases: [(&str, &str, &str, &str); 8] = [
        (
            "kubernetes/statefulset.yaml",
            "terminationGracePeriodSeconds: 660",
            "terminationGracePeriodSeconds: soon",
            "spec.template.spec.terminationGracePeriodSeconds: 'soon' is not of type 'integer'",
        ),
        (
            "kubernetes/statefulset.yaml",
            "      hostUsers: false\n",
            "",
            "procMount Unmasked needs hostUsers: false",
        ),
        (
            "kubernetes/keda-scaledobject.yaml",
            "      metricType: AverageValue\n",
            "      metricType: AverageValue\n      threshold: \"4\"\n",
            "spec.triggers.0: Additional properties are not allowed ('threshold' was unexpected)",
        ),
        (
            "kubernetes/keda-scaledobject.yaml",
            "  scaleTargetRef:\n    apiVersion: apps/v1\n    kind: StatefulSet\n    name: build-agent\n",
            "",
            "spec: 'scaleTargetRef' is a required property",
        ),
        (
            "kubernetes/keda-scaledobject.yaml",
            "threshold: \"4\"",
            "threshold: 4",
            "spec.triggers.0.metadata.threshold: 4 is not of type 'string'",
        ),
        (
            "kubernetes/kustomization.yaml",
            "  - keda-scaledobject.yaml\n",
            "  - keda-scaledobject.yaml\n  - hpa.yaml\n",
            "kustomization.yaml: resource hpa.yaml does not exist",
        ),
        (
            "kubernetes/prometheus-scrape.yaml",
            "regex: metrics",
            "regex: http",
            "job build-agent keeps no port of ['metrics']",
        ),
        (
            "container/Containerfile",
            "# hadolint ignore=DL3008\n",
            "",
            "DL3008",
        ),
    ];
    std::thread::scope(|scope| {
        for (file, old, new, expected) in cases {
            scope.spawn(move || {
                let copy = copy_of_deploy();
                let path = copy.path().join(file);
                let text = std::fs::read_to_string(&path).expect("read");
                assert!(text.contains(old), "{file} no longer has {old:?}");
                std::fs::write(&path, text.replacen(old, new, 1)).expect("write");
                let output = validate(copy.path());
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert_eq!(output.status.code(), Some(1), "{file}: {new:?}: {stderr}");
                assert!(stderr.contains(expected), "{file}: {new:?}: {stderr}");
            });
        }
    });
}

/// The first line of `text` (trimmed) that starts with `key`, without it.
fn value_after<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in\n{text}"))
        .trim()
}

/// The agent config in deploy/kubernetes/configmap.yaml (its `config.toml` block).
fn configmap_agent_config() -> String {
    let configmap =
        std::fs::read_to_string(repo_file("deploy/kubernetes/configmap.yaml")).expect("read");
    let (_, block) = configmap
        .split_once("  config.toml: |\n")
        .expect("a config.toml block");
    block
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| format!("{}\n", line.get(4..).unwrap_or("")))
        .collect()
}

/// The pods' grace period outlasts the drain the config asks for, and the real agent
/// accepts that config (its storage moved to a temporary directory, the token from the
/// environment as the Secret's file would give it).
#[test]
fn the_pods_outlast_their_drain_and_run_the_configmaps_config() {
    let config = configmap_agent_config();
    let statefulset =
        std::fs::read_to_string(repo_file("deploy/kubernetes/statefulset.yaml")).expect("read");
    let grace: u64 = value_after(&statefulset, "terminationGracePeriodSeconds:")
        .parse()
        .expect("a number");
    let drain: u64 = value_after(&config, "drain_timeout_secs =")
        .parse()
        .expect("a number");
    // After the drain the agent may wait for jobs it stopped and for its links to close.
    assert!(
        grace >= drain + 30,
        "terminationGracePeriodSeconds {grace} < drain_timeout_secs {drain} + 30: the \
         kubelet would kill running jobs"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, &config).expect("write");
    let output = check_config(&[
        "--config".into(),
        file.display().to_string(),
        "--git-cache-dir".into(),
        dir.path().join("repos").display().to_string(),
        "--worktree-dir".into(),
        dir.path().join("workspaces").display().to_string(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("with 4 slots"), "{stdout}");
    assert!(stdout.contains("sandbox bwrap: starts"), "{stdout}");
}

/// The names in a PromQL expression: (metrics, labels of `by (...)` groupings). Function
/// and aggregation names (followed by `(`, `by` or `without`) and operators are neither.
fn promql_names(query: &str) -> (Vec<String>, Vec<String>) {
    let mut tokens = Vec::new();
    let mut rest = query;
    while let Some(c) = rest.chars().next() {
        let length = if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len())
        } else {
            c.len_utf8()
        };
        let (token, tail) = rest.split_at(length);
        if !token.trim().is_empty() {
            tokens.push(token);
        }
        rest = tail;
    }
    let (mut metrics, mut labels) = (Vec::new(), Vec::new());
    let mut iter = tokens.iter().peekable();
    while let Some(token) = iter.next() {
        let identifier = token.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
        if ["by", "without", "on", "ignoring"].contains(token) {
            iter.next(); // (
            for label in iter.by_ref().take_while(|t| **t != ")") {
                if *label != "," {
                    labels.push((*label).to_owned());
                }
            }
        } else if *token == "{" {
            // Label matchers: none of their words is a metric.
            iter.by_ref().take_while(|t| **t != "}").for_each(drop);
        } else if identifier
            && !iter
                .peek()
                .is_some_and(|next| ["(", "by", "without"].contains(next))
            && !["and", "or", "unless", "bool", "offset"].contains(token)
        {
            metrics.push((*token).to_owned());
        }
    }
    (metrics, labels)
}

/// KEDA's query reads gauges the agent really exports, by a label they really carry, and
/// scales by the slots the config gives each pod.
#[test]
fn the_autoscaler_query_reads_what_the_agent_exports() {
    let scaled_object =
        std::fs::read_to_string(repo_file("deploy/kubernetes/keda-scaledobject.yaml"))
            .expect("read");
    let query = value_after(&scaled_object, "query:");
    let (metrics, labels) = promql_names(query);
    assert_eq!(
        metrics,
        ["build_agent_slots_used", "build_agent_demand"],
        "{query}"
    );
    assert_eq!(labels, ["coordinator"], "{query}");
    let text =
        build_agent::metrics::AgentMetrics::new().encode(&build_agent::metrics::AgentGauges {
            slots_total: 4,
            slots_used: 1,
            demand: vec![("wss://ws-host:8081/ws".to_owned(), 2)],
            ..Default::default()
        });
    for metric in &metrics {
        assert!(
            text.lines()
                .any(|line| line == format!("# TYPE {metric} gauge")),
            "{metric} is no gauge of the agent's:\n{text}"
        );
    }
    for label in &labels {
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!("build_agent_demand{{{label}=\""))),
            "no {label} label:\n{text}"
        );
    }
    let threshold = value_after(&scaled_object, "threshold:").trim_matches('"');
    let slots = value_after(&configmap_agent_config(), "max_jobs =")
        .split_whitespace()
        .next()
        .expect("a number")
        .to_owned();
    assert_eq!(threshold, slots, "one pod per max_jobs of work");
}
