//! Remove (shared layers kept, garbage collected otherwise), fs usage, and
//! OCI whiteouts in their overlayfs form (checked through a real overlay
//! mount when we are root).

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use common::*;
use vmpod_images::{FsUsage, ImageError, ImageFilter};
use vmpod_tests::oci_image::{Compression, Entry, ImageBuilder, Layer};

/// `fs_usage` (ImageFsInfo) is cached per blob and layer, yet equals a
/// full walk of the store after pulls, a remove and a reopen.
#[tokio::test(flavor = "multi_thread")]
async fn fs_usage_is_cached_and_matches_a_full_walk() {
    let Some(reg) = registry() else { return };
    let a = image_with("a", Compression::Gzip);
    let b = image_with("b", Compression::Zstd);
    push(&reg, "test/a", "v1", &a).await;
    push(&reg, "test/b", "v1", &b).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let walk = || {
        let w = FsUsage::measure(&root).unwrap();
        (w.used_bytes, w.inodes_used)
    };
    let store = open(dir.path());
    let cached = |s: &vmpod_images::ImageStore| {
        let u = s.fs_usage().unwrap();
        (u.used_bytes, u.inodes_used)
    };
    assert_eq!(cached(&store), walk(), "empty store");
    let ra = store
        .pull(&format!("{}/test/a:v1", reg.addr()), None)
        .await
        .unwrap();
    assert_eq!(cached(&store), walk(), "after pulling a");
    store
        .pull(&format!("{}/test/b:v1", reg.addr()), None)
        .await
        .unwrap();
    let both = cached(&store);
    assert_eq!(both, walk(), "after pulling b");

    // Cached: a file slipped into a finished layer is not seen by the
    // store's figure (no walk), only by a full walk.
    let extra = ra.layer_dirs[1].join("slipped-in");
    std::fs::write(&extra, vec![9u8; 100_000]).unwrap();
    assert_eq!(cached(&store), both, "a finished layer was walked again");
    assert_ne!(walk(), both);
    std::fs::remove_file(&extra).unwrap();

    store.remove(&format!("{}/test/a:v1", reg.addr())).unwrap();
    let after_rm = cached(&store);
    assert_eq!(after_rm, walk(), "after removing a");
    assert!(after_rm.0 < both.0 && after_rm.1 < both.1);
    drop(store);
    let store = open(dir.path());
    assert_eq!(cached(&store), walk(), "after reopening");
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_keeps_shared_layers_and_collects_the_rest() {
    let Some(reg) = registry() else { return };
    let a = image_with("a", Compression::Gzip);
    let b = image_with("b", Compression::Gzip);
    assert_eq!(
        a.layers[0].digest, b.layers[0].digest,
        "busybox layer shared"
    );
    push(&reg, "test/a", "v1", &a).await;
    push(&reg, "test/a", "v2", &a).await; // second tag, same image
    push(&reg, "test/b", "v1", &b).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let root = dir.path().join("images");
    let empty = store.fs_usage().unwrap();

    let ra = store
        .pull(&format!("{}/test/a:v1", reg.addr()), None)
        .await
        .unwrap();
    let after_a = store.fs_usage().unwrap();
    assert!(
        after_a.used_bytes > empty.used_bytes + 500_000,
        "{empty:?} -> {after_a:?}"
    );
    assert!(after_a.inodes_used > empty.inodes_used);
    let ra2 = store
        .pull(&format!("{}/test/a:v2", reg.addr()), None)
        .await
        .unwrap();
    assert_eq!(ra2.id, ra.id);
    assert_eq!(ra2.repo_tags.len(), 2, "{:?}", ra2.repo_tags);
    let rb = store
        .pull(&format!("{}/test/b:v1", reg.addr()), None)
        .await
        .unwrap();
    assert_eq!(store.list(&ImageFilter::default()).unwrap().len(), 2);
    assert_eq!(
        ra.layer_dirs[0], rb.layer_dirs[0],
        "shared layer unpacked once"
    );
    assert_eq!(dir_entries(&root.join("layers")), 3);
    let before_rm = store.fs_usage().unwrap();

    // Remove by one tag: like containerd's CRI, the whole image goes (both tags).
    store.remove(&format!("{}/test/a:v2", reg.addr())).unwrap();
    let left = store.list(&ImageFilter::default()).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, rb.id);
    assert!(store
        .status(&format!("{}/test/a:v1", reg.addr()))
        .unwrap()
        .is_none());
    assert!(
        rb.layer_dirs[0].join("bin/busybox").is_file(),
        "shared layer kept"
    );
    assert!(!ra.layer_dirs[1].exists(), "a's own layer collected");
    let blobs = root.join("blobs/sha256");
    assert!(blobs.join(&a.layers[0].digest[7..]).exists());
    assert!(!blobs.join(&a.layers[1].digest[7..]).exists());
    assert!(!blobs.join(&a.config_digest[7..]).exists());
    assert!(!blobs.join(&a.manifest_digest[7..]).exists());
    let after_rm = store.fs_usage().unwrap();
    assert!(after_rm.used_bytes < before_rm.used_bytes);
    assert!(after_rm.inodes_used < before_rm.inodes_used);

    // Removing again, or something never pulled: Ok (CRI semantics).
    store.remove(&format!("{}/test/a:v1", reg.addr())).unwrap();
    store.remove("docker.io/library/never:pulled").unwrap();
    assert!(matches!(
        store.remove("Bad Ref"),
        Ok(()) | Err(ImageError::InvalidReference { .. })
    ));

    // Remove by digest reference, then by ID.
    let by_digest = rb.repo_digests[0].clone();
    store.remove(&by_digest).unwrap();
    assert!(store.list(&ImageFilter::default()).unwrap().is_empty());
    let rb = store
        .pull(&format!("{}/test/b:v1", reg.addr()), None)
        .await
        .unwrap();
    store.remove(&rb.id).unwrap();
    assert!(store.list(&ImageFilter::default()).unwrap().is_empty());
    assert_eq!(count_files(&blobs), 0);
    assert_eq!(dir_entries(&root.join("layers")), 0);
    let end = store.fs_usage().unwrap();
    assert!(
        end.used_bytes <= empty.used_bytes + 64 * 1024,
        "{empty:?} vs {end:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retagging_moves_the_tag() {
    let Some(reg) = registry() else { return };
    let old = image_with("old", Compression::Gzip);
    let new = image_with("new", Compression::Gzip);
    push(&reg, "test/moving", "latest", &old).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let r = format!("{}/test/moving:latest", reg.addr());
    let r_old = store.pull(&r, None).await.unwrap();
    push(&reg, "test/moving", "latest", &new).await;
    let r_new = store.pull(&r, None).await.unwrap();
    assert_ne!(r_old.id, r_new.id);
    // The old image keeps its digest name (as in containerd), but not the tag.
    let old_now = store.status(&r_old.id).unwrap().unwrap();
    assert!(old_now.repo_tags.is_empty());
    assert_eq!(old_now.repo_digests, r_old.repo_digests);
    assert_eq!(store.status(&r).unwrap().unwrap().id, r_new.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn whiteouts_in_overlay_form() {
    let Some(reg) = registry() else { return };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: overlay whiteouts (char 0/0, trusted.* xattrs) need root");
        return;
    }
    let lower = Layer::new(
        &[
            Entry::Dir("etc".into()),
            Entry::File("etc/gone".into(), b"x".to_vec(), 0o644),
            Entry::File("etc/kept".into(), b"k".to_vec(), 0o644),
            Entry::Dir("opq".into()),
            Entry::File("opq/old".into(), b"o".to_vec(), 0o644),
            Entry::Dir("dir".into()),
            Entry::File("dir/inner".into(), b"i".to_vec(), 0o644),
        ],
        Compression::Gzip,
    );
    let upper = Layer::new(
        &[
            Entry::Dir("etc".into()),
            Entry::Whiteout("etc/gone".into()),
            Entry::Dir("opq".into()),
            Entry::Opaque("opq".into()),
            Entry::File("opq/new".into(), b"n".to_vec(), 0o644),
            Entry::Whiteout("dir".into()),
        ],
        Compression::Zstd,
    );
    let img = ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).unwrap())
        .layer(lower)
        .layer(upper)
        .build();
    push(&reg, "test/wh", "v1", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let rec = open(dir.path())
        .pull(&format!("{}/test/wh:v1", reg.addr()), None)
        .await
        .unwrap();
    let up = &rec.layer_dirs[2];
    for wh in ["etc/gone", "dir"] {
        let m = std::fs::symlink_metadata(up.join(wh)).unwrap();
        assert!(m.file_type().is_char_device(), "{wh} is a whiteout");
        assert_eq!(m.rdev(), 0);
    }
    assert!(!up.join("etc/.wh.gone").exists());
    assert_eq!(
        xattr::get(up.join("opq"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(!up.join("opq/.wh..wh..opq").exists());

    // The real proof: overlayfs shows the merged view with deletions applied.
    let mnt = dir.path().join("merged");
    std::fs::create_dir(&mnt).unwrap();
    let lowers: Vec<String> = rec
        .layer_dirs
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let opts = format!("lowerdir={}", lowers.join(":"));
    match nix::mount::mount(
        Some("overlay"),
        &mnt,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    ) {
        Ok(()) => {
            let ok = || {
                assert!(mnt.join("bin/busybox").is_file());
                assert!(mnt.join("etc/kept").is_file());
                assert!(!mnt.join("etc/gone").exists(), "whiteout hides lower file");
                assert!(!mnt.join("dir").exists(), "whiteout hides lower dir");
                assert!(mnt.join("opq/new").is_file());
                assert!(
                    !mnt.join("opq/old").exists(),
                    "opaque dir hides lower contents"
                );
            };
            let r = std::panic::catch_unwind(ok);
            nix::mount::umount(&mnt).unwrap();
            r.unwrap();
        }
        Err(e) => eprintln!("SKIP overlay mount check: mount failed here: {e}"),
    }
}
