//! Single blobs between a registry and this machine or another repository: pulling one to a
//! local file ([`RegistryClient::pull_blob_to_file`], `pull.rs`), making one present in Kiln's
//! repositories from a file, from memory or from another repository
//! ([`RegistryClient::push_blob_file`], [`RegistryClient::push_blob_bytes`],
//! [`RegistryClient::transfer_blob`]: HEAD, mount, else a resumable upload), and the
//! pieces those share. Manifests are `super::manifests`'; whole images `super::image`'s.
//!
//! Layout: `pull.rs` streams a blob into a file, verified; `sources.rs` says where the bytes
//! of an upload come from (a file, memory, another registry), reopenable at any offset;
//! `upload.rs` is the resumable upload session; `feed.rs` cuts a source into the bodies of
//! its `PATCH` requests, hashing every byte.
//!
//! # Credentials
//! Reads (`pull_blob_to_file`, `blob_exists`, the source of `transfer_blob`) use the
//! credentials the request's [`AuthPolicy`] allows, like `resolve`. Writes (`push_blob_file`,
//! `push_blob_bytes`, the target of `transfer_blob`) go to Kiln's own repositories on Kiln's
//! behalf and, like `copy`, always use the **installation's** credentials for the target
//! registry (anonymous when it has none), whatever the policy says; the write methods take
//! the policy only for a uniform signature.
//!
//! # Streaming and verification
//! No layer is ever held whole in memory. A pulled blob goes from the network through a
//! bounded queue to a blocking thread that hashes it and writes `<dest>.partial`; its size is
//! checked as it arrives (a registry sending more than expected is cut off at once), and only
//! a blob of the right size and digest is synced and renamed to `<dest>`. On every failure
//! (and when the future is dropped) the partial file is removed and `<dest>` is not created.
//! (oci-client checks the digest too; Kiln's own check decides, so the error is a
//! [`RegistryError::BlobDigestMismatch`].) Uploads are verified the same way before they are
//! committed (see `upload.rs`).
//!
//! Every operation here except uploads is retried as a whole under the client's
//! [`RetryPolicy`](super::RetryPolicy) (reads and `HEAD`s are idempotent); a
//! cross-repository mount is tried once (when refused or failed, the blob is uploaded
//! instead).

mod feed;
mod pull;
mod sources;
mod upload;

use std::{fmt, io, path::Path, sync::Arc};

use oci_client::{errors::DigestError, manifest::OciDescriptor};

use bytes::Bytes;
use tracing::Instrument as _;

use self::{
    pull::pull_to_file,
    sources::{BytesSource, FileSource, RegistrySource},
};
use super::{
    client::Oci, credentials::normalize_registry, error::describe, manifests::descriptor_parts,
    RegistryClient, RegistryError,
};
use crate::model::{AuthPolicy, Digest, ImageRef};

/// The size of one read or write of a local blob file.
const FILE_CHUNK: usize = 256 * 1024;
/// How many chunks may wait between the network and the blocking file thread.
const QUEUE_DEPTH: usize = 8;

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
            .instrument(tracing::debug_span!("pull_blob", %repo, %digest))
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
        let upload = async {
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
            Ok(bytes)
        };
        self.make_present(&dst, repo, digest, mount_from, upload).await
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
        let size = bytes.len() as u64;
        let source = BytesSource {
            repo: repo.to_string(),
            digest: digest.clone(),
            bytes: Bytes::from(bytes),
        };
        let upload = self.upload_blob(&dst, repo, digest, size, &source);
        self.make_present(&dst, repo, digest, None, upload).await
    }

    /// Makes blob `digest` present in `repo` (written through `dst`): HEAD first (done when
    /// present); else, if `mount_from` names another repository on the same registry, a
    /// cross-repository mount (a refused mount is not an error); else `upload` runs (it is
    /// not started otherwise) and its byte count is reported. Every write of a blob goes
    /// through here, in a `push_blob` span.
    async fn make_present(
        &self,
        dst: &Oci,
        repo: &ImageRef,
        digest: &Digest,
        mount_from: Option<&ImageRef>,
        upload: impl std::future::Future<Output = Result<u64, RegistryError>>,
    ) -> Result<BlobPush, RegistryError> {
        let span = tracing::debug_span!("push_blob", %repo, %digest, outcome = tracing::field::Empty);
        let pushed = self
            .present_or_upload(dst, repo, digest, mount_from, upload)
            .instrument(span.clone())
            .await?;
        span.record("outcome", tracing::field::display(&pushed));
        Ok(pushed)
    }

    async fn present_or_upload(
        &self,
        dst: &Oci,
        repo: &ImageRef,
        digest: &Digest,
        mount_from: Option<&ImageRef>,
        upload: impl std::future::Future<Output = Result<u64, RegistryError>>,
    ) -> Result<BlobPush, RegistryError> {
        if self.has_blob(dst, repo, digest).await? {
            return Ok(BlobPush::Present);
        }
        if let Some(from) = mount_from {
            if let Some(mounted) = try_mount(dst, repo, from, digest).await {
                return Ok(mounted);
            }
        }
        Ok(BlobPush::Uploaded { bytes: upload.await? })
    }

    /// Makes blob `desc` of `source` (read through `src`) present in `target` (written
    /// through `dst`): present → done; same registry → mount; else (or when the mount is
    /// refused) streamed from the source into a resumable upload, checked against the
    /// digest on the way. `copy`'s per-blob step, and [`Self::transfer_blob`]'s.
    pub(super) async fn transfer(
        &self,
        src: &Oci,
        dst: &Oci,
        source: &ImageRef,
        target: &ImageRef,
        desc: &OciDescriptor,
    ) -> Result<(Digest, BlobPush), RegistryError> {
        let (digest, size) = descriptor_parts(source, desc)?;
        let from = RegistrySource {
            oci: src.clone(),
            image: source.clone(),
            desc: desc.clone(),
            digest: digest.clone(),
            target: target.to_string(),
            retry: self.retry_policy().clone(),
        };
        let upload = self.upload_blob(dst, target, &digest, size, &from);
        let push = self
            .make_present(dst, target, &digest, Some(source), upload)
            .await?;
        Ok((digest, push))
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

    /// Makes blob `digest` (of `size` bytes) that lives in `source` (another repository,
    /// maybe on another registry) present in `target`, as [`Self::transfer`] does for `copy`.
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
        let (_, outcome) = self
            .transfer(&src, &dst, source, target, &blob_descriptor(digest, Some(size)))
            .await?;
        tracing::debug!(%source, %target, %digest, outcome = %outcome, "blob transferred");
        Ok(outcome)
    }
}

/// A descriptor for oci-client's blob calls (which read only the digest, and the size when
/// copying). Sizes past `i64::MAX` cannot occur; they would be refused by the registry.
pub(super) fn blob_descriptor(digest: &Digest, size: Option<u64>) -> OciDescriptor {
    OciDescriptor {
        digest: digest.to_string(),
        size: size.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
        ..OciDescriptor::default()
    }
}

/// Whether a stream error is oci-client's digest verification failing (by type).
pub(super) fn is_digest_error(e: &io::Error) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
