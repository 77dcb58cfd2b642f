//! Pull + unpack benchmark (run by `bench/bench-images.sh`).
//!
//! Builds a ~50 MB multi-layer image (busybox + layers of mixed random and
//! compressible data), pushes it to a loopback `docker-registry`, then times
//! N pulls into a fresh vmpod store each, and the same pull with containerd
//! (`ctr images pull --plain-http`, which also unpacks into its overlayfs
//! snapshotter) when containerd is installed. Prints a table and writes JSON.
//!
//! Usage: bench_images [--runs N] [--out FILE]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use vmpod_images::{ImageStore, RegistryConfig};
use vmpod_tests::oci_image::{Compression, Entry, ImageBuilder, Layer, Pusher};
use vmpod_tests::registry::Registry;

const DATA_LAYERS: usize = 6;
const RANDOM_PER_LAYER: usize = 8 << 20;
const TEXT_PER_LAYER: usize = 3 << 20;

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn data_layer(i: usize, c: Compression) -> Layer {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
    let mut random = vec![0u8; RANDOM_PER_LAYER];
    for chunk in random.chunks_mut(8) {
        let v = xorshift(&mut seed).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let line = format!("layer {i}: the quick brown fox jumps over the lazy dog 0123456789\n");
    let text: Vec<u8> = line.bytes().cycle().take(TEXT_PER_LAYER).collect();
    let mut entries = vec![Entry::Dir(format!("data{i}"))];
    // Many smaller files too, so unpack does per-file work.
    for f in 0..200 {
        entries.push(Entry::File(
            format!("data{i}/small-{f}.txt"),
            format!("{line}{f}\n").repeat(20).into_bytes(),
            0o644,
        ));
    }
    entries.push(Entry::File(format!("data{i}/random.bin"), random, 0o644));
    entries.push(Entry::File(format!("data{i}/text.txt"), text, 0o644));
    Layer::new(&entries, c)
}

fn stats(samples: &[f64]) -> serde_json::Value {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    json!({
        "median_ms": round(median),
        "min_ms": round(s[0]),
        "max_ms": round(s[s.len() - 1]),
        "spread_ms": round(s[s.len() - 1] - s[0]),
        "samples_ms": s.iter().map(|v| round(*v)).collect::<Vec<_>>(),
    })
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

struct Containerd {
    child: Child,
    sock: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_containerd(dir: &Path) -> Result<Containerd> {
    let sock = dir.join("containerd.sock");
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{ttrpc}\"\n\
             [debug]\n  address = \"\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            ttrpc = dir.join("containerd-ttrpc.sock").display(),
        ),
    )?;
    let log = std::fs::File::create(dir.join("containerd.log"))?;
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&cfg)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawn containerd")?;
    let c = Containerd { child, sock };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if ctr(&c, &["version"]).is_ok() {
            return Ok(c);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "containerd did not come up; see {}",
        dir.join("containerd.log").display()
    )
}

