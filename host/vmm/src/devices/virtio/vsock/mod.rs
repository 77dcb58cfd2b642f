//! virtio-vsock in userspace, with a hybrid unix-socket back-end
//! ([`muxer`]). Queues: 0 = RX (to the guest), 1 = TX (from the guest),
//! 2 = events (unused: we never migrate).

pub mod connection;
pub mod hybrid_proxy;
pub mod muxer;
pub mod packet;
pub mod vhost;
pub mod vhost_user;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_limits;

use std::os::unix::io::RawFd;
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::{
    expect_queues, read_config_bytes, ActivateError, Interrupt, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
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

pub(crate) const QUEUE_SIZES: &[u16] = &[256, 256, 256];
pub(crate) const RX: usize = 0;
pub(crate) const TX: usize = 1;
/// The event queue: only transport resets go there, and we never send one.
pub(crate) const EVQ: usize = 2;
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

    #[cfg(test)]
    pub fn muxer_mut(&mut self) -> &mut Muxer {
        &mut self.muxer
    }

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if drain_tx(&mut self.muxer, &mut a.queues[TX], &a.mem) {
            a.irq.signal_used();
        }
    }

    fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if fill_rx(&mut self.muxer, &mut a.queues[RX], &a.mem) {
            a.irq.signal_used();
        }
    }
}

/// Hand every packet the driver put on the TX queue to the muxer. Returns
/// whether used entries were added (the driver needs an interrupt). Shared
/// by the virtio-mmio device and the vhost-user back-end.
pub(crate) fn drain_tx<M: GuestMemory>(muxer: &mut Muxer, queue: &mut Queue, mem: &M) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match chain.reader(mem) {
            Ok(mut r) => {
                let avail = r.available_bytes();
                match read_tx(&mut r, avail) {
                    Ok(pkt) => muxer.on_guest_packet(pkt),
                    Err(e) => tracing::debug!(error = %e, "vsock: malformed TX packet dropped"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "vsock: bad TX chain"),
        }
        if queue.add_used(mem, head, 0).is_err() {
            tracing::warn!("vsock: cannot add used TX entry");
        }
        used = true;
    }
    used
}

/// Move what the muxer has for the guest into the driver's RX buffers,
/// until either runs out. Returns whether used entries were added.
pub(crate) fn fill_rx<M: GuestMemory>(muxer: &mut Muxer, queue: &mut Queue, mem: &M) -> bool {
    let mut used = false;
    while muxer.has_rx() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break; // wait for the driver to post buffers
        };
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(w) if w.available_bytes() >= HDR_LEN => w,
            _ => {
                tracing::debug!("vsock: RX buffer too small");
                let _ = queue.add_used(mem, head, 0);
                used = true;
                continue;
            }
        };
        let room = (writer.available_bytes() - HDR_LEN).min(MAX_RX_DATA);
        match muxer.next_rx(room) {
            Some((hdr, data)) => {
                let n = write_rx(&mut writer, &hdr, &data).unwrap_or(0);
                if queue.add_used(mem, head, n as u32).is_err() {
                    tracing::warn!("vsock: cannot add used RX entry");
                }
                used = true;
            }
            None => {
                // Nothing after all: give the buffer back.
                queue.go_to_previous_position();
                break;
            }
        }
    }
    used
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
        let queues = expect_queues(queues, 3)?;
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
