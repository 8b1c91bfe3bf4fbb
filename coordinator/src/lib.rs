//! buildpool on the workstation: the coordinator (`buildpool serve`), its clients
//! (`buildpool run`, `status`, `logs`, `cancel`) and the pieces they share.
//!
//! Only [`buildpool_proto`] knows protobuf; [`server::scheduler`] knows no I/O; the executor
//! that runs jobs lives in `build_agent` and is shared with the embedded local agent.

pub mod atomic_file;
pub mod auth;
pub mod background;
pub mod cli;
pub mod client;
pub mod config;
pub mod discovery;
pub mod lines;
pub mod mcp;
pub mod metrics;
pub mod offload;
pub mod progress;
pub mod repo;
pub mod report;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod spread;
