//! The log fan-out: every build's log, kept on disk with a tail in memory, served to any
//! number of readers from any byte offset.
//!
//! One writer per build (its build actor) appends with [`Append`], naming the offset it
//! believes is the end; an append the log already holds is acknowledged without writing
//! again, so a writer may resend after a crash on either side and no byte is lost or
//! doubled. Readers pull bytes with [`Read`] and learn about new bytes through the watch
//! channel that [`Subscribe`] hands out (see [`super::handles::LogsHandle::follow`]).
//!
//! A log holds at most `logs.max_bytes_per_build` bytes of build output (plus one marker
//! line), its *head* and its *tail*, as BuildKit clips: the first half of the cap is written
//! live; output past it is *diverted* to a bounded tail on disk (`<build id>.clip/`, segment
//! files of half the cap each, the oldest deleted as a new one starts, so at most the cap's
//! size on disk), and `Finish` appends one [`clip_marker`] line and the last bytes of that
//! tail. The log's offset space stays append-only (nothing published is ever rewritten), so a
//! follower reading from 0 and a read after the end get the same bytes; while output is
//! diverted followers simply see nothing new. Writers address appends in their own offset
//! space (every byte they sent, stored or diverted; [`Opened::append_at`]), so resends stay
//! idempotent across clipping and across restarts: the clip directory's segment names
//! (`<head>-<segment size>-<index>`) tell a new incarnation where the head ended and how much
//! was diverted. The build goes on whatever it prints, and neither disk nor memory grows with
//! it: memory per log is bounded by `logs.memory_bytes_per_build`, the tail is copied to the
//! log in bounded chunks.
//!
//! **No file I/O on the arbiter.** The actor only keeps books in memory ([`LogState`]:
//! what is accepted, the tail, the cap); every file operation runs on a blocking thread:
//! - each live log has a *writer* (a task in the fan-out's context that hands batches of
//!   jobs to `spawn_blocking`, one batch at a time), so a build's appends reach the file in
//!   the order they were accepted, and a slow disk under one build holds up only that
//!   build's writer. An append is answered once its bytes are in the file; the progress
//!   watch (what readers see) moves at the same moment;
//! - a log this incarnation has not seen yet is *loaded* (stat of the file and its `.end`
//!   marker) on a blocking thread; the messages that arrive meanwhile wait, in order, and
//!   are then handled as if they had arrived after the load;
//! - a [`Read`] below the in-memory tail reads the file on a blocking thread.
//!
//! Writes are positioned (`pwrite` at the offset the fan-out accepted), not appends: a write
//! handed to a blocking thread by an incarnation that then crashed may land after the next
//! incarnation has taken the same bytes again from the writer's resend, and then writes the
//! same bytes at the same place. `Finish` cuts the file at the accepted length before its
//! `fsync`, so a late write past what the next incarnation wrote cannot outlive the log. A failed write poisons its writer (later jobs of the batch
//! fail too, so the file never gets a hole) and the fan-out forgets the log's books; the next
//! message loads them again from the file.
//!
//! The disk is the source of truth (`<data_dir>/logs/<build id>.log`, plus a `.end` marker
//! when the log is complete), so a restarted fan-out rebuilds its view lazily from the files;
//! readers whose watch channel closed with the old incarnation subscribe again.
//!
//! One fan-out serves every log: per message it does a map lookup and a few bounded copies
//! (at most [`READ_CHUNK`] bytes), never a system call, so 200 followers cost it microseconds
//! per chunk they read; sharding by build id would buy nothing until that work, not I/O, is
//! what limits it.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::supervision::{ChildGuard, Crash, INJECTED_CRASH};
use crate::{metrics::Metrics, model::BuildId};

/// The largest chunk one [`Read`] returns.
pub const READ_CHUNK: usize = 64 * 1024;

/// How far a build's log has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogProgress {
    /// Bytes in the log.
    pub len: u64,
    /// No more bytes will come.
    pub ended: bool,
}

/// Bytes read from a log, with the log's progress at the time of the read.
#[derive(Debug, Clone)]
pub struct LogChunk {
    pub data: Bytes,
    pub progress: LogProgress,
}

/// Why a log operation failed. `Storage` may succeed when tried again (the fan-out reloads
/// the log from its file); the others will not.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("no log for build {0}")]
    NotFound(BuildId),
    #[error("log of build {build} is complete; nothing can be appended")]
    Ended { build: BuildId },
    #[error("append to the log of build {build} at offset {offset} leaves a gap (log has {len} bytes)")]
    Gap { build: BuildId, offset: u64, len: u64 },
    #[error("log storage for build {build}: {what}: {source}")]
    Storage {
        build: BuildId,
        what: &'static str,
        #[source]
        source: Arc<io::Error>,
    },
}

impl LogError {
    fn storage<'a>(build: &'a BuildId, what: &'static str) -> impl FnOnce(io::Error) -> Self + 'a {
        move |e| Self::Storage {
            build: build.clone(),
            what,
            source: Arc::new(e),
        }
    }
}

/// Creates an empty log for a new build (idempotent).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Opened, LogError>")]
pub struct Open {
    pub build: BuildId,
}

/// An open log: what readers see, and where the writer's next [`Append`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub progress: LogProgress,
    /// The writer's offset: every byte appended so far, stored or diverted to the clipped
    /// tail. Equal to `progress.len` until the log passes half of its cap.
    pub append_at: u64,
}

/// Appends `data` at `offset`, in the writer's offset space ([`Opened::append_at`]): replies
/// the writer's next offset. Past half of `logs.max_bytes_per_build` the bytes go to the
/// clipped tail and readers see them (the last of them) only when the log is finished.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<u64, LogError>")]
pub struct Append {
    pub build: BuildId,
    pub offset: u64,
    pub data: Bytes,
    /// Kiln's own line rather than the build's output: written to the head even past half
    /// of the cap (once the log is clipped, it goes to the tail like any output).
    pub kiln: bool,
}

/// The line between a clipped log's head and its tail.
pub fn clip_marker(clipped: u64) -> String {
    format!("[… {clipped} bytes clipped …] (logs.max_bytes_per_build)\n")
}

/// Marks the log complete (idempotent); every follower's stream then ends.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<LogProgress, LogError>")]
pub struct Finish {
    pub build: BuildId,
}

/// Reads up to [`READ_CHUNK`] bytes from `offset`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<LogChunk, LogError>")]
pub struct Read {
    pub build: BuildId,
    pub offset: u64,
}

/// A watch on a log's progress. The channel closes if this incarnation of the fan-out dies.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<watch::Receiver<LogProgress>, LogError>")]
pub struct Subscribe {
    pub build: BuildId,
}

/// Deletes a log (its build left retention).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Forget {
    pub build: BuildId,
}

// ---------------------------------------------------------------------------------------
// The books: plain data, no I/O.

/// Where a clipped log's tail lives: the log's head ended at `head` bytes, and output past it
/// is diverted to segment files of `segment` bytes each (of the writer's offsets
/// `head + k × segment ..`). Both are in the segments' names, so they survive a restart and a
/// change of the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Clip {
    head: u64,
    segment: u64,
}

impl Clip {
    /// The name of segment `index`.
    fn segment_name(self, index: u64) -> String {
        format!("{}-{}-{index}", self.head, self.segment)
    }

