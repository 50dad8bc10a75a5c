//! Telling image manifests from image indexes by their bytes, so that manifests can be
//! passed on unchanged (same bytes, same media type, same digest).

use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};

use super::RegistryError;
use crate::model::ImageRef;

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

/// Reads `mediaType` (and, for OCI manifests that leave it out, the shape) of a manifest.
/// The largest manifest Kiln reads (the distribution spec's recommended limit).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

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
}
