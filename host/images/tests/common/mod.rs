//! Shared bits of the image-store integration tests.
#![allow(dead_code)]

use std::path::Path;

use vmpod_images::{ImageStore, RegistryConfig};
use vmpod_tests::oci_image::{Compression, Entry, Image, ImageBuilder, Layer, Pusher};
use vmpod_tests::registry::{self, Registry};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "vmpod_images=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Start an anonymous registry, or `None` (with the reason printed) when the
/// host cannot run one.
pub fn registry() -> Option<Registry> {
    init_tracing();
    if let Some(why) = registry::skip_reason() {
        eprintln!("SKIP: {why}");
        return None;
    }
    Some(Registry::start().expect("start docker-registry"))
}

pub fn open(dir: &Path) -> ImageStore {
    ImageStore::open(&dir.join("images"), RegistryConfig::default()).expect("open store")
}

pub fn open_with(dir: &Path, cfg: RegistryConfig) -> ImageStore {
    ImageStore::open(&dir.join("images"), cfg).expect("open store")
}

/// busybox layer + one small layer with `name` in it.
pub fn image_with(name: &str, c: Compression) -> Image {
    ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).expect("busybox layer"))
        .layer(Layer::new(
            &[
                Entry::Dir("data".into()),
                Entry::File(format!("data/{name}"), name.as_bytes().to_vec(), 0o644),
            ],
            c,
        ))
        .cmd(&["sh"])
        .build()
}

pub async fn push(reg: &Registry, repo: &str, tag: &str, img: &Image) -> String {
    Pusher::new(&reg.addr(), reg.basic_auth())
        .push_image(repo, Some(tag), img)
        .await
        .expect("push image")
}

/// Files under `dir` (relative paths), recursively.
pub fn count_files(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += count_files(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

pub fn dir_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}
