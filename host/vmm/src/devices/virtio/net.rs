//! virtio-net on a host TAP device (opened with IFF_VNET_HDR, so frames
//! carry the same 12-byte virtio header in both directions).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    expect_queues, read_config_bytes, ActivateError, Interrupt, VirtioDevice, TYPE_NET,
    VIRTIO_F_VERSION_1,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    #[error("attaching to TAP {name}: {source}")]
    SetIff {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuring TAP {name} ({op}): {source}")]
    Configure {
        name: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// virtio_net_hdr_v1 (with num_buffers), as used with VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
const QUEUE_SIZES: &[u16] = &[256, 256];
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Largest frame plus header we move (no GSO offered: MTU-sized frames).
const MAX_FRAME: usize = 65562;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// An open TAP device.
pub struct Tap {
    file: File,
}

impl Tap {
    pub fn open(name: &str) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        let n = name.len().min(15);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        // SAFETY: TUNSETIFF reads/writes an ifreq, which `req` is.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(Error::SetIff {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        let cfg = |op, req: libc::c_ulong, arg: *const libc::c_void| {
            // SAFETY: both ioctls take either an int pointer or an int value.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), req, arg) };
            if r < 0 {
                Err(Error::Configure {
                    name: name.to_string(),
                    op,
                    source: std::io::Error::last_os_error(),
                })
            } else {
                Ok(())
            }
        };
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        cfg(
            "TUNSETVNETHDRSZ",
            TUNSETVNETHDRSZ,
            (&hdr_len as *const libc::c_int).cast(),
        )?;
        cfg("TUNSETOFFLOAD", TUNSETOFFLOAD, std::ptr::null())?;
        Ok(Self { file })
    }
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    active: Option<Active>,
    /// A frame read from the TAP that found no guest buffer yet.
    rx_frame: Option<Vec<u8>>,
    /// The TAP may have more to read (edge-triggered).
    rx_ready: bool,
    rx_frames: u64,
    tx_frames: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    irq: Interrupt,
    queues: Vec<Queue>,
}

impl Net {
    pub fn open(tap: &str, mac: [u8; 6]) -> Result<Self, Error> {
        Ok(Self::with_tap(Tap::open(tap)?, mac))
    }

