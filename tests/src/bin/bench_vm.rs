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
use vmpod_tests::initramfs::Initramfs;
use vmpod_tests::process::{children, strip_ansi};
use vmpod_tests::{build_dir, repo_root};

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
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let work = tempfile::Builder::new()
        .prefix("vmpod-bench-vm-")
        .tempdir()
        .expect("tempdir");
    let kernel = build_dir().join("guest/vmlinux");
    assert!(
        kernel.exists(),
        "{} missing: make guest-kernel",
        kernel.display()
    );
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
                    fmt_stats(&b.first),
                ));
                table.push((format!("{what}: start → Run /init"), fmt_stats(&b.target)));
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
                fmt_stats(&b.target),
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

struct ProcMem {
    name: String,
    rss_kib: u64,
    pss_kib: u64,
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

fn proc_mem(pid: u32) -> Option<ProcMem> {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()?
        .trim()
        .to_string();
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ProcMem {
        name,
        rss_kib: field("Rss:"),
        pss_kib: field("Pss:"),
    })
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

fn vmpod_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMPOD_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    // The most recently built of release/debug (`make bench` builds release).
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("vmpod"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
        .expect("vmpod binary not built (make build)")
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn stats(v: &[f64]) -> Value {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    json!({"median": median(v), "min": min, "max": max, "spread": max - min, "samples": v})
}

fn fmt_stats(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.3}s [{min:.3}–{max:.3}]", median(v))
}

fn machine() -> Value {
    let sh = |c: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(c)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "uname": sh("uname -a"),
        "nproc": sh("nproc"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'"),
        "qemu": sh("qemu-system-x86_64 --version | head -n1"),
    })
}
