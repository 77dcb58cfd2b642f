//! The QEMU command line for a [`VmConfig`] (pure; unit tested).

use std::path::{Path, PathBuf};

use super::super::{cmdline, host::PVM_GUEST_CMDLINE, VmConfig};

/// The accelerator actually used (after `auto` was resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectiveAccel {
    Kvm { pvm: bool },
    Tcg,
}

/// Per-VM sockets and files QEMU is pointed at.
#[derive(Debug, Clone)]
pub(crate) struct RunFiles {
    pub qmp: PathBuf,
    /// Our listening socket QEMU connects the serial port to; the
    /// supervisor writes what arrives to the (capped) console log.
    pub console: PathBuf,
    pub vhost_vsock: PathBuf,
    /// One vhost-user socket per shared dir (same order as the config).
    pub fs: Vec<PathBuf>,
}

/// The QEMU backend's guest command line ([`cmdline::compose`]):
/// `console=ttyS0` first (the log and crash reasons depend on it), the
/// user's words, then unless the user set the key: exit on panic, reboot by
/// triple fault (QEMU then exits: `-no-reboot`), with TCG `no_timer_check`
/// (on a loaded host the emulated IO-APIC timer check can miss its window
/// and panic the guest: "IO-APIC + timer doesn't work!"); on PVM hosts
/// under KVM the CPU feature masks, always.
pub fn guest_cmdline(user: &str, accel: EffectiveAccel) -> String {
    let mut defaults = vec!["reboot=t", "panic=-1"];
    let mut always = vec![];
    match accel {
        EffectiveAccel::Tcg => defaults.push("no_timer_check"),
        EffectiveAccel::Kvm { pvm: true } => always.push(PVM_GUEST_CMDLINE),
        EffectiveAccel::Kvm { pvm: false } => {}
    }
    cmdline::compose(user, &defaults, &always)
}

/// QEMU option values separate fields with commas; a literal comma is `,,`.
fn esc(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

pub(crate) fn qemu_args(config: &VmConfig, accel: EffectiveAccel, files: &RunFiles) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    match accel {
        EffectiveAccel::Kvm { .. } => {
            // IA32_ARCH_CAPABILITIES cannot be set on some nested hosts (PVM).
            push(&["-accel", "kvm", "-cpu", "host,-arch-capabilities"]);
        }
        EffectiveAccel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    let mem = format!("{}M", config.memory_mib);
    push(&[
        "-M",
        "microvm,acpi=off,memory-backend=mem",
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-m",
        &mem,
        "-smp",
        &config.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        &format!("socket,id=console,path={}", esc(&files.console)),
        "-serial",
        "chardev:console",
        "-qmp",
        &format!("unix:{},server=on,wait=off", esc(&files.qmp)),
        "-kernel",
        &config.kernel.to_string_lossy(),
    ]);
    if let Some(initrd) = &config.initrd {
        push(&["-initrd", &initrd.to_string_lossy()]);
    }
    push(&["-append", &guest_cmdline(&config.cmdline, accel)]);
    push(&[
        "-chardev",
        &format!("socket,id=vsock,path={}", esc(&files.vhost_vsock)),
        "-device",
        "vhost-user-vsock-device,chardev=vsock",
    ]);
    if config.rng {
        push(&[
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-device,rng=rng0",
        ]);
    }
    for (i, d) in config.disks.iter().enumerate() {
        push(&[
            "-drive",
            &format!(
                "id=disk{i},file={},format=raw,if=none,readonly={}",
                esc(&d.path),
                if d.read_only { "on" } else { "off" }
            ),
            "-device",
            &format!("virtio-blk-device,drive=disk{i}"),
        ]);
    }
    for (i, n) in config.nets.iter().enumerate() {
        push(&[
            "-netdev",
            &format!("tap,id=net{i},ifname={},script=no,downscript=no", n.tap),
            "-device",
            &format!("virtio-net-device,netdev=net{i},mac={}", n.mac),
        ]);
    }
    for (i, (share, sock)) in config.shared_dirs.iter().zip(&files.fs).enumerate() {
        push(&[
            "-chardev",
            &format!("socket,id=fs{i},path={}", esc(sock)),
            "-device",
            &format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag),
        ]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::super::super::{DiskConfig, NetConfig, SharedDirConfig};
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd".into()),
            cmdline: "quiet panic=5".into(),
            vcpus: 2,
            memory_mib: 256,
            vsock_uds: "/run/vm.vsock".into(),
            guest_cid: 3,
            console_log: "/logs/a,b.log".into(),
            disks: vec![DiskConfig {
                path: "/d/disk.img".into(),
                read_only: true,
            }],
            nets: vec![NetConfig {
                tap: "tap0".into(),
                mac: "02:00:00:00:00:01".into(),
            }],
            shared_dirs: vec![SharedDirConfig {
                tag: "rootfs".into(),
                path: "/srv".into(),
            }],
            rng: true,
            vsock_backend: Default::default(),
        }
    }

    fn files() -> RunFiles {
        RunFiles {
            qmp: "/t/qmp.sock".into(),
            console: "/t/a,b/console.sock".into(),
            vhost_vsock: "/t/vsock.sock".into(),
            fs: vec!["/t/fs0.sock".into()],
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_command_line() {
        let args = qemu_args(&config(), EffectiveAccel::Tcg, &files());
        assert_eq!(after(&args, "-accel"), ["tcg"]);
        assert_eq!(after(&args, "-cpu"), ["max"]);
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert_eq!(after(&args, "-m"), ["256M"]);
        assert!(after(&args, "-M")[0].contains("acpi=off"));
        assert_eq!(
            after(&args, "-chardev")[0],
            "socket,id=console,path=/t/a,,b/console.sock"
        );
        assert_eq!(
            after(&args, "-append"),
            ["console=ttyS0 quiet panic=5 reboot=t no_timer_check"]
        );
        let devices = after(&args, "-device");
        assert!(devices.contains(&"vhost-user-vsock-device,chardev=vsock"));
        assert!(devices.contains(&"virtio-rng-device,rng=rng0"));
        assert!(devices.contains(&"virtio-blk-device,drive=disk0"));
        assert!(devices.contains(&"virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"));
        assert!(devices.contains(&"vhost-user-fs-device,chardev=fs0,tag=rootfs"));
        assert!(after(&args, "-drive")[0].contains("readonly=on"));
        assert_eq!(
            after(&args, "-netdev"),
            ["tap,id=net0,ifname=tap0,script=no,downscript=no"]
        );
        assert!(args.iter().any(|a| a == "-no-reboot"));
        assert!(args.iter().any(|a| a == "-nodefaults"));
    }

    #[test]
    fn kvm_on_pvm_appends_masks() {
        let line = guest_cmdline("root=/dev/missing", EffectiveAccel::Kvm { pvm: true });
        assert!(line.starts_with("console=ttyS0 root=/dev/missing reboot=t panic=-1 noxsave"));
        assert!(line.contains("no_int3_selftest"));
        assert!(line.contains("clearcpuid="));
        let plain = guest_cmdline("", EffectiveAccel::Kvm { pvm: false });
        assert!(!plain.contains("no_int3_selftest"));
        let args = qemu_args(&config(), EffectiveAccel::Kvm { pvm: false }, &files());
        assert_eq!(after(&args, "-accel"), ["kvm"]);
    }
}
