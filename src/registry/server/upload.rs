//! Blob uploads: sessions (`POST`, `PATCH`, `PUT`, `GET`, `DELETE` on
//! `/v2/<name>/blobs/uploads/...`), monolithic `POST ?digest=` uploads, and cross-repository
//! mounts.
//!
//! An upload session lives in memory (its id, repository, size and running sha256 state)
//! with its data in `uploads/<uuid>`; sessions do not survive a restart, and the garbage
//! collector closes those whose data has not grown for `upload_max_age` ([`Uploads::close_if_idle`]).
//! Bodies are streamed to disk chunk by chunk while the digest is computed, so a blob is
//! never held in memory and never re-read to be verified. A chunk that fails half-way (a
//! client that disconnects, a size that disagrees with its `Content-Range`) is rolled back:
//! the file is truncated and the hash state restored, so the session can be resumed.
//!
//! Mounting (`POST ?mount=D&from=OTHER`) succeeds only if `OTHER` has the blob, as in docker's
//! distribution: a repository never gains access to a blob just by knowing its digest.
//! Otherwise (or without `from`) a normal upload session is started (202).

use std::{
    collections::HashMap,
    io::SeekFrom,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::{
    fs,
    io::{AsyncSeekExt, AsyncWriteExt},
};
use uuid::Uuid;

use super::{
    error::{ErrorCode, ErrorResponse, Result},
    routes::{parse_digest, query_params, RepoName},
    Registry,
};
use crate::model::Digest;

pub const UPLOAD_UUID_HEADER: &str = "docker-upload-uuid";
pub const CONTENT_DIGEST_HEADER: &str = "docker-content-digest";

/// The in-memory table of open upload sessions.
#[derive(Debug, Default)]
pub struct Uploads {
    sessions: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<Session>>>>,
}

impl Uploads {
    fn insert(&self, id: Uuid, session: Session) {
        self.lock().insert(id, Arc::new(tokio::sync::Mutex::new(session)));
    }

    fn get(&self, id: Uuid) -> Option<Arc<tokio::sync::Mutex<Session>>> {
        self.lock().get(&id).cloned()
    }

    fn remove(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    /// Closes session `id` unless a request holds it now; whether it is closed (or was not
    /// there). A request waiting for a closed session finds it closed and fails as unknown.
    pub fn close_if_idle(&self, id: Uuid) -> bool {
        let mut sessions = self.lock();
        let Some(session) = sessions.get(&id) else {
            return true;
        };
        match session.try_lock() {
            Ok(mut session) => session.closed = true,
            Err(_) => return false,
        }
        sessions.remove(&id);
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<tokio::sync::Mutex<Session>>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One upload in progress.
#[derive(Debug)]
struct Session {
    repo: RepoName,
    path: PathBuf,
    size: u64,
    hasher: Sha256,
    /// Completed or cancelled: a request that was waiting for the lock must not touch it.
    closed: bool,
}

impl Session {
    async fn create(repo: RepoName, path: PathBuf) -> Result<Self> {
        crate::private_fs::tokio_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| ErrorResponse::internal("creating upload file", e))?;
        Ok(Self {
            repo,
            path,
            size: 0,
            hasher: Sha256::new(),
            closed: false,
        })
    }

    /// Appends `body` at the end of the data, checking it against `range` (`Content-Range`,
    /// inclusive) if given. On any failure the data and the hash are as they were before.
    async fn append(&mut self, body: Body, range: Option<(u64, u64)>) -> Result<u64> {
        if let Some((start, _)) = range {
            if start != self.size {
                return Err(ErrorResponse::new(
                    ErrorCode::RangeInvalid,
                    format!(
                        "Content-Range starts at {start}, but the upload has {} bytes",
                        self.size
                    ),
                )
                .with_header(header::RANGE, range_header(self.size)));
            }
        }
        let saved_hasher = self.hasher.clone();
        let result = self.write_body(body).await;
        let result = match (result, range) {
            (Ok(written), Some((start, end))) if written != end - start + 1 => Err(ErrorResponse::new(
                ErrorCode::SizeInvalid,
                format!(
                    "Content-Range {start}-{end} announces {} bytes, the body had {written}",
                    end - start + 1
                ),
            )),
            (result, _) => result,
        };
        match result {
            Ok(written) => {
                self.size += written;
                Ok(written)
            }
            Err(e) => {
                self.hasher = saved_hasher;
                let truncated = async {
                    let file = fs::OpenOptions::new().write(true).open(&self.path).await?;
                    file.set_len(self.size).await
                }
                .await;
                if let Err(io) = truncated {
                    // The data no longer matches the hash: the session is unusable.
                    self.closed = true;
                    return Err(ErrorResponse::internal("rolling back a failed chunk", io));
                }
                Err(e)
            }
        }
    }

    async fn write_body(&mut self, body: Body) -> Result<u64> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .await
            .map_err(|e| ErrorResponse::internal("opening upload file", e))?;
        file.seek(SeekFrom::Start(self.size))
            .await
            .map_err(|e| ErrorResponse::internal("seeking upload file", e))?;
        let mut stream = body.into_data_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ErrorResponse::new(
                    ErrorCode::BlobUploadInvalid,
                    format!("failed to read the request body: {e}"),
                )
            })?;
            self.hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| ErrorResponse::internal("writing upload file", e))?;
            written += chunk.len() as u64;
        }
        file.flush()
            .await
            .map_err(|e| ErrorResponse::internal("writing upload file", e))?;
        Ok(written)
    }

    /// Verifies the data against `expected` and moves it into the store, linked in the
    /// session's repository. On mismatch the data is discarded.
    async fn finish(&self, registry: &Registry, expected: &Digest) -> Result<Response> {
        let actual = digest_of_hash(self.hasher.clone().finalize().as_slice());
        if &actual != expected {
            let _ = fs::remove_file(&self.path).await;
            return Err(ErrorResponse::new(
                ErrorCode::DigestInvalid,
                format!("uploaded content has digest {actual}, not {expected}"),
            )
            .with_detail(serde_json::json!({ "expected": expected, "actual": actual })));
        }
        let committed = async {
            fs::File::open(&self.path).await?.sync_all().await?;
            registry.storage.commit_blob(&self.path, expected).await?;
            registry.storage.link_blob(&self.repo, expected).await
        }
        .await;
        if let Err(e) = committed {
            let _ = fs::remove_file(&self.path).await;
            return Err(ErrorResponse::internal("storing uploaded blob", e));
        }
        tracing::debug!(repo = %self.repo, digest = %expected, size = self.size, "blob stored");
        Ok(blob_created(&self.repo, expected))
    }
}

