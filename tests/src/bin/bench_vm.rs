//! VM start-up benchmark (run by bench/bench-vm.sh; `make bench`).
//!
//! Same kernel (build/guest/vmlinux), same tiny initramfs, same command line:
//! - built-in VMM (`vmpod vm run --hypervisor builtin`) vs the peer
//!   `qemu-system-x86_64 -enable-kvm -M microvm` run directly: time from
//!   process start to the first kernel line and to `Run /init`;
//! - QEMU/TCG through our backend (`vmpod vm run --accel tcg`): start to the
//!   busybox init's marker;
//! - RSS/PSS (from /proc/PID/smaps_rollup) of each VMM process with the
//!   guest idle.
//!
//! Prints a table and writes bench/results/vm.json (median + spread of N runs,
//! BENCH_RUNS, default 5, and the machine).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmpod_tests::bench::{self, fmt_stats, machine, median, proc_mem, stats, vmpod_bin, ProcMem};
use vmpod_tests::initramfs::Initramfs;
use vmpod_tests::process::{children, strip_ansi};
use vmpod_tests::repo_root;

const FIRST_LINE: &str = "Linux version";
const RUN_INIT: &str = "Run /init";
const ROOT_WAIT: &str = "Waiting for root device";
const TCG_MARKER: &str = "VMPOD-BENCH-INIT";
/// The user command line both KVM runs get; on PVM hosts plus the full set
/// of PVM words, identical for both (the built-in VMM appends its own masks
/// too; duplicates are harmless).
const KVM_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1";
const TIMEOUT: Duration = Duration::from_secs(300);

