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
//!
//! `kiln serve` always runs it with credentials ([`serve_with`]); [`serve`] and [`router`]
//! run an open one, for tests and fuzzing. There is no referrers API; deletes unlink without
//! collecting garbage; upload sessions are in memory and are lost (and their data removed)
//! on restart.

mod auth;
mod blobs;
mod error;
mod manifests;
mod routes;
mod storage;
mod tags;
mod upload;

use std::{future::Future, path::PathBuf, sync::Arc};

use axum::Router;

pub use auth::{Access, REALM};

/// Shared state of one running registry.
#[derive(Debug)]
struct Registry {
    storage: storage::Storage,
    uploads: upload::Uploads,
    access: Access,
}

/// The registry's axum app over the storage at `root`, without a listener and without
/// authentication: for driving requests in-process (e.g. a fuzz target with
/// `tower::ServiceExt::oneshot`).
pub async fn router(root: PathBuf) -> std::io::Result<Router> {
    router_with(root, Access::open()).await
}

/// [`router`] with an access rule.
pub async fn router_with(root: PathBuf, access: Access) -> std::io::Result<Router> {
    let storage = storage::Storage::open(root).await?;
    let registry = Arc::new(Registry {
        storage,
        uploads: upload::Uploads::default(),
        access,
    });
    Ok(Router::new().fallback(routes::handle).with_state(registry))
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
    tracing::info!(addr = ?listener.local_addr().ok(), root = %root.display(), ?access, "registry serving");
    let app = router_with(root, access).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!("registry stopped");
    Ok(())
}
