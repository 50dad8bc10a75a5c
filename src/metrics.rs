//! Kiln's Prometheus metrics: one [`Metrics`] value shared by the actors and the gRPC edge,
//! and the `/metrics` HTTP endpoint that serves it.
//!
//! Names are a contract (`../shared/reference/kiln-api.md`); counters get their `_total`
//! suffix from prometheus-client. Labels never carry secrets or unbounded values (no refs,
//! no build ids).

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::{
    engine::storage::{Storage, StoreKind},
    model::{ActorKind, BuildOutcome},
};

/// The `kind` label of the storage metrics: each [`StoreKind`], and `engine` for the engine
/// store as a whole (every kind but contexts).
const ENGINE_KIND: &str = "engine";

/// image-builder-mk3's label: `"true"` or `"false"`, as Go's `strconv.FormatBool`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SuccessLabel {
    success: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// How a resolution was answered, for `kiln_resolve_requests_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveResult {
    Hit,
    Miss,
    Error,
}

struct Inner {
    registry: Registry,
    builds_started: Counter,
    builds_completed: Family<OutcomeLabel, Counter>,
    build_joins: Counter,
    mk3_builds_started: Counter,
    mk3_builds_done: Family<SuccessLabel, Counter>,
    build_duration: Histogram,
    resolve_requests: Family<ResultLabel, Counter>,
    actor_restarts: Family<KindLabel, Counter>,
    log_bytes: Counter,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<MethodLabel>,
    storage_bytes: Family<KindLabel, Gauge>,
    storage_budget: Family<KindLabel, Gauge>,
    gc_removed: Family<KindLabel, Counter>,
    /// The engine store whose books the storage metrics show, read at every scrape.
    storage: OnceLock<Storage>,
}

