//! The wire protocol of buildpool.
//!
//! Only this crate knows protobuf. It holds the generated messages for the agent job bus and
//! the gRPC control API, the framing rules of the bus ([`frame`]) and the validation every
//! job spec passes before anything acts on it ([`spec`]).

#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/buildpool.v1.rs"));
}

pub mod frame;
pub mod spec;

pub use generated::*;

/// Version of the agent job bus. Bumped on any incompatible change; the coordinator rejects
/// agents speaking another version with a clear message instead of misreading their frames.
pub const PROTOCOL_VERSION: u32 = 1;

impl JobKind {
    /// The cargo subcommand this kind runs.
    pub fn cargo_subcommand(self) -> Option<&'static str> {
        match self {
            JobKind::Unspecified => None,
            JobKind::Build => Some("build"),
            JobKind::Test => Some("test"),
            JobKind::Clippy => Some("clippy"),
            JobKind::Check => Some("check"),
        }
    }

    /// Parses a cargo subcommand name as typed on the command line.
    pub fn from_subcommand(name: &str) -> Option<Self> {
        match name {
            "build" | "b" => Some(JobKind::Build),
            "test" | "t" => Some(JobKind::Test),
            "clippy" => Some(JobKind::Clippy),
            "check" | "c" => Some(JobKind::Check),
            _ => None,
        }
    }
}
