//! How a QEMU/TCG microVM ends when the obvious signals are missing: the
//! user's command line moves `/dev/console` off the serial port, or a
//! helper process dies under a running VM. (vm_qemu.rs covers the ordinary
//! power-off, panic, reboot and SIGTERM paths.)
//!
//! Needs: build/guest/vmlinux, qemu-system-x86_64, busybox-static, cpio.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use vmpod_runtime::hypervisor::ExitReason;
use vmpod_tests::build_dir;
use vmpod_tests::initramfs::Initramfs;
use vmpod_tests::process::ChildGuard;
use vmpod_tests::vm::{exit_reason, vm_run_command, CONSOLE_LOG, EXIT_JSON, VSOCK_UDS};

const TIMEOUT: Duration = Duration::from_secs(120);

/// `/init` after the busybox preamble: `vmpod_test=<mode>` on the kernel
/// command line picks what the guest does.
const INIT: &str = r#"echo VMPOD-EXITS-INIT
mode=$(sed -n 's/.*vmpod_test=\([a-z]*\).*/\1/p' /proc/cmdline)
case "$mode" in
panic) exit 3 ;;
poweroff) poweroff -f ;;
esac
echo VMPOD-IDLE
while true; do sleep 1; done
"#;

struct Artifacts {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let kernel = build_dir().join("guest/vmlinux");
        assert!(
            kernel.exists(),
            "{} missing: run `make guest-kernel` first",
            kernel.display()
        );
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm_qemu_exits");
        let initrd = Initramfs::new(&work.join("root"))
            .busybox_init(INIT)
            .cpio(&work.join("initrd.cpio"));
        Artifacts { kernel, initrd }
    })
}

/// `vmpod vm run` on QEMU/TCG, 1 vCPU, 128 MiB, files in `dir`, exit
/// reason written to [`EXIT_JSON`].
fn start_vm(dir: &Path, cmdline: &str) -> ChildGuard {
    let a = artifacts();
    ChildGuard::spawn(
        vm_run_command(dir)
            .args(["--hypervisor", "qemu", "--accel", "tcg"])
            .arg("--kernel")
            .arg(&a.kernel)
            .arg("--initrd")
            .arg(&a.initrd)
            .args(["--cmdline", cmdline, "--vcpus", "1", "--memory-mib", "128"])
            .arg("--exit-json")
            .arg(dir.join(EXIT_JSON)),
    )
}

/// The user's `console=tty0` used to replace the serial console, so the
/// panic line never reached the log: the panic (and `panic=-1` reset) was
/// reported as a clean reboot, exit 0. `console=ttyS0` now always comes
/// first and kernel messages go to every console.
#[test]
fn panic_is_a_crash_even_with_another_console() {
    let dir = tempfile::tempdir().unwrap();
    let child = start_vm(dir.path(), "console=tty0 quiet vmpod_test=panic");
    let out = child.wait_exit(TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console = std::fs::read_to_string(dir.path().join(CONSOLE_LOG)).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(2),
        "crash → exit 2\nstderr: {stderr}\nconsole:\n{console}"
    );
    assert!(
        stderr.contains("guest crashed: Kernel panic - not syncing: Attempted to kill init!"),
        "{stderr}"
    );
    let reason = exit_reason(&dir.path().join(EXIT_JSON));
    assert!(
        matches!(&reason, ExitReason::Crashed(r) if r.contains("Attempted to kill init")),
        "{reason:?}"
    );
}

/// Power-off with the user's console elsewhere: the `reboot: Power down`
/// line still reaches the serial log, so the VM ends (it used to hang: a
/// microVM without ACPI only halts).
#[test]
fn power_off_ends_the_vm_even_with_another_console() {
    let dir = tempfile::tempdir().unwrap();
    let child = start_vm(dir.path(), "console=tty0 vmpod_test=poweroff");
    let out = child.wait_exit(TIMEOUT);
    assert!(
        out.status.success(),
        "power-off → exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        exit_reason(&dir.path().join(EXIT_JSON)),
        ExitReason::PowerOff
    );
    assert!(!dir.path().join(VSOCK_UDS).exists(), "vsock socket removed");
}

/// `loglevel=0` would hide those lines whatever the console: refused up
/// front with a one-line error.
#[test]
fn loglevel_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = start_vm(dir.path(), "loglevel=0 vmpod_test=poweroff").wait_exit(TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("loglevel=0"), "{stderr}");
}
