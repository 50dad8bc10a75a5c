//! The build table: every build this Kiln knows, running or finished, and which key is
//! building right now. Plain data with `&mut self` methods, owned by one orchestrator
//! incarnation and tested without actix; every transition the orchestrator makes is one
//! method here: [`BuildTable::claim`] (or [`BuildTable::claim_for`] for a known build),
//! [`BuildTable::update`] (record a status, finish, free the key), [`BuildTable::release`],
//! [`BuildTable::prune`], and [`BuildTable::load`] (rebuild from the journal).
//!
//! Durability: in a table with a [`Journal`] every record is written to disk when it is
//! created and on every status change, before the change is visible (to watchers, or to
//! the caller's next step). So the table of a new orchestrator incarnation — or of a new
//! Kiln process — loaded from the journal alone is the table the last one had.

use std::{
    collections::HashMap,
    time::{Instant, SystemTime},
};

use tokio::sync::watch;

use super::journal::{self, BuildInputs, Journal, PersistedBuild, PersistedUpdate};
use crate::model::{BuildId, BuildKey, BuildOutcome, BuildStatus, ImageRef, ImageRefError};

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

/// Why a persisted record could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("workspace reference {reference:?}: {source}")]
    Workspace {
        reference: String,
        #[source]
        source: ImageRefError,
    },
    #[error("base reference {reference:?}: {source}")]
    Base {
        reference: String,
        #[source]
        source: ImageRefError,
    },
    #[error("key {key} does not match its base image {base}")]
    KeyMismatch { key: String, base: ImageRef },
    #[error("empty status history")]
    EmptyHistory,
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
    /// The status history.
    history: Vec<StatusUpdate>,
    /// The history as published to watchers, once persisted (an outgoing stream: watchers
    /// only read it).
    published: watch::Sender<Vec<StatusUpdate>>,
    /// When each history entry was recorded (same length as the history).
    times: Vec<SystemTime>,
    finished: Option<Finished>,
    /// The request, without secrets.
    inputs: Option<BuildInputs>,
}

