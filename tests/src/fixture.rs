//! A tiny cargo workspace in a temporary git repository: `app` depends on the path crate
//! `util`; no registry dependencies, so it builds offline in about a second.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};

use crate::RunOutput;

/// Nix settings for a machine with no binary cache and no network (see the design brief).
pub const NIX_CONFIG: &str =
    "experimental-features = nix-command flakes\nsandbox = false\nsubstituters =\nflake-registry =";

const WORKSPACE_MANIFEST: &str =
    "[workspace]\nresolver = \"2\"\nmembers = [\"app\", \"crates/util\"]\n";
const UTIL_MANIFEST: &str = "[package]\nname = \"util\"\nversion = \"0.1.0\"\nedition = \"2021\"\n";
const UTIL_LIB: &str = "pub fn double(x: i32) -> i32 {\n    x * 2\n}\n";
const APP_MANIFEST: &str = "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\nutil = { path = \"../crates/util\" }\n";
const APP_LIB: &str = r#"pub fn quadruple(x: i32) -> i32 {
    util::double(util::double(x))
}

pub const GREETING: &str = "hello";

#[cfg(test)]
mod tests {
    #[test]
    fn quadruples() {
        assert_eq!(super::quadruple(2), 8);
    }

    /// Spawns a sleeping grandchild, records its pid, then sleeps: for cancel and timeout
    /// tests. Ignored so ordinary runs skip it.
    #[test]
    #[ignore]
    fn sleeps_with_a_child() {
        let mut child = std::process::Command::new("sleep").arg("300").spawn().expect("sleep");
        std::fs::write(env!("FIXTURE_PID_FILE"), child.id().to_string()).expect("pid file");
        std::thread::sleep(std::time::Duration::from_secs(300));
        child.wait().expect("sleep ends");
    }

    /// Records each start, then sleeps for the seconds in the sleep file (default 4): for
    /// fleet tests that need a job to be running for a while, and to count reruns.
    #[test]
    #[ignore]
    fn sleeps_briefly() {
        use std::io::Write;
        let mut starts = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env!("FIXTURE_STARTS_FILE"))
            .expect("starts file");
        writeln!(starts, "start").expect("record start");
        let secs = std::fs::read_to_string(env!("FIXTURE_SLEEP_FILE"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(4);
        std::thread::sleep(std::time::Duration::from_secs(secs));
        // Seen only with --nocapture: when the job's work ended, for `bench soak`.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        println!("fixture-end-unix-ms {}", now.map_or(0, |t| t.as_millis()));
    }
}
"#;

/// A fixture repository plus a scratch directory for everything around it.
#[derive(Debug)]
pub struct Fixture {
    dir: tempfile::TempDir,
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=fixture",
            "-c",
            "user.email=fixture@localhost",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()?;
    if !output.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Makes `root` a repository and commits everything in it with a generated lockfile.
fn commit_with_lockfile(root: &Path, cargo_flags: &[&str], message: &str) -> anyhow::Result<()> {
    git(root, &["init", "--quiet", "-b", "main"])?;
    let lock = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["generate-lockfile", "--quiet"])
        .args(cargo_flags)
        .current_dir(root)
        .output()?;
    if !lock.status.success() {
        bail!(
            "generate-lockfile: {}",
            String::from_utf8_lossy(&lock.stderr)
        );
    }
    git(root, &["add", "."])?;
    git(root, &["commit", "--quiet", "-m", message])?;
    Ok(())
}

impl Fixture {
    /// Creates and commits the fixture workspace.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("buildpool-test-")
            .tempdir()?;
        let fixture = Self { dir };
        std::fs::create_dir_all(fixture.scratch())?;
        let root = fixture.root();
        for (path, text) in [
            ("Cargo.toml", WORKSPACE_MANIFEST),
            (".gitignore", "/target\n"),
            ("crates/util/Cargo.toml", UTIL_MANIFEST),
            ("crates/util/src/lib.rs", UTIL_LIB),
            ("app/Cargo.toml", APP_MANIFEST),
            ("app/src/lib.rs", APP_LIB),
            // `env!` in the fixture reads this at compile time: cargo's [env] config.
            (
                ".cargo/config.toml",
                &format!(
                    "[env]\nFIXTURE_PID_FILE = \"{}\"\nFIXTURE_STARTS_FILE = \"{}\"\nFIXTURE_SLEEP_FILE = \"{}\"\n",
                    fixture.pid_file().display(),
                    fixture.starts_file().display(),
                    fixture.sleep_file().display()
                ),
            ),
        ] {
            fixture.write(path, text)?;
        }
        commit_with_lockfile(&root, &["--offline"], "fixture")?;
        Ok(fixture)
    }