    /// Parses a segment's name into its clip and index.
    fn parse(name: &str) -> Option<(Self, u64)> {
        let mut parts = name.splitn(3, '-').map(|p| p.parse::<u64>().ok());
        let (head, segment, index) = (parts.next()??, parts.next()??, parts.next()??);
        (segment > 0).then_some((Self { head, segment }, index))
    }
}

/// Output diverted to a clipped log's tail: `bytes` at the writer's offset `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Diverted {
    at: u64,
    bytes: Bytes,
    clip: Clip,
}

/// What an [`Append`] asks of the files.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Accepted {
    /// Nothing to write (a resend); the writer's next offset is `next` once the writes
    /// accepted before are done.
    Nothing { next: u64 },
    /// Write `log` (at its offset) to the log and `divert` to the clipped tail; the writer's
    /// next offset is then `next`.
    Store {
        log: Option<(u64, Bytes)>,
        divert: Option<Diverted>,
        next: u64,
    },
}

/// One log's books: what has been accepted (written or queued for the writer), the tail
/// kept for readers, and the clip once the head is full.
#[derive(Debug, Clone)]
struct LogState {
    /// Bytes of the log file accepted: its length once every queued write is done.
    accepted: u64,
    /// The writer's offset: `accepted` plus every byte diverted to the clipped tail.
    input: u64,
    /// `Finish` was accepted (or the log was complete when loaded): appends are refused.
    ending: bool,
    /// Set once the head is full: further output goes to the tail.
    clip: Option<Clip>,
    /// The last accepted bytes of the log file, starting at `tail_start`, for cheap reads by
    /// followers.
    tail: Vec<u8>,
    tail_start: u64,
}

impl LogState {
    /// The books of a log found on disk.
    fn loaded(found: &Found) -> Self {
        let (accepted, input, clip) = match found.clip {
            Some((clip, input)) if !found.progress.ended => (clip.head, input, Some(clip)),
            _ => (found.progress.len, found.progress.len, None),
        };
        Self {
            accepted,
            input,
            ending: found.progress.ended,
            clip,
            tail: Vec::new(),
            tail_start: accepted,
        }
    }

    /// Takes an append into the books: idempotent by offset, refused after `Finish` or past
    /// a gap; build output past half of `cap` is diverted to the clipped tail (Kiln's own
    /// lines only once the log is clipped).
    fn accept(
        &mut self,
        build: &BuildId,
        offset: u64,
        data: &[u8],
        kiln: bool,
        cap: u64,
        memory_limit: usize,
    ) -> Result<Accepted, LogError> {
        let input = self.input;
        let end = offset + data.len() as u64;
        if end <= input {
            return Ok(Accepted::Nothing { next: input }); // already taken: a resend after a lost reply
        }
        if self.ending {
            return Err(LogError::Ended { build: build.clone() });
        }
        if offset > input {
            return Err(LogError::Gap {
                build: build.clone(),
                offset,
                len: input,
            });
        }
        let new_bytes = &data[(input - offset) as usize..];
        let head_cap = cap / 2;
        let to_log = match self.clip {
            Some(_) => 0,
            None if kiln => new_bytes.len(),
            None => (head_cap.saturating_sub(self.accepted) as usize).min(new_bytes.len()),
        };
        let (logged, diverted) = new_bytes.split_at(to_log);
        if !diverted.is_empty() && self.clip.is_none() {
            tracing::warn!(build_id = %build, cap, "build log clipped (logs.max_bytes_per_build): keeping its head and tail");
            self.clip = Some(Clip {
                head: self.accepted + logged.len() as u64,
                segment: (cap - head_cap).max(1),
            });
        }
        let log = (!logged.is_empty()).then(|| {
            let at = self.accepted;
            self.tail.extend_from_slice(logged);
            if self.tail.len() > memory_limit {
                let drop = self.tail.len() - memory_limit;
                self.tail.drain(..drop);
                self.tail_start += drop as u64;
            }
            self.accepted += logged.len() as u64;
            (at, Bytes::copy_from_slice(logged))
        });
        let divert = match (self.clip, diverted.is_empty()) {
            (Some(clip), false) => Some(Diverted {
                at: input + logged.len() as u64,
                bytes: Bytes::copy_from_slice(diverted),
                clip,
            }),
            _ => None,
        };
        self.input = end;
        Ok(Accepted::Store {
            log,
            divert,
            next: end,
        })
    }

    /// Bytes `[offset, min(published, offset + READ_CHUNK))` if the tail holds them.
    fn tail_bytes(&self, offset: u64, published: u64) -> Option<Bytes> {
        if offset < self.tail_start || offset >= published {
            return None;
        }
        let from = (offset - self.tail_start) as usize;
        let to = (published - self.tail_start)
            .min(self.tail.len() as u64)
            .min((from + READ_CHUNK) as u64) as usize;
        (from < to).then(|| Bytes::copy_from_slice(&self.tail[from..to]))
    }

    /// The log is complete, `len` bytes long: a finished log is read from disk, so keep no
    /// copy in memory.
    fn ended(&mut self, len: u64) {
        self.ending = true;
        self.accepted = len;
        self.input = len;
        self.clip = None;
        self.tail = Vec::new();
        self.tail_start = len;
    }
}

// ---------------------------------------------------------------------------------------
// The files: blocking functions, only ever called on blocking threads.

fn log_path(dir: &Path, build: &BuildId) -> PathBuf {
    dir.join(format!("{build}.log"))
}

fn end_path(dir: &Path, build: &BuildId) -> PathBuf {
    dir.join(format!("{build}.end"))
}

/// The directory of a clipped log's tail segments.
fn clip_dir(dir: &Path, build: &BuildId) -> PathBuf {
    dir.join(format!("{build}.clip"))
}

/// Why a log could not be loaded.
enum LoadError {
    NotFound,
    Io(&'static str, io::Error),
}

/// A log as found on disk.
struct Found {
    progress: LogProgress,
    /// The clip and the writer's offset, if output was diverted to a tail.
    clip: Option<(Clip, u64)>,
}

/// The log's length and completeness on disk, and its clipped tail if it has one; with
/// `create`, an empty log if there is none.
fn load_blocking(dir: &Path, build: &BuildId, create: bool) -> Result<Found, LoadError> {
    let path = log_path(dir, build);
    if create {
        crate::private_fs::create_dir_all(dir).map_err(|e| LoadError::Io("creating the log directory", e))?;
        crate::private_fs::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| LoadError::Io("creating the log file", e))?;
    }
    let len = match fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(LoadError::NotFound),
        Err(e) => return Err(LoadError::Io("reading the log file's size", e)),
    };
    let ended = end_path(dir, build).exists();
    let clips = clip_dir(dir, build);
    let clip = if ended {
        // A finish that stopped between the `.end` marker and removing the tail.
        let _ = fs::remove_dir_all(&clips);
        None
    } else {
        last_segment(&clips).map_err(|e| LoadError::Io("reading the log's clipped tail", e))?
    };
    let len = clip.map_or(len, |(clip, _)| clip.head);
    Ok(Found {
        progress: LogProgress { len, ended },
        clip,
    })
}

