//! config → a ready-to-run VM: memory, kernel, zero page, interrupt
//! controllers, devices and vCPUs (created, not yet running).

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use linux_loader::loader::{elf::Elf, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmpod_runtime::hypervisor::console::DEFAULT_CONSOLE_LOG_MAX;
use vmpod_runtime::hypervisor::{VmConfig, VsockBackend};

use crate::arch::layout::{
    ram_regions, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, VIRTIO_FIRST_IRQ, VIRTIO_MMIO_SIZE,
    VIRTIO_MMIO_START,
};
use crate::arch::{bootparams, cpuid, mptable, regs};
use crate::devices::bus::Bus;
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::{self, ConsoleSink, SerialDevice};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{blk, net, rng, vsock, Interrupt, VirtioDevice};
use crate::devices::{ExitSignal, IrqLine};
use crate::hypervisor::kvm::KvmHypervisor;
use crate::hypervisor::{Hypervisor, IoHandler, Vcpu, Vm};
use crate::{cmdline, config};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::Error),
    #[error("allocating {mib} MiB of guest memory: {reason}")]
    Memory { mib: u32, reason: String },
    #[error("loading kernel {path}: {reason}")]
    Kernel { path: String, reason: String },
    #[error("loading initrd {path}: {reason}")]
    Initrd { path: String, reason: String },
    #[error(transparent)]
    Cmdline(#[from] cmdline::Error),
    #[error("writing the command line: {0}")]
    CmdlineWrite(String),
    #[error(transparent)]
    BootParams(#[from] bootparams::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Regs(#[from] regs::Error),
    #[error("console log {path}: {source}")]
    ConsoleLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("creating an event fd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::Error),
    #[error(transparent)]
    Block(#[from] blk::Error),
    #[error(transparent)]
    Net(#[from] net::Error),
    #[error(transparent)]
    Rng(#[from] rng::Error),
    #[error(transparent)]
    Vsock(#[from] vsock::Error),
}

/// Port I/O and MMIO buses as the vCPUs see them.
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

impl IoHandler for IoBuses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(u64::from(port), data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            tracing::debug!(addr = format_args!("{addr:#x}"), "unhandled MMIO read");
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            tracing::debug!(addr = format_args!("{addr:#x}"), "unhandled MMIO write");
        }
    }
}

/// Everything `vmm::run` needs.
pub struct BuiltVm {
    // Field order matters for drop: vCPUs before the VM, the VM before memory.
    pub vcpus: Vec<Box<dyn Vcpu>>,
    pub vm: Box<dyn Vm>,
    pub mem: GuestMemoryMmap,
    pub io: Arc<IoBuses>,
    pub exit: Arc<ExitSignal>,
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// The UART (also on `io.pio`): the run loop flushes its console log.
    pub serial: Arc<Mutex<SerialDevice<File>>>,
    pub vsock_uds: PathBuf,
    pub cmdline: String,
}

/// An IRQ line backed by an eventfd registered as a KVM irqfd.
fn irq_line(vm: &dyn Vm, gsi: u32) -> Result<Arc<dyn IrqLine>, Error> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&evt, gsi)?;
    Ok(Arc::new(evt))
}

/// Knobs of one run that are not part of the guest's [`VmConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Cap on the guest output written to the console log (bytes).
    pub console_log_max: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            console_log_max: DEFAULT_CONSOLE_LOG_MAX,
        }
    }
}

