//! The plain-data description of one process set-up, handed from the agent
//! to the staged child (`vmpod-agent __stage2`) as JSON over a pipe.
//!
//! The agent translates the OCI spec into this (see `spec.rs`) so the child
//! never parses OCI itself and the translation is unit-testable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageConfig {
    pub mode: StageMode,
    pub process: ProcessConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StageMode {
    /// A container's init: fresh namespaces (created by clone), set up the
    /// rootfs and mounts.
    Init(Box<RootfsConfig>),
    /// An extra process joining a running container's namespaces.
    Exec {
        /// Namespace files (`/proc/<init>/ns/<kind>`) to join, in order.
        namespaces: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootfsConfig {
    pub path: String,
    pub readonly: bool,
    pub mounts: Vec<MountConfig>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctls: BTreeMap<String, String>,
    /// Unshare a cgroup namespace once in the container's cgroup.
    pub new_cgroupns: bool,
    /// /dev is a fresh tmpfs: populate the default device nodes.
    pub populate_dev: bool,
    /// Existing namespaces (ipc/uts/cgroup files) to join first.
    pub join_namespaces: Vec<String>,
    /// Device nodes to create (`linux.devices`), after /dev is set up.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Propagation of the container's `/` (`linux.rootfsPropagation`,
    /// `MS_SHARED`/`MS_SLAVE`/`MS_PRIVATE`/`MS_UNBINDABLE` [| `MS_REC`]);
    /// 0 = leave it private.
    #[serde(default)]
    pub rootfs_propagation: u64,
}

/// One device node (`linux.devices`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Absolute path in the container.
    pub path: String,
    /// `c` (character), `b` (block) or `p` (FIFO).
    pub kind: char,
    pub major: u32,
    pub minor: u32,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountConfig {
    pub destination: String,
    pub source: String,
    pub fstype: String,
    /// `MS_*` flags.
    pub flags: u64,
    /// Propagation flags applied after the mount (`MS_PRIVATE`, ...).
    pub propagation: u64,
    /// Filesystem-specific options (comma separated).
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: UserConfig,
    pub terminal: bool,
    pub capabilities: CapsConfig,
    pub no_new_privs: bool,
    pub rlimits: Vec<RlimitConfig>,
    pub oom_score_adj: Option<i32>,
    /// Seccomp BPF programs (compiled by the agent), installed in order
    /// right before exec; empty = no filter.
    pub seccomp: Vec<Vec<SockFilter>>,
    /// `SECCOMP_FILTER_FLAG_*` for seccomp(2) when installing them.
    #[serde(default)]
    pub seccomp_flags: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UserConfig {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// Resolved against the container's /etc/passwd (and /etc/group for
    /// `user:group`) when set; overrides uid/gid.
    pub username: Option<String>,
}

/// Capability names (`CAP_NET_RAW`, ...) per set; `None` = leave as is.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CapsConfig {
    pub bounding: Option<Vec<String>>,
    pub effective: Option<Vec<String>>,
    pub permitted: Option<Vec<String>>,
    pub inheritable: Option<Vec<String>>,
    pub ambient: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RlimitConfig {
    /// `RLIMIT_*` resource number.
    pub resource: i32,
    pub soft: u64,
    pub hard: u64,
}
