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

    /// The OCI `linux.resources` that [`UpdateContainerRequest`] carries
    /// (as JSON in `resources_json`): one definition for create and update.
    pub use oci_spec::runtime::LinuxResources;

    impl UpdateContainerRequest {
        /// A request to apply `resources` to container `id`.
        pub fn new_for(id: &str, resources: &LinuxResources) -> serde_json::Result<Self> {
            Ok(UpdateContainerRequest {
                container_id: id.into(),
                resources_json: serde_json::to_vec(resources)?,
                ..Default::default()
            })
        }
    }
}
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Protocol revision reported by `Health.Version` (2: UpdateContainer
/// carries OCI `LinuxResources` JSON).
pub const PROTOCOL_VERSION: u32 = 2;

pub use protobuf;
pub use ttrpc;

#[cfg(test)]
mod tests {
    use super::agent::{LinuxResources, UpdateContainerRequest};

    #[test]
    fn update_request_carries_oci_resources() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":1048576},"cpu":{"cpus":"0"},"unified":{"memory.high":"1"}}"#,
        )
        .unwrap();
        let req = UpdateContainerRequest::new_for("c1", &r).unwrap();
        assert_eq!(req.container_id, "c1");
        let back: LinuxResources = serde_json::from_slice(&req.resources_json).unwrap();
        assert_eq!(back, r);
        // and over the wire
        use protobuf::Message;
        let bytes = req.write_to_bytes().unwrap();
        let req2 = UpdateContainerRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(req2.resources_json, req.resources_json);
    }
}
