//! The engine store's disk budget: how many bytes each kind of entry takes, which entries
//! running builds hold, and the garbage collection that keeps the store under its budget.
//!
//! # Units
//! GC removes *units*, each all or nothing:
//! - a **layer** (`layers/by-diff-id/<diff id>`) together with the instruction-cache entries
//!   naming it (`cache/<key>.json`) and the blobs those entries name (`blobs/<digest>`): an
//!   entry and the layer it points to go together, and the entries go first, so a cache
//!   lookup never finds half of one;
//! - a **blob** no cache entry names (left by a process that died between the two writes);
//! - a **cache mount** directory (`cache-mounts/<hash>`).
//!
//! # Accounting
//! [`Storage::open`] walks the store once; afterwards every addition is reported by the code
//! that made it ([`Storage::layer_added`], [`Storage::committed`],
//! [`Storage::cache_mount_measured`]), measured on what was just written, so no build walks
//! the whole store. Uploaded contexts (`<data_dir>/contexts`, expired by
//! [`super::context::ContextStore`]) are counted from one directory listing per report.
//!
//! # Leases
//! A build holds a [`Lease`] for its whole run and pins every unit it uses (a layer it pulled
//! or found in the cache, a layer it committed, a cache mount) before using it. GC never
//! picks a pinned unit, and a unit GC has picked cannot be pinned until it is gone
//! ([`Lease::pin`] answers `false`, [`Lease::pin_wait`] waits), so nothing a build uses
//! disappears under it. Directories are removed by renaming them into `tmp/` first, so a
//! lookup sees a layer whole or not at all. Dropping a lease marks its units used now: GC
//! removes the least recently used first.
//!
//! # Collection
//! When an addition takes the store past its budget (or cache mounts past theirs), a
//! background thread removes unpinned units, least recently used first, down to 90% of the
//! budget, and every unit unused for `keep_duration`. [`Storage::prune`] does the same on
//! demand (`kiln admin prune`). Every name GC removes is a hex digest or hash it read from
//! its own root directories, checked to be one plain path component, so nothing outside
//! the store roots is ever removed; removal never follows a symlink.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, SystemTime},
};

use crate::model::Digest;

/// What the store holds, as `kiln_storage_bytes{kind}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// Unpacked layers (`engine/layers`).
    Layers,
    /// Compressed layers the engine made (`engine/blobs`).
    Blobs,
    /// Instruction-cache entries (`engine/cache`).
    InstructionCache,
    /// `RUN --mount=type=cache` directories (`engine/cache-mounts`).
    CacheMounts,
    /// Uploaded build contexts (`contexts`); not part of the engine budget.
    Contexts,
}

impl StoreKind {
    pub const ALL: [StoreKind; 5] = [
        StoreKind::Layers,
        StoreKind::Blobs,
        StoreKind::InstructionCache,
        StoreKind::CacheMounts,
        StoreKind::Contexts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Layers => "layers",
            Self::Blobs => "blobs",
            Self::InstructionCache => "instruction_cache",
            Self::CacheMounts => "cache_mounts",
            Self::Contexts => "contexts",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How much the engine store may hold and how it is collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoragePolicy {
    /// The engine store's budget (layers, blobs, cache entries, cache mounts).
    pub max_bytes: u64,
    /// Cache mounts' own budget, within `max_bytes`.
    pub cache_mounts_max_bytes: Option<u64>,
    /// Units unused this long are removed even under the budget.
    pub keep_duration: Option<Duration>,
    /// Whether the store collects by itself; `prune` works either way.
    pub gc: bool,
}

/// One kind's line of `kiln admin du`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindUsage {
    pub kind: StoreKind,
    pub bytes: u64,
    /// The kind's own budget, if it has one.
    pub budget: Option<u64>,
    /// Bytes GC removed of this kind since the start.
    pub removed: u64,
}

/// What `kiln admin prune` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneGoal {
    /// Every unit no build holds.
    All,
    /// Least recently used units until the store holds at most this many bytes.
    Keep(u64),
}

/// Bytes removed by one collection, per kind (indexed like [`StoreKind::ALL`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed(pub [u64; KINDS]);

