//! Synthetic OCI image layouts on disk (`oci-layout`, `index.json`, `blobs/sha256/...`), as
//! skopeo's `oci:` transport reads and writes them: images with gzip'd tar layers of random
//! content, a config whose `diff_ids` are right, and multi-arch indexes.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use flate2::{write::GzEncoder, Compression};
use kiln::model::Digest;
use rand::RngCore;
use serde_json::{json, Value};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    pub fn to_json(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// One single-platform image written into a layout.
#[derive(Debug, Clone)]
pub struct Image {
    pub architecture: String,
    pub manifest: Descriptor,
    pub manifest_bytes: Vec<u8>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A multi-platform index written into a layout.
#[derive(Debug, Clone)]
pub struct Index {
    pub descriptor: Descriptor,
    pub bytes: Vec<u8>,
}

/// An OCI image layout directory.
#[derive(Debug)]
pub struct OciLayout {
    pub dir: PathBuf,
    refs: Vec<(String, Descriptor)>,
}

impl OciLayout {
    /// Creates an empty layout in `dir` (which may exist).
    pub fn create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let layout = Self {
            dir: dir.to_path_buf(),
            refs: Vec::new(),
        };
        layout.write_index();
        layout
    }

    /// Stores `bytes` as a blob.
    pub fn write_blob(&self, media_type: &str, bytes: &[u8]) -> Descriptor {
        let digest = Digest::of(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(digest.hex()), bytes).unwrap();
        Descriptor {
            media_type: media_type.into(),
            digest: digest.to_string(),
            size: bytes.len() as u64,
        }
    }

    /// Writes a linux/`architecture` image with one gzip'd tar layer per entry of
    /// `layer_sizes`, each holding a file of that many random bytes.
    pub fn add_image(&self, architecture: &str, layer_sizes: &[usize]) -> Image {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, &size) in layer_sizes.iter().enumerate() {
            let tar = random_tar(&format!("layer{i}/data.bin"), size);
            diff_ids.push(Digest::of(&tar).to_string());
            layers.push(self.write_blob(OCI_LAYER_GZIP, &gzip(&tar)));
        }
        let config = json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": architecture,
            "os": "linux",
            "config": { "Env": ["PATH=/usr/bin:/bin"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": layer_sizes.iter().map(|_| json!({"created_by": "kiln test"})).collect::<Vec<_>>(),
        });
        let config = self.write_blob(OCI_CONFIG, &serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": layers.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
        });
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
        Image {
            architecture: architecture.into(),
            manifest: self.write_blob(OCI_MANIFEST, &manifest_bytes),
            manifest_bytes,
            config,
            layers,
        }
    }

    /// Writes an index of `images` (all linux).
    pub fn add_index(&self, images: &[&Image]) -> Index {
        let manifests: Vec<Value> = images
            .iter()
            .map(|image| {
                let mut d = image.manifest.to_json();
                d["platform"] = json!({ "architecture": image.architecture, "os": "linux" });
                d
            })
            .collect();
        let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        let bytes = serde_json::to_vec(&index).unwrap();
        Index {
            descriptor: self.write_blob(OCI_INDEX, &bytes),
            bytes,
        }
    }

    /// Names `descriptor` `tag` in `index.json` (what `oci:DIR:tag` resolves).
    pub fn tag(&mut self, tag: &str, descriptor: &Descriptor) {
        self.refs.retain(|(t, _)| t != tag);
        self.refs.push((tag.into(), descriptor.clone()));
        self.write_index();
    }

    fn write_index(&self) {
        let manifests: Vec<Value> = self
            .refs
            .iter()
            .map(|(tag, d)| {
                let mut v = d.to_json();
                v["annotations"] = json!({ REF_NAME: tag });
                v
            })
            .collect();
        let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    }
}

/// The descriptor `tag` names in the layout at `dir` (one written by anyone, e.g. skopeo).
pub fn resolve(dir: &Path, tag: &str) -> Option<Descriptor> {
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).ok()?).ok()?;
    index["manifests"].as_array()?.iter().find_map(|m| {
        if m["annotations"][REF_NAME] != tag {
            return None;
        }
        Some(Descriptor {
            media_type: m["mediaType"].as_str().unwrap_or_default().into(),
            digest: m["digest"].as_str()?.into(),
            size: m["size"].as_u64()?,
        })
    })
}

/// The bytes of blob `digest` in the layout at `dir`.
pub fn read_blob(dir: &Path, digest: &str) -> Vec<u8> {
    let digest: Digest = digest.parse().unwrap();
    std::fs::read(dir.join("blobs/sha256").join(digest.hex()))
        .unwrap_or_else(|e| panic!("blob {digest} in {}: {e}", dir.display()))
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0; n];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// A tar archive with one file of `size` random bytes.
fn random_tar(path: &str, size: usize) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let data = random_bytes(size);
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    builder.append_data(&mut header, path, data.as_slice()).unwrap();
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}
