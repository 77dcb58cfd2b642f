//! Kernel-mode probes of the built-in KVM VMM (`vmpod vm run --hypervisor
//! builtin`) with the real guest kernel (`build/guest/vmlinux`).
//!
//! These need no guest userspace, so they run on PVM hosts too (where a
//! guest's user mode cannot make system calls): the kernel itself scans a
//! partitioned virtio-blk disk, reads virtio-rng, answers a host vsock
//! CONNECT to a port nobody listens on with a reset, configures its network
//! from `ip=` and answers ping over virtio-net/TAP. Guest kernel mode is
//! emulated on PVM hosts, so boots take tens of seconds: timeouts are long.
//!
//! Needs: /dev/kvm, build/guest/vmlinux (make guest-kernel), root (TAP),
//! iproute2 and ping (iputils-ping).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmpod_runtime::hypervisor::ExitReason;
use vmpod_tests::initramfs::Initramfs;
use vmpod_tests::net::{ping_ok, Tap};
use vmpod_tests::process::{strip_ansi, ChildGuard};
use vmpod_tests::vm::{
    exit_reason, guest_kernel, vm_run_command, CONSOLE_LOG, EXIT_JSON, VSOCK_UDS,
};

/// Boot to the root-device wait takes ~20-60 s here (emulated kernel mode,
/// busy 2-core machine); be generous.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A /24 of our own per test process, so parallel runs and other VMs'
/// TAP networks (often 10.0.2.0/24) do not collide.
fn subnet() -> String {
    format!("10.213.{}", std::process::id() % 250 + 1)
}

/// Why this host cannot run the probes, if it cannot.
fn skip_reason() -> Option<String> {
    vmpod_tests::device_unavailable("/dev/kvm")
}

fn kernel() -> PathBuf {
    guest_kernel()
}

/// A raw 8 MiB disk image with an MBR holding one Linux partition.
fn partitioned_disk(path: &Path) {
    let mut img = vec![0u8; 8 << 20];
    let start: u32 = 2048;
    let sectors = (img.len() / 512) as u32 - start;
    let e = &mut img[446..462];
    e[0] = 0x00; // not bootable
    e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS start (unused by Linux)
    e[4] = 0x83; // Linux
    e[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    img[510] = 0x55;
    img[511] = 0xaa;
    std::fs::write(path, img).unwrap();
}

/// This process's TAP device, `<subnet>.1/24` on the host side.
fn tap() -> Tap {
    Tap::create(
        &format!("vmpt{}", std::process::id() % 100_000),
        &format!("{}.1/24", subnet()),
    )
}

fn vm_cmd(dir: &Path, cmdline: &str, vcpus: u8, extra: &[String]) -> Command {
    let mut cmd = vm_run_command(dir);
    cmd.args(["--hypervisor", "builtin"])
        .arg("--kernel")
        .arg(kernel())
        .args(["--cmdline", cmdline, "--memory-mib", "128"])
        .args(["--vcpus", &vcpus.to_string()])
        .arg("--exit-json")
        .arg(dir.join(EXIT_JSON))
        .args(extra)
        .env("RUST_LOG", "info");
    cmd
}

/// Counter `key=N` on the exit-summary line of `device`.
fn device_counter(log: &str, device: &str, key: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("device stats") && l.contains(&format!("\"{device}\"")))
        .unwrap_or_else(|| panic!("no stats for {device} in:\n{log}"));
    line.split_whitespace()
        .find_map(|w| {
            w.trim_start_matches("stats=")
                .strip_prefix(&format!("{key}="))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// One VM, several probes: boot to the root wait, partition scan on
/// virtio-blk, in-kernel IP config + ping over virtio-net/TAP, a refused
/// host vsock CONNECT, virtio-rng reads; then SIGTERM → exit 0, socket gone.
#[test]
fn builtin_vm_kernel_probes() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP builtin_vm_kernel_probes: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    partitioned_disk(&disk);
    let tap = tap();
    let (guest_ip, host_ip) = (format!("{}.15", subnet()), format!("{}.1", subnet()));
    let cmdline =
        format!("root=/dev/missing rootwait ip={guest_ip}::{host_ip}:255.255.255.0::eth0:off");
    let extra = vec![
        "--disk".to_string(),
        format!("{},ro", disk.display()),
        "--net".to_string(),
        format!("{},02:00:00:00:00:0f", tap.name),
    ];
    let started = Instant::now();
    let mut vm = ChildGuard::spawn(&mut vm_cmd(dir.path(), &cmdline, 1, &extra));
    let console = dir.path().join(CONSOLE_LOG);
    let uds = dir.path().join(VSOCK_UDS);

    vm.wait_console(&console, "Linux version", BOOT_TIMEOUT);
    eprintln!("first kernel line after {:?}", started.elapsed());
    let text = vm.wait_console(
        &console,
        "Waiting for root device /dev/missing",
        BOOT_TIMEOUT,
    );
    eprintln!("root wait after {:?}", started.elapsed());

    let cmd_line = text
        .lines()
        .find(|l| l.contains("Command line:"))
        .expect("kernel prints its command line");
    assert!(
        cmd_line.contains(&cmdline),
        "user command line kept: {cmd_line}"
    );
    assert!(
        cmd_line.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{cmd_line}"
    );
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(
            cmd_line.contains("no_int3_selftest"),
            "PVM masks: {cmd_line}"
        );
    }

    // virtio-blk: the kernel read the partition table.
    assert!(text.contains("vda: vda1"), "partition scan:\n{text}");
    assert!(
        text.contains("[vda] 16384 512-byte logical blocks"),
        "{text}"
    );
    // virtio-net: in-kernel IP configuration ran on our device.
    assert!(
        text.contains(&format!("ipaddr={guest_ip}")),
        "IP-Config on eth0:\n{text}"
    );

    // vsock: nobody listens on guest port 1024, so the guest kernel resets
    // the connection; we close the host stream (no OK line, no hang).
    let mut s = UnixStream::connect(&uds).expect("vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "expected a refusal, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no answer to CONNECT within 30 s: {e}"),
    }
    eprintln!("vsock CONNECT refused after {:?}", t.elapsed());

    // virtio-net: the guest answers ping through the TAP.
    assert!(
        ping_ok(&guest_ip),
        "guest does not answer ping on {guest_ip}"
    );

    // Stop: SIGTERM → clean exit, exit reason Stopped, socket removed.
    vm.sigterm();
    let out = vm.wait_exit(Duration::from_secs(30));
    let log = strip_ansi(&out.stderr);
    assert!(out.status.success(), "SIGTERM → exit 0:\n{log}");
    let reason = exit_reason(&dir.path().join(EXIT_JSON));
    assert_eq!(reason, ExitReason::Stopped);
    assert!(!uds.exists(), "vsock socket removed");

    // Device counters from the VMM's exit summary.
    assert!(
        device_counter(&log, "virtio-rng", "bytes") > 0,
        "guest read virtio-rng:\n{log}"
    );
    assert!(device_counter(&log, "virtio-blk", "requests") > 0, "{log}");
    assert_eq!(device_counter(&log, "virtio-blk", "errors"), 0, "{log}");
    assert!(
        device_counter(&log, "virtio-net", "rx_frames") >= 2,
        "{log}"
    );
    assert!(
        device_counter(&log, "virtio-net", "tx_frames") >= 2,
        "{log}"
    );
    assert_eq!(
        device_counter(&log, "virtio-vsock", "host_connects"),
        1,
        "{log}"
    );
    assert_eq!(
        device_counter(&log, "virtio-vsock", "resets_from_guest"),
        1,
        "{log}"
    );
}

/// A kernel that cannot mount its root panics; with `panic=-1` it resets
/// at once and the VMM reports a crash with the panic message (exit 2).
/// (1 vCPU: 2 vCPUs boot on PVM hosts only when the machine is not busy,
/// see docs/vmm.md.)
#[test]
fn builtin_guest_panic_is_reported_as_crash() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP builtin_guest_panic_is_reported_as_crash: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = ChildGuard::spawn(&mut vm_cmd(
        dir.path(),
        "root=/dev/missing",
        1,
        &["--no-rng".to_string()],
    ));
    let out = vm.wait_exit(BOOT_TIMEOUT);
    let stderr = strip_ansi(&out.stderr);
    let console = std::fs::read_to_string(dir.path().join(CONSOLE_LOG)).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(2),
        "crash exit code:\n{stderr}\n{console}"
    );
    assert!(
        stderr.contains("Kernel panic - not syncing: VFS: Unable to mount root fs"),
        "{stderr}"
    );
    let reason = exit_reason(&dir.path().join(EXIT_JSON));
    assert!(
        matches!(&reason, ExitReason::Crashed(r) if r.contains("VFS: Unable to mount root fs")),
        "{reason:?}"
    );
    assert!(!dir.path().join(VSOCK_UDS).exists());
}

