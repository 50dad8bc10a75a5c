//! The layer store: pulled layers kept unpacked, content-addressed on disk, shared by every
//! build on this host.
//!
//! # Layout (under the store root)
//! - `by-diff-id/<hex>/` — an unpacked layer (an overlay lower directory), named by the
//!   SHA-256 of its uncompressed tar. Complete by construction: it only ever appears by an
//!   atomic `rename(2)` of a finished temporary directory, after `syncfs(2)`.
//! - `by-digest/<hex>` — index: compressed blob digest → `sha256:<diff_id>\n`, written to a
//!   temporary file and renamed, so one pulled blob is never unpacked twice; two blobs with
//!   the same content (say gzip and zstd of one tar) share one directory.
//! - `tmp/` — unpacks in progress. [`LayerStore::open`] deletes it, so a crash mid-unpack
//!   leaves nothing behind once the store is reopened.
//! - `.lock` — held with `flock(2)` while the store is open: one process owns a root.
//!
//! # Concurrency
//! [`LayerStore::ensure`] takes a per-blob async mutex (a `DashMap` of
//! `Arc<tokio::sync::Mutex>`, the entry removed when its last user leaves): of any number of
//! concurrent callers for one blob the first fetches and unpacks, the others wait and then
//! find the index entry. Callers for different blobs run in parallel. Unpacking runs on a
//! blocking thread. A caller that is cancelled mid-unpack releases the mutex while its
//! blocking unpack finishes in the background; a second unpack may then start, and the
//! loser of the final rename discards its copy, so the result is the same.

use std::{
    fs::{self, File},
    future::Future,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use dashmap::DashMap;
use nix::fcntl::{Flock, FlockArg};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::{mpsc, Mutex, OwnedMutexGuard},
};

use super::{
    compress::{HashingReader, LayerCompression},
    unpack::{unpack_tar, UnpackStats},
    LayerError,
};
use crate::model::Digest;

/// A layer blob as a manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Digest of the compressed blob; verified while unpacking.
    pub digest: Digest,
    pub media_type: String,
    /// The config's `rootfs.diff_ids` entry for this layer, verified when given.
    pub diff_id: Option<Digest>,
}

/// Where the compressed bytes of a blob come from; the registry download is the caller's.
pub enum BlobSource {
    /// A downloaded blob on disk.
    File(PathBuf),
    /// A blocking reader (read on a blocking thread).
    Reader(Box<dyn Read + Send>),
    /// An async reader, e.g. an HTTP response body (pumped to the unpacker by the caller's
    /// task).
    AsyncReader(Box<dyn AsyncRead + Send + Unpin>),
}

/// An unpacked layer in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLayer {
    pub digest: Digest,
    pub diff_id: Digest,
    /// The overlay lower directory.
    pub dir: PathBuf,
    /// What unpacking did, when this call unpacked the layer (`None`: it was stored already).
    pub unpacked: Option<UnpackStats>,
}

type Inflight = DashMap<Digest, Arc<Mutex<()>>>;

/// Pulled layers, unpacked and content-addressed on disk (see the module docs).
pub struct LayerStore {
    root: PathBuf,
    inflight: Inflight,
    _lock: Flock<File>,
}

impl std::fmt::Debug for LayerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

const BY_DIFF_ID: &str = "by-diff-id";
const BY_DIGEST: &str = "by-digest";
const TMP: &str = "tmp";

