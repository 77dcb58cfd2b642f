//! OCI runtime spec → [`StageConfig`] (what the staged child does) and
//! cgroup v2 writes (what the agent does). Pure functions, unit-tested.

use std::collections::BTreeMap;

use nix::mount::MsFlags;
use oci_spec::runtime::{
    LinuxCapabilities, LinuxNamespaceType, LinuxResources, Mount, PosixRlimit, Process, Spec,
};

use super::config::{
    CapsConfig, MountConfig, ProcessConfig, RlimitConfig, RootfsConfig, StageConfig, StageMode,
    UserConfig,
};
use super::seccomp;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid OCI spec JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("OCI spec has no process")]
    NoProcess,
    #[error("OCI spec process has no args")]
    NoArgs,
    #[error("OCI spec has no root path and the request gave no rootfs")]
    NoRoot,
    #[error("mount destination {0:?} must be absolute and must not contain '..'")]
    BadMountDestination(String),
    #[error("unknown rlimit {0}")]
    UnknownRlimit(String),
    #[error("invalid cgroup setting: {0}")]
    BadResource(String),
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// How a container's init gets its namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NsPlan {
    /// `CLONE_NEW*` flags for the clone.
    pub clone_flags: i32,
    /// Existing PID namespace (by path) the init is cloned into.
    pub pid_path: Option<String>,
    /// Existing ipc/uts/cgroup namespaces (by path) the child joins.
    pub join_paths: Vec<String>,
}

/// Namespaces: listed without a path → new; with a path → join (pod-shared
/// namespaces); not listed → the VM's (the pod's). The network namespace is
/// always the VM's; a container always gets its own mount namespace.
pub fn namespaces(spec: &Spec) -> Result<NsPlan, SpecError> {
    let default = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    let Some(nss) = spec.linux().as_ref().and_then(|l| l.namespaces().clone()) else {
        return Ok(NsPlan {
            clone_flags: default,
            ..Default::default()
        });
    };
    let mut plan = NsPlan::default();
    for ns in nss {
        let path = ns.path().as_ref().map(|p| p.to_string_lossy().into_owned());
        let flag = match ns.typ() {
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            // The cgroup namespace is unshared by the child once it sits in
            // its cgroup (see RootfsConfig::new_cgroupns).
            LinuxNamespaceType::Cgroup => 0,
            // The pod shares the VM's network namespace.
            LinuxNamespaceType::Network => continue,
            LinuxNamespaceType::User => {
                return Err(SpecError::Unsupported("user namespaces".into()))
            }
            LinuxNamespaceType::Time => {
                return Err(SpecError::Unsupported("time namespaces".into()))
            }
        };
        match path {
            None => plan.clone_flags |= flag,
            Some(p) if !p.starts_with('/') => {
                return Err(SpecError::Unsupported(format!(
                    "{} namespace path {p:?} is not absolute",
                    ns.typ()
                )))
            }
            Some(p) => match ns.typ() {
                LinuxNamespaceType::Mount => {
                    return Err(SpecError::Unsupported(
                        "joining an existing mount namespace".into(),
                    ))
                }
                LinuxNamespaceType::Pid => plan.pid_path = Some(p),
                _ => plan.join_paths.push(p),
            },
        }
    }
    // A container always gets its own mount namespace: the rootfs set-up
    // must never touch the agent's.
    plan.clone_flags |= libc::CLONE_NEWNS;
    Ok(plan)
}

fn has_ns(spec: &Spec, typ: LinuxNamespaceType) -> bool {
    match spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()) {
        Some(nss) => nss.iter().any(|n| n.typ() == typ && n.path().is_none()),
        None => typ != LinuxNamespaceType::Cgroup,
    }
}

