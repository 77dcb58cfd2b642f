//! Signal a container's init, an exec, or all of their processes.
//!
//! - init (`exec_id` empty), one process: the container must be running
//!   (a created container's process is still the agent's set-up, a
//!   stopped one has none).
//! - init with `all`: every process in the container's cgroup
//!   (`cgroup.kill` for SIGKILL), whatever the container's state: a
//!   stopped init may leave children behind in a pod's shared PID
//!   namespace (containerd kills them with `kill --all`), and a created
//!   container is killed so when its pod goes away during start (its
//!   staged init dies too, and its wait reports the signal).
//! - an exec: it must not have exited; `all` reaches its process group
//!   (stage 2 makes each process a session and group leader, so that is
//!   the exec and the children it did not move elsewhere).
//!
//! Every failure is reported: an unknown exec is `NOT_FOUND`, a process
//! that is not running `FAILED_PRECONDITION`, anything else `INTERNAL`.

use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::Status;
use crate::error::{AgentError, Result};
use crate::state::Agent;

pub fn signal(agent: &Arc<Agent>, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
    let c = agent.get(id)?;
    let signal = i32::try_from(sig)
        .ok()
        .and_then(|s| Signal::try_from(s).ok())
        .ok_or_else(|| AgentError::InvalidArgument(format!("invalid signal {sig}")))?;
    let p = c.process(exec_id)?;
    let what = if exec_id.is_empty() {
        format!("container {id:?}")
    } else {
        format!("exec {exec_id:?} of container {id:?}")
    };
    let gone = || AgentError::FailedPrecondition(format!("{what} is not running"));
    if exec_id.is_empty() && !all {
        let status = c.status();
        if status != Status::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "{what} is {}, not running",
                status.as_str()
            )));
        }
    } else if !exec_id.is_empty() && p.exit_info().is_some() {
        return Err(AgentError::FailedPrecondition(format!(
            "{what} has already exited"
        )));
    }
    let failed = |e: Errno| match e {
        Errno::ESRCH => gone(),
        e => AgentError::internal(format!("signal {signal} to {what}"), e),
    };
    if !all {
        return kill(Pid::from_raw(p.pid), signal).map_err(failed);
    }
    if !exec_id.is_empty() {
        return killpg(Pid::from_raw(p.pid), signal).map_err(failed);
    }
    let fs = agent.cgroups.as_ref();
    if signal == Signal::SIGKILL {
        return fs
            .write(c.cgroup.rel(), "cgroup.kill", "1")
            .map_err(|e| AgentError::internal(format!("cgroup.kill of {what}"), e));
    }
    let pids = c
        .cgroup
        .try_pids(fs)
        .map_err(|e| AgentError::internal(format!("processes of {what}"), e))?;
    let mut first_error = None;
    for pid in pids {
        match kill(Pid::from_raw(pid), signal) {
            // Exited since the list was read.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                first_error.get_or_insert(AgentError::internal(
                    format!("signal {signal} to process {pid} of {what}"),
                    e,
                ));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