/// The digest whose sha256 is `hash`.
fn digest_of_hash(hash: &[u8]) -> Digest {
    format!("sha256:{}", hex::encode(hash))
        .parse()
        .expect("a sha256 hash is a valid digest")
}

/// The `Range` value for an upload of `size` bytes: `0-<last byte>`, `0-0` when empty (as
/// distribution answers).
fn range_header(size: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("0-{}", size.saturating_sub(1))).expect("ascii")
}

fn header_value(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).expect("locations and digests are ascii")
}

fn upload_location(repo: &RepoName, id: Uuid) -> HeaderValue {
    header_value(format!("/v2/{repo}/blobs/uploads/{id}"))
}

/// 201 for a blob now in `repo`.
fn blob_created(repo: &RepoName, digest: &Digest) -> Response {
    let headers: [(HeaderName, HeaderValue); 3] = [
        (
            header::LOCATION,
            header_value(format!("/v2/{repo}/blobs/{digest}")),
        ),
        (
            HeaderName::from_static(CONTENT_DIGEST_HEADER),
            header_value(digest.to_string()),
        ),
        (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
    ];
    (StatusCode::CREATED, headers).into_response()
}

/// `status` with the headers that describe an open session.
fn session_response(status: StatusCode, repo: &RepoName, id: Uuid, size: u64) -> Response {
    let headers: [(HeaderName, HeaderValue); 4] = [
        (header::LOCATION, upload_location(repo, id)),
        (header::RANGE, range_header(size)),
        (
            HeaderName::from_static(UPLOAD_UUID_HEADER),
            header_value(id.to_string()),
        ),
        (header::CONTENT_LENGTH, HeaderValue::from_static("0")),
    ];
    (status, headers).into_response()
}

/// Parses a `Content-Range` of an upload chunk: `<start>-<end>` (inclusive), tolerating a
/// `bytes ` or `bytes=` prefix and a `/<total>` suffix. `None` if malformed.
pub fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let value = value.trim();
    let value = value
        .strip_prefix("bytes=")
        .or_else(|| value.strip_prefix("bytes "))
        .unwrap_or(value);
    let value = value.split_once('/').map_or(value, |(range, _total)| range);
    let (start, end) = value.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(start) || !digits(end) {
        return None;
    }
    let (start, end) = (start.parse().ok()?, end.parse().ok()?);
    (start <= end).then_some((start, end))
}

fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(parse_content_range)
        .map(Some)
        .ok_or_else(|| {
            ErrorResponse::new(
                ErrorCode::BlobUploadInvalid,
                format!("malformed Content-Range {value:?}: expected <start>-<end>"),
            )
        })
}

fn upload_unknown(id: &str) -> ErrorResponse {
    ErrorResponse::new(ErrorCode::BlobUploadUnknown, format!("upload {id:?} is unknown"))
        .with_detail(serde_json::json!({ "uuid": id }))
}

/// The session `id` of `repo`, if it is open.
fn find(registry: &Registry, id: &str) -> Result<(Uuid, Arc<tokio::sync::Mutex<Session>>)> {
    let uuid = Uuid::parse_str(id).map_err(|_| upload_unknown(id))?;
    let session = registry.uploads.get(uuid).ok_or_else(|| upload_unknown(id))?;
    Ok((uuid, session))
}

/// `POST /v2/<name>/blobs/uploads/`: a mount, a monolithic upload, or a new session.
pub async fn start(registry: &Registry, repo: RepoName, request: Request) -> Result<Response> {
    let query = query_params(request.uri())?;
    if let Some(mount) = query.get("mount") {
        let digest = parse_digest(mount)?;
        if let Some(from) = query.get("from") {
            let from = RepoName::parse(from).ok_or_else(|| {
                ErrorResponse::new(
                    ErrorCode::NameInvalid,
                    format!("invalid repository name {from:?}"),
                )
                .with_detail(serde_json::json!({ "name": from }))
            })?;
            let present = registry
                .storage
                .blob_in_repo(&from, &digest)
                .await
                .map_err(|e| ErrorResponse::internal("checking mount source", e))?;
            if present {
                registry
                    .storage
                    .link_blob(&repo, &digest)
                    .await
                    .map_err(|e| ErrorResponse::internal("linking mounted blob", e))?;
                tracing::debug!(repo = %repo, from = %from, digest = %digest, "blob mounted");
                return Ok(blob_created(&repo, &digest));
            }
        }
        return open_session(registry, repo).await;
    }
    if let Some(digest) = query.get("digest") {
        let digest = parse_digest(digest)?;
        let range = content_range(request.headers())?;
        let mut session = Session::create(repo, registry.storage.upload_path(Uuid::new_v4())).await?;
        if let Err(e) = session.append(request.into_body(), range).await {
            let _ = fs::remove_file(&session.path).await;
            return Err(e);
        }
        return session.finish(registry, &digest).await;
    }
    open_session(registry, repo).await
}

async fn open_session(registry: &Registry, repo: RepoName) -> Result<Response> {
    let id = Uuid::new_v4();
    let session = Session::create(repo.clone(), registry.storage.upload_path(id)).await?;
    registry.uploads.insert(id, session);
    tracing::debug!(repo = %repo, upload = %id, "upload started");
    Ok(session_response(StatusCode::ACCEPTED, &repo, id, 0))
}

/// `PATCH <location>`: appends a chunk.
pub async fn patch(registry: &Registry, repo: &RepoName, id: &str, request: Request) -> Result<Response> {
    let (uuid, session) = find(registry, id)?;
    let range = content_range(request.headers())?;
    let mut session = session.lock().await;
    if session.closed || &session.repo != repo {
        return Err(upload_unknown(id));
    }
    session.append(request.into_body(), range).await.map_err(|e| {
        if e.code == ErrorCode::RangeInvalid {
            e.with_header(header::LOCATION, upload_location(repo, uuid))
        } else {
            e
        }
    })?;
    Ok(session_response(StatusCode::ACCEPTED, repo, uuid, session.size))
}

