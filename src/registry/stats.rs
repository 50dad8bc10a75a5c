//! Process-wide counters of registry traffic: bytes pulled and pushed per registry host, and
//! failed registry calls by [`RegistryErrorKind`].
//!
//! They count what this process moved, whichever client moved it, so they are process
//! state (like its RSS), not a client's: the registry layer counts without knowing the
//! metrics above it, and `metrics` reads [`snapshot`] at every scrape.
//!
//! Hosts come from image references a user wrote (a `FROM` line), so the label is bounded:
//! the first [`MAX_HOSTS`] hosts seen are counted by name (the configured repositories'
//! host is known from the start, [`seed_host`]), every later one as [`OTHER_HOSTS`].

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use super::RegistryErrorKind;

/// How many registry hosts are counted by name.
pub const MAX_HOSTS: usize = 16;
/// The label of the hosts past [`MAX_HOSTS`].
pub const OTHER_HOSTS: &str = "other";

/// Bytes moved to and from one registry host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostTraffic {
    pub pulled: u64,
    pub pushed: u64,
}

/// What [`snapshot`] reads.
#[derive(Debug, Clone, Default)]
pub struct RegistryStats {
    /// By host, sorted; [`OTHER_HOSTS`] is always there.
    pub hosts: BTreeMap<String, HostTraffic>,
    /// Failed registry calls (every failed attempt, retried or not), by kind.
    pub errors: Vec<(RegistryErrorKind, u64)>,
}

static HOSTS: Mutex<BTreeMap<String, HostTraffic>> = Mutex::new(BTreeMap::new());

static ERRORS: [AtomicU64; RegistryErrorKind::ALL.len()] =
    [const { AtomicU64::new(0) }; RegistryErrorKind::ALL.len()];

fn with_host(host: &str, f: impl FnOnce(&mut HostTraffic)) {
    // A panic while holding the lock cannot leave a counter half-updated.
    let mut hosts = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(traffic) = hosts.get_mut(host) {
        return f(traffic);
    }
    let named = hosts.keys().filter(|h| *h != OTHER_HOSTS).count();
    let key = if named < MAX_HOSTS { host } else { OTHER_HOSTS };
    f(hosts.entry(key.to_owned()).or_default());
}

/// Makes `host`'s series exist (at 0) before its first byte.
pub fn seed_host(host: &str) {
    with_host(host, |_| {});
}

/// `n` bytes of a blob arrived from `host`.
pub fn pulled(host: &str, n: u64) {
    with_host(host, |t| t.pulled += n);
}

/// `n` bytes of a blob were accepted by `host`.
pub fn pushed(host: &str, n: u64) {
    with_host(host, |t| t.pushed += n);
}

/// A registry call failed with an error of `kind`.
pub fn failed(kind: RegistryErrorKind) {
    ERRORS[kind as usize].fetch_add(1, Ordering::Relaxed);
}

/// The counters now.
pub fn snapshot() -> RegistryStats {
    let mut hosts = HOSTS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    hosts.entry(OTHER_HOSTS.to_owned()).or_default();
    RegistryStats {
        hosts,
        errors: RegistryErrorKind::ALL
            .iter()
            .map(|k| (*k, ERRORS[*k as usize].load(Ordering::Relaxed)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_past_the_bound_are_counted_as_other() {
        // The counters are process-wide: this test uses hosts no other test names.
        for i in 0..MAX_HOSTS + 3 {
            pulled(&format!("stats-test-{i}.example"), 1);
        }
        pushed("stats-test-0.example", 5);
        let stats = snapshot();
        let named = stats.hosts.keys().filter(|h| *h != OTHER_HOSTS).count();
        assert!(named <= MAX_HOSTS, "{named} hosts named");
        assert!(stats.hosts[OTHER_HOSTS].pulled >= 3, "{:?}", stats.hosts);
        let first = stats
            .hosts
            .get("stats-test-0.example")
            .copied()
            .unwrap_or_default();
        let other = stats.hosts[OTHER_HOSTS];
        // Whether the first test host got a name depends on the hosts other tests saw first.
        assert!(first.pushed == 5 || other.pushed >= 5, "{:?}", stats.hosts);
    }

    #[test]
    fn every_error_kind_is_reported() {
        failed(RegistryErrorKind::Unauthenticated);
        let stats = snapshot();
        assert_eq!(stats.errors.len(), RegistryErrorKind::ALL.len());
        let unauthenticated = stats
            .errors
            .iter()
            .find(|(k, _)| *k == RegistryErrorKind::Unauthenticated)
            .map(|(_, n)| *n);
        assert!(unauthenticated >= Some(1));
    }
}
