//! Real microVMs through the QEMU backend with TCG (runs on any x86-64 host,
//! including PVM hosts where KVM cannot run guest userspace).
//!
//! The guest is `build/guest/vmlinux` (make guest-kernel) with a test
//! initramfs built here: busybox-static as a shell `/init` plus a tiny static
//! C vsock helper. The `/init` script reads `vmpod_test=<mode>` from the
//! kernel command line.
//!
//! Needs: build/guest/vmlinux, qemu-system-x86_64, build/tools/bin/
//! virtiofsd (make tools), busybox-static, cpio, gcc.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmpod_runtime::hypervisor::qemu::{Accel, QemuHypervisor};
use vmpod_runtime::hypervisor::{ExitReason, VmConfig, VmHandle};
use vmpod_tests::{build_dir, vmpod_bin};

const MARKER: &str = "VMPOD-TEST-INIT";
/// Bytes pushed through the guest's vsock echo in both directions.
const ECHO_BYTES: usize = 16 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
echo VMPOD-TEST-INIT
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

/// Guest vsock helper: `listen PORT` echoes `echo:<line>` per connection
/// until it receives `quit`; `connect CID PORT MSG` sends MSG and prints the
/// reply line.
const VSOCK_PROBE_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int readline(int fd, char *buf, int cap) {
    int n = 0;
    while (n < cap - 1) {
        char c;
        int r = read(fd, &c, 1);
        if (r <= 0) break;
        if (c == '\n') break;
        buf[n++] = c;
    }
    buf[n] = 0;
    return n;
}

int main(int argc, char **argv) {
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        a.svm_cid = VMADDR_CID_ANY;
        a.svm_port = atoi(argv[2]);
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) { perror("listen"); return 1; }
        printf("VMPOD-LISTENING %s\n", argv[2]);
        fflush(stdout);
        for (;;) {
            int c = accept(s, NULL, NULL);
            if (c < 0) { perror("accept"); return 1; }
            char line[512], out[600];
            readline(c, line, sizeof line);
            int n = snprintf(out, sizeof out, "echo:%s\n", line);
            write(c, out, n);
            close(c);
            if (!strcmp(line, "quit")) return 0;
        }
    }
    if (argc == 3 && !strcmp(argv[1], "echo")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        a.svm_cid = VMADDR_CID_ANY;
        a.svm_port = atoi(argv[2]);
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) { perror("echo"); return 1; }
        printf("VMPOD-ECHO-LISTENING %s\n", argv[2]);
        fflush(stdout);
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        static char buf[65536];
        long total = 0;
        for (;;) {
            int n = read(c, buf, sizeof buf);
            if (n <= 0) break;
            for (int off = 0; off < n;) {
                int w = write(c, buf + off, n - off);
                if (w <= 0) return 1;
                off += w;
            }
            total += n;
        }
        printf("VMPOD-ECHOED=%ld\n", total);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        a.svm_cid = atoi(argv[2]);
        a.svm_port = atoi(argv[3]);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
        char msg[512], line[512];
        int n = snprintf(msg, sizeof msg, "%s\n", argv[4]);
        write(s, msg, n);
        readline(s, line, sizeof line);
        printf("%s\n", line);
        return 0;
    }
    fprintf(stderr, "usage: vsock_probe listen PORT | connect CID PORT MSG\n");
    return 2;
}
"#;

struct Artifacts {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kernel + test initramfs, built once per test binary.
fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let kernel = build_dir().join("guest/vmlinux");
        assert!(
            kernel.exists(),
            "{} missing: run `make guest-kernel` first",
            kernel.display()
        );
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm_qemu");
        let root = work.join("root");
        let _ = std::fs::remove_dir_all(&work);
        for d in ["bin", "proc", "sys", "dev", "mnt"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("/bin/busybox (Debian busybox-static) is needed");
        let src = work.join("vsock_probe.c");
        std::fs::write(&src, VSOCK_PROBE_C).unwrap();
        run_ok(
            Command::new("gcc")
                .args(["-static", "-O2", "-o"])
                .arg(root.join("bin/vsock_probe"))
                .arg(&src),
        );
        let init = root.join("init");
        std::fs::write(&init, INIT).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
        let initrd = work.join("initrd.cpio");
        run_ok(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
            "find . | sort | cpio --quiet -o -H newc -R 0:0 > {}",
            initrd.display()
        )));
        Artifacts { kernel, initrd }
    })
}

/// Wait until the console log contains `needle`; returns the whole log.
fn wait_console(log: &Path, needle: &str, child: Option<&mut Child>) -> String {
    let start = Instant::now();
    let mut child = child;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Some(c) = child.as_deref_mut() {
            if let Some(status) = c.try_wait().unwrap() {
                panic!("VM exited ({status}) before printing {needle:?}; console:\n{text}");
            }
        }
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "no {needle:?} within {BOOT_TIMEOUT:?}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn console_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} not on the console:\n{text}"))
        .to_string()
}

