//! Fetching a single-platform image as the engine needs it
//! ([`RegistryClient::fetch_image`]): the platform manifest (through `manifests`), its config
//! (read into memory, checked for size and digest) and its layer descriptors.
//!
//! Read with the credentials the request's [`AuthPolicy`] allows, like `resolve`.

use std::sync::Arc;

use futures::StreamExt as _;
use oci_client::{
    errors::OciDistributionError,
    manifest::{IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE},
};

use super::{
    blobs::{blob_descriptor, is_digest_error},
    client::Oci,
    manifests::{descriptor_parts, manifest_kind, parse_image_manifest, ManifestKind},
    Platform, RegistryClient, RegistryError,
};
use crate::model::{AuthPolicy, Digest, ImageRef};

/// The largest image config [`RegistryClient::fetch_image`] reads into memory.
pub const MAX_CONFIG_BYTES: u64 = 32 * 1024 * 1024;

/// A single-platform image as the engine needs it: the manifest bytes (unchanged), the
/// parsed config bytes, and the layers in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedImage {
    /// The image pinned to the platform manifest's digest (an index was resolved to the
    /// platform asked for).
    pub reference: ImageRef,
    /// The manifest exactly as the registry served it (its digest is `reference`'s).
    pub manifest_bytes: Vec<u8>,
    /// An OCI image manifest or a Docker schema 2 manifest media type.
    pub manifest_media_type: String,
    /// The image config, checked against `config_digest` and its descriptor's size.
    pub config_bytes: Vec<u8>,
    pub config_digest: Digest,
    /// The manifest's layers, in order (non-distributable ones included, as listed).
    pub layers: Vec<LayerDescriptor>,
}

/// One layer of a [`FetchedImage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

impl RegistryClient {
    /// The platform-resolved image manifest of `image` (pinned digest form) and its parsed
    /// config bytes.
    ///
    /// An index (OCI index or Docker manifest list) is resolved to `platform` (a build's
    /// stages may each want another) and that manifest is fetched by digest. Docker schema 2 and OCI image manifests are
    /// accepted; a schema 1 manifest, an unknown media type, a nested index or a config that
    /// is not an image config is an `InvalidInput` error naming the media type.
    pub async fn fetch_image(
        &self,
        image: &ImageRef,
        platform: &Platform,
        auth: &AuthPolicy,
    ) -> Result<FetchedImage, RegistryError> {
        let oci = self.oci_for_request(image, auth).await?;
        let (mut body, _) = self.fetch_manifest(&oci, image).await?;
        let (reference, media_type) = match manifest_kind(image, &body)? {
            ManifestKind::Image { media_type } => (image.pinned(Digest::of(&body)), media_type),
            ManifestKind::Index { .. } => {
                let pinned = image.pinned(self.choose_platform(image, &body, platform)?);
                // oci-client checks the bytes against the digest in the reference.
                (body, _) = self.fetch_manifest(&oci, &pinned).await?;
                match manifest_kind(&pinned, &body)? {
                    ManifestKind::Image { media_type } => (pinned, media_type),
                    ManifestKind::Index { media_type } => {
                        return Err(RegistryError::UnsupportedManifest {
                            reference: pinned.to_string(),
                            media_type: format!("{media_type} nested in an index"),
                        })
                    }
                }
            }
        };
        let manifest = parse_image_manifest(&reference, &body)?;
        let config_type = manifest.config.media_type.as_str();
        if config_type != IMAGE_CONFIG_MEDIA_TYPE && config_type != IMAGE_DOCKER_CONFIG_MEDIA_TYPE {
            return Err(RegistryError::UnsupportedManifest {
                reference: reference.to_string(),
                media_type: format!("{media_type} with config {config_type}"),
            });
        }
        let (config_digest, config_size) = descriptor_parts(&reference, &manifest.config)?;
        let layers = manifest
            .layers
            .iter()
            .map(|d| {
                let (digest, size) = descriptor_parts(&reference, d)?;
                Ok(LayerDescriptor {
                    digest,
                    size,
                    media_type: d.media_type.clone(),
                })
            })
            .collect::<Result<Vec<_>, RegistryError>>()?;
        let config_bytes = self
            .retry_policy()
            .run(reference.registry(), "pull config", || {
                pull_small_blob(&oci, &reference, &config_digest, config_size)
            })
            .await?;
        tracing::debug!(image = %reference, layers = layers.len(), "image fetched");
        Ok(FetchedImage {
            reference,
            manifest_bytes: body.to_vec(),
            manifest_media_type: media_type,
            config_bytes,
            config_digest,
            layers,
        })
    }
}

/// Reads a small blob (a config) into memory, checking its size as it arrives and its digest
/// at the end.
async fn pull_small_blob(
    oci: &Oci,
    reference: &ImageRef,
    digest: &Digest,
    size: u64,
) -> Result<Vec<u8>, RegistryError> {
    let size_error = |actual: u64| RegistryError::BlobSizeMismatch {
        reference: reference.to_string(),
        digest: digest.clone(),
        expected: size,
        actual,
    };
    if size > MAX_CONFIG_BYTES {
        return Err(RegistryError::InvalidManifest {
            reference: reference.to_string(),
            reason: format!("config {digest} has {size} bytes, more than the {MAX_CONFIG_BYTES} Kiln reads"),
        });
    }
    let pull_error = |e: OciDistributionError| RegistryError::PullBlob {
        reference: reference.to_string(),
        digest: digest.clone(),
        source: Arc::new(e),
    };
    let mut stream = oci
        .client
        .pull_blob_stream(&reference.to_oci(), &blob_descriptor(digest, Some(size)))
        .await
        .map_err(pull_error)?;
    let mut bytes = Vec::with_capacity(size as usize);
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                bytes.extend_from_slice(&chunk);
                if bytes.len() as u64 > size {
                    return Err(size_error(bytes.len() as u64));
                }
            }
            // Decided by the check below, as in `pull_blob_to_file`.
            Err(e) if is_digest_error(&e) => break,
            Err(e) => return Err(pull_error(OciDistributionError::IoError(e))),
        }
    }
    if bytes.len() as u64 != size {
        return Err(size_error(bytes.len() as u64));
    }
    let actual = Digest::of(&bytes);
    if actual != *digest {
        return Err(RegistryError::BlobDigestMismatch {
            reference: reference.to_string(),
            expected: digest.clone(),
            actual: actual.to_string(),
        });
    }
    Ok(bytes)
}