/// `PUT <location>?digest=D`: appends the (optional) last chunk, verifies, stores.
pub async fn complete(registry: &Registry, repo: &RepoName, id: &str, request: Request) -> Result<Response> {
    let (uuid, session) = find(registry, id)?;
    let query = query_params(request.uri())?;
    let digest = query.get("digest").ok_or_else(|| {
        ErrorResponse::new(ErrorCode::DigestInvalid, "the digest query parameter is required")
    })?;
    let digest = parse_digest(digest)?;
    let range = content_range(request.headers())?;
    let mut guard = session.lock().await;
    if guard.closed || &guard.repo != repo {
        return Err(upload_unknown(id));
    }
    guard.append(request.into_body(), range).await?;
    guard.closed = true;
    registry.uploads.remove(uuid);
    guard.finish(registry, &digest).await
}

/// `GET <location>`: how much has been received.
pub async fn status(registry: &Registry, repo: &RepoName, id: &str) -> Result<Response> {
    let (uuid, session) = find(registry, id)?;
    let session = session.lock().await;
    if session.closed || &session.repo != repo {
        return Err(upload_unknown(id));
    }
    Ok(session_response(StatusCode::NO_CONTENT, repo, uuid, session.size))
}

/// `DELETE <location>`: cancels the upload and discards its data.
pub async fn cancel(registry: &Registry, repo: &RepoName, id: &str) -> Result<Response> {
    let (uuid, session) = find(registry, id)?;
    let mut session = session.lock().await;
    if session.closed || &session.repo != repo {
        return Err(upload_unknown(id));
    }
    session.closed = true;
    registry.uploads.remove(uuid);
    let _ = fs::remove_file(&session.path).await;
    tracing::debug!(repo = %repo, upload = %uuid, "upload cancelled");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(parse_content_range("0-9"), Some((0, 9)));
        assert_eq!(parse_content_range("bytes=10-19"), Some((10, 19)));
        assert_eq!(parse_content_range("bytes 10-19/100"), Some((10, 19)));
        assert_eq!(parse_content_range("10-19/*"), Some((10, 19)));
        assert_eq!(parse_content_range(" 5-5 "), Some((5, 5)));
        for bad in [
            "", "-", "5-", "-5", "9-3", "a-b", "1-2-3", "+1-2", "0x1-2", "bytes=1",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn range_header_is_inclusive() {
        assert_eq!(range_header(0), "0-0");
        assert_eq!(range_header(1), "0-0");
        assert_eq!(range_header(10), "0-9");
    }

    async fn session(dir: &tempfile::TempDir) -> Session {
        Session::create(RepoName::parse("a").unwrap(), dir.path().join("data"))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn chunks_append_and_hash_incrementally() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(&dir).await;
        s.append(Body::from("hello "), Some((0, 5))).await.unwrap();
        s.append(Body::from("world"), None).await.unwrap();
        assert_eq!(s.size, 11);
        assert_eq!(std::fs::read(&s.path).unwrap(), b"hello world");
        assert_eq!(
            digest_of_hash(s.hasher.clone().finalize().as_slice()),
            Digest::of(b"hello world")
        );
    }

    #[tokio::test]
    async fn failed_chunks_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(&dir).await;
        s.append(Body::from("abc"), None).await.unwrap();
        // Out of order: refused before anything is read.
        let err = s.append(Body::from("zzz"), Some((0, 2))).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::RangeInvalid);
        assert_eq!(err.status, StatusCode::RANGE_NOT_SATISFIABLE);
        // A body shorter than its Content-Range: written, then rolled back.
        let err = s.append(Body::from("de"), Some((3, 9))).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::SizeInvalid);
        assert_eq!(s.size, 3);
        assert_eq!(std::fs::read(&s.path).unwrap(), b"abc");
        // A body that fails mid-stream.
        let failing = futures::stream::iter(vec![
            Ok(bytes::Bytes::from_static(b"xyz")),
            Err(std::io::Error::other("client went away")),
        ]);
        let err = s.append(Body::from_stream(failing), None).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BlobUploadInvalid);
        assert_eq!(std::fs::read(&s.path).unwrap(), b"abc");
        // The session goes on as if nothing happened.
        s.append(Body::from("def"), Some((3, 5))).await.unwrap();
        assert_eq!(
            digest_of_hash(s.hasher.clone().finalize().as_slice()),
            Digest::of(b"abcdef")
        );
    }
}
