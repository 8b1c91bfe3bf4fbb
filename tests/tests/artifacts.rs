//! `buildpool run ... --artifacts`: executables built on a real agent (sandboxed where the
//! host can) come back into the worktree's `target/` and run here.

use std::path::{Path, PathBuf};
use std::process::Command;

use buildpool_tests::{Cluster, Fixture};

const GREETING: &str = "built far away, run right here";

fn fixture() -> Fixture {
    Fixture::with_files(&[
        (
            "Cargo.toml",
            "[package]\nname = \"faraway\"\nversion = \"0.1.0\"\nedition = \"2021\"\n".into(),
        ),
        (
            "src/main.rs",
            format!(
                "fn main() {{\n    println!(\"{GREETING}\");\n}}\n\n\
                 #[cfg(test)]\nmod tests {{\n    #[test]\n    fn adds_up() {{\n        \
                 assert_eq!(2 + 2, 4);\n    }}\n}}\n"
            ),
        ),
    ])
    .expect("fixture")
}

/// The test executables (`faraway-<hash>`, no extension) under `target/debug/deps`.
fn test_binaries(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("target/debug/deps"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| {
                    path.file_name()
                        .and_then(|name| name.to_str())
                        .is_some_and(|name| name.starts_with("faraway-") && !name.contains('.'))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn built_executables_come_back_into_target_and_run_here() {
    let cluster = Cluster::start(fixture(), 1, 1).expect("cluster starts");
    let root = cluster.fixture.root();
    let binary = root.join("target/debug/faraway");
    assert!(!binary.exists());

    let build = cluster
        .fixture
        .run(&["run", "build", "--artifacts"])
        .expect("runs");
    assert_eq!(build.code, Some(0), "{build}");
    assert!(build.stderr.contains("running on worker-"), "{build}");
    assert!(
        build.stderr.contains("[buildpool] copied 1 executables"),
        "{build}"
    );
    // cargo's JSON messages are read by the agent, not shown.
    assert!(!build.stdout.contains("compiler-artifact"), "{build}");
    let ran = Command::new(&binary)
        .output()
        .expect("the copied binary runs");
    assert!(ran.status.success());
    assert_eq!(String::from_utf8_lossy(&ran.stdout).trim(), GREETING);

    let tests = cluster
        .fixture
        .run(&["run", "test", "--artifacts", "--", "--no-run"])
        .expect("runs");
    assert_eq!(tests.code, Some(0), "{tests}");
    assert!(
        tests.stderr.contains("[buildpool] copied 1 executables"),
        "{tests}"
    );
    let binaries = test_binaries(&root);
    assert_eq!(binaries.len(), 1, "{binaries:?}\n{tests}");
    let ran = Command::new(&binaries[0])
        .output()
        .expect("the copied test binary runs");
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(ran.status.success(), "{stdout}");
    assert!(stdout.contains("test tests::adds_up ... ok"), "{stdout}");

    // Without the flag, nothing is collected and a plain test still shows its output.
    let plain = cluster.fixture.run(&["run", "test"]).expect("runs");
    assert_eq!(plain.code, Some(0), "{plain}");
    assert!(
        plain.stdout.contains("test tests::adds_up ... ok"),
        "{plain}"
    );
    assert!(!plain.stderr.contains("copied"), "{plain}");

    // The coordinator's embedded local agent (no sandbox) sends them the same way.
    std::fs::remove_file(&binary).expect("remove");
    let local = cluster
        .fixture
        .run(&["run", "build", "--local", "--artifacts"])
        .expect("runs");
    assert_eq!(local.code, Some(0), "{local}");
    assert!(
        local.stderr.contains("[buildpool] copied 1 executables"),
        "{local}"
    );
    let ran = Command::new(&binary)
        .output()
        .expect("the copied binary runs");
    assert_eq!(String::from_utf8_lossy(&ran.stdout).trim(), GREETING);
}
