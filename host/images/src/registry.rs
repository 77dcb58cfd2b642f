//! Talking to registries, on top of `oci-client`: endpoint selection
//! (mirrors, plain HTTP), credentials, manifests and blob streams with
//! fallback between endpoints; `errors` maps `oci-client` errors onto
//! [`ImageError`].
//!
//! Endpoints for a reference are: each configured mirror of its registry
//! host, in order, then the original host unless a mirror has
//! `mirror_only`. The first endpoint that serves the manifest starts the
//! pull; a manifest by digest or blob it cannot serve comes from the
//! endpoints after it, in order. Mirrors are addressed with `oci-client`'s
//! mirror support
//! (the original host goes along only as the `?ns=` query parameter; no
//! connection is made to it).
//!
//! The request's credentials are for the registry the image is named after
//! and go to it alone: mirrors are contacted anonymously (a mirror is some
//! other party; it must not receive, or make us POST to a realm it names,
//! the origin's password or identity token).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::DigestError;
use oci_client::secrets::RegistryAuth;
use oci_client::{manifest, Client, Reference, RegistryOperation};
use tracing::{info, warn};

use crate::content::BlobSink;
use crate::error::{ImageError, Result};
use crate::reference::ImageRef;
use crate::types::{Auth, RegistryConfig};

