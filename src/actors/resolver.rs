//! The resolver pool: image tag → digest, through the registry, each resolver with a cache
//! shard of its own and a bound on the registry calls it makes at once.
//!
//! There are `resolver.pool_size` resolvers. A reference always goes to the same one, chosen
//! by a hash of the reference ([`shard_of`], used by [`super::handles::ResolverPool`]), so
//! each resolver's moka cache is its own field and holds its shard of the references
//! (`resolver.cache_capacity` split evenly). Nothing is shared between resolvers or between
//! incarnations: a restarted resolver starts with an empty shard and refills it on the next
//! misses (a cache is derived state; the registry is the truth).
//!
//! **Bound.** A resolver makes at most `resolver.max_in_flight` registry calls at once (a
//! semaphore field); further misses wait in the resolver, in arrival order. The pool as a
//! whole therefore never has more than `pool_size × max_in_flight` resolve calls at the
//! registry. Each lookup runs as a task the resolver owns ([`OwnedTasks`]): when the resolver
//! dies, its lookups die with it (callers get `Closed`, their `Slot` sends again to the next
//! incarnation), so no orphaned lookup of an old incarnation keeps a registry call going
//! beside the new one's.
//!
//! **Demand.** Each resolver counts the tags callers ask it for (its own field, lost with
//! the incarnation like the cache), so the cache warmer can keep warm what is used most
//! ([`MostRequested`]); the counts are halved whenever the map grows past
//! [`MAX_COUNTED`], so old favourites fade.
//!
//! **Coalescing.** The cache coalesces concurrent misses: N callers asking for one uncached
//! reference make one registry call (moka's `try_get_with`), and take one permit. Entries are
//! keyed by the reference *and* by which credentials the registry client would use for the
//! request (`RegistryClient::credentials_fingerprint`, decided by the code that picks them),
//! so a digest learned with one caller's credentials is never served to a caller without them.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use actix::prelude::*;
use futures::FutureExt as _;
use moka::future::Cache;
use tokio::sync::Semaphore;

use super::{
    supervision::{ChildGuard, Crash, INJECTED_CRASH},
    tasks::{Later, OwnedTasks, TaskPanicked},
};
use crate::{
    metrics::{Metrics, ResolveResult},
    model::{AuthPolicy, ImageRef},
    registry::{RegistryClient, RegistryError},
};

/// Resolves `image` to its digest form. `refresh` skips the cache (the cache warmer).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<ImageRef, Arc<RegistryError>>")]
pub struct Resolve {
    pub image: ImageRef,
    pub auth: AuthPolicy,
    pub refresh: bool,
}

/// The tags this resolver was asked for most since it last answered this, at most `limit`,
/// most requested first; the counts start again.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Vec<(ImageRef, u64)>")]
pub struct MostRequested {
    pub limit: usize,
}

/// The most references a resolver counts before halving the counts.
const MAX_COUNTED: usize = 4096;

/// The resolver (of `pool_size`) that owns `image`'s cache entries: a stable hash of the
/// reference, so every request for one reference meets the same cache and the same
/// in-flight lookup.
pub fn shard_of(image: &ImageRef, pool_size: usize) -> usize {
    // `DefaultHasher::new()` has fixed keys: the same reference maps to the same resolver
    // for the life of the process (which is all a cache shard needs).
    let mut h = DefaultHasher::new();
    image.to_string().hash(&mut h);
    (h.finish() % pool_size.max(1) as u64) as usize
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    image: String,
    /// Which credentials the request could use for the image's registry.
    credentials: [u8; 32],
}

/// What every incarnation of every resolver is made from: configuration only, no state.
#[derive(Clone)]
pub struct ResolverSettings {
    pub client: RegistryClient,
    /// Entries in one resolver's shard.
    pub shard_capacity: u64,
    /// `resolver.cache_ttl`.
    pub ttl: Duration,
    /// `resolver.max_in_flight`: registry calls one resolver makes at once.
    pub max_in_flight: usize,
    /// `actors.mailbox_size`.
    pub mailbox_size: usize,
    pub metrics: Metrics,
}

impl ResolverSettings {
    /// The shard capacity for a pool of `pool_size` sharing `cache_capacity` entries.
    pub fn shard_capacity(cache_capacity: u64, pool_size: usize) -> u64 {
        cache_capacity.div_ceil(pool_size.max(1) as u64).max(1)
    }

    /// The cache key of `image` under `auth`: the reference and which credentials the
    /// registry client would use for it (decided by the client itself, so the key and the
    /// lookup never disagree about scope).
    fn cache_key(&self, image: &ImageRef, auth: &AuthPolicy) -> CacheKey {
        CacheKey {
            image: image.to_string(),
            credentials: self.client.credentials_fingerprint(image, auth),
        }
    }
}

/// One resolver of the pool: its cache shard and its registry-call permits.
pub struct Resolver {
    settings: ResolverSettings,
    /// This resolver's shard of the cache. A moka handle is cheap to clone; the clones go
    /// only into this resolver's own lookups, which die with it.
    cache: Cache<CacheKey, ImageRef>,
    /// `max_in_flight` permits; a registry call holds one. Waiters queue in FIFO order.
    calls: Arc<Semaphore>,
    /// The lookups in progress.
    lookups: OwnedTasks,
    /// How often callers asked for each tag (see the module doc).
    requested: std::collections::HashMap<ImageRef, u64>,
    _guard: ChildGuard,
}

