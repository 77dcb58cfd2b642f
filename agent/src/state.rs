//! Agent-wide state: the container table (one lock for the map, looked up
//! and released immediately; each container has its own lock, never held
//! across blocking work or awaits).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::container::cgroup::CgroupFs;
use crate::container::Container;
use crate::error::{AgentError, Result};
use crate::reaper::Reaper;

pub struct Agent {
    pub reaper: Arc<Reaper>,
    pub cgroups: Arc<dyn CgroupFs>,
    containers: Mutex<HashMap<String, Slot>>,
    /// Mount points the sandbox set-up added (removed on destroy).
    pub sandbox_mounts: Mutex<Vec<String>>,
    /// Set by DestroySandbox: no container may be created any more.
    destroying: AtomicBool,
}

enum Slot {
    /// Being created: the id is taken.
    Reserved,
    Ready(Arc<Container>),
}

impl Agent {
    pub fn new(reaper: Arc<Reaper>, cgroups: Arc<dyn CgroupFs>) -> Arc<Self> {
        Arc::new(Agent {
            reaper,
            cgroups,
            containers: Mutex::new(HashMap::new()),
            sandbox_mounts: Mutex::new(Vec::new()),
            destroying: AtomicBool::new(false),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        match self.map().get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Reserved) => Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is still being created"
            ))),
            None => Err(AgentError::NotFound(format!("container {id:?} not found"))),
        }
    }

    /// Take `id` for a container being created. The id is released
    /// again when the [`Reservation`] is dropped unfilled (failure, panic).
    pub fn reserve(self: &Arc<Self>, id: &str) -> Result<Reservation> {
        let mut m = self.map();
        if self.destroying.load(Ordering::SeqCst) {
            return Err(AgentError::FailedPrecondition(
                "the sandbox is being destroyed".into(),
            ));
        }
        if m.contains_key(id) {
            return Err(AgentError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        m.insert(id.to_string(), Slot::Reserved);
        Ok(Reservation {
            agent: self.clone(),
            id: Some(id.to_string()),
        })
    }

    /// Refuse new containers from now on (checked under the map lock, so
    /// after this returns [`Agent::creating`] can only go down).
    pub fn begin_destroy(&self) {
        let _m = self.map();
        self.destroying.store(true, Ordering::SeqCst);
    }

    /// Containers still being created.
    pub fn creating(&self) -> usize {
        self.map()
            .values()
            .filter(|s| matches!(s, Slot::Reserved))
            .count()
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    pub fn list(&self) -> Vec<Arc<Container>> {
        let mut v: Vec<_> = self
            .map()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(c) => Some(c.clone()),
                Slot::Reserved => None,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

/// A reserved container id (see [`Agent::reserve`]).
pub struct Reservation {
    agent: Arc<Agent>,
    id: Option<String>,
}

impl Reservation {
    /// The container is created: it takes the reserved slot.
    pub fn fill(mut self, c: Arc<Container>) {
        self.id = None;
        self.agent.map().insert(c.id.clone(), Slot::Ready(c));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut m = self.agent.map();
            if matches!(m.get(&id), Some(Slot::Reserved)) {
                m.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::cgroup::DirCgroupFs;

    #[test]
    fn reservation_is_released_unless_filled() {
        let agent = Agent::new(Arc::default(), Arc::new(DirCgroupFs::new("/nonexistent")));
        let r = agent.reserve("a").unwrap();
        let e = agent.reserve("a").err().unwrap();
        assert!(matches!(e, AgentError::AlreadyExists(_)), "{e}");
        assert!(matches!(
            agent.get("a"),
            Err(AgentError::FailedPrecondition(_))
        ));
        drop(r);
        assert!(matches!(agent.get("a"), Err(AgentError::NotFound(_))));
        // A panic while creating releases it too.
        let a2 = agent.clone();
        let _ = std::thread::spawn(move || {
            let _r = a2.reserve("b").unwrap();
            panic!("create failed hard");
        })
        .join();
        assert!(agent.reserve("b").is_ok());
    }

    #[test]
    fn destroy_refuses_new_containers_and_counts_pending_ones() {
        let agent = Agent::new(Arc::default(), Arc::new(DirCgroupFs::new("/nonexistent")));
        let pending = agent.reserve("a").unwrap();
        agent.begin_destroy();
        assert_eq!(agent.creating(), 1);
        let e = agent.reserve("b").err().unwrap();
        assert!(matches!(e, AgentError::FailedPrecondition(_)), "{e}");
        drop(pending);
        assert_eq!(agent.creating(), 0);
    }
}
