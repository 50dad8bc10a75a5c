//! Online garbage collection of the embedded registry: blobs no manifest references, upload
//! sessions abandoned by their clients, and, by policy, tags of Kiln's own repositories
//! (its base images) unused for a while.
//!
//! **Why a push racing a collection stays complete.** A collection runs under the write side
//! of [`GcLock`]; every request that makes a blob *needed* takes the read side for its whole
//! length: a manifest `PUT` (which checks that its references are in the repository, then
//! links the manifest), a blob `HEAD` (by which clients decide to skip an upload), an upload's
//! completion and a cross-repository mount (which link a blob into a repository), and the
//! deletes. So each of those happens entirely before a collection, and is seen by its mark
//! phase, or entirely after it, and sees its result. The one gap is between requests: a
//! client that learned a blob exists (`HEAD`, mount, upload) and pushes the manifest that
//! references it in a later request. That gap is what the grace period covers: those requests
//! stamp the blob's modification time, and a collection removes only blobs unreferenced *and*
//! not stamped for `blob_grace`. A blob removed anyway (a client slower than the grace) is
//! never referenced by a stored manifest: its manifest `PUT` is refused with
//! `MANIFEST_BLOB_UNKNOWN` and the client uploads it again. Pulls take no lock: a collection
//! only removes what no manifest references.
//!
//! **Nothing outside the store.** Every path a collection removes is built from a name it
//! read from the store's own directories and parsed back ([`Digest`] hex, [`RepoName`],
//! [`Tag`], upload ids as UUIDs); what manifests say only marks digests, never names a file.

use std::{
    collections::HashSet,
    fs, io,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use uuid::Uuid;

use super::{
    manifests::{self, Kind},
    routes::{RepoName, Tag},
    Registry,
};
use crate::model::Digest;

/// The lock between collections (write) and the requests that make a blob needed (read).
pub type GcLock = tokio::sync::RwLock<()>;

/// What a collection removes, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcPolicy {
    /// An unreferenced blob is kept this long after it was last uploaded, mounted or checked
    /// with `HEAD` (a push in flight).
    pub blob_grace: Duration,
    /// An upload session is abandoned when its data has not grown for this long.
    pub upload_max_age: Duration,
    /// Repositories whose tags (and untagged manifests) are removed when unused — neither
    /// pushed nor pulled by tag — for the duration given. Kiln's base-image repository,
    /// under `storage.registry_keep_duration`; workspace images are not listed, so they stay.
    pub expiring: Vec<(String, Duration)>,
}

impl Default for GcPolicy {
    fn default() -> Self {
        Self {
            blob_grace: Duration::from_secs(3600),
            upload_max_age: Duration::from_secs(86_400),
            expiring: Vec::new(),
        }
    }
}

/// What one collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: u64,
    pub tags: u64,
    pub manifests: u64,
    pub uploads: u64,
    /// Bytes of blobs and upload data removed.
    pub bytes: u64,
}

/// The collector's state in the registry: the lock, the parsed policy and the running total.
#[derive(Debug)]
pub struct Collector {
    pub lock: GcLock,
    policy: GcPolicy,
    expiring: Vec<(RepoName, Duration)>,
    removed_bytes: AtomicU64,
}

impl Collector {
    pub fn new(policy: GcPolicy) -> io::Result<Self> {
        let expiring = policy
            .expiring
            .iter()
            .map(|(name, keep)| {
                RepoName::parse(name).map(|repo| (repo, *keep)).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{name:?} is not a repository name"),
                    )
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Self {
            lock: GcLock::default(),
            policy,
            expiring,
            removed_bytes: AtomicU64::new(0),
        })
    }

    /// Whether `repo`'s tags expire when unused (so pulls by tag stamp them).
    pub fn expires(&self, repo: &RepoName) -> bool {
        self.expiring.iter().any(|(r, _)| r == repo)
    }

