//! The log fan-out: every build's log, kept on disk with a tail in memory, served to any
//! number of readers from any byte offset.
//!
//! One writer per build (its build actor) appends with [`Append`], naming the offset it
//! believes is the end; an append the log already holds is acknowledged without writing
//! again, so a writer may resend after a crash on either side and no byte is lost or
//! doubled. Readers pull bytes with [`Read`] and learn about new bytes through the watch
//! channel that [`Subscribe`] hands out (see [`super::handles::LogsHandle::follow`]).
//!
//! A log holds at most `logs.max_bytes_per_build` bytes of build output: the append that
//! crosses the cap is stored up to it, followed by one [`truncation_marker`] line, and later
//! output is acknowledged and dropped, so a build printing without end neither fills the
//! disk nor stops. Kiln's own lines (`Append::kiln`: notices, the verdict) are still stored,
//! so a truncated log says how its build ended. Memory per log is bounded by
//! `logs.memory_bytes_per_build` whatever the log's size.
//!
//! The disk is the source of truth (`<data_dir>/logs/<build id>.log`, plus a `.end` marker
//! when the log is complete), so a restarted fan-out rebuilds its view lazily from the files;
//! readers whose watch channel closed with the old incarnation subscribe again.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek, SeekFrom, Write as _},
    path::PathBuf,
};

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::watch;

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

/// Why a log operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("no log for build {0}")]
    NotFound(BuildId),
    #[error("log of build {build} is complete; nothing can be appended")]
    Ended { build: BuildId },
    #[error("append to the log of build {build} at offset {offset} leaves a gap (log has {len} bytes)")]
    Gap { build: BuildId, offset: u64, len: u64 },
    #[error("log storage for build {build}: {message}")]
    Storage { build: BuildId, message: String },
}

/// Creates an empty log for a new build (idempotent).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<LogProgress, LogError>")]
pub struct Open {
    pub build: BuildId,
}

/// Appends `data` at `offset`; replies the log's new length, which is less than
/// `offset + data.len()` when the size cap dropped some or all of `data`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<u64, LogError>")]
pub struct Append {
    pub build: BuildId,
    pub offset: u64,
    pub data: Bytes,
    /// Kiln's own line rather than the build's output: stored even past the size cap.
    pub kiln: bool,
}

