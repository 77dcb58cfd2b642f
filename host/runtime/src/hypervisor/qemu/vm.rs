//! A running QEMU microVM: the handle and the task that supervises QEMU and
//! its helpers until the VM ends.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::Child;
use tokio::sync::{mpsc, watch};

use super::qmp::{Qmp, QmpMessage};
use crate::hypervisor::console::{ConsoleEvent, ConsoleWatch};
use crate::hypervisor::handle::SupervisedVm;
use crate::hypervisor::process::{log_tail, terminate};
use crate::hypervisor::{ExitReason, VmConfig};

/// How long QEMU gets to exit after `quit` before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// A supervised helper process (vsock back-end, virtiofsd).
pub(crate) struct Helper {
    name: &'static str,
    child: Child,
    log: PathBuf,
    exited: bool,
}

impl Helper {
    pub(crate) fn new(name: &'static str, child: Child, log: PathBuf) -> Helper {
        Helper {
            name,
            child,
            log,
            exited: false,
        }
    }
}

/// Everything `start` created, handed to the supervisor.
pub(crate) struct Parts {
    pub config: VmConfig,
    pub pid: Option<u32>,
    pub qemu: Child,
    pub qemu_log: PathBuf,
    pub qmp: Qmp,
    pub helpers: Vec<Helper>,
    pub console: ConsoleWatch,
    pub cleanup: Cleanup,
}

/// Handle to one QEMU microVM. Dropping it kills QEMU and the helpers and
/// removes the sockets (the supervisor sees the handle go away).
pub type QemuVm = SupervisedVm;

/// Start supervising what `start` created; returns the VM's handle.
pub(crate) fn spawn(parts: Parts) -> QemuVm {
    let (handle, channels) = SupervisedVm::new(&parts.config, parts.pid);
    let sup = Supervisor {
        cleanup: parts.cleanup,
        qemu: parts.qemu,
        qemu_log: parts.qemu_log,
        qmp: Some(parts.qmp),
        helpers: parts.helpers,
        console: parts.console,
        stopping: None,
        power_down: false,
        panic: None,
        shutdown_reason: None,
        internal_error: None,
    };
    tokio::spawn(sup.run(channels.stop_rx, channels.exit_tx));
    handle
}

/// Removes what outlives processes: the vsock socket and the runtime dir
/// (helper sockets, logs). Runs on every way out, including runtime shutdown.
pub(crate) struct Cleanup {
    vsock_uds: PathBuf,
    dir: TempDir,
}

impl Cleanup {
    /// Guard the VM's files from the moment the first helper may create
    /// them, so a failed start leaves nothing behind either.
    pub(crate) fn new(vsock_uds: PathBuf, dir: TempDir) -> Cleanup {
        Cleanup { vsock_uds, dir }
    }

    pub(crate) fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.vsock_uds);
    }
}

struct Supervisor {
    cleanup: Cleanup,
    qemu: Child,
    qemu_log: PathBuf,
    qmp: Option<Qmp>,
    helpers: Vec<Helper>,
    console: ConsoleWatch,
    /// When we asked QEMU to quit (a stop request).
    stopping: Option<tokio::time::Instant>,
    power_down: bool,
    panic: Option<String>,
    shutdown_reason: Option<String>,
    internal_error: Option<String>,
}

