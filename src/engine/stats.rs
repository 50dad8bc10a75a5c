//! Process-wide counts of the engine's work that the service's metrics report: Dockerfile
//! steps answered from the instruction cache and steps run.
//!
//! Process state, like the registry's traffic counters: the engine counts without knowing
//! the metrics above it, and `metrics` reads [`step_cache`] at every scrape.

use std::sync::atomic::{AtomicU64, Ordering};

static STEP_CACHE_HITS: AtomicU64 = AtomicU64::new(0);
static STEP_CACHE_MISSES: AtomicU64 = AtomicU64::new(0);

/// A cacheable step (RUN, COPY, ADD, WORKDIR) was answered from the cache (`hit`) or run.
pub fn step_cached(hit: bool) {
    let counter = if hit { &STEP_CACHE_HITS } else { &STEP_CACHE_MISSES };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Cacheable steps so far: (answered from the cache, run).
pub fn step_cache() -> (u64, u64) {
    (
        STEP_CACHE_HITS.load(Ordering::Relaxed),
        STEP_CACHE_MISSES.load(Ordering::Relaxed),
    )
}
