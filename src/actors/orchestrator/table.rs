//! The build table: every build this Kiln knows, running or finished, and which key is
//! building right now. Owned by the orchestrator; kept across its restarts and, through the
//! [`Journal`], across restarts of Kiln: a record in a table with a journal writes itself to
//! disk when it is created and on every status change, and [`BuildTable::load`] reads every
//! record back at start-up.

use std::{
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use dashmap::DashMap;
use tokio::sync::watch;

use super::journal::{self, BuildInputs, Journal, PersistedBuild, PersistedUpdate};
use crate::model::{BuildId, BuildKey, BuildOutcome, BuildStatus, ImageRef};

/// The references a build answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRefs {
    /// The workspace image (`ref` on the wire).
    pub workspace: ImageRef,
    /// The resolved base image (`base_ref` on the wire).
    pub base: ImageRef,
}

/// One entry of a build's status history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub status: BuildStatus,
    pub message: String,
}

/// When (on the wall clock: retention counts across restarts) and how a build finished.
#[derive(Debug, Clone, Copy)]
struct Finished {
    wall: SystemTime,
    outcome: BuildOutcome,
}

/// Everything known about one build. The status history only grows; its last entry is the
/// current status, and a terminal entry is always the last.
#[derive(Debug)]
pub struct BuildRecord {
    pub id: BuildId,
    pub key: BuildKey,
    pub refs: BuildRefs,
    pub started_at: SystemTime,
    started: Instant,
    history: watch::Sender<Vec<StatusUpdate>>,
    /// When each history entry was recorded (same length as the history).
    times: Mutex<Vec<SystemTime>>,
    finished: Mutex<Option<Finished>>,
    /// The request, without secrets.
    inputs: Option<BuildInputs>,
    /// Where the record persists itself; none for a record outside a journaled table.
    journal: Option<Arc<Journal>>,
    /// Serialises writes of this record, so the last write holds the latest state.
    persisting: Mutex<()>,
}

/// A copy of a record's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSnapshot {
    pub id: BuildId,
    pub refs: BuildRefs,
    pub started_at: SystemTime,
    pub status: BuildStatus,
    pub message: String,
}

