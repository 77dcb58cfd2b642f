//! Containers inside the guest: one file per operation (youki style).

pub mod cgroup;
pub mod config;
pub mod create;
pub mod delete;
pub mod devfilter;
pub mod exec;
pub mod kill;
pub mod process;
pub mod seccomp;
pub mod spawn;
pub mod spec;
pub mod start;
pub mod stats;
pub mod update;
pub mod wait;

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
    /// Running execs, and exited ones until retired (see `exec.rs`).
    execs: Mutex<ExecTable>,
}

/// A container's execs, and whether it is being removed (checked under
/// the same lock as an exec is added, so none slips in during a remove).
#[derive(Default)]
pub struct ExecTable {
    map: HashMap<String, Arc<Process>>,
    removing: bool,
}

impl ExecTable {
    #[cfg(test)]
    fn with(map: HashMap<String, Arc<Process>>) -> Self {
        ExecTable {
            map,
            removing: false,
        }
    }
}

/// Why an exec could not be added.
#[derive(Debug, PartialEq, Eq)]
pub enum AddExecError {
    IdTaken,
    Removing,
}

/// Exited execs a container keeps whose exit no Wait collected (e.g. an
/// ExecSync the host gave up on); older ones are retired when an exec is
/// added, so the table stays bounded.
pub const MAX_EXITED_EXECS: usize = 32;

