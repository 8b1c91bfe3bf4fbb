//! `buildpool mcp`: a stdio MCP server giving coding agents `build`, `test`, `clippy`,
//! `check`, `fmt`, `worker_status`, `job_log` and `cancel_job` tools.
//!
//! Only this module knows MCP (via the official `rmcp` SDK). It is a thin client of the
//! repository's coordinator: every job tool snapshots the worktree the server runs in,
//! submits the job and waits, turning the output into a short structured answer
//! ([`report`], [`answer`]). With no coordinator reachable it runs the job through an
//! in-process coordinator (same code path as `buildpool run`) and says so. `fmt` is no
//! job: it checks the worktree in place ([`fmt`]).

pub mod answer;
pub mod fmt;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use buildpool_core::status::{CancelReply, LogRequest};
use buildpool_core::{EnvVar, JobEvent, JobId, JobKind, JobSpec, OutputStream};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, Implementation, ProgressNotificationParam, ProgressToken, RequestMetaObject,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{
    ErrorData, Peer, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::client::{Client, ClientError};
use crate::repo::Repo;
use crate::report::ReportBuilder;
use crate::session::{JobClient, JobSession, StartError, Timings, Via};
use crate::spread::{Observer, Outcome as SpreadOutcome, Part, Spread};
use answer::{
    CancelAnswer, CancelState, FmtAnswer, JobAnswer, LogAnswer, PartItem, Placement, StatusAnswer,
    ToolAnswer,
};

/// Longest a cancelled job may take to confirm before the answer is given without it.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// Minimum spacing of progress notifications while crates compile.
const PROGRESS_SPACING: Duration = Duration::from_millis(500);
const DEFAULT_LOG_LINES: usize = 200;
const MAX_LOG_LINES: usize = 2000;
/// Most log bytes `job_log` reads to filter and page through.
const MAX_LOG_SCAN: u64 = 64 * 1024 * 1024;

/// Inputs shared by `build` and `check`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildInput {
    /// Package to build (`-p`); default: the workspace's default members.
    pub package: Option<String>,
    /// Features to enable (`--features`).
    pub features: Option<Vec<String>>,
    /// Enable all features (`--all-features`).
    pub all_features: Option<bool>,
    /// Release profile (`--release`).
    pub release: Option<bool>,
    /// Job timeout in seconds (default: the coordinator's).
    pub timeout_secs: Option<u32>,
}

/// What runs the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runner {
    /// `cargo test`.
    #[default]
    Cargo,
    /// `cargo nextest run`: needs cargo-nextest where the job runs.
    Nextest,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestInput {
    /// "cargo" (default: `cargo test`) or "nextest" (`cargo nextest run`).
    pub runner: Option<Runner>,
    /// Package to test (`-p`).
    pub package: Option<String>,
    /// Features to enable (`--features`).
    pub features: Option<Vec<String>>,
    /// Enable all features (`--all-features`).
    pub all_features: Option<bool>,
    /// Release profile (`--release`).
    pub release: Option<bool>,
    /// Job timeout in seconds.
    pub timeout_secs: Option<u32>,
    /// Run only tests whose name contains this string.
    pub filter: Option<String>,
    /// Show the tests' output as it happens (`--nocapture`).
    pub nocapture: Option<bool>,
    /// Also run `#[ignore]`d tests (`--include-ignored`).
    pub include_ignored: Option<bool>,
    /// Spread the run over agents: a number of slices, or "auto" (one per idle agent).
    /// The tests are built once, the slices run at once, and the answer counts them all.
    /// Needs cargo-nextest on the agents (without it, one agent runs `cargo test`).
    pub spread: Option<SpreadInput>,
}

/// `spread`: a number of slices, or "auto".
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SpreadInput {
    Slices(u32),
    /// "auto": one slice per idle agent.
    Named(String),
}

