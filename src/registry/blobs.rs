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
//! # Uploads, retries and resumption
//! Every upload (a file, bytes in memory, or a blob streamed from another registry) goes
//! through one resumable upload session, spoken over HTTP by hand because oci-client cannot
//! resume: `POST` opens the session, the bytes go in `PATCH` requests of at most
//! [`UPLOAD_CHUNK_BYTES`](super::UPLOAD_CHUNK_BYTES) (`Content-Range`), and `PUT ?digest=`
//! commits. The bytes are hashed as they are sent; the commit is sent only when they have the
//! expected size and digest, so bytes that do not match never become a blob (a file that
//! does not match is a [`RegistryError::LocalBlobMismatch`] naming it) and the session is
//! cancelled. The registry verifies the digest again when it commits.
//!
//! When an attempt breaks off (a connection reset, a 5xx, a source that failed mid-stream),
//! the next one first `HEAD`s the blob (the commit may have landed before its answer was lost),
//! then asks the registry where the session stands (`GET` on the session → `Range`). If that is
//! the end of the last confirmed chunk, the upload resumes there, with the hash state saved at
//! that point and the source reopened at that offset (a file is read from there, a blob in
//! another registry is fetched with `Range`). If the registry cannot say (the session is
//! unknown, or it kept part of the broken chunk, as docker's distribution does) a new session
//! starts from zero. Attempts follow the client's [`RetryPolicy`](super::RetryPolicy).
//!
//! Every other operation here is retried as a whole under the same policy (reads, `HEAD`s,
//! manifest pushes: all idempotent); a cross-repository mount is tried once (when refused or
//! failed, the blob is uploaded instead).

use std::{
    fmt, io,
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::{future::BoxFuture, stream::BoxStream, Stream, StreamExt as _};
use oci_client::{
    client::BlobResponse,
    errors::{DigestError, OciDistributionError, OciEnvelope},
    manifest::{
        OciDescriptor, OciImageIndex, OciImageManifest, IMAGE_CONFIG_MEDIA_TYPE,
        IMAGE_DOCKER_CONFIG_MEDIA_TYPE,
    },
    secrets::RegistryAuth,
    RegistryOperation,
};
use reqwest::{header, StatusCode, Url};
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
        let mut body = self.pull_manifest(&oci, image).await?;
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
                body = self.pull_manifest(&oci, &pinned).await?;
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

    /// Streams blob `digest` of `repo` into `dest` (a file path), verifying size and digest
    /// while writing (to `<dest>.partial`, renamed to `dest` at the end). Returns the number
    /// of bytes written. A pull that fails `Unavailable` starts again from the first byte,
    /// under the client's retry policy.
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
        self.retry_policy()
            .run(repo.registry(), "pull blob", || {
                pull_to_file(&oci, repo, digest, expected_size, dest)
            })
            .await
    }

    /// Whether `repo` has blob `digest` (a HEAD, with the credentials `auth` allows).
    pub async fn blob_exists(
        &self,
        repo: &ImageRef,
        digest: &Digest,
        auth: &AuthPolicy,
    ) -> Result<bool, RegistryError> {
        let oci = self.oci_for_request(repo, auth).await?;
        self.has_blob(&oci, repo, digest).await
    }

    /// Makes blob `digest` (in local file `path`) present in `repo`: HEAD first (skip if
    /// present); else, if `mount_from` names a repository on the same registry, a
    /// cross-repository mount (a refused mount is not an error); else the file is uploaded,
    /// resumably (see the module doc). The file must hash to `digest`, else the upload is
    /// cancelled before it is committed and the error is a `LocalBlobMismatch`.
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
        if self.has_blob(&dst, repo, digest).await? {
            return Ok(BlobPush::Present);
        }
        if let Some(from) = mount_from {
            if let Some(mounted) = try_mount(&dst, repo, from, digest).await {
                return Ok(mounted);
            }
        }
        let read_error = |e: io::Error| RegistryError::ReadBlobFile {
            path: path.to_owned(),
            source: Arc::new(e),
        };
        let size = tokio::fs::metadata(path).await.map_err(read_error)?.len();
        let source = FileSource {
            path: path.to_owned(),
            digest: digest.clone(),
        };
        let bytes = self.upload_blob(&dst, repo, digest, size, &source).await?;
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
        if self.has_blob(&dst, repo, digest).await? {
            return Ok(BlobPush::Present);
        }
        let size = bytes.len() as u64;
        let source = BytesSource {
            repo: repo.to_string(),
            digest: digest.clone(),
            bytes: Bytes::from(bytes),
        };
        self.upload_blob(&dst, repo, digest, size, &source).await?;
        Ok(BlobPush::Uploaded { bytes: size })
    }

    /// Whether `repo` has blob `digest`, retried under the client's policy.
    pub(super) async fn has_blob(
        &self,
        oci: &Oci,
        repo: &ImageRef,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        self.retry_policy()
            .run(repo.registry(), "check blob", || has_blob(oci, repo, digest))
            .await
    }

    /// GETs a manifest (any type Kiln understands), retried under the client's policy; a
    /// pinned reference is checked by oci-client.
    async fn pull_manifest(&self, oci: &Oci, image: &ImageRef) -> Result<Bytes, RegistryError> {
        self.retry_policy()
            .run(image.registry(), "fetch manifest", || pull_manifest(oci, image))
            .await
    }
}