impl LayerStore {
    /// Opens (creating if needed) the store at `root`, taking its lock and deleting
    /// leftovers of interrupted unpacks. Blocking: it may remove large trees.
    pub fn open(root: PathBuf) -> Result<Self, LayerError> {
        for dir in [root.clone(), root.join(BY_DIFF_ID), root.join(BY_DIGEST)] {
            fs::create_dir_all(&dir).map_err(LayerError::io("creating", &dir))?;
        }
        let lock_path = root.join(".lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(LayerError::io("opening", &lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                LayerError::StoreLocked { root: root.clone() }
            } else {
                LayerError::io("locking", &lock_path)(errno.into())
            }
        })?;
        let tmp = root.join(TMP);
        match fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(LayerError::io("removing", &tmp)(e)),
        }
        fs::create_dir(&tmp).map_err(LayerError::io("creating", &tmp))?;
        spread_new_directories(&tmp);
        Ok(Self {
            root,
            inflight: DashMap::new(),
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The unpacked directory of the layer whose uncompressed tar has digest `diff_id`.
    /// How many layers are stored (reads a directory: blocking).
    pub fn entries(&self) -> io::Result<u64> {
        Ok(fs::read_dir(self.root.join(BY_DIFF_ID))?.count() as u64)
    }

    pub fn get(&self, diff_id: &Digest) -> Option<PathBuf> {
        let dir = self.root.join(BY_DIFF_ID).join(diff_id.hex());
        dir.is_dir().then_some(dir)
    }

    /// The stored layer of compressed blob `digest`, if it was unpacked before. Blocking
    /// (two small file system calls).
    pub fn lookup(&self, digest: &Digest) -> Option<StoredLayer> {
        let text = fs::read_to_string(self.index_path(digest)).ok()?;
        let diff_id: Digest = text.trim().parse().ok()?;
        let dir = self.get(&diff_id)?;
        Some(StoredLayer {
            digest: digest.clone(),
            diff_id,
            dir,
            unpacked: None,
        })
    }

    /// The stored layer of `blob`, fetching and unpacking it first if needed. `fetch` is
    /// called only when the blob is not stored yet, at most once per call, and of
    /// concurrent calls for the same blob only one calls it. The compressed digest (and
    /// the diff_id, when `blob` names one) are verified; on mismatch nothing is stored.
    pub async fn ensure<F, Fut, E>(&self, blob: &LayerBlob, fetch: F) -> Result<StoredLayer, LayerError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<BlobSource, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(found) = self.lookup_async(&blob.digest).await? {
            return Ok(found);
        }
        // The map's shard lock is released before awaiting; the Arc moves into the guard so
        // that `Flight::drop` sees only the map's reference when no one else is interested.
        let lock = self.inflight.entry(blob.digest.clone()).or_default().clone();
        let mut flight = Flight {
            inflight: &self.inflight,
            key: &blob.digest,
            guard: None,
        };
        flight.guard = Some(lock.lock_owned().await);
        if let Some(found) = self.lookup_async(&blob.digest).await? {
            return Ok(found);
        }
        LayerCompression::from_media_type(&blob.media_type)?;
        let source = fetch().await.map_err(|e| LayerError::Fetch {
            digest: blob.digest.clone(),
            source: e.into(),
        })?;
        let job = Publish {
            root: self.root.clone(),
            blob: blob.clone(),
            tmp: self.root.join(TMP).join(uuid::Uuid::new_v4().to_string()),
        };
        let what = blob.digest.to_string();
        let joined = match source {
            BlobSource::File(path) => {
                tokio::task::spawn_blocking(move || {
                    let file = File::open(&path).map_err(LayerError::io("opening", &path))?;
                    job.run(io::BufReader::with_capacity(1 << 20, file))
                })
                .await
            }
            BlobSource::Reader(reader) => tokio::task::spawn_blocking(move || job.run(reader)).await,
            BlobSource::AsyncReader(reader) => {
                let (tx, rx) = mpsc::channel(16);
                let unpack = tokio::task::spawn_blocking(move || job.run(ChannelReader::new(rx)));
                let ((), joined) = tokio::join!(pump(reader, tx), unpack);
                joined
            }
        };
        joined.map_err(|source| LayerError::Task { what, source })?
    }

    async fn lookup_async(&self, digest: &Digest) -> Result<Option<StoredLayer>, LayerError> {
        let text = match tokio::fs::read_to_string(self.index_path(digest)).await {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LayerError::io("reading", self.index_path(digest))(e)),
        };
        let Ok(diff_id) = text.trim().parse::<Digest>() else {
            return Ok(None);
        };
        let dir = self.root.join(BY_DIFF_ID).join(diff_id.hex());
        match tokio::fs::metadata(&dir).await {
            Ok(m) if m.is_dir() => Ok(Some(StoredLayer {
                digest: digest.clone(),
                diff_id,
                dir,
                unpacked: None,
            })),
            _ => Ok(None),
        }
    }

    fn index_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(BY_DIGEST).join(digest.hex())
    }
}

/// Holds one blob's mutex; on drop (also on cancellation) releases it and removes the map
/// entry when no one else holds or waits for it.
struct Flight<'a> {
    inflight: &'a Inflight,
    key: &'a Digest,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.inflight
            .remove_if(self.key, |_, m| Arc::strong_count(m) == 1);
    }
}

