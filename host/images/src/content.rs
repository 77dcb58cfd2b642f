//! Content-addressed blob store: `<root>/blobs/sha256/<hex>`.
//!
//! A blob reaches its final path only after its bytes were hashed, matched
//! against the expected digest, fsynced and renamed from `<root>/tmp/`; so
//! "the file exists" means "the blob is complete and verified".

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::error::{ImageError, Result, StoreContext};
use crate::reference::validate_digest;
use crate::store::private_dir;

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

pub struct ContentStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

impl ContentStore {
    /// Create the directories; drop leftovers of interrupted downloads.
    pub fn open(root: &Path) -> Result<Self> {
        let blobs = root.join("blobs").join("sha256");
        let tmp = root.join("tmp");
        private_dir(&root.join("blobs"))?;
        private_dir(&blobs)?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp).ctx(|| format!("clean {}", tmp.display()))?;
        }
        private_dir(&tmp)?;
        Ok(ContentStore { blobs, tmp })
    }

    #[cfg(test)]
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// A fresh unique path under `tmp/`.
    pub fn tmp_path(&self, hint: &str) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{hint}-{}-{n}", std::process::id()))
    }

    pub fn path(&self, digest: &str) -> Result<PathBuf> {
        validate_digest(digest).map_err(|e| ImageError::store("blob path", e))?;
        Ok(self.blobs.join(&digest["sha256:".len()..]))
    }

    pub fn exists(&self, digest: &str) -> bool {
        self.path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// [`exists`](Self::exists) without blocking an async worker.
    pub async fn exists_async(&self, digest: &str) -> bool {
        match self.path(digest) {
            Ok(p) => tokio::fs::metadata(p)
                .await
                .map(|m| m.is_file())
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    /// [`read`](Self::read) without blocking an async worker.
    pub async fn read_async(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.path(digest)?;
        tokio::fs::read(&p)
            .await
            .ctx(|| format!("read blob {}", p.display()))
    }

    pub fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.path(digest)?;
        fs::read(&p).ctx(|| format!("read blob {}", p.display()))
    }

    /// Store `data` if it hashes to `digest`; `DigestMismatch` otherwise.
    pub fn write_bytes(&self, what: &str, digest: &str, data: &[u8]) -> Result<()> {
        if self.exists(digest) {
            return Ok(());
        }
        let mut w = self.writer(what, digest)?;
        w.write(data)?;
        w.commit().map(|_| ())
    }

    /// A writer for one blob; nothing is visible until [`BlobWriter::commit`].
    pub fn writer(&self, what: &str, digest: &str) -> Result<BlobWriter> {
        let final_path = self.path(digest)?;
        let tmp = self.tmp_path(&digest["sha256:".len()..][..12]);
        let file = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        Ok(BlobWriter {
            what: what.to_string(),
            expected: digest.to_string(),
            hasher: Sha256::new(),
            file: Some(file),
            tmp,
            final_path,
            written: 0,
        })
    }

    /// Digests of every stored blob.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.blobs).ctx(|| format!("list {}", self.blobs.display()))? {
            let e = e.ctx(|| "list blobs".to_string())?;
            if let Some(name) = e.file_name().to_str() {
                out.push(format!("sha256:{name}"));
            }
        }
        Ok(out)
    }
}

/// Where a blob's bytes go: written (and hashed) chunk by chunk, then
/// committed. Dropping it uncommitted must leave nothing behind.
pub trait ChunkSink: Send + 'static {
    fn write_chunk(&mut self, chunk: &[u8]) -> Result<()>;
    /// Verify and make durable; returns the bytes written.
    fn commit_all(self) -> Result<u64>;
}

impl ChunkSink for BlobWriter {
    fn write_chunk(&mut self, chunk: &[u8]) -> Result<()> {
        self.write(chunk)
    }
    fn commit_all(self) -> Result<u64> {
        self.commit()
    }
}