impl Removed {
    pub fn of(&self, kind: StoreKind) -> u64 {
        self.0[kind.index()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// The data dir's filesystem is full: `used` of `size` bytes. Its text is what a build that
/// failed on it ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no space left on the data dir (used {} of {})", human_bytes(*.used), human_bytes(*.size))]
pub struct DiskFull {
    pub used: u64,
    pub size: u64,
}

const KINDS: usize = StoreKind::ALL.len();
/// Below this many bytes available to unprivileged writers (what RUN steps are), the
/// filesystem counts as full: a step that failed then failed for want of space.
const FULL_MARGIN: u64 = 1 << 20;
/// How often an addition also sweeps units older than `keep_duration`.
const AGE_SWEEP_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum UnitId {
    Layer(String),
    Blob(String),
    CacheMount(String),
}

#[derive(Debug, Clone)]
struct Unit {
    /// The unit's directory (a layer's or a cache mount's), in bytes on disk.
    dir: u64,
    /// Instruction-cache entries (key hex → bytes), removed first.
    entries: BTreeMap<String, u64>,
    /// Blobs (digest hex → bytes).
    blobs: BTreeMap<String, u64>,
    last_used: SystemTime,
}

impl Unit {
    fn new(last_used: SystemTime) -> Self {
        Self {
            dir: 0,
            entries: BTreeMap::new(),
            blobs: BTreeMap::new(),
            last_used,
        }
    }

    fn bytes(&self, id: &UnitId) -> [u64; KINDS] {
        let mut out = [0; KINDS];
        let dir_kind = match id {
            UnitId::CacheMount(_) => StoreKind::CacheMounts,
            UnitId::Layer(_) | UnitId::Blob(_) => StoreKind::Layers,
        };
        out[dir_kind.index()] += self.dir;
        out[StoreKind::InstructionCache.index()] += self.entries.values().sum::<u64>();
        out[StoreKind::Blobs.index()] += self.blobs.values().sum::<u64>();
        out
    }
}

#[derive(Debug, Default)]
struct Books {
    units: HashMap<UnitId, Unit>,
    pins: HashMap<UnitId, usize>,
    /// Units GC picked and is removing: not pinnable until gone.
    removing: HashSet<UnitId>,
    /// Which layer unit holds a blob.
    blob_owner: HashMap<String, UnitId>,
    used: [u64; KINDS],
    last_age_sweep: Option<SystemTime>,
}

impl Books {
    fn add(&mut self, delta: [u64; KINDS]) {
        for (u, d) in self.used.iter_mut().zip(delta) {
            *u += d;
        }
    }

    fn sub(&mut self, delta: [u64; KINDS]) {
        for (u, d) in self.used.iter_mut().zip(delta) {
            *u = u.saturating_sub(d);
        }
    }

    /// Replaces `id`'s unit by `change(unit)`, keeping the totals right.
    fn update(&mut self, id: UnitId, now: SystemTime, change: impl FnOnce(&mut Unit)) {
        let unit = self.units.entry(id.clone()).or_insert_with(|| Unit::new(now));
        let before = unit.bytes(&id);
        change(unit);
        unit.last_used = unit.last_used.max(now);
        let after = unit.bytes(&id);
        self.sub(before);
        self.add(after);
    }

    fn engine_total(&self) -> u64 {
        self.used.iter().sum::<u64>() - self.used[StoreKind::Contexts.index()]
    }
}

/// The engine store's books and its collector (see the module docs). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Storage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    contexts: Option<PathBuf>,
    policy: StoragePolicy,
    books: Mutex<Books>,
    collecting: AtomicBool,
    removed: [AtomicU64; KINDS],
}

const LAYERS: &str = "layers/by-diff-id";
const BLOBS: &str = "blobs";
const CACHE: &str = "cache";
const CACHE_MOUNTS: &str = "cache-mounts";
const TMP: &str = "tmp";

impl Storage {
    /// Opens the books of the engine store at `root` (the engine's data directory), walking
    /// it once; `contexts` is the uploaded-context store's root, counted too. Blocking.
    pub fn open(root: &Path, contexts: Option<PathBuf>, policy: StoragePolicy) -> io::Result<Self> {
        let mut books = Books::default();
        let mtime = |m: &fs::Metadata| m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        for (name, meta) in hex_entries(&root.join(LAYERS))? {
            let bytes = disk_usage(&root.join(LAYERS).join(&name));
            books.update(UnitId::Layer(name), mtime(&meta), |u| u.dir = bytes);
        }
        for (name, meta) in hex_entries(&root.join(CACHE_MOUNTS))? {
            let bytes = disk_usage(&root.join(CACHE_MOUNTS).join(&name));
            books.update(UnitId::CacheMount(name), mtime(&meta), |u| u.dir = bytes);
        }
        let mut blobs: HashMap<String, (u64, SystemTime)> = hex_entries(&root.join(BLOBS))?
            .into_iter()
            .map(|(name, meta)| (name, (allocated(&meta), mtime(&meta))))
            .collect();
        for entry in fs::read_dir(root.join(CACHE))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".json").filter(|k| is_hex(k)) else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            let named = fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<super::build::CachedLayer>(&b).ok());
            let Some(named) = named else {
                // Unreadable: nothing can hit it; it goes with nothing.
                let _ = fs::remove_file(entry.path());
                continue;
            };
            let (diff, blob) = (named.diff_id.hex().to_owned(), named.digest.hex().to_owned());
            let blob_bytes = blobs.remove(&blob);
            let id = UnitId::Layer(diff);
            books.update(id.clone(), mtime(&meta), |u| {
                u.entries.insert(key.to_owned(), allocated(&meta));
                if let Some((bytes, _)) = blob_bytes {
                    u.blobs.insert(blob.clone(), bytes);
                }
            });
            books.blob_owner.insert(blob, id);
        }
        for (name, (bytes, used)) in blobs {
            books.update(UnitId::Blob(name.clone()), used, |u| {
                u.blobs.insert(name.clone(), bytes);
            });
        }
        let storage = Self {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                contexts,
                policy,
                books: Mutex::new(books),
                collecting: AtomicBool::new(false),
                removed: Default::default(),
            }),
        };
        let total = storage.books().engine_total();
        tracing::info!(
            bytes = total,
            budget = storage.inner.policy.max_bytes,
            gc = storage.inner.policy.gc,
            "engine store opened"
        );
        storage.maybe_collect();
        Ok(storage)
    }

    pub fn policy(&self) -> &StoragePolicy {
        &self.inner.policy
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        // The books are plain numbers: a panic elsewhere cannot leave them half-changed.
        self.inner.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new lease for one build (or one pre-fetch).
    pub fn lease(&self) -> Lease {
        Lease {
            storage: self.clone(),
            pinned: Mutex::new(Vec::new()),
        }
    }

    /// A layer directory appeared in the layer store (`bytes` on disk).
    pub fn layer_added(&self, diff_id: &Digest, bytes: u64) {
        let now = SystemTime::now();
        self.books()
            .update(UnitId::Layer(diff_id.hex().to_owned()), now, |u| u.dir = bytes);
        self.maybe_collect();
    }

    /// A step was committed: the cache entry `key` names layer `diff_id` and blob `digest`
    /// (`blob_bytes` when this commit wrote the blob).
    pub fn committed(&self, diff_id: &Digest, digest: &Digest, blob_bytes: u64, key: &str, entry_bytes: u64) {
        let now = SystemTime::now();
        let blob = digest.hex().to_owned();
        let id = UnitId::Layer(diff_id.hex().to_owned());
        let mut books = self.books();
        // A blob a dead process left without an entry now belongs to this layer.
        if let Some(orphan) = books.units.remove(&UnitId::Blob(blob.clone())) {
            let bytes = orphan.bytes(&UnitId::Blob(blob.clone()));
            books.sub(bytes);
        }
        books.update(id.clone(), now, |u| {
            u.entries.insert(key.to_owned(), entry_bytes);
            u.blobs.insert(blob.clone(), blob_bytes);
        });
        books.blob_owner.insert(blob, id);
        drop(books);
        self.maybe_collect();
    }

    /// Cache mount `name` (its directory's name) now takes `bytes`.
    pub fn cache_mount_measured(&self, name: &str, bytes: u64) {
        let now = SystemTime::now();
        self.books()
            .update(UnitId::CacheMount(name.to_owned()), now, |u| u.dir = bytes);
        self.maybe_collect();
    }

    /// Usage per kind, contexts counted from one listing of their directory.
    pub fn usage(&self) -> Vec<KindUsage> {
        let contexts = self.contexts_bytes();
        let books = self.books();
        StoreKind::ALL
            .iter()
            .map(|&kind| KindUsage {
                kind,
                bytes: match kind {
                    StoreKind::Contexts => contexts,
                    k => books.used[k.index()],
                },
                budget: match kind {
                    StoreKind::CacheMounts => self.inner.policy.cache_mounts_max_bytes,
                    _ => None,
                },
                removed: self.inner.removed[kind.index()].load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The engine store's bytes (every kind but contexts).
    pub fn engine_bytes(&self) -> u64 {
        self.books().engine_total()
    }

    fn contexts_bytes(&self) -> u64 {
        let Some(dir) = &self.inner.contexts else { return 0 };
        fs::read_dir(dir.join("sha256"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| allocated(&m))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The filesystem of the engine store when it is full for unprivileged writers.
    pub fn disk_full(&self) -> Option<DiskFull> {
        let (now, available) = self.statvfs()?;
        (available < FULL_MARGIN).then_some(now)
    }

    /// The filesystem's use now (for the message of a write that failed with ENOSPC).
    pub fn disk_use(&self) -> DiskFull {
        self.statvfs()
            .map(|(now, _)| now)
            .unwrap_or(DiskFull { used: 0, size: 0 })
    }

    /// The store filesystem's use, and the bytes unprivileged writers may still take.
    fn statvfs(&self) -> Option<(DiskFull, u64)> {
        let fs = nix::sys::statvfs::statvfs(&self.inner.root).ok()?;
        let frsize = fs.fragment_size();
        let size = fs.blocks() * frsize;
        let used = size.saturating_sub(fs.blocks_free() * frsize);
        Some((DiskFull { used, size }, fs.blocks_available() * frsize))
    }

    /// Starts a background collection when the store is past a budget (or an age sweep is
    /// due) and none runs.
    fn maybe_collect(&self) {
        if !self.inner.policy.gc || !self.needs_collection() {
            return;
        }
        self.collect_in_background();
    }

    /// Starts a background collection down to the budget, whatever the usage (a build ran
    /// out of space), unless one runs or GC is off.
    pub fn collect_soon(&self) {
        if self.inner.policy.gc {
            self.collect_in_background();
        }
    }

    fn collect_in_background(&self) {
        if self.inner.collecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let storage = self.clone();
        let spawned = std::thread::Builder::new()
            .name("kiln-store-gc".into())
            .spawn(move || {
                let policy = &storage.inner.policy;
                let removed = storage.collect(policy.max_bytes / 10 * 9, policy.keep_duration);
                storage.inner.collecting.store(false, Ordering::Release);
                if removed.total() > 0 {
                    tracing::info!(
                        removed = removed.total(),
                        left = storage.engine_bytes(),
                        "engine store collected"
                    );
                }
            });
        if let Err(e) = spawned {
            self.inner.collecting.store(false, Ordering::Release);
            tracing::warn!(error = %e, "starting the engine store's collection");
        }
    }

    fn needs_collection(&self) -> bool {
        let policy = &self.inner.policy;
        let books = self.books();
        let mounts_over = policy
            .cache_mounts_max_bytes
            .is_some_and(|max| books.used[StoreKind::CacheMounts.index()] > max);
        let age_due = policy.keep_duration.is_some()
            && books
                .last_age_sweep
                .is_none_or(|t| t.elapsed().unwrap_or_default() >= AGE_SWEEP_EVERY);
        books.engine_total() > policy.max_bytes || mounts_over || age_due
    }

    /// Removes what `goal` asks for of what no build holds (`kiln admin prune`). Blocking.
    pub fn prune(&self, goal: PruneGoal) -> Removed {
        let keep = match goal {
            PruneGoal::All => 0,
            PruneGoal::Keep(bytes) => bytes,
        };
        self.collect(keep, None)
    }

    /// One collection: unpinned units, least recently used first, until the engine store
    /// holds at most `target` and cache mounts at most their budget, plus every unit unused
    /// for `older_than`. Blocking.
    fn collect(&self, target: u64, older_than: Option<Duration>) -> Removed {
        let now = SystemTime::now();
        let cutoff = older_than.and_then(|d| now.checked_sub(d));
        let victims: Vec<(UnitId, Unit)> = {
            let mut books = self.books();
            if cutoff.is_some() {
                books.last_age_sweep = Some(now);
            }
            let mut candidates: Vec<(&UnitId, &Unit)> = books
                .units
                .iter()
                .filter(|(id, _)| !books.pins.contains_key(*id) && !books.removing.contains(*id))
                .collect();
            candidates.sort_by_key(|(id, u)| (u.last_used, (*id).clone()));
            let mut total = books.engine_total();
            let mut mounts = books.used[StoreKind::CacheMounts.index()];
            let mounts_max = self.inner.policy.cache_mounts_max_bytes.unwrap_or(u64::MAX);
            let mut picked = Vec::new();
            for (id, unit) in candidates {
                let is_mount = matches!(id, UnitId::CacheMount(_));
                let old = cutoff.is_some_and(|c| unit.last_used < c);
                if old || total > target || (is_mount && mounts > mounts_max) {
                    let bytes: u64 = unit.bytes(id).iter().sum();
                    total = total.saturating_sub(bytes);
                    if is_mount {
                        mounts = mounts.saturating_sub(bytes);
                    }
                    picked.push((id.clone(), unit.clone()));
                }
            }
            for (id, _) in &picked {
                books.removing.insert(id.clone());
            }
            picked
        };
        let mut removed = Removed::default();
        for (id, unit) in victims {
            let bytes = unit.bytes(&id);
            match self.remove_unit(&id, &unit) {
                Ok(()) => {
                    for (r, b) in removed.0.iter_mut().zip(bytes) {
                        *r += b;
                    }
                    for (counter, b) in self.inner.removed.iter().zip(bytes) {
                        counter.fetch_add(b, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::warn!(unit = ?id, error = %e, "removing from the engine store"),
            }
            let mut books = self.books();
            books.removing.remove(&id);
            // Whatever failed to go is gone from the books too: the next start counts it.
            if let Some(unit) = books.units.remove(&id) {
                let bytes = unit.bytes(&id);
                books.sub(bytes);
            }
            for blob in unit.blobs.keys() {
                if books.blob_owner.get(blob) == Some(&id) {
                    books.blob_owner.remove(blob);
                }
            }
        }
        removed
    }

    /// Deletes one unit's files: cache entries, then blobs, then its directory (renamed into
    /// `tmp/` first, so it vanishes at once).
    fn remove_unit(&self, id: &UnitId, unit: &Unit) -> io::Result<()> {
        let root = &self.inner.root;
        for key in unit.entries.keys() {
            remove_file_if_any(&inside(&root.join(CACHE), &format!("{key}.json"))?)?;
        }
        for blob in unit.blobs.keys() {
            remove_file_if_any(&inside(&root.join(BLOBS), blob)?)?;
        }
        let dir = match id {
            UnitId::Layer(hex) => inside(&root.join(LAYERS), hex)?,
            UnitId::CacheMount(name) => inside(&root.join(CACHE_MOUNTS), name)?,
            UnitId::Blob(_) => return Ok(()),
        };
        let trash = root.join(TMP).join(format!("gc-{}", uuid::Uuid::new_v4()));
        match fs::rename(&dir, &trash) {
            Ok(()) => fs::remove_dir_all(&trash),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A build's hold on the units it uses; released (and the units marked used) on drop.
#[derive(Debug)]
pub struct Lease {
    storage: Storage,
    pinned: Mutex<Vec<UnitId>>,
}

impl Lease {
    /// Pins layer `diff_id`; `false` when GC is removing it right now.
    pub fn pin_layer(&self, diff_id: &Digest) -> bool {
        self.pin(UnitId::Layer(diff_id.hex().to_owned()))
    }

    /// Pins layer `diff_id`, waiting while GC removes it.
    pub async fn pin_layer_wait(&self, diff_id: &Digest) {
        while !self.pin_layer(diff_id) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pins blob `digest` (the layer unit holding it, or the blob alone), waiting while GC
    /// removes it.
    pub async fn pin_blob_wait(&self, digest: &Digest) {
        loop {
            let id = {
                let books = self.storage.books();
                books
                    .blob_owner
                    .get(digest.hex())
                    .cloned()
                    .unwrap_or_else(|| UnitId::Blob(digest.hex().to_owned()))
            };
            if self.pin(id) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pins cache mount `name` (its directory's name), waiting while GC removes it.
    pub async fn pin_cache_mount_wait(&self, name: &str) {
        while !self.pin(UnitId::CacheMount(name.to_owned())) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pin(&self, id: UnitId) -> bool {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if pinned.contains(&id) {
            return true;
        }
        let mut books = self.storage.books();
        if books.removing.contains(&id) {
            return false;
        }
        *books.pins.entry(id.clone()).or_default() += 1;
        pinned.push(id);
        true
    }

    /// The storage this lease holds units of.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let pinned = std::mem::take(self.pinned.get_mut().unwrap_or_else(|p| p.into_inner()));
        let now = SystemTime::now();
        let mut books = self.storage.books();
        for id in pinned {
            if let Some(n) = books.pins.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    books.pins.remove(&id);
                }
            }
            if let Some(unit) = books.units.get_mut(&id) {
                unit.last_used = now;
            }
        }
        drop(books);
        self.storage.maybe_collect();
    }
}

/// `bytes` as people read them: the largest binary unit with one decimal (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, factor) in UNITS {
        if bytes >= factor {
            return format!("{:.1} {name}", bytes as f64 / factor as f64);
        }
    }
    format!("{bytes} B")
}

/// Bytes a tree takes on disk (allocated blocks, each inode once), never following a
/// symlink or leaving the tree's filesystem. Blocking.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(top) = fs::symlink_metadata(path) else {
        return 0;
    };
    let device = top.dev();
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![(path.to_owned(), top)];
    while let Some((p, meta)) = stack.pop() {
        if meta.dev() != device {
            continue;
        }
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino()) {
            continue;
        }
        total += allocated(&meta);
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&p) {
                for e in entries.flatten() {
                    if let Ok(m) = e.metadata() {
                        stack.push((e.path(), m));
                    }
                }
            }
        }
    }
    total
}

fn allocated(meta: &fs::Metadata) -> u64 {
    meta.blocks() * 512
}

fn is_hex(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The entries of `dir` whose names are hex (the only names the store gives), with their
/// metadata (not followed).
fn hex_entries(dir: &Path) -> io::Result<Vec<(String, fs::Metadata)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_hex(&name) {
            if let Ok(meta) = entry.metadata() {
                out.push((name, meta));
            }
        }
    }
    Ok(out)
}

/// `root/name` for a `name` that is one plain hex component (with an optional `.json`), so
/// the path cannot leave `root`.
fn inside(root: &Path, name: &str) -> io::Result<PathBuf> {
    let stem = name.strip_suffix(".json").unwrap_or(name);
    if !is_hex(stem) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a store entry name"),
        ));
    }
    Ok(root.join(name))
}

fn remove_file_if_any(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap()
    }

    fn store(max_bytes: u64) -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        for d in [LAYERS, BLOBS, CACHE, CACHE_MOUNTS, TMP] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let policy = StoragePolicy {
            max_bytes,
            cache_mounts_max_bytes: None,
            keep_duration: None,
            gc: false,
        };
        let storage = Storage::open(dir.path(), None, policy).unwrap();
        (dir, storage)
    }

    /// A committed layer on disk: directory, blob and cache entry, recorded.
    fn commit(root: &Path, storage: &Storage, diff: char, blob: char, key: char) {
        let (diff, blob) = (digest(diff), digest(blob));
        let dir = root.join(LAYERS).join(diff.hex());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("f"), vec![1u8; 64 << 10]).unwrap();
        storage.layer_added(&diff, disk_usage(&dir));
        fs::write(root.join(BLOBS).join(blob.hex()), vec![2u8; 32 << 10]).unwrap();
        let key = key.to_string().repeat(64);
        let entry = format!(r#"{{"diff_id":"{diff}","digest":"{blob}","size":1,"media_type":"x"}}"#);
        fs::write(root.join(CACHE).join(format!("{key}.json")), entry).unwrap();
        storage.committed(&diff, &blob, 32 << 10, &key, 4096);
    }

    #[test]
    fn the_books_match_a_walk_after_reopening() {
        let (dir, storage) = store(1 << 30);
        commit(dir.path(), &storage, 'a', 'b', 'c');
        let mounts = dir.path().join(CACHE_MOUNTS).join("0f");
        fs::create_dir_all(&mounts).unwrap();
        fs::write(mounts.join("x"), vec![0u8; 8192]).unwrap();
        storage.cache_mount_measured("0f", disk_usage(&mounts));
        let before = storage.usage();
        drop(storage);
        let reopened = Storage::open(dir.path(), None, store(1).1.policy().clone()).unwrap();
        let after = reopened.usage();
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(b.bytes, a.bytes, "{:?}", b.kind);
        }
        assert!(after[StoreKind::Layers.index()].bytes >= 64 << 10);
        assert!(after[StoreKind::CacheMounts.index()].bytes >= 8192);
    }

    #[test]
    fn pruning_removes_the_least_recently_used_whole_and_spares_pinned_units() {
        let (dir, storage) = store(1 << 30);
        let root = dir.path();
        commit(root, &storage, 'a', 'b', 'c');
        std::thread::sleep(Duration::from_millis(20));
        commit(root, &storage, 'd', 'e', 'f');
        let one_layer = storage.engine_bytes() / 2;
        // Keep room for one: the older goes, entry, blob and directory together.
        let removed = storage.prune(PruneGoal::Keep(one_layer + 1));
        assert!(removed.of(StoreKind::Layers) > 0 && removed.of(StoreKind::Blobs) > 0);
        assert!(!root.join(LAYERS).join(digest('a').hex()).exists());
        assert!(!root.join(BLOBS).join(digest('b').hex()).exists());
        assert!(!root.join(CACHE).join(format!("{}.json", "c".repeat(64))).exists());
        assert!(root.join(LAYERS).join(digest('d').hex()).exists());

        let lease = storage.lease();
        assert!(lease.pin_layer(&digest('d')));
        assert_eq!(storage.prune(PruneGoal::All).total(), 0, "a pinned unit stays");
        assert!(root.join(BLOBS).join(digest('e').hex()).exists());
        drop(lease);
        assert!(storage.prune(PruneGoal::All).total() > 0);
        assert_eq!(storage.engine_bytes(), 0);
        assert!(!root.join(LAYERS).join(digest('d').hex()).exists());
    }

    #[test]
    fn a_unit_being_removed_cannot_be_pinned_and_a_pinned_one_is_not_picked() {
        let (dir, storage) = store(1 << 30);
        commit(dir.path(), &storage, 'a', 'b', 'c');
        let layer = UnitId::Layer(digest('a').hex().to_owned());
        storage.books().removing.insert(layer.clone());
        let lease = storage.lease();
        assert!(!lease.pin_layer(&digest('a')), "GC is removing it: a miss");
        storage.books().removing.remove(&layer);
        assert!(lease.pin_layer(&digest('a')));
        assert_eq!(storage.collect(0, Some(Duration::ZERO)).total(), 0);
        assert!(dir.path().join(LAYERS).join(digest('a').hex()).exists());
    }

    #[test]
    fn units_unused_for_keep_duration_go_even_under_the_budget() {
        let (dir, storage) = store(1 << 30);
        commit(dir.path(), &storage, 'a', 'b', 'c');
        std::thread::sleep(Duration::from_millis(30));
        commit(dir.path(), &storage, 'd', 'e', 'f');
        let removed = storage.collect(u64::MAX, Some(Duration::from_millis(20)));
        assert!(removed.total() > 0);
        assert!(!dir.path().join(LAYERS).join(digest('a').hex()).exists());
        assert!(
            dir.path().join(LAYERS).join(digest('d').hex()).exists(),
            "used recently"
        );
    }

    #[test]
    fn gc_never_removes_through_a_symlink_or_outside_its_root() {
        let (dir, storage) = store(1 << 30);
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("precious"), b"keep").unwrap();
        let mount = dir.path().join(CACHE_MOUNTS).join("ab");
        fs::create_dir_all(&mount).unwrap();
        std::os::unix::fs::symlink(outside.path(), mount.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("precious"), mount.join("file")).unwrap();
        storage.cache_mount_measured("ab", disk_usage(&mount));
        // A name that is not the store's own is never joined to a root.
        assert!(inside(dir.path(), "../x").is_err());
        assert!(inside(dir.path(), "..").is_err());
        storage.prune(PruneGoal::All);
        assert!(!mount.exists());
        assert_eq!(fs::read(outside.path().join("precious")).unwrap(), b"keep");
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(10), "10 B");
    }
}
