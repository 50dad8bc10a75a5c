//! The cache warmer: on an interval, and when asked ([`WarmNow`], `Admin.WarmNow`), it
//! refreshes the configured references (`warmer.refs`) and the tags callers asked for most
//! since the last round (`warmer.most_requested` of them, counted by the resolvers), so that
//! requests for them find a fresh digest in the resolver cache, and pre-fetches their layers
//! into the engine's layer store so the first build on them pulls nothing.
//!
//! The resolver cache is keyed by the credentials a request would use, and Gitpod's
//! requests come with the installation's pull secret allowed (`total`, or `selective` for
//! the registry) or not. So every reference is warmed both ways: with the installation's
//! credentials allowed everywhere and with none; whatever policy a request brings selects
//! one of the two (a request's own `additional` entry is its own, never warmed).
//!
//! It works by messages only: a [`Resolve`](super::resolver::Resolve) with `refresh` to the
//! resolver that owns the reference's cache shard (through
//! [`ResolverPool`]), then a [`Prefetch`] of the pinned reference. The engine has no actor of
//! its own, so `Prefetch` goes to the warmer's own mailbox, whose handler runs the pull on a
//! blocking thread with a runtime of its own: unpacking layers is CPU and disk work that
//! must not hold an arbiter.
//!
//! It has no state worth keeping: a restarted warmer re-arms its timer and warms at once. A
//! warm runs in the warmer's context, so a crash ends it (a `WarmNow` caller's slot then
//! asks the next incarnation); a pull already handed to a blocking thread finishes, and is
//! idempotent (the layer store unpacks each blob once).

use std::time::Duration;

use actix::prelude::*;

use super::{
    handles::ResolverPool,
    supervision::{ChildGuard, Crash, INJECTED_CRASH},
};
use crate::{
    engine::build::{Engine, EngineError},
    model::{AuthPolicy, ImageRef, InstallationCredentialScope},
};

/// The two credential choices a request can make for a reference (see the module doc):
/// the installation's (first: it also fetches the layers), then none.
fn warm_policies() -> [AuthPolicy; 2] {
    [
        InstallationCredentialScope::Everywhere,
        InstallationCredentialScope::Nowhere,
    ]
    .map(|installation| AuthPolicy {
        installation,
        additional: Default::default(),
    })
}

/// Warms every configured reference now; replies how it went.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Warmed")]
pub struct WarmNow;

/// The outcome of one warm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Warmed {
    /// References re-resolved into the resolver cache with their layers in the layer store.
    pub images: u64,
    /// References that could not be resolved or pre-fetched (each logged).
    pub failed: u64,
}

/// Pulls the layers of `image` (a pinned reference) into the engine's layer store; replies
/// how many layers the image has.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<usize, PrefetchError>")]
pub struct Prefetch {
    pub image: ImageRef,
}

/// Why a [`Prefetch`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// The engine could not pull the image (the registry, the layer store).
    #[error("pre-fetching the layers of {image}: {source}")]
    Engine {
        image: ImageRef,
        #[source]
        source: Box<EngineError>,
    },
    /// The blocking thread or its runtime failed.
    #[error("pre-fetching the layers of {image}: {source}")]
    Task {
        image: ImageRef,
        #[source]
        source: std::io::Error,
    },
    /// The warmer died before it answered.
    #[error("pre-fetching the layers of {image}: the cache warmer stopped")]
    Stopped { image: ImageRef },
}

/// The cache warmer actor.
pub struct CacheWarmer {
    refs: Vec<ImageRef>,
    /// `warmer.most_requested`: how many of the tags callers asked for most are warmed too.
    most_requested: usize,
    interval: Duration,
    resolvers: ResolverPool,
    engine: Engine,
    mailbox_size: usize,
    _guard: ChildGuard,
}

