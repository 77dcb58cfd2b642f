//! 8250/16550A UART at 0x3f8 (COM1, IRQ 4): guest console output to a log
//! file. The register model is vm-superio's; we add the console sink, which
//! also notices kernel panics so the VM's exit can say why the guest died
//! ([`classify`](vmpod_runtime::hypervisor::console::classify)), and caps
//! and buffers the log.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use super::bus::BusDevice;
use super::{ExitSignal, IrqLine};
use vmpod_runtime::hypervisor::console::{ConsoleEvent, ConsoleLog};
use vmpod_runtime::hypervisor::ExitReason;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const PORT_LEN: u64 = 8;

pub struct SerialIrq(pub Arc<dyn IrqLine>);

impl Trigger for SerialIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Console sink: the runtime's [`ConsoleLog`] (line splitting, buffered
/// and capped log writes, [`classify`]) wired to the VM's [`ExitSignal`].
pub struct ConsoleSink<W: Write> {
    log: ConsoleLog<W>,
    exit: Arc<ExitSignal>,
}

impl<W: Write> ConsoleSink<W> {
    /// Log to `out`, at most `max` bytes of guest output.
    pub fn new(out: W, max: u64, exit: Arc<ExitSignal>) -> Self {
        Self {
            log: ConsoleLog::new(out, max),
            exit,
        }
    }

    /// What a console line means for the VM.
    fn on_event(exit: &ExitSignal, ev: ConsoleEvent) {
        match ev {
            // panic=-1 resets next (i8042 / triple fault): that reports it.
            ConsoleEvent::Panic(line) => exit.note_panic(&line),
            // The kernel stopped for good (panic=0): nothing more will come.
            ConsoleEvent::PanicEnd(line) => {
                exit.note_panic(&line);
                exit.request_reset();
            }
            // No ACPI in a microVM: after this the kernel halts forever.
            ConsoleEvent::PowerDown => exit.request(ExitReason::PowerOff),
            ConsoleEvent::Restart => {}
        }
    }

    /// Write out a buffered partial line (the event loop's tick) .
    pub fn flush_log(&mut self) {
        self.log.flush();
    }

    /// The VM is stopping: classify an unterminated last line, write out
    /// everything.
    pub fn finish(&mut self) {
        let exit = &self.exit;
        self.log.finish(|ev| Self::on_event(exit, ev));
    }

    pub fn log(&self) -> &ConsoleLog<W> {
        &self.log
    }
}

impl<W: Write> Write for ConsoleSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let exit = &self.exit;
        self.log.feed(buf, |ev| Self::on_event(exit, ev));
        // A failing log must not stop the guest; ConsoleLog reports it.
        Ok(buf.len())
    }

    /// vm-superio flushes after every byte; the log is flushed at line
    /// ends, when its buffer fills, by [`ConsoleSink::flush_log`] and on
    /// exit instead.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART as a bus device.
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<SerialIrq, NoEvents, ConsoleSink<W>>,
}

impl<W: Write + Send> SerialDevice<W> {
    pub fn new(irq: Arc<dyn IrqLine>, sink: ConsoleSink<W>) -> Self {
        Self {
            uart: Serial::new(SerialIrq(irq), sink),
        }
    }

    pub fn sink(&self) -> &ConsoleSink<W> {
        self.uart.writer()
    }

    pub fn sink_mut(&mut self) -> &mut ConsoleSink<W> {
        self.uart.writer_mut()
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, b) {
                tracing::warn!(error = ?e, "serial write");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl IrqLine for Count {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn dev() -> (SerialDevice<Vec<u8>>, Arc<Count>, Arc<ExitSignal>) {
        let irq = Arc::new(Count::default());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let d = SerialDevice::new(
            irq.clone(),
            ConsoleSink::new(Vec::new(), 1 << 20, exit.clone()),
        );
        (d, irq, exit)
    }

    fn logged(d: &SerialDevice<Vec<u8>>) -> &[u8] {
        d.sink().log().get_ref()
    }

    fn put(d: &mut SerialDevice<Vec<u8>>, s: &str) {
        for b in s.bytes() {
            d.write(0, &[b]);
        }
    }

    #[test]
    fn data_register_writes_reach_the_log() {
        let (mut d, _, exit) = dev();
        put(&mut d, "hello\r\nworld");
        assert_eq!(logged(&d), b"hello\r\n", "whole lines are written at once");
        d.sink_mut().flush_log();
        assert_eq!(
            logged(&d),
            b"hello\r\nworld",
            "the tick writes a partial line"
        );
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn thr_empty_interrupt_when_enabled() {
        let (mut d, irq, _) = dev();
        d.write(1, &[0x2]); // IER: THR empty
        put(&mut d, "x");
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut iir = [0u8];
        d.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x2, "IIR says THR empty");
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let (mut d, _, _) = dev();
        let mut lsr = [0u8];
        d.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn scratch_and_divisor_latch() {
        let (mut d, _, _) = dev();
        d.write(7, &[0x5a]);
        let mut b = [0u8];
        d.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        d.write(3, &[0x80]); // DLAB
        d.write(0, &[0x03]);
        d.read(0, &mut b);
        assert_eq!(b[0], 0x03);
        d.sink_mut().flush_log();
        assert!(logged(&d).is_empty(), "divisor write is not data");
        // Offsets out of range are ignored, empty accesses too.
        d.write(300, &[1]);
        d.write(0, &[]);
    }

    #[test]
    fn panic_line_is_noted_and_reset_reports_crash() {
        let (mut d, _, exit) = dev();
        put(
            &mut d,
            "[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n",
        );
        assert_eq!(exit.reason(), None, "panic=-1 still reboots: wait for it");
        exit.request_reset();
        assert_eq!(
            exit.reason(),
            Some(ExitReason::Crashed(
                "Kernel panic - not syncing: VFS: Unable to mount root fs".into()
            ))
        );
    }

    #[test]
    fn power_off_line_ends_the_vm_cleanly() {
        let (mut d, _, exit) = dev();
        put(&mut d, "[    2.5] reboot: Power down\r\n");
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn panic_end_line_stops_the_vm() {
        let (mut d, _, exit) = dev();
        put(
            &mut d,
            "---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n",
        );
        assert_eq!(
            exit.reason(),
            Some(ExitReason::Crashed(
                "Kernel panic - not syncing: Attempted to kill init!".into()
            ))
        );
    }

    #[test]
    fn log_is_capped_but_the_power_off_after_the_cap_is_seen() {
        let irq = Arc::new(Count::default());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut d = SerialDevice::new(irq, ConsoleSink::new(Vec::new(), 64, exit.clone()));
        for _ in 0..100 {
            put(&mut d, "a guest that prints without end\n");
        }
        put(&mut d, "[ 9.0] reboot: Power down\n");
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        let text = String::from_utf8_lossy(logged(&d)).to_string();
        assert_eq!(d.sink().log().written(), 64);
        assert!(text.contains("limit of 64 bytes reached"), "{text}");
        assert!(text.len() < 64 + 120);
    }

    #[test]
    fn unterminated_last_line_is_classified_at_finish() {
        let (mut d, _, exit) = dev();
        put(&mut d, "reboot: System halted");
        assert_eq!(exit.reason(), None);
        d.sink_mut().finish();
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        assert_eq!(logged(&d), b"reboot: System halted");
    }
}
