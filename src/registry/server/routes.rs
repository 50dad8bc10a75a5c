//! Request routing: validated repository names and tags, parsing `/v2/<name>/...` paths
//! (names contain slashes, so this is done by hand rather than with axum's router), the
//! access check (`auth`) before any handler reads a body, method dispatch to the handlers,
//! and the per-request tracing span.

use std::{collections::HashMap, fmt, sync::Arc};

use axum::{
    body::Body,
    extract::{Query, Request, State},
    http::{header, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use tracing::Instrument;

use super::{
    auth, blobs,
    error::{ErrorCode, ErrorResponse, Result},
    manifests, tags, upload, Registry,
};
use crate::model::Digest;

/// The header every response carries, as distribution does.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
/// Distribution's limit on a repository name.
const MAX_NAME_LEN: usize = 255;

/// A repository name that matches the spec's grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
///
/// Every component starts with `[a-z0-9]`, so no component is `.`, `..` or begins with the
/// `_` that storage uses for its own directories: a valid name is a safe relative path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() <= MAX_NAME_LEN && !s.is_empty() && s.split('/').all(valid_name_component))
            .then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_name_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // Every maximal run of separator characters must be `.`, `_`, `__` or `-+`.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let run = &component[start..i];
        let ok = run == "." || run == "_" || run == "__" || run.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}` (so never `.`, `..` or a path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_');
        let rest_ok = bytes[1.min(bytes.len())..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        (first_ok && rest_ok && bytes.len() <= 128).then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What follows `/manifests/`: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A reference with a `:` is a digest (only sha256 is supported); anything else a tag.
    pub fn parse(s: &str) -> Result<Self> {
        if s.contains(':') {
            parse_digest(s).map(Self::Digest)
        } else {
            Tag::parse(s).map(Self::Tag).ok_or_else(|| {
                ErrorResponse::new(ErrorCode::ManifestInvalid, format!("invalid tag {s:?}"))
                    .with_detail(serde_json::json!({ "tag": s }))
            })
        }
    }
}

/// A digest from a path or query parameter: sha256 only; other algorithms are refused as
/// unsupported, malformed ones as invalid (both `DIGEST_INVALID`, 400).
pub fn parse_digest(s: &str) -> Result<Digest> {
    s.parse::<Digest>().map_err(|_| {
        let message = match s.split_once(':') {
            Some((algorithm, _)) if algorithm != "sha256" => {
                format!("unsupported digest algorithm {algorithm:?}: only sha256 is supported")
            }
            _ => format!("invalid digest {s:?}"),
        };
        ErrorResponse::new(ErrorCode::DigestInvalid, message).with_detail(serde_json::json!({ "digest": s }))
    })
}

/// A parsed request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/<name>/blobs/<digest>` (the digest still unparsed: the handler answers for it).
    Blob { name: RepoName, digest: String },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: RepoName },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: RepoName, id: String },
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: RepoName, reference: String },
    /// `/v2/<name>/tags/list`
    Tags { name: RepoName },
}

/// Why a path is not a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Not a registry endpoint at all.
    NotFound,
    /// The shape of an endpoint, but the name breaks the grammar.
    NameInvalid(String),
}

