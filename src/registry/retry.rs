//! Retrying registry operations: [`RetryPolicy`] (how many attempts, capped exponential
//! backoff with jitter) and the two ways to use it — [`RetryPolicy::run`], which retries an
//! async operation as a whole, and [`Attempts`], for operations that keep state between
//! attempts (a blob upload resumes where the registry says it stands).
//!
//! Only failures whose [`RegistryError::kind`] is `Unavailable` are retried (and, through
//! [`Attempts::failed_retryable`], an upload that broke off mid-stream); every other kind gives
//! the same answer again and is returned at once. When the budget is spent the error is
//! [`RegistryError::RetriesExhausted`]: `Unavailable`, naming the registry, the number of
//! attempts and the last error. Every retry is logged at debug with the registry, the
//! operation, the attempt and the delay.
//!
//! The delay after the n-th failed attempt is `min(max_backoff, initial_backoff * 2^(n-1))`,
//! shortened by a random fraction of at most `jitter` (so concurrent callers that failed
//! together do not come back together).

use std::{future::Future, time::Duration};

use rand::Rng as _;

use super::RegistryError;

/// How a registry operation is retried. The defaults suit a real registry; tests use short
/// backoffs.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1; 1 means no retries). Default 5.
    pub max_attempts: u32,
    /// The delay after the first failed attempt; it doubles per further failure. Default
    /// 200 ms.
    pub initial_backoff: Duration,
    /// The longest delay between two attempts. Default 10 s.
    pub max_backoff: Duration,
    /// The largest fraction (0 to 1) by which a delay is randomly shortened. 0 makes delays
    /// exact, 1 is "full jitter". Default 0.5.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            jitter: 0.5,
        }
    }
}

impl RetryPolicy {
    /// A policy that tries once and never retries.
    pub fn no_retries() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay before attempt `failed + 1`, after `failed` (≥ 1) failed attempts, before
    /// jitter.
    pub fn backoff(&self, failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(31);
        self.initial_backoff
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }

    /// [`backoff`](Self::backoff) shortened by a random fraction of at most `jitter`.
    fn jittered(&self, failed: u32) -> Duration {
        let delay = self.backoff(failed);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 || delay.is_zero() {
            return delay;
        }
        let cut: f64 = rand::rng().random_range(0.0..jitter);
        delay.mul_f64(1.0 - cut)
    }

    /// The attempts of one operation on `registry`; `what` names it in the logs.
    pub fn attempts<'a>(&'a self, registry: &'a str, what: &'a str) -> Attempts<'a> {
        Attempts {
            policy: self,
            registry,
            what,
            failed: 0,
        }
    }

    /// Runs `op` until it succeeds, fails with an error that is not `Unavailable`, or the
    /// budget is spent (then the error is [`RegistryError::RetriesExhausted`]).
    pub async fn run<T, F, Fut>(&self, registry: &str, what: &str, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let mut attempts = self.attempts(registry, what);
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(error) => attempts.failed(error).await?,
            }
        }
    }
}

/// The attempts of one operation under a [`RetryPolicy`]. After each failed attempt call
/// [`failed`](Self::failed): it either waits out the backoff (`Ok`: try again) or hands back
/// the error to return (`Err`).
#[derive(Debug)]
pub struct Attempts<'a> {
    policy: &'a RetryPolicy,
    registry: &'a str,
    what: &'a str,
    failed: u32,
}

