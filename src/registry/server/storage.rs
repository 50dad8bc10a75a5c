//! The registry's on-disk layout under its root, and every write to it.
//!
//! ```text
//! blobs/sha256/<hex>                                  content (layers, configs and manifests)
//! repositories/<name>/_layers/sha256/<hex>            empty: the repo has this blob
//! repositories/<name>/_manifests/revisions/sha256/<hex>  the repo has this manifest; holds its media type
//! repositories/<name>/_manifests/tags/<tag>           holds the digest the tag points at
//! uploads/<uuid>                                      data of an upload in progress
//! tmp/<uuid>                                          staging for atomic writes
//! ```
//!
//! Every file that readers see is written to a temporary file and renamed into place, so a
//! reader sees either nothing or the whole file, and two writers of the same blob (same
//! digest, so same bytes) cannot corrupt it. Paths are built only from [`RepoName`], [`Tag`]
//! and [`Digest`], whose grammars rule out `..`, absolute paths and the `_` prefix of the
//! directories above. Deleting only unlinks; content no manifest references is removed by
//! the garbage collector (`gc`), which reads this layout through the accessors below. Blob
//! and tag files' modification times are *stamps*: a blob's is renewed whenever a push
//! shows it needs it (upload, mount, `HEAD`), a tag's when it is pushed or pulled by tag in
//! a repository whose tags expire; the collector's grace period and expiry read them.

use std::{
    io,
    path::{Path, PathBuf},
};

use tokio::{fs, io::AsyncWriteExt};
use uuid::Uuid;

use super::routes::{RepoName, Tag};
use crate::model::Digest;

/// The registry's files.
#[derive(Debug)]
pub struct Storage {
    root: PathBuf,
}

impl Storage {
    /// Opens (creating if needed) the layout under `root`. Upload sessions live in memory, so
    /// any upload data left by a previous process is unreachable and is removed, as is staging.
    pub async fn open(root: PathBuf) -> io::Result<Self> {
        let storage = Self { root };
        for dir in ["uploads", "tmp"] {
            match fs::remove_dir_all(storage.root.join(dir)).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        crate::private_fs::create_dir_all(&storage.root)?;
        for dir in ["blobs/sha256", "repositories", "uploads", "tmp"] {
            create_private_dirs(&storage.root.join(dir)).await?;
        }
        Ok(storage)
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    pub(super) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub(super) fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }

    pub(super) fn repositories_dir(&self) -> PathBuf {
        self.root.join("repositories")
    }

    pub(super) fn layers_dir(&self, repo: &RepoName) -> PathBuf {
        self.repo_dir(repo).join("_layers/sha256")
    }

    pub(super) fn revisions_dir(&self, repo: &RepoName) -> PathBuf {
        self.repo_dir(repo).join("_manifests/revisions/sha256")
    }

    /// Renews blob `digest`'s stamp: a push needs it (see the module's doc).
    pub async fn stamp_blob(&self, digest: &Digest) -> io::Result<()> {
        stamp(self.blob_path(digest)).await
    }

    /// Renews `tag`'s stamp in `repo`: it was used.
    pub async fn stamp_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<()> {
        stamp(self.tags_dir(repo).join(tag.as_str())).await
    }

    /// Where a new upload's data goes.
    pub fn upload_path(&self, id: Uuid) -> PathBuf {
        self.root.join("uploads").join(id.to_string())
    }

    fn repo_dir(&self, repo: &RepoName) -> PathBuf {
        self.repositories_dir().join(repo.as_str())
    }

    pub(super) fn layer_link(&self, repo: &RepoName, digest: &Digest) -> PathBuf {
        self.layers_dir(repo).join(digest.hex())
    }

    pub(super) fn revision_link(&self, repo: &RepoName, digest: &Digest) -> PathBuf {
        self.revisions_dir(repo).join(digest.hex())
    }

    pub(super) fn tags_dir(&self, repo: &RepoName) -> PathBuf {
        self.repo_dir(repo).join("_manifests/tags")
    }

    /// Writes `bytes` to `dest` atomically (staging file, fsync, rename).
    async fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        if let Some(parent) = dest.parent() {
            create_private_dirs(parent).await?;
        }
        let staging = self.root.join("tmp").join(Uuid::new_v4().to_string());
        let result = async {
            let mut file = crate::private_fs::tokio_options()
                .write(true)
                .create_new(true)
                .open(&staging)
                .await?;
            file.write_all(bytes).await?;
            file.sync_all().await?;
            drop(file);
            fs::rename(&staging, dest).await
        }
        .await;
        if result.is_err() {
            let _ = fs::remove_file(&staging).await;
        }
        result
    }

