//! The CRI ImageService end to end: a real `vmpod serve` over its socket, a
//! real registry (Debian's docker-registry on loopback), images built and
//! pushed by the tests.

use tonic::Code;
use vmpod_tests::cri_client::{basic_auth, cri, CriClient, Daemon};
use vmpod_tests::oci_image::{self, noise, Compression, Image, ImageBuilder, Layer, Pusher};
use vmpod_tests::registry::{self, BearerProxy, Registry};

/// Print why and return from the test when the host has no registry.
macro_rules! require_registry {
    () => {
        if let Some(why) = registry::skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

fn busybox_image() -> Image {
    ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).unwrap())
        .user("1000")
        .cmd(&["sh", "-c", "echo hi"])
        .build()
}

/// A registry with `test/busybox:v1` pushed; returns (registry, image).
async fn registry_with_busybox() -> (Registry, Image) {
    let reg = Registry::start().unwrap();
    let img = busybox_image();
    Pusher::new(&reg.addr(), None)
        .push_image("test/busybox", Some("v1"), &img)
        .await
        .unwrap();
    (reg, img)
}

/// A daemon with no registry config (loopback is plain HTTP by default).
async fn daemon() -> (Daemon, CriClient) {
    let d = Daemon::start("").unwrap();
    let c = d.client().await.unwrap();
    (d, c)
}

async fn fs_info(c: &mut CriClient) -> cri::ImageFsInfoResponse {
    c.images
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_list_status_remove_by_tag() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    let (d, mut c) = daemon().await;
    let name = format!("{}/test/busybox:v1", reg.addr());

    let id = c.pull(&name, None).await.unwrap();
    assert_eq!(id, img.config_digest, "image ref is the config digest");

    let list = c.list(None).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let i = &list[0];
    assert_eq!(i.id, img.config_digest);
    assert_eq!(i.repo_tags, vec![name.clone()]);
    assert_eq!(
        i.repo_digests,
        [format!(
            "{}/test/busybox@{}",
            reg.addr(),
            img.manifest_digest
        )]
    );
    assert_eq!(i.size, img.size());
    assert_eq!(i.uid, Some(cri::Int64Value { value: 1000 }));
    assert_eq!(i.username, "");

    // Filters: by tag, by ID, by digest; a non-matching one is empty.
    assert_eq!(c.list(Some(&name)).await.unwrap().len(), 1);
    assert_eq!(c.list(Some(&img.config_digest)).await.unwrap().len(), 1);
    let by_digest = format!("{}/test/busybox@{}", reg.addr(), img.manifest_digest);
    assert_eq!(c.list(Some(&by_digest)).await.unwrap().len(), 1);
    assert!(c
        .list(Some(&format!("{}/test/other:v1", reg.addr())))
        .await
        .unwrap()
        .is_empty());

    // Status, verbose: the image config as JSON, containerd-shaped.
    let s = c.image_status(&name, true).await.unwrap();
    assert_eq!(s.image.as_ref().unwrap().id, img.config_digest);
    let info: serde_json::Value = serde_json::from_str(&s.info["info"]).unwrap();
    assert_eq!(
        info["imageSpec"]["config"]["Cmd"],
        serde_json::json!(["sh", "-c", "echo hi"])
    );
    assert_eq!(info["imageSpec"]["config"]["User"], "1000");
    assert_eq!(info["chainID"], img.layers[0].diff_id);
    // Not verbose: no info.
    assert!(c.image_status(&name, false).await.unwrap().info.is_empty());
    // By ID too.
    assert!(c
        .image_status(&img.config_digest, false)
        .await
        .unwrap()
        .image
        .is_some());

    // Remove by tag; again is fine (CRI: idempotent); status then empty, not an error.
    c.remove(&name).await.unwrap();
    c.remove(&name).await.unwrap();
    assert!(c.list(None).await.unwrap().is_empty());
    let s = c.image_status(&name, true).await.unwrap();
    assert!(s.image.is_none() && s.info.is_empty(), "{s:?}");
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_digest_and_remove_by_id() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    let (_d, mut c) = daemon().await;
    let name = format!("{}/test/busybox@{}", reg.addr(), img.manifest_digest);
    assert_eq!(c.pull(&name, None).await.unwrap(), img.config_digest);
    let list = c.list(None).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].repo_digests, vec![name.clone()]);
    assert!(list[0].repo_tags.is_empty(), "pulled by digest: no tag");
    c.remove(&img.config_digest).await.unwrap();
    assert!(c.list(None).await.unwrap().is_empty());
}

