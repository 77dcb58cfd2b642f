//! Talking to registries, on top of `oci-client`: endpoint selection
//! (mirrors, plain HTTP), credentials, manifests and blob streams, and
//! mapping `oci-client` errors onto [`ImageError`].
//!
//! Endpoints for a reference are: each configured mirror of its registry
//! host, in order, then the original host unless a mirror has
//! `mirror_only`. The first endpoint that serves the manifest is used for
//! the whole pull. Mirrors are addressed with `oci-client`'s mirror support
//! (the original host goes along only as the `?ns=` query parameter; no
//! connection is made to it).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{manifest, Client, Reference, RegistryOperation};
use tracing::{info, warn};

use crate::content::BlobSink;
use crate::error::{ImageError, Result};
use crate::reference::ImageRef;
use crate::types::{Auth, RegistryConfig};

/// Log download progress every this many bytes of a blob.
const PROGRESS_EVERY: u64 = 32 << 20;

/// Manifest media types we accept.
pub const MANIFEST_TYPES: &[&str] = &[
    manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    manifest::OCI_IMAGE_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_MEDIA_TYPE,
];

/// One place we may pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` to connect to.
    pub host: String,
    pub plain_http: bool,
    pub mirror: bool,
}

/// Is `host[:port]` a loopback address or `localhost`, which always get
/// plain HTTP? The host is parsed as an IP address (127.0.0.0/8, `[::1]`),
/// so a name that merely starts with `127.` is not loopback.
pub(crate) fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, "")) => ip,
            Some((ip, tail)) if tail.strip_prefix(':').is_some_and(is_port) => ip,
            _ => return false,
        }
    } else if host.parse::<IpAddr>().is_ok() {
        host // an IPv6 address without brackets or port
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if is_port(port) => h,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

fn is_port(s: &str) -> bool {
    s.parse::<u16>().is_ok()
}

/// The endpoints to try for `registry`, in order.
pub fn endpoints(cfg: &RegistryConfig, registry: &str) -> Result<Vec<Endpoint>> {
    let insecure = |h: &str| is_loopback(h) || cfg.insecure.iter().any(|i| i == h);
    let mut out = Vec::new();
    let mut mirror_only = false;
    for m in cfg.mirrors.get(registry).into_iter().flatten() {
        mirror_only |= m.mirror_only;
        let (scheme, rest) = match m.endpoint.split_once("://") {
            Some((s, r)) => (Some(s), r),
            None => (None, m.endpoint.as_str()),
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(ImageError::registry(
                registry,
                format!(
                    "mirror endpoint {:?} must be [scheme://]host[:port]",
                    m.endpoint
                ),
            ));
        }
        let plain_http = match scheme {
            Some("http") => true,
            Some("https") => false,
            None => insecure(host),
            Some(s) => {
                return Err(ImageError::registry(
                    registry,
                    format!("mirror endpoint {:?}: unknown scheme {s:?}", m.endpoint),
                ))
            }
        };
        out.push(Endpoint {
            host: host.to_string(),
            plain_http,
            mirror: true,
        });
    }
    if !mirror_only {
        out.push(Endpoint {
            host: registry.to_string(),
            plain_http: insecure(registry),
            mirror: false,
        });
    }
    Ok(out)
}

/// Credentials for a pull.
#[derive(Clone)]
pub enum Creds {
    /// Used as they are at every endpoint.
    Fixed(RegistryAuth),
    /// An OAuth2 refresh token (CRI `identity_token`), exchanged at each
    /// endpoint's token realm for an access token ([`crate::oauth`]).
    Refresh(String),
}

/// `Auth` from CRI -> credentials, in containerd's order (its CRI
/// `ParseAuth`): `username`/`password`, then `identity_token`, then `auth`
/// (base64 `user:pass`), then `registry_token` (a ready bearer token).
pub fn registry_auth(auth: Option<&Auth>) -> Result<Creds> {
    let Some(a) = auth else {
        return Ok(Creds::Fixed(RegistryAuth::Anonymous));
    };
    if !a.username.is_empty() || !a.password.is_empty() {
        return Ok(Creds::Fixed(RegistryAuth::Basic(
            a.username.clone(),
            a.password.clone(),
        )));
    }
    if !a.identity_token.is_empty() {
        return Ok(Creds::Refresh(a.identity_token.clone()));
    }
    if !a.auth.is_empty() {
        let bad = |why: &str| ImageError::Unauthorized {
            reference: String::new(),
            reason: format!("auth field is not base64(user:password): {why}"),
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|e| bad(&e.to_string()))?;
        let s = String::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
        let (u, p) = s.split_once(':').ok_or_else(|| bad("no ':'"))?;
        return Ok(Creds::Fixed(RegistryAuth::Basic(
            u.to_string(),
            p.to_string(),
        )));
    }
    if !a.registry_token.is_empty() {
        return Ok(Creds::Fixed(RegistryAuth::Bearer(a.registry_token.clone())));
    }
    Ok(Creds::Fixed(RegistryAuth::Anonymous))
}

/// The credentials to use at `ep`: fixed ones as they are; a refresh token
/// exchanged there for an access token.
async fn creds_for(shown: &str, ep: &Endpoint, repo: &str, creds: &Creds) -> Result<RegistryAuth> {
    match creds {
        Creds::Fixed(c) => Ok(c.clone()),
        Creds::Refresh(t) => Ok(
            match crate::oauth::access_token(shown, ep, repo, t).await? {
                Some(token) => RegistryAuth::Bearer(token),
                None => RegistryAuth::Anonymous,
            },
        ),
    }
}

/// A connection to the endpoint that answered for one image.
pub struct Remote {
    client: Client,
    reference: Reference,
    pub endpoint: Endpoint,
    /// For error messages: the normalised reference.
    shown: String,
}

impl Remote {
    /// Try each endpoint until one serves the top-level manifest of `r`.
    /// Returns the session and the raw manifest bytes.
    pub async fn open(
        cfg: &RegistryConfig,
        r: &ImageRef,
        auth: Option<&Auth>,
    ) -> Result<(Remote, Vec<u8>)> {
        let shown = r.to_string();
        let creds = registry_auth(auth).map_err(|e| match e {
            ImageError::Unauthorized { reason, .. } => ImageError::Unauthorized {
                reference: shown.clone(),
                reason,
            },
            e => e,
        })?;
        let eps = endpoints(cfg, &r.registry)?;
        let mut failures: Vec<(Endpoint, ImageError)> = Vec::new();
        for ep in eps {
            let mut reference = match (&r.tag, &r.digest) {
                (_, Some(d)) => {
                    Reference::with_digest(r.registry.clone(), r.repository.clone(), d.clone())
                }
                (Some(t), None) => {
                    Reference::with_tag(r.registry.clone(), r.repository.clone(), t.clone())
                }
                (None, None) => {
                    Reference::with_tag(r.registry.clone(), r.repository.clone(), "latest".into())
                }
            };
            if ep.mirror {
                reference.set_mirror_registry(ep.host.clone());
            }
            let protocol = if ep.plain_http {
                ClientProtocol::HttpsExcept(vec![reference.resolve_registry().to_string()])
            } else {
                ClientProtocol::Https
            };
            let client = Client::new(ClientConfig {
                protocol,
                connect_timeout: Some(std::time::Duration::from_secs(10)),
                read_timeout: Some(std::time::Duration::from_secs(60)),
                ..Default::default()
            });
            let scheme = if ep.plain_http { "http" } else { "https" };
            info!(image = %shown, endpoint = %format!("{scheme}://{}", ep.host), mirror = ep.mirror, "resolving");
            let attempt = async {
                let creds = creds_for(&shown, &ep, &r.repository, &creds).await?;
                client
                    .auth(&reference, &creds, RegistryOperation::Pull)
                    .await
                    .map_err(|e| map_err(&shown, &ep, e))?;
                client
                    .pull_manifest_raw(&reference, &creds, MANIFEST_TYPES)
                    .await
                    .map_err(|e| map_err(&shown, &ep, e))
            };
            match attempt.await {
                Ok((bytes, _digest)) => {
                    let remote = Remote {
                        client,
                        reference,
                        endpoint: ep,
                        shown: shown.clone(),
                    };
                    return Ok((remote, bytes.to_vec()));
                }
                Err(e) => {
                    warn!(image = %shown, endpoint = %ep.host, error = %e, "endpoint failed");
                    failures.push((ep, e));
                }
            }
        }
        Err(summarise(&shown, failures))
    }

    /// The normalised reference this session pulls.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Fetch a manifest by digest from the same repository.
    pub async fn manifest(&self, digest: &str) -> Result<Vec<u8>> {
        let r = self.reference.clone_with_digest(digest.to_string());
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&r, &RegistryAuth::Anonymous, MANIFEST_TYPES)
            .await
            .map_err(|e| map_err(&self.shown, &self.endpoint, e))?;
        Ok(bytes.to_vec())
    }

    /// Stream blob `digest` into `w` (which verifies it on commit).
    /// Stops early (with an error) once `abort` is set, or once the
    /// registry sends more than the descriptor's `declared_size` bytes (a
    /// broken or hostile registry must not fill the disk before the digest
    /// check at the end can reject it).
    pub async fn blob(
        &self,
        digest: &str,
        declared_size: u64,
        w: &mut BlobSink,
        what: &str,
        abort: &AtomicBool,
    ) -> Result<()> {
        let mut s = self
            .client
            .pull_blob_stream(&self.reference, digest)
            .await
            .map_err(|e| map_err(&self.shown, &self.endpoint, e))?;
        let total = s.content_length;
        let mut next_log = PROGRESS_EVERY;
        while let Some(chunk) = s.stream.next().await {
            if abort.load(Ordering::Relaxed) {
                return Err(ImageError::registry(
                    &self.shown,
                    format!("{what} {digest}: aborted"),
                ));
            }
            let chunk = chunk.map_err(|e| {
                // oci-client checks the digest at the end of the stream too;
                // report its verdict as ours.
                match e.get_ref().and_then(|i| i.downcast_ref::<DigestError>()) {
                    Some(DigestError::VerificationError { actual, .. }) => {
                        ImageError::DigestMismatch {
                            what: format!("{what} of {} from {}", self.shown, self.endpoint.host),
                            expected: digest.to_string(),
                            actual: actual.clone(),
                        }
                    }
                    _ => ImageError::registry(&self.shown, format!("reading {what} {digest}: {e}")),
                }
            })?;
            if w.written() + chunk.len() as u64 > declared_size {
                return Err(ImageError::DigestMismatch {
                    what: format!("{what} of {} from {}", self.shown, self.endpoint.host),
                    expected: format!("{digest} ({declared_size} bytes)"),
                    actual: format!("more than {declared_size} bytes"),
                });
            }
            w.write(chunk).await?;
            if w.written() >= next_log {
                info!(image = %self.shown, %what, %digest, bytes = w.written(), total = total.unwrap_or(0), "downloading");
                next_log += PROGRESS_EVERY;
            }
        }
        Ok(())
    }
}

