//! One pull: resolve the manifest (index -> linux/amd64), fetch and verify
//! config and layers, unpack layers, make everything durable, then commit
//! the metadata. Nothing is listed before that commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use oci_client::manifest::{self, OciImageManifest};
use serde_json::Value;
use tracing::{info, warn};

use crate::content::{sha256_digest, BlobSink};
use crate::error::{ImageError, Result, StoreContext};
use crate::meta::ImageMeta;
use crate::reference::{validate_digest, ImageRef};
use crate::registry::Remote;
use crate::store::{Inner, Protection};
use crate::types::{now_ns, Auth, ImageRecord};
use crate::unpack;

/// Layers downloaded/unpacked at once (containerd's default is 3).
const PARALLEL_LAYERS: usize = 3;

const LAYER_TYPES: &[&str] = &[
    manifest::IMAGE_LAYER_MEDIA_TYPE,
    manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE,
    "application/vnd.oci.image.layer.v1.tar+zstd",
    manifest::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
    manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
    manifest::IMAGE_LAYER_NONDISTRIBUTABLE_MEDIA_TYPE,
    manifest::IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

pub(crate) async fn pull(
    inner: Arc<Inner>,
    r: ImageRef,
    auth: Option<Auth>,
) -> Result<ImageRecord> {
    inner.stat_pulls.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let mut prot = inner.protection();
    let res = pull_inner(&inner, &r, auth.as_ref(), &mut prot).await;
    drop(prot);
    match res {
        Ok(rec) => {
            info!(image = %r, id = %rec.id, size = rec.size, elapsed_ms = started.elapsed().as_millis() as u64, "pulled");
            Ok(rec)
        }
        Err(e) => {
            warn!(image = %r, error = %e, "pull failed");
            // Drop whatever this pull stored that nothing else references.
            let inner2 = inner.clone();
            if let Ok(Err(gc)) = tokio::task::spawn_blocking(move || inner2.gc()).await {
                warn!(error = %gc, "cleanup after failed pull");
            }
            Err(e)
        }
    }
}

fn is_index(v: &Value) -> bool {
    let mt = v
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    mt == manifest::OCI_IMAGE_INDEX_MEDIA_TYPE
        || mt == manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE
        || (mt.is_empty() && v.get("manifests").is_some())
}

/// Pick the linux/amd64 manifest of an index.
fn pick_amd64(shown: &str, index: &Value) -> Result<String> {
    let entries = index
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| ImageError::unsupported(shown, "index without manifests"))?;
    let mut seen = Vec::new();
    for e in entries {
        let os = e
            .pointer("/platform/os")
            .and_then(Value::as_str)
            .unwrap_or("");
        let arch = e
            .pointer("/platform/architecture")
            .and_then(Value::as_str)
            .unwrap_or("");
        seen.push(format!("{os}/{arch}"));
        if os == "linux" && arch == "amd64" {
            let d = e.get("digest").and_then(Value::as_str).unwrap_or_default();
            validate_digest(d).map_err(|m| ImageError::unsupported(shown, m))?;
            return Ok(d.to_string());
        }
    }
    Err(ImageError::not_found(
        shown,
        format!("no linux/amd64 image in index (has {})", seen.join(", ")),
    ))
}

/// `User` from the config -> (uid, username) as containerd's CRI reports it.
pub(crate) fn user_of(config: &Value) -> (Option<i64>, String) {
    let user = config
        .pointer("/config/User")
        .and_then(Value::as_str)
        .unwrap_or("");
    let user = user.split(':').next().unwrap_or("");
    if user.is_empty() {
        return (None, String::new());
    }
    match user.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, user.to_string()),
    }
}

