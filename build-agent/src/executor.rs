//! The executor: snapshot in, cargo result out.
//!
//! One implementation serves both the `build-agent` binary and the coordinator's embedded
//! local agent, so "it worked locally" and "it worked on the agent" mean the same steps:
//! fetch the exact snapshot into the repository's git cache, check it out into a warm
//! workspace, pick the environment (the flake's dev shell or the host), run cargo as an
//! owned process group, stream its output.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use buildpool_core::bus::DiskUsage;
use buildpool_core::job::ARCHIVE_FILE;
use buildpool_core::{
    AgentPhases, AttemptKey, Completion, EnvMode, JobEnd, JobKind, JobSpec, OutputStream, RunEnv,
    Source,
};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::archives::{ArchiveError, ArchiveSource};
use crate::artifacts::{self, Executables};
use crate::disk::{DiskBudget, DiskHold, DoesNotFit};
use crate::git_cache::{CacheError, GitCache, GitRemote, Obtained, PackOverBase};
use crate::nix::{self, DevEnv, DevEnvCache};
use crate::process::{self, CommandSpec, OutputChunk, ProcessResult, RunLimits};
use crate::sandbox::{JobPaths, Sandbox, agent_cargo_home, find_on_path};
use crate::shared_cache::SharedCache;
use crate::workspace::{Lineage, Workspace, WorkspaceError, WorkspacePool};

/// Where executables wait to be sent, under the worktree directory (no repository id
/// starts with a dot).
const STAGING_DIR: &str = ".artifacts";

/// Settings of an executor.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub git_cache_dir: PathBuf,
    pub worktree_dir: PathBuf,
    /// Workspaces per repository; the agent's slot count.
    pub slots: usize,
    /// The environment used when a job asks for `auto`.
    pub env_mode: EnvMode,
    /// Timeout for jobs that do not set one.
    pub default_timeout: Duration,
    /// Time between TERM and KILL when a job is stopped.
    pub kill_grace: Duration,
    /// How jobs are contained on a build host; `None` on the developer's own machine (the
    /// coordinator's embedded agent), where a job runs as the developer's own cargo would:
    /// in their environment, with their cargo home.
    pub sandbox: Option<Sandbox>,
    /// Compile through sccache (when installed), one disk cache per repository.
    pub sccache: bool,
    /// The fleet's one sccache store, used in place of the repository's disk cache while
    /// it answers.
    pub shared_cache: Option<SharedCache>,
    /// The disk budget over workspaces and caches; `None` keeps no budget (the developer's
    /// own machine).
    pub disk: Option<Arc<DiskBudget>>,
}

/// One job attempt as the executor sees it.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub key: AttemptKey,
    pub spec: JobSpec,
    pub source: Source,
    /// The worktree the snapshot was taken from (empty if the coordinator did not say).
    pub worktree: String,
    /// Where to fetch `source.git_ref` from.
    pub remote: GitRemote,
    /// Where a slice of a spread test run takes its test archive from.
    pub archives: Option<Arc<dyn ArchiveSource>>,
}

#[derive(Debug, Clone)]
pub struct Executor {
    cache: GitCache,
    workspaces: WorkspacePool,
    dev_envs: Arc<DevEnvCache>,
    config: ExecutorConfig,
}

/// A completion for a job that ended before cargo ran to its end.
fn ended_early(end: JobEnd, started: Instant) -> Completion {
    Completion {
        end,
        duration: started.elapsed(),
        env: None,
        phases: AgentPhases::default(),
    }
}

/// Decides where a job runs: `auto` means nix when the checkout has a `flake.nix` and nix is
/// installed, otherwise the host.
pub fn resolve_env(mode: EnvMode, src: &Path) -> Result<RunEnv, String> {
    let has_flake = src.join("flake.nix").is_file();
    let has_nix = nix::installed();
    match mode {
        EnvMode::Host => Ok(RunEnv::Host),
        EnvMode::Auto => Ok(if has_flake && has_nix {
            RunEnv::Nix
        } else {
            RunEnv::Host
        }),
        EnvMode::Nix if !has_flake => {
            Err("env nix requested but the snapshot has no flake.nix".into())
        }
        EnvMode::Nix if !has_nix => {
            Err("env nix requested but nix is not installed on this agent".into())
        }
        EnvMode::Nix => Ok(RunEnv::Nix),
    }
}

