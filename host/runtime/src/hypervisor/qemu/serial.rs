//! QEMU's serial port, read by the supervisor: QEMU connects its console
//! chardev to a unix socket we listen on (before QEMU starts, so no early
//! output is lost), and what arrives goes through the shared
//! [`ConsoleLog`] — capped and buffered log writes plus line
//! classification — exactly as the built-in VMM's UART does. The console
//! log file callers read stays the same path.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Child;

use crate::hypervisor::console::{ConsoleEvent, ConsoleLog};
use crate::hypervisor::process::log_tail;
use crate::hypervisor::{HypervisorError, Result};

/// How long the output left in the socket may take to read once QEMU exited.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// The listening end, bound before QEMU starts.
pub(crate) struct SerialListener(UnixListener);

impl SerialListener {
    pub(crate) fn bind(path: &Path) -> Result<SerialListener> {
        UnixListener::bind(path)
            .map(SerialListener)
            .map_err(HypervisorError::io("binding the serial console socket"))
    }

    /// Wait for QEMU to connect its serial port (it does so while creating
    /// its chardevs, before the guest runs).
    pub(crate) async fn accept(
        self,
        qemu: &mut Child,
        qemu_log: &Path,
        timeout: Duration,
    ) -> Result<UnixStream> {
        tokio::select! {
            r = self.0.accept() => r
                .map(|(s, _)| s)
                .map_err(HypervisorError::io("accepting QEMU's serial console")),
            status = qemu.wait() => Err(HypervisorError::Start(format!(
                "QEMU exited ({}) before connecting its serial console: {}",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                log_tail(qemu_log, 3)
            ))),
            _ = tokio::time::sleep(timeout) => Err(HypervisorError::Start(format!(
                "QEMU did not connect its serial console within {timeout:?}: {}",
                log_tail(qemu_log, 3)
            ))),
        }
    }
}

/// The connected serial port and the log it feeds.
pub(crate) struct SerialConsole {
    stream: Option<UnixStream>,
    log: ConsoleLog<File>,
    buf: Vec<u8>,
}

impl SerialConsole {
    /// Append to `console_log`, at most `max` bytes of guest output.
    pub(crate) fn new(stream: UnixStream, console_log: &Path, max: u64) -> Result<SerialConsole> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(console_log)
            .map_err(HypervisorError::io("opening the console log"))?;
        Ok(SerialConsole {
            stream: Some(stream),
            log: ConsoleLog::new(file, max),
            buf: vec![0u8; 16 * 1024],
        })
    }

    /// The next output QEMU sends (logged; a chunk's partial last line too,
    /// so a prompt shows at once) and what its lines mean. Never returns
    /// once the socket closed.
    pub(crate) async fn read(&mut self) -> Vec<ConsoleEvent> {
        let Some(stream) = self.stream.as_mut() else {
            return std::future::pending().await;
        };
        match stream.read(&mut self.buf).await {
            Ok(n) if n > 0 => {
                let mut events = Vec::new();
                self.log.feed(&self.buf[..n], |e| events.push(e));
                self.log.flush();
                events
            }
            // EOF (QEMU exited) or a broken socket: nothing more will come.
            _ => {
                self.stream = None;
                Vec::new()
            }
        }
    }

    /// QEMU is gone: read what is left in the socket, then write out and
    /// classify the unterminated last line.
    pub(crate) async fn drain(&mut self) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        while self.stream.is_some() {
            match tokio::time::timeout_at(deadline, self.read()).await {
                Ok(more) => events.extend(more),
                Err(_) => break,
            }
        }
        self.stream = None;
        self.log.finish(|e| events.push(e));
        events
    }
}
