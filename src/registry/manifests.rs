//! Image manifests: the one place Kiln fetches, pushes and reads them.
//!
//! - Telling image manifests from image indexes by their bytes ([`inspect`],
//!   [`manifest_kind`]), so that manifests can be passed on unchanged (same bytes, same media
//!   type, same digest).
//! - Fetching one under the client's retry policy ([`RegistryClient::fetch_manifest`]; a
//!   pinned reference is checked against its digest by oci-client).
//! - Choosing a platform's manifest from an index
//!   ([`RegistryClient::choose_platform`]; the matching itself is `platform.rs`').
//! - Pushing manifest bytes unchanged under the retry policy
//!   ([`RegistryClient::push_manifest`], and the engine's
//!   [`RegistryClient::push_manifest_bytes`]).
//!
//! `resolve`, `copy` and `fetch_image` all go through these.

use std::sync::Arc;

use bytes::Bytes;
use oci_client::manifest::{
    OciDescriptor, OciImageIndex, OciImageManifest, IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use reqwest::header::HeaderValue;
use tracing::Instrument as _;

use super::{
    client::{parse_digest, Oci},
    platform::select_manifest,
    Platform, RegistryClient, RegistryError,
};
use crate::model::{AuthPolicy, Digest, ImageRef};

/// The media type of a Docker schema 1 manifest, which Kiln does not read.
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// The manifest media types Kiln asks for and understands (OCI and Docker schema 2).
pub(crate) const MANIFEST_MEDIA_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// What a manifest is, with the media type to send when pushing it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ManifestKind {
    /// A single-platform image manifest.
    Image { media_type: String },
    /// An image index or manifest list.
    Index { media_type: String },
}

/// The largest manifest Kiln reads (the distribution spec's recommended limit).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Reads `mediaType` (and, for OCI manifests that leave it out, the shape) of a manifest.
pub(crate) fn inspect(reference: &ImageRef, body: &[u8]) -> Result<ManifestKind, RegistryError> {
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(RegistryError::InvalidManifest {
            reference: reference.to_string(),
            reason: format!(
                "{} bytes, more than the {MAX_MANIFEST_BYTES} bytes Kiln reads",
                body.len()
            ),
        });
    }
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| RegistryError::InvalidManifest {
            reference: reference.to_string(),
            reason: format!("not JSON: {e}"),
        })?;
    let unsupported = |media_type: String| RegistryError::UnsupportedManifest {
        reference: reference.to_string(),
        media_type,
    };
    let schema = doc.get("schemaVersion").and_then(serde_json::Value::as_i64);
    if schema != Some(2) {
        return Err(unsupported(match schema {
            Some(v) => format!("schema version {v}"),
            None => "no schema version".into(),
        }));
    }
    match doc.get("mediaType").and_then(serde_json::Value::as_str) {
        Some(mt @ (OCI_IMAGE_MEDIA_TYPE | IMAGE_MANIFEST_MEDIA_TYPE)) => Ok(ManifestKind::Image {
            media_type: mt.to_owned(),
        }),
        Some(mt @ (OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE)) => Ok(ManifestKind::Index {
            media_type: mt.to_owned(),
        }),
        Some(other) => Err(unsupported(other.to_owned())),
        // `mediaType` is optional in OCI manifests (Docker's always have it).
        None if doc.get("manifests").is_some() => Ok(ManifestKind::Index {
            media_type: OCI_IMAGE_INDEX_MEDIA_TYPE.to_owned(),
        }),
        None if doc.get("config").is_some() => Ok(ManifestKind::Image {
            media_type: OCI_IMAGE_MEDIA_TYPE.to_owned(),
        }),
        None => Err(unsupported("no media type".into())),
    }
}

