//! Pull + unpack benchmark (run by `bench/bench-images.sh`), like for
//! like: both runtimes are timed through their CRI sockets.
//!
//! Builds a ~50 MB multi-layer image (busybox + layers of mixed random and
//! compressible data) and pushes it to a loopback `docker-registry`. Then it
//! starts `vmpod serve` (release binary) on a temp socket and state dir, and
//! containerd with its CRI plugin on a temp socket, root and state (when
//! containerd is installed and we are root). Each run is one CRI `PullImage`
//! RPC, timed in this process from request to response, with the same tonic
//! client over each daemon's unix socket; both pull, verify and unpack
//! (containerd into its overlayfs snapshotter). Between runs each daemon
//! gets a CRI `RemoveImage` and we check its store is empty again (vmpod:
//! no blob, no layer; containerd: no content, no snapshot), so every run
//! pulls into an empty store. Runs alternate between the two daemons, so
//! background load hits both alike. Prints a table and writes JSON.
//!
//! Usage: bench_images [--runs N] [--out FILE] [--vmpod PATH]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use vmpod_tests::cri_client::{cri, CriClient};
use vmpod_tests::oci_image::{Compression, Entry, ImageBuilder, Layer, Pusher};
use vmpod_tests::registry::Registry;

const DATA_LAYERS: usize = 6;
const RANDOM_PER_LAYER: usize = 8 << 20;
const TEXT_PER_LAYER: usize = 3 << 20;
/// How long a daemon may take to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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
    s.sort_by(|a, b| a.total_cmp(b));
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

/// A child process stopped with SIGTERM (SIGKILL after 20 s) on drop.
struct Proc {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} ignored SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
    let f = std::fs::File::create(&log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("spawn {name}"))?;
    Ok(Proc { child, name, log })
}

/// Connect a CRI client once `sock` answers `Version` with a runtime name.
async fn cri_ready(p: &mut Proc, sock: &Path) -> Result<CriClient> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < START_TIMEOUT {
        if let Some(st) = p.child.try_wait()? {
            bail!("{} exited with {st}; log {}", p.name, p.log.display());
        }
        if sock.exists() {
            match CriClient::connect(sock).await {
                Ok(mut c) => match c.runtime.version(cri::VersionRequest::default()).await {
                    Ok(v) => {
                        let v = v.into_inner();
                        eprintln!("{}: {} {}", p.name, v.runtime_name, v.runtime_version);
                        return Ok(c);
                    }
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{} did not serve CRI on {} ({last}); log {}",
        p.name,
        sock.display(),
        p.log.display()
    )
}

fn start_vmpod(bin: &Path, dir: &Path) -> Result<(Proc, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let sock = dir.join("vmpod.sock");
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, "log_level = \"warn\"\n")?;
    let p = spawn(
        "vmpod serve",
        Command::new(bin)
            .arg("serve")
            .arg("--socket")
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--config")
            .arg(&cfg)
            .env_remove("VMPOD_LOG"),
        dir.join("vmpod.log"),
    )?;
    Ok((p, sock))
}

/// containerd 1.6 with its CRI plugin, everything under `dir`; the loopback
/// registry reached over plain HTTP through a `hosts.toml`.
fn start_containerd(dir: &Path, registry: &str) -> Result<(Proc, PathBuf)> {
    let sock = dir.join("containerd.sock");
    let hosts = dir.join("certs.d").join(registry);
    std::fs::create_dir_all(&hosts)?;
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"http://{registry}\"\n[host.\"http://{registry}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )?;
    for d in ["cni-conf", "cni-bin"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{ttrpc}\"\n\
             [debug]\n  address = \"\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_port = \"0\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{cnibin}\"\n  conf_dir = \"{cniconf}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{certs}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            ttrpc = dir.join("containerd-ttrpc.sock").display(),
            cnibin = dir.join("cni-bin").display(),
            cniconf = dir.join("cni-conf").display(),
            certs = dir.join("certs.d").display(),
        ),
    )?;
    let p = spawn(
        "containerd",
        Command::new("containerd").arg("--config").arg(&cfg),
        dir.join("containerd.log"),
    )?;
    Ok((p, sock))
}