/// One unpack-and-publish job, run on a blocking thread.
struct Publish {
    root: PathBuf,
    blob: LayerBlob,
    tmp: PathBuf,
}

impl Publish {
    fn run(self, reader: impl Read + Send) -> Result<StoredLayer, LayerError> {
        let result = self.unpack_and_publish(reader);
        if result.is_err() {
            let _ = fs::remove_dir_all(&self.tmp);
        }
        result
    }

    fn unpack_and_publish(&self, reader: impl Read + Send) -> Result<StoredLayer, LayerError> {
        let started = Instant::now();
        let compression = LayerCompression::from_media_type(&self.blob.media_type)?;
        // Reading, hashing and decompressing run on a thread of their own, overlapped with
        // creating the files (each takes about half of a large layer's unpack time).
        let (stats, digest) = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD_CHUNKS);
            let producer = scope.spawn(move || decompress_into(reader, compression, tx));
            let stats = unpack_tar(SyncChannelReader::new(rx), &self.tmp);
            (stats, producer.join())
        });
        // The unpacker's error first: when it stops early the producer only sees a hang-up.
        let stats = stats?;
        let digest = match digest {
            Ok(digest) => digest?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let unpacked = started.elapsed();
        if digest != self.blob.digest {
            return Err(LayerError::DigestMismatch {
                what: "compressed digest",
                expected: self.blob.digest.clone(),
                actual: digest,
            });
        }
        if let Some(expected) = &self.blob.diff_id {
            if *expected != stats.diff_id {
                return Err(LayerError::DigestMismatch {
                    what: "diff_id",
                    expected: expected.clone(),
                    actual: stats.diff_id.clone(),
                });
            }
        }
        // Durable before visible: a published directory is never half-written.
        let tmp_dir = File::open(&self.tmp).map_err(LayerError::io("opening", &self.tmp))?;
        nix::unistd::syncfs(&tmp_dir).map_err(|e| LayerError::io("syncing", &self.tmp)(e.into()))?;
        drop(tmp_dir);
        tracing::info!(
            digest = %self.blob.digest,
            entries = stats.entries,
            tar_bytes = stats.tar_bytes,
            unpack_s = format_args!("{:.2}", unpacked.as_secs_f64()),
            sync_s = format_args!("{:.2}", (started.elapsed() - unpacked).as_secs_f64()),
            "layer unpacked"
        );
        let layers = self.root.join(BY_DIFF_ID);
        let dir = layers.join(stats.diff_id.hex());
        match fs::rename(&self.tmp, &dir) {
            Ok(()) => sync_dir(&layers)?,
            // Another blob with the same content (or a cancelled twin) got there first.
            Err(e) if dir.is_dir() && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                fs::remove_dir_all(&self.tmp).map_err(LayerError::io("removing", &self.tmp))?;
            }
            Err(e) => return Err(LayerError::io("publishing", &dir)(e)),
        }
        let index_dir = self.root.join(BY_DIGEST);
        let index_tmp = self.tmp.with_extension("index");
        let write_index = || -> io::Result<()> {
            let mut f = File::create(&index_tmp)?;
            writeln!(f, "{}", stats.diff_id)?;
            f.sync_all()?;
            fs::rename(&index_tmp, index_dir.join(self.blob.digest.hex()))
        };
        write_index().map_err(LayerError::io("writing index entry", &index_tmp))?;
        sync_dir(&index_dir)?;
        Ok(StoredLayer {
            digest: self.blob.digest.clone(),
            diff_id: stats.diff_id.clone(),
            dir,
            unpacked: Some(stats),
        })
    }
}

/// Uncompressed chunks in flight between [`decompress_into`] and the unpacker.
const READ_AHEAD_CHUNKS: usize = 8;
const READ_AHEAD_CHUNK_BYTES: usize = 256 * 1024;

/// Reads the compressed blob from `reader` (hashing it), decompresses it and sends the tar
/// stream in chunks to `tx`; a read or decompression error is sent too. Returns the
/// compressed digest (of the whole blob, trailing bytes included, as before).
fn decompress_into(
    reader: impl Read,
    compression: LayerCompression,
    tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
) -> Result<Digest, LayerError> {
    let mut hashing = HashingReader::new(reader);
    let hung_up = || LayerError::ReadArchive {
        source: io::Error::other("the unpacker stopped reading"),
    };
    {
        let mut tar = compression.decoder(&mut hashing)?;
        loop {
            let mut chunk = vec![0u8; READ_AHEAD_CHUNK_BYTES];
            match tar.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    chunk.truncate(n);
                    tx.send(Ok(chunk)).map_err(|_| hung_up())?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let message = e.to_string();
                    tx.send(Err(e)).map_err(|_| hung_up())?;
                    return Err(LayerError::ReadArchive {
                        source: io::Error::other(message),
                    });
                }
            }
        }
    }
    drop(tx);
    let (digest, _) = hashing
        .drain()
        .map_err(|source| LayerError::ReadArchive { source })?;
    Ok(digest)
}

