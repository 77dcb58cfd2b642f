//! vsock benchmark (run by bench/bench-vsock.sh; `make bench`).
//!
//! The QEMU backend's guest vsock served by our own vhost-user back-end
//! (`vmpod vm vhost-user-vsock`, the default) vs the peer
//! `vhost-device-vsock` (rust-vmm's, when built: `VMPOD_VHOST_DEVICE_VSOCK`
//! or build/tools/bin), same kernel, same QEMU/TCG guest, runs interleaved:
//! - echo round trip of 64 bytes over one host-initiated connection
//!   (median of 1000 per run);
//! - echo throughput: 32 MiB through the guest in 64 KiB chunks, each read
//!   back before the next (bounded in flight, which the peer needs: it
//!   stalls when both directions are saturated at once);
//! - connect time (`CONNECT` → `OK`);
//! - RSS/PSS of the back-end process with the guest idle.
//!
//! Prints a table and writes bench/results/vsock.json (median + spread of N
//! runs, BENCH_RUNS, default 5, and the machine).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmpod_tests::bench::{self, fmt_stats, machine, median, proc_mem, stats, vmpod_bin};
use vmpod_tests::initramfs::Initramfs;
use vmpod_tests::process::{children, ChildGuard};
use vmpod_tests::repo_root;
use vmpod_tests::vm::hybrid_connect;

const PORT: u32 = 5001;
const PINGS: usize = 1000;
const CHUNK: usize = 64 * 1024;
const BULK: usize = 32 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// `/init` after [`vmpod_tests::initramfs::BUSYBOX_INIT_PREAMBLE`].
const INIT: &str = r#"/bin/vsock_probe echo 5001
poweroff -f
"#;

struct Backend {
    name: &'static str,
    /// `VMPOD_VSOCK_HELPER` for the QEMU backend (None: our own).
    helper: Option<PathBuf>,
}

#[derive(Default)]
struct Samples {
    connect_ms: Vec<f64>,
    rtt_us: Vec<f64>,
    mb_s: Vec<f64>,
    rss_kib: Vec<f64>,
    pss_kib: Vec<f64>,
}

fn main() {
    let runs = bench::runs();
    let (work, kernel) = bench::setup("vsock");
    let initrd = Initramfs::new(&work.path().join("root"))
        .vsock_probe()
        .busybox_init(INIT)
        .cpio(&work.path().join("initrd.cpio.gz"));
    let vmpod = vmpod_bin();

    let mut backends = vec![Backend {
        name: "vmpod vhost-user-vsock",
        helper: None,
    }];
    match vmpod_runtime::hypervisor::tools::find("vhost-device-vsock") {
        Some(p) => backends.push(Backend {
            name: "vhost-device-vsock",
            helper: Some(p),
        }),
        None => eprintln!(
            "peer skipped: vhost-device-vsock not found (cargo install --locked vhost-device-vsock --version 0.3.0 --root build/tools)"
        ),
    }

    let mut samples: Vec<Samples> = backends.iter().map(|_| Samples::default()).collect();
    for run in 0..runs {
        for (b, s) in backends.iter().zip(samples.iter_mut()) {
            let dir = work
                .path()
                .join(format!("run{run}-{}", b.name.replace(' ', "_")));
            std::fs::create_dir_all(&dir).unwrap();
            match measure(&vmpod, &kernel, &initrd, &dir, b) {
                Ok(m) => {
                    eprintln!(
                        "run {}/{runs} {}: connect {:.2} ms, rtt {:.0} µs, {:.1} MB/s, RSS {} KiB",
                        run + 1,
                        b.name,
                        m.connect_ms,
                        m.rtt_us,
                        m.mb_s,
                        m.rss_kib
                    );
                    s.connect_ms.push(m.connect_ms);
                    s.rtt_us.push(m.rtt_us);
                    s.mb_s.push(m.mb_s);
                    s.rss_kib.push(m.rss_kib as f64);
                    s.pss_kib.push(m.pss_kib as f64);
                }
                Err(e) => eprintln!("run {}/{runs} {}: FAILED: {e}", run + 1, b.name),
            }
        }
    }

    println!(
        "\n{:24} {:>24} {:>24} {:>24} {:>22}",
        "vsock back-end",
        "connect ms",
        "echo RTT µs (64 B)",
        "echo MB/s (64 KiB)",
        "idle RSS/PSS KiB"
    );
    for (b, s) in backends.iter().zip(&samples) {
        println!(
            "{:24} {:>24} {:>24} {:>24} {:>22}",
            b.name,
            fmt_stats(&s.connect_ms, 2, ""),
            fmt_stats(&s.rtt_us, 0, ""),
            fmt_stats(&s.mb_s, 1, ""),
            format!("{:.0}/{:.0}", median(&s.rss_kib), median(&s.pss_kib)),
        );
    }
    let ratio = |f: fn(&Samples) -> &Vec<f64>| {
        (samples.len() == 2 && !f(&samples[1]).is_empty())
            .then(|| median(f(&samples[0])) / median(f(&samples[1])))
    };
    let rtt_ratio = ratio(|s| &s.rtt_us);
    let tput_ratio = ratio(|s| &s.mb_s);
    if let (Some(r), Some(t)) = (rtt_ratio, tput_ratio) {
        println!("ratio ours/peer (median): RTT {r:.2}x (lower is better), throughput {t:.2}x (higher is better)");
    }
    println!(
        "(QEMU/TCG guest, 1 vCPU: guest code is emulated; compare ratios, not absolute numbers)"
    );

    let results: Vec<_> = backends
        .iter()
        .zip(&samples)
        .map(|(b, s)| {
            json!({
                "backend": b.name,
                "runs_ok": s.rtt_us.len(),
                "connect_ms": stats(&s.connect_ms),
                "echo_rtt_us_64b": stats(&s.rtt_us),
                "echo_mb_s_64k_chunks": stats(&s.mb_s),
                "idle_rss_kib": stats(&s.rss_kib),
                "idle_pss_kib": stats(&s.pss_kib),
            })
        })
        .collect();
    let out = json!({
        "benchmark": "vsock",
        "machine": machine(),
        "guest": {"hypervisor": "qemu", "accel": "tcg", "vcpus": 1, "memory_mib": 256},
        "method": {"pings_per_run": PINGS, "bulk_bytes": BULK, "chunk_bytes": CHUNK, "runs": runs},
        "results": results,
        "ratio_ours_over_peer": {"echo_rtt": rtt_ratio, "echo_throughput": tput_ratio},
    });
    let dir = repo_root().join("bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("vsock.json"),
        serde_json::to_vec_pretty(&out).unwrap(),
    )
    .unwrap();
    println!("results: bench/results/vsock.json");
}

