//! The VMM's event loop on rust-vmm's `event-manager`: one subscriber per
//! concern, each registering its fds and handling their readiness.
//!
//! - [`ExitEvents`]: the guest's exit (vCPUs and devices raise it) and our
//!   stop signal (SIGTERM/SIGINT) end the loop with a reason.
//! - [`DeviceEvents`]: one per virtio device with a host back-end fd (TAP,
//!   vsock sockets, vhost call fds), edge-triggered: devices drain their
//!   back-end until EAGAIN or until the guest has no buffers, and resume on
//!   queue notify.
//! - [`Tick`]: a 1 s timerfd for device timeouts and flushing a partial
//!   console line to the log.

use std::cell::RefCell;
use std::os::unix::io::RawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;
use vmpod_runtime::hypervisor::ExitReason;

use crate::devices::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::ExitSignal;

/// How often devices get their `tick`.
const TICK: Duration = Duration::from_secs(1);

/// What the subscribers report to the loop.
#[derive(Default)]
struct Outcome {
    reason: Option<ExitReason>,
    /// Registration failures (an `init` cannot return an error).
    setup_errors: Vec<String>,
}

type Shared = Rc<RefCell<Outcome>>;

fn register(ops: &mut EventOps, events: Events, what: &str, out: &Shared) {
    if let Err(e) = ops.add(events) {
        out.borrow_mut()
            .setup_errors
            .push(format!("watching {what}: {e}"));
    }
}

/// The guest's exit event and our stop signal.
struct ExitEvents {
    exit: Arc<ExitSignal>,
    stop: Arc<EventFd>,
    out: Shared,
}

const EXIT: u32 = 0;
const STOP: u32 = 1;

impl MutEventSubscriber for ExitEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let exit = Events::with_data(self.exit.event_fd(), EXIT, EventSet::IN);
        register(ops, exit, "the exit event", &self.out);
        let stop = Events::with_data(self.stop.as_ref(), STOP, EventSet::IN);
        register(ops, stop, "the stop event", &self.out);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let reason = match events.data() {
            EXIT => {
                let _ = self.exit.event_fd().read();
                self.exit.reason()
            }
            _ => {
                let _ = self.stop.read();
                tracing::info!("stop signal received");
                Some(ExitReason::Stopped)
            }
        };
        let mut out = self.out.borrow_mut();
        if out.reason.is_none() {
            out.reason = reason;
        }
    }
}

/// One virtio device's host back-end fd.
struct DeviceEvents {
    transport: Arc<Mutex<MmioTransport>>,
    fd: RawFd,
    out: Shared,
}

impl MutEventSubscriber for DeviceEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let events = Events::new_raw(self.fd, EventSet::IN | EventSet::EDGE_TRIGGERED);
        register(ops, events, "a device back-end", &self.out);
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_mut()
            .backend_event();
    }
}

/// The 1 s tick.
struct Tick {
    timer: TimerFd,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    serial: Arc<Mutex<SerialDevice<std::fs::File>>>,
    out: Shared,
}

impl MutEventSubscriber for Tick {
    fn init(&mut self, ops: &mut EventOps) {
        register(
            ops,
            Events::new(&self.timer, EventSet::IN),
            "the tick timer",
            &self.out,
        );
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reading the expiry count re-arms readiness; the count itself
        // does not matter.
        let _ = self.timer.wait();
        for t in &self.virtio {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .device_mut()
                .tick();
        }
        // A partial line (a prompt) reaches the log within a tick.
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sink_mut()
            .flush_log();
    }
}

/// The devices and events the loop watches.
pub(crate) struct LoopParts {
    pub exit: Arc<ExitSignal>,
    pub stop: Arc<EventFd>,
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
    pub serial: Arc<Mutex<SerialDevice<std::fs::File>>>,
}

/// Set the loop up: an error names what could not be watched.
pub(crate) fn setup(parts: LoopParts) -> Result<EventLoop, String> {
    let out: Shared = Rc::default();
    let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new()
        .map_err(|e| format!("creating the event manager: {e}"))?;
    em.add_subscriber(Box::new(ExitEvents {
        exit: parts.exit,
        stop: parts.stop,
        out: out.clone(),
    }));
    for t in &parts.virtio {
        let fd = t
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .backend_fd();
        if let Some(fd) = fd {
            em.add_subscriber(Box::new(DeviceEvents {
                transport: t.clone(),
                fd,
                out: out.clone(),
            }));
        }
    }
    let mut timer = TimerFd::new().map_err(|e| format!("creating the tick timer: {e}"))?;
    timer
        .reset(TICK, Some(TICK))
        .map_err(|e| format!("arming the tick timer: {e}"))?;
    em.add_subscriber(Box::new(Tick {
        timer,
        virtio: parts.virtio,
        serial: parts.serial,
        out: out.clone(),
    }));
    let errors = std::mem::take(&mut out.borrow_mut().setup_errors);
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    Ok(EventLoop { em, out })
}

pub(crate) struct EventLoop {
    em: EventManager<Box<dyn MutEventSubscriber>>,
    out: Shared,
}

impl EventLoop {
    /// Dispatch events until a subscriber reports why the VM ends.
    pub(crate) fn run(&mut self) -> ExitReason {
        loop {
            if let Some(r) = self.out.borrow_mut().reason.take() {
                return r;
            }
            // Interrupted waits return Ok(0).
            if let Err(e) = self.em.run() {
                return ExitReason::Crashed(format!("VMM event loop failed: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::serial::ConsoleSink;

    struct NoIrq;
    impl crate::devices::IrqLine for NoIrq {
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Fixture {
        l: EventLoop,
        exit: Arc<ExitSignal>,
        stop: Arc<EventFd>,
        serial: Arc<Mutex<SerialDevice<std::fs::File>>>,
        log: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let stop = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let file = std::fs::File::create(&log).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            Arc::new(NoIrq),
            ConsoleSink::new(file, 1 << 20, exit.clone()),
        )));
        let l = setup(LoopParts {
            exit: exit.clone(),
            stop: stop.clone(),
            virtio: vec![],
            serial: serial.clone(),
        })
        .unwrap();
        Fixture {
            l,
            exit,
            stop,
            serial,
            log,
            _dir: dir,
        }
    }

    #[test]
    fn the_guest_exit_reason_ends_the_loop() {
        let mut f = fixture();
        f.exit.request(ExitReason::PowerOff);
        assert_eq!(f.l.run(), ExitReason::PowerOff);
    }

    #[test]
    fn the_stop_event_ends_the_loop_as_stopped() {
        let mut f = fixture();
        f.stop.write(1).unwrap();
        assert_eq!(f.l.run(), ExitReason::Stopped);
    }

    /// A prompt without a line end stays buffered until the tick writes it
    /// out (a watcher thread ends the loop once the file shows it).
    #[test]
    fn the_tick_writes_out_a_partial_console_line() {
        let mut f = fixture();
        for b in b"login: " {
            f.serial.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&f.log).unwrap(), b"", "still buffered");
        let (log, exit) = (f.log.clone(), f.exit.clone());
        let watcher = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::fs::read(&log).unwrap_or_default() != b"login: " {
                if std::time::Instant::now() > deadline {
                    exit.request(ExitReason::Crashed("no tick flush".into()));
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            exit.request(ExitReason::Reboot);
        });
        assert_eq!(f.l.run(), ExitReason::Reboot);
        watcher.join().unwrap();
    }
}
