//! Unit tests of endpoint selection and credentials.

use super::*;
use crate::types::Mirror;

fn cfg(mirrors: &[(&str, &str, bool)]) -> RegistryConfig {
    let mut c = RegistryConfig {
        insecure: vec!["my.insecure:5000".into()],
        ..Default::default()
    };
    for (reg, ep, only) in mirrors {
        c.mirrors.entry(reg.to_string()).or_default().push(Mirror {
            endpoint: ep.to_string(),
            mirror_only: *only,
            insecure: false,
            ca: Default::default(),
            skip_verify: false,
        });
    }
    c
}

#[test]
fn a_ca_stays_with_its_endpoint() {
    let mut c = cfg(&[
        ("quay.io", "https://m1:5000", false),
        ("quay.io", "m2:5000", false),
    ]);
    c.mirrors.get_mut("quay.io").unwrap()[1].ca = crate::CaCerts::unchecked(&["mirror CA"]);
    c.ca.insert("quay.io".into(), crate::CaCerts::unchecked(&["origin CA"]));
    let e = endpoints(&c, "quay.io").unwrap();
    let names: Vec<(&str, crate::CaCerts)> = e
        .iter()
        .map(|ep| (ep.host.as_str(), ep.ca.clone()))
        .collect();
    assert_eq!(
        names,
        [
            ("m1:5000", crate::CaCerts::default()),
            ("m2:5000", crate::CaCerts::unchecked(&["mirror CA"])),
            ("quay.io", crate::CaCerts::unchecked(&["origin CA"])),
        ]
    );
    // The origin's CA is not another registry's.
    let other = endpoints(&c, "docker.io").unwrap();
    assert!(other[0].ca.is_empty());
}

#[test]
fn mirror_insecure_applies_to_that_mirror_only() {
    let mut c = RegistryConfig::default();
    c.mirrors.insert(
        "docker.io".into(),
        vec![Mirror {
            endpoint: "mirror.internal:5000".into(),
            mirror_only: false,
            insecure: true,
            ca: Default::default(),
            skip_verify: false,
        }],
    );
    c.mirrors.insert(
        "quay.io".into(),
        vec![Mirror {
            endpoint: "mirror.internal:5000".into(),
            mirror_only: false,
            insecure: false,
            ca: Default::default(),
            skip_verify: false,
        }],
    );
    let e = endpoints(&c, "docker.io").unwrap();
    assert!(e[0].mirror && e[0].plain_http, "{e:?}");
    assert!(e.iter().all(|ep| ep.ca.is_empty()), "no CA configured");
    assert!(!e[1].plain_http, "docker.io itself stays HTTPS");
    // The same host as a registry, or as a mirror of another registry
    // without `insecure`: HTTPS.
    assert!(!endpoints(&c, "mirror.internal:5000").unwrap()[0].plain_http);
    assert!(!endpoints(&c, "quay.io").unwrap()[0].plain_http);
    // A registry's own `insecure` does not make it plain HTTP as a mirror.
    c.insecure.push("mirror.internal:5000".into());
    assert!(endpoints(&c, "mirror.internal:5000").unwrap()[0].plain_http);
    assert!(!endpoints(&c, "quay.io").unwrap()[0].plain_http);
}

#[test]
fn endpoint_order_and_schemes() {
    let c = cfg(&[
        ("registry.k8s.io", "http://10.0.0.1:5000", false),
        ("registry.k8s.io", "mirror.example.com", false),
        ("docker.io", "127.0.0.1:5000", true),
    ]);
    let e = endpoints(&c, "registry.k8s.io").unwrap();
    assert_eq!(e.len(), 3);
    assert_eq!(
        (e[0].host.as_str(), e[0].plain_http, e[0].mirror),
        ("10.0.0.1:5000", true, true)
    );
    assert_eq!(
        (e[1].host.as_str(), e[1].plain_http),
        ("mirror.example.com", false)
    );
    assert_eq!(
        (e[2].host.as_str(), e[2].mirror, e[2].plain_http),
        ("registry.k8s.io", false, false)
    );
    // mirror_only: the original host is not in the list at all.
    let e = endpoints(&c, "docker.io").unwrap();
    assert_eq!(e.len(), 1);
    assert!(e[0].mirror && e[0].plain_http);
    // Plain HTTP: loopback always, others only when insecure.
    assert!(endpoints(&c, "localhost:5000").unwrap()[0].plain_http);
    assert!(endpoints(&c, "127.0.0.1:40000").unwrap()[0].plain_http);
    assert!(endpoints(&c, "my.insecure:5000").unwrap()[0].plain_http);
    assert!(!endpoints(&c, "quay.io").unwrap()[0].plain_http);
    assert!(endpoints(&cfg(&[("x.io", "ftp://a", false)]), "x.io").is_err());
    assert!(endpoints(&cfg(&[("x.io", "http://a/path", false)]), "x.io").is_err());
}

#[test]
fn loopback_is_parsed_not_prefix_matched() {
    for h in [
        "127.0.0.1",
        "127.0.0.1:5000",
        "127.1.2.3:443",
        "localhost",
        "localhost:5000",
        "LocalHost:1",
        "[::1]",
        "[::1]:5000",
        "::1",
        "[::ffff:127.0.0.1]:80",
    ] {
        assert!(is_loopback(h), "{h} is loopback");
    }
    for h in [
        "127.corp.example",
        "127.corp.example:5000",
        "127.0.0.1.nip.io",
        "localhost.evil.example",
        "mylocalhost:5000",
        "10.0.0.1:5000",
        "[::2]:5000",
        "[::1]x",
        "[::1]5000",
        "127.0.0.1:notaport",
        "",
    ] {
        assert!(!is_loopback(h), "{h} is not loopback");
    }
    let c = RegistryConfig::default();
    assert!(!endpoints(&c, "127.corp.example:5000").unwrap()[0].plain_http);
    assert!(endpoints(&c, "[::1]:5000").unwrap()[0].plain_http);
}

#[test]
fn credentials() {
    let basic = |c: Creds| match c {
        Creds::Fixed(RegistryAuth::Basic(u, p)) => (u, p),
        _ => panic!("not basic"),
    };
    assert!(matches!(
        registry_auth(None).unwrap(),
        Creds::Fixed(RegistryAuth::Anonymous)
    ));
    let a = Auth {
        auth: base64::engine::general_purpose::STANDARD.encode("u:p:x"),
        ..Default::default()
    };
    assert_eq!(
        basic(registry_auth(Some(&a)).unwrap()),
        ("u".into(), "p:x".into())
    );
    let a = Auth {
        auth: "!!!".into(),
        ..Default::default()
    };
    assert!(matches!(
        registry_auth(Some(&a)),
        Err(ImageError::Unauthorized { .. })
    ));
    let a = Auth {
        registry_token: "tok".into(),
        ..Default::default()
    };
    assert!(matches!(
        registry_auth(Some(&a)).unwrap(),
        Creds::Fixed(RegistryAuth::Bearer(_))
    ));
    // containerd's order: username/password, identity token, auth.
    let a = Auth {
        identity_token: "refresh".into(),
        auth: base64::engine::general_purpose::STANDARD.encode("u:p"),
        ..Default::default()
    };
    assert!(matches!(registry_auth(Some(&a)).unwrap(), Creds::Refresh(t) if t == "refresh"));
    let a = Auth {
        username: "u".into(),
        password: "p".into(),
        identity_token: "refresh".into(),
        ..Default::default()
    };
    assert_eq!(
        basic(registry_auth(Some(&a)).unwrap()),
        ("u".into(), "p".into())
    );
}
