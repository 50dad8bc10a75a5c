//! Pulling a base image: its config, and its layers into the shared layer store (each
//! layer downloaded and unpacked once per Kiln, whichever build asks first).

use std::sync::Arc;

use super::{
    stage::{Layer, LayerOrigin},
    Engine, EngineError,
};
use crate::{
    engine::image::{Descriptor, ImageConfig},
    model::{AuthPolicy, ImageRef},
};

/// A base image, ready to build on.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub reference: ImageRef,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
}

/// Pulls `image` (resolving it for the engine's platform) into the layer store.
pub async fn pull(engine: &Engine, image: &ImageRef, auth: &AuthPolicy) -> Result<PulledImage, EngineError> {
    let fetched = engine.registry().fetch_image(image, auth).await?;
    let config: ImageConfig = serde_json::from_slice(&fetched.config_bytes).map_err(|e| EngineError::Io {
        what: format!("reading the config of {}", fetched.reference),
        source: std::io::Error::other(e),
    })?;
    let repo = Arc::new(fetched.reference.clone());
    let mut layers = Vec::with_capacity(fetched.layers.len());
    // Layers are fetched concurrently; the store unpacks each blob once.
    let futures = fetched.layers.iter().map(|l| {
        let (engine, repo, auth) = (engine.clone(), repo.clone(), auth.clone());
        let l = l.clone();
        async move {
            let registry = engine.registry().clone();
            let tmp = engine.config().data_dir.join("tmp");
            let stored = engine
                .layer_store()
                .ensure(&l.digest, &l.media_type, move |dest: std::path::PathBuf| {
                    let (registry, repo, digest, auth) = (registry.clone(), repo.clone(), l.digest.clone(), auth.clone());
                    let _ = &tmp;
                    async move {
                        registry
                            .pull_blob_to_file(&repo, &digest, Some(l.size), &dest, &auth)
                            .await
                            .map(|_| ())
                            .map_err(|e| std::io::Error::other(e.to_string()))
                    }
                })
                .await?;
            Ok::<_, EngineError>(Layer {
                diff_id: stored.diff_id,
                blob: Descriptor { media_type: l.media_type.clone(), digest: l.digest.clone(), size: l.size },
                dir: stored.dir,
                origin: LayerOrigin::Registry((*repo).clone()),
            })
        }
    });
    for layer in futures::future::try_join_all(futures).await? {
        layers.push(layer);
    }
    Ok(PulledImage { reference: fetched.reference, config, layers })
}
