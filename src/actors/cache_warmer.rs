//! The cache warmer: on an interval, re-resolves the configured references so that builds
//! that use them find a fresh digest in the resolver cache, and pre-fetches their layers
//! into the engine's layer store so the first build on them pulls nothing.
//!
//! It has no state worth keeping: a restarted warmer re-arms its timer and warms at once.

use std::time::Duration;

use actix::prelude::*;

use super::{
    handles::ResolverPool,
    supervision::{ChildGuard, Crash, INJECTED_CRASH},
};
use crate::{
    engine::build::Engine,
    model::{AuthPolicy, ImageRef},
};

/// Warms every configured reference now; replies how many resolved.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "usize")]
pub struct WarmNow;

/// The cache warmer actor.
pub struct CacheWarmer {
    refs: Vec<ImageRef>,
    interval: Duration,
    resolvers: ResolverPool,
    engine: Engine,
    _guard: ChildGuard,
}

impl CacheWarmer {
    pub fn new(
        refs: Vec<ImageRef>,
        interval: Duration,
        resolvers: ResolverPool,
        engine: Engine,
        guard: ChildGuard,
    ) -> Self {
        Self {
            refs,
            interval,
            resolvers,
            engine,
            _guard: guard,
        }
    }

    fn warm(&self) -> impl std::future::Future<Output = usize> + 'static {
        let refs = self.refs.clone();
        let resolvers = self.resolvers.clone();
        let engine = self.engine.clone();
        async move {
            let mut warmed = 0;
            for image in refs {
                // Warm with the default policy: that is what most requests present, and the
                // cache is keyed by policy.
                match resolvers
                    .resolve(image.clone(), AuthPolicy::default(), true)
                    .await
                {
                    Ok(resolved) => {
                        warmed += 1;
                        match engine.prefetch(&resolved, &AuthPolicy::default()).await {
                            Ok(layers) => tracing::debug!(%image, %resolved, layers, "warmed"),
                            Err(error) => {
                                tracing::warn!(%image, %error, "cache warmer could not pre-fetch layers")
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%image, %error, "cache warmer could not resolve"),
                }
            }
            warmed
        }
    }
}

impl Actor for CacheWarmer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.refs.is_empty() {
            return;
        }
        ctx.spawn(actix::fut::wrap_future(self.warm()).map(|_, _, _| ()));
        ctx.run_interval(self.interval, |act, ctx| {
            ctx.spawn(actix::fut::wrap_future(act.warm()).map(|_, _, _| ()));
        });
    }
}

impl Handler<WarmNow> for CacheWarmer {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, _: WarmNow, _: &mut Self::Context) -> Self::Result {
        Box::pin(self.warm())
    }
}

impl Handler<Crash> for CacheWarmer {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        std::panic::panic_any(INJECTED_CRASH);
    }
}
