//! vhost-kernel vsock (`/dev/vhost-vsock`): the host kernel moves the
//! guest's vsock packets; the VMM only hands it the rings.
//!
//! - Kicks: the transport's QueueNotify write for RX/TX is forwarded to the
//!   queue's kick eventfd (no KVM ioeventfd needed).
//! - Interrupts: the kernel signals a call eventfd per queue; the VMM's
//!   event loop watches them (through this device's epoll fd, as for the
//!   userspace muxer) and raises the virtio-mmio interrupt with the status
//!   bit set, which the guest driver reads.
//! - Event queue (2): kept by the VMM and never used (no migration).
//! - Host side: the same hybrid unix socket as the userspace device, bridged
//!   to the host kernel's AF_VSOCK by [`HybridProxy`]. Host-initiated
//!   connections only (see `hybrid_proxy`).
//!
//! Select it with `vsock_backend = "vhost"` (VM config) where
//! `/dev/vhost-vsock` exists; `vmpod check` reports whether it does.
//! These CI hosts have no `/dev/vhost-vsock`: the proxy and selection are
//! tested here, the kernel data path only where the device exists.

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

use vhost::vhost_kern::vsock::Vsock as KernVsock;
use vhost::vsock::VhostVsock as _;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::hybrid_proxy::{HybridProxy, KernelVsock};
use super::{Error, QUEUE_SIZES, RX, TX};
use crate::devices::virtio::{
    expect_queues, read_config_bytes, ActivateError, Interrupt, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};

pub const VHOST_VSOCK_DEV: &str = "/dev/vhost-vsock";

/// Ring features the kernel implements and we pass through to the driver.
const PASSTHROUGH_FEATURES: u64 = VIRTIO_F_VERSION_1
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Whether `/dev/vhost-vsock` can be used here, and if not why.
pub fn available() -> Result<(), String> {
    available_at(Path::new(VHOST_VSOCK_DEV))
}

fn available_at(dev: &Path) -> Result<(), String> {
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{} does not exist (vhost_vsock module not loaded)",
            dev.display()
        )),
        Err(e) => Err(format!("{} cannot be opened: {e}", dev.display())),
    }
}

/// Why the vhost-kernel back-end is not in use (for logs and `vmpod check`).
pub fn unavailable_reason() -> String {
    match available() {
        Ok(()) => format!("{VHOST_VSOCK_DEV} exists; select it with vsock_backend = \"vhost\""),
        Err(why) => why,
    }
}

fn vhost_err(op: &'static str) -> impl Fn(vhost::Error) -> Error {
    move |e| Error::Io {
        op,
        source: std::io::Error::other(format!("vhost-vsock: {e}")),
    }
}

pub struct VhostVsock {
    cid: u64,
    mem: Mem,
    kern: KernVsock<Mem>,
    kernel_features: u64,
    acked: u64,
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    epoll: Epoll,
    irq: Option<Interrupt>,
    running: bool,
    interrupts: u64,
    _proxy: HybridProxy,
}

