//! Update a container's cgroup limits.

use std::sync::Arc;

use crate::error::{AgentError, Result};
use crate::state::Agent;

/// Limits as in the protocol's `LinuxResources` (0 = unchanged, -1 = max).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Resources {
    pub memory_limit_bytes: i64,
    pub cpu_quota: i64,
    pub cpu_period: u64,
    pub cpu_weight: u64,
    pub pids_limit: i64,
}

fn lim(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

pub fn writes(r: &Resources) -> Result<Vec<(String, String)>> {
    let mut w = Vec::new();
    if r.memory_limit_bytes != 0 {
        w.push(("memory.max".to_string(), lim(r.memory_limit_bytes)));
    }
    if r.cpu_quota != 0 || r.cpu_period != 0 {
        let period = if r.cpu_period == 0 {
            100_000
        } else {
            r.cpu_period
        };
        let quota = if r.cpu_quota <= 0 {
            "max".to_string()
        } else {
            r.cpu_quota.to_string()
        };
        w.push(("cpu.max".into(), format!("{quota} {period}")));
    }
    if r.cpu_weight != 0 {
        if !(1..=10_000).contains(&r.cpu_weight) {
            return Err(AgentError::InvalidArgument(format!(
                "cpu weight {} not in 1..10000",
                r.cpu_weight
            )));
        }
        w.push(("cpu.weight".into(), r.cpu_weight.to_string()));
    }
    if r.pids_limit != 0 {
        w.push(("pids.max".into(), lim(r.pids_limit)));
    }
    Ok(w)
}

pub fn update(agent: &Arc<Agent>, id: &str, r: &Resources) -> Result<()> {
    let c = agent.get(id)?;
    let w = writes(r)?;
    c.cgroup
        .apply(agent.cgroups.as_ref(), &w)
        .map_err(|e| AgentError::InvalidArgument(format!("container {id:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_writes() {
        let w = writes(&Resources {
            memory_limit_bytes: -1,
            cpu_quota: 20_000,
            pids_limit: 5,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            w,
            vec![
                ("memory.max".to_string(), "max".to_string()),
                ("cpu.max".into(), "20000 100000".into()),
                ("pids.max".into(), "5".into())
            ]
        );
        assert!(writes(&Resources::default()).unwrap().is_empty());
        assert!(writes(&Resources {
            cpu_weight: 20_000,
            ..Default::default()
        })
        .is_err());
    }
}
