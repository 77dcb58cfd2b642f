//! Reading the guest's serial console for the events a VMM cannot see
//! otherwise: a kernel panic (the reason we report) and a clean power-down
//! (microVMs without ACPI have no power-off device; the kernel prints the
//! line and halts, so the backend ends the VM itself).
//!
//! [`classify`] is the one parser of console lines: the QEMU backend feeds
//! it from the log ([`ConsoleWatch`]), the built-in VMM's serial device from
//! the bytes the guest writes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

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

fn strip_timestamp(line: &str) -> &str {
    let t = line.trim_start();
    if let Some(rest) = t.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let stamp = &rest[..end];
            if stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.') {
                return rest[end + 1..].trim_start();
            }
        }
    }
    t
}

/// Follows a growing console log from where it was when created, yielding
/// events line by line.
#[derive(Debug)]
pub struct ConsoleWatch {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl ConsoleWatch {
    /// Start following at the file's current end (earlier runs' output in an
    /// appended log is ignored).
    pub fn new(path: &Path) -> ConsoleWatch {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        ConsoleWatch {
            path: path.to_path_buf(),
            offset,
            partial: Vec::new(),
        }
    }

    /// Read what was appended since the last call; return the events found.
    pub fn poll(&mut self) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        let Ok(mut file) = File::open(&self.path) else {
            return events;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated behind our back: start over.
            self.offset = 0;
            self.partial.clear();
        }
        if len == self.offset || file.seek(SeekFrom::Start(self.offset)).is_err() {
            return events;
        }
        let mut buf = Vec::new();
        if let Ok(n) = file.take(len - self.offset).read_to_end(&mut buf) {
            self.offset += n as u64;
        }
        self.partial.extend_from_slice(&buf);
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            if let Some(ev) = classify(&String::from_utf8_lossy(&line)) {
                events.push(ev);
            }
        }
        // A very long line without newline: classify and drop what we hold.
        if self.partial.len() > 64 * 1024 {
            if let Some(ev) = classify(&String::from_utf8_lossy(&self.partial)) {
                events.push(ev);
            }
            self.partial.clear();
        }
        events
    }

    /// Everything after the last poll, including an unterminated last line.
    pub fn drain(&mut self) -> Vec<ConsoleEvent> {
        let mut events = self.poll();
        if !self.partial.is_empty() {
            if let Some(ev) = classify(&String::from_utf8_lossy(&self.partial)) {
                events.push(ev);
            }
            self.partial.clear();
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
    fn follows_appends_and_split_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "old run: reboot: Power down\nreboot: Power down\n").unwrap();
        let mut w = ConsoleWatch::new(&path);
        assert!(w.poll().is_empty(), "earlier content ignored");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"[ 1.0] Kernel panic - not sync").unwrap();
        assert!(w.poll().is_empty());
        f.write_all(b"ing: boom\n[ 1.1] reboot: Restart").unwrap();
        assert_eq!(
            w.poll(),
            vec![ConsoleEvent::Panic(
                "Kernel panic - not syncing: boom".into()
            )]
        );
        f.write_all(b"ing system").unwrap();
        assert_eq!(w.drain(), vec![ConsoleEvent::Restart]);
    }
}
