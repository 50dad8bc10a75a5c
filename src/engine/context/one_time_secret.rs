//! Gitpod's `BASIC_AUTH_OTS`: a git remote's password waits at a one-time URL (the server's
//! one-time secret service) instead of travelling in the request. Redeemed as Gitpod's
//! content-service redeems it (`initializer.go`, `downloadOTS`): a GET, retried up to 20
//! times a second apart while the answer is not `200`; a body with a `:` is
//! `user:password`, else the password.
//!
//! The URL comes from the caller, so the fetch is bounded: `http` or `https` only, no
//! redirects, at most [`MAX_SECRET_BYTES`], [`ATTEMPT_TIMEOUT`] per attempt. Messages name
//! the URL's host, never its path (which is the secret's name) or what it answered.

use std::time::Duration;

use super::ContextError;
use crate::model::{GitCredentials, GitSource, Secret};

/// Tries, as Gitpod's content-service makes them.
const ATTEMPTS: u32 = 20;
const BETWEEN_ATTEMPTS: Duration = Duration::from_secs(1);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A password is short; anything longer is not one.
const MAX_SECRET_BYTES: usize = 16 << 10;

/// Replaces `source`'s one-time secret, if it has one, by the basic credentials it holds.
/// A one-time secret can be read once: call this once per request.
pub async fn redeem_one_time_secret(source: &mut GitSource) -> Result<(), ContextError> {
    let Some(GitCredentials::OneTimeSecret { user, url }) = &source.credentials else {
        return Ok(());
    };
    let (user, password) = fetch(url.expose(), user).await?;
    source.credentials = Some(GitCredentials::Basic { user, password });
    Ok(())
}

async fn fetch(url: &str, user: &str) -> Result<(String, Secret), ContextError> {
    let parsed = reqwest::Url::parse(url.trim()).map_err(|_| ContextError::OneTimeSecret {
        at: "auth_ots".into(),
        reason: "not a URL".into(),
    })?;
    let at = parsed.host_str().unwrap_or("?").to_owned();
    let fail = |reason: String| ContextError::OneTimeSecret {
        at: at.clone(),
        reason,
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(fail("only http and https URLs are fetched".into()));
    }
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(ATTEMPT_TIMEOUT)
        .build()
        .map_err(|e| fail(format!("cannot set up the HTTP client: {e}")))?;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(BETWEEN_ATTEMPTS).await;
        }
        match attempt_fetch(&client, parsed.clone()).await {
            Ok(body) => return Ok(split(&body, user)),
            Err(Attempt::Final(reason)) => return Err(fail(reason)),
            Err(Attempt::Retry(reason)) => last = reason,
        }
    }
    Err(fail(format!("{last} (after {ATTEMPTS} attempts)")))
}

enum Attempt {
    Retry(String),
    Final(String),
}

async fn attempt_fetch(client: &reqwest::Client, url: reqwest::Url) -> Result<String, Attempt> {
    // The error's text would name the URL: only its kind is kept.
    let mut response = client.get(url).send().await.map_err(|e| {
        Attempt::Retry(
            if e.is_timeout() {
                "timed out"
            } else {
                "could not connect"
            }
            .into(),
        )
    })?;
    if !response.status().is_success() {
        return Err(Attempt::Retry(format!("answered {}", response.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|_| Attempt::Retry("the answer was cut short".into()))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_SECRET_BYTES {
            return Err(Attempt::Final(format!(
                "the answer is larger than {MAX_SECRET_BYTES} bytes"
            )));
        }
    }
    String::from_utf8(body).map_err(|_| Attempt::Final("the answer is not text".into()))
}

/// `user:password`, or the password of `user`.
fn split(body: &str, user: &str) -> (String, Secret) {
    let body = body.trim_end_matches(['\r', '\n']);
    match body.split_once(':') {
        Some((user, password)) => (user.to_owned(), Secret::new(password)),
        None => (user.to_owned(), Secret::new(body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_with_a_colon_names_the_user() {
        let (user, password) = split("oauth2:tok-123\n", "gitpod");
        assert_eq!((user.as_str(), password.expose()), ("oauth2", "tok-123"));
        let (user, password) = split("tok-456", "gitpod");
        assert_eq!((user.as_str(), password.expose()), ("gitpod", "tok-456"));
    }

    #[tokio::test]
    async fn only_http_urls_are_fetched_and_messages_keep_the_path_out() {
        for url in ["file:///etc/shadow", "ftp://h/secret-name", "not a url"] {
            let err = fetch(url, "u").await.unwrap_err().to_string();
            assert!(!err.contains("secret-name") && !err.contains("shadow"), "{err}");
        }
    }
}
