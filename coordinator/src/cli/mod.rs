//! The `buildpool` command line. Errors become one clear message and a non-zero exit.

mod demo;
mod inspect;
mod run;
mod serve;
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
enum Command {
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
    /// Run `cargo test` on an embedded sample workspace through the whole pipeline.
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
    buildpool_proto::tls::install_default_provider();
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    build_agent::systemd::init_logging(default_level);
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
        let dir = match cli.dir {
            Some(dir) => dir,
            None => std::env::current_dir()?,
        };
        match cli.command {
            Command::Serve(args) => serve::serve(&dir, args).await,
            Command::Run(args) => run::run(&dir, args).await,
            Command::Status(args) => inspect::status(&dir, args).await,
            Command::Logs(args) => inspect::logs(&dir, args).await,
            Command::Cancel(args) => inspect::cancel(&dir, args).await,
            Command::Agents(args) => inspect::agents(&dir, args).await,
            Command::Demo(args) => demo::demo(args).await,
            Command::Token(args) => token::token(args),
            Command::Ui => ui::ui(&dir).await,
            Command::Mcp => crate::mcp::serve(&dir).await.map(|()| ExitCode::SUCCESS),
        }
    });
    // Background tasks (an in-process coordinator's) must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("buildpool: {error:#}");
            ExitCode::from(1)
        }
    }
}
