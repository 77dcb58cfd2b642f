//! Containers inside the guest: one file per operation (youki style).

pub mod cgroup;
pub mod config;
pub mod create;
pub mod delete;
pub mod exec;
pub mod kill;
pub mod process;
pub mod seccomp;
pub mod spawn;
pub mod spec;
pub mod start;
pub mod stats;
pub mod update;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use self::cgroup::Cgroup;
use self::config::ProcessConfig;
use self::process::Process;
use crate::error::{AgentError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }
}

pub struct Container {
    pub id: String,
    pub cgroup: Cgroup,
    pub init: Arc<Process>,
    /// The init's process settings, inherited by execs (caps, rlimits, ...).
    pub init_process: ProcessConfig,
    /// The container's own hostname namespace and cgroup namespace flags.
    pub new_cgroupns: bool,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn status(&self) -> Status {
        if self.init.exit_info().is_some() {
            Status::Stopped
        } else if self.init.is_started() {
            Status::Running
        } else {
            Status::Created
        }
    }

    /// The init (empty exec id) or an exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                AgentError::NotFound(format!(
                    "exec {exec_id:?} not found in container {:?}",
                    self.id
                ))
            })
    }
}

/// Container and exec ids become cgroup directory names: keep them plain.
pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "invalid {kind} id {id:?}: use 1-128 characters of [A-Za-z0-9_.-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids() {
        assert!(super::validate_id("container", "abc-1.2_x").is_ok());
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(super::validate_id("container", bad).is_err(), "{bad}");
        }
    }
}