/// Translate a container's spec into the init stage configuration.
pub fn init_stage(spec: &Spec, rootfs_override: Option<&str>) -> Result<StageConfig, SpecError> {
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    let root = match rootfs_override {
        Some(r) if !r.is_empty() => r.to_string(),
        _ => spec
            .root()
            .as_ref()
            .map(|r| r.path().to_string_lossy().into_owned())
            .filter(|p| !p.is_empty())
            .ok_or(SpecError::NoRoot)?,
    };
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let mut mounts = Vec::new();
    for m in spec.mounts().as_deref().unwrap_or_default() {
        mounts.push(mount_config(m)?);
    }
    let has = |d: &str| mounts.iter().any(|m: &MountConfig| m.destination == d);
    let (has_proc, has_dev, has_sys) = (has("/proc"), has("/dev"), has("/sys"));
    if !has_proc {
        mounts.insert(0, default_mount("/proc", "proc", "proc", ""));
    }
    if !has_dev {
        mounts.insert(
            1,
            default_mount("/dev", "tmpfs", "tmpfs", "mode=755,size=65536k"),
        );
        mounts.push(default_mount(
            "/dev/pts",
            "devpts",
            "devpts",
            "newinstance,ptmxmode=0666,mode=0620",
        ));
        mounts.push(default_mount(
            "/dev/shm",
            "shm",
            "tmpfs",
            "mode=1777,size=65536k",
        ));
    }
    if !has_sys {
        let mut m = default_mount("/sys", "sysfs", "sysfs", "");
        m.flags |= MsFlags::MS_RDONLY.bits();
        mounts.push(m);
    }
    let populate_dev = mounts
        .iter()
        .any(|m| m.destination == "/dev" && m.fstype == "tmpfs");
    let linux = spec.linux().as_ref();
    let sysctls: BTreeMap<String, String> = linux
        .and_then(|l| l.sysctl().clone())
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    let rootfs = RootfsConfig {
        path: root,
        readonly,
        mounts,
        hostname: spec
            .hostname()
            .clone()
            .filter(|_| has_ns(spec, LinuxNamespaceType::Uts)),
        domainname: spec
            .domainname()
            .clone()
            .filter(|_| has_ns(spec, LinuxNamespaceType::Uts)),
        masked_paths: linux
            .and_then(|l| l.masked_paths().clone())
            .unwrap_or_default(),
        readonly_paths: linux
            .and_then(|l| l.readonly_paths().clone())
            .unwrap_or_default(),
        sysctls,
        new_cgroupns: spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|n| {
                n.iter()
                    .any(|n| n.typ() == LinuxNamespaceType::Cgroup && n.path().is_none())
            }),
        populate_dev,
        join_namespaces: namespaces(spec)?.join_paths,
    };
    let seccomp = match linux.and_then(|l| l.seccomp().as_ref()) {
        Some(s) => seccomp::compile(s)?,
        None => Vec::new(),
    };
    Ok(StageConfig {
        mode: StageMode::Init(rootfs),
        process: process_config(process, seccomp)?,
    })
}

fn default_mount(dest: &str, source: &str, fstype: &str, data: &str) -> MountConfig {
    MountConfig {
        destination: dest.into(),
        source: source.into(),
        fstype: fstype.into(),
        flags: (MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV).bits()
            & if fstype == "tmpfs" && dest == "/dev" {
                !MsFlags::MS_NODEV.bits() & !MsFlags::MS_NOEXEC.bits()
            } else if fstype == "devpts" {
                !MsFlags::MS_NODEV.bits()
            } else {
                u64::MAX
            },
        propagation: 0,
        data: data.into(),
    }
}

pub fn process_config(
    p: &Process,
    seccomp: Vec<Vec<super::config::SockFilter>>,
) -> Result<ProcessConfig, SpecError> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    let user = p.user();
    let mut rlimits = Vec::new();
    for r in p.rlimits().as_deref().unwrap_or_default() {
        rlimits.push(rlimit_config(r)?);
    }
    Ok(ProcessConfig {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd: p.cwd().to_string_lossy().into_owned(),
        user: UserConfig {
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            username: user.username().clone().filter(|u| !u.is_empty()),
        },
        terminal: p.terminal().unwrap_or(false),
        capabilities: p
            .capabilities()
            .as_ref()
            .map(caps_config)
            .unwrap_or_default(),
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        rlimits,
        oom_score_adj: p.oom_score_adj(),
        seccomp,
    })
}

