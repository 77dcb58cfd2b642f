//! How a QEMU/TCG microVM ends when the obvious signals are missing: the
//! user's command line moves `/dev/console` off the serial port, or a
//! helper process (vsock back-end, virtiofsd) dies under a running VM. (vm_qemu.rs covers the ordinary
//! power-off, panic, reboot and SIGTERM paths.)
//!
//! Needs: build/guest/vmlinux, qemu-system-x86_64, busybox-static, cpio;
//! build/tools/bin/virtiofsd (make tools) for the virtiofsd case.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use vmpod_runtime::hypervisor::ExitReason;
use vmpod_tests::initramfs::Initramfs;
use vmpod_tests::process::{children, strip_ansi, wait_gone, ChildGuard};
use vmpod_tests::vm::{
    assert_powered_off, exit_reason, guest_kernel, vm_run_command, CONSOLE_LOG, EXIT_JSON,
    VSOCK_UDS,
};

const TIMEOUT: Duration = Duration::from_secs(120);

/// `/init` after the busybox preamble: `vmpod_test=<mode>` on the kernel
/// command line picks what the guest does.
const INIT: &str = r#"echo VMPOD-EXITS-INIT
mode=$(sed -n 's/.*vmpod_test=\([a-z]*\).*/\1/p' /proc/cmdline)
case "$mode" in
panic) exit 3 ;;
poweroff) poweroff -f ;;
flood)
    i=0
    while [ $i -lt 4000 ]; do
        echo "VMPOD-FLOOD line $i: a guest printing without end must not fill the host disk"
        i=$((i+1))
    done
    echo VMPOD-FLOOD-DONE
    poweroff -f ;;
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
        let kernel = guest_kernel();
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
    start_vm_with(dir, cmdline, &[])
}

