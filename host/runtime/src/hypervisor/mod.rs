//! The hypervisor seam: the only thing the sandbox code knows about VMs.
//!
//! Two backends implement [`Hypervisor`]: `builtin` (our KVM VMM, see the
//! `vmpod-vmm` crate) and `qemu` (`qemu-system-x86_64 -M microvm` plus
//! vhost-user helpers). Both expose the guest's vsock through a unix socket
//! speaking Firecracker's hybrid-vsock protocol, so callers are identical.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Plain data describing one microVM. Backends translate it; nothing here is
/// backend-specific.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmConfig {
    /// Uncompressed `vmlinux` ELF.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line as given by the user; backends may append what the
    /// host needs (e.g. PVM feature masks) but never drop any of it.
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Host side of the guest's vsock (hybrid vsock unix socket).
    pub vsock_uds: PathBuf,
    /// Guest CID (>= 3).
    pub guest_cid: u32,
    /// Serial console output goes here.
    pub console_log: PathBuf,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub shared_dirs: Vec<SharedDirConfig>,
    pub rng: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: String,
}

/// A host directory shared into the guest with virtio-fs under `tag`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SharedDirConfig {
    pub tag: String,
    pub path: PathBuf,
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// Guest powered off (or halted all CPUs cleanly).
    PowerOff,
    /// Guest asked for a reboot (microVMs treat that as exit).
    Reboot,
    /// The guest died: panic, triple fault, emulation failure, ...
    Crashed(String),
    /// We (or a signal) stopped it.
    Stopped,
}

impl ExitReason {
    /// Clean exits map to process exit code 0.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::PowerOff | ExitReason::Reboot | ExitReason::Stopped
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("invalid VM config: {0}")]
    InvalidConfig(String),
    #[error("failed to start VM: {0}")]
    Start(String),
    #[error("VM i/o error during {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// A backend able to start microVMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Short name: `builtin` or `qemu`.
    fn name(&self) -> &'static str;
    /// Start a VM; returns once the VMM process runs (not once the guest booted).
    async fn start(&self, config: &VmConfig) -> Result<Box<dyn VmHandle>>;
}

/// One running VM. Dropping a handle must not leak anything: implementations
/// kill their processes and remove their sockets on drop.
#[async_trait]
pub trait VmHandle: Send {
    fn vsock_uds(&self) -> &std::path::Path;
    fn console_log(&self) -> &std::path::Path;
    /// PID of the main VMM process (for stats and debugging).
    fn pid(&self) -> Option<u32>;
    /// Stop the VM (graceful, then forceful) and clean up every helper.
    async fn stop(&mut self) -> Result<ExitReason>;
    /// Wait until the VM exits on its own.
    async fn wait(&mut self) -> Result<ExitReason>;
}
