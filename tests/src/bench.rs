//! Shared pieces of the benchmark binaries (`src/bin/bench_*.rs`): sample
//! statistics, the machine description every results file carries, and
//! per-process memory.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

/// Median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
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

/// (min, max) of `v`.
pub fn range(v: &[f64]) -> (f64, f64) {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// Median, range, spread and the samples, for a results file.
pub fn stats(v: &[f64]) -> Value {
    let (min, max) = range(v);
    json!({"median": median(v), "min": min, "max": max, "spread": max - min, "samples": v})
}

/// `median [min–max]` with `decimals` places and a unit suffix.
pub fn fmt_stats(v: &[f64], decimals: usize, unit: &str) -> String {
    let (min, max) = range(v);
    format!(
        "{:.d$}{unit} [{min:.d$}–{max:.d$}]",
        median(v),
        d = decimals
    )
}

/// Runs per measurement: `BENCH_RUNS`, default 5.
pub fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// A scratch dir for one benchmark (removed when dropped) and the built
/// guest kernel (panics with the make target when missing).
pub fn setup(name: &str) -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::Builder::new()
        .prefix(&format!("vmpod-bench-{name}-"))
        .tempdir()
        .expect("tempdir");
    let kernel = crate::build_dir().join("guest/vmlinux");
    assert!(
        kernel.exists(),
        "{} missing: make guest-kernel",
        kernel.display()
    );
    (work, kernel)
}

/// What every results file records about the machine it ran on.
pub fn machine() -> Value {
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

/// A process's resident and proportional memory.
#[derive(Debug, Clone)]
pub struct ProcMem {
    pub name: String,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// RSS/PSS of `pid` from /proc/PID/smaps_rollup; None once it is gone.
pub fn proc_mem(pid: u32) -> Option<ProcMem> {
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

/// The `vmpod` a benchmark measures: `VMPOD_BIN`, else the most recently
/// built of target/{release,debug}/vmpod (`make bench` builds release).
pub fn vmpod_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMPOD_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"));
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("vmpod"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
        .expect("vmpod binary not built (make build)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(range(&[2.0, -1.0, 5.0]), (-1.0, 5.0));
        assert_eq!(fmt_stats(&[1.0, 2.0, 4.0], 1, "s"), "2.0s [1.0–4.0]");
    }

    #[test]
    fn own_process_memory_is_readable() {
        let m = proc_mem(std::process::id()).expect("our own smaps_rollup");
        assert!(m.rss_kib > 0 && m.pss_kib > 0, "{m:?}");
    }
}
