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
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmpod_runtime::hypervisor::ExitReason;
use vmpod_tests::{build_dir, vmpod_bin};

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
    if !Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm on this host".into());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm is not accessible to this user".into());
    }
    None
}

fn kernel() -> PathBuf {
    let k = build_dir().join("guest/vmlinux");
    assert!(
        k.exists(),
        "{} missing: run `make guest-kernel` first",
        k.display()
    );
    k
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

/// A TAP device with the host side of the guest's network; deleted on drop.
struct Tap {
    name: String,
}

impl Tap {
    fn create() -> Tap {
        let name = format!("vmpt{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let tap = Tap { name };
        ip(&[
            "addr",
            "add",
            &format!("{}.1/24", subnet()),
            "dev",
            &tap.name,
        ]);
        ip(&["link", "set", &tap.name, "up"]);
        tap
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

fn vm_cmd(dir: &Path, cmdline: &str, vcpus: u8, extra: &[String]) -> Command {
    let mut cmd = Command::new(vmpod_bin());
    cmd.args(["vm", "run", "--hypervisor", "builtin"])
        .arg("--kernel")
        .arg(kernel())
        .args(["--cmdline", cmdline, "--memory-mib", "128"])
        .args(["--vcpus", &vcpus.to_string()])
        .arg("--vsock-uds")
        .arg(dir.join("vm.vsock"))
        .arg("--console-log")
        .arg(dir.join("console.log"))
        .arg("--exit-json")
        .arg(dir.join("exit.json"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Wait until the console log contains `needle`; returns the whole log.
fn wait_console(log: &Path, needle: &str, child: &mut Child) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!(
                "VM exited ({status}) before printing {needle:?}\nstderr: {err}\nconsole:\n{text}"
            );
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            panic!("no {needle:?} within {BOOT_TIMEOUT:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `vmpod vm run` process; killed if a failing test leaves it running.
struct Vm(Option<Child>);

impl Vm {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    fn pid(&self) -> i32 {
        self.0.as_ref().expect("running").id() as i32
    }

    fn wait_exit(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().expect("running");
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vmpod vm run did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The tracing output without colour codes.
fn plain(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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

fn ping_ok(ip: &str) -> bool {
    for _ in 0..5 {
        let out = Command::new("ping")
            .args(["-c", "2", "-W", "5", ip])
            .output()
            .expect("ping (iputils-ping)");
        if out.status.success() {
            return true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    false
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
    let tap = Tap::create();
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
    let mut vm = Vm(Some(
        vm_cmd(dir.path(), &cmdline, 1, &extra).spawn().unwrap(),
    ));
    let console = dir.path().join("console.log");
    let uds = dir.path().join("vm.vsock");

    wait_console(&console, "Linux version", vm.child());
    eprintln!("first kernel line after {:?}", started.elapsed());
    let text = wait_console(&console, "Waiting for root device /dev/missing", vm.child());
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
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    let out = vm.wait_exit(Duration::from_secs(30));
    let log = plain(&out.stderr);
    assert!(out.status.success(), "SIGTERM → exit 0:\n{log}");
    let reason: ExitReason =
        serde_json::from_slice(&std::fs::read(dir.path().join("exit.json")).unwrap()).unwrap();
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
    let vm = Vm(Some(
        vm_cmd(
            dir.path(),
            "root=/dev/missing",
            1,
            &["--no-rng".to_string()],
        )
        .spawn()
        .unwrap(),
    ));
    let out = vm.wait_exit(BOOT_TIMEOUT);
    let stderr = plain(&out.stderr);
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(2),
        "crash exit code:\n{stderr}\n{console}"
    );
    assert!(
        stderr.contains("Kernel panic - not syncing: VFS: Unable to mount root fs"),
        "{stderr}"
    );
    let reason: ExitReason =
        serde_json::from_slice(&std::fs::read(dir.path().join("exit.json")).unwrap()).unwrap();
    assert!(
        matches!(&reason, ExitReason::Crashed(r) if r.contains("VFS: Unable to mount root fs")),
        "{reason:?}"
    );
    assert!(!dir.path().join("vm.vsock").exists());
}

/// A tiny initramfs: busybox as `/init` (a shell script).
fn tiny_initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("initramfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    std::fs::write(
        root.join("init"),
        "#!/bin/busybox sh\n/bin/busybox echo VMPOD-INIT-RAN\nexec /bin/busybox sleep 1000\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("initrd.cpio");
    let st = Command::new("sh")
        .current_dir(&root)
        .arg("-c")
        .arg(format!(
            "find . | sort | cpio --quiet -o -H newc -R 0:0 > {}",
            out.display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "cpio");
    out
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
    let mut vm = Vm(Some(vm_cmd(dir.path(), "", 1, &extra).spawn().unwrap()));
    let console = dir.path().join("console.log");
    let text = wait_console(&console, "Run /init as init process", vm.child());
    eprintln!("`Run /init` after {:?}", started.elapsed());
    assert!(
        text.contains("Unpacking initramfs") || text.contains("Trying to unpack rootfs"),
        "{text}"
    );
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if !pvm {
        wait_console(&console, "VMPOD-INIT-RAN", vm.child());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    }
    let out = vm.wait_exit(BOOT_TIMEOUT);
    let reason: ExitReason =
        serde_json::from_slice(&std::fs::read(dir.path().join("exit.json")).unwrap()).unwrap();
    if pvm {
        assert_eq!(out.status.code(), Some(2), "{}", plain(&out.stderr));
        assert!(
            matches!(&reason, ExitReason::Crashed(r) if r.contains("Attempted to kill init")),
            "PVM: init cannot make syscalls, so the kernel panics: {reason:?}"
        );
    } else {
        assert!(out.status.success());
        assert_eq!(reason, ExitReason::Stopped);
    }
}
