//! Containment of a job on a shared build host.
//!
//! One agent serves several coordinators, so a job (its `build.rs`, its tests) is untrusted
//! code of one tenant running next to the agent's credentials and every other tenant's
//! source. With `mode = "bwrap"` each job runs in a bubblewrap sandbox:
//!
//! - new PID, IPC and UTS namespaces (and a user namespace when the agent is not root), so
//!   the job sees and signals only its own processes; `--die-with-parent` ends the sandbox
//!   with the agent;
//! - the host filesystem read-only, with a private `/tmp`, a fresh `/proc` and `/dev`;
//! - the agent's own state hidden behind empty read-only directories or an empty file: its
//!   config, token file, credentials directory, client key, git caches and every workspace;
//! - the job's workspace read-write at a stable path, `/build/<repository id>` with the
//!   target directory inside, the same for every slot of every agent, so compiler outputs
//!   do not depend on where the job ran; the repository's cargo home at `/build/.cargo`;
//! - a fixed environment ([`base_environment`]) plus the job's allow-listed variables and the
//!   dev shell's: nothing of the agent's own environment (its token) reaches the job.
//!
//! `mode = "none"` runs the job directly on the host with the same fixed environment and
//! per-repository cargo home, for hosts where bubblewrap cannot run; the agent warns and
//! coordinators show it as unsandboxed.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use crate::process::CommandSpec;

/// Where the job's workspace appears inside the sandbox.
pub const BUILD_ROOT: &str = "/build";
/// The repository's cargo home inside the sandbox.
const SANDBOX_CARGO_HOME: &str = "/build/.cargo";
/// The repository's sccache directory inside the sandbox.
const SANDBOX_SCCACHE_DIR: &str = "/build/.sccache";
/// How long the start-up probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Variables of the agent's environment a job may see: what finds the toolchain, the
/// locale, and the host's way out to the network. Nothing else (the token above all).
const PASSED_THROUGH: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "USER",
    "LOGNAME",
    "RUSTUP_HOME",
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_AUTO_INSTALL",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NIX_SSL_CERT_FILE",
    "NIX_REMOTE",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
];

/// `[sandbox] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    Bwrap,
    None,
}

impl FromStr for SandboxMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "bwrap" => Ok(Self::Bwrap),
            "none" => Ok(Self::None),
            other => Err(format!(
                "sandbox mode {other:?} is not one of \"bwrap\" or \"none\""
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "bubblewrap (bwrap) is not installed or not on PATH; jobs run in a bwrap sandbox by \
         default. Install it (Debian/Ubuntu: apt install bubblewrap; NixOS: the module adds \
         it) or set [sandbox] mode = \"none\" to run jobs unsandboxed"
    )]
    BwrapMissing,
    #[error(
        "bubblewrap cannot start a sandbox here: {0}. Allow user namespaces \
         (sysctl kernel.unprivileged_userns_clone=1, or run the agent as root) or set \
         [sandbox] mode = \"none\""
    )]
    CannotStart(String),
}

/// How jobs are contained; settled from the agent's config.
#[derive(Debug, Clone)]
pub struct Sandbox {
    mode: SandboxMode,
    /// `false` gives the job a network namespace with only loopback.
    network: bool,
    bwrap: PathBuf,
    /// Files and directories of the agent that no job may see.
    hidden: Vec<PathBuf>,
    /// The agent's environment reduced to [`PASSED_THROUGH`], read once at start.
    base_env: Vec<(OsString, OsString)>,
    /// Whether to run jobs in a user namespace (the agent is not root).
    user_namespace: bool,
}

/// The host paths of one job: its workspace and its repository's shared directories.
#[derive(Debug, Clone)]
pub struct JobPaths {
    pub repo_id: String,
    pub src: PathBuf,
    pub target: PathBuf,
    pub cargo_home: PathBuf,
    /// sccache's disk cache, when `[cache] sccache` is on and sccache is installed.
    pub sccache_dir: Option<PathBuf>,
}

