//! Signal a container's init, an exec, or every process of the container.

use std::sync::Arc;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{AgentError, Result};
use crate::state::Agent;

pub fn signal(agent: &Arc<Agent>, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
    let c = agent.get(id)?;
    let signal = Signal::try_from(sig as i32)
        .map_err(|_| AgentError::InvalidArgument(format!("invalid signal {sig}")))?;
    if all {
        if signal == Signal::SIGKILL {
            let _ = agent.cgroups.write(c.cgroup.rel(), "cgroup.kill", "1");
        }
        for pid in c.cgroup.pids(agent.cgroups.as_ref()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
        return Ok(());
    }
    let p = c.process(exec_id)?;
    if p.exit_info().is_some() {
        return Err(AgentError::FailedPrecondition(format!(
            "process {exec_id:?} of container {id:?} has already exited"
        )));
    }
    kill(Pid::from_raw(p.pid), signal)
        .map_err(|e| AgentError::internal(format!("signal {signal} to container {id:?}"), e))
}
