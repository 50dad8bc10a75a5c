//! The resolver pool: image tag → digest, through the registry, behind one moka cache.
//!
//! Every resolver in the pool shares one [`ResolverShared`] (the registry client and the
//! cache), which survives restarts, so a crashed resolver loses no cached entry. The cache
//! coalesces concurrent misses: N callers asking for one uncached reference make one
//! registry call. Entries are keyed by the reference *and* by which credentials the request
//! may use, so a digest learned with one caller's credentials is never served to a caller
//! without them.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use actix::prelude::*;
use moka::future::Cache;
use sha2::{Digest as _, Sha256};

use super::supervision::{ChildGuard, Crash, INJECTED_CRASH};
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    image: String,
    /// Which credentials the request could use for the image's registry.
    credentials: [u8; 32],
}

/// What every resolver of the pool shares; outlives any one resolver.
pub struct ResolverShared {
    client: RegistryClient,
    cache: Cache<CacheKey, ImageRef>,
    base_repository: ImageRef,
    workspace_repository: ImageRef,
    metrics: Metrics,
}

impl ResolverShared {
    pub fn new(
        client: RegistryClient,
        capacity: u64,
        ttl: Duration,
        base_repository: ImageRef,
        workspace_repository: ImageRef,
        metrics: Metrics,
    ) -> Arc<Self> {
        let cache = Cache::builder().max_capacity(capacity).time_to_live(ttl).build();
        Arc::new(Self {
            client,
            cache,
            base_repository,
            workspace_repository,
            metrics,
        })
    }

    fn in_repository(image: &ImageRef, repo: &ImageRef) -> bool {
        image.registry() == repo.registry() && image.repository() == repo.repository()
    }

    /// A fingerprint of the credentials `auth` allows for `image` (never the secret itself).
    fn cache_key(&self, image: &ImageRef, auth: &AuthPolicy) -> CacheKey {
        let mut h = Sha256::new();
        let additional = auth
            .additional
            .get(image.registry())
            .or_else(|| auth.additional.get(image.host()));
        if let Some(creds) = additional {
            h.update(b"additional\0");
            h.update(creds.username.as_bytes());
            h.update(b"\0");
            h.update(creds.password.expose().as_bytes());
        }
        let installation = auth.allows_installation_credentials(
            image.host(),
            Self::in_repository(image, &self.base_repository),
            Self::in_repository(image, &self.workspace_repository),
        );
        h.update(if installation {
            &b"installation"[..]
        } else {
            &b"anonymous"[..]
        });
        CacheKey {
            image: image.to_string(),
            credentials: h.finalize().into(),
        }
    }

    async fn resolve(
        &self,
        image: ImageRef,
        auth: AuthPolicy,
        refresh: bool,
    ) -> Result<ImageRef, Arc<RegistryError>> {
        let key = self.cache_key(&image, &auth);
        if refresh {
            self.cache.invalidate(&key).await;
        } else if let Some(hit) = self.cache.get(&key).await {
            self.metrics.resolved(ResolveResult::Hit);
            return Ok(hit);
        }
        let asked_registry = AtomicBool::new(false);
        let result = self
            .cache
            .try_get_with(key, async {
                asked_registry.store(true, Ordering::Relaxed);
                self.client.resolve(&image, &auth).await
            })
            .await;
        let counted = match (&result, asked_registry.load(Ordering::Relaxed)) {
            (Err(_), _) => ResolveResult::Error,
            (Ok(_), true) => ResolveResult::Miss,
            // Joined another caller's in-flight lookup: no registry call of its own.
            (Ok(_), false) => ResolveResult::Hit,
        };
        self.metrics.resolved(counted);
        result
    }
}

/// One resolver of the pool.
pub struct Resolver {
    shared: Arc<ResolverShared>,
    mailbox_size: usize,
    _guard: ChildGuard,
}

impl Resolver {
    pub fn new(shared: Arc<ResolverShared>, mailbox_size: usize, guard: ChildGuard) -> Self {
        Self {
            shared,
            mailbox_size,
            _guard: guard,
        }
    }
}

impl Actor for Resolver {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_size);
    }
}

impl Handler<Resolve> for Resolver {
    type Result = ResponseFuture<Result<ImageRef, Arc<RegistryError>>>;

    fn handle(&mut self, msg: Resolve, _: &mut Self::Context) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move { shared.resolve(msg.image, msg.auth, msg.refresh).await })
    }
}

impl Handler<Crash> for Resolver {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        std::panic::panic_any(INJECTED_CRASH);
    }
}
