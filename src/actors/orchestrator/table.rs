//! The build table: every build this Kiln knows, running or finished, and which key is
//! building right now. Owned by the orchestrator; kept across its restarts.

use std::{
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use dashmap::DashMap;
use tokio::sync::watch;

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
    finished: Mutex<Option<(Instant, BuildOutcome)>>,
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

impl BuildRecord {
    pub fn new(id: BuildId, key: BuildKey, refs: BuildRefs, first: StatusUpdate) -> Self {
        Self {
            id,
            key,
            refs,
            started_at: SystemTime::now(),
            started: Instant::now(),
            history: watch::Sender::new(vec![first]),
            finished: Mutex::new(None),
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

    pub fn is_finished(&self) -> bool {
        self.finished.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// When the build finished, if it did.
    pub fn finished_at(&self) -> Option<Instant> {
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(t, _)| t)
    }

    pub fn subscribe(&self) -> watch::Receiver<Vec<StatusUpdate>> {
        self.history.subscribe()
    }

    /// Appends the update numbered `seq`. Updates already recorded (a resend) and updates
    /// after the terminal one are ignored. Returns the outcome and duration if this update
    /// finished the build.
    pub fn record(
        &self,
        seq: usize,
        update: StatusUpdate,
        outcome: Option<BuildOutcome>,
    ) -> Option<(BuildOutcome, std::time::Duration)> {
        let mut finished_now = None;
        self.history.send_if_modified(|history| {
            let ended = history.last().is_some_and(|u| u.status.is_terminal());
            if seq != history.len() || ended {
                return false;
            }
            if let (true, Some(outcome)) = (update.status.is_terminal(), outcome) {
                let now = Instant::now();
                *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, outcome));
                finished_now = Some((outcome, now.duration_since(self.started)));
            }
            history.push(update);
            true
        });
        finished_now
    }
}

/// The orchestrator's state: all records by id, and the running build of each key.
#[derive(Debug, Default)]
pub struct BuildTable {
    pub records: DashMap<BuildId, Arc<BuildRecord>>,
    pub running: DashMap<BuildKey, BuildId>,
}

impl BuildTable {
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

    fn record() -> BuildRecord {
        let d = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let base: ImageRef = "127.0.0.1:5000/a/b:c".parse().unwrap();
        BuildRecord::new(
            BuildId::random(),
            BuildKey::for_image(&d),
            BuildRefs {
                workspace: base.clone(),
                base,
            },
            StatusUpdate {
                status: BuildStatus::Running,
                message: "started".into(),
            },
        )
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
}
