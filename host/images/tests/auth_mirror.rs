//! Basic auth, the bearer-token flow and registry mirrors, against real
//! `docker-registry` instances on loopback.

mod common;

use base64::Engine as _;
use common::*;
use vmpod_images::{Auth, ImageError, ImageFilter, Mirror, RegistryConfig};
use vmpod_tests::oci_image::Compression;
use vmpod_tests::registry::{BearerProxy, Registry};

fn basic(user: &str, password: &str) -> Option<Auth> {
    Some(Auth {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_required_then_given() {
    if registry().is_none() {
        return;
    }
    let reg = Registry::start_with_htpasswd("alice", "s3cret").unwrap();
    push(
        &reg,
        "private/app",
        "v1",
        &image_with("private", Compression::Gzip),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let r = format!("{}/private/app:v1", reg.addr());
    for auth in [None, basic("alice", "wrong"), basic("mallory", "s3cret")] {
        match store.pull(&r, auth.clone()).await {
            Err(ImageError::Unauthorized { reference, .. }) => assert_eq!(reference, r),
            other => panic!("{auth:?}: expected Unauthorized, got {other:?}"),
        }
    }
    assert!(store.list(&ImageFilter::default()).unwrap().is_empty());
    store.pull(&r, basic("alice", "s3cret")).await.unwrap();
    // The `auth` field form (base64 user:pass), as kubelet may send it.
    let dir2 = tempfile::tempdir().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let rec = open(dir2.path())
        .pull(
            &r,
            Some(Auth {
                auth: b64,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    assert_eq!(rec.repo_tags, vec![r]);
}

/// Two pulls of one image at once, one with wrong credentials: each gets
/// its own answer (the right one is not failed by the other's 401).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_with_other_credentials_do_not_share_a_result() {
    if registry().is_none() {
        return;
    }
    let reg = Registry::start_with_htpasswd("alice", "s3cret").unwrap();
    let img = image_with("creds", Compression::Gzip);
    push(&reg, "private/creds", "v1", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let r = format!("{}/private/creds:v1", reg.addr());
    // Both start before either finishes: the first registers its pull, the
    // second finds it in progress.
    let (wrong, right) = tokio::join!(
        store.pull(&r, basic("alice", "wrong")),
        store.pull(&r, basic("alice", "s3cret")),
    );
    assert!(
        matches!(wrong, Err(ImageError::Unauthorized { .. })),
        "{wrong:?}"
    );
    assert_eq!(right.unwrap().id, img.config_digest);
    assert_eq!(store.stats().joined, 0, "different credentials never join");
    // Same credentials still join.
    store.remove(&r).unwrap();
    let (a, b) = tokio::join!(
        store.pull(&r, basic("alice", "s3cret")),
        store.pull(&r, basic("alice", "s3cret")),
    );
    assert_eq!(a.unwrap().id, b.unwrap().id);
    assert_eq!(store.stats().joined, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_flow() {
    let Some(reg) = registry() else { return };
    let img = image_with("bearer", Compression::Gzip);
    push(&reg, "tok/app", "v1", &img).await;
    let proxy = BearerProxy::start(&reg.addr(), "bob", "hunter2")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let r = format!("{}/tok/app:v1", proxy.addr());
    match store.pull(&r, None).await {
        Err(ImageError::Unauthorized { .. }) => {}
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    match store.pull(&r, basic("bob", "nope")).await {
        Err(ImageError::Unauthorized { reason, .. }) => {
            assert!(reason.contains("authentication failed"), "{reason}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let rec = store.pull(&r, basic("bob", "hunter2")).await.unwrap();
    assert_eq!(rec.id, img.config_digest);
    let reqs = proxy.token_requests.lock().unwrap().clone();
    assert!(
        reqs.iter()
            .any(|q| q.contains("scope=repository%3Atok%2Fapp%3Apull")
                || q.contains("scope=repository:tok/app:pull")),
        "token requests: {reqs:?}"
    );
    assert!(
        reqs.iter().any(|q| q.contains("service=vmpod-test")),
        "{reqs:?}"
    );
}

/// A token that stops working in the middle of a pull (revoked after the
/// manifest, before the blobs) is replaced once: basic credentials and an
/// identity token get a fresh one and the pull completes; a ready-made
/// registry token cannot be renewed, so the pull fails (once, no loop) and
/// stores nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_revoked_mid_pull_is_renewed_once() {
    let Some(reg) = registry() else { return };
    let img = image_with("revoked", Compression::Gzip);
    push(&reg, "tok/app", "v1", &img).await;
    let proxy = BearerProxy::start(&reg.addr(), "bob", "hunter2")
        .await
        .unwrap();
    let r = format!("{}/tok/app:v1", proxy.addr());
    let token_requests = || proxy.token_requests.lock().unwrap().len();

    for (what, auth) in [
        ("basic", basic("bob", "hunter2")),
        (
            "identity token",
            Some(Auth {
                identity_token: proxy.refresh_token().to_string(),
                ..Default::default()
            }),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (revoked, asked) = (proxy.revocations(), token_requests());
        proxy.revoke_token_after(1); // the manifest, then the token is gone
        let rec = store
            .pull(&r, auth)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(rec.id, img.config_digest, "{what}");
        assert_eq!(proxy.revocations(), revoked + 1, "{what}: revoked mid-pull");
        assert!(
            token_requests() >= asked + 2,
            "{what}: a second token was fetched"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let fixed = Some(Auth {
        registry_token: proxy.token(),
        ..Default::default()
    });
    proxy.revoke_token_after(1);
    match store.pull(&r, fixed).await {
        Err(ImageError::Unauthorized { reason, .. }) => {
            assert!(reason.contains("401"), "{reason}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert!(store.list(&ImageFilter::default()).unwrap().is_empty());
}

fn mirrors(host: &str, endpoints: &[String], mirror_only: bool) -> RegistryConfig {
    let mut c = RegistryConfig::default();
    c.mirrors.insert(
        host.to_string(),
        endpoints
            .iter()
            .map(|e| Mirror {
                endpoint: e.clone(),
                mirror_only,
                insecure: false,
                ca: Default::default(),
                skip_verify: false,
            })
            .collect(),
    );
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_k8s_io_through_loopback_mirror_only() {
    let Some(mirror) = registry() else { return };
    let img = image_with("pause", Compression::Gzip);
    push(&mirror, "pause", "3.9", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = mirrors(
        "registry.k8s.io",
        &[format!("http://{}", mirror.addr())],
        true,
    );
    let store = open_with(dir.path(), cfg);
    let rec = store.pull("registry.k8s.io/pause:3.9", None).await.unwrap();
    assert_eq!(rec.id, img.config_digest);
    assert_eq!(rec.repo_tags, vec!["registry.k8s.io/pause:3.9".to_string()]);
    assert_eq!(
        store
            .status("registry.k8s.io/pause:3.9")
            .unwrap()
            .unwrap()
            .id,
        rec.id
    );
    // Missing on the mirror: NotFound, and only the mirror was tried (with
    // mirror_only the original host is not even in the endpoint list; no DNS
    // lookup or connection to registry.k8s.io is attempted).
    match store.pull("registry.k8s.io/missing:1", None).await {
        Err(ImageError::NotFound { detail: m, .. }) => {
            assert!(m.contains(&mirror.addr()), "{m}");
            assert!(
                !m.contains("registry.k8s.io (") && !m.contains("registry.k8s.io:"),
                "{m}"
            );
            assert_eq!(m.matches("; ").count(), 0, "one endpoint tried: {m}");
        }
        other => panic!("{other:?}"),
    }
}

/// Prove "never contact the original" by making the original a real
/// registry whose access log we can read.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_only_never_contacts_original_but_fallback_does() {
    let Some(mirror) = registry() else { return };
    let original = Registry::start().unwrap();
    let img = image_with("mirrored", Compression::Gzip);
    push(&mirror, "team/app", "v1", &img).await;
    push(&original, "team/app", "v1", &img).await;
    push(
        &original,
        "team/only-original",
        "v1",
        &image_with("orig", Compression::Gzip),
    )
    .await;
    let pushes = original.requests().len();

    let dir = tempfile::tempdir().unwrap();
    let cfg = mirrors(&original.addr(), &[mirror.addr()], true);
    let store = open_with(dir.path(), cfg);
    let r = format!("{}/team/app:v1", original.addr());
    let rec = store.pull(&r, None).await.unwrap();
    assert_eq!(
        rec.repo_tags,
        vec![r.clone()],
        "named after the original registry"
    );
    assert!(matches!(
        store
            .pull(&format!("{}/team/only-original:v1", original.addr()), None)
            .await,
        Err(ImageError::NotFound { .. })
    ));
    assert!(mirror
        .requests()
        .iter()
        .any(|(m, p)| m == "GET" && p.contains("/team/app/manifests/")));
    assert_eq!(
        original.requests().len(),
        pushes,
        "original contacted: {:?}",
        &original.requests()[pushes..]
    );

    // Without mirror_only, a miss on the mirror falls back to the original.
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = open_with(
        dir2.path(),
        mirrors(&original.addr(), &[mirror.addr()], false),
    );
    store2
        .pull(&format!("{}/team/only-original:v1", original.addr()), None)
        .await
        .unwrap();
    assert!(
        original.requests().len() > pushes,
        "fallback reached the original"
    );

    // Mirrors are tried in order: a dead first mirror is skipped.
    let dead = format!("127.0.0.1:{}", vmpod_tests::registry::free_port().unwrap());
    let dir3 = tempfile::tempdir().unwrap();
    let store3 = open_with(
        dir3.path(),
        mirrors("registry.k8s.io", &[dead, mirror.addr()], true),
    );
    store3
        .pull("registry.k8s.io/team/app:v1", None)
        .await
        .unwrap();
}

/// A mirror that has the manifest but 404s a layer, or serves a corrupt
/// one: that blob comes from the next endpoint (the next mirror, or the
/// origin when mirror_only is off), the rest from the mirror.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_a_mirror_cannot_serve_comes_from_the_next_endpoint() {
    let Some(broken) = registry() else { return };
    let full = Registry::start().unwrap();
    let img = image_with("partial", Compression::Gzip);
    for reg in [&broken, &full] {
        push(reg, "team/app", "v1", &img).await;
    }
    let missing = img.layers[1].digest.clone();
    broken.unlink_blob("team/app", &missing).unwrap();

    // Origin fallback: `full` is the registry named in the reference.
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), mirrors(&full.addr(), &[broken.addr()], false));
    let before = full.requests().len();
    let rec = store
        .pull(&format!("{}/team/app:v1", full.addr()), None)
        .await
        .unwrap();
    assert_eq!(rec.id, img.config_digest);
    assert!(rec.layer_dirs[1].join("data/partial").is_file());
    let from_full = &full.requests()[before..];
    assert!(
        from_full.iter().all(|(_, p)| !p.contains("/manifests/")),
        "manifest came from the mirror: {from_full:?}"
    );
    assert_eq!(full.blob_gets(&missing), 1, "{from_full:?}");
    assert_eq!(
        full.blob_gets(&img.layers[0].digest),
        0,
        "only the missing blob"
    );
    assert!(
        broken.blob_gets(&missing) >= 1,
        "the mirror was asked first"
    );

    // mirror_only: the next mirror serves it; the origin is never asked.
    let origin = Registry::start().unwrap();
    let name = origin.addr();
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        dir.path(),
        mirrors(&name, &[broken.addr(), full.addr()], true),
    );
    let full_before = full.blob_gets(&missing);
    store
        .pull(&format!("{name}/team/app:v1"), None)
        .await
        .unwrap();
    assert_eq!(full.blob_gets(&missing), full_before + 1);
    assert!(origin.requests().is_empty(), "{:?}", origin.requests());

    // Only the broken mirror, mirror_only: NotFound naming the blob.
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), mirrors(&name, &[broken.addr()], true));
    match store.pull(&format!("{name}/team/app:v1"), None).await {
        Err(ImageError::NotFound { detail, .. }) => assert!(detail.contains(&missing), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert!(store.list(&ImageFilter::default()).unwrap().is_empty());

    // A corrupt layer on the mirror is rejected and fetched again from the
    // next endpoint; the image is whole.
    let corrupt = Registry::start().unwrap();
    push(&corrupt, "team/app", "v1", &img).await;
    corrupt.corrupt_blob(&img.layers[0].digest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), mirrors(&full.addr(), &[corrupt.addr()], false));
    let busybox_before = full.blob_gets(&img.layers[0].digest);
    let rec = store
        .pull(&format!("{}/team/app:v1", full.addr()), None)
        .await
        .unwrap();
    assert!(rec.layer_dirs[0].join("bin/busybox").is_file());
    assert_eq!(full.blob_gets(&img.layers[0].digest), busybox_before + 1);
}

/// The request's credentials are the origin's: a mirror that demands auth
/// gets none of them (no basic credentials at its realm, no identity token
/// POSTed to the realm it names), refuses the anonymous pull, and the pull
/// falls back to the origin, which does get them.
#[tokio::test(flavor = "multi_thread")]
async fn mirrors_never_receive_the_origins_credentials() {
    let Some(backend) = registry() else { return };
    let img = image_with("creds-mirror", Compression::Gzip);
    push(&backend, "team/app", "v1", &img).await;
    // The mirror has the image, behind a bearer realm of its own.
    let mirror = BearerProxy::start(&backend.addr(), "alice", "s3cret")
        .await
        .unwrap();

    // Basic credentials, origin with htpasswd.
    let origin = Registry::start_with_htpasswd("alice", "s3cret").unwrap();
    push(&origin, "team/app", "v1", &img).await;
    let pushes = origin.requests().len();
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), mirrors(&origin.addr(), &[mirror.addr()], false));
    let r = format!("{}/team/app:v1", origin.addr());
    let rec = store.pull(&r, basic("alice", "s3cret")).await.unwrap();
    assert_eq!(rec.id, img.config_digest);
    let seen = mirror.authorizations.lock().unwrap().clone();
    assert!(
        seen.iter().all(|a| !a.starts_with("Basic")),
        "the mirror got basic credentials: {seen:?}"
    );
    assert!(
        !mirror.token_requests.lock().unwrap().is_empty(),
        "the mirror was tried first (anonymously)"
    );
    assert!(
        origin.requests()[pushes..]
            .iter()
            .any(|(m, p)| m == "GET" && p.contains("/team/app/manifests/")),
        "fell back to the origin"
    );

    // An identity token: the origin is a bearer realm that takes it; the
    // mirror's realm never sees a POST with it.
    let origin2 = BearerProxy::start(&backend.addr(), "bob", "hunter2")
        .await
        .unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = open_with(
        dir2.path(),
        mirrors(&origin2.addr(), &[mirror.addr()], false),
    );
    let auth = Auth {
        identity_token: origin2.refresh_token().to_string(),
        ..Default::default()
    };
    let r2 = format!("{}/team/app:v1", origin2.addr());
    store2.pull(&r2, Some(auth)).await.unwrap();
    let mirror_tokens = mirror.token_requests.lock().unwrap().clone();
    assert!(
        mirror_tokens.iter().all(|q| !q.starts_with("POST")),
        "identity token POSTed to the mirror's realm: {mirror_tokens:?}"
    );
    assert!(
        origin2
            .token_requests
            .lock()
            .unwrap()
            .iter()
            .any(|q| q.starts_with("POST grant_type=refresh_token")),
        "the origin exchanged it"
    );
    let seen = mirror.authorizations.lock().unwrap().clone();
    assert!(
        seen.iter().all(|a| !a.starts_with("Basic")),
        "the mirror got credentials: {seen:?}"
    );
}