/// The command line for a job: cargo, in the dev shell's environment when there is one.
pub fn cargo_command(
    spec: &JobSpec,
    dev_env: Option<&DevEnv>,
    src: &Path,
    target: &Path,
) -> CommandSpec {
    let mut args: Vec<OsString> = spec
        .kind
        .cargo_command()
        .iter()
        .map(OsString::from)
        .collect();
    if spec.collect_executables {
        args.extend(artifacts::MESSAGE_FORMAT_ARGS.iter().map(OsString::from));
    }
    if spec.kind == JobKind::NextestArchive || spec.archive_from.is_some() {
        args.extend(["--archive-file".into(), target.join(ARCHIVE_FILE).into()]);
    }
    if spec.archive_from.is_some() {
        args.extend(["--workspace-remap".into(), src.into()]);
    }
    args.extend(spec.cargo_args.iter().map(OsString::from));
    let mut vars: Vec<(OsString, OsString)> =
        dev_env.map(|env| env.as_ref().clone()).unwrap_or_default();
    vars.push(("CARGO_TARGET_DIR".into(), target.into()));
    vars.extend(
        spec.env
            .iter()
            .map(|v| (OsString::from(&v.name), OsString::from(&v.value))),
    );
    CommandSpec {
        program: "cargo".into(),
        args,
        cwd: src.to_owned(),
        env: vars,
        clear_env: false,
        registry: None,
        options_on_fd3: None,
    }
}

