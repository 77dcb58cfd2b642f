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
use super::serial::SerialConsole;
use crate::hypervisor::console::ConsoleEvent;
use crate::hypervisor::handle::SupervisedVm;
use crate::hypervisor::process::{log_tail, terminate};
use crate::hypervisor::{ExitReason, VmConfig};

/// How long QEMU gets to exit after `quit` before SIGKILL, whoever asked
/// for the quit (a stop request or the supervisor itself).
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// A helper that exits because QEMU is going away (it closed the vhost-user
/// socket) is followed by QEMU's own exit within this long; a helper that
/// dies while QEMU runs on is a failure of the VM.
const HELPER_EXIT_GRACE: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(50);
/// Longest wait to hand QEMU a QMP command.
const QMP_SEND_LIMIT: Duration = Duration::from_secs(1);

/// A supervised helper process (vsock back-end, virtiofsd).
pub(crate) struct Helper {
    /// What it serves, for logs and exit reasons ("vsock back-end").
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
    pub console: SerialConsole,
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
        quit_sent: None,
        power_down: false,
        panic: None,
        shutdown_reason: None,
        internal_error: None,
        helper_failure: None,
        panic_end: false,
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
    console: SerialConsole,
    /// When a stop request asked QEMU to quit.
    stopping: Option<tokio::time::Instant>,
    /// When we first sent `quit`, for any reason: QEMU is killed
    /// [`QUIT_GRACE`] later if it has not exited (it can hang in quit, e.g.
    /// right after a vhost-user back-end died).
    quit_sent: Option<tokio::time::Instant>,
    power_down: bool,
    panic: Option<String>,
    shutdown_reason: Option<String>,
    internal_error: Option<String>,
    /// A helper died while QEMU ran on (its device is dead in the guest).
    helper_failure: Option<String>,
    /// The guest's panic ended without a reset (`panic=0`); we quit QEMU.
    panic_end: bool,
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
        let status = loop {
            tokio::select! {
                status = self.qemu.wait() => break Some(status),
                req = stop_rx.recv() => match req {
                    Some(()) => self.request_quit(true).await,
                    None => {
                        // Handle dropped: end everything now.
                        let _ = self.qemu.start_kill();
                        let _ = self.qemu.wait().await;
                        break None;
                    }
                },
                events = self.console.read() => {
                    for ev in events {
                        self.on_console(ev).await;
                    }
                }
                msg = next_qmp(&mut self.qmp) => {
                    if let Some(QmpMessage::Event { name, data }) = msg {
                        self.on_event(&name, &data).await;
                    }
                }
                _ = tick.tick() => self.on_tick().await,
            }
        };
        // QEMU is gone: the rest of its output, and the last line.
        for ev in self.console.drain().await {
            match ev {
                ConsoleEvent::Panic(line) | ConsoleEvent::PanicEnd(line) => {
                    self.panic.get_or_insert(line);
                }
                ConsoleEvent::PowerDown => self.power_down = true,
                ConsoleEvent::Restart => {}
            }
        }
        let reason = match status {
            Some(status) => self.reason(status),
            None => ExitReason::Stopped,
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
        let now = tokio::time::Instant::now();
        if stop_request && self.stopping.is_none() {
            self.stopping = Some(now);
        }
        self.quit_sent.get_or_insert(now);
        // A QEMU that stopped reading QMP must not stall the supervisor.
        let sent = match &mut self.qmp {
            Some(q) => matches!(
                tokio::time::timeout(QMP_SEND_LIMIT, q.send("quit")).await,
                Ok(Ok(()))
            ),
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
            "STOP" if !self.ending() => {
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

    /// Has the VM already been asked to end (by us, the guest or a failure)?
    fn ending(&self) -> bool {
        self.stopping.is_some()
            || self.power_down
            || self.panic_end
            || self.internal_error.is_some()
            || self.helper_failure.is_some()
    }

    async fn on_tick(&mut self) {
        let mut failed = None;
        for h in &mut self.helpers {
            if !h.exited {
                if let Ok(Some(status)) = h.child.try_wait() {
                    h.exited = true;
                    let tail = log_tail(&h.log, 3);
                    tracing::warn!(helper = h.name, %status, log = %tail, "helper exited");
                    failed.get_or_insert(format!("{} exited ({status}): {tail}", h.name));
                }
            }
        }
        if let Some(why) = failed {
            self.on_helper_exit(why).await;
        }
        if let Some(since) = self.quit_sent {
            if since.elapsed() > QUIT_GRACE {
                tracing::warn!("QEMU did not quit in {QUIT_GRACE:?}; killing it");
                let _ = self.qemu.start_kill();
                // Once: SIGKILL needs no repeating (a later quit re-arms).
                self.quit_sent = None;
            }
        }
    }

    /// A helper exited. If QEMU follows within [`HELPER_EXIT_GRACE`], QEMU
    /// was going away and the helper only noticed (the main loop then sees
    /// QEMU's status); otherwise the guest lost a device for good (a VM
    /// without vsock never reaches its agent): end the VM with that reason.
    async fn on_helper_exit(&mut self, why: String) {
        if self.ending() {
            return;
        }
        if tokio::time::timeout(HELPER_EXIT_GRACE, self.qemu.wait())
            .await
            .is_ok()
        {
            return;
        }
        tracing::error!(%why, "a helper died under a running VM; ending the VM");
        self.helper_failure = Some(why);
        self.request_quit(false).await;
    }

    async fn on_console(&mut self, ev: ConsoleEvent) {
        match ev {
            ConsoleEvent::Panic(line) if self.panic.is_none() => self.panic = Some(line),
            ConsoleEvent::PanicEnd(line) => {
                // panic=0 in the user's command line: the guest stops for
                // good instead of resetting; end the VM ourselves.
                self.panic.get_or_insert(line);
                if !self.ending() {
                    self.panic_end = true;
                    self.request_quit(false).await;
                }
            }
            ConsoleEvent::PowerDown if !self.power_down => {
                // No ACPI, no power-off device: the guest halted; end the VM.
                self.power_down = true;
                self.request_quit(false).await;
            }
            _ => {}
        }
    }

    fn reason(&mut self, status: std::io::Result<ExitStatus>) -> ExitReason {
        if let Some(p) = self.panic.take() {
            return ExitReason::Crashed(p);
        }
        if let Some(e) = self.internal_error.take() {
            return ExitReason::Crashed(e);
        }
        if let Some(e) = self.helper_failure.take() {
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
