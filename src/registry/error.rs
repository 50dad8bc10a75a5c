//! What can go wrong talking to a registry, and what kind of failure it is for the caller.
//!
//! [`RegistryError`] has one variant per step (fetching a manifest, checking a blob, copying a
//! blob, pushing a manifest, ...). Each keeps the reference it was working on (as text) and the
//! oci-client error as `#[source]`; none ever holds a credential. Its message ends with a short
//! reason built from the structure of the cause (the registry's error codes, the HTTP status,
//! the transport failure), never from the cause's text.
//!
//! [`RegistryError::kind`] classifies for the API edge. The classification reads only
//! structured facts: the OCI error codes of the registry's JSON envelope, the HTTP status,
//! and the types in the cause chain (connection refused/reset, timeouts, TLS, digest
//! mismatches). It never matches message substrings.
//!
//! | kind | from | retryable |
//! |---|---|---|
//! | `NotFound` | 404/410, `NAME_UNKNOWN`, `MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`, `NOT_FOUND`, no manifest for the platform | no |
//! | `Unauthenticated` | 401/403, `UNAUTHORIZED`, `DENIED`, a refused token request | no (not with the same credentials) |
//! | `Unavailable` | 408/429/5xx (but 501), `TOOMANYREQUESTS`, connection refused/reset/aborted, timeouts, a transfer cut short | **yes**, with backoff |
//! | `InvalidInput` | `NAME_INVALID`/`TAG_INVALID`, an unsupported manifest type or digest algorithm, a copy source that is not a pinned single-platform image, a manifest pushed under another digest than its own | no |
//! | `Unavailable` | `RetriesExhausted`: an `Unavailable` failure that outlasted the retry policy (`retry.rs`) | yes, later |
//! | `Internal` | everything else: the registry broke the protocol or the digest, a blob of the wrong size or digest, local blob file I/O, TLS failures, Kiln's own bugs, a bad docker config file | no |

use std::{error::Error as StdError, fmt, io, path::PathBuf, sync::Arc};

use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};

use crate::model::Digest;

/// The oci-client error behind a failed step. Shared so that [`RegistryError`] is `Clone`
/// (one result can be handed to every caller that joined the same request).
pub type OciCause = Arc<OciDistributionError>;