fn verify(what: String, expected: &str, bytes: &[u8]) -> Result<()> {
    let actual = sha256_digest(bytes);
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what,
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

async fn pull_inner(
    inner: &Arc<Inner>,
    r: &ImageRef,
    auth: Option<&Auth>,
    prot: &mut Protection,
) -> Result<ImageRecord> {
    let shown = r.to_string();
    let (remote, top) = Remote::open(&inner.registries, r, auth).await?;
    let top_digest = sha256_digest(&top);
    if let Some(want) = &r.digest {
        verify(format!("manifest of {shown}"), want, &top)?;
    }
    let top_json: Value = serde_json::from_slice(&top)
        .map_err(|e| ImageError::unsupported(&shown, format!("manifest is not JSON: {e}")))?;
    let mut blobs = vec![top_digest.clone()];
    let mut to_store = vec![(top_digest.clone(), top.clone())];
    let (manifest_digest, manifest_bytes) = if is_index(&top_json) {
        let d = pick_amd64(&shown, &top_json)?;
        info!(image = %shown, index = %top_digest, manifest = %d, "resolved index to linux/amd64");
        let m = remote.manifest(&d).await?;
        verify(format!("linux/amd64 manifest of {shown}"), &d, &m)?;
        blobs.push(d.clone());
        to_store.push((d.clone(), m.clone()));
        (d, m)
    } else {
        (top_digest.clone(), top)
    };
    let manifest: OciImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| ImageError::unsupported(&shown, format!("cannot read the manifest: {e}")))?;
    if manifest.schema_version != 2 {
        return Err(ImageError::unsupported(
            &shown,
            format!(
                "manifest schema version {} (only 2 is supported)",
                manifest.schema_version
            ),
        ));
    }
    for (d, _) in &to_store {
        prot.add(d);
    }

    // Config.
    let config_digest = manifest.config.digest.clone();
    validate_digest(&config_digest).map_err(|m| ImageError::unsupported(&shown, m))?;
    prot.add(&config_digest);
    let config_size = u64::try_from(manifest.config.size).unwrap_or(0);
    if config_size > MAX_CONFIG_BYTES {
        return Err(ImageError::unsupported(
            &shown,
            format!("image config of {config_size} bytes (at most {MAX_CONFIG_BYTES})"),
        ));
    }
    fetch_blob(
        inner,
        &remote,
        &config_digest,
        config_size,
        "config",
        &AtomicBool::new(false),
    )
    .await?;
    let config_bytes = inner.content.read_async(&config_digest).await?;
    let config: Value = serde_json::from_slice(&config_bytes)
        .map_err(|e| ImageError::unsupported(&shown, format!("image config is not JSON: {e}")))?;
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::unsupported(
            &shown,
            format!(
                "config lists {} diff IDs but the manifest has {} layers",
                diff_ids.len(),
                manifest.layers.len()
            ),
        ));
    }
    blobs.push(config_digest.clone());

    // Layers: download (once), verify, unpack (once). Up to
    // PARALLEL_LAYERS layers are in flight; each unpacks as soon as its
    // download is verified, while the others still download.
    let mut size = manifest_bytes.len() as u64 + manifest.config.size.max(0) as u64;
    let n_layers = manifest.layers.len();
    for (i, (layer, diff_id)) in manifest.layers.iter().zip(&diff_ids).enumerate() {
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(ImageError::unsupported(
                &shown,
                format!("layer {} has media type {}", i + 1, layer.media_type),
            ));
        }
        validate_digest(&layer.digest).map_err(|m| ImageError::unsupported(&shown, m))?;
        validate_digest(diff_id).map_err(|m| ImageError::unsupported(&shown, m))?;
        prot.add(&layer.digest);
        prot.add(diff_id);
        size += layer.size.max(0) as u64;
        blobs.push(layer.digest.clone());
    }
    let remote = &remote;
    let abort = &AtomicBool::new(false);
    let mut jobs: Vec<BoxFuture<'_, Result<()>>> = Vec::with_capacity(n_layers);
    for (i, (layer, diff_id)) in manifest.layers.iter().zip(&diff_ids).enumerate() {
        let what = format!("layer {}/{n_layers}", i + 1);
        jobs.push(Box::pin(async move {
            if abort.load(Ordering::Relaxed) {
                return Err(ImageError::registry(
                    remote.shown(),
                    "aborted: another layer failed",
                ));
            }
            let declared = u64::try_from(layer.size).unwrap_or(0);
            fetch_blob(inner, remote, &layer.digest, declared, &what, abort).await?;
            ensure_unpacked(inner, &layer.digest, diff_id).await
        }));
    }
    // On the first failure, tell downloads to stop, but let unpacks already
    // running finish, so nothing lands in the store after this pull returns.
    let mut running = futures_util::stream::iter(jobs).buffer_unordered(PARALLEL_LAYERS);
    let mut first_err = None;
    while let Some(r) = running.next().await {
        if let Err(e) = r {
            abort.store(true, Ordering::Relaxed);
            first_err.get_or_insert(e);
        }
    }
    drop(running);
    if let Some(e) = first_err {
        return Err(e);
    }

    let (uid, username) = user_of(&config);
    let mut repo_tags = Vec::new();
    if let Some(t) = r.tagged() {
        repo_tags.push(t);
    }
    let meta = ImageMeta {
        id: config_digest.clone(),
        repo_tags,
        repo_digests: vec![r.digested(&top_digest)],
        manifest_digest,
        size,
        uid,
        username,
        diff_ids,
        blobs,
        pulled_at_ns: now_ns(),
    };
    // Manifests last among the blobs, then make it all durable, then
    // commit; all of it (fsyncs) off the async workers.
    let inner2 = inner.clone();
    let meta2 = meta.clone();
    let dropped = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        for (d, bytes) in &to_store {
            inner2.content.write_bytes("manifest", d, bytes)?;
        }
        let t = Instant::now();
        syncfs(&inner2.root)?;
        info!(
            elapsed_ms = t.elapsed().as_millis() as u64,
            "store synced to disk"
        );
        inner2.meta.commit_image(&meta2)
    })
    .await
    .ctx(|| "commit task".into())??;
    if !dropped.is_empty() {
        info!(images = ?dropped, "images left without tags were removed");
        let inner2 = inner.clone();
        tokio::task::spawn_blocking(move || inner2.gc())
            .await
            .ctx(|| "gc task".into())??;
    }
    // The record as stored (merged with earlier tags), off the async workers.
    let inner2 = inner.clone();
    tokio::task::spawn_blocking(move || {
        let stored = inner2
            .meta
            .all()?
            .into_iter()
            .find(|m| m.id == meta.id)
            .unwrap_or(meta);
        inner2.record(&stored)
    })
    .await
    .ctx(|| "record task".into())?
}

