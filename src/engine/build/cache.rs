//! The per-instruction cache: which layer an instruction produced from a given parent
//! state, so a rebuild re-runs only what changed.
//!
//! A key is a SHA-256 over the parent state's key and everything the instruction's result
//! depends on (its expanded text, the environment a RUN sees, the digest of the files a COPY
//! reads). A state's key after a layer is derived from the layer's *content* (its diff id),
//! not from the instruction, so when a re-run produces identical output, later steps hit
//! the cache again. Entries are small JSON files; the layers they name live in the layer
//! store (unpacked) and the local blob directory (compressed).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::model::{Digest, BUILD_PROCESS_VERSION};

/// A chain key: identifies a filesystem + config state reached by a sequence of steps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateKey(pub [u8; 32]);

impl StateKey {
    /// The state of a pulled base image.
    /// Every key starts from Kiln's build-process version, so a Kiln that builds
    /// differently never reuses what an older one cached.
    pub fn of_image(manifest_digest: &Digest) -> Self {
        Self::hash(&[
            BUILD_PROCESS_VERSION.as_bytes(),
            b"image",
            manifest_digest.as_str().as_bytes(),
        ])
    }

    /// The empty state (`FROM scratch`) of a stage for `platform`: what a RUN on it does
    /// (a copied-in binary run natively or emulated) depends on the platform.
    pub fn scratch(platform: &str) -> Self {
        Self::hash(&[BUILD_PROCESS_VERSION.as_bytes(), b"scratch", platform.as_bytes()])
    }

    pub fn hash(parts: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        Self(h.finalize().into())
    }

    /// The key of looking up `step` from this state.
    pub fn step(&self, step: &[u8]) -> Self {
        Self::hash(&[&self.0, b"step", step])
    }

    /// The state after a layer with `diff_id` was added on top of this one.
    pub fn with_layer(&self, diff_id: &Digest) -> Self {
        Self::hash(&[&self.0, b"layer", diff_id.as_str().as_bytes()])
    }

    /// The state after a metadata-only change described by `what`.
    pub fn with_meta(&self, what: &[u8]) -> Self {
        Self::hash(&[&self.0, b"meta", what])
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// What one cached step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedLayer {
    pub diff_id: Digest,
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// The instruction cache on disk.
#[derive(Debug, Clone)]
pub struct InstructionCache {
    dir: PathBuf,
}

impl InstructionCache {
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The file of `key`'s entry.
    pub(crate) fn entry_path(&self, key: &StateKey) -> PathBuf {
        self.dir.join(format!("{}.json", key.hex()))
    }

    pub fn get(&self, key: &StateKey) -> Option<CachedLayer> {
        let bytes = std::fs::read(self.entry_path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records an entry (temp file + rename, so a reader never sees half of one).
    pub fn put(&self, key: &StateKey, entry: &CachedLayer) -> std::io::Result<()> {
        write_atomic(
            &self.entry_path(key),
            &serde_json::to_vec(entry).expect("cache entries serialize"),
        )
    }
}

/// Writes `bytes` to `path` through a temp file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache paths have a parent");
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_output_rejoins_the_chain() {
        let base = StateKey::scratch("linux/amd64");
        let d: Digest = format!("sha256:{}", "1".repeat(64)).parse().unwrap();
        // Two different instructions that produced the same layer lead to the same state.
        assert_ne!(base.step(b"COPY a /"), base.step(b"COPY b /"));
        assert_eq!(base.with_layer(&d), base.with_layer(&d));
    }

    #[test]
    fn entries_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = InstructionCache::open(dir.path().to_path_buf()).unwrap();
        let key = StateKey::scratch("linux/amd64").step(b"RUN true");
        assert_eq!(cache.get(&key), None);
        let d: Digest = format!("sha256:{}", "2".repeat(64)).parse().unwrap();
        let entry = CachedLayer {
            diff_id: d.clone(),
            digest: d,
            size: 3,
            media_type: "x".into(),
        };
        cache.put(&key, &entry).unwrap();
        assert_eq!(cache.get(&key), Some(entry));
    }
}