/// Host-initiated hybrid-vsock connection: CONNECT, OK, one line each way.
fn host_to_guest(uds: &Path, port: u32, line: &str) -> String {
    let mut s = UnixStream::connect(uds).expect("connect to the VM's vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The CONNECT line in one write (our muxer also accepts it in pieces).
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(
        ok.starts_with("OK "),
        "hybrid vsock handshake answered {ok:?}"
    );
    writeln!(s, "{line}").unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

/// Saturate one connection in both directions at once: a writer thread
/// pushes `total` bytes as fast as the guest takes them while this thread
/// reads the echo, then the host half-closes (SHUT_WR) and the guest, on
/// EOF, finishes echoing and closes. The case vhost-device-vsock 0.3.0
/// stalls on (lost credit update) and cannot do (no half-close).
fn saturated_echo(uds: &Path, port: u32, total: usize) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut ok = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        s.read_exact(&mut byte).expect("handshake reply");
        ok.push(byte[0]);
    }
    assert!(ok.starts_with(b"OK "), "{:?}", String::from_utf8_lossy(&ok));
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

fn vm_run_cmd(dir: &Path, cmdline: &str, extra: &[&str]) -> Command {
    let a = artifacts();
    let mut cmd = Command::new(vmpod_bin());
    cmd.args(["vm", "run", "--hypervisor", "qemu", "--accel", "tcg"])
        .arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.initrd)
        .args(["--cmdline", cmdline, "--vcpus", "2", "--memory-mib", "256"])
        .arg("--vsock-uds")
        .arg(dir.join("vm.vsock"))
        .arg("--console-log")
        .arg(dir.join("console.log"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A `vmpod vm run` process that is killed if the test fails before it
/// exits (QEMU and the helpers die with it: parent-death signal).
struct VmChild(Option<Child>);

impl std::ops::Deref for VmChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("child present")
    }
}

impl std::ops::DerefMut for VmChild {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present")
    }
}

impl Drop for VmChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_vm(mut cmd: Command) -> VmChild {
    VmChild(Some(cmd.spawn().expect("spawn vmpod vm run")))
}

fn wait_exit(mut vm: VmChild) -> Output {
    let mut child = vm.0.take().expect("child present");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            panic!("vmpod vm run did not exit within {BOOT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Child PIDs of `pid` (all threads).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_gone(pids: &[u32]) {
    let start = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "processes left behind: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let uds = dir.path().join("vm.vsock");
    // Guest → host: the guest connects to CID 2 port 6000 → <uds>_6000.
    let g2h = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let g2h_thread = std::thread::spawn(move || {
        let (mut s, _) = g2h.accept().unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        writeln!(s, "host-got:{}", line.trim_end()).unwrap();
        line
    });

    let share_arg = format!("share={}", share.display());
    let mut child = spawn_vm(vm_run_cmd(
        dir.path(),
        "quiet vmpod_test=full",
        &["--share", &share_arg],
    ));
    let console = dir.path().join("console.log");
    let text = wait_console(&console, "VMPOD-LISTENING 5000", Some(&mut child));
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
    wait_console(&console, "VMPOD-ECHO-LISTENING 5001", None);
    saturated_echo(&uds, 5001, ECHO_BYTES);

    // Host → guest: two connections (the second tells the listener to quit).
    assert_eq!(
        host_to_guest(&uds, 5000, "ping-from-host"),
        "echo:ping-from-host"
    );
    assert_eq!(host_to_guest(&uds, 5000, "quit"), "echo:quit");

    let out = wait_exit(child);
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

/// A guest whose init exits panics the kernel: non-zero exit, reason printed.
#[test]
fn cli_reports_guest_panic() {
    let dir = tempfile::tempdir().unwrap();
    let exit_json = dir.path().join("exit.json");
    let child = spawn_vm(vm_run_cmd(
        dir.path(),
        "vmpod_test=panic",
        &["--exit-json", exit_json.to_str().unwrap()],
    ));
    let out = wait_exit(child);
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
    let reason: ExitReason = serde_json::from_slice(&std::fs::read(&exit_json).unwrap()).unwrap();
    assert!(
        matches!(reason, ExitReason::Crashed(ref r) if r.contains("Kernel panic")),
        "{reason:?}"
    );
    assert!(!dir.path().join("vm.vsock").exists());
}

/// A guest reboot ends the microVM cleanly: exit 0, reason `Reboot`.
#[test]
fn cli_guest_reboot_is_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let exit_json = dir.path().join("exit.json");
    let child = spawn_vm(vm_run_cmd(
        dir.path(),
        "vmpod_test=reboot",
        &["--exit-json", exit_json.to_str().unwrap()],
    ));
    let out = wait_exit(child);
    assert!(
        out.status.success(),
        "reboot → exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reason: ExitReason = serde_json::from_slice(&std::fs::read(&exit_json).unwrap()).unwrap();
    assert_eq!(reason, ExitReason::Reboot);
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert!(console.contains(MARKER), "{console}");
}

/// SIGTERM stops a running VM: exit 0, QEMU and helpers gone, socket removed.
#[test]
fn cli_sigterm_stops_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_vm(vm_run_cmd(dir.path(), "vmpod_test=idle", &[]));
    wait_console(&dir.path().join("console.log"), MARKER, Some(&mut child));
    let helpers = children(child.id());
    assert!(helpers.len() >= 2, "qemu + vsock back-end: {helpers:?}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_exit(child);
    assert!(
        out.status.success(),
        "SIGTERM → exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_gone(&helpers);
    assert!(
        !dir.path().join("vm.vsock").exists(),
        "vsock socket removed"
    );
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
        t = tokio::task::spawn_blocking(move || wait_console(&log, "VMPOD-IDLE", None)) => t.unwrap(),
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
    };
    let hv = BuiltinHypervisor::new(vmpod_bin());
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
