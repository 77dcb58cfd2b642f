//! The hypervisor seam: the only thing the sandbox code knows about VMs.
//!
//! Two backends implement [`Hypervisor`]:
//! - [`builtin::BuiltinHypervisor`]: our KVM VMM (crate `vmpod-vmm`), run as
//!   a supervised child process `vmpod vm run --hypervisor builtin`.
//! - [`qemu::QemuHypervisor`]: `qemu-system-x86_64 -M microvm` plus the
//!   vhost-user back-ends: our vsock device (`vmpod vm vhost-user-vsock`)
//!   and `virtiofsd`.
//!
//! Both expose the guest's vsock through a unix socket speaking Firecracker's
//! hybrid-vsock protocol (host connects to [`VmHandle::vsock_uds`], writes
//! `CONNECT <port>\n` in one write, reads `OK <port>\n`; guest connections
//! to CID 2 port P arrive at `<vsock_uds>_P`), so callers are identical.
//! Both run the same vsock device code (credit flow control, half-close).
//!
//! Typical use (async):
//! ```no_run
//! # async fn demo(config: vmpod_runtime::hypervisor::VmConfig) -> vmpod_runtime::hypervisor::Result<()> {
//! use vmpod_runtime::hypervisor::{qemu::{Accel, QemuHypervisor}, Hypervisor};
//! let hv = QemuHypervisor::discover(Accel::Auto)?;
//! let vm = hv.start(&config).await?; // validates the config first
//! // ... talk to the guest through vm.vsock_uds() ...
//! let reason = vm.stop().await?; // or vm.wait().await? until the guest exits
//! # Ok(()) }
//! ```
//! Dropping a handle kills the VM and every helper and removes the sockets.

pub mod builtin;
pub mod cmdline;
pub mod console;
pub mod handle;
pub mod host;
mod process;
pub mod qemu;
pub mod select;
pub mod tools;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use validate::{parse_mac, MIN_MEMORY_MIB, VIRTIO_FS_TAG_MAX};

/// Plain data describing one microVM. Backends translate it; nothing here is
/// backend-specific.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmConfig {
    /// Uncompressed `vmlinux` ELF.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line as given by the user; backends add what the host
    /// needs ([`cmdline::compose`]: `console=ttyS0` first, PVM feature masks
    /// and defaults after) but never drop or change any of it.
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
    /// Who moves the guest's vsock packets (built-in VMM only).
    #[serde(default)]
    pub vsock_backend: VsockBackend,
}

/// The built-in VMM's vsock data path. Either way callers see the same
/// hybrid unix socket at [`VmConfig::vsock_uds`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VsockBackend {
    /// Our device in the VMM process (host- and guest-initiated
    /// connections). QEMU always serves vsock this way (vhost-user).
    #[default]
    Userspace,
    /// The host kernel's vhost-vsock (`/dev/vhost-vsock`); host-initiated
    /// connections only.
    Vhost,
}

impl std::str::FromStr for VsockBackend {
    type Err = HypervisorError;
    fn from_str(s: &str) -> Result<VsockBackend> {
        match s {
            "userspace" => Ok(VsockBackend::Userspace),
            "vhost" => Ok(VsockBackend::Vhost),
            other => Err(HypervisorError::InvalidConfig(format!(
                "unknown vsock back-end {other:?} (expected userspace or vhost)"
            ))),
        }
    }
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

/// A host directory shared into the guest with virtio-fs under `tag`
/// (guest: `mount -t virtiofs <tag> /mnt`).
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

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::PowerOff => f.write_str("guest powered off"),
            ExitReason::Reboot => f.write_str("guest rebooted"),
            ExitReason::Crashed(why) => write!(f, "guest crashed: {why}"),
            ExitReason::Stopped => f.write_str("stopped"),
        }
    }
}

/// Which backend runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    Builtin,
    Qemu,
}

impl std::str::FromStr for HypervisorKind {
    type Err = HypervisorError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "builtin" => Ok(HypervisorKind::Builtin),
            "qemu" => Ok(HypervisorKind::Qemu),
            other => Err(HypervisorError::InvalidConfig(format!(
                "unknown hypervisor {other:?} (expected builtin or qemu)"
            ))),
        }
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HypervisorKind::Builtin => "builtin",
            HypervisorKind::Qemu => "qemu",
        })
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

impl HypervisorError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> HypervisorError {
        move |source| HypervisorError::Io { op, source }
    }
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// A backend able to start microVMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Short name: `builtin` or `qemu`.
    fn name(&self) -> &'static str;
    /// Validate `config`, then start a VM; returns once the VMM process runs
    /// (not once the guest booted).
    async fn start(&self, config: &VmConfig) -> Result<Box<dyn VmHandle>>;
}

/// One running VM. Methods take `&self` so one task can [`wait`](Self::wait)
/// while another calls [`stop`](Self::stop) (share it in an `Arc`).
/// Dropping a handle must not leak anything: implementations kill their
/// processes and remove their sockets on drop.
#[async_trait]
pub trait VmHandle: Send + Sync {
    fn vsock_uds(&self) -> &Path;
    fn console_log(&self) -> &Path;
    /// PID of the main VMM process (for stats and debugging).
    fn pid(&self) -> Option<u32>;
    /// Stop the VM (graceful, then forceful) and clean up every helper.
    /// Returns the exit reason (the guest's own if it had already exited).
    async fn stop(&self) -> Result<ExitReason>;
    /// Wait until the VM exits on its own (or is stopped).
    async fn wait(&self) -> Result<ExitReason>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reason_cleanliness() {
        assert!(ExitReason::PowerOff.is_clean());
        assert!(ExitReason::Stopped.is_clean());
        assert!(!ExitReason::Crashed("x".into()).is_clean());
        assert_eq!(
            ExitReason::Crashed("Kernel panic".into()).to_string(),
            "guest crashed: Kernel panic"
        );
    }

    #[test]
    fn hypervisor_kind_parses() {
        assert_eq!(
            "qemu".parse::<HypervisorKind>().unwrap(),
            HypervisorKind::Qemu
        );
        let err = "xen".parse::<HypervisorKind>().unwrap_err().to_string();
        assert!(err.contains("xen"), "{err}");
    }
}
