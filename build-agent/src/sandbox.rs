//! Containment of a job on a shared build host.
//!
//! One agent serves several coordinators, so a job (its `build.rs`, its tests) is untrusted
//! code of one tenant running next to the agent's credentials and every other tenant's
//! source. With `mode = "bwrap"` each job runs in a bubblewrap sandbox:
//!
//! - new PID, IPC and UTS namespaces, so the job sees and signals only its own processes;
//!   `--die-with-parent` ends the sandbox with the agent;
//! - no capability and no root, whoever runs the agent: a non-root agent's job runs in a
//!   user namespace mapped to the agent's own user; a root agent's job runs as an
//!   unprivileged user of its own (`[sandbox] user`, default `nobody`), switched to by
//!   `setpriv` with every capability set cleared and `no_new_privs`. (A user namespace
//!   made by root would still be uid 0 outside, with owner access to root's files.) The
//!   directories such a job writes are handed to that user before it starts;
//! - deny by default: of the host only what a build needs, read-only: `/usr` and the
//!   top-level links into it, `/nix` and `/sys` where present, a short list of `/etc`, and
//!   the toolchain (rustup's home, the directories of `cargo` and `rustc`) wherever it
//!   lives. No home directory, no buildpool credential, key or config, no other tenant;
//!   a private `/tmp`, a fresh `/proc` (only the job's processes) and `/dev`. bwrap reads
//!   its mount arguments from a pipe (`--args 3`), so not even its own command line shows
//!   a host path;
//! - the agent's own state hidden behind empty read-only directories or an empty file
//!   where it lies under something shown: its config, token file, credentials directory,
//!   client key, git caches and every workspace;
//! - the job's workspace read-write at a stable path, `/build/<repository id>` with the
//!   target directory inside, the same for every slot of every agent, so compiler outputs
//!   do not depend on where the job ran; the repository's cargo home at `/build/.cargo`.
//!   The checkout's `.git` link is read-only: the agent runs git in the workspace after
//!   the job, and a job that could point it elsewhere would choose what git runs;
//! - a fixed environment ([`base_environment`]) plus the job's allow-listed variables and the
//!   dev shell's: nothing of the agent's own environment (its token) reaches the job.
//!
//! `mode = "none"` runs the job directly on the host with the same fixed environment and
//! per-repository cargo home, for hosts where bubblewrap cannot run; the agent warns and
//! coordinators show it as unsandboxed.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::str::FromStr;
use std::time::Duration;

use crate::process::{CommandSpec, ProcessEnd};

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
    /// Who jobs run as: `None` for the agent's own user in a user namespace (the agent is
    /// not root); for a root agent, the unprivileged user it switches to.
    job_user: Option<JobUser>,
    /// The toolchain's directories outside what every job sees, shown read-only.
    toolchain: Vec<PathBuf>,
}

/// The unprivileged user a root agent's jobs run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobUser {
    pub uid: u32,
    pub gid: u32,
}

impl JobUser {
    /// `nobody` as `/etc/passwd` has it, else 65534 (its id nearly everywhere).
    pub fn nobody() -> Self {
        Self::find("nobody").unwrap_or(Self {
            uid: 65534,
            gid: 65534,
        })
    }

