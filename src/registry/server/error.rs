//! The registry's error vocabulary: the distribution-spec error codes, the HTTP status each
//! one answers with, and the JSON envelope (`{"errors":[{"code","message","detail"}]}`)
//! every failed request gets.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

/// An error code from the OCI distribution spec (plus the few that docker's distribution adds
/// and clients understand: `RANGE_INVALID`, `PAGINATION_NUMBER_INVALID`, `UNKNOWN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unsupported,
    /// A `Content-Range` (upload) or `Range` (blob read) that cannot be honoured.
    RangeInvalid,
    PaginationNumberInvalid,
    /// The request needs (other) credentials: a write without Kiln's, or a pull when
    /// anonymous pulls are off.
    Unauthorized,
    /// A server-side failure (I/O); the message says no more than that.
    Unknown,
}

impl ErrorCode {
    /// The spelling on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Self::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Self::ManifestInvalid => "MANIFEST_INVALID",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameInvalid => "NAME_INVALID",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::SizeInvalid => "SIZE_INVALID",
            Self::Unsupported => "UNSUPPORTED",
            Self::RangeInvalid => "RANGE_INVALID",
            Self::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Unknown => "UNKNOWN",
        }
    }

    /// The status a response with this code has unless the caller says otherwise: 404 for
    /// things that do not exist, 400 for malformed input, 416 for ranges.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BlobUnknown | Self::BlobUploadUnknown | Self::ManifestUnknown | Self::NameUnknown => {
                StatusCode::NOT_FOUND
            }
            Self::BlobUploadInvalid
            | Self::DigestInvalid
            | Self::ManifestBlobUnknown
            | Self::ManifestInvalid
            | Self::NameInvalid
            | Self::SizeInvalid
            | Self::PaginationNumberInvalid => StatusCode::BAD_REQUEST,
            Self::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            Self::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One failed request: a code, a human message, optional structured detail, and the status.
#[derive(Debug, Clone)]
pub struct ErrorResponse {
    pub code: ErrorCode,
    pub status: StatusCode,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    /// Extra headers (e.g. `Content-Range: bytes */size` on a 416).
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

pub type Result<T, E = ErrorResponse> = std::result::Result<T, E>;

impl ErrorResponse {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status: code.status(),
            message: message.into(),
            detail: None,
            headers: Vec::new(),
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// A server-side I/O failure: logged in full, reported as `UNKNOWN`/500 without the detail.
    pub fn internal(context: &str, err: std::io::Error) -> Self {
        tracing::error!(error = %err, "registry storage failure: {context}");
        Self::new(ErrorCode::Unknown, format!("internal storage error: {context}"))
    }

    /// The JSON envelope of this error.
    pub fn envelope(&self) -> serde_json::Value {
        let mut entry = serde_json::json!({
            "code": self.code.as_str(),
            "message": self.message,
        });
        if let Some(detail) = &self.detail {
            entry["detail"] = detail.clone();
        }
        serde_json::json!({ "errors": [entry] })
    }
}

impl std::fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code.as_str(), self.status, self.message)
    }
}

impl std::error::Error for ErrorResponse {}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let body = self.envelope().to_string();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_spec() {
        use ErrorCode::*;
        for code in [BlobUnknown, BlobUploadUnknown, ManifestUnknown, NameUnknown] {
            assert_eq!(code.status(), StatusCode::NOT_FOUND, "{code:?}");
        }
        for code in [
            BlobUploadInvalid,
            DigestInvalid,
            ManifestBlobUnknown,
            ManifestInvalid,
            NameInvalid,
            SizeInvalid,
        ] {
            assert_eq!(code.status(), StatusCode::BAD_REQUEST, "{code:?}");
        }
        assert_eq!(RangeInvalid.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(Unknown.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn envelope_has_code_message_and_optional_detail() {
        let plain = ErrorResponse::new(ErrorCode::BlobUnknown, "blob unknown to registry");
        assert_eq!(
            plain.envelope(),
            serde_json::json!({"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]})
        );
        let detailed = ErrorResponse::new(ErrorCode::ManifestBlobUnknown, "missing")
            .with_detail(serde_json::json!({"digest": "sha256:00"}));
        assert_eq!(
            detailed.envelope()["errors"][0]["detail"]["digest"],
            serde_json::json!("sha256:00")
        );
        assert_eq!(detailed.envelope()["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
    }

    #[tokio::test]
    async fn response_carries_status_type_headers_and_body() {
        let err = ErrorResponse::new(ErrorCode::ManifestInvalid, "too big")
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
            .with_header(header::CONTENT_RANGE, HeaderValue::from_static("bytes */3"));
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(response.headers()[header::CONTENT_RANGE], "bytes */3");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["errors"][0]["code"], "MANIFEST_INVALID");
        assert_eq!(json["errors"][0]["message"], "too big");
    }
}