fn main() {
    let runs = bench::runs();
    let (work, kernel) = bench::setup("vm");
    let vmpod = vmpod_bin();
    let tiny = tiny_initrd(work.path());
    let busybox = busybox_initrd(work.path());
    let flavour = vmpod_runtime::hypervisor::host::KvmFlavour::detect();
    let pvm = flavour == vmpod_runtime::hypervisor::host::KvmFlavour::Pvm;
    let peer_cmdline = if pvm {
        format!(
            "{KVM_CMDLINE} {}",
            vmpod_runtime::hypervisor::host::PVM_GUEST_CMDLINE
        )
    } else {
        KVM_CMDLINE.to_string()
    };
    eprintln!(
        "bench-vm: {runs} runs each; KVM: {}; vmpod: {}",
        flavour.describe(),
        vmpod.display()
    );

    let mut results = serde_json::Map::new();
    let mut table: Vec<(String, String)> = Vec::new();

    // 1. Built-in VMM vs QEMU+KVM, to the first kernel line and Run /init.
    let kvm_usable = flavour.is_usable();
    let builtin = if kvm_usable {
        measure_boot(runs, work.path(), "builtin", |dir| {
            vmpod_cmd(
                &vmpod,
                "builtin",
                "kvm",
                &kernel,
                Some(&tiny),
                &peer_cmdline,
                dir,
            )
        })
    } else {
        Err(format!("KVM unusable: {}", flavour.describe()))
    };
    let qemu_kvm = if kvm_usable {
        measure_boot(runs, work.path(), "qemu-kvm", |dir| {
            raw_qemu_kvm(&kernel, Some(&tiny), &peer_cmdline, dir)
        })
    } else {
        Err(format!("KVM unusable: {}", flavour.describe()))
    };
    for (key, what, r) in [
        ("builtin", "built-in VMM", &builtin),
        ("qemu_kvm", "qemu -enable-kvm (peer)", &qemu_kvm),
    ] {
        match r {
            Ok(b) => {
                table.push((
                    format!("{what}: start → first kernel line"),
                    fmt_stats(&b.first, 3, "s"),
                ));
                table.push((
                    format!("{what}: start → Run /init"),
                    fmt_stats(&b.target, 3, "s"),
                ));
                results.insert(
                    key.into(),
                    json!({"first_line_s": stats(&b.first), "run_init_s": stats(&b.target)}),
                );
            }
            Err(why) => {
                table.push((format!("{what}: boot"), format!("n/a ({why})")));
                results.insert(key.into(), json!({"error": why}));
            }
        }
    }
    if let (Ok(b), Ok(q)) = (&builtin, &qemu_kvm) {
        let r1 = median(&b.first) / median(&q.first);
        let r2 = median(&b.target) / median(&q.target);
        table.push((
            "ratio builtin/qemu-kvm: first line".into(),
            format!("{r1:.2}"),
        ));
        table.push((
            "ratio builtin/qemu-kvm: Run /init".into(),
            format!("{r2:.2}"),
        ));
        results.insert(
            "ratio_builtin_over_qemu_kvm".into(),
            json!({"first_line": r1, "run_init": r2}),
        );
    }

    // 2. QEMU/TCG through our backend, to the init marker.
    match measure_runs(runs, work.path(), "qemu-tcg", TCG_MARKER, |dir| {
        vmpod_cmd(&vmpod, "qemu", "tcg", &kernel, Some(&busybox), "", dir)
    }) {
        Ok(b) => {
            table.push((
                "qemu/tcg (vmpod backend): start → init marker".into(),
                fmt_stats(&b.target, 3, "s"),
            ));
            results.insert(
                "qemu_tcg".into(),
                json!({"init_marker_s": stats(&b.target), "first_line_s": stats(&b.first)}),
            );
        }
        Err(why) => {
            table.push(("qemu/tcg: boot".into(), format!("n/a ({why})")));
            results.insert("qemu_tcg".into(), json!({"error": why}));
        }
    }

    // 3. Memory of each VMM with the guest idle.
    let mut mem = serde_json::Map::new();
    let idle_peer = format!("{peer_cmdline} root=/dev/missing rootwait");
    let cases: Vec<(&str, Launcher, &str)> = vec![
        (
            "builtin",
            Box::new(|dir: &Path| {
                vmpod_cmd(&vmpod, "builtin", "kvm", &kernel, None, &idle_peer, dir)
            }),
            ROOT_WAIT,
        ),
        (
            "qemu_kvm",
            Box::new(|dir: &Path| raw_qemu_kvm(&kernel, None, &idle_peer, dir)),
            ROOT_WAIT,
        ),
        (
            "qemu_tcg",
            Box::new(|dir: &Path| {
                vmpod_cmd(&vmpod, "qemu", "tcg", &kernel, Some(&busybox), "", dir)
            }),
            TCG_MARKER,
        ),
    ];
    for (key, launch, ready) in cases {
        if key != "qemu_tcg" && !kvm_usable {
            mem.insert(key.into(), json!({"error": "KVM unusable"}));
            continue;
        }
        match idle_memory(work.path(), key, launch.as_ref(), ready) {
            Ok(m) => {
                let line = m
                    .iter()
                    .map(|p| format!("{} RSS {} KiB PSS {} KiB", p.name, p.rss_kib, p.pss_kib))
                    .collect::<Vec<_>>()
                    .join("; ");
                table.push((format!("memory, guest idle: {key}"), line));
                mem.insert(
                    key.into(),
                    Value::Array(
                        m.iter()
                            .map(|p| json!({"process": p.name, "rss_kib": p.rss_kib, "pss_kib": p.pss_kib}))
                            .collect(),
                    ),
                );
            }
            Err(why) => {
                table.push((format!("memory, guest idle: {key}"), format!("n/a ({why})")));
                mem.insert(key.into(), json!({"error": why}));
            }
        }
    }
    results.insert("memory_idle".into(), Value::Object(mem));

    let width = table
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    println!("\nVM start-up and memory ({runs} runs; median [min–max])");
    for (k, v) in &table {
        println!("  {k:width$}  {v}");
    }
    let out = json!({
        "benchmark": "vm",
        "runs": runs,
        "machine": machine(),
        "kvm": flavour.describe(),
        "kernel": kernel.display().to_string(),
        "results": Value::Object(results),
    });
    let dir = repo_root().join("bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote {}", path.display());
}

/// A started VM: the process we wait on/kill, the VMM processes to measure,
/// and its console log.
struct Launch {
    child: Child,
    console: PathBuf,
}

type Launcher<'a> = Box<dyn Fn(&Path) -> Launch + 'a>;

struct Boot {
    first: Vec<f64>,
    target: Vec<f64>,
}

fn measure_boot(
    runs: usize,
    work: &Path,
    name: &str,
    launch: impl Fn(&Path) -> Launch,
) -> Result<Boot, String> {
    measure_runs(runs, work, name, RUN_INIT, launch)
}