/// Parses a request path. The endpoint is recognised from the end of the path (the last
/// segments are fixed words and a digest/tag/id without slashes), everything before it is
/// the repository name.
pub fn parse_path(path: &str) -> Result<Route, RouteError> {
    let rest = match path.strip_prefix("/v2") {
        Some("" | "/") => return Ok(Route::Base),
        Some(rest) => rest.strip_prefix('/').ok_or(RouteError::NotFound)?,
        None => return Err(RouteError::NotFound),
    };
    let segments: Vec<String> = rest.split('/').map(percent_decode).collect();
    let n = segments.len();
    let seg = |back: usize| -> &str {
        if back <= n {
            &segments[n - back]
        } else {
            ""
        }
    };
    let name_of = |used: usize| -> Result<RepoName, RouteError> {
        if used >= n {
            return Err(RouteError::NotFound);
        }
        let name = segments[..n - used].join("/");
        RepoName::parse(&name).ok_or(RouteError::NameInvalid(name))
    };

    if n >= 4 && seg(3) == "blobs" && seg(2) == "uploads" {
        let id = seg(1);
        let name = name_of(3)?;
        return Ok(if id.is_empty() {
            Route::UploadStart { name }
        } else {
            Route::Upload {
                name,
                id: id.to_owned(),
            }
        });
    }
    if n >= 3 && seg(2) == "blobs" && seg(1) == "uploads" {
        return Ok(Route::UploadStart { name: name_of(2)? });
    }
    if n >= 3 && seg(2) == "blobs" && !seg(1).is_empty() {
        return Ok(Route::Blob {
            name: name_of(2)?,
            digest: seg(1).to_owned(),
        });
    }
    if n >= 3 && seg(2) == "manifests" && !seg(1).is_empty() {
        return Ok(Route::Manifest {
            name: name_of(2)?,
            reference: seg(1).to_owned(),
        });
    }
    if n >= 3 && seg(2) == "tags" && seg(1) == "list" {
        return Ok(Route::Tags { name: name_of(2)? });
    }
    Err(RouteError::NotFound)
}

