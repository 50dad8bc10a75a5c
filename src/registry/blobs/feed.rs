//! The bytes of one upload attempt, cut into the bodies of its `PATCH` requests: each
//! [`ChunkBody`] takes the next bytes of the source and hashes them as they go;
//! [`finish_feed`] checks that the source ended exactly at the blob's size.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};

use super::sources::{Mismatch, SourceStream};
use crate::{model::Digest, registry::RegistryError};

/// The bytes of one attempt, shared by the chunk bodies sent one after the other.
pub(super) struct Feed {
    pub(super) stream: SourceStream,
    /// Part of a source chunk that did not fit into the last request.
    pub(super) pending: Option<Bytes>,
    /// Over every byte handed to a request so far (from offset 0).
    pub(super) hasher: Sha256,
    /// Bytes handed to requests so far, counted from offset 0.
    pub(super) sent: u64,
    /// Why the source stopped before a body was complete.
    pub(super) error: Option<FeedEnd>,
}

/// Why a feed ended badly.
pub(super) enum FeedEnd {
    Source(RegistryError),
    Mismatch(Mismatch),
}

pub(super) fn lock(feed: &Mutex<Feed>) -> std::sync::MutexGuard<'_, Feed> {
    // A panic while holding the lock leaves at worst a feed that the attempt abandons.
    feed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The body of one `PATCH`: the next `remaining` bytes of the feed, hashed as they go.
pub(super) struct ChunkBody {
    pub(super) feed: Arc<Mutex<Feed>>,
    pub(super) remaining: u64,
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
pub(super) async fn finish_feed(feed: &Arc<Mutex<Feed>>, size: u64) -> Result<Sha256, FeedEnd> {
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

/// The digest a finished hash state stands for.
pub(super) fn digest_of(hasher: Sha256) -> Digest {
    format!("sha256:{}", hex::encode(hasher.finalize()))
        .parse()
        .expect("a sha256 digest in canonical form")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
}
