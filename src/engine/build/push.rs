//! Pushing a built image: every layer (mounted from where it came from when the registry
//! allows, uploaded from the local blob directory otherwise), then the config, then the
//! manifest under the destination tag.

use futures::{stream, TryStreamExt as _};
use tracing::Instrument as _;

use super::{
    stage::{BuildLogSink, ImageState, LayerOrigin},
    BuildOutput, Engine, EngineError,
};
use crate::{
    engine::image::{Descriptor, Manifest, OCI_CONFIG, OCI_MANIFEST},
    model::{AuthPolicy, Digest, ImageRef},
};

/// Blobs pushed at once.
const PUSH_CONCURRENCY: usize = 4;

pub async fn push(
    engine: &Engine,
    state: &ImageState,
    destination: &ImageRef,
    auth: &AuthPolicy,
    log: &BuildLogSink,
) -> Result<BuildOutput, EngineError> {
    let span = tracing::debug_span!(
        "push",
        destination = %destination,
        layers = state.layers.len(),
        digest = tracing::field::Empty,
    );
    let output = push_image(engine, state, destination, auth, log)
        .instrument(span.clone())
        .await?;
    span.record("digest", tracing::field::display(&output.digest));
    Ok(output)
}

async fn push_image(
    engine: &Engine,
    state: &ImageState,
    destination: &ImageRef,
    auth: &AuthPolicy,
    log: &BuildLogSink,
) -> Result<BuildOutput, EngineError> {
    let registry = engine.registry();
    stream::iter(state.layers.iter().map(Ok::<_, EngineError>))
        .try_for_each_concurrent(PUSH_CONCURRENCY, |layer| async move {
            let outcome = match &layer.origin {
                LayerOrigin::Registry(source) => {
                    registry
                        .transfer_blob(source, destination, &layer.blob.digest, layer.blob.size, auth)
                        .await?
                }
                LayerOrigin::Local => {
                    let path = engine.blob_path(&layer.blob.digest);
                    registry
                        .push_blob_file(destination, &layer.blob.digest, &path, None, auth)
                        .await?
                }
            };
            log.line(format!("  layer {} {}", layer.blob.digest, outcome));
            Ok(())
        })
        .await?;
    let config = state.config.to_bytes();
    let config_digest = Digest::of(&config);
    let config_size = config.len() as u64;
    registry
        .push_blob_bytes(destination, &config_digest, config, auth)
        .await?;
    let manifest = Manifest::new(
        Descriptor {
            media_type: OCI_CONFIG.into(),
            digest: config_digest,
            size: config_size,
        },
        state.layers.iter().map(|l| l.blob.clone()).collect(),
    );
    let digest = registry
        .push_manifest_bytes(destination, manifest.to_bytes(), OCI_MANIFEST, auth)
        .await?;
    Ok(BuildOutput {
        reference: destination.pinned(digest.clone()),
        digest,
    })
}
