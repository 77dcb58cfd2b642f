//! Health and version.

use async_trait::async_trait;
use ttrpc::r#async::TtrpcContext;
use vmpod_proto::health::{check_response::ServingStatus, *};
use vmpod_proto::health_ttrpc;

pub struct HealthService;

pub fn version() -> VersionResponse {
    VersionResponse {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        protocol_version: vmpod_proto::PROTOCOL_VERSION,
        ..Default::default()
    }
}

#[async_trait]
impl health_ttrpc::Health for HealthService {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        Ok(version())
    }
}
