//! Who may do what on the embedded registry: HTTP Basic credentials, checked as docker's
//! distribution does with an htpasswd file.
//!
//! - Writes (POST, PUT, PATCH, DELETE on blobs, uploads and manifests) need the registry's
//!   credentials, always: a RUN step can reach the registry's port, and an unauthenticated
//!   PUT would replace the image a later request is answered with.
//! - Reads (GET, HEAD) need them too unless anonymous pulls are on (the default on loopback).
//! - `/v2/` answers 401 with the challenge to a client without valid credentials, as
//!   distribution does, so that clients learn to send theirs. With anonymous pulls on, a
//!   client that sends none gets 200 *and* the challenge (RFC 9110 §11.6.1 allows it on any
//!   response): anonymous pullers (docker) are not turned away, and clients that read the
//!   challenge from the ping (skopeo, podman, oci-client) still authenticate their pushes.
//! - A refusal is `401 UNAUTHORIZED` with `WWW-Authenticate: Basic realm="kiln-registry"`.
//!
//! Only a SHA-256 of `user:password` is kept here, compared in constant time; the password
//! is never logged.

use axum::http::{header, HeaderMap, HeaderValue, Method};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::error::{ErrorCode, ErrorResponse};
use crate::model::BasicCredentials;

/// The realm in the challenge.
pub const REALM: &str = "kiln-registry";

/// The access rule of one registry.
#[derive(Clone)]
pub struct Access {
    /// SHA-256 of `user:password`; `None`: no credentials, everything is open (a registry
    /// for tests and fuzzing only; `kiln serve` never runs one).
    credentials: Option<[u8; 32]>,
    anonymous_pull: bool,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("authenticated", &self.credentials.is_some())
            .field("anonymous_pull", &self.anonymous_pull)
            .finish()
    }
}

/// A request let through, and whether its response carries the challenge anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    Plain,
    /// The anonymous ping under anonymous pulls: 200, plus `WWW-Authenticate`.
    WithChallenge,
}

/// What the request presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presented {
    Nothing,
    Valid,
    Invalid,
}

impl Access {
    /// No authentication at all. For in-process test registries and fuzz targets.
    pub fn open() -> Self {
        Self {
            credentials: None,
            anonymous_pull: true,
        }
    }

    /// Writes need `credentials`; reads too unless `anonymous_pull`.
    pub fn with_credentials(credentials: &BasicCredentials, anonymous_pull: bool) -> Self {
        Self {
            credentials: Some(pair_digest(&credentials.username, credentials.password.expose())),
            anonymous_pull,
        }
    }

    /// Whether every request is let through.
    pub fn is_open(&self) -> bool {
        self.credentials.is_none()
    }

    fn presented(&self, headers: &HeaderMap) -> Presented {
        let Some(expected) = &self.credentials else {
            return Presented::Valid;
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Presented::Nothing;
        };
        let decoded = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
            })
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok());
        let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            return Presented::Invalid;
        };
        if constant_time_eq(expected, &pair_digest(user, password)) {
            Presented::Valid
        } else {
            Presented::Invalid
        }
    }

    /// Checks one request; `base` is the `/v2/` ping (see the module doc).
    pub fn check(&self, method: &Method, base: bool, headers: &HeaderMap) -> Result<Admitted, ErrorResponse> {
        if self.is_open() {
            return Ok(Admitted::Plain);
        }
        let presented = self.presented(headers);
        let read = matches!(*method, Method::GET | Method::HEAD);
        match (presented, base, read) {
            (Presented::Valid, _, _) => Ok(Admitted::Plain),
            // The ping: anonymous clients are welcome when pulls are, but learn the scheme.
            (Presented::Nothing, true, true) if self.anonymous_pull => Ok(Admitted::WithChallenge),
            // Clients that answer a Basic challenge without credentials send empty ones;
            // pulls do not look at them.
            (_, false, true) if self.anonymous_pull => Ok(Admitted::Plain),
            (_, _, read) => Err(unauthorized(read)),
        }
    }
}

/// The `WWW-Authenticate` value.
pub fn challenge() -> HeaderValue {
    HeaderValue::from_static("Basic realm=\"kiln-registry\"")
}

fn unauthorized(read: bool) -> ErrorResponse {
    let message = if read {
        "authentication required: this registry serves pulls to authenticated clients only"
    } else {
        "authentication required: writes to Kiln's embedded registry need Kiln's registry credentials"
    };
    ErrorResponse::new(ErrorCode::Unauthorized, message).with_header(header::WWW_AUTHENTICATE, challenge())
}

fn pair_digest(user: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Secret;

    fn creds() -> BasicCredentials {
        BasicCredentials {
            username: "kiln".into(),
            password: Secret::new("s3cret-canary"),
        }
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        h.insert(header::AUTHORIZATION, format!("Basic {value}").parse().unwrap());
        h
    }

    #[test]
    fn writes_need_the_credentials() {
        for anonymous_pull in [true, false] {
            let access = Access::with_credentials(&creds(), anonymous_pull);
            for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
                let err = access.check(&method, false, &HeaderMap::new()).unwrap_err();
                assert_eq!(err.code, ErrorCode::Unauthorized);
                assert_eq!(err.status, axum::http::StatusCode::UNAUTHORIZED);
                assert!(access.check(&method, false, &basic("kiln", "wrong")).is_err());
                assert!(access
                    .check(&method, false, &basic("root", "s3cret-canary"))
                    .is_err());
                assert_eq!(
                    access
                        .check(&method, false, &basic("kiln", "s3cret-canary"))
                        .unwrap(),
                    Admitted::Plain
                );
            }
        }
    }

    #[test]
    fn reads_follow_anonymous_pull_and_the_ping_always_challenges() {
        let open_reads = Access::with_credentials(&creds(), true);
        assert_eq!(
            open_reads.check(&Method::GET, false, &HeaderMap::new()).unwrap(),
            Admitted::Plain
        );
        assert_eq!(
            open_reads.check(&Method::HEAD, false, &basic("", "")).unwrap(),
            Admitted::Plain
        );
        assert_eq!(
            open_reads.check(&Method::GET, true, &HeaderMap::new()).unwrap(),
            Admitted::WithChallenge
        );
        assert!(open_reads
            .check(&Method::GET, true, &basic("kiln", "wrong"))
            .is_err());

        let closed = Access::with_credentials(&creds(), false);
        assert!(closed.check(&Method::GET, false, &HeaderMap::new()).is_err());
        assert!(closed.check(&Method::GET, true, &HeaderMap::new()).is_err());
        assert_eq!(
            closed
                .check(&Method::GET, false, &basic("kiln", "s3cret-canary"))
                .unwrap(),
            Admitted::Plain
        );
        let mut garbage = HeaderMap::new();
        garbage.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert!(closed.check(&Method::GET, false, &garbage).is_err());

        assert_eq!(
            Access::open()
                .check(&Method::PUT, false, &HeaderMap::new())
                .unwrap(),
            Admitted::Plain
        );
        assert!(!format!("{closed:?}").contains("canary"));
    }
}
