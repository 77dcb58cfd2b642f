//! The QEMU backend: `qemu-system-x86_64 -M microvm,acpi=off` with
//! memfd-shared guest RAM, a serial console log, QMP for control, and
//! vhost-user helpers for the devices that need a userspace backend here:
//!
//! - vsock: `vhost-user-vsock-device` served by our own vsock device code
//!   as a vhost-user back-end, `vmpod vm vhost-user-vsock` (hybrid vsock on
//!   [`VmConfig::vsock_uds`], exactly as with the built-in VMM).
//! - virtio-fs: `vhost-user-fs-device` + one `virtiofsd` per shared dir.
//!
//! virtio-rng, virtio-blk (raw, ro/rw) and virtio-net (TAP) are QEMU's own.
//! Every helper is supervised; the VM ends when QEMU exits, and then the
//! helpers are stopped and the sockets removed.

mod args;
mod qmp;
mod serial;
mod vm;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

pub use args::{guest_cmdline, EffectiveAccel};
pub use vm::QemuVm;

use super::host::KvmFlavour;
use super::process::{self, log_tail};
use super::{tools, Hypervisor, HypervisorError, Result, VmConfig, VmHandle};
use crate::hypervisor::console::DEFAULT_CONSOLE_LOG_MAX;

/// The `--accel` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
    /// KVM when it can run guest userspace (hardware KVM), TCG otherwise
    /// (no KVM, or PVM: a non-PVM guest's user mode cannot syscall there).
    Auto,
}

impl std::str::FromStr for Accel {
    type Err = HypervisorError;
    fn from_str(s: &str) -> Result<Accel> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "auto" => Ok(Accel::Auto),
            other => Err(HypervisorError::InvalidConfig(format!(
                "unknown accelerator {other:?} (expected kvm, tcg or auto)"
            ))),
        }
    }
}

impl Accel {
    /// Resolve against the host's KVM flavour.
    pub fn resolve(self, flavour: &KvmFlavour) -> Result<EffectiveAccel> {
        match (self, flavour) {
            (Accel::Tcg, _) => Ok(EffectiveAccel::Tcg),
            (Accel::Kvm, KvmFlavour::None(why)) => Err(HypervisorError::InvalidConfig(format!(
                "--accel kvm: KVM is not usable here ({why})"
            ))),
            (Accel::Kvm, KvmFlavour::Pvm) => Ok(EffectiveAccel::Kvm { pvm: true }),
            (Accel::Kvm, KvmFlavour::Hardware { .. }) => Ok(EffectiveAccel::Kvm { pvm: false }),
            (Accel::Auto, KvmFlavour::Hardware { .. }) => Ok(EffectiveAccel::Kvm { pvm: false }),
            (Accel::Auto, _) => Ok(EffectiveAccel::Tcg),
        }
    }
}

/// Starts microVMs with QEMU. Cheap to clone; holds only paths and choices.
#[derive(Debug, Clone)]
pub struct QemuHypervisor {
    accel: EffectiveAccel,
    qemu: PathBuf,
    /// The vhost-user vsock back-end and its leading arguments: `vmpod vm
    /// vhost-user-vsock` unless `VMPOD_VSOCK_HELPER` names another daemon
    /// taking `--guest-cid= --socket= --uds-path=` (e.g. vhost-device-vsock,
    /// which the vsock benchmark compares against).
    vsock_helper: (PathBuf, Vec<String>),
    virtiofsd: Option<PathBuf>,
    die_with_parent: bool,
    console_log_max: u64,
}

const QEMU_BIN: &str = "qemu-system-x86_64";
/// Name of the vsock helper process in start-up errors.
const VSOCK_HELPER: &str = "vmpod vm vhost-user-vsock";
/// What the vsock helper is once running (logs, exit reasons).
const VSOCK_ROLE: &str = "vsock back-end";
const VIRTIOFSD_BIN: &str = "virtiofsd";

