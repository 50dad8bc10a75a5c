//! The embedded OCI registry: an OCI distribution-spec v1.1 server (plus what docker, skopeo
//! and oci-client actually send) over plain HTTP/1.1, storing everything on disk.
//!
//! - [`serve`]: the entry point; state and the axum wiring live here.
//! - `routes`: path parsing (repository names contain slashes), name/tag grammar, dispatch,
//!   the per-request tracing span.
//! - `blobs`, `upload`, `manifests`, `tags`: the endpoints.
//! - `storage`: the on-disk layout and atomic writes (files 0600, directories 0700).
//! - `error`: spec error codes and the JSON error envelope.
//! - `auth`: HTTP Basic credentials for writes (and for pulls unless anonymous pulls are on).
//! - `gc`: online garbage collection (unreferenced blobs, abandoned uploads, expired tags).
//!
//! `kiln serve` runs it with credentials and a collection policy ([`EmbeddedRegistry`]);
//! [`serve`] and [`router`] run an open one with the default policy, for tests and fuzzing.
//! There is no referrers API; deletes unlink, and collections remove what nothing references;
//! upload sessions are in memory and are lost (and their data removed) on restart.

mod auth;
mod blobs;
mod error;
mod gc;
mod manifests;
mod routes;
mod storage;
mod tags;
mod upload;

use std::{future::Future, path::PathBuf, sync::Arc};

use axum::Router;

pub use auth::{Access, REALM};
pub use gc::{GcPolicy, GcReport};

/// Shared state of one running registry.
#[derive(Debug)]
struct Registry {
    storage: storage::Storage,
    uploads: upload::Uploads,
    access: Access,
    gc: gc::Collector,
}

/// One embedded registry: its storage, its upload sessions and its garbage collector, to
/// serve and to collect garbage in while it serves.
#[derive(Debug, Clone)]
pub struct EmbeddedRegistry {
    registry: Arc<Registry>,
}

impl EmbeddedRegistry {
    /// Opens the registry stored under `root` (creating it), served under `access`, collected
    /// under `policy`.
    pub async fn open(root: PathBuf, access: Access, policy: GcPolicy) -> std::io::Result<Self> {
        let storage = storage::Storage::open(root).await?;
        let registry = Arc::new(Registry {
            storage,
            uploads: upload::Uploads::default(),
            access,
            gc: gc::Collector::new(policy)?,
        });
        Ok(Self { registry })
    }

    /// The registry's axum app, without a listener.
    pub fn router(&self) -> Router {
        Router::new()
            .fallback(routes::handle)
            .with_state(self.registry.clone())
    }

    /// Collects garbage now, online: removes blobs no manifest references (past the grace
    /// period), abandoned upload sessions and the policy's unused tags. Safe while pushes go
    /// on (see `gc`'s doc); concurrent calls run one after the other.
    pub async fn collect_garbage(&self) -> std::io::Result<GcReport> {
        gc::collect(&self.registry).await
    }

    /// Collects garbage every `interval`, for ever (a failed collection is logged and the
    /// next one tries again).
    pub async fn collect_every(&self, interval: std::time::Duration) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(error) = self.collect_garbage().await {
                tracing::warn!(%error, "registry garbage collection failed; trying again next time");
            }
        }
    }

    /// Bytes removed by every collection since the registry was opened.
    pub fn gc_removed_bytes(&self) -> u64 {
        self.registry.gc.removed_bytes()
    }

    /// Serves the registry on `listener` until `shutdown` resolves.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(
            addr = ?listener.local_addr().ok(),
            access = ?self.registry.access,
            "registry serving"
        );
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await?;
        tracing::info!("registry stopped");
        Ok(())
    }
}

/// The registry's axum app over the storage at `root`, without a listener and without
/// authentication: for driving requests in-process (e.g. a fuzz target with
/// `tower::ServiceExt::oneshot`).
pub async fn router(root: PathBuf) -> std::io::Result<Router> {
    router_with(root, Access::open()).await
}

/// [`router`] with an access rule.
pub async fn router_with(root: PathBuf, access: Access) -> std::io::Result<Router> {
    Ok(EmbeddedRegistry::open(root, access, GcPolicy::default())
        .await?
        .router())
}

/// Serves an open registry (no authentication: for tests) on `listener`, storing everything
/// under `root`, until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    root: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, root, Access::open(), shutdown).await
}

/// Serves the registry on `listener` under `access`, storing everything under `root`,
/// until `shutdown` resolves.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    root: PathBuf,
    access: Access,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(root = %root.display(), "registry opening");
    EmbeddedRegistry::open(root, access, GcPolicy::default())
        .await?
        .serve(listener, shutdown)
        .await
}