fn cap_names(set: &Option<oci_spec::runtime::Capabilities>) -> Option<Vec<String>> {
    set.as_ref().map(|s| {
        let mut v: Vec<String> = s
            .iter()
            .filter_map(|c| serde_json::to_value(c).ok())
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        v.sort();
        v
    })
}

fn caps_config(c: &LinuxCapabilities) -> CapsConfig {
    CapsConfig {
        bounding: cap_names(c.bounding()),
        effective: cap_names(c.effective()),
        permitted: cap_names(c.permitted()),
        inheritable: cap_names(c.inheritable()),
        ambient: cap_names(c.ambient()),
    }
}

fn rlimit_config(r: &PosixRlimit) -> Result<RlimitConfig, SpecError> {
    let name = serde_json::to_value(r.typ())
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let resource = match name.as_str() {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return Err(SpecError::UnknownRlimit(name)),
    } as i32;
    Ok(RlimitConfig {
        resource,
        soft: r.soft(),
        hard: r.hard(),
    })
}

/// Translate one OCI mount; options become `MS_*` flags, propagation flags
/// and the remaining data string.
pub fn mount_config(m: &Mount) -> Result<MountConfig, SpecError> {
    let dest = m.destination().to_string_lossy().into_owned();
    if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
        return Err(SpecError::BadMountDestination(dest));
    }
    let mut fstype = m.typ().clone().unwrap_or_default();
    let (flags, propagation, data) =
        parse_mount_options(m.options().as_deref().unwrap_or_default());
    if fstype.is_empty() && flags & MsFlags::MS_BIND.bits() != 0 {
        fstype = "bind".into();
    }
    Ok(MountConfig {
        destination: dest,
        source: m
            .source()
            .as_ref()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        fstype,
        flags,
        propagation,
        data,
    })
}

pub fn parse_mount_options(opts: &[String]) -> (u64, u64, String) {
    let mut flags = MsFlags::empty();
    let mut prop = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for o in opts {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let p = match o.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                prop = p | if o.starts_with('r') {
                    MsFlags::MS_REC
                } else {
                    MsFlags::empty()
                };
                continue;
            }
            other => {
                data.push(other);
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    (flags.bits(), prop.bits(), data.join(","))
}

/// cgroup v2 interface files to write for the spec's resources, in order.
pub fn cgroup_writes(r: &LinuxResources) -> Result<Vec<(String, String)>, SpecError> {
    let mut w = Vec::new();
    if let Some(mem) = r.memory() {
        if let Some(limit) = mem.limit() {
            w.push(("memory.max".into(), limit_value(limit)));
            if let Some(swap) = mem.swap() {
                // OCI's swap is memory+swap; cgroup v2 wants swap alone.
                let v = if swap < 0 || limit < 0 {
                    "max".to_string()
                } else if swap < limit {
                    return Err(SpecError::BadResource(format!(
                        "memory.swap ({swap}) lower than memory.limit ({limit})"
                    )));
                } else {
                    (swap - limit).to_string()
                };
                w.push(("memory.swap.max".into(), v));
            }
        }
        if let Some(res) = mem.reservation() {
            w.push(("memory.low".into(), limit_value(res)));
        }
    }
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares() {
            if shares > 0 {
                w.push(("cpu.weight".into(), shares_to_weight(shares).to_string()));
            }
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let period = cpu.period().unwrap_or(100_000);
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            w.push(("cpu.max".into(), format!("{quota} {period}")));
        }
        if let Some(cpus) = cpu.cpus().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.cpus".into(), cpus.clone()));
        }
        if let Some(mems) = cpu.mems().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.mems".into(), mems.clone()));
        }
    }
    if let Some(pids) = r.pids() {
        w.push(("pids.max".into(), limit_value(pids.limit())));
    }
    if let Some(unified) = r.unified() {
        let mut keys: Vec<_> = unified.iter().collect();
        keys.sort();
        for (k, v) in keys {
            if k.contains('/') || k.starts_with('.') || !k.contains('.') {
                return Err(SpecError::BadResource(format!("unified key {k:?}")));
            }
            // cgroup core files are not limits: `cgroup.procs` would move
            // any process (the agent itself) into the container's cgroup,
            // `cgroup.kill` would kill it, `cgroup.subtree_control`/`type`
            // would break the leaf.
            if k.starts_with("cgroup.") {
                return Err(SpecError::BadResource(format!(
                    "unified key {k:?}: cgroup core files cannot be set"
                )));
            }
            w.push((k.clone(), v.clone()));
        }
    }
    Ok(w)
}

