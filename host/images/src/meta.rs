//! Image metadata in an embedded redb database (`<root>/meta.redb`).
//!
//! One table, `images`: image ID (config digest) -> JSON [`ImageMeta`].
//! Every change is one redb write transaction (copy-on-write B-trees,
//! fsynced on commit), so a crash leaves either the old or the new state.
//! A pull commits its image only after all its blobs and layers are durable.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreContext};

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");

/// What we remember about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// `sha256:` config digest.
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// Platform manifest digest.
    pub manifest_digest: String,
    /// Compressed layers + config + platform manifest, in bytes.
    pub size: u64,
    pub uid: Option<i64>,
    pub username: String,
    /// Diff IDs, bottom layer first (= unpacked layer directory names).
    pub diff_ids: Vec<String>,
    /// Every blob this image holds on to (index, manifest, config, layers).
    pub blobs: Vec<String>,
    pub pulled_at_ns: i64,
}

pub struct MetaStore {
    db: Database,
    path: PathBuf,
}

impl MetaStore {
    pub fn open(root: &Path) -> Result<Self> {
        let path = root.join("meta.redb");
        let db = Database::create(&path).ctx(|| format!("open {}", path.display()))?;
        let tx = db
            .begin_write()
            .ctx(|| "begin metadata transaction".into())?;
        tx.open_table(IMAGES).ctx(|| "create images table".into())?;
        tx.commit().ctx(|| "commit metadata".into())?;
        Ok(MetaStore { db, path })
    }

    pub fn all(&self) -> Result<Vec<ImageMeta>> {
        let op = || format!("read {}", self.path.display());
        let tx = self.db.begin_read().ctx(op)?;
        let t = tx.open_table(IMAGES).ctx(op)?;
        let mut out = Vec::new();
        for row in t.iter().ctx(op)? {
            let (_k, v) = row.ctx(op)?;
            out.push(serde_json::from_slice(v.value()).ctx(op)?);
        }
        Ok(out)
    }

    /// Store `new`. Tags it carries move away from other images (a tag names
    /// one image); an image left with no tag and no digest is dropped.
    /// Returns the IDs of images dropped that way.
    pub fn commit_image(&self, new: &ImageMeta) -> Result<Vec<String>> {
        let op = || format!("commit image {} to {}", new.id, self.path.display());
        let tx = self.db.begin_write().ctx(op)?;
        let mut dropped = Vec::new();
        {
            let mut t = tx.open_table(IMAGES).ctx(op)?;
            let mut others: Vec<ImageMeta> = Vec::new();
            for row in t.iter().ctx(op)? {
                let (_k, v) = row.ctx(op)?;
                others.push(serde_json::from_slice(v.value()).ctx(op)?);
            }
            let mut merged = new.clone();
            for mut old in others {
                if old.id == new.id {
                    for tag in old.repo_tags.drain(..) {
                        if !merged.repo_tags.contains(&tag) {
                            merged.repo_tags.push(tag);
                        }
                    }
                    for d in old.repo_digests.drain(..) {
                        if !merged.repo_digests.contains(&d) {
                            merged.repo_digests.push(d);
                        }
                    }
                    for b in old.blobs.drain(..) {
                        if !merged.blobs.contains(&b) {
                            merged.blobs.push(b);
                        }
                    }
                    continue;
                }
                let before = old.repo_tags.len();
                old.repo_tags.retain(|t| !new.repo_tags.contains(t));
                if old.repo_tags.len() == before {
                    continue;
                }
                if old.repo_tags.is_empty() && old.repo_digests.is_empty() {
                    t.remove(old.id.as_str()).ctx(op)?;
                    dropped.push(old.id.clone());
                } else {
                    let v = serde_json::to_vec(&old).ctx(op)?;
                    t.insert(old.id.as_str(), v.as_slice()).ctx(op)?;
                }
            }
            let v = serde_json::to_vec(&merged).ctx(op)?;
            t.insert(merged.id.as_str(), v.as_slice()).ctx(op)?;
        }
        tx.commit().ctx(op)?;
        Ok(dropped)
    }

    pub fn remove(&self, id: &str) -> Result<bool> {
        let op = || format!("remove image {id} from {}", self.path.display());
        let tx = self.db.begin_write().ctx(op)?;
        let existed = {
            let mut t = tx.open_table(IMAGES).ctx(op)?;
            let r = t.remove(id).ctx(op)?;
            r.is_some()
        };
        tx.commit().ctx(op)?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, tags: &[&str], digests: &[&str]) -> ImageMeta {
        ImageMeta {
            id: id.into(),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: digests.iter().map(|s| s.to_string()).collect(),
            manifest_digest: "sha256:m".into(),
            size: 1,
            uid: None,
            username: String::new(),
            diff_ids: vec![],
            blobs: vec![format!("blob-{id}")],
            pulled_at_ns: 0,
        }
    }

    #[test]
    fn tags_move_and_untagged_images_drop() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        m.commit_image(&meta("a", &["x:1", "x:2"], &[])).unwrap();
        m.commit_image(&meta("b", &["y:1"], &[])).unwrap();
        // x:1 moves to c; a keeps x:2.
        assert!(m
            .commit_image(&meta("c", &["x:1"], &[]))
            .unwrap()
            .is_empty());
        // y:1 moves to c; b has nothing left and is dropped.
        assert_eq!(
            m.commit_image(&meta("c", &["y:1"], &["y@d"])).unwrap(),
            vec!["b"]
        );
        drop(m);
        let m = MetaStore::open(dir.path()).unwrap();
        let mut all = m.all().unwrap();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].repo_tags, vec!["x:2"]);
        assert_eq!(all[1].repo_tags, vec!["y:1", "x:1"]);
        assert_eq!(all[1].repo_digests, vec!["y@d"]);
        assert!(m.remove("a").unwrap());
        assert!(!m.remove("a").unwrap());
        assert_eq!(m.all().unwrap().len(), 1);
    }
}
