//! The vsock device as a **vhost-user back-end**: the same [`Muxer`]
//! (hybrid unix-socket protocol) and queue code as the virtio-mmio device,
//! served to a vhost-user front-end such as QEMU's
//! `vhost-user-vsock-device`. The QEMU backend runs it as
//! `vmpod vm vhost-user-vsock`, one process per VM.
//!
//! Threading: the `vhost-user-backend` crate runs one worker thread that
//! waits on the queues' kick eventfds plus two fds we register: the
//! muxer's epoll fd (host sockets) and a 1 s timerfd (connect timeouts).
//! Every event ends with an RX pass, so data that was waiting for guest
//! buffers or credit moves as soon as either appears.
//!
//! Notifications: we offer neither `EVENT_IDX` nor notification
//! suppression; the driver kicks on every new buffer and we interrupt it
//! unless it asked not to (`VRING_AVAIL_F_NO_INTERRUPT`). Simple and free
//! of lost-wakeup windows (the defect the note describes for
//! vhost-device-vsock was a lost credit update).
//!
//! ```no_run
//! use std::path::Path;
//! use vmpod_vmm::devices::virtio::vsock::vhost_user;
//! // Blocks until the front-end (QEMU) disconnects.
//! vhost_user::serve(3, Path::new("/run/vm/vhost.sock"), Path::new("/run/vm/vm.vsock")).unwrap();
//! ```

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::Muxer;
use super::{drain_tx, fill_rx, Error, EVQ, RX, TX};
use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// Our queues are 0..3; event ids from 3 up belong to the crate (3 = exit)
/// and to the listeners we register.
const NUM_QUEUES: usize = 3;
const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;
const TICK_EVENT: u16 = NUM_QUEUES as u16 + 2;
const TICK: Duration = Duration::from_secs(1);
/// QEMU's `vhost-user-vsock-device` asks for 1024-entry rings.
const MAX_QUEUE_SIZE: usize = 1024;

/// The back-end state the worker thread owns (behind the crate's lock).
pub struct VsockBackend {
    cid: u64,
    muxer: Muxer,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    timer: TimerFd,
    /// The worker thread's exit event (the crate takes clones).
    exit: (EventConsumer, EventNotifier),
    kicks: u64,
}

impl VsockBackend {
    /// Bind the hybrid-vsock socket `uds` for guest `cid`.
    pub fn new(cid: u64, uds: &Path) -> Result<Self, Error> {
        let io_err = |op| move |e: io::Error| Error::Io { op, source: e };
        let mut timer = TimerFd::new().map_err(|e| io_err("timerfd_create")(e.into()))?;
        timer
            .reset(TICK, Some(TICK))
            .map_err(|e| io_err("timerfd_settime")(e.into()))?;
        let exit =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(io_err("exit eventfd"))?;
        Ok(Self {
            cid,
            muxer: Muxer::new(cid, uds)?,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            timer,
            exit,
            kicks: 0,
        })
    }

    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// TX then RX for whatever `device_event` was.
    fn process(&mut self, device_event: u16, vrings: &[VringRwLock]) -> io::Result<()> {
        match device_event {
            e if e as usize == TX => {
                self.kicks += 1;
                let mem = self.mem.memory();
                let mut tx = vrings[TX].get_mut();
                if usable(&tx) && drain_tx(&mut self.muxer, tx.get_queue_mut(), &*mem) {
                    signal(&mut tx)?;
                }
            }
            e if e as usize == RX => self.kicks += 1,
            e if e as usize == EVQ => {} // we never send transport events
            MUXER_EVENT => self.muxer.process_events(),
            TICK_EVENT => {
                let _ = self.timer.wait();
                self.muxer.tick();
            }
            other => tracing::warn!(event = other, "vhost-user vsock: unknown event"),
        }
        let mem = self.mem.memory();
        let mut rx = vrings[RX].get_mut();
        if usable(&rx) && fill_rx(&mut self.muxer, rx.get_queue_mut(), &*mem) {
            signal(&mut rx)?;
        }
        Ok(())
    }
}

/// A ring we may touch: set up by the driver (ready) and enabled by the
/// front-end (vhost-user rings start disabled until SET_VRING_ENABLE).
fn usable(state: &VringState<GuestMemoryAtomic<GuestMemoryMmap>>) -> bool {
    state.get_queue().ready() && state.is_enabled()
}