/// The clip of the newest segment in `clips` and the writer's offset at its end.
fn last_segment(clips: &Path) -> io::Result<Option<(Clip, u64)>> {
    let entries = match fs::read_dir(clips) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut newest: Option<(Clip, u64, u64)> = None;
    for entry in entries {
        let entry = entry?;
        let Some((clip, index)) = entry.file_name().to_str().and_then(Clip::parse) else {
            continue;
        };
        if newest.is_none_or(|(_, i, _)| index >= i) {
            newest = Some((clip, index, entry.metadata()?.len()));
        }
    }
    Ok(newest.map(|(clip, index, len)| (clip, clip.head + index * clip.segment + len)))
}

/// Up to `want` bytes of the file at `path` from `offset`.
fn read_blocking(path: &Path, offset: u64, want: usize) -> io::Result<Bytes> {
    let file = File::open(path)?;
    let mut buf = vec![0; want];
    let mut filled = 0;
    while filled < want {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(Bytes::from(buf))
}

/// How much of a clipped tail is copied into the log at once when it is finished.
const TAIL_COPY_CHUNK: usize = 1 << 20;

/// The end of a clipped log: its tail, `keep` bytes of it at most, goes after the marker.
#[derive(Debug, Clone, Copy)]
struct TailEnd {
    clip: Clip,
    /// The writer's offset: where the diverted output ends.
    input: u64,
    keep: u64,
}

/// One job for a log's writer; `done` gets its outcome.
enum Job {
    /// Write `log` to the log file and `divert` to the clipped tail.
    Write {
        log: Option<(u64, Bytes)>,
        divert: Option<Diverted>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Nothing; done once every earlier job is.
    Barrier(oneshot::Sender<io::Result<()>>),
    /// Append the marker and the clipped tail (if any), cut the file at its length, flush it
    /// to disk and write the `.end` marker; answers the log's final length.
    End {
        len: u64,
        tail: Option<TailEnd>,
        done: oneshot::Sender<io::Result<u64>>,
    },
}

/// The file side of a writer, moved to a blocking thread for each batch.
struct WriterFile {
    path: PathBuf,
    end_path: PathBuf,
    clip_dir: PathBuf,
    file: Option<File>,
    /// The tail segment being written, by index.
    segment: Option<(u64, File)>,
    /// The first write error; every later job fails with it, so the file never gets a hole.
    poisoned: Option<(io::ErrorKind, String)>,
}

impl WriterFile {
    fn file(&mut self) -> io::Result<&File> {
        if self.file.is_none() {
            // Not O_APPEND: positioned writes must land at their offset.
            self.file = Some(OpenOptions::new().write(true).open(&self.path)?);
        }
        Ok(self.file.as_ref().expect("opened above"))
    }

    /// Segment `index` of the tail, created if new; starting one deletes the one before
    /// its predecessor, so the tail keeps between one and two segments of the newest output.
    fn segment(&mut self, clip: Clip, index: u64) -> io::Result<&File> {
        if self.segment.as_ref().is_none_or(|(i, _)| *i != index) {
            crate::private_fs::create_dir_all(&self.clip_dir)?;
            let file = crate::private_fs::options()
                .create(true)
                .write(true)
                .read(true)
                .truncate(false)
                .open(self.clip_dir.join(clip.segment_name(index)))?;
            if let Some(old) = index.checked_sub(2) {
                match fs::remove_file(self.clip_dir.join(clip.segment_name(old))) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            self.segment = Some((index, file));
        }
        Ok(&self.segment.as_ref().expect("opened above").1)
    }

    /// Writes diverted output into the tail's segments.
    fn divert(&mut self, diverted: &Diverted) -> io::Result<()> {
        let Diverted { mut at, bytes, clip } = diverted;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let relative = at - clip.head;
            let (index, within) = (relative / clip.segment, relative % clip.segment);
            let n = rest.len().min((clip.segment - within) as usize);
            self.segment(*clip, index)?.write_all_at(&rest[..n], within)?;
            rest = &rest[n..];
            at += n as u64;
        }
        Ok(())
    }

    /// Appends the marker and the last `keep` bytes of the tail after the head; answers the
    /// log's new length. Copies in bounded chunks: the tail may be half the cap.
    fn append_tail(&mut self, tail: TailEnd) -> io::Result<u64> {
        let TailEnd { clip, input, keep } = tail;
        let diverted = input - clip.head;
        let keep = keep.min(diverted).min(clip.segment);
        let newline = clip.head > 0 && read_blocking(&self.path, clip.head - 1, 1)?.first() != Some(&b'\n');
        let marker = format!(
            "{}{}",
            if newline { "\n" } else { "" },
            clip_marker(diverted - keep)
        );
        self.file()?.write_all_at(marker.as_bytes(), clip.head)?;
        let mut to = clip.head + marker.len() as u64;
        let mut from = input - keep;
        while from < input {
            let relative = from - clip.head;
            let (index, within) = (relative / clip.segment, relative % clip.segment);
            let want = ((input - from).min(clip.segment - within) as usize).min(TAIL_COPY_CHUNK);
            let path = self.clip_dir.join(clip.segment_name(index));
            let chunk = read_blocking(&path, within, want)?;
            if chunk.len() != want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the clipped tail's segment {} is short", path.display()),
                ));
            }
            self.file()?.write_all_at(&chunk, to)?;
            to += want as u64;
            from += want as u64;
        }
        Ok(to)
    }

    fn run(&mut self, job: &Job) -> io::Result<u64> {
        if let Some((kind, message)) = &self.poisoned {
            return Err(io::Error::new(
                *kind,
                format!("an earlier write failed: {message}"),
            ));
        }
        let result: io::Result<u64> = match job {
            Job::Write { log, divert, .. } => (|| {
                if let Some((at, bytes)) = log {
                    self.file()?.write_all_at(bytes, *at)?;
                }
                if let Some(divert) = divert {
                    self.divert(divert)?;
                }
                Ok(0)
            })(),
            Job::Barrier(_) => Ok(0),
            // The cut drops bytes past the accepted length that a write of a crashed
            // incarnation may have left beyond what its successor wrote again.
            Job::End { len, tail, .. } => (|| {
                let len = match tail {
                    Some(tail) => self.append_tail(*tail)?,
                    None => *len,
                };
                let file = self.file()?;
                file.set_len(len)?;
                file.sync_data()?;
                // The marker makes completeness survive a restart of the fan-out or of Kiln.
                crate::private_fs::options()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&self.end_path)?;
                if tail.is_some() {
                    self.segment = None;
                    fs::remove_dir_all(&self.clip_dir)?;
                }
                Ok(len)
            })(),
        };
        if let Err(e) = &result {
            self.poisoned = Some((e.kind(), e.to_string()));
        }
        result
    }

    /// Runs a batch of jobs in order, answering each.
    fn run_batch(&mut self, jobs: Vec<Job>) {
        for job in jobs {
            let result = self.run(&job);
            match job {
                Job::Write { done, .. } | Job::Barrier(done) => drop(done.send(result.map(drop))),
                Job::End { done, .. } => drop(done.send(result)),
            }
        }
    }
}

/// Jobs taken from the queue at once: one blocking hand-off writes them all.
const MAX_BATCH: usize = 64;