impl SpreadInput {
    fn spread(&self) -> Result<Spread, ErrorData> {
        let text = match self {
            SpreadInput::Slices(count) => count.to_string(),
            SpreadInput::Named(name) => name.clone(),
        };
        text.parse().map_err(invalid)
    }
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClippyInput {
    /// Package to lint (`-p`).
    pub package: Option<String>,
    /// Features to enable (`--features`); setting this turns `all_features` off unless given.
    pub features: Option<Vec<String>>,
    /// Enable all features; default true.
    pub all_features: Option<bool>,
    /// Release profile (`--release`).
    pub release: Option<bool>,
    /// Job timeout in seconds.
    pub timeout_secs: Option<u32>,
    /// Lint tests, benches and examples too (`--all-targets`); default true.
    pub all_targets: Option<bool>,
    /// Treat warnings as errors (`-- -D warnings`); default true.
    pub deny_warnings: Option<bool>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FmtInput {
    /// Package to check (`-p`); default: what `cargo fmt` checks in the worktree's root.
    pub package: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobLogInput {
    /// Job id from a previous answer.
    pub job_id: u64,
    /// First line to return (0-based, counted after filtering).
    pub offset: Option<usize>,
    /// Lines to return (default 200, at most 2000).
    pub limit: Option<usize>,
    /// "stdout", "stderr" or "both" (default).
    pub stream: Option<String>,
    /// Only lines containing this substring.
    pub filter: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelInput {
    /// Job id to cancel.
    pub job_id: u64,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoInput {}

fn invalid(message: impl Into<String>) -> ErrorData {
    ErrorData::invalid_params(message.into(), None)
}

/// Checks a package or feature name. One starting with `-` is refused like the test
/// filter's: cargo would read it as an option (`-p --frozen`, `--features -Z...`), not as
/// the name the tool's input promises.
fn check_name(what: &str, value: &str, extra: &str) -> Result<(), ErrorData> {
    if value.starts_with('-') {
        return Err(invalid(format!(
            "{what} {value:?} is not a valid name: it must not start with '-'"
        )));
    }
    let ok = !value.is_empty()
        && value.len() <= 200
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c) || extra.contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("{what} {value:?} is not a valid name")))
    }
}

/// Arguments common to every cargo job; every advertised input maps to a flag here.
fn common_args(
    package: Option<&String>,
    features: Option<&Vec<String>>,
    all_features: bool,
    release: bool,
) -> Result<Vec<String>, ErrorData> {
    let mut args = vec!["--message-format=json".to_owned()];
    if let Some(package) = package {
        check_name("package", package, "@.+")?;
        args.extend(["-p".to_owned(), package.clone()]);
    }
    if let Some(features) = features.filter(|f| !f.is_empty()) {
        for feature in features {
            check_name("feature", feature, "/.+")?;
        }
        args.extend(["--features".to_owned(), features.join(",")]);
    }
    if all_features {
        args.push("--all-features".to_owned());
    }
    if release {
        args.push("--release".to_owned());
    }
    Ok(args)
}

fn check_timeout(timeout: Option<u32>) -> Result<Option<Duration>, ErrorData> {
    match timeout {
        None => Ok(None),
        Some(secs @ 1..=86_400) => Ok(Some(Duration::from_secs(u64::from(secs)))),
        Some(other) => Err(invalid(format!(
            "timeout_secs must be 1..=86400, not {other}"
        ))),
    }
}

/// A tool's inputs as the job they ask for.
trait JobInput {
    fn cargo_args(&self) -> Result<Vec<String>, ErrorData>;
    fn timeout_secs(&self) -> Option<u32>;

    fn spec(&self, kind: JobKind) -> Result<JobSpec, ErrorData> {
        Ok(JobSpec {
            cargo_args: self.cargo_args()?,
            timeout: check_timeout(self.timeout_secs())?,
            ..JobSpec::new(kind)
        })
    }
}

/// `build` and `check` take the same inputs.
impl JobInput for BuildInput {
    fn cargo_args(&self) -> Result<Vec<String>, ErrorData> {
        common_args(
            self.package.as_ref(),
            self.features.as_ref(),
            self.all_features.unwrap_or(false),
            self.release.unwrap_or(false),
        )
    }

