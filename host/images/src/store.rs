//! Shared state behind [`crate::ImageStore`]: content store, unpacked
//! layers, metadata, the "in use by a running pull" protection set, per-key
//! async locks, and garbage collection.
//!
//! Locking: every `std::sync::Mutex` here guards a small map and is never
//! held across network I/O or an `.await`. Garbage collection (`gc.rs`)
//! takes the protection lock only around each single rename into
//! `trash/`. Per-blob / per-layer work is serialised with a per-key
//! `tokio::sync::Mutex`, so two pulls that share a layer download and
//! unpack it once.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::content::ContentStore;
use crate::dedup::Dedup;
use crate::error::{ImageError, Result, StoreContext};
use crate::meta::{ImageMeta, MetaStore};
use crate::reference::{as_id_prefix, ImageRef};
use crate::types::{Auth, ImageRecord, PullStats, RegistryConfig};
use crate::usage::UsageCache;

pub(crate) struct Inner {
    pub root: PathBuf,
    pub registries: RegistryConfig,
    pub content: ContentStore,
    pub layers: PathBuf,
    pub meta: MetaStore,
    /// (Normalised reference, credentials) -> the pull in progress for it.
    pub pulls: Dedup<(String, Option<Auth>), ImageRecord>,
    /// Blob digests / diff IDs a running pull relies on; GC keeps them.
    pub(crate) protect: Mutex<Protected>,
    key_locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    /// Cached per-blob / per-layer disk usage for `fs_usage`.
    pub usage: UsageCache,
    pub stat_pulls: AtomicU64,
    pub stat_joined: AtomicU64,
    pub stat_blobs: AtomicU64,
    pub stat_bytes: AtomicU64,
}

/// What running pulls hold on to.
#[derive(Default)]
pub(crate) struct Protected {
    /// Key -> number of pulls relying on it.
    pub refs: HashMap<String, usize>,
    /// Bumped each time a pull lets go of its keys (which it does only
    /// after committing its image).
    pub epoch: u64,
    /// While a GC round is planned or applied (`gc_rounds > 0`): each key
    /// that stopped being protected, with the `epoch` it happened at. GC
    /// skips a key released after its plan's metadata read (that read may
    /// miss the image that now references it); other pulls ending do not
    /// disturb it.
    pub released: HashMap<String, u64>,
    /// GC rounds in progress; `released` is cleared when none is.
    pub gc_rounds: usize,
}

/// Drops its protections when the pull ends.
pub(crate) struct Protection {
    inner: Arc<Inner>,
    keys: Vec<String>,
}

impl Protection {
    pub fn add(&mut self, key: &str) {
        let mut p = self.inner.protect.lock().unwrap_or_else(|e| e.into_inner());
        *p.refs.entry(key.to_string()).or_default() += 1;
        self.keys.push(key.to_string());
    }
}

impl Drop for Protection {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut guard = self.inner.protect.lock().unwrap_or_else(|e| e.into_inner());
        let p = &mut *guard;
        p.epoch += 1;
        for k in self.keys.drain(..) {
            if let Some(n) = p.refs.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    p.refs.remove(&k);
                    if p.gc_rounds > 0 {
                        p.released.insert(k, p.epoch);
                    }
                }
            }
        }
    }
}

/// Create `dir` (its parent must exist) or take an existing one, and make
/// it mode 0700 owned by us. The store holds unpacked image trees whose
/// setuid binaries and secrets no other local user may reach: like
/// containerd's snapshotter dir, only root gets in.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ImageError::store(format!("create {}", dir.display()), e)),
    }
    let m = fs::symlink_metadata(dir).ctx(|| format!("stat {}", dir.display()))?;
    if !m.is_dir() {
        return Err(ImageError::store(
            format!("open {}", dir.display()),
            "exists and is not a directory",
        ));
    }
    // Also for a directory an older version created 0755 (and against
    // the umask on creation).
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .ctx(|| format!("chmod 0700 {}", dir.display()))
}