/// A log's writer: takes jobs in order and runs them in batches on blocking threads, one
/// batch at a time. Ends when the fan-out drops the sender (or the fan-out itself dies).
async fn writer(mut file: WriterFile, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let ran = tokio::task::spawn_blocking(move || {
            file.run_batch(batch);
            file
        })
        .await;
        match ran {
            Ok(back) => file = back,
            // A panic in the blocking thread dropped the batch's answers (their callers get
            // an error) and the file; nothing later may be written after a possible hole.
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The actor.

type Reply<T> = oneshot::Sender<Result<T, LogError>>;

/// A message waiting for its log to be loaded.
enum Op {
    Open(Reply<Opened>),
    Append {
        offset: u64,
        data: Bytes,
        kiln: bool,
        reply: Reply<u64>,
    },
    Finish(Reply<LogProgress>),
    Read {
        offset: u64,
        reply: Reply<LogChunk>,
    },
    Subscribe(Reply<watch::Receiver<LogProgress>>),
}

impl Op {
    fn fail(self, error: LogError) {
        match self {
            Self::Open(reply) => drop(reply.send(Err(error))),
            Self::Finish(reply) => drop(reply.send(Err(error))),
            Self::Append { reply, .. } => drop(reply.send(Err(error))),
            Self::Read { reply, .. } => drop(reply.send(Err(error))),
            Self::Subscribe(reply) => drop(reply.send(Err(error))),
        }
    }

    fn is_open(&self) -> bool {
        matches!(self, Self::Open(_))
    }
}

/// A log this incarnation knows.
struct BuildLog {
    /// Tells stale writer answers (of books since forgotten) from current ones.
    epoch: u64,
    /// What readers see: bytes in the file, and whether the log is complete.
    progress: watch::Sender<LogProgress>,
    books: LogState,
    /// The writer's offset up to which every byte is stored (in the log or its tail).
    stored: u64,
    /// The writer's queue; started on the first job, dropped when the log ends.
    writer: Option<mpsc::UnboundedSender<Job>>,
}

impl BuildLog {
    fn progress(&self) -> LogProgress {
        *self.progress.borrow()
    }

    /// Every accepted byte is stored.
    fn settled(&self) -> bool {
        self.stored == self.books.input
    }

    fn opened(&self) -> Opened {
        Opened {
            progress: self.progress(),
            append_at: self.books.input,
        }
    }
}

enum Entry {
    /// Being loaded from disk; messages wait here in arrival order.
    Loading(Vec<Op>),
    Ready(BuildLog),
}

/// The log fan-out actor.
pub struct LogFanout {
    dir: PathBuf,
    memory_per_build: usize,
    /// `logs.max_bytes_per_build`.
    max_bytes_per_build: u64,
    /// `actors.mailbox_size`.
    mailbox_size: usize,
    logs: HashMap<BuildId, Entry>,
    next_epoch: u64,
    metrics: Metrics,
    _guard: ChildGuard,
}

impl LogFanout {
    pub fn new(
        dir: PathBuf,
        memory_per_build: usize,
        max_bytes_per_build: u64,
        mailbox_size: usize,
        metrics: Metrics,
        guard: ChildGuard,
    ) -> Self {
        Self {
            dir,
            memory_per_build,
            max_bytes_per_build,
            mailbox_size,
            logs: HashMap::new(),
            next_epoch: 0,
            metrics,
            _guard: guard,
        }
    }

    /// Handles `op` now if the log is loaded, else once it is.
    fn dispatch(&mut self, build: BuildId, op: Op, ctx: &mut Context<Self>) {
        match self.logs.get_mut(&build) {
            Some(Entry::Ready(_)) => self.apply(build, op, ctx),
            Some(Entry::Loading(waiting)) => waiting.push(op),
            None => {
                let create = op.is_open();
                self.logs.insert(build.clone(), Entry::Loading(vec![op]));
                self.load(build, create, ctx);
            }
        }
    }

    /// Loads the log's books from disk on a blocking thread, then handles what waited.
    fn load(&mut self, build: BuildId, create: bool, ctx: &mut Context<Self>) {
        let dir = self.dir.clone();
        let id = build.clone();
        let probe = async move {
            tokio::task::spawn_blocking(move || load_blocking(&dir, &id, create))
                .await
                .unwrap_or_else(|e| Err(LoadError::Io("loading the log", io::Error::other(e))))
        };
        ctx.spawn(
            actix::fut::wrap_future(probe)
                .map(move |loaded, act: &mut Self, ctx| act.loaded(build, loaded, ctx)),
        );
    }

    fn loaded(&mut self, build: BuildId, loaded: Result<Found, LoadError>, ctx: &mut Context<Self>) {
        let Some(Entry::Loading(waiting)) = self.logs.remove(&build) else {
            return; // forgotten meanwhile
        };
        match loaded {
            Ok(found) => {
                self.next_epoch += 1;
                let books = LogState::loaded(&found);
                let log = BuildLog {
                    epoch: self.next_epoch,
                    progress: watch::Sender::new(found.progress),
                    stored: books.input,
                    books,
                    writer: None,
                };
                self.logs.insert(build.clone(), Entry::Ready(log));
                for op in waiting {
                    self.apply(build.clone(), op, ctx);
                }
            }
            Err(LoadError::NotFound) => {
                // What came before the first Open finds no log; the rest waits for its file.
                let mut waiting = waiting.into_iter();
                let mut rest = Vec::new();
                for op in waiting.by_ref() {
                    if op.is_open() {
                        rest.push(op);
                        break;
                    }
                    op.fail(LogError::NotFound(build.clone()));
                }
                rest.extend(waiting);
                if !rest.is_empty() {
                    self.logs.insert(build.clone(), Entry::Loading(rest));
                    self.load(build, true, ctx);
                }
            }
            Err(LoadError::Io(what, e)) => {
                let error = LogError::storage(&build, what)(e);
                for op in waiting {
                    op.fail(error.clone());
                }
            }
        }
    }

    fn ready(&mut self, build: &BuildId) -> Option<&mut BuildLog> {
        match self.logs.get_mut(build) {
            Some(Entry::Ready(log)) => Some(log),
            _ => None,
        }
    }

    /// Queues `job` on the log's writer, starting the writer if it has none.
    fn enqueue(&mut self, build: &BuildId, job: Job, ctx: &mut Context<Self>) {
        let dir = self.dir.clone();
        let Some(log) = self.ready(build) else {
            return; // dropping the job answers its caller with an error
        };
        let sender = log.writer.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let file = WriterFile {
                path: log_path(&dir, build),
                end_path: end_path(&dir, build),
                clip_dir: clip_dir(&dir, build),
                file: None,
                segment: None,
                poisoned: None,
            };
            ctx.spawn(actix::fut::wrap_future(writer(file, rx)));
            tx
        });
        let _ = sender.send(job);
    }

    /// Runs `then` once every write accepted so far is done (at once if there is none).
    fn after_writes<F>(&mut self, build: BuildId, ctx: &mut Context<Self>, then: F)
    where
        F: FnOnce(&mut Self, io::Result<()>) + 'static,
    {
        let Some(log) = self.ready(&build) else {
            return then(self, Err(io::ErrorKind::NotFound.into()));
        };
        if log.settled() {
            return then(self, Ok(()));
        }
        let epoch = log.epoch;
        let (done, written) = oneshot::channel();
        self.enqueue(&build, Job::Barrier(done), ctx);
        ctx.spawn(
            actix::fut::wrap_future(written).map(move |result, act: &mut Self, _| {
                let result = result.unwrap_or_else(|_| Err(io::Error::other("the log's writer stopped")));
                if result.is_err() {
                    act.forget_books(&build, epoch);
                }
                then(act, result)
            }),
        );
    }

    /// Drops the books of a log whose writer failed; the next message loads them again from
    /// the file (followers see their watch close and subscribe again).
    fn forget_books(&mut self, build: &BuildId, epoch: u64) {
        if matches!(self.logs.get(build), Some(Entry::Ready(log)) if log.epoch == epoch) {
            self.logs.remove(build);
        }
    }

    /// Handles one message for a loaded log.
    fn apply(&mut self, build: BuildId, op: Op, ctx: &mut Context<Self>) {
        let Some(log) = self.ready(&build) else {
            return op.fail(LogError::NotFound(build));
        };
        match op {
            Op::Subscribe(reply) => drop(reply.send(Ok(log.progress.subscribe()))),
            Op::Open(reply) => self.after_writes(build.clone(), ctx, move |act, result| {
                let answer = match (result, act.ready(&build)) {
                    (Ok(()), Some(log)) => Ok(log.opened()),
                    (Err(e), _) => Err(LogError::storage(&build, "writing the log")(e)),
                    (Ok(()), None) => Err(LogError::NotFound(build)),
                };
                let _ = reply.send(answer);
            }),
            Op::Append {
                offset,
                data,
                kiln,
                reply,
            } => self.append(build, offset, data, kiln, reply, ctx),
            Op::Finish(reply) => self.finish(build, reply, ctx),
            Op::Read { offset, reply } => self.read(build, offset, reply, ctx),
        }
    }

    fn append(
        &mut self,
        build: BuildId,
        offset: u64,
        data: Bytes,
        kiln: bool,
        reply: Reply<u64>,
        ctx: &mut Context<Self>,
    ) {
        let (cap, memory) = (self.max_bytes_per_build, self.memory_per_build);
        let Some(log) = self.ready(&build) else {
            return drop(reply.send(Err(LogError::NotFound(build))));
        };
        let epoch = log.epoch;
        match log.books.accept(&build, offset, &data, kiln, cap, memory) {
            Err(e) => drop(reply.send(Err(e))),
            Ok(Accepted::Nothing { next }) => self.after_writes(build.clone(), ctx, move |_, result| {
                let answer = result
                    .map(|()| next)
                    .map_err(LogError::storage(&build, "writing the log"));
                let _ = reply.send(answer);
            }),
            Ok(Accepted::Store { log, divert, next }) => {
                let log_end = log.as_ref().map(|(at, bytes)| {
                    self.metrics.log_bytes(bytes.len() as u64);
                    at + bytes.len() as u64
                });
                let (done, written) = oneshot::channel();
                self.enqueue(&build, Job::Write { log, divert, done }, ctx);
                ctx.spawn(
                    actix::fut::wrap_future(written).map(move |result, act: &mut Self, _| {
                        let result =
                            result.unwrap_or_else(|_| Err(io::Error::other("the log's writer stopped")));
                        let answer = match result {
                            Ok(()) => {
                                if let Some(log) = act.ready(&build).filter(|l| l.epoch == epoch) {
                                    log.stored = log.stored.max(next);
                                    if let Some(end) = log_end {
                                        log.progress.send_modify(|p| p.len = p.len.max(end));
                                    }
                                }
                                Ok(next)
                            }
                            Err(e) => {
                                act.forget_books(&build, epoch);
                                Err(LogError::storage(&build, "writing the log")(e))
                            }
                        };
                        let _ = reply.send(answer);
                    }),
                );
            }
        }
    }

    fn finish(&mut self, build: BuildId, reply: Reply<LogProgress>, ctx: &mut Context<Self>) {
        let cap = self.max_bytes_per_build;
        let Some(log) = self.ready(&build) else {
            return drop(reply.send(Err(LogError::NotFound(build))));
        };
        if log.books.ending {
            // Complete already, or a Finish is under way: answer once that is done.
            return self.after_writes(build.clone(), ctx, move |act, result| {
                let answer = match (result, act.ready(&build)) {
                    (Ok(()), Some(log)) => Ok(log.progress()),
                    (Err(e), _) => Err(LogError::storage(&build, "ending the log")(e)),
                    (Ok(()), None) => Err(LogError::NotFound(build)),
                };
                let _ = reply.send(answer);
            });
        }
        log.books.ending = true;
        let (epoch, len) = (log.epoch, log.books.accepted);
        let tail = log.books.clip.map(|clip| TailEnd {
            clip,
            input: log.books.input,
            keep: cap.saturating_sub(clip.head),
        });
        let (done, ended) = oneshot::channel();
        self.enqueue(&build, Job::End { len, tail, done }, ctx);
        ctx.spawn(
            actix::fut::wrap_future(ended).map(move |result, act: &mut Self, _| {
                let result = result.unwrap_or_else(|_| Err(io::Error::other("the log's writer stopped")));
                if let Ok(final_len) = result {
                    // The marker and the clipped tail.
                    act.metrics.log_bytes(final_len.saturating_sub(len));
                }
                let answer = match result {
                    Err(e) => {
                        act.forget_books(&build, epoch);
                        Err(LogError::storage(&build, "ending the log")(e))
                    }
                    Ok(final_len) => match act.ready(&build).filter(|l| l.epoch == epoch) {
                        Some(log) => {
                            log.books.ended(final_len);
                            log.stored = final_len;
                            // No more jobs: the writer ends when its queue closes.
                            log.writer = None;
                            log.progress.send_modify(|p| {
                                p.len = final_len;
                                p.ended = true;
                            });
                            Ok(log.progress())
                        }
                        None => Err(LogError::NotFound(build.clone())),
                    },
                };
                let _ = reply.send(answer);
            }),
        );
    }

    fn read(&mut self, build: BuildId, offset: u64, reply: Reply<LogChunk>, ctx: &mut Context<Self>) {
        let path = log_path(&self.dir, &build);
        let Some(log) = self.ready(&build) else {
            return drop(reply.send(Err(LogError::NotFound(build))));
        };
        let progress = log.progress();
        if offset >= progress.len {
            let _ = reply.send(Ok(LogChunk {
                data: Bytes::new(),
                progress,
            }));
            return;
        }
        if let Some(data) = log.books.tail_bytes(offset, progress.len) {
            let _ = reply.send(Ok(LogChunk { data, progress }));
            return;
        }
        // Below the tail: the bytes are in the file (only written bytes are published).
        let want = READ_CHUNK.min((progress.len - offset) as usize);
        let read = async move {
            let data = tokio::task::spawn_blocking(move || read_blocking(&path, offset, want))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
            let answer = data
                .map(|data| LogChunk { data, progress })
                .map_err(LogError::storage(&build, "reading the log"));
            let _ = reply.send(answer);
        };
        ctx.spawn(actix::fut::wrap_future(read));
    }

    /// Sends `op` (made with a reply channel) and answers with what it gets.
    fn call<T: 'static>(
        &mut self,
        build: BuildId,
        make: impl FnOnce(Reply<T>) -> Op,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<T, LogError>> {
        let (reply, answer) = oneshot::channel();
        self.dispatch(build.clone(), make(reply), ctx);
        Box::pin(actix::fut::wrap_future(async move {
            answer.await.unwrap_or_else(|_| {
                Err(LogError::storage(&build, "handling the request")(
                    io::Error::other("the log fan-out dropped the request"),
                ))
            })
        }))
    }
}

