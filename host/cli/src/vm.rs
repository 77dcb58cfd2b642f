//! `vmpod vm run`: one microVM in the foreground until the guest powers off
//! or reboots (exit 0), crashes (exit 2, reason printed) or SIGTERM/SIGINT
//! stops it (exit 0). Bad input: one-line error, exit 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use vmpod_runtime::hypervisor::console::DEFAULT_CONSOLE_LOG_MAX;
use vmpod_runtime::hypervisor::host::KvmFlavour;
use vmpod_runtime::hypervisor::qemu::{Accel, QemuHypervisor};
use vmpod_runtime::hypervisor::select;
use vmpod_runtime::hypervisor::{
    DiskConfig, ExitReason, HypervisorKind, NetConfig, SharedDirConfig, VmConfig, VmHandle,
    VsockBackend,
};

/// Exit code when the guest crashed.
const EXIT_CRASHED: u8 = 2;

#[derive(clap::Args)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(clap::Subcommand)]
enum VmCommand {
    /// Run one microVM in the foreground.
    Run(Box<RunArgs>),
    /// Serve a guest's vsock as a vhost-user back-end (QEMU's
    /// `vhost-user-vsock-device`) with the hybrid unix-socket protocol.
    /// The QEMU backend starts one per VM; it exits when QEMU disconnects.
    VhostUserVsock(VhostUserVsockArgs),
}

#[derive(clap::Args)]
struct VhostUserVsockArgs {
    /// vhost-user socket to create; the front-end connects here.
    #[arg(long)]
    socket: PathBuf,
    /// Hybrid-vsock unix socket to create (guest connections to port P go to PATH_P).
    #[arg(long)]
    uds_path: PathBuf,
    /// The guest's CID.
    #[arg(long, default_value_t = 3)]
    guest_cid: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum HypervisorArg {
    Auto,
    Builtin,
    Qemu,
}

#[derive(clap::Args)]
struct RunArgs {
    /// auto (builtin on hardware KVM, QEMU otherwise; the choice and its
    /// reason are logged), builtin (our KVM VMM) or qemu.
    #[arg(long, value_enum, default_value_t = HypervisorArg::Auto)]
    hypervisor: HypervisorArg,
    /// QEMU accelerator: kvm, tcg or auto (KVM only where guest userspace
    /// runs under it, i.e. hardware KVM; TCG on PVM or without KVM).
    #[arg(long, default_value = "auto")]
    accel: Accel,
    /// Whole VM config as JSON (a serialised VmConfig); replaces the flags below.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "memory_mib", "vsock_uds", "console_log", "disk", "net", "share", "cid", "no_rng", "vsock_backend"])]
    config: Option<PathBuf>,
    /// Uncompressed vmlinux (ELF).
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (kept as given; the backend appends what it needs).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Negative numbers are parsed (and refused as values) rather than
    /// taken for unknown flags, so the error names the flag.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    vcpus: u8,
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    memory_mib: u32,
    /// Hybrid-vsock unix socket to create (guest connections to port P go to PATH_P).
    #[arg(long, required_unless_present = "config")]
    vsock_uds: Option<PathBuf>,
    /// Serial console output (appended).
    #[arg(long, required_unless_present = "config")]
    console_log: Option<PathBuf>,
    /// Raw disk image: PATH or PATH,ro (repeatable).
    #[arg(long)]
    disk: Vec<String>,
    /// TAP device: NAME or NAME,MAC (repeatable).
    #[arg(long)]
    net: Vec<String>,
    /// Share a host directory with virtio-fs: TAG=DIR (repeatable).
    #[arg(long)]
    share: Vec<String>,
    /// Guest vsock CID.
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    cid: u32,
    /// Built-in VMM's vsock data path: userspace (default) or vhost
    /// (/dev/vhost-vsock; host-initiated connections only).
    #[arg(long, default_value = "userspace")]
    vsock_backend: VsockBackend,
    /// Leave out the virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Most bytes of guest output written to the console log (then one
    /// line says the rest was dropped); panics and power-off are still seen.
    #[arg(long, default_value_t = DEFAULT_CONSOLE_LOG_MAX)]
    console_log_max: u64,
    /// Write the exit reason here as JSON when the VM ends.
    #[arg(long)]
    exit_json: Option<PathBuf>,
}

pub fn run(args: VmArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        VmCommand::Run(run) => run_vm(*run),
        VmCommand::VhostUserVsock(a) => {
            if a.guest_cid < 3 {
                anyhow::bail!("--guest-cid {}: CIDs 0-2 are reserved", a.guest_cid);
            }
            vmpod_vmm::devices::virtio::vsock::vhost_user::serve(
                a.guest_cid.into(),
                &a.socket,
                &a.uds_path,
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_vm(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = build_config(&args)?;
    config.validate()?;
    let requested = match args.hypervisor {
        HypervisorArg::Auto => None,
        HypervisorArg::Builtin => Some(HypervisorKind::Builtin),
        HypervisorArg::Qemu => Some(HypervisorKind::Qemu),
    };
    // The same selection as the daemon's runtime handlers and `vmpod check`.
    let flavour = KvmFlavour::detect();
    let choice = select::choose(requested, &flavour);
    // QEMU's accelerator: `--accel` (auto resolves as the choice did).
    let accel = (choice.kind == HypervisorKind::Qemu)
        .then(|| args.accel.resolve(&flavour).ok())
        .flatten();
    // Info when we chose (auto); an explicit choice is only confirmed at
    // debug level, so its bad-input errors stay the only stderr line.
    macro_rules! chosen {
        ($level:ident) => {
            tracing::$level!(
                hypervisor = %choice.kind,
                accel = ?accel,
                requested = %requested.map_or("auto".to_string(), |k| k.to_string()),
                reason = %choice.reason,
                "hypervisor chosen"
            )
        };
    }
    if requested.is_none() {
        chosen!(info);
    } else {
        chosen!(debug);
    }
    let reason = match choice.kind {
        HypervisorKind::Qemu => run_qemu(&config, args.accel, args.console_log_max)?,
        HypervisorKind::Builtin => run_builtin(&config, args.console_log_max)?,
    };
    if let Some(path) = &args.exit_json {
        std::fs::write(path, serde_json::to_vec(&reason)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if reason.is_clean() {
        tracing::info!(%reason, "VM ended");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("vmpod: {reason}");
        Ok(ExitCode::from(EXIT_CRASHED))
    }
}

fn run_qemu(config: &VmConfig, accel: Accel, console_log_max: u64) -> anyhow::Result<ExitReason> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Started from this (main) thread: helpers die with us even on SIGKILL.
        let hv = QemuHypervisor::discover(accel)?
            .die_with_parent(true)
            .console_log_max(console_log_max);
        let vm = hv.start_vm(config).await?;
        let reason = tokio::select! {
            r = vm.wait() => r?,
            _ = term.recv() => vm.stop().await?,
            _ = int.recv() => vm.stop().await?,
        };
        Ok(reason)
    })
}

fn run_builtin(config: &VmConfig, console_log_max: u64) -> anyhow::Result<ExitReason> {
    let opts = vmpod_vmm::RunOptions { console_log_max };
    vmpod_vmm::run_foreground(config, &opts).map_err(|e| {
        if e.is_invalid_config() {
            anyhow::anyhow!("invalid VM config: {e}")
        } else {
            anyhow::anyhow!("built-in VMM: {e}")
        }
    })
}

fn build_config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    if let Some(path) = &args.config {
        let text =
            std::fs::read(path).with_context(|| format!("reading VM config {}", path.display()))?;
        return serde_json::from_slice(&text)
            .with_context(|| format!("parsing VM config {}", path.display()));
    }
    let required = |v: &Option<PathBuf>, flag: &str| {
        v.clone().with_context(|| format!("--{flag} is required"))
    };
    Ok(VmConfig {
        kernel: required(&args.kernel, "kernel")?,
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        vsock_uds: required(&args.vsock_uds, "vsock-uds")?,
        guest_cid: args.cid,
        console_log: required(&args.console_log, "console-log")?,
        disks: args
            .disk
            .iter()
            .map(|d| parse_disk(d))
            .collect::<anyhow::Result<_>>()?,
        nets: args
            .net
            .iter()
            .enumerate()
            .map(|(i, n)| parse_net(i, n))
            .collect::<anyhow::Result<_>>()?,
        shared_dirs: args
            .share
            .iter()
            .map(|s| parse_share(s))
            .collect::<anyhow::Result<_>>()?,
        rng: !args.no_rng,
        vsock_backend: args.vsock_backend,
    })
}

fn parse_disk(s: &str) -> anyhow::Result<DiskConfig> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        Some((_, opt)) => bail!("--disk {s}: unknown option {opt:?} (expected ro or rw)"),
        None => (s, false),
    };
    if path.is_empty() {
        bail!("--disk needs a path");
    }
    Ok(DiskConfig {
        path: path.into(),
        read_only,
    })
}

