//! Kiln's builder image for the fake cluster: the `kiln` binary under test at
//! `/usr/local/bin/kiln` over the testbed's busybox, pushed to a test registry under the
//! name the pod spec uses. The fake kubelet pulls it, unpacks it and runs the binary it
//! unpacked (see `fake_kube::images`), so a builder pod runs the image's Kiln, not the host's.
//!
//! The Kiln layer is an uncompressed tar (a valid OCI layer media type), made once per
//! process: compressing a debug binary of over 100 MB for every test would cost seconds
//! and tell nothing.

use std::sync::{Arc, OnceLock};

use kiln::model::Digest;
use oci_client::Reference;
use serde_json::json;

use super::{
    base_images::busybox_layout,
    images::{client_for, push_blob, OCI_CONFIG, OCI_MANIFEST},
};

/// Where the image puts the binary, and its entrypoint.
pub const KILN_PATH: &str = "/usr/local/bin/kiln";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The layer holding the binary under test, and its digest.
fn kiln_layer() -> &'static (Arc<Vec<u8>>, Digest) {
    static LAYER: OnceLock<(Arc<Vec<u8>>, Digest)> = OnceLock::new();
    LAYER.get_or_init(|| {
        let binary = std::fs::read(env!("CARGO_BIN_EXE_kiln")).expect("reading the kiln binary");
        let mut tar = tar::Builder::new(Vec::with_capacity(binary.len() + 8192));
        // Owned by root, 0755, at the epoch.
        let header = |entry_type, size| {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(entry_type);
            header.set_mode(0o755);
            header.set_uid(0);
            header.set_gid(0);
            header.set_size(size);
            header.set_mtime(0);
            header
        };
        for dir in ["usr/", "usr/local/", "usr/local/bin/"] {
            let mut dir_header = header(tar::EntryType::Directory, 0);
            tar.append_data(&mut dir_header, dir, std::io::empty()).unwrap();
        }
        let mut file_header = header(tar::EntryType::Regular, binary.len() as u64);
        tar.append_data(&mut file_header, &KILN_PATH[1..], binary.as_slice())
            .unwrap();
        let tar = tar.into_inner().unwrap();
        let digest = Digest::of(&tar);
        (Arc::new(tar), digest)
    })
}

/// Pushes the builder image as `registry/repository:tag` (anonymous registry) and returns
/// its manifest digest.
pub async fn push(registry: &str, repository: &str, tag: &str) -> Digest {
    let (client, _auth) = client_for(registry, None).await;
    let reference = Reference::with_tag(registry.into(), repository.into(), tag.into());

    let busybox = busybox_layout();
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        std::fs::read(busybox.dir.join("blobs/sha256").join(hex)).expect("a busybox layout blob")
    };
    let busybox_manifest: serde_json::Value =
        serde_json::from_slice(&blob(&busybox.manifest_digest)).unwrap();
    let busybox_layer = busybox_manifest["layers"][0].clone();
    let busybox_bytes = blob(busybox_layer["digest"].as_str().unwrap());
    let busybox_digest = Digest::of(&busybox_bytes);
    push_blob(&client, &reference, busybox_bytes, &busybox_digest).await;

    let (kiln_tar, kiln_digest) = kiln_layer();
    push_blob(&client, &reference, kiln_tar.as_ref().clone(), kiln_digest).await;

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "Entrypoint": [KILN_PATH],
            "Cmd": ["serve"],
        },
        "rootfs": { "type": "layers", "diff_ids": [busybox.diff_id, kiln_digest.to_string()] },
    }))
    .unwrap();
    let config_digest = Digest::of(&config);
    push_blob(&client, &reference, config.clone(), &config_digest).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config.len() },
        "layers": [
            busybox_layer,
            { "mediaType": OCI_LAYER_TAR, "digest": kiln_digest.to_string(), "size": kiln_tar.len() },
        ],
    }))
    .unwrap();
    client
        .push_manifest_raw(&reference, manifest.clone(), OCI_MANIFEST.parse().unwrap())
        .await
        .unwrap_or_else(|e| panic!("pushing manifest {reference}: {e}"));
    Digest::of(&manifest)
}
