//! QEMU's serial port, read by the supervisor: QEMU connects its console
//! chardev to a unix socket we listen on (before QEMU starts, so no early
//! output is lost), and what arrives goes through the shared
//! [`ConsoleLog`] — capped and buffered log writes plus line
//! classification — exactly as the built-in VMM's UART does. The console
//! log file callers read stays the same path.
//!
//! The supervisor runs on the daemon's async workers, so it never touches
//! the file: [`ConsoleLog`] hands finished chunks to a bounded channel and
//! a dedicated thread writes them. A slow or stalled disk then stalls only
//! that thread; the socket is still read and every line still classified
//! (panic and power-down detection keep working). Chunks that would take
//! the queue past [`WRITER_QUEUE_BYTES`] are dropped and the log says how
//! many bytes were lost.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Child;
use tokio::sync::oneshot;

use crate::hypervisor::console::{ConsoleEvent, ConsoleLog};
use crate::hypervisor::process::log_tail;
use crate::hypervisor::{HypervisorError, Result};

/// Bytes that may wait for the log writer thread. Generous, so a flood
/// on a busy host is written whole; only a log file that stalls for real
/// makes output drop.
const WRITER_QUEUE_BYTES: usize = 4 << 20;

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

/// The [`ConsoleLog`]'s writer: queues chunks for the log thread without
/// ever blocking; drops them (counted) when the thread falls behind.
struct QueuedWriter {
    tx: Sender<Vec<u8>>,
    /// Bytes sent and not yet written by the thread.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    /// Bytes dropped since the last chunk that got through.
    dropped: u64,
}

impl QueuedWriter {
    fn notice(dropped: u64) -> Vec<u8> {
        format!(
            "\n[vmpod: {dropped} bytes of console output dropped: the log file \
             could not keep up]\n"
        )
        .into_bytes()
    }
}

