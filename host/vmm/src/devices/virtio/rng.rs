//! virtio-rng (entropy device): fills the driver's buffers from the host's
//! /dev/urandom.

use std::fs::File;
use std::io::Read;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{single_queue, ActivateError, Interrupt, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening /dev/urandom: {0}")]
    Open(#[source] std::io::Error),
}

const QUEUE_SIZES: &[u16] = &[256];
/// Most bytes handed out per request.
const MAX_REQUEST: u32 = 64 * 1024;

pub struct Rng {
    source: Box<dyn Read + Send>,
    active: Option<Active>,
    requests: u64,
    bytes: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    irq: Interrupt,
    queue: Queue,
}

impl Rng {
    pub fn new() -> Result<Self, Error> {
        let f = File::open("/dev/urandom").map_err(Error::Open)?;
        Ok(Self::with_source(Box::new(f)))
    }

    pub fn with_source(source: Box<dyn Read + Send>) -> Self {
        Self {
            source,
            active: None,
            requests: 0,
            bytes: 0,
        }
    }

    fn process(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        let mut buf = Vec::new();
        while let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let mut len = 0u32;
            match chain.writer(&a.mem) {
                Ok(mut w) => {
                    let want = w.available_bytes().min(MAX_REQUEST as usize);
                    buf.resize(want, 0);
                    match self.source.read(&mut buf) {
                        Ok(n) => {
                            if std::io::Write::write_all(&mut w, &buf[..n]).is_ok() {
                                len = n as u32;
                                self.bytes += n as u64;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "virtio-rng source"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "virtio-rng bad descriptor chain"),
            }
            if a.queue.add_used(&a.mem, head, len).is_err() {
                tracing::warn!("virtio-rng: cannot add used entry");
            }
            if self.requests == 0 {
                tracing::info!(
                    bytes = len,
                    "virtio-rng: first request from the guest served"
                );
            }
            self.requests += 1;
            used = true;
        }
        if used {
            a.irq.signal_used();
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let queue = single_queue(queues)?;
        self.active = Some(Active { mem, irq, queue });
        Ok(())
    }
    fn queue_notify(&mut self, _index: u16) {
        self.process();
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn stats(&self) -> (&'static str, String) {
        (
            "virtio-rng",
            format!("requests={} bytes={}", self.requests, self.bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::{self, TestQueue};
    use std::sync::atomic::Ordering;

    #[test]
    fn fills_writable_buffers() {
        let mem = test_util::mem();
        let mut tq = TestQueue::new(&mem, 0x1000);
        tq.add_chain(&[(0x10000, 16, true), (0x20000, 8, true)]);
        tq.add_chain(&[(0x30000, 4, false)]);
        let mut rng = Rng::with_source(Box::new(std::io::repeat(0xab)));
        let (irq, count) = test_util::irq();
        rng.activate(mem.clone(), irq, vec![tq.queue()]).unwrap();
        rng.queue_notify(0);
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(tq.used(0), (0, 24));
        assert_eq!(tq.used(1), (2, 0), "read-only buffer gets nothing");
        assert_eq!(test_util::read(&mem, 0x10000, 16), vec![0xab; 16]);
        assert_eq!(test_util::read(&mem, 0x20000, 8), vec![0xab; 8]);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(rng.stats().1, "requests=2 bytes=24");
    }

    #[test]
    fn wrong_queue_count_rejected() {
        let mut rng = Rng::with_source(Box::new(std::io::repeat(0)));
        let (irq, _) = test_util::irq();
        assert!(rng.activate(test_util::mem(), irq, vec![]).is_err());
    }
}
