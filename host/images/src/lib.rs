//! vmpod-images: registry client, content-addressed store, layer unpack and
//! image metadata. No gRPC types here; `vmpod-cri` converts.
//!
//! Layout under the store root (see `docs/images.md`):
//!
//! ```text
//! <root>/blobs/sha256/<hex>   verified blobs (manifests, configs, compressed layers)
//! <root>/layers/<diff hex>/   one unpacked directory per layer (overlayfs lowerdir form)
//! <root>/meta.redb            image metadata (redb)
//! <root>/tmp/, trash/         in-flight downloads / garbage being deleted
//! ```
//!
//! Modules: [`reference`] (normalisation), `registry` (oci-client wrapper,
//! mirrors and fallback between endpoints, auth; `registry/errors`),
//! `oauth` (identity-token exchange), `tls` (extra CA certificates per
//! endpoint), `content` (blob store and the blocking-pool blob writer),
//! [`unpack`] (tar -> layer dir), `meta` (redb), `pull` (one pull), `dedup`
//! (shared in-flight pulls), `store` (shared state), `gc` (garbage
//! collection), `usage` (cached disk usage).

mod content;
mod dedup;
mod error;
mod gc;
mod meta;
mod oauth;
mod pull;
pub mod reference;
mod registry;
mod store;
mod tls;
mod types;
pub mod unpack;
mod usage;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::info;

pub use error::{ImageError, Result};
pub use reference::ImageRef;
pub use tls::CaCerts;
pub use types::{Auth, FsUsage, ImageFilter, ImageRecord, Mirror, PullStats, RegistryConfig};

use error::StoreContext;
use store::Inner;

/// The image service: owns `<root>` (content store, unpacked layers, metadata).
/// Cheap to clone-share behind an `Arc`; all methods take `&self`.
/// `list`, `status`, `remove` and `fs_usage` do blocking file I/O (they are
/// quick, but `remove` deletes layer trees and `fs_usage` walks the store);
/// call them from `spawn_blocking` on a busy runtime.
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl ImageStore {
    /// Open (or create) the store under `root`. Leftovers of an interrupted
    /// pull (temp files, unreferenced blobs and layers) are removed.
    pub fn open(root: &Path, registries: RegistryConfig) -> Result<Self> {
        let inner = Inner::open(root, registries)?;
        // Measure everything once now, so ImageFsInfo is cheap from the start.
        if let Err(e) = inner.usage.measure(&inner.root) {
            tracing::warn!(error = %e, "measuring the image store");
        }
        Ok(ImageStore { inner })
    }

    /// Pull `reference` (tag, digest or short name); returns the stored image.
    /// Concurrent pulls of the same reference with the same credentials
    /// share one pull (the pull runs in its own task, so it completes even
    /// if the caller goes away). With other credentials a pull runs on its
    /// own, so one caller's wrong or missing credentials never decide
    /// another's result; blobs are still downloaded once (per-digest locks).
    /// Must be called within a tokio runtime.
    pub async fn pull(&self, reference: &str, auth: Option<Auth>) -> Result<ImageRecord> {
        let r = ImageRef::parse(reference)?;
        let key = (r.to_string(), auth.clone());
        let inner = self.inner.clone();
        let (fut, joined) = self
            .inner
            .pulls
            .run(key, move || pull::pull(inner, r, auth));
        if joined {
            self.inner.stat_joined.fetch_add(1, Ordering::Relaxed);
            info!(image = %reference, "joining pull already in progress");
        }
        fut.await
    }

    /// All images, or those matching `filter.image` (resolved as `status` does).
    pub fn list(&self, filter: &ImageFilter) -> Result<Vec<ImageRecord>> {
        if let Some(f) = filter.image.as_deref().filter(|s| !s.is_empty()) {
            return Ok(self.status(f)?.into_iter().collect());
        }
        let mut metas = self.inner.meta.all()?;
        metas.sort_by(|a, b| a.pulled_at_ns.cmp(&b.pulled_at_ns).then(a.id.cmp(&b.id)));
        metas.iter().map(|m| self.inner.record(m)).collect()
    }

    /// Resolve by ID (`sha256:<hex>` or `<hex>`), tag, digest reference,
    /// short name (`busybox` = `docker.io/library/busybox:latest`) or unique
    /// ID prefix; `Ok(None)` if absent.
    pub fn status(&self, reference: &str) -> Result<Option<ImageRecord>> {
        match self.inner.resolve(reference)? {
            Some(m) => Ok(Some(self.inner.record(&m)?)),
            None => Ok(None),
        }
    }

    /// Remove by ID, tag or digest. As containerd's CRI does, the whole image
    /// goes (all its tags and digests), whichever name was given. Removing an
    /// absent image is `Ok(())` (CRI semantics). Blobs and layers no other
    /// image uses are deleted; shared ones are kept.
    pub fn remove(&self, reference: &str) -> Result<()> {
        let Some(m) = self.inner.resolve(reference)? else {
            return Ok(());
        };
        self.inner.meta.remove(&m.id)?;
        info!(id = %m.id, tags = ?m.repo_tags, "image removed");
        self.inner.gc()
    }

    /// Bytes (allocated blocks) and inodes used under the store root, as
    /// a full walk counts them; finished blobs and layers are measured once
    /// and cached (see `usage.rs`), so a call costs two directory reads.
    pub fn fs_usage(&self) -> Result<FsUsage> {
        self.inner
            .usage
            .measure(&self.inner.root)
            .ctx(|| format!("measure {}", self.inner.root.display()))
    }

    /// Counters since open: pulls, joined pulls, blobs and bytes downloaded.
    pub fn stats(&self) -> PullStats {
        self.inner.stats()
    }

    /// Mountpoint reported in `ImageFsInfo`.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }
}
