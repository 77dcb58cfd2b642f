//! Real microVMs through the QEMU backend with TCG (runs on any x86-64 host,
//! including PVM hosts where KVM cannot run guest userspace).
//!
//! The guest is `build/guest/vmlinux` (make guest-kernel) with a test
//! initramfs built here: busybox-static as a shell `/init` plus a tiny static
//! C vsock helper. The `/init` script reads `vmpod_test=<mode>` from the
//! kernel command line.
//!
//! Needs: build/guest/vmlinux, qemu-system-x86_64, build/tools/bin/
//! virtiofsd (make tools), busybox-static, cpio, gcc; for the TAP test root,
//! /dev/net/tun, iproute2 and ping (iputils-ping).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmpod_runtime::hypervisor::qemu::{Accel, QemuHypervisor};
use vmpod_runtime::hypervisor::{ExitReason, VmConfig, VmHandle};
use vmpod_tests::initramfs::Initramfs;
use vmpod_tests::net::{link_exists, ping_ok, tap_unavailable, Tap};
use vmpod_tests::process::{alive, children, wait_gone, ChildGuard};
use vmpod_tests::vm::{
    console_value, exit_reason, guest_kernel, host_to_guest, hybrid_connect, serve_guest_connect,
    vm_run_command, wait_console, CONSOLE_LOG, EXIT_JSON, VSOCK_UDS,
};
use vmpod_tests::{build_dir, vmpod_bin};

const MARKER: &str = "VMPOD-TEST-INIT";
/// Bytes pushed through the guest's vsock echo in both directions.
const ECHO_BYTES: usize = 16 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// `/init` after [`vmpod_tests::initramfs::BUSYBOX_INIT_PREAMBLE`].
const INIT: &str = r#"echo VMPOD-TEST-INIT
echo "VMPOD-NPROC=$(nproc)"
mode=$(sed -n 's/.*vmpod_test=\([a-z]*\).*/\1/p' /proc/cmdline)
case "$mode" in
panic)
    echo VMPOD-PANICKING
    exit 3 ;;
idle)
    echo VMPOD-IDLE
    while true; do sleep 1; done ;;
reboot)
    reboot -f ;;
devices)
    # virtio-blk: vda is the read-write disk, vdb the read-only one; each
    # starts with a marker line. The guest writes at offset 4096.
    write_disk() {
        if err=$(echo "$2" | dd of="/dev/$1" bs=512 seek=8 conv=notrunc,fsync 2>&1); then
            echo "VMPOD-$1-WRITE=ok"
        else
            echo "VMPOD-$1-WRITE=failed: $(echo $err)"
        fi
    }
    for d in vda vdb; do
        echo "VMPOD-$d-MARKER=$(head -n 1 /dev/$d)"
        echo "VMPOD-$d-RO=$(cat /sys/block/$d/ro)"
    done
    write_disk vda "guest-saw:$(head -n 1 /dev/vda)"
    write_disk vdb "guest-wrote-the-read-only-disk"
    # virtio-net on a host TAP: address from the command line, ping the host.
    param() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
    ip link set eth0 up
    ip addr add "$(param vmpod_ip)" dev eth0
    echo "VMPOD-MAC=$(cat /sys/class/net/eth0/address)"
    if out=$(ping -c 3 -W 10 "$(param vmpod_peer)" 2>&1); then r=ok; else r=failed; fi
    echo "VMPOD-PING-HOST=$r: $(echo "$out" | grep 'packets received')"
    /bin/vsock_probe listen 5000
    poweroff -f ;;
esac
if mount -t virtiofs share /mnt; then
    echo "VMPOD-SHARE=$(cat /mnt/hello.txt)"
fi
echo "VMPOD-RNG=$(cat /sys/class/misc/hw_random/rng_current) $(head -c 64 /dev/hwrng | wc -c)"
echo "VMPOD-G2H=$(/bin/vsock_probe connect 2 6000 hello-from-guest)"
/bin/vsock_probe echo 5001 &
/bin/vsock_probe listen 5000
echo VMPOD-LISTENER-DONE
poweroff -f
"#;