impl CacheWarmer {
    pub fn new(
        refs: Vec<ImageRef>,
        most_requested: usize,
        interval: Duration,
        resolvers: ResolverPool,
        engine: Engine,
        mailbox_size: usize,
        guard: ChildGuard,
    ) -> Self {
        Self {
            refs,
            most_requested,
            interval,
            resolvers,
            engine,
            mailbox_size,
            _guard: guard,
        }
    }

    /// One warm of every configured and much requested reference, run in this warmer's
    /// context.
    fn warm(&self, ctx: &Context<Self>) -> impl ActorFuture<Self, Output = Warmed> + 'static {
        let (configured, most_requested) = (self.refs.clone(), self.most_requested);
        let resolvers = self.resolvers.clone();
        let me = ctx.address();
        actix::fut::wrap_future(async move {
            let mut refs = configured;
            if most_requested > 0 {
                for image in resolvers.most_requested(most_requested).await {
                    if !refs.contains(&image) {
                        refs.push(image);
                    }
                }
            }
            let mut warmed = Warmed::default();
            for image in refs {
                let mut resolved = None;
                for auth in warm_policies() {
                    match resolvers.resolve(image.clone(), auth, true).await {
                        Ok(pinned) => {
                            resolved.get_or_insert(pinned);
                        }
                        Err(error) => {
                            tracing::debug!(%image, %error, "cache warmer could not resolve under one policy")
                        }
                    }
                }
                let Some(resolved) = resolved else {
                    tracing::warn!(%image, "cache warmer could not resolve, with the installation's credentials or without");
                    warmed.failed += 1;
                    continue;
                };
                let prefetched = me
                    .send(Prefetch {
                        image: resolved.clone(),
                    })
                    .await
                    .unwrap_or_else(|_| {
                        Err(PrefetchError::Stopped {
                            image: resolved.clone(),
                        })
                    });
                match prefetched {
                    Ok(layers) => {
                        tracing::debug!(%image, %resolved, layers, "warmed");
                        warmed.images += 1;
                    }
                    Err(error) => {
                        tracing::warn!(%image, %error, "cache warmer could not pre-fetch layers");
                        warmed.failed += 1;
                    }
                }
            }
            warmed
        })
    }
}

/// Runs the engine's pull of `image` on a blocking thread, with a current-thread runtime of
/// its own for the pull's I/O.
async fn prefetch_off_arbiter(engine: Engine, image: ImageRef) -> Result<usize, PrefetchError> {
    let task_image = image.clone();
    let task = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| PrefetchError::Task {
                image: task_image.clone(),
                source,
            })?;
        runtime
            .block_on(engine.prefetch(&task_image, &warm_policies()[0]))
            .map_err(|source| PrefetchError::Engine {
                image: task_image,
                source: Box::new(source),
            })
    });
    match task.await {
        Ok(result) => result,
        Err(join) => Err(PrefetchError::Task {
            image,
            source: std::io::Error::other(join),
        }),
    }
}

impl Actor for CacheWarmer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_size);
        if self.refs.is_empty() && self.most_requested == 0 {
            return;
        }
        let first = self.warm(ctx).map(|_, _, _| ());
        ctx.spawn(first);
        ctx.run_interval(self.interval, |act, ctx| {
            let next = act.warm(ctx).map(|_, _, _| ());
            ctx.spawn(next);
        });
    }
}

impl Handler<WarmNow> for CacheWarmer {
    type Result = ResponseActFuture<Self, Warmed>;

    fn handle(&mut self, _: WarmNow, ctx: &mut Self::Context) -> Self::Result {
        Box::pin(self.warm(ctx))
    }
}

impl Handler<Prefetch> for CacheWarmer {
    type Result = ResponseFuture<Result<usize, PrefetchError>>;

    /// Hands the pull to a blocking thread; the warmer's mailbox keeps moving meanwhile.
    fn handle(&mut self, msg: Prefetch, _: &mut Self::Context) -> Self::Result {
        Box::pin(prefetch_off_arbiter(self.engine.clone(), msg.image))
    }
}

impl Handler<Crash> for CacheWarmer {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        std::panic::panic_any(INJECTED_CRASH);
    }
}
