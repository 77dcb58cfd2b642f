//! Pull, list, status, errors, index resolution, dedup and restart against a
//! real `docker-registry` on loopback.

mod common;

use common::*;
use vmpod_images::{ImageError, ImageFilter};
use vmpod_tests::oci_image::{self, Compression, Entry, ImageBuilder, Layer, Pusher};

#[tokio::test(flavor = "multi_thread")]
async fn pull_by_tag_and_digest_then_list_and_status() {
    let Some(reg) = registry() else { return };
    let img = ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).unwrap())
        .user("1000:1000")
        .cmd(&["sh"])
        .build();
    let digest = push(&reg, "test/busybox", "v1", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tagged = format!("{}/test/busybox:v1", reg.addr());

    let rec = store.pull(&tagged, None).await.unwrap();
    assert_eq!(rec.id, img.config_digest);
    assert_eq!(rec.repo_tags, vec![tagged.clone()]);
    assert_eq!(
        rec.repo_digests,
        vec![format!("{}/test/busybox@{digest}", reg.addr())]
    );
    assert_eq!(rec.size, img.size());
    assert_eq!(rec.uid, Some(1000));
    assert_eq!(rec.username, "");
    assert_eq!(rec.layers, vec![img.layers[0].diff_id.clone()]);
    assert_eq!(rec.config_json.as_bytes(), &img.config[..]);
    let bb = rec.layer_dirs[0].join("bin/busybox");
    assert_eq!(
        std::fs::read(&bb).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(
        std::fs::read_link(rec.layer_dirs[0].join("bin/sh"))
            .unwrap()
            .to_str(),
        Some("busybox")
    );

    // By digest: same image, nothing downloaded again.
    let before = store.stats();
    let by_digest = format!("{}/test/busybox@{digest}", reg.addr());
    let rec2 = store.pull(&by_digest, None).await.unwrap();
    assert_eq!(rec2.id, rec.id);
    assert_eq!(store.stats().blobs_downloaded, before.blobs_downloaded);
    assert_eq!(
        rec2.repo_tags,
        vec![tagged.clone()],
        "tag kept when pulled again by digest"
    );

    let all = store.list(&ImageFilter::default()).unwrap();
    assert_eq!(all.len(), 1);
    let hex = &rec.id["sha256:".len()..];
    for q in [
        rec.id.as_str(),
        hex,
        &hex[..12],
        tagged.as_str(),
        by_digest.as_str(),
    ] {
        let s = store
            .status(q)
            .unwrap()
            .unwrap_or_else(|| panic!("status {q}"));
        assert_eq!(s.id, rec.id, "{q}");
        let l = store
            .list(&ImageFilter {
                image: Some(q.to_string()),
            })
            .unwrap();
        assert_eq!(l.len(), 1, "list filter {q}");
    }
    assert!(store.status("busybox").unwrap().is_none());
    assert!(store
        .status(&format!("{}/test/busybox:v2", reg.addr()))
        .unwrap()
        .is_none());
    assert!(store
        .list(&ImageFilter {
            image: Some("nope".into())
        })
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn username_from_config() {
    let Some(reg) = registry() else { return };
    let img = ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).unwrap())
        .user("nobody")
        .build();
    push(&reg, "test/named", "v1", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let rec = open(dir.path())
        .pull(&format!("{}/test/named:v1", reg.addr()), None)
        .await
        .unwrap();
    assert_eq!((rec.uid, rec.username.as_str()), (None, "nobody"));
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_image_is_not_found_and_bad_reference_is_invalid() {
    let Some(reg) = registry() else { return };
    push(
        &reg,
        "test/exists",
        "v1",
        &image_with("x", Compression::Gzip),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for r in [
        format!("{}/test/exists:nope", reg.addr()),
        format!("{}/test/missing:v1", reg.addr()),
        format!("{}/test/exists@sha256:{}", reg.addr(), "0".repeat(64)),
    ] {
        match store.pull(&r, None).await {
            Err(e @ ImageError::NotFound { .. }) => {
                let m = e.to_string();
                assert!(m.contains(&reg.addr()), "{m}");
                assert_eq!(
                    m.matches("not found").count(),
                    2,
                    "said once per level: {m}"
                );
            }
            other => panic!("{r}: expected NotFound, got {other:?}"),
        }
    }
    for r in [
        "",
        "UPPER/case",
        "busybox@sha256:short",
        "a//b",
        "http://x/y",
    ] {
        assert!(
            matches!(
                store.pull(r, None).await,
                Err(ImageError::InvalidReference { .. })
            ),
            "{r:?}"
        );
    }
    assert!(store.list(&ImageFilter::default()).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn digest_mismatch_is_rejected_and_nothing_stored() {
    let Some(reg) = registry() else { return };
    let img = image_with("corrupt", Compression::Gzip);
    push(&reg, "test/corrupt", "v1", &img).await;
    reg.corrupt_blob(&img.layers[1].digest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    match store
        .pull(&format!("{}/test/corrupt:v1", reg.addr()), None)
        .await
    {
        Err(ImageError::DigestMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, img.layers[1].digest);
            assert_ne!(actual, expected);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(store.list(&ImageFilter::default()).unwrap().is_empty());
    let root = dir.path().join("images");
    assert_eq!(count_files(&root.join("blobs")), 0, "no blob kept");
    assert_eq!(dir_entries(&root.join("layers")), 0, "no layer kept");
    assert_eq!(dir_entries(&root.join("tmp")), 0, "no temp file kept");

    // A corrupt manifest is caught too (pull by digest).
    let img2 = image_with("corrupt2", Compression::Gzip);
    let d2 = push(&reg, "test/corrupt2", "v1", &img2).await;
    reg.corrupt_blob(&d2).unwrap();
    let r = store
        .pull(&format!("{}/test/corrupt2@{d2}", reg.addr()), None)
        .await;
    match r {
        Err(ImageError::DigestMismatch { expected, .. }) => assert_eq!(expected, d2),
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(store.list(&ImageFilter::default()).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_zstd_and_plain_layers() {
    let Some(reg) = registry() else { return };
    let img = ImageBuilder::new()
        .layer(Layer::busybox(Compression::Zstd).unwrap())
        .layer(Layer::new(
            &[Entry::File("gz".into(), b"gzip".to_vec(), 0o600)],
            Compression::Gzip,
        ))
        .layer(Layer::new(
            &[Entry::File("zs".into(), b"zstd".to_vec(), 0o644)],
            Compression::Zstd,
        ))
        .layer(Layer::new(
            &[Entry::File("plain".into(), b"tar".to_vec(), 0o755)],
            Compression::None,
        ))
        .build();
    push(&reg, "test/compress", "v1", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let rec = open(dir.path())
        .pull(&format!("{}/test/compress:v1", reg.addr()), None)
        .await
        .unwrap();
    assert_eq!(rec.layer_dirs.len(), 4);
    assert!(rec.layer_dirs[0].join("bin/busybox").is_file());
    use std::os::unix::fs::PermissionsExt;
    for (i, name, data, mode) in [
        (1, "gz", "gzip", 0o600),
        (2, "zs", "zstd", 0o644),
        (3, "plain", "tar", 0o755),
    ] {
        let p = rec.layer_dirs[i].join(name);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), data);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            mode
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_arch_index_resolves_to_amd64() {
    let Some(reg) = registry() else { return };
    let amd = ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).unwrap())
        .arch("amd64")
        .build();
    let arm_layer = Layer::new(
        &[Entry::File("arm".into(), b"arm64 only".to_vec(), 0o644)],
        Compression::Gzip,
    );
    let arm = ImageBuilder::new()
        .layer(arm_layer.clone())
        .arch("arm64")
        .build();
    let idx = oci_image::index(vec![arm.clone(), amd.clone()]);
    Pusher::new(&reg.addr(), None)
        .push_index("test/multi", "v1", &idx)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rec = open(dir.path())
        .pull(&format!("{}/test/multi:v1", reg.addr()), None)
        .await
        .unwrap();
    assert_eq!(rec.id, amd.config_digest);
    assert_eq!(
        rec.repo_digests,
        vec![format!("{}/test/multi@{}", reg.addr(), idx.digest)]
    );
    assert!(rec.layer_dirs[0].join("bin/busybox").is_file());
    assert_eq!(
        reg.blob_gets(&arm_layer.digest),
        0,
        "arm64 layer not fetched"
    );
    assert_eq!(
        reg.blob_gets(&arm.config_digest),
        0,
        "arm64 config not fetched"
    );

    // An index without amd64: NotFound naming the platforms it has.
    let only_arm = oci_image::index(vec![arm]);
    Pusher::new(&reg.addr(), None)
        .push_index("test/armonly", "v1", &only_arm)
        .await
        .unwrap();
    match open(dir.path())
        .pull(&format!("{}/test/armonly:v1", reg.addr()), None)
        .await
    {
        Err(ImageError::NotFound { detail, .. }) => {
            assert!(detail.contains("linux/arm64"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_schema2_manifest_list() {
    let Some(reg) = registry() else { return };
    let amd = ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).unwrap())
        .docker_media_types()
        .build();
    let arm = ImageBuilder::new()
        .layer(Layer::new(
            &[Entry::File("arm".into(), b"arm".to_vec(), 0o644)],
            Compression::Gzip,
        ))
        .arch("arm64")
        .docker_media_types()
        .build();
    let list = oci_image::index(vec![amd.clone(), arm]);
    assert_eq!(list.media_type, oci_image::DOCKER_LIST);
    Pusher::new(&reg.addr(), None)
        .push_index("test/docker", "v1", &list)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let rec = store
        .pull(&format!("{}/test/docker:v1", reg.addr()), None)
        .await
        .unwrap();
    assert_eq!(rec.id, amd.config_digest);
    assert!(rec.layer_dirs[0].join("bin/busybox").is_file());
    // A plain schema 2 manifest (no list), pulled by digest.
    let d = push(&reg, "test/docker-single", "v1", &amd).await;
    let rec = store
        .pull(&format!("{}/test/docker-single@{d}", reg.addr()), None)
        .await
        .unwrap();
    assert_eq!(rec.id, amd.config_digest);
    assert_eq!(
        rec.repo_tags.len(),
        1,
        "tag from the first pull kept: {:?}",
        rec.repo_tags
    );
    assert_eq!(rec.repo_digests.len(), 2, "{:?}", rec.repo_digests);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_share_one_download() {
    let Some(reg) = registry() else { return };
    let img = image_with("dedup", Compression::Gzip);
    push(&reg, "test/dedup", "v1", &img).await;
    // A second tag of a different image sharing the busybox layer.
    let other = image_with("other", Compression::Zstd);
    push(&reg, "test/dedup", "other", &other).await;
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(dir.path()));
    let r = format!("{}/test/dedup:v1", reg.addr());
    let r2 = format!("{}/test/dedup:other", reg.addr());
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (s, r) = (store.clone(), if i == 5 { r2.clone() } else { r.clone() });
        tasks.push(tokio::spawn(async move { s.pull(&r, None).await }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap().id);
    }
    assert!(ids[..5].iter().all(|i| *i == img.config_digest));
    assert_eq!(ids[5], other.config_digest);
    let st = store.stats();
    assert_eq!(st.pulls + st.joined, 6);
    assert!(st.pulls <= 2, "{st:?}");
    // Every blob came over the wire once, the shared busybox layer included.
    let shared = &img.layers[0].digest;
    assert_eq!(reg.blob_gets(shared), 1, "shared layer downloaded once");
    assert_eq!(reg.blob_gets(&img.layers[1].digest), 1);
    assert_eq!(reg.blob_gets(&img.config_digest), 1);
    assert_eq!(st.blobs_downloaded, 5, "{st:?}"); // 2 configs + busybox + 2 small layers
}

#[tokio::test(flavor = "multi_thread")]
async fn reopened_store_lists_pulled_images_and_drops_crash_leftovers() {
    let Some(reg) = registry() else { return };
    let img = image_with("persist", Compression::Gzip);
    push(&reg, "test/persist", "v1", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let r = format!("{}/test/persist:v1", reg.addr());
    let rec = {
        let store = open(dir.path());
        store.pull(&r, None).await.unwrap()
    };
    // Simulate a crash in the middle of a later pull: a half-written temp
    // download, a verified blob and a layer never committed to metadata, and
    // an unpack in progress.
    let root = dir.path().join("images");
    std::fs::write(root.join("tmp/partial-1"), b"half a blob").unwrap();
    let orphan = b"orphan blob";
    let orphan_d = oci_image::sha256(orphan);
    std::fs::write(root.join("blobs/sha256").join(&orphan_d[7..]), orphan).unwrap();
    std::fs::create_dir_all(root.join("layers").join("f".repeat(64)).join("bin")).unwrap();
    std::fs::create_dir_all(root.join("layers/.tmp-x/etc")).unwrap();

    let store = open(dir.path());
    let all = store.list(&ImageFilter::default()).unwrap();
    assert_eq!(all, vec![rec.clone()]);
    assert!(rec
        .layer_dirs
        .iter()
        .all(|d| d.join("data").exists() || d.join("bin").exists()));
    assert_eq!(dir_entries(&root.join("tmp")), 0);
    assert!(!root.join("blobs/sha256").join(&orphan_d[7..]).exists());
    assert!(!root.join("layers").join("f".repeat(64)).exists());
    assert!(!root.join("layers/.tmp-x").exists());
    assert_eq!(dir_entries(&root.join("layers")), 2);
    // The reopened store serves status and pulls without downloading again.
    assert_eq!(store.status(&r).unwrap().unwrap().id, rec.id);
    store.pull(&r, None).await.unwrap();
    assert_eq!(store.stats().blobs_downloaded, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_layer_media_type_is_refused_and_nothing_stored() {
    let Some(reg) = registry() else { return };
    let mut odd = Layer::new(
        &[Entry::File("x".into(), b"x".to_vec(), 0o644)],
        Compression::Gzip,
    );
    odd.media_type = "application/vnd.example.layer.v1.tar+encrypted".into();
    let img = ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).unwrap())
        .layer(odd)
        .build();
    push(&reg, "test/odd", "v1", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    match store
        .pull(&format!("{}/test/odd:v1", reg.addr()), None)
        .await
    {
        Err(ImageError::Unsupported { reason, .. }) => assert!(
            reason
                .contains("layer 2 has media type application/vnd.example.layer.v1.tar+encrypted"),
            "{reason}"
        ),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(store.list(&ImageFilter::default()).unwrap().is_empty());
    let root = dir.path().join("images");
    assert_eq!(count_files(&root.join("blobs")), 0, "no blob kept");
    assert_eq!(dir_entries(&root.join("layers")), 0, "no layer kept");
}