/// A copy of a record's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSnapshot {
    pub id: BuildId,
    pub refs: BuildRefs,
    pub started_at: SystemTime,
    pub status: BuildStatus,
    pub message: String,
    /// When it ended, if it did.
    pub finished_at: Option<SystemTime>,
    /// Running, but waiting for a build slot (`builds.max_concurrent`): known to the
    /// orchestrator incarnation from its build actor, never persisted.
    pub queued: bool,
    /// What is built, for people (`PersistedSource::describe`); empty when unknown.
    pub source: String,
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
            published: watch::Sender::new(vec![first.clone()]),
            history: vec![first],
            times: vec![now],
            finished: None,
            inputs: None,
        }
    }

    /// The record with the (secret-free) inputs of its request.
    pub fn with_inputs(mut self, inputs: BuildInputs) -> Self {
        self.inputs = Some(inputs);
        self
    }

    /// A record as an earlier orchestrator (or Kiln process) persisted it.
    fn restore(p: PersistedBuild) -> Result<Self, RestoreError> {
        let workspace: ImageRef = p.workspace.parse().map_err(|source| RestoreError::Workspace {
            reference: p.workspace.clone(),
            source,
        })?;
        let base: ImageRef = p.base.parse().map_err(|source| RestoreError::Base {
            reference: p.base.clone(),
            source,
        })?;
        // The table's key of every build is the key of its base image (see `plan`).
        let key = BuildKey::for_base(&base);
        if key.as_str() != p.key {
            return Err(RestoreError::KeyMismatch { key: p.key, base });
        }
        let last = p.history.last().ok_or(RestoreError::EmptyHistory)?;
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
            .collect::<Vec<_>>();
        Ok(Self {
            id: p.id,
            key,
            refs: BuildRefs { workspace, base },
            started_at,
            started: instant_of(started_at),
            published: watch::Sender::new(history.clone()),
            history,
            times,
            finished,
            inputs: p.inputs,
        })
    }

    /// The record as it is written to disk.
    pub fn to_persisted(&self) -> PersistedBuild {
        let history = self.history.clone();
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
                    at_ms: journal::to_ms(self.times.get(i).copied().unwrap_or(now)),
                })
                .collect(),
            outcome: self.finished.map(|f| f.outcome.into()),
            finished_at_ms: self.finished.map(|f| journal::to_ms(f.wall)),
            inputs: self.inputs.clone(),
        }
    }

    pub fn snapshot(&self) -> BuildSnapshot {
        let last = self.history.last().cloned().expect("history starts non-empty");
        BuildSnapshot {
            id: self.id.clone(),
            refs: self.refs.clone(),
            started_at: self.started_at,
            status: last.status,
            message: last.message,
            finished_at: self.finished_wall(),
            queued: false,
            source: (self.inputs.as_ref())
                .map(|i| i.request.source.describe())
                .unwrap_or_default(),
        }
    }

    /// The request's inputs, when the record has them.
    pub fn inputs(&self) -> Option<&BuildInputs> {
        self.inputs.as_ref()
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// Whether the last status is terminal.
    pub fn has_ended(&self) -> bool {
        self.history.last().is_some_and(|u| u.status.is_terminal())
    }

    /// Entries in the status history: the sequence number of the next update.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// When the build finished on the wall clock, if it did (retention counts from it).
    pub fn finished_wall(&self) -> Option<SystemTime> {
        self.finished.map(|f| f.wall)
    }

    /// A watch on the status history (replay, then follow). It closes when this record is
    /// dropped: pruned, or its orchestrator incarnation ended (then watch the next one's).
    pub fn subscribe(&self) -> watch::Receiver<Vec<StatusUpdate>> {
        self.published.subscribe()
    }

    /// Shows the history to watchers (after it is persisted).
    fn publish(&self) {
        self.published.send_replace(self.history.clone());
    }

    /// Appends the update numbered `seq`. Updates already recorded (a resend) and updates
    /// after the terminal one are ignored (false). `on_finish` runs when this update ends
    /// the build, before any watcher sees the terminal status (so a client that saw the end
    /// also sees it counted in the metrics).
    fn record(
        &mut self,
        seq: usize,
        update: StatusUpdate,
        outcome: Option<BuildOutcome>,
        on_finish: impl FnOnce(BuildOutcome, std::time::Duration),
    ) -> Option<Option<(BuildOutcome, std::time::Duration)>> {
        if seq != self.history.len() || self.has_ended() {
            return None;
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut finished_now = None;
        if let (true, Some(outcome)) = (update.status.is_terminal(), outcome) {
            self.finished = Some(Finished { wall, outcome });
            let took = now.duration_since(self.started);
            finished_now = Some((outcome, took));
            on_finish(outcome, took);
        }
        self.times.push(wall);
        // Published by the table once persisted (see `BuildTable::update`).
        self.history.push(update);
        Some(finished_now)
    }
}

/// How [`BuildTable::claim`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key was free: a new record (this id) now holds it.
    Created(BuildId),
    /// The key is building already, as this build: join it.
    Joined(BuildId),
}

/// What [`BuildTable::update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Updated {
    /// No such build.
    Unknown,
    /// A resend, or an update after the end: nothing changed.
    Ignored,
    /// Appended.
    Recorded,
    /// Appended, and it ended the build (its key is free again).
    Finished(BuildOutcome, std::time::Duration),
}

/// The orchestrator's state: all records by id, and the running build of each key.
#[derive(Debug, Default)]
pub struct BuildTable {
    records: HashMap<BuildId, BuildRecord>,
    running: HashMap<BuildKey, BuildId>,
    /// Interrupted builds whose request carried credentials, waiting for a request of the
    /// same key to bring them again (see `orchestrator::awaiting`).
    awaiting: HashMap<BuildKey, BuildId>,
    journal: Option<Journal>,
}

/// What [`BuildTable::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Builds left unfinished, oldest first: each is running (its build actor will announce
    /// itself) or was interrupted and is resumed or ended.
    pub interrupted: Vec<BuildId>,
    /// Builds that had finished.
    pub finished: Vec<BuildId>,
}

