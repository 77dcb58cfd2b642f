//! Update a container's cgroup limits from an OCI `LinuxResources` (the
//! same translation as create, see `spec/resources.rs`).

use std::sync::Arc;

use oci_spec::runtime::LinuxResources;

use super::cgroup::leaf_controllers;
use super::spec;
use crate::error::{AgentError, Result};
use crate::state::Agent;

/// Parse and translate the request's resources (no container touched).
pub fn plan(id: &str, resources_json: &[u8]) -> Result<(LinuxResources, Vec<(String, String)>)> {
    let bad =
        |e: &dyn std::fmt::Display| AgentError::InvalidArgument(format!("container {id:?}: {e}"));
    if resources_json.is_empty() {
        return Err(bad(&"update without resources"));
    }
    let r: LinuxResources = serde_json::from_slice(resources_json)
        .map_err(|e| bad(&format!("invalid OCI LinuxResources JSON: {e}")))?;
    let writes = spec::cgroup_writes(&r).map_err(|e| bad(&e))?;
    Ok((r, writes))
}

/// Blocking (lowering memory.max reclaims first): run on a blocking thread.
pub fn update(agent: &Arc<Agent>, id: &str, resources_json: &[u8]) -> Result<()> {
    let (r, writes) = plan(id, resources_json)?;
    let bad =
        |e: &dyn std::fmt::Display| AgentError::InvalidArgument(format!("container {id:?}: {e}"));
    let devices = spec::device_rules(&r).map_err(|e| bad(&e))?;
    let c = agent.get(id)?;
    let fs = agent.cgroups.as_ref();
    if let Some(available) = leaf_controllers(fs) {
        spec::check_controllers(&r, &available).map_err(|e| bad(&e))?;
    }
    // Validated above: what fails from here on is the kernel's answer,
    // mapped by errno.
    let what = format!("container {id:?}");
    c.cgroup.apply(fs, &writes).map_err(|e| e.to_agent(&what))?;
    if let Some(rules) = devices {
        c.cgroup
            .set_devices(fs, &rules)
            .map_err(|e| e.to_agent(&what))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_uses_the_create_translation() {
        let (_, w) = plan(
            "c",
            br#"{"memory":{"limit":-1},"cpu":{"quota":20000,"cpus":"0"},"pids":{"limit":5},
                 "unified":{"memory.high":"1000000"}}"#,
        )
        .unwrap();
        assert_eq!(
            w,
            vec![
                ("memory.max".to_string(), "max".to_string()),
                ("cpu.max".into(), "20000".into()),
                ("cpuset.cpus".into(), "0".into()),
                ("pids.max".into(), "5".into()),
                ("memory.high".into(), "1000000".into()),
            ]
        );
        // Omitted fields are left alone.
        assert!(plan("c", b"{}").unwrap().1.is_empty());
        for bad in [
            &b""[..],
            b"{not json",
            br#"{"unified":{"cgroup.procs":"1"}}"#,
        ] {
            let e = plan("c", bad).unwrap_err();
            assert!(matches!(e, AgentError::InvalidArgument(_)), "{e}");
        }
    }
}