    /// A user named in `/etc/passwd`, or given as `uid[:gid]`. Root is refused: running
    /// jobs as root is what this exists to prevent.
    pub fn find(name: &str) -> Result<Self, String> {
        let numeric = |text: &str| text.parse::<u32>().ok();
        let user = if let Some((uid, gid)) = name.split_once(':') {
            numeric(uid)
                .zip(numeric(gid))
                .map(|(uid, gid)| Self { uid, gid })
        } else if let Some(uid) = numeric(name) {
            Some(Self { uid, gid: uid })
        } else {
            std::fs::read_to_string("/etc/passwd")
                .ok()
                .and_then(|passwd| {
                    passwd.lines().find_map(|line| {
                        let mut fields = line.split(':');
                        (fields.next() == Some(name)).then_some(())?;
                        let uid = numeric(fields.nth(1)?)?;
                        let gid = numeric(fields.next()?)?;
                        Some(Self { uid, gid })
                    })
                })
        };
        match user {
            Some(user) if user.uid == 0 || user.gid == 0 => Err(format!(
                "[sandbox] user {name:?} is root; jobs must run as an unprivileged user"
            )),
            Some(user) => Ok(user),
            None => Err(format!(
                "[sandbox] user {name:?} is neither in /etc/passwd nor a uid[:gid]"
            )),
        }
    }
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
    /// when a job starts. A root agent's jobs run as `nobody` unless
    /// [`Sandbox::run_jobs_as`] says otherwise.
    pub fn new(mode: SandboxMode, network: bool, hidden: Vec<PathBuf>) -> Self {
        let base_env = base_environment(std::env::vars_os());
        Self {
            mode,
            network,
            bwrap: find_on_path("bwrap").unwrap_or_else(|| "bwrap".into()),
            hidden,
            toolchain: toolchain_dirs(&base_env),
            base_env,
            job_user: rustix::process::getuid().is_root().then(JobUser::nobody),
        }
    }

    /// Who a root agent's jobs run as; no effect for an agent that is not root, whose jobs
    /// run as its own user.
    #[must_use]
    pub fn run_jobs_as(mut self, user: JobUser) -> Self {
        if self.job_user.is_some() {
            self.job_user = Some(user);
        }
        self
    }

    /// Who the jobs run as when that is not the agent's own user.
    pub fn job_user(&self) -> Option<JobUser> {
        self.job_user.filter(|_| self.mode == SandboxMode::Bwrap)
    }