impl Write for QueuedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let chunk = if self.dropped > 0 {
            let mut c = Self::notice(self.dropped);
            c.extend_from_slice(buf);
            c
        } else {
            buf.to_vec()
        };
        if self.queued.load(Ordering::SeqCst) + chunk.len() > self.max_queued {
            self.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        self.queued.fetch_add(chunk.len(), Ordering::SeqCst);
        if self.tx.send(chunk).is_err() {
            return Err(std::io::Error::other("console log writer thread ended"));
        }
        self.dropped = 0;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedWriter {
    fn drop(&mut self) {
        if self.dropped > 0 {
            let _ = self.tx.send(Self::notice(self.dropped));
        }
    }
}

/// The log thread: write every chunk, until the sender is gone.
fn write_log(
    mut file: File,
    rx: Receiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    done: oneshot::Sender<()>,
) {
    let mut failed = false;
    for chunk in rx {
        if let Err(e) = file.write_all(&chunk) {
            // A failing log must not stop the guest; say so once.
            if !failed {
                tracing::warn!(error = %e, "console log write failed");
                failed = true;
            }
        }
        // Counted until written: a chunk stuck in a stalled write counts.
        queued.fetch_sub(chunk.len(), Ordering::SeqCst);
    }
    let _ = done.send(());
}

/// The connected serial port and the log it feeds.
pub(crate) struct SerialConsole {
    stream: Option<UnixStream>,
    /// None once drained (dropping it ends the log thread).
    log: Option<ConsoleLog<QueuedWriter>>,
    /// The log thread wrote everything and ended.
    log_done: Option<oneshot::Receiver<()>>,
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
        let (tx, rx) = channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let in_thread = queued.clone();
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("vmpod-console-log".into())
            .spawn(move || write_log(file, rx, in_thread, done_tx))
            .map_err(HypervisorError::io("starting the console log thread"))?;
        Ok(SerialConsole {
            stream: Some(stream),
            log: Some(ConsoleLog::new(
                QueuedWriter {
                    tx,
                    queued,
                    max_queued: WRITER_QUEUE_BYTES,
                    dropped: 0,
                },
                max,
            )),
            log_done: Some(done_rx),
            buf: vec![0u8; 16 * 1024],
        })
    }

    /// The next output QEMU sends (logged; a chunk's partial last line too,
    /// so a prompt shows at once) and what its lines mean. Never returns
    /// once the socket closed.
    pub(crate) async fn read(&mut self) -> Vec<ConsoleEvent> {
        let (Some(stream), Some(log)) = (self.stream.as_mut(), self.log.as_mut()) else {
            return std::future::pending().await;
        };
        match stream.read(&mut self.buf).await {
            Ok(n) if n > 0 => {
                let mut events = Vec::new();
                log.feed(&self.buf[..n], |e| events.push(e));
                log.flush();
                events
            }
            // EOF (QEMU exited) or a broken socket: nothing more will come.
            _ => {
                self.stream = None;
                Vec::new()
            }
        }
    }

    /// QEMU is gone: read what is left in the socket, classify the
    /// unterminated last line, and let the log thread write everything
    /// out (bounded: a stalled disk must not hold up the VM's end).
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
        if let Some(mut log) = self.log.take() {
            log.finish(|e| events.push(e));
        } // dropped: the log thread ends once it wrote what is queued
        if let Some(done) = self.log_done.take() {
            if tokio::time::timeout_at(deadline + DRAIN_LIMIT, done)
                .await
                .is_err()
            {
                tracing::warn!("the console log is still being written; not waiting for it");
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    use tokio::io::AsyncWriteExt;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// The console log is a FIFO whose reader never reads: writes block
    /// once its 64 KiB fill, as on a stalled disk. The supervisor's read()
    /// runs on a single-threaded runtime; it must keep reading the socket
    /// and see the power-down line after megabytes of output (a blocking
    /// write in read() stalled the runtime, and this, for good).
    #[test]
    fn a_stalled_log_file_blocks_neither_the_runtime_nor_power_down_detection() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("console.log");
        mkfifo(&fifo);
        let _reader = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (ours, mut qemu) = UnixStream::pair().unwrap();
                let mut console = SerialConsole::new(ours, &path, 1 << 30).unwrap();
                let guest = tokio::spawn(async move {
                    let mut line = vec![b'x'; 99];
                    line.push(b'\n');
                    // 8 MiB: far more than the pipe and the writer queue hold.
                    for _ in 0..(8 << 20) / line.len() {
                        qemu.write_all(&line).await.unwrap();
                    }
                    qemu.write_all(b"[    9.000000][    T1] reboot: Power down\n")
                        .await
                        .unwrap();
                    qemu
                });
                loop {
                    if console.read().await.contains(&ConsoleEvent::PowerDown) {
                        break;
                    }
                }
                let _qemu = guest.await.unwrap();
                let _ = done_tx.send(());
            });
        });
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("power-down seen while the console log file is stalled");
    }

    /// Everything QEMU wrote, the unterminated last line too, is in the log
    /// file once drain() returns.
    #[tokio::test]
    async fn drain_returns_once_the_log_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let mut console = SerialConsole::new(ours, &path, 1 << 20).unwrap();
        let mut expected = String::new();
        for i in 0..2000 {
            expected.push_str(&format!("line {i}\n"));
        }
        expected.push_str("Kernel panic - not syncing: last words");
        qemu.write_all(expected.as_bytes()).await.unwrap();
        drop(qemu);
        let events = console.drain().await;
        assert_eq!(
            events,
            vec![ConsoleEvent::Panic(
                "Kernel panic - not syncing: last words".into()
            )]
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);
    }

    /// Chunks that would overfill the queue are dropped, and the next one
    /// that gets through says how much was lost.
    #[test]
    fn dropped_output_is_reported_in_the_log() {
        let (tx, rx) = channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut w = QueuedWriter {
            tx,
            queued: queued.clone(),
            max_queued: 100,
            dropped: 0,
        };
        w.write_all(&[b'a'; 96]).unwrap();
        w.write_all(b"lost\n").unwrap();
        w.write_all(b"lost too\n").unwrap();
        assert_eq!(rx.recv().unwrap(), [b'a'; 96]);
        queued.fetch_sub(96, Ordering::SeqCst); // what the log thread does
        w.write_all(b"after\n").unwrap();
        let got = String::from_utf8(rx.recv().unwrap()).unwrap();
        assert!(got.contains("14 bytes of console output dropped"), "{got}");
        assert!(got.ends_with("]\nafter\n"), "{got}");
    }
}
