//! Where the bytes of an upload come from: a local file ([`FileSource`]), bytes in memory
//! ([`BytesSource`]) or a blob in another repository ([`RegistrySource`], reopened with a
//! `Range` request and resumed under the retry policy when its stream breaks). Every source
//! can be opened again at any offset, so an interrupted upload resumes without starting
//! over, and each says what a mismatch of its bytes means ([`UploadSource::mismatch`]).

use std::{
    fmt, io,
    io::{Read as _, Seek as _},
    path::PathBuf,
    sync::Arc,
};

use bytes::Bytes;
use futures::{future::BoxFuture, stream::BoxStream, StreamExt as _};
use oci_client::{client::BlobResponse, errors::OciDistributionError, manifest::OciDescriptor};
use tokio::sync::mpsc;

use super::{is_digest_error, FILE_CHUNK, QUEUE_DEPTH};
use crate::{
    model::{Digest, ImageRef},
    registry::{client::Oci, RegistryError, RetryPolicy},
};

/// A stream of blob bytes; its errors are already the source's [`RegistryError`]s.
pub(crate) type SourceStream = BoxStream<'static, Result<Bytes, RegistryError>>;

/// Where the bytes of an upload come from. A source can be opened again at any offset, so an
/// interrupted upload resumes without starting over.
pub(crate) trait UploadSource: Send + Sync {
    /// The blob's bytes from `offset` on.
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<SourceStream, RegistryError>>;
    /// The error for bytes that do not have the expected size or digest.
    fn mismatch(&self, found: Mismatch) -> RegistryError;
}

/// What was wrong with the bytes of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mismatch {
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
pub(super) struct FileSource {
    pub(super) path: PathBuf,
    pub(super) digest: Digest,
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
pub(super) struct BytesSource {
    pub(super) repo: String,
    pub(super) digest: Digest,
    pub(super) bytes: Bytes,
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
pub(crate) struct RegistrySource {
    pub oci: Oci,
    pub image: ImageRef,
    pub desc: OciDescriptor,
    pub digest: Digest,
    /// The copy's target, for error messages.
    pub target: String,
    pub retry: RetryPolicy,
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
    let host = reference.registry().to_owned();
    let stream = async_stream::stream! {
        let mut stream = stream;
        let mut skip = skip;
        while let Some(item) = stream.next().await {
            match item {
                Ok(mut chunk) => {
                    crate::registry::stats::pulled(&host, chunk.len() as u64);
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

#[cfg(test)]
mod tests {
    use super::*;

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