/// The `Instant` that was `wall` on the wall clock (now if that is before this boot).
fn instant_of(wall: SystemTime) -> Instant {
    let ago = SystemTime::now().duration_since(wall).unwrap_or_default();
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

impl BuildRecord {
    pub fn new(id: BuildId, key: BuildKey, refs: BuildRefs, first: StatusUpdate) -> Self {
        let now = SystemTime::now();
        Self {
            id,
            key,
            refs,
            started_at: now,
            started: Instant::now(),
            history: watch::Sender::new(vec![first]),
            times: Mutex::new(vec![now]),
            finished: Mutex::new(None),
            inputs: None,
            journal: None,
            persisting: Mutex::new(()),
        }
    }

    /// The record with the (secret-free) inputs of its request.
    pub fn with_inputs(mut self, inputs: BuildInputs) -> Self {
        self.inputs = Some(inputs);
        self
    }

    /// A record as a previous Kiln process persisted it.
    fn restore(p: PersistedBuild, journal: Arc<Journal>) -> Result<Self, String> {
        let workspace: ImageRef = p
            .workspace
            .parse()
            .map_err(|e| format!("workspace reference: {e}"))?;
        let base: ImageRef = p.base.parse().map_err(|e| format!("base reference: {e}"))?;
        // The table's key of every build is the key of its base image (see `plan`).
        let key = BuildKey::for_base(&base);
        if key.as_str() != p.key {
            return Err(format!("key {} does not match its base image {base}", p.key));
        }
        let last = p.history.last().ok_or("empty status history")?;
        let finished = last.status.is_terminal().then(|| {
            let outcome = p.outcome.map(BuildOutcome::from).unwrap_or(match last.status {
                BuildStatus::DoneSuccess => BuildOutcome::Success,
                _ => BuildOutcome::Failure,
            });
            let wall = journal::from_ms(p.finished_at_ms.unwrap_or(last.at_ms));
            Finished { wall, outcome }
        });
        let started_at = journal::from_ms(p.started_at_ms);
        let times = p.history.iter().map(|u| journal::from_ms(u.at_ms)).collect();
        let history = p
            .history
            .into_iter()
            .map(|u| StatusUpdate {
                status: u.status,
                message: u.message,
            })
            .collect();
        Ok(Self {
            id: p.id,
            key,
            refs: BuildRefs { workspace, base },
            started_at,
            started: instant_of(started_at),
            history: watch::Sender::new(history),
            times: Mutex::new(times),
            finished: Mutex::new(finished),
            inputs: p.inputs,
            journal: Some(journal),
            persisting: Mutex::new(()),
        })
    }

    /// The record as it is written to disk.
    fn to_persisted(&self) -> PersistedBuild {
        let history = self.history.borrow().clone();
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let finished = *self.finished.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        PersistedBuild {
            version: journal::FORMAT_VERSION,
            id: self.id.clone(),
            key: self.key.to_string(),
            workspace: self.refs.workspace.to_string(),
            base: self.refs.base.to_string(),
            started_at_ms: journal::to_ms(self.started_at),
            history: history
                .into_iter()
                .enumerate()
                .map(|(i, u)| PersistedUpdate {
                    status: u.status,
                    message: u.message,
                    at_ms: journal::to_ms(times.get(i).copied().unwrap_or(now)),
                })
                .collect(),
            outcome: finished.map(|f| f.outcome.into()),
            finished_at_ms: finished.map(|f| journal::to_ms(f.wall)),
            inputs: self.inputs.clone(),
        }
    }

    /// Writes the record to its journal, if it has one. A failed write is logged: the build
    /// goes on, it only would not survive a restart of Kiln.
    fn persist(&self) {
        let Some(journal) = &self.journal else {
            return;
        };
        let _one_at_a_time = self.persisting.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = journal.save(&self.to_persisted()) {
            tracing::error!(build_id = %self.id, %error, "build record not persisted");
        }
    }

    pub fn snapshot(&self) -> BuildSnapshot {
        let last = self
            .history
            .borrow()
            .last()
            .cloned()
            .expect("history starts non-empty");
        BuildSnapshot {
            id: self.id.clone(),
            refs: self.refs.clone(),
            started_at: self.started_at,
            status: last.status,
            message: last.message,
        }
    }

    /// The request's inputs, when the record has them.
    pub fn inputs(&self) -> Option<&BuildInputs> {
        self.inputs.as_ref()
    }

    pub fn is_finished(&self) -> bool {
        self.finished.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Whether the last status is terminal.
    pub fn has_ended(&self) -> bool {
        self.history
            .borrow()
            .last()
            .is_some_and(|u| u.status.is_terminal())
    }

    /// When the build finished on the wall clock, if it did (retention counts from it).
    pub fn finished_wall(&self) -> Option<SystemTime> {
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|f| f.wall)
    }

    pub fn subscribe(&self) -> watch::Receiver<Vec<StatusUpdate>> {
        self.history.subscribe()
    }

    /// Appends the update numbered `seq`. Updates already recorded (a resend) and updates
    /// after the terminal one are ignored. Returns the outcome and duration if this update
    /// finished the build. A recorded update is persisted before this returns.
    pub fn record(
        &self,
        seq: usize,
        update: StatusUpdate,
        outcome: Option<BuildOutcome>,
    ) -> Option<(BuildOutcome, std::time::Duration)> {
        self.record_then(seq, update, outcome, |_, _| {})
    }

    /// Like [`BuildRecord::record`]; `on_finish` runs when this update ends the build, before
    /// any watcher sees the terminal status (so a client that saw the end also sees it
    /// counted in the metrics).
    pub fn record_then(
        &self,
        seq: usize,
        update: StatusUpdate,
        outcome: Option<BuildOutcome>,
        on_finish: impl FnOnce(BuildOutcome, std::time::Duration),
    ) -> Option<(BuildOutcome, std::time::Duration)> {
        let mut on_finish = Some(on_finish);
        let mut finished_now = None;
        let changed = self.history.send_if_modified(|history| {
            let ended = history.last().is_some_and(|u| u.status.is_terminal());
            if seq != history.len() || ended {
                return false;
            }
            let (now, wall) = (Instant::now(), SystemTime::now());
            if let (true, Some(outcome)) = (update.status.is_terminal(), outcome) {
                *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(Finished { wall, outcome });
                let took = now.duration_since(self.started);
                finished_now = Some((outcome, took));
                if let Some(f) = on_finish.take() {
                    f(outcome, took);
                }
            }
            self.times.lock().unwrap_or_else(|e| e.into_inner()).push(wall);
            history.push(update);
            true
        });
        if changed {
            self.persist();
        }
        finished_now
    }
}

/// The orchestrator's state: all records by id, and the running build of each key.
#[derive(Debug, Default)]
pub struct BuildTable {
    pub records: DashMap<BuildId, Arc<BuildRecord>>,
    pub running: DashMap<BuildKey, BuildId>,
    journal: Option<Arc<Journal>>,
}

/// What [`BuildTable::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Builds a previous process left unfinished, oldest first; each may be resumed if its
    /// key is claimed in [`BuildTable::running`].
    pub interrupted: Vec<BuildId>,
    /// Builds that had finished.
    pub finished: Vec<BuildId>,
}