    /// Moves a finished, verified upload file into the content store. If the blob is already
    /// there, the identical content just replaces it atomically.
    pub async fn commit_blob(&self, data: &Path, digest: &Digest) -> io::Result<()> {
        fs::rename(data, self.blob_path(digest)).await
    }

    /// The size of a stored blob, if it is stored.
    pub async fn blob_size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.blob_path(digest)).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens a stored blob with its size.
    pub async fn open_blob(&self, digest: &Digest) -> io::Result<Option<(fs::File, u64)>> {
        match fs::File::open(self.blob_path(digest)).await {
            Ok(file) => {
                let len = file.metadata().await?.len();
                Ok(Some((file, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records that `repo` has blob `digest`, and renews the blob's stamp.
    pub async fn link_blob(&self, repo: &RepoName, digest: &Digest) -> io::Result<()> {
        self.write_atomic(&self.layer_link(repo, digest), b"").await?;
        self.stamp_blob(digest).await
    }

    /// Whether `repo` has blob `digest` (as a layer/config, or as a manifest) and its content
    /// is stored.
    pub async fn blob_in_repo(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        let linked = exists(&self.layer_link(repo, digest)).await?
            || exists(&self.revision_link(repo, digest)).await?;
        Ok(linked && exists(&self.blob_path(digest)).await?)
    }

    /// Removes `repo`'s link to blob `digest`; whether there was one.
    pub async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        remove_if_present(&self.layer_link(repo, digest)).await
    }

    /// Stores a verified manifest: its bytes in the content store, a revision link holding
    /// its media type, and (if given) the tag pointing at it.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
        tag: Option<&Tag>,
    ) -> io::Result<()> {
        if self.blob_size(digest).await? != Some(bytes.len() as u64) {
            self.write_atomic(&self.blob_path(digest), bytes).await?;
        }
        self.write_atomic(&self.revision_link(repo, digest), media_type.as_bytes())
            .await?;
        if let Some(tag) = tag {
            self.write_atomic(
                &self.tags_dir(repo).join(tag.as_str()),
                digest.as_str().as_bytes(),
            )
            .await?;
        }
        Ok(())
    }

    /// The media type of manifest `digest` in `repo`, if the repo has it.
    pub async fn manifest_media_type(&self, repo: &RepoName, digest: &Digest) -> io::Result<Option<String>> {
        match fs::read(self.revision_link(repo, digest)).await {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The digest `tag` points at in `repo`.
    pub async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<Option<Digest>> {
        match fs::read_to_string(self.tags_dir(repo).join(tag.as_str())).await {
            Ok(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes manifest `digest` from `repo`, with every tag pointing at it; whether the repo
    /// had it.
    pub async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> io::Result<bool> {
        if !remove_if_present(&self.revision_link(repo, digest)).await? {
            return Ok(false);
        }
        for tag in self.tags(repo).await?.unwrap_or_default() {
            if self.resolve_tag(repo, &tag).await?.as_ref() == Some(digest) {
                remove_if_present(&self.tags_dir(repo).join(tag.as_str())).await?;
            }
        }
        Ok(true)
    }

    /// Removes `tag` from `repo`; whether it existed.
    pub async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<bool> {
        remove_if_present(&self.tags_dir(repo).join(tag.as_str())).await
    }

    /// Whether anything was ever pushed to `repo` (its directory alone is not enough: it is
    /// also the parent of `repo/child`).
    pub async fn repo_exists(&self, repo: &RepoName) -> io::Result<bool> {
        let dir = self.repo_dir(repo);
        Ok(exists(&dir.join("_layers")).await? || exists(&dir.join("_manifests")).await?)
    }

    /// `repo`'s tags, sorted; `None` if the repository does not exist.
    pub async fn tags(&self, repo: &RepoName) -> io::Result<Option<Vec<Tag>>> {
        if !self.repo_exists(repo).await? {
            return Ok(None);
        }
        let mut tags = Vec::new();
        let mut entries = match fs::read_dir(self.tags_dir(repo)).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(tags)),
            Err(e) => return Err(e),
        };
        while let Some(entry) = entries.next_entry().await? {
            // Anything that is not a valid tag is not ours (a stray file): skip it.
            if let Some(tag) = entry.file_name().to_str().and_then(Tag::parse) {
                tags.push(tag);
            }
        }
        tags.sort();
        Ok(Some(tags))
    }
}

/// Sets `path`'s modification time to now (nothing if it is gone).
async fn stamp(path: PathBuf) -> io::Result<()> {
    tokio::task::spawn_blocking(
        move || match filetime::set_file_mtime(&path, filetime::FileTime::now()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    )
    .await
    .map_err(io::Error::other)?
}

async fn exists(path: &Path) -> io::Result<bool> {
    fs::try_exists(path).await
}

async fn remove_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `create_dir_all` whose new directories are 0700: the registry's content is Kiln's own.
pub(super) async fn create_private_dirs(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(crate::private_fs::DIR_MODE)
        .create(path)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[tokio::test]
    async fn layout_links_tags_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_path_buf()).await.unwrap();
        let a = repo("team/app");
        assert!(!storage.repo_exists(&a).await.unwrap());
        assert_eq!(storage.tags(&a).await.unwrap(), None);

        // A blob goes through an upload file and is renamed into the store.
        let data = b"layer bytes";
        let digest = Digest::of(data);
        let upload = storage.upload_path(Uuid::new_v4());
        fs::write(&upload, data).await.unwrap();
        storage.commit_blob(&upload, &digest).await.unwrap();
        assert!(!upload.exists());
        assert_eq!(
            std::fs::read(dir.path().join("blobs/sha256").join(digest.hex())).unwrap(),
            data
        );
        assert!(!storage.blob_in_repo(&a, &digest).await.unwrap());
        storage.link_blob(&a, &digest).await.unwrap();
        assert!(storage.blob_in_repo(&a, &digest).await.unwrap());
        assert!(!storage.blob_in_repo(&repo("team"), &digest).await.unwrap());
        // The parent of a repository is not a repository.
        assert!(storage.repo_exists(&a).await.unwrap());
        assert!(!storage.repo_exists(&repo("team")).await.unwrap());
        assert_eq!(storage.tags(&repo("team")).await.unwrap(), None);

        let manifest = br#"{"schemaVersion":2}"#;
        let md = Digest::of(manifest);
        let v1 = Tag::parse("v1").unwrap();
        storage
            .put_manifest(&a, &md, "application/x-test", manifest, Some(&v1))
            .await
            .unwrap();
        assert_eq!(storage.resolve_tag(&a, &v1).await.unwrap(), Some(md.clone()));
        assert_eq!(
            storage.manifest_media_type(&a, &md).await.unwrap().as_deref(),
            Some("application/x-test")
        );
        assert_eq!(storage.tags(&a).await.unwrap(), Some(vec![v1.clone()]));
        // Manifests are readable as blobs of the repo too.
        assert!(storage.blob_in_repo(&a, &md).await.unwrap());

        assert!(storage.delete_manifest(&a, &md).await.unwrap());
        assert!(!storage.delete_manifest(&a, &md).await.unwrap());
        assert_eq!(storage.resolve_tag(&a, &v1).await.unwrap(), None);
        assert!(storage.unlink_blob(&a, &digest).await.unwrap());
        assert!(!storage.blob_in_repo(&a, &digest).await.unwrap());
        // Content stays (until a garbage collection); staging is empty.
        assert_eq!(storage.blob_size(&digest).await.unwrap(), Some(data.len() as u64));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn reopening_discards_stale_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_path_buf()).await.unwrap();
        let stale = storage.upload_path(Uuid::new_v4());
        fs::write(&stale, b"partial").await.unwrap();
        drop(storage);
        Storage::open(dir.path().to_path_buf()).await.unwrap();
        assert!(!stale.exists());
    }
}
