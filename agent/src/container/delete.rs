//! Remove: kill whatever still runs, wait for the init, drop the cgroup.
//! The container's mounts live in its own mount namespace and vanish with
//! its last process.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{AgentError, Result};
use crate::state::Agent;

pub async fn remove(agent: &Arc<Agent>, id: &str) -> Result<()> {
    let c = agent.get(id)?;
    c.init.abandon();
    if c.init.exit_info().is_none() {
        let _ = agent.cgroups.write(c.cgroup.rel(), "cgroup.kill", "1");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.init.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    tokio::time::timeout(Duration::from_secs(10), c.init.wait())
        .await
        .map_err(|_| {
            AgentError::DeadlineExceeded(format!("container {id:?} did not exit after SIGKILL"))
        })?;
    let a = agent.clone();
    let cg = c.cgroup.clone();
    tokio::task::spawn_blocking(move || cg.destroy(a.cgroups.as_ref()))
        .await
        .map_err(|e| AgentError::internal("remove task", e))?
        .map_err(|e| AgentError::internal(format!("container {id:?}"), e))?;
    agent.remove(id);
    tracing::info!(container = %id, "container removed");
    Ok(())
}
