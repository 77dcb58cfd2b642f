//! Build OCI images in Rust and push them to a registry over the HTTP API.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use vmpod_tests::oci_image::{Compression, ImageBuilder, Layer, Pusher};
//! use vmpod_tests::registry::Registry;
//! let reg = Registry::start()?;
//! let img = ImageBuilder::new().layer(Layer::busybox(Compression::Gzip)?).cmd(&["sh"]).build();
//! let digest = Pusher::new(&reg.addr(), None).push_image("test/busybox", Some("v1"), &img).await?;
//! // pull "127.0.0.1:PORT/test/busybox:v1" or "...@<digest>"
//! # Ok(()) }
//! ```

use std::io::Write;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// One tar entry of a layer.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir(String),
    File(String, Vec<u8>, u32),
    Symlink(String, String),
    /// Hard link `path` -> existing `target`.
    Link(String, String),
    /// OCI whiteout: deletes `path` of lower layers (`dir/.wh.name`).
    Whiteout(String),
    /// Opaque directory marker: hides lower contents of `dir`.
    Opaque(String),
}

/// `len` deterministic, incompressible bytes (xorshift64 from `seed`): big
/// layers for crash and progress tests without shipping data files.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1d ^ seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
    pub media_type: String,
}

impl Layer {
    pub fn new(entries: &[Entry], c: Compression) -> Layer {
        let tar = tar_of(entries);
        Self::from_tar(tar, c)
    }

    pub fn from_tar(tar: Vec<u8>, c: Compression) -> Layer {
        let diff_id = sha256(&tar);
        let blob = match c {
            Compression::None => tar,
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&tar).expect("gzip to memory");
                e.finish().expect("gzip to memory")
            }
            Compression::Zstd => zstd::encode_all(&tar[..], 3).expect("zstd to memory"),
        };
        Layer {
            digest: sha256(&blob),
            diff_id,
            blob,
            media_type: c.media_type().to_string(),
        }
    }

    /// `/bin/busybox` (busybox-static) with `sh`, `echo`, `cat`, `ls`, `true`,
    /// `sleep`, `id` links, plus `/etc/passwd` and `/etc/group`.
    pub fn busybox(c: Compression) -> Result<Layer> {
        let bb = std::fs::read("/bin/busybox")
            .context("read /bin/busybox (Debian package busybox-static)")?;
        let mut e = vec![
            Entry::Dir("bin".into()),
            Entry::File("bin/busybox".into(), bb, 0o755),
            Entry::Dir("etc".into()),
            Entry::File(
                "etc/passwd".into(),
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
                    .to_vec(),
                0o644,
            ),
            Entry::File(
                "etc/group".into(),
                b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
                0o644,
            ),
            Entry::Dir("tmp".into()),
        ];
        for app in ["sh", "echo", "cat", "ls", "true", "sleep", "id", "env"] {
            e.push(Entry::Symlink(format!("bin/{app}"), "busybox".into()));
        }
        Ok(Layer::new(&e, c))
    }
}

/// Deterministic tar of `entries` (uid/gid 0, mtime 1).
pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(size);
        h
    };
    for e in entries {
        match e {
            Entry::Dir(p) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(
                    &mut h,
                    format!("{}/", p.trim_end_matches('/')),
                    std::io::empty(),
                )
                .expect("tar to memory");
            }
            Entry::File(p, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, p, &data[..]).expect("tar to memory");
            }
            Entry::Symlink(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, target).expect("tar to memory");
            }
            Entry::Link(p, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, p, target).expect("tar to memory");
            }
            Entry::Whiteout(p) => {
                let (dir, name) = match p.rsplit_once('/') {
                    Some((d, n)) => (format!("{d}/"), n),
                    None => (String::new(), p.as_str()),
                };
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, format!("{dir}.wh.{name}"), std::io::empty())
                    .expect("tar to memory");
            }
            Entry::Opaque(dir) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                let d = dir.trim_end_matches('/');
                b.append_data(&mut h, format!("{d}/.wh..wh..opq"), std::io::empty())
                    .expect("tar to memory");
            }
        }
    }
    b.into_inner().expect("tar to memory")
}

/// A single-platform image, ready to push.
#[derive(Debug, Clone)]
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    /// The image ID as runtimes report it.
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    /// `mediaType` of the manifest (OCI or Docker schema 2).
    pub manifest_type: String,
    pub arch: String,
}

impl Image {
    /// Compressed layers + config + manifest (the size containerd and vmpod report).
    pub fn size(&self) -> u64 {
        (self.manifest.len()
            + self.config.len()
            + self.layers.iter().map(|l| l.blob.len()).sum::<usize>()) as u64
    }
}

