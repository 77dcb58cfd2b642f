//! CRI ↔ vmpod types. Pure functions, no I/O.

use std::collections::HashMap;

use k8s_cri::v1 as cri;
use sha2::{Digest, Sha256};
use vmpod_images::{Auth, FsUsage, ImageRecord};

/// `AuthConfig` → our credentials; `None` when nothing was given.
/// `server_address` is ignored: credentials apply to the image's registry.
pub fn auth(a: Option<cri::AuthConfig>) -> Option<Auth> {
    let a = a?;
    let auth = Auth {
        username: a.username,
        password: a.password,
        auth: a.auth,
        identity_token: a.identity_token,
        registry_token: a.registry_token,
    };
    (auth != Auth::default()).then_some(auth)
}

/// The image name in an `ImageSpec`, trimmed; `None` if absent or blank.
pub fn image_name(spec: Option<&cri::ImageSpec>) -> Option<String> {
    let name = spec?.image.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// `busybox` / `ghcr.io/x/y` (no tag, no digest) → the normalised
/// repository (`docker.io/library/busybox`); `None` for anything else.
pub fn bare_repository(name: &str) -> Option<String> {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || name.contains('@') {
        return None;
    }
    vmpod_images::ImageRef::parse(name).ok().map(|r| r.name())
}

/// Does any tag or digest of `r` belong to repository `repo`?
pub fn in_repository(r: &ImageRecord, repo: &str) -> bool {
    r.repo_tags.iter().chain(&r.repo_digests).any(|n| {
        let without_digest = n.split('@').next().unwrap_or(n);
        let slash = without_digest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let name = match without_digest[slash..].rfind(':') {
            Some(i) => &without_digest[..slash + i],
            None => without_digest,
        };
        name == repo
    })
}

/// A stored image as CRI reports it (containerd's shape).
pub fn image(r: &ImageRecord) -> cri::Image {
    cri::Image {
        id: r.id.clone(),
        repo_tags: r.repo_tags.clone(),
        repo_digests: r.repo_digests.clone(),
        size: r.size,
        // CRI: uid is set only for a numeric user, username only otherwise.
        uid: r.uid.map(|value| cri::Int64Value { value }),
        username: if r.uid.is_some() {
            String::new()
        } else {
            r.username.clone()
        },
        spec: Some(cri::ImageSpec {
            image: r.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// `ImageStatus` verbose `info`: `{"info": "<json>"}` with the image config
/// and chain ID, as containerd returns it (crictl inspecti prints it).
pub fn image_verbose_info(r: &ImageRecord) -> HashMap<String, String> {
    let config = serde_json::from_str::<serde_json::Value>(&r.config_json)
        .unwrap_or_else(|_| serde_json::Value::String(r.config_json.clone()));
    let info = serde_json::json!({
        "imageSpec": config,
        "chainID": chain_id(&r.layers),
        "size": r.size,
        "layerDirs": r.layer_dirs,
    });
    HashMap::from([("info".to_string(), info.to_string())])
}

/// OCI chain ID of the top layer: ChainID(L0) = DiffID(L0),
/// ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut it = diff_ids.iter();
    let Some(first) = it.next() else {
        return String::new();
    };
    it.fold(first.clone(), |acc, d| {
        let sum = Sha256::digest(format!("{acc} {d}").as_bytes());
        format!("sha256:{}", hex(&sum))
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Usage of one filesystem as CRI reports it.
pub fn fs_usage(mountpoint: &std::path::Path, u: FsUsage) -> cri::FilesystemUsage {
    cri::FilesystemUsage {
        timestamp: u.timestamp_ns,
        fs_id: Some(cri::FilesystemIdentifier {
            mountpoint: mountpoint.display().to_string(),
        }),
        used_bytes: Some(cri::UInt64Value {
            value: u.used_bytes,
        }),
        inodes_used: Some(cri::UInt64Value {
            value: u.inodes_used,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ImageRecord {
        ImageRecord {
            id: "sha256:abc".into(),
            repo_tags: vec!["docker.io/library/busybox:latest".into()],
            repo_digests: vec!["docker.io/library/busybox@sha256:def".into()],
            size: 1234,
            uid: Some(0),
            username: "root".into(),
            config_json: r#"{"architecture":"amd64","config":{"User":"0"}}"#.into(),
            layers: vec!["sha256:l0".into()],
            layer_dirs: vec!["/var/lib/vmpod/images/layers/l0".into()],
        }
    }

    #[test]
    fn image_uid_xor_username() {
        let i = image(&record());
        assert_eq!(i.uid, Some(cri::Int64Value { value: 0 }));
        assert_eq!(i.username, "");
        assert_eq!(i.size, 1234);
        let mut r = record();
        r.uid = None;
        r.username = "nobody".into();
        let i = image(&r);
        assert_eq!(i.uid, None);
        assert_eq!(i.username, "nobody");
    }

    #[test]
    fn verbose_info_is_json_with_the_image_config() {
        let info = image_verbose_info(&record());
        let v: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
        assert_eq!(v["imageSpec"]["architecture"], "amd64");
        assert_eq!(v["chainID"], "sha256:l0");
        assert_eq!(v["size"], 1234);
    }

    #[test]
    fn chain_id_follows_the_oci_definition() {
        // ChainID(L0|L1) = sha256("sha256:a sha256:b")
        let expected = format!("sha256:{}", hex(&Sha256::digest(b"sha256:a sha256:b")));
        assert_eq!(chain_id(&["sha256:a".into(), "sha256:b".into()]), expected);
        assert_eq!(chain_id(&[]), "");
    }

    #[test]
    fn bare_repository_matches_every_tag() {
        assert_eq!(
            bare_repository("busybox").as_deref(),
            Some("docker.io/library/busybox")
        );
        assert_eq!(
            bare_repository("127.0.0.1:5000/a/b").as_deref(),
            Some("127.0.0.1:5000/a/b")
        );
        assert_eq!(bare_repository("busybox:1.36"), None);
        assert_eq!(bare_repository("busybox@sha256:abc"), None);
        let r = record();
        assert!(in_repository(&r, "docker.io/library/busybox"));
        assert!(!in_repository(&r, "docker.io/library/busy"));
        let mut r = record();
        r.repo_tags.clear();
        assert!(
            in_repository(&r, "docker.io/library/busybox"),
            "by digest name"
        );
    }

    #[test]
    fn empty_auth_is_none() {
        assert_eq!(auth(None), None);
        assert_eq!(auth(Some(cri::AuthConfig::default())), None);
        let a = auth(Some(cri::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            server_address: "ignored".into(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!((a.username.as_str(), a.password.as_str()), ("u", "p"));
    }

    #[test]
    fn image_name_trims_and_rejects_blank() {
        let spec = |s: &str| cri::ImageSpec {
            image: s.into(),
            ..Default::default()
        };
        assert_eq!(image_name(Some(&spec(" busybox "))), Some("busybox".into()));
        assert_eq!(image_name(Some(&spec("  "))), None);
        assert_eq!(image_name(None), None);
    }
}
