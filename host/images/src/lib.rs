//! vmpod-images: registry client, content-addressed store, layer unpack and
//! image metadata. No gRPC types here; `vmpod-cri` converts.
//!
//! The API below is the contract the CRI layer codes against. Bodies are
//! being built; until then every call returns [`ImageError::Unimplemented`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Credentials from the CRI `AuthConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub username: String,
    pub password: String,
    /// base64("user:pass"), as kubelet sometimes sends it.
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

/// Registry settings (from the daemon config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Registry hosts (host[:port]) that may be reached over plain HTTP.
    /// `localhost` and `127.0.0.1` always may.
    pub insecure: Vec<String>,
    /// Per registry host: mirrors to try first, in order (e.g.
    /// `registry.k8s.io` -> [`http://127.0.0.1:5000`]).
    pub mirrors: BTreeMap<String, Vec<Mirror>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port]`, optionally with an `http://` / `https://` scheme.
    pub endpoint: String,
    /// When set on any mirror of a host, the original host is never contacted.
    pub mirror_only: bool,
}

/// One stored image, as the CRI layer needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// `sha256:<config digest>` (the image ID, as containerd reports it).
    pub id: String,
    /// Normalised, e.g. `docker.io/library/busybox:latest`.
    pub repo_tags: Vec<String>,
    /// e.g. `docker.io/library/busybox@sha256:...` (manifest digest).
    pub repo_digests: Vec<String>,
    /// Sum of compressed layer sizes + config + manifest (what containerd reports).
    pub size: u64,
    /// From the image config `User`: numeric uid if numeric, else username.
    pub uid: Option<i64>,
    pub username: String,
    /// Raw OCI image config JSON (for `verbose` and for building container specs).
    pub config_json: String,
    /// Layer diff IDs in order (bottom first).
    pub layers: Vec<String>,
    /// Unpacked layer directories (bottom first), usable as overlayfs lowerdirs.
    pub layer_dirs: Vec<PathBuf>,
}

/// Bytes and inodes used by the image store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsUsage {
    pub timestamp_ns: i64,
    pub used_bytes: u64,
    pub inodes_used: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Unparseable reference.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// Registry says the image or tag does not exist, or it is not stored.
    #[error("image {0:?} not found")]
    NotFound(String),
    /// Registry refused our credentials.
    #[error("unauthorized pulling {reference:?}: {reason}")]
    Unauthorized { reference: String, reason: String },
    /// A blob's content does not match its digest.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// The image is in use and cannot be removed (later: by containers).
    #[error("image {0} is in use")]
    InUse(String),
    #[error("registry error for {reference:?}: {reason}")]
    Registry { reference: String, reason: String },
    #[error("image store error during {op}: {reason}")]
    Store { op: String, reason: String },
    #[error("not implemented yet: {0}")]
    Unimplemented(&'static str),
}

pub type Result<T> = std::result::Result<T, ImageError>;

/// Filter for `list`.
#[derive(Debug, Clone, Default)]
pub struct ImageFilter {
    /// Match by ID, tag, digest or short name (as `status` resolves it).
    pub image: Option<String>,
}

/// The image service: owns `<root>` (content store, unpacked layers, metadata).
/// Cheap to clone-share behind an `Arc`; all methods take `&self`.
pub struct ImageStore {
    #[allow(dead_code)]
    root: PathBuf,
    #[allow(dead_code)]
    registries: RegistryConfig,
}

impl ImageStore {
    /// Open (or create) the store under `root`.
    pub fn open(root: &Path, registries: RegistryConfig) -> Result<Self> {
        Ok(ImageStore {
            root: root.to_path_buf(),
            registries,
        })
    }

    /// Pull `reference` (tag, digest or short name); returns the image ID.
    /// Concurrent pulls of the same reference share one download.
    pub async fn pull(&self, _reference: &str, _auth: Option<Auth>) -> Result<ImageRecord> {
        Err(ImageError::Unimplemented("pull"))
    }

    pub fn list(&self, _filter: &ImageFilter) -> Result<Vec<ImageRecord>> {
        Err(ImageError::Unimplemented("list"))
    }

    /// Resolve by ID, tag, digest or short name; `Ok(None)` if absent.
    pub fn status(&self, _reference: &str) -> Result<Option<ImageRecord>> {
        Err(ImageError::Unimplemented("status"))
    }

    /// Remove by ID, tag or digest. Removing an absent image is `Ok(())`
    /// (CRI semantics). Layers shared with other images are kept.
    pub fn remove(&self, _reference: &str) -> Result<()> {
        Err(ImageError::Unimplemented("remove"))
    }

    pub fn fs_usage(&self) -> Result<FsUsage> {
        Err(ImageError::Unimplemented("fs_usage"))
    }

    /// Mountpoint reported in `ImageFsInfo`.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