    /// Bytes removed by every collection since the registry started
    /// (`kiln_gc_removed_bytes_total{kind="registry"}` counts them).
    pub fn removed_bytes(&self) -> u64 {
        self.removed_bytes.load(Ordering::Relaxed)
    }
}

/// Runs one collection (see the module's doc for why it is safe while pushes go on).
pub(super) async fn collect(registry: &std::sync::Arc<Registry>) -> io::Result<GcReport> {
    let _exclusive = registry.gc.lock.write().await;
    let started = std::time::Instant::now();
    let mut report = expire_uploads(registry).await?;
    let owned = registry.clone();
    let swept = tokio::task::spawn_blocking(move || mark_and_sweep(&owned))
        .await
        .map_err(io::Error::other)??;
    report.blobs = swept.blobs;
    report.tags = swept.tags;
    report.manifests = swept.manifests;
    report.bytes += swept.bytes;
    registry
        .gc
        .removed_bytes
        .fetch_add(report.bytes, Ordering::Relaxed);
    if report == GcReport::default() {
        tracing::debug!(elapsed = ?started.elapsed(), "registry garbage collected: nothing to remove");
    } else {
        tracing::info!(?report, elapsed = ?started.elapsed(), "registry garbage collected");
    }
    Ok(report)
}

/// How long ago `path` was last modified (zero if in the future).
fn age(meta: &fs::Metadata, now: SystemTime) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .unwrap_or_default()
}