fn ctr(c: &Containerd, args: &[&str]) -> Result<String> {
    let out = Command::new("ctr")
        .arg("-a")
        .arg(&c.sock)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ctr")?;
    if !out.status.success() {
        bail!("ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn main() -> Result<()> {
    let mut runs = 5usize;
    let mut out = PathBuf::from("bench/results/images.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--out" => out = args.next().context("--out FILE")?.into(),
            o => bail!("unknown argument {o}"),
        }
    }
    if let Some(why) = vmpod_tests::registry::skip_reason() {
        bail!("cannot run: {why}");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let base = tempfile::Builder::new()
        .prefix("vmpod-bench-images-")
        .tempdir_in("/var/tmp")?;

    eprintln!("building image ({DATA_LAYERS} data layers + busybox)...");
    let mut b = ImageBuilder::new().layer(Layer::busybox(Compression::Gzip)?);
    for i in 0..DATA_LAYERS {
        b = b.layer(data_layer(i, Compression::Gzip));
    }
    let img = b.cmd(&["sh"]).build();
    let compressed: usize = img.layers.iter().map(|l| l.blob.len()).sum();
    let reg = Registry::start()?;
    rt.block_on(Pusher::new(&reg.addr(), None).push_image("bench/big", Some("v1"), &img))?;
    let reference = format!("{}/bench/big:v1", reg.addr());
    eprintln!(
        "image {reference}: {} layers, {:.1} MB compressed",
        img.layers.len(),
        compressed as f64 / 1e6
    );

    // containerd, same registry, same image, same disk.
    let mut containerd_note = String::new();
    let have_containerd = Command::new("containerd").arg("--version").output().is_ok()
        && Command::new("ctr").arg("--version").output().is_ok();
    let mut cd = None;
    if !have_containerd {
        containerd_note = "containerd/ctr not installed".into();
    } else if !nix_is_root() {
        containerd_note = "containerd needs root here".into();
    } else {
        let cdir = base.path().join("containerd");
        std::fs::create_dir_all(&cdir)?;
        match start_containerd(&cdir) {
            Ok(c) => cd = Some(c),
            Err(e) => containerd_note = format!("containerd failed to start: {e:#}"),
        }
    }

    // Runs alternate between the two, so background load hits both alike.
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..runs {
        // vmpod: a fresh, empty store each run.
        let root = base.path().join(format!("vmpod-{i}"));
        let store = ImageStore::open(&root, RegistryConfig::default())?;
        let t = Instant::now();
        let rec = rt.block_on(store.pull(&reference, None))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(rec.layer_dirs.len() == img.layers.len());
        eprintln!("vmpod run {}: {ms:.0} ms", i + 1);
        ours.push(ms);
        drop(store);
        std::fs::remove_dir_all(&root)?;

        if let Some(c) = &cd {
            let t = Instant::now();
            ctr(c, &["images", "pull", "--plain-http", &reference])?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            eprintln!("containerd run {}: {ms:.0} ms", i + 1);
            theirs.push(ms);
            // Back to an empty store: remove the image, GC content and snapshots.
            ctr(c, &["images", "rm", "--sync", &reference])?;
            let left = ctr(c, &["content", "ls", "-q"])?;
            anyhow::ensure!(left.trim().is_empty(), "containerd kept content: {left}");
        }
    }
    drop(cd);

    let machine = json!({
        "uname": sh("uname -a"),
        "nproc": sh("nproc"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-"),
        "containerd": sh("containerd --version"),
        "loadavg": sh("cat /proc/loadavg"),
    });
    let ours_s = stats(&ours);
    let theirs_s = (!theirs.is_empty()).then(|| stats(&theirs));
    let ratio = theirs_s.as_ref().map(|t| {
        let r =
            ours_s["median_ms"].as_f64().unwrap_or(0.0) / t["median_ms"].as_f64().unwrap_or(1.0);
        (r * 1000.0).round() / 1000.0
    });
    let result = json!({
        "bench": "images",
        "what": "pull + unpack from a loopback docker-registry into an empty store",
        "image": {
            "reference": reference,
            "layers": img.layers.len(),
            "compressed_bytes": compressed,
            "total_size_bytes": img.size(),
        },
        "runs": runs,
        "vmpod": ours_s,
        "containerd": theirs_s,
        "containerd_note": containerd_note,
        "ratio_vmpod_over_containerd": ratio,
        "machine": machine,
    });

    println!();
    println!(
        "pull + unpack, {:.1} MB image, {} layers, {runs} runs",
        compressed as f64 / 1e6,
        img.layers.len()
    );
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>10}",
        "runtime", "median ms", "min ms", "max ms", "spread ms"
    );
    let row = |name: &str, s: &serde_json::Value| {
        println!(
            "{:<12} {:>10} {:>10} {:>10} {:>10}",
            name, s["median_ms"], s["min_ms"], s["max_ms"], s["spread_ms"]
        )
    };
    row("vmpod", &ours_s);
    match &theirs_s {
        Some(t) => row("containerd", t),
        None => println!("containerd   skipped: {containerd_note}"),
    }
    if let Some(r) = ratio {
        println!("ratio vmpod/containerd (median): {r}");
    }
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