fn limit_value(v: i64) -> String {
    if v <= 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// cpu.shares (2..262144) → cpu.weight (1..10000), as runc/crun convert.
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    const BASE: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"args": ["sh", "-c", "echo hi"], "cwd": "/", "env": ["PATH=/bin"],
                    "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
                    "noNewPrivileges": true,
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
                    "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"]}},
        "root": {"path": "/containers/busybox", "readonly": true},
        "hostname": "pod-a",
        "mounts": [{"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", "ro", "rprivate"]}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}, {"type": "network"}],
                  "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
                  "resources": {"memory": {"limit": 33554432, "swap": 67108864},
                                "cpu": {"quota": 50000, "period": 100000, "shares": 1024},
                                "pids": {"limit": 64}}}
    }"#;

    #[test]
    fn translates_process_and_rootfs() {
        let cfg = init_stage(&spec(BASE), None).unwrap();
        let StageMode::Init(root) = &cfg.mode else {
            panic!("init mode")
        };
        assert_eq!(root.path, "/containers/busybox");
        assert!(root.readonly);
        assert_eq!(root.hostname.as_deref(), Some("pod-a"));
        assert_eq!(root.masked_paths, vec!["/proc/kcore"]);
        // defaults added for /proc /dev /sys, plus the spec's bind mount
        let dests: Vec<_> = root.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(
            dests,
            ["/proc", "/dev", "/data", "/dev/pts", "/dev/shm", "/sys"]
        );
        assert!(root.populate_dev);
        let p = &cfg.process;
        assert_eq!(p.args, ["sh", "-c", "echo hi"]);
        assert_eq!(p.user.uid, 1000);
        assert_eq!(p.user.additional_gids, [10, 20]);
        assert!(p.no_new_privs);
        assert_eq!(p.rlimits[0].resource, libc::RLIMIT_NOFILE as i32);
        assert_eq!((p.rlimits[0].soft, p.rlimits[0].hard), (512, 1024));
        assert_eq!(
            p.capabilities.bounding.as_deref(),
            Some(&["CAP_CHOWN".to_string(), "CAP_KILL".to_string()][..])
        );
        assert_eq!(p.capabilities.permitted, None);
    }

    #[test]
    fn rootfs_override_and_missing_root() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
        );
        assert!(matches!(init_stage(&s, None), Err(SpecError::NoRoot)));
        let cfg = init_stage(&s, Some("/run/c1/rootfs")).unwrap();
        let StageMode::Init(root) = cfg.mode else {
            panic!()
        };
        assert_eq!(root.path, "/run/c1/rootfs");
    }

    #[test]
    fn empty_args_rejected() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"/r"},"process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
        );
        assert!(matches!(init_stage(&s, None), Err(SpecError::NoArgs)));
    }

    #[test]
    fn mount_options() {
        let (f, p, d) = parse_mount_options(&[
            "rbind".into(),
            "ro".into(),
            "nosuid".into(),
            "rslave".into(),
            "size=10m".into(),
            "mode=755".into(),
        ]);
        let f = MsFlags::from_bits_truncate(f);
        assert!(f.contains(
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID
        ));
        assert_eq!(
            MsFlags::from_bits_truncate(p),
            MsFlags::MS_SLAVE | MsFlags::MS_REC
        );
        assert_eq!(d, "size=10m,mode=755");
        let (f, _, _) = parse_mount_options(&["ro".into(), "rw".into()]);
        assert!(!MsFlags::from_bits_truncate(f).contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn bad_mount_destination() {
        let m: Mount = serde_json::from_str(
            r#"{"destination":"/a/../../etc","type":"tmpfs","source":"tmpfs"}"#,
        )
        .unwrap();
        assert!(matches!(
            mount_config(&m),
            Err(SpecError::BadMountDestination(_))
        ));
        let m: Mount =
            serde_json::from_str(r#"{"destination":"rel","type":"tmpfs","source":"tmpfs"}"#)
                .unwrap();
        assert!(mount_config(&m).is_err());
    }

    #[test]
    fn namespace_plans() {
        let p = namespaces(&spec(BASE)).unwrap();
        assert_eq!(
            p.clone_flags,
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC
        );
        assert!(p.pid_path.is_none() && p.join_paths.is_empty());
        let s = spec(r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"user"}]}}"#);
        assert!(namespaces(&s).is_err());
        let s = spec(r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"}]}}"#);
        assert_eq!(
            namespaces(&s).unwrap().clone_flags,
            libc::CLONE_NEWPID | libc::CLONE_NEWNS
        );
        // pod-shared: join by path
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[
                {"type":"pid","path":"/proc/7/ns/pid"},{"type":"ipc","path":"/proc/7/ns/ipc"},
                {"type":"uts"},{"type":"mount"},{"type":"network","path":"/var/run/netns/x"}]}}"#,
        );
        let p = namespaces(&s).unwrap();
        assert_eq!(p.clone_flags, libc::CLONE_NEWUTS | libc::CLONE_NEWNS);
        assert_eq!(p.pid_path.as_deref(), Some("/proc/7/ns/pid"));
        assert_eq!(p.join_paths, vec!["/proc/7/ns/ipc".to_string()]);
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"mount","path":"/proc/1/ns/mnt"}]}}"#,
        );
        assert!(namespaces(&s).is_err());
    }

    #[test]
    fn resources_to_cgroup_files() {
        let s = spec(BASE);
        let r = s.linux().as_ref().unwrap().resources().as_ref().unwrap();
        let w = cgroup_writes(r).unwrap();
        let get = |k: &str| w.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("33554432"));
        assert_eq!(get("memory.swap.max"), Some("33554432"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("pids.max"), Some("64"));
    }

    #[test]
    fn resources_unlimited_and_unified() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":-1},"cpu":{"period":100000},"pids":{"limit":0},
                "unified":{"memory.high":"1000000","io.weight":"50"}}"#,
        )
        .unwrap();
        let w = cgroup_writes(&r).unwrap();
        assert_eq!(
            w,
            vec![
                ("memory.max".to_string(), "max".to_string()),
                ("cpu.max".into(), "max 100000".into()),
                ("pids.max".into(), "max".into()),
                ("io.weight".into(), "50".into()),
                ("memory.high".into(), "1000000".into()),
            ]
        );
        for key in [
            "../../etc/passwd",
            "cgroup.procs",
            "cgroup.kill",
            "cgroup.subtree_control",
        ] {
            let bad: LinuxResources =
                serde_json::from_value(serde_json::json!({ "unified": { key: "1" } })).unwrap();
            let err = cgroup_writes(&bad).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn shares_weight_bounds() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
    }
}
