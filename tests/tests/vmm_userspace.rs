//! Guest-userspace tests of the built-in KVM VMM: the same scenarios as the
//! QEMU backend's (vm_qemu.rs), booted with `vmpod vm run --hypervisor
//! builtin`. They need hardware KVM: on PVM hosts (module `kvm_pvm`) a
//! non-PVM guest's user mode cannot make system calls, so they skip there
//! and say why; the kernel-mode probes in vmm_probes.rs cover this VMM on
//! such hosts.
//!
//! Needs: /dev/kvm (hardware), build/guest/vmlinux, busybox-static, gcc.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use vmpod_tests::initramfs::Initramfs;
use vmpod_tests::process::ChildGuard;
use vmpod_tests::vm::{
    assert_powered_off, console_value, guest_kernel, host_to_guest, serve_guest_connect,
    vm_run_command, CONSOLE_LOG, EXIT_JSON, VSOCK_UDS,
};

const MARKER: &str = "VMPOD-BUILTIN-INIT";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// `/init` after [`vmpod_tests::initramfs::BUSYBOX_INIT_PREAMBLE`].
const INIT: &str = r#"echo VMPOD-BUILTIN-INIT
echo "VMPOD-NPROC=$(nproc)"
mode=$(sed -n 's/.*vmpod_test=\([a-z]*\).*/\1/p' /proc/cmdline)
if [ "$mode" = panic ]; then exit 3; fi
echo "VMPOD-RNG=$(head -c 64 /dev/hwrng | wc -c)"
echo "VMPOD-G2H=$(/bin/vsock_probe connect 2 6000 hello-from-guest)"
/bin/vsock_probe listen 5000
poweroff -f
"#;

/// Why guest userspace cannot run under our VMM here, if it cannot.
fn skip_reason() -> Option<&'static str> {
    if !Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm on this host");
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "no hardware KVM: PVM detected (a non-PVM guest's user mode cannot make \
             system calls under PVM); see vmm_probes.rs for the kernel-mode tests",
        );
    }
    None
}

/// The test initramfs (busybox `/init` above plus `/bin/vsock_probe`),
/// built once per test binary.
fn initrd() -> &'static PathBuf {
    static I: OnceLock<PathBuf> = OnceLock::new();
    I.get_or_init(|| {
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vmm_userspace");
        Initramfs::new(&work.join("root"))
            .vsock_probe()
            .busybox_init(INIT)
            .cpio(&work.join("initrd.cpio"))
    })
}

fn vm(dir: &Path, cmdline: &str) -> ChildGuard {
    ChildGuard::spawn(
        vm_run_command(dir)
            .args(["--hypervisor", "builtin"])
            .arg("--kernel")
            .arg(guest_kernel())
            .arg("--initrd")
            .arg(initrd())
            .args(["--cmdline", cmdline, "--vcpus", "2", "--memory-mib", "256"])
            .arg("--exit-json")
            .arg(dir.join(EXIT_JSON)),
    )
}

/// Boot marker, 2 vCPUs, virtio-rng, vsock both ways, power-off → exit 0.
#[test]
fn builtin_userspace_vsock_and_poweroff() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP builtin_userspace_vsock_and_poweroff: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join(VSOCK_UDS);
    let g2h = serve_guest_connect(&uds, 6000);
    let mut child = vm(dir.path(), "quiet vmpod_test=full");
    let console = dir.path().join(CONSOLE_LOG);
    let text = child.wait_console(&console, "VMPOD-LISTENING 5000", BOOT_TIMEOUT);
    assert!(text.contains(MARKER));
    assert_eq!(console_value(&text, "VMPOD-NPROC="), "2");
    assert_eq!(console_value(&text, "VMPOD-RNG="), "64");
    assert_eq!(
        console_value(&text, "VMPOD-G2H="),
        "host-got:hello-from-guest"
    );
    g2h.join().unwrap();
    assert_eq!(host_to_guest(&uds, 5000, "ping"), "echo:ping");
    assert_eq!(host_to_guest(&uds, 5000, "quit"), "echo:quit");
    let out = child.wait_exit(BOOT_TIMEOUT);
    assert_powered_off(&out, dir.path());
}

/// init exits → kernel panic → crash reported (exit 2, reason printed).
#[test]
fn builtin_userspace_panic_is_a_crash() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP builtin_userspace_panic_is_a_crash: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = vm(dir.path(), "vmpod_test=panic").wait_exit(BOOT_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("Kernel panic - not syncing: Attempted to kill init!"),
        "{stderr}"
    );
}
