//! The registry primitives the Dockerfile engine builds on: fetching an image's manifest and
//! config ([`RegistryClient::fetch_image`]), moving single blobs between a registry and local
//! files ([`RegistryClient::pull_blob_to_file`], [`RegistryClient::push_blob_file`]), in
//! memory ([`RegistryClient::push_blob_bytes`]) or between repositories
//! ([`RegistryClient::transfer_blob`]), and pushing manifest bytes
//! ([`RegistryClient::push_manifest_bytes`]).
//!
//! # Credentials
//! Reads (`fetch_image`, `pull_blob_to_file`, `blob_exists`, the source of `transfer_blob`)
//! use the credentials the request's [`AuthPolicy`] allows, like `resolve`. Writes
//! (`push_blob_file`, `push_blob_bytes`, `push_manifest_bytes`, the target of
//! `transfer_blob`) go to Kiln's own repositories on Kiln's behalf and, like `copy`, always use
//! the **installation's** credentials for the target registry (anonymous when it has none),
//! whatever the policy says; the write methods take the policy only for a uniform signature.
//!
//! # Streaming and verification
//! No layer is ever held whole in memory. A pulled blob goes from the network through a
//! bounded queue to a blocking thread that hashes it and writes `<dest>.partial`; its size is
//! checked as it arrives (a registry sending more than expected is cut off at once), and only
//! a blob of the right size and digest is synced and renamed to `<dest>`. On every failure
//! (and when the future is dropped) the partial file is removed and `<dest>` is not created.
//! (oci-client checks the digest too; Kiln's own check decides, so the error is a
//! [`RegistryError::BlobDigestMismatch`].)
//!
//! A pushed file is read and hashed on a blocking thread and streamed into one monolithic
//! upload. The last chunk is held back until the whole file has hashed to the digest and had
//! the size it had when the upload started, so a file that does not match never completes an
//! upload: the request is aborted and [`RegistryError::LocalBlobMismatch`] names the file.
//! The registry verifies the digest again when it commits.
//!
//! Nothing here retries or resumes; callers retry `Unavailable` errors.

use std::{
    fmt, io,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use futures::StreamExt as _;
use oci_client::{
    errors::{DigestError, OciDistributionError},
    manifest::{
        OciDescriptor, OciImageIndex, OciImageManifest, IMAGE_CONFIG_MEDIA_TYPE,
        IMAGE_DOCKER_CONFIG_MEDIA_TYPE,
    },
};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::{
    client::{parse_digest, Oci},
    copy::BlobJob,
    credentials::normalize_registry,
    error::describe,
    manifest::{inspect, ManifestKind, MANIFEST_MEDIA_TYPES},
    platform::select_manifest,
    CopyEvent, RegistryClient, RegistryError,
};
use crate::model::{AuthPolicy, Digest, ImageRef};

/// The largest image config [`RegistryClient::fetch_image`] reads into memory.
pub const MAX_CONFIG_BYTES: u64 = 32 * 1024 * 1024;
/// The size of one read of a local file being pushed.
const FILE_CHUNK: usize = 256 * 1024;
/// How many chunks may wait between the network and the blocking file thread.
const QUEUE_DEPTH: usize = 8;
/// The media type of a Docker schema 1 manifest, which Kiln does not read.
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// A single-platform image as the engine needs it: the manifest bytes (unchanged), the
/// parsed config bytes, and the layers in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedImage {
    /// The image pinned to the platform manifest's digest (an index was resolved to the
    /// configured platform).
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

/// How a blob was made present in a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had it.
    Present,
    /// The registry linked it from the repository `from` (same registry); no bytes moved.
    Mounted { from: String },
    /// Its bytes were uploaded (from a file, memory, or streamed from another registry).
    Uploaded { bytes: u64 },
}

impl fmt::Display for BlobPush {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Present => f.write_str("already present"),
            Self::Mounted { from } => write!(f, "mounted from {from}"),
            Self::Uploaded { bytes } => write!(f, "uploaded ({bytes} bytes)"),
        }
    }
}

