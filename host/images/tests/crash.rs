//! A pull killed with SIGKILL part-way leaves no half image: after reopening,
//! the store lists either nothing or the complete image, temp files are gone,
//! and the same pull then succeeds.
//!
//! The test re-runs its own binary (the ignored `crash_child` test) as the
//! pulling child process, so the crash is a real process death.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vmpod_images::ImageFilter;
use vmpod_tests::oci_image::{noise, Compression, Entry, ImageBuilder, Layer};

const CHILD_ENV: &str = "VMPOD_CRASH_CHILD";

/// The child side: pull `$VMPOD_CRASH_REF` into `$VMPOD_CRASH_DIR`.
/// Ignored: only the test below runs it (`--ignored --exact crash_child`).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "child process of killed_pull_leaves_no_half_image"]
async fn crash_child() {
    assert!(
        std::env::var_os(CHILD_ENV).is_some(),
        "run by killed_pull_leaves_no_half_image"
    );
    let dir = PathBuf::from(std::env::var("VMPOD_CRASH_DIR").unwrap());
    let r = std::env::var("VMPOD_CRASH_REF").unwrap();
    let store = open(&dir);
    store.pull(&r, None).await.unwrap();
}

fn big_layer(i: u64) -> Layer {
    let data = noise(8 << 20, i);
    Layer::new(
        &[Entry::File(format!("big{i}"), data, 0o644)],
        Compression::None,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_pull_leaves_no_half_image() {
    let Some(reg) = registry() else { return };
    let mut b = ImageBuilder::new().layer(Layer::busybox(Compression::Gzip).unwrap());
    for i in 0..3 {
        b = b.layer(big_layer(i));
    }
    let img = b.build();
    push(&reg, "test/crash", "v1", &img).await;
    let r = format!("{}/test/crash:v1", reg.addr());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env("VMPOD_CRASH_DIR", dir.path())
        .env("VMPOD_CRASH_REF", &r)
        .spawn()
        .unwrap();
    // Kill it once a download is under way (a temp blob exists).
    let start = Instant::now();
    let mut killed_mid_download = false;
    while start.elapsed() < Duration::from_secs(60) {
        if let Some(st) = child.try_wait().unwrap() {
            eprintln!("child finished before the kill ({st}); checking the complete image instead");
            break;
        }
        let busy = std::fs::read_dir(root.join("tmp"))
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false))
            })
            .unwrap_or(false);
        if busy {
            child.kill().unwrap();
            killed_mid_download = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.wait();
    eprintln!("killed mid-download: {killed_mid_download}");

    let store = open(dir.path());
    let listed = store.list(&ImageFilter::default()).unwrap();
    if killed_mid_download {
        assert!(listed.is_empty(), "half image listed: {listed:?}");
    }
    for rec in &listed {
        // Listed means complete.
        assert_eq!(rec.id, img.config_digest);
        assert!(rec.layer_dirs.iter().all(|d| d.is_dir()));
    }
    assert_eq!(
        dir_entries(&root.join("tmp")),
        0,
        "temp files removed at open"
    );
    assert!(
        std::fs::read_dir(root.join("layers"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with('.')),
        "partial unpacks removed at open"
    );
    let rec = store.pull(&r, None).await.unwrap();
    assert_eq!(rec.id, img.config_digest);
    assert_eq!(rec.layer_dirs.len(), 4);
    for (i, d) in rec.layer_dirs[1..].iter().enumerate() {
        assert_eq!(
            std::fs::metadata(d.join(format!("big{i}"))).unwrap().len(),
            8 << 20
        );
    }
}