    fn timeout_secs(&self) -> Option<u32> {
        self.timeout_secs
    }
}

impl JobInput for TestInput {
    fn cargo_args(&self) -> Result<Vec<String>, ErrorData> {
        test_args(self)
    }

    fn timeout_secs(&self) -> Option<u32> {
        self.timeout_secs
    }
}

impl TestInput {
    /// How the run is spread, when it is: `cargo test` spread runs nextest itself.
    fn spread(&self) -> Result<Option<Spread>, ErrorData> {
        let Some(spread) = &self.spread else {
            return Ok(None);
        };
        if self.runner == Some(Runner::Nextest) {
            return Err(invalid(
                "spread runs cargo-nextest itself: leave runner unset (or \"cargo\")",
            ));
        }
        spread.spread().map(Some)
    }

    /// `cargo test`, or `cargo nextest run` with its results as libtest JSON events.
    fn job_spec(&self) -> Result<JobSpec, ErrorData> {
        match self.runner.unwrap_or_default() {
            Runner::Cargo => self.spec(JobKind::Test),
            Runner::Nextest => {
                let mut spec = self.spec(JobKind::Nextest)?;
                spec.env.push(EnvVar {
                    name: "NEXTEST_EXPERIMENTAL_LIBTEST_JSON".to_owned(),
                    value: "1".to_owned(),
                });
                Ok(spec)
            }
        }
    }
}

impl JobInput for ClippyInput {
    fn cargo_args(&self) -> Result<Vec<String>, ErrorData> {
        clippy_args(self)
    }

    fn timeout_secs(&self) -> Option<u32> {
        self.timeout_secs
    }
}

pub fn test_args(input: &TestInput) -> Result<Vec<String>, ErrorData> {
    let mut args = common_args(
        input.package.as_ref(),
        input.features.as_ref(),
        input.all_features.unwrap_or(false),
        input.release.unwrap_or(false),
    )?;
    if let Some(filter) = &input.filter
        && (filter.contains('\0') || filter.len() > 512 || filter.starts_with('-'))
    {
        return Err(invalid(
            "filter must be a test name substring (no leading '-', at most 512 bytes)",
        ));
    }
    let nocapture = input.nocapture == Some(true);
    let include_ignored = input.include_ignored == Some(true);
    args.push("--no-fail-fast".to_owned());
    if input.runner == Some(Runner::Nextest) {
        // nextest's own output stays human on stderr; cargo's messages and the test events
        // come as JSON on stdout.
        args[0] = "--cargo-message-format=json".to_owned();
        args.push("--message-format=libtest-json-plus".to_owned());
        args.extend(input.filter.clone());
        if nocapture {
            args.push("--no-capture".to_owned());
        }
        if include_ignored {
            args.push("--run-ignored=all".to_owned());
        }
        return Ok(args);
    }
    args.push("--".to_owned());
    args.extend(input.filter.clone());
    if nocapture {
        args.push("--nocapture".to_owned());
    }
    if include_ignored {
        args.push("--include-ignored".to_owned());
    }
    Ok(args)
}

pub fn clippy_args(input: &ClippyInput) -> Result<Vec<String>, ErrorData> {
    // The seed's default is `--all-targets --all-features -- -D warnings`; naming features
    // explicitly means the caller wants those, so all_features then defaults to off.
    let all_features = input.all_features.unwrap_or(input.features.is_none());
    let mut args = common_args(
        input.package.as_ref(),
        input.features.as_ref(),
        all_features,
        input.release.unwrap_or(false),
    )?;
    if input.all_targets.unwrap_or(true) {
        args.push("--all-targets".to_owned());
    }
    if input.deny_warnings.unwrap_or(true) {
        args.extend(["--".to_owned(), "-D".to_owned(), "warnings".to_owned()]);
    }
    Ok(args)
}

#[derive(Debug)]
struct Inner {
    jobs: JobClient,
    /// Where each job of this session was submitted, for `job_log` and `cancel_job`.
    submitted_via: std::sync::Mutex<HashMap<JobId, Via>>,
}

/// The MCP server of one worktree.
#[derive(Debug, Clone)]
pub struct BuildPoolMcp {
    inner: Arc<Inner>,
    /// Read by the code `#[tool_handler]` generates, which the dead-code lint cannot see.
    #[allow(dead_code)]
    tool_router: ToolRouter<Self>,
}

/// Serves MCP on stdin/stdout until the client goes away.
pub async fn serve(dir: &Path) -> anyhow::Result<()> {
    let repo = Repo::discover(dir).await?;
    if let Some(note) = repo.plain_note() {
        // stderr is the MCP client's log of this server.
        eprintln!("buildpool mcp: {note}");
    }
    let server = BuildPoolMcp::new(repo);
    let running = server.clone().serve(rmcp::transport::stdio()).await?;
    let result = running.waiting().await;
    server.inner.jobs.shutdown().await;
    result?;
    Ok(())
}

/// Progress notifications of one tool call, if the caller asked for them.
struct Progress {
    peer: Peer<RoleServer>,
    token: Option<ProgressToken>,
    step: f64,
    last: Option<Instant>,
}

impl Progress {
    fn new(meta: &RequestMetaObject, peer: Peer<RoleServer>) -> Self {
        Self {
            peer,
            token: meta.get_progress_token(),
            step: 0.0,
            last: None,
        }
    }