/// One error from all endpoint failures: the most telling kind wins, and the
/// message lists every endpoint tried, each with its own reason (said once:
/// neither the reference nor the host is repeated).
fn summarise(shown: &str, failures: Vec<(Endpoint, ImageError)>) -> ImageError {
    let tried: Vec<String> = failures
        .iter()
        .map(|(ep, e)| {
            format!(
                "{}{}: {}",
                ep.host,
                if ep.mirror { " (mirror)" } else { "" },
                endpoint_reason(ep, e)
            )
        })
        .collect();
    let tried = format!("tried {}", tried.join("; "));
    let rank = |e: &ImageError| match e {
        ImageError::Unauthorized { .. } => 3,
        ImageError::DigestMismatch { .. } => 3,
        ImageError::NotFound { .. } => 2,
        _ => 1,
    };
    let best = failures.into_iter().map(|(_, e)| e).max_by_key(rank);
    match best {
        Some(ImageError::NotFound { .. }) => ImageError::not_found(shown, tried),
        Some(ImageError::Unauthorized { .. }) => ImageError::Unauthorized {
            reference: shown.to_string(),
            reason: tried,
        },
        Some(e @ ImageError::DigestMismatch { .. }) => e,
        _ => ImageError::registry(shown, format!("no endpoint could serve it: {tried}")),
    }
}

