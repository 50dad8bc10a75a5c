//! Traces: the real `kiln serve` exports its spans over OTLP to a collector this test starts
//! on loopback (`support::otlp_collector`), and the spans form the tree an operator reads.
//!
//! - A Dockerfile build of an uploaded context, called with a W3C `traceparent`: every
//!   span carries the caller's trace id; the Build RPC's span is the child of the caller's
//!   span; planning (`submit` → `plan` → `checkout`, `context_hash`, `resolve`) and the
//!   build (`build`, with its id) are children of the RPC's span; every line of the
//!   Dockerfile has a `step` span under the build (the FROM step pulling its base), each
//!   layer step with its cache result; the `push` and the `copy` to the workspace repository
//!   are under the build too. A forced rebuild (another trace) marks every layer step
//!   `cache = hit`.
//! - Spans still in the exporter's batch when Kiln stops (SIGTERM) are sent before it exits.

#[path = "../support/mod.rs"]
mod support;

use std::{collections::BTreeSet, time::Duration};

use kiln::proto::builder::{
    build_source, image_builder_client::ImageBuilderClient, BuildRequest, BuildSource, BuildSourceDockerfile,
    BuildStatus, ListBuildsRequest, UploadContextRequest,
};
use support::{
    base_images,
    kiln::{KilnOptions, KilnServer},
    otlp_collector::{outline, OtlpCollector, ReceivedSpan},
};
use tonic::transport::Channel;

type Client = ImageBuilderClient<Channel>;

/// The caller's trace of the first build, and its span (the parent of Kiln's RPC span).
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// The trace of the forced rebuild.
const REBUILD_TRACE: &str = "5ce0e9a56015fec5aadfa328ae398115";

fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

/// A request carrying `traceparent`.
fn traced<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
}

/// `kiln serve` exporting to `collector`, with batches sent every `delay_ms`.
fn kiln_exporting_to(collector: &OtlpCollector, delay_ms: u64) -> KilnServer {
    let mut options = KilnOptions::embedded().with_toml(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"kiln-under-test\"\n",
        collector.endpoint()
    ));
    options
        .env
        .push(("OTEL_BSP_SCHEDULE_DELAY".into(), delay_ms.to_string()));
    KilnServer::start(options)
}

/// A tar of `files` (name, content), each 0644.
fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, name, content.as_bytes())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

async fn upload(client: &mut Client, tar: Vec<u8>, traceparent: &str) -> String {
    let chunks = vec![UploadContextRequest { chunk: tar }];
    client
        .upload_context(traced(tokio_stream::iter(chunks), traceparent))
        .await
        .unwrap_or_else(|s| panic!("UploadContext: {:?}: {}", s.code(), s.message()))
        .into_inner()
        .digest
}

fn dockerfile_request(context_digest: &str, force_rebuild: bool) -> BuildRequest {
    BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                context_digest: context_digest.to_owned(),
                dockerfile_path: "Dockerfile".into(),
                context_path: ".".into(),
                ..Default::default()
            })),
        }),
        force_rebuild,
        triggered_by: "kiln-traces-test".into(),
        ..Default::default()
    }
}

/// Runs a Build to its end; returns the build id. Panics unless it ends `done_success`.
async fn run_build(client: &mut Client, request: BuildRequest, traceparent: &str) -> String {
    let mut stream = client
        .build(traced(request, traceparent))
        .await
        .unwrap_or_else(|s| panic!("Build: {:?}: {}", s.code(), s.message()))
        .into_inner();
    let mut last = None;
    while let Some(message) = stream.message().await.expect("the Build stream") {
        last = Some(message);
    }
    let last = last.expect("at least one BuildResponse");
    assert_eq!(last.status(), BuildStatus::DoneSuccess, "{last:?}");
    last.info.expect("a build's info").build_id
}

/// The spans of `trace` once its build span (which ends last) has arrived.
async fn trace_of_build(collector: &OtlpCollector, trace: &str, build_id: &str) -> Vec<ReceivedSpan> {
    let spans = collector
        .wait_for("the build's spans", Duration::from_secs(60), |spans| {
            spans
                .iter()
                .any(|s| s.name == "build" && s.attr("build_id") == Some(build_id))
        })
        .await;
    spans.into_iter().filter(|s| s.trace_id == trace).collect()
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[track_caller]
fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    match named(spans, name).as_slice() {
        [only] => only,
        other => panic!(
            "expected one {name} span, got {}:\n{}",
            other.len(),
            outline(spans)
        ),
    }
}

