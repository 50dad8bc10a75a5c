//! The embedded OCI registry: an OCI distribution-spec v1.1 server (plus what docker, skopeo
//! and oci-client actually send) over plain HTTP/1.1, storing everything on disk.
//!
//! - [`serve`]: the entry point; state and the axum wiring live here.
//! - `routes`: path parsing (repository names contain slashes), name/tag grammar, dispatch,
//!   the per-request tracing span.
//! - `blobs`, `upload`, `manifests`, `tags`: the endpoints.
//! - `storage`: the on-disk layout and atomic writes.
//! - `error`: spec error codes and the JSON error envelope.
//!
//! There is no authentication and no referrers API; deletes unlink without collecting
//! garbage; upload sessions are in memory and are lost (and their data removed) on restart.

mod blobs;
mod error;
mod manifests;
mod routes;
mod storage;
mod tags;
mod upload;

use std::{future::Future, path::PathBuf, sync::Arc};

use axum::Router;

/// Shared state of one running registry.
#[derive(Debug)]
struct Registry {
    storage: storage::Storage,
    uploads: upload::Uploads,
}

/// The registry's axum app over the storage at `root`, without a listener: for driving
/// requests in-process (e.g. a fuzz target with `tower::ServiceExt::oneshot`).
pub async fn router(root: PathBuf) -> std::io::Result<Router> {
    let storage = storage::Storage::open(root).await?;
    let registry = Arc::new(Registry {
        storage,
        uploads: upload::Uploads::default(),
    });
    Ok(Router::new().fallback(routes::handle).with_state(registry))
}

/// Serves the registry on `listener`, storing everything under `root`, until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    root: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let storage = storage::Storage::open(root.clone()).await?;
    let registry = Arc::new(Registry {
        storage,
        uploads: upload::Uploads::default(),
    });
    let app = Router::new().fallback(routes::handle).with_state(registry);
    tracing::info!(addr = ?listener.local_addr().ok(), root = %root.display(), "registry serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!("registry stopped");
    Ok(())
}