impl BuildTable {
    /// A table persisted in `journal`, with every record the journal holds. Unfinished
    /// builds that can be resumed claim their key again, so that a request for the same
    /// source joins the resumed build instead of starting another.
    pub fn load(journal: Journal) -> (Self, Loaded) {
        let journal = Arc::new(journal);
        let table = Self {
            journal: Some(journal.clone()),
            ..Self::default()
        };
        let mut loaded = Loaded::default();
        let persisted = journal.load_all().unwrap_or_else(|error| {
            tracing::error!(%error, "build records could not be read; starting without them");
            Vec::new()
        });
        let mut records: Vec<BuildRecord> = persisted
            .into_iter()
            .filter_map(|p| {
                let id = p.id.clone();
                BuildRecord::restore(p, journal.clone())
                    .map_err(|error| tracing::warn!(build_id = %id, %error, "build record skipped"))
                    .ok()
            })
            .collect();
        records.sort_by_key(|r| r.started_at);
        for record in records {
            let id = record.id.clone();
            if record.has_ended() {
                loaded.finished.push(id.clone());
            } else {
                let resumable = record.inputs().is_some_and(|i| i.not_resumable.is_none());
                if resumable {
                    // Of two unfinished builds of one key (a forced rebuild), the newer wins.
                    table.running.insert(record.key.clone(), id.clone());
                }
                loaded.interrupted.push(id.clone());
            }
            table.records.insert(id, Arc::new(record));
        }
        (table, loaded)
    }

    /// Adds a new record (persisting it when the table has a journal).
    pub fn insert(&self, mut record: BuildRecord) -> Arc<BuildRecord> {
        record.journal = self.journal.clone();
        let record = Arc::new(record);
        record.persist();
        self.records.insert(record.id.clone(), record.clone());
        record
    }

    /// Forgets a build, on disk too.
    pub fn remove(&self, id: &BuildId) -> Option<Arc<BuildRecord>> {
        let removed = self.records.remove(id).map(|(_, r)| r);
        if let Some(journal) = &self.journal {
            journal.remove(id);
        }
        removed
    }