async fn next_qmp(qmp: &mut Option<Qmp>) -> Option<QmpMessage> {
    match qmp {
        Some(q) => match q.next().await {
            Ok(Some(m)) => Some(m),
            _ => {
                *qmp = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

impl Supervisor {
    async fn run(
        mut self,
        mut stop_rx: mpsc::UnboundedReceiver<()>,
        exit_tx: watch::Sender<Option<ExitReason>>,
    ) {
        let mut tick = tokio::time::interval(POLL);
        let reason = loop {
            tokio::select! {
                status = self.qemu.wait() => {
                    break self.reason(status);
                }
                req = stop_rx.recv() => match req {
                    Some(()) => self.request_quit(true).await,
                    None => {
                        // Handle dropped: end everything now.
                        let _ = self.qemu.start_kill();
                        let _ = self.qemu.wait().await;
                        break ExitReason::Stopped;
                    }
                },
                msg = next_qmp(&mut self.qmp) => {
                    if let Some(QmpMessage::Event { name, data }) = msg {
                        self.on_event(&name, &data).await;
                    }
                }
                _ = tick.tick() => self.on_tick().await,
            }
        };
        for h in &mut self.helpers {
            terminate(&mut h.child, Duration::from_secs(2)).await;
        }
        tracing::info!(%reason, vsock = %self.cleanup.vsock_uds.display(), "QEMU microVM ended");
        // Remove the sockets and the runtime dir before anyone learns the VM
        // ended, so a waiter can reuse the paths at once.
        drop(self);
        let _ = exit_tx.send(Some(reason));
    }

    /// Ask QEMU to quit (QMP), remembering whether this was a stop request.
    async fn request_quit(&mut self, stop_request: bool) {
        if stop_request && self.stopping.is_none() {
            self.stopping = Some(tokio::time::Instant::now());
        }
        let sent = match &mut self.qmp {
            Some(q) => q.send("quit").await.is_ok(),
            None => false,
        };
        if !sent {
            let _ = self.qemu.start_kill();
        }
    }

    async fn on_event(&mut self, name: &str, data: &serde_json::Value) {
        match name {
            "SHUTDOWN" => {
                self.shutdown_reason = data
                    .get("reason")
                    .and_then(|r| r.as_str())
                    .map(str::to_string);
            }
            // The VM paused by itself: KVM internal error (emulation failure).
            "STOP" if self.stopping.is_none() && !self.power_down => {
                let log = std::fs::read_to_string(&self.qemu_log).unwrap_or_default();
                let why = log
                    .lines()
                    .find(|l| l.contains("KVM internal error") || l.contains("emulation failure"))
                    .map(str::to_string)
                    .unwrap_or_else(|| "the VM stopped unexpectedly".into());
                tracing::warn!(%why, "guest stopped; ending the VM");
                self.internal_error = Some(why);
                self.request_quit(false).await;
            }
            _ => {}
        }
    }

    async fn on_tick(&mut self) {
        for ev in self.console.poll() {
            self.on_console(ev).await;
        }
        for h in &mut self.helpers {
            if !h.exited {
                if let Ok(Some(status)) = h.child.try_wait() {
                    h.exited = true;
                    tracing::warn!(helper = h.name, %status, log = %log_tail(&h.log, 3), "helper exited while the VM runs");
                }
            }
        }
        if let Some(since) = self.stopping {
            if since.elapsed() > QUIT_GRACE {
                tracing::warn!("QEMU did not quit in {QUIT_GRACE:?}; killing it");
                let _ = self.qemu.start_kill();
            }
        }
    }

    async fn on_console(&mut self, ev: ConsoleEvent) {
        match ev {
            ConsoleEvent::Panic(line) if self.panic.is_none() => self.panic = Some(line),
            ConsoleEvent::PowerDown if !self.power_down => {
                // No ACPI, no power-off device: the guest halted; end the VM.
                self.power_down = true;
                self.request_quit(false).await;
            }
            _ => {}
        }
    }

    fn reason(&mut self, status: std::io::Result<ExitStatus>) -> ExitReason {
        for ev in self.console.drain() {
            match ev {
                ConsoleEvent::Panic(line) if self.panic.is_none() => self.panic = Some(line),
                ConsoleEvent::PowerDown => self.power_down = true,
                _ => {}
            }
        }
        if let Some(p) = self.panic.take() {
            return ExitReason::Crashed(p);
        }
        if let Some(e) = self.internal_error.take() {
            return ExitReason::Crashed(e);
        }
        if self.power_down {
            return ExitReason::PowerOff;
        }
        if self.stopping.is_some() {
            return ExitReason::Stopped;
        }
        let status = match status {
            Ok(s) => s,
            Err(e) => return ExitReason::Crashed(format!("waiting for QEMU failed: {e}")),
        };
        match self.shutdown_reason.as_deref() {
            Some("guest-shutdown") => return ExitReason::PowerOff,
            Some("guest-reset") => return ExitReason::Reboot,
            Some("guest-panic") => return ExitReason::Crashed("guest panic (pvpanic)".into()),
            _ => {}
        }
        if let Some(sig) = status.signal() {
            return ExitReason::Crashed(format!("QEMU was killed by signal {sig}"));
        }
        if status.success() {
            ExitReason::PowerOff
        } else {
            ExitReason::Crashed(format!(
                "QEMU exited with {status}: {}",
                log_tail(&self.qemu_log, 3)
            ))
        }
    }
}
