//! vmpod-proto: the guest agent ttrpc protocol, generated once for host and
//! guest from `protos/*.proto` (rust-protobuf messages, async ttrpc client
//! and server traits).
//!
//! - [`health`] / [`health_ttrpc`]: liveness and version.
//! - [`agent`] / [`agent_ttrpc`]: sandbox, containers, processes, stdio.

#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/health.rs"));
}
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod health_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/health_ttrpc.rs"));
}
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Protocol revision reported by `Health.Version`.
pub const PROTOCOL_VERSION: u32 = 1;

pub use protobuf;
pub use ttrpc;
