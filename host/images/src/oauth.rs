//! CRI `AuthConfig.identity_token`: an OAuth2 refresh token, exchanged for
//! an access token as the distribution token spec describes ("OAuth2 token
//! authentication"):
//!
//! 1. `GET /v2/` on the endpoint; a 401 names the token realm in its
//!    `WWW-Authenticate: Bearer realm=…,service=…` challenge.
//! 2. `POST <realm>` with a form body `grant_type=refresh_token`,
//!    `refresh_token`, `service`, `scope=repository:<repo>:pull`,
//!    `client_id=vmpod`.
//! 3. The JSON answer's `access_token` (or `token`) is then sent as a
//!    bearer token on every request of the pull.
//!
//! containerd does the same for an identity token (its docker resolver's
//! `FetchTokenWithOAuth`). `oci-client` only knows the GET flow with basic
//! credentials, so this step is ours; the token then goes to it as
//! `RegistryAuth::Bearer`.
//!
//! Only the origin registry gets here (mirrors are contacted anonymously,
//! see [`crate::registry`]). The refresh token is never sent in the clear
//! when the endpoint is HTTPS (an `http://` realm is refused), and no
//! redirect is followed, so it goes to the realm the challenge names and
//! nowhere else.

use std::time::Duration;

use serde::Deserialize;

use crate::error::ImageError;
use crate::registry::Endpoint;

/// Sent as `client_id`, as the spec asks clients to identify themselves.
const CLIENT_ID: &str = "vmpod";

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    token: String,
}

/// The realm and service of the endpoint's bearer challenge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub realm: String,
    pub service: Option<String>,
}

/// Parse a `WWW-Authenticate` value; `Err` says why it is no bearer realm.
pub(crate) fn bearer_challenge(header: &str) -> Result<Challenge, String> {
    let all = http_auth::parse_challenges(header)
        .map_err(|e| format!("unreadable WWW-Authenticate {header:?}: {e}"))?;
    let bearer = all
        .iter()
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
        .ok_or_else(|| {
            format!(
                "the registry asks for {header:?}; an identity token needs a bearer token realm"
            )
        })?;
    let param = |name: &str| {
        bearer
            .params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_unescaped())
    };
    let realm = param("realm").ok_or("bearer challenge without a realm")?;
    if !(realm.starts_with("https://") || realm.starts_with("http://")) {
        return Err(format!("token realm {realm:?} is not an http(s) URL"));
    }
    Ok(Challenge {
        realm,
        service: param("service"),
    })
}

/// May the refresh token be POSTed to `realm` of an endpoint reached over
/// plain HTTP (`plain_http`) or HTTPS? Not to an `http://` realm when the
/// endpoint is HTTPS: a challenge must not downgrade the token to
/// cleartext.
pub(crate) fn check_realm(realm: &str, plain_http: bool) -> Result<(), String> {
    if !plain_http && !realm.starts_with("https://") {
        return Err(format!(
            "token realm {realm:?} is not HTTPS while the registry is; the identity token is not sent"
        ));
    }
    Ok(())
}

/// Exchange `refresh_token` for an access token good for pulling
/// `repository` from `ep`, whose API answers at `api_host` (for Docker Hub
/// `index.docker.io`, not `docker.io`). `Ok(None)`: the endpoint wants no
/// auth at all.
pub(crate) async fn access_token(
    shown: &str,
    ep: &Endpoint,
    api_host: &str,
    repository: &str,
    refresh_token: &str,
) -> Result<Option<String>, ImageError> {
    let unauthorized = |reason: String| ImageError::Unauthorized {
        reference: shown.to_string(),
        reason: format!("{}: {reason}", ep.host),
    };
    let transport = |what: &str, e: reqwest::Error| {
        ImageError::registry(
            shown,
            format!("{}: {what}: {}", ep.host, crate::error::with_causes(&e)),
        )
    };
    let http = ep
        .ca
        .add_to(reqwest::Client::builder())
        .danger_accept_invalid_certs(ep.skip_verify)
        .danger_accept_invalid_hostnames(ep.skip_verify)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| transport("HTTP client", e))?;
    let scheme = if ep.plain_http { "http" } else { "https" };
    let base = format!("{scheme}://{api_host}/v2/");
    let resp = http
        .get(&base)
        .send()
        .await
        .map_err(|e| transport("GET /v2/", e))?;
    if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
        // No auth wanted (or another failure the manifest fetch reports).
        return Ok(None);
    }
    let header = resp
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized("401 from /v2/ without a WWW-Authenticate challenge".into()))?;
    let ch = bearer_challenge(header).map_err(unauthorized)?;
    check_realm(&ch.realm, ep.plain_http).map_err(unauthorized)?;
    let scope = format!("repository:{repository}:pull");
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("client_id", CLIENT_ID),
        ("scope", scope.as_str()),
    ];
    if let Some(s) = &ch.service {
        form.push(("service", s.as_str()));
    }
    let resp = http
        .post(&ch.realm)
        .form(&form)
        .send()
        .await
        .map_err(|e| transport("POST to the token realm", e))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(200).collect();
        let why = format!(
            "token realm {} refused the identity token: HTTP {status}: {body}",
            ch.realm
        );
        return Err(if status.is_client_error() {
            unauthorized(why)
        } else {
            ImageError::registry(shown, format!("{}: {why}", ep.host))
        });
    }
    let t: TokenResponse = resp
        .json()
        .await
        .map_err(|e| unauthorized(format!("token realm {} answer: {e}", ch.realm)))?;
    let token = if t.access_token.is_empty() {
        t.token
    } else {
        t.access_token
    };
    if token.is_empty() {
        return Err(unauthorized(format!(
            "token realm {} sent no access_token",
            ch.realm
        )));
    }
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:x:pull""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.example/token");
        assert_eq!(c.service.as_deref(), Some("registry.example"));
        // Several challenges: the bearer one is used.
        let c =
            bearer_challenge(r#"Basic realm="x", bearer realm="http://127.0.0.1:9/t""#).unwrap();
        assert_eq!(
            (c.realm.as_str(), c.service),
            ("http://127.0.0.1:9/t", None)
        );
        assert!(bearer_challenge(r#"Basic realm="registry""#)
            .unwrap_err()
            .contains("bearer"));
        assert!(bearer_challenge("Bearer service=\"s\"")
            .unwrap_err()
            .contains("realm"));
        assert!(bearer_challenge(r#"Bearer realm="file:///etc/passwd""#).is_err());
    }

    #[test]
    fn no_cleartext_realm_for_an_https_endpoint() {
        let e = check_realm("http://auth.example/token", false).unwrap_err();
        assert!(e.contains("not HTTPS"), "{e}");
        check_realm("https://auth.example/token", false).unwrap();
        check_realm("http://127.0.0.1:9/token", true).unwrap();
        check_realm("https://auth.example/token", true).unwrap();
    }
}