/// Removes upload sessions whose data has not grown for `upload_max_age`, and upload files
/// no session owns.
async fn expire_uploads(registry: &Registry) -> io::Result<GcReport> {
    let mut report = GcReport::default();
    let max_age = registry.gc.policy.upload_max_age;
    let now = SystemTime::now();
    let dir = registry.storage.uploads_dir();
    let mut entries = tokio::fs::read_dir(&dir).await.map_err(at("listing", &dir))?;
    while let Some(entry) = entries.next_entry().await.map_err(at("listing", &dir))? {
        let Some(id) = entry.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) else {
            continue;
        };
        let meta = match entry.metadata().await {
            Ok(meta) => meta,
            // Completed or cancelled meanwhile (uploads run beside a collection).
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if age(&meta, now) < max_age {
            continue;
        }
        // A session a request holds is in use, whatever its age.
        if !registry.uploads.close_if_idle(id) {
            continue;
        }
        match tokio::fs::remove_file(registry.storage.upload_path(id)).await {
            Ok(()) => {
                report.uploads += 1;
                report.bytes += meta.len();
                tracing::debug!(upload = %id, "abandoned upload removed");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// The repositories under `repositories/`, by walking it (a repository is a directory with
/// `_layers` or `_manifests`; names that do not parse are not ours and are skipped).
fn repositories(root: &Path) -> io::Result<Vec<RepoName>> {
    let mut found = Vec::new();
    let mut pending = vec![String::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut is_repo = false;
        for entry in entries {
            let entry = entry.map_err(at("listing", &dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name == "_layers" || name == "_manifests" {
                is_repo = true;
            } else if !name.starts_with('_')
                && entry.file_type().map_err(at("reading", &entry.path()))?.is_dir()
            {
                pending.push(if relative.is_empty() {
                    name
                } else {
                    format!("{relative}/{name}")
                });
            }
        }
        if is_repo {
            if let Some(repo) = RepoName::parse(&relative) {
                found.push(repo);
            }
        }
    }
    Ok(found)
}

/// The digests named by the files of a `sha256` directory, with their metadata.
fn digests_in(dir: &Path) -> io::Result<Vec<(Digest, fs::Metadata)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(at("listing", dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(at("listing", dir))?;
        let parsed = entry
            .file_name()
            .to_str()
            .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
        if let Some(digest) = parsed {
            match entry.metadata() {
                Ok(meta) => found.push((digest, meta)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(at("reading", &entry.path())(e)),
            }
        }
    }
    Ok(found)
}

/// What a stored manifest references (its blobs, or its child manifests), read from the
/// content store; a manifest that no longer parses references nothing.
fn references(registry: &Registry, digest: &Digest, media_type: &str) -> io::Result<Vec<Digest>> {
    match fs::read(registry.storage.blob_path(digest)) {
        Ok(bytes) => Ok(manifests::check(Some(media_type), &bytes)
            .map(|checked| checked.references)
            .unwrap_or_default()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn remove(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(at("removing", path)(e)),
    }
}

/// Names the path an I/O error is about.
fn at<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Expires the policy's tags and manifests, marks every blob a manifest references, and
/// removes the rest once past the grace period, with the repositories' links to them.
/// Blocking; runs under the collector's write lock.
fn mark_and_sweep(registry: &Registry) -> io::Result<GcReport> {
    let storage = &registry.storage;
    let now = SystemTime::now();
    let mut report = GcReport::default();
    let repos = repositories(&storage.repositories_dir())?;
    let mut marked: HashSet<Digest> = HashSet::new();
    for repo in &repos {
        if let Some((_, keep)) = registry.gc.expiring.iter().find(|(r, _)| r == repo) {
            expire(registry, repo, *keep, now, &mut report)?;
        }
        for (digest, _) in digests_in(&storage.revisions_dir(repo))? {
            let media_type = match fs::read(storage.revision_link(repo, &digest)) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            marked.extend(references(registry, &digest, &media_type)?);
            marked.insert(digest);
        }
    }
    let grace = registry.gc.policy.blob_grace;
    let mut removed = HashSet::new();
    for (digest, meta) in digests_in(&storage.blobs_dir())? {
        if marked.contains(&digest) || age(&meta, now) < grace {
            continue;
        }
        if remove(&storage.blob_path(&digest))? {
            report.blobs += 1;
            report.bytes += meta.len();
            tracing::debug!(%digest, bytes = meta.len(), "unreferenced blob removed");
            removed.insert(digest);
        }
    }
    // Links to content that is gone (just now, or by an earlier collection that stopped).
    for repo in &repos {
        for (digest, _) in digests_in(&storage.layers_dir(repo))? {
            if removed.contains(&digest) || !storage.blob_path(&digest).exists() {
                remove(&storage.layer_link(repo, &digest))?;
            }
        }
    }
    Ok(report)
}

/// Removes `repo`'s tags unused for `keep`, then its manifests no tag points at that are as
/// old (and not a child of a manifest it keeps).
fn expire(
    registry: &Registry,
    repo: &RepoName,
    keep: Duration,
    now: SystemTime,
    report: &mut GcReport,
) -> io::Result<()> {
    let storage = &registry.storage;
    let mut kept: HashSet<Digest> = HashSet::new();
    let tags = match fs::read_dir(storage.tags_dir(repo)) {
        Ok(entries) => entries.collect::<io::Result<Vec<_>>>()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    for entry in tags {
        let Some(tag) = entry.file_name().to_str().and_then(Tag::parse) else {
            continue;
        };
        let path = storage.tags_dir(repo).join(tag.as_str());
        if age(&entry.metadata()?, now) >= keep {
            if remove(&path)? {
                report.tags += 1;
                tracing::debug!(repo = %repo, tag = %tag.as_str(), "unused tag removed");
            }
        } else if let Ok(target) = fs::read_to_string(&path) {
            if let Ok(digest) = target.trim().parse::<Digest>() {
                kept.insert(digest);
            }
        }
    }
    let revisions = digests_in(&storage.revisions_dir(repo))?;
    for (digest, meta) in &revisions {
        if kept.contains(digest) || age(meta, now) < keep {
            let media_type = fs::read_to_string(storage.revision_link(repo, digest)).unwrap_or_default();
            if manifests::kind_of(&media_type) == Some(Kind::Index) {
                kept.extend(references(registry, digest, &media_type)?);
            }
            kept.insert(digest.clone());
        }
    }
    for (digest, _) in revisions {
        if !kept.contains(&digest) && remove(&storage.revision_link(repo, &digest))? {
            report.manifests += 1;
        }
    }
    Ok(())
}