impl RegistryClient {
    /// The platform-resolved image manifest of `image` (pinned digest form) and its parsed
    /// config bytes.
    ///
    /// An index (OCI index or Docker manifest list) is resolved to the configured platform
    /// and that manifest is fetched by digest. Docker schema 2 and OCI image manifests are
    /// accepted; a schema 1 manifest, an unknown media type, a nested index or a config that
    /// is not an image config is an `InvalidInput` error naming the media type.
    pub async fn fetch_image(
        &self,
        image: &ImageRef,
        auth: &AuthPolicy,
    ) -> Result<FetchedImage, RegistryError> {
        let oci = self.oci_for_request(image, auth).await?;
        let mut body = pull_manifest(&oci, image).await?;
        let (reference, media_type) = match manifest_kind(image, &body)? {
            ManifestKind::Image { media_type } => (image.pinned(Digest::of(&body)), media_type),
            ManifestKind::Index { .. } => {
                let index: OciImageIndex =
                    serde_json::from_slice(&body).map_err(|e| RegistryError::InvalidManifest {
                        reference: image.to_string(),
                        reason: format!("invalid image index: {e}"),
                    })?;
                let entry = select_manifest(&index, self.platform()).map_err(|available| {
                    RegistryError::PlatformNotFound {
                        reference: image.to_string(),
                        platform: self.platform().to_string(),
                        available,
                    }
                })?;
                let pinned = image.pinned(parse_digest(image, &entry.digest)?);
                tracing::debug!(image = %image, manifest = %pinned, platform = %self.platform(),
                    "picked the platform manifest from the index");
                // oci-client checks the bytes against the digest in the reference.
                body = pull_manifest(&oci, &pinned).await?;
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

        let manifest: OciImageManifest =
            serde_json::from_slice(&body).map_err(|e| RegistryError::InvalidManifest {
                reference: reference.to_string(),
                reason: format!("invalid image manifest: {e}"),
            })?;
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
        let config_bytes = pull_small_blob(&oci, &reference, &config_digest, config_size).await?;
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

    /// Streams blob `digest` of `repo` into `dest` (a file path), verifying size and digest
    /// while writing (to `<dest>.partial`, renamed to `dest` at the end). Returns the number
    /// of bytes written. Resumes nothing; retries nothing (callers retry).
    ///
    /// On any failure `<dest>.partial` is removed and `dest` is left as it was. Two pulls to
    /// the same `dest` at once would share the partial file: callers must not do that.
    pub async fn pull_blob_to_file(
        &self,
        repo: &ImageRef,
        digest: &Digest,
        expected_size: Option<u64>,
        dest: &Path,
        auth: &AuthPolicy,
    ) -> Result<u64, RegistryError> {
        let oci = self.oci_for_request(repo, auth).await?;
        let pull_error = |e: OciDistributionError| RegistryError::PullBlob {
            reference: repo.to_string(),
            digest: digest.clone(),
            source: Arc::new(e),
        };
        let size_error = |actual: u64, expected: u64| RegistryError::BlobSizeMismatch {
            reference: repo.to_string(),
            digest: digest.clone(),
            expected,
            actual,
        };
        let pulled = oci
            .client
            .pull_blob_stream(&repo.to_oci(), &blob_descriptor(digest, expected_size))
            .await
            .map_err(pull_error)?;
        if let (Some(expected), Some(announced)) = (expected_size, pulled.content_length) {
            if announced != expected {
                return Err(size_error(announced, expected));
            }
        }

        let partial = partial_path(dest);
        let write_error = |e: io::Error| RegistryError::WriteBlobFile {
            path: partial.clone(),
            source: Arc::new(e),
        };
        let file = tokio::fs::File::create(&partial).await.map_err(write_error)?;
        let mut cleanup = RemoveOnDrop(Some(partial.clone()));
        let file = file.into_std().await;
        let (tx, rx) = mpsc::channel::<Bytes>(QUEUE_DEPTH);
        let writer = tokio::task::spawn_blocking(move || write_and_hash(file, rx));

        let mut stream = pulled.stream;
        let mut received = 0u64;
        let streamed: Result<(), RegistryError> = loop {
            match stream.next().await {
                None => break Ok(()),
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if let Some(expected) = expected_size.filter(|e| received > *e) {
                        break Err(size_error(received, expected));
                    }
                    if tx.send(chunk).await.is_err() {
                        // The writer failed; its error is collected below.
                        break Ok(());
                    }
                }
                // oci-client's own digest check fails only at the end of the stream, after
                // every byte arrived; Kiln's check below decides (and names both digests).
                Some(Err(e)) if is_digest_error(&e) => break Ok(()),
                Some(Err(e)) => break Err(pull_error(OciDistributionError::IoError(e))),
            }
        };
        drop(tx);
        let written = writer.await.map_err(io::Error::other).and_then(|r| r);
        streamed?;
        let (file, bytes, actual) = written.map_err(write_error)?;
        if let Some(expected) = expected_size.filter(|e| *e != bytes) {
            return Err(size_error(bytes, expected));
        }
        if actual != digest.as_str() {
            return Err(RegistryError::BlobDigestMismatch {
                reference: repo.to_string(),
                expected: digest.clone(),
                actual,
            });
        }
        tokio::fs::File::from_std(file)
            .sync_all()
            .await
            .map_err(write_error)?;
        tokio::fs::rename(&partial, dest)
            .await
            .map_err(|e| RegistryError::WriteBlobFile {
                path: dest.to_owned(),
                source: Arc::new(e),
            })?;
        cleanup.0 = None;
        tracing::debug!(repo = %repo, digest = %digest, bytes, dest = %dest.display(), "blob pulled");
        Ok(bytes)
    }

    /// Whether `repo` has blob `digest` (a HEAD, with the credentials `auth` allows).
    pub async fn blob_exists(
        &self,
        repo: &ImageRef,
        digest: &Digest,
        auth: &AuthPolicy,
    ) -> Result<bool, RegistryError> {
        let oci = self.oci_for_request(repo, auth).await?;
        has_blob(&oci, repo, digest).await
    }

    /// Makes blob `digest` (in local file `path`) present in `repo`: HEAD first (skip if
    /// present); else, if `mount_from` names a repository on the same registry, a
    /// cross-repository mount (a refused mount is not an error); else the file is streamed
    /// into one upload. The file must hash to `digest`, else the upload is aborted before it
    /// completes and the error is a `LocalBlobMismatch`.
    ///
    /// Written with the installation's credentials (see the module doc); `_auth` is unused.
    pub async fn push_blob_file(
        &self,
        repo: &ImageRef,
        digest: &Digest,
        path: &Path,
        mount_from: Option<&ImageRef>,
        _auth: &AuthPolicy,
    ) -> Result<BlobPush, RegistryError> {
        let dst = self.oci_for_kiln(repo).await?;
        if has_blob(&dst, repo, digest).await? {
            return Ok(BlobPush::Present);
        }
        if let Some(from) = mount_from {
            if let Some(mounted) = try_mount(&dst, repo, from, digest).await {
                return Ok(mounted);
            }
        }
        let bytes = upload_file(&dst, repo, digest, path).await?;
        tracing::debug!(repo = %repo, digest = %digest, bytes, "blob uploaded from a file");
        Ok(BlobPush::Uploaded { bytes })
    }

    /// [`push_blob_file`](Self::push_blob_file) for bytes in memory (configs), without a mount.
    /// The bytes must hash to `digest` (checked before anything is sent).
    pub async fn push_blob_bytes(
        &self,
        repo: &ImageRef,
        digest: &Digest,
        bytes: Vec<u8>,
        _auth: &AuthPolicy,
    ) -> Result<BlobPush, RegistryError> {
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(RegistryError::BlobBytesMismatch {
                reference: repo.to_string(),
                expected: digest.clone(),
                actual,
            });
        }
        let dst = self.oci_for_kiln(repo).await?;
        if has_blob(&dst, repo, digest).await? {
            return Ok(BlobPush::Present);
        }
        let size = bytes.len() as u64;
        let body = futures::stream::iter([Ok::<_, OciDistributionError>(Bytes::from(bytes))]);
        dst.client
            .push_blob_stream(&repo.to_oci(), body, digest.as_str(), Some(size))
            .await
            .map_err(|e| RegistryError::PushBlob {
                reference: repo.to_string(),
                digest: digest.clone(),
                source: Arc::new(e),
            })?;
        Ok(BlobPush::Uploaded { bytes: size })
    }

    /// Makes blob `digest` (of `size` bytes) that lives in `source` (another repository,
    /// maybe on another registry) present in `target`: present → done; same registry → mount;
    /// else (or when the mount is refused) streamed from the source into one upload, with
    /// oci-client checking the digest on the way. This is `copy`'s per-blob step.
    ///
    /// `source` is read with the credentials `auth` allows; `target` is written with the
    /// installation's.
    pub async fn transfer_blob(
        &self,
        source: &ImageRef,
        target: &ImageRef,
        digest: &Digest,
        size: u64,
        auth: &AuthPolicy,
    ) -> Result<BlobPush, RegistryError> {
        let src = self.oci_for_request(source, auth).await?;
        let dst = self.oci_for_kiln(target).await?;
        let job = BlobJob {
            src: &src,
            dst: &dst,
            source,
            target,
            same_registry: normalize_registry(source.registry()) == normalize_registry(target.registry()),
        };
        let desc = blob_descriptor(digest, Some(size));
        let outcome = match job.copy_blob(&desc).await? {
            CopyEvent::BlobPresent { .. } => BlobPush::Present,
            CopyEvent::BlobMounted { from, .. } => BlobPush::Mounted { from },
            CopyEvent::BlobCopied { bytes, .. } => BlobPush::Uploaded { bytes },
            CopyEvent::ManifestPushed { .. } => unreachable!("copy_blob moves blobs only"),
        };
        tracing::debug!(%source, %target, %digest, outcome = %outcome, "blob transferred");
        Ok(outcome)
    }

    /// Pushes manifest bytes (unchanged) under `target` with `media_type` (an OCI or Docker
    /// schema 2 manifest or index type); returns the digest of the bytes.
    ///
    /// A `target` with a tag is pushed by tag; one with only a digest is pushed by digest,
    /// which must be the digest of `bytes` (a `TargetDigestMismatch` otherwise, also when
    /// a tagged target names another digest). Blobs the manifest names must be present
    /// first. Written with the installation's credentials (see the module doc); `_auth` is
    /// unused.
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
        let unsupported = || RegistryError::UnsupportedManifest {
            reference: target.to_string(),
            media_type: media_type.to_owned(),
        };
        if !MANIFEST_MEDIA_TYPES.contains(&media_type) {
            return Err(unsupported());
        }
        let content_type = media_type.parse().map_err(|_| unsupported())?;
        let reference = match target.tag() {
            Some(tag) => ImageRef::with_tag(target.registry(), target.repository(), tag),
            None => target.pinned(digest.clone()),
        };
        let dst = self.oci_for_kiln(&reference).await?;
        dst.client
            .push_manifest_raw(&reference.to_oci(), bytes, content_type)
            .await
            .map_err(|e| RegistryError::PushManifest {
                reference: reference.to_string(),
                digest: digest.clone(),
                source: Arc::new(e),
            })?;
        tracing::debug!(target = %reference, %digest, media_type, "manifest pushed");
        Ok(digest)
    }
}

