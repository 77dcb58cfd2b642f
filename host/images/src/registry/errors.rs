//! Registry failures -> [`ImageError`]: one `oci-client` error at one
//! endpoint ([`map_err`]), and all endpoints' failures summed up in one
//! error that names the image once and lists each endpoint's answer
//! ([`summarise`]).

use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};

use super::Endpoint;
use crate::error::ImageError;

/// One error from all endpoint failures: the most telling kind wins, and the
/// message lists every endpoint tried, each with its own reason (said once:
/// neither the reference nor the host is repeated).
pub(crate) fn summarise(shown: &str, failures: Vec<(Endpoint, ImageError)>) -> ImageError {
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
        other => ImageError::registry(
            shown,
            format!("{}: {}", ep.host, crate::error::with_causes(&other)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_says_not_found_once_and_lists_endpoints() {
        let ep = |host: &str, mirror: bool| Endpoint {
            host: host.into(),
            plain_http: true,
            mirror,
            ca: Default::default(),
            skip_verify: false,
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
}
