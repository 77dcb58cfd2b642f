//! virtio-vsock in userspace, with a hybrid unix-socket back-end
//! ([`muxer`]). Queues: 0 = RX (to the guest), 1 = TX (from the guest),
//! 2 = events (unused: we never migrate).

pub mod connection;
pub mod muxer;
pub mod packet;
pub mod vhost;

#[cfg(test)]
mod tests;

use std::os::unix::io::RawFd;
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    read_config_bytes, ActivateError, Interrupt, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use muxer::Muxer;
use packet::{read_tx, write_rx, HDR_LEN};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding vsock socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

const QUEUE_SIZES: &[u16] = &[256, 256, 256];
const RX: usize = 0;
const TX: usize = 1;
/// Payload per RX packet at most (Linux posts 4 KiB buffers by default).
const MAX_RX_DATA: usize = 64 * 1024;

pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    active: Option<Active>,
}

struct Active {
    mem: GuestMemoryMmap,
    irq: Interrupt,
    queues: Vec<Queue>,
}

impl Vsock {
    pub fn new(cid: u64, uds: &Path) -> Result<Self, Error> {
        tracing::debug!(
            vhost = %vhost::unavailable_reason(),
            "vsock: userspace device with hybrid unix-socket back-end"
        );
        Ok(Self {
            cid,
            muxer: Muxer::new(cid, uds)?,
            active: None,
        })
    }

    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while let Some(chain) = a.queues[TX].pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            match chain.reader(&a.mem) {
                Ok(mut r) => {
                    let avail = r.available_bytes();
                    match read_tx(&mut r, avail) {
                        Ok(pkt) => self.muxer.on_guest_packet(pkt),
                        Err(e) => tracing::debug!(error = %e, "vsock: malformed TX packet dropped"),
                    }
                }
                Err(e) => tracing::debug!(error = %e, "vsock: bad TX chain"),
            }
            let _ = a.queues[TX].add_used(&a.mem, head, 0);
            used = true;
        }
        if used {
            a.irq.signal_used();
        }
    }

    fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = a.queues[RX].pop_descriptor_chain(&a.mem) else {
                break; // wait for the driver to post buffers
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&a.mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    tracing::debug!("vsock: RX buffer too small");
                    let _ = a.queues[RX].add_used(&a.mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let room = (writer.available_bytes() - HDR_LEN).min(MAX_RX_DATA);
            match self.muxer.next_rx(room) {
                Some((hdr, data)) => {
                    let n = write_rx(&mut writer, &hdr, &data).unwrap_or(0);
                    let _ = a.queues[RX].add_used(&a.mem, head, n as u32);
                    used = true;
                }
                None => {
                    // Nothing after all: give the buffer back.
                    a.queues[RX].go_to_previous_position();
                    break;
                }
            }
        }
        if used {
            a.irq.signal_used();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
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
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        self.active = Some(Active { mem, irq, queues });
        self.process_rx();
        Ok(())
    }
    fn queue_notify(&mut self, index: u16) {
        match index as usize {
            RX => self.process_rx(),
            TX => {
                self.process_tx();
                self.process_rx();
            }
            _ => {}
        }
    }
    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }
    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }
    fn backend_event(&mut self) {
        self.muxer.process_events();
        self.process_rx();
    }
    fn tick(&mut self) {
        self.muxer.tick();
        self.process_rx();
    }
    fn stats(&self) -> (&'static str, String) {
        ("virtio-vsock", self.muxer.stats())
    }
}