/// The receiving end of [`decompress_into`], read by the unpacker.
struct SyncChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl SyncChannelReader {
    fn new(rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>) -> Self {
        Self {
            rx,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for SyncChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk?;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Asks ext2/3/4 to place every directory created directly in `dir` in a block group of
/// its own choosing (`FS_TOPDIR_FL`, `chattr +T`: the Orlov allocator spreads such
/// directories over the disk) instead of next to `dir`. Without it each unpack lands where
/// the previous ones were deleted, and ext4 without a journal skips inodes freed in the
/// last ~30 s one by one on every allocation: unpacking a Debian base layer (6,600
/// entries) took seconds of kernel CPU instead of under one. Only a placement hint, so
/// failures (other file systems) are ignored.
pub(crate) fn spread_new_directories(dir: &Path) {
    use std::os::fd::AsRawFd;
    const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;
    let Ok(file) = File::open(dir) else {
        return;
    };
    let fd = file.as_raw_fd();
    let mut flags: libc::c_int = 0;
    // SAFETY: both ioctls read or write one int through a valid pointer on an open fd.
    let set = unsafe {
        libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags as *mut libc::c_int) == 0
            && (flags & FS_TOPDIR_FL != 0 || {
                flags |= FS_TOPDIR_FL;
                libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags as *const libc::c_int) == 0
            })
    };
    if !set {
        tracing::debug!(dir = %dir.display(), error = %io::Error::last_os_error(), "cannot set FS_TOPDIR_FL");
    }
}

fn sync_dir(dir: &Path) -> Result<(), LayerError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(LayerError::io("syncing", dir))
}