/// Decodes `%XX` escapes (clients may send `sha256%3A...`). Invalid escapes stay as they are
/// and then fail validation.
fn percent_decode(segment: &str) -> String {
    if !segment.contains('%') {
        return segment.to_owned();
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query parameters of `uri` (repeated keys: the last wins).
pub fn query_params(uri: &Uri) -> Result<HashMap<String, String>> {
    if uri.query().is_none() {
        return Ok(HashMap::new());
    }
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| {
            ErrorResponse::new(ErrorCode::Unsupported, format!("malformed query: {e}"))
                .with_status(StatusCode::BAD_REQUEST)
        })
}

/// The one handler behind the router: parses, dispatches, traces.
pub async fn handle(State(registry): State<Arc<Registry>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let span = tracing::debug_span!(
        "registry_request",
        method = %method,
        path = %path,
        status = tracing::field::Empty
    );
    let mut response = dispatch(&registry, request)
        .instrument(span.clone())
        .await
        .unwrap_or_else(IntoResponse::into_response);
    response
        .headers_mut()
        .insert(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"));
    if method == Method::HEAD {
        // Keep the Content-Length that describes the GET; send no body.
        *response.body_mut() = Body::empty();
    }
    let status = response.status().as_u16();
    span.record("status", status);
    span.in_scope(|| tracing::debug!(status, "registry request done"));
    response
}

async fn dispatch(registry: &Registry, request: Request) -> Result<Response> {
    let route = parse_path(request.uri().path()).map_err(|e| match e {
        RouteError::NotFound => ErrorResponse::new(ErrorCode::Unsupported, "no such registry endpoint")
            .with_status(StatusCode::NOT_FOUND),
        RouteError::NameInvalid(name) => ErrorResponse::new(
            ErrorCode::NameInvalid,
            format!("invalid repository name {name:?}"),
        )
        .with_detail(serde_json::json!({ "name": name })),
    })?;
    let method = request.method().clone();
    let head = method == Method::HEAD;
    let challenge = registry
        .access
        .check(&method, route == Route::Base, request.headers())
        .inspect_err(
            |_| tracing::debug!(method = %method, "registry request refused: no valid credentials"),
        )?;
    // Requests that make a blob needed hold off garbage collections (see `gc`).
    let _needs_blobs = match (&route, &method) {
        (Route::Blob { .. }, &Method::HEAD | &Method::DELETE)
        | (Route::UploadStart { .. }, &Method::POST)
        | (Route::Upload { .. }, &Method::PUT)
        | (Route::Manifest { .. }, &Method::PUT | &Method::DELETE) => Some(registry.gc.lock.read().await),
        // A pull by tag stamps the tag where tags expire.
        (Route::Manifest { name, .. }, &Method::GET | &Method::HEAD) if registry.gc.expires(name) => {
            Some(registry.gc.lock.read().await)
        }
        _ => None,
    };
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => {
            let mut response =
                (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response();
            if challenge == auth::Admitted::WithChallenge {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, auth::challenge());
            }
            Ok(response)
        }
        (Route::Blob { name, digest }, Method::GET | Method::HEAD) => {
            blobs::get(registry, &name, &digest, request.headers(), head).await
        }
        (Route::Blob { name, digest }, Method::DELETE) => blobs::delete(registry, &name, &digest).await,
        (Route::UploadStart { name }, Method::POST) => upload::start(registry, name, request).await,
        (Route::Upload { name, id }, Method::GET | Method::HEAD) => {
            upload::status(registry, &name, &id).await
        }
        (Route::Upload { name, id }, Method::PATCH) => upload::patch(registry, &name, &id, request).await,
        (Route::Upload { name, id }, Method::PUT) => upload::complete(registry, &name, &id, request).await,
        (Route::Upload { name, id }, Method::DELETE) => upload::cancel(registry, &name, &id).await,
        (Route::Manifest { name, reference }, Method::GET | Method::HEAD) => {
            manifests::get(registry, &name, &reference).await
        }
        (Route::Manifest { name, reference }, Method::PUT) => {
            manifests::put(registry, &name, &reference, request).await
        }
        (Route::Manifest { name, reference }, Method::DELETE) => {
            manifests::delete(registry, &name, &reference).await
        }
        (Route::Tags { name }, Method::GET | Method::HEAD) => {
            tags::list(registry, &name, &query_params(request.uri())?).await
        }
        (_, method) => Err(ErrorResponse::new(
            ErrorCode::Unsupported,
            format!("method {method} is not supported on this endpoint"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn name_grammar() {
        for ok in [
            "a",
            "library/alpine",
            "kiln/base-images/ubuntu",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "0/1/2",
            "gitpod/workspace-full_2.x",
        ] {
            assert!(RepoName::parse(ok).is_some(), "{ok} should be valid");
        }
        for bad in [
            "",
            "A",
            "Upper/case",
            "a/",
            "/a",
            "a//b",
            "..",
            "a/../b",
            "a/./b",
            ".a",
            "a.",
            "a-",
            "-a",
            "_a",
            "a___b",
            "a..b",
            "a._b",
            "a b",
            "a%2fb",
            "a:b",
        ] {
            assert!(RepoName::parse(bad).is_none(), "{bad:?} should be invalid");
        }
        assert!(RepoName::parse(&"a".repeat(255)).is_some());
        assert!(RepoName::parse(&"a".repeat(256)).is_none());
    }

    #[test]
    fn tag_grammar() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_c.d", &"t".repeat(128)] {
            assert!(Tag::parse(ok).is_some(), "{ok} should be valid");
        }
        for bad in ["", ".", "..", "-x", ".x", "a/b", "a:b", "a b", &"t".repeat(129)] {
            assert!(Tag::parse(bad).is_none(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn references_and_digests() {
        let hex = "ab".repeat(32);
        assert_eq!(
            Reference::parse(&format!("sha256:{hex}")).unwrap(),
            Reference::Digest(format!("sha256:{hex}").parse().unwrap())
        );
        assert_eq!(
            Reference::parse("v1").unwrap(),
            Reference::Tag(Tag::parse("v1").unwrap())
        );
        let err = Reference::parse(&format!("sha512:{}", "a".repeat(128))).unwrap_err();
        assert_eq!(err.code, ErrorCode::DigestInvalid);
        assert!(err.message.contains("unsupported"), "{}", err.message);
        assert_eq!(
            Reference::parse("sha256:zz").unwrap_err().code,
            ErrorCode::DigestInvalid
        );
        assert_eq!(
            Reference::parse("../x").unwrap_err().code,
            ErrorCode::ManifestInvalid
        );
    }

    #[test]
    fn base_paths() {
        assert_eq!(parse_path("/v2/"), Ok(Route::Base));
        assert_eq!(parse_path("/v2"), Ok(Route::Base));
        assert_eq!(parse_path("/v1/"), Err(RouteError::NotFound));
        assert_eq!(parse_path("/v2x/a/tags/list"), Err(RouteError::NotFound));
        assert_eq!(parse_path("/"), Err(RouteError::NotFound));
    }

    #[test]
    fn endpoint_paths_with_nested_names() {
        let d = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            parse_path(&format!("/v2/a/b/c/blobs/{d}")),
            Ok(Route::Blob {
                name: name("a/b/c"),
                digest: d.clone()
            })
        );
        assert_eq!(
            parse_path("/v2/a/b/blobs/uploads/"),
            Ok(Route::UploadStart { name: name("a/b") })
        );
        assert_eq!(
            parse_path("/v2/a/b/blobs/uploads"),
            Ok(Route::UploadStart { name: name("a/b") })
        );
        assert_eq!(
            parse_path("/v2/a/blobs/uploads/1234-uuid"),
            Ok(Route::Upload {
                name: name("a"),
                id: "1234-uuid".into()
            })
        );
        assert_eq!(
            parse_path("/v2/x/y/manifests/latest"),
            Ok(Route::Manifest {
                name: name("x/y"),
                reference: "latest".into()
            })
        );
        assert_eq!(
            parse_path("/v2/x/y/tags/list"),
            Ok(Route::Tags { name: name("x/y") })
        );
        // Names may contain the endpoint words as components.
        assert_eq!(
            parse_path("/v2/blobs/manifests/manifests/v1"),
            Ok(Route::Manifest {
                name: name("blobs/manifests"),
                reference: "v1".into()
            })
        );
        assert_eq!(
            parse_path("/v2/tags/list/tags/list"),
            Ok(Route::Tags {
                name: name("tags/list")
            })
        );
        // Percent-encoded colon in a digest.
        assert_eq!(
            parse_path(&format!("/v2/a/manifests/{}", d.replace(':', "%3A"))),
            Ok(Route::Manifest {
                name: name("a"),
                reference: d.clone()
            })
        );
    }

    #[test]
    fn malformed_paths() {
        assert_eq!(parse_path("/v2/blobs/sha256:00"), Err(RouteError::NotFound));
        assert_eq!(parse_path("/v2/a/manifests/"), Err(RouteError::NotFound));
        assert_eq!(parse_path("/v2/a/unknown/x"), Err(RouteError::NotFound));
        assert_eq!(parse_path("/v2/a/tags/other"), Err(RouteError::NotFound));
        assert_eq!(
            parse_path("/v2/Bad/Name/tags/list"),
            Err(RouteError::NameInvalid("Bad/Name".into()))
        );
        assert_eq!(
            parse_path("/v2/../etc/manifests/x"),
            Err(RouteError::NameInvalid("../etc".into()))
        );
        assert_eq!(
            parse_path("/v2/a/%2e%2e/manifests/x"),
            Err(RouteError::NameInvalid("a/..".into()))
        );
        assert_eq!(
            parse_path("/v2/a//b/tags/list"),
            Err(RouteError::NameInvalid("a//b".into()))
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("sha256%3aab"), "sha256:ab");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("a%2Fb"), "a/b");
    }

    #[test]
    fn query_parameters() {
        let uri: Uri = "/v2/a/blobs/uploads/?mount=sha256%3Aab&from=x%2Fy"
            .parse()
            .unwrap();
        let q = query_params(&uri).unwrap();
        assert_eq!(q["mount"], "sha256:ab");
        assert_eq!(q["from"], "x/y");
        assert!(query_params(&"/v2/".parse().unwrap()).unwrap().is_empty());
    }
}