fn measure_runs(
    runs: usize,
    work: &Path,
    name: &str,
    target: &str,
    launch: impl Fn(&Path) -> Launch,
) -> Result<Boot, String> {
    let mut boot = Boot {
        first: Vec::new(),
        target: Vec::new(),
    };
    for i in 0..runs {
        let dir = work.join(format!("{name}-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let start = Instant::now();
        let mut l = launch(&dir);
        let r = watch(&mut l, start, &[FIRST_LINE, target]);
        stop(&mut l);
        let times = r?;
        eprintln!(
            "  {name} run {}: first line {:.3}s, {target} {:.3}s",
            i + 1,
            times[0],
            times[1]
        );
        boot.first.push(times[0]);
        boot.target.push(times[1]);
    }
    Ok(boot)
}

/// Seconds from `start` until each needle appears in the console, in order.
fn watch(l: &mut Launch, start: Instant, needles: &[&str]) -> Result<Vec<f64>, String> {
    let mut times = Vec::new();
    loop {
        let text = std::fs::read_to_string(&l.console).unwrap_or_default();
        while times.len() < needles.len() && text.contains(needles[times.len()]) {
            times.push(start.elapsed().as_secs_f64());
        }
        if times.len() == needles.len() {
            return Ok(times);
        }
        if let Ok(Some(status)) = l.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = l.child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(format!(
                "exited ({status}) before {:?}: {}",
                needles[times.len()],
                strip_ansi(last.as_bytes())
            ));
        }
        if start.elapsed() > TIMEOUT {
            return Err(format!("no {:?} within {TIMEOUT:?}", needles[times.len()]));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stop(l: &mut Launch) {
    if let Ok(None) = l.child.try_wait() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(l.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = l.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = l.child.kill();
    }
    let _ = l.child.wait();
}

fn idle_memory(
    work: &Path,
    key: &str,
    launch: &dyn Fn(&Path) -> Launch,
    ready: &str,
) -> Result<Vec<ProcMem>, String> {
    let dir = work.join(format!("mem-{key}"));
    std::fs::create_dir_all(&dir).unwrap();
    let start = Instant::now();
    let mut l = launch(&dir);
    let r = watch(&mut l, start, &[ready]).map(|_| {
        std::thread::sleep(Duration::from_secs(2));
        let mut pids = vec![l.child.id()];
        pids.extend(children(l.child.id()));
        pids.iter().filter_map(|&p| proc_mem(p)).collect::<Vec<_>>()
    });
    stop(&mut l);
    r
}

fn vmpod_cmd(
    vmpod: &Path,
    hypervisor: &str,
    accel: &str,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    dir: &Path,
) -> Launch {
    let console = dir.join("console.log");
    let mut cmd = Command::new(vmpod);
    cmd.args(["vm", "run", "--hypervisor", hypervisor, "--accel", accel])
        .arg("--kernel")
        .arg(kernel)
        .args(["--cmdline", cmdline, "--vcpus", "1", "--memory-mib", "128"])
        .arg("--vsock-uds")
        .arg(dir.join("vm.vsock"))
        .arg("--console-log")
        .arg(&console);
    if let Some(i) = initrd {
        cmd.arg("--initrd").arg(i);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    Launch {
        child: cmd.spawn().expect("spawn vmpod"),
        console,
    }
}

/// The peer: QEMU with KVM, microvm, the same devices our backends give a
/// minimal VM (serial console only; no vsock helper).
fn raw_qemu_kvm(kernel: &Path, initrd: Option<&Path>, cmdline: &str, dir: &Path) -> Launch {
    let console = dir.join("console.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-M",
        "microvm,acpi=off",
        "-m",
        "128M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
    ])
    .arg(format!("file:{}", console.display()))
    .arg("-kernel")
    .arg(kernel)
    .args(["-append", cmdline]);
    if let Some(i) = initrd {
        cmd.arg("-initrd").arg(i);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    Launch {
        child: cmd.spawn().expect("spawn qemu"),
        console,
    }
}

/// `/init` that does nothing (guest userspace is not needed to reach
/// `Run /init`; on PVM hosts it cannot run anyway).
fn tiny_initrd(work: &Path) -> PathBuf {
    Initramfs::new(&work.join("tiny-root"))
        .init("#!/bin/sh\n")
        .cpio(&work.join("tiny.cpio"))
}

/// busybox-static `/init` printing the marker, then idling.
fn busybox_initrd(work: &Path) -> PathBuf {
    Initramfs::new(&work.join("bb-root"))
        .busybox()
        .init(&format!(
            "#!/bin/busybox sh\necho {TCG_MARKER}\nwhile true; do /bin/busybox sleep 1; done\n"
        ))
        .cpio(&work.join("busybox.cpio"))
}
