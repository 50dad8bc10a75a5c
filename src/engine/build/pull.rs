//! Pulling a base image: its config, and its layers into the shared layer store (each
//! layer downloaded and unpacked once per Kiln, whichever build asks first).

use std::sync::Arc;

use tracing::Instrument as _;

use super::{
    stage::{Layer, LayerOrigin},
    Engine, EngineError,
};
use crate::{
    engine::{
        image::{Descriptor, ImageConfig},
        layers::{BlobSource, LayerBlob},
        storage::Lease,
    },
    model::{AuthPolicy, ImageRef},
    registry::Platform,
};

/// A base image, ready to build on.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub reference: ImageRef,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
}

/// Pulls `image` (an index resolved to `platform`) into the layer store, pinning its layers
/// in `lease`.
pub async fn pull(
    engine: &Engine,
    image: &ImageRef,
    platform: &Platform,
    auth: &AuthPolicy,
    lease: &Lease,
) -> Result<PulledImage, EngineError> {
    let span = tracing::debug_span!("pull", image = %image, layers = tracing::field::Empty);
    let pulled = pull_layers(engine, image, platform, auth, lease)
        .instrument(span.clone())
        .await?;
    span.record("layers", pulled.layers.len());
    Ok(pulled)
}

async fn pull_layers(
    engine: &Engine,
    image: &ImageRef,
    platform: &Platform,
    auth: &AuthPolicy,
    lease: &Lease,
) -> Result<PulledImage, EngineError> {
    let fetched = engine.registry().fetch_image(image, platform, auth).await?;
    let config: ImageConfig = serde_json::from_slice(&fetched.config_bytes).map_err(|e| EngineError::Io {
        what: format!("reading the config of {}", fetched.reference),
        source: std::io::Error::other(e),
    })?;
    let repo = Arc::new(fetched.reference.clone());
    let mut layers = Vec::with_capacity(fetched.layers.len());
    // Layers are fetched concurrently; the store unpacks each blob once.
    let futures = fetched
        .layers
        .iter()
        .zip(
            config
                .rootfs
                .diff_ids
                .iter()
                .map(Some)
                .chain(std::iter::repeat(None)),
        )
        .map(|(l, diff_id)| {
            let (engine, repo, auth) = (engine.clone(), repo.clone(), auth.clone());
            let l = l.clone();
            let blob = LayerBlob {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                diff_id: diff_id.cloned(),
            };
            async move {
                let download = engine
                    .config()
                    .data_dir
                    .join("tmp")
                    .join(format!("pull-{}", uuid::Uuid::new_v4()));
                let fetch = || async {
                    engine
                        .registry()
                        .pull_blob_to_file(&repo, &l.digest, Some(l.size), &download, &auth)
                        .await
                        .map(|_| BlobSource::File(download.clone()))
                };
                // Pinned before it is looked up, so GC cannot take it between the two.
                if let Some(diff_id) = &blob.diff_id {
                    lease.pin_layer_wait(diff_id).await;
                }
                let mut stored = engine.layer_store().ensure(&blob, &fetch).await;
                if let Ok(found) = &stored {
                    if blob.diff_id.is_none() && !lease.pin_layer(&found.diff_id) {
                        // Found while GC removed it: wait until it is gone and unpack it again.
                        lease.pin_layer_wait(&found.diff_id).await;
                        stored = engine.layer_store().ensure(&blob, &fetch).await;
                    }
                }
                let _ = std::fs::remove_file(&download);
                let stored = stored?;
                if stored.unpacked.is_some() {
                    let (storage, diff_id, dir) = (
                        engine.storage().clone(),
                        stored.diff_id.clone(),
                        stored.dir.clone(),
                    );
                    let counted = tokio::task::spawn_blocking(move || {
                        storage.layer_added(&diff_id, crate::engine::storage::disk_usage(&dir));
                    })
                    .await;
                    if let Err(e) = counted {
                        tracing::warn!(error = %e, "counting a pulled layer");
                    }
                }
                Ok::<_, EngineError>(Layer {
                    blob: Descriptor {
                        media_type: l.media_type.clone(),
                        digest: l.digest.clone(),
                        size: l.size,
                    },
                    dir: stored.dir,
                    origin: LayerOrigin::Registry((*repo).clone()),
                })
            }
        });
    for layer in futures::future::try_join_all(futures).await? {
        layers.push(layer);
    }
    Ok(PulledImage {
        reference: fetched.reference,
        config,
        layers,
    })
}