impl BuildTable {
    /// A table persisted in `journal`, with every record the journal holds. Unfinished
    /// builds that can be resumed claim their key again, so that a request for the same
    /// source joins the build (running, or about to be resumed) instead of starting another.
    pub fn load(journal: Journal) -> (Self, Loaded) {
        let mut loaded = Loaded::default();
        let persisted = journal.load_all().unwrap_or_else(|error| {
            tracing::error!(%error, "build records could not be read; starting without them");
            Vec::new()
        });
        let mut table = Self {
            journal: Some(journal),
            ..Self::default()
        };
        let mut records: Vec<BuildRecord> = persisted
            .into_iter()
            .filter_map(|p| {
                let id = p.id.clone();
                BuildRecord::restore(p)
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
            table.records.insert(id, record);
        }
        (table, loaded)
    }

    /// Writes `id`'s record to the journal, if the table has one. A failed write is logged:
    /// the build goes on, it only would not survive a restart.
    fn persist(&self, id: &BuildId) {
        let (Some(journal), Some(record)) = (&self.journal, self.records.get(id)) else {
            return;
        };
        if let Err(error) = journal.save(&record.to_persisted()) {
            tracing::error!(build_id = %id, %error, "build record not persisted");
        }
    }

    pub fn get(&self, id: &BuildId) -> Option<&BuildRecord> {
        self.records.get(id)
    }

    /// How many keys a build holds.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// The build running for `key`, if any.
    pub fn running(&self, key: &BuildKey) -> Option<&BuildId> {
        self.running.get(key)
    }

    /// Claims `key`: joins the build running for it, or creates the record `new` makes
    /// (persisted before this returns) and gives it the key. Of any number of claims of one
    /// key exactly one creates, as long as the build runs.
    pub fn claim(&mut self, key: &BuildKey, new: impl FnOnce() -> BuildRecord) -> Claim {
        if let Some(id) = self.running.get(key) {
            return Claim::Joined(id.clone());
        }
        let record = new();
        let id = record.id.clone();
        debug_assert_eq!(&record.key, key);
        self.records.insert(id.clone(), record);
        self.persist(&id);
        self.running.insert(key.clone(), id.clone());
        Claim::Created(id)
    }

    /// Gives `key` to the known, unfinished build `id` (resumed, adopted, or running under a
    /// build actor that announced itself). `Err` names the other build holding the key.
    pub fn claim_for(&mut self, key: &BuildKey, id: &BuildId) -> Result<(), BuildId> {
        match self.running.get(key) {
            Some(other) if other != id => Err(other.clone()),
            Some(_) => Ok(()),
            None => {
                self.running.insert(key.clone(), id.clone());
                Ok(())
            }
        }
    }

    /// Adds a record made elsewhere (a build adopted from the cluster), persisted.
    pub fn insert(&mut self, record: BuildRecord) {
        let id = record.id.clone();
        self.records.insert(id.clone(), record);
        self.persist(&id);
    }

    /// Lets the interrupted build `id` wait for a request of `key` that brings its
    /// credentials. Of two such builds of one key the later one waits.
    pub fn await_credentials(&mut self, key: &BuildKey, id: &BuildId) {
        self.awaiting.insert(key.clone(), id.clone());
    }

    /// The build waiting for `key`'s credentials, no longer waiting. `None` while another
    /// build holds the key.
    pub fn take_awaiting(&mut self, key: &BuildKey) -> Option<BuildId> {
        if self.running.contains_key(key) {
            return None;
        }
        self.awaiting.remove(key)
    }

    /// Stops `id` waiting for credentials; whether it was waiting.
    pub fn stop_awaiting(&mut self, key: &BuildKey, id: &BuildId) -> bool {
        if self.awaiting.get(key) == Some(id) {
            self.awaiting.remove(key);
            return true;
        }
        false
    }

    /// Frees `key` if `id` holds it.
    pub fn release(&mut self, key: &BuildKey, id: &BuildId) {
        if self.running.get(key) == Some(id) {
            self.running.remove(key);
        }
    }

    /// Records a build's status update numbered `seq` (`None`: the next number, used to end
    /// a build from outside). The change is on disk before watchers see it; a terminal
    /// update frees the key.
    pub fn update(
        &mut self,
        id: &BuildId,
        seq: Option<usize>,
        update: StatusUpdate,
        outcome: Option<BuildOutcome>,
        on_finish: impl FnOnce(BuildOutcome, std::time::Duration),
    ) -> Updated {
        let Some(record) = self.records.get_mut(id) else {
            return Updated::Unknown;
        };
        let seq = seq.unwrap_or_else(|| record.history_len());
        let Some(finished) = record.record(seq, update, outcome, on_finish) else {
            return Updated::Ignored;
        };
        let key = record.key.clone();
        self.persist(id);
        if let Some(record) = self.records.get(id) {
            record.publish();
        }
        match finished {
            Some((outcome, took)) => {
                self.release(&key, id);
                Updated::Finished(outcome, took)
            }
            None => Updated::Recorded,
        }
    }

    /// Forgets the finished builds whose end is more than `retention` before `now` (on the
    /// wall clock, so it counts across restarts), on disk too; returns them.
    pub fn prune(&mut self, now: SystemTime, retention: std::time::Duration) -> Vec<BuildId> {
        let expired: Vec<BuildId> = self
            .records
            .values()
            .filter(|r| {
                r.finished_wall()
                    .is_some_and(|t| now.duration_since(t).unwrap_or_default() > retention)
            })
            .map(|r| r.id.clone())
            .collect();
        for id in &expired {
            self.records.remove(id);
            if let Some(journal) = &self.journal {
                journal.remove(id);
            }
        }
        expired
    }

    /// Unfinished builds, oldest first.
    pub fn unfinished(&self) -> Vec<BuildId> {
        let mut rows: Vec<&BuildRecord> = self.records.values().filter(|r| !r.has_ended()).collect();
        rows.sort_by_key(|r| r.started_at);
        rows.into_iter().map(|r| r.id.clone()).collect()
    }

    /// Running builds first (newest first), then finished ones (newest first).
    pub fn list(&self) -> Vec<BuildSnapshot> {
        let mut rows: Vec<(bool, SystemTime, BuildSnapshot)> = self
            .records
            .values()
            .map(|r| (r.is_finished(), r.started_at, r.snapshot()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        rows.into_iter().map(|(_, _, s)| s).collect()
    }

    /// The newest build of a workspace image.
    pub fn by_workspace_ref(&self, workspace: &ImageRef) -> Option<&BuildRecord> {
        self.records
            .values()
            .filter(|r| &r.refs.workspace == workspace)
            .max_by_key(|r| r.started_at)
    }

    /// Whether `id` is known.
    pub fn contains(&self, id: &BuildId) -> bool {
        self.records.contains_key(id)
    }

    /// Whether some build holds `key`.
    pub fn is_running(&self, key: &BuildKey) -> bool {
        self.running.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        actors::orchestrator::BuildRequest,
        model::{AuthPolicy, BuildSource},
    };

    fn base(n: u8) -> ImageRef {
        let d = format!("sha256:{}", char::from(b'a' + n).to_string().repeat(64))
            .parse()
            .unwrap();
        let base: ImageRef = "127.0.0.1:5000/a/b:c".parse().unwrap();
        base.pinned(d)
    }

    fn record_of(base: ImageRef) -> BuildRecord {
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

    fn record() -> BuildRecord {
        record_of(base(0))
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
            trace_parent: None,
        })
    }

    #[test]
    fn a_build_waiting_for_credentials_is_handed_out_once_and_only_while_its_key_is_free() {
        let mut table = BuildTable::default();
        let waiting = record();
        let (key, id) = (waiting.key.clone(), waiting.id.clone());
        table.insert(waiting);
        table.await_credentials(&key, &id);
        assert_eq!(table.running_count(), 0, "a waiting build does not hold its key");

        // While another build holds the key, nobody takes the waiting one.
        let other = BuildId::random();
        table.claim_for(&key, &other).unwrap();
        assert_eq!(table.take_awaiting(&key), None);
        table.release(&key, &other);

        assert_eq!(table.take_awaiting(&key), Some(id.clone()));
        assert_eq!(table.take_awaiting(&key), None, "handed out once");
        assert!(!table.stop_awaiting(&key, &id), "its wait already ended");

        // A wait that runs out ends it for good.
        table.await_credentials(&key, &id);
        assert!(table.stop_awaiting(&key, &id));
        assert_eq!(table.take_awaiting(&key), None);
    }

    fn done(status: BuildStatus) -> StatusUpdate {
        StatusUpdate {
            status,
            message: format!("{status:?}"),
        }
    }

    /// Everything a table holds, comparable: each record as persisted, and the claims.
    fn view(t: &BuildTable) -> (Vec<PersistedBuild>, Vec<(BuildKey, BuildId)>) {
        let mut records: Vec<PersistedBuild> = t.records.values().map(|r| r.to_persisted()).collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        let mut running: Vec<_> = t.running.iter().map(|(k, i)| (k.clone(), i.clone())).collect();
        running.sort();
        (records, running)
    }

    #[test]
    fn history_ignores_resends_and_updates_after_the_end() {
        let mut r = record();
        let ok = done(BuildStatus::DoneSuccess);
        assert!(r
            .record(1, ok.clone(), Some(BuildOutcome::Success), |_, _| {})
            .is_some());
        assert!(r
            .record(1, ok.clone(), Some(BuildOutcome::Success), |_, _| {})
            .is_none());
        assert!(r.record(2, ok, Some(BuildOutcome::Success), |_, _| {}).is_none());
        assert_eq!(r.history_len(), 2);
        assert_eq!(
            r.subscribe().borrow().len(),
            1,
            "published by the table, once persisted"
        );
        assert!(r.is_finished());
        assert_eq!(r.snapshot().status, BuildStatus::DoneSuccess);
    }

    #[test]
    fn a_key_is_claimed_once_joined_while_running_and_freed_by_the_end() {
        let mut t = BuildTable::default();
        let r = record();
        let key = r.key.clone();
        let Claim::Created(id) = t.claim(&key, || r) else {
            panic!("the first claim creates")
        };
        assert_eq!(
            t.claim(&key, || panic!("no second record")),
            Claim::Joined(id.clone())
        );
        assert_eq!(t.running(&key), Some(&id));
        assert_eq!(t.claim_for(&key, &BuildId::random()), Err(id.clone()));
        assert_eq!(t.claim_for(&key, &id), Ok(()));

        let watch = t.get(&id).unwrap().subscribe();
        let mut counted = 0;
        let update = t.update(
            &id,
            Some(1),
            done(BuildStatus::DoneSuccess),
            Some(BuildOutcome::Success),
            |_, _| counted += 1,
        );
        assert!(matches!(update, Updated::Finished(BuildOutcome::Success, _)));
        assert_eq!(counted, 1);
        assert_eq!(watch.borrow().len(), 2);
        assert!(!t.is_running(&key));
        // A resend changes nothing and counts nothing.
        let again = t.update(
            &id,
            Some(1),
            done(BuildStatus::DoneSuccess),
            Some(BuildOutcome::Success),
            |_, _| counted += 1,
        );
        assert_eq!(again, Updated::Ignored);
        assert_eq!(counted, 1);
        assert_eq!(
            t.update(
                &BuildId::random(),
                None,
                done(BuildStatus::DoneFailure),
                None,
                |_, _| {}
            ),
            Updated::Unknown
        );
        // The key is free: the next claim creates a new build.
        assert!(matches!(t.claim(&key, record), Claim::Created(other) if other != id));
        // `release` frees a key only for its holder.
        let holder = t.running(&key).unwrap().clone();
        t.release(&key, &id);
        assert_eq!(t.running(&key), Some(&holder));
        t.release(&key, &holder);
        assert!(!t.is_running(&key));
    }

    #[test]
    fn prune_drops_only_builds_finished_before_the_retention() {
        let mut t = BuildTable::default();
        let Claim::Created(old) = t.claim(&record_of(base(1)).key, || record_of(base(1))) else {
            panic!()
        };
        let Claim::Created(live) = t.claim(&record_of(base(2)).key, || record_of(base(2))) else {
            panic!()
        };
        t.update(
            &old,
            None,
            done(BuildStatus::DoneFailure),
            Some(BuildOutcome::Failure),
            |_, _| {},
        );
        let now = SystemTime::now();
        assert!(t.prune(now, Duration::from_secs(60)).is_empty());
        assert_eq!(
            t.prune(now + Duration::from_secs(61), Duration::from_secs(60)),
            vec![old.clone()]
        );
        assert!(!t.contains(&old) && t.contains(&live));
        assert_eq!(t.unfinished(), vec![live]);
    }

    #[test]
    fn an_incarnation_started_from_the_journal_alone_gets_the_same_table() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Journal::open(dir.path().join("builds")).unwrap();
        let (mut table, loaded) = BuildTable::load(open());
        assert!(loaded.interrupted.is_empty() && loaded.finished.is_empty());
        // Every transition: claims, a join, updates, an end, a prune.
        let mut ids = Vec::new();
        for n in 0..4 {
            let r = record_of(base(n)).with_inputs(inputs());
            let key = r.key.clone();
            let Claim::Created(id) = table.claim(&key, || r) else {
                panic!()
            };
            assert_eq!(table.claim(&key, || panic!()), Claim::Joined(id.clone()));
            ids.push(id);
        }
        table.update(
            &ids[0],
            Some(1),
            done(BuildStatus::DoneSuccess),
            Some(BuildOutcome::Success),
            |_, _| {},
        );
        table.update(
            &ids[1],
            Some(1),
            done(BuildStatus::DoneFailure),
            Some(BuildOutcome::Failure),
            |_, _| {},
        );
        table.prune(
            SystemTime::now() + Duration::from_secs(3600),
            Duration::from_secs(60),
        );
        assert!(!table.contains(&ids[0]) && !table.contains(&ids[1]));
        table.update(
            &ids[2],
            None,
            done(BuildStatus::DoneFailure),
            Some(BuildOutcome::Cancelled),
            |_, _| {},
        );
        let before = view(&table);
        drop(table);

        let (again, loaded) = BuildTable::load(open());
        assert_eq!(view(&again), before);
        assert_eq!(loaded.finished, vec![ids[2].clone()]);
        assert_eq!(loaded.interrupted, vec![ids[3].clone()]);
        // The watchers of the new incarnation replay the same history.
        assert_eq!(
            *again.get(&ids[2]).unwrap().subscribe().borrow(),
            vec![
                StatusUpdate {
                    status: BuildStatus::Running,
                    message: "started".into()
                },
                done(BuildStatus::DoneFailure)
            ]
        );
    }

    #[test]
    fn records_survive_a_reload_and_unfinished_ones_claim_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Journal::open(dir.path().join("builds")).unwrap();
        let (mut table, _) = BuildTable::load(open());
        let done_rec = record().with_inputs(inputs());
        let done_id = done_rec.id.clone();
        table.insert(done_rec);
        table.update(
            &done_id,
            Some(1),
            StatusUpdate {
                status: BuildStatus::DoneFailure,
                message: "broke".into(),
            },
            Some(BuildOutcome::Failure),
            |_, _| {},
        );
        let running = record().with_inputs(inputs());
        let (running_id, key) = (running.id.clone(), running.key.clone());
        table.insert(running);
        let mut secret = inputs();
        secret.not_resumable = Some("the request carried secrets".into());
        let not_resumable = record().with_inputs(secret);
        let not_resumable_id = not_resumable.id.clone();
        table.insert(not_resumable);
        let done_snapshot = table.get(&done_id).unwrap().snapshot();
        let done_wall = journal::to_ms(table.get(&done_id).unwrap().finished_wall().unwrap());

        let (mut again, loaded) = BuildTable::load(open());
        assert_eq!(loaded.finished, vec![done_id.clone()]);
        let mut interrupted = loaded.interrupted.clone();
        interrupted.sort();
        let mut expected = vec![running_id.clone(), not_resumable_id];
        expected.sort();
        assert_eq!(interrupted, expected);
        let back = again.get(&done_id).unwrap();
        // Times are kept to the millisecond.
        let ms = |s: BuildSnapshot| {
            (
                journal::to_ms(s.started_at),
                BuildSnapshot {
                    started_at: SystemTime::UNIX_EPOCH,
                    finished_at: None,
                    ..s
                },
            )
        };
        assert_eq!(ms(back.snapshot()), ms(done_snapshot));
        assert!(back.is_finished());
        assert_eq!(journal::to_ms(back.finished_wall().unwrap()), done_wall);
        assert_eq!(back.inputs(), Some(&inputs()));
        // Only the resumable unfinished build claims the key (all three share it here).
        assert_eq!(again.running.len(), 1);
        assert_eq!(again.running(&key), Some(&running_id));

        again.prune(SystemTime::now() + Duration::from_secs(10), Duration::ZERO);
        let (third, loaded) = BuildTable::load(open());
        assert!(loaded.finished.is_empty());
        assert!(third.get(&done_id).is_none());
    }
}
