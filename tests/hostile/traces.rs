//! Issue 14, point 3: the trace headers of a gRPC call and the spans Kiln exports
//! (`telemetry.otlp_endpoint`, to a collector of the test's own on loopback).
//!
//! - A malformed `traceparent`, an oversized one, a repeated one: the call works and starts
//!   a new trace (its RPC span has no parent, and not the trace id the header tried). An
//!   oversized `tracestate` is dropped: the call continues the caller's trace without it.
//! - A health check, traced or not, exports no span.
//! - A build whose request carries a registry password (`auth.additional`), a build secret
//!   (read by `RUN --mount=type=secret`) and an `authorization` header: none of them, nor
//!   the base64 forms a registry or a header would see, is in any byte of any span
//!   exported, while the build's spans are.

use std::time::Duration;

use base64::Engine as _;
use kiln::proto::builder::{
    build_registry_auth, BuildRegistryAuth, BuildRegistryAuthTotal, BuildStatus, ListBuildsRequest,
};
use sha2::Digest as _;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use super::{
    busybox_in, raw_tar, request, run_build, support::otlp_collector::outline,
    support::otlp_collector::OtlpCollector, upload, uploaded_source, within, Entry, KilnOptions, KilnServer,
};

/// The trace id the hostile headers name; no span may carry it.
const TRIED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn kiln_exporting_to(collector: &OtlpCollector) -> KilnServer {
    let mut options = KilnOptions::embedded().with_toml(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\n",
        collector.endpoint()
    ));
    options.env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));
    KilnServer::start(options)
}