/// [`inspect`], with a schema 1 manifest named by its media type.
pub(crate) fn manifest_kind(reference: &ImageRef, body: &[u8]) -> Result<ManifestKind, RegistryError> {
    #[derive(serde::Deserialize)]
    struct Schema {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<i64>,
    }
    if let Ok(Schema {
        schema_version: Some(1),
    }) = serde_json::from_slice::<Schema>(body)
    {
        return Err(RegistryError::UnsupportedManifest {
            reference: reference.to_string(),
            media_type: DOCKER_SCHEMA1.to_owned(),
        });
    }
    inspect(reference, body)
}

/// The digest and size of a manifest's descriptor, in Kiln's types.
pub(crate) fn descriptor_parts(
    reference: &ImageRef,
    d: &OciDescriptor,
) -> Result<(Digest, u64), RegistryError> {
    let digest = parse_digest(reference, &d.digest)?;
    let size = u64::try_from(d.size).map_err(|_| RegistryError::InvalidManifest {
        reference: reference.to_string(),
        reason: format!("blob {} has a negative size", d.digest),
    })?;
    Ok((digest, size))
}

/// Parses the bytes of a single-platform image manifest.
pub(crate) fn parse_image_manifest(
    reference: &ImageRef,
    body: &[u8],
) -> Result<OciImageManifest, RegistryError> {
    serde_json::from_slice(body).map_err(|e| RegistryError::InvalidManifest {
        reference: reference.to_string(),
        reason: format!("invalid image manifest: {e}"),
    })
}

/// The `Content-Type` to push a manifest of `media_type` with: one of the
/// [`MANIFEST_MEDIA_TYPES`], else `UnsupportedManifest` naming `reference`.
pub(crate) fn content_type(reference: &ImageRef, media_type: &str) -> Result<HeaderValue, RegistryError> {
    let unsupported = || RegistryError::UnsupportedManifest {
        reference: reference.to_string(),
        media_type: media_type.to_owned(),
    };
    if !MANIFEST_MEDIA_TYPES.contains(&media_type) {
        return Err(unsupported());
    }
    media_type.parse().map_err(|_| unsupported())
}

impl RegistryClient {
    /// GETs the manifest of `image` (any type Kiln understands) under the client's retry
    /// policy; returns its bytes and the digest the registry gives for them. A pinned
    /// reference is checked against the bytes by oci-client.
    pub(crate) async fn fetch_manifest(
        &self,
        oci: &Oci,
        image: &ImageRef,
    ) -> Result<(Bytes, String), RegistryError> {
        let reference = image.to_oci();
        self.retry_policy()
            .run(image.registry(), "fetch manifest", || async {
                oci.client
                    .pull_manifest_raw(&reference, &oci.auth, MANIFEST_MEDIA_TYPES)
                    .await
                    .map_err(|e| RegistryError::FetchManifest {
                        reference: image.to_string(),
                        source: Arc::new(e),
                    })
            })
            .await
    }

    /// The digest of `platform`'s manifest in the index `body` of `image`;
    /// `PlatformNotFound` (naming the platforms the index offers) when it has none.
    pub(crate) fn choose_platform(
        &self,
        image: &ImageRef,
        body: &[u8],
        platform: &Platform,
    ) -> Result<Digest, RegistryError> {
        let index: OciImageIndex =
            serde_json::from_slice(body).map_err(|e| RegistryError::InvalidManifest {
                reference: image.to_string(),
                reason: format!("invalid image index: {e}"),
            })?;
        let entry =
            select_manifest(&index, platform).map_err(|available| RegistryError::PlatformNotFound {
                reference: image.to_string(),
                platform: platform.to_string(),
                available,
            })?;
        tracing::debug!(image = %image, manifest = %entry.digest, platform = %platform,
            "picked the platform manifest from the index");
        parse_digest(image, &entry.digest)
    }