pub fn build(config: &VmConfig, opts: &RunOptions) -> Result<BuiltVm, Error> {
    let kvm = KvmHypervisor::new()?;
    config::validate(config, kvm.max_vcpus())?;
    let pvm = cmdline::host_is_pvm();
    let mem_bytes = u64::from(config.memory_mib) << 20;

    let vm = kvm.create_vm()?;
    let mem = create_memory(config.memory_mib)?;
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: the mapping lives in `mem`, which BuiltVm keeps alive
        // alongside (and drops after) the VM.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().raw_value(),
                region.len(),
                region.as_ptr() as u64,
            )?;
        }
    }
    vm.create_irq_controllers()?;
    let exit = Arc::new(ExitSignal::new().map_err(Error::EventFd)?);

    // Legacy devices.
    let mut pio = Bus::new();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.console_log)
        .map_err(|source| Error::ConsoleLog {
            path: config.console_log.display().to_string(),
            source,
        })?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        irq_line(vm.as_ref(), serial::COM1_IRQ)?,
        ConsoleSink::new(log, opts.console_log_max, exit.clone()),
    )));
    pio.insert(serial.clone(), serial::COM1_PORT, serial::PORT_LEN)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        i8042::I8042_PORT,
        i8042::PORT_LEN,
    )?;

    // virtio devices: disks first so the first disk is vda.
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in &config.disks {
        devices.push(Box::new(blk::Block::open(&d.path, d.read_only)?));
    }
    for n in &config.nets {
        let mac = vmpod_runtime::hypervisor::parse_mac(&n.mac)
            .ok_or_else(|| config::Error::Invalid(format!("MAC address {:?}", n.mac)))?;
        devices.push(Box::new(net::Net::open(&n.tap, mac)?));
    }
    if config.rng {
        devices.push(Box::new(rng::Rng::new()?));
    }
    let cid = u64::from(config.guest_cid);
    devices.push(match config.vsock_backend {
        VsockBackend::Userspace => Box::new(vsock::Vsock::new(cid, &config.vsock_uds)?),
        VsockBackend::Vhost => Box::new(vsock::vhost::VhostVsock::new(cid, &config.vsock_uds)?),
    });

    let mut mmio = Bus::new();
    let mut virtio = Vec::new();
    let mut locations = Vec::new();
    for (i, dev) in devices.into_iter().enumerate() {
        let addr = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_FIRST_IRQ + i as u32;
        let interrupt = Interrupt::new(irq_line(vm.as_ref(), irq)?);
        let t = Arc::new(Mutex::new(MmioTransport::new(dev, mem.clone(), interrupt)));
        mmio.insert(t.clone(), addr, VIRTIO_MMIO_SIZE)?;
        virtio.push(t);
        locations.push((addr, irq));
    }

    // Kernel, initrd, command line, zero page, MP table.
    let mut kernel = File::open(&config.kernel).map_err(|e| Error::Kernel {
        path: config.kernel.display().to_string(),
        reason: e.to_string(),
    })?;
    let loaded =
        Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            Error::Kernel {
                path: config.kernel.display().to_string(),
                reason: e.to_string(),
            }
        })?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(&mem, mem_bytes, loaded.kernel_end, path)?),
        None => None,
    };
    let line = cmdline::assemble(&config.cmdline, &locations, pvm)?;
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::CmdlineWrite(e.to_string()))?;
    cl.insert_str(&line)
        .map_err(|e| Error::CmdlineWrite(e.to_string()))?;
    load_cmdline(&mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| Error::CmdlineWrite(e.to_string()))?;
    let params = bootparams::build(mem_bytes, line.len() + 1, initrd)?;
    bootparams::write(&mem, &params)?;
    mptable::write(&mem, config.vcpus)?;

    // vCPUs.
    let supported = kvm.supported_cpuid()?;
    let tsc_deadline = supported
        .as_slice()
        .iter()
        .any(|e| e.function == 1 && e.ecx & (1 << 24) != 0);
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = vm.create_vcpu(id)?;
        let mut cpuid = supported.clone();
        cpuid::filter(
            cpuid.as_mut_slice(),
            cpuid::CpuidParams {
                vcpu_id: id,
                vcpu_count: config.vcpus,
                tsc_deadline,
                no_pv_hypercalls: pvm,
            },
        );
        vcpu.set_cpuid(&cpuid)?;
        let msrs = regs::boot_msrs();
        let set = vcpu.set_msrs(&msrs)?;
        if set != msrs.len() {
            tracing::debug!(set, wanted = msrs.len(), "KVM accepted only some boot MSRs");
        }
        let mut lapic = vcpu.get_lapic()?;
        regs::set_lint(&mut lapic);
        vcpu.set_lapic(&lapic)?;
        if id == 0 {
            vcpu.set_regs(&regs::boot_regs(loaded.kernel_load.raw_value()))?;
            let mut sregs = vcpu.get_sregs()?;
            regs::setup_sregs(&mem, &mut sregs)?;
            vcpu.set_sregs(&sregs)?;
            vcpu.set_fpu(&regs::boot_fpu())?;
        }
        vcpus.push(vcpu);
    }

    tracing::info!(
        kernel = %config.kernel.display(),
        memory_mib = config.memory_mib,
        vcpus = config.vcpus,
        pvm,
        cmdline = %line,
        "VM built"
    );
    Ok(BuiltVm {
        vcpus,
        vm,
        mem,
        io: Arc::new(IoBuses { pio, mmio }),
        exit,
        virtio,
        serial,
        vsock_uds: config.vsock_uds.clone(),
        cmdline: line,
    })
}

fn create_memory(mib: u32) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(u64::from(mib) << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    // Anonymous private mappings: pages are only backed once the guest
    // touches them, so start-up cost does not grow with the memory size.
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory {
        mib,
        reason: e.to_string(),
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel_end: u64,
    path: &std::path::Path,
) -> Result<bootparams::InitrdInfo, Error> {
    let err = |reason: String| Error::Initrd {
        path: path.display().to_string(),
        reason,
    };
    let mut f = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let addr = bootparams::initrd_addr(mem_bytes, kernel_end, size)
        .ok_or_else(|| err(format!("{size} bytes do not fit in guest memory")))?;
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| err(e.to_string()))?;
    Ok(bootparams::InitrdInfo { addr, size })
}