/// One attempt of [`RegistryClient::pull_blob_to_file`].
async fn pull_to_file(
    oci: &Oci,
    repo: &ImageRef,
    digest: &Digest,
    expected_size: Option<u64>,
    dest: &Path,
) -> Result<u64, RegistryError> {
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

impl RegistryClient {
    /// Makes blob `digest` (of `size` bytes) that lives in `source` (another repository,
    /// maybe on another registry) present in `target`: present → done; same registry → mount;
    /// else (or when the mount is refused) streamed from the source into a resumable upload,
    /// checked against the digest on the way. This is `copy`'s per-blob step.
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
            client: self,
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
        let content_type: header::HeaderValue = media_type.parse().map_err(|_| unsupported())?;
        let reference = match target.tag() {
            Some(tag) => ImageRef::with_tag(target.registry(), target.repository(), tag),
            None => target.pinned(digest.clone()),
        };
        let dst = self.oci_for_kiln(&reference).await?;
        let oci_reference = reference.to_oci();
        let body = Bytes::from(bytes);
        self.retry_policy()
            .run(reference.registry(), "push manifest", || async {
                dst.client
                    .push_manifest_raw(&oci_reference, body.clone(), content_type.clone())
                    .await
                    .map_err(|e| RegistryError::PushManifest {
                        reference: reference.to_string(),
                        digest: digest.clone(),
                        source: Arc::new(e),
                    })
            })
            .await?;
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

// ---- resumable uploads ------------------------------------------------------------------------

/// A stream of blob bytes; its errors are already the source's [`RegistryError`]s.
pub(super) type SourceStream = BoxStream<'static, Result<Bytes, RegistryError>>;

/// Where the bytes of an upload come from. A source can be opened again at any offset, so an
/// interrupted upload resumes without starting over.
pub(super) trait UploadSource: Send + Sync {
    /// The blob's bytes from `offset` on.
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<SourceStream, RegistryError>>;
    /// The error for bytes that do not have the expected size or digest.
    fn mismatch(&self, found: Mismatch) -> RegistryError;
}

/// What was wrong with the bytes of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Mismatch {
    /// It ended after `actual` bytes.
    Short { expected: u64, actual: u64 },
    /// It had more than `expected` bytes.
    Long { expected: u64 },
    /// All bytes arrived; they hash to `actual`.
    Digest { actual: Digest },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short { expected, actual } => write!(f, "it has {actual} bytes, not {expected}"),
            Self::Long { expected } => write!(f, "it has more than {expected} bytes"),
            Self::Digest { actual } => write!(f, "its content has digest {actual}"),
        }
    }
}

/// A local file, read on a blocking thread.
struct FileSource {
    path: PathBuf,
    digest: Digest,
}

impl UploadSource for FileSource {
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<SourceStream, RegistryError>> {
        Box::pin(async move {
            let path = self.path.clone();
            let read_error = {
                let path = path.clone();
                move |e: io::Error| RegistryError::ReadBlobFile {
                    path: path.clone(),
                    source: Arc::new(e),
                }
            };
            let mut file = std::fs::File::open(&path).map_err(&read_error)?;
            file.seek(io::SeekFrom::Start(offset)).map_err(&read_error)?;
            let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE_DEPTH);
            tokio::task::spawn_blocking(move || read_file(file, tx));
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |r| r.map_err(&read_error));
            Ok(stream.boxed())
        })
    }

    fn mismatch(&self, found: Mismatch) -> RegistryError {
        let reason = match found {
            Mismatch::Short { expected, actual } => {
                format!("it shrank from {expected} to {actual} bytes while being pushed")
            }
            Mismatch::Long { expected } => format!("it grew past {expected} bytes while being pushed"),
            Mismatch::Digest { actual } => format!("its content has digest {actual}"),
        };
        RegistryError::LocalBlobMismatch {
            path: self.path.clone(),
            digest: self.digest.clone(),
            reason,
        }
    }
}

