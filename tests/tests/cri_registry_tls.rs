//! Registries behind HTTPS with a private CA, through a real `vmpod serve`:
//! `ca_file` on a mirror endpoint makes its certificate trusted; without it
//! the same endpoint is refused; `skip_verify` accepts it unchecked; a bad
//! `ca_file` stops the daemon at start.
//! The HTTPS registry is Debian's docker-registry with a certificate for
//! 127.0.0.1 signed by a CA the test makes with the `openssl` command.

use tonic::Code;
use vmpod_tests::cri_client::{serve_expect_exit, Daemon};
use vmpod_tests::oci_image::{Compression, ImageBuilder, Layer, Pusher};
use vmpod_tests::registry::{self, Registry, TestCa};

fn mirror_config(endpoint: &str, ca_file: Option<&std::path::Path>) -> String {
    let ca = ca_file
        .map(|p| format!(", ca_file = \"{}\"", p.display()))
        .unwrap_or_default();
    format!(
        "[registries.\"registry.k8s.io\"]\nmirror_only = true\n\
         mirrors = [{{ endpoint = \"https://{endpoint}\"{ca} }}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_mirror_with_a_private_ca_needs_its_ca_file_or_skip_verify() {
    if let Some(why) = registry::skip_reason() {
        eprintln!("skipping: {why}");
        return;
    }
    let plain = Registry::start().unwrap();
    let img = ImageBuilder::new()
        .layer(Layer::busybox(Compression::Gzip).unwrap())
        .build();
    Pusher::new(&plain.addr(), None)
        .push_image("pause", Some("3.9"), &img)
        .await
        .unwrap();
    let ca = TestCa::new().unwrap();
    let tls = plain.tls_view(&ca).unwrap();

    // Without the CA the endpoint's certificate is not trusted: the pull
    // fails saying so, and nothing is stored.
    let d = Daemon::start(&mirror_config(&tls.addr(), None)).unwrap();
    let mut c = d.client().await.unwrap();
    let err = c.pull("registry.k8s.io/pause:3.9", None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&tls.addr()) && err.message().contains("certificate"),
        "{}",
        err.message()
    );
    assert!(c.list(None).await.unwrap().is_empty());
    drop(d);

    // With `ca_file` the same endpoint serves the pull, over HTTPS.
    let d = Daemon::start(&mirror_config(&tls.addr(), Some(&ca.ca_cert))).unwrap();
    let mut c = d.client().await.unwrap();
    let id = c.pull("registry.k8s.io/pause:3.9", None).await.unwrap();
    assert_eq!(id, img.config_digest);
    assert!(
        tls.requests()
            .iter()
            .any(|(_, p)| p == "/v2/pause/manifests/3.9"),
        "served by the HTTPS registry"
    );
    // `skip_verify` accepts the certificate without any CA (and says so
    // in the daemon's log).
    drop(d);
    let config = format!(
        "[registries.\"registry.k8s.io\"]\nmirror_only = true\n\
         mirrors = [{{ endpoint = \"https://{}\", skip_verify = true }}]\n",
        tls.addr()
    );
    let d = Daemon::start(&config).unwrap();
    let mut c = d.client().await.unwrap();
    assert_eq!(
        c.pull("registry.k8s.io/pause:3.9", None).await.unwrap(),
        img.config_digest
    );
    assert!(
        d.log()
            .contains("skip_verify: certificates of this mirror are not checked"),
        "{}",
        d.log()
    );

    // The CA is trusted for that endpoint only: the same registry named
    // directly over HTTPS (as a mirror of another host, no ca_file) is not.
    drop(d);
    let config = format!(
        "{}\n[registries.\"quay.io\"]\nmirror_only = true\n\
         mirrors = [{{ endpoint = \"https://{}\" }}]\n",
        mirror_config(&tls.addr(), Some(&ca.ca_cert)),
        tls.addr()
    );
    let d = Daemon::start(&config).unwrap();
    let mut c = d.client().await.unwrap();
    let err = c.pull("quay.io/pause:3.9", None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    c.pull("registry.k8s.io/pause:3.9", None).await.unwrap();
}

#[test]
fn a_bad_ca_file_stops_the_daemon_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    for (ca_file, needle) in [
        (junk.display().to_string(), "no PEM certificate"),
        ("/nonexistent/ca.pem".to_string(), "cannot read"),
    ] {
        let config = format!(
            "[registries.\"registry.k8s.io\"]\n\
             mirrors = [{{ endpoint = \"https://mirror.example:5000\", ca_file = \"{ca_file}\" }}]\n"
        );
        let out = serve_expect_exit(dir.path(), &config).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("registries.\"registry.k8s.io\".mirrors[0].ca_file")
                && stderr.contains(needle),
            "{stderr}"
        );
    }
}