/// What went wrong at one endpoint, without the reference (the summary
/// names it) and without the `host: ` prefix [`map_err`] adds.
fn endpoint_reason(ep: &Endpoint, e: &ImageError) -> String {
    let strip = |r: &str| {
        r.strip_prefix(&format!("{}: ", ep.host))
            .unwrap_or(r)
            .to_string()
    };
    match e {
        ImageError::NotFound { detail, .. } if detail.is_empty() => "not found".to_string(),
        ImageError::NotFound { detail, .. } => format!("not found ({detail})"),
        ImageError::Unauthorized { reason, .. } => format!("unauthorized: {}", strip(reason)),
        ImageError::Registry { reason, .. } => strip(reason),
        other => other.to_string(),
    }
}

/// `oci-client` error -> ours, keeping the endpoint as context.
pub fn map_err(shown: &str, ep: &Endpoint, e: OciDistributionError) -> ImageError {
    let unauthorized = |reason: String| ImageError::Unauthorized {
        reference: shown.to_string(),
        reason: format!("{}: {reason}", ep.host),
    };
    let not_found = || ImageError::not_found(shown, "");
    match e {
        OciDistributionError::AuthenticationFailure(r) => {
            unauthorized(format!("authentication failed: {r}"))
        }
        OciDistributionError::UnauthorizedError { url } => {
            unauthorized(format!("401 Unauthorized at {url}"))
        }
        OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                not_found()
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                unauthorized(format!("registry refused {url}"))
            } else {
                ImageError::registry(shown, format!("{}: {url}: {envelope:?}", ep.host))
            }
        }
        OciDistributionError::ServerError { code, url, message } => match code {
            404 => not_found(),
            401 | 403 => unauthorized(format!("HTTP {code} at {url}: {message}")),
            _ => ImageError::registry(shown, format!("HTTP {code} at {url}: {message}")),
        },
        // oci-client verifies manifests it fetches by digest.
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            ImageError::DigestMismatch {
                what: format!("manifest of {shown} from {}", ep.host),
                expected,
                actual,
            }
        }
        OciDistributionError::DigestError(d) => {
            ImageError::registry(shown, format!("{}: bad digest: {d}", ep.host))
        }
        other => ImageError::registry(shown, format!("{}: {other}", ep.host)),
    }
}

