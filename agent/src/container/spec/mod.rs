//! OCI runtime spec → [`StageConfig`] (what the staged child does) and
//! cgroup v2 writes (what the agent does). Pure functions, unit-tested.

use std::collections::BTreeMap;

use nix::mount::MsFlags;
use oci_spec::runtime::{LinuxCapabilities, LinuxNamespaceType, PosixRlimit, Process, Spec};

mod devices;
mod mounts;
mod resources;

pub use devices::{device_rules, devices};
use mounts::default_mount;
pub use mounts::{mount_config, parse_mount_options, propagation_flags};
pub use resources::{cgroup_writes, check_controllers};

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
    /// A named spec field is invalid or cannot be honoured here.
    #[error("{0}: {1}")]
    Field(String, String),
}

/// OCI hooks run in the runtime's namespaces — here the guest, which has
/// none of the host's binaries — so a spec with any is refused rather than
/// run without them.
pub fn check_hooks(spec: &Spec) -> Result<(), SpecError> {
    let Some(h) = spec.hooks() else {
        return Ok(());
    };
    let kinds = [
        ("prestart", h.prestart()),
        ("createRuntime", h.create_runtime()),
        ("createContainer", h.create_container()),
        ("startContainer", h.start_container()),
        ("poststart", h.poststart()),
        ("poststop", h.poststop()),
    ];
    for (name, list) in kinds {
        if list.as_ref().is_some_and(|l| !l.is_empty()) {
            return Err(SpecError::Field(
                format!("hooks.{name}"),
                "OCI hooks are not supported: they would run inside the guest, \
                 which has no host binaries"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// Security labels the guest cannot apply (it has no AppArmor or SELinux):
/// accepted and ignored; the caller logs them. The VM boundary is the
/// isolation these would add to.
pub fn ignored_fields(spec: &Spec) -> Vec<&'static str> {
    let mut v = Vec::new();
    if let Some(p) = spec.process() {
        if p.apparmor_profile().as_ref().is_some_and(|a| !a.is_empty()) {
            v.push("process.apparmorProfile");
        }
        if p.selinux_label().as_ref().is_some_and(|a| !a.is_empty()) {
            v.push("process.selinuxLabel");
        }
    }
    if let Some(l) = spec.linux() {
        if l.mount_label().as_ref().is_some_and(|a| !a.is_empty()) {
            v.push("linux.mountLabel");
        }
    }
    v
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
    check_hooks(spec)?;
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
    // Defaults for what the spec leaves out, mounted before the spec's
    // own (which may lie beneath them, e.g. /sys/fs/cgroup under /sys).
    let has = |d: &str| mounts.iter().any(|m: &MountConfig| m.destination == d);
    let mut defaults = Vec::new();
    if !has("/proc") {
        defaults.push(default_mount("/proc", "proc", "proc", ""));
    }
    if !has("/dev") {
        defaults.push(default_mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            "mode=755,size=65536k",
        ));
        if !has("/dev/pts") {
            defaults.push(default_mount(
                "/dev/pts",
                "devpts",
                "devpts",
                "newinstance,ptmxmode=0666,mode=0620",
            ));
        }
        if !has("/dev/shm") {
            defaults.push(default_mount(
                "/dev/shm",
                "shm",
                "tmpfs",
                "mode=1777,size=65536k",
            ));
        }
    }
    if !has("/sys") {
        let mut m = default_mount("/sys", "sysfs", "sysfs", "");
        m.flags |= MsFlags::MS_RDONLY.bits();
        defaults.push(m);
    }
    defaults.append(&mut mounts);
    let mounts = defaults;
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
        devices: devices(spec)?,
        rootfs_propagation: match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
            None | Some("") => 0,
            Some(p) => propagation_flags(p).ok_or_else(|| {
                SpecError::Field(
                    "linux.rootfsPropagation".into(),
                    format!("{p:?} is not one of [r]shared, [r]slave, [r]private, [r]unbindable"),
                )
            })?,
        },
    };
    let (seccomp, seccomp_flags) = match linux.and_then(|l| l.seccomp().as_ref()) {
        Some(s) => (seccomp::compile(s)?, seccomp::filter_flags(s)?),
        None => (Vec::new(), 0),
    };
    let mut process = process_config(process, seccomp)?;
    process.seccomp_flags = seccomp_flags;
    Ok(StageConfig {
        mode: StageMode::Init(Box::new(rootfs)),
        process,
    })
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
        seccomp_flags: 0,
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    pub(crate) const BASE: &str = r#"{
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
            ["/proc", "/dev", "/dev/pts", "/dev/shm", "/sys", "/data"]
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
    fn hooks_are_refused_by_name() {
        let hook = r#"[{"path":"/usr/bin/true"}]"#;
        for kind in [
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop",
        ] {
            let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
            v["hooks"] = serde_json::json!({ kind: serde_json::from_str::<serde_json::Value>(hook).unwrap() });
            let s: Spec = serde_json::from_value(v).unwrap();
            let e = init_stage(&s, None).unwrap_err().to_string();
            assert!(e.contains(&format!("hooks.{kind}")), "{kind}: {e}");
        }
        // Empty lists are nothing to run.
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        v["hooks"] = serde_json::json!({"prestart": [], "poststop": []});
        let s: Spec = serde_json::from_value(v).unwrap();
        assert!(init_stage(&s, None).is_ok());
    }

    #[test]
    fn security_labels_are_ignored_and_reported() {
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        assert!(ignored_fields(&serde_json::from_value(v.clone()).unwrap()).is_empty());
        v["process"]["apparmorProfile"] = "cri-containerd.apparmor.d".into();
        v["process"]["selinuxLabel"] = "system_u:system_r:container_t:s0".into();
        v["linux"]["mountLabel"] = "system_u:object_r:container_file_t:s0".into();
        let s: Spec = serde_json::from_value(v).unwrap();
        assert_eq!(
            ignored_fields(&s),
            [
                "process.apparmorProfile",
                "process.selinuxLabel",
                "linux.mountLabel"
            ]
        );
        assert!(init_stage(&s, None).is_ok());
    }

    #[test]
    fn rootfs_propagation_devices_and_seccomp_flags() {
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        v["linux"]["rootfsPropagation"] = "rshared".into();
        v["linux"]["devices"] = serde_json::json!([
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438}
        ]);
        v["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"],
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]
        });
        let cfg = init_stage(&serde_json::from_value(v.clone()).unwrap(), None).unwrap();
        let StageMode::Init(root) = &cfg.mode else {
            panic!("init mode")
        };
        assert_eq!(
            root.rootfs_propagation,
            (MsFlags::MS_SHARED | MsFlags::MS_REC).bits()
        );
        assert_eq!(root.devices.len(), 1);
        assert_eq!((root.devices[0].major, root.devices[0].minor), (10, 229));
        assert_eq!(
            cfg.process.seccomp_flags,
            libc::SECCOMP_FILTER_FLAG_LOG as u32
        );
        v["linux"]["rootfsPropagation"] = "sideways".into();
        let e = init_stage(&serde_json::from_value(v).unwrap(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("linux.rootfsPropagation"), "{e}");
    }

    #[test]
    fn default_mounts_go_under_the_specs() {
        let mut v: serde_json::Value = serde_json::from_str(BASE).unwrap();
        v["mounts"] = serde_json::json!([
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["size=1m"]}
        ]);
        let cfg = init_stage(&serde_json::from_value(v).unwrap(), None).unwrap();
        let StageMode::Init(root) = &cfg.mode else {
            panic!("init mode")
        };
        let dests: Vec<_> = root.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/sys",
                "/sys/fs/cgroup",
                "/dev/shm"
            ]
        );
    }
}