/// Chunks in flight between the download and the disk writer.
const SINK_DEPTH: usize = 16;

enum SinkMsg {
    Data(Bytes),
    Commit,
}

/// The async face of a [`ChunkSink`]: the sink is opened, written, hashed,
/// fsynced and renamed on tokio's blocking pool, fed through a bounded
/// channel, so a slow disk slows the download down (back-pressure) but never
/// stalls an async worker (and with it the gRPC server).
pub struct BlobSink {
    tx: Option<mpsc::Sender<SinkMsg>>,
    task: Option<tokio::task::JoinHandle<Result<u64>>>,
    written: u64,
}

impl BlobSink {
    /// Start the writer task; `open` (which creates the temp file) runs on
    /// the blocking pool too. Must be called within a tokio runtime.
    pub fn spawn<W: ChunkSink>(open: impl FnOnce() -> Result<W> + Send + 'static) -> BlobSink {
        let (tx, mut rx) = mpsc::channel::<SinkMsg>(SINK_DEPTH);
        let task = tokio::task::spawn_blocking(move || {
            let mut w = open()?;
            while let Some(m) = rx.blocking_recv() {
                match m {
                    SinkMsg::Data(c) => w.write_chunk(&c)?,
                    SinkMsg::Commit => return w.commit_all(),
                }
            }
            // Abandoned: `w` is dropped here, with its temp file.
            Err(ImageError::store(
                "blob download",
                "abandoned before the end",
            ))
        });
        BlobSink {
            tx: Some(tx),
            task: Some(task),
            written: 0,
        }
    }

    /// Bytes handed to the sink so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Queue `chunk`; waits only when the writer is [`SINK_DEPTH`] chunks
    /// behind. A write error of the writer comes back here.
    pub async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.written += chunk.len() as u64;
        let sent = match &self.tx {
            Some(tx) => tx.send(SinkMsg::Data(chunk)).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer stopped: its result says why.
        match self.finish(false).await {
            Err(e) => Err(e),
            Ok(_) => Err(ImageError::store(
                "blob download",
                "writer already finished",
            )),
        }
    }

    /// Verify, fsync and rename into place; the bytes written.
    pub async fn commit(mut self) -> Result<u64> {
        self.finish(true).await
    }

    /// Throw the partial blob away; returns once its temp file is gone.
    pub async fn abort(mut self) {
        let _ = self.finish(false).await;
    }

    async fn finish(&mut self, commit: bool) -> Result<u64> {
        if let Some(tx) = self.tx.take() {
            if commit {
                // If this fails the writer already ended; its result tells.
                let _ = tx.send(SinkMsg::Commit).await;
            }
        }
        match self.task.take() {
            Some(t) => t
                .await
                .map_err(|e| ImageError::store("blob writer task", e))?,
            None => Err(ImageError::store(
                "blob download",
                "writer already finished",
            )),
        }
    }
}

/// Hashes while writing to a temp file; `commit` verifies, fsyncs, renames.
pub struct BlobWriter {
    what: String,
    expected: String,
    hasher: Sha256,
    /// `Some` until the blob is renamed into place.
    file: Option<File>,
    tmp: PathBuf,
    final_path: PathBuf,
    written: u64,
}

