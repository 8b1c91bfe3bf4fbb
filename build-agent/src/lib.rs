//! The buildpool build agent.
//!
//! Connects to one or more coordinators, shares one slot pool among them, fetches each job's
//! exact snapshot through a per-repository git cache and runs cargo in a warm workspace.
//! The [`executor`] is also the coordinator's embedded local agent, so both run jobs the
//! same way.
//!
//! Layers, each depending only on those below it: [`connection`] (the job bus transport)
//! calls into [`agent`] (the runtime), which carries out the decisions of the pure
//! [`job_table`] and runs jobs through the [`executor`] ([`git_cache`], [`workspace`],
//! [`nix`], [`sandbox`], [`process`]); [`output`] is the output policy of a running job. [`git_proxy`]
//! is the command git runs to fetch through a coordinator's authenticated tunnel; [`cli`] is
//! the `build-agent` command line, which `buildpool` also runs when started by that name.

pub mod agent;
pub mod archives;
pub mod artifacts;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod connection;
pub mod disk;
pub mod executor;
pub mod git_cache;
pub mod git_proxy;
pub mod identity;
pub mod job_table;
pub mod metrics;
pub mod nix;
pub mod output;
pub mod process;
pub mod sandbox;
pub mod shared_cache;
pub mod workspace;

pub use agent::{Agent, AgentIdentity};
pub use connection::{GitLocator, JobSources, ServerEndpoint};
