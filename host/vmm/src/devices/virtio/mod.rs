//! virtio devices over the virtio-mmio transport.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::IrqLine;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bit: a used buffer was added.
pub const INT_USED_RING: u32 = 0x1;
/// Interrupt status bit: configuration changed.
pub const INT_CONFIG: u32 = 0x2;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queues, driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device backend: {0}")]
    Backend(String),
}

/// A device's interrupt: the status register the transport exposes plus
/// the line that raises the guest IRQ.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Arc<dyn IrqLine>,
}

impl Interrupt {
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            line,
        }
    }

    /// Tell the driver it has used buffers to look at.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::warn!(error = %e, "virtio interrupt");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// One entry per queue: its maximum size.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (must include VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// The subset the driver accepted (called before activation).
    fn ack_features(&mut self, _features: u64) {}
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver is ready: start serving `queues`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// The driver kicked queue `index` (only called once active).
    fn queue_notify(&mut self, index: u16);
    /// Driver reset: drop queues and any backend state tied to them.
    fn reset(&mut self);
    /// A host fd whose readiness the event loop should report to us.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// `backend_fd` became ready.
    fn backend_event(&mut self) {}
    /// Called about once a second (timeouts).
    fn tick(&mut self) {}
    /// Short device name and counters for the exit summary, e.g.
    /// `("virtio-rng", "requests=3 bytes=192")`.
    fn stats(&self) -> (&'static str, String);
}

/// Exactly `n` queues, or QueueCount (multi-queue devices: net, vsock).
pub fn expect_queues(queues: Vec<Queue>, n: usize) -> Result<Vec<Queue>, ActivateError> {
    if queues.len() == n {
        Ok(queues)
    } else {
        Err(ActivateError::QueueCount {
            expected: n,
            got: queues.len(),
        })
    }
}

/// The one queue of a single-queue device (blk, rng), or QueueCount.
pub fn single_queue(queues: Vec<Queue>) -> Result<Queue, ActivateError> {
    let got = queues.len();
    let mut it = queues.into_iter();
    match (it.next(), it.next()) {
        (Some(q), None) => Ok(q),
        _ => Err(ActivateError::QueueCount { expected: 1, got }),
    }
}

/// Copy from a device's config space with bounds checks (out of range
/// reads return zeros).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - off);
    data[..n].copy_from_slice(&config[off..off + n]);
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Guest memory with a split virtqueue, for device tests.
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::{Interrupt, IrqLine};

    pub const F_NEXT: u16 = 1;
    pub const F_WRITE: u16 = 2;

    #[derive(Default)]
    pub struct CountIrq(pub AtomicUsize);
    impl IrqLine for CountIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    pub fn irq() -> (Interrupt, Arc<CountIrq>) {
        let c = Arc::new(CountIrq::default());
        (Interrupt::new(c.clone()), c)
    }

    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    /// Entries per test queue.
    pub const QSIZE: u16 = 16;

    /// A split virtqueue of [`QSIZE`] entries at guest address `base`, laid
    /// out by hand: descriptor table at `base`, avail ring at `base +
    /// 0x100`, used ring at `base + 0x200`. (virtio-queue's MockSplitQueue
    /// places the used ring inside the avail ring's entries 8..15: its
    /// `end()` counts entries, not bytes, so a 9th posted chain corrupts
    /// the used index.)
    pub struct TestQueue<'a> {
        mem: &'a GuestMemoryMmap,
        base: u64,
        next_desc: u16,
    }

    impl<'a> TestQueue<'a> {
        pub fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
            let q = Self {
                mem,
                base,
                next_desc: 0,
            };
            // Zeroed rings: flags, idx and event fields.
            write(mem, q.avail_addr(), &[0; 0x100]);
            write(mem, q.used_addr(), &[0; 0x100]);
            q
        }

        pub fn desc_addr(&self) -> u64 {
            self.base
        }
        pub fn avail_addr(&self) -> u64 {
            self.base + 0x100
        }
        pub fn used_addr(&self) -> u64 {
            self.base + 0x200
        }

        /// A ready device-side queue over these rings.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_size(QSIZE);
            q.try_set_desc_table_address(GuestAddress(self.desc_addr()))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail_addr()))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used_addr()))
                .unwrap();
            q.set_ready(true);
            q
        }

        /// Add one chain of (addr, len, writable) descriptors and publish it.
        pub fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
            let n = descs.len() as u16;
            if self.next_desc + n > QSIZE {
                self.next_desc = 0; // reuse the table (earlier chains are done)
            }
            let head = self.next_desc;
            self.next_desc += n;
            self.add_chain_at(head, descs)
        }

        /// Like [`Self::add_chain`], with the chain's descriptors at table
        /// entries `head..` (for tests that manage which are free).
        pub fn add_chain_at(&mut self, head: u16, descs: &[(u64, u32, bool)]) -> u16 {
            let n = descs.len() as u16;
            for (i, &(addr, len, w)) in descs.iter().enumerate() {
                let idx = head + i as u16;
                let mut flags = if w { F_WRITE } else { 0 };
                if (i as u16) + 1 < n {
                    flags |= F_NEXT;
                }
                let mut d = Vec::with_capacity(16);
                d.extend_from_slice(&addr.to_le_bytes());
                d.extend_from_slice(&len.to_le_bytes());
                d.extend_from_slice(&flags.to_le_bytes());
                d.extend_from_slice(&(idx + 1).to_le_bytes());
                write(self.mem, self.desc_addr() + u64::from(idx) * 16, &d);
            }
            let i = self.read_u16(self.avail_addr() + 2);
            let slot = self.avail_addr() + 4 + 2 * u64::from(i % QSIZE);
            write(self.mem, slot, &head.to_le_bytes());
            write(
                self.mem,
                self.avail_addr() + 2,
                &i.wrapping_add(1).to_le_bytes(),
            );
            head
        }

        fn read_u16(&self, addr: u64) -> u16 {
            let b = read(self.mem, addr, 2);
            u16::from_le_bytes([b[0], b[1]])
        }

        /// (id, len) of used entry `i` (mod the queue size).
        pub fn used(&self, i: u16) -> (u32, u32) {
            let e = read(self.mem, self.used_addr() + 4 + 8 * u64::from(i % QSIZE), 8);
            (
                u32::from_le_bytes(e[..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..].try_into().unwrap()),
            )
        }

        pub fn used_idx(&self) -> u16 {
            self.read_u16(self.used_addr() + 2)
        }
    }

    pub fn write(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
        mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[allow(dead_code)]
    pub fn queue_ready(q: &mut Queue) {
        q.set_ready(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[test]
    fn single_queue_wants_exactly_one() {
        let q = || Queue::new(16).unwrap();
        assert!(single_queue(vec![q()]).is_ok());
        for n in [0, 2, 3] {
            let err = single_queue((0..n).map(|_| q()).collect()).unwrap_err();
            assert!(
                matches!(err, ActivateError::QueueCount { expected: 1, got } if got == n),
                "{n}: {err}"
            );
        }
    }
}