impl Actor for LogFanout {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_size);
    }
}

impl Handler<Open> for LogFanout {
    type Result = ResponseActFuture<Self, Result<Opened, LogError>>;

    fn handle(&mut self, msg: Open, ctx: &mut Self::Context) -> Self::Result {
        self.call(msg.build, Op::Open, ctx)
    }
}

impl Handler<Append> for LogFanout {
    type Result = ResponseActFuture<Self, Result<u64, LogError>>;

    /// Answered once the bytes are in the file (the progress watch moves at the same time).
    fn handle(&mut self, msg: Append, ctx: &mut Self::Context) -> Self::Result {
        let Append {
            build,
            offset,
            data,
            kiln,
        } = msg;
        self.call(
            build,
            |reply| Op::Append {
                offset,
                data,
                kiln,
                reply,
            },
            ctx,
        )
    }
}

impl Handler<Finish> for LogFanout {
    type Result = ResponseActFuture<Self, Result<LogProgress, LogError>>;

    /// Answered once every accepted byte is flushed to disk and the `.end` marker written.
    fn handle(&mut self, msg: Finish, ctx: &mut Self::Context) -> Self::Result {
        self.call(msg.build, Op::Finish, ctx)
    }
}

impl Handler<Read> for LogFanout {
    type Result = ResponseActFuture<Self, Result<LogChunk, LogError>>;

