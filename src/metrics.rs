//! Kiln's Prometheus metrics: one [`Metrics`] value shared by the actors and the gRPC edge,
//! and the `/metrics` HTTP endpoint that serves it.
//!
//! Names are a contract (`docs/metrics.md`); counters get their `_total`
//! suffix from prometheus-client. Labels never carry secrets or unbounded values (no refs,
//! no build ids).
//!
//! Three kinds of values: counters and gauges the actors and the gRPC edge update as things
//! happen (builds, resolutions, restarts, build slots); gauges the HTTP edge sets from the
//! actors' answers just before each scrape ([`Metrics::set_mailbox_depths`],
//! [`Metrics::set_cache_entries`]); and what a [`Collector`] reads at each scrape from
//! process-wide counters of the lower layers (`registry::stats`, `engine::stats`) and from
//! `/proc/self` (prometheus-client has no process collector).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::{
    engine::{
        self,
        storage::{Storage, StoreKind},
    },
    model::{ActorKind, BuildOutcome},
    registry,
};

/// The `kind` label of the storage metrics: each [`StoreKind`], and `engine` for the engine
/// store as a whole (every kind but contexts).
const ENGINE_KIND: &str = "engine";
/// The `kind` label of `kiln_gc_removed_bytes_total` for the embedded registry's collections.
const REGISTRY_KIND: &str = "registry";

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
struct CacheLabel {
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabel {
    registry: String,
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

/// The caches' answers so far, for hit rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheResults {
    pub resolve_hits: u64,
    pub resolve_misses: u64,
    pub resolve_errors: u64,
    pub step_hits: u64,
    pub step_misses: u64,
}

/// How many entries Kiln's caches hold, for `kiln_cache_entries{cache}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheEntries {
    /// Resolved references in the resolvers' moka shards.
    pub resolver: u64,
    /// Request identities in the orchestrator's plan cache.
    pub plan: u64,
    /// Unpacked layers in the engine's layer store.
    pub layer_store: u64,
}

impl CacheEntries {
    fn by_name(self) -> [(&'static str, u64); 3] {
        [
            ("resolver", self.resolver),
            ("plan", self.plan),
            ("layer_store", self.layer_store),
        ]
    }
}

struct Inner {
    registry: Registry,
    builds_running: Gauge,
    builds_queued: Gauge,
    build_slots: Gauge,
    build_slots_in_use: Gauge,
    mailbox_depth: Family<KindLabel, Gauge>,
    cache_entries: Family<CacheLabel, Gauge>,
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
    /// The embedded registry whose collections `kiln_gc_removed_bytes_total{kind="registry"}`
    /// counts, read at every scrape.
    embedded_registry: OnceLock<registry::server::EmbeddedRegistry>,
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
        let builds_running = Gauge::default();
        registry.register(
            "kiln_builds_running",
            "Builds that hold a build slot and run",
            builds_running.clone(),
        );
        let builds_queued = Gauge::default();
        registry.register(
            "kiln_builds_queued",
            "Builds waiting for a free build slot (builds.max_concurrent)",
            builds_queued.clone(),
        );
        let build_slots = Gauge::default();
        registry.register(
            "kiln_build_slots",
            "Build slots: builds that may run at once (builds.max_concurrent)",
            build_slots.clone(),
        );
        let build_slots_in_use = Gauge::default();
        registry.register(
            "kiln_build_slots_in_use",
            "Build slots held by running builds",
            build_slots_in_use.clone(),
        );
        let mailbox_depth = Family::<KindLabel, Gauge>::default();
        registry.register(
            "kiln_actor_mailbox_depth",
            "Calls sent to the actors of a kind and not yet answered, summed over the live actors (read at scrape)",
            mailbox_depth.clone(),
        );
        let cache_entries = Family::<CacheLabel, Gauge>::default();
        registry.register(
            "kiln_cache_entries",
            "Entries in Kiln's caches: resolver, plan, layer_store (read at scrape)",
            cache_entries.clone(),
        );
        registry.register_collector(Box::new(ProcessWideCollector));
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
            let _ = mailbox_depth.get_or_create(&KindLabel { kind: kind.as_str() });
        }
        for (cache, _) in CacheEntries::default().by_name() {
            let _ = cache_entries.get_or_create(&CacheLabel { cache });
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
        let _ = gc_removed.get_or_create(&KindLabel { kind: REGISTRY_KIND });
        Self(Arc::new(Inner {
            registry,
            builds_running,
            builds_queued,
            build_slots,
            build_slots_in_use,
            mailbox_depth,
            cache_entries,
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
            embedded_registry: OnceLock::new(),
        }))
    }

