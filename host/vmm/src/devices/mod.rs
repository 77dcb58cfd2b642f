//! Emulated devices. None of them knows about KVM: they see a [`bus`]
//! access, guest memory, and an interrupt line ([`IrqLine`]).

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmpod_runtime::hypervisor::ExitReason;

/// Raises one guest interrupt (an irqfd in the VMM; a counter in tests).
pub trait IrqLine: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}

impl IrqLine for EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// How devices and vCPUs ask the VMM to stop the VM: the first reason
/// recorded wins, and the event fd wakes the event loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    panic: Mutex<Option<String>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            panic: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            tracing::info!(?reason, "VM exit requested");
            *r = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    /// The console showed this kernel panic line
    /// (`Kernel panic - not syncing: ...`).
    pub fn note_panic(&self, msg: &str) {
        let mut p = self.panic.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            *p = Some(msg.to_string());
        }
    }

    /// The guest reset the machine (i8042, triple fault): a reboot, or a
    /// crash if it panicked first.
    pub fn request_reset(&self) {
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.request(match panic {
            Some(line) => ExitReason::Crashed(line),
            None => ExitReason::Reboot,
        });
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}