    /// Hands the directories a job writes to the user it runs as (a root agent's jobs run
    /// as another user): the checkout whole, since git wrote it as root; the target
    /// directory, cargo home and sccache directory at their top, and whole only when their
    /// top was not the job user's yet (their contents are the jobs' own).
    ///
    /// The job controlled these trees, so the walk opens each directory from its parent
    /// without following links and changes owners without following them: a link planted
    /// by a job cannot turn this into a change of some host file's owner.
    ///
    /// Returns whether files of the checkout changed owner: git's index then no longer
    /// matches their status, and must be refreshed (see `Workspace::refresh_index`), or the
    /// next checkout would write them again and cargo rebuild what they belong to.
    pub fn hand_over(&self, paths: &JobPaths) -> std::io::Result<bool> {
        let Some(user) = self.job_user() else {
            return Ok(false);
        };
        let checkout_changed = hand_over_tree(&paths.src, user, true)? > 0;
        for dir in [&paths.target, &paths.cargo_home]
            .into_iter()
            .chain(&paths.sccache_dir)
        {
            hand_over_tree(dir, user, false)?;
        }
        Ok(checkout_changed)
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
        self.hand_over(&paths)
            .map_err(|e| SandboxError::CannotStart(format!("cannot prepare a probe: {e}")))?;
        let spec = self.wrap(
            &paths,
            CommandSpec {
                program: "true".into(),
                args: Vec::new(),
                cwd: self.view(&paths).src,
                env: Vec::new(),
                clear_env: false,
                registry: None,
                options_on_fd3: None,
            },
        );
        let ran = crate::process::collect(spec, PROBE_TIMEOUT)
            .await
            .map_err(|e| SandboxError::CannotStart(format!("cannot run bwrap: {e}")))?;
        match ran.end {
            ProcessEnd::Exited { code: 0 } => Ok(()),
            ProcessEnd::TimedOut => Err(SandboxError::CannotStart(
                "bwrap did not finish in time".into(),
            )),
            _ => Err(SandboxError::CannotStart(
                String::from_utf8_lossy(&ran.stderr).trim().to_owned(),
            )),
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
                let mut options = Vec::new();
                for option in self.bwrap_args(paths, &view) {
                    options.extend_from_slice(option.as_bytes());
                    options.push(0);
                }
                let mut args: Vec<OsString> = vec!["--args".into(), "3".into(), "--".into()];
                if let Some(user) = self.job_user {
                    args.extend(drop_to(user));
                }
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
                    options_on_fd3: Some(options),
                }
            }
        }
    }

    fn bwrap_args(&self, paths: &JobPaths, view: &JobView) -> Vec<OsString> {
        let mut args = Arguments::default();
        args.add(["--die-with-parent", "--unshare-pid", "--unshare-ipc"]);
        args.add(["--unshare-uts", "--unshare-cgroup-try"]);
        if self.job_user.is_none() {
            args.add(["--unshare-user"]);
        }
        if !self.network {
            args.add(["--unshare-net"]);
        }
        let mut shown: Vec<PathBuf> = Vec::new();
        for (path, entry) in host_view() {
            match entry {
                HostEntry::Link(target) => args.add([
                    OsStr::new("--symlink"),
                    target.as_os_str(),
                    path.as_os_str(),
                ]),
                HostEntry::Bind(source) => {
                    args.make_parents(&path);
                    args.add([
                        OsStr::new("--ro-bind"),
                        source.as_os_str(),
                        path.as_os_str(),
                    ]);
                    shown.push(path);
                }
            }
        }
        for dir in &self.toolchain {
            args.make_parents(dir);
            args.add([OsStr::new("--ro-bind"), dir.as_os_str(), dir.as_os_str()]);
            shown.push(dir.clone());
        }
        args.add(["--dev", "/dev", "--proc", "/proc"]);
        args.add(["--perms", "1777", "--tmpfs", "/tmp"]);
        for hidden in &self.hidden {
            // Only what lies beneath something shown needs covering.
            if !shown.iter().any(|shown| hidden.starts_with(shown)) {
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
        args.make_parents(&view.src);
        args.add([
            OsStr::new("--bind"),
            paths.src.as_os_str(),
            view.src.as_os_str(),
        ]);
        let git_link = paths.src.join(".git");
        if git_link.exists() {
            args.add([
                OsStr::new("--ro-bind"),
                git_link.as_os_str(),
                view.src.join(".git").as_os_str(),
            ]);
        }
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
        args.args
    }
}

/// `setpriv`'s arguments that make a root agent's job `user`: its uid and gid, no
/// supplementary groups, every capability set emptied, and `no_new_privs` so no set-uid
/// program gives any of it back.
fn drop_to(user: JobUser) -> Vec<OsString> {
    [
        "setpriv".to_owned(),
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--clear-groups".to_owned(),
        "--inh-caps=-all".to_owned(),
        "--bounding-set=-all".to_owned(),
        "--no-new-privs".to_owned(),
        "--".to_owned(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

#[derive(Debug, Default)]
struct Arguments {
    args: Vec<OsString>,
    /// Directories [`Arguments::make_parents`] made already.
    made: std::collections::HashSet<PathBuf>,
}

impl Arguments {
    fn add<S: AsRef<OsStr>>(&mut self, items: impl IntoIterator<Item = S>) {
        self.args
            .extend(items.into_iter().map(|item| item.as_ref().to_owned()));
    }

    /// Creates the directories above `path` that the sandbox's root lacks, open to every
    /// user: bwrap would make them private to its own user, and a root agent's job runs as
    /// another.
    fn make_parents(&mut self, path: &Path) {
        let mut parents: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .take_while(|parent| *parent != Path::new("/"))
            .filter(|parent| self.made.insert(parent.to_path_buf()))
            .collect();
        parents.reverse();
        for parent in parents {
            self.add([
                OsStr::new("--perms"),
                OsStr::new("0755"),
                OsStr::new("--dir"),
                parent.as_os_str(),
            ]);
        }
    }
}

/// What of the host a sandbox shows at a path.
enum HostEntry {
    /// The same link (merged `/usr`'s `/bin`, `/lib`, ...).
    Link(PathBuf),
    /// The host path given, bound read-only.
    Bind(PathBuf),
}

/// Top-level host entries a build needs, where present.
const SHOWN_ROOT: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "nix", "sys",
];

/// What of `/etc` a build needs: users and groups by name, name resolution, certificates,
/// the dynamic linker's cache, the time zone. Links are followed on the host, so a
/// `resolv.conf` that points into `/run` still works.
const SHOWN_ETC: &[&str] = &[
    "passwd",
    "group",
    "hosts",
    "host.conf",
    "nsswitch.conf",
    "resolv.conf",
    "gai.conf",
    "services",
    "protocols",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "pki",
    "crypto-policies",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "timezone",
    "os-release",
    "mime.types",
];

/// The host as every job sees it: [`SHOWN_ROOT`], [`SHOWN_ETC`], and NixOS's
/// `/run/current-system` (its `PATH` goes through it). Nothing else: deny by default.
fn host_view() -> Vec<(PathBuf, HostEntry)> {
    let mut view = Vec::new();
    for name in SHOWN_ROOT {
        let path = Path::new("/").join(name);
        match std::fs::read_link(&path) {
            Ok(target) => view.push((path, HostEntry::Link(target))),
            Err(_) if path.is_dir() => view.push((path.clone(), HostEntry::Bind(path))),
            Err(_) => {}
        }
    }
    for name in SHOWN_ETC {
        let path = Path::new("/etc").join(name);
        if let Ok(real) = path.canonicalize() {
            view.push((path, HostEntry::Bind(real)));
        }
    }
    let system = Path::new("/run/current-system");
    if let Ok(target) = std::fs::read_link(system) {
        view.push((system.to_owned(), HostEntry::Link(target)));
    }
    view
}

/// The toolchain's directories the host view lacks: rustup's home, and the directories
/// of `cargo`, `rustc` and `sccache` on the job's `PATH` (often `~/.cargo/bin`). Only
/// those, not the home around them.
fn toolchain_dirs(base_env: &[(OsString, OsString)]) -> Vec<PathBuf> {
    let var = |name: &str| {
        base_env
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let path = var("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = ["cargo", "rustc", "sccache"]
        .iter()
        .filter_map(|name| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|program| program.is_file())
                .and_then(|program| program.parent().map(Path::to_owned))
        })
        .chain(var("RUSTUP_HOME").map(PathBuf::from))
        .filter(|dir| dir.is_absolute() && dir.is_dir())
        .filter(|dir| {
            !SHOWN_ROOT
                .iter()
                .any(|name| dir.starts_with(Path::new("/").join(name)))
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Gives `dir` to `user`, the whole tree when `whole` or when its top was someone
/// else's; returns how many entries below the top changed owner. Opens every directory
/// from its parent with `O_NOFOLLOW` and changes owners with `AT_SYMLINK_NOFOLLOW`: links
/// are given over themselves, never followed. Entries that are the user's already are left
/// alone, so their status (which git compares) changes only where something new is.
fn hand_over_tree(dir: &Path, user: JobUser, whole: bool) -> std::io::Result<usize> {
    use rustix::fs::{
        AtFlags, FileType, Gid, Mode, OFlags, Uid, chownat, fchown, fstat, openat, statat,
    };
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let top = openat(rustix::fs::CWD, dir, flags, Mode::empty())?;
    let top_stat = fstat(&top)?;
    let theirs = |stat: &rustix::fs::Stat| stat.st_uid == user.uid && stat.st_gid == user.gid;
    let was_theirs = theirs(&top_stat);
    let owner = (Some(Uid::from_raw(user.uid)), Some(Gid::from_raw(user.gid)));
    if !was_theirs {
        fchown(&top, owner.0, owner.1)?;
    }
    let mut changed = 0;
    if was_theirs && !whole {
        return Ok(changed);
    }
    // Directories still to walk, by their parent's descriptor and name: only the chain
    // of parents with pending children holds descriptors, not every directory seen.
    let mut pending: Vec<(Rc<OwnedFd>, CString)> = Vec::new();
    let mut next = Some(top);
    loop {
        let dir = if let Some(dir) = next.take() {
            dir
        } else if let Some((parent, name)) = pending.pop() {
            openat(&*parent, name.as_c_str(), flags, Mode::empty())?
        } else {
            break;
        };
        let dir = Rc::new(dir);
        for entry in rustix::fs::Dir::read_from(&*dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let stat = statat(&*dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if !theirs(&stat) {
                chownat(&*dir, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)?;
                changed += 1;
            }
            if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
                pending.push((Rc::clone(&dir), name.to_owned()));
            }
        }
    }
    Ok(changed)
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
    fn the_bwrap_command_shows_little_of_the_host_hides_the_agent_and_binds_only_the_job() {
        let secrets = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let token = secrets.path().join("token");
        std::fs::write(&token, "secret").expect("token");
        let cache = secrets.path().join("cache");
        std::fs::create_dir(&cache).expect("cache dir");
        let mut sandbox = Sandbox::new(
            SandboxMode::Bwrap,
            false,
            vec![
                token.clone(),
                cache.clone(),
                secrets.path().join("missing"),
                "/var/lib/elsewhere".into(),
            ],
        );
        // As if the toolchain lived beside the agent's secrets.
        sandbox.toolchain = vec![secrets.path().to_owned()];
        sandbox.job_user = None;
        let job = CommandSpec {
            program: "cargo".into(),
            args: vec!["test".into()],
            cwd: "/build/app-0123456789ab".into(),
            env: env(&[("CARGO_TARGET_DIR", "/build/app-0123456789ab/target")]),
            clear_env: false,
            registry: None,
            options_on_fd3: None,
        };
        let paths = paths(Path::new("/w"));
        let wrapped = sandbox.wrap(&paths, job.clone());
        // The command line bwrap shows in /proc names no host path.
        assert_eq!(wrapped.args, ["--args", "3", "--", "cargo", "test"]);
        let options = wrapped.options_on_fd3.expect("options on fd 3");
        let line = String::from_utf8_lossy(&options).replace('\0', " ");
        for expected in [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--die-with-parent",
            "--ro-bind /usr /usr",
            "--ro-bind /etc/passwd /etc/passwd",
            "--perms 1777 --tmpfs /tmp",
            "--proc /proc",
            &format!("--ro-bind {0} {0}", secrets.path().display()),
            &format!("--ro-bind /dev/null {}", token.display()),
            &format!("--tmpfs {0} --remount-ro {0}", cache.display()),
            "--perms 0755 --dir /build --bind /w/slot-1/src /build/app-0123456789ab",
            "--bind /w/slot-1/target /build/app-0123456789ab/target",
            "--bind /w/cargo-home /build/.cargo",
            "--remount-ro / --chdir /build/app-0123456789ab",
        ] {
            assert!(line.contains(expected), "{expected:?} missing from {line}");
        }
        for absent in [
            "missing",
            "/var/lib/elsewhere",
            "/root",
            "/home",
            "/etc/shadow",
            "/var/lib",
        ] {
            assert!(!line.contains(absent), "{absent:?} shown: {line}");
        }
        let names: Vec<&OsStr> = wrapped.env.iter().map(|(n, _)| n.as_os_str()).collect();
        assert!(names.contains(&OsStr::new("CARGO_HOME")));
        assert!(names.contains(&OsStr::new("CARGO_TARGET_DIR")));
        assert!(!names.contains(&OsStr::new("BUILDPOOL_TOKEN")));

        // A root agent's job: no user namespace (it would be root outside), setpriv instead.
        sandbox.job_user = Some(JobUser {
            uid: 65534,
            gid: 65534,
        });
        let as_root = sandbox.wrap(&paths, job);
        let options =
            String::from_utf8_lossy(as_root.options_on_fd3.as_deref().unwrap_or_default())
                .replace('\0', " ");
        assert!(!options.contains("--unshare-user"), "{options}");
        assert_eq!(
            as_root.args,
            [
                "--args",
                "3",
                "--",
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
                "cargo",
                "test"
            ]
        );
    }

    #[test]
    fn a_job_user_is_found_by_name_or_id_and_never_root() {
        assert_eq!(
            JobUser::find("1000:100"),
            Ok(JobUser {
                uid: 1000,
                gid: 100
            })
        );
        assert_eq!(JobUser::find("4242").map(|user| user.gid), Ok(4242));
        assert!(JobUser::find("root").is_err());
        assert!(JobUser::find("0:5").is_err());
        assert!(JobUser::find("no-such-user-here").is_err());
        assert_ne!(JobUser::nobody().uid, 0);
    }

    /// A root agent hands the checkout to the job's user without following a link the
    /// last job planted: the link is given over, its target keeps its owner.
    #[test]
    fn handing_over_follows_no_link() {
        if !rustix::process::getuid().is_root() {
            return; // Only root can give files away; CI runs as root.
        }
        let root = tempfile::tempdir().expect("temp dir");
        let outside = root.path().join("outside");
        std::fs::write(&outside, "host file").expect("outside");
        let src = root.path().join("src");
        std::fs::create_dir_all(src.join("sub/deeper")).expect("dirs");
        std::fs::write(src.join("sub/deeper/lib.rs"), "").expect("file");
        std::os::unix::fs::symlink(&outside, src.join("sub/link")).expect("link");
        std::os::unix::fs::symlink(root.path(), src.join("up")).expect("dir link");
        let user = JobUser {
            uid: 4242,
            gid: 4243,
        };
        hand_over_tree(&src, user, true).expect("handed over");
        let owner = |path: &Path| {
            let meta = std::fs::symlink_metadata(path).expect("metadata");
            (
                std::os::unix::fs::MetadataExt::uid(&meta),
                std::os::unix::fs::MetadataExt::gid(&meta),
            )
        };
        for path in [
            "",
            "sub",
            "sub/deeper",
            "sub/deeper/lib.rs",
            "sub/link",
            "up",
        ] {
            assert_eq!(owner(&src.join(path)), (4242, 4243), "{path}");
        }
        assert_eq!(owner(&outside), (0, 0));
        assert_eq!(owner(root.path()), (0, 0));
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
        sandbox.hand_over(&paths).expect("handed over");
        let script = format!(
            "pwd; cat Cargo.toml; echo; cat {} | wc -c; ls -A {} | wc -l; \
             cut -d: -f1 /proc/net/dev | tail -n +3; touch /build/app-0123456789ab/target/ok; \
             touch /usr/nope 2>/dev/null || echo ro; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; \
             tr '\\0' ' ' < /proc/1/cmdline; echo; ls /root /home 2>&1 | wc -l; \
             test \"$(id -u)\" = 0 && echo uid 0 || echo not root",
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
                options_on_fd3: None,
            },
        );
        let output = crate::process::collect(command, Duration::from_secs(60))
            .await
            .expect("bwrap runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
        let bwrap_line = if rustix::process::getuid().is_root() {
            "bwrap --args 3 -- setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all \
             --bounding-set=-all --no-new-privs -- sh -c"
        } else {
            "bwrap --args 3 -- sh -c"
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            lines.get(..8),
            Some(
                &[
                    "/build/app-0123456789ab",
                    "[package]",
                    "0",
                    "0",
                    "lo",
                    "ro",
                    "CapEff:\t0000000000000000",
                    "NoNewPrivs:\t1",
                ][..]
            ),
            "{stderr}"
        );
        assert!(
            lines[8].contains(bwrap_line) && !lines[8].contains("--bind"),
            "/proc/1/cmdline shows the mounts: {}",
            lines[8]
        );
        assert_eq!(lines[9..], ["2", "not root"], "no home directory: {stderr}");
        assert!(
            paths.target.join("ok").exists(),
            "the target dir is the slot's"
        );
    }
}
