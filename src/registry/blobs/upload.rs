//! The resumable upload session every upload goes through
//! ([`RegistryClient::upload_blob`], from any [`UploadSource`]).
//!
//! # Uploads, retries and resumption
//! Every upload (a file, bytes in memory, or a blob streamed from another registry) goes
//! through one resumable upload session, spoken over HTTP by hand because oci-client cannot
//! resume: `POST` opens the session, the bytes go in `PATCH` requests of at most
//! [`UPLOAD_CHUNK_BYTES`](crate::registry::UPLOAD_CHUNK_BYTES) (`Content-Range`), and `PUT ?digest=`
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
//! starts from zero. Attempts follow the client's [`RetryPolicy`](crate::registry::RetryPolicy).
//!

use std::sync::{Arc, Mutex};

use oci_client::{
    errors::{OciDistributionError, OciEnvelope},
    secrets::RegistryAuth,
    RegistryOperation,
};
use reqwest::{header, StatusCode, Url};
use sha2::{Digest as _, Sha256};

use super::{
    feed::{digest_of, finish_feed, lock, ChunkBody, Feed, FeedEnd},
    has_blob,
    sources::{Mismatch, UploadSource},
};
use crate::{
    model::{Digest, ImageRef},
    registry::{client::Oci, error::describe, RegistryClient, RegistryError},
};

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
    pub(crate) async fn upload_blob(
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
        crate::registry::stats::pushed(self.repo.registry(), len);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
