//! KVM implementation of the hypervisor traits (kvm-ioctls).

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{ioctl_err, Error, Hypervisor, IoHandler, Result, Vcpu, VcpuExit, Vm};

/// Address of the TSS KVM needs below 4 GiB (inside the MMIO gap's top).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::Open)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(Error::ApiVersion(v));
        }
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::SetTssAddr, "SET_TSS_ADDR"),
            (Cap::Pit2, "PIT2"),
            (Cap::ExtCpuid, "EXT_CPUID"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
        ] {
            // IRQFD is only reported once an irqchip exists on some hosts
            // (PVM); checked again when the VM is set up.
            if cap != Cap::Irqfd && !kvm.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        Ok(Self { kvm })
    }

    /// Largest vCPU count KVM recommends.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_nr_vcpus()
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        let fd = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        Ok(Box::new(KvmVm { fd }))
    }

    fn supported_cpuid(&self) -> Result<CpuId> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))
    }
}

pub struct KvmVm {
    fd: VmFd,
}

impl Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range outlives the VM.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))
    }

    fn create_irq_controllers(&self) -> Result<()> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(ioctl_err("KVM_CREATE_PIT2"))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(ioctl_err("KVM_IRQFD"))
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        Ok(Box::new(KvmVcpu { fd }))
    }
}

pub struct KvmVcpu {
    fd: VcpuFd,
}

/// What `run` saw, with no borrow of the vCPU left (so the internal-error
/// details can be read from `kvm_run` afterwards).
enum RawExit {
    Done(VcpuExit),
    Internal,
}

/// KVM_EXIT_SYSTEM_EVENT's type as our exit (the numbers stay here).
fn system_event(kind: u32) -> VcpuExit {
    match kind {
        KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::PowerOff,
        KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
        KVM_SYSTEM_EVENT_CRASH => VcpuExit::Unexpected("guest crash system event".into()),
        other => VcpuExit::Unexpected(format!("system event {other}")),
    }
}

impl Vcpu for KvmVcpu {
    fn set_cpuid(&self, cpuid: &CpuId) -> Result<()> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))
    }

    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<usize> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Ioctl {
            op: "KVM_SET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd.set_msrs(&msrs).map_err(ioctl_err("KVM_SET_MSRS"))
    }

    fn get_regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))
    }

    fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(ioctl_err("KVM_SET_REGS"))
    }

    fn get_sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))
    }

    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(ioctl_err("KVM_SET_SREGS"))
    }

    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.fd.set_fpu(fpu).map_err(ioctl_err("KVM_SET_FPU"))
    }

    fn get_lapic(&self) -> Result<kvm_lapic_state> {
        self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))
    }

    fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()> {
        self.fd.set_lapic(lapic).map_err(ioctl_err("KVM_SET_LAPIC"))
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit> {
        use kvm_ioctls::VcpuExit as K;
        let raw = match self.fd.run() {
            Ok(K::IoIn(port, data)) => {
                io.pio_read(port, data);
                RawExit::Done(VcpuExit::Handled)
            }
            Ok(K::IoOut(port, data)) => {
                io.pio_write(port, data);
                RawExit::Done(VcpuExit::Handled)
            }
            Ok(K::MmioRead(addr, data)) => {
                io.mmio_read(addr, data);
                RawExit::Done(VcpuExit::Handled)
            }
            Ok(K::MmioWrite(addr, data)) => {
                io.mmio_write(addr, data);
                RawExit::Done(VcpuExit::Handled)
            }
            Ok(K::Hlt) => RawExit::Done(VcpuExit::Hlt),
            Ok(K::Shutdown) => RawExit::Done(VcpuExit::Shutdown),
            Ok(K::SystemEvent(kind, _)) => RawExit::Done(system_event(kind)),
            Ok(K::FailEntry(reason, _cpu)) => RawExit::Done(VcpuExit::FailEntry(reason)),
            Ok(K::InternalError) => RawExit::Internal,
            Ok(K::Intr) => RawExit::Done(VcpuExit::Interrupted),
            Ok(other) => RawExit::Done(VcpuExit::Unexpected(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                RawExit::Done(VcpuExit::Interrupted)
            }
            Err(e) => {
                return Err(Error::Ioctl {
                    op: "KVM_RUN",
                    source: e,
                })
            }
        };
        Ok(match raw {
            RawExit::Done(exit) => exit,
            RawExit::Internal => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the union is the one KVM filled.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                VcpuExit::InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                }
            }
        })
    }

    fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_events_map_to_our_exits() {
        assert_eq!(system_event(KVM_SYSTEM_EVENT_SHUTDOWN), VcpuExit::PowerOff);
        assert_eq!(system_event(KVM_SYSTEM_EVENT_RESET), VcpuExit::Reset);
        assert!(matches!(
            system_event(KVM_SYSTEM_EVENT_CRASH),
            VcpuExit::Unexpected(w) if w.contains("crash")
        ));
        assert_eq!(
            system_event(99),
            VcpuExit::Unexpected("system event 99".into())
        );
    }
}