impl Resolver {
    /// A new incarnation: an empty shard, all permits free.
    pub fn new(settings: ResolverSettings, guard: ChildGuard) -> Self {
        let cache = Cache::builder()
            .max_capacity(settings.shard_capacity)
            .time_to_live(settings.ttl)
            .build();
        let calls = Arc::new(Semaphore::new(settings.max_in_flight.max(1)));
        Self {
            settings,
            cache,
            calls,
            lookups: OwnedTasks::default(),
            requested: std::collections::HashMap::new(),
            _guard: guard,
        }
    }

    /// Counts a caller's request for `image` (tags only: a digest never needs warming).
    fn count(&mut self, image: &ImageRef) {
        if image.digest().is_some() {
            return;
        }
        if let Some(n) = self.requested.get_mut(image) {
            *n += 1;
            return;
        }
        if self.requested.len() >= MAX_COUNTED {
            self.requested.retain(|_, n| {
                *n /= 2;
                *n > 0
            });
        }
        self.requested.insert(image.clone(), 1);
    }

    /// The lookup for one request, to run as a task of this resolver.
    fn lookup(
        &self,
        key: CacheKey,
        image: ImageRef,
        auth: AuthPolicy,
        refresh: bool,
    ) -> impl std::future::Future<Output = Result<ImageRef, Arc<RegistryError>>> + 'static {
        let cache = self.cache.clone();
        let calls = self.calls.clone();
        let client = self.settings.client.clone();
        let metrics = self.settings.metrics.clone();
        async move {
            if refresh {
                cache.invalidate(&key).await;
            } else if let Some(hit) = cache.get(&key).await {
                metrics.resolved(ResolveResult::Hit);
                return Ok(hit);
            }
            let asked_registry = AtomicBool::new(false);
            let result = cache
                .try_get_with(key, async {
                    // The semaphore is never closed, so acquiring only waits.
                    let _permit = calls
                        .acquire()
                        .await
                        .expect("the resolver's semaphore is never closed");
                    asked_registry.store(true, Ordering::Relaxed);
                    client.resolve(&image, &auth).await
                })
                .await;
            let counted = match (&result, asked_registry.load(Ordering::Relaxed)) {
                (Err(_), _) => ResolveResult::Error,
                (Ok(_), true) => ResolveResult::Miss,
                // Joined another caller's in-flight lookup: no registry call of its own.
                (Ok(_), false) => ResolveResult::Hit,
            };
            metrics.resolved(counted);
            result
        }
    }
}

impl Actor for Resolver {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_size);
    }
}

impl Handler<Resolve> for Resolver {
    type Result = Later<Result<ImageRef, Arc<RegistryError>>>;

    /// Runs the lookup as a task of this incarnation: it waits for a permit when
    /// `max_in_flight` registry calls are out, and is aborted with the resolver (freeing its
    /// permit; the caller's slot asks the next incarnation).
    fn handle(&mut self, msg: Resolve, ctx: &mut Self::Context) -> Self::Result {
        let key = self.settings.cache_key(&msg.image, &msg.auth);
        if !msg.refresh {
            self.count(&msg.image);
            // A hit is answered here: moka's `get` completes at once unless its housekeeping
            // has to wait, and then the task below asks again.
            if let Some(Some(hit)) = self.cache.get(&key).now_or_never() {
                self.settings.metrics.resolved(ResolveResult::Hit);
                return Later::now(Ok(hit));
            }
        }
        let lookup = self.lookup(key, msg.image, msg.auth, msg.refresh);
        self.lookups.reply_later(ctx, lookup)
    }
}

/// How many resolved references this resolver's cache shard holds.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "u64")]
pub struct CacheEntries;

impl Handler<CacheEntries> for Resolver {
    type Result = u64;

    fn handle(&mut self, _: CacheEntries, _: &mut Self::Context) -> u64 {
        self.cache.entry_count()
    }
}

impl Handler<MostRequested> for Resolver {
    type Result = MessageResult<MostRequested>;

    fn handle(&mut self, MostRequested { limit }: MostRequested, _: &mut Self::Context) -> Self::Result {
        let mut counted: Vec<(ImageRef, u64)> = self.requested.drain().collect();
        counted.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        counted.truncate(limit);
        MessageResult(counted)
    }
}

impl Handler<TaskPanicked> for Resolver {
    type Result = ();

    fn handle(&mut self, panicked: TaskPanicked, _: &mut Self::Context) {
        panicked.resume()
    }
}

impl Handler<Crash> for Resolver {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        std::panic::panic_any(INJECTED_CRASH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_always_goes_to_one_resolver_and_references_spread() {
        let refs: Vec<ImageRef> = (0..200)
            .map(|i| format!("registry.example.com/team/app{i}:1").parse().unwrap())
            .collect();
        for image in &refs {
            let shard = shard_of(image, 4);
            assert!(shard < 4);
            assert_eq!(shard_of(image, 4), shard);
            assert_eq!(shard_of(image, 1), 0);
        }
        let mut counts = [0usize; 4];
        for image in &refs {
            counts[shard_of(image, 4)] += 1;
        }
        assert!(counts.iter().all(|c| *c >= 20), "uneven shards: {counts:?}");
    }

    #[test]
    fn the_cache_capacity_is_split_between_the_shards() {
        assert_eq!(ResolverSettings::shard_capacity(10_000, 2), 5_000);
        assert_eq!(ResolverSettings::shard_capacity(10, 3), 4);
        assert_eq!(ResolverSettings::shard_capacity(1, 8), 1);
    }
}