/// Whether `ancestor` is `span`'s parent, grandparent, ….
fn descends_from(spans: &[ReceivedSpan], span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
    let mut parent = span.parent_span_id.as_str();
    for _ in 0..spans.len() {
        if parent == ancestor.span_id {
            return true;
        }
        match spans.iter().find(|s| s.span_id == parent) {
            Some(p) => parent = &p.parent_span_id,
            None => return false,
        }
    }
    false
}

#[track_caller]
fn assert_child(spans: &[ReceivedSpan], child: &ReceivedSpan, parent: &ReceivedSpan) {
    assert_eq!(
        child.parent_span_id,
        parent.span_id,
        "{} must be a child of {}:\n{}",
        child.name,
        parent.name,
        outline(spans)
    );
}

#[track_caller]
fn assert_under(spans: &[ReceivedSpan], span: &ReceivedSpan, ancestor: &ReceivedSpan) {
    assert!(
        descends_from(spans, span, ancestor),
        "{} {:?} must be under {}:\n{}",
        span.name,
        span.attributes,
        ancestor.name,
        outline(spans)
    );
}

/// The Dockerfile: a step per kind (FROM, a config step, COPY, RUN, WORKDIR making a
/// directory), so that every layer step can be seen cached on the rebuild.
fn dockerfile(base: &str) -> String {
    format!(
        "FROM {base}\n\
         ENV GREETING=hello\n\
         COPY greeting.txt /greeting.txt\n\
         RUN cat /greeting.txt > /copied.txt\n\
         WORKDIR /traced\n"
    )
}

