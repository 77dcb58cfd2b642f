//! Narrow hypervisor traits. The builder and the vCPU loop talk to these;
//! device code never sees them. [`kvm`] is the only implementation.

pub mod kvm;

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs, CpuId};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("KVM ioctl {op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Ioctl { op, source }
}

/// Port and MMIO accesses a vCPU cannot handle itself go here.
pub trait IoHandler {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why `Vcpu::run` returned (port/MMIO exits are handled inside `run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// Port or MMIO access handled; just run again.
    Handled,
    /// KVM_RUN was interrupted by a signal (we were asked to stop).
    Interrupted,
    Hlt,
    /// Triple fault or similar: KVM_EXIT_SHUTDOWN.
    Shutdown,
    /// The guest asked to power off (KVM: system event SHUTDOWN).
    PowerOff,
    /// The guest asked for a reset (KVM: system event RESET).
    Reset,
    /// The in-kernel emulator gave up (KVM_EXIT_INTERNAL_ERROR).
    InternalError {
        suberror: u32,
        data: Vec<u64>,
    },
    /// VM entry failed (hardware reason).
    FailEntry(u64),
    /// Anything else we do not expect.
    Unexpected(String),
}

/// The parts of a hypervisor the builder needs.
pub trait Hypervisor {
    fn create_vm(&self) -> Result<Box<dyn Vm>>;
    /// CPUID the hypervisor can offer (before our filtering).
    fn supported_cpuid(&self) -> Result<CpuId>;
}

pub trait Vm: Send + Sync {
    /// Map host memory at `host_addr` as guest physical `guest_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped for the VM's lifetime.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()>;
    /// In-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.
    fn create_irq_controllers(&self) -> Result<()>;
    /// Raise `gsi` whenever `fd` is written.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>>;
}

pub trait Vcpu: Send {
    fn set_cpuid(&self, cpuid: &CpuId) -> Result<()>;
    /// Returns how many of the MSRs were accepted.
    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<usize>;
    fn get_regs(&self) -> Result<kvm_regs>;
    fn set_regs(&self, regs: &kvm_regs) -> Result<()>;
    fn get_sregs(&self) -> Result<kvm_sregs>;
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()>;
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()>;
    fn get_lapic(&self) -> Result<kvm_lapic_state>;
    fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()>;
    /// Run until an exit that is not a port/MMIO access handled by `io`.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit>;
    /// Make the next (or current, once interrupted) KVM_RUN return at once.
    fn set_immediate_exit(&mut self, exit: bool);
}
