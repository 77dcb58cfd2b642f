//! Plain data types shared with the CRI layer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Credentials from the CRI `AuthConfig`.
///
/// Used in containerd's order: `username`/`password` for HTTP basic auth
/// and for the bearer-token realm; else `identity_token`, an OAuth2 refresh
/// token exchanged at the token realm for an access token; else `auth`
/// (base64 "user:pass") like `username`/`password`; else `registry_token`,
/// sent as a ready bearer token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Auth {
    pub username: String,
    pub password: String,
    /// base64("user:pass"), as kubelet sometimes sends it.
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

/// Registry settings (from the daemon config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Registry hosts (host[:port]) that may be reached over plain HTTP when
    /// pulled from as registries (not as mirrors: see [`Mirror::insecure`]).
    /// `localhost` and loopback IPs (any port) always use plain HTTP.
    pub insecure: Vec<String>,
    /// Per registry host: mirrors to try first, in order (e.g.
    /// `registry.k8s.io` -> [`http://127.0.0.1:5000`]). The key is the host
    /// as it appears in the normalised reference (`docker.io` for Docker Hub).
    pub mirrors: BTreeMap<String, Vec<Mirror>>,
    /// Per registry host: CA certificates trusted, besides the system's,
    /// when that host is contacted as a registry (not as a mirror: see
    /// [`Mirror::ca`]).
    pub ca: BTreeMap<String, crate::CaCerts>,
    /// Registry hosts whose certificates are not checked at all (as a
    /// registry, not as a mirror: see [`Mirror::skip_verify`]).
    pub skip_verify: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port]`, optionally with an `http://` / `https://` scheme.
    /// Without a scheme: plain HTTP for loopback hosts and when `insecure`,
    /// HTTPS otherwise.
    pub endpoint: String,
    /// Plain HTTP allowed to this mirror endpoint (only to it: not to the
    /// same host as a registry, nor as another registry's mirror).
    pub insecure: bool,
    /// When set on any mirror of a host, the original host is never contacted.
    pub mirror_only: bool,
    /// CA certificates trusted, besides the system's, for this endpoint.
    pub ca: crate::CaCerts,
    /// Accept any certificate from this endpoint (no chain or name check).
    pub skip_verify: bool,
}

/// One stored image, as the CRI layer needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// `sha256:<config digest>` (the image ID, as containerd reports it).
    pub id: String,
    /// Normalised, e.g. `docker.io/library/busybox:latest`.
    pub repo_tags: Vec<String>,
    /// e.g. `docker.io/library/busybox@sha256:...` (manifest digest).
    pub repo_digests: Vec<String>,
    /// Sum of compressed layer sizes + config + manifest (what containerd reports).
    pub size: u64,
    /// From the image config `User`: numeric uid if numeric, else username.
    pub uid: Option<i64>,
    pub username: String,
    /// Raw OCI image config JSON (for `verbose` and for building container specs).
    pub config_json: String,
    /// Layer diff IDs in order (bottom first).
    pub layers: Vec<String>,
    /// Unpacked layer directories (bottom first), usable as overlayfs lowerdirs
    /// (overlayfs wants them top first: reverse before joining with `:`).
    pub layer_dirs: Vec<PathBuf>,
}

/// Bytes and inodes used by a directory tree (the image store, or the
/// containers' directory in `ImageFsInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsUsage {
    pub timestamp_ns: i64,
    pub used_bytes: u64,
    pub inodes_used: u64,
}

impl FsUsage {
    /// Measure `root` now, as `du` counts: allocated blocks and inodes,
    /// symlinks not followed, hard links once. A missing root (or entries
    /// removed while walking) count as empty. Blocking: walks the tree.
    pub fn measure(root: &Path) -> std::io::Result<FsUsage> {
        let (used_bytes, inodes_used) = crate::unpack::tree_usage(root)?;
        Ok(FsUsage {
            timestamp_ns: now_ns(),
            used_bytes,
            inodes_used,
        })
    }
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Filter for `list`.
#[derive(Debug, Clone, Default)]
pub struct ImageFilter {
    /// Match by ID, tag, digest or short name (as `status` resolves it).
    pub image: Option<String>,
}

/// Counters since the store was opened (for tests and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PullStats {
    /// Pull operations that went to a registry (deduplicated joins excluded).
    pub pulls: u64,
    /// Pull calls that joined a pull of the same reference already running.
    pub joined: u64,
    /// Blobs (manifests excluded) downloaded from registries.
    pub blobs_downloaded: u64,
    /// Bytes of those blobs.
    pub bytes_downloaded: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_counts_files_dirs_and_hardlinks_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(d.path().join("sub/a"), d.path().join("b")).unwrap();
        let u = FsUsage::measure(d.path()).unwrap();
        assert_eq!(u.inodes_used, 3, "root, sub, one file");
        assert!(u.used_bytes >= 64 * 1024, "{u:?}");
        assert!(u.timestamp_ns > 0);
        let missing = FsUsage::measure(&d.path().join("missing")).unwrap();
        assert_eq!((missing.inodes_used, missing.used_bytes), (0, 0));
    }
}