    async fn send(&mut self, message: String, throttle: bool) {
        let Some(token) = &self.token else { return };
        if throttle
            && self
                .last
                .is_some_and(|last| last.elapsed() < PROGRESS_SPACING)
        {
            return;
        }
        self.last = Some(Instant::now());
        self.step += 1.0;
        let mut param = ProgressNotificationParam::new(token.clone(), self.step);
        param.message = Some(message);
        let _ = self.peer.notify_progress(param).await;
    }
}

#[tool_router]
impl BuildPoolMcp {
    pub fn new(repo: Repo) -> Self {
        Self {
            inner: Arc::new(Inner {
                jobs: JobClient::new(repo),
                submitted_via: std::sync::Mutex::new(HashMap::new()),
            }),
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "cargo build of this worktree's current state (uncommitted and untracked files included) on the build pool. Answers with errors first (file:line:col, code, message, snippet), then warnings.",
        output_schema = schema_for_output::<JobAnswer>()
    )]
    async fn build(
        &self,
        Parameters(input): Parameters<BuildInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run_job(input.spec(JobKind::Build)?, context).await
    }

    #[tool(
        description = "cargo check of this worktree's current state on the build pool: like build, faster, no binaries.",
        output_schema = schema_for_output::<JobAnswer>()
    )]
    async fn check(
        &self,
        Parameters(input): Parameters<BuildInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run_job(input.spec(JobKind::Check)?, context).await
    }

    #[tool(
        description = "cargo test (or, with runner \"nextest\", cargo nextest run) of this worktree's current state on the build pool. Answers with passed/failed/ignored counts and each failing test's name, panic message and the end of its captured output; compile errors like build.",
        output_schema = schema_for_output::<JobAnswer>()
    )]
    async fn test(
        &self,
        Parameters(input): Parameters<TestInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let spec = input.job_spec()?;
        match input.spread()? {
            Some(spread) => self.run_spread(spec, spread, context).await,
            None => self.run_job(spec, context).await,
        }
    }

    #[tool(
        description = "cargo clippy of this worktree's current state on the build pool; by default --all-targets --all-features -- -D warnings.",
        output_schema = schema_for_output::<JobAnswer>()
    )]
    async fn clippy(
        &self,
        Parameters(input): Parameters<ClippyInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.run_job(input.spec(JobKind::Clippy)?, context).await
    }

    #[tool(
        description = "cargo fmt --check of this worktree as it is now, run here (no build, no job): the files cargo fmt would change and the lines where changes start.",
        output_schema = schema_for_output::<FmtAnswer>()
    )]
    async fn fmt(
        &self,
        Parameters(input): Parameters<FmtInput>,
    ) -> Result<CallToolResult, ErrorData> {
        if let Some(package) = &input.package {
            check_name("package", package, "@.+")?;
        }
        let worktree = &self.inner.jobs.repo().worktree;
        Ok(fmt::check(worktree, input.package.as_deref())
            .await
            .into_result())
    }

    #[tool(
        description = "Build agents (slots used/total, labels), queued and running jobs, and whether the local fallback is running a job right now.",
        output_schema = schema_for_output::<StatusAnswer>()
    )]
    async fn worker_status(
        &self,
        Parameters(_input): Parameters<NoInput>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = match Client::connect_to_running(self.inner.jobs.repo()).await {
            Ok((client, _)) => client,
            Err(error) => {
                // Jobs of this session run in-process meanwhile; say whether one runs now.
                let mut local_active = false;
                if let Some(local) = self.inner.jobs.fallback_client().await
                    && let Ok(status) = local.status().await
                {
                    local_active = status.local_fallback_active;
                }
                let next = if matches!(error, ClientError::NotRunning(_))
                    && crate::background::enabled()
                {
                    "the next job starts a coordinator for this repository in the background"
                } else {
                    "jobs run locally through an in-process coordinator until one is reachable"
                };
                return Ok(
                    StatusAnswer::unreachable(&error.to_string(), next, local_active).into_result(),
                );
            }
        };
        let status = client
            .status()
            .await
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        Ok(StatusAnswer::of(&status).into_result())
    }

    #[tool(
        description = "Page through a running or finished job's full log by job id: line offset and limit, stream (stdout|stderr|both), substring filter.",
        output_schema = schema_for_output::<LogAnswer>()
    )]
    async fn job_log(
        &self,
        Parameters(input): Parameters<JobLogInput>,
    ) -> Result<CallToolResult, ErrorData> {
        let stream = match input.stream.as_deref().unwrap_or("both") {
            "both" => None,
            "stdout" => Some(OutputStream::Stdout),
            "stderr" => Some(OutputStream::Stderr),
            other => {
                return Err(invalid(format!(
                    "stream must be stdout, stderr or both, not {other:?}"
                )));
            }
        };
        let limit = input.limit.unwrap_or(DEFAULT_LOG_LINES);
        if limit == 0 || limit > MAX_LOG_LINES {
            return Err(invalid(format!("limit must be 1..={MAX_LOG_LINES}")));
        }
        let client = self.client_for(input.job_id).await?;
        let mut bytes = Vec::new();
        let mut complete = false;
        while (bytes.len() as u64) < MAX_LOG_SCAN {
            let request = LogRequest {
                job_id: input.job_id,
                offset: bytes.len() as u64,
                limit: Some(1024 * 1024),
                stream,
            };
            let page = client
                .job_log(request)
                .await
                .map_err(|e| invalid(e.to_string()))?;
            bytes.extend_from_slice(&page.data);
            if page.data.is_empty() || page.complete {
                complete = page.complete;
                break;
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let filter = input.filter.as_deref().unwrap_or("");
        let lines: Vec<&str> = text.lines().filter(|line| line.contains(filter)).collect();
        let offset = input.offset.unwrap_or(0);
        Ok(answer::log_page(input.job_id, &lines, offset, limit, complete).into_result())
    }

    #[tool(
        description = "Cancel a queued or running job by id; its processes on the agent are killed.",
        output_schema = schema_for_output::<CancelAnswer>()
    )]
    async fn cancel_job(
        &self,
        Parameters(input): Parameters<CancelInput>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client_for(input.job_id).await?;
        let reply = client
            .cancel(input.job_id)
            .await
            .map_err(|e| invalid(e.to_string()))?;
        let state = match reply {
            CancelReply::Cancelling => CancelState::Cancelling,
            CancelReply::AlreadyFinished => CancelState::Finished,
        };
        Ok(CancelAnswer {
            job_id: input.job_id,
            cancelled: state == CancelState::Cancelling,
            state,
        }
        .into_result())
    }
}

