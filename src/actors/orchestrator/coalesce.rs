//! Identical `Submit`s in flight share one flow: plain data, owned by the orchestrator.
//!
//! A thousand workspaces starting from one image send a thousand identical requests at once.
//! Each would plan, resolve, check the registry and claim on its own, only to join the same
//! build; instead the first starts a flow and the others wait beside it, and every caller
//! gets the flow's answer (the first as the creator, the others as joiners). Requests are
//! identical when their source, credentials and stored base agree: whatever changes the
//! plan. `force_rebuild` requests are never grouped (each is a caller's explicit demand).

use std::collections::HashMap;

use super::BuildRequest;
use crate::model::{BuildSource, ContextSource};

/// The flows in flight and who waits for each. `W` is a waiter (a reply handle).
pub(super) struct InFlight<W> {
    next: u64,
    groups: HashMap<u64, Group<W>>,
    /// Cheap bucket (the source's identity) → groups, compared in full within a bucket.
    buckets: HashMap<String, Vec<u64>>,
}

struct Group<W> {
    request: BuildRequest,
    bucket: String,
    waiters: Vec<W>,
}

impl<W> Default for InFlight<W> {
    fn default() -> Self {
        Self {
            next: 0,
            groups: HashMap::new(),
            buckets: HashMap::new(),
        }
    }
}

impl<W> InFlight<W> {
    /// Adds a caller. `Some(flow)` when a new flow must start for it; `None` when it joined
    /// a flow in flight for an identical request.
    pub fn add(&mut self, request: &BuildRequest, waiter: W) -> Option<u64> {
        let bucket = bucket_of(request);
        let ids = self.buckets.get(&bucket).map(Vec::as_slice).unwrap_or_default();
        for id in ids {
            let group = self.groups.get_mut(id).expect("bucketed groups exist");
            if same_plan(&group.request, request) {
                group.waiters.push(waiter);
                return None;
            }
        }
        let id = self.next;
        self.next += 1;
        self.buckets.entry(bucket.clone()).or_default().push(id);
        self.groups.insert(
            id,
            Group {
                request: request.clone(),
                bucket,
                waiters: vec![waiter],
            },
        );
        Some(id)
    }

    /// Ends a flow: its waiters, the one that started it first.
    pub fn finish(&mut self, flow: u64) -> Vec<W> {
        let Some(group) = self.groups.remove(&flow) else {
            return Vec::new();
        };
        if let Some(ids) = self.buckets.get_mut(&group.bucket) {
            ids.retain(|id| *id != flow);
            if ids.is_empty() {
                self.buckets.remove(&group.bucket);
            }
        }
        group.waiters
    }

    /// Flows in flight.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.groups.len()
    }
}

/// Whether two requests make the same plan (`triggered_by` is only recorded).
fn same_plan(a: &BuildRequest, b: &BuildRequest) -> bool {
    !a.force_rebuild
        && !b.force_rebuild
        && a.source == b.source
        && a.auth == b.auth
        && a.base_resolved == b.base_resolved
}

fn bucket_of(request: &BuildRequest) -> String {
    match &request.source {
        BuildSource::Image { reference } => reference.to_string(),
        BuildSource::Dockerfile(d) => match &d.context {
            ContextSource::Git(git) => format!("git:{}\0{}", git.remote_uri, d.dockerfile_path),
            ContextSource::Uploaded(digest) => format!("upload:{digest}\0{}", d.dockerfile_path),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AuthPolicy, BasicCredentials, ImageRef, Secret};

    fn image(reference: &str) -> BuildRequest {
        BuildRequest {
            source: BuildSource::Image {
                reference: reference.parse::<ImageRef>().unwrap(),
            },
            auth: AuthPolicy::default(),
            force_rebuild: false,
            base_resolved: None,
            triggered_by: "test".into(),
            trace_parent: None,
        }
    }

    #[test]
    fn identical_requests_share_a_flow_and_all_waiters_are_answered_in_order() {
        let mut flows = InFlight::default();
        let request = image("registry.example.com/app:1");
        let flow = flows.add(&request, 1).expect("the first starts a flow");
        let mut other_caller = request.clone();
        other_caller.triggered_by = "someone else".into();
        assert_eq!(flows.add(&other_caller, 2), None);
        assert_eq!(flows.add(&request, 3), None);
        assert_eq!(flows.finish(flow), vec![1, 2, 3]);
        assert_eq!(flows.len(), 0);
        assert!(flows.finish(flow).is_empty(), "a flow ends once");
        assert!(flows.add(&request, 4).is_some(), "after the end, a new flow");
    }

    #[test]
    fn requests_that_plan_differently_never_share() {
        let mut flows = InFlight::default();
        let request = image("registry.example.com/app:1");
        assert!(flows.add(&request, 0).is_some());
        let mut forced = request.clone();
        forced.force_rebuild = true;
        assert!(flows.add(&forced, 1).is_some());
        assert!(flows.add(&forced, 2).is_some(), "force_rebuild is never grouped");
        let mut credentials = request.clone();
        credentials.auth.additional.insert(
            "registry.example.com".into(),
            BasicCredentials {
                username: "u".into(),
                password: Secret::new("p"),
            },
        );
        assert!(flows.add(&credentials, 3).is_some(), "other credentials");
        let mut other_password = credentials.clone();
        other_password
            .auth
            .additional
            .get_mut("registry.example.com")
            .unwrap()
            .password = Secret::new("q");
        assert!(flows.add(&other_password, 4).is_some(), "another password");
        let mut stored_base = request.clone();
        stored_base.base_resolved = Some("registry.example.com/base:1".parse().unwrap());
        assert!(flows.add(&stored_base, 5).is_some(), "a stored base");
        assert!(flows.add(&image("registry.example.com/app:2"), 6).is_some());
        assert_eq!(flows.len(), 7);
    }
}
