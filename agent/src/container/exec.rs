//! Exec: a new process in a running container's namespaces and cgroup.
//! An exec stays in the container's table while it runs and after it
//! exits, until `wait.rs` retires it (its exit collected and its output
//! read) or the container is removed; see `Container::add_exec` for the
//! bound on exited execs nobody waits for.

use std::sync::Arc;

use super::config::{StageConfig, StageMode, UserConfig};
use super::process::{launch, Launch};
use super::{validate_id, AddExecError, Status};
use crate::error::{AgentError, Result};
use crate::state::Agent;

pub struct ExecRequest {
    pub container_id: String,
    pub exec_id: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: Option<UserConfig>,
    pub terminal: bool,
    pub stdin: bool,
}

pub async fn exec(agent: &Arc<Agent>, req: ExecRequest) -> Result<u32> {
    validate_id("exec", &req.exec_id)?;
    let c = agent.get(&req.container_id)?;
    // Status first: a remove marks the container before it kills the
    // init, so an init stopped by a remove is reported as the remove.
    let status = c.status();
    if c.is_removing() {
        return Err(AgentError::FailedPrecondition(format!(
            "container {:?} is being removed",
            req.container_id
        )));
    }
    if status != Status::Running {
        return Err(AgentError::FailedPrecondition(format!(
            "container {:?} is {}, not running",
            req.container_id,
            status.as_str()
        )));
    }
    if req.args.is_empty() {
        return Err(AgentError::InvalidArgument(
            "exec needs at least one argument".into(),
        ));
    }
    if c.has_exec(&req.exec_id) {
        return Err(AgentError::AlreadyExists(format!(
            "exec {:?} already exists in container {:?}",
            req.exec_id, req.container_id
        )));
    }
    let mut process = c.init_process.clone();
    process.args = req.args;
    if !req.env.is_empty() {
        process.env = req.env;
    }
    if !req.cwd.is_empty() {
        process.cwd = req.cwd;
    }
    if let Some(u) = req.user {
        process.user = u;
    }
    process.terminal = req.terminal;
    let pid = c.init.pid;
    let mut namespaces: Vec<String> = ["ipc", "uts"]
        .iter()
        .map(|n| format!("/proc/{pid}/ns/{n}"))
        .collect();
    if c.new_cgroupns {
        namespaces.push(format!("/proc/{pid}/ns/cgroup"));
    }
    namespaces.push(format!("/proc/{pid}/ns/mnt"));
    let config = StageConfig {
        mode: StageMode::Exec { namespaces },
        process,
    };
    let what = format!("exec {:?} in container {:?}", req.exec_id, req.container_id);
    let pid_ns = std::fs::File::open(format!("/proc/{pid}/ns/pid")).map_err(|e| {
        AgentError::FailedPrecondition(format!("{what}: container init is gone: {e}"))
    })?;
    let a = agent.clone();
    let c2 = c.clone();
    let stdin = req.stdin;
    let exec_id = req.exec_id.clone();
    let p = tokio::task::spawn_blocking(move || {
        // A remove (or the init's exit) ends the set-up process midway:
        // say so rather than how the set-up broke.
        let why = |e: AgentError| {
            if c2.is_removing() {
                AgentError::FailedPrecondition(format!("{what}: the container is being removed"))
            } else if c2.init.exit_info().is_some() {
                AgentError::FailedPrecondition(format!("{what}: the container has stopped"))
            } else {
                e
            }
        };
        let p = launch(
            &a,
            Launch {
                config,
                clone_flags: 0,
                stdin,
                cgroup: &c2.cgroup,
                pid_ns: Some(pid_ns),
                what: what.clone(),
            },
        )
        .map_err(why)?;
        // Checked above too, but a concurrent exec with the same id may
        // have launched meanwhile, or a remove begun: the check and the
        // insert are one step here (under the exec table's lock), and a
        // refused exec's staged child is dropped (it exits).
        if let Err(e) = c2.add_exec(&exec_id, p.clone()) {
            p.release();
            return Err(match e {
                AddExecError::IdTaken => {
                    AgentError::AlreadyExists(format!("{what}: exec id already exists"))
                }
                AddExecError::Removing => AgentError::FailedPrecondition(format!(
                    "{what}: the container is being removed"
                )),
            });
        }
        if let Err(e) = p.start(&what) {
            // It may still be waiting (start timed out): nobody can start
            // or wait for it once it leaves the table, so end it.
            if p.exit_info().is_none() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            c2.retire_exec(&exec_id, &p);
            return Err(why(e));
        }
        Ok(p)
    })
    .await
    .map_err(|e| AgentError::internal("exec task", e))??;
    Ok(p.pid as u32)
}