impl VhostVsock {
    /// Open `/dev/vhost-vsock` for guest `cid` and serve the hybrid socket
    /// `uds` in front of it.
    pub fn new(cid: u64, uds: &Path) -> Result<Self, Error> {
        available().map_err(|why| Error::Io {
            op: "opening the vhost-kernel vsock",
            source: std::io::Error::new(std::io::ErrorKind::NotFound, why),
        })?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let kern = KernVsock::new(mem.clone()).map_err(vhost_err("open"))?;
        kern.set_owner().map_err(vhost_err("VHOST_SET_OWNER"))?;
        let kernel_features = kern
            .get_features()
            .map_err(vhost_err("VHOST_GET_FEATURES"))?;
        let io = |op| move |source| Error::Io { op, source };
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"));
        let kicks = [efd()?, efd()?];
        let calls = [efd()?, efd()?];
        let epoll = Epoll::new().map_err(io("epoll_create"))?;
        for (i, c) in calls.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    c.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(io("epoll_ctl"))?;
        }
        let cid32 = u32::try_from(cid).map_err(|_| Error::Io {
            op: "guest CID",
            source: std::io::Error::other("CID does not fit AF_VSOCK's 32 bits"),
        })?;
        let proxy = HybridProxy::start(uds, KernelVsock { cid: cid32 })?;
        tracing::info!(cid, uds = %uds.display(), "vsock: vhost-kernel back-end");
        Ok(Self {
            cid,
            mem,
            kern,
            kernel_features,
            acked: 0,
            kicks,
            calls,
            epoll,
            irq: None,
            running: false,
            interrupts: 0,
            _proxy: proxy,
        })
    }

    fn setup(&mut self, mem: GuestMemoryMmap, queues: &[Queue]) -> Result<(), Error> {
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                ..Default::default()
            })
            .collect();
        self.mem
            .lock()
            .map_err(|_| Error::Io {
                op: "guest memory",
                source: std::io::Error::other("lock poisoned"),
            })?
            .replace(mem);
        let k = &self.kern;
        k.set_features(self.acked & self.kernel_features)
            .map_err(vhost_err("VHOST_SET_FEATURES"))?;
        k.set_mem_table(&regions)
            .map_err(vhost_err("VHOST_SET_MEM_TABLE"))?;
        for (i, q) in queues.iter().enumerate().take(2) {
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: q.desc_table(),
                used_ring_addr: q.used_ring(),
                avail_ring_addr: q.avail_ring(),
                log_addr: None,
            };
            k.set_vring_num(i, q.size())
                .map_err(vhost_err("VHOST_SET_VRING_NUM"))?;
            k.set_vring_addr(i, &ring)
                .map_err(vhost_err("VHOST_SET_VRING_ADDR"))?;
            k.set_vring_base(i, q.next_avail())
                .map_err(vhost_err("VHOST_SET_VRING_BASE"))?;
            k.set_vring_call(i, &self.calls[i])
                .map_err(vhost_err("VHOST_SET_VRING_CALL"))?;
            k.set_vring_kick(i, &self.kicks[i])
                .map_err(vhost_err("VHOST_SET_VRING_KICK"))?;
        }
        k.set_guest_cid(self.cid)
            .map_err(vhost_err("VHOST_VSOCK_SET_GUEST_CID"))?;
        k.start().map_err(vhost_err("VHOST_VSOCK_SET_RUNNING"))?;
        self.running = true;
        Ok(())
    }
}

impl VirtioDevice for VhostVsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (self.kernel_features & PASSTHROUGH_FEATURES)
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let queues = expect_queues(queues, 3)?;
        self.irq = Some(irq);
        self.setup(mem, &queues)
            .map_err(|e| ActivateError::Backend(e.to_string()))
    }
    fn queue_notify(&mut self, index: u16) {
        let i = index as usize;
        if self.running && (i == RX || i == TX) {
            if let Err(e) = self.kicks[i].write(1) {
                tracing::warn!(error = %e, queue = i, "vhost-vsock kick");
            }
        }
    }
    fn reset(&mut self) {
        if self.running {
            if let Err(e) = self.kern.stop() {
                tracing::warn!(error = %e, "vhost-vsock stop");
            }
            self.running = false;
        }
        self.irq = None;
    }
    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }
    fn backend_event(&mut self) {
        // Consume both call eventfds; one interrupt covers both queues.
        let mut signalled = false;
        for c in &self.calls {
            signalled |= c.read().is_ok();
        }
        if let (true, Some(irq)) = (signalled, self.irq.as_ref()) {
            irq.signal_used();
            self.interrupts += 1;
        }
    }
    fn stats(&self) -> (&'static str, String) {
        (
            "vhost-vsock",
            format!("running={} interrupts={}", self.running, self.interrupts),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_names_the_device() {
        let missing = available_at(Path::new("/nonexistent/vhost-vsock")).unwrap_err();
        assert!(missing.contains("does not exist"), "{missing}");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vhost-vsock");
        std::fs::write(&f, b"").unwrap();
        assert!(available_at(&f).is_ok());
        assert!(unavailable_reason().contains(VHOST_VSOCK_DEV));
    }

    #[test]
    fn new_fails_clearly_without_the_device() {
        if available().is_ok() {
            eprintln!("skip: {VHOST_VSOCK_DEV} exists here; the failure path is not reachable");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let uds = d.path().join("vm.vsock");
        let err = VhostVsock::new(3, &uds)
            .err()
            .expect("no device, no back-end");
        assert!(err.to_string().contains(VHOST_VSOCK_DEV), "{err}");
        assert!(!uds.exists(), "nothing bound when the device is missing");
    }
}
