//! The buildpool build agent.
//!
//! Connects to one or more coordinators, shares one slot pool among them, fetches each job's
//! exact snapshot through a per-repository git cache and runs cargo in a warm workspace.
//! The [`executor`] is also the coordinator's embedded local agent, so both run jobs the
//! same way.

pub mod agent;
pub mod backoff;
pub mod config;
pub mod connection;
pub mod executor;
pub mod git;
pub mod git_cache;
pub mod nix;
pub mod process;
pub mod slots;
pub mod workspace;

pub use agent::{Agent, AgentIdentity, ServerEndpoint};