/// The Dockerfile's line of each step and whether it makes a layer.
const STEPS: [(u64, bool); 5] = [(1, false), (2, false), (3, true), (4, true), (5, true)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_is_one_trace_from_the_callers_span_to_the_push() {
    let collector = OtlpCollector::start().await;
    let kiln = kiln_exporting_to(&collector, 100);
    base_images::ensure_base_images(kiln.registry_addr(), false);
    let base = base_images::busybox_ref(kiln.registry_addr());
    let mut client = kiln.builder().await;
    let parent = traceparent(TRACE, CALLER_SPAN);
    let tar = tar_of(&[
        ("Dockerfile", &dockerfile(&base)),
        ("greeting.txt", "hello traces\n"),
    ]);
    let context = upload(&mut client, tar, &parent).await;
    let build_id = run_build(&mut client, dockerfile_request(&context, false), &parent).await;

    let all = trace_of_build(&collector, TRACE, &build_id).await;
    let everything = collector.spans();
    assert_eq!(
        all.len(),
        everything.len(),
        "every span belongs to the caller's trace:\n{}",
        outline(&everything)
    );
    assert!(all.iter().all(|s| s.service_name == "kiln-under-test"));

    // The Build RPC continues the caller's span; planning and the build hang below it.
    let rpcs = named(&all, "builder.ImageBuilder/Build");
    let [rpc] = rpcs.as_slice() else {
        panic!("one Build RPC span:\n{}", outline(&all))
    };
    assert_eq!(rpc.parent_span_id, CALLER_SPAN, "{rpc:?}");
    assert_eq!(rpc.attr("rpc.system"), Some("grpc"));
    assert_eq!(rpc.attr("rpc.method"), Some("Build"));
    assert_eq!(rpc.attr("rpc.grpc.status_code"), Some("0"));
    let upload_rpc = one(&all, "builder.ImageBuilder/UploadContext");
    assert_eq!(upload_rpc.parent_span_id, CALLER_SPAN);

    let submit = one(&all, "submit");
    assert_child(&all, submit, rpc);
    let plan = one(&all, "plan");
    assert_child(&all, plan, submit);
    for name in ["checkout", "context_hash", "resolve"] {
        let span = one(&all, name);
        assert_under(&all, span, plan);
    }
    assert_eq!(one(&all, "checkout").attr("context"), Some("upload"));
    assert_eq!(one(&all, "resolve").attr("image"), Some(base.as_str()));

    let build = one(&all, "build");
    assert_child(&all, build, rpc);
    assert_eq!(build.attr("build_id"), Some(build_id.as_str()));
    assert_eq!(build.attr("kiln.outcome"), Some("success"));

    // Every line of the Dockerfile is a step under the build.
    let steps = named(&all, "step");
    let lines: BTreeSet<u64> = steps
        .iter()
        .map(|s| s.attr("dockerfile.line").unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        lines,
        STEPS.iter().map(|(l, _)| *l).collect(),
        "{}",
        outline(&all)
    );
    assert_eq!(steps.len(), STEPS.len(), "{}", outline(&all));
    for step in &steps {
        assert_child(&all, step, build);
        let line: u64 = step.attr("dockerfile.line").unwrap().parse().unwrap();
        let layer = STEPS.iter().any(|&(l, layer)| l == line && layer);
        let expected = layer.then_some("miss");
        assert_eq!(
            step.attr("cache"),
            expected,
            "a first build does every layer step: {step:?}"
        );
    }
    let from = steps
        .iter()
        .find(|s| s.attr("dockerfile.line") == Some("1"))
        .unwrap();
    assert!(from.attr("instruction").unwrap().starts_with("FROM "), "{from:?}");
    let run = steps
        .iter()
        .find(|s| s.attr("dockerfile.line") == Some("4"))
        .unwrap();
    assert_eq!(
        run.attr("instruction"),
        Some("RUN cat /greeting.txt > /copied.txt")
    );
    let pull = one(&all, "pull");
    assert_child(&all, pull, from);
    assert!(!named(&all, "pull_blob").is_empty(), "{}", outline(&all));

    let push = one(&all, "push");
    assert_child(&all, push, build);
    let pushed_blobs = named(&all, "push_blob");
    assert!(!pushed_blobs.is_empty(), "{}", outline(&all));
    for blob in pushed_blobs {
        assert_under(&all, blob, build);
    }
    let copy = one(&all, "copy");
    assert_child(&all, copy, build);
    // The built image's manifest, and the workspace image's.
    let manifests = named(&all, "push_manifest");
    assert_eq!(manifests.len(), 2, "{}", outline(&all));
    for parent in [push, copy] {
        let under = manifests
            .iter()
            .filter(|m| descends_from(&all, m, parent))
            .count();
        assert_eq!(
            under,
            1,
            "one manifest pushed under {}:
{}",
            parent.name,
            outline(&all)
        );
    }

    // A forced rebuild, in another trace: every layer step comes from the cache.
    let rebuild_id = run_build(
        &mut client,
        dockerfile_request(&context, true),
        &traceparent(REBUILD_TRACE, CALLER_SPAN),
    )
    .await;
    let again = trace_of_build(&collector, REBUILD_TRACE, &rebuild_id).await;
    let rebuild = one(&again, "build");
    let steps = named(&again, "step");
    assert_eq!(steps.len(), STEPS.len(), "{}", outline(&again));
    for step in steps {
        assert_child(&again, step, rebuild);
        let line: u64 = step.attr("dockerfile.line").unwrap().parse().unwrap();
        let layer = STEPS.iter().any(|&(l, layer)| l == line && layer);
        assert_eq!(step.attr("cache"), layer.then_some("hit"), "{step:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_waiting_in_the_batch_are_sent_when_kiln_stops() {
    let collector = OtlpCollector::start().await;
    // Ten minutes: nothing is sent before the shutdown.
    let mut kiln = kiln_exporting_to(&collector, 600_000);
    let mut client = kiln.builder().await;
    client
        .list_builds(traced(ListBuildsRequest {}, &traceparent(TRACE, CALLER_SPAN)))
        .await
        .expect("ListBuilds");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(collector.spans().is_empty(), "{}", outline(&collector.spans()));
    drop(client);
    assert!(
        kiln.terminate(Duration::from_secs(30)),
        "kiln did not stop:\n{}",
        kiln.log_tail()
    );
    let spans = collector.spans();
    let rpc = one(&spans, "builder.ImageBuilder/ListBuilds");
    assert_eq!(
        (rpc.trace_id.as_str(), rpc.parent_span_id.as_str()),
        (TRACE, CALLER_SPAN)
    );
}