    /// The number of build slots (`builds.max_concurrent`).
    pub fn set_build_slots(&self, slots: usize) {
        self.0.build_slots.set(i64::try_from(slots).unwrap_or(i64::MAX));
    }

    /// A build waits for a slot until the guard is dropped.
    pub fn build_queued(&self) -> GaugeGuard {
        GaugeGuard::hold([self.0.builds_queued.clone()])
    }

    /// A build holds a slot and runs until the guard is dropped.
    pub fn build_running(&self) -> GaugeGuard {
        GaugeGuard::hold([self.0.builds_running.clone(), self.0.build_slots_in_use.clone()])
    }

    /// The calls waiting at the live actors, as `(kind, in flight)` per actor; kinds not
    /// named read 0.
    pub fn set_mailbox_depths(&self, actors: impl IntoIterator<Item = (ActorKind, u64)>) {
        let mut depths = [0i64; ActorKind::ALL.len()];
        for (kind, n) in actors {
            if let Some(i) = ActorKind::ALL.iter().position(|k| *k == kind) {
                depths[i] = depths[i].saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        for (kind, depth) in ActorKind::ALL.iter().zip(depths) {
            self.0
                .mailbox_depth
                .get_or_create(&KindLabel { kind: kind.as_str() })
                .set(depth);
        }
    }

    pub fn set_cache_entries(&self, entries: CacheEntries) {
        for (cache, n) in entries.by_name() {
            self.0
                .cache_entries
                .get_or_create(&CacheLabel { cache })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The resolver's and the step cache's answers so far.
    pub fn cache_results(&self) -> CacheResults {
        let resolved = |result| {
            self.0
                .resolve_requests
                .get_or_create(&ResultLabel { result })
                .get()
        };
        let (step_hits, step_misses) = engine::stats::step_cache();
        CacheResults {
            resolve_hits: resolved("hit"),
            resolve_misses: resolved("miss"),
            resolve_errors: resolved("error"),
            step_hits,
            step_misses,
        }
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

    /// Counts the embedded registry's collections in `kiln_gc_removed_bytes_total`; the
    /// first registry given stays.
    pub fn watch_embedded_registry(&self, registry: registry::server::EmbeddedRegistry) {
        let _ = self.0.embedded_registry.set(registry);
    }

    /// Copies the engine store's books and the embedded registry's collected bytes into the
    /// storage metrics.
    fn sample_storage(&self) {
        if let Some(registry) = self.0.embedded_registry.get() {
            let counter = self
                .0
                .gc_removed
                .get_or_create(&KindLabel { kind: REGISTRY_KIND });
            counter.inc_by(registry.gc_removed_bytes().saturating_sub(counter.get()));
        }
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

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Holds gauges up by one until dropped (also when a panic unwinds the holder), so a
/// crashed build actor never leaves a build counted as running or queued.
#[must_use = "the gauges go down when the guard is dropped"]
pub struct GaugeGuard(Vec<Gauge>);

impl GaugeGuard {
    fn hold(gauges: impl IntoIterator<Item = Gauge>) -> Self {
        let gauges: Vec<Gauge> = gauges.into_iter().collect();
        for g in &gauges {
            g.inc();
        }
        Self(gauges)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        for g in &self.0 {
            g.dec();
        }
    }
}

/// Reads, at each scrape, the lower layers' process-wide counters and `/proc/self`.
#[derive(Debug)]
struct ProcessWideCollector;

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for ProcessWideCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let (hits, misses) = engine::stats::step_cache();
        let mut steps = encoder.encode_descriptor(
            "kiln_step_cache",
            "Cacheable Dockerfile steps (RUN, COPY, ADD, WORKDIR), by result: hit (from the instruction cache) or miss (run)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (result, n) in [("hit", hits), ("miss", misses)] {
            ConstCounter::new(n).encode(steps.encode_family(&ResultLabel { result })?)?;
        }

        let stats = registry::stats::snapshot();
        for (name, help, pick) in [
            (
                "kiln_registry_pulled_bytes",
                "Blob bytes pulled, by registry host (hosts past the 16th counted as \"other\")",
                (|t: &registry::stats::HostTraffic| t.pulled) as fn(&registry::stats::HostTraffic) -> u64,
            ),
            (
                "kiln_registry_pushed_bytes",
                "Blob bytes pushed, by registry host (hosts past the 16th counted as \"other\")",
                |t: &registry::stats::HostTraffic| t.pushed,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (host, traffic) in &stats.hosts {
                let label = RegistryLabel {
                    registry: host.clone(),
                };
                ConstCounter::new(pick(traffic)).encode(family.encode_family(&label)?)?;
            }
        }
        let mut errors = encoder.encode_descriptor(
            "kiln_registry_errors",
            "Failed registry calls (every attempt, retried or not), by kind",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (kind, n) in &stats.errors {
            ConstCounter::new(*n).encode(errors.encode_family(&KindLabel { kind: kind.as_str() })?)?;
        }

        if let Some(process) = process::read() {
            let cpu = ConstCounter::new(process.cpu_seconds);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                cpu.metric_type(),
            )?)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                process.resident_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                process.open_fds as f64,
            )?;
            gauge(
                &mut encoder,
                "process_max_fds",
                "The limit of open file descriptors",
                process.max_fds as f64,
            )?;
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "When the process started, in seconds since the Unix epoch",
                process.start_time_seconds,
            )?;
        }
        Ok(())
    }
}

/// The process's own figures, read from `/proc/self` (Linux).
mod process {
    pub struct Process {
        pub cpu_seconds: f64,
        pub resident_bytes: u64,
        pub open_fds: u64,
        pub max_fds: u64,
        pub start_time_seconds: f64,
    }

    /// `None` where `/proc` is not mounted.
    pub fn read() -> Option<Process> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may hold spaces and parentheses: fields are counted
        // after its closing parenthesis, which starts with field 3.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        // SAFETY: sysconf reads a constant of the system.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let (ticks, page) = (ticks.max(1) as f64, page.max(1) as f64);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        let max_fds = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
            0 => limit.rlim_cur,
            _ => 0,
        };
        Some(Process {
            cpu_seconds: (field(14)? + field(15)?) / ticks,
            resident_bytes: (field(24)? * page) as u64,
            open_fds,
            max_fds,
            start_time_seconds: boot + field(22)? / ticks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_follow_their_guards_and_the_scrape_time_settings() {
        let m = Metrics::new();
        m.set_build_slots(4);
        let queued = m.build_queued();
        let running = [m.build_running(), m.build_running()];
        m.set_mailbox_depths([
            (ActorKind::Resolver, 2),
            (ActorKind::Resolver, 3),
            (ActorKind::Build, 1),
        ]);
        m.set_cache_entries(CacheEntries {
            resolver: 7,
            plan: 2,
            layer_store: 9,
        });
        let text = m.encode();
        for line in [
            "kiln_build_slots 4",
            "kiln_builds_queued 1",
            "kiln_builds_running 2",
            "kiln_build_slots_in_use 2",
            "kiln_actor_mailbox_depth{kind=\"resolver\"} 5",
            "kiln_actor_mailbox_depth{kind=\"build\"} 1",
            "kiln_actor_mailbox_depth{kind=\"orchestrator\"} 0",
            "kiln_cache_entries{cache=\"resolver\"} 7",
            "kiln_cache_entries{cache=\"layer_store\"} 9",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        drop((queued, running));
        let text = m.encode();
        for line in [
            "kiln_builds_queued 0",
            "kiln_builds_running 0",
            "kiln_build_slots_in_use 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn process_figures_are_read_from_proc() {
        let p = process::read().expect("/proc/self is readable");
        assert!(p.resident_bytes > 1 << 20, "{} bytes resident", p.resident_bytes);
        assert!(
            p.open_fds >= 3 && p.open_fds <= p.max_fds,
            "{} of {} fds",
            p.open_fds,
            p.max_fds
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86400.0 * 365.0);
    }

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
            "kiln_builds_running 0",
            "kiln_builds_queued 0",
            "kiln_build_slots 0",
            "kiln_build_slots_in_use 0",
            "kiln_actor_mailbox_depth{kind=\"orchestrator\"} 0",
            "kiln_cache_entries{cache=\"layer_store\"} 0",
            "kiln_step_cache_total{result=\"hit\"}",
            "kiln_step_cache_total{result=\"miss\"}",
            "kiln_registry_errors_total{kind=\"unauthenticated\"}",
            "kiln_registry_pulled_bytes_total{registry=\"other\"}",
            "kiln_registry_pushed_bytes_total{registry=\"other\"}",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