/// The blocking half of [`FileSource`]: reads and sends the file until it ends, the channel
/// closes (the upload stopped) or a read fails.
fn read_file(mut file: std::fs::File, tx: mpsc::Sender<io::Result<Bytes>>) {
    loop {
        let mut buf = vec![0u8; FILE_CHUNK];
        match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

/// Bytes in memory.
struct BytesSource {
    repo: String,
    digest: Digest,
    bytes: Bytes,
}

impl UploadSource for BytesSource {
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<SourceStream, RegistryError>> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        let rest = self.bytes.slice(start..);
        Box::pin(futures::future::ready(Ok(
            futures::stream::iter([Ok(rest)]).boxed()
        )))
    }

    fn mismatch(&self, found: Mismatch) -> RegistryError {
        RegistryError::BlobBytesMismatch {
            reference: self.repo.clone(),
            expected: self.digest.clone(),
            actual: match found {
                Mismatch::Digest { actual } => actual,
                // The bytes are hashed before the upload; a size mismatch cannot happen.
                _ => Digest::of(&self.bytes),
            },
        }
    }
}

/// A blob in another repository (maybe on another registry), streamed from there; opened at
/// an offset with a `Range` request. A pull that breaks off mid-stream is reopened where it
/// stopped, under the retry policy (renewed whenever bytes flowed), so that a flaky source
/// does not break the upload it feeds.
pub(super) struct RegistrySource {
    pub oci: Oci,
    pub image: ImageRef,
    pub desc: OciDescriptor,
    pub digest: Digest,
    /// The copy's target, for error messages.
    pub target: String,
    pub retry: super::RetryPolicy,
}

impl RegistrySource {
    fn copy_error(&self, e: OciDistributionError) -> RegistryError {
        RegistryError::CopyBlob {
            from: self.image.to_string(),
            to: self.target.clone(),
            digest: self.desc.digest.clone(),
            source: Arc::new(e),
        }
    }
}

/// The blob's bytes from `offset` on, as the registry sends them (a registry that ignores the
/// range sends everything; the bytes before `offset` are skipped). Stream errors are
/// oci-client's; its digest check (on a whole blob) ends the stream quietly: the upload's own
/// check decides, and names both digests.
async fn pull_from(
    oci: &Oci,
    reference: &oci_client::Reference,
    desc: &OciDescriptor,
    offset: u64,
) -> Result<BoxStream<'static, io::Result<Bytes>>, OciDistributionError> {
    let (stream, skip) = if offset == 0 {
        (oci.client.pull_blob_stream(reference, desc).await?.stream, 0)
    } else {
        match oci
            .client
            .pull_blob_stream_partial(reference, desc, offset, None)
            .await?
        {
            BlobResponse::Partial(pulled) => (pulled.stream, 0),
            BlobResponse::Full(pulled) => (pulled.stream, offset),
        }
    };
    let stream = async_stream::stream! {
        let mut stream = stream;
        let mut skip = skip;
        while let Some(item) = stream.next().await {
            match item {
                Ok(mut chunk) => {
                    if skip > 0 {
                        let n = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
                        let _ = chunk.split_to(n);
                        skip -= n as u64;
                    }
                    if !chunk.is_empty() {
                        yield Ok(chunk);
                    }
                }
                Err(e) if is_digest_error(&e) => break,
                Err(e) => {
                    yield Err(e);
                    break;
                }
            }
        }
    };
    Ok(stream.boxed())
}

impl UploadSource for RegistrySource {
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<SourceStream, RegistryError>> {
        Box::pin(async move {
            let reference = self.image.to_oci();
            let first = pull_from(&self.oci, &reference, &self.desc, offset)
                .await
                .map_err(|e| self.copy_error(e))?;
            let oci = self.oci.clone();
            let desc = self.desc.clone();
            let retry = self.retry.clone();
            let registry = self.image.registry().to_owned();
            let (from, to) = (self.image.to_string(), self.target.clone());
            let copy_error = move |e: OciDistributionError| RegistryError::CopyBlob {
                from: from.clone(),
                to: to.clone(),
                digest: desc.digest.clone(),
                source: Arc::new(e),
            };
            let desc = self.desc.clone();
            let stream = async_stream::stream! {
                let mut offset = offset;
                let mut current = first;
                let mut attempts = retry.attempts(&registry, "pull blob");
                let mut flowed = false;
                loop {
                    match current.next().await {
                        None => break,
                        Some(Ok(chunk)) => {
                            offset += chunk.len() as u64;
                            flowed = true;
                            yield Ok(chunk);
                        }
                        Some(Err(e)) => {
                            // Bytes flowed since the last break: the source works, renew the
                            // budget. Then reopen where the stream stopped.
                            if flowed {
                                attempts = retry.attempts(&registry, "pull blob");
                                flowed = false;
                            }
                            let mut error = copy_error(OciDistributionError::IoError(e));
                            loop {
                                if let Err(last) = attempts.failed(error).await {
                                    yield Err(last);
                                    return;
                                }
                                match pull_from(&oci, &reference, &desc, offset).await {
                                    Ok(stream) => {
                                        tracing::debug!(from = %reference, offset, "blob pull resumed");
                                        current = stream;
                                        break;
                                    }
                                    Err(e) => error = copy_error(e),
                                }
                            }
                        }
                    }
                }
            };
            Ok(stream.boxed())
        })
    }

    fn mismatch(&self, found: Mismatch) -> RegistryError {
        let reference = self.image.to_string();
        match found {
            Mismatch::Short { expected, actual } => RegistryError::BlobSizeMismatch {
                reference,
                digest: self.digest.clone(),
                expected,
                actual,
            },
            Mismatch::Long { expected } => RegistryError::BlobSizeMismatch {
                reference,
                digest: self.digest.clone(),
                expected,
                actual: expected + 1,
            },
            Mismatch::Digest { actual } => RegistryError::BlobDigestMismatch {
                reference,
                expected: self.digest.clone(),
                actual: actual.to_string(),
            },
        }
    }
}

/// An upload session as the registry last confirmed it.
#[derive(Debug)]
struct Session {
    /// Where the next request goes (each answer names the next location).
    location: Url,
    /// Bytes the registry has confirmed.
    committed: u64,
    /// The hash state over those bytes.
    hashed: Sha256,
    /// False while a request is under way or after one broke off: the registry must then
    /// say where the session stands before the upload goes on.
    confirmed: bool,
    /// After a `PATCH` whose bytes all went out but whose answer never came: where the
    /// session stands if the registry took them, and the hash state there.
    tentative: Option<(u64, Sha256)>,
}

