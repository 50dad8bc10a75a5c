//! Oversized requests answer `ResourceExhausted`, as gRPC specifies, instead of tonic's
//! `OutOfRange`: tonic rejects a message above `grpc.max_message_bytes` while decoding it,
//! before any handler runs, so the status can only be corrected on the way out.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::HeaderValue;

/// What tonic says when a decoded message exceeds the configured limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

#[derive(Clone, Copy, Default)]
pub struct MessageLimitLayer;

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageLimit { inner }
    }
}

#[derive(Clone)]
pub struct MessageLimit<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for MessageLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut response = fut.await?;
            let headers = response.headers_mut();
            let out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
            let too_large = headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .is_some_and(|m| percent_decode(m).starts_with(TOO_LARGE));
            if out_of_range && too_large {
                headers.insert("grpc-status", HeaderValue::from_static("8"));
            }
            Ok(response)
        })
    }
}

/// gRPC percent-encodes `grpc-message`; spaces and commas are enough to compare the prefix.
fn percent_decode(s: &str) -> String {
    s.replace("%20", " ").replace("%2C", ",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_messages_are_compared_decoded() {
        assert!(percent_decode("Error%2C%20decoded%20message%20length%20too%20large").starts_with(TOO_LARGE));
    }
}
