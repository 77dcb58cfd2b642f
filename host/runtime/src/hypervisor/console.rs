//! Reading the guest's serial console for the events a VMM cannot see
//! otherwise: a kernel panic (the reason we report) and a clean power-down
//! (microVMs without ACPI have no power-off device; the kernel prints the
//! line and halts, so the backend ends the VM itself).
//!
//! Both backends pass the guest's console bytes through one [`ConsoleLog`]:
//! the built-in VMM's serial device as the guest writes them, the QEMU
//! backend from QEMU's serial socket. It splits them into lines for
//! [`classify`], the one parser of console lines, and writes them to the
//! console log file buffered (flushed at line ends, when the buffer fills
//! and on exit) and capped, so a guest printing without end cannot fill
//! the host's disk. Crash and power-off detection keep working after the
//! cap: they see every line, logged or not.

use std::io::Write;

/// Default cap on what one VM writes to its console log.
pub const DEFAULT_CONSOLE_LOG_MAX: u64 = 64 << 20;
/// Longest console line kept for [`classify`] (the rest of a longer line
/// is still logged, just not classified).
const MAX_LINE: usize = 1024;
/// Bytes buffered before a write even without a line end.
const BUF_SIZE: usize = 8192;

/// What a console line tells us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// `Kernel panic - not syncing: ...` (the line, timestamp stripped).
    Panic(String),
    /// `---[ end Kernel panic - not syncing: ... ]---`: the kernel's last
    /// words when it does not reboot on panic (`panic=0`); it stops for good.
    /// Carries the panic line as [`ConsoleEvent::Panic`] does.
    PanicEnd(String),
    /// `reboot: Power down` or `reboot: System halted`.
    PowerDown,
    /// `reboot: Restarting system`.
    Restart,
}

/// Classify one console line.
pub fn classify(line: &str) -> Option<ConsoleEvent> {
    const PANIC: &str = "Kernel panic - not syncing";
    const END: &str = "---[ end ";
    let text = strip_timestamp(line.trim_end_matches(['\r', '\n']));
    if let Some(i) = text.find(PANIC) {
        let msg = text[i..].trim();
        if text[..i].ends_with(END) {
            let msg = msg.strip_suffix("]---").unwrap_or(msg).trim_end();
            return Some(ConsoleEvent::PanicEnd(msg.to_string()));
        }
        return Some(ConsoleEvent::Panic(msg.to_string()));
    }
    match text.trim() {
        "reboot: Power down" | "reboot: System halted" => Some(ConsoleEvent::PowerDown),
        "reboot: Restarting system" => Some(ConsoleEvent::Restart),
        _ => None,
    }
}

/// At most this many leading `[...]` groups are stripped from a line.
const MAX_PREFIX_GROUPS: usize = 4;
/// Longest `[...]` group taken for a prefix (timestamps and
/// `CONFIG_PRINTK_CALLER` ids are far shorter).
const MAX_PREFIX_GROUP: usize = 32;

/// Strip the kernel's line prefixes: the timestamp `[    1.000000]` and,
/// with `CONFIG_PRINTK_CALLER`, the caller id `[    T1]` / `[    C0]`
/// right after it, so `[    1.000000][    T1] reboot: Power down` reads as
/// `reboot: Power down`. Only short groups of digits, dots, spaces and
/// letters are taken, at most [`MAX_PREFIX_GROUPS`] of them.
fn strip_timestamp(line: &str) -> &str {
    let mut t = line.trim_start();
    for _ in 0..MAX_PREFIX_GROUPS {
        let Some(rest) = t.strip_prefix('[') else {
            break;
        };
        let Some(end) = rest.find(']') else {
            break;
        };
        let group = &rest[..end];
        let prefix_like = end <= MAX_PREFIX_GROUP
            && !group.trim().is_empty()
            && group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == ' ');
        if !prefix_like {
            break;
        }
        t = rest[end + 1..].trim_start();
    }
    t
}

/// The guest's console output on its way to the log: see the module docs.
pub struct ConsoleLog<W: Write> {
    out: W,
    max: u64,
    written: u64,
    truncated: bool,
    /// Not yet written to `out`.
    buf: Vec<u8>,
    /// `buf` holds a line end: write it out after this input.
    flush_due: bool,
    /// The current line, for [`classify`].
    line: Vec<u8>,
    write_failed: bool,
}