impl BlobWriter {
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        match self.file.as_mut() {
            Some(f) => f
                .write_all(chunk)
                .ctx(|| format!("write {}", self.tmp.display())),
            // Unreachable: `commit` consumes the writer.
            None => Err(ImageError::store(
                format!("write {}", self.tmp.display()),
                "blob already committed",
            )),
        }
    }

    pub fn commit(mut self) -> Result<u64> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if actual != self.expected {
            return Err(ImageError::DigestMismatch {
                what: self.what.clone(),
                expected: self.expected.clone(),
                actual,
            });
        }
        if let Some(f) = &self.file {
            f.sync_all()
                .ctx(|| format!("fsync {}", self.tmp.display()))?;
        }
        fs::rename(&self.tmp, &self.final_path)
            .ctx(|| format!("rename into {}", self.final_path.display()))?;
        // Renamed: the temp path is gone, nothing for `Drop` to remove.
        self.file = None;
        if let Some(dir) = self.final_path.parent() {
            fsync_dir(dir)?;
        }
        Ok(self.written)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            // Not committed (write error, mismatch, failed fsync or
            // rename): leave nothing behind.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync dir {}", dir.display()))
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_write_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let d = sha256_digest(b"hello");
        cs.write_bytes("test", &d, b"hello").unwrap();
        assert_eq!(cs.read(&d).unwrap(), b"hello");
        let other = sha256_digest(b"other");
        match cs.write_bytes("test", &other, b"hello") {
            Err(ImageError::DigestMismatch {
                expected, actual, ..
            }) => {
                assert_eq!(expected, other);
                assert_eq!(actual, d);
            }
            r => panic!("expected mismatch, got {r:?}"),
        }
        assert!(!cs.exists(&other));
        assert_eq!(
            fs::read_dir(cs.tmp_dir()).unwrap().count(),
            0,
            "temp file left"
        );
        assert_eq!(cs.list().unwrap(), vec![d]);
    }

    #[test]
    fn failed_rename_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let d = sha256_digest(b"blocked");
        // A non-empty directory where the blob should go: rename fails.
        let target = cs.path(&d).unwrap();
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"x").unwrap();
        assert!(matches!(
            cs.write_bytes("test", &d, b"blocked"),
            Err(ImageError::Store { .. })
        ));
        assert_eq!(
            fs::read_dir(cs.tmp_dir()).unwrap().count(),
            0,
            "temp file left"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sink_commits_verifies_and_aborts_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let cs = std::sync::Arc::new(ContentStore::open(dir.path()).unwrap());
        let sink_for = |d: &str| {
            let (cs, d) = (cs.clone(), d.to_string());
            BlobSink::spawn(move || cs.writer("test", &d))
        };
        let d = sha256_digest(b"hello world");
        let mut s = sink_for(&d);
        s.write(Bytes::from_static(b"hello ")).await.unwrap();
        s.write(Bytes::from_static(b"world")).await.unwrap();
        assert_eq!(s.written(), 11);
        assert_eq!(s.commit().await.unwrap(), 11);
        assert_eq!(cs.read_async(&d).await.unwrap(), b"hello world");

        let other = sha256_digest(b"other");
        let mut s = sink_for(&other);
        s.write(Bytes::from_static(b"not it")).await.unwrap();
        assert!(matches!(
            s.commit().await,
            Err(ImageError::DigestMismatch { .. })
        ));
        let mut s = sink_for(&other);
        s.write(Bytes::from_static(b"oth")).await.unwrap();
        s.abort().await;
        assert!(!cs.exists_async(&other).await);
        assert_eq!(fs::read_dir(cs.tmp_dir()).unwrap().count(), 0, "temp left");
    }

    /// A disk write that hangs until another task on the same (only) async
    /// worker runs: if the sink wrote on the worker, that task could never
    /// run and the write would time out.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stuck_disk_does_not_stall_the_async_worker() {
        struct Gate(std::sync::mpsc::Receiver<()>, u64);
        impl ChunkSink for Gate {
            fn write_chunk(&mut self, c: &[u8]) -> Result<()> {
                self.0
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .map_err(|_| ImageError::store("write", "the async worker was stalled"))?;
                self.1 += c.len() as u64;
                Ok(())
            }
            fn commit_all(self) -> Result<u64> {
                Ok(self.1)
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mut sink = BlobSink::spawn(move || Ok(Gate(rx, 0)));
        sink.write(Bytes::from_static(b"abc")).await.unwrap();
        let other = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(()).unwrap();
        });
        other.await.unwrap();
        assert_eq!(sink.commit().await.unwrap(), 3);
    }
}