impl QemuHypervisor {
    /// Find QEMU and the helpers (see [`tools::find`]) and resolve `accel`
    /// against this host.
    pub fn discover(accel: Accel) -> Result<QemuHypervisor> {
        let missing =
            |name: &str, hint: &str| HypervisorError::Start(format!("{name} not found ({hint})"));
        Ok(QemuHypervisor {
            accel: accel.resolve(&KvmFlavour::detect())?,
            qemu: tools::find(QEMU_BIN)
                .ok_or_else(|| missing(QEMU_BIN, "install Debian's qemu-system-x86"))?,
            vsock_helper: vsock_helper()?,
            virtiofsd: tools::find(VIRTIOFSD_BIN),
            die_with_parent: false,
            console_log_max: DEFAULT_CONSOLE_LOG_MAX,
        })
    }

    /// Have the kernel kill QEMU and the helpers if the thread that started
    /// them dies (for CLIs that start VMs from their main thread).
    pub fn die_with_parent(mut self, yes: bool) -> QemuHypervisor {
        self.die_with_parent = yes;
        self
    }

    /// Cap on the guest output each VM writes to its console log (bytes;
    /// default [`DEFAULT_CONSOLE_LOG_MAX`]). Past it one line says so and
    /// the rest is dropped; crash and power-off detection still see it.
    pub fn console_log_max(mut self, bytes: u64) -> QemuHypervisor {
        self.console_log_max = bytes;
        self
    }

    /// The accelerator VMs will use.
    pub fn accel(&self) -> EffectiveAccel {
        self.accel
    }