struct Artifacts {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Kernel + test initramfs, built once per test binary.
fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let kernel = guest_kernel();
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm_qemu");
        let initrd = Initramfs::new(&work.join("root"))
            .dirs(&["mnt"])
            .vsock_probe()
            .busybox_init(INIT)
            .cpio(&work.join("initrd.cpio"));
        Artifacts { kernel, initrd }
    })
}

/// Saturate one connection in both directions at once: a writer thread
/// pushes `total` bytes as fast as the guest takes them while this thread
/// reads the echo, then the host half-closes (SHUT_WR) and the guest, on
/// EOF, finishes echoing and closes. The case vhost-device-vsock 0.3.0
/// stalls on (lost credit update) and cannot do (no half-close).
fn saturated_echo(uds: &Path, port: u32, total: usize) {
    let mut s =
        hybrid_connect(uds, port, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let pattern = |i: usize| (i * 7 + i / 4093) as u8;
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..total).map(pattern).collect();
        for chunk in data.chunks(256 * 1024) {
            w.write_all(chunk).expect("host → guest write");
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = s
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("echo stalled after {got} of {total} bytes: {e}"));
        if n == 0 {
            break;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(got + k), "byte {} corrupted", got + k);
        }
        got += n;
    }
    writer.join().unwrap();
    assert_eq!(got, total, "all bytes echoed before the guest closed");
}

/// `vmpod vm run` on QEMU/TCG with the test kernel and initramfs, 2 vCPUs
/// and 256 MiB, files in `dir`; killed if the test fails before it exits.
fn start_vm(dir: &Path, cmdline: &str, extra: &[&str]) -> ChildGuard {
    let a = artifacts();
    ChildGuard::spawn(
        vm_run_command(dir)
            .args(["--hypervisor", "qemu", "--accel", "tcg"])
            .arg("--kernel")
            .arg(&a.kernel)
            .arg("--initrd")
            .arg(&a.initrd)
            .args(["--cmdline", cmdline, "--vcpus", "2", "--memory-mib", "256"])
            .args(extra),
    )
}

/// One VM through the real CLI: boot marker, CPU count, virtio-fs share,
/// virtio-rng, vsock both ways, then the guest powers off → exit 0 and
/// nothing is left behind.
#[test]
fn cli_boots_exchanges_vsock_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "shared-from-host").unwrap();
    let uds = dir.path().join(VSOCK_UDS);
    // Guest → host: the guest connects to CID 2 port 6000 → <uds>_6000.
    let g2h_thread = serve_guest_connect(&uds, 6000);

    let share_arg = format!("share={}", share.display());
    let mut child = start_vm(
        dir.path(),
        "quiet vmpod_test=full",
        &["--share", &share_arg],
    );
    let console = dir.path().join(CONSOLE_LOG);
    let text = child.wait_console(&console, "VMPOD-LISTENING 5000", BOOT_TIMEOUT);
    assert!(text.contains(MARKER));
    assert_eq!(
        console_value(&text, "VMPOD-NPROC="),
        "2",
        "guest sees 2 vCPUs"
    );
    assert_eq!(console_value(&text, "VMPOD-SHARE="), "shared-from-host");
    assert_eq!(console_value(&text, "VMPOD-RNG="), "virtio_rng.0 64");
    assert_eq!(
        console_value(&text, "VMPOD-G2H="),
        "host-got:hello-from-guest",
        "guest → host vsock"
    );
    assert_eq!(g2h_thread.join().unwrap().trim_end(), "hello-from-guest");

    // The helpers and QEMU, to check they are gone afterwards.
    let helpers = children(child.id());
    assert!(
        helpers.len() >= 3,
        "qemu + vsock back-end + virtiofsd: {helpers:?}"
    );

    // Bulk traffic, both directions saturated at once, then a half-close:
    // 16 MiB through the guest's echo.
    wait_console(&console, "VMPOD-ECHO-LISTENING 5001", BOOT_TIMEOUT, None);
    saturated_echo(&uds, 5001, ECHO_BYTES);

    // Host → guest: two connections (the second tells the listener to quit).
    assert_eq!(
        host_to_guest(&uds, 5000, "ping-from-host"),
        "echo:ping-from-host"
    );
    assert_eq!(host_to_guest(&uds, 5000, "quit"), "echo:quit");

    let out = child.wait_exit(BOOT_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "powered-off guest → exit 0: {stderr}");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("VMPOD-LISTENER-DONE"), "{text}");
    assert_eq!(
        console_value(&text, "VMPOD-ECHOED="),
        ECHO_BYTES.to_string()
    );
    wait_gone(&helpers);
    assert!(!uds.exists(), "vsock socket removed");
}