#[derive(Debug, Clone)]
pub struct ImageBuilder {
    layers: Vec<Layer>,
    user: String,
    cmd: Vec<String>,
    env: Vec<String>,
    arch: String,
    label: String,
    docker: bool,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    pub fn new() -> Self {
        ImageBuilder {
            layers: Vec::new(),
            user: String::new(),
            cmd: Vec::new(),
            env: vec!["PATH=/bin".into()],
            arch: "amd64".into(),
            label: String::new(),
            docker: false,
        }
    }
    /// Docker schema 2 media types (manifest, config, gzip layers) instead of
    /// OCI ones, as most images on Docker Hub and registry.k8s.io use.
    pub fn docker_media_types(mut self) -> Self {
        self.docker = true;
        self
    }
    pub fn layer(mut self, l: Layer) -> Self {
        self.layers.push(l);
        self
    }
    pub fn user(mut self, u: &str) -> Self {
        self.user = u.into();
        self
    }
    pub fn cmd(mut self, c: &[&str]) -> Self {
        self.cmd = c.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn env(mut self, e: &str) -> Self {
        self.env.push(e.into());
        self
    }
    pub fn arch(mut self, a: &str) -> Self {
        self.arch = a.into();
        self
    }
    /// A label that changes the config (and so the image ID) only.
    pub fn label(mut self, l: &str) -> Self {
        self.label = l.into();
        self
    }

    pub fn build(self) -> Image {
        let mut cfg = json!({
            "architecture": self.arch,
            "os": "linux",
            "config": {"Env": self.env, "Cmd": self.cmd, "User": self.user},
            "rootfs": {"type": "layers", "diff_ids": self.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
            "history": [],
        });
        if !self.label.is_empty() {
            cfg["config"]["Labels"] = json!({"vmpod.test": self.label});
        }
        let config = serde_json::to_vec(&cfg).expect("json");
        let config_digest = sha256(&config);
        let (manifest_type, config_type) = if self.docker {
            (DOCKER_MANIFEST, DOCKER_CONFIG)
        } else {
            (OCI_MANIFEST, OCI_CONFIG)
        };
        let layer_type = |l: &Layer| {
            if self.docker && l.media_type == Compression::Gzip.media_type() {
                DOCKER_LAYER_GZIP.to_string()
            } else {
                l.media_type.clone()
            }
        };
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": config.len()},
            "layers": self.layers.iter().map(|l| json!({
                "mediaType": layer_type(l), "digest": l.digest, "size": l.blob.len()
            })).collect::<Vec<_>>(),
        }))
        .expect("json");
        Image {
            manifest_digest: sha256(&manifest),
            manifest_type: manifest_type.to_string(),
            manifest,
            config,
            config_digest,
            layers: self.layers,
            arch: self.arch,
        }
    }
}

/// A multi-platform OCI index over `images` (each with its `arch`).
#[derive(Debug, Clone)]
pub struct Index {
    pub bytes: Vec<u8>,
    pub digest: String,
    pub images: Vec<Image>,
    pub media_type: String,
}

/// (A Docker manifest list when the images use Docker media types.)
pub fn index(images: Vec<Image>) -> Index {
    let docker = images.iter().all(|i| i.manifest_type == DOCKER_MANIFEST);
    let bytes = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": if docker { DOCKER_LIST } else { OCI_INDEX },
        "manifests": images.iter().map(|i| json!({
            "mediaType": i.manifest_type,
            "digest": i.manifest_digest,
            "size": i.manifest.len(),
            "platform": {"os": "linux", "architecture": i.arch},
        })).collect::<Vec<_>>(),
    }))
    .expect("json");
    Index {
        media_type: if docker { DOCKER_LIST } else { OCI_INDEX }.to_string(),
        digest: sha256(&bytes),
        bytes,
        images,
    }
}

/// Pushes over the registry HTTP API (monolithic blob uploads).
pub struct Pusher {
    client: reqwest::Client,
    base: String,
    auth: Option<(String, String)>,
}

impl Pusher {
    /// `addr` is `host:port` (plain HTTP); `auth` is basic credentials.
    pub fn new(addr: &str, auth: Option<(&str, &str)>) -> Pusher {
        Pusher {
            client: reqwest::Client::new(),
            base: format!("http://{addr}"),
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        }
    }

    fn req(&self, m: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(m, url);
        match &self.auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    pub async fn push_blob(&self, repo: &str, digest: &str, data: &[u8]) -> Result<()> {
        let head = self
            .req(
                reqwest::Method::HEAD,
                &format!("{}/v2/{repo}/blobs/{digest}", self.base),
            )
            .send()
            .await?;
        if head.status().is_success() {
            return Ok(());
        }
        let start = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await?;
        if start.status().as_u16() != 202 {
            bail!(
                "start upload of {digest} to {repo}: HTTP {}",
                start.status()
            );
        }
        let loc = start
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .context("upload without Location")?
            .to_string();
        let mut url = if loc.starts_with('/') {
            format!("{}{loc}", self.base)
        } else {
            loc
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let put = self
            .req(reqwest::Method::PUT, &url)
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await?;
        if put.status().as_u16() != 201 {
            let st = put.status();
            bail!(
                "upload {digest} to {repo}: HTTP {st}: {}",
                put.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let r = self
            .req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            let st = r.status();
            bail!(
                "push manifest {repo}:{reference}: HTTP {st}: {}",
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Push blobs and manifest; tag it if `tag` is given. Returns the manifest digest.
    pub async fn push_image(&self, repo: &str, tag: Option<&str>, img: &Image) -> Result<String> {
        for l in &img.layers {
            self.push_blob(repo, &l.digest, &l.blob).await?;
        }
        self.push_blob(repo, &img.config_digest, &img.config)
            .await?;
        let reference = tag.unwrap_or(&img.manifest_digest);
        self.push_manifest(repo, reference, &img.manifest_type, &img.manifest)
            .await?;
        Ok(img.manifest_digest.clone())
    }

    /// Push every platform image by digest, then the index under `tag`.
    pub async fn push_index(&self, repo: &str, tag: &str, idx: &Index) -> Result<String> {
        for img in &idx.images {
            self.push_image(repo, None, img).await?;
        }
        self.push_manifest(repo, tag, &idx.media_type, &idx.bytes)
            .await?;
        Ok(idx.digest.clone())
    }
}