impl BuildPoolMcp {
    /// The client of whichever coordinator ran `job_id` in this session (the repository's
    /// coordinator for jobs this session does not know).
    async fn client_for(&self, job_id: JobId) -> Result<Client, ErrorData> {
        let in_process = self
            .inner
            .submitted_via
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&job_id)
            .is_some_and(|via| matches!(via, Via::InProcess(_)));
        let route = self
            .inner
            .jobs
            .route(in_process)
            .await
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        if !in_process && matches!(route.via, Via::InProcess(_)) {
            return Err(invalid(format!(
                "no coordinator is reachable and job {job_id} did not run in this session"
            )));
        }
        Ok(route.client)
    }

    async fn run_job(
        &self,
        spec: JobSpec,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let kind = spec.kind;
        let ct = context.ct;
        let mut notifier = Progress::new(&context.meta, context.peer);
        let mut session = match self.inner.jobs.start(spec, false).await {
            Ok(session) => session,
            Err(StartError::InvalidSpec(error)) => return Err(invalid(error.to_string())),
            Err(error) => {
                return Ok(JobAnswer::no_result(kind, None, &error.to_string()).into_result());
            }
        };
        let mut report = ReportBuilder::new();
        let mut cancel_deadline: Option<tokio::time::Instant> = None;
        let mut last_progress = report.progress();
        loop {
            let event = tokio::select! {
                event = session.next_event() => event,
                () = ct.cancelled(), if cancel_deadline.is_none() => {
                    cancel_deadline = Some(tokio::time::Instant::now() + CANCEL_WAIT);
                    session.cancel();
                    continue;
                }
                () = sleep_until(cancel_deadline) => {
                    let job = session.job_id().map_or_else(|| "the job".to_owned(), |id| format!("job {id}"));
                    let reason = format!("{job} was cancelled; the agent did not confirm within {CANCEL_WAIT:?}");
                    return Ok(JobAnswer::no_result(kind, session.job_id(), &reason).into_result());
                }
            };
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    let reason = error.to_string();
                    return Ok(JobAnswer::no_result(kind, session.job_id(), &reason).into_result());
                }
            };
            let job_id = self.remember(&session);
            match event {
                JobEvent::Queued { reason, .. } => {
                    let reason = if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    };
                    notifier
                        .send(format!("job {job_id} queued{reason}"), false)
                        .await;
                }
                JobEvent::Assigned {
                    agent_id,
                    attempt,
                    local,
                } => {
                    let place = if local {
                        "the local agent".to_owned()
                    } else {
                        agent_id
                    };
                    notifier
                        .send(
                            format!("job {job_id} assigned to {place} (attempt {attempt})"),
                            false,
                        )
                        .await;
                }
                JobEvent::Output { stream, data, .. } => {
                    report.feed(stream, &data);
                    let progress = report.progress();
                    if progress.testing && !last_progress.testing {
                        notifier.send(format!("job {job_id} testing"), false).await;
                    } else if progress.crates_compiled != last_progress.crates_compiled {
                        // The first crate marks the compiling phase; later counts are throttled.
                        let throttle = last_progress.crates_compiled > 0;
                        notifier
                            .send(
                                format!(
                                    "job {job_id} compiling: {} crates built, {} fresh",
                                    progress.crates_compiled, progress.crates_fresh
                                ),
                                throttle,
                            )
                            .await;
                    }
                    last_progress = progress;
                }
                JobEvent::Finished(result) => {
                    let placement = match (session.via(), result.local) {
                        (Via::InProcess(reason), _) => Placement::Unreachable(reason.clone()),
                        (Via::Coordinator | Via::Started(_), true) => Placement::LocalFallback,
                        (Via::Coordinator | Via::Started(_), false) => {
                            Placement::Agent(result.agent_id.clone())
                        }
                    };
                    return Ok(ToolAnswer {
                        kind,
                        job_id,
                        placement,
                        timings: session.timings(&result),
                        result,
                        report: report.finish(),
                        snapshot_note: session.snapshot_note().map(str::to_owned),
                        coordinator_note: match session.via() {
                            Via::Started(note) => Some(note.clone()),
                            _ => None,
                        },
                    }
                    .answer()
                    .into_result());
                }
            }
        }
    }

    /// A `test` spread over agents, answered as one job: the test build's job id, every
    /// part's counts and failures together, and each part's job and agent in `parts`.
    async fn run_spread(
        &self,
        test: JobSpec,
        spread: Spread,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let jobs = &self.inner.jobs;
        let slices = match spread.slices(jobs, false).await {
            Ok(slices) => slices,
            Err(error) => {
                return Ok(
                    JobAnswer::no_result(JobKind::Test, None, &error.to_string()).into_result(),
                );
            }
        };
        if slices == 1 {
            return self.run_job(test, context).await;
        }
        let started = Instant::now();
        let mut notifier = Progress::new(&context.meta, context.peer.clone());
        let (notes, mut noted) = tokio::sync::mpsc::unbounded_channel();
        let mut observer = Noted(notes);
        let cancel = tokio_util::sync::CancellationToken::new();
        let outcome = {
            let running =
                crate::spread::run(jobs, &test, slices, false, &mut observer, cancel.clone());
            tokio::pin!(running);
            loop {
                tokio::select! {
                    outcome = &mut running => break outcome,
                    Some(note) = noted.recv() => notifier.send(note, false).await,
                    () = context.ct.cancelled(), if !cancel.is_cancelled() => cancel.cancel(),
                }
            }
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(StartError::InvalidSpec(error)) => return Err(invalid(error.to_string())),
            Err(error) => {
                return Ok(
                    JobAnswer::no_result(JobKind::Test, None, &error.to_string()).into_result(),
                );
            }
        };
        if let Some(agent) = outcome.missing_nextest {
            notifier
                .send(
                    format!("{agent} has no cargo-nextest: running cargo test on one agent"),
                    false,
                )
                .await;
            return self.run_job(test, context).await;
        }
        Ok(spread_answer(&outcome, started.elapsed()).into_result())
    }

    /// Records where the session's job was submitted, once its id is known; returns the id.
    fn remember(&self, session: &JobSession) -> JobId {
        let job_id = session.job_id().unwrap_or_default();
        self.inner
            .submitted_via
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(job_id)
            .or_insert_with(|| session.via().clone());
        job_id
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[tool_handler]
impl ServerHandler for BuildPoolMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("buildpool", env!("CARGO_PKG_VERSION")))
            .with_instructions(
            "Build, test and lint this worktree on the buildpool build hosts. Each tool snapshots the \
             worktree as it is now (uncommitted and untracked files included) and answers with exact \
             diagnostics and test failures; use job_log for full output.",
        )
    }
}