/// A raw 1 MiB disk image whose first line is `marker`.
fn marked_image(marker: &str) -> Vec<u8> {
    let mut img = vec![0u8; 1 << 20];
    let line = format!("{marker}\n");
    img[..line.len()].copy_from_slice(line.as_bytes());
    img
}

/// virtio-blk and virtio-net through the CLI's `--disk` and `--net`: the
/// guest reads both disks' markers, writes to the read-write one (the host
/// finds the write in the image afterwards) and fails to write the
/// read-only one (its image stays byte for byte the same); on a host TAP
/// the guest pings the host and the host pings the guest; the TAP is
/// deleted afterwards, also when the test fails.
#[test]
fn cli_disks_and_tap_network() {
    if let Some(why) = tap_unavailable() {
        eprintln!("SKIP cli_disks_and_tap_network: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let rw_marker = format!("vmpod-rw-disk-{nonce}");
    let ro_marker = format!("vmpod-ro-disk-{nonce}");
    let (rw, ro) = (dir.path().join("rw.img"), dir.path().join("ro.img"));
    std::fs::write(&rw, marked_image(&rw_marker)).unwrap();
    let ro_before = marked_image(&ro_marker);
    std::fs::write(&ro, &ro_before).unwrap();

    // A /30 of our own per test process: vmm_probes.rs uses 10.213.x.0/24.
    let pid = std::process::id();
    let subnet = format!("10.214.{}", pid % 250 + 1);
    let (host_ip, guest_ip) = (format!("{subnet}.1"), format!("{subnet}.2"));
    let tap = Tap::create(&format!("vmpq{}", pid % 100_000), &format!("{host_ip}/30"));
    let mac = "02:00:00:00:02:0e";

    let cmdline = format!("quiet vmpod_test=devices vmpod_ip={guest_ip}/30 vmpod_peer={host_ip}");
    let rw_arg = rw.display().to_string();
    let ro_arg = format!("{},ro", ro.display());
    let net_arg = format!("{},{mac}", tap.name);
    let mut child = start_vm(
        dir.path(),
        &cmdline,
        &["--disk", &rw_arg, "--disk", &ro_arg, "--net", &net_arg],
    );
    let console = dir.path().join(CONSOLE_LOG);
    let text = child.wait_console(&console, "VMPOD-LISTENING 5000", BOOT_TIMEOUT);

    // virtio-blk: first --disk is vda, second vdb; flags and writes.
    assert_eq!(
        console_value(&text, "VMPOD-vda-MARKER="),
        rw_marker,
        "{text}"
    );
    assert_eq!(
        console_value(&text, "VMPOD-vdb-MARKER="),
        ro_marker,
        "{text}"
    );
    assert_eq!(console_value(&text, "VMPOD-vda-RO="), "0", "vda writable");
    assert_eq!(console_value(&text, "VMPOD-vdb-RO="), "1", "vdb read-only");
    assert_eq!(console_value(&text, "VMPOD-vda-WRITE="), "ok", "{text}");
    let ro_write = console_value(&text, "VMPOD-vdb-WRITE=");
    assert!(
        ro_write.starts_with("failed: "),
        "writing the read-only disk must fail: {ro_write}"
    );

    // virtio-net: our MAC, guest → host ping, host → guest ping.
    assert_eq!(console_value(&text, "VMPOD-MAC="), mac);
    let ping = console_value(&text, "VMPOD-PING-HOST=");
    assert!(
        ping.starts_with("ok: "),
        "guest pings the host: {ping}\n{text}"
    );
    assert!(
        ping_ok(&guest_ip),
        "host pings the guest at {guest_ip}\n{text}"
    );

    let uds = dir.path().join(VSOCK_UDS);
    assert_eq!(host_to_guest(&uds, 5000, "quit"), "echo:quit");
    let out = child.wait_exit(BOOT_TIMEOUT);
    assert!(
        out.status.success(),
        "powered-off guest → exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The guest's write reached the read-write image; its marker is intact.
    let rw_after = std::fs::read(&rw).unwrap();
    assert!(rw_after.starts_with(format!("{rw_marker}\n").as_bytes()));
    let written = format!("guest-saw:{rw_marker}\n");
    assert_eq!(
        String::from_utf8_lossy(&rw_after[4096..4096 + written.len()]),
        written,
        "guest write at offset 4096 of the read-write image"
    );
    assert_eq!(rw_after.len(), 1 << 20, "image size unchanged");
    assert!(
        std::fs::read(&ro).unwrap() == ro_before,
        "read-only image changed"
    );

    let name = tap.name.clone();
    drop(tap);
    assert!(!link_exists(&name), "TAP {name} deleted");
}

/// A guest whose init exits panics the kernel: non-zero exit, reason printed.
#[test]
fn cli_reports_guest_panic() {
    let dir = tempfile::tempdir().unwrap();
    let exit_json = dir.path().join(EXIT_JSON);
    let child = start_vm(
        dir.path(),
        "vmpod_test=panic",
        &["--exit-json", exit_json.to_str().unwrap()],
    );
    let out = child.wait_exit(BOOT_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "crash exit code; stderr: {stderr}"
    );
    assert!(
        stderr.contains("guest crashed: Kernel panic - not syncing: Attempted to kill init!"),
        "{stderr}"
    );
    let reason = exit_reason(&exit_json);
    assert!(
        matches!(reason, ExitReason::Crashed(ref r) if r.contains("Kernel panic")),
        "{reason:?}"
    );
    assert!(!dir.path().join(VSOCK_UDS).exists());
}

/// A guest reboot ends the microVM cleanly: exit 0, reason `Reboot`.
#[test]
fn cli_guest_reboot_is_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let exit_json = dir.path().join(EXIT_JSON);
    let child = start_vm(
        dir.path(),
        "vmpod_test=reboot",
        &["--exit-json", exit_json.to_str().unwrap()],
    );
    let out = child.wait_exit(BOOT_TIMEOUT);
    assert!(
        out.status.success(),
        "reboot → exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reason = exit_reason(&exit_json);
    assert_eq!(reason, ExitReason::Reboot);
    let console = std::fs::read_to_string(dir.path().join(CONSOLE_LOG)).unwrap();
    assert!(console.contains(MARKER), "{console}");
}

/// SIGTERM stops a running VM: exit 0, QEMU and helpers gone, socket removed.
#[test]
fn cli_sigterm_stops_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = start_vm(dir.path(), "vmpod_test=idle", &[]);
    child.wait_console(&dir.path().join(CONSOLE_LOG), MARKER, BOOT_TIMEOUT);
    let helpers = children(child.id());
    assert!(helpers.len() >= 2, "qemu + vsock back-end: {helpers:?}");
    child.sigterm();
    let out = child.wait_exit(BOOT_TIMEOUT);
    assert!(
        out.status.success(),
        "SIGTERM → exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_gone(&helpers);
    assert!(!dir.path().join(VSOCK_UDS).exists(), "vsock socket removed");
}

/// The library API the sandbox code and the agent tests use: start, talk,
/// stop → Stopped; dropping is covered by the CLI tests above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_start_and_stop() {
    let a = artifacts();
    let dir = tempfile::tempdir().unwrap();
    let config = VmConfig {
        kernel: a.kernel.clone(),
        initrd: Some(a.initrd.clone()),
        cmdline: "vmpod_test=idle".into(),
        vcpus: 1,
        memory_mib: 128,
        vsock_uds: dir.path().join("vm.vsock"),
        guest_cid: 7,
        console_log: dir.path().join("console.log"),
        disks: vec![],
        nets: vec![],
        shared_dirs: vec![],
        rng: false,
        vsock_backend: Default::default(),
    };
    let hv = QemuHypervisor::discover(Accel::Tcg).unwrap();
    let vm = hv.start_vm(&config).await.unwrap();
    assert!(
        vm.vsock_uds().exists(),
        "vsock socket exists once start returns"
    );
    let pid = vm.pid().expect("QEMU pid");
    assert!(alive(pid));
    let log = config.console_log.clone();
    let text = tokio::select! {
        t = tokio::task::spawn_blocking(move || wait_console(&log, "VMPOD-IDLE", BOOT_TIMEOUT, None)) => t.unwrap(),
        r = vm.wait() => panic!(
            "VM ended before its init ran: {r:?}; console:\n{}",
            std::fs::read_to_string(&config.console_log).unwrap_or_default()
        ),
    };
    assert_eq!(console_value(&text, "VMPOD-NPROC="), "1");
    // Nobody listens on port 9: the guest refuses, the host sees EOF (no hang).
    let uds = config.vsock_uds.clone();
    let refused = tokio::task::spawn_blocking(move || {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"CONNECT 9\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).to_string()
    })
    .await
    .unwrap();
    assert!(
        !refused.starts_with("OK"),
        "connection to a closed port refused: {refused:?}"
    );

    assert_eq!(vm.stop().await.unwrap(), ExitReason::Stopped);
    assert_eq!(
        vm.wait().await.unwrap(),
        ExitReason::Stopped,
        "wait after stop"
    );
    wait_gone(&[pid]);
    assert!(!config.vsock_uds.exists());

    // A second VM on the same socket path starts fine (nothing stale left).
    let vm2 = hv.start_vm(&config).await.unwrap();
    drop(vm2);
    let start = Instant::now();
    while config.vsock_uds.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "drop cleans up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vm_run_error(args: &[&str]) -> String {
    let out = Command::new(vmpod_bin())
        .args(["vm", "run", "--hypervisor", "qemu", "--accel", "tcg"])
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "bad input → exit 1");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
    stderr
}

#[test]
fn cli_rejects_bad_input_with_one_line_errors() {
    let a = artifacts();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let log = dir.path().join("console.log");
    let base = |kernel: &Path, mem: &str, vcpus: &str| -> Vec<String> {
        vec![
            "--kernel".into(),
            kernel.display().to_string(),
            "--memory-mib".into(),
            mem.into(),
            "--vcpus".into(),
            vcpus.into(),
            "--vsock-uds".into(),
            uds.display().to_string(),
            "--console-log".into(),
            log.display().to_string(),
        ]
    };
    let run = |v: Vec<String>| vm_run_error(&v.iter().map(String::as_str).collect::<Vec<_>>());

    let e = run(base(&dir.path().join("nope"), "128", "1"));
    assert!(e.contains("kernel") && e.contains("not found"), "{e}");

    let bz = build_dir().join("guest/bzImage");
    let not_elf = if bz.exists() { bz } else { a.initrd.clone() };
    let e = run(base(&not_elf, "128", "1"));
    assert!(e.contains("not an ELF"), "{e}");

    let e = run(base(&a.kernel, "8", "1"));
    assert!(e.contains("memory") && e.contains("8 MiB"), "{e}");
    let e = run(base(&a.kernel, "100000000", "1"));
    assert!(e.contains("memory"), "{e}");

    let e = run(base(&a.kernel, "128", "0"));
    assert!(e.contains("vcpus"), "{e}");

    let listener = UnixListener::bind(&uds).unwrap();
    let e = run(base(&a.kernel, "128", "1"));
    assert!(e.contains("in use"), "{e}");
    drop(listener);

    let mut v = base(&a.kernel, "128", "1");
    v.extend(["--initrd".into(), "/nonexistent/initrd".into()]);
    let e = run(v);
    assert!(e.contains("initrd"), "{e}");

    let mut v = base(&a.kernel, "128", "1");
    v.extend(["--share".into(), "x".into()]);
    let e = run(v);
    assert!(e.contains("TAG=DIR"), "{e}");

    let mut v = base(&a.kernel, "128", "1");
    v.extend(["--vsock-backend".into(), "vhost".into()]);
    let e = run(v);
    assert!(e.contains("built-in VMM option"), "{e}");
    assert!(!uds.exists(), "nothing left behind");
}

/// `--vsock-backend vhost` on a host without /dev/vhost-vsock: the built-in
/// VMM refuses with a one-line error naming the device and leaves no socket.
#[test]
fn cli_builtin_vhost_vsock_without_the_device_is_a_clear_error() {
    if std::path::Path::new("/dev/vhost-vsock").exists() {
        eprintln!("skip: /dev/vhost-vsock exists here, so the missing-device path cannot be shown");
        return;
    }
    if let Some(why) = vmpod_tests::device_unavailable("/dev/kvm") {
        eprintln!("skip: the built-in VMM needs /dev/kvm: {why}");
        return;
    }
    let a = artifacts();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let out = Command::new(vmpod_bin())
        .args([
            "vm",
            "run",
            "--hypervisor",
            "builtin",
            "--vsock-backend",
            "vhost",
        ])
        .arg("--kernel")
        .arg(&a.kernel)
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--console-log")
        .arg(dir.path().join("console.log"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
    assert!(
        stderr.contains("/dev/vhost-vsock does not exist"),
        "{stderr}"
    );
    assert!(!uds.exists(), "no socket left behind");
}

/// The built-in backend's process supervision (its VM code is tested by the
/// vmm_* tests): start a kernel-only guest, then stop it → `Stopped`, process
/// gone, socket removed. Needs a usable /dev/kvm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_builtin_backend_start_and_stop() {
    use vmpod_runtime::hypervisor::builtin::BuiltinHypervisor;
    use vmpod_runtime::hypervisor::host::KvmFlavour;
    let flavour = KvmFlavour::detect();
    if !flavour.is_usable() {
        eprintln!(
            "skipping: the built-in VMM needs KVM: {}",
            flavour.describe()
        );
        return;
    }
    let a = artifacts();
    let dir = tempfile::tempdir().unwrap();
    let config = VmConfig {
        kernel: a.kernel.clone(),
        initrd: None,
        cmdline: "console=ttyS0 root=/dev/missing rootwait".into(),
        vcpus: 1,
        memory_mib: 128,
        vsock_uds: dir.path().join("vm.vsock"),
        guest_cid: 3,
        console_log: dir.path().join("console.log"),
        disks: vec![],
        nets: vec![],
        shared_dirs: vec![],
        rng: true,
        vsock_backend: Default::default(),
    };
    let hv = BuiltinHypervisor::new(vmpod_bin()).die_with_parent(true);
    let vm = hv.start_vm(&config).await.unwrap();
    let pid = vm.pid().unwrap();
    assert!(alive(pid));
    assert!(config.vsock_uds.exists());
    // Still running a moment later (kernel boot under PVM takes a minute;
    // the vmm_* tests follow it, this test is about supervision).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        alive(pid),
        "VMM process died early: {:?}",
        std::fs::read_to_string(&config.console_log)
    );
    assert_eq!(vm.stop().await.unwrap(), ExitReason::Stopped);
    wait_gone(&[pid]);
    assert!(!config.vsock_uds.exists(), "socket removed");
}
