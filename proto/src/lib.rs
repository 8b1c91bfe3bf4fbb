//! The wire protocol of buildpool, and the edge where domain types meet it.
//!
//! Only this crate knows protobuf and WebSocket framing. It holds the generated messages for
//! the agent job bus and the gRPC control API, their conversions to and from the domain
//! types of `buildpool-core` ([`convert`]), the framing rules of the bus ([`frame`]), the
//! one framed socket both ends of the bus use ([`socket`]), the git tunnel on the bus port
//! ([`tunnel`]), the WebSocket connections beneath both ([`websocket`]) and TLS with its
//! certificates and pins ([`tls`]).

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

pub mod convert;
pub mod frame;
pub mod socket;
pub mod tls;
pub mod tunnel;
pub mod websocket;

pub use generated::*;