    /// Start a VM, returning the concrete handle (see [`Hypervisor::start`]
    /// for the boxed one).
    pub async fn start_vm(&self, config: &VmConfig) -> Result<QemuVm> {
        config.validate()?;
        if config.vsock_backend != super::VsockBackend::Userspace {
            return Err(HypervisorError::InvalidConfig(
                "vsock_backend \"vhost\" is a built-in VMM option; QEMU serves vsock through our vhost-user back-end".into(),
            ));
        }
        let virtiofsd = match (&self.virtiofsd, config.shared_dirs.is_empty()) {
            (_, true) => None,
            (Some(p), false) => Some(p.clone()),
            (None, false) => {
                return Err(HypervisorError::Start(
                    "virtiofsd not found (run `make tools`); needed for shared dirs".into(),
                ))
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("vmpod-qemu-")
            .tempdir()
            .map_err(HypervisorError::io("creating the VM's runtime dir"))?;
        // Dropped on any early return below: removes the vsock socket the
        // helper binds and the runtime dir (helpers die with their Child).
        let cleanup = vm::Cleanup::new(config.vsock_uds.clone(), dir);
        let dir = cleanup.dir().to_path_buf();
        let files = args::RunFiles {
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.sock"),
            vhost_vsock: dir.join("vsock.sock"),
            fs: (0..config.shared_dirs.len())
                .map(|i| dir.join(format!("fs{i}.sock")))
                .collect(),
        };
        let mut helpers = Vec::new();

        // vsock backend first: QEMU connects to its socket at start-up.
        let log = dir.join("vhost-user-vsock.log");
        let (helper, lead) = &self.vsock_helper;
        let mut vsock_args = lead.clone();
        vsock_args.extend([
            format!("--guest-cid={}", config.guest_cid),
            format!("--socket={}", files.vhost_vsock.display()),
            format!("--uds-path={}", config.vsock_uds.display()),
        ]);
        let mut child = process::spawn(helper, &vsock_args, &log, self.die_with_parent)?;
        process::wait_for_path(
            &files.vhost_vsock,
            &mut child,
            VSOCK_HELPER,
            &log,
            Duration::from_secs(10),
        )
        .await?;
        helpers.push(vm::Helper::new(VSOCK_ROLE, child, log));

        if let Some(virtiofsd) = &virtiofsd {
            for (i, share) in config.shared_dirs.iter().enumerate() {
                let log = dir.join(format!("virtiofsd-{i}.log"));
                let mut child = process::spawn(
                    virtiofsd,
                    &[
                        format!("--socket-path={}", files.fs[i].display()),
                        format!("--shared-dir={}", share.path.display()),
                        "--cache=auto".into(),
                    ],
                    &log,
                    self.die_with_parent,
                )?;
                process::wait_for_path(
                    &files.fs[i],
                    &mut child,
                    VIRTIOFSD_BIN,
                    &log,
                    Duration::from_secs(10),
                )
                .await?;
                helpers.push(vm::Helper::new(VIRTIOFSD_BIN, child, log));
            }
        }

        let serial = serial::SerialListener::bind(&files.console)?;
        let qemu_log = dir.join("qemu.log");
        let argv = args::qemu_args(config, self.accel, &files);
        tracing::debug!(qemu = %self.qemu.display(), args = ?argv, "starting QEMU");
        let mut qemu = process::spawn(&self.qemu, &argv, &qemu_log, self.die_with_parent)?;
        let stream = serial
            .accept(&mut qemu, &qemu_log, Duration::from_secs(10))
            .await?;
        let console =
            serial::SerialConsole::new(stream, &config.console_log, self.console_log_max)?;
        process::wait_for_path(
            &files.qmp,
            &mut qemu,
            QEMU_BIN,
            &qemu_log,
            Duration::from_secs(10),
        )
        .await?;
        let qmp = connect_qmp(&files.qmp, &mut qemu, &qemu_log).await?;
        // The vsock listener appears once QEMU has set up the device.
        process::wait_for_path(
            &config.vsock_uds,
            &mut qemu,
            "QEMU/vhost-user vsock",
            &qemu_log,
            Duration::from_secs(10),
        )
        .await?;
        let pid = qemu.id();
        tracing::info!(
            pid,
            accel = ?self.accel,
            vsock = %config.vsock_uds.display(),
            console = %config.console_log.display(),
            "QEMU microVM started"
        );
        Ok(vm::spawn(vm::Parts {
            config: config.clone(),
            pid,
            qemu,
            qemu_log,
            qmp,
            helpers,
            console,
            cleanup,
        }))
    }
}

/// See [`QemuHypervisor`]'s `vsock_helper`.
fn vsock_helper() -> Result<(PathBuf, Vec<String>)> {
    if let Some(p) = std::env::var_os("VMPOD_VSOCK_HELPER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok((p, Vec::new()))
        } else {
            Err(HypervisorError::Start(format!(
                "VMPOD_VSOCK_HELPER={}: no such file",
                p.display()
            )))
        };
    }
    let vmpod = tools::vmpod().ok_or_else(|| {
        HypervisorError::Start(
            "vmpod not found (it serves the VM's vsock; set VMPOD_VMPOD=/path/to/vmpod)".into(),
        )
    })?;
    Ok((vmpod, vec!["vm".into(), "vhost-user-vsock".into()]))
}

async fn connect_qmp(
    path: &std::path::Path,
    qemu: &mut tokio::process::Child,
    log: &std::path::Path,
) -> Result<qmp::Qmp> {
    let mut last = String::new();
    for _ in 0..50 {
        match qmp::Qmp::connect(path).await {
            Ok(q) => return Ok(q),
            Err(e) => last = e.to_string(),
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            return Err(HypervisorError::Start(format!(
                "QEMU exited ({status}): {}",
                log_tail(log, 3)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(HypervisorError::Start(format!(
        "cannot talk QMP to QEMU: {last}"
    )))
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn start(&self, config: &VmConfig) -> Result<Box<dyn VmHandle>> {
        Ok(Box::new(self.start_vm(config).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_resolution() {
        let hw = KvmFlavour::Hardware { flag: "vmx" };
        let none = KvmFlavour::None("no /dev/kvm".into());
        assert_eq!(
            Accel::Auto.resolve(&hw).unwrap(),
            EffectiveAccel::Kvm { pvm: false }
        );
        assert_eq!(
            Accel::Auto.resolve(&KvmFlavour::Pvm).unwrap(),
            EffectiveAccel::Tcg
        );
        assert_eq!(Accel::Auto.resolve(&none).unwrap(), EffectiveAccel::Tcg);
        assert_eq!(
            Accel::Kvm.resolve(&KvmFlavour::Pvm).unwrap(),
            EffectiveAccel::Kvm { pvm: true }
        );
        assert!(Accel::Kvm
            .resolve(&none)
            .unwrap_err()
            .to_string()
            .contains("no /dev/kvm"));
        assert_eq!(Accel::Tcg.resolve(&hw).unwrap(), EffectiveAccel::Tcg);
        assert!("kvm2".parse::<Accel>().is_err());
    }
}
