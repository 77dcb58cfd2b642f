//! cgroup v2 for containers: a per-pod parent (`<root>/vmpod`) with one leaf
//! per container. All file access goes through [`CgroupFs`], so tests run
//! against a plain directory.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::devfilter::{self, BpfInsn, DevRule};
use crate::error::AgentError;

/// Controllers enabled for the pod parent and its leaves (those missing in
/// the guest kernel are skipped).
pub const CONTROLLERS: [&str; 5] = ["cpu", "memory", "pids", "io", "cpuset"];
pub const POD_PARENT: &str = "vmpod";

/// Minimal filesystem access the cgroup code needs.
pub trait CgroupFs: Send + Sync {
    fn root(&self) -> &Path;
    fn write(&self, rel: &Path, file: &str, value: &str) -> io::Result<()> {
        std::fs::write(self.root().join(rel).join(file), value)
    }
    fn read(&self, rel: &Path, file: &str) -> io::Result<String> {
        std::fs::read_to_string(self.root().join(rel).join(file))
    }
    fn mkdir(&self, rel: &Path) -> io::Result<()> {
        match std::fs::create_dir(self.root().join(rel)) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        }
    }
    fn rmdir(&self, rel: &Path) -> io::Result<()> {
        std::fs::remove_dir(self.root().join(rel))
    }
    /// Attach `prog` as the cgroup's device filter, replacing the one
    /// attached before.
    fn set_device_filter(&self, rel: &Path, prog: &[BpfInsn]) -> io::Result<()> {
        devfilter::attach(&self.root().join(rel), prog)
    }
}

/// The real hierarchy (`/sys/fs/cgroup`) or any directory in tests.
pub struct DirCgroupFs {
    root: PathBuf,
}

impl DirCgroupFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl CgroupFs for DirCgroupFs {
    fn root(&self) -> &Path {
        &self.root
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {op} {file}: {source}")]
    Io {
        path: String,
        op: &'static str,
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {0} still has processes after kill")]
    Busy(String),
    #[error("cgroup {path}: no interface file {file:?} (unknown, or its controller is missing)")]
    NoFile { path: String, file: String },
}

impl CgroupError {
    /// The RPC error for a failed create or update of `what`, by errno:
    /// a value or file the kernel refuses is the caller's
    /// (`InvalidArgument`), a cgroup gone `NotFound`, a busy one
    /// `FailedPrecondition`; the device filter failing to load or attach
    /// and any other errno are the agent's (`Internal`).
    pub fn to_agent(&self, what: &str) -> AgentError {
        let msg = format!("{what}: {self}");
        match self {
            CgroupError::NoFile { .. } => AgentError::InvalidArgument(msg),
            CgroupError::Busy(_) => AgentError::FailedPrecondition(msg),
            CgroupError::Io { op: "attach", .. } => AgentError::Internal(msg),
            CgroupError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOENT) => AgentError::NotFound(msg),
                Some(libc::EBUSY) => AgentError::FailedPrecondition(msg),
                // The kernel's own check of a value (a CPU the guest
                // lacks, a number out of range).
                Some(libc::EINVAL | libc::ERANGE | libc::EOVERFLOW) => {
                    AgentError::InvalidArgument(msg)
                }
                _ => AgentError::Internal(msg),
            },
        }
    }
}

fn err(rel: &Path, op: &'static str, file: &str) -> impl FnOnce(io::Error) -> CgroupError {
    let path = rel.display().to_string();
    let file = file.to_string();
    move |source| CgroupError::Io {
        path,
        op,
        file,
        source,
    }
}

/// Enable controllers at the root and in the pod parent (boot time).
pub fn setup_pod_parent(fs: &dyn CgroupFs) -> Result<(), CgroupError> {
    let root = Path::new("");
    let parent = Path::new(POD_PARENT);
    let available = fs.read(root, "cgroup.controllers").unwrap_or_default();
    let wanted: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    for c in &wanted {
        fs.write(root, "cgroup.subtree_control", &format!("+{c}"))
            .map_err(err(root, "enable", c))?;
    }
    fs.mkdir(parent).map_err(err(parent, "mkdir", ""))?;
    for c in &wanted {
        fs.write(parent, "cgroup.subtree_control", &format!("+{c}"))
            .map_err(err(parent, "enable", c))?;
    }
    Ok(())
}