/// Why one pass of an upload stopped.
enum Failure {
    /// The data broke off (a `PATCH` failed, or the source did): the next pass resumes,
    /// if the error's kind says it may pass.
    Data(RegistryError),
    /// The session broke (the registry lost it or cannot say where it stands): the next pass
    /// starts a new one.
    Broken(RegistryError),
    /// Retrying gives the same answer (the bytes do not match, a local file is unreadable, or
    /// a step already spent its own retries).
    Fatal(RegistryError),
}

/// A source that failed: worth another pass if its error may pass, unless the source
/// already spent its own retries.
fn source_failure(e: RegistryError) -> Failure {
    match e {
        RegistryError::RetriesExhausted { .. } => Failure::Fatal(e),
        e if e.is_retryable() => Failure::Data(e),
        e => Failure::Fatal(e),
    }
}

/// What the registry said about a session it was asked about.
enum SessionState {
    /// It holds `offset` bytes; the next request goes to the location given.
    At { offset: u64, location: Option<Url> },
    /// It does not know the session (any more).
    Unknown,
}

/// How a commit ended.
enum Committed {
    Yes,
    /// The registry does not know the session: it was committed before (an answer was lost)
    /// or lost.
    SessionUnknown,
}

/// One upload of `size` bytes of blob `digest` to `repo`, across passes.
struct Upload<'a> {
    client: &'a RegistryClient,
    oci: &'a Oci,
    repo: &'a ImageRef,
    digest: &'a Digest,
    size: u64,
    chunk: u64,
    source: &'a dyn UploadSource,
    session: Option<Session>,
    /// The `Authorization` header for the registry (inner `None`: it wants none); outer
    /// `None` until asked.
    authorization: Option<Option<header::HeaderValue>>,
}

impl RegistryClient {
    /// Uploads `size` bytes from `source` as blob `digest` of `repo`, resuming across passes
    /// (see the module doc). Returns `size`.
    ///
    /// Each request that carries no data (opening, asking about and committing the session,
    /// the auth probe, reopening the source) is retried on its own under the client's policy;
    /// a broken-off `PATCH` (or source) ends the pass, and the next pass resumes. The passes
    /// have a budget of their own under the same policy, renewed whenever a chunk lands.
    pub(super) async fn upload_blob(
        &self,
        oci: &Oci,
        repo: &ImageRef,
        digest: &Digest,
        size: u64,
        source: &dyn UploadSource,
    ) -> Result<u64, RegistryError> {
        let mut upload = Upload {
            client: self,
            oci,
            repo,
            digest,
            size,
            chunk: self.upload_chunk_bytes(),
            source,
            session: None,
            authorization: None,
        };
        let policy = self.retry_policy();
        let mut passes = policy.attempts(repo.registry(), "upload blob");
        loop {
            let progress_before = upload.session.as_ref().map_or(0, |s| s.committed);
            let (error, retryable) = match upload.pass().await {
                Ok(()) => return Ok(size),
                Err(Failure::Data(e)) => {
                    let retryable = e.is_retryable();
                    (e, retryable)
                }
                Err(Failure::Broken(e)) => (e, true),
                Err(Failure::Fatal(e)) => (e, false),
            };
            if upload
                .session
                .as_ref()
                .is_some_and(|s| s.committed > progress_before)
            {
                // Chunks landed in this pass: the registry is working, renew the budget.
                passes = policy.attempts(repo.registry(), "upload blob");
            }
            if let Err(e) = passes.failed_retryable(error, retryable).await {
                upload.cancel().await;
                return Err(e);
            }
        }
    }
}