    fn with_tap(tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            tap,
            mac,
            active: None,
            rx_frame: None,
            rx_ready: true,
            rx_frames: 0,
            tx_frames: 0,
        }
    }

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        let mut buf = Vec::with_capacity(2048);
        while let Some(chain) = a.queues[TX_QUEUE].pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            buf.clear();
            if let Ok(r) = chain.reader(&a.mem) {
                let _ = r.take(MAX_FRAME as u64).read_to_end(&mut buf);
            }
            if buf.len() > VNET_HDR_LEN {
                // A TAP write takes the whole frame or fails.
                match self.tap.file.write(&buf) {
                    Ok(n) if n == buf.len() => self.tx_frames += 1,
                    Ok(n) => tracing::debug!(n, len = buf.len(), "TAP took a partial frame"),
                    Err(e) => tracing::debug!(error = %e, "TAP write dropped a frame"),
                }
            }
            let _ = a.queues[TX_QUEUE].add_used(&a.mem, head, 0);
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
        loop {
            if self.rx_frame.is_none() {
                if !self.rx_ready {
                    break;
                }
                let mut buf = vec![0u8; MAX_FRAME];
                match self.tap.file.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        buf.truncate(n);
                        self.rx_frame = Some(buf);
                    }
                    Ok(_) => {
                        self.rx_ready = false;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.rx_ready = false;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TAP read");
                        self.rx_ready = false;
                        break;
                    }
                }
            }
            let Some(chain) = a.queues[RX_QUEUE].pop_descriptor_chain(&a.mem) else {
                break; // wait for the driver to post buffers
            };
            let head = chain.head_index();
            let frame = self.rx_frame.take().unwrap_or_default();
            let mut len = 0;
            if let Ok(mut w) = chain.writer(&a.mem) {
                if w.available_bytes() >= frame.len() && w.write_all(&frame).is_ok() {
                    len = frame.len() as u32;
                    self.rx_frames += 1;
                } else {
                    tracing::debug!(
                        frame = frame.len(),
                        "guest RX buffer too small; frame dropped"
                    );
                }
            }
            let _ = a.queues[RX_QUEUE].add_used(&a.mem, head, len);
            used = true;
        }
        if used {
            a.irq.signal_used();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let queues = expect_queues(queues, 2)?;
        self.active = Some(Active { mem, irq, queues });
        self.rx_ready = true;
        self.process_rx();
        Ok(())
    }
    fn queue_notify(&mut self, index: u16) {
        match index as usize {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }
    fn reset(&mut self) {
        self.active = None;
        self.rx_frame = None;
    }
    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.file.as_raw_fd())
    }
    fn backend_event(&mut self) {
        self.rx_ready = true;
        self.process_rx();
    }
    fn stats(&self) -> (&'static str, String) {
        (
            "virtio-net",
            format!("rx_frames={} tx_frames={}", self.rx_frames, self.tx_frames),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::devices::virtio::test_util::{self, TestQueue};

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0e];
    const RXQ: u64 = 0x1000;
    const TXQ: u64 = 0x2000;

    /// A TAP stand-in: a SOCK_SEQPACKET pair keeps frame boundaries as a
    /// TAP does. Returns the device's end as a [`Tap`] and the host's end.
    fn tap_pair() -> (Tap, File) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills the two fds we pass.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        // SAFETY: fresh fds we own.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (
            Tap {
                file: File::from(a),
            },
            File::from(b),
        )
    }

    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        net: Net,
        host: File,
        rx: TestQueue<'a>,
        tx: TestQueue<'a>,
        irqs: std::sync::Arc<test_util::CountIrq>,
    }

    fn rig(mem: &GuestMemoryMmap) -> Rig<'_> {
        let (tap, host) = tap_pair();
        let mut net = Net::with_tap(tap, MAC);
        let (rx, tx) = (TestQueue::new(mem, RXQ), TestQueue::new(mem, TXQ));
        let (irq, irqs) = test_util::irq();
        net.activate(mem.clone(), irq, vec![rx.queue(), tx.queue()])
            .unwrap();
        Rig {
            mem,
            net,
            host,
            rx,
            tx,
            irqs,
        }
    }

    /// A frame as the TAP carries it: virtio-net header, then `payload`.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    fn host_read(host: &mut File) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_FRAME];
        match host.read(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn config_space_and_features() {
        let (tap, _host) = tap_pair();
        let net = Net::with_tap(tap, MAC);
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
        let mut tail = [0xffu8; 4];
        net.read_config(4, &mut tail);
        assert_eq!(&tail[..2], &MAC[4..], "reads past the MAC are zero-filled");
        assert_eq!(net.features() & VIRTIO_NET_F_MAC, VIRTIO_NET_F_MAC);
        assert_eq!(net.features() & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
        assert_eq!(net.device_type(), TYPE_NET);
    }

    #[test]
    fn tx_frames_reach_the_tap_whole_and_bad_chains_are_only_returned() {
        let mem = test_util::mem();
        let mut r = rig(&mem);
        // Header and payload in separate descriptors.
        let payload: Vec<u8> = (0..100u8).collect();
        test_util::write(&mem, 0x10000, &[0; VNET_HDR_LEN]);
        test_util::write(&mem, 0x20000, &payload);
        r.tx.add_chain(&[(0x10000, VNET_HDR_LEN as u32, false), (0x20000, 100, false)]);
        // A header without a frame, and a chain the device cannot read.
        r.tx.add_chain(&[(0x10000, VNET_HDR_LEN as u32, false)]);
        r.tx.add_chain(&[(0x30000, 64, true)]);
        r.net.queue_notify(TX_QUEUE as u16);
        assert_eq!(host_read(&mut r.host), Some(frame(&payload)));
        assert_eq!(host_read(&mut r.host), None, "nothing else reached the TAP");
        assert_eq!(r.tx.used_idx(), 3, "every chain is returned");
        assert_eq!(r.tx.used(0).1, 0);
        assert_eq!(r.net.stats().1, "rx_frames=0 tx_frames=1");
        assert!(r.irqs.0.load(Ordering::SeqCst) >= 1);
    }

    #[test]
    fn rx_frames_wait_for_guest_buffers_in_order() {
        let mem = test_util::mem();
        let mut r = rig(&mem);
        let f1 = frame(b"first");
        r.host.write_all(&f1).unwrap();
        r.net.backend_event();
        assert_eq!(r.rx.used_idx(), 0, "no buffer posted yet: held");
        r.rx.add_chain(&[(0x40000, 2048, true)]);
        r.net.queue_notify(RX_QUEUE as u16);
        assert_eq!(r.rx.used_idx(), 1);
        assert_eq!(r.rx.used(0).1, f1.len() as u32);
        assert_eq!(test_util::read(r.mem, 0x40000, f1.len()), f1);

        let (f2, f3) = (frame(b"second"), frame(b"third"));
        r.host.write_all(&f2).unwrap();
        r.host.write_all(&f3).unwrap();
        r.rx.add_chain(&[(0x41000, 2048, true)]);
        r.net.backend_event();
        assert_eq!(r.rx.used_idx(), 2, "one buffer, one frame");
        assert_eq!(test_util::read(r.mem, 0x41000, f2.len()), f2);
        // A buffer split in two descriptors takes the held third frame.
        r.rx.add_chain(&[(0x42000, 8, true), (0x43000, 2048, true)]);
        r.net.queue_notify(RX_QUEUE as u16);
        assert_eq!(r.rx.used_idx(), 3);
        assert_eq!(r.rx.used(2).1, f3.len() as u32);
        let mut got = test_util::read(r.mem, 0x42000, 8);
        got.extend(test_util::read(r.mem, 0x43000, f3.len() - 8));
        assert_eq!(got, f3);
        assert_eq!(r.net.stats().1, "rx_frames=3 tx_frames=0");
    }

    #[test]
    fn a_too_small_or_read_only_rx_buffer_drops_that_frame_only() {
        let mem = test_util::mem();
        let mut r = rig(&mem);
        r.rx.add_chain(&[(0x40000, 32, true)]);
        r.rx.add_chain(&[(0x41000, 2048, false)]);
        r.host.write_all(&frame(&[7; 100])).unwrap();
        r.host.write_all(&frame(&[8; 100])).unwrap();
        r.net.backend_event();
        assert_eq!(r.rx.used_idx(), 2);
        assert_eq!(r.rx.used(0).1, 0, "too small: dropped");
        assert_eq!(r.rx.used(1).1, 0, "not writable: dropped");
        let f = frame(b"fits");
        r.host.write_all(&f).unwrap();
        r.rx.add_chain(&[(0x42000, 2048, true)]);
        r.net.backend_event();
        assert_eq!(r.rx.used(2).1, f.len() as u32);
        assert_eq!(r.net.stats().1, "rx_frames=1 tx_frames=0");
    }

    #[test]
    fn reset_drops_a_held_frame_and_needs_two_queues() {
        let mem = test_util::mem();
        let mut r = rig(&mem);
        r.host.write_all(&frame(b"stale")).unwrap();
        r.net.backend_event();
        r.net.reset();
        let rx = TestQueue::new(&mem, 0x5000);
        let tx = TestQueue::new(&mem, 0x6000);
        let (irq, _) = test_util::irq();
        assert!(r
            .net
            .activate(mem.clone(), irq.clone(), vec![rx.queue()])
            .is_err());
        r.net
            .activate(mem.clone(), irq, vec![rx.queue(), tx.queue()])
            .unwrap();
        let mut rx = rx;
        rx.add_chain(&[(0x40000, 2048, true)]);
        r.net.queue_notify(RX_QUEUE as u16);
        assert_eq!(rx.used_idx(), 0, "the frame held before the reset is gone");
    }
}