/// A failed registry operation. See the module doc for [`RegistryError::kind`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read docker config {path}")]
    ReadDockerConfig {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("invalid docker config {path}: {reason}")]
    InvalidDockerConfig { path: PathBuf, reason: String },
    #[error("cannot set up the http client for registry {registry}: {}", describe(source))]
    ClientSetup {
        registry: String,
        #[source]
        source: OciCause,
    },
    #[error("fetching manifest {reference}: {}", describe(source))]
    FetchManifest {
        reference: String,
        #[source]
        source: OciCause,
    },
    #[error("checking whether manifest {reference} exists: {}", describe(source))]
    CheckManifest {
        reference: String,
        #[source]
        source: OciCause,
    },
    #[error("{reference} is not a supported image manifest ({media_type})")]
    UnsupportedManifest { reference: String, media_type: String },
    #[error("invalid manifest {reference}: {reason}")]
    InvalidManifest { reference: String, reason: String },
    #[error(
        "{reference} has no manifest for platform {platform} (available: {})",
        if available.is_empty() { "none".to_owned() } else { available.join(", ") }
    )]
    PlatformNotFound {
        reference: String,
        platform: String,
        available: Vec<String>,
    },
    #[error("{reference} uses digest {digest:?}; only sha256 is supported")]
    UnsupportedDigest { reference: String, digest: String },
    #[error("copy source {reference} is not pinned by digest")]
    SourceNotPinned { reference: String },
    #[error("copy source {reference} is an image index inside an image index")]
    SourceIsIndex { reference: String },
    #[error("copy target {reference} has no tag")]
    TargetNotTagged { reference: String },
    #[error("checking blob {digest} in {reference}: {}", describe(source))]
    CheckBlob {
        reference: String,
        digest: String,
        #[source]
        source: OciCause,
    },
    #[error("copying blob {digest} from {from} to {to}: {}", describe(source))]
    CopyBlob {
        from: String,
        to: String,
        digest: String,
        #[source]
        source: OciCause,
    },
    #[error("pushing manifest {digest} to {reference}: {}", describe(source))]
    PushManifest {
        reference: String,
        digest: Digest,
        #[source]
        source: OciCause,
    },
    #[error("checking {reference} after the push: {}", describe(source))]
    VerifyPush {
        reference: String,
        #[source]
        source: OciCause,
    },
    #[error("{reference} resolves to {actual} after pushing {expected}")]
    DigestMismatch {
        reference: String,
        expected: Digest,
        actual: String,
    },
    #[error("pulling blob {digest} from {reference}: {}", describe(source))]
    PullBlob {
        reference: String,
        digest: Digest,
        #[source]
        source: OciCause,
    },
    #[error("pushing blob {digest} to {reference}: {}", describe(source))]
    PushBlob {
        reference: String,
        digest: Digest,
        #[source]
        source: OciCause,
    },
    #[error("blob {digest} from {reference} has {actual} bytes, expected {expected}")]
    BlobSizeMismatch {
        reference: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {expected} from {reference} has digest {actual}")]
    BlobDigestMismatch {
        reference: String,
        expected: Digest,
        actual: String,
    },
    #[error("local blob {path} is not {digest}: {reason}")]
    LocalBlobMismatch {
        path: PathBuf,
        digest: Digest,
        reason: String,
    },
    #[error("bytes pushed as blob {expected} to {reference} have digest {actual}")]
    BlobBytesMismatch {
        reference: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("cannot read blob file {path}: {source}")]
    ReadBlobFile {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("cannot write blob file {path}: {source}")]
    WriteBlobFile {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("manifest target {reference} names another digest than the manifest's ({actual})")]
    TargetDigestMismatch { reference: String, actual: Digest },
    /// An `Unavailable` failure that persisted through every attempt of the retry policy.
    #[error("{last} (registry {registry} unavailable after {attempts} attempts)")]
    RetriesExhausted {
        registry: String,
        attempts: u32,
        #[source]
        last: Box<RegistryError>,
    },
}

/// What a [`RegistryError`] means for the caller; the API edge maps it to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegistryErrorKind {
    /// The image, repository, blob or platform does not exist.
    NotFound,
    /// The registry refused the credentials, or wanted some and got none.
    Unauthenticated,
    /// The registry is down, overloaded, rate limiting, or the connection failed. Retryable.
    Unavailable,
    /// The caller asked for something Kiln cannot do with this image.
    InvalidInput,
    /// Anything else: a protocol violation, a digest mismatch, a TLS or configuration problem.
    Internal,
}

impl RegistryErrorKind {
    /// Every kind, in declaration order (a kind's index is its discriminant).
    pub const ALL: [Self; 5] = [
        Self::NotFound,
        Self::Unauthenticated,
        Self::Unavailable,
        Self::InvalidInput,
        Self::Internal,
    ];

