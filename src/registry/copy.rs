//! [`RegistryClient::copy`]: copying one single-platform image, blob by blob, into Kiln's
//! workspace repository, with the manifest bytes unchanged so that the digest is preserved.
//!
//! For each blob (config and layers, each once): HEAD it on the target and skip it when it is
//! there; when source and target are on one registry, ask for a cross-repository mount; else
//! (or when the mount is refused) stream it from the source straight into a resumable upload
//! on the target (`blobs.rs`). Memory stays bounded by the transport buffers: a layer is never
//! held whole. The bytes are hashed as they stream and committed only when they match the
//! digest, and the registry verifies them again on commit. Up to [`MAX_CONCURRENT_BLOBS`]
//! blobs move at once.
//!
//! Every step runs under the client's retry policy: the manifest fetch, each HEAD, the
//! manifest push and the check after it are retried as a whole; an interrupted blob upload
//! resumes where the target registry has it, reading the source again from that offset.

use std::{collections::HashSet, fmt, sync::Arc};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use oci_client::manifest::{OciDescriptor, OciImageIndex};

use super::{
    client::{parse_digest, Oci},
    credentials::normalize_registry,
    manifests::{content_type, inspect, parse_image_manifest, ManifestKind},
    BlobPush, RegistryClient, RegistryError,
};
use crate::model::{AuthPolicy, Digest, ImageRef};

/// How many blobs of one image are copied at the same time.
pub const MAX_CONCURRENT_BLOBS: usize = 4;

/// Media types of layers that registries do not store ("foreign" Windows layers); the
/// manifest points at their URLs and they are not copied.
const NON_DISTRIBUTABLE: &[&str] = &[
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// One step of a copy, reported as it happens (the build log shows each as a line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyEvent {
    /// The target already had the blob.
    BlobPresent { digest: Digest },
    /// The registry linked the blob from the source repository `from`, no bytes moved.
    BlobMounted { digest: Digest, from: String },
    /// The blob was streamed from the source to the target.
    BlobCopied { digest: Digest, bytes: u64 },
    /// The manifest was pushed to the target tag.
    ManifestPushed { digest: Digest },
}

impl CopyEvent {
    /// The event for a blob made present by `push`.
    fn blob(digest: Digest, push: BlobPush) -> Self {
        match push {
            BlobPush::Present => Self::BlobPresent { digest },
            BlobPush::Mounted { from } => Self::BlobMounted { digest, from },
            BlobPush::Uploaded { bytes } => Self::BlobCopied { digest, bytes },
        }
    }
}

impl fmt::Display for CopyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BlobPresent { digest } => write!(f, "blob {digest} already present"),
            Self::BlobMounted { digest, from } => write!(f, "blob {digest} mounted from {from}"),
            Self::BlobCopied { digest, bytes } => write!(f, "blob {digest} copied ({bytes} bytes)"),
            Self::ManifestPushed { digest } => write!(f, "manifest {digest} pushed"),
        }
    }
}