/// GETs a manifest (any type Kiln understands); a pinned reference is checked by oci-client.
async fn pull_manifest(oci: &Oci, image: &ImageRef) -> Result<Bytes, RegistryError> {
    let (body, _) = oci
        .client
        .pull_manifest_raw(&image.to_oci(), &oci.auth, MANIFEST_MEDIA_TYPES)
        .await
        .map_err(|e| RegistryError::FetchManifest {
            reference: image.to_string(),
            source: Arc::new(e),
        })?;
    Ok(body)
}

/// [`inspect`], with a schema 1 manifest named by its media type.
fn manifest_kind(reference: &ImageRef, body: &[u8]) -> Result<ManifestKind, RegistryError> {
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
fn descriptor_parts(reference: &ImageRef, d: &OciDescriptor) -> Result<(Digest, u64), RegistryError> {
    let digest = parse_digest(reference, &d.digest)?;
    let size = u64::try_from(d.size).map_err(|_| RegistryError::InvalidManifest {
        reference: reference.to_string(),
        reason: format!("blob {} has a negative size", d.digest),
    })?;
    Ok((digest, size))
}

/// A descriptor for oci-client's blob calls (which read only the digest, and the size when
/// copying). Sizes past `i64::MAX` cannot occur; they would be refused by the registry.
fn blob_descriptor(digest: &Digest, size: Option<u64>) -> OciDescriptor {
    OciDescriptor {
        digest: digest.to_string(),
        size: size.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
        ..OciDescriptor::default()
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

/// Whether a stream error is oci-client's digest verification failing (by type).
fn is_digest_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<DigestError>())
}

async fn has_blob(oci: &Oci, repo: &ImageRef, digest: &Digest) -> Result<bool, RegistryError> {
    oci.client
        .blob_exists(&repo.to_oci(), digest.as_str())
        .await
        .map_err(|e| RegistryError::CheckBlob {
            reference: repo.to_string(),
            digest: digest.to_string(),
            source: Arc::new(e),
        })
}

/// A cross-repository mount from `from` when it is on `repo`'s registry. `None` when there
/// is nothing to mount from or the registry refused (202 "upload instead", no access).
async fn try_mount(oci: &Oci, repo: &ImageRef, from: &ImageRef, digest: &Digest) -> Option<BlobPush> {
    if normalize_registry(from.registry()) != normalize_registry(repo.registry())
        || from.repository() == repo.repository()
    {
        tracing::debug!(%repo, %from, %digest, "no mount: another registry or the same repository");
        return None;
    }
    match oci
        .client
        .mount_blob(&repo.to_oci(), &from.to_oci(), digest.as_str())
        .await
    {
        Ok(()) => Some(BlobPush::Mounted {
            from: from.repository().to_owned(),
        }),
        Err(e) => {
            tracing::debug!(%repo, %from, %digest, reason = %describe(&e),
                "cross-repository mount refused; uploading the blob");
            None
        }
    }
}

/// Streams the file at `path` into one upload of blob `digest` in `repo`; see the module doc.
async fn upload_file(oci: &Oci, repo: &ImageRef, digest: &Digest, path: &Path) -> Result<u64, RegistryError> {
    let read_error = |e: io::Error| RegistryError::ReadBlobFile {
        path: path.to_owned(),
        source: Arc::new(e),
    };
    let file = tokio::fs::File::open(path).await.map_err(read_error)?;
    let size = file.metadata().await.map_err(read_error)?.len();
    let file = file.into_std().await;
    let (tx, rx) = mpsc::channel::<Result<Bytes, OciDistributionError>>(QUEUE_DEPTH);
    let expected = digest.clone();
    let reader = tokio::task::spawn_blocking(move || read_and_hash(file, size, &expected, tx));
    let body = tokio_stream::wrappers::ReceiverStream::new(rx);
    let pushed = oci
        .client
        .push_blob_stream(&repo.to_oci(), body, digest.as_str(), Some(size))
        .await;
    // The reader has finished: it either sent everything, failed, or saw the body dropped.
    let local = reader
        .await
        .map_err(|e| LocalFailure::Io(io::Error::other(e)))
        .and_then(|r| r);
    match (pushed, local) {
        (_, Err(LocalFailure::Io(e))) => Err(read_error(e)),
        (_, Err(LocalFailure::Mismatch(reason))) => Err(RegistryError::LocalBlobMismatch {
            path: path.to_owned(),
            digest: digest.clone(),
            reason,
        }),
        (Err(e), Ok(())) => Err(RegistryError::PushBlob {
            reference: repo.to_string(),
            digest: digest.clone(),
            source: Arc::new(e),
        }),
        (Ok(_), Ok(())) => Ok(size),
    }
}

/// Why a local file could not be pushed.
enum LocalFailure {
    Io(io::Error),
    /// The file's size or digest is not what it should be (the text says which).
    Mismatch(String),
}

/// The blocking half of [`upload_file`]: reads, hashes and sends the file, holding the last
/// chunk back until the size and digest are confirmed. A closed channel (the upload failed
/// and dropped its body) ends it quietly: the upload's error is the one to report.
fn read_and_hash(
    mut file: std::fs::File,
    size: u64,
    expected: &Digest,
    tx: mpsc::Sender<Result<Bytes, OciDistributionError>>,
) -> Result<(), LocalFailure> {
    let fail = |failure: LocalFailure| {
        // Break the upload so that the registry never commits it.
        let _ = tx.blocking_send(Err(OciDistributionError::IoError(io::Error::other(
            "the local blob file does not match its digest",
        ))));
        Err(failure)
    };
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut held: Option<Bytes> = None;
    loop {
        let mut buf = vec![0u8; FILE_CHUNK];
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return fail(LocalFailure::Io(e)),
        };
        buf.truncate(n);
        hasher.update(&buf);
        total += n as u64;
        if total > size {
            return fail(LocalFailure::Mismatch(format!(
                "it grew past {size} bytes while being pushed"
            )));
        }
        if let Some(previous) = held.replace(Bytes::from(buf)) {
            if tx.blocking_send(Ok(previous)).is_err() {
                return Ok(());
            }
        }
    }
    if total != size {
        return fail(LocalFailure::Mismatch(format!(
            "it shrank from {size} to {total} bytes while being pushed"
        )));
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != expected.as_str() {
        return fail(LocalFailure::Mismatch(format!("its content has digest {actual}")));
    }
    if let Some(last) = held {
        let _ = tx.blocking_send(Ok(last));
    }
    Ok(())
}

/// The blocking half of [`RegistryClient::pull_blob_to_file`]: writes and hashes what
/// arrives until the channel closes. Returns the file (to be synced), its length and digest.
fn write_and_hash(
    file: std::fs::File,
    mut rx: mpsc::Receiver<Bytes>,
) -> io::Result<(std::fs::File, u64, String)> {
    let mut out = io::BufWriter::with_capacity(FILE_CHUNK, file);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
        out.write_all(&chunk)?;
        total += chunk.len() as u64;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    Ok((file, total, format!("sha256:{}", hex::encode(hasher.finalize()))))
}

/// `<dest>.partial`, beside `dest`.
fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Removes a partial file when a pull fails or its future is dropped.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a partial blob file");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_files_sit_beside_the_destination() {
        assert_eq!(
            partial_path(Path::new("/data/blobs/sha256-ab")),
            PathBuf::from("/data/blobs/sha256-ab.partial")
        );
    }

    #[test]
    fn schema1_is_refused_by_its_media_type() {
        let r: ImageRef = "r.example/a:1".parse().unwrap();
        let err = manifest_kind(&r, br#"{"schemaVersion":1,"name":"a","fsLayers":[]}"#).unwrap_err();
        assert_eq!(err.kind(), crate::registry::RegistryErrorKind::InvalidInput);
        assert!(err.to_string().contains(DOCKER_SCHEMA1), "{err}");
    }

    #[test]
    fn pushes_read_as_log_text() {
        assert_eq!(BlobPush::Present.to_string(), "already present");
        assert_eq!(
            BlobPush::Mounted {
                from: "base/a".into()
            }
            .to_string(),
            "mounted from base/a"
        );
        assert_eq!(BlobPush::Uploaded { bytes: 3 }.to_string(), "uploaded (3 bytes)");
    }

    #[test]
    fn a_file_that_does_not_match_never_sends_its_last_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let content = vec![7u8; FILE_CHUNK * 2 + 10];
        std::fs::write(&path, &content).unwrap();
        let run = |digest: &Digest| {
            let (tx, mut rx) = mpsc::channel(16);
            let file = std::fs::File::open(&path).unwrap();
            let result = read_and_hash(file, content.len() as u64, digest, tx);
            let mut sent = 0usize;
            let mut errors = 0;
            while let Ok(item) = rx.try_recv() {
                match item {
                    Ok(b) => sent += b.len(),
                    Err(_) => errors += 1,
                }
            }
            (result, sent, errors)
        };
        let (result, sent, errors) = run(&Digest::of(&content));
        assert!(result.is_ok());
        assert_eq!((sent, errors), (content.len(), 0));

        let (result, sent, errors) = run(&Digest::of(b"other"));
        assert!(matches!(result, Err(LocalFailure::Mismatch(_))));
        assert!(sent < content.len(), "the last chunk was sent");
        assert_eq!(errors, 1);
    }
}
