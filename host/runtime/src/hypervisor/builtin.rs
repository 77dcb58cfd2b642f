//! The built-in VMM behind the [`Hypervisor`] trait: each VM is a supervised
//! child process `vmpod vm run --hypervisor builtin --config FILE
//! --exit-json FILE` (crate `vmpod-vmm` runs it in that process), so a VM
//! crash can never take the daemon down and every VM is one PID to account.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Child;
use tokio::sync::{mpsc, watch};

use super::handle::SupervisedVm;
use super::process::{self, log_tail, terminate};
use super::{ExitReason, Hypervisor, HypervisorError, Result, VmConfig, VmHandle};

/// SIGTERM grace before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct BuiltinHypervisor {
    vmpod: PathBuf,
    die_with_parent: bool,
    console_log_max: u64,
}

impl BuiltinHypervisor {
    /// Use `vmpod` (the binary with the `vm run` subcommand).
    pub fn new(vmpod: PathBuf) -> BuiltinHypervisor {
        BuiltinHypervisor {
            vmpod,
            die_with_parent: false,
            console_log_max: super::console::DEFAULT_CONSOLE_LOG_MAX,
        }
    }

    /// Have the kernel kill the VMM process if the thread that started it
    /// dies (even by SIGKILL), as [`super::qemu::QemuHypervisor::die_with_parent`].
    pub fn die_with_parent(mut self, yes: bool) -> BuiltinHypervisor {
        self.die_with_parent = yes;
        self
    }

    /// Cap on the guest output each VM writes to its console log (bytes),
    /// as [`super::qemu::QemuHypervisor::console_log_max`].
    pub fn console_log_max(mut self, bytes: u64) -> BuiltinHypervisor {
        self.console_log_max = bytes;
        self
    }

    /// Use the running executable (right inside the `vmpod` daemon).
    pub fn current_exe() -> Result<BuiltinHypervisor> {
        std::env::current_exe()
            .map(BuiltinHypervisor::new)
            .map_err(HypervisorError::io("locating the vmpod executable"))
    }

    pub async fn start_vm(&self, config: &VmConfig) -> Result<BuiltinVm> {
        config.validate()?;
        let dir = tempfile::Builder::new()
            .prefix("vmpod-vm-")
            .tempdir()
            .map_err(HypervisorError::io("creating the VM's runtime dir"))?;
        let config_path = dir.path().join("config.json");
        let exit_path = dir.path().join("exit.json");
        let log = dir.path().join("vmm.log");
        let json = serde_json::to_vec_pretty(config)
            .map_err(|e| HypervisorError::Other(format!("serialising VM config: {e}")))?;
        std::fs::write(&config_path, json).map_err(HypervisorError::io("writing VM config"))?;
        let args = vec![
            "vm".to_string(),
            "run".into(),
            "--hypervisor".into(),
            "builtin".into(),
            "--config".into(),
            config_path.to_string_lossy().into_owned(),
            "--exit-json".into(),
            exit_path.to_string_lossy().into_owned(),
            "--console-log-max".into(),
            self.console_log_max.to_string(),
        ];
        let mut child = process::spawn(&self.vmpod, &args, &log, self.die_with_parent)?;
        process::wait_for_path(
            &config.vsock_uds,
            &mut child,
            "vmpod vm run",
            &log,
            Duration::from_secs(10),
        )
        .await?;
        let pid = child.id();
        tracing::info!(pid, vsock = %config.vsock_uds.display(), "built-in microVM started");
        let (handle, channels) = SupervisedVm::new(config, pid);
        let sup = Supervisor {
            child,
            log,
            exit_path,
            vsock_uds: config.vsock_uds.clone(),
            _dir: dir,
            stopping: false,
        };
        tokio::spawn(sup.run(channels.stop_rx, channels.exit_tx));
        Ok(handle)
    }
}

#[async_trait]
impl Hypervisor for BuiltinHypervisor {
    fn name(&self) -> &'static str {
        "builtin"
    }

    async fn start(&self, config: &VmConfig) -> Result<Box<dyn VmHandle>> {
        Ok(Box::new(self.start_vm(config).await?))
    }
}

/// Handle to one built-in VM (its `vmpod vm run` process). Dropping it kills
/// the process.
pub type BuiltinVm = SupervisedVm;

struct Supervisor {
    child: Child,
    log: PathBuf,
    exit_path: PathBuf,
    vsock_uds: PathBuf,
    _dir: tempfile::TempDir,
    stopping: bool,
}

impl Supervisor {
    async fn run(
        mut self,
        mut stop_rx: mpsc::UnboundedReceiver<()>,
        exit_tx: watch::Sender<Option<ExitReason>>,
    ) {
        let status = tokio::select! {
            status = self.child.wait() => status,
            req = stop_rx.recv() => {
                self.stopping = true;
                if req.is_some() {
                    terminate(&mut self.child, STOP_GRACE).await;
                } else {
                    let _ = self.child.start_kill();
                }
                self.child.wait().await
            }
        };
        let reason = self.reason(status);
        tracing::info!(%reason, "built-in microVM ended");
        let _ = std::fs::remove_file(&self.vsock_uds);
        let _ = exit_tx.send(Some(reason));
    }

    fn reason(&self, status: std::io::Result<std::process::ExitStatus>) -> ExitReason {
        if let Some(r) = std::fs::read(&self.exit_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ExitReason>(&b).ok())
        {
            return r;
        }
        if self.stopping {
            return ExitReason::Stopped;
        }
        match status {
            Ok(s) => ExitReason::Crashed(format!(
                "vmpod vm run exited with {s}: {}",
                log_tail(&self.log, 3)
            )),
            Err(e) => ExitReason::Crashed(format!("waiting for the VMM failed: {e}")),
        }
    }
}