    fn handle(&mut self, msg: Read, ctx: &mut Self::Context) -> Self::Result {
        let offset = msg.offset;
        self.call(msg.build, |reply| Op::Read { offset, reply }, ctx)
    }
}

impl Handler<Subscribe> for LogFanout {
    type Result = ResponseActFuture<Self, Result<watch::Receiver<LogProgress>, LogError>>;

    fn handle(&mut self, msg: Subscribe, ctx: &mut Self::Context) -> Self::Result {
        self.call(msg.build, Op::Subscribe, ctx)
    }
}

impl Handler<Forget> for LogFanout {
    type Result = ();

    fn handle(&mut self, msg: Forget, _: &mut Self::Context) {
        if let Some(Entry::Loading(waiting)) = self.logs.remove(&msg.build) {
            for op in waiting {
                op.fail(LogError::NotFound(msg.build.clone()));
            }
        }
        let (log, end) = (log_path(&self.dir, &msg.build), end_path(&self.dir, &msg.build));
        let clips = clip_dir(&self.dir, &msg.build);
        tokio::task::spawn_blocking(move || {
            let _ = fs::remove_file(log);
            let _ = fs::remove_file(end);
            let _ = fs::remove_dir_all(clips);
        });
    }
}

impl Handler<Crash> for LogFanout {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        std::panic::panic_any(INJECTED_CRASH);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::actors::supervision::ChildDied;

    /// Takes the fan-out's death notice (the tests have no supervisor).
    struct NoSupervisor;

    impl Actor for NoSupervisor {
        type Context = Context<Self>;
    }

    impl Handler<ChildDied> for NoSupervisor {
        type Result = ();

        fn handle(&mut self, _: ChildDied, _: &mut Self::Context) {}
    }

    const NO_CAP: u64 = u64::MAX;

