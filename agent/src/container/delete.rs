//! Remove: kill whatever still runs, release every process's stdio, wait
//! for the init, drop the cgroup. The container's mounts live in its own
//! mount namespace and vanish with its last process.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{AgentError, Result};
use crate::state::Agent;

/// Runs as a task of its own: ttrpc drops the handler's future when the
/// caller's deadline passes, and a removal must not stop half-way.
pub async fn remove(agent: &Arc<Agent>, id: &str) -> Result<()> {
    let (a, id2) = (agent.clone(), id.to_string());
    tokio::spawn(async move { remove_now(&a, &id2).await })
        .await
        .map_err(|e| AgentError::internal(format!("remove container {id:?}"), e))?
}

async fn remove_now(agent: &Arc<Agent>, id: &str) -> Result<()> {
    let c = agent.get(id)?;
    // From here on an exec is refused (FailedPrecondition), also one that
    // is being launched right now.
    c.begin_remove();
    c.init.abandon();
    if c.init.exit_info().is_none() {
        let _ = agent.cgroups.write(c.cgroup.rel(), "cgroup.kill", "1");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.init.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // Nobody reads this container's output again: free the buffers, end
    // the reader threads (closing their pipes), close stdin and ptys, for
    // the init and every exec.
    c.release_all();
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