    /// A repository of exactly `files` (path, text), with a generated lockfile, committed:
    /// for fixtures a test writes itself.
    pub fn with_files(files: &[(&str, String)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("buildpool-test-")
            .tempdir()?;
        let fixture = Self { dir };
        std::fs::create_dir_all(fixture.scratch())?;
        fixture.write(".gitignore", "/target\n")?;
        for (path, text) in files {
            fixture.write(path, text)?;
        }
        commit_with_lockfile(&fixture.root(), &["--offline"], "fixture")?;
        Ok(fixture)
    }

    /// A repository holding a copy of the crate source in `source` (a published crate, for
    /// benchmarks on real code), with a generated lockfile, committed.
    pub fn from_source(source: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("buildpool-bench-")
            .tempdir()?;
        let fixture = Self { dir };
        std::fs::create_dir_all(fixture.scratch())?;
        let root = fixture.root();
        let copied = Command::new("cp")
            .arg("-r")
            .arg(source)
            .arg(&root)
            .status()?;
        if !copied.success() {
            bail!("cannot copy {}", source.display());
        }
        fixture.write(".gitignore", "/target\n")?;
        // A published crate's dependencies may not be cached yet: resolve online.
        commit_with_lockfile(&root, &[], "crate source")?;
        Ok(fixture)
    }

    /// The repository (main worktree).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// Outside the repository: logs, agent caches, config, token.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }

    pub fn token_file(&self) -> PathBuf {
        self.scratch().join("config/buildpool/token")
    }

    /// Where the fixture's `sleeps_with_a_child` test writes its grandchild's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("grandchild.pid")
    }

    /// Where `sleeps_briefly` records each of its starts.
    pub fn starts_file(&self) -> PathBuf {
        self.dir.path().join("starts")
    }

    /// How many times `sleeps_briefly` has started.
    pub fn starts(&self) -> usize {
        std::fs::read_to_string(self.starts_file())
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// The pid `sleeps_with_a_child` wrote, once it has written it.
    pub fn grandchild_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// Seconds `sleeps_briefly` sleeps.
    pub fn sleep_file(&self) -> PathBuf {
        self.dir.path().join("sleep-secs")
    }

    /// `buildpool run test <extra>` arguments that run only the fixture's ignored test
    /// `test` (`sleeps_with_a_child` or `sleeps_briefly`).
    pub fn ignored_test_job<'a>(test: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["run", "test"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "-p", "app", "--lib", "--", "--ignored", test]);
        args
    }

    /// `buildpool run test` arguments that run only `sleeps_briefly`.
    pub fn brief_job() -> Vec<&'static str> {
        Self::ignored_test_job("sleeps_briefly", &[])
    }

    /// Writes a file of the repository (creating directories), without committing it.
    pub fn write(&self, path: &str, text: &str) -> anyhow::Result<()> {
        let path = self.root().join(path);
        std::fs::create_dir_all(path.parent().context("parent")?)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn git(&self, args: &[&str]) -> anyhow::Result<String> {
        git(&self.root(), args)
    }

    /// Adds a linked worktree on a new branch and returns its path.
    pub fn add_worktree(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        git(
            &self.root(),
            &[
                "worktree",
                "add",
                "--quiet",
                "-b",
                name,
                path.to_str().context("utf-8 path")?,
            ],
        )?;
        Ok(path)
    }

    /// Environment that keeps every buildpool file of this test under the scratch dir.
    pub fn apply_env(&self, command: &mut Command) {
        command
            .env("XDG_CONFIG_HOME", self.scratch().join("config"))
            .env("XDG_CACHE_HOME", self.scratch().join("cache"))
            .env("NIX_CONFIG", NIX_CONFIG)
            .env_remove("BUILDPOOL_TOKEN")
            .env_remove("BUILDPOOL_COORDINATOR")
            // No coordinator outliving a test: clients without one run jobs in-process.
            // The tests of background coordinators remove it.
            .env("BUILDPOOL_BACKGROUND", "off");
    }

    /// A `buildpool -C <dir> ...` command with this fixture's environment.
    pub fn command_in(&self, dir: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(crate::buildpool_bin());
        command.arg("-C").arg(dir).args(args);
        self.apply_env(&mut command);
        command
    }

    /// Runs `buildpool <args>` in the main worktree.
    pub fn buildpool(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self.command_in(&self.root(), args).output()?)
    }

    /// Runs `buildpool <args>` in the main worktree and captures the result.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<RunOutput> {
        Ok(self.buildpool(args)?.into())
    }

    /// A flake with no inputs whose dev shell is the host's toolchain, as the offline
    /// recipe in the design brief.
    pub fn flake() -> String {
        let cargo_dir = crate::dir_of_program("cargo").unwrap_or_else(|| PathBuf::from("/usr/bin"));
        format!(
            r#"{{
  outputs = {{ self }}: {{
    devShells.x86_64-linux.default = derivation {{
      name = "devshell";
      system = "x86_64-linux";
      builder = "/bin/bash";
      args = [ "-c" "echo > $out" ];
      outputs = [ "out" ];
      PATH = "{}:/usr/local/bin:/usr/bin:/bin";
      BUILDPOOL_FIXTURE_SHELL = "nix";
    }};
  }};
}}
"#,
            cargo_dir.display()
        )
    }
}