/// Interrupt the driver unless it suppressed interrupts for this queue.
fn signal(state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>) -> io::Result<()> {
    // Without EVENT_IDX this reads the driver's NO_INTERRUPT flag.
    if state.needs_notification().unwrap_or(true) {
        state.signal_used_queue()?;
    }
    Ok(())
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU reads the guest CID from our config space.
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        // Not offered, so a front-end should never enable it.
        if enabled {
            tracing::warn!("vhost-user vsock: EVENT_IDX enabled although not offered");
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        super::super::read_config_bytes(&self.cid.to_le_bytes(), offset.into(), &mut out);
        out
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn reset_device(&mut self) {
        self.muxer.reset();
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = &self.exit;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        self.process(device_event, vrings)
    }
}

/// Serve one front-end on `socket` (created here), the guest's vsock on
/// the hybrid socket `uds`. Returns when the front-end disconnects; `uds`
/// is removed then.
pub fn serve(cid: u64, socket: &Path, uds: &Path) -> Result<(), Error> {
    let backend = Arc::new(RwLock::new(VsockBackend::new(cid, uds)?));
    let result = run_daemon(&backend, socket);
    let stats = backend
        .read()
        .map(|b| format!("{} kicks={}", b.muxer.stats(), b.kicks))
        .unwrap_or_default();
    tracing::info!(%stats, "vhost-user vsock: front-end gone");
    let _ = std::fs::remove_file(uds);
    result
}

fn run_daemon(backend: &Arc<RwLock<VsockBackend>>, socket: &Path) -> Result<(), Error> {
    let daemon_err = |op: &'static str| {
        move |e: vhost_user_backend::Error| Error::Io {
            op,
            source: io::Error::other(e.to_string()),
        }
    };
    let mut daemon = VhostUserDaemon::new(
        "vmpod-vsock".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(daemon_err("vhost-user daemon"))?;
    {
        let b = backend.read().map_err(|_| Error::Io {
            op: "backend lock",
            source: io::Error::other("poisoned"),
        })?;
        let handlers = daemon.get_epoll_handlers();
        let handler = handlers.first().ok_or_else(|| Error::Io {
            op: "vhost-user worker",
            source: io::Error::other("no worker thread"),
        })?;
        let register = |fd, ev| {
            handler
                .register_listener(fd, EventSet::IN, u64::from(ev))
                .map_err(|source| Error::Io {
                    op: "registering a listener",
                    source,
                })
        };
        register(b.muxer.epoll_fd(), MUXER_EVENT)?;
        register(b.timer.as_raw_fd(), TICK_EVENT)?;
    }
    daemon
        .serve(socket)
        .map_err(daemon_err("serving vhost-user"))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::test_util::{self, TestQueue};
    use crate::devices::virtio::vsock::packet::{
        Header, HDR_LEN, HOST_CID, OP_REQUEST, OP_RESPONSE, TYPE_STREAM,
    };

    const RXQ: u64 = 0x1000;
    const TXQ: u64 = 0x4000;
    const RX_BUF: u64 = 0x10_0000;
    const TX_BUF: u64 = 0x20_0000;

    /// A vring over `q`'s rings, set up the way a front-end would.
    fn vring(mem: &GuestMemoryAtomic<GuestMemoryMmap>, q: &TestQueue) -> VringRwLock {
        let v = VringRwLock::new(mem.clone(), 16).unwrap();
        v.set_queue_size(16);
        v.set_queue_info(q.desc_addr(), q.avail_addr(), q.used_addr())
            .unwrap();
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    #[test]
    fn features_config_and_a_host_connection_through_the_vrings() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        let mem = test_util::mem();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mut b = VsockBackend::new(7, &uds).unwrap();
        assert_eq!(b.get_config(0, 8), 7u64.to_le_bytes());
        assert_eq!(b.get_config(4, 4), [0; 4], "high half of the CID");
        assert_eq!(b.get_config(8, 4), [0; 4], "past the end reads zeros");
        assert_ne!(b.features() & VIRTIO_F_VERSION_1, 0);
        assert_ne!(
            b.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
        assert_eq!(b.num_queues(), 3);
        b.update_memory(atomic.clone()).unwrap();

        let mut rxq = TestQueue::new(&mem, RXQ);
        let mut txq = TestQueue::new(&mem, TXQ);
        let evq = TestQueue::new(&mem, 0x7000);
        let vrings = [
            vring(&atomic, &rxq),
            vring(&atomic, &txq),
            vring(&atomic, &evq),
        ];
        for i in 0..4 {
            rxq.add_chain(&[(RX_BUF + i * 0x1000, 0x1000, true)]);
        }
        b.handle_event(RX as u16, EventSet::IN, &vrings, 0).unwrap();

        // Host connects while the front-end has the RX ring disabled:
        // nothing may be written to it.
        vrings[RX].set_enabled(false);
        let mut host = UnixStream::connect(&uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        b.handle_event(MUXER_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(rxq.used_idx(), 0, "a disabled ring is left alone");
        // Enabled: the REQUEST goes onto the RX vring.
        vrings[RX].set_enabled(true);
        for _ in 0..50 {
            b.handle_event(MUXER_EVENT, EventSet::IN, &vrings, 0)
                .unwrap();
            if rxq.used_idx() > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(rxq.used_idx(), 1, "one packet for the guest");
        let (id, len) = rxq.used(0);
        let bytes = test_util::read(&mem, RX_BUF + u64::from(id) * 0x1000, len as usize);
        let req = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
        assert_eq!((req.op, req.dst_cid, req.dst_port), (OP_REQUEST, 7, 1024));

        // The guest accepts through the TX vring: the host reads OK.
        let resp = Header {
            src_cid: 7,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: req.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RESPONSE,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        };
        test_util::write(&mem, TX_BUF, &resp.to_bytes());
        txq.add_chain(&[(TX_BUF, HDR_LEN as u32, false)]);
        b.handle_event(TX as u16, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(txq.used_idx(), 1, "TX buffer returned");
        let mut line = [0u8; 3];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK ");

        // Front-end reset: connections dropped, the host sees EOF.
        b.reset_device();
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert_eq!(b.muxer().connection_count(), 0);
    }

    #[test]
    fn events_before_the_queues_are_ready_are_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = VsockBackend::new(3, &dir.path().join("v.sock")).unwrap();
        let atomic = GuestMemoryAtomic::new(test_util::mem());
        let vrings: Vec<VringRwLock> = (0..3)
            .map(|_| VringRwLock::new(atomic.clone(), 16).unwrap())
            .collect();
        for ev in [RX as u16, TX as u16, EVQ as u16, MUXER_EVENT, 99] {
            b.handle_event(ev, EventSet::IN, &vrings, 0).unwrap();
        }
        assert!(b.exit_event(0).is_some());
    }
}
