//! The `buildpool` command line. Errors become one clear message and a non-zero exit.

mod artifacts;
mod demo;
mod hook;
mod inspect;
mod run;
mod serve;
mod shim;
mod spread;
mod token;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Distributed cargo builds for the worktrees of one repository.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
pub struct Cli {
    /// Run as if started in this directory.
    #[arg(short = 'C', long = "dir", global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the clap derive"
)]
enum Command {
    #[command(flatten)]
    InRuntime(RuntimeCommand),
    /// Claude Code's hook: every cargo of a session decides through the cargo shim.
    Hook(hook::HookArgs),
    /// A `cargo` shim for other agents: the same commands go to the pool, the rest to cargo.
    Shim(shim::ShimArgs),
}

/// The commands that run in an async runtime. The others do without one, so the hook
/// answers in milliseconds.
#[derive(Debug, Subcommand)]
enum RuntimeCommand {
    /// Start the coordinator for the repository of the current directory.
    Serve(serve::ServeArgs),
    /// Run a cargo job on the pool against this worktree's current state, streaming output.
    Run(run::RunArgs),
    /// Show agents, queued and running jobs.
    Status(inspect::StatusArgs),
    /// Print a job's log (running or finished).
    Logs(inspect::LogsArgs),
    /// Cancel a queued or running job.
    Cancel(inspect::CancelArgs),
    /// List agents, or drain one: it stops taking jobs, finishes its running ones and exits.
    Agents(inspect::AgentsArgs),
    /// `cargo test` on an embedded sample workspace, in two worktrees, through a coordinator
    /// and a build agent process over TLS on loopback.
    Demo(demo::DemoArgs),
    /// Create, list or revoke credentials for agents and clients.
    Token(token::TokenArgs),
    /// Print the URL of the running coordinator's live dashboard.
    Ui,
    /// Serve MCP on stdin/stdout: build, test, clippy, check, worker_status, job_log, cancel_job.
    Mcp,
}

/// Parses the command line, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    // `buildpool` carries the build agent: started through a link named `build-agent` (as
    // `buildpool demo` starts its agent), or by git as the agent's proxy command.
    if build_agent::cli::invoked_by_name() {
        return match build_agent::cli::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("Error: {error:?}");
                ExitCode::from(1)
            }
        };
    }
    if shim::started_as_cargo() {
        return shim::run_as_cargo();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::InRuntime(command) => run_in_runtime(cli.dir, command),
        Command::Hook(args) => report(current_dir(cli.dir).and_then(|dir| hook::hook(&dir, args))),
        Command::Shim(args) => report(shim::shim(args)),
    }
}

fn run_in_runtime(dir: Option<PathBuf>, command: RuntimeCommand) -> ExitCode {
    buildpool_proto::tls::install_default_provider();
    let default_level = match command {
        RuntimeCommand::Serve(_) => "info",
        _ => "warn",
    };
    buildpool_service::systemd::init_logging(default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("buildpool: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let dir = current_dir(dir)?;
        match command {
            RuntimeCommand::Serve(args) => serve::serve(&dir, args).await,
            RuntimeCommand::Run(args) => run::run(&dir, args).await,
            RuntimeCommand::Status(args) => inspect::status(&dir, args).await,
            RuntimeCommand::Logs(args) => inspect::logs(&dir, args).await,
            RuntimeCommand::Cancel(args) => inspect::cancel(&dir, args).await,
            RuntimeCommand::Agents(args) => inspect::agents(&dir, args).await,
            RuntimeCommand::Demo(args) => demo::demo(args).await,
            RuntimeCommand::Token(args) => token::token(args),
            RuntimeCommand::Ui => ui::ui(&dir).await,
            RuntimeCommand::Mcp => crate::mcp::serve(&dir).await.map(|()| ExitCode::SUCCESS),
        }
    });
    // Background tasks (an in-process coordinator's) must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    report(result)
}

/// `-C DIR`, or the current directory.
fn current_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(dir) => Ok(dir),
        None => Ok(std::env::current_dir()?),
    }
}

/// The exit code of a command's outcome; an error is one clear message.
fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("buildpool: {error:#}");
            ExitCode::from(1)
        }
    }
}