/// Controllers the containers' leaves get (the pod parent's
/// `cgroup.subtree_control`); `None` if that cannot be read.
pub fn leaf_controllers(fs: &dyn CgroupFs) -> Option<String> {
    fs.read(Path::new(POD_PARENT), "cgroup.subtree_control")
        .ok()
}

/// One container's leaf cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    rel: PathBuf,
}

impl Cgroup {
    pub fn for_container(id: &str) -> Self {
        Self {
            rel: Path::new(POD_PARENT).join(id),
        }
    }

    /// Path relative to the cgroup root, e.g. `vmpod/c1`.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// Make the leaf, write its limits and attach its device filter (when
    /// the spec has a device list); a limit the kernel refuses (unknown
    /// file, CPU the guest lacks, ...) removes the leaf again.
    pub fn create(
        &self,
        fs: &dyn CgroupFs,
        writes: &[(String, String)],
        devices: Option<&[DevRule]>,
    ) -> Result<(), CgroupError> {
        fs.mkdir(&self.rel).map_err(err(&self.rel, "mkdir", ""))?;
        let set = self.apply(fs, writes).and_then(|()| match devices {
            Some(rules) => self.set_devices(fs, rules),
            None => Ok(()),
        });
        set.inspect_err(|_| {
            // Nothing runs in it yet, so a plain rmdir does.
            if let Err(e) = fs.rmdir(&self.rel) {
                tracing::warn!(cgroup = %self.rel.display(), error = %e, "remove cgroup after failed create");
            }
        })
    }

    pub fn apply(&self, fs: &dyn CgroupFs, writes: &[(String, String)]) -> Result<(), CgroupError> {
        for (file, value) in writes {
            // Guest kernels without swap have no swap accounting: a swap
            // limit is moot there.
            if file == "memory.swap.max" && !fs.root().join(&self.rel).join(file).exists() {
                tracing::debug!(cgroup = %self.rel.display(), "no memory.swap.max: swap limit skipped");
                continue;
            }
            // Without the hugetlb controller no huge pages can be had: a
            // limit that allows none or does not limit is moot there (a
            // positive one is refused before, see `check_controllers`).
            if file.starts_with("hugetlb.")
                && (value == "0" || value == "max")
                && !fs.root().join(&self.rel).join(file).exists()
            {
                tracing::debug!(cgroup = %self.rel.display(), file, "no hugetlb controller: limit skipped");
                continue;
            }
            if let Err(e) = fs.write(&self.rel, file, value) {
                // cgroupfs cannot create files: writing one it lacks fails
                // with EACCES; say what is wrong instead.
                let leaf = fs.root().join(&self.rel);
                if leaf.is_dir() && !leaf.join(file).exists() {
                    return Err(CgroupError::NoFile {
                        path: self.rel.display().to_string(),
                        file: file.clone(),
                    });
                }
                return Err(err(&self.rel, "write", file)(e));
            }
        }
        Ok(())
    }

    /// Replace the device filter with one for `rules`.
    pub fn set_devices(&self, fs: &dyn CgroupFs, rules: &[DevRule]) -> Result<(), CgroupError> {
        fs.set_device_filter(&self.rel, &devfilter::program(rules))
            .map_err(err(&self.rel, "attach", "device filter"))
    }

    pub fn add_pid(&self, fs: &dyn CgroupFs, pid: i32) -> Result<(), CgroupError> {
        fs.write(&self.rel, "cgroup.procs", &pid.to_string())
            .map_err(err(&self.rel, "write", "cgroup.procs"))
    }