/// Copies an async reader into the channel until EOF, an error (forwarded), or the
/// unpacker hanging up.
async fn pump(mut reader: Box<dyn AsyncRead + Send + Unpin>, tx: mpsc::Sender<io::Result<Vec<u8>>>) {
    loop {
        let mut buf = vec![0u8; 256 * 1024];
        match reader.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if tx.send(Ok(buf)).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

/// The blocking end of [`pump`].
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<io::Result<Vec<u8>>>) -> Self {
        Self {
            rx,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.chunk = chunk?;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::engine::layers::{MEDIA_TYPE_TAR, MEDIA_TYPE_TAR_GZIP};

    fn layer_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(5);
        b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn ensure_unpacks_then_reuses() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LayerStore::open(tmp.path().join("store")).unwrap();
        let tar = layer_tar();
        let blob = gzip(&tar);
        let desc = LayerBlob {
            digest: Digest::of(&blob),
            media_type: MEDIA_TYPE_TAR_GZIP.into(),
            diff_id: Some(Digest::of(&tar)),
        };
        let fetches = AtomicUsize::new(0);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            Ok::<_, io::Error>(BlobSource::Reader(Box::new(io::Cursor::new(blob.clone()))))
        };
        let first = store.ensure(&desc, fetch).await.unwrap();
        assert!(first.unpacked.is_some());
        assert_eq!(fs::read(first.dir.join("hello.txt")).unwrap(), b"hello");
        let again = store.ensure(&desc, fetch).await.unwrap();
        assert_eq!((again.unpacked, &again.dir), (None, &first.dir));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(store.get(&Digest::of(&tar)), Some(first.dir.clone()));
        assert_eq!(store.lookup(&desc.digest).unwrap().dir, first.dir);
        assert!(store.inflight.is_empty());
    }

    #[tokio::test]
    async fn mismatched_digests_store_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LayerStore::open(tmp.path().to_owned()).unwrap();
        let tar = layer_tar();
        let wrong = LayerBlob {
            digest: Digest::of(b"something else"),
            media_type: MEDIA_TYPE_TAR.into(),
            diff_id: None,
        };
        let fetch =
            || async { Ok::<_, io::Error>(BlobSource::Reader(Box::new(io::Cursor::new(tar.clone())))) };
        let err = store.ensure(&wrong, fetch).await.unwrap_err();
        assert!(matches!(err, LayerError::DigestMismatch { .. }), "{err}");
        let bad_diff = LayerBlob {
            digest: Digest::of(&tar),
            media_type: MEDIA_TYPE_TAR.into(),
            diff_id: Some(Digest::of(b"nope")),
        };
        let err = store.ensure(&bad_diff, fetch).await.unwrap_err();
        assert!(
            matches!(err, LayerError::DigestMismatch { what: "diff_id", .. }),
            "{err}"
        );
        assert_eq!(fs::read_dir(tmp.path().join(BY_DIFF_ID)).unwrap().count(), 0);
        assert_eq!(fs::read_dir(tmp.path().join(TMP)).unwrap().count(), 0);
        let failing = || async { Err::<BlobSource, _>(io::Error::other("registry down")) };
        let err = store.ensure(&bad_diff, failing).await.unwrap_err();
        assert!(err.to_string().contains("registry down"), "{err}");
    }

    #[test]
    fn open_cleans_temporaries_and_locks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s");
        {
            let _store = LayerStore::open(root.clone()).unwrap();
            fs::create_dir_all(root.join(TMP).join("half/usr/bin")).unwrap();
            assert!(matches!(
                LayerStore::open(root.clone()),
                Err(LayerError::StoreLocked { .. })
            ));
        }
        let _store = LayerStore::open(root.clone()).unwrap();
        assert_eq!(fs::read_dir(root.join(TMP)).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn broken_blobs_fail_and_store_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LayerStore::open(tmp.path().to_owned()).unwrap();
        // Large enough to span several read-ahead chunks.
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..40 {
            let data: Vec<u8> = (0..100_000u32)
                .map(|n| (n.wrapping_mul(2654435761) >> (i % 24)) as u8)
                .collect();
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
        }
        let blob = gzip(&b.into_inner().unwrap());
        let truncated = blob[..blob.len() / 2].to_vec();
        let mut corrupted = blob.clone();
        let middle = corrupted.len() / 2;
        corrupted[middle..middle + 64].fill(0xff);
        for bytes in [truncated, corrupted] {
            let desc = LayerBlob {
                digest: Digest::of(&bytes),
                media_type: MEDIA_TYPE_TAR_GZIP.into(),
                diff_id: None,
            };
            let fetch =
                || async { Ok::<_, io::Error>(BlobSource::Reader(Box::new(io::Cursor::new(bytes.clone())))) };
            let err = store.ensure(&desc, fetch).await.unwrap_err();
            assert!(matches!(err, LayerError::ReadArchive { .. }), "{err}");
        }
        assert_eq!(fs::read_dir(tmp.path().join(BY_DIFF_ID)).unwrap().count(), 0);
        assert_eq!(fs::read_dir(tmp.path().join(TMP)).unwrap().count(), 0);
    }

    #[test]
    fn new_directories_are_spread_on_ext4() {
        const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;
        let tmp = tempfile::tempdir().unwrap();
        let _store = LayerStore::open(tmp.path().to_owned()).unwrap();
        let on_ext4 = nix::sys::statfs::statfs(tmp.path())
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC);
        if !on_ext4 {
            return; // a hint other file systems may ignore
        }
        let dir = File::open(tmp.path().join(TMP)).unwrap();
        let mut flags: libc::c_int = 0;
        // SAFETY: reads one int through a valid pointer on an open fd.
        let got = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                libc::FS_IOC_GETFLAGS,
                &mut flags as *mut libc::c_int,
            )
        };
        assert_eq!(got, 0, "{}", io::Error::last_os_error());
        assert_ne!(flags & FS_TOPDIR_FL, 0, "tmp/ should carry FS_TOPDIR_FL");
    }

    #[test]
    fn channel_reader_forwards_chunks_and_errors() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(b"ab".to_vec())).unwrap();
        tx.try_send(Ok(b"cd".to_vec())).unwrap();
        tx.try_send(Err(io::Error::other("boom"))).unwrap();
        drop(tx);
        let mut r = ChannelReader::new(rx);
        let mut out = [0u8; 3];
        assert_eq!(r.read(&mut out).unwrap(), 2);
        assert_eq!(r.read(&mut out).unwrap(), 2);
        assert!(r.read(&mut out).is_err());
        assert_eq!(r.read(&mut out).unwrap(), 0);
    }
}