impl Upload<'_> {
    fn push_error(&self, e: OciDistributionError) -> RegistryError {
        RegistryError::PushBlob {
            reference: self.repo.to_string(),
            digest: self.digest.clone(),
            source: Arc::new(e),
        }
    }

    /// Runs one request step under the retry policy; a spent budget ends the upload.
    async fn step<T, F, Fut>(&self, what: &str, op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        self.client
            .retry_policy()
            .run(self.repo.registry(), what, op)
            .await
            .map_err(Failure::Fatal)
    }

    /// One pass: find out where the session stands, send the rest, commit.
    async fn pass(&mut self) -> Result<(), Failure> {
        if self.authorization.is_none() {
            let value = self
                .step("authorize upload", || async {
                    authorization(self.oci, self.repo)
                        .await
                        .map_err(|e| self.push_error(e))
                })
                .await?;
            self.authorization = Some(value);
        }
        if let Some(session) = self.session.as_ref().filter(|s| !s.confirmed) {
            let location = session.location.clone();
            let state = self
                .step("check upload", || self.session_state(&location))
                .await?;
            self.resume_or_drop(state).await;
        }
        if self.session.is_none() {
            let session = self.step("start upload", || self.start()).await?;
            self.session = Some(session);
        }
        let (committed, hashed) = {
            let s = self.session.as_ref().expect("a session was just made");
            (s.committed, s.hashed.clone())
        };
        let stream = self
            .step("open blob source", || self.source.open(committed))
            .await?;
        let feed = Arc::new(Mutex::new(Feed {
            stream,
            pending: None,
            hasher: hashed,
            sent: committed,
            error: None,
        }));
        while let Some(s) = self.session.as_ref().filter(|s| s.committed < self.size) {
            let start = s.committed;
            let len = self.chunk.min(self.size - start);
            self.patch(&feed, start, len).await?;
        }
        let hasher = finish_feed(&feed, self.size).await.map_err(|f| match f {
            FeedEnd::Source(e) => source_failure(e),
            FeedEnd::Mismatch(m) => Failure::Fatal(self.source.mismatch(m)),
        })?;
        let actual = digest_of(hasher);
        if actual != *self.digest {
            return Err(Failure::Fatal(self.source.mismatch(Mismatch::Digest { actual })));
        }
        let location = self
            .session
            .as_ref()
            .expect("a session until committed")
            .location
            .clone();
        match self.step("commit upload", || self.commit(&location)).await? {
            Committed::Yes => {
                self.session = None;
                Ok(())
            }
            Committed::SessionUnknown => {
                self.session = None;
                // A commit whose answer was lost is gone from the sessions but is a blob.
                let present = self
                    .step("check blob", || has_blob(self.oci, self.repo, self.digest))
                    .await?;
                if present {
                    tracing::debug!(repo = %self.repo, digest = %self.digest,
                        "the blob is present after a commit whose answer was lost");
                    return Ok(());
                }
                Err(Failure::Broken(self.push_error(
                    OciDistributionError::GenericError(Some(
                        "the registry lost the upload session before it was committed".into(),
                    )),
                )))
            }
        }
    }

    /// Continues the session when the registry holds exactly what Kiln knows it sent (the
    /// last confirmed chunk, or the chunk whose answer was lost); else drops (and cancels) it
    /// so that a new one starts from zero.
    async fn resume_or_drop(&mut self, state: SessionState) {
        let session = self.session.as_mut().expect("resume_or_drop needs a session");
        let tentative = session.tentative.take();
        match state {
            SessionState::At { offset, location } => {
                if let Some((end, hashed)) = tentative.filter(|(end, _)| *end == offset) {
                    session.committed = end;
                    session.hashed = hashed;
                }
                if offset == session.committed {
                    tracing::debug!(repo = %self.repo, digest = %self.digest, offset,
                        "resuming the upload where the registry has it");
                    if let Some(location) = location {
                        session.location = location;
                    }
                    session.confirmed = true;
                    return;
                }
                tracing::debug!(repo = %self.repo, digest = %self.digest, confirmed = session.committed,
                    reported = offset, "the registry holds another part of the upload; starting over");
            }
            SessionState::Unknown => {
                tracing::debug!(repo = %self.repo, digest = %self.digest,
                    "the registry does not know the upload session; starting over");
            }
        }
        self.cancel().await;
    }

    /// Asks the registry where the session at `location` stands (`GET`).
    async fn session_state(&self, location: &Url) -> Result<SessionState, RegistryError> {
        let res = send(
            self.oci.http.get(location.clone()),
            location,
            self.repo,
            self.oci.scheme,
            self.authorization(),
        )
        .await
        .map_err(|e| self.push_error(e))?;
        let status = res.status();
        if status == StatusCode::NO_CONTENT || status == StatusCode::OK {
            // `0-0` is both "nothing yet" and "one byte"; Kiln reads it as nothing (a
            // one-byte upload simply starts over).
            let offset = match res
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_upload_range)
            {
                Some(UploadRange::Empty) => 0,
                Some(UploadRange::Through(last)) => last + 1,
                None => return Ok(SessionState::Unknown),
            };
            return Ok(SessionState::At {
                offset,
                location: next_location(&res),
            });
        }
        if status == StatusCode::NOT_FOUND {
            return Ok(SessionState::Unknown);
        }
        Err(self.push_error(response_error(res).await))
    }

    /// Opens a session (`POST`).
    async fn start(&self) -> Result<Session, RegistryError> {
        let url = Url::parse(&format!(
            "{}://{}/v2/{}/blobs/uploads/",
            self.oci.scheme,
            self.repo.to_oci().resolve_registry(),
            self.repo.repository()
        ))
        .map_err(|e| self.push_error(OciDistributionError::UrlParseError(e.to_string())))?;
        let request = self.oci.http.post(url.clone()).header(header::CONTENT_LENGTH, 0);
        let res = send(request, &url, self.repo, self.oci.scheme, self.authorization())
            .await
            .map_err(|e| self.push_error(e))?;
        if res.status() != StatusCode::ACCEPTED {
            return Err(self.push_error(response_error(res).await));
        }
        let location = next_location(&res)
            .ok_or_else(|| self.push_error(OciDistributionError::RegistryNoLocationError))?;
        Ok(Session {
            location,
            committed: 0,
            hashed: Sha256::new(),
            confirmed: true,
            tentative: None,
        })
    }

    fn authorization(&self) -> Option<&header::HeaderValue> {
        self.authorization.as_ref().and_then(Option::as_ref)
    }

    /// Sends bytes `start..start + len` (`PATCH`); on success the session moves on.
    async fn patch(&mut self, feed: &Arc<Mutex<Feed>>, start: u64, len: u64) -> Result<(), Failure> {
        let session = self.session.as_mut().expect("patch needs a session");
        session.confirmed = false;
        let url = session.location.clone();
        let body = ChunkBody {
            feed: feed.clone(),
            remaining: len,
        };
        let request = self
            .oci
            .http
            .patch(url.clone())
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, len)
            .header(
                header::CONTENT_RANGE,
                format!("{start}-{}", (start + len).saturating_sub(1)),
            )
            .body(reqwest::Body::wrap_stream(body));
        let sent = send(request, &url, self.repo, self.oci.scheme, self.authorization()).await;
        let (source_end, fed, hashed) = {
            let mut feed = lock(feed);
            (feed.error.take(), feed.sent, feed.hasher.clone())
        };
        {
            let session = self.session.as_mut().expect("patch needs a session");
            session.tentative = (fed == start + len).then(|| (start + len, hashed.clone()));
        }
        // A failure of the source explains a broken request best.
        if let Some(end) = source_end {
            return Err(match end {
                FeedEnd::Source(e) => source_failure(e),
                FeedEnd::Mismatch(m) => Failure::Fatal(self.source.mismatch(m)),
            });
        }
        let res = sent.map_err(|e| Failure::Data(self.push_error(e)))?;
        match res.status() {
            StatusCode::ACCEPTED | StatusCode::NO_CONTENT => {}
            StatusCode::NOT_FOUND => {
                // The session is gone (it expired, or the registry restarted).
                let e = self.push_error(response_error(res).await);
                self.session = None;
                return Err(Failure::Broken(e));
            }
            _ => return Err(Failure::Data(self.push_error(response_error(res).await))),
        }
        if fed != start + len {
            // Accepted before it had every byte: where the session stands is unknown.
            self.session = None;
            return Err(Failure::Broken(self.push_error(
                OciDistributionError::SpecViolationError(format!(
                    "the registry accepted bytes {start}-{} after {} of them",
                    start + len - 1,
                    fed - start
                )),
            )));
        }
        let location = next_location(&res);
        let session = self.session.as_mut().expect("patch needs a session");
        if let Some(location) = location {
            session.location = location;
        }
        session.committed = start + len;
        session.hashed = hashed;
        session.confirmed = true;
        session.tentative = None;
        Ok(())
    }

    /// Commits the session at `location` (`PUT ?digest=`).
    async fn commit(&self, location: &Url) -> Result<Committed, RegistryError> {
        let mut url = location.clone();
        url.query_pairs_mut().append_pair("digest", self.digest.as_str());
        let request = self.oci.http.put(url.clone()).header(header::CONTENT_LENGTH, 0);
        let res = send(request, &url, self.repo, self.oci.scheme, self.authorization())
            .await
            .map_err(|e| self.push_error(e))?;
        match res.status() {
            StatusCode::CREATED => Ok(Committed::Yes),
            StatusCode::NOT_FOUND => Ok(Committed::SessionUnknown),
            _ => Err(self.push_error(response_error(res).await)),
        }
    }

    /// Cancels the session, if any (`DELETE`, once, best effort: the registry purges
    /// abandoned sessions itself).
    async fn cancel(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let url = session.location;
        let request = self.oci.http.delete(url.clone());
        match send(request, &url, self.repo, self.oci.scheme, self.authorization()).await {
            Ok(res) => {
                tracing::debug!(repo = %self.repo, digest = %self.digest, status = %res.status(), "upload session cancelled")
            }
            Err(e) => {
                tracing::debug!(repo = %self.repo, digest = %self.digest, reason = %describe(&e), "cannot cancel the upload session")
            }
        }
    }
}

