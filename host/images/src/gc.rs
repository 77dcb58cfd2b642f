//! Garbage collection: delete blobs and layer directories that no image
//! references and no running pull protects.
//!
//! A round has two steps, so the protection lock is never held across the
//! metadata read:
//!
//! 1. **plan** (no lock): list the store, note the protection set's
//!    `released` counter, then read every image record. What appears after
//!    the listing is no candidate this round.
//! 2. **apply**: for each unreferenced candidate, take the lock, check that
//!    no pull protects it and that no pull has *finished* since the plan
//!    (`released` unchanged), rename it into `trash/`, let go of the lock.
//!    Deleting the trash happens without the lock.
//!
//! Why the counter: a pull commits its image record and only then drops
//! its protection. If it did both between our metadata read and our check,
//! the item would look neither referenced (old read) nor protected (dropped)
//! and we would delete part of a committed image. When the counter moved,
//! the plan is stale and the round starts over (a few times; after that the
//! garbage waits for the next round, which only leaves it on disk longer).
//! A pull that starts protecting an item after we renamed it finds it gone
//! and downloads or unpacks it again.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, info};

use crate::error::{ImageError, Result, StoreContext};
use crate::store::{private_dir, Inner};

/// Rounds tried while pulls keep finishing under our feet.
const ATTEMPTS: usize = 3;

/// What one round found.
pub(crate) struct Plan {
    /// (digest or diff ID, path) of every finished blob and layer.
    candidates: Vec<(String, PathBuf)>,
    /// Everything an image record references.
    keep: HashSet<String>,
    /// `Protected::released` before the metadata was read.
    released: u64,
}

/// The result of [`Inner::gc_apply`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// This many items were collected.
    Done(usize),
    /// A pull finished since the plan; nothing more was collected.
    Stale,
}

impl Inner {
    pub fn gc(&self) -> Result<()> {
        for _ in 0..ATTEMPTS {
            let plan = self.gc_plan()?;
            match self.gc_apply(plan)? {
                Applied::Done(0) => return Ok(()),
                Applied::Done(n) => {
                    info!(items = n, "image store garbage collected");
                    return Ok(());
                }
                Applied::Stale => debug!("a pull finished during gc; planning again"),
            }
        }
        debug!("pulls kept finishing; garbage left for the next gc");
        Ok(())
    }

    pub(crate) fn gc_plan(&self) -> Result<Plan> {
        let mut candidates: Vec<(String, PathBuf)> = Vec::new();
        for d in self.content.list()? {
            let p = self.content.path(&d)?;
            candidates.push((d, p));
        }
        for e in fs::read_dir(&self.layers).ctx(|| format!("list {}", self.layers.display()))? {
            let e = e.ctx(|| "list layers".into())?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // an unpack in progress
            }
            candidates.push((format!("sha256:{name}"), e.path()));
        }
        // Before the metadata read (see the module docs).
        let released = self
            .protect
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .released;
        let mut keep = HashSet::new();
        for m in self.meta.all()? {
            keep.extend(m.blobs);
            keep.extend(m.diff_ids);
        }
        Ok(Plan {
            candidates,
            keep,
            released,
        })
    }

    pub(crate) fn gc_apply(&self, plan: Plan) -> Result<Applied> {
        static RUN: AtomicU64 = AtomicU64::new(0);
        let trash = self
            .root
            .join("trash")
            .join(RUN.fetch_add(1, Ordering::Relaxed).to_string());
        let mut moved = 0usize;
        let mut stale = false;
        for (key, path) in plan.candidates {
            if plan.keep.contains(&key) {
                continue;
            }
            if moved == 0 {
                private_dir(&self.root.join("trash"))?;
                private_dir(&trash)?;
            }
            let dst = trash.join(moved.to_string());
            {
                let p = self.protect.lock().unwrap_or_else(|e| e.into_inner());
                if p.released != plan.released {
                    stale = true;
                    break;
                }
                if p.refs.contains_key(&key) {
                    continue;
                }
                match fs::rename(&path, &dst) {
                    Ok(()) => {}
                    // Collected by a concurrent gc since we listed it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(ImageError::store(
                            format!("move {} to trash", path.display()),
                            e,
                        ))
                    }
                }
            }
            debug!(path = %path.display(), "garbage collected");
            moved += 1;
        }
        if trash.exists() {
            fs::remove_dir_all(&trash).ctx(|| format!("delete {}", trash.display()))?;
        }
        Ok(if stale {
            Applied::Stale
        } else {
            Applied::Done(moved)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::sha256_digest;
    use crate::meta::ImageMeta;
    use crate::types::RegistryConfig;

    fn image_using(blob: &str) -> ImageMeta {
        ImageMeta {
            id: format!("sha256:{}", "c".repeat(64)),
            repo_tags: vec!["x/y:1".into()],
            repo_digests: vec![],
            manifest_digest: blob.into(),
            size: 1,
            uid: None,
            username: String::new(),
            diff_ids: vec![],
            blobs: vec![blob.into()],
            pulled_at_ns: 0,
        }
    }

    #[test]
    fn unreferenced_unprotected_items_go_protected_ones_stay() {
        let d = tempfile::tempdir().unwrap();
        let inner = Inner::open(d.path(), RegistryConfig::default()).unwrap();
        let (a, b) = (sha256_digest(b"a"), sha256_digest(b"b"));
        inner.content.write_bytes("t", &a, b"a").unwrap();
        inner.content.write_bytes("t", &b, b"b").unwrap();
        let mut prot = inner.protection();
        prot.add(&b);
        assert_eq!(
            inner.gc_apply(inner.gc_plan().unwrap()).unwrap(),
            Applied::Done(1)
        );
        assert!(!inner.content.exists(&a));
        assert!(inner.content.exists(&b), "protected by a running pull");
        drop(prot);
        inner.gc().unwrap();
        assert!(!inner.content.exists(&b));
    }

    /// A pull that commits its image and ends between the plan's metadata
    /// read and the apply step: its blob is neither in the plan's
    /// references nor protected any more, and must survive.
    #[test]
    fn a_pull_finishing_between_plan_and_apply_keeps_its_blobs() {
        let d = tempfile::tempdir().unwrap();
        let inner = Inner::open(d.path(), RegistryConfig::default()).unwrap();
        let blob = sha256_digest(b"layer");
        let mut prot = inner.protection();
        prot.add(&blob);
        inner.content.write_bytes("t", &blob, b"layer").unwrap();
        let plan = inner.gc_plan().unwrap(); // the image is not committed yet
        inner.meta.commit_image(&image_using(&blob)).unwrap();
        drop(prot); // the pull ends
        assert_eq!(inner.gc_apply(plan).unwrap(), Applied::Stale);
        assert!(
            inner.content.exists(&blob),
            "a committed image lost its blob"
        );
        inner.gc().unwrap();
        assert!(inner.content.exists(&blob), "referenced now");
    }
}