    /// Running builds first (newest first), then finished ones (newest first).
    pub fn list(&self) -> Vec<BuildSnapshot> {
        let mut rows: Vec<(bool, SystemTime, BuildSnapshot)> = self
            .records
            .iter()
            .map(|r| (r.is_finished(), r.started_at, r.snapshot()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        rows.into_iter().map(|(_, _, s)| s).collect()
    }

    /// The newest build of a workspace image.
    pub fn by_workspace_ref(&self, workspace: &ImageRef) -> Option<Arc<BuildRecord>> {
        self.records
            .iter()
            .filter(|r| &r.refs.workspace == workspace)
            .max_by_key(|r| r.started_at)
            .map(|r| r.value().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        actors::orchestrator::BuildRequest,
        model::{AuthPolicy, BuildSource},
    };

    fn record() -> BuildRecord {
        let d = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let base: ImageRef = "127.0.0.1:5000/a/b:c".parse().unwrap();
        let base = base.pinned(d);
        BuildRecord::new(
            BuildId::random(),
            BuildKey::for_base(&base),
            BuildRefs {
                workspace: "127.0.0.1:5000/w/s:k".parse().unwrap(),
                base,
            },
            StatusUpdate {
                status: BuildStatus::Running,
                message: "started".into(),
            },
        )
    }

    fn inputs() -> BuildInputs {
        BuildInputs::of(&BuildRequest {
            source: BuildSource::Image {
                reference: "127.0.0.1:5000/a/b:c".parse().unwrap(),
            },
            auth: AuthPolicy::default(),
            force_rebuild: false,
            base_resolved: None,
            triggered_by: "t".into(),
        })
    }

    #[test]
    fn history_ignores_resends_and_updates_after_the_end() {
        let r = record();
        let done = StatusUpdate {
            status: BuildStatus::DoneSuccess,
            message: "ok".into(),
        };
        assert!(r.record(1, done.clone(), Some(BuildOutcome::Success)).is_some());
        assert!(r.record(1, done.clone(), Some(BuildOutcome::Success)).is_none());
        assert!(r.record(2, done, Some(BuildOutcome::Success)).is_none());
        assert_eq!(r.subscribe().borrow().len(), 2);
        assert!(r.is_finished());
        assert_eq!(r.snapshot().status, BuildStatus::DoneSuccess);
    }

    #[test]
    fn records_survive_a_reload_and_unfinished_ones_claim_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Journal::open(dir.path().join("builds")).unwrap();
        let (table, loaded) = BuildTable::load(open());
        assert!(loaded.interrupted.is_empty() && loaded.finished.is_empty());
        let done = table.insert(record().with_inputs(inputs()));
        done.record(
            1,
            StatusUpdate {
                status: BuildStatus::DoneFailure,
                message: "broke".into(),
            },
            Some(BuildOutcome::Failure),
        );
        let running = table.insert(record().with_inputs(inputs()));
        let mut secret = inputs();
        secret.not_resumable = Some("the request carried secrets".into());
        let not_resumable = table.insert(record().with_inputs(secret));

        let (again, loaded) = BuildTable::load(open());
        assert_eq!(loaded.finished, vec![done.id.clone()]);
        let mut interrupted = loaded.interrupted.clone();
        interrupted.sort();
        let mut expected = vec![running.id.clone(), not_resumable.id.clone()];
        expected.sort();
        assert_eq!(interrupted, expected);
        let back = again.records.get(&done.id).unwrap().clone();
        // Times are kept to the millisecond.
        let ms = |s: BuildSnapshot| {
            (
                journal::to_ms(s.started_at),
                BuildSnapshot {
                    started_at: SystemTime::UNIX_EPOCH,
                    ..s
                },
            )
        };
        assert_eq!(ms(back.snapshot()), ms(done.snapshot()));
        assert_eq!(*back.subscribe().borrow(), *done.subscribe().borrow());
        assert!(back.is_finished());
        let wall = |r: &BuildRecord| journal::to_ms(r.finished_wall().unwrap());
        assert_eq!(wall(&back), wall(&done));
        assert_eq!(back.inputs(), done.inputs());
        // Only the resumable unfinished build claims the key (all three share it here).
        assert_eq!(again.running.len(), 1);
        assert_eq!(*again.running.get(&running.key).unwrap(), running.id);

        again.remove(&done.id);
        let (third, loaded) = BuildTable::load(open());
        assert!(loaded.finished.is_empty());
        assert!(third.records.get(&done.id).is_none());
    }
}