/// A ListBuilds call with `headers`, which must succeed; returns its exported RPC span.
async fn list_builds_with(
    kiln: &KilnServer,
    collector: &OtlpCollector,
    case: &str,
    headers: &[(&str, &str)],
) -> super::support::otlp_collector::ReceivedSpan {
    let before = collector.spans().len();
    let mut client = kiln.builder().await;
    let mut call = tonic::Request::new(ListBuildsRequest {});
    for (name, value) in headers {
        let name = tonic::metadata::MetadataKey::from_bytes(name.as_bytes()).unwrap();
        call.metadata_mut().append(name, value.parse().unwrap());
    }
    client
        .list_builds(call)
        .await
        .unwrap_or_else(|s| panic!("{case}: the call failed: {:?}: {}", s.code(), s.message()));
    let spans = collector
        .wait_for(case, Duration::from_secs(30), |spans| spans.len() > before)
        .await;
    match &spans[before..] {
        [rpc] if rpc.name == "builder.ImageBuilder/ListBuilds" => rpc.clone(),
        other => panic!("{case}: expected the ListBuilds span, got:\n{}", outline(other)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_trace_headers_are_ignored_and_the_call_works() {
    let collector = OtlpCollector::start().await;
    let kiln = kiln_exporting_to(&collector);
    within(120, async {
        let valid = format!("00-{TRIED_TRACE}-{CALLER_SPAN}-01");
        let oversized = format!("{valid}-{}", "ab".repeat(4096));
        let malformed = [
            ("not a traceparent", "garbage".to_owned()),
            (
                "a zero trace id",
                format!("00-{}-{CALLER_SPAN}-01", "0".repeat(32)),
            ),
            ("a short span id", format!("00-{TRIED_TRACE}-00f067aa-01")),
            ("version ff", format!("ff-{TRIED_TRACE}-{CALLER_SPAN}-01")),
            ("an oversized traceparent", oversized),
        ];
        for (case, header) in &malformed {
            let rpc = list_builds_with(&kiln, &collector, case, &[("traceparent", header)]).await;
            assert_ne!(rpc.trace_id, TRIED_TRACE, "{case}: {rpc:?}");
            assert_eq!(rpc.parent_span_id, "", "{case}: a new trace starts: {rpc:?}");
        }
        // A health check (a probe every few seconds) adds no span: the next one is the
        // ListBuilds call's.
        let before_health = collector.spans().len();
        let mut health = HealthClient::new(kiln.channel().await);
        let mut check = tonic::Request::new(HealthCheckRequest::default());
        check.metadata_mut().insert("traceparent", valid.parse().unwrap());
        health.check(check).await.expect("a health check");
        let rpc = list_builds_with(
            &kiln,
            &collector,
            "a repeated traceparent",
            &[("traceparent", &valid), ("traceparent", &valid)],
        )
        .await;
        assert_ne!(rpc.trace_id, TRIED_TRACE, "{rpc:?}");
        let since_health = collector.spans().split_off(before_health);
        assert!(
            since_health.iter().all(|s| !s.name.starts_with("grpc.health")),
            "{}",
            outline(&since_health)
        );

        // A tracestate past what W3C asks to pass on is dropped, the trace kept.
        let state = format!("kiln={}", "x".repeat(8192));
        let rpc = list_builds_with(
            &kiln,
            &collector,
            "an oversized tracestate",
            &[("traceparent", &valid), ("tracestate", &state)],
        )
        .await;
        assert_eq!(
            (rpc.trace_id.as_str(), rpc.parent_span_id.as_str()),
            (TRIED_TRACE, CALLER_SPAN)
        );
        assert_eq!(rpc.trace_state, "", "{rpc:?}");
        let rpc = list_builds_with(
            &kiln,
            &collector,
            "a plain tracestate",
            &[("traceparent", &valid), ("tracestate", "congo=t61rcWkgMzE")],
        )
        .await;
        assert_eq!(rpc.trace_state, "congo=t61rcWkgMzE", "{rpc:?}");
    })
    .await;
    assert!(collector.spans().iter().all(|s| s.trace_state.len() < 100));
}

const PASSWORD: &str = "kiln-hostile-registry-password-5c1f";
const BUILD_SECRET: &str = "kiln-hostile-build-secret-93ad";
const ADMIN_TOKEN: &str = "kiln-hostile-bearer-token-0e77";

/// Builds `dockerfile` with every secret a request can carry: a registry password, the
/// build secret `token`, an `authorization` header. Returns how it ended and its build id.
async fn build_with_secrets(client: &mut super::Client, dockerfile: &str) -> (BuildStatus, String) {
    let tar = raw_tar(&[Entry::File("Dockerfile", dockerfile.as_bytes())]);
    let digest = upload(client, &tar).await;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bob:{PASSWORD}"));
    let mut build = request(uploaded_source(&digest));
    if let Some(kiln::proto::builder::build_source::From::File(file)) =
        build.source.as_mut().and_then(|s| s.from.as_mut())
    {
        file.secrets
            .insert("token".into(), BUILD_SECRET.as_bytes().to_vec());
    }
    build.auth = Some(BuildRegistryAuth {
        additional: [("registry.invalid".to_owned(), basic)].into(),
        mode: Some(build_registry_auth::Mode::Total(BuildRegistryAuthTotal {
            allow_all: true,
        })),
    });
    let mut call = tonic::Request::new(build);
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{TRIED_TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    call.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    let outcome = run_build(client, call).await;
    let status = outcome.last_status().expect("the build ended");
    (status, outcome.build_id().expect("a build id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_of_a_request_is_in_any_exported_span() {
    let collector = OtlpCollector::start().await;
    let kiln = kiln_exporting_to(&collector);
    let base = busybox_in(&kiln);
    within(300, async {
        let mut client = kiln.builder().await;
        // The step proves it read the secret by its hash: the Dockerfile (traced as it is)
        // must not hold the secret itself.
        let hash = hex::encode(sha2::Sha256::digest(BUILD_SECRET));
        let reads = format!(
            "FROM {base}\n\
             RUN --mount=type=secret,id=token test \"$(sha256sum < /run/secrets/token)\" = \"{hash}  -\"\n"
        );
        let (status, read_id) = build_with_secrets(&mut client, &reads).await;
        assert_eq!(status, BuildStatus::DoneSuccess);
        // A step that prints the secret and fails: its output ends the build's message.
        let prints =
            format!("FROM {base}\nRUN --mount=type=secret,id=token cat /run/secrets/token; exit 3\n");
        let (status, print_id) = build_with_secrets(&mut client, &prints).await;
        assert_eq!(status, BuildStatus::DoneFailure);
        let spans = collector
            .wait_for("the builds' spans", Duration::from_secs(60), |spans| {
                [&read_id, &print_id].iter().all(|id| {
                    spans
                        .iter()
                        .any(|s| s.name == "build" && s.attr("build_id") == Some(id.as_str()))
                })
            })
            .await;
        let secret_steps = spans
            .iter()
            .filter(|s| {
                s.trace_id == TRIED_TRACE && s.attr("instruction").is_some_and(|i| i.contains("secret"))
            })
            .count();
        assert_eq!(
            secret_steps,
            2,
            "the secret-reading steps are traced:\n{}",
            outline(&spans)
        );
        let failed = spans
            .iter()
            .find(|s| s.name == "build" && s.attr("build_id") == Some(print_id.as_str()))
            .unwrap();
        assert_eq!(
            failed.status_code, 2,
            "the failed build's span is an error: {failed:?}"
        );
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("bob:{PASSWORD}"));
        let secret_b64 = base64::engine::general_purpose::STANDARD.encode(BUILD_SECRET);
        for bytes in collector.encoded() {
            for needle in [PASSWORD, &basic, BUILD_SECRET, &secret_b64, ADMIN_TOKEN] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{needle} is in an exported span:\n{}",
                    outline(&collector.spans())
                );
            }
        }
    })
    .await;
}