#[cfg(test)]
mod tests {
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
            });
        }
        c
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
    fn summary_says_not_found_once_and_lists_endpoints() {
        let ep = |host: &str, mirror: bool| Endpoint {
            host: host.into(),
            plain_http: true,
            mirror,
        };
        let shown = "registry.k8s.io/pause:3.9";
        let e = summarise(
            shown,
            vec![
                (ep("127.0.0.1:5000", true), ImageError::not_found(shown, "")),
                (
                    ep("registry.k8s.io", false),
                    ImageError::registry(shown, "registry.k8s.io: connection refused"),
                ),
            ],
        );
        assert!(matches!(e, ImageError::NotFound { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "image \"registry.k8s.io/pause:3.9\" not found (tried 127.0.0.1:5000 (mirror): \
             not found; registry.k8s.io: connection refused)"
        );
        let e = summarise(
            shown,
            vec![(
                ep("127.0.0.1:5000", false),
                ImageError::Unauthorized {
                    reference: shown.into(),
                    reason: "127.0.0.1:5000: 401 Unauthorized at http://x".into(),
                },
            )],
        );
        assert_eq!(
            e.to_string(),
            "unauthorized pulling \"registry.k8s.io/pause:3.9\": tried 127.0.0.1:5000: \
             unauthorized: 401 Unauthorized at http://x"
        );
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
}
