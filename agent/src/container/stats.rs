//! cgroup v2 statistics of a container.

use std::sync::Arc;

use super::cgroup::CgroupFs;
use crate::error::Result;
use crate::state::Agent;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub nr_throttled: u64,
    pub throttled_usec: u64,
    pub memory_current: u64,
    pub memory_limit: u64,
    pub memory_anon: u64,
    pub memory_file: u64,
    pub oom: u64,
    pub oom_kill: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
}

pub fn stats(agent: &Arc<Agent>, id: &str) -> Result<Stats> {
    let c = agent.get(id)?;
    Ok(read(agent.cgroups.as_ref(), &c.cgroup))
}

pub fn read(fs: &dyn CgroupFs, cg: &super::cgroup::Cgroup) -> Stats {
    let mut s = Stats::default();
    for (k, v) in cg.read_keyed(fs, "cpu.stat") {
        match k.as_str() {
            "usage_usec" => s.cpu_usage_usec = v,
            "user_usec" => s.cpu_user_usec = v,
            "system_usec" => s.cpu_system_usec = v,
            "nr_throttled" => s.nr_throttled = v,
            "throttled_usec" => s.throttled_usec = v,
            _ => {}
        }
    }
    s.memory_current = cg.read_u64(fs, "memory.current").unwrap_or(0);
    s.memory_limit = cg.read_u64(fs, "memory.max").unwrap_or(0);
    for (k, v) in cg.read_keyed(fs, "memory.stat") {
        match k.as_str() {
            "anon" => s.memory_anon = v,
            "file" => s.memory_file = v,
            _ => {}
        }
    }
    for (k, v) in cg.read_keyed(fs, "memory.events") {
        match k.as_str() {
            "oom" => s.oom = v,
            "oom_kill" => s.oom_kill = v,
            _ => {}
        }
    }
    s.pids_current = cg.read_u64(fs, "pids.current").unwrap_or(0);
    s.pids_limit = cg.read_u64(fs, "pids.max").unwrap_or(0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::cgroup::{Cgroup, DirCgroupFs};

    #[test]
    fn reads_cgroup_files() {
        let dir = tempfile::tempdir().unwrap();
        let leaf = dir.path().join("vmpod/c1");
        std::fs::create_dir_all(&leaf).unwrap();
        for (f, v) in [
            (
                "cpu.stat",
                "usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_throttled 2\nthrottled_usec 7\n",
            ),
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("memory.stat", "anon 1000\nfile 2000\n"),
            ("memory.events", "oom 1\noom_kill 1\n"),
            ("pids.current", "3\n"),
            ("pids.max", "64\n"),
        ] {
            std::fs::write(leaf.join(f), v).unwrap();
        }
        let s = read(&DirCgroupFs::new(dir.path()), &Cgroup::for_container("c1"));
        assert_eq!(s.cpu_usage_usec, 100);
        assert_eq!(s.throttled_usec, 7);
        assert_eq!(s.memory_current, 4096);
        assert_eq!(s.memory_limit, 0, "max reads as unlimited");
        assert_eq!((s.memory_anon, s.memory_file), (1000, 2000));
        assert_eq!((s.oom, s.oom_kill), (1, 1));
        assert_eq!((s.pids_current, s.pids_limit), (3, 64));
    }
}
