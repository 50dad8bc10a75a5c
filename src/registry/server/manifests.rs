//! Manifests: `PUT`/`HEAD`/`GET`/`DELETE /v2/<name>/manifests/<tag|digest>`.
//!
//! A pushed manifest is verified before it is stored: at most 4 MiB (413 otherwise), its
//! digest equal to the reference when that is a digest, a supported media type (OCI or
//! Docker v2 image manifest or index) agreeing between `Content-Type` and the body's
//! `mediaType`, and every blob (config, layers; foreign layers with `urls` excepted) or
//! child manifest (for an index) it references present in the same repository. The bytes are
//! stored exactly as received and served back with the media type they were pushed with;
//! `Accept` is not consulted.

use axum::{
    extract::Request,
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use serde::Deserialize;

use super::{
    error::{ErrorCode, ErrorResponse, Result},
    routes::{parse_digest, Reference, RepoName},
    upload::CONTENT_DIGEST_HEADER,
    Registry,
};
use crate::model::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The largest manifest accepted (as distribution).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// How much of a too-large manifest is read (and dropped) before answering 413.
const MAX_DRAINED_BYTES: usize = 64 * 1024 * 1024;

/// What a manifest is, as far as verification goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Config and layers, which are blobs.
    Image,
    /// Child manifests.
    Index,
}

pub fn kind_of(media_type: &str) -> Option<Kind> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Image),
        OCI_INDEX | DOCKER_MANIFEST_LIST => Some(Kind::Index),
        _ => None,
    }
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    urls: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: Option<u64>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// What a manifest references, to be checked against the repository.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub media_type: String,
    pub kind: Kind,
    /// Blobs (for an image) or manifests (for an index) that must be in the repository.
    pub references: Vec<Digest>,
}

fn invalid(message: impl Into<String>) -> ErrorResponse {
    ErrorResponse::new(ErrorCode::ManifestInvalid, message)
}

/// Checks a manifest's shape and media type. `content_type` is the request's `Content-Type`
/// without parameters; absent, `application/json` and `application/octet-stream` defer to the
/// body's `mediaType` (and then to the shape).
pub fn check(content_type: Option<&str>, bytes: &[u8]) -> Result<Checked> {
    let doc: Document =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
    if doc.schema_version != Some(2) {
        return Err(invalid(format!(
            "unsupported schemaVersion {:?}: only 2 is supported",
            doc.schema_version
        )));
    }
    let declared =
        content_type.filter(|ct| !matches!(*ct, "" | "application/json" | "application/octet-stream"));
    if let Some(ct) = declared {
        if kind_of(ct).is_none() {
            return Err(invalid(format!("unsupported manifest media type {ct:?}")));
        }
    }
    if let Some(body_type) = doc.media_type.as_deref() {
        if kind_of(body_type).is_none() {
            return Err(invalid(format!("unsupported manifest mediaType {body_type:?}")));
        }
        if let Some(ct) = declared {
            if ct != body_type {
                return Err(invalid(format!(
                    "Content-Type {ct:?} disagrees with the manifest's mediaType {body_type:?}"
                )));
            }
        }
    }
    let media_type = match (declared, doc.media_type.as_deref()) {
        (Some(t), _) | (None, Some(t)) => t.to_owned(),
        (None, None) if doc.manifests.is_some() => OCI_INDEX.to_owned(),
        (None, None) if doc.config.is_some() => OCI_MANIFEST.to_owned(),
        (None, None) => return Err(invalid("cannot tell the manifest's media type")),
    };
    let kind = kind_of(&media_type).expect("checked above");
    let descriptors: Vec<&Descriptor> = match kind {
        Kind::Image => {
            let config = doc
                .config
                .as_ref()
                .ok_or_else(|| invalid("image manifest has no config"))?;
            let layers = doc
                .layers
                .as_ref()
                .ok_or_else(|| invalid("image manifest has no layers"))?;
            std::iter::once(config)
                .chain(layers.iter().filter(|layer| layer.urls.is_empty()))
                .collect()
        }
        Kind::Index => doc
            .manifests
            .as_ref()
            .ok_or_else(|| invalid("index has no manifests"))?
            .iter()
            .collect(),
    };
    let references = descriptors
        .into_iter()
        .map(|d| {
            parse_digest(&d.digest).map_err(|e| {
                invalid(format!("referenced digest {:?}: {}", d.digest, e.message))
                    .with_detail(serde_json::json!({ "digest": d.digest }))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Checked {
        media_type,
        kind,
        references,
    })
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("ascii")
}

async fn exists_or_name_unknown(registry: &Registry, repo: &RepoName) -> Result<()> {
    let exists = registry
        .storage
        .repo_exists(repo)
        .await
        .map_err(|e| ErrorResponse::internal("looking up repository", e))?;
    if exists {
        Ok(())
    } else {
        Err(name_unknown(repo))
    }
}

pub fn name_unknown(repo: &RepoName) -> ErrorResponse {
    ErrorResponse::new(ErrorCode::NameUnknown, format!("repository {repo} is unknown"))
        .with_detail(serde_json::json!({ "name": repo.as_str() }))
}

fn manifest_unknown(reference: &str) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::ManifestUnknown,
        format!("manifest {reference} is unknown"),
    )
    .with_detail(serde_json::json!({ "reference": reference }))
}

/// `HEAD`/`GET /v2/<name>/manifests/<reference>`.
pub async fn get(registry: &Registry, repo: &RepoName, reference: &str) -> Result<Response> {
    let parsed = Reference::parse(reference)?;
    exists_or_name_unknown(registry, repo).await?;
    let storage = &registry.storage;
    let digest = match parsed {
        Reference::Digest(d) => d,
        Reference::Tag(tag) => {
            let digest = storage
                .resolve_tag(repo, &tag)
                .await
                .map_err(|e| ErrorResponse::internal("resolving tag", e))?
                .ok_or_else(|| manifest_unknown(reference))?;
            if registry.gc.expires(repo) {
                // A use: the tag's expiry starts again (see `gc`).
                storage
                    .stamp_tag(repo, &tag)
                    .await
                    .map_err(|e| ErrorResponse::internal("stamping tag", e))?;
            }
            digest
        }
    };
    let media_type = storage
        .manifest_media_type(repo, &digest)
        .await
        .map_err(|e| ErrorResponse::internal("looking up manifest", e))?
        .ok_or_else(|| manifest_unknown(reference))?;
    let bytes = match tokio::fs::read(storage.blob_path(&digest)).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(manifest_unknown(reference)),
        Err(e) => return Err(ErrorResponse::internal("reading manifest", e)),
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, header_value(&media_type));
    headers.insert(
        HeaderName::from_static(CONTENT_DIGEST_HEADER),
        header_value(digest.as_str()),
    );
    headers.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok((StatusCode::OK, headers, bytes).into_response())
}