/// Largest image config we read into memory.
const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// Download `digest` (`declared_size` bytes per its descriptor) unless
/// stored; one download per digest at a time.
async fn fetch_blob(
    inner: &Arc<Inner>,
    remote: &Remote,
    digest: &str,
    declared_size: u64,
    what: &str,
    abort: &AtomicBool,
) -> Result<()> {
    let lock = inner.key_lock(digest);
    let _g = lock.lock().await;
    if inner.content.exists_async(digest).await {
        info!(%what, %digest, "already stored");
        return Ok(());
    }
    let t = Instant::now();
    // Create, write, hash, fsync and rename on the blocking pool; a fresh
    // sink for each endpoint tried.
    let open_sink = || {
        let (inner, label, digest) = (
            inner.clone(),
            format!("{what} {digest}"),
            digest.to_string(),
        );
        BlobSink::spawn(move || inner.content.writer(&label, &digest))
    };
    let (n, endpoint) = remote
        .fetch_blob(digest, declared_size, open_sink, what, abort)
        .await?;
    inner.stat_blobs.fetch_add(1, Ordering::Relaxed);
    inner.stat_bytes.fetch_add(n, Ordering::Relaxed);
    info!(%what, %digest, bytes = n, elapsed_ms = t.elapsed().as_millis() as u64, %endpoint, "downloaded");
    Ok(())
}

/// Unpack the layer blob into `layers/<diff id hex>` unless already there.
async fn ensure_unpacked(inner: &Arc<Inner>, blob: &str, diff_id: &str) -> Result<()> {
    let key = format!("layer:{diff_id}");
    let lock = inner.key_lock(&key);
    let _g = lock.lock().await;
    let dest = inner.layer_dir(diff_id);
    if tokio::fs::metadata(&dest).await.is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    let blob_path = inner.content.path(blob)?;
    let tmp = inner.layers.join(format!(
        ".tmp-{}",
        inner
            .content
            .tmp_path("u")
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    ));
    let (blob_s, diff_s) = (blob.to_string(), diff_id.to_string());
    let tmp2 = tmp.clone();
    let t = Instant::now();
    let res = match tokio::task::spawn_blocking(move || -> Result<unpack::Unpacked> {
        let res = unpack::unpack_layer(&blob_path, &tmp2).and_then(|u| {
            if u.diff_id != diff_s {
                return Err(ImageError::DigestMismatch {
                    what: format!("uncompressed layer {blob_s}"),
                    expected: diff_s,
                    actual: u.diff_id,
                });
            }
            std::fs::rename(&tmp2, &dest).ctx(|| format!("rename into {}", dest.display()))?;
            Ok(u)
        });
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&tmp2);
        }
        res
    })
    .await
    {
        Ok(res) => res,
        Err(e) => {
            // The unpack panicked: clean up its directory off the workers.
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            Err(ImageError::store("unpack task", e))
        }
    };
    let u = res?;
    info!(layer = %diff_id, entries = u.entries, tar_bytes = u.tar_bytes, elapsed_ms = t.elapsed().as_millis() as u64, "unpacked");
    Ok(())
}

/// Flush everything written under `root` (blobs were fsynced one by one;
/// unpacked layer files were not) before metadata points at it.
fn syncfs(root: &std::path::Path) -> Result<()> {
    let f = std::fs::File::open(root).ctx(|| format!("open {}", root.display()))?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f))
        .ctx(|| format!("syncfs {}", root.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        let u = |s: &str| user_of(&serde_json::json!({"config": {"User": s}}));
        assert_eq!(u(""), (None, String::new()));
        assert_eq!(u("1000"), (Some(1000), String::new()));
        assert_eq!(u("1000:1000"), (Some(1000), String::new()));
        assert_eq!(u("nobody"), (None, "nobody".into()));
        assert_eq!(u("nobody:nogroup"), (None, "nobody".into()));
        assert_eq!(user_of(&serde_json::json!({})), (None, String::new()));
    }

    #[test]
    fn index_selection() {
        let idx = serde_json::json!({
            "mediaType": manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
            "manifests": [
                {"digest": format!("sha256:{}", "a".repeat(64)), "platform": {"os": "linux", "architecture": "arm64"}},
                {"digest": format!("sha256:{}", "b".repeat(64)), "platform": {"os": "linux", "architecture": "amd64"}},
            ]
        });
        assert!(is_index(&idx));
        assert_eq!(
            pick_amd64("x", &idx).unwrap(),
            format!("sha256:{}", "b".repeat(64))
        );
        let arm_only = serde_json::json!({"manifests": [
            {"digest": format!("sha256:{}", "a".repeat(64)), "platform": {"os": "linux", "architecture": "arm64"}}]});
        assert!(is_index(&arm_only));
        assert!(matches!(
            pick_amd64("x", &arm_only),
            Err(ImageError::NotFound { .. })
        ));
    }
}
