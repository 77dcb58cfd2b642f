//! The agent's log goes to the serial console, which the host reads: the
//! QEMU backend ends a VM on a `reboot: Power down` line and reports a
//! `Kernel panic` line as the crash reason. Values we log can come from
//! tenants (paths, IDs, error texts), so one log record must stay one
//! console line: [`ConsoleWriter`] escapes line breaks and other control
//! characters inside a record and keeps only its final newline.

use std::io::{self, Write};

/// A `tracing_subscriber` writer: stderr (the console), one line per record.
pub struct ConsoleWriter<W: Write>(pub W);

impl<W: Write> Write for ConsoleWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&escape_record(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// `stderr` wrapped, for `fmt().with_writer(console)`.
pub fn console() -> ConsoleWriter<io::Stderr> {
    ConsoleWriter(io::stderr())
}

/// Escape control characters (newline, CR, ESC...) except a trailing
/// newline and tabs.
pub fn escape_record(buf: &[u8]) -> Vec<u8> {
    let (body, end) = match buf.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (buf, &b""[..]),
    };
    let mut out = Vec::with_capacity(buf.len() + 8);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.push(b),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_stays_one_line() {
        let forged = b"WARN mount failed source=\"x\nreboot: Power down\r\n\x1b[2J\"\n";
        let out = escape_record(forged);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "WARN mount failed source=\"x\\nreboot: Power down\\r\\n\\x1b[2J\"\n"
        );
        assert_eq!(escape_record(b"plain\tline\n"), b"plain\tline\n");
        assert_eq!(escape_record(b"no newline"), b"no newline");
        assert_eq!(escape_record(b""), b"");
    }

    #[test]
    fn writer_reports_the_caller_s_length() {
        let mut w = ConsoleWriter(Vec::new());
        assert_eq!(w.write(b"a\nb\n").unwrap(), 4);
        assert_eq!(w.0, b"a\\nb\n");
    }
}