/// The paths as the job sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobView {
    pub src: PathBuf,
    pub target: PathBuf,
    pub cargo_home: PathBuf,
    pub sccache_dir: Option<PathBuf>,
}

/// The fixed part of a job's environment: [`PASSED_THROUGH`] from `agent_env`, plus a
/// `RUSTUP_HOME` pinned to the agent's so a rustup toolchain keeps working when `HOME`
/// changes.
pub fn base_environment(
    agent_env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    let agent_env: Vec<(OsString, OsString)> = agent_env.into_iter().collect();
    let mut env: Vec<(OsString, OsString)> = agent_env
        .iter()
        .filter(|(name, _)| PASSED_THROUGH.iter().any(|passed| name == passed))
        .cloned()
        .collect();
    let has = |env: &[(OsString, OsString)], name: &str| env.iter().any(|(n, _)| n == name);
    if !has(&env, "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    if !has(&env, "RUSTUP_HOME")
        && let Some((_, home)) = agent_env.iter().find(|(name, _)| name == "HOME")
    {
        let rustup = Path::new(home).join(".rustup");
        if rustup.is_dir() {
            env.push(("RUSTUP_HOME".into(), rustup.into()));
        }
    }
    env
}

impl Sandbox {
    /// A sandbox setting for this agent. `hidden` lists the agent's own files and
    /// directories (config, token, caches, workspaces); paths that do not exist are skipped
    /// when a job starts.
    pub fn new(mode: SandboxMode, network: bool, hidden: Vec<PathBuf>) -> Self {
        Self {
            mode,
            network,
            bwrap: find_on_path("bwrap").unwrap_or_else(|| "bwrap".into()),
            hidden,
            base_env: base_environment(std::env::vars_os()),
            user_namespace: !rustix::process::getuid().is_root(),
        }
    }

    pub fn mode(&self) -> SandboxMode {
        self.mode
    }

    /// Whether jobs run contained; coordinators show agents that do not as unsandboxed.
    pub fn is_contained(&self) -> bool {
        self.mode == SandboxMode::Bwrap
    }

    /// Checks that a sandbox can start: bwrap is installed and the kernel lets it create
    /// its namespaces. Run at agent start and by `--check-config`, so a host that cannot
    /// sandbox fails before taking jobs, with what to do about it.
    pub async fn probe(&self) -> Result<(), SandboxError> {
        if self.mode == SandboxMode::None {
            return Ok(());
        }
        if !self.bwrap.is_absolute() {
            return Err(SandboxError::BwrapMissing);
        }
        let scratch = tempfile::tempdir()
            .map_err(|e| SandboxError::CannotStart(format!("no temporary directory: {e}")))?;
        let paths = JobPaths {
            repo_id: "probe".into(),
            src: scratch.path().join("src"),
            target: scratch.path().join("target"),
            cargo_home: scratch.path().join("cargo-home"),
            sccache_dir: None,
        };
        for dir in [&paths.src, &paths.target, &paths.cargo_home] {
            std::fs::create_dir_all(dir)
                .map_err(|e| SandboxError::CannotStart(format!("cannot prepare a probe: {e}")))?;
        }
        let spec = self.wrap(
            &paths,
            CommandSpec {
                program: "true".into(),
                args: Vec::new(),
                cwd: self.view(&paths).src,
                env: Vec::new(),
                clear_env: false,
                registry: None,
            },
        );
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(PROBE_TIMEOUT, command.output())
            .await
            .map_err(|_| SandboxError::CannotStart("bwrap did not finish in time".into()))?
            .map_err(|e| SandboxError::CannotStart(format!("cannot run bwrap: {e}")))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(SandboxError::CannotStart(
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ))
        }
    }

    /// Where the job sees its directories.
    pub fn view(&self, paths: &JobPaths) -> JobView {
        match self.mode {
            SandboxMode::None => JobView {
                src: paths.src.clone(),
                target: paths.target.clone(),
                cargo_home: paths.cargo_home.clone(),
                sccache_dir: paths.sccache_dir.clone(),
            },
            SandboxMode::Bwrap => {
                let src = Path::new(BUILD_ROOT).join(&paths.repo_id);
                JobView {
                    target: src.join("target"),
                    src,
                    cargo_home: SANDBOX_CARGO_HOME.into(),
                    sccache_dir: paths
                        .sccache_dir
                        .as_ref()
                        .map(|_| SANDBOX_SCCACHE_DIR.into()),
                }
            }
        }
    }

    /// Turns `job`, built against [`Sandbox::view`]'s paths, into the command that runs it
    /// contained: the fixed environment under the job's own variables, and for bwrap the
    /// sandbox around it. The result is meant to run with an empty environment
    /// ([`CommandSpec::env`] is all of it).
    pub fn wrap(&self, paths: &JobPaths, job: CommandSpec) -> CommandSpec {
        let view = self.view(paths);
        let mut env = self.base_env.clone();
        let home: OsString = match self.mode {
            SandboxMode::Bwrap => "/tmp".into(),
            SandboxMode::None => paths.cargo_home.clone().into(),
        };
        env.push(("HOME".into(), home));
        env.push(("TMPDIR".into(), "/tmp".into()));
        env.push(("CARGO_HOME".into(), view.cargo_home.clone().into()));
        env.extend(job.env);
        match self.mode {
            SandboxMode::None => CommandSpec {
                env,
                clear_env: true,
                ..job
            },
            SandboxMode::Bwrap => {
                let mut args = self.bwrap_args(paths, &view);
                args.push("--".into());
                args.push(job.program);
                args.extend(job.args);
                CommandSpec {
                    program: self.bwrap.clone().into(),
                    args,
                    // bwrap itself starts outside; `--chdir` puts the job in its workspace.
                    cwd: PathBuf::from("/"),
                    env,
                    clear_env: true,
                    registry: job.registry,
                }
            }
        }
    }

    fn bwrap_args(&self, paths: &JobPaths, view: &JobView) -> Vec<OsString> {
        let mut args = Arguments::default();
        args.add(["--die-with-parent", "--unshare-pid", "--unshare-ipc"]);
        args.add(["--unshare-uts", "--unshare-cgroup-try"]);
        if self.user_namespace {
            args.add(["--unshare-user"]);
        }
        if !self.network {
            args.add(["--unshare-net"]);
        }
        // The host's top-level entries one by one, read-only, so the sandbox's own root can
        // hold /build (a read-only bind of / could not get a new top-level directory).
        for (name, kind) in root_entries() {
            let path = Path::new("/").join(&name);
            match kind {
                RootEntry::Link(target) => args.add([
                    OsStr::new("--symlink"),
                    target.as_os_str(),
                    path.as_os_str(),
                ]),
                RootEntry::Other => {
                    args.add([OsStr::new("--ro-bind"), path.as_os_str(), path.as_os_str()])
                }
            }
        }
        args.add(["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]);
        for hidden in &self.hidden {
            // Under /tmp they are already gone: the sandbox's /tmp is its own.
            if hidden.starts_with("/tmp") {
                continue;
            }
            if hidden.is_dir() {
                args.add([OsStr::new("--tmpfs"), hidden.as_os_str()]);
                args.add([OsStr::new("--remount-ro"), hidden.as_os_str()]);
            } else if hidden.exists() {
                args.add([
                    OsStr::new("--ro-bind"),
                    OsStr::new("/dev/null"),
                    hidden.as_os_str(),
                ]);
            }
        }
        args.add([
            OsStr::new("--bind"),
            paths.src.as_os_str(),
            view.src.as_os_str(),
        ]);
        args.add([
            OsStr::new("--bind"),
            paths.target.as_os_str(),
            view.target.as_os_str(),
        ]);
        args.add([
            OsStr::new("--bind"),
            paths.cargo_home.as_os_str(),
            view.cargo_home.as_os_str(),
        ]);
        if let (Some(host), Some(inside)) = (&paths.sccache_dir, &view.sccache_dir) {
            args.add([OsStr::new("--bind"), host.as_os_str(), inside.as_os_str()]);
        }
        // The sandbox's own root (a tmpfs holding the mount points) is read-only too.
        args.add(["--remount-ro", "/"]);
        args.add([OsStr::new("--chdir"), view.src.as_os_str()]);
        args.0
    }
}

#[derive(Debug, Default)]
struct Arguments(Vec<OsString>);

impl Arguments {
    fn add<S: AsRef<OsStr>>(&mut self, items: impl IntoIterator<Item = S>) {
        self.0
            .extend(items.into_iter().map(|item| item.as_ref().to_owned()));
    }
}

enum RootEntry {
    Link(PathBuf),
    Other,
}

/// The host's top-level entries the sandbox shows: all but those it replaces.
fn root_entries() -> Vec<(OsString, RootEntry)> {
    let replaced = ["proc", "dev", "tmp", "build"];
    let Ok(entries) = std::fs::read_dir("/") else {
        return Vec::new();
    };
    let mut shown: Vec<(OsString, RootEntry)> = entries
        .flatten()
        .filter(|entry| !replaced.iter().any(|name| entry.file_name() == *name))
        .map(|entry| {
            let kind = match std::fs::read_link(entry.path()) {
                Ok(target) => RootEntry::Link(target),
                Err(_) => RootEntry::Other,
            };
            (entry.file_name(), kind)
        })
        .collect();
    shown.sort_by(|a, b| a.0.cmp(&b.0));
    shown
}

/// The agent's own cargo home: `CARGO_HOME`, else `~/.cargo`. Its config travels into each
/// repository's cargo home; its credentials are hidden from jobs.
pub fn agent_cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
}

/// The first executable `name` on the agent's `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| {
            path.metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn the_base_environment_keeps_the_toolchain_and_drops_secrets() {
        let home = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(home.path().join(".rustup")).expect("rustup dir");
        let agent = env(&[
            ("PATH", "/opt/cargo/bin:/usr/bin"),
            ("BUILDPOOL_TOKEN", "secret"),
            (
                "CREDENTIALS_DIRECTORY",
                "/run/credentials/build-agent.service",
            ),
            ("AWS_SECRET_ACCESS_KEY", "also secret"),
            ("https_proxy", "http://proxy:3128"),
            ("HOME", home.path().to_str().expect("utf-8")),
        ]);
        let base = base_environment(agent);
        let names: Vec<&OsStr> = base.iter().map(|(name, _)| name.as_os_str()).collect();
        assert_eq!(names, ["PATH", "https_proxy", "RUSTUP_HOME"]);
        assert_eq!(base[2].1, home.path().join(".rustup").into_os_string());
        let no_path = base_environment(env(&[("BUILDPOOL_TOKEN", "secret")]));
        assert_eq!(no_path, env(&[("PATH", "/usr/local/bin:/usr/bin:/bin")]));
    }

    fn paths(root: &Path) -> JobPaths {
        JobPaths {
            repo_id: "app-0123456789ab".into(),
            src: root.join("slot-1/src"),
            target: root.join("slot-1/target"),
            cargo_home: root.join("cargo-home"),
            sccache_dir: None,
        }
    }

    #[test]
    fn every_slot_sees_the_same_stable_path() {
        let sandbox = Sandbox::new(SandboxMode::Bwrap, true, Vec::new());
        let view = sandbox.view(&paths(Path::new("/var/lib/agent/work")));
        assert_eq!(view.src, Path::new("/build/app-0123456789ab"));
        assert_eq!(view.target, Path::new("/build/app-0123456789ab/target"));
        let other_slot = JobPaths {
            src: "/elsewhere/slot-0/src".into(),
            ..paths(Path::new("/var/lib/agent/work"))
        };
        assert_eq!(sandbox.view(&other_slot), view);
        let unsandboxed = Sandbox::new(SandboxMode::None, true, Vec::new());
        assert_eq!(
            unsandboxed.view(&paths(Path::new("/w"))).src,
            Path::new("/w/slot-1/src")
        );
    }

    #[test]
    fn the_bwrap_command_hides_the_agent_and_binds_only_the_job() {
        let secrets = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let token = secrets.path().join("token");
        std::fs::write(&token, "secret").expect("token");
        let cache = secrets.path().join("cache");
        std::fs::create_dir(&cache).expect("cache dir");
        let sandbox = Sandbox::new(
            SandboxMode::Bwrap,
            false,
            vec![token.clone(), cache.clone(), secrets.path().join("missing")],
        );
        let job = CommandSpec {
            program: "cargo".into(),
            args: vec!["test".into()],
            cwd: "/build/app-0123456789ab".into(),
            env: env(&[("CARGO_TARGET_DIR", "/build/app-0123456789ab/target")]),
            clear_env: false,
            registry: None,
        };
        let wrapped = sandbox.wrap(&paths(Path::new("/w")), job);
        let args: Vec<String> = wrapped
            .args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        for expected in [
            "--unshare-pid",
            "--unshare-net",
            "--die-with-parent",
            "--tmpfs /tmp",
            "--proc /proc",
            &format!("--ro-bind /dev/null {}", token.display()),
            &format!("--tmpfs {0} --remount-ro {0}", cache.display()),
            "--bind /w/slot-1/src /build/app-0123456789ab",
            "--bind /w/slot-1/target /build/app-0123456789ab/target",
            "--bind /w/cargo-home /build/.cargo",
            "--remount-ro / --chdir /build/app-0123456789ab",
            "-- cargo test",
        ] {
            assert!(line.contains(expected), "{expected:?} missing from {line}");
        }
        assert!(
            !line.contains("missing"),
            "absent paths are skipped: {line}"
        );
        assert!(
            !line.contains("--ro-bind /tmp"),
            "the host's /tmp stays out"
        );
        let names: Vec<&OsStr> = wrapped.env.iter().map(|(n, _)| n.as_os_str()).collect();
        assert!(names.contains(&OsStr::new("CARGO_HOME")));
        assert!(names.contains(&OsStr::new("CARGO_TARGET_DIR")));
        assert!(!names.contains(&OsStr::new("BUILDPOOL_TOKEN")));
    }

    /// The real bwrap: what a job sees inside, with the network cut.
    #[tokio::test]
    async fn inside_the_sandbox_the_job_sees_its_workspace_and_no_network() {
        let root = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let secret = root.path().join("secret");
        std::fs::write(&secret, "token").expect("secret");
        let paths = paths(root.path());
        for dir in [&paths.src, &paths.target, &paths.cargo_home] {
            std::fs::create_dir_all(dir).expect("dir");
        }
        std::fs::write(paths.src.join("Cargo.toml"), "[package]").expect("manifest");
        // The agent's directory holding every workspace is hidden, yet the job's own
        // workspace inside it is bound in.
        let sandbox = Sandbox::new(
            SandboxMode::Bwrap,
            false,
            vec![secret.clone(), root.path().to_owned()],
        );
        sandbox
            .probe()
            .await
            .expect("needs bubblewrap (apt-get install bubblewrap)");
        let script = format!(
            "pwd; cat Cargo.toml; echo; cat {} | wc -c; ls -A {} | wc -l; \
             cut -d: -f1 /proc/net/dev | tail -n +3; touch /build/app-0123456789ab/target/ok; \
             touch /usr/nope 2>/dev/null || echo ro",
            secret.display(),
            root.path().display()
        );
        let command = sandbox.wrap(
            &paths,
            CommandSpec {
                program: "sh".into(),
                args: vec!["-c".into(), script.into()],
                cwd: sandbox.view(&paths).src,
                env: Vec::new(),
                clear_env: false,
                registry: None,
            },
        );
        let output = tokio::process::Command::new(&command.program)
            .args(&command.args)
            .env_clear()
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&command.cwd)
            .output()
            .await
            .expect("bwrap runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
        assert_eq!(
            lines,
            ["/build/app-0123456789ab", "[package]", "0", "0", "lo", "ro"],
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            paths.target.join("ok").exists(),
            "the target dir is the slot's"
        );
    }
}
