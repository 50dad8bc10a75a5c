//! The fake cluster's node and API server behaving as a real one does where Kiln relies on
//! it: `restartPolicy` with restart counts and crash-loop back-off, `activeDeadlineSeconds`,
//! images pulled from the registry they name, memory limits, ServiceAccount and Pod Security
//! admission, list pages, and injected 429/5xx answers. Each case names the behaviour the
//! fake copies; the fake's own comments cite where it is documented.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::{ListParams, LogParams, PostParams};
use serde_json::json;

use crate::{
    fake_cluster::{
        api_error, phase, pod, pod_with, pod_with_secret, pods, process_alive, start_with, terminated,
        wait_pod,
    },
    support::{
        builder_image,
        fake_kube::{api::Fault, FakeKubeOptions},
    },
};

/// Back-offs short enough for a test; the kubelet's own are 10 s.
fn quick() -> FakeKubeOptions {
    FakeKubeOptions {
        restart_back_off: Duration::from_secs(1),
        image_pull_back_off: Duration::from_millis(500),
        ..Default::default()
    }
}

fn container(pod: &Pod) -> ContainerStatus {
    pod.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0].clone()
}

fn waiting_reason(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.container_statuses.as_ref()?[0]
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

/// `Never` never restarts; `OnFailure` restarts after a failure only; `Always` after any
/// exit, even 0; the second and later restarts wait in `CrashLoopBackOff`; the pod stays
/// Running while its container restarts; `previous=true` reads the last instance's log.
#[tokio::test]
async fn restart_policy_is_obeyed_with_restart_counts_and_crash_loop_back_off() {
    let (kube, _registry) = start_with(quick()).await;
    let api = pods(&kube).await;
    let with_policy = |name: &str, policy: &str, script: &str| {
        let mut p = pod(name, script);
        p.spec.as_mut().unwrap().restart_policy = Some(policy.into());
        p
    };
    for p in [
        with_policy("never-fails", "Never", "echo once; exit 1"),
        with_policy("on-failure-succeeds", "OnFailure", "exit 0"),
        with_policy("on-failure-fails", "OnFailure", "echo crash; exit 3"),
        with_policy("always-succeeds", "Always", "echo done; exit 0"),
        // Fails once, then succeeds: the emptyDir outlives the container.
        with_policy(
            "second-time-lucky",
            "OnFailure",
            "if [ -f /var/lib/kiln/once ]; then echo second; exit 0; fi; touch /var/lib/kiln/once; echo first; exit 1",
        ),
    ] {
        api.create(&PostParams::default(), &p).await.unwrap();
    }
    let ended = |p: &Pod| matches!(phase(p), "Succeeded" | "Failed");
    let never = wait_pod(&api, "never-fails", Duration::from_secs(20), ended).await;
    assert_eq!((phase(&never), container(&never).restart_count), ("Failed", 0));
    let fine = wait_pod(&api, "on-failure-succeeds", Duration::from_secs(20), ended).await;
    assert_eq!((phase(&fine), container(&fine).restart_count), ("Succeeded", 0));

    let looping = wait_pod(&api, "on-failure-fails", Duration::from_secs(20), |p| {
        container(p).restart_count >= 2 && waiting_reason(p).as_deref() == Some("CrashLoopBackOff")
    })
    .await;
    assert_eq!(phase(&looping), "Running", "a restarting pod stays Running");
    let status = container(&looping);
    let waiting = status.state.unwrap().waiting.unwrap();
    // The second restart waited 1 s, the third 2 s (and so on, doubling).
    let message = waiting.message.as_deref().unwrap();
    assert!(
        message.starts_with("back-off 2s restarting failed container=build pod=on-failure-fails_kiln(")
            || message
                .starts_with("back-off 4s restarting failed container=build pod=on-failure-fails_kiln("),
        "{waiting:?}"
    );
    let last = status.last_state.unwrap().terminated.unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
    let previous = LogParams {
        previous: true,
        ..Default::default()
    };
    assert_eq!(api.logs("on-failure-fails", &previous).await.unwrap(), "crash\n");

    let always = wait_pod(&api, "always-succeeds", Duration::from_secs(20), |p| {
        container(p).restart_count >= 1
    })
    .await;
    assert_eq!(phase(&always), "Running", "Always restarts even after exit 0");

    let lucky = wait_pod(&api, "second-time-lucky", Duration::from_secs(20), ended).await;
    assert_eq!((phase(&lucky), container(&lucky).restart_count), ("Succeeded", 1));
    assert_eq!(
        api.logs("second-time-lucky", &LogParams::default())
            .await
            .unwrap(),
        "second\n"
    );
    assert_eq!(api.logs("second-time-lucky", &previous).await.unwrap(), "first\n");
    // A container that never restarted has no previous log.
    assert_eq!(api_error(api.logs("never-fails", &previous).await).code, 400);
    assert!(kube.container_starts() >= 2 + 3 + 2 + 2);
}

/// `activeDeadlineSeconds` counts from the pod's start on the node: past it, the kubelet
/// kills the container (SIGTERM) and the pod is Failed, reason `DeadlineExceeded`, never
/// restarted; a pod still waiting (for its Secret) fails the same way.
#[tokio::test]
async fn active_deadline_fails_the_pod_with_deadline_exceeded() {
    let (kube, _registry) = start_with(quick()).await;
    let api = pods(&kube).await;
    // The deadline counts from startTime, before the image pull: with the image already on
    // the node (`IfNotPresent`), the container starts well within its one second.
    api.create(&PostParams::default(), &pod("pulls-the-image", "true"))
        .await
        .unwrap();
    wait_pod(&api, "pulls-the-image", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let mut running = pod("overdue", "echo started; sleep 60");
    let spec = running.spec.as_mut().unwrap();
    spec.active_deadline_seconds = Some(1);
    spec.restart_policy = Some("Always".into());
    api.create(&PostParams::default(), &running).await.unwrap();
    let mut waiting = pod_with_secret("never-mounted", "true");
    waiting.spec.as_mut().unwrap().active_deadline_seconds = Some(1);
    api.create(&PostParams::default(), &waiting).await.unwrap();

    wait_pod(&api, "overdue", Duration::from_secs(20), |p| {
        phase(p) == "Running"
    })
    .await;
    let pid = kube.pod_pid("overdue").expect("the container runs");
    // Like the kubelet's status manager, the pod turns Failed when the deadline passes and
    // its container's `terminated` state follows once the runtime has killed it.
    let failed = wait_pod(&api, "overdue", Duration::from_secs(20), |p| {
        phase(p) == "Failed" && terminated(p).is_some()
    })
    .await;
    let status = failed.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        status.message.as_deref(),
        Some("Pod was active on the node longer than the specified deadline")
    );
    let t = terminated(&failed).expect("waited for it");
    assert_eq!(t.exit_code, 128 + 15, "SIGTERM: {t:?}");
    assert_eq!(
        container(&failed).restart_count,
        0,
        "not restarted past the deadline"
    );
    assert!(!process_alive(pid));
    assert_eq!(
        api.logs("overdue", &LogParams::default()).await.unwrap(),
        "started\n"
    );

    let never = wait_pod(&api, "never-mounted", Duration::from_secs(20), |p| {
        phase(p) == "Failed"
    })
    .await;
    assert_eq!(
        never.status.as_ref().unwrap().reason.as_deref(),
        Some("DeadlineExceeded")
    );
    assert_eq!(waiting_reason(&never).as_deref(), Some("ContainerCreating"));
}

/// The kubelet pulls the image from the registry it names (here through the node's mirror
/// of `ghcr.io`): a missing one is `ErrImagePull` with the runtime's message, then
/// `ImagePullBackOff`, the pod Pending; pushed later, it is pulled at the next try. A
/// registry the node cannot reach fails the same way; `imagePullPolicy` defaults to
/// `Always` for `:latest`.
#[tokio::test]
async fn images_are_pulled_from_the_registry_they_name() {
    let (kube, registry) = start_with(quick()).await;
    let api = pods(&kube).await;
    let with_image = |name: &str, image: &str| {
        let mut p = pod(name, "echo ran");
        p.spec.as_mut().unwrap().containers[0].image = Some(image.into());
        p
    };
    let created = api
        .create(
            &PostParams::default(),
            &with_image("late", "ghcr.io/kiln-build/kiln:later"),
        )
        .await
        .unwrap();
    assert_eq!(
        created.spec.unwrap().containers[0].image_pull_policy.as_deref(),
        Some("IfNotPresent")
    );
    let stuck = wait_pod(&api, "late", Duration::from_secs(20), |p| {
        waiting_reason(p).as_deref() == Some("ErrImagePull")
    })
    .await;
    let message = container(&stuck).state.unwrap().waiting.unwrap().message.unwrap();
    assert_eq!(
        message,
        "failed to pull and unpack image \"ghcr.io/kiln-build/kiln:later\": failed to resolve reference \
         \"ghcr.io/kiln-build/kiln:later\": ghcr.io/kiln-build/kiln:later: not found"
    );
    let backing_off = wait_pod(&api, "late", Duration::from_secs(20), |p| {
        waiting_reason(p).as_deref() == Some("ImagePullBackOff")
    })
    .await;
    assert_eq!(phase(&backing_off), "Pending");
    let logs = api_error(api.logs("late", &LogParams::default()).await);
    assert!(
        logs.message.ends_with("is waiting to start: ImagePullBackOff"),
        "{}",
        logs.message
    );

    builder_image::push(registry.addr(), "kiln-build/kiln", "later").await;
    wait_pod(&api, "late", Duration::from_secs(20), |p| phase(p) == "Succeeded").await;

    let latest = api
        .create(&PostParams::default(), &with_image("elsewhere", "busybox"))
        .await
        .unwrap();
    assert_eq!(
        latest.spec.unwrap().containers[0].image_pull_policy.as_deref(),
        Some("Always")
    );
    let unreachable = wait_pod(&api, "elsewhere", Duration::from_secs(20), |p| {
        waiting_reason(p).as_deref() == Some("ErrImagePull")
    })
    .await;
    let message = container(&unreachable)
        .state
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert!(
        message.starts_with("failed to pull and unpack image \"docker.io/library/busybox:latest\"")
            && message.contains("no such host"),
        "{message}"
    );
    assert!(kube.image_pulls() >= 3);
}

/// `resources.limits.memory` is a cgroup limit: a container that needs more is killed by
/// the kernel and reported `OOMKilled` (exit 137).
#[tokio::test]
async fn a_container_over_its_memory_limit_is_oom_killed() {
    let (kube, _registry) = start_with(quick()).await;
    let api = pods(&kube).await;
    // `tail -n 1` keeps its input's last line in memory: 512 MiB without a newline.
    let mut hog = pod("hog", "head -c 536870912 /dev/zero | tail -n 1 > /dev/null");
    hog.spec.as_mut().unwrap().containers[0].resources =
        Some(serde_json::from_value(json!({ "limits": { "memory": "64Mi" } })).unwrap());
    let created = api.create(&PostParams::default(), &hog).await.unwrap();
    assert_eq!(created.status.unwrap().qos_class.as_deref(), Some("Burstable"));
    let mut modest = pod("modest", "head -c 1048576 /dev/zero | tail -n 1 | wc -c");
    modest.spec.as_mut().unwrap().containers[0].resources =
        hog.spec.as_ref().unwrap().containers[0].resources.clone();
    api.create(&PostParams::default(), &modest).await.unwrap();

    let ended = |p: &Pod| matches!(phase(p), "Succeeded" | "Failed");
    let killed = wait_pod(&api, "hog", Duration::from_secs(60), ended).await;
    let t = terminated(&killed).unwrap();
    assert_eq!(
        (phase(&killed), t.exit_code, t.reason.as_deref()),
        ("Failed", 137, Some("OOMKilled"))
    );
    let fine = wait_pod(&api, "modest", Duration::from_secs(60), ended).await;
    assert_eq!(phase(&fine), "Succeeded");
    drop(kube);
}

/// A pod whose ServiceAccount does not exist is refused by the ServiceAccount admission
/// plugin; in a namespace labelled `pod-security.kubernetes.io/enforce`, PodSecurity
/// admission refuses what that level forbids, with the real messages.
#[tokio::test]
async fn admission_refuses_missing_service_accounts_and_pod_security_violations() {
    let (kube, _registry) = start_with(FakeKubeOptions::default()).await;
    let api = pods(&kube).await;
    let mut p = pod("nobody", "true");
    p.spec.as_mut().unwrap().service_account_name = Some("nobody".into());
    let refused = api_error(api.create(&PostParams::default(), &p).await);
    assert_eq!((refused.code, refused.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        refused.message,
        "pods \"nobody\" is forbidden: error looking up service account kiln/nobody: serviceaccount \"nobody\" not found"
    );
    let details = refused.details.unwrap();
    assert_eq!((details.name.as_str(), details.kind.as_str()), ("nobody", "pods"));
    assert_eq!(kube.pods_created(), 0);
    drop(kube);

    for level in ["baseline", "restricted"] {
        let (kube, _registry) = start_with(FakeKubeOptions {
            namespace_labels: [("pod-security.kubernetes.io/enforce".to_owned(), level.to_owned())].into(),
            ..Default::default()
        })
        .await;
        let api = pods(&kube).await;
        let privileged = pod_with(
            "privileged",
            "true",
            crate::fake_cluster::security(json!({ "privileged": true })),
        );
        let refused = api_error(api.create(&PostParams::default(), &privileged).await);
        assert_eq!((refused.code, refused.reason.as_str()), (403, "Forbidden"));
        assert!(
            refused.message.starts_with(&format!(
                "pods \"privileged\" is forbidden: violates PodSecurity \"{level}:latest\": "
            )) && refused
                .message
                .contains("privileged (container \"build\" must not set securityContext.privileged=true)"),
            "{}",
            refused.message
        );
        let sys_admin = pod_with(
            "sys-admin",
            "true",
            crate::fake_cluster::security(
                json!({ "capabilities": { "drop": ["ALL"], "add": ["SYS_ADMIN"] } }),
            ),
        );
        let refused = api_error(api.create(&PostParams::default(), &sys_admin).await);
        assert!(
            refused.message.contains(
                "non-default capabilities (container \"build\" must not include \"SYS_ADMIN\" in securityContext.capabilities.add)"
            ),
            "{}",
            refused.message
        );
        // What each level allows.
        let plain = pod("plain", "true");
        let restricted = pod_with(
            "restricted",
            "true",
            crate::fake_cluster::security(json!({
                "allowPrivilegeEscalation": false,
                "capabilities": { "drop": ["ALL"] },
                "runAsNonRoot": true,
                "runAsUser": 65534,
                "seccompProfile": { "type": "RuntimeDefault" },
            })),
        );
        let plain_result = api.create(&PostParams::default(), &plain).await;
        if level == "baseline" {
            plain_result.expect("baseline admits a plain pod");
        } else {
            let refused = api_error(plain_result);
            for reason in [
                "allowPrivilegeEscalation != false",
                "unrestricted capabilities",
                "runAsNonRoot != true",
                "seccompProfile",
            ] {
                assert!(refused.message.contains(reason), "{reason}: {}", refused.message);
            }
        }
        api.create(&PostParams::default(), &restricted)
            .await
            .expect("a restricted pod passes every level");
    }
}

/// Lists come in pages of `limit` with a `continue` token and `remainingItemCount`; a token
/// older than the compacted history is 410 Expired (counted).
#[tokio::test]
async fn lists_are_paged_and_old_continue_tokens_expire() {
    let (kube, _registry) = start_with(FakeKubeOptions::default()).await;
    let api = pods(&kube).await;
    // Pods that wait for their Secret: no processes.
    for i in 0..5 {
        api.create(
            &PostParams::default(),
            &pod_with_secret(&format!("page-{i}"), "true"),
        )
        .await
        .unwrap();
    }
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let mut names: Vec<String> = first
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    let mut token = first.metadata.continue_.clone();
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = api
            .list(&ListParams::default().limit(2).continue_token(&t))
            .await
            .unwrap();
        names.extend(page.items.iter().map(|p| p.metadata.name.clone().unwrap()));
        token = page.metadata.continue_;
    }
    assert_eq!(names, (0..5).map(|i| format!("page-{i}")).collect::<Vec<_>>());

    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    kube.expire_history();
    let before = kube.expired_served();
    let expired = api_error(
        api.list(
            &ListParams::default()
                .limit(2)
                .continue_token(first.metadata.continue_.as_deref().unwrap()),
        )
        .await,
    );
    assert_eq!((expired.code, expired.reason.as_str()), (410, "Expired"));
    assert_eq!(kube.expired_served(), before + 1);
}

/// On demand the API server answers 429 with `Retry-After` (API Priority and Fairness) or
/// a 5xx, with the real Status bodies, for exactly the requests the fault names.
#[tokio::test]
async fn throttling_and_server_errors_are_injected_on_demand() {
    let (kube, _registry) = start_with(FakeKubeOptions::default()).await;
    let api = pods(&kube).await;
    kube.inject(Fault::too_many_requests(1, Some("list"), Some("pods")));
    let url = format!("{}/api/v1/namespaces/kiln/pods", kube.url());
    let response = kube
        .https_client()
        .get(&url)
        .bearer_auth(kube.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "Too many requests, please try again later.", "reason": "TooManyRequests",
               "details": {"retryAfterSeconds": 1}, "code": 429})
    );
    api.list(&ListParams::default())
        .await
        .expect("only one 429 was injected");

    kube.inject(Fault::server_error(500, 1, Some("create"), Some("pods")));
    kube.inject(Fault::server_error(503, 1, Some("get"), None));
    let failed = api_error(api.create(&PostParams::default(), &pod("x", "true")).await);
    assert_eq!((failed.code, failed.reason.as_str()), (500, "InternalError"));
    // (Raw HTTP: kube's client retries a 503 on its own.)
    let response = kube
        .https_client()
        .get(format!("{url}/x"))
        .bearer_auth(kube.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["reason"], "ServiceUnavailable");
    assert_eq!(kube.pending_faults(), 0);
    assert_eq!(kube.pods_created(), 0);
}