fn start_vm_with(dir: &Path, cmdline: &str, extra: &[&str]) -> ChildGuard {
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
            .arg(dir.join(EXIT_JSON))
            .args(extra),
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

/// `panic=0`: the kernel does not reset after a panic, it prints
/// `---[ end Kernel panic ...` and stops for good. The console parser both
/// backends share sees that line, so QEMU is ended (it used to run on).
#[test]
fn panic_without_reset_ends_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let out = start_vm(dir.path(), "panic=0 vmpod_test=panic").wait_exit(TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let reason = exit_reason(&dir.path().join(EXIT_JSON));
    assert_eq!(
        reason,
        ExitReason::Crashed(
            "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300".into()
        )
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
    assert_powered_off(&out, dir.path());
}

/// A guest flooding its console (~300 KB) under a 32 KiB cap: the log
/// stops at the cap with one line saying so, and the power-off printed
/// after the cap still ends the VM cleanly (the supervisor reads QEMU's
/// serial port itself, so detection does not depend on the file).
#[test]
fn console_flood_is_capped_and_power_off_still_seen() {
    const CAP: u64 = 32 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join(CONSOLE_LOG);
    std::fs::write(&log, "an earlier run's line\n").unwrap();
    let out = start_vm_with(
        dir.path(),
        "vmpod_test=flood",
        &["--console-log-max", &CAP.to_string()],
    )
    .wait_exit(TIMEOUT);
    assert_powered_off(&out, dir.path());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("an earlier run's line\n"), "appended");
    let notice = format!("console log limit of {CAP} bytes reached");
    assert_eq!(text.matches(&notice).count(), 1, "one notice");
    assert!(
        text.contains("VMPOD-FLOOD line 0:"),
        "output before the cap"
    );
    assert!(
        !text.contains("VMPOD-FLOOD-DONE"),
        "output past the cap dropped"
    );
    let len = text.len() as u64;
    assert!(
        len <= CAP + 200 && len > CAP,
        "log is {len} bytes for a {CAP}-byte cap"
    );
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

/// The command line of process `pid` (NUL-separated words).
fn cmdline_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|w| !w.is_empty())
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Kill the helper of a running VM with the argument `needle` (or
/// `needle=...`):
/// the VM must end on its own with `Crashed("<role> exited ...")`, exit 2,
/// and leave no QEMU, helper, socket or runtime dir behind. With
/// `qemu_hangs`, QEMU is SIGSTOPped first, so it ignores the `quit` the
/// supervisor sends: it must be killed after the quit grace.
fn helper_death_ends_the_vm(needle: &str, role: &str, extra: &[&str], qemu_hangs: bool) {
    let dir = tempfile::tempdir().unwrap();
    let a = artifacts();
    let mut child = ChildGuard::spawn(
        vm_run_command(dir.path())
            .args(["--hypervisor", "qemu", "--accel", "tcg"])
            .arg("--kernel")
            .arg(&a.kernel)
            .arg("--initrd")
            .arg(&a.initrd)
            .args(["--cmdline", "vmpod_test=idle", "--memory-mib", "128"])
            .arg("--exit-json")
            .arg(dir.path().join(EXIT_JSON))
            .args(extra),
    );
    child.wait_console(&dir.path().join(CONSOLE_LOG), "VMPOD-IDLE", TIMEOUT);
    let procs = children(child.id());
    let find = |what: &str| {
        procs
            .iter()
            .copied()
            .find(|&p| {
                cmdline_of(p)
                    .iter()
                    .any(|w| w == what || w.starts_with(&format!("{what}=")))
            })
            .unwrap_or_else(|| panic!("no {what} among {procs:?}"))
    };
    let helper = find(needle);
    let qemu = procs
        .iter()
        .copied()
        .find(|&p| {
            cmdline_of(p)
                .first()
                .is_some_and(|w| w.contains("qemu-system"))
        })
        .unwrap_or_else(|| panic!("no QEMU among {procs:?}"));
    assert_ne!(helper, qemu);
    // QEMU's runtime dir (helper sockets and logs), from its -qmp socket.
    let runtime_dir = cmdline_of(qemu)
        .iter()
        .find_map(|w| w.strip_prefix("unix:").map(str::to_string))
        .and_then(|w| {
            let sock = w.split(',').next().unwrap_or_default().to_string();
            Path::new(&sock).parent().map(Path::to_path_buf)
        })
        .expect("QEMU's -qmp unix:DIR/qmp.sock");
    assert!(runtime_dir.is_dir(), "{}", runtime_dir.display());

    let _qemu_guard = KillOnDrop(qemu);
    if qemu_hangs {
        // SAFETY: plain kill(2) of a process of this test's VM.
        assert_eq!(unsafe { libc::kill(qemu as i32, libc::SIGSTOP) }, 0);
    }
    // SAFETY: plain kill(2) of a process of this test's VM.
    assert_eq!(unsafe { libc::kill(helper as i32, libc::SIGKILL) }, 0);
    // A hung QEMU is killed 5 s (QUIT_GRACE) after the quit; it used to be
    // waited for without end.
    let out = child.wait_exit(Duration::from_secs(if qemu_hangs { 30 } else { 60 }));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "crash → exit 2: {stderr}");
    assert!(
        stderr.contains(&format!("guest crashed: {role} exited")),
        "{stderr}"
    );
    match exit_reason(&dir.path().join(EXIT_JSON)) {
        ExitReason::Crashed(r) => assert!(r.starts_with(&format!("{role} exited")), "{r}"),
        other => panic!("expected a crash, got {other:?}"),
    }
    wait_gone(&procs);
    assert!(!dir.path().join(VSOCK_UDS).exists(), "vsock socket removed");
    assert!(
        !runtime_dir.exists(),
        "runtime dir {} removed",
        runtime_dir.display()
    );
}

/// SIGKILLs a test's QEMU if it is still there when the test ends (a
/// failed test must not leave a stopped QEMU behind).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if cmdline_of(self.0)
            .first()
            .is_some_and(|w| w.contains("qemu-system"))
        {
            // SAFETY: plain kill(2) of this test's QEMU, checked just above.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

/// The vsock back-end dies under a running VM: the VM used to run on
/// without vsock while wait() never returned.
#[test]
fn vsock_back_end_death_ends_the_vm() {
    helper_death_ends_the_vm("vhost-user-vsock", "vsock back-end", &[], false);
}

/// The vsock back-end dies and QEMU hangs (stopped here), ignoring the
/// `quit` the supervisor sends: only quits from stop requests used to be
/// followed by SIGKILL, so the VM never ended and wait() never returned.
#[test]
fn qemu_hanging_in_quit_after_a_helper_death_is_killed() {
    helper_death_ends_the_vm("vhost-user-vsock", "vsock back-end", &[], true);
}

/// Same for virtiofsd (one per shared dir).
#[test]
fn virtiofsd_death_ends_the_vm() {
    if vmpod_runtime::hypervisor::tools::find("virtiofsd").is_none() {
        eprintln!("SKIP virtiofsd_death_ends_the_vm: virtiofsd not installed (make tools)");
        return;
    }
    let share = tempfile::tempdir().unwrap();
    let arg = format!("share={}", share.path().display());
    helper_death_ends_the_vm("--shared-dir", "virtiofsd", &["--share", &arg], false);
}

/// Without `--hypervisor`, `vmpod vm run` picks the backend as the daemon's
/// handlers do (auto): built-in on hardware KVM, QEMU (TCG) otherwise, and
/// logs the choice with its reason. This guest only powers off, so on a
/// hardware-KVM host the built-in VMM runs it as well.
#[test]
fn default_hypervisor_is_auto_and_logged() {
    use vmpod_runtime::hypervisor::host::KvmFlavour;
    use vmpod_runtime::hypervisor::{select, HypervisorKind};
    let flavour = KvmFlavour::detect();
    let expected = select::choose(None, &flavour);
    let a = artifacts();
    let dir = tempfile::tempdir().unwrap();
    let out = ChildGuard::spawn(
        vm_run_command(dir.path())
            .arg("--kernel")
            .arg(&a.kernel)
            .arg("--initrd")
            .arg(&a.initrd)
            .args(["--cmdline", "vmpod_test=poweroff", "--memory-mib", "128"])
            .env("VMPOD_LOG", "info"),
    )
    .wait_exit(TIMEOUT);
    let stderr = strip_ansi(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("hypervisor chosen"))
        .unwrap_or_else(|| panic!("no choice logged:\n{stderr}"));
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("requested=auto"), "{line}");
    assert!(
        line.contains(&format!("hypervisor={}", expected.kind)),
        "{line}"
    );
    assert!(line.contains(&expected.reason), "reason given: {line}");
    if flavour == KvmFlavour::Pvm {
        assert_eq!(expected.kind, HypervisorKind::Qemu);
        assert!(line.contains("accel=Some(Tcg)"), "{line}");
    }
}