impl<W: Write> ConsoleLog<W> {
    /// Log to `out`, at most `max` bytes of guest output (then one line
    /// saying the rest was dropped).
    pub fn new(out: W, max: u64) -> ConsoleLog<W> {
        ConsoleLog {
            out,
            max,
            written: 0,
            truncated: false,
            buf: Vec::with_capacity(BUF_SIZE),
            flush_due: false,
            line: Vec::with_capacity(256),
            write_failed: false,
        }
    }

    /// Take guest output; `on_event` gets what each completed line means.
    /// Whole lines reach the log before this returns.
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(ConsoleEvent)) {
        for &b in bytes {
            match b {
                b'\n' => {
                    if let Some(ev) = classify(&String::from_utf8_lossy(&self.line)) {
                        on_event(ev);
                    }
                    self.line.clear();
                    self.flush_due = true;
                }
                b'\r' => {}
                _ if self.line.len() < MAX_LINE => self.line.push(b),
                _ => {}
            }
        }
        if !self.truncated {
            self.buf.extend_from_slice(bytes);
        }
        if self.flush_due || self.buf.len() >= BUF_SIZE {
            self.flush();
        }
    }

    /// Write out what is buffered (a partial line too).
    pub fn flush(&mut self) {
        self.flush_due = false;
        if self.buf.is_empty() {
            return;
        }
        let room = self.max.saturating_sub(self.written);
        let take = self
            .buf
            .len()
            .min(usize::try_from(room).unwrap_or(usize::MAX));
        let mut data = std::mem::take(&mut self.buf);
        if take < data.len() {
            data.truncate(take);
            data.extend_from_slice(
                format!(
                    "\n[vmpod: console log limit of {} bytes reached; further guest output is \
                     not logged]\n",
                    self.max
                )
                .as_bytes(),
            );
            self.truncated = true;
            tracing::warn!(
                max = self.max,
                "console log limit reached; dropping guest output"
            );
        }
        self.written += take as u64;
        if let Err(e) = self.out.write_all(&data).and_then(|()| self.out.flush()) {
            // A failing log must not stop the guest; say so once.
            if !self.write_failed {
                tracing::warn!(error = %e, "console log write failed");
                self.write_failed = true;
            }
        }
        data.clear();
        if !self.truncated {
            self.buf = data;
        }
    }

    /// The guest is gone: classify an unterminated last line and write out
    /// everything buffered.
    pub fn finish(&mut self, on_event: impl FnOnce(ConsoleEvent)) {
        if !self.line.is_empty() {
            if let Some(ev) = classify(&String::from_utf8_lossy(&self.line)) {
                on_event(ev);
            }
            self.line.clear();
        }
        self.flush();
    }

    /// Guest bytes written to the log so far (the limit notice not counted).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The writer (tests look at what reached it).
    pub fn get_ref(&self) -> &W {
        &self.out
    }
}

impl<W: Write> Drop for ConsoleLog<W> {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_lines() {
        assert_eq!(
            classify("[    1.234567] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n"),
            Some(ConsoleEvent::Panic(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100".into()
            ))
        );
        assert_eq!(
            classify("[ 2.0] reboot: Power down"),
            Some(ConsoleEvent::PowerDown)
        );
        assert_eq!(
            classify("reboot: System halted"),
            Some(ConsoleEvent::PowerDown)
        );
        assert_eq!(
            classify("[ 2.0] reboot: Restarting system"),
            Some(ConsoleEvent::Restart)
        );
        assert_eq!(
            classify("[ 3.1] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---\r"),
            Some(ConsoleEvent::PanicEnd(
                "Kernel panic - not syncing: Attempted to kill init!".into()
            ))
        );
        assert_eq!(classify("echo reboot: Power down later"), None);
        assert_eq!(classify("reboot: Power down now"), None);
        assert_eq!(classify("[ 0.1] Run /init as init process"), None);
    }

    #[test]
    fn classifies_lines_with_printk_caller_prefix() {
        // CONFIG_PRINTK_CALLER adds a task (T) or CPU (C) id after the time.
        assert_eq!(
            classify("[    1.000000][    T1] reboot: Power down\r\n"),
            Some(ConsoleEvent::PowerDown)
        );
        assert_eq!(
            classify("[    2.500000][    C0] reboot: System halted"),
            Some(ConsoleEvent::PowerDown)
        );
        assert_eq!(
            classify("[    1.5][  T123] reboot: Restarting system"),
            Some(ConsoleEvent::Restart)
        );
        assert_eq!(
            classify("[    1.234567][    T1] Kernel panic - not syncing: Attempted to kill init!"),
            Some(ConsoleEvent::Panic(
                "Kernel panic - not syncing: Attempted to kill init!".into()
            ))
        );
        assert_eq!(
            classify(
                "[    3.100000][    T1] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---"
            ),
            Some(ConsoleEvent::PanicEnd(
                "Kernel panic - not syncing: Attempted to kill init!".into()
            ))
        );
        // Only the plain timestamp prefix, as before.
        assert_eq!(
            classify("[    1.000000] reboot: Power down"),
            Some(ConsoleEvent::PowerDown)
        );
        // Something else in brackets, or text before the line, still is not
        // a power-down.
        assert_eq!(classify("[    1.0][ T1] [x] echo reboot: Power down"), None);
        assert_eq!(classify("[ 1.0][T1] say reboot: Power down"), None);
        assert_eq!(
            classify("[ 1.0][a/b: c] reboot: Power down"),
            None,
            "a group that is no prefix ends the stripping"
        );
    }