/// `name:tag@digest` is `name@digest`, as containerd's ParseDockerRef makes
/// it: the digest is pulled and the tag (here one the registry doesn't even
/// have) is neither fetched nor recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_and_digest_pulls_the_digest_and_records_no_tag() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    let (_d, mut c) = daemon().await;
    let both = format!("{}/test/busybox:v9@{}", reg.addr(), img.manifest_digest);
    assert_eq!(c.pull(&both, None).await.unwrap(), img.config_digest);
    let list = c.list(None).await.unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].repo_tags.is_empty(), "{:?}", list[0].repo_tags);
    assert_eq!(
        list[0].repo_digests,
        vec![format!(
            "{}/test/busybox@{}",
            reg.addr(),
            img.manifest_digest
        )]
    );
    assert!(
        !reg.requests()
            .iter()
            .any(|(_, p)| p.ends_with("/manifests/v9")),
        "the tag was asked for"
    );
    // Any tag with the digest finds it, as the digest alone names it.
    let other = format!("{}/test/busybox:v1@{}", reg.addr(), img.manifest_digest);
    let s = c.image_status(&other, false).await.unwrap();
    assert_eq!(s.image.unwrap().id, img.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tags_share_layers_and_removal_keeps_the_other() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    let img2 = ImageBuilder::new()
        .layer(img.layers[0].clone())
        .label("second")
        .build();
    Pusher::new(&reg.addr(), None)
        .push_image("test/busybox", Some("v2"), &img2)
        .await
        .unwrap();
    let (_d, mut c) = daemon().await;
    let v1 = format!("{}/test/busybox:v1", reg.addr());
    let v2 = format!("{}/test/busybox:v2", reg.addr());
    c.pull(&v1, None).await.unwrap();
    let before = fs_info(&mut c).await.image_filesystems[0]
        .used_bytes
        .unwrap()
        .value;
    c.pull(&v2, None).await.unwrap();
    let after = fs_info(&mut c).await.image_filesystems[0]
        .used_bytes
        .unwrap()
        .value;
    // The shared busybox layer (~1 MB+) is stored once.
    assert!(
        after - before < img.layers[0].blob.len() as u64 / 2,
        "second image re-stored the shared layer: {before} -> {after}"
    );
    assert_eq!(
        reg.blob_gets(&img.layers[0].digest),
        1,
        "layer downloaded once"
    );
    assert_eq!(c.list(None).await.unwrap().len(), 2);
    // A bare repository filter matches every tag of it (as `docker images busybox`).
    let repo = format!("{}/test/busybox", reg.addr());
    assert_eq!(c.list(Some(&repo)).await.unwrap().len(), 2);
    assert_eq!(c.list(Some(&v2)).await.unwrap().len(), 1);
    c.remove(&v1).await.unwrap();
    let left = c.list(None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, img2.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_fs_info_reports_real_usage_of_the_image_root() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    let (d, mut c) = daemon().await;
    let empty = fs_info(&mut c).await;
    assert_eq!(empty.image_filesystems.len(), 1);
    let fs = &empty.image_filesystems[0];
    assert_eq!(
        fs.fs_id.as_ref().unwrap().mountpoint,
        d.state_dir().join("images").display().to_string()
    );
    assert!(fs.timestamp > 0);
    let empty_bytes = fs.used_bytes.unwrap().value;
    let empty_inodes = fs.inodes_used.unwrap().value;
    assert_eq!(empty.container_filesystems.len(), 1);

    c.pull(&format!("{}/test/busybox:v1", reg.addr()), None)
        .await
        .unwrap();
    let full = fs_info(&mut c).await;
    let fs = &full.image_filesystems[0];
    let busybox = std::fs::metadata("/bin/busybox").unwrap().len();
    // At least the unpacked busybox binary plus its compressed blob.
    assert!(
        fs.used_bytes.unwrap().value >= empty_bytes + busybox + img.layers[0].blob.len() as u64 / 2,
        "{fs:?}"
    );
    // bin/, etc/, busybox, its 8 links, passwd, group, tmp/ at least.
    assert!(fs.inodes_used.unwrap().value >= empty_inodes + 10, "{fs:?}");
    assert!(fs.timestamp >= empty.image_filesystems[0].timestamp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_is_not_found() {
    require_registry!();
    let (reg, _img) = registry_with_busybox().await;
    let (_d, mut c) = daemon().await;
    for name in [
        format!("{}/test/busybox:nope", reg.addr()),
        format!("{}/test/absent:v1", reg.addr()),
    ] {
        let e = c.pull(&name, None).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{name}: {e:?}");
        // Said once, naming the image and the endpoint that was asked.
        assert_eq!(
            e.message(),
            format!("image {name:?} not found (tried {}: not found)", reg.addr())
        );
    }
    assert!(c.list(None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_mismatch_is_rejected_and_nothing_is_listed() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    reg.corrupt_blob(&img.layers[0].digest).unwrap();
    let (_d, mut c) = daemon().await;
    let name = format!("{}/test/busybox:v1", reg.addr());
    let e = c.pull(&name, None).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("digest"), "{}", e.message());
    assert!(c.list(None).await.unwrap().is_empty());
    assert!(c.image_status(&name, false).await.unwrap().image.is_none());
}

/// A registry that serves more bytes than the manifest declares is cut off
/// at the declared size (it cannot fill the disk before the digest check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_blob_is_cut_off_and_nothing_is_stored() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    reg.grow_blob(&img.layers[0].digest, 8 << 20).unwrap();
    let (d, mut c) = daemon().await;
    let name = format!("{}/test/busybox:v1", reg.addr());
    let e = c.pull(&name, None).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("more than"), "{}", e.message());
    assert!(c.list(None).await.unwrap().is_empty());
    let used = fs_info(&mut c).await.image_filesystems[0]
        .used_bytes
        .unwrap()
        .value;
    assert!(
        used < img.layers[0].blob.len() as u64 + (4 << 20),
        "the extra 8 MiB never reached the store: {used} bytes used"
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_are_invalid_argument_and_the_daemon_keeps_serving() {
    let (_d, mut c) = daemon().await;
    for name in [
        "UPPER/case:tag",
        "busybox@sha256:nothex",
        "busybox:bad tag",
        "127.0.0.1:5000/a//b",
    ] {
        let e = c.pull(name, None).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
    }
    // An empty name: InvalidArgument on every image RPC that takes one.
    let e = c.pull("", None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c.image_status(" ", false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c.remove("").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    c.runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_required_and_given() {
    require_registry!();
    let reg = Registry::start_with_htpasswd("alice", "s3cret").unwrap();
    let img = busybox_image();
    Pusher::new(&reg.addr(), Some(("alice", "s3cret")))
        .push_image("private/busybox", Some("v1"), &img)
        .await
        .unwrap();
    let (_d, mut c) = daemon().await;
    let name = format!("{}/private/busybox:v1", reg.addr());

    let e = c.pull(&name, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "no credentials: {e:?}");
    let e = c
        .pull(&name, Some(basic_auth("alice", "wrong")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "wrong password: {e:?}");
    assert!(c.list(None).await.unwrap().is_empty());

    let id = c
        .pull(&name, Some(basic_auth("alice", "s3cret")))
        .await
        .unwrap();
    assert_eq!(id, img.config_digest);
    c.remove(&name).await.unwrap();

    // The `auth` field (base64 "user:pass"), as kubelet sends from a docker config.
    let auth = cri::AuthConfig {
        auth: "YWxpY2U6czNjcmV0".into(), // alice:s3cret
        ..Default::default()
    };
    assert_eq!(c.pull(&name, Some(auth)).await.unwrap(), img.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_auth() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    let proxy = BearerProxy::start(&reg.addr(), "bob", "t0ken")
        .await
        .unwrap();
    let (_d, mut c) = daemon().await;
    let name = format!("{}/test/busybox:v1", proxy.addr());
    let e = c.pull(&name, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let id = c
        .pull(&name, Some(basic_auth("bob", "t0ken")))
        .await
        .unwrap();
    assert_eq!(id, img.config_digest);
    assert!(!proxy.token_requests.lock().unwrap().is_empty());
}

/// `identity_token` (an OAuth2 refresh token) is exchanged at the token
/// realm (`POST`, `grant_type=refresh_token`) for the access token the
/// registry then accepts; a wrong one is UNAUTHENTICATED, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_token_is_exchanged_for_an_access_token() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    let proxy = BearerProxy::start(&reg.addr(), "bob", "t0ken")
        .await
        .unwrap();
    let (_d, mut c) = daemon().await;
    let name = format!("{}/test/busybox:v1", proxy.addr());
    let identity = |t: &str| cri::AuthConfig {
        identity_token: t.into(),
        ..Default::default()
    };

    let e = c
        .pull(&name, Some(identity("not-the-token")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("identity token"), "{e:?}");
    assert!(c.list(None).await.unwrap().is_empty());

    let id = c
        .pull(&name, Some(identity(proxy.refresh_token())))
        .await
        .unwrap();
    assert_eq!(id, img.config_digest);
    let reqs = proxy.token_requests.lock().unwrap().clone();
    assert!(
        reqs.iter().any(|r| r
            == "POST grant_type=refresh_token service=vmpod-test \
                scope=repository:test/busybox:pull client_id=vmpod"),
        "{reqs:?}"
    );
    // Only the OAuth flow was used: no GET of the realm with basic credentials.
    assert!(reqs.iter().all(|r| r.starts_with("POST ")), "{reqs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_index_resolves_to_amd64() {
    require_registry!();
    let reg = Registry::start().unwrap();
    let amd64 = busybox_image();
    let arm64 = ImageBuilder::new()
        .layer(Layer::new(
            &[oci_image::Entry::File(
                "arm".into(),
                b"arm64".to_vec(),
                0o644,
            )],
            Compression::Zstd,
        ))
        .arch("arm64")
        .build();
    Pusher::new(&reg.addr(), None)
        .push_index(
            "test/multi",
            "v1",
            &oci_image::index(vec![arm64, amd64.clone()]),
        )
        .await
        .unwrap();
    let (_d, mut c) = daemon().await;
    let id = c
        .pull(&format!("{}/test/multi:v1", reg.addr()), None)
        .await
        .unwrap();
    assert_eq!(id, amd64.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image_download_once() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    let (_d, c) = daemon().await;
    let name = format!("{}/test/busybox:v1", reg.addr());
    let pulls: Vec<_> = (0..4)
        .map(|_| {
            let mut c = c.clone();
            let name = name.clone();
            tokio::spawn(async move { c.pull(&name, None).await })
        })
        .collect();
    for p in pulls {
        assert_eq!(p.await.unwrap().unwrap(), img.config_digest);
    }
    assert_eq!(reg.blob_gets(&img.layers[0].digest), 1);
    let mut c = c;
    assert_eq!(c.list(None).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_k8s_io_name_served_by_a_loopback_mirror_only() {
    require_registry!();
    let mirror = Registry::start().unwrap();
    let img = busybox_image();
    let p = Pusher::new(&mirror.addr(), None);
    p.push_image("pause", Some("3.9"), &img).await.unwrap();
    p.push_image("library/busybox", Some("latest"), &img)
        .await
        .unwrap();
    let config = format!(
        "[registries.\"registry.k8s.io\"]\nmirrors = [{{ endpoint = \"{}\" }}]\nmirror_only = true\n\n\
         [registries.\"docker.io\"]\nmirrors = [{{ endpoint = \"{}\" }}]\nmirror_only = true\n",
        mirror.url(),
        mirror.addr()
    );
    let d = Daemon::start(&config).unwrap();
    let mut c = d.client().await.unwrap();

    let id = c.pull("registry.k8s.io/pause:3.9", None).await.unwrap();
    assert_eq!(id, img.config_digest);
    let s = c
        .image_status("registry.k8s.io/pause:3.9", false)
        .await
        .unwrap();
    let i = s.image.unwrap();
    assert_eq!(
        i.repo_tags,
        ["registry.k8s.io/pause:3.9"],
        "named as asked, not as the mirror"
    );
    assert_eq!(
        i.repo_digests,
        [format!("registry.k8s.io/pause@{}", img.manifest_digest)]
    );
    // Short names normalise like containerd: busybox -> docker.io/library/busybox:latest.
    c.pull("busybox", None).await.unwrap();
    let s = c.image_status("busybox", false).await.unwrap();
    assert!(s
        .image
        .unwrap()
        .repo_tags
        .contains(&"docker.io/library/busybox:latest".to_string()));
    assert!(mirror
        .requests()
        .iter()
        .any(|(_, p)| p == "/v2/pause/manifests/3.9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_only_never_contacts_the_original_host() {
    require_registry!();
    // Both registries hold the image; the "original" must see no request.
    let (original, img) = registry_with_busybox().await;
    let (mirror, _) = registry_with_busybox().await;
    let config = format!(
        "[registries.\"{}\"]\nmirrors = [{{ endpoint = \"{}\" }}]\nmirror_only = true\n",
        original.addr(),
        mirror.url()
    );
    let d = Daemon::start(&config).unwrap();
    let mut c = d.client().await.unwrap();
    let before = original.requests().len();
    let name = format!("{}/test/busybox:v1", original.addr());
    assert_eq!(c.pull(&name, None).await.unwrap(), img.config_digest);
    assert_eq!(
        original.requests().len(),
        before,
        "original contacted: {:?}",
        original.requests()
    );
    assert_eq!(mirror.blob_gets(&img.layers[0].digest), 1);

    // With the mirror down and mirror_only, the pull fails instead of
    // falling back to the original.
    c.remove(&name).await.unwrap();
    let mirror_host = mirror.addr();
    drop(mirror);
    let e = c.pull(&name, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message()
            .contains(&format!("tried {mirror_host} (mirror): ")),
        "{}",
        e.message()
    );
    assert_eq!(
        e.message().matches("; ").count(),
        0,
        "only the mirror tried: {}",
        e.message()
    );
    assert_eq!(
        original.requests().len(),
        before,
        "{:?}",
        original.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_survive_a_daemon_restart() {
    require_registry!();
    let (reg, img) = registry_with_busybox().await;
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("{}/test/busybox:v1", reg.addr());
    {
        let mut d = Daemon::start_in(tmp.path(), "").unwrap();
        let mut c = d.client().await.unwrap();
        c.pull(&name, None).await.unwrap();
        let st = d.stop().unwrap();
        assert!(st.success(), "{}", d.log());
    }
    drop(reg); // the registry is gone: what is listed comes from our store
    let d = Daemon::start_in(tmp.path(), "").unwrap();
    let mut c = d.client().await.unwrap();
    let list = c.list(None).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].id, img.config_digest);
    assert_eq!(list[0].repo_tags, vec![name.clone()]);
    let s = c.image_status(&name, true).await.unwrap();
    assert!(s.image.is_some() && s.info.contains_key("info"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_and_username_come_from_the_image_user() {
    require_registry!();
    let reg = Registry::start().unwrap();
    let layer = Layer::busybox(Compression::Gzip).unwrap();
    let p = Pusher::new(&reg.addr(), None);
    for (tag, user) in [
        ("uid", "1002"),
        ("name", "www-data"),
        ("uidgroup", "1003:users"),
        ("namegroup", "www-data:www-data"),
        ("none", ""),
    ] {
        let img = ImageBuilder::new().layer(layer.clone()).user(user).build();
        p.push_image("test/user", Some(tag), &img).await.unwrap();
    }
    let (_d, mut c) = daemon().await;
    for (tag, uid, name) in [
        ("uid", Some(1002), ""),
        ("name", None, "www-data"),
        ("uidgroup", Some(1003), ""),
        ("namegroup", None, "www-data"),
        ("none", None, ""),
    ] {
        let image = format!("{}/test/user:{tag}", reg.addr());
        c.pull(&image, None).await.unwrap();
        let i = c.image_status(&image, false).await.unwrap().image.unwrap();
        assert_eq!(i.uid.map(|u| u.value), uid, "{tag}");
        assert_eq!(i.username, name, "{tag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_registry_is_unavailable() {
    let port = registry::free_port().unwrap();
    let (_d, mut c) = daemon().await;
    let e = c
        .pull(&format!("127.0.0.1:{port}/test/busybox:v1"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(c.list(None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_pull_keeps_earlier_images_and_lists_no_half_image() {
    require_registry!();
    let (reg, small) = registry_with_busybox().await;
    let big = ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).unwrap())
        .layer(Layer::new(
            &[oci_image::Entry::File(
                "big-a".into(),
                noise(32 << 20, 7),
                0o644,
            )],
            Compression::None,
        ))
        .layer(Layer::new(
            &[oci_image::Entry::File(
                "big-b".into(),
                noise(32 << 20, 11),
                0o644,
            )],
            Compression::None,
        ))
        .build();
    Pusher::new(&reg.addr(), None)
        .push_image("test/big", Some("v1"), &big)
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let small_name = format!("{}/test/busybox:v1", reg.addr());
    let big_name = format!("{}/test/big:v1", reg.addr());
    {
        let mut d = Daemon::start_in(tmp.path(), "").unwrap();
        let mut c = d.client().await.unwrap();
        c.pull(&small_name, None).await.unwrap();
        let before = reg.blob_gets(&big.layers[1].digest);
        let pull = {
            let mut c = c.clone();
            let big_name = big_name.clone();
            tokio::spawn(async move { c.pull(&big_name, None).await })
        };
        // Kill -9 once the big layer is being fetched (or the pull ended).
        while reg.blob_gets(&big.layers[1].digest) == before && !pull.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(d.pid().unwrap() as libc::pid_t, libc::SIGKILL) };
        let _ = d.stop();
        let _ = pull.await;
    }
    let d = Daemon::start_in(tmp.path(), "").unwrap();
    let mut c = d.client().await.unwrap();
    let list = c.list(None).await.unwrap();
    assert!(list.iter().any(|i| i.id == small.config_digest), "{list:?}");
    // The big image is either absent or complete: never listed half-pulled.
    let after = c.image_status(&big_name, true).await.unwrap().image;
    eprintln!(
        "big image after SIGKILL mid-pull: {}",
        if after.is_some() {
            "complete"
        } else {
            "absent"
        }
    );
    if let Some(s) = after {
        assert_eq!(s.id, big.config_digest);
        let info: serde_json::Value =
            serde_json::from_str(&c.image_status(&big_name, true).await.unwrap().info["info"])
                .unwrap();
        let dirs = info["layerDirs"].as_array().unwrap();
        assert_eq!(dirs.len(), 3);
        let top = std::path::Path::new(dirs[2].as_str().unwrap()).join("big-b");
        assert_eq!(std::fs::metadata(top).unwrap().len(), 32 << 20);
    }
    // And pulling it again works.
    assert_eq!(c.pull(&big_name, None).await.unwrap(), big.config_digest);
}