/// `ctr` against the bench containerd, in the CRI namespace.
fn ctr(sock: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("ctr")
        .arg("-a")
        .arg(sock)
        .arg("-n")
        .arg("k8s.io")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ctr")?;
    if !out.status.success() {
        bail!("ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wait until `check` says the store is empty (GC may lag a little).
fn wait_empty(what: &str, check: impl Fn() -> Result<String>) -> Result<()> {
    let start = Instant::now();
    loop {
        let left = check()?;
        if left.trim().is_empty() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{what} kept data after RemoveImage: {left}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn entries(dir: &Path) -> Result<String> {
    let mut names = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                names.push(e?.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(names.join(" "))
}

/// One timed `PullImage` over `c`; then `RemoveImage` (not timed).
async fn timed_pull(c: &mut CriClient, reference: &str, want_id: &str) -> Result<f64> {
    let t = Instant::now();
    let id = c.pull(reference, None).await.context("PullImage")?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(id == want_id, "PullImage returned {id}, want {want_id}");
    c.remove(reference).await.context("RemoveImage")?;
    anyhow::ensure!(c.list(None).await?.is_empty(), "image still listed");
    Ok(ms)
}

fn main() -> Result<()> {
    let mut runs = 5usize;
    let mut out = PathBuf::from("bench/results/images.json");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let mut vmpod_bin = target.join("release/vmpod");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--out" => out = args.next().context("--out FILE")?.into(),
            "--vmpod" => vmpod_bin = args.next().context("--vmpod PATH")?.into(),
            o => bail!("unknown argument {o}"),
        }
    }
    anyhow::ensure!(runs > 0, "--runs must be at least 1");
    if let Some(why) = vmpod_tests::registry::skip_reason() {
        bail!("cannot run: {why}");
    }
    anyhow::ensure!(
        vmpod_bin.is_file(),
        "{} not found: cargo build --release -p vmpod (or pass --vmpod)",
        vmpod_bin.display()
    );
    let vmpod_bin = vmpod_bin.canonicalize()?;
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

    // vmpod: the real daemon on its own socket and state dir.
    let vdir = base.path().join("vmpod");
    let (mut vproc, vsock) = start_vmpod(&vmpod_bin, &vdir)?;
    let mut vclient = rt.block_on(cri_ready(&mut vproc, &vsock))?;
    let vstore = vdir.join("state/images");

    // containerd with its CRI plugin, same registry, same image, same disk.
    let mut containerd_note = String::new();
    let have_containerd = Command::new("containerd").arg("--version").output().is_ok()
        && Command::new("ctr").arg("--version").output().is_ok();
    let mut cd: Option<(Proc, PathBuf, CriClient)> = None;
    if !have_containerd {
        containerd_note = "containerd/ctr not installed".into();
    } else if !nix::unistd::geteuid().is_root() {
        containerd_note = "containerd needs root here".into();
    } else {
        let cdir = base.path().join("containerd");
        std::fs::create_dir_all(&cdir)?;
        let started = start_containerd(&cdir, &reg.addr()).and_then(|(mut p, sock)| {
            let c = rt.block_on(cri_ready(&mut p, &sock))?;
            Ok((p, sock, c))
        });
        match started {
            Ok(x) => cd = Some(x),
            Err(e) => containerd_note = format!("containerd (CRI) failed to start: {e:#}"),
        }
    }

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..runs {
        let ms = rt.block_on(timed_pull(&mut vclient, &reference, &img.config_digest))?;
        eprintln!("vmpod run {}: {ms:.0} ms", i + 1);
        ours.push(ms);
        for sub in ["blobs/sha256", "layers"] {
            wait_empty("vmpod", || entries(&vstore.join(sub)))?;
        }

        if let Some((_, sock, c)) = cd.as_mut() {
            let ms = rt.block_on(timed_pull(c, &reference, &img.config_digest))?;
            eprintln!("containerd run {}: {ms:.0} ms", i + 1);
            theirs.push(ms);
            wait_empty("containerd content", || ctr(sock, &["content", "ls", "-q"]))?;
            wait_empty("containerd snapshots", || {
                Ok(ctr(sock, &["snapshots", "ls"])?
                    .lines()
                    .skip(1) // header
                    .collect::<Vec<_>>()
                    .join("\n"))
            })?;
        }
    }
    drop(vclient);
    drop(vproc);
    drop(cd);

    let machine = json!({
        "uname": sh("uname -a"),
        "nproc": sh("nproc"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-"),
        "containerd": sh("containerd --version"),
        "vmpod": sh(&format!("{} --version", vmpod_bin.display())),
        "loadavg": sh("cat /proc/loadavg"),
        "disk": sh(&format!("df -T {} | tail -1", base.path().display())),
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
        "what": "CRI PullImage of one image into an empty store, from a loopback docker-registry",
        "timed": "wall time of one PullImage RPC (request sent to response received) by the same \
                  tonic CRI client over each daemon's unix socket: resolve, download, digest \
                  checks, unpack (vmpod: per-layer directories + syncfs; containerd: overlayfs \
                  snapshotter) and metadata commit. Daemons already running; RemoveImage and \
                  the emptiness checks between runs are not timed. Runs alternate between \
                  the daemons.",
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
        "CRI PullImage (pull + unpack), {:.1} MB image, {} layers, {runs} runs each",
        compressed as f64 / 1e6,
        img.layers.len()
    );
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>10}",
        "runtime", "median ms", "min ms", "max ms", "spread ms"
    );
    let row = |name: &str, s: &serde_json::Value| {
        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<12} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            name,
            f("median_ms"),
            f("min_ms"),
            f("max_ms"),
            f("spread_ms")
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
