//! vmpod-vmm: the built-in KVM VMM (library; `vmpod vm run --hypervisor
//! builtin` calls [`run_foreground`]).
//!
//! Shape: plain config ([`vmpod_runtime::hypervisor::VmConfig`]) →
//! [`builder`] (memory, kernel, devices, vCPUs) → [`vmm`] (run loop).
//! KVM sits behind the narrow traits in [`hypervisor`]; devices in
//! [`devices`] only see bus accesses, guest memory and interrupt lines.

pub mod arch;
pub mod builder;
pub mod cmdline;
pub mod config;
pub mod devices;
mod event_loop;
pub mod hypervisor;
pub mod vmm;

use vmpod_runtime::hypervisor::{ExitReason, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] builder::Error),
    #[error(transparent)]
    Run(#[from] vmm::Error),
}

impl Error {
    /// True when the config itself was bad (as opposed to the host failing).
    pub fn is_invalid_config(&self) -> bool {
        matches!(self, Error::Build(builder::Error::Config(_)))
    }
}

/// Run one VM in the calling process until the guest powers off, reboots
/// or crashes, or SIGTERM/SIGINT arrives (handled here: the VM is stopped
/// and `Stopped` returned). The vsock socket is removed on return.
pub fn run_foreground(config: &VmConfig, opts: &RunOptions) -> Result<ExitReason, Error> {
    // Before build: a stop signal during build must not kill us with the
    // vsock socket bound.
    let stop = vmm::StopSignal::install()?;
    let vm = builder::build(config, opts)?;
    Ok(vmm::run(vm, stop)?)
}

pub use builder::RunOptions;
pub use cmdline::host_is_pvm;