/// A tiny initramfs: busybox as `/init` (a shell script).
fn tiny_initramfs(dir: &Path) -> PathBuf {
    Initramfs::new(&dir.join("initramfs"))
        .busybox()
        .init("#!/bin/busybox sh\n/bin/busybox echo VMPOD-INIT-RAN\nexec /bin/busybox sleep 1000\n")
        .cpio(&dir.join("initrd.cpio"))
}

/// With an initramfs the kernel unpacks it and starts `/init`. On PVM hosts
/// init's first system call faults and the kernel panics ("Attempted to kill
/// init!"), which the VMM reports as a crash; on hardware KVM init runs and
/// SIGTERM stops the VM.
#[test]
fn builtin_boot_reaches_run_init() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP builtin_boot_reaches_run_init: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = tiny_initramfs(dir.path());
    let extra = vec![
        "--initrd".to_string(),
        initrd.display().to_string(),
        "--no-rng".to_string(),
    ];
    let started = Instant::now();
    let mut vm = ChildGuard::spawn(&mut vm_cmd(dir.path(), "", 1, &extra));
    let console = dir.path().join(CONSOLE_LOG);
    let text = vm.wait_console(&console, "Run /init as init process", BOOT_TIMEOUT);
    eprintln!("`Run /init` after {:?}", started.elapsed());
    assert!(
        text.contains("Unpacking initramfs") || text.contains("Trying to unpack rootfs"),
        "{text}"
    );
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if !pvm {
        vm.wait_console(&console, "VMPOD-INIT-RAN", BOOT_TIMEOUT);
        vm.sigterm();
    }
    let out = vm.wait_exit(BOOT_TIMEOUT);
    let reason = exit_reason(&dir.path().join(EXIT_JSON));
    if pvm {
        assert_eq!(out.status.code(), Some(2), "{}", strip_ansi(&out.stderr));
        assert!(
            matches!(&reason, ExitReason::Crashed(r) if r.contains("Attempted to kill init")),
            "PVM: init cannot make syscalls, so the kernel panics: {reason:?}"
        );
    } else {
        assert!(out.status.success());
        assert_eq!(reason, ExitReason::Stopped);
    }
}