/// The metric handles. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let builds_started = Counter::default();
        registry.register(
            "kiln_builds_started",
            "Builds started (joins excluded)",
            builds_started.clone(),
        );
        let builds_completed = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "kiln_builds_completed",
            "Builds finished, by outcome",
            builds_completed.clone(),
        );
        // image-builder-mk3's two metrics, counted as mk3 counts them (per Build call, not
        // per build), so that an installation's dashboards keep working.
        let mk3_builds_started = Counter::default();
        registry.register(
            "gitpod_image_builder_builds_started",
            "Build calls that found no image and started or joined a build (image-builder-mk3)",
            mk3_builds_started.clone(),
        );
        let mk3_builds_done = Family::<SuccessLabel, Counter>::default();
        registry.register(
            "gitpod_image_builder_builds_done",
            "Build calls whose stream delivered done_success or done_failure (image-builder-mk3)",
            mk3_builds_done.clone(),
        );
        let build_joins = Counter::default();
        registry.register(
            "kiln_build_joins",
            "Build requests that joined a running build",
            build_joins.clone(),
        );
        let build_duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "kiln_build_duration_seconds",
            "Build wall time",
            build_duration.clone(),
        );
        let resolve_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "kiln_resolve_requests",
            "Image resolutions, by cache hit, miss or error",
            resolve_requests.clone(),
        );
        let actor_restarts = Family::<KindLabel, Counter>::default();
        registry.register(
            "kiln_actor_restarts",
            "Actor restarts, by actor kind",
            actor_restarts.clone(),
        );
        let log_bytes = Counter::default();
        registry.register("kiln_log_bytes", "Build log bytes written", log_bytes.clone());
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "kiln_grpc_requests",
            "gRPC requests, by method and status code",
            rpc_requests.clone(),
        );
        let rpc_duration: HistogramFamily<MethodLabel> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "kiln_grpc_request_duration_seconds",
            "gRPC request latency (to the response headers), by method",
            rpc_duration.clone(),
        );
        let storage_bytes = Family::<KindLabel, Gauge>::default();
        registry.register(
            "kiln_storage_bytes",
            "Bytes on disk, by kind of store entry (engine: the engine store as a whole)",
            storage_bytes.clone(),
        );
        let storage_budget = Family::<KindLabel, Gauge>::default();
        registry.register(
            "kiln_storage_budget_bytes",
            "Storage budget, by kind (0: no budget of its own)",
            storage_budget.clone(),
        );
        let gc_removed = Family::<KindLabel, Counter>::default();
        registry.register(
            "kiln_gc_removed_bytes",
            "Bytes garbage collection removed, by kind",
            gc_removed.clone(),
        );
        // Every labelled series exists from the start at 0, so that a dashboard's rate() and a
        // test's "before" reading see it before its first event.
        for outcome in [
            BuildOutcome::Success,
            BuildOutcome::Failure,
            BuildOutcome::Cancelled,
        ] {
            let _ = builds_completed.get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            });
        }
        for result in ["hit", "miss", "error"] {
            let _ = resolve_requests.get_or_create(&ResultLabel { result });
        }
        for kind in ActorKind::ALL {
            let _ = actor_restarts.get_or_create(&KindLabel { kind: kind.as_str() });
        }
        for success in ["true", "false"] {
            let _ = mk3_builds_done.get_or_create(&SuccessLabel { success });
        }
        let storage_kinds = StoreKind::ALL.iter().map(|k| k.as_str()).chain([ENGINE_KIND]);
        for kind in storage_kinds {
            let _ = storage_bytes.get_or_create(&KindLabel { kind });
            let _ = storage_budget.get_or_create(&KindLabel { kind });
            let _ = gc_removed.get_or_create(&KindLabel { kind });
        }
        Self(Arc::new(Inner {
            registry,
            builds_started,
            builds_completed,
            build_joins,
            mk3_builds_started,
            mk3_builds_done,
            build_duration,
            resolve_requests,
            actor_restarts,
            log_bytes,
            rpc_requests,
            rpc_duration,
            storage_bytes,
            storage_budget,
            gc_removed,
            storage: OnceLock::new(),
        }))
    }

    pub fn build_started(&self) {
        self.0.builds_started.inc();
    }

    pub fn build_joined(&self) {
        self.0.build_joins.inc();
    }

    /// A Build call found no image and follows a build (mk3's `builds_started_total`).
    pub fn mk3_build_started(&self) {
        self.0.mk3_builds_started.inc();
    }

    /// A Build call's stream delivered a terminal status (mk3's `builds_done_total`).
    pub fn mk3_build_done(&self, success: bool) {
        let success = if success { "true" } else { "false" };
        self.0
            .mk3_builds_done
            .get_or_create(&SuccessLabel { success })
            .inc();
    }

    pub fn build_completed(&self, outcome: BuildOutcome, took: Duration) {
        self.0
            .builds_completed
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
        self.0.build_duration.observe(took.as_secs_f64());
    }

    pub fn resolved(&self, result: ResolveResult) {
        let result = match result {
            ResolveResult::Hit => "hit",
            ResolveResult::Miss => "miss",
            ResolveResult::Error => "error",
        };
        self.0
            .resolve_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn actor_restarted(&self, kind: ActorKind) {
        self.0
            .actor_restarts
            .get_or_create(&KindLabel { kind: kind.as_str() })
            .inc();
    }

    pub fn log_bytes(&self, n: u64) {
        self.0.log_bytes.inc_by(n);
    }

    pub fn rpc_finished(&self, method: &str, code: &'static str, took: Duration) {
        self.0
            .rpc_requests
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code,
            })
            .inc();
        self.0
            .rpc_duration
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Shows `storage`'s books in the storage metrics (read at every scrape); the first
    /// store given stays.
    pub fn watch_storage(&self, storage: Storage) {
        let _ = self.0.storage.set(storage);
    }

    /// Copies the engine store's books into the storage metrics.
    fn sample_storage(&self) {
        let Some(storage) = self.0.storage.get() else {
            return;
        };
        let gauge = |family: &Family<KindLabel, Gauge>, kind, value: u64| {
            family
                .get_or_create(&KindLabel { kind })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        let removed = |kind, total: u64| {
            let counter = self.0.gc_removed.get_or_create(&KindLabel { kind });
            counter.inc_by(total.saturating_sub(counter.get()));
        };
        let usage = storage.usage();
        for line in &usage {
            let kind = line.kind.as_str();
            gauge(&self.0.storage_bytes, kind, line.bytes);
            gauge(&self.0.storage_budget, kind, line.budget.unwrap_or(0));
            removed(kind, line.removed);
        }
        let engine = usage.iter().filter(|l| l.kind != StoreKind::Contexts);
        gauge(
            &self.0.storage_bytes,
            ENGINE_KIND,
            engine.clone().map(|l| l.bytes).sum(),
        );
        gauge(&self.0.storage_budget, ENGINE_KIND, storage.policy().max_bytes);
        removed(ENGINE_KIND, engine.map(|l| l.removed).sum());
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        self.sample_storage();
        let mut out = String::new();
        encode(&mut out, &self.0.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{http::header, routing::get, Router};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_names_are_exposed() {
        let m = Metrics::new();
        m.build_started();
        m.build_joined();
        m.build_completed(BuildOutcome::Cancelled, Duration::from_millis(5));
        m.resolved(ResolveResult::Hit);
        m.actor_restarted(ActorKind::Resolver);
        m.log_bytes(7);
        m.rpc_finished("/builder.ImageBuilder/Build", "Ok", Duration::from_millis(1));
        let text = m.encode();
        for name in [
            "kiln_builds_started_total 1",
            "kiln_builds_completed_total{outcome=\"cancelled\"} 1",
            "kiln_build_joins_total 1",
            "kiln_build_duration_seconds_count 1",
            "kiln_resolve_requests_total{result=\"hit\"} 1",
            "kiln_actor_restarts_total{kind=\"resolver\"} 1",
            "kiln_log_bytes_total 7",
            "kiln_storage_bytes{kind=\"layers\"} 0",
            "kiln_storage_budget_bytes{kind=\"engine\"} 0",
            "kiln_gc_removed_bytes_total{kind=\"cache_mounts\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
