//! Pulling one blob into a local file: streamed from the registry through a bounded queue to
//! a blocking thread that hashes it and writes `<dest>.partial`, checked for size as it
//! arrives and for digest at the end, then synced and renamed to `<dest>`. The partial file
//! is removed on every failure and when the future is dropped.

use std::{
    io,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use futures::StreamExt as _;
use oci_client::errors::OciDistributionError;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::{blob_descriptor, is_digest_error, FILE_CHUNK, QUEUE_DEPTH};
use crate::{
    model::{Digest, ImageRef},
    registry::{client::Oci, RegistryError},
};

/// One attempt of [`RegistryClient::pull_blob_to_file`].
pub(super) async fn pull_to_file(
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
                crate::registry::stats::pulled(repo.registry(), chunk.len() as u64);
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
}
