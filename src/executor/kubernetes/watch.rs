//! One watch on every builder pod in the namespace, shared by all builds of this replica.
//!
//! A kube-runtime reflector keeps a local copy of Kiln's pods; the watcher behind it
//! re-lists after a `410 Gone` and re-watches after a dropped connection, with backoff, so a
//! build waiting for its pod never sees either. Builds wait on a change counter and read
//! their pod from the store: one watch connection however many builds run.

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt as _,
    },
    Api,
};
use tokio::sync::watch;

use super::pod::MANAGED_SELECTOR;

/// The replica's view of its builder pods.
#[derive(Clone)]
pub struct PodWatch {
    namespace: String,
    store: Store<Pod>,
    changes: watch::Receiver<u64>,
}

impl PodWatch {
    /// Starts watching on the current tokio runtime; the watch lives until `stop` fires.
    pub fn start(api: Api<Pod>, namespace: &str, stop: tokio_util::sync::CancellationToken) -> Self {
        let (reader, writer) = reflector::store();
        let (tick, changes) = watch::channel(0u64);
        let config = watcher::Config::default().labels(MANAGED_SELECTOR);
        let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let event = tokio::select! {
                    event = stream.next() => event,
                    _ = stop.cancelled() => return,
                };
                match event {
                    Some(Ok(_)) => tick.send_modify(|n| *n += 1),
                    // The watcher recovers on its own (re-list after 410, re-watch after a
                    // drop, with backoff); the error is only worth a line.
                    Some(Err(error)) => tracing::warn!(%error, "builder pod watch interrupted; resuming"),
                    None => return,
                }
            }
        });
        Self {
            namespace: namespace.to_owned(),
            store: reader,
            changes,
        }
    }

    /// Waits until the first list has been seen.
    pub async fn ready(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// The pod named `name`, as last seen.
    pub fn get(&self, name: &str) -> Option<Arc<Pod>> {
        self.store.get(&ObjectRef::new(name).within(&self.namespace))
    }

    /// Every builder pod, as last seen.
    pub fn all(&self) -> Vec<Arc<Pod>> {
        self.store.state()
    }

    /// A receiver that wakes on every change to any builder pod.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}