impl RegistryClient {
    /// Copies the image `source` (pinned by digest) to the tag `target`, and returns the
    /// manifest digest (the source's: the manifest bytes are pushed unchanged). An image
    /// index (a multi-platform build's result) is copied whole: each of its images by digest,
    /// then the index under the tag.
    ///
    /// `source` is read with the credentials `auth` allows for it. `target` is Kiln's own
    /// workspace repository, so it is always written with the **installation's** credentials
    /// for its registry (anonymous when the store has none), whatever `auth` says.
    ///
    /// After the push, the target tag is resolved again and must give the same digest.
    /// `on_event` hears every blob and the manifest push, in completion order.
    pub async fn copy(
        &self,
        source: &ImageRef,
        target: &ImageRef,
        auth: &AuthPolicy,
        on_event: &(dyn Fn(CopyEvent) + Send + Sync),
    ) -> Result<Digest, RegistryError> {
        let Some(digest) = source.digest().cloned() else {
            return Err(RegistryError::SourceNotPinned {
                reference: source.to_string(),
            });
        };
        let Some(tag) = target.tag() else {
            return Err(RegistryError::TargetNotTagged {
                reference: target.to_string(),
            });
        };
        // Push by tag only (a digest in the target would make it a push by digest).
        let target = ImageRef::with_tag(target.registry(), target.repository(), tag);

        let src = self.oci_for_request(source, auth).await?;
        let dst = self.oci_for_kiln(&target).await?;

        // oci-client checks the bytes against the pinned digest.
        let (body, _) = self.fetch_manifest(&src, source).await?;
        match inspect(source, &body)? {
            ManifestKind::Image { media_type } => {
                self.copy_image(&src, &dst, source, &target, &body, &media_type, &digest, on_event)
                    .await?
            }
            ManifestKind::Index { media_type } => {
                let index: OciImageIndex =
                    serde_json::from_slice(&body).map_err(|e| RegistryError::InvalidManifest {
                        reference: source.to_string(),
                        reason: format!("invalid image index: {e}"),
                    })?;
                for entry in &index.manifests {
                    let entry_digest = parse_digest(source, &entry.digest)?;
                    let image = source.pinned(entry_digest.clone());
                    let (image_body, _) = self.fetch_manifest(&src, &image).await?;
                    let ManifestKind::Image { media_type } = inspect(&image, &image_body)? else {
                        return Err(RegistryError::SourceIsIndex {
                            reference: image.to_string(),
                        });
                    };
                    let by_digest = target.pinned(entry_digest.clone());
                    self.copy_image(
                        &src,
                        &dst,
                        &image,
                        &by_digest,
                        &image_body,
                        &media_type,
                        &entry_digest,
                        on_event,
                    )
                    .await?;
                }
                let content_type = content_type(source, &media_type)?;
                self.push_manifest(&dst, &target, &body, &content_type, &digest)
                    .await?;
                on_event(CopyEvent::ManifestPushed {
                    digest: digest.clone(),
                });
            }
        }

        let target_reference = target.to_oci();
        let actual = self
            .retry_policy()
            .run(target.registry(), "check pushed manifest", || async {
                dst.client
                    .fetch_manifest_digest(&target_reference, &dst.auth)
                    .await
                    .map_err(|e| RegistryError::VerifyPush {
                        reference: target.to_string(),
                        source: Arc::new(e),
                    })
            })
            .await?;
        if actual != digest.as_str() {
            return Err(RegistryError::DigestMismatch {
                reference: target.to_string(),
                expected: digest,
                actual,
            });
        }
        tracing::debug!(%source, %target, %digest, "image copied");
        Ok(digest)
    }

    /// Copies the blobs of the image manifest `body` (of `source`, with `media_type` and
    /// `digest`) and then the manifest to `target` (a tag, or the digest for an image of an
    /// index).
    #[allow(clippy::too_many_arguments)]
    async fn copy_image(
        &self,
        src: &Oci,
        dst: &Oci,
        source: &ImageRef,
        target: &ImageRef,
        body: &Bytes,
        media_type: &str,
        digest: &Digest,
        on_event: &(dyn Fn(CopyEvent) + Send + Sync),
    ) -> Result<(), RegistryError> {
        let manifest = parse_image_manifest(source, body)?;

        let mut seen = HashSet::new();
        let blobs: Vec<OciDescriptor> = std::iter::once(manifest.config)
            .chain(manifest.layers)
            .filter(|d| !NON_DISTRIBUTABLE.contains(&d.media_type.as_str()))
            .filter(|d| seen.insert(d.digest.clone()))
            .collect();
        let same_registry = normalize_registry(source.registry()) == normalize_registry(target.registry());
        tracing::debug!(%source, %target, blobs = blobs.len(), same_registry, "copying image");

        let content_type = content_type(source, media_type)?;
        for attempt in 1.. {
            futures::stream::iter(blobs.iter().map(|d| self.transfer(src, dst, source, target, d)))
                .buffer_unordered(MAX_CONCURRENT_BLOBS)
                .try_for_each(|(digest, push)| {
                    on_event(CopyEvent::blob(digest, push));
                    futures::future::ready(Ok(()))
                })
                .await?;
            let pushed = self.push_manifest(dst, target, body, &content_type, digest).await;
            match pushed {
                Ok(_) => break,
                // Blobs checked (and mounted or uploaded) again, then the manifest once more.
                Err(e) if attempt < 3 && e.is_manifest_blob_unknown() => {
                    tracing::warn!(%target, error = %e, attempt, "registry does not see the blobs of the manifest yet; pushing them again");
                }
                Err(e) => return Err(e),
            }
        }
        on_event(CopyEvent::ManifestPushed {
            digest: digest.clone(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_log_lines() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let line = CopyEvent::BlobMounted {
            digest: d.clone(),
            from: "base/alpine".into(),
        }
        .to_string();
        assert_eq!(line, format!("blob {d} mounted from base/alpine"));
        assert_eq!(
            CopyEvent::BlobCopied {
                digest: d.clone(),
                bytes: 12
            }
            .to_string(),
            format!("blob {d} copied (12 bytes)")
        );
        assert_eq!(
            CopyEvent::ManifestPushed { digest: d.clone() }.to_string(),
            format!("manifest {d} pushed")
        );
        assert_eq!(
            CopyEvent::BlobPresent { digest: d.clone() }.to_string(),
            format!("blob {d} already present")
        );
    }
}
