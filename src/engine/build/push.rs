//! Pushing a built image: every layer (mounted from where it came from when the registry
//! allows, uploaded from the local blob directory otherwise), then the config, then the
//! manifest under the destination tag. A multi-platform build pushes each platform's
//! manifest by digest and then an OCI image index naming them under the tag.

use futures::{stream, TryStreamExt as _};
use tracing::Instrument as _;

use super::{
    stage::{BuildLogSink, ImageState, LayerOrigin},
    BuildOutput, Engine, EngineError,
};
use crate::{
    engine::image::{
        Descriptor, ImageIndex, IndexEntry, IndexPlatform, Manifest, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,
    },
    model::{AuthPolicy, Digest, ImageRef},
    registry::Platform,
};

/// Blobs pushed at once.
const PUSH_CONCURRENCY: usize = 4;

/// Pushes `state`'s blobs and its manifest under `destination`'s tag.
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
    let (digest, _) = push_image(engine, state, destination, false, auth, log)
        .instrument(span.clone())
        .await?;
    span.record("digest", tracing::field::display(&digest));
    Ok(BuildOutput {
        reference: destination.pinned(digest.clone()),
        digest,
    })
}

/// Pushes each platform's image (its manifest by digest), then an index of them under
/// `destination`'s tag.
pub async fn push_index(
    engine: &Engine,
    images: &[(Platform, ImageState)],
    destination: &ImageRef,
    auth: &AuthPolicy,
    log: &BuildLogSink,
) -> Result<BuildOutput, EngineError> {
    let mut entries = Vec::with_capacity(images.len());
    for (platform, state) in images {
        let (digest, size) = push_image(engine, state, destination, true, auth, log).await?;
        log.line(format!("  {platform} manifest {digest}"));
        entries.push(IndexEntry {
            media_type: OCI_MANIFEST.into(),
            digest,
            size,
            platform: IndexPlatform {
                architecture: platform.architecture.clone(),
                os: platform.os.clone(),
                variant: platform.variant.clone(),
            },
        });
    }
    let index = ImageIndex::new(entries).to_bytes();
    let digest = engine
        .registry()
        .push_manifest_bytes(destination, index, OCI_INDEX, auth)
        .await?;
    Ok(BuildOutput {
        reference: destination.pinned(digest.clone()),
        digest,
    })
}

/// Pushes `state`'s layers and config to `destination`'s repository and its manifest under
/// `destination`'s tag, or (`by_digest`) by its own digest only. Returns the manifest's
/// digest and size.
async fn push_image(
    engine: &Engine,
    state: &ImageState,
    destination: &ImageRef,
    by_digest: bool,
    auth: &AuthPolicy,
    log: &BuildLogSink,
) -> Result<(Digest, u64), EngineError> {
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
    )
    .to_bytes();
    let size = manifest.len() as u64;
    let target = match by_digest {
        true => destination.pinned(Digest::of(&manifest)),
        false => destination.clone(),
    };
    let digest = registry
        .push_manifest_bytes(&target, manifest, OCI_MANIFEST, auth)
        .await?;
    Ok((digest, size))
}