    /// Runs `body` against a fan-out over `dir` capped at `cap` bytes (8 bytes of tail in
    /// memory, so most reads go to the file), inside an actix system of its own.
    fn with_fanout<F, Fut>(dir: &Path, cap: u64, body: F)
    where
        F: FnOnce(Addr<LogFanout>) -> Fut + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let dir = dir.to_owned();
        actix::System::new().block_on(async move {
            let guard = ChildGuard::new("log_fanout".into(), 1, NoSupervisor.start().recipient());
            let fanout = LogFanout::new(dir, 8, cap, 16, Metrics::new(), guard).start();
            tokio::time::timeout(Duration::from_secs(20), body(fanout))
                .await
                .expect("the test body finished in time");
        });
    }

    async fn open(f: &Addr<LogFanout>, build: &BuildId) -> LogProgress {
        f.send(Open { build: build.clone() })
            .await
            .unwrap()
            .unwrap()
            .progress
    }

    async fn append(f: &Addr<LogFanout>, build: &BuildId, offset: u64, data: &[u8], kiln: bool) -> u64 {
        f.send(Append {
            build: build.clone(),
            offset,
            data: Bytes::copy_from_slice(data),
            kiln,
        })
        .await
        .unwrap()
        .unwrap()
    }

    async fn finish(f: &Addr<LogFanout>, build: &BuildId) -> LogProgress {
        f.send(Finish { build: build.clone() }).await.unwrap().unwrap()
    }

    async fn whole(f: &Addr<LogFanout>, build: &BuildId) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let chunk = f
                .send(Read {
                    build: build.clone(),
                    offset: out.len() as u64,
                })
                .await
                .unwrap()
                .unwrap();
            if chunk.data.is_empty() {
                return out;
            }
            out.extend_from_slice(&chunk.data);
        }
    }

    // ---- the books, without actix ----------------------------------------------------------

    #[test]
    fn the_books_take_each_byte_once_and_refuse_gaps_and_late_output() {
        let build = BuildId::random();
        let mut books = fresh();
        let accept = |books: &mut LogState, offset, data: &[u8]| {
            books.accept(&build, offset, data, false, 1000, 4).unwrap()
        };
        assert_eq!(accept(&mut books, 0, b"hello "), stored(0, b"hello "));
        // A resend of what was taken, whole or in part: nothing new, or only the new part.
        assert_eq!(accept(&mut books, 0, b"hello "), Accepted::Nothing { next: 6 });
        assert_eq!(accept(&mut books, 3, b"lo world"), stored(6, b"world"));
        assert!(matches!(
            books.accept(&build, 20, b"x", false, 1000, 4),
            Err(LogError::Gap {
                offset: 20,
                len: 11,
                ..
            })
        ));
        // The tail keeps the last bytes only (4 here) and serves what is published.
        assert_eq!((books.tail_start, books.tail.as_slice()), (7, &b"orld"[..]));
        assert_eq!(books.tail_bytes(8, 11), Some(Bytes::from_static(b"rld")));
        assert_eq!(books.tail_bytes(8, 10), Some(Bytes::from_static(b"rl")));
        assert_eq!(books.tail_bytes(6, 11), None, "below the tail: read the file");
        assert_eq!(books.tail_bytes(11, 11), None, "nothing published there yet");
        books.ending = true;
        assert!(matches!(
            books.accept(&build, 11, b"!", false, 1000, 4),
            Err(LogError::Ended { .. })
        ));
        assert_eq!(accept(&mut books, 6, b"world"), Accepted::Nothing { next: 11 });
    }

    fn fresh() -> LogState {
        LogState::loaded(&Found {
            progress: LogProgress::default(),
            clip: None,
        })
    }

    /// What a log write of `bytes` at `at` (nothing diverted) is accepted as.
    fn stored(at: u64, bytes: &'static [u8]) -> Accepted {
        Accepted::Store {
            log: Some((at, Bytes::from_static(bytes))),
            divert: None,
            next: at + bytes.len() as u64,
        }
    }

    #[test]
    fn the_books_keep_the_head_and_divert_the_rest_in_the_writers_offsets() {
        let build = BuildId::random();
        let mut books = fresh();
        // Kiln's own line goes to the head even past half the cap (5 of 10 here).
        assert_eq!(
            books.accept(&build, 0, b"kiln:\n", true, 10, 64).unwrap(),
            stored(0, b"kiln:\n")
        );
        let clip = Clip { head: 6, segment: 5 };
        assert_eq!(
            books.accept(&build, 6, b"abcd", false, 10, 64).unwrap(),
            Accepted::Store {
                log: None,
                divert: Some(Diverted {
                    at: 6,
                    bytes: Bytes::from_static(b"abcd"),
                    clip
                }),
                next: 10,
            }
        );
        let mut books = fresh();
        let head = Clip { head: 5, segment: 5 };
        assert_eq!(
            books.accept(&build, 0, b"12345678", false, 10, 64).unwrap(),
            Accepted::Store {
                log: Some((0, Bytes::from_static(b"12345"))),
                divert: Some(Diverted {
                    at: 5,
                    bytes: Bytes::from_static(b"678"),
                    clip: head
                }),
                next: 8,
            }
        );
        assert_eq!((books.accepted, books.input), (5, 8));
        // Resends are acknowledged in the writer's offsets; later lines, Kiln's too, divert.
        assert_eq!(
            books.accept(&build, 0, b"12345678", false, 10, 64).unwrap(),
            Accepted::Nothing { next: 8 }
        );
        assert!(matches!(
            books.accept(&build, 8, b"done\n", true, 10, 64).unwrap(),
            Accepted::Store {
                log: None,
                divert: Some(Diverted { at: 8, .. }),
                next: 13
            }
        ));
        // Loaded with a tail: the head's end and the writer's offset come from the segments.
        let again = LogState::loaded(&Found {
            progress: LogProgress { len: 5, ended: false },
            clip: Some((head, 13)),
        });
        assert_eq!((again.accepted, again.input, again.clip), (5, 13, Some(head)));
        assert_eq!(Clip::parse(&head.segment_name(7)), Some((head, 7)));
        assert_eq!(Clip::parse("5-0-1"), None);
        assert_eq!(Clip::parse("../../x"), None);
    }

    // ---- the actor -------------------------------------------------------------------------

    async fn opened(f: &Addr<LogFanout>, build: &BuildId) -> Opened {
        f.send(Open { build: build.clone() }).await.unwrap().unwrap()
    }

    /// A follower's whole log: reads from 0 as bytes are published, until the log ends.
    async fn follow(f: Addr<LogFanout>, build: BuildId) -> Vec<u8> {
        let mut progress = f.send(Subscribe { build: build.clone() }).await.unwrap().unwrap();
        let mut got = Vec::new();
        loop {
            progress.borrow_and_update();
            let chunk = f
                .send(Read {
                    build: build.clone(),
                    offset: got.len() as u64,
                })
                .await
                .unwrap()
                .unwrap();
            got.extend_from_slice(&chunk.data);
            if chunk.data.is_empty() {
                if chunk.progress.ended {
                    return got;
                }
                progress.changed().await.unwrap();
            }
        }
    }

    #[test]
    fn a_clipped_log_keeps_its_head_and_tail_and_followers_agree() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let build = BuildId::random();
        let id = build.clone();
        // Cap 100: a head of 50, a tail of 50 kept from segments of 50 bytes.
        with_fanout(&logs, 100, move |f| async move {
            open(&f, &id).await;
            let follower = actix::spawn(follow(f.clone(), id.clone()));
            let mut printed = Vec::new();
            let mut at = 0;
            for i in 0..40u32 {
                let line = format!("line {i:03}\n"); // 9 bytes
                printed.extend_from_slice(line.as_bytes());
                at = append(&f, &id, at, line.as_bytes(), false).await;
                assert_eq!(at, printed.len() as u64, "the writer's offset counts every byte");
            }
            // A resend while clipping changes nothing.
            assert_eq!(append(&f, &id, 9, b"line 001\n", false).await, at);
            assert_eq!(
                opened(&f, &id).await,
                Opened {
                    progress: LogProgress {
                        len: 50,
                        ended: false
                    },
                    append_at: at,
                }
            );
            let end = append(&f, &id, at, b"pushed x\n", true).await;
            printed.extend_from_slice(b"pushed x\n");
            let finished = finish(&f, &id).await;
            let log = whole(&f, &id).await;
            assert_eq!(finished.len, log.len() as u64);
            let kept = &printed[printed.len() - 50..];
            let clipped = end - 50 - 50;
            let expected = [&printed[..50], b"\n", clip_marker(clipped).as_bytes(), kept].concat();
            assert_eq!(String::from_utf8_lossy(&log), String::from_utf8_lossy(&expected));
            assert!(log.ends_with(b"pushed x\n"));
            assert_eq!(
                follower.await.unwrap(),
                log,
                "the follower from 0 saw the same bytes"
            );
        });
        assert!(
            !logs.join(format!("{build}.clip")).exists(),
            "the tail's segments are gone"
        );
        let stored = fs::read(logs.join(format!("{build}.log"))).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&stored).matches("bytes clipped").count(),
            1
        );
    }

    /// A fan-out restarted while a log is clipped goes on in the writer's offsets (from the
    /// segments' names), with only the last segments on disk.
    #[test]
    fn a_restart_while_clipping_goes_on_where_the_writer_was() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let build = BuildId::random();
        let id = build.clone();
        let printed: Vec<u8> = (0..1000u32)
            .flat_map(|i| format!("{i:04}\n").into_bytes())
            .collect();
        let first = printed[..3000].to_vec();
        with_fanout(&logs, 100, move |f| async move {
            open(&f, &id).await;
            let mut at = 0;
            for chunk in first.chunks(7) {
                at = append(&f, &id, at, chunk, false).await;
            }
            assert_eq!(at, 3000);
        });
        let segments = fs::read_dir(logs.join(format!("{build}.clip"))).unwrap().count();
        assert!(segments <= 2, "{segments} segments on disk");
        let id = build.clone();
        let rest = printed.clone();
        with_fanout(&logs, 100, move |f| async move {
            let opened = opened(&f, &id).await;
            assert_eq!((opened.progress.len, opened.append_at), (50, 3000));
            // A resend of the last append, then the rest.
            assert_eq!(append(&f, &id, 2996, &rest[2996..3000], false).await, 3000);
            append(&f, &id, 3000, &rest[3000..], false).await;
            finish(&f, &id).await;
            let log = whole(&f, &id).await;
            let expected = [&rest[..50], clip_marker(5000 - 100).as_bytes(), &rest[4950..]].concat();
            assert_eq!(String::from_utf8_lossy(&log), String::from_utf8_lossy(&expected));
        });
    }

    #[test]
    fn pipelined_appends_land_in_order_and_followers_see_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let files = logs.clone();
        with_fanout(&logs, NO_CAP, move |f| async move {
            let logs = files;
            let id = BuildId::random();
            // Sent before the log is even loaded: they wait for it, in order.
            let opened = f.send(Open { build: id.clone() });
            let mut progress = f.send(Subscribe { build: id.clone() }).await.unwrap().unwrap();
            opened.await.unwrap().unwrap();
            let mut expected = Vec::new();
            let mut sends = Vec::new();
            for i in 0..200u32 {
                let line = format!("line {i}\n").into_bytes();
                sends.push(f.send(Append {
                    build: id.clone(),
                    offset: expected.len() as u64,
                    data: Bytes::from(line.clone()),
                    kiln: false,
                }));
                expected.extend_from_slice(&line);
            }
            let mut ends = Vec::new();
            for send in sends {
                ends.push(send.await.unwrap().unwrap());
            }
            assert!(ends.windows(2).all(|w| w[0] < w[1]), "answers in order");
            assert_eq!(*ends.last().unwrap(), expected.len() as u64);
            // A resend of an early append changes nothing.
            assert_eq!(
                append(&f, &id, 0, b"line 0\n", false).await,
                expected.len() as u64
            );
            assert_eq!(progress.borrow_and_update().len, expected.len() as u64);
            let ended = finish(&f, &id).await;
            assert!(ended.ended);
            assert!(progress.borrow_and_update().ended);
            assert_eq!(whole(&f, &id).await, expected);
            let path = log_path(&logs, &id);
            assert_eq!(fs::read(path).unwrap(), expected);
            assert!(end_path(&logs, &id).exists());
            assert!(matches!(
                f.send(Append {
                    build: id.clone(),
                    offset: expected.len() as u64,
                    data: Bytes::from_static(b"late\n"),
                    kiln: true,
                })
                .await
                .unwrap(),
                Err(LogError::Ended { .. })
            ));
            // Reads of a log nobody opened find nothing.
            let missing = BuildId::random();
            assert!(matches!(
                f.send(Read {
                    build: missing,
                    offset: 0
                })
                .await
                .unwrap(),
                Err(LogError::NotFound(_))
            ));
        });
    }

    /// A write of a crashed incarnation may land late, past what the next one wrote again;
    /// `Finish` cuts the file at what was accepted.
    #[test]
    fn finish_cuts_a_late_write_of_an_earlier_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let id = BuildId::random();
        let (files, build) = (logs.clone(), id.clone());
        with_fanout(&logs, NO_CAP, move |f| async move {
            open(&f, &build).await;
            assert_eq!(append(&f, &build, 0, b"resumed\n", true).await, 8);
            // The dead incarnation's write of its own (longer) output lands now.
            let late = OpenOptions::new()
                .write(true)
                .open(log_path(&files, &build))
                .unwrap();
            late.write_all_at(b"old output that was never acknowledged\n", 8)
                .unwrap();
            assert_eq!(append(&f, &build, 8, b"done\n", true).await, 13);
            assert_eq!(finish(&f, &build).await.len, 13);
            assert_eq!(fs::read(log_path(&files, &build)).unwrap(), b"resumed\ndone\n");
        });
    }

    /// 200 builds written and followed at once, each by its own follower (the pattern of
    /// `LogsHandle::follow`: subscribe, read to the end, wait for progress): every follower
    /// gets its whole log. Prints the fan-out's message rate, the figure that would call for
    /// sharding by build id.
    #[test]
    fn two_hundred_followers_each_get_their_whole_log() {
        const BUILDS: usize = 200;
        const LINES: usize = 50;
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        with_fanout(&logs, NO_CAP, move |f| async move {
            let started = std::time::Instant::now();
            let ids: Vec<BuildId> = (0..BUILDS).map(|_| BuildId::random()).collect();
            for id in &ids {
                open(&f, id).await;
            }
            let mut tasks = Vec::new();
            for (b, id) in ids.iter().enumerate() {
                let (f2, id2) = (f.clone(), id.clone());
                tasks.push(actix::spawn(async move {
                    let mut offset = 0;
                    for i in 0..LINES {
                        let line = format!("build {b:03} line {i:03} {}\n", "x".repeat(80));
                        offset = append(&f2, &id2, offset, line.as_bytes(), false).await;
                    }
                    finish(&f2, &id2).await;
                    (0, 0)
                }));
                let (f2, id2) = (f.clone(), id.clone());
                tasks.push(actix::spawn(async move {
                    let mut progress = f2.send(Subscribe { build: id2.clone() }).await.unwrap().unwrap();
                    let (mut got, mut reads) = (0u64, 0u64);
                    loop {
                        progress.borrow_and_update();
                        let chunk = f2
                            .send(Read {
                                build: id2.clone(),
                                offset: got,
                            })
                            .await
                            .unwrap()
                            .unwrap();
                        reads += 1;
                        got += chunk.data.len() as u64;
                        if chunk.data.is_empty() {
                            if chunk.progress.ended {
                                return (got, reads);
                            }
                            progress.changed().await.unwrap();
                        }
                    }
                }));
            }
            let mut messages = (BUILDS * (LINES + 2)) as u64;
            for task in tasks {
                let (got, reads) = task.await.unwrap();
                if reads > 0 {
                    assert_eq!(got, (LINES * 100) as u64, "a follower got its whole log");
                }
                messages += reads + 1;
            }
            let elapsed = started.elapsed();
            eprintln!(
                "{BUILDS} logs × {LINES} appends, {BUILDS} followers: {messages} messages in {elapsed:?} \
                 ({:.0} messages/s, debug build, one thread for the fan-out and every client)",
                messages as f64 / elapsed.as_secs_f64()
            );
        });
    }

    /// Opens (and closes) the read side of a FIFO when dropped, which lets a writer blocked
    /// in opening it go on: whatever the test does, no blocking thread stays stuck.
    struct Unblock(PathBuf);

    impl Drop for Unblock {
        fn drop(&mut self) {
            use std::os::unix::fs::OpenOptionsExt as _;
            let _ = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0);
        }
    }

    /// The promise of issue 11, point 4: file I/O never holds the fan-out. The log of build
    /// A is a FIFO nobody reads, so its writer blocks in `open` on a blocking thread; build
    /// B's log works meanwhile, end to end.
    #[test]
    fn appends_complete_while_another_builds_write_is_blocked() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        crate::private_fs::create_dir_all(&logs).unwrap();
        let stuck = BuildId::random();
        let fifo = log_path(&logs, &stuck);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        with_fanout(&logs, NO_CAP, move |f| async move {
            let unblock = Unblock(fifo);
            // The append loads the log (a stat, no open) and hands the write to its writer,
            // which blocks opening the FIFO for writing.
            let blocked = actix::spawn({
                let (f, stuck) = (f.clone(), stuck.clone());
                async move {
                    f.send(Append {
                        build: stuck,
                        offset: 0,
                        data: Bytes::from_static(b"never read\n"),
                        kiln: false,
                    })
                    .await
                    .unwrap()
                }
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!blocked.is_finished(), "the write to the FIFO blocks");

            let free = BuildId::random();
            let started = std::time::Instant::now();
            open(&f, &free).await;
            let mut offset = 0;
            for i in 0..20 {
                offset = append(&f, &free, offset, format!("step {i}\n").as_bytes(), false).await;
            }
            finish(&f, &free).await;
            let log = whole(&f, &free).await;
            assert!(log.starts_with(b"step 0\n") && log.ends_with(b"step 19\n"));
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "build B took {:?}",
                started.elapsed()
            );
            assert!(!blocked.is_finished(), "the write to the FIFO is still blocked");

            // Unblock it: a reader opens the FIFO. The positioned write then fails (a FIFO
            // cannot seek), the caller hears so, and the books of that log are dropped.
            drop(unblock);
            let answer = blocked.await.unwrap();
            assert!(matches!(answer, Err(LogError::Storage { .. })), "{answer:?}");
        });
    }
}