impl Inner {
    pub fn open(root: &Path, registries: RegistryConfig) -> Result<Arc<Inner>> {
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
        }
        private_dir(root)?;
        let content = ContentStore::open(root)?;
        let layers = root.join("layers");
        private_dir(&layers)?;
        // Leftovers of an interrupted unpack or GC.
        for e in fs::read_dir(&layers).ctx(|| format!("list {}", layers.display()))? {
            let e = e.ctx(|| "list layers".into())?;
            if e.file_name().to_string_lossy().starts_with('.') {
                fs::remove_dir_all(e.path()).ctx(|| format!("clean {}", e.path().display()))?;
            }
        }
        let trash = root.join("trash");
        if trash.exists() {
            fs::remove_dir_all(&trash).ctx(|| format!("clean {}", trash.display()))?;
        }
        let meta = MetaStore::open(root)?;
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            registries,
            content,
            layers,
            meta,
            pulls: Dedup::new(),
            protect: Mutex::new(Protected::default()),
            key_locks: Mutex::new(HashMap::new()),
            usage: UsageCache::default(),
            stat_pulls: AtomicU64::new(0),
            stat_joined: AtomicU64::new(0),
            stat_blobs: AtomicU64::new(0),
            stat_bytes: AtomicU64::new(0),
        });
        // Blobs or layers of pulls that never committed (crash): drop them.
        inner.gc()?;
        Ok(inner)
    }

    pub fn protection(self: &Arc<Self>) -> Protection {
        Protection {
            inner: self.clone(),
            keys: Vec::new(),
        }
    }

    /// An async lock for one blob digest or layer.
    pub fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.key_locks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = m.get(key).and_then(Weak::upgrade) {
            return l;
        }
        m.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(tokio::sync::Mutex::new(()));
        m.insert(key.to_string(), Arc::downgrade(&l));
        l
    }

    /// Directory of the unpacked layer with this diff ID.
    pub fn layer_dir(&self, diff_id: &str) -> PathBuf {
        self.layers
            .join(diff_id.strip_prefix("sha256:").unwrap_or(diff_id))
    }

    pub fn stats(&self) -> PullStats {
        PullStats {
            pulls: self.stat_pulls.load(Ordering::Relaxed),
            joined: self.stat_joined.load(Ordering::Relaxed),
            blobs_downloaded: self.stat_blobs.load(Ordering::Relaxed),
            bytes_downloaded: self.stat_bytes.load(Ordering::Relaxed),
        }
    }

    pub fn record(&self, m: &ImageMeta) -> Result<ImageRecord> {
        let config = self.content.read(&m.id)?;
        Ok(ImageRecord {
            id: m.id.clone(),
            repo_tags: m.repo_tags.clone(),
            repo_digests: m.repo_digests.clone(),
            size: m.size,
            uid: m.uid,
            username: m.username.clone(),
            config_json: String::from_utf8_lossy(&config).into_owned(),
            layers: m.diff_ids.clone(),
            layer_dirs: m.diff_ids.iter().map(|d| self.layer_dir(d)).collect(),
        })
    }

    /// Find an image by ID, `sha256:`ID, tag, digest reference, short name
    /// or unique ID prefix.
    pub fn resolve(&self, s: &str) -> Result<Option<ImageMeta>> {
        let all = self.meta.all()?;
        let hex_id = |h: &str| h.len() == 64 && as_id_prefix(h).is_some();
        let full_id = if let Some(h) = s.strip_prefix("sha256:") {
            hex_id(h).then(|| s.to_string())
        } else {
            hex_id(s).then(|| format!("sha256:{s}"))
        };
        if let Some(id) = full_id {
            if let Some(m) = all.iter().find(|m| m.id == id) {
                return Ok(Some(m.clone()));
            }
        }
        if let Ok(r) = ImageRef::parse(s) {
            let found = match (&r.digest, r.tagged()) {
                (Some(d), _) => {
                    let want = r.digested(d);
                    all.iter().find(|m| {
                        m.repo_digests.contains(&want)
                            || (m.manifest_digest == *d
                                && m.repo_digests.iter().any(|rd| rd.starts_with(&r.name())))
                    })
                }
                (None, Some(t)) => all.iter().find(|m| m.repo_tags.contains(&t)),
                (None, None) => None,
            };
            if let Some(m) = found {
                return Ok(Some(m.clone()));
            }
        }
        if let Some(p) = as_id_prefix(s) {
            let hits: Vec<&ImageMeta> = all
                .iter()
                .filter(|m| {
                    m.id.strip_prefix("sha256:")
                        .is_some_and(|h| h.starts_with(p))
                })
                .collect();
            if hits.len() == 1 {
                return Ok(Some(hits[0].clone()));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn store_dirs_are_0700_new_or_existing() {
        let d = tempfile::tempdir().unwrap();
        let fresh = d.path().join("fresh");
        let old = d.path().join("old");
        // An existing store as an older version left it: 0755 everywhere.
        for sub in ["", "blobs", "blobs/sha256", "layers", "trash"] {
            let p = old.join(sub);
            fs::create_dir_all(&p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        for root in [&fresh, &old] {
            let inner = Inner::open(root, RegistryConfig::default()).unwrap();
            for sub in ["", "blobs", "blobs/sha256", "layers", "tmp"] {
                assert_eq!(mode(&root.join(sub)), 0o700, "{}/{sub}", root.display());
            }
            // GC's trash dir too, while it exists.
            let blob = crate::content::sha256_digest(b"garbage");
            inner.content.write_bytes("t", &blob, b"garbage").unwrap();
            inner.gc().unwrap();
            assert!(!inner.content.exists(&blob));
            assert_eq!(mode(&root.join("trash")), 0o700);
        }
    }
}
