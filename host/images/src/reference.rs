//! Image reference parsing and normalisation, following the rules containerd
//! (and Docker's `ParseNormalizedNamed`) apply:
//!
//! * `busybox` -> `docker.io/library/busybox:latest`
//! * `foo/bar` -> `docker.io/foo/bar:latest`
//! * the first path component is a registry host when it contains `.` or `:`
//!   or is `localhost` (`localhost:5000/x`, `registry.k8s.io/pause`)
//! * `index.docker.io` is spelled `docker.io`
//! * no tag and no digest -> tag `latest`; a digest alone gets no tag
//! * `name:tag@sha256:...` drops the tag, as containerd's `ParseDockerRef`
//!   does: the digest alone names the image (the tag is still validated)
//! * repository paths must be lowercase.

use std::fmt;

use crate::error::{ImageError, Result};

pub const DOCKER_HUB: &str = "docker.io";
const MAX_NAME_LEN: usize = 255;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host (`docker.io`, `registry.k8s.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/busybox`).
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parse and normalise `s`.
    pub fn parse(s: &str) -> Result<ImageRef> {
        let bad = |reason: &str| ImageError::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(bad("empty reference"));
        }
        if s.trim() != s {
            return Err(bad("surrounding whitespace"));
        }
        if s.contains("://") {
            return Err(bad("a reference has no URL scheme"));
        }
        // Digest part.
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                validate_digest(d).map_err(|e| bad(&e))?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // Tag: a ':' after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let (n, t) = rest.split_at(last_slash + i);
                let t = &t[1..];
                validate_tag(t).map_err(|e| bad(&e))?;
                (n, Some(t.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(bad("empty repository name"));
        }
        // Registry host detection.
        let (mut registry, mut repository) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), remainder.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry == "index.docker.io" {
            registry = DOCKER_HUB.to_string();
        }
        validate_registry(&registry).map_err(|e| bad(&e))?;
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        validate_repository(&repository).map_err(|e| bad(&e))?;
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(bad("repository name longer than 255 characters"));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            // `name:tag@digest` is `name@digest` (containerd's
            // ParseDockerRef): the tag would name content we never
            // resolved, so it is not recorded.
            (_, Some(_)) => None,
            (Some(_), None) => tag,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `registry/repository:tag`, if tagged.
    pub fn tagged(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// `registry/repository@digest` for the given manifest digest.
    pub fn digested(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }

    /// What to ask the registry for: the digest if there is one, else the tag.
    pub fn remote_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `sha256:<64 lowercase hex>` (the only algorithm we store).
pub fn validate_digest(d: &str) -> std::result::Result<(), String> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(format!("digest {d:?} has no algorithm"));
    };
    if algo != "sha256" {
        return Err(format!("unsupported digest algorithm {algo:?}"));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!("digest {d:?} is not 64 lowercase hex characters"));
    }
    Ok(())
}

fn validate_tag(t: &str) -> std::result::Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && t.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("invalid tag {t:?}"))
    }
}

fn validate_registry(r: &str) -> std::result::Result<(), String> {
    let (host, port) = if r.starts_with('[') {
        // [v6addr] or [v6addr]:port
        let end = r
            .find(']')
            .ok_or_else(|| format!("invalid registry host {r:?}"))?;
        match &r[end + 1..] {
            "" => (&r[..=end], None),
            rest => match rest.strip_prefix(':') {
                Some(p) => (&r[..=end], Some(p)),
                None => return Err(format!("invalid registry host {r:?}")),
            },
        }
    } else {
        match r.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (r, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid registry port in {r:?}"));
        }
    }
    let host_ok = if host.starts_with('[') && host.ends_with(']') {
        host[1..host.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    };
    if host_ok {
        Ok(())
    } else {
        Err(format!("invalid registry host {r:?}"))
    }
}

/// Path components: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, joined by `/`.
fn validate_repository(repo: &str) -> std::result::Result<(), String> {
    for comp in repo.split('/') {
        if !component_ok(comp) {
            if comp.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(format!("repository name {repo:?} must be lowercase"));
            }
            return Err(format!("invalid repository path component {comp:?}"));
        }
    }
    Ok(())
}

fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // Separator run: ".", "_", "__" or "-+".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// True if `s` looks like an image ID or ID prefix (hex, optionally with
/// `sha256:`), as `crictl inspecti <id>` passes it.
pub fn as_id_prefix(s: &str) -> Option<&str> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    let ok = !hex.is_empty()
        && hex.len() <= 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then_some(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        ImageRef::parse(s).unwrap().to_string()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn short_names_go_to_docker_hub_library() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("foo/bar"), "docker.io/foo/bar:latest");
        assert_eq!(
            norm("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            norm("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(norm("a/b/c"), "docker.io/a/b/c:latest");
    }

    #[test]
    fn registry_host_detection() {
        let r = ImageRef::parse("localhost:5000/foo").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost:5000", "foo")
        );
        let r = ImageRef::parse("localhost/foo:1").unwrap();
        assert_eq!(r.registry, "localhost");
        let r = ImageRef::parse("registry.k8s.io/pause:3.9").unwrap();
        assert_eq!(r.registry, "registry.k8s.io");
        assert_eq!(r.repository, "pause");
        assert_eq!(r.tag.as_deref(), Some("3.9"));
        let r = ImageRef::parse("127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "a/b");
        let r = ImageRef::parse("[::1]:5000/foo").unwrap();
        assert_eq!(r.registry, "[::1]:5000");
        assert_eq!(ImageRef::parse("[::1]/foo").unwrap().registry, "[::1]");
        assert!(ImageRef::parse("[::1]x/foo").is_err());
        assert!(ImageRef::parse("[zz]:5000/foo").is_err());
        // No dot/colon and not localhost: a Docker Hub namespace.
        assert_eq!(norm("myhost/foo"), "docker.io/myhost/foo:latest");
    }

    #[test]
    fn digests_and_tags() {
        let r = ImageRef::parse(&format!("busybox@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{D}"));
        assert_eq!(r.remote_ref(), D);
        // name:tag@digest normalises to name@digest (containerd's ParseDockerRef).
        let r = ImageRef::parse(&format!("localhost:5000/x:v2@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.remote_ref(), D);
        assert_eq!(r.tagged(), None);
        assert_eq!(r.to_string(), format!("localhost:5000/x@{D}"));
        assert_eq!(r.digested(D), format!("localhost:5000/x@{D}"));
        assert_eq!(
            norm(&format!("busybox:1.36@{D}")),
            norm(&format!("busybox@{D}"))
        );
        // The dropped tag must still be a valid one.
        assert!(ImageRef::parse(&format!("busybox:-bad@{D}")).is_err());
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            " busybox",
            "Busybox",
            "docker.io/Library/busybox",
            "busybox:",
            "busybox:-tag",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "http://registry/x",
            "foo//bar",
            "foo/bar/",
            "localhost:abc/foo",
            "-foo",
            "foo..bar",
            "foo___bar",
            &format!("busybox:{}", "a".repeat(129)),
            &format!("x.io/{}", "a".repeat(260)),
        ] {
            match ImageRef::parse(bad) {
                Err(ImageError::InvalidReference { .. }) => {}
                other => panic!("{bad:?} should be invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn separators_in_components() {
        assert!(ImageRef::parse("x/a.b_c__d--e/f-g").is_ok());
        assert!(ImageRef::parse("foo__bar").is_ok());
    }

    #[test]
    fn id_prefixes() {
        assert_eq!(as_id_prefix("sha256:abc"), Some("abc"));
        assert_eq!(as_id_prefix("abc123"), Some("abc123"));
        assert_eq!(as_id_prefix("busybox"), None);
    }
}