/// A spread run's notes, for its progress notifications; its parts' lines stay in their
/// job logs.
struct Noted(tokio::sync::mpsc::UnboundedSender<String>);

impl Observer for Noted {
    fn note(&mut self, text: &str) {
        let _ = self.0.send(text.to_owned());
    }

    fn lines(&mut self, _agent: &str, _stream: OutputStream, _lines: &[u8]) {}
}

/// The answer to a spread run: one job's answer over all its parts.
fn spread_answer(outcome: &SpreadOutcome, elapsed: Duration) -> JobAnswer {
    let mut agents: Vec<&str> = outcome
        .parts
        .iter()
        .map(|part| part.agent.as_str())
        .collect();
    agents.sort_unstable();
    agents.dedup();
    let ran_on = agents.join(", ");
    let build_job = outcome
        .parts
        .iter()
        .find(|part| part.part == Part::Archive)
        .and_then(|part| part.job_id);
    let result = buildpool_core::JobResult {
        completion: buildpool_core::Completion {
            end: buildpool_core::JobEnd::Exited {
                code: i32::from(outcome.exit_code()),
            },
            duration: elapsed,
            env: None,
            phases: buildpool_core::AgentPhases::default(),
        },
        agent_id: ran_on.clone(),
        attempt: 1,
        local: false,
        queue_time: Duration::ZERO,
    };
    let mut answer = ToolAnswer {
        kind: JobKind::Test,
        job_id: build_job.unwrap_or_default(),
        placement: Placement::Agent(ran_on),
        result,
        report: outcome.tally.report(),
        snapshot_note: None,
        coordinator_note: None,
        timings: Timings {
            total: elapsed,
            ..Timings::default()
        },
    }
    .answer();
    if outcome.tally.cancelled() {
        answer.outcome = answer::Outcome::Cancelled;
    }
    answer.parts = outcome
        .parts
        .iter()
        .map(|part| PartItem {
            part: part.part.to_string(),
            job_id: part.job_id,
            ran_on: part.agent.clone(),
        })
        .collect();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of the refusal of `args`, which must be one.
    fn refusal(args: Result<Vec<String>, ErrorData>) -> String {
        args.expect_err("refused").message.into_owned()
    }

    #[test]
    fn names_that_would_read_as_cargo_options_are_refused() {
        let package = || Some("--frozen".to_owned());
        let feature = || Some(vec!["serde".to_owned(), "-Zunstable-options".to_owned()]);
        let expected_package =
            "package \"--frozen\" is not a valid name: it must not start with '-'";
        let expected_feature =
            "feature \"-Zunstable-options\" is not a valid name: it must not start with '-'";
        let build = BuildInput {
            package: package(),
            ..BuildInput::default()
        };
        assert_eq!(refusal(build.cargo_args()), expected_package);
        let test = TestInput {
            package: package(),
            ..TestInput::default()
        };
        assert_eq!(refusal(test_args(&test)), expected_package);
        let clippy = ClippyInput {
            features: feature(),
            ..ClippyInput::default()
        };
        assert_eq!(refusal(clippy_args(&clippy)), expected_feature);
        let test = TestInput {
            features: Some(vec!["-".to_owned()]),
            ..TestInput::default()
        };
        assert_eq!(
            refusal(test_args(&test)),
            "feature \"-\" is not a valid name: it must not start with '-'"
        );
        // `fmt` checks its package the same way.
        assert!(check_name("package", "-p", "@.+").is_err());

        // Names with a dash inside are names.
        let fine = TestInput {
            package: Some("my-crate@1.0.0".to_owned()),
            features: Some(vec!["dep/some-feature".to_owned()]),
            ..TestInput::default()
        };
        let args = test_args(&fine).expect("valid");
        assert!(args.contains(&"my-crate@1.0.0".to_owned()), "{args:?}");
        assert!(args.contains(&"dep/some-feature".to_owned()), "{args:?}");
    }

    #[test]
    fn a_filter_that_would_read_as_an_option_is_refused() {
        let test = TestInput {
            filter: Some("--exact".to_owned()),
            ..TestInput::default()
        };
        assert_eq!(
            refusal(test_args(&test)),
            "filter must be a test name substring (no leading '-', at most 512 bytes)"
        );
    }
}