/// The line that ends a log cut at `cap` bytes.
pub fn truncation_marker(cap: u64) -> String {
    format!(
        "[kiln] log truncated at {cap} bytes (logs.max_bytes_per_build); further output of this build is dropped\n"
    )
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

struct BuildLog {
    progress: watch::Sender<LogProgress>,
    /// Open for appending while the log is live.
    file: Option<File>,
    /// The last bytes of the log, starting at `tail_start`, for cheap reads by followers.
    tail: Vec<u8>,
    tail_start: u64,
    /// The cap cut the build's output: only Kiln's own lines are stored from now on.
    truncated: bool,
}

impl BuildLog {
    fn progress(&self) -> LogProgress {
        *self.progress.borrow()
    }
}

/// The log fan-out actor.
pub struct LogFanout {
    dir: PathBuf,
    memory_per_build: usize,
    /// `logs.max_bytes_per_build`.
    max_bytes_per_build: u64,
    logs: HashMap<BuildId, BuildLog>,
    metrics: Metrics,
    _guard: ChildGuard,
}

impl LogFanout {
    pub fn new(
        dir: PathBuf,
        memory_per_build: usize,
        max_bytes_per_build: u64,
        metrics: Metrics,
        guard: ChildGuard,
    ) -> Self {
        Self {
            dir,
            memory_per_build,
            max_bytes_per_build,
            logs: HashMap::new(),
            metrics,
            _guard: guard,
        }
    }

    fn log_path(&self, build: &BuildId) -> PathBuf {
        self.dir.join(format!("{build}.log"))
    }

    fn end_path(&self, build: &BuildId) -> PathBuf {
        self.dir.join(format!("{build}.end"))
    }

    fn storage_error(build: &BuildId, e: io::Error) -> LogError {
        LogError::Storage {
            build: build.clone(),
            message: e.to_string(),
        }
    }

    /// The in-memory state of a log, loaded from disk if this incarnation has not seen it.
    fn load(&mut self, build: &BuildId) -> Result<&mut BuildLog, LogError> {
        if !self.logs.contains_key(build) {
            let len = match fs::metadata(self.log_path(build)) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(LogError::NotFound(build.clone()))
                }
                Err(e) => return Err(Self::storage_error(build, e)),
            };
            let ended = self.end_path(build).exists();
            let log = BuildLog {
                progress: watch::Sender::new(LogProgress { len, ended }),
                file: None,
                tail: Vec::new(),
                tail_start: len,
                // A log at the cap was cut (or is about to be) by an earlier incarnation.
                truncated: len >= self.max_bytes_per_build,
            };
            self.logs.insert(build.clone(), log);
        }
        Ok(self.logs.get_mut(build).expect("inserted above"))
    }

    fn open(&mut self, build: &BuildId) -> Result<LogProgress, LogError> {
        if let Err(LogError::NotFound(_)) = self.load(build) {
            crate::private_fs::create_dir_all(&self.dir).map_err(|e| Self::storage_error(build, e))?;
            crate::private_fs::options()
                .create(true)
                .append(true)
                .open(self.log_path(build))
                .map_err(|e| Self::storage_error(build, e))?;
        }
        Ok(self.load(build)?.progress())
    }

    fn append(&mut self, build: &BuildId, offset: u64, data: &[u8], kiln: bool) -> Result<u64, LogError> {
        let path = self.log_path(build);
        let memory_limit = self.memory_per_build;
        let cap = self.max_bytes_per_build;
        let log = self.load(build)?;
        let LogProgress { len, ended } = log.progress();
        let end = offset + data.len() as u64;
        if end <= len {
            return Ok(len); // already written: a resend after a lost reply
        }
        if ended {
            return Err(LogError::Ended { build: build.clone() });
        }
        if offset > len {
            return Err(LogError::Gap {
                build: build.clone(),
                offset,
                len,
            });
        }
        let new_bytes = &data[(len - offset) as usize..];
        // The size cap: output past it is dropped; the append that crosses it is cut there
        // and followed by the marker line, once.
        let marked;
        let new_bytes: &[u8] = if kiln || len + new_bytes.len() as u64 <= cap {
            new_bytes
        } else if log.truncated {
            return Ok(len);
        } else {
            let kept = &new_bytes[..cap.saturating_sub(len) as usize];
            let last = kept.last().or(log.tail.last()).copied();
            let newline = if len + (kept.len() as u64) > 0 && last != Some(b'\n') {
                "\n"
            } else {
                ""
            };
            log.truncated = true;
            marked = [kept, newline.as_bytes(), truncation_marker(cap).as_bytes()].concat();
            tracing::warn!(build_id = %build, cap, "build log truncated (logs.max_bytes_per_build)");
            &marked
        };
        if log.file.is_none() {
            let file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| Self::storage_error(build, e))?;
            log.file = Some(file);
        }
        let file = log.file.as_mut().expect("opened above");
        file.write_all(new_bytes)
            .map_err(|e| Self::storage_error(build, e))?;
        log.tail.extend_from_slice(new_bytes);
        if log.tail.len() > memory_limit {
            let drop = log.tail.len() - memory_limit;
            log.tail.drain(..drop);
            log.tail_start += drop as u64;
        }
        let end = len + new_bytes.len() as u64;
        log.progress.send_modify(|p| p.len = end);
        self.metrics.log_bytes(new_bytes.len() as u64);
        Ok(end)
    }

    fn finish(&mut self, build: &BuildId) -> Result<LogProgress, LogError> {
        let end_path = self.end_path(build);
        let log = self.load(build)?;
        if !log.progress().ended {
            if let Some(file) = log.file.take() {
                file.sync_data().map_err(|e| Self::storage_error(build, e))?;
            }
            // The marker makes completeness survive a restart of the fan-out or of Kiln.
            crate::private_fs::options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&end_path)
                .map_err(|e| Self::storage_error(build, e))?;
            // A finished log is read from disk; keep no copy of it in memory.
            log.tail = Vec::new();
            log.tail_start = log.progress().len;
            log.progress.send_modify(|p| p.ended = true);
        }
        Ok(log.progress())
    }

    fn read(&mut self, build: &BuildId, offset: u64) -> Result<LogChunk, LogError> {
        let path = self.log_path(build);
        let log = self.load(build)?;
        let progress = log.progress();
        if offset >= progress.len {
            return Ok(LogChunk {
                data: Bytes::new(),
                progress,
            });
        }
        let data = if offset >= log.tail_start {
            let from = (offset - log.tail_start) as usize;
            let to = (from + READ_CHUNK).min(log.tail.len());
            Bytes::copy_from_slice(&log.tail[from..to])
        } else {
            let want = READ_CHUNK.min((progress.len - offset) as usize);
            let mut buf = vec![0; want];
            let mut file = File::open(&path).map_err(|e| Self::storage_error(build, e))?;
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| Self::storage_error(build, e))?;
            let n = file.read(&mut buf).map_err(|e| Self::storage_error(build, e))?;
            buf.truncate(n);
            Bytes::from(buf)
        };
        Ok(LogChunk { data, progress })
    }
}

impl Actor for LogFanout {
    type Context = Context<Self>;
}

impl Handler<Open> for LogFanout {
    type Result = Result<LogProgress, LogError>;