    /// PUTs manifest `body` (whose digest is `digest`) unchanged under `target` (a tag, or
    /// `digest` itself) with `content_type`, under the client's retry policy.
    pub(crate) async fn push_manifest(
        &self,
        dst: &Oci,
        target: &ImageRef,
        body: &Bytes,
        content_type: &HeaderValue,
        digest: &Digest,
    ) -> Result<(), RegistryError> {
        let reference = target.to_oci();
        self.retry_policy()
            .run(target.registry(), "push manifest", || async {
                dst.client
                    .push_manifest_raw(&reference, body.clone(), content_type.clone())
                    .await
                    .map(drop)
                    .map_err(|e| RegistryError::PushManifest {
                        reference: target.to_string(),
                        digest: digest.clone(),
                        source: Arc::new(e),
                    })
            })
            .instrument(tracing::debug_span!("push_manifest", %target, %digest))
            .await
    }

    /// Pushes manifest bytes (unchanged) under `target` with `media_type` (an OCI or Docker
    /// schema 2 manifest or index type); returns the digest of the bytes.
    ///
    /// A `target` with a tag is pushed by tag; one with only a digest is pushed by digest,
    /// which must be the digest of `bytes` (a `TargetDigestMismatch` otherwise, also when
    /// a tagged target names another digest). Blobs the manifest names must be present
    /// first. Written with the installation's credentials, whatever the policy says (Kiln
    /// writes its own repositories on its own behalf); `_auth` is unused.
    pub async fn push_manifest_bytes(
        &self,
        target: &ImageRef,
        bytes: Vec<u8>,
        media_type: &str,
        _auth: &AuthPolicy,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        if target.digest().is_some_and(|d| *d != digest) {
            return Err(RegistryError::TargetDigestMismatch {
                reference: target.to_string(),
                actual: digest,
            });
        }
        let content_type = content_type(target, media_type)?;
        let reference = match target.tag() {
            Some(tag) => ImageRef::with_tag(target.registry(), target.repository(), tag),
            None => target.pinned(digest.clone()),
        };
        let dst = self.oci_for_kiln(&reference).await?;
        self.push_manifest(&dst, &reference, &Bytes::from(bytes), &content_type, &digest)
            .await?;
        tracing::debug!(target = %reference, %digest, media_type, "manifest pushed");
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryErrorKind;

    fn r() -> ImageRef {
        "r.example/a:1".parse().unwrap()
    }

    #[test]
    fn tells_images_from_indexes() {
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{}}"#;
        assert_eq!(
            inspect(&r(), docker).unwrap(),
            ManifestKind::Image {
                media_type: IMAGE_MANIFEST_MEDIA_TYPE.into()
            }
        );
        let bare_oci_index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(
            inspect(&r(), bare_oci_index).unwrap(),
            ManifestKind::Index {
                media_type: OCI_IMAGE_INDEX_MEDIA_TYPE.into()
            }
        );
        let bare_oci = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert!(matches!(
            inspect(&r(), bare_oci).unwrap(),
            ManifestKind::Image { .. }
        ));
    }

    #[test]
    fn refuses_what_it_cannot_copy() {
        let schema1 = br#"{"schemaVersion":1,"name":"a"}"#;
        assert_eq!(
            inspect(&r(), schema1).unwrap_err().kind(),
            RegistryErrorKind::InvalidInput
        );
        let artifact = br#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart"}"#;
        let err = inspect(&r(), artifact).unwrap_err();
        assert_eq!(err.kind(), RegistryErrorKind::InvalidInput);
        assert!(err.to_string().contains("application/vnd.cncf.helm.chart"));
        assert_eq!(
            inspect(&r(), b"<html>").unwrap_err().kind(),
            RegistryErrorKind::Internal
        );
    }

    #[test]
    fn schema1_is_refused_by_its_media_type() {
        let r: ImageRef = "r.example/a:1".parse().unwrap();
        let err = manifest_kind(&r, br#"{"schemaVersion":1,"name":"a","fsLayers":[]}"#).unwrap_err();
        assert_eq!(err.kind(), crate::registry::RegistryErrorKind::InvalidInput);
        assert!(err.to_string().contains(DOCKER_SCHEMA1), "{err}");
    }
}
