//! Guest-userspace tests of the built-in KVM VMM: the same scenarios as the
//! QEMU backend's (vm_qemu.rs), booted with `vmpod vm run --hypervisor
//! builtin`. They need hardware KVM: on PVM hosts (module `kvm_pvm`) a
//! non-PVM guest's user mode cannot make system calls, so they skip there
//! and say why; the kernel-mode probes in vmm_probes.rs cover this VMM on
//! such hosts.
//!
//! Needs: /dev/kvm (hardware), build/guest/vmlinux, busybox-static, gcc.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmpod_runtime::hypervisor::ExitReason;
use vmpod_tests::{build_dir, vmpod_bin};

const MARKER: &str = "VMPOD-BUILTIN-INIT";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
echo VMPOD-BUILTIN-INIT
echo "VMPOD-NPROC=$(nproc)"
mode=$(sed -n 's/.*vmpod_test=\([a-z]*\).*/\1/p' /proc/cmdline)
if [ "$mode" = panic ]; then exit 3; fi
echo "VMPOD-RNG=$(head -c 64 /dev/hwrng | wc -c)"
echo "VMPOD-G2H=$(/bin/vsock_probe connect 2 6000 hello-from-guest)"
/bin/vsock_probe listen 5000
poweroff -f
"#;

/// `listen PORT`: echo `echo:<line>` per connection until `quit`;
/// `connect CID PORT MSG`: send MSG, print the reply line.
const VSOCK_PROBE_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>
static int readline(int fd, char *b, int cap) {
    int n = 0; char c;
    while (n < cap - 1 && read(fd, &c, 1) == 1 && c != '\n') b[n++] = c;
    b[n] = 0; return n;
}
int main(int argc, char **argv) {
    struct sockaddr_vm a; memset(&a, 0, sizeof a); a.svm_family = AF_VSOCK;
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        a.svm_cid = VMADDR_CID_ANY; a.svm_port = atoi(argv[2]);
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) return 1;
        printf("VMPOD-LISTENING %s\n", argv[2]); fflush(stdout);
        for (;;) {
            int c = accept(s, NULL, NULL); char l[512], o[600];
            if (c < 0) return 1;
            readline(c, l, sizeof l);
            write(c, o, snprintf(o, sizeof o, "echo:%s\n", l)); close(c);
            if (!strcmp(l, "quit")) return 0;
        }
    }
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        a.svm_cid = atoi(argv[2]); a.svm_port = atoi(argv[3]);
        if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
        char m[512], l[512];
        write(s, m, snprintf(m, sizeof m, "%s\n", argv[4]));
        readline(s, l, sizeof l); printf("%s\n", l); return 0;
    }
    return 2;
}
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

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn initrd() -> &'static PathBuf {
    static I: OnceLock<PathBuf> = OnceLock::new();
    I.get_or_init(|| {
        let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vmm_userspace");
        let root = work.join("root");
        let _ = std::fs::remove_dir_all(&work);
        for d in ["bin", "proc", "sys", "dev"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
        let src = work.join("vsock_probe.c");
        std::fs::write(&src, VSOCK_PROBE_C).unwrap();
        run_ok(
            Command::new("gcc")
                .args(["-static", "-O2", "-o"])
                .arg(root.join("bin/vsock_probe"))
                .arg(&src),
        );
        std::fs::write(root.join("init"), INIT).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let out = work.join("initrd.cpio");
        run_ok(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
            "find . | sort | cpio --quiet -o -H newc -R 0:0 > {}",
            out.display()
        )));
        out
    })
}

fn vm(dir: &Path, cmdline: &str) -> Child {
    Command::new(vmpod_bin())
        .args(["vm", "run", "--hypervisor", "builtin"])
        .arg("--kernel")
        .arg(build_dir().join("guest/vmlinux"))
        .arg("--initrd")
        .arg(initrd())
        .args(["--cmdline", cmdline, "--vcpus", "2", "--memory-mib", "256"])
        .arg("--vsock-uds")
        .arg(dir.join("vm.vsock"))
        .arg("--console-log")
        .arg(dir.join("console.log"))
        .arg("--exit-json")
        .arg(dir.join("exit.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_console(log: &Path, needle: &str, child: &mut Child) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("VM exited ({st}) before {needle:?}:\n{text}");
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            panic!("no {needle:?} within {BOOT_TIMEOUT:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(mut child: Child) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            panic!("VM did not exit within {BOOT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} not on the console:\n{text}"))
        .to_string()
}

fn host_to_guest(uds: &Path, port: u32, line: &str) -> String {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "handshake: {ok:?}");
    writeln!(s, "{line}").unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

/// Boot marker, 2 vCPUs, virtio-rng, vsock both ways, power-off → exit 0.
#[test]
fn builtin_userspace_vsock_and_poweroff() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP builtin_userspace_vsock_and_poweroff: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let g2h = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let g2h_thread = std::thread::spawn(move || {
        let (mut s, _) = g2h.accept().unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        writeln!(s, "host-got:{}", line.trim_end()).unwrap();
    });
    let mut child = vm(dir.path(), "quiet vmpod_test=full");
    let console = dir.path().join("console.log");
    let text = wait_console(&console, "VMPOD-LISTENING 5000", &mut child);
    assert!(text.contains(MARKER));
    assert_eq!(value(&text, "VMPOD-NPROC="), "2");
    assert_eq!(value(&text, "VMPOD-RNG="), "64");
    assert_eq!(value(&text, "VMPOD-G2H="), "host-got:hello-from-guest");
    g2h_thread.join().unwrap();
    assert_eq!(host_to_guest(&uds, 5000, "ping"), "echo:ping");
    assert_eq!(host_to_guest(&uds, 5000, "quit"), "echo:quit");
    let out = wait_exit(child);
    assert!(
        out.status.success(),
        "power-off → exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reason: ExitReason =
        serde_json::from_slice(&std::fs::read(dir.path().join("exit.json")).unwrap()).unwrap();
    assert_eq!(reason, ExitReason::PowerOff);
    assert!(!uds.exists());
}

/// init exits → kernel panic → crash reported (exit 2, reason printed).
#[test]
fn builtin_userspace_panic_is_a_crash() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP builtin_userspace_panic_is_a_crash: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = wait_exit(vm(dir.path(), "vmpod_test=panic"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("Kernel panic - not syncing: Attempted to kill init!"),
        "{stderr}"
    );
}
