//! Bytes and inodes the store uses (`ImageFsInfo`), without walking every
//! unpacked file on each call (kubelet asks every few seconds).
//!
//! Blobs (`blobs/sha256/<hex>`) and unpacked layers (`layers/<hex>/`) never
//! change once they have their final name: they appear whole (rename) and
//! go whole (GC). So the usage of each one is measured once, when first
//! seen, and cached under its name and inode number; a call lists the two
//! directories (one `readdir` each, inode numbers included, no `stat` per
//! item), measures only names it has not seen, and forgets names that are
//! gone. Everything else (the directories themselves, `meta.redb`, `tmp/`,
//! `trash/`, unpacks in progress) is small or transient and measured each
//! time. With nothing in flight the sum equals a full walk of the store
//! (`FsUsage::measure`), which the tests check after pulls and removes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;

use crate::types::{now_ns, FsUsage};
use crate::unpack::tree_usage;

/// `(directory, name, inode)` → `(bytes, inodes)`.
type Key = (&'static str, OsString, u64);

#[derive(Default)]
pub(crate) struct UsageCache {
    items: Mutex<HashMap<Key, (u64, u64)>>,
}

impl UsageCache {
    /// Usage of the store at `root` now. Blocking (directory reads, and
    /// walks of items not seen before).
    pub fn measure(&self, root: &Path) -> io::Result<FsUsage> {
        let mut total = (0u64, 0u64);
        let mut add = |(b, i): (u64, u64)| {
            total.0 += b;
            total.1 += i;
        };
        let mut seen: Vec<Key> = Vec::new();
        let rd = match fs::read_dir(root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(usage(total)),
            Err(e) => return Err(e),
        };
        add(one(root)?);
        for e in rd {
            let e = e?;
            let p = e.path();
            match e.file_name().to_str() {
                Some("blobs") if e.file_type()?.is_dir() => {
                    add(one(&p)?);
                    for b in fs::read_dir(&p)? {
                        let b = b?;
                        if b.file_name() == "sha256" && b.file_type()?.is_dir() {
                            add(one(&b.path())?);
                            add(self.items_in(&b.path(), "blobs", &mut seen)?);
                        } else {
                            add(tree_usage(&b.path())?);
                        }
                    }
                }
                Some("layers") if e.file_type()?.is_dir() => {
                    add(one(&p)?);
                    add(self.items_in(&p, "layers", &mut seen)?);
                }
                _ => add(tree_usage(&p)?),
            }
        }
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let seen: std::collections::HashSet<Key> = seen.into_iter().collect();
        items.retain(|k, _| seen.contains(k));
        Ok(usage(total))
    }

    /// The sum over the finished items in `dir` (names not starting with
    /// `.`), cached; in-progress `.tmp-*` entries are measured each time.
    fn items_in(
        &self,
        dir: &Path,
        kind: &'static str,
        seen: &mut Vec<Key>,
    ) -> io::Result<(u64, u64)> {
        let mut sum = (0u64, 0u64);
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let u = if name.to_string_lossy().starts_with('.') {
                tree_usage(&e.path())?
            } else {
                let key = (kind, name, e.ino());
                let cached = self
                    .items
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&key)
                    .copied();
                let u = match cached {
                    Some(u) => u,
                    None => {
                        let u = tree_usage(&e.path())?;
                        self.items
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(key.clone(), u);
                        u
                    }
                };
                seen.push(key);
                u
            };
            sum.0 += u.0;
            sum.1 += u.1;
        }
        Ok(sum)
    }
}

/// One file or directory itself (not its contents).
fn one(p: &Path) -> io::Result<(u64, u64)> {
    match fs::symlink_metadata(p) {
        Ok(m) => Ok((m.blocks() * 512, 1)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((0, 0)),
        Err(e) => Err(e),
    }
}

fn usage((used_bytes, inodes_used): (u64, u64)) -> FsUsage {
    FsUsage {
        timestamp_ns: now_ns(),
        used_bytes,
        inodes_used,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_a_full_walk_and_caches_finished_items() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for sub in ["blobs/sha256", "layers/aa/bin", "layers/.tmp-1", "tmp"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        fs::write(root.join("blobs/sha256/b1"), vec![1u8; 10_000]).unwrap();
        fs::write(root.join("layers/aa/bin/sh"), vec![2u8; 50_000]).unwrap();
        fs::write(root.join("layers/.tmp-1/x"), vec![3u8; 5_000]).unwrap();
        fs::write(root.join("meta.redb"), vec![4u8; 8_000]).unwrap();
        let c = UsageCache::default();
        let walk = |r: &Path| FsUsage::measure(r).unwrap();
        let u = c.measure(root).unwrap();
        let w = walk(root);
        assert_eq!((u.used_bytes, u.inodes_used), (w.used_bytes, w.inodes_used));

        // A finished layer is not walked again (a file slipped into it is
        // not seen), while in-progress and loose files are.
        fs::write(root.join("layers/aa/bin/extra"), vec![5u8; 50_000]).unwrap();
        fs::write(root.join("layers/.tmp-1/y"), vec![6u8; 50_000]).unwrap();
        let u2 = c.measure(root).unwrap();
        assert_eq!(u2.inodes_used, u.inodes_used + 1, "only .tmp-1/y counted");

        // Gone items are forgotten; new ones measured.
        fs::remove_dir_all(root.join("layers/aa")).unwrap();
        fs::remove_dir_all(root.join("layers/.tmp-1")).unwrap();
        fs::create_dir_all(root.join("layers/bb")).unwrap();
        fs::write(root.join("layers/bb/f"), vec![7u8; 20_000]).unwrap();
        fs::write(root.join("blobs/sha256/b2"), vec![8u8; 30_000]).unwrap();
        let u3 = c.measure(root).unwrap();
        let w3 = walk(root);
        assert_eq!(
            (u3.used_bytes, u3.inodes_used),
            (w3.used_bytes, w3.inodes_used)
        );
        assert_eq!(c.items.lock().unwrap().len(), 3, "b1, b2, bb");
    }
}