/// Ids of the exited execs (`(id, finished_at)`) beyond the newest `keep`.
fn oldest_exited(mut exited: Vec<(String, i64)>, keep: usize) -> Vec<String> {
    exited.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    exited.into_iter().skip(keep).map(|(id, _)| id).collect()
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

    fn execs(&self) -> std::sync::MutexGuard<'_, ExecTable> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The container is being removed: no exec may be added any more.
    pub fn begin_remove(&self) {
        self.execs().removing = true;
    }

    pub fn is_removing(&self) -> bool {
        self.execs().removing
    }

    /// Whether an exec id is in use.
    pub fn has_exec(&self, exec_id: &str) -> bool {
        self.execs().map.contains_key(exec_id)
    }

    /// Add an exec, unless its id is taken or the container is being
    /// removed. Exited execs beyond [`MAX_EXITED_EXECS`] are retired
    /// (oldest first).
    pub fn add_exec(
        &self,
        exec_id: &str,
        p: Arc<Process>,
    ) -> std::result::Result<(), AddExecError> {
        let evicted: Vec<Arc<Process>> = {
            let mut table = self.execs();
            if table.removing {
                return Err(AddExecError::Removing);
            }
            let execs = &mut table.map;
            if execs.contains_key(exec_id) {
                return Err(AddExecError::IdTaken);
            }
            let exited = execs
                .iter()
                .filter_map(|(id, p)| Some((id.clone(), p.exit_info()?.finished_at)))
                .collect();
            let old = oldest_exited(exited, MAX_EXITED_EXECS.saturating_sub(1));
            let evicted = old.iter().filter_map(|id| execs.remove(id)).collect();
            execs.insert(exec_id.to_string(), p);
            evicted
        };
        if !evicted.is_empty() {
            tracing::info!(container = %self.id, count = evicted.len(), "uncollected exited execs retired");
        }
        for p in evicted {
            p.release();
        }
        Ok(())
    }

    /// Take `p` out of the exec table (if it is still the exec `exec_id`)
    /// and release its stdio.
    pub fn retire_exec(&self, exec_id: &str, p: &Arc<Process>) {
        {
            let execs = &mut self.execs().map;
            if execs.get(exec_id).is_some_and(|q| Arc::ptr_eq(q, p)) {
                execs.remove(exec_id);
            }
        }
        p.release();
    }

    /// Release every process's stdio (init and execs) and empty the exec
    /// table: the container is being removed.
    pub fn release_all(&self) {
        let execs: Vec<Arc<Process>> = {
            let mut table = self.execs();
            table.removing = true;
            table.map.drain().map(|(_, p)| p).collect()
        };
        self.init.release();
        for p in execs {
            p.release();
        }
    }

    /// The init (empty exec id) or an exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs().map.get(exec_id).cloned().ok_or_else(|| {
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
    use super::*;

    fn container(execs: &[(&str, Option<i64>)]) -> Container {
        Container {
            id: "c".into(),
            cgroup: Cgroup::for_container("c"),
            init: Process::for_test(1, None),
            init_process: ProcessConfig::default(),
            new_cgroupns: false,
            execs: Mutex::new(ExecTable::with(
                execs
                    .iter()
                    .enumerate()
                    .map(|(i, (id, f))| (id.to_string(), Process::for_test(i as i32 + 2, *f)))
                    .collect(),
            )),
        }
    }

    fn exec_ids(c: &Container) -> Vec<String> {
        let mut v: Vec<String> = c.execs().map.keys().cloned().collect();
        v.sort();
        v
    }

    #[test]
    fn oldest_exited_beyond_keep() {
        let v = vec![("a".into(), 30), ("b".into(), 10), ("c".into(), 20)];
        assert_eq!(oldest_exited(v.clone(), 1), vec!["c", "b"]);
        assert_eq!(oldest_exited(v.clone(), 3), Vec::<String>::new());
        assert_eq!(oldest_exited(v, 0), vec!["a", "c", "b"]);
    }

    #[test]
    fn exec_table_stays_bounded() {
        // MAX_EXITED_EXECS exited (uncollected) execs plus running ones.
        let mut execs: Vec<(String, Option<i64>)> = (0..MAX_EXITED_EXECS)
            .map(|i| (format!("done{i:02}"), Some(i as i64)))
            .collect();
        execs.push(("running".into(), None));
        let refs: Vec<(&str, Option<i64>)> = execs.iter().map(|(i, f)| (i.as_str(), *f)).collect();
        let c = container(&refs);
        assert_eq!(
            c.add_exec("running", Process::for_test(99, None)),
            Err(AddExecError::IdTaken)
        );
        let oldest = c.process("done00").unwrap();
        assert!(c.add_exec("new", Process::for_test(100, None)).is_ok());
        let now = exec_ids(&c);
        assert_eq!(now.len(), MAX_EXITED_EXECS + 1, "{now:?}");
        assert!(
            !now.contains(&"done00".to_string()),
            "oldest exited retired"
        );
        assert!(now.contains(&"running".to_string()) && now.contains(&"new".to_string()));
        assert!(
            oldest.stdout.progress().borrow().drained,
            "the retired exec's output is discarded"
        );
        // Adding many more never grows the table past running + the cap.
        for i in 0..100 {
            let p = Process::for_test(200 + i, Some(1000 + i as i64));
            assert!(c.add_exec(&format!("more{i}"), p).is_ok());
        }
        assert_eq!(exec_ids(&c).len(), MAX_EXITED_EXECS + 2);
    }

    #[test]
    fn retire_only_the_same_process() {
        let c = container(&[("e", Some(1))]);
        let old = c.process("e").unwrap();
        c.retire_exec("e", &old);
        assert!(c.process("e").is_err());
        // A new exec that reused the id is not retired by a stale handle.
        assert!(c.add_exec("e", Process::for_test(7, None)).is_ok());
        c.retire_exec("e", &old);
        let new = c.process("e").unwrap();
        assert_eq!(new.pid, 7);
        assert!(!new.stdout.progress().borrow().drained);
        // Remove: every process's stdio is released, the table emptied.
        c.release_all();
        assert!(exec_ids(&c).is_empty());
        for p in [&new, &c.init] {
            assert!(p.stdout.progress().borrow().drained && p.stderr.progress().borrow().drained);
        }
    }

    #[test]
    fn ids() {
        assert!(super::validate_id("container", "abc-1.2_x").is_ok());
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(super::validate_id("container", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_exec_is_added_once_removal_began() {
        let c = container(&[]);
        assert!(!c.is_removing());
        c.begin_remove();
        assert!(c.is_removing());
        assert_eq!(
            c.add_exec("late", Process::for_test(5, None)),
            Err(AddExecError::Removing)
        );
        assert!(exec_ids(&c).is_empty());
        // release_all (what remove does) closes the table too.
        let c = container(&[]);
        c.release_all();
        assert_eq!(
            c.add_exec("late", Process::for_test(6, None)),
            Err(AddExecError::Removing)
        );
    }
}
