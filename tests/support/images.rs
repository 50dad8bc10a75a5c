//! Synthetic images pushed straight into a registry with oci-client (not with Kiln's client,
//! so that a bug there cannot hide itself): OCI manifests with gzip'd tar layers of random
//! content (deterministic per seed), configs with the right `diff_ids`, and multi-platform
//! indexes.

use std::io::Write;

use flate2::{write::GzEncoder, Compression};
use kiln::model::{Digest, ImageRef};
use oci_client::{
    client::{ClientConfig, ClientProtocol},
    secrets::RegistryAuth,
    Client, Reference,
};
use rand::{rngs::StdRng, RngCore, SeedableRng};
use serde_json::json;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The size of the first layer's random file: larger than one network read, so that copies
/// really stream. Later layers are small.
pub const FIRST_LAYER_BYTES: usize = 300 * 1024;

/// `registry/repo:tag` as a Kiln reference.
pub fn image_ref(registry: &str, repo: &str, tag: &str) -> ImageRef {
    format!("{registry}/{repo}:{tag}")
        .parse()
        .expect("valid reference")
}

/// Pushes a `linux/amd64` image with `n_layers` random layers to an anonymous registry
/// (`127.0.0.1:PORT`) and returns its manifest digest.
pub async fn push_image(registry: &str, repo: &str, tag: &str, n_layers: usize, seed: u64) -> Digest {
    push_image_with(registry, None, repo, tag, n_layers, seed, "linux/amd64").await
}

/// [`push_image`] with basic-auth credentials and a platform (`os/arch[/variant]`).
pub async fn push_image_with(
    registry: &str,
    creds: Option<(&str, &str)>,
    repo: &str,
    tag: &str,
    n_layers: usize,
    seed: u64,
    platform: &str,
) -> Digest {
    let (client, _auth) = client_for(registry, creds).await;
    let (bytes, digest) =
        push_blobs_and_build_manifest(&client, registry, repo, n_layers, seed, platform).await;
    let reference = Reference::with_tag(registry.into(), repo.into(), tag.into());
    client
        .push_manifest_raw(&reference, bytes, OCI_MANIFEST.parse().unwrap())
        .await
        .unwrap_or_else(|e| panic!("pushing manifest {reference}: {e}"));
    digest
}

/// Pushes one image per platform and an OCI index over them, tagged `tag`. Returns the
/// index digest and each platform's manifest digest, in the order given.
pub async fn push_index(
    registry: &str,
    repo: &str,
    tag: &str,
    platforms: &[&str],
) -> (Digest, Vec<(String, Digest)>) {
    let (client, _auth) = client_for(registry, None).await;
    let mut entries = Vec::new();
    let mut result = Vec::new();
    for (i, platform) in platforms.iter().enumerate() {
        let seed = 0x1d3c_0000 + i as u64 + platform.len() as u64 * 1000;
        let (bytes, digest) = push_blobs_and_build_manifest(&client, registry, repo, 1, seed, platform).await;
        // Children are pushed by digest so that only the index carries the tag.
        let by_digest = Reference::with_digest(registry.into(), repo.into(), digest.to_string());
        client
            .push_manifest_raw(&by_digest, bytes.clone(), OCI_MANIFEST.parse().unwrap())
            .await
            .unwrap_or_else(|e| panic!("pushing manifest {by_digest}: {e}"));
        let mut parts = platform.split('/');
        let mut p = json!({ "os": parts.next().unwrap(), "architecture": parts.next().unwrap() });
        if let Some(variant) = parts.next() {
            p["variant"] = json!(variant);
        }
        entries.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": digest.to_string(),
            "size": bytes.len(),
            "platform": p,
        }));
        result.push(((*platform).to_owned(), digest));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    }))
    .unwrap();
    let index_digest = Digest::of(&index);
    let reference = Reference::with_tag(registry.into(), repo.into(), tag.into());
    client
        .push_manifest_raw(&reference, index, OCI_INDEX.parse().unwrap())
        .await
        .unwrap_or_else(|e| panic!("pushing index {reference}: {e}"));
    (index_digest, result)
}

pub(crate) async fn client_for(registry: &str, creds: Option<(&str, &str)>) -> (Client, RegistryAuth) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    // A Kiln server's embedded registry takes writes only with its generated credentials.
    let auth = match (creds, super::registry_auth::lookup(registry)) {
        (Some((u, p)), _) => RegistryAuth::Basic(u.into(), p.into()),
        (None, Some(kiln)) => RegistryAuth::Basic(kiln.username, kiln.password),
        (None, None) => RegistryAuth::Anonymous,
    };
    client.store_auth_if_needed(registry, &auth).await;
    (client, auth)
}

/// Pushes the config and layer blobs of one image and returns its manifest bytes and digest.
async fn push_blobs_and_build_manifest(
    client: &Client,
    registry: &str,
    repo: &str,
    n_layers: usize,
    seed: u64,
    platform: &str,
) -> (Vec<u8>, Digest) {
    let reference = Reference::with_tag(registry.into(), repo.into(), "unused".into());
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for i in 0..n_layers {
        let size = if i == 0 { FIRST_LAYER_BYTES } else { 4096 };
        let (tar, gz) = random_layer(seed.wrapping_mul(31).wrapping_add(i as u64), size, i);
        diff_ids.push(Digest::of(&tar).to_string());
        let digest = Digest::of(&gz);
        push_blob(client, &reference, gz.clone(), &digest).await;
        layers.push(json!({ "mediaType": OCI_LAYER_GZIP, "digest": digest.to_string(), "size": gz.len() }));
    }
    let mut parts = platform.split('/');
    let (os, arch, variant) = (parts.next().unwrap(), parts.next().unwrap(), parts.next());
    let mut config = json!({
        "architecture": arch,
        "os": os,
        "config": { "Env": ["PATH=/usr/bin:/bin"], "Labels": { "kiln.test.seed": seed.to_string() } },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    if let Some(v) = variant {
        config["variant"] = json!(v);
    }
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = Digest::of(&config);
    push_blob(client, &reference, config.clone(), &config_digest).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config.len() },
        "layers": layers,
    }))
    .unwrap();
    let digest = Digest::of(&manifest);
    (manifest, digest)
}

pub(crate) async fn push_blob(client: &Client, reference: &Reference, data: Vec<u8>, digest: &Digest) {
    client
        .push_blob(reference, data, digest.as_str())
        .await
        .unwrap_or_else(|e| panic!("pushing blob {digest} to {reference}: {e}"));
}

/// A tar holding one file of `size` random bytes, and its gzip.
fn random_layer(seed: u64, size: usize, index: usize) -> (Vec<u8>, Vec<u8>) {
    let mut content = vec![0u8; size];
    StdRng::seed_from_u64(seed).fill_bytes(&mut content);
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder
        .append_data(&mut header, format!("layer-{index}.bin"), content.as_slice())
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&tar).unwrap();
    (tar, gz.finish().unwrap())
}
