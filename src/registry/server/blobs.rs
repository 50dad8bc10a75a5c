//! Reading and deleting blobs: `HEAD`/`GET`/`DELETE /v2/<name>/blobs/<digest>`, including a
//! single `Range: bytes=...` on `GET` (206). A repository sees only the blobs linked to it
//! (pushed, mounted, or its manifests); deleting unlinks, it never removes content.

use std::io::SeekFrom;

use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::{
    error::{ErrorCode, ErrorResponse, Result},
    routes::{parse_digest, RepoName},
    upload::CONTENT_DIGEST_HEADER,
    Registry,
};
use crate::model::Digest;

/// Read buffer for streaming blobs out.
const CHUNK: usize = 64 * 1024;

/// What a `Range` header asks of a blob of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No range, or one this server ignores (several ranges, other units, bad syntax), as
    /// RFC 9110 allows: the whole blob.
    Full,
    /// Bytes `start..=end`, clamped to the blob.
    Partial { start: u64, end: u64 },
    /// A well-formed range that lies outside the blob: 416.
    Unsatisfiable,
}

/// Interprets a `Range` header value for a blob of `size` bytes.
pub fn parse_range(value: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match number(last) {
            Some(0) => ByteRange::Unsatisfiable,
            Some(_) if size == 0 => ByteRange::Unsatisfiable,
            Some(n) => ByteRange::Partial {
                start: size - n.min(size),
                end: size - 1,
            },
            None => ByteRange::Full,
        },
        // bytes=A-: from A to the end.
        (false, true) => match number(first) {
            Some(start) if start < size => ByteRange::Partial { start, end: size - 1 },
            Some(_) => ByteRange::Unsatisfiable,
            None => ByteRange::Full,
        },
        (false, false) => match (number(first), number(last)) {
            (Some(start), Some(end)) if start > end => ByteRange::Full,
            (Some(start), Some(end)) if start < size => ByteRange::Partial {
                start,
                end: end.min(size - 1),
            },
            (Some(_), Some(_)) => ByteRange::Unsatisfiable,
            _ => ByteRange::Full,
        },
        (true, true) => ByteRange::Full,
    }
}

fn blob_unknown(digest: &Digest) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::BlobUnknown,
        format!("blob {digest} is unknown to this repository"),
    )
    .with_detail(serde_json::json!({ "digest": digest }))
}

/// `HEAD`/`GET /v2/<name>/blobs/<digest>`.
pub async fn get(
    registry: &Registry,
    repo: &RepoName,
    digest: &str,
    request_headers: &HeaderMap,
    head: bool,
) -> Result<Response> {
    let digest = parse_digest(digest)?;
    let linked = registry
        .storage
        .blob_in_repo(repo, &digest)
        .await
        .map_err(|e| ErrorResponse::internal("looking up blob", e))?;
    if !linked {
        return Err(blob_unknown(&digest));
    }
    let Some((mut file, size)) = registry
        .storage
        .open_blob(&digest)
        .await
        .map_err(|e| ErrorResponse::internal("opening blob", e))?
    else {
        return Err(blob_unknown(&digest));
    };

    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let digest_value = HeaderValue::from_str(digest.as_str()).expect("digest is ascii");
    headers.insert(HeaderName::from_static(CONTENT_DIGEST_HEADER), digest_value);
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{digest}\"")).expect("digest is ascii"),
    );

    let range = if head {
        ByteRange::Full
    } else {
        parse_range(
            request_headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
            size,
        )
    };
    let (status, start, len) = match range {
        ByteRange::Full => (StatusCode::OK, 0, size),
        ByteRange::Partial { start, end } => {
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")).expect("ascii"),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        ByteRange::Unsatisfiable => {
            return Err(ErrorResponse::new(
                ErrorCode::RangeInvalid,
                format!("range not satisfiable for {size} bytes"),
            )
            .with_header(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            ));
        }
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if head {
        // A client checking before a push: the blob is needed (see `gc`).
        registry
            .storage
            .stamp_blob(&digest)
            .await
            .map_err(|e| ErrorResponse::internal("stamping blob", e))?;
        return Ok((status, headers).into_response());
    }
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| ErrorResponse::internal("seeking blob", e))?;
    }
    let body = Body::from_stream(ReaderStream::with_capacity(file.take(len), CHUNK));
    Ok((status, headers, body).into_response())
}

/// `DELETE /v2/<name>/blobs/<digest>`: unlinks the blob from the repository (202).
pub async fn delete(registry: &Registry, repo: &RepoName, digest: &str) -> Result<Response> {
    let digest = parse_digest(digest)?;
    let removed = registry
        .storage
        .unlink_blob(repo, &digest)
        .await
        .map_err(|e| ErrorResponse::internal("unlinking blob", e))?;
    if !removed {
        return Err(blob_unknown(&digest));
    }
    tracing::debug!(repo = %repo, digest = %digest, "blob unlinked");
    Ok((StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ByteRange::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), Partial { start: 0, end: 4 });
        assert_eq!(parse_range(Some("bytes=5-"), 10), Partial { start: 5, end: 9 });
        assert_eq!(parse_range(Some("bytes=-3"), 10), Partial { start: 7, end: 9 });
        assert_eq!(parse_range(Some("bytes=-30"), 10), Partial { start: 0, end: 9 });
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Partial { start: 8, end: 9 });
        assert_eq!(parse_range(Some("bytes=9-9"), 10), Partial { start: 9, end: 9 });
        assert_eq!(parse_range(Some("bytes=10-12"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-5"), 0), Unsatisfiable);
        // Ignored: whole blob.
        for ignored in [
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=5-2",
            "bytes=a-b",
            "bytes=-",
            "0-4",
            "bytes=1",
        ] {
            assert_eq!(parse_range(Some(ignored), 10), Full, "{ignored}");
        }
    }
}