mod errors;
pub use errors::map_err;
use errors::summarise;

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
    /// Extra trust anchors for this endpoint's TLS (and its token realm).
    pub ca: crate::CaCerts,
    /// No certificate check at all for this endpoint (and its token realm).
    pub skip_verify: bool,
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
            None => m.insecure || is_loopback(host),
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
            ca: m.ca.clone(),
            skip_verify: m.skip_verify,
        });
    }
    if !mirror_only {
        out.push(Endpoint {
            host: registry.to_string(),
            plain_http: is_loopback(registry) || cfg.insecure.iter().any(|i| i == registry),
            mirror: false,
            ca: cfg.ca.get(registry).cloned().unwrap_or_default(),
            skip_verify: cfg.skip_verify.iter().any(|h| h == registry),
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

/// The credentials to use at `ep`: none at a mirror (the request's
/// credentials are the origin's); at the origin fixed ones as they are, a
/// refresh token exchanged there for an access token. `api_host` is where
/// the registry API answers (`index.docker.io` for `docker.io`).
async fn creds_for(
    shown: &str,
    ep: &Endpoint,
    api_host: &str,
    repo: &str,
    creds: &Creds,
) -> Result<RegistryAuth> {
    if ep.mirror {
        return Ok(RegistryAuth::Anonymous);
    }
    match creds {
        Creds::Fixed(c) => Ok(c.clone()),
        Creds::Refresh(t) => Ok(
            match crate::oauth::access_token(shown, ep, api_host, repo, t).await? {
                Some(token) => RegistryAuth::Bearer(token),
                None => RegistryAuth::Anonymous,
            },
        ),
    }
}

/// One endpoint's client: the reference as that endpoint sees it (mirrors
/// get the original host only as `?ns=`), authenticated on first use.
struct Conn {
    /// Replaced by [`Conn::renew`]: oci-client keeps the first
    /// credentials it was given for a host, so a renewed access token needs
    /// a fresh client.
    client: std::sync::Mutex<Client>,
    reference: Reference,
    endpoint: Endpoint,
    authed: tokio::sync::OnceCell<()>,
}

impl Conn {
    fn new(r: &ImageRef, ep: Endpoint) -> Conn {
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
        let client = std::sync::Mutex::new(new_client(&ep, &reference));
        Conn {
            client,
            reference,
            endpoint: ep,
            authed: tokio::sync::OnceCell::new(),
        }
    }

    /// The current client (a cheap handle; requests run without the lock).
    fn client(&self) -> Client {
        self.client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Authenticate once (tokens are kept in the client); a failure is
    /// not remembered, so a later call tries again.
    async fn auth(&self, shown: &str, creds: &Creds) -> Result<()> {
        self.authed
            .get_or_try_init(|| self.authenticate(self.client(), shown, creds))
            .await
            .map(|_| ())
    }

    /// Authenticate again on a fresh client (credentials exchanged again
    /// for an identity token), which then replaces the current one.
    async fn renew(&self, shown: &str, creds: &Creds) -> Result<()> {
        let fresh = new_client(&self.endpoint, &self.reference);
        self.authenticate(fresh, shown, creds).await
    }

    /// Fetch a token with `client` and make it this endpoint's client.
    async fn authenticate(&self, client: Client, shown: &str, creds: &Creds) -> Result<()> {
        let ep = &self.endpoint;
        let r = &self.reference;
        let c = creds_for(shown, ep, r.resolve_registry(), r.repository(), creds).await?;
        client
            .auth(r, &c, RegistryOperation::Pull)
            .await
            .map_err(|e| map_err(shown, ep, e))?;
        *self
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = client;
        Ok(())
    }
}

/// An oci-client for `ep` (its scheme, extra CAs, certificate checks).
fn new_client(ep: &Endpoint, reference: &Reference) -> Client {
    let protocol = if ep.plain_http {
        ClientProtocol::HttpsExcept(vec![reference.resolve_registry().to_string()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        extra_root_certificates: ep.ca.for_oci_client(),
        accept_invalid_certificates: ep.skip_verify,
        accept_invalid_hostnames: ep.skip_verify,
        ..Default::default()
    })
}

/// Worth trying the next endpoint after this failure of one?
fn try_next(e: &ImageError) -> bool {
    matches!(
        e,
        ImageError::NotFound { .. }
            | ImageError::Registry { .. }
            | ImageError::Unauthorized { .. }
            | ImageError::DigestMismatch { .. }
    )
}

/// A pull's view of its registry: the endpoint that served the manifest
/// first, then the endpoints after it in the configured order (the next
/// mirrors, then the origin unless `mirror_only`). Manifests by digest and
/// blobs that one endpoint cannot serve (404, 5xx, refused, cut off,
/// corrupt) are fetched from the next.
pub struct Remote {
    conns: Vec<Conn>,
    creds: Creds,
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
        let mut eps = endpoints(cfg, &r.registry)?.into_iter();
        let mut failures: Vec<(Endpoint, ImageError)> = Vec::new();
        while let Some(ep) = eps.next() {
            let conn = Conn::new(r, ep);
            let ep = &conn.endpoint;
            let scheme = if ep.plain_http { "http" } else { "https" };
            info!(image = %shown, endpoint = %format!("{scheme}://{}", ep.host), mirror = ep.mirror, "resolving");
            let attempt = async {
                conn.auth(&shown, &creds).await?;
                conn.client()
                    .pull_manifest_raw(&conn.reference, &RegistryAuth::Anonymous, MANIFEST_TYPES)
                    .await
                    .map_err(|e| map_err(&shown, ep, e))
            };
            match attempt.await {
                Ok((bytes, _digest)) => {
                    let mut conns = vec![conn];
                    conns.extend(eps.map(|ep| Conn::new(r, ep)));
                    let remote = Remote {
                        conns,
                        creds,
                        shown,
                    };
                    return Ok((remote, bytes.to_vec()));
                }
                Err(e) => {
                    warn!(image = %shown, endpoint = %ep.host, error = %e, "endpoint failed");
                    failures.push((conn.endpoint, e));
                }
            }
        }
        Err(summarise(&shown, failures))
    }

    /// The normalised reference this session pulls.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// All endpoints failed with `failures`: one of them as it was, or a
    /// summary naming each.
    fn failed(&self, mut failures: Vec<(Endpoint, ImageError)>) -> ImageError {
        if failures.len() == 1 {
            if let Some((_, e)) = failures.pop() {
                return e;
            }
        }
        summarise(&self.shown, failures)
    }

    /// Run `op` at `c`, authenticated there. A refusal (401/403) after
    /// the endpoint had accepted our credentials in an earlier call (a
    /// short-lived token expired or was revoked mid-pull) gets one fresh
    /// token and one more try, as containerd's resolver does; a second
    /// refusal stands, and an aborted pull is not retried.
    async fn authed<T, Fut>(&self, c: &Conn, abort: &AtomicBool, op: impl Fn() -> Fut) -> Result<T>
    where
        Fut: std::future::Future<Output = Result<T>>,
    {
        let accepted_before = c.authed.initialized();
        c.auth(&self.shown, &self.creds).await?;
        match op().await {
            Err(ImageError::Unauthorized { reason, .. })
                if accepted_before && !abort.load(Ordering::Relaxed) =>
            {
                info!(image = %self.shown, endpoint = %c.endpoint.host, %reason, "token refused mid-pull; authenticating again");
                c.renew(&self.shown, &self.creds).await?;
                op().await
            }
            r => r,
        }
    }

    /// Fetch a manifest by digest from the same repository.
    pub async fn manifest(&self, digest: &str) -> Result<Vec<u8>> {
        let mut failures = Vec::new();
        for c in &self.conns {
            let shown = self.shown.as_str();
            let never = AtomicBool::new(false);
            let attempt = self.authed(c, &never, move || async move {
                let r = c.reference.clone_with_digest(digest.to_string());
                c.client()
                    .pull_manifest_raw(&r, &RegistryAuth::Anonymous, MANIFEST_TYPES)
                    .await
                    .map_err(|e| map_err(shown, &c.endpoint, e))
            });
            match attempt.await {
                Ok((bytes, _)) => return Ok(bytes.to_vec()),
                Err(e) if try_next(&e) => {
                    warn!(image = %self.shown, endpoint = %c.endpoint.host, %digest, error = %e, "manifest failed at this endpoint");
                    failures.push((c.endpoint.clone(), e));
                }
                Err(e) => return Err(e),
            }
        }
        Err(self.failed(failures))
    }

    /// Download blob `digest` into a fresh sink from `open_sink`, verified
    /// on commit, from the first endpoint that serves it whole. Returns the
    /// bytes and the endpoint's host. Stops at once when `abort` is set.
    pub async fn fetch_blob(
        &self,
        digest: &str,
        declared_size: u64,
        open_sink: impl Fn() -> BlobSink,
        what: &str,
        abort: &AtomicBool,
    ) -> Result<(u64, String)> {
        let mut failures = Vec::new();
        let open_sink = &open_sink;
        for c in &self.conns {
            // Each try writes to a fresh sink; a failed one leaves nothing.
            let res = self
                .authed(c, abort, move || async move {
                    let mut sink = open_sink();
                    match self
                        .stream(c, digest, declared_size, &mut sink, what, abort)
                        .await
                    {
                        Ok(()) => sink.commit().await,
                        Err(e) => {
                            sink.abort().await;
                            Err(e)
                        }
                    }
                })
                .await;
            match res {
                Ok(n) => return Ok((n, c.endpoint.host.clone())),
                Err(e) if try_next(&e) && !abort.load(Ordering::Relaxed) => {
                    warn!(image = %self.shown, endpoint = %c.endpoint.host, %what, %digest, error = %e, "blob failed at this endpoint");
                    let e = match e {
                        ImageError::NotFound { reference, .. } => ImageError::NotFound {
                            reference,
                            detail: format!("{what} {digest}"),
                        },
                        e => e,
                    };
                    failures.push((c.endpoint.clone(), e));
                }
                Err(e) => return Err(e),
            }
        }
        Err(self.failed(failures))
    }

    /// Stream blob `digest` from `c` into `w`.
    /// Stops early (with an error) once `abort` is set, or once the
    /// registry sends more than the descriptor's `declared_size` bytes (a
    /// broken or hostile registry must not fill the disk before the digest
    /// check at the end can reject it).
    async fn stream(
        &self,
        c: &Conn,
        digest: &str,
        declared_size: u64,
        w: &mut BlobSink,
        what: &str,
        abort: &AtomicBool,
    ) -> Result<()> {
        let mut s = c
            .client()
            .pull_blob_stream(&c.reference, digest)
            .await
            .map_err(|e| map_err(&self.shown, &c.endpoint, e))?;
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
                            what: format!("{what} of {} from {}", self.shown, c.endpoint.host),
                            expected: digest.to_string(),
                            actual: actual.clone(),
                        }
                    }
                    _ => ImageError::registry(
                        &self.shown,
                        format!(
                            "{}: reading {what} {digest}: {}",
                            c.endpoint.host,
                            crate::error::with_causes(&e)
                        ),
                    ),
                }
            })?;
            if w.written() + chunk.len() as u64 > declared_size {
                return Err(ImageError::DigestMismatch {
                    what: format!("{what} of {} from {}", self.shown, c.endpoint.host),
                    expected: format!("{digest} ({declared_size} bytes)"),
                    actual: format!("more than {declared_size} bytes"),
                });
            }
            w.write(chunk).await?;
            if w.written() >= next_log {
                info!(image = %self.shown, %what, %digest, bytes = w.written(), total = total.unwrap_or(0), endpoint = %c.endpoint.host, "downloading");
                next_log += PROGRESS_EVERY;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