    fn handle(&mut self, msg: Open, _: &mut Self::Context) -> Self::Result {
        self.open(&msg.build)
    }
}

impl Handler<Append> for LogFanout {
    type Result = Result<u64, LogError>;

    fn handle(&mut self, msg: Append, _: &mut Self::Context) -> Self::Result {
        self.append(&msg.build, msg.offset, &msg.data, msg.kiln)
    }
}

impl Handler<Finish> for LogFanout {
    type Result = Result<LogProgress, LogError>;

    fn handle(&mut self, msg: Finish, _: &mut Self::Context) -> Self::Result {
        self.finish(&msg.build)
    }
}

impl Handler<Read> for LogFanout {
    type Result = Result<LogChunk, LogError>;

    fn handle(&mut self, msg: Read, _: &mut Self::Context) -> Self::Result {
        self.read(&msg.build, msg.offset)
    }
}

impl Handler<Subscribe> for LogFanout {
    type Result = Result<watch::Receiver<LogProgress>, LogError>;

    fn handle(&mut self, msg: Subscribe, _: &mut Self::Context) -> Self::Result {
        Ok(self.load(&msg.build)?.progress.subscribe())
    }
}

impl Handler<Forget> for LogFanout {
    type Result = ();

    fn handle(&mut self, msg: Forget, _: &mut Self::Context) {
        self.logs.remove(&msg.build);
        let _ = fs::remove_file(self.log_path(&msg.build));
        let _ = fs::remove_file(self.end_path(&msg.build));
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

    /// Runs `body` against a fan-out over `dir` capped at `cap` bytes, inside an actix system.
    fn with_fanout(dir: &std::path::Path, cap: u64, body: impl FnOnce(&mut LogFanout) + 'static) {
        let dir = dir.to_owned();
        actix::System::new().block_on(async move {
            let guard = ChildGuard::new("log_fanout".into(), 1, NoSupervisor.start().recipient());
            let mut fanout = LogFanout::new(dir, 8, cap, Metrics::new(), guard);
            body(&mut fanout);
        });
    }

    fn whole(fanout: &mut LogFanout, build: &BuildId) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let chunk = fanout.read(build, out.len() as u64).unwrap();
            if chunk.data.is_empty() {
                return out;
            }
            out.extend_from_slice(&chunk.data);
        }
    }

    #[test]
    fn the_cap_cuts_output_once_and_keeps_kilns_lines() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let build = BuildId::random();
        let id = build.clone();
        with_fanout(&logs, 100, move |f| {
            f.open(&id).unwrap();
            assert_eq!(f.append(&id, 0, &[b'a'; 60], false).unwrap(), 60);
            // Crossing the cap: cut at 100, then a newline and the marker.
            let len = f.append(&id, 60, &[b'b'; 60], false).unwrap();
            let marker = truncation_marker(100);
            assert_eq!(len, 100 + 1 + marker.len() as u64);
            // A resend of the same append and any later output are acknowledged, not stored.
            assert_eq!(f.append(&id, 60, &[b'b'; 60], false).unwrap(), len);
            assert_eq!(f.append(&id, len, b"more output\n", false).unwrap(), len);
            // Kiln's own line still goes in.
            let end = f.append(&id, len, b"pushed x\n", true).unwrap();
            assert_eq!(end, len + 9);
            f.finish(&id).unwrap();
            let log = whole(f, &id);
            let expected = [
                &[b'a'; 60][..],
                &[b'b'; 40],
                b"\n",
                marker.as_bytes(),
                b"pushed x\n",
            ]
            .concat();
            assert_eq!(log, expected);
        });
        let path = logs.join(format!("{build}.log"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "log file mode {mode:o}");
        let stored = fs::read(&path).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&stored)
                .matches("log truncated at 100 bytes")
                .count(),
            1
        );

        // A restarted fan-out knows the log was cut: output stays dropped, no second marker.
        let id = build.clone();
        with_fanout(&logs, 100, move |f| {
            let len = f.load(&id).unwrap().progress().len;
            assert_eq!(len, stored.len() as u64);
        });
        let unfinished = BuildId::random();
        let id = unfinished.clone();
        with_fanout(&logs, 100, move |f| {
            f.open(&id).unwrap();
            f.append(&id, 0, &[b'c'; 150], false).unwrap();
        });
        let id = unfinished.clone();
        with_fanout(&logs, 100, move |f| {
            let len = f.load(&id).unwrap().progress().len;
            assert_eq!(f.append(&id, len, b"late output\n", false).unwrap(), len);
            let log = whole(f, &id);
            assert_eq!(String::from_utf8_lossy(&log).matches("log truncated").count(), 1);
            assert!(log.starts_with(&[b'c'; 100]) && !log.windows(4).any(|w| w == b"late"));
        });
    }
}