/// The agent's cargo configuration (registries, mirrors, net settings) for a repository's
/// own cargo home, so a job resolves crates the way the host is set up to. Credentials are
/// separate files in cargo and stay behind.
fn copy_cargo_config(cargo_home: &Path) -> std::io::Result<()> {
    let Some(agent_home) = agent_cargo_home() else {
        return Ok(());
    };
    for name in ["config.toml", "config"] {
        let from = agent_home.join(name);
        let to = cargo_home.join(name);
        match std::fs::read(&from) {
            Ok(config) => {
                if std::fs::read(&to).ok().as_ref() != Some(&config) {
                    std::fs::write(&to, config)?;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Cargo's switch for incremental compilation. A cold slot's first build with the fleet's
/// store turns it off: the slot has no incremental state to reuse, and sccache caches no
/// incremental compilation, so only then do the workspace's own crates come from the store
/// too (for a crate like axum, most of a new agent's build). The slot's next build has it
/// on again (the profile's default), and cargo compiles the workspace's own crates once
/// more, with the state its later builds reuse. A job that sets it itself keeps its value.
const INCREMENTAL: &str = "CARGO_INCREMENTAL";

/// sccache for one job: the fleet's shared store when it answered, else the repository's
/// disk cache; and a server of the job's own. The server must not be shared: one
/// sandbox's server would read another sandbox's files at the same `/build` path. A socket
/// in the job's private `/tmp` isolates newer sccache; a port that was free when the job
/// started, older sccache.
fn sccache_env(
    sccache: &Path,
    dir: &Path,
    shared: Option<&SharedCache>,
) -> std::io::Result<Vec<(OsString, OsString)>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut env: Vec<(OsString, OsString)> = vec![
        ("RUSTC_WRAPPER".into(), sccache.into()),
        ("SCCACHE_DIR".into(), dir.into()),
        ("SCCACHE_SERVER_UDS".into(), "/tmp/sccache.sock".into()),
        ("SCCACHE_SERVER_PORT".into(), port.to_string().into()),
    ];
    env.extend(shared.map(SharedCache::sccache_env).unwrap_or_default());
    Ok(env)
}

/// Why a job could not get as far as cargo. The message is the job's failure reason, as
/// the user sees it.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("{0}")]
    Workspace(WorkspaceError),
    #[error("{0}")]
    CacheLock(CacheError),
    #[error("fetching the snapshot failed: {0}")]
    Fetch(CacheError),
    #[error("checking out the snapshot failed: {0}")]
    Checkout(WorkspaceError),
    /// The environment the job asked for is not there, or its dev shell failed.
    #[error("{0}")]
    Environment(String),
    #[error("cannot prepare the job's directories: {0}")]
    Directories(std::io::Error),
    #[error("{0}")]
    Archive(ArchiveError),
}

/// A job ready for cargo: its workspace leased and checked out, its environment settled.
struct PreparedJob {
    workspace: Workspace,
    env: RunEnv,
    dev_env: Option<DevEnv>,
    phases: AgentPhases,
    /// Keeps the workspace from being evicted for the disk budget while the job runs.
    disk_hold: Option<DiskHold>,
}

/// How the job's snapshot reached its workspace, for the job's first line of output.
struct CheckedOut {
    obtained: Obtained,
    fetch_time: Duration,
    /// Whether the workspace held a build before this job (see [`Workspace::is_warm`]).
    warm: bool,
}

impl CheckedOut {
    fn how_obtained(&self) -> String {
        let millis = self.fetch_time.as_millis();
        match self.obtained {
            Obtained::Fetched => format!("fetched in {millis} ms"),
            Obtained::Applied => format!("applied from its pack in {millis} ms"),
            Obtained::Held => "already cached".into(),
        }
    }
}

/// The command that runs a job, and what the job's containment changed.
struct JobCommand {
    command: CommandSpec,
    /// Where cargo sees the target directory (inside the sandbox, if there is one).
    visible_target: PathBuf,
    /// Whether the checkout's files were handed to the job's user (see
    /// [`Sandbox::hand_over`]), which leaves the workspace's git index stale.
    handed_over: bool,
}

/// Tells the job's output what the agent did for it: a `[buildpool]` line on stderr, so
/// it reads apart from cargo's own output.
async fn note(output: &mpsc::Sender<OutputChunk>, text: impl std::fmt::Display) {
    let line = Bytes::from(format!("[buildpool] {text}\n"));
    let _ = output
        .send(OutputChunk {
            stream: OutputStream::Stderr,
            data: line,
        })
        .await;
}

/// The end of a job whose setup failed, after telling its output why.
async fn setup_failed(output: &mpsc::Sender<OutputChunk>, error: &SetupError) -> JobEnd {
    let reason = error.to_string();
    note(output, &reason).await;
    JobEnd::Failed { reason }
}

impl Executor {
    /// The command that runs the job in `workspace`: plain cargo on the developer's machine;
    /// on a build host cargo with the repository's own cargo home (and sccache directory),
    /// contained by the sandbox.
    fn job_command(
        &self,
        spec: &JobSpec,
        dev_env: Option<&DevEnv>,
        workspace: &Workspace,
        shared_cache: Option<&SharedCache>,
    ) -> std::io::Result<JobCommand> {
        let Some(sandbox) = &self.config.sandbox else {
            return Ok(JobCommand {
                command: cargo_command(spec, dev_env, &workspace.src, &workspace.target),
                visible_target: workspace.target.clone(),
                handed_over: false,
            });
        };
        let repo_dir = workspace.repo_dir();
        let sccache = self
            .config
            .sccache
            .then(|| find_on_path("sccache"))
            .flatten();
        let paths = JobPaths {
            repo_id: workspace.repo_id.clone(),
            src: workspace.src.clone(),
            target: workspace.target.clone(),
            cargo_home: repo_dir.join("cargo-home"),
            sccache_dir: sccache.as_ref().map(|_| repo_dir.join("sccache")),
        };
        for dir in [&paths.target, &paths.cargo_home]
            .into_iter()
            .chain(&paths.sccache_dir)
        {
            std::fs::create_dir_all(dir)?;
        }
        copy_cargo_config(&paths.cargo_home)?;
        let handed_over = sandbox.hand_over(&paths)?;
        let view = sandbox.view(&paths);
        let mut command = cargo_command(spec, dev_env, &view.src, &view.target);
        if let (Some(sccache), Some(dir)) = (sccache, view.sccache_dir) {
            command
                .env
                .extend(sccache_env(&sccache, &dir, shared_cache)?);
            if shared_cache.is_some()
                && !workspace.is_warm()
                && !spec.env.iter().any(|var| var.name == INCREMENTAL)
            {
                command.env.push((INCREMENTAL.into(), "0".into()));
            }
        }
        Ok(JobCommand {
            command: sandbox.wrap(&paths, command),
            visible_target: view.target,
            handed_over,
        })
    }

    /// Whether a job of `repo_id` fits in the disk budget beside the running ones.
    pub fn admit(&self, repo_id: &str) -> Result<(), DoesNotFit> {
        self.config
            .disk
            .as_ref()
            .map_or(Ok(()), |disk| disk.admit(repo_id))
    }

    /// Disk use against the budget; all zero without a budget.
    pub fn disk_usage(&self) -> DiskUsage {
        self.config
            .disk
            .as_ref()
            .map(|disk| disk.usage())
            .unwrap_or_default()
    }

    /// Whether jobs run contained.
    pub fn sandboxed(&self) -> bool {
        self.config
            .sandbox
            .as_ref()
            .is_some_and(Sandbox::is_contained)
    }

    /// Brings the disk within budget in the background: idle workspaces and caches go,
    /// never a running job's. After a job, its workspace is measured first.
    fn enforce_disk_budget(&self, measure: Option<(String, usize)>) {
        let Some(disk) = self.config.disk.clone() else {
            return;
        };
        tokio::spawn(async move {
            if let Some((repo_id, slot)) = measure {
                disk.remeasure(&repo_id, slot).await;
            }
            disk.enforce().await;
        });
    }

    pub fn new(config: ExecutorConfig) -> Self {
        Self {
            cache: GitCache::new(config.git_cache_dir.clone()),
            workspaces: WorkspacePool::new(config.worktree_dir.clone(), config.slots),
            dev_envs: Arc::new(DevEnvCache::default()),
            config,
        }
    }

    /// Runs one job attempt to its end. Never panics on bad input: every failure becomes a
    /// `Failed` completion with a reason.
    ///
    /// Returns only once the job's process group and its workspace lease are gone, so the
    /// caller may free the job's slot as soon as this returns. With the executables it
    /// built when the job asked for them and cargo succeeded.
    pub async fn run(
        &self,
        job: &JobRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> (Completion, Option<Executables>) {
        let span = tracing::info_span!("job", job_id = job.key.job_id, attempt = job.key.attempt);
        let mut executables = None;
        let completion = self
            .run_inner(job, output, cancel, &mut executables)
            .instrument(span)
            .await;
        (completion, executables)
    }

    async fn run_inner(
        &self,
        job: &JobRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
        executables: &mut Option<Executables>,
    ) -> Completion {
        let started = Instant::now();
        let timeout = job.spec.timeout_or(self.config.default_timeout);
        let (prepared, job_command) = match self.set_up(job, &output, &cancel, timeout).await {
            Ok(ready) => ready,
            Err(end) => return ended_early(end, started),
        };
        let PreparedJob {
            workspace,
            env,
            mut phases,
            disk_hold,
            ..
        } = prepared;
        if job_command.handed_over
            && let Err(error) = workspace.refresh_index().await
        {
            // Costs the next job a rewrite of the files handed over, and cargo their rebuild.
            tracing::warn!(
                "refreshing workspace slot {}'s index failed: {error}",
                workspace.slot
            );
        }
        let limits = RunLimits {
            timeout: timeout.saturating_sub(started.elapsed()),
            kill_grace: self.config.kill_grace,
        };
        tracing::info!(env = env.label(), slot = workspace.slot, "running cargo");
        let phase = Instant::now();
        let (result, named) = self
            .run_cargo(&job.spec, job_command.command, limits, &output, cancel)
            .await;
        phases.cargo = phase.elapsed();
        let succeeded =
            matches!(&result, Ok(ended) if JobEnd::from(ended.end) == JobEnd::Exited { code: 0 });
        // A test archive goes back as the archive job's one artifact.
        let sent_back = match job.spec.kind {
            JobKind::NextestArchive => Some(vec![job_command.visible_target.join(ARCHIVE_FILE)]),
            _ if job.spec.collect_executables => Some(named),
            _ => None,
        };
        if let Some(files) = sent_back.filter(|_| succeeded) {
            *executables = self
                .stage_executables(files, job_command.visible_target, &workspace, &output)
                .await;
        }
        let slot = workspace.slot;
        drop(workspace);
        drop(disk_hold);
        self.enforce_disk_budget(Some((job.source.repo_id.clone(), slot)));
        let end = match result {
            Err(error) => {
                let reason = format!("could not start cargo (env {}): {error}", env.label());
                note(&output, &reason).await;
                JobEnd::Failed { reason }
            }
            Ok(result) => result.end.into(),
        };
        tracing::info!(%end, "job ended");
        Completion {
            end,
            duration: started.elapsed(),
            env: Some(env),
            phases,
        }
    }

    /// Checks the job, prepares it within its timeout unless it is cancelled first, and
    /// builds its command. A job that gets no further ends with the returned end.
    async fn set_up(
        &self,
        job: &JobRequest,
        output: &mpsc::Sender<OutputChunk>,
        cancel: &CancellationToken,
        timeout: Duration,
    ) -> Result<(PreparedJob, JobCommand), JobEnd> {
        if let Err(error) = buildpool_core::spec::validate(&job.spec) {
            return Err(JobEnd::Failed {
                reason: error.to_string(),
            });
        }
        let started = Instant::now();
        let prepared = tokio::select! {
            result = tokio::time::timeout(timeout, self.prepare(job, output)) => result,
            () = cancel.cancelled() => return Err(JobEnd::Cancelled),
        };
        let prepared = match prepared {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(error)) => return Err(setup_failed(output, &error).await),
            Err(_) => return Err(JobEnd::TimedOut),
        };
        // A test archive's transfer counts against the job's time, as its preparation does.
        let placed = tokio::select! {
            placed = tokio::time::timeout(
                timeout.saturating_sub(started.elapsed()),
                self.place_archive(job, &prepared.workspace, output),
            ) => placed,
            () = cancel.cancelled() => return Err(JobEnd::Cancelled),
        };
        match placed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(setup_failed(output, &error).await),
            Err(_) => return Err(JobEnd::TimedOut),
        }
        let shared_cache = self.reachable_shared_cache(output).await;
        match self.job_command(
            &job.spec,
            prepared.dev_env.as_ref(),
            &prepared.workspace,
            shared_cache,
        ) {
            Ok(job_command) => Ok((prepared, job_command)),
            Err(error) => Err(setup_failed(output, &SetupError::Directories(error)).await),
        }
    }

    /// Where a test archive goes, or comes: a `nextest-archive` job writes it into its
    /// target directory, once an older one is gone; a slice of a spread test run fetches
    /// the archive job's there.
    async fn place_archive(
        &self,
        job: &JobRequest,
        workspace: &Workspace,
        output: &mpsc::Sender<OutputChunk>,
    ) -> Result<(), SetupError> {
        let path = workspace.target.join(ARCHIVE_FILE);
        if job.spec.kind == JobKind::NextestArchive {
            return match tokio::fs::remove_file(&path).await {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    Err(SetupError::Directories(error))
                }
                _ => Ok(()),
            };
        }
        let Some(job_id) = job.spec.archive_from else {
            return Ok(());
        };
        let Some(archives) = &job.archives else {
            return Err(SetupError::Archive(ArchiveError {
                job_id,
                reason: "this agent has no way to its coordinator's archives".to_owned(),
            }));
        };
        let started = Instant::now();
        let bytes = archives
            .fetch(job_id, &path)
            .await
            .map_err(SetupError::Archive)?;
        #[allow(clippy::cast_precision_loss)] // a size to read, not to compute with
        let mib = bytes as f64 / (1024.0 * 1024.0);
        let line = format!(
            "test archive of job {job_id} fetched ({mib:.1} MiB in {} ms)",
            started.elapsed().as_millis()
        );
        note(output, line).await;
        Ok(())
    }

    /// The fleet's shared cache, when one is configured and answers now. A store that is
    /// down costs the job this line and its hits, never the job: it compiles with the
    /// repository's own disk cache instead.
    async fn reachable_shared_cache(
        &self,
        output: &mpsc::Sender<OutputChunk>,
    ) -> Option<&SharedCache> {
        let shared = self.config.shared_cache.as_ref()?;
        match shared.probe().await {
            Ok(()) => Some(shared),
            Err(error) => {
                tracing::warn!(%shared, "shared compilation cache unreachable: {error}");
                let line = format!(
                    "shared compilation cache {shared} unreachable ({error}): compiling \
                     with this agent's own cache"
                );
                note(output, line).await;
                None
            }
        }
    }

    /// Everything before cargo: a workspace, the snapshot checked out into it, the
    /// environment; timed phase by phase, and told to the job's output in one line.
    async fn prepare(
        &self,
        job: &JobRequest,
        output: &mpsc::Sender<OutputChunk>,
    ) -> Result<PreparedJob, SetupError> {
        let mut phases = AgentPhases::default();
        // A workspace still held by an ending job (or another process) makes this job
        // wait, never fail: the lease is the job's, not a reason to give up.
        let phase = Instant::now();
        let lineage = Lineage {
            worktree: job.worktree.clone(),
            base_commit: job.source.base_commit.clone(),
        };
        let workspace = self
            .workspaces
            .acquire_waiting(&job.source.repo_id, &lineage)
            .await
            .map_err(SetupError::Workspace)?;
        phases.workspace_wait = phase.elapsed();
        let disk_hold = self
            .config
            .disk
            .as_ref()
            .map(|disk| disk.hold(&job.source.repo_id, workspace.slot));
        // What this job holds is safe; others' idle workspaces make room for it.
        self.enforce_disk_budget(None);
        let checked_out = self
            .fetch_and_check_out(job, &lineage, &workspace, &mut phases)
            .await?;
        let phase = Instant::now();
        let env_mode = match job.spec.env_mode {
            EnvMode::Auto => self.config.env_mode,
            explicit => explicit,
        };
        let env = resolve_env(env_mode, &workspace.src).map_err(SetupError::Environment)?;
        let (dev_env, env_note) = self.dev_env(env, &workspace.src).await?;
        phases.environment = phase.elapsed();
        let commit_short = job.source.commit.get(..12).unwrap_or(&job.source.commit);
        note(
            output,
            format!(
                "snapshot {commit_short} {}; workspace slot {} ({}); env {}{env_note}",
                checked_out.how_obtained(),
                workspace.slot,
                if checked_out.warm { "warm" } else { "cold" },
                env.label()
            ),
        )
        .await;
        Ok(PreparedJob {
            workspace,
            env,
            dev_env,
            phases,
            disk_hold,
        })
    }

    /// Brings the job's snapshot into the repository's cache and checks it out into
    /// `workspace`, timing the fetch and checkout phases.
    async fn fetch_and_check_out(
        &self,
        job: &JobRequest,
        lineage: &Lineage,
        workspace: &Workspace,
        phases: &mut AgentPhases,
    ) -> Result<CheckedOut, SetupError> {
        let lock = self
            .cache
            .lock(&job.source.repo_id)
            .await
            .map_err(SetupError::CacheLock)?;
        let phase = Instant::now();
        let fetch = async {
            let started = Instant::now();
            let pack = job.source.pack.as_ref().map(|pack| PackOverBase {
                base: &job.source.base_commit,
                pack,
            });
            let obtained = self
                .cache
                .ensure_commit(
                    &lock,
                    &job.source.repo_id,
                    &job.remote,
                    &job.source.git_ref,
                    &job.source.commit,
                    pack,
                )
                .await;
            (obtained, started.elapsed())
        };
        // The workspace sheds the last job's leftovers meanwhile: the fetch writes the
        // cache, the clean only the checkout, and the checkout waits for both. A clean
        // that fails is tried again after the checkout, which reports its error.
        let ((obtained, fetch_time), cleaned) = tokio::join!(fetch, workspace.clean());
        let obtained = obtained.map_err(SetupError::Fetch)?;
        let cleaned = cleaned.unwrap_or_else(|error| {
            tracing::warn!("cleaning workspace slot {} failed: {error}", workspace.slot);
            false
        });
        phases.fetch = phase.elapsed();
        let warm = workspace.is_warm();
        let phase = Instant::now();
        workspace
            .checkout(
                &lock,
                &self.cache.repo_dir(&job.source.repo_id),
                &job.source.commit,
                cleaned,
            )
            .await
            .map_err(SetupError::Checkout)?;
        drop(lock);
        if let Err(error) = workspace.record_built(lineage) {
            // Costs the next job of this worktree its pick of the warmest workspace only.
            tracing::warn!(
                "cannot record what workspace slot {} built: {error}",
                workspace.slot
            );
        }
        phases.checkout = phase.elapsed();
        Ok(CheckedOut {
            obtained,
            fetch_time,
            warm,
        })
    }

    /// The dev shell's variables when the job runs under nix (evaluated, or cached per
    /// flake), with a note on which it was for the job's output.
    async fn dev_env(
        &self,
        env: RunEnv,
        src: &Path,
    ) -> Result<(Option<DevEnv>, String), SetupError> {
        match env {
            RunEnv::Host => Ok((None, String::new())),
            RunEnv::Nix => {
                let evaluated = Instant::now();
                let (dev_env, cached) = self
                    .dev_envs
                    .get(src)
                    .await
                    .map_err(SetupError::Environment)?;
                let how = if cached {
                    "cached".to_owned()
                } else {
                    format!("evaluated in {} ms", evaluated.elapsed().as_millis())
                };
                Ok((Some(dev_env), format!(" (dev shell {how})")))
            }
        }
    }

    /// Runs cargo to its end. When the job collects executables, cargo's JSON messages are
    /// taken off its output and the names of the executables they report returned.
    async fn run_cargo(
        &self,
        spec: &JobSpec,
        mut command: CommandSpec,
        limits: RunLimits,
        output: &mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> (std::io::Result<ProcessResult>, Vec<PathBuf>) {
        command.registry = Some(self.config.worktree_dir.join(process::REGISTRY_DIR));
        if spec.collect_executables {
            let (chunks, unfiltered) = mpsc::channel(1);
            tokio::join!(
                process::run(command, limits, chunks, cancel),
                artifacts::filter_messages(unfiltered, output.clone())
            )
        } else {
            let result = process::run(command, limits, output.clone(), cancel).await;
            (result, Vec::new())
        }
    }

    /// Copies the executables cargo named out of the workspace into the staging directory,
    /// on a blocking thread; what cannot be sent is told to the job's output, not failed.
    async fn stage_executables(
        &self,
        named: Vec<PathBuf>,
        visible_target: PathBuf,
        workspace: &Workspace,
        output: &mpsc::Sender<OutputChunk>,
    ) -> Option<Executables> {
        let staging = self.config.worktree_dir.join(STAGING_DIR);
        let host_target = workspace.target.clone();
        let staged = tokio::task::spawn_blocking(move || {
            artifacts::stage(&named, &visible_target, &host_target, &staging)
        })
        .await;
        let error = match staged {
            Ok(Ok((staged, notes))) => {
                for text in notes {
                    note(output, text).await;
                }
                return Some(staged);
            }
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        note(output, format!("the executables cannot be sent: {error}")).await;
        None
    }
}