    fn feed(log: &mut ConsoleLog<Vec<u8>>, s: &str) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        log.feed(s.as_bytes(), |e| events.push(e));
        events
    }

    #[test]
    fn lines_split_across_writes_are_classified_and_logged_whole() {
        let mut log = ConsoleLog::new(Vec::new(), 1 << 20);
        assert!(feed(&mut log, "[ 1.0] Kernel panic - not sync").is_empty());
        assert!(log.get_ref().is_empty(), "a partial line stays buffered");
        let ev = feed(&mut log, "ing: boom\r\n[ 1.1] reboot: Restart");
        assert_eq!(
            ev,
            vec![ConsoleEvent::Panic(
                "Kernel panic - not syncing: boom".into()
            )]
        );
        assert_eq!(
            log.get_ref().as_slice(),
            b"[ 1.0] Kernel panic - not syncing: boom\r\n[ 1.1] reboot: Restart",
            "a line end writes out everything buffered, unchanged"
        );
        let mut events = Vec::new();
        feed(&mut log, "ing system");
        log.finish(|e| events.push(e));
        assert_eq!(events, vec![ConsoleEvent::Restart]);
        assert!(log.get_ref().ends_with(b"Restarting system"));
    }

    #[test]
    fn byte_at_a_time_output_is_written_per_line_not_per_byte() {
        struct Count(usize, Vec<u8>);
        impl Write for Count {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0 += 1;
                self.1.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut log = ConsoleLog::new(Count(0, Vec::new()), 1 << 20);
        for b in "first line\nsecond line\n".bytes() {
            log.feed(&[b], |_| {});
        }
        assert_eq!(log.get_ref().0, 2, "one write per line");
        for _ in 0..BUF_SIZE {
            log.feed(b"x", |_| {});
        }
        assert_eq!(
            log.get_ref().0,
            3,
            "a full buffer is written without a line end"
        );
        log.feed(b"tail", |_| {});
        drop(log); // flushes; checked through a shared writer below
    }

    #[test]
    fn cap_truncates_once_and_events_still_arrive() {
        let mut log = ConsoleLog::new(Vec::new(), 100);
        let mut events = Vec::new();
        for i in 0..50 {
            log.feed(format!("spam line {i:03}\n").as_bytes(), |e| events.push(e));
        }
        log.feed(b"[ 9.9] reboot: Power down\n", |e| events.push(e));
        log.finish(|e| events.push(e));
        assert_eq!(events, vec![ConsoleEvent::PowerDown], "seen past the cap");
        let text = String::from_utf8(log.get_ref().clone()).unwrap();
        assert!(text.starts_with("spam line 000\n"));
        assert_eq!(log.written(), 100);
        assert_eq!(
            text.matches("console log limit of 100 bytes reached")
                .count(),
            1
        );
        assert!(text.len() < 100 + 120, "{} bytes", text.len());
        assert!(!text.contains("Power down"), "nothing logged after the cap");
    }

    #[test]
    fn a_failing_writer_does_not_stop_the_console() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut log = ConsoleLog::new(Broken, 1 << 20);
        let mut events = Vec::new();
        log.feed(b"reboot: System halted\n", |e| events.push(e));
        assert_eq!(events, vec![ConsoleEvent::PowerDown]);
    }

    #[test]
    fn overlong_lines_are_logged_whole_and_classified_by_their_start() {
        let mut log = ConsoleLog::new(Vec::new(), 1 << 20);
        let long = format!("Kernel panic - not syncing: {}\n", "x".repeat(5000));
        let ev = feed(&mut log, &long);
        assert!(matches!(&ev[..], [ConsoleEvent::Panic(l)] if l.len() <= MAX_LINE));
        assert_eq!(log.get_ref().len(), long.len());
    }
}