/// The `Authorization` header for pushing to `repo`: a bearer token when the registry uses
/// token auth, basic credentials when it wants those, nothing for an anonymous registry.
async fn authorization(
    oci: &Oci,
    repo: &ImageRef,
) -> Result<Option<header::HeaderValue>, OciDistributionError> {
    let token = oci
        .client
        .auth(&repo.to_oci(), &oci.auth, RegistryOperation::Push)
        .await?;
    let value = match (token, &oci.auth) {
        (Some(token), _) => format!("Bearer {token}"),
        (None, RegistryAuth::Basic(user, password)) => {
            use base64::Engine as _;
            let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {pair}")
        }
        (None, _) => return Ok(None),
    };
    let mut value = header::HeaderValue::from_str(&value).map_err(|_| {
        OciDistributionError::GenericError(Some("credentials are not a valid header value".into()))
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// Sends `request`, with the credentials only when `url` is on `repo`'s registry (a
/// `Location` may point elsewhere, and credentials must not follow it there).
async fn send(
    request: reqwest::RequestBuilder,
    url: &Url,
    repo: &ImageRef,
    scheme: &str,
    authorization: Option<&header::HeaderValue>,
) -> Result<reqwest::Response, OciDistributionError> {
    let registry = repo.to_oci().resolve_registry().to_owned();
    let same_registry = url.scheme() == scheme
        && url.host_str().is_some_and(|host| match url.port() {
            Some(port) => registry == format!("{host}:{port}"),
            None => registry == host,
        });
    let request = match authorization {
        Some(value) if same_registry => request.header(header::AUTHORIZATION, value.clone()),
        _ => request,
    };
    Ok(request.send().await?)
}

/// The error a registry's unexpected answer means, as oci-client would build it (so that it
/// is classified and described the same way).
async fn response_error(res: reqwest::Response) -> OciDistributionError {
    let status = res.status();
    let url = res.url().to_string();
    let body = match res.bytes().await {
        Ok(body) => body,
        Err(e) => return e.into(),
    };
    if status == StatusCode::UNAUTHORIZED {
        return OciDistributionError::UnauthorizedError { url };
    }
    if status.is_client_error() {
        if let Ok(envelope) = serde_json::from_slice::<OciEnvelope>(&body) {
            return OciDistributionError::RegistryError { envelope, url };
        }
    }
    OciDistributionError::ServerError {
        code: status.as_u16(),
        url,
        message: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// The `Location` of an answer, resolved against the request's URL.
fn next_location(res: &reqwest::Response) -> Option<Url> {
    let value = res.headers().get(header::LOCATION)?.to_str().ok()?;
    res.url().join(value).ok()
}

/// What an upload session's `Range` header says it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UploadRange {
    /// `0-0`: nothing, or one byte (registries write both that way).
    Empty,
    /// `0-<last>`: bytes through `last`.
    Through(u64),
}

/// Parses an upload `Range` (`0-<last>`, also with a `bytes=` prefix).
fn parse_upload_range(value: &str) -> Option<UploadRange> {
    let value = value.trim();
    let value = value.strip_prefix("bytes=").unwrap_or(value);
    let (first, last) = value.split_once('-')?;
    if first.trim() != "0" {
        return None;
    }
    match last.trim().parse::<u64>().ok()? {
        0 => Some(UploadRange::Empty),
        last => Some(UploadRange::Through(last)),
    }
}

/// The digest a finished hash state stands for.
fn digest_of(hasher: Sha256) -> Digest {
    format!("sha256:{}", hex::encode(hasher.finalize()))
        .parse()
        .expect("a sha256 digest in canonical form")
}

/// The bytes of one attempt, shared by the chunk bodies sent one after the other.
struct Feed {
    stream: SourceStream,
    /// Part of a source chunk that did not fit into the last request.
    pending: Option<Bytes>,
    /// Over every byte handed to a request so far (from offset 0).
    hasher: Sha256,
    /// Bytes handed to requests so far, counted from offset 0.
    sent: u64,
    /// Why the source stopped before a body was complete.
    error: Option<FeedEnd>,
}

/// Why a feed ended badly.
enum FeedEnd {
    Source(RegistryError),
    Mismatch(Mismatch),
}

fn lock(feed: &Mutex<Feed>) -> std::sync::MutexGuard<'_, Feed> {
    // A panic while holding the lock leaves at worst a feed that the attempt abandons.
    feed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The body of one `PATCH`: the next `remaining` bytes of the feed, hashed as they go.
struct ChunkBody {
    feed: Arc<Mutex<Feed>>,
    remaining: u64,
}

impl Stream for ChunkBody {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let feed_handle = self.feed.clone();
        let mut feed = lock(&feed_handle);
        loop {
            let mut chunk = match feed.pending.take() {
                Some(chunk) => chunk,
                None => match feed.stream.poll_next_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(chunk))) => chunk,
                    Poll::Ready(Some(Err(e))) => {
                        feed.error = Some(FeedEnd::Source(e));
                        return Poll::Ready(Some(Err(io::Error::other("the blob source failed"))));
                    }
                    Poll::Ready(None) => {
                        let actual = feed.sent;
                        feed.error = Some(FeedEnd::Mismatch(Mismatch::Short {
                            expected: actual + self.remaining,
                            actual,
                        }));
                        return Poll::Ready(Some(Err(io::Error::other("the blob source ended early"))));
                    }
                },
            };
            if chunk.is_empty() {
                continue;
            }
            let take = usize::try_from(self.remaining).unwrap_or(usize::MAX);
            if chunk.len() > take {
                feed.pending = Some(chunk.split_off(take));
            }
            feed.hasher.update(&chunk);
            feed.sent += chunk.len() as u64;
            self.remaining -= chunk.len() as u64;
            return Poll::Ready(Some(Ok(chunk)));
        }
    }
}

