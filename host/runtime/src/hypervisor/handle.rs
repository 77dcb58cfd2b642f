//! The one [`VmHandle`] both backends return: a VM whose process(es) a
//! supervisor task owns. The handle asks that task to stop and watches for the
//! exit reason it publishes; dropping the handle closes the stop channel,
//! which tells the supervisor to tear everything down.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use super::{ExitReason, HypervisorError, Result, VmConfig, VmHandle};

/// Handle to one supervised microVM (built-in VMM child or QEMU + helpers).
pub struct SupervisedVm {
    vsock_uds: PathBuf,
    console_log: PathBuf,
    pid: Option<u32>,
    stop_tx: mpsc::UnboundedSender<()>,
    exit_rx: watch::Receiver<Option<ExitReason>>,
}

/// The supervisor's ends of the channels: receives stop requests, publishes
/// the exit reason (exactly once).
pub(crate) struct SupervisorChannels {
    pub stop_rx: mpsc::UnboundedReceiver<()>,
    pub exit_tx: watch::Sender<Option<ExitReason>>,
}

impl SupervisedVm {
    /// A handle for the VM described by `config` whose main process is `pid`,
    /// plus the channel ends its supervisor task takes.
    pub(crate) fn new(config: &VmConfig, pid: Option<u32>) -> (SupervisedVm, SupervisorChannels) {
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let handle = SupervisedVm {
            vsock_uds: config.vsock_uds.clone(),
            console_log: config.console_log.clone(),
            pid,
            stop_tx,
            exit_rx,
        };
        (handle, SupervisorChannels { stop_rx, exit_tx })
    }

    /// The exit reason if the VM has already ended.
    pub fn try_exit_reason(&self) -> Option<ExitReason> {
        self.exit_rx.borrow().clone()
    }
}

#[async_trait]
impl VmHandle for SupervisedVm {
    fn vsock_uds(&self) -> &Path {
        &self.vsock_uds
    }

    fn console_log(&self) -> &Path {
        &self.console_log
    }

    fn pid(&self) -> Option<u32> {
        self.pid
    }

    async fn stop(&self) -> Result<ExitReason> {
        // Fails only when the supervisor is gone, i.e. the VM already ended.
        let _ = self.stop_tx.send(());
        self.wait().await
    }

    async fn wait(&self) -> Result<ExitReason> {
        let mut rx = self.exit_rx.clone();
        let reason = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| HypervisorError::Other("VM supervisor ended without a reason".into()))?;
        Ok(reason.clone().unwrap_or(ExitReason::Stopped))
    }
}
