//! Garbage collection: delete blobs and layer directories that no image
//! references and no running pull protects.
//!
//! A round has two steps, so the protection lock is never held across the
//! metadata read:
//!
//! 1. **plan** (no lock): list the store, note the protection set's
//!    `epoch` (and register the round), then read every image record. What
//!    appears after the listing is no candidate this round.
//! 2. **apply**: for each unreferenced candidate, take the lock, check that
//!    no pull protects it and that no pull has *let go of it* since the plan
//!    (see below), rename it into `trash/`, let go of the lock. Deleting
//!    the trash happens without the lock.
//!
//! Why the release check: a pull commits its image record and only then
//! drops its protection. If it did both between our metadata read and our
//! check, the item would look neither referenced (old read) nor protected
//! (dropped) and we would delete part of a committed image. So while a
//! round runs, each key whose protection ends is noted with the epoch it
//! ended at, and a key released after the plan's epoch is left alone this
//! round (the next plan reads the metadata again and sees the new image,
//! or, if the pull failed, collects the key). Pulls of other images ending
//! meanwhile change nothing: their keys are not candidates, or were
//! protected and so never could be, and the rest of the plan goes ahead.
//! A pull that starts protecting an item after we renamed it finds it gone
//! and downloads or unpacks it again.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tracing::{debug, info};

use crate::error::{ImageError, Result, StoreContext};
use crate::store::{private_dir, Inner, Protected};

/// Rounds tried while items we would collect keep being released by pulls
/// ending under our feet.
const ATTEMPTS: usize = 3;

/// A GC round in progress: while one is, pulls ending note which keys they
/// released (see the module docs).
struct Round<'a>(&'a Mutex<Protected>);

impl<'a> Round<'a> {
    /// Register a round and return the current epoch.
    fn start(m: &'a Mutex<Protected>) -> (Round<'a>, u64) {
        let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
        p.gc_rounds += 1;
        (Round(m), p.epoch)
    }
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.gc_rounds -= 1;
        if p.gc_rounds == 0 {
            p.released.clear();
        }
    }
}

/// What one round found.
pub(crate) struct Plan<'a> {
    /// (digest or diff ID, path) of every finished blob and layer.
    candidates: Vec<(String, PathBuf)>,
    /// Everything an image record references.
    keep: HashSet<String>,
    /// `Protected::epoch` before the metadata was read.
    epoch: u64,
    _round: Round<'a>,
}

/// The result of [`Inner::gc_apply`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Items collected.
    pub moved: usize,
    /// Unreferenced items left alone because a pull let go of them since
    /// the plan (a new plan must look at them again).
    pub deferred: usize,
}

impl Inner {
    pub fn gc(&self) -> Result<()> {
        let mut moved = 0;
        for _ in 0..ATTEMPTS {
            let plan = self.gc_plan()?;
            let a = self.gc_apply(plan)?;
            moved += a.moved;
            if a.deferred == 0 {
                if moved > 0 {
                    info!(items = moved, "image store garbage collected");
                }
                return Ok(());
            }
            debug!(
                items = a.deferred,
                "pulls released items during gc; planning again for those"
            );
        }
        if moved > 0 {
            info!(items = moved, "image store garbage collected");
        }
        debug!("items kept being released by pulls; left for the next gc");
        Ok(())
    }

    pub(crate) fn gc_plan(&self) -> Result<Plan<'_>> {
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
        let (round, epoch) = Round::start(&self.protect);
        let mut keep = HashSet::new();
        for m in self.meta.all()? {
            keep.extend(m.blobs);
            keep.extend(m.diff_ids);
        }
        Ok(Plan {
            candidates,
            keep,
            epoch,
            _round: round,
        })
    }

    pub(crate) fn gc_apply(&self, plan: Plan<'_>) -> Result<Applied> {
        static RUN: AtomicU64 = AtomicU64::new(0);
        let trash = self
            .root
            .join("trash")
            .join(RUN.fetch_add(1, Ordering::Relaxed).to_string());
        let mut moved = 0usize;
        let mut deferred = 0usize;
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
                if p.refs.contains_key(&key) {
                    continue;
                }
                if p.released.get(&key).is_some_and(|e| *e > plan.epoch) {
                    // Its pull may have committed an image our metadata
                    // read missed.
                    deferred += 1;
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
        Ok(Applied { moved, deferred })
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
            Applied {
                moved: 1,
                deferred: 0
            }
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
        assert_eq!(
            inner.gc_apply(plan).unwrap(),
            Applied {
                moved: 0,
                deferred: 1
            }
        );
        assert!(
            inner.content.exists(&blob),
            "a committed image lost its blob"
        );
        inner.gc().unwrap();
        assert!(inner.content.exists(&blob), "referenced now");
    }

    /// Pulls of other images keep finishing while GC runs (here: between
    /// every plan and its apply, in every round `gc` makes): the removed
    /// image's items are still collected.
    #[test]
    fn unrelated_pulls_finishing_during_gc_do_not_stop_it() {
        let d = tempfile::tempdir().unwrap();
        let inner = Inner::open(d.path(), RegistryConfig::default()).unwrap();
        let removed = sha256_digest(b"removed image layer");
        inner
            .content
            .write_bytes("t", &removed, b"removed image layer")
            .unwrap();
        let diff_id = format!("sha256:{}", "d".repeat(64));
        fs::create_dir(inner.layer_dir(&diff_id)).unwrap();
        fs::write(inner.layer_dir(&diff_id).join("f"), b"x").unwrap();
        // An unrelated pull: protects, commits, ends.
        let other_pull = |n: u8| {
            let blob = sha256_digest(&[n]);
            let mut prot = inner.protection();
            prot.add(&blob);
            inner.content.write_bytes("t", &blob, &[n]).unwrap();
            inner.meta.commit_image(&image_using(&blob)).unwrap();
            drop(prot);
            blob
        };
        for round in 0..ATTEMPTS as u8 {
            let plan = inner.gc_plan().unwrap();
            let other = other_pull(round);
            let a = inner.gc_apply(plan).unwrap();
            assert!(inner.content.exists(&other), "the other pull's blob");
            if round == 0 {
                assert_eq!(
                    a,
                    Applied {
                        moved: 2,
                        deferred: 0
                    }
                );
            }
        }
        assert!(!inner.content.exists(&removed), "removed image's blob kept");
        assert!(
            !inner.layer_dir(&diff_id).exists(),
            "removed image's layer kept"
        );
        // Bookkeeping is dropped once no round runs.
        let p = inner.protect.lock().unwrap();
        assert_eq!((p.gc_rounds, p.released.len()), (0, 0));
    }
}