    /// The processes in the cgroup (`cgroup.procs`).
    pub fn try_pids(&self, fs: &dyn CgroupFs) -> Result<Vec<i32>, CgroupError> {
        Ok(fs
            .read(&self.rel, "cgroup.procs")
            .map_err(err(&self.rel, "read", "cgroup.procs"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// A flat `key value` file (`memory.events`, `cpu.stat`, ...).
    pub fn read_keyed(&self, fs: &dyn CgroupFs, file: &str) -> Vec<(String, u64)> {
        parse_keyed(&fs.read(&self.rel, file).unwrap_or_default())
    }

    pub fn read_u64(&self, fs: &dyn CgroupFs, file: &str) -> Option<u64> {
        fs.read(&self.rel, file).ok()?.trim().parse().ok()
    }

    pub fn oom_killed(&self, fs: &dyn CgroupFs) -> bool {
        self.read_keyed(fs, "memory.events")
            .iter()
            .any(|(k, v)| k == "oom_kill" && *v > 0)
    }

    /// Kill every process (cgroup.kill) and remove the directory, retrying
    /// while the kernel finishes tearing the processes down.
    pub fn destroy(&self, fs: &dyn CgroupFs) -> Result<(), CgroupError> {
        if !fs.root().join(&self.rel).exists() {
            return Ok(());
        }
        let _ = fs.write(&self.rel, "cgroup.kill", "1");
        let mut last = None;
        for _ in 0..100 {
            match fs.rmdir(&self.rel) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last
            .map(err(&self.rel, "rmdir", ""))
            .unwrap_or_else(|| CgroupError::Busy(self.rel.display().to_string())))
    }
}

pub fn parse_keyed(s: &str) -> Vec<(String, u64)> {
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_parent_enables_available_controllers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        // A real cgroupfs accumulates "+x" writes; a plain file keeps the last.
        let fs = DirCgroupFs::new(dir.path());
        setup_pod_parent(&fs).unwrap();
        assert!(dir.path().join("vmpod").is_dir());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("vmpod/cgroup.subtree_control")).unwrap(),
            "+cpuset"
        );
    }

    #[test]
    fn leaf_gets_limits_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("vmpod")).unwrap();
        let fs = DirCgroupFs::new(dir.path());
        let cg = Cgroup::for_container("c1");
        cg.create(
            &fs,
            &[
                ("memory.max".into(), "33554432".into()),
                ("pids.max".into(), "10".into()),
            ],
            None,
        )
        .unwrap();
        let leaf = dir.path().join("vmpod/c1");
        assert_eq!(
            std::fs::read_to_string(leaf.join("memory.max")).unwrap(),
            "33554432"
        );
        assert_eq!(
            std::fs::read_to_string(leaf.join("pids.max")).unwrap(),
            "10"
        );
        // Zero or no hugetlb limit without the controller: skipped.
        cg.apply(
            &fs,
            &[
                ("hugetlb.2MB.max".into(), "0".into()),
                ("hugetlb.1GB.max".into(), "max".into()),
            ],
        )
        .unwrap();
        assert!(!leaf.join("hugetlb.2MB.max").exists());
        // With it (the file exists), written.
        std::fs::write(leaf.join("hugetlb.2MB.max"), "max").unwrap();
        cg.apply(&fs, &[("hugetlb.2MB.max".into(), "0".into())])
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(leaf.join("hugetlb.2MB.max")).unwrap(),
            "0"
        );
        cg.add_pid(&fs, 42).unwrap();
        assert_eq!(cg.try_pids(&fs).unwrap(), vec![42]);
        std::fs::write(
            leaf.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert!(cg.oom_killed(&fs));
        std::fs::write(leaf.join("memory.events"), "oom 0\noom_kill 0\n").unwrap();
        assert!(!cg.oom_killed(&fs));
    }

    #[test]
    fn write_error_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let fs = DirCgroupFs::new(dir.path());
        let cg = Cgroup::for_container("missing-parent");
        let e = cg.create(&fs, &[], None).unwrap_err().to_string();
        assert!(e.contains("vmpod/missing-parent"), "{e}");
    }

    /// A cgroupfs in a temp dir that refuses writes to one file, as the
    /// kernel refuses unknown files or impossible values.
    struct Refusing {
        dir: tempfile::TempDir,
        refuse: &'static str,
    }

    impl CgroupFs for Refusing {
        fn root(&self) -> &Path {
            self.dir.path()
        }
        fn write(&self, rel: &Path, file: &str, _value: &str) -> io::Result<()> {
            if file == self.refuse {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            // Like cgroupfs: a write creates no file, so rmdir still works.
            if self.root().join(rel).is_dir() {
                Ok(())
            } else {
                Err(io::ErrorKind::NotFound.into())
            }
        }
        fn set_device_filter(&self, _rel: &Path, _prog: &[BpfInsn]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
    }

    #[test]
    fn failed_limit_removes_the_leaf() {
        let fs = Refusing {
            dir: tempfile::tempdir().unwrap(),
            refuse: "cpuset.cpus",
        };
        std::fs::create_dir(fs.root().join("vmpod")).unwrap();
        let cg = Cgroup::for_container("c1");
        let writes = [
            ("memory.max".to_string(), "1048576".to_string()),
            ("cpuset.cpus".to_string(), "7".to_string()),
        ];
        let e = cg.create(&fs, &writes, None).unwrap_err().to_string();
        assert!(e.contains("cpuset.cpus"), "{e}");
        assert!(!fs.root().join("vmpod/c1").exists(), "leaf left behind");
        // a device filter the kernel refuses removes it too
        let rules = [DevRule {
            allow: true,
            kind: None,
            major: None,
            minor: Some(3),
            access: devfilter::ACC_READ,
        }];
        let e = cg
            .create(&fs, &writes[..1], Some(&rules))
            .unwrap_err()
            .to_string();
        assert!(e.contains("device filter"), "{e}");
        assert!(!fs.root().join("vmpod/c1").exists(), "leaf left behind");
        // and a create that succeeds keeps it
        cg.create(&fs, &writes[..1], None).unwrap();
        assert!(fs.root().join("vmpod/c1").is_dir());
    }

    #[test]
    fn errors_map_to_codes_by_errno() {
        let io = |op: &'static str, errno: i32| CgroupError::Io {
            path: "vmpod/c1".into(),
            op,
            file: "cpuset.cpus".into(),
            source: io::Error::from_raw_os_error(errno),
        };
        let code = |e: CgroupError| e.to_agent("container \"c1\"").code();
        use ttrpc::Code;
        assert_eq!(code(io("write", libc::ENOENT)), Code::NOT_FOUND);
        assert_eq!(code(io("write", libc::EBUSY)), Code::FAILED_PRECONDITION);
        assert_eq!(code(io("write", libc::EINVAL)), Code::INVALID_ARGUMENT);
        assert_eq!(code(io("write", libc::ERANGE)), Code::INVALID_ARGUMENT);
        assert_eq!(code(io("write", libc::EIO)), Code::INTERNAL);
        assert_eq!(code(io("write", libc::EPERM)), Code::INTERNAL);
        assert_eq!(code(io("mkdir", libc::ENOMEM)), Code::INTERNAL);
        // A device filter that does not load or attach: whatever the errno.
        assert_eq!(code(io("attach", libc::EINVAL)), Code::INTERNAL);
        assert_eq!(code(io("attach", libc::EPERM)), Code::INTERNAL);
        assert_eq!(
            code(CgroupError::Busy("vmpod/c1".into())),
            Code::FAILED_PRECONDITION
        );
        let e = io("write", libc::ENOENT).to_agent("container \"c1\"");
        assert!(
            e.to_string()
                .starts_with("container \"c1\": cgroup vmpod/c1"),
            "{e}"
        );
    }

    #[test]
    fn unknown_file_is_named() {
        // The real cgroupfs refuses to create a file (EACCES).
        struct NoCreate(tempfile::TempDir);
        impl CgroupFs for NoCreate {
            fn root(&self) -> &Path {
                self.0.path()
            }
            fn write(&self, _rel: &Path, _file: &str, _value: &str) -> io::Result<()> {
                Err(io::Error::from_raw_os_error(libc::EACCES))
            }
        }
        let fs = NoCreate(tempfile::tempdir().unwrap());
        std::fs::create_dir_all(fs.root().join("vmpod/c1")).unwrap();
        let cg = Cgroup::for_container("c1");
        let e = cg
            .apply(&fs, &[("memory.bogus".into(), "1".into())])
            .unwrap_err();
        assert!(matches!(e, CgroupError::NoFile { .. }), "{e}");
        assert_eq!(e.to_agent("c1").code(), ttrpc::Code::INVALID_ARGUMENT);
        // An existing file the kernel refuses keeps the errno.
        std::fs::write(fs.root().join("vmpod/c1/pids.max"), "max").unwrap();
        let e = cg
            .apply(&fs, &[("pids.max".into(), "1".into())])
            .unwrap_err();
        assert_eq!(e.to_agent("c1").code(), ttrpc::Code::INTERNAL);
    }

    #[test]
    fn keyed_parse() {
        let v = parse_keyed("usage_usec 10\nuser_usec 7\nbad\nsystem_usec x\n");
        assert_eq!(v, vec![("usage_usec".into(), 10), ("user_usec".into(), 7)]);
    }
}