fn parse_net(index: usize, s: &str) -> anyhow::Result<NetConfig> {
    let (tap, mac) = match s.split_once(',') {
        Some((t, m)) => (t.to_string(), m.to_string()),
        // Locally administered, unique per device of this VM.
        None => (s.to_string(), format!("02:00:00:00:00:{:02x}", index + 1)),
    };
    Ok(NetConfig { tap, mac })
}

fn parse_share(s: &str) -> anyhow::Result<SharedDirConfig> {
    match s.split_once('=') {
        Some((tag, dir)) if !tag.is_empty() && !dir.is_empty() => Ok(SharedDirConfig {
            tag: tag.into(),
            path: dir.into(),
        }),
        _ => bail!("--share {s}: expected TAG=DIR"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_flags() {
        let d = parse_disk("/a/b.img,ro").unwrap();
        assert!(d.read_only);
        assert_eq!(d.path, PathBuf::from("/a/b.img"));
        assert!(!parse_disk("/a/b.img").unwrap().read_only);
        assert!(parse_disk("/a,zz").is_err());
        assert_eq!(parse_net(1, "tap0").unwrap().mac, "02:00:00:00:00:02");
        assert_eq!(
            parse_net(0, "tap0,aa:bb:cc:dd:ee:ff").unwrap().mac,
            "aa:bb:cc:dd:ee:ff"
        );
        assert_eq!(parse_share("rootfs=/srv").unwrap().tag, "rootfs");
        assert!(parse_share("/srv").is_err());
    }
}
