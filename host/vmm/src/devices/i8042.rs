//! Minimal i8042 controller at 0x60/0x64: only the CPU reset command
//! (`reboot=k`) matters; it ends the VM with `Reboot` (or `Crashed` when
//! the console showed a kernel panic first).

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use super::ExitSignal;

pub const I8042_PORT: u64 = 0x60;
pub const PORT_LEN: u64 = 5;

pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_reset();
        Ok(())
    }
}

pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self {
            dev: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.dev.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.dev.write(offset as u8, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmpod_runtime::hypervisor::ExitReason;

    #[test]
    fn reset_command_requests_reboot() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut d = I8042::new(exit.clone());
        let mut status = [0xffu8];
        d.read(4, &mut status);
        assert_eq!(status[0], 0, "input buffer empty, so kb_wait() returns");
        d.write(4, &[0xaa]);
        assert_eq!(exit.reason(), None);
        d.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
        assert_eq!(exit.event_fd().read().unwrap(), 1);
    }
}