struct Measured {
    connect_ms: f64,
    rtt_us: f64,
    mb_s: f64,
    rss_kib: u64,
    pss_kib: u64,
}

fn measure(
    vmpod: &Path,
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    b: &Backend,
) -> Result<Measured, String> {
    let uds = dir.join("vm.vsock");
    let console = dir.join("console.log");
    let mut cmd = Command::new(vmpod);
    cmd.args(["vm", "run", "--hypervisor", "qemu", "--accel", "tcg"])
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", "quiet", "--vcpus", "1", "--memory-mib", "256"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--console-log")
        .arg(&console)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match &b.helper {
        Some(h) => cmd.env("VMPOD_VSOCK_HELPER", h),
        None => cmd.env_remove("VMPOD_VSOCK_HELPER"),
    };
    let mut vm = ChildGuard::spawn(&mut cmd);
    vm.wait_console(&console, "VMPOD-ECHO-LISTENING 5001", BOOT_TIMEOUT);

    // The back-end process, idle guest.
    std::thread::sleep(Duration::from_millis(500));
    let helper_mem = children(vm.id())
        .into_iter()
        .filter(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("--uds-path"))
                .unwrap_or(false)
        })
        .find_map(proc_mem)
        .ok_or("vsock back-end process not found")?;

    let t = Instant::now();
    let mut s = hybrid_connect(&uds, PORT, Duration::from_secs(30))?;
    let connect_ms = t.elapsed().as_secs_f64() * 1e3;

    let ping = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let t = Instant::now();
        s.write_all(&ping).unwrap();
        s.read_exact(&mut back).map_err(|e| format!("ping: {e}"))?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }

    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 7) as u8).collect();
    let mut echo = vec![0u8; CHUNK];
    let t = Instant::now();
    for i in 0..BULK / CHUNK {
        s.write_all(&chunk).unwrap();
        s.read_exact(&mut echo)
            .map_err(|e| format!("bulk chunk {i}: {e}"))?;
        if echo != chunk {
            return Err(format!("bulk chunk {i} corrupted"));
        }
    }
    let mb_s = BULK as f64 / 1e6 / t.elapsed().as_secs_f64();
    drop(s); // guest echo sees EOF, init powers off
    let out = vm.wait_exit(Duration::from_secs(60));
    if !out.status.success() {
        return Err(format!(
            "VM exit {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Measured {
        connect_ms,
        rtt_us: median(&rtts),
        mb_s,
        rss_kib: helper_mem.rss_kib,
        pss_kib: helper_mem.pss_kib,
    })
}
