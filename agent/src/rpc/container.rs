//! Container RPCs.

use std::sync::Arc;

use vmpod_proto::agent::*;

use crate::container::{create, delete, start, stats, update};
use crate::error::{AgentError, Result};
use crate::state::Agent;

pub async fn create(
    agent: &Arc<Agent>,
    req: CreateContainerRequest,
) -> Result<CreateContainerResponse> {
    let pid = create::create(
        agent,
        create::CreateRequest {
            id: req.container_id,
            spec_json: req.oci_spec_json,
            rootfs: req.rootfs,
            username: Some(req.username).filter(|u| !u.is_empty()),
            stdin: req.stdin,
        },
    )
    .await?;
    Ok(CreateContainerResponse {
        pid,
        ..Default::default()
    })
}

pub async fn start(
    agent: &Arc<Agent>,
    req: StartContainerRequest,
) -> Result<StartContainerResponse> {
    start::start(agent, &req.container_id).await?;
    Ok(StartContainerResponse::default())
}

pub async fn remove(
    agent: &Arc<Agent>,
    req: RemoveContainerRequest,
) -> Result<RemoveContainerResponse> {
    delete::remove(agent, &req.container_id).await?;
    Ok(RemoveContainerResponse::default())
}

pub async fn update(
    agent: &Arc<Agent>,
    req: UpdateContainerRequest,
) -> Result<UpdateContainerResponse> {
    let a = agent.clone();
    // Lowering memory.max makes the write reclaim memory first: blocking.
    tokio::task::spawn_blocking(move || update::update(&a, &req.container_id, &req.resources_json))
        .await
        .map_err(|e| AgentError::internal("update task", e))??;
    Ok(UpdateContainerResponse::default())
}

pub fn stats_to_proto(s: &stats::Stats) -> StatsContainerResponse {
    StatsContainerResponse {
        cpu: Some(CpuStats {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_throttled: s.nr_throttled,
            throttled_usec: s.throttled_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStats {
            current_bytes: s.memory_current,
            limit_bytes: s.memory_limit,
            anon_bytes: s.memory_anon,
            file_bytes: s.memory_file,
            oom_events: s.oom,
            oom_kill_events: s.oom_kill,
            ..Default::default()
        })
        .into(),
        pids: Some(PidsStats {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        })
        .into(),
        timestamp_unix_nanos: crate::container::process::now_nanos(),
        ..Default::default()
    }
}

pub async fn stats(
    agent: &Arc<Agent>,
    req: StatsContainerRequest,
) -> Result<StatsContainerResponse> {
    let s = stats::stats(agent, &req.container_id)?;
    Ok(stats_to_proto(&s))
}

pub async fn list(
    agent: &Arc<Agent>,
    _req: ListContainersRequest,
) -> Result<ListContainersResponse> {
    Ok(ListContainersResponse {
        containers: agent
            .list()
            .iter()
            .map(|c| ContainerInfo {
                container_id: c.id.clone(),
                status: c.status().as_str().into(),
                pid: c.init.pid as u32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_mapping() {
        let s = stats::Stats {
            cpu_usage_usec: 5,
            memory_current: 10,
            oom_kill: 1,
            pids_limit: 9,
            ..Default::default()
        };
        let p = stats_to_proto(&s);
        assert_eq!(p.cpu.usage_usec, 5);
        assert_eq!(p.memory.current_bytes, 10);
        assert_eq!(p.memory.oom_kill_events, 1);
        assert_eq!(p.pids.limit, 9);
        // round trip through the wire format
        use protobuf::Message;
        let bytes = p.write_to_bytes().unwrap();
        let back = StatsContainerResponse::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back.memory.oom_kill_events, 1);
    }
}