/// After the last chunk: the source must have ended exactly at `size`. Returns the hash over
/// every byte.
async fn finish_feed(feed: &Arc<Mutex<Feed>>, size: u64) -> Result<Sha256, FeedEnd> {
    let (mut stream, pending, hasher, sent) = {
        let mut feed = lock(feed);
        if let Some(end) = feed.error.take() {
            return Err(end);
        }
        let stream = std::mem::replace(&mut feed.stream, futures::stream::empty().boxed());
        (stream, feed.pending.take(), feed.hasher.clone(), feed.sent)
    };
    if sent != size {
        return Err(FeedEnd::Mismatch(Mismatch::Short {
            expected: size,
            actual: sent,
        }));
    }
    if pending.is_some_and(|p| !p.is_empty()) {
        return Err(FeedEnd::Mismatch(Mismatch::Long { expected: size }));
    }
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) if chunk.is_empty() => {}
            Ok(_) => return Err(FeedEnd::Mismatch(Mismatch::Long { expected: size })),
            Err(e) => return Err(FeedEnd::Source(e)),
        }
    }
    Ok(hasher)
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
    fn upload_ranges_are_parsed() {
        assert_eq!(parse_upload_range("0-0"), Some(UploadRange::Empty));
        assert_eq!(parse_upload_range("0-1023"), Some(UploadRange::Through(1023)));
        assert_eq!(parse_upload_range("bytes=0-9"), Some(UploadRange::Through(9)));
        assert_eq!(parse_upload_range(" 0-5 "), Some(UploadRange::Through(5)));
        for bad in ["", "5-9", "0-", "0-x", "nonsense"] {
            assert_eq!(parse_upload_range(bad), None, "{bad:?}");
        }
    }

    fn feed_of(chunks: Vec<Result<Bytes, RegistryError>>) -> Arc<Mutex<Feed>> {
        Arc::new(Mutex::new(Feed {
            stream: futures::stream::iter(chunks).boxed(),
            pending: None,
            hasher: Sha256::new(),
            sent: 0,
            error: None,
        }))
    }

    async fn body_bytes(feed: &Arc<Mutex<Feed>>, len: u64) -> Result<Vec<u8>, io::Error> {
        let mut body = ChunkBody {
            feed: feed.clone(),
            remaining: len,
        };
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn chunk_bodies_split_the_source_and_hash_every_byte() {
        let data: Vec<u8> = (0..100u8).collect();
        let feed = feed_of(vec![
            Ok(Bytes::copy_from_slice(&data[..30])),
            Ok(Bytes::new()),
            Ok(Bytes::copy_from_slice(&data[30..])),
        ]);
        let mut got = Vec::new();
        for len in [40, 40, 20] {
            let part = body_bytes(&feed, len).await.unwrap();
            assert_eq!(part.len() as u64, len);
            got.extend(part);
        }
        assert_eq!(got, data);
        let hasher = finish_feed(&feed, 100)
            .await
            .ok()
            .expect("the source ended at its size");
        assert_eq!(digest_of(hasher), Digest::of(&data));
    }

    #[tokio::test]
    async fn a_source_of_the_wrong_size_is_a_mismatch() {
        // Too short: the body fails and the feed says why.
        let feed = feed_of(vec![Ok(Bytes::from_static(b"abc"))]);
        assert!(body_bytes(&feed, 5).await.is_err());
        let end = lock(&feed).error.take();
        match end {
            Some(FeedEnd::Mismatch(Mismatch::Short {
                expected: 5,
                actual: 3,
            })) => {}
            _ => panic!("expected a short source"),
        }
        // Too long: found after the last chunk.
        let feed = feed_of(vec![Ok(Bytes::from_static(b"abcdef"))]);
        assert_eq!(body_bytes(&feed, 4).await.unwrap(), b"abcd");
        assert!(matches!(
            finish_feed(&feed, 4).await,
            Err(FeedEnd::Mismatch(Mismatch::Long { expected: 4 }))
        ));
        let feed = feed_of(vec![
            Ok(Bytes::from_static(b"abcd")),
            Ok(Bytes::from_static(b"e")),
        ]);
        assert_eq!(body_bytes(&feed, 4).await.unwrap(), b"abcd");
        assert!(matches!(
            finish_feed(&feed, 4).await,
            Err(FeedEnd::Mismatch(Mismatch::Long { expected: 4 }))
        ));
    }

    #[tokio::test]
    async fn a_failing_source_is_reported_as_the_source_error() {
        let err = RegistryError::ReadBlobFile {
            path: PathBuf::from("/nowhere"),
            source: Arc::new(io::Error::from(io::ErrorKind::PermissionDenied)),
        };
        let feed = feed_of(vec![Ok(Bytes::from_static(b"ab")), Err(err)]);
        assert!(body_bytes(&feed, 10).await.is_err());
        let end = lock(&feed).error.take();
        match end {
            Some(FeedEnd::Source(RegistryError::ReadBlobFile { path, .. })) => {
                assert_eq!(path, PathBuf::from("/nowhere"))
            }
            _ => panic!("expected the source's error"),
        }
    }

    #[tokio::test]
    async fn file_sources_reopen_at_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let content: Vec<u8> = (0..(FILE_CHUNK * 2 + 10)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let source = FileSource {
            path: path.clone(),
            digest: Digest::of(&content),
        };
        for offset in [0, 1, FILE_CHUNK as u64 + 3, content.len() as u64] {
            let mut stream = source.open(offset).await.unwrap();
            let mut got = Vec::new();
            while let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk.unwrap());
            }
            assert_eq!(got, content[offset as usize..], "offset {offset}");
        }
        let err = source.mismatch(Mismatch::Digest {
            actual: Digest::of(b"x"),
        });
        assert!(
            matches!(&err, RegistryError::LocalBlobMismatch { path: p, .. } if *p == path),
            "{err:?}"
        );
        let missing = FileSource {
            path: dir.path().join("missing"),
            digest: Digest::of(b""),
        };
        let err = missing.open(0).await.err().expect("a missing file");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[tokio::test]
    async fn bytes_sources_reopen_at_an_offset() {
        let source = BytesSource {
            repo: "r.example/a".into(),
            digest: Digest::of(b"hello"),
            bytes: Bytes::from_static(b"hello"),
        };
        let mut stream = source.open(2).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), Bytes::from_static(b"llo"));
        assert!(stream.next().await.is_none());
    }
}