impl Attempts<'_> {
    /// How many attempts have failed so far.
    pub fn failures(&self) -> u32 {
        self.failed
    }

    /// Records a failed attempt. Retries (after the backoff) only `Unavailable` errors.
    pub async fn failed(&mut self, error: RegistryError) -> Result<(), RegistryError> {
        let retryable = error.is_retryable();
        self.failed_retryable(error, retryable).await
    }

    /// Records a failed attempt whose retryability the caller decided (an upload that broke
    /// off mid-stream may be worth resuming whatever the error's kind).
    pub async fn failed_retryable(
        &mut self,
        error: RegistryError,
        retryable: bool,
    ) -> Result<(), RegistryError> {
        self.failed += 1;
        super::stats::failed(error.kind());
        if !retryable {
            return Err(error);
        }
        let max = self.policy.max_attempts.max(1);
        if self.failed >= max {
            tracing::debug!(registry = self.registry, operation = self.what, attempts = self.failed,
                error = %error, "registry retry budget spent");
            return Err(RegistryError::RetriesExhausted {
                registry: self.registry.to_owned(),
                attempts: self.failed,
                last: Box::new(error),
            });
        }
        let delay = self.policy.jittered(self.failed);
        tracing::debug!(
            registry = self.registry,
            operation = self.what,
            attempt = self.failed + 1,
            max_attempts = max,
            delay_ms = delay.as_millis() as u64,
            error = %error,
            "registry operation failed; retrying"
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    };

    use oci_client::errors::OciDistributionError;
    use tokio::time::Instant;

    use super::*;
    use crate::registry::RegistryErrorKind;

    fn http_error(code: u16) -> RegistryError {
        RegistryError::FetchManifest {
            reference: "127.0.0.1:5000/a/b:1".into(),
            source: Arc::new(OciDistributionError::ServerError {
                code,
                url: "http://127.0.0.1:5000/v2/a/b/manifests/1".into(),
                message: String::new(),
            }),
        }
    }

    fn exact(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            jitter: 0.0,
        }
    }

    /// An operation that fails with `errors` in turn, then succeeds; counts its calls.
    fn flaky(
        errors: Vec<RegistryError>,
    ) -> (
        Arc<AtomicU32>,
        impl FnMut() -> std::future::Ready<Result<u32, RegistryError>>,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let op = move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            std::future::ready(match errors.get(n as usize) {
                Some(e) => Err(e.clone()),
                None => Ok(n + 1),
            })
        };
        (calls, op)
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = exact(10);
        let delays: Vec<u128> = (1..=5).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350, 350]);
        // No overflow however many failures.
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(350));
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_errors_are_retried_until_success() {
        let p = exact(5);
        let (calls, op) = flaky(vec![http_error(503), http_error(429)]);
        let start = Instant::now();
        let value = p.run("127.0.0.1:5000", "fetch", op).await.unwrap();
        assert_eq!(value, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Virtual time: 100 ms after the first failure, 200 ms after the second.
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn other_kinds_are_returned_at_once() {
        let p = exact(5);
        for (code, kind) in [
            (404, RegistryErrorKind::NotFound),
            (401, RegistryErrorKind::Unauthenticated),
            (400, RegistryErrorKind::Internal),
        ] {
            let (calls, op) = flaky(vec![http_error(code)]);
            let start = Instant::now();
            let err = p.run("r", "fetch", op).await.unwrap_err();
            assert_eq!(err.kind(), kind, "{code}");
            assert!(matches!(err, RegistryError::FetchManifest { .. }), "{err:?}");
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{code}");
            assert_eq!(start.elapsed(), Duration::ZERO, "{code}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_is_unavailable_and_names_registry_and_last_error() {
        let p = exact(4);
        let (calls, op) = flaky(vec![
            http_error(500),
            http_error(502),
            http_error(503),
            http_error(504),
            http_error(500),
        ]);
        let start = Instant::now();
        let err = p.run("127.0.0.1:5000", "fetch", op).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(err.kind(), RegistryErrorKind::Unavailable);
        assert!(err.is_retryable());
        match &err {
            RegistryError::RetriesExhausted {
                registry,
                attempts,
                last,
            } => {
                assert_eq!(registry, "127.0.0.1:5000");
                assert_eq!(*attempts, 4);
                assert_eq!(last.to_string(), http_error(504).to_string());
            }
            other => panic!("{other:?}"),
        }
        // The step and the last error first, then the registry and the budget.
        assert_eq!(
            err.to_string(),
            format!(
                "{} (registry 127.0.0.1:5000 unavailable after 4 attempts)",
                http_error(504)
            )
        );
        // 100 + 200 + 350 (capped): three waits for four attempts.
        assert_eq!(start.elapsed(), Duration::from_millis(650));
    }

    #[tokio::test(start_paused = true)]
    async fn one_attempt_means_no_retry_but_still_says_unavailable() {
        let p = RetryPolicy::no_retries();
        let (calls, op) = flaky(vec![http_error(503)]);
        let err = p.run("r.example", "fetch", op).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(
            matches!(err, RegistryError::RetriesExhausted { attempts: 1, .. }),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_only_shortens_delays_within_its_fraction() {
        let p = RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(1000),
            max_backoff: Duration::from_secs(5),
            jitter: 0.5,
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut attempts = p.attempts("r", "fetch");
            let start = Instant::now();
            attempts.failed(http_error(503)).await.unwrap();
            let waited = start.elapsed();
            assert!(
                waited >= Duration::from_millis(500) && waited <= Duration::from_millis(1000),
                "{waited:?}"
            );
            seen.insert(waited);
            assert_eq!(attempts.failures(), 1);
        }
        assert!(seen.len() > 1, "jitter never varied the delay");
    }

    #[tokio::test(start_paused = true)]
    async fn callers_may_retry_errors_of_other_kinds() {
        let p = exact(3);
        let mut attempts = p.attempts("r", "upload");
        attempts.failed_retryable(http_error(400), true).await.unwrap();
        let err = attempts
            .failed_retryable(http_error(400), false)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RegistryErrorKind::Internal);
    }
}