    /// Only `Unavailable` is worth retrying (with backoff); every other kind gives the same
    /// answer again.
    pub fn is_retryable(self) -> bool {
        self == Self::Unavailable
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Unauthenticated => "unauthenticated",
            Self::Unavailable => "unavailable",
            Self::InvalidInput => "invalid_input",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for RegistryErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RegistryError {
    /// Whether a manifest push was refused because the registry does not (yet) see one of
    /// its blobs in the target repository (`MANIFEST_BLOB_UNKNOWN`, or a bare 400 from a
    /// registry that sends no error body). Pushing the blobs again and then the manifest
    /// can succeed: registries have been seen losing a race between a cross-repository
    /// mount and the manifest that needs it.
    pub fn is_manifest_blob_unknown(&self) -> bool {
        let Self::PushManifest { source, .. } = self else {
            return false;
        };
        match &**source {
            OciDistributionError::RegistryError { envelope, .. } => envelope
                .errors
                .iter()
                .any(|e| e.code == OciErrorCode::ManifestBlobUnknown),
            OciDistributionError::ServerError { code, message, .. } => {
                *code == 400 && (message.is_empty() || message.contains("BLOB_UNKNOWN"))
            }
            _ => false,
        }
    }

    /// The kind of failure, for status codes and retry decisions.
    pub fn kind(&self) -> RegistryErrorKind {
        use RegistryErrorKind as K;
        match self {
            Self::ReadDockerConfig { .. } | Self::InvalidDockerConfig { .. } => K::Internal,
            Self::ClientSetup { .. } => K::Internal,
            Self::FetchManifest { source, .. }
            | Self::CheckManifest { source, .. }
            | Self::CheckBlob { source, .. }
            | Self::CopyBlob { source, .. }
            | Self::PushManifest { source, .. }
            | Self::VerifyPush { source, .. }
            | Self::PullBlob { source, .. }
            | Self::PushBlob { source, .. } => classify(source),
            Self::UnsupportedManifest { .. } => K::InvalidInput,
            Self::InvalidManifest { .. } => K::Internal,
            Self::PlatformNotFound { .. } => K::NotFound,
            Self::UnsupportedDigest { .. } => K::InvalidInput,
            Self::SourceNotPinned { .. } | Self::SourceIsIndex { .. } | Self::TargetNotTagged { .. } => {
                K::InvalidInput
            }
            Self::DigestMismatch { .. } => K::Internal,
            // The registry (or the manifest naming the blob) broke the content address, or
            // Kiln handed over bytes that are not what it said: neither gets better by retrying.
            Self::BlobSizeMismatch { .. }
            | Self::BlobDigestMismatch { .. }
            | Self::LocalBlobMismatch { .. }
            | Self::BlobBytesMismatch { .. } => K::Internal,
            Self::ReadBlobFile { .. } | Self::WriteBlobFile { .. } => K::Internal,
            Self::TargetDigestMismatch { .. } => K::InvalidInput,
            Self::RetriesExhausted { .. } => K::Unavailable,
        }
    }

    /// Shorthand for `kind().is_retryable()`.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Classifies one oci-client error. Every variant is mapped on purpose (the match is
/// exhaustive, so a new oci-client variant will not compile until it is classified here).
pub(crate) fn classify(err: &OciDistributionError) -> RegistryErrorKind {
    use OciDistributionError as E;
    use RegistryErrorKind as K;
    match err {
        E::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .map(|e| kind_of_code(&e.code))
            .find(|k| *k != K::Internal)
            .unwrap_or(K::Internal),
        E::ServerError { code, .. } => kind_of_status(*code),
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => K::Unauthenticated,
        // Only produced by oci-client's own platform resolution (Kiln resolves itself).
        E::ImageManifestNotFoundError(_) => K::NotFound,
        E::RequestError(e) => kind_of_request(
            e.status().map(|s| s.as_u16()),
            e.is_builder() || e.is_redirect(),
            e.is_timeout(),
            e.source(),
        ),
        E::IoError(e) => kind_of_io(e).unwrap_or(K::Internal),
        E::UnsupportedMediaTypeError(_)
        | E::UnsupportedSchemaVersionError(_)
        | E::IncompatibleLayerMediaTypeError(_) => K::InvalidInput,
        E::DigestError(_)
        | E::ConfigConversionError(_)
        | E::GenericError(_)
        | E::HeaderValueError(_)
        | E::ImageIndexParsingNoPlatformResolverError
        | E::JsonError(_)
        | E::ManifestEncodingError(_)
        | E::ManifestParsingError(_)
        | E::PushNoDataError
        | E::PushLayerNoDataError
        | E::PullNoLayersError
        | E::RegistryNoDigestError
        | E::RegistryNoLocationError
        | E::RegistryTokenDecodeError(_)
        | E::SpecViolationError(_)
        | E::UrlParseError(_)
        | E::VersionedParsingError(_) => K::Internal,
    }
}

/// The OCI distribution error codes (spec, "Error Codes").
fn kind_of_code(code: &OciErrorCode) -> RegistryErrorKind {
    use OciErrorCode as C;
    use RegistryErrorKind as K;
    match code {
        C::NameUnknown | C::ManifestUnknown | C::BlobUnknown | C::NotFound => K::NotFound,
        C::Unauthorized | C::Denied => K::Unauthenticated,
        C::Toomanyrequests => K::Unavailable,
        C::NameInvalid | C::TagInvalid => K::InvalidInput,
        // Upload and manifest validation failures mean Kiln sent something wrong.
        C::BlobUploadInvalid
        | C::BlobUploadUnknown
        | C::DigestInvalid
        | C::ManifestBlobUnknown
        | C::ManifestInvalid
        | C::ManifestUnverified
        | C::SizeInvalid
        | C::Unsupported
        | C::Other(_) => K::Internal,
    }
}

fn kind_of_status(status: u16) -> RegistryErrorKind {
    use RegistryErrorKind as K;
    match status {
        404 | 410 => K::NotFound,
        401 | 403 => K::Unauthenticated,
        408 | 429 => K::Unavailable,
        501 => K::Internal,
        500..=599 => K::Unavailable,
        _ => K::Internal,
    }
}

/// A reqwest error, described by its facts (Kiln does not name reqwest's type itself).
fn kind_of_request(
    status: Option<u16>,
    misuse: bool,
    timeout: bool,
    source: Option<&(dyn StdError + 'static)>,
) -> RegistryErrorKind {
    use RegistryErrorKind as K;
    if let Some(status) = status {
        return kind_of_status(status);
    }
    if misuse {
        return K::Internal;
    }
    if timeout {
        return K::Unavailable;
    }
    // A TLS failure or a digest mismatch in the chain is decisive; after that, a connection
    // that could not be made, or a request or body transfer that broke off, is transient.
    source.and_then(kind_of_chain).unwrap_or(K::Unavailable)
}

fn kind_of_io(e: &io::Error) -> Option<RegistryErrorKind> {
    if let Some(inner) = e.get_ref() {
        let inner: &(dyn StdError + 'static) = inner;
        if let Some(kind) = kind_of_chain(inner) {
            return Some(kind);
        }
    }
    use io::ErrorKind as IK;
    match e.kind() {
        IK::ConnectionRefused
        | IK::ConnectionReset
        | IK::ConnectionAborted
        | IK::NotConnected
        | IK::BrokenPipe
        | IK::TimedOut
        | IK::UnexpectedEof
        | IK::Interrupted => Some(RegistryErrorKind::Unavailable),
        _ => None,
    }
}

/// Walks a cause chain and returns the first decisive classification.
fn kind_of_chain(first: &(dyn StdError + 'static)) -> Option<RegistryErrorKind> {
    let mut next = Some(first);
    while let Some(e) = next {
        if let Some(oci) = e.downcast_ref::<OciDistributionError>() {
            return Some(classify(oci));
        }
        if let Some(r) = downcast_via(OciDistributionError::RequestError, e) {
            return Some(kind_of_request(
                r.status().map(|s| s.as_u16()),
                r.is_builder() || r.is_redirect(),
                r.is_timeout(),
                r.source(),
            ));
        }
        if e.is::<DigestError>() || e.is::<rustls::Error>() {
            return Some(RegistryErrorKind::Internal);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(kind) = kind_of_io(io) {
                return Some(kind);
            }
        }
        next = e.source();
    }
    None
}

/// Downcasts to the error type that `constructor` wraps. oci-client's errors carry reqwest's
/// error, but Kiln has no direct reqwest dependency to name that type with; the constructor
/// `OciDistributionError::RequestError` names it for us. (Type-based, not text-based.)
fn downcast_via<'a, T: StdError + 'static>(
    _constructor: fn(T) -> OciDistributionError,
    err: &'a (dyn StdError + 'static),
) -> Option<&'a T> {
    err.downcast_ref::<T>()
}

/// A short reason for a message, built from the structure of the cause. Registry messages
/// are quoted; HTTP bodies and URLs are left out (they are in the `source` for debugging).
pub(crate) fn describe(err: &OciDistributionError) -> String {
    use OciDistributionError as E;
    match err {
        E::RegistryError { envelope, .. } if !envelope.errors.is_empty() => envelope
            .errors
            .iter()
            .map(|e| {
                let code = serde_json::to_value(&e.code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "UNKNOWN".into());
                if e.message.is_empty() {
                    format!("registry answered {code}")
                } else {
                    format!("registry answered {code} ({})", e.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        E::RegistryError { .. } => "registry answered an empty error list".into(),
        E::ServerError { code, message, .. } => {
            // A registry's error body names the reason (e.g. MANIFEST_BLOB_UNKNOWN); keep a
            // short, single-line excerpt of it.
            let excerpt: String = message
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(200)
                .collect();
            match excerpt.is_empty() {
                true => format!("registry answered http {code}"),
                false => format!("registry answered http {code}: {excerpt}"),
            }
        }
        E::UnauthorizedError { .. } => "registry answered http 401 (credentials missing or refused)".into(),
        E::AuthenticationFailure(_) => "the registry's token service refused the credentials".into(),
        E::RequestError(e) => match e.status() {
            Some(status) => format!("registry answered http {}", status.as_u16()),
            None if e.is_timeout() => "the request timed out".into(),
            None if e.is_connect() => format!("cannot connect to the registry ({})", innermost(e)),
            None => format!("the request failed ({})", innermost(e)),
        },
        E::IoError(e) => format!("transfer failed ({})", innermost(e)),
        E::DigestError(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// The last error of a chain: the one that says what actually happened.
fn innermost(e: &(dyn StdError + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    if let Some(io) = last.downcast_ref::<io::Error>() {
        if let Some(inner) = io.get_ref() {
            return inner.to_string();
        }
    }
    last.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegistryErrorKind as K;

    fn envelope(codes: &[&str]) -> OciDistributionError {
        let errors: Vec<_> = codes
            .iter()
            .map(|c| serde_json::json!({ "code": c, "message": format!("{c} message") }))
            .collect();
        OciDistributionError::RegistryError {
            envelope: serde_json::from_value(serde_json::json!({ "errors": errors })).unwrap(),
            url: "http://r.example/v2/x/manifests/y".into(),
        }
    }

    fn server(code: u16) -> OciDistributionError {
        OciDistributionError::ServerError {
            code,
            url: "http://r.example/v2/".into(),
            message: "<html>oops</html>".into(),
        }
    }

    #[test]
    fn a_manifest_refused_for_unknown_blobs_is_recognised() {
        let push = |source| RegistryError::PushManifest {
            reference: "r.example/x:y".into(),
            digest: Digest::of(b"m"),
            source: Arc::new(source),
        };
        assert!(push(envelope(&["MANIFEST_BLOB_UNKNOWN"])).is_manifest_blob_unknown());
        assert!(!push(envelope(&["MANIFEST_INVALID"])).is_manifest_blob_unknown());
        assert!(!push(server(500)).is_manifest_blob_unknown());
        let bare = OciDistributionError::ServerError {
            code: 400,
            url: "http://r.example/v2/x/manifests/y".into(),
            message: r#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#
                .into(),
        };
        let refused = push(bare);
        assert!(refused.is_manifest_blob_unknown());
        assert!(refused.to_string().contains("MANIFEST_BLOB_UNKNOWN"), "{refused}");
    }

    #[test]
    fn oci_error_codes_are_classified() {
        for (code, kind) in [
            ("NAME_UNKNOWN", K::NotFound),
            ("MANIFEST_UNKNOWN", K::NotFound),
            ("BLOB_UNKNOWN", K::NotFound),
            ("NOT_FOUND", K::NotFound),
            ("UNAUTHORIZED", K::Unauthenticated),
            ("DENIED", K::Unauthenticated),
            ("TOOMANYREQUESTS", K::Unavailable),
            ("NAME_INVALID", K::InvalidInput),
            ("TAG_INVALID", K::InvalidInput),
            ("MANIFEST_INVALID", K::Internal),
            ("MANIFEST_BLOB_UNKNOWN", K::Internal),
            ("DIGEST_INVALID", K::Internal),
            ("UNSUPPORTED", K::Internal),
            ("ARTIFACT_LOCKED", K::Internal),
        ] {
            assert_eq!(classify(&envelope(&[code])), kind, "{code}");
        }
        // The first code that says something wins over codes that do not.
        assert_eq!(
            classify(&envelope(&["ARTIFACT_LOCKED", "DENIED"])),
            K::Unauthenticated
        );
        assert_eq!(classify(&envelope(&[])), K::Internal);
    }

    #[test]
    fn http_statuses_are_classified() {
        for (status, kind) in [
            (404, K::NotFound),
            (410, K::NotFound),
            (401, K::Unauthenticated),
            (403, K::Unauthenticated),
            (408, K::Unavailable),
            (429, K::Unavailable),
            (500, K::Unavailable),
            (502, K::Unavailable),
            (503, K::Unavailable),
            (504, K::Unavailable),
            (501, K::Internal),
            (400, K::Internal),
            (405, K::Internal),
            (302, K::Internal),
        ] {
            assert_eq!(classify(&server(status)), kind, "{status}");
        }
    }

    #[test]
    fn auth_failures_are_unauthenticated() {
        let e = OciDistributionError::UnauthorizedError {
            url: "http://r/v2/".into(),
        };
        assert_eq!(classify(&e), K::Unauthenticated);
        let e = OciDistributionError::AuthenticationFailure("{\"details\":\"bad\"}".into());
        assert_eq!(classify(&e), K::Unauthenticated);
    }

    #[test]
    fn io_errors_are_classified_by_kind_and_cause() {
        let io = |kind| OciDistributionError::IoError(io::Error::from(kind));
        assert_eq!(classify(&io(io::ErrorKind::ConnectionRefused)), K::Unavailable);
        assert_eq!(classify(&io(io::ErrorKind::ConnectionReset)), K::Unavailable);
        assert_eq!(classify(&io(io::ErrorKind::TimedOut)), K::Unavailable);
        assert_eq!(classify(&io(io::ErrorKind::UnexpectedEof)), K::Unavailable);
        assert_eq!(classify(&io(io::ErrorKind::PermissionDenied)), K::Internal);

        // A blob stream that failed verification carries a DigestError inside an io::Error.
        let digest = DigestError::VerificationError {
            expected: "sha256:aa".into(),
            actual: "sha256:bb".into(),
        };
        let e = OciDistributionError::IoError(io::Error::other(digest));
        assert_eq!(classify(&e), K::Internal);

        // A TLS failure is not transient.
        let tls = rustls::Error::General("bad certificate".into());
        let e = OciDistributionError::IoError(io::Error::new(io::ErrorKind::InvalidData, tls));
        assert_eq!(classify(&e), K::Internal);

        // An oci-client error carried through a stream keeps its own classification.
        let nested = OciDistributionError::IoError(io::Error::other(server(503)));
        assert_eq!(classify(&nested), K::Unavailable);
    }

    #[test]
    fn manifest_shape_errors() {
        let e = OciDistributionError::UnsupportedMediaTypeError("application/x-helm".into());
        assert_eq!(classify(&e), K::InvalidInput);
        assert_eq!(
            classify(&OciDistributionError::UnsupportedSchemaVersionError(1)),
            K::InvalidInput
        );
        assert_eq!(
            classify(&OciDistributionError::SpecViolationError("x".into())),
            K::Internal
        );
        assert_eq!(
            classify(&OciDistributionError::RegistryNoLocationError),
            K::Internal
        );
        assert_eq!(
            classify(&OciDistributionError::ImageManifestNotFoundError("x".into())),
            K::NotFound
        );
    }

    #[test]
    fn messages_name_the_step_the_reference_and_the_reason() {
        let reference = "127.0.0.1:5000/base/alpine:3".to_owned();
        let e = RegistryError::FetchManifest {
            reference: reference.clone(),
            source: Arc::new(envelope(&["MANIFEST_UNKNOWN"])),
        };
        assert_eq!(e.kind(), K::NotFound);
        assert_eq!(
            e.to_string(),
            "fetching manifest 127.0.0.1:5000/base/alpine:3: registry answered MANIFEST_UNKNOWN \
             (MANIFEST_UNKNOWN message)"
        );
        assert!(e.source().is_some());

        let e = RegistryError::PlatformNotFound {
            reference,
            platform: "linux/s390x".into(),
            available: vec!["linux/amd64".into(), "linux/arm64/v8".into()],
        };
        assert_eq!(e.kind(), K::NotFound);
        assert!(!e.is_retryable());
        let msg = e.to_string();
        assert!(
            msg.contains("linux/s390x") && msg.contains("linux/amd64, linux/arm64/v8"),
            "{msg}"
        );
    }

    #[test]
    fn only_unavailable_is_retryable() {
        assert!(K::Unavailable.is_retryable());
        for k in [K::NotFound, K::Unauthenticated, K::InvalidInput, K::Internal] {
            assert!(!k.is_retryable());
        }
    }
}
