//! The built-in VMM on this host's KVM, kernel mode only (so it runs on
//! PVM hosts too): the user's `console=` does not take the serial port
//! away, the log cap holds while crash detection goes on past it, and a
//! SIGTERM while the VM is being built leaves nothing behind.
//!
//! Needs: /dev/kvm, build/guest/vmlinux (make guest-kernel). Guest kernel
//! mode is emulated on PVM hosts: one boot takes ~20-60 s.

use std::time::{Duration, Instant};

use vmpod_runtime::hypervisor::ExitReason;
use vmpod_tests::process::ChildGuard;
use vmpod_tests::vm::{
    exit_reason, guest_kernel, vm_run_command, CONSOLE_LOG, EXIT_JSON, VSOCK_UDS,
};

const TIMEOUT: Duration = Duration::from_secs(600);

/// `console=tty0` (a console this kernel does not even have) and a 4 KiB
/// cap: the kernel cannot mount its root and panics far past 4 KiB of boot
/// messages; the VMM still sees the panic line on ttyS0 (first on the
/// command line) and reports the crash, and the log holds 4 KiB plus one
/// notice.
#[test]
fn builtin_panic_seen_past_the_log_cap_with_another_console() {
    if let Some(why) = vmpod_tests::device_unavailable("/dev/kvm") {
        eprintln!("SKIP builtin_panic_seen_past_the_log_cap_with_another_console: {why}");
        return;
    }
    const CAP: u64 = 4096;
    let kernel = guest_kernel();
    let dir = tempfile::tempdir().unwrap();
    let out = ChildGuard::spawn(
        vm_run_command(dir.path())
            .args(["--hypervisor", "builtin", "--memory-mib", "128"])
            .arg("--kernel")
            .arg(&kernel)
            .args(["--cmdline", "console=tty0 root=/dev/missing"])
            .args(["--console-log-max", &CAP.to_string()])
            .arg("--exit-json")
            .arg(dir.path().join(EXIT_JSON)),
    )
    .wait_exit(TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(dir.path().join(CONSOLE_LOG)).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}\nconsole:\n{log}");
    let reason = exit_reason(&dir.path().join(EXIT_JSON));
    assert!(
        matches!(&reason, ExitReason::Crashed(r)
            if r.starts_with("Kernel panic - not syncing: VFS: Unable to mount root fs")),
        "{reason:?}"
    );
    assert!(log.starts_with("[    0.000000] Linux version"), "{log}");
    assert_eq!(
        log.matches(&format!("console log limit of {CAP} bytes reached"))
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("Kernel panic"), "the panic is past the cap");
    let len = log.len() as u64;
    assert!(len > CAP && len <= CAP + 200, "{len} bytes");
    assert!(!dir.path().join(VSOCK_UDS).exists());
}

/// SIGTERM the moment the vsock socket appears, i.e. while the VM is
/// being built (the socket is bound before the kernel is loaded): the
/// handler is installed before build, so the run ends as `Stopped`
/// (exit 0) and removes the socket instead of dying with it in place.
#[test]
fn builtin_sigterm_during_build_leaves_no_socket() {
    if let Some(why) = vmpod_tests::device_unavailable("/dev/kvm") {
        eprintln!("SKIP builtin_sigterm_during_build_leaves_no_socket: {why}");
        return;
    }
    let kernel = guest_kernel();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join(VSOCK_UDS);
    let child = ChildGuard::spawn(
        vm_run_command(dir.path())
            .args(["--hypervisor", "builtin", "--memory-mib", "128"])
            .arg("--kernel")
            .arg(&kernel)
            .args(["--cmdline", "root=/dev/missing rootwait"])
            .arg("--exit-json")
            .arg(dir.path().join(EXIT_JSON)),
    );
    let start = Instant::now();
    while !uds.exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no vsock socket");
        std::thread::sleep(Duration::from_micros(200));
    }
    child.sigterm();
    let out = child.wait_exit(Duration::from_secs(60));
    assert!(
        out.status.success(),
        "SIGTERM → Stopped, exit 0 ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        exit_reason(&dir.path().join(EXIT_JSON)),
        ExitReason::Stopped
    );
    assert!(!uds.exists(), "vsock socket removed");
}