/// Reads a request body of at most [`MAX_MANIFEST_BYTES`].
async fn read_capped(request: Request) -> Result<Vec<u8>> {
    let too_large = || {
        invalid(format!("manifest exceeds {MAX_MANIFEST_BYTES} bytes"))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = request.into_body().into_data_stream();
    if announced.is_some_and(|n| n > MAX_MANIFEST_BYTES as u64) {
        drain(&mut stream, 0).await;
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(announced.unwrap_or(0) as usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| invalid(format!("failed to read the request body: {e}")))?;
        if bytes.len() + chunk.len() > MAX_MANIFEST_BYTES {
            drain(&mut stream, bytes.len() + chunk.len()).await;
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Reads and discards the rest of a refused body (up to [`MAX_DRAINED_BYTES`] in all), so
/// that a client still sending it reads the error instead of a broken connection.
async fn drain(stream: &mut axum::body::BodyDataStream, mut seen: usize) {
    while seen <= MAX_DRAINED_BYTES {
        match stream.next().await {
            Some(Ok(chunk)) => seen += chunk.len(),
            _ => return,
        }
    }
}

/// `PUT /v2/<name>/manifests/<reference>`.
pub async fn put(
    registry: &Registry,
    repo: &RepoName,
    reference: &str,
    request: Request,
) -> Result<Response> {
    let parsed = Reference::parse(reference)?;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let bytes = read_capped(request).await?;
    let digest = Digest::of(&bytes);
    if let Reference::Digest(expected) = &parsed {
        if expected != &digest {
            return Err(ErrorResponse::new(
                ErrorCode::DigestInvalid,
                format!("manifest has digest {digest}, not {expected}"),
            )
            .with_detail(serde_json::json!({ "expected": expected, "actual": digest })));
        }
    }
    let checked = check(content_type.as_deref(), &bytes)?;
    let storage = &registry.storage;
    for referenced in &checked.references {
        let present = match checked.kind {
            Kind::Image => storage.blob_in_repo(repo, referenced).await,
            Kind::Index => storage
                .manifest_media_type(repo, referenced)
                .await
                .map(|m| m.is_some()),
        }
        .map_err(|e| ErrorResponse::internal("checking manifest references", e))?;
        if !present {
            let what = match checked.kind {
                Kind::Image => "blob",
                Kind::Index => "manifest",
            };
            return Err(ErrorResponse::new(
                ErrorCode::ManifestBlobUnknown,
                format!("referenced {what} {referenced} is not in repository {repo}"),
            )
            .with_detail(serde_json::json!({ "digest": referenced })));
        }
    }
    let tag = match &parsed {
        Reference::Tag(tag) => Some(tag),
        Reference::Digest(_) => None,
    };
    storage
        .put_manifest(repo, &digest, &checked.media_type, &bytes, tag)
        .await
        .map_err(|e| ErrorResponse::internal("storing manifest", e))?;
    tracing::debug!(repo = %repo, reference, digest = %digest, media_type = %checked.media_type, "manifest stored");
    let headers: [(HeaderName, HeaderValue); 3] = [
        (
            header::LOCATION,
            header_value(&format!("/v2/{repo}/manifests/{digest}")),
        ),
        (
            HeaderName::from_static(CONTENT_DIGEST_HEADER),
            header_value(digest.as_str()),
        ),
        (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
    ];
    Ok((StatusCode::CREATED, headers).into_response())
}

/// `DELETE /v2/<name>/manifests/<reference>`: by digest removes the manifest and its tags; by
/// tag removes only the tag (OCI 1.1).
pub async fn delete(registry: &Registry, repo: &RepoName, reference: &str) -> Result<Response> {
    let removed = match Reference::parse(reference)? {
        Reference::Digest(d) => registry.storage.delete_manifest(repo, &d).await,
        Reference::Tag(t) => registry.storage.delete_tag(repo, &t).await,
    }
    .map_err(|e| ErrorResponse::internal("deleting manifest", e))?;
    if !removed {
        return Err(manifest_unknown(reference));
    }
    tracing::debug!(repo = %repo, reference, "manifest deleted");
    Ok((StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn image(media_type: Option<&str>) -> Vec<u8> {
        let mut v = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d('a'), "size": 1},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d('b'), "size": 1},
                {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                 "digest": d('c'), "size": 1, "urls": ["https://example.invalid/layer"]}
            ]
        });
        if let Some(mt) = media_type {
            v["mediaType"] = mt.into();
        }
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn image_manifest_references_config_and_non_foreign_layers() {
        let checked = check(Some(OCI_MANIFEST), &image(Some(OCI_MANIFEST))).unwrap();
        assert_eq!(checked.kind, Kind::Image);
        assert_eq!(checked.media_type, OCI_MANIFEST);
        let expected: Vec<Digest> = vec![d('a').parse().unwrap(), d('b').parse().unwrap()];
        assert_eq!(checked.references, expected);
    }

    #[test]
    fn media_type_comes_from_header_body_or_shape() {
        assert_eq!(
            check(None, &image(Some(DOCKER_MANIFEST))).unwrap().media_type,
            DOCKER_MANIFEST
        );
        assert_eq!(
            check(Some(DOCKER_MANIFEST), &image(None)).unwrap().media_type,
            DOCKER_MANIFEST
        );
        assert_eq!(
            check(Some("application/json"), &image(None)).unwrap().media_type,
            OCI_MANIFEST
        );
        let index =
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{"digest": d('e')}]}))
                .unwrap();
        let checked = check(None, &index).unwrap();
        assert_eq!(
            (checked.kind, checked.media_type.as_str()),
            (Kind::Index, OCI_INDEX)
        );
        assert_eq!(checked.references, vec![d('e').parse::<Digest>().unwrap()]);
    }

    #[test]
    fn invalid_manifests() {
        let code = |ct: Option<&str>, body: &[u8]| check(ct, body).unwrap_err().code;
        assert_eq!(code(None, b"not json"), ErrorCode::ManifestInvalid);
        assert_eq!(code(None, br#"{"schemaVersion":1}"#), ErrorCode::ManifestInvalid);
        // Header and body disagree.
        assert_eq!(
            code(Some(DOCKER_MANIFEST), &image(Some(OCI_MANIFEST))),
            ErrorCode::ManifestInvalid
        );
        // Unknown media types.
        assert_eq!(code(Some("text/plain"), &image(None)), ErrorCode::ManifestInvalid);
        assert_eq!(
            code(None, &image(Some("application/x-other"))),
            ErrorCode::ManifestInvalid
        );
        // An image without layers, an index without manifests.
        assert_eq!(
            code(
                Some(OCI_MANIFEST),
                br#"{"schemaVersion":2,"config":{"digest":"sha256:00"}}"#
            ),
            ErrorCode::ManifestInvalid
        );
        assert_eq!(
            code(Some(OCI_INDEX), br#"{"schemaVersion":2}"#),
            ErrorCode::ManifestInvalid
        );
        // A malformed referenced digest.
        let bad = br#"{"schemaVersion":2,"config":{"digest":"md5:00"},"layers":[]}"#;
        let err = check(Some(OCI_MANIFEST), bad).unwrap_err();
        assert_eq!(err.code, ErrorCode::ManifestInvalid);
        assert_eq!(err.detail.unwrap()["digest"], "md5:00");
    }
}
