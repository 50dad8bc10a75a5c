//! The fake cluster (`support::fake_kube`) itself, through the real `kube` client and the
//! kubeconfig it writes: the REST shapes Kiln's executor relies on (create/get/409/delete,
//! list and watch with 410 recovery, logs with timestamps and sinceTime), the kubelet
//! (exit codes, termination messages, volumes mounted where the pod says, process groups
//! killed on deletion), secret garbage collection, RBAC from `deploy/role.yaml`, the API
//! server's rules for user namespaces and privilege escalation, and the part of a security
//! context the kubelet applies (capabilities, no_new_privs, read-only root, runAsNonRoot).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::{
    api::core::v1::{Pod, Secret},
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams},
    runtime::{watcher, watcher::Event},
    Api, Client,
};
use serde_json::json;

use crate::support::{
    builder_image,
    docker_registry::DockerRegistry,
    fake_kube::{
        store::{FieldSelector, LabelSelector},
        FakeKube, FakeKubeOptions,
    },
};

const MANAGED: &str = "app.kubernetes.io/managed-by=kiln";

/// The image of [`pod`]: served to the fake node from a real registry, through the node's
/// mirror of `ghcr.io`.
pub(crate) const IMAGE: &str = "ghcr.io/kiln-build/kiln:test";

/// A fake cluster whose node pulls `ghcr.io` images from a real registry holding [`IMAGE`]
/// (returned too, to outlive the cluster).
pub(crate) async fn start_with(mut options: FakeKubeOptions) -> (FakeKube, DockerRegistry) {
    let registry = DockerRegistry::start();
    builder_image::push(registry.addr(), "kiln-build/kiln", "test").await;
    options
        .registry_mirrors
        .insert("ghcr.io".into(), registry.addr().to_owned());
    (FakeKube::start_with(options), registry)
}

pub(crate) async fn start() -> (FakeKube, DockerRegistry) {
    start_with(FakeKubeOptions::default()).await
}

/// A pod shaped like Kiln's builder pods, running `sh -c script` in container `build`.
pub(crate) fn pod(name: &str, script: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "kiln", "kiln.dev/build-key": "0123456789abcdef0123456789abcdef"},
        },
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "kiln-builder",
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "build",
                "image": IMAGE,
                "command": ["sh", "-c", script],
                "terminationMessagePath": "/var/run/kiln/termination-log",
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "env": [{"name": "KILN_EXECUTE_DATA_DIR", "value": "/var/lib/kiln"}],
                "volumeMounts": [
                    {"name": "work", "mountPath": "/var/lib/kiln"},
                    {"name": "run", "mountPath": "/var/run/kiln"},
                ],
            }],
            "volumes": [{"name": "work", "emptyDir": {}}, {"name": "run", "emptyDir": {}}],
        },
    }))
    .expect("pod")
}

/// [`pod`] with Kiln's credentials Secret volume (secretName = pod name) and an env var from it.
pub(crate) fn pod_with_secret(name: &str, script: &str) -> Pod {
    let mut value = serde_json::to_value(pod(name, script)).unwrap();
    value["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "credentials", "secret": {"secretName": name, "optional": false}}));
    let container = &mut value["spec"]["containers"][0];
    container["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "credentials", "mountPath": "/var/run/kiln/credentials", "readOnly": true}));
    container["env"].as_array_mut().unwrap().push(json!({
        "name": "FROM_SECRET",
        "valueFrom": {"secretKeyRef": {"name": name, "key": "git-credentials"}},
    }));
    serde_json::from_value(value).unwrap()
}

/// Kiln's per-build Secret, owned by the pod.
pub(crate) fn secret(pod: &Pod) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": pod.metadata.name,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name,
                "uid": pod.metadata.uid, "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "type": "Opaque",
        "stringData": {"config.json": "{\"auths\":{}}", "git-credentials": "https://u:p@example.com"},
    }))
    .expect("secret")
}

pub(crate) async fn pods(kube: &FakeKube) -> Api<Pod> {
    Api::namespaced(kube.client().await, kube.namespace())
}

/// Polls the pod until `done` holds (or panics after `timeout`).
pub(crate) async fn wait_pod(
    api: &Api<Pod>,
    name: &str,
    timeout: Duration,
    done: impl Fn(&Pod) -> bool,
) -> Pod {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pod = api.get(name).await.expect("get pod");
        if done(&pod) {
            return pod;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pod {name} never got there: {:?}",
            pod.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn wait_gone(api: &Api<Pod>, name: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while api.get_opt(name).await.expect("get pod").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pod {name} was never removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

pub(crate) fn terminated(pod: &Pod) -> Option<k8s_openapi::api::core::v1::ContainerStateTerminated> {
    pod.status.as_ref()?.container_statuses.as_ref()?[0]
        .state
        .as_ref()?
        .terminated
        .clone()
}

pub(crate) fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

pub(crate) fn process_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test]
async fn pods_create_get_conflict_and_delete_kill_the_process_group() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let created = api
        .create(&PostParams::default(), &pod("p1", "sleep 30 & wait"))
        .await
        .expect("create");
    let meta = &created.metadata;
    assert!(meta.uid.is_some() && meta.resource_version.is_some() && meta.creation_timestamp.is_some());
    assert_eq!(meta.namespace.as_deref(), Some("kiln"));
    assert_eq!(phase(&created), "Pending");

    let conflict = api_error(api.create(&PostParams::default(), &pod("p1", "true")).await);
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(conflict.message, "pods \"p1\" already exists");

    let running = wait_pod(&api, "p1", Duration::from_secs(10), |p| phase(p) == "Running").await;
    let status = running.status.as_ref().unwrap();
    assert!(status.pod_ip.is_some());
    let container = &status.container_statuses.as_ref().unwrap()[0];
    assert!(container.ready && container.state.as_ref().unwrap().running.is_some());
    let pid = kube.pod_pid("p1").expect("pod process");
    assert!(process_alive(pid));

    let listed = api
        .list(&ListParams::default().labels(MANAGED))
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    assert!(listed.metadata.resource_version.is_some());
    let none = api
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by!=kiln"))
        .await
        .unwrap();
    assert!(none.items.is_empty());
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=p1"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);

    let deleted = api.delete("p1", &DeleteParams::default()).await.expect("delete");
    let deleted = deleted
        .left()
        .expect("a pod being deleted comes back as the object");
    assert!(deleted.metadata.deletion_timestamp.is_some());
    wait_gone(&api, "p1", Duration::from_secs(5)).await;
    assert!(!process_alive(pid), "the pod's process survived its deletion");
    let missing = api_error(api.get("p1").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(
        api_error(api.delete("p1", &DeleteParams::default()).await).code,
        404
    );

    // A process that ignores SIGTERM is killed after the grace.
    api.create(
        &PostParams::default(),
        &pod("stubborn", "trap '' TERM; while true; do sleep 0.1; done"),
    )
    .await
    .unwrap();
    wait_pod(&api, "stubborn", Duration::from_secs(10), |p| {
        phase(p) == "Running"
    })
    .await;
    let started = std::time::Instant::now();
    api.delete("stubborn", &DeleteParams::default()).await.unwrap();
    wait_gone(&api, "stubborn", Duration::from_secs(10)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "SIGKILL came before the grace"
    );
    assert_eq!(kube.pods_created(), 2);
    assert_eq!(kube.request_count("create", "pods"), 3);

    // Dropping the handle kills running pods and removes its dirs.
    api.create(&PostParams::default(), &pod("left-running", "sleep 30"))
        .await
        .unwrap();
    wait_pod(&api, "left-running", Duration::from_secs(10), |p| {
        phase(p) == "Running"
    })
    .await;
    let pid = kube.pod_pid("left-running").unwrap();
    let state_dir = kube.state_dir().to_path_buf();
    drop(kube);
    assert!(!process_alive(pid), "a pod process outlived the fake");
    assert!(!state_dir.exists(), "the fake's dirs outlived it");
}

#[tokio::test]
async fn failed_pod_reports_exit_code_and_termination_message() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let script = "echo hi; echo msg > /var/run/kiln/termination-log; exit 3";
    api.create(&PostParams::default(), &pod("fails", script))
        .await
        .unwrap();
    // Without a message file, FallbackToLogsOnError takes the log's tail.
    api.create(
        &PostParams::default(),
        &pod("fallback", "echo first; echo last >&2; exit 2"),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &pod("succeeds", "echo fine"))
        .await
        .unwrap();
    api.create(&PostParams::default(), &pod("no-such-binary", "true"))
        .await
        .unwrap();

    let failed = wait_pod(&api, "fails", Duration::from_secs(10), |p| phase(p) == "Failed").await;
    let t = terminated(&failed).expect("terminated state");
    assert_eq!((t.exit_code, t.reason.as_deref()), (3, Some("Error")));
    assert_eq!(t.message.as_deref(), Some("msg\n"));
    assert!(t.started_at.is_some() && t.finished_at.is_some());

    let fallback = wait_pod(&api, "fallback", Duration::from_secs(10), |p| {
        phase(p) == "Failed"
    })
    .await;
    let t = terminated(&fallback).unwrap();
    assert_eq!(t.exit_code, 2);
    let message = t.message.unwrap();
    assert!(
        message.contains("first\n") && message.contains("last\n"),
        "{message:?}"
    );

    let succeeded = wait_pod(&api, "succeeds", Duration::from_secs(10), |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let t = terminated(&succeeded).unwrap();
    assert_eq!(
        (t.exit_code, t.reason.as_deref(), t.message),
        (0, Some("Completed"), None)
    );
    assert_eq!(
        api.logs("succeeds", &LogParams::default()).await.unwrap(),
        "fine\n"
    );
}

#[tokio::test]
async fn a_command_that_cannot_start_fails_the_pod() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let mut p = pod("nope", "");
    p.spec.as_mut().unwrap().containers[0].command = Some(vec!["no-such-binary-xyz".into()]);
    api.create(&PostParams::default(), &p).await.unwrap();
    let failed = wait_pod(&api, "nope", Duration::from_secs(10), |p| phase(p) == "Failed").await;
    let t = terminated(&failed).unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (128, Some("StartError")));
}

/// The container runs its image's files: the node pulls and unpacks the image, and the
/// program (the pod's `command`, or the image's `Entrypoint` and `Cmd`) is the unpacked
/// file. A program the image lacks does not start, even when the host has it.
#[tokio::test]
async fn containers_run_their_images_files_not_the_hosts() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let store = kube.image_store().to_owned();

    api.create(&PostParams::default(), &pod("shell", "readlink /proc/$$/exe"))
        .await
        .unwrap();
    wait_pod(&api, "shell", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let shell = api.logs("shell", &LogParams::default()).await.unwrap();
    assert!(
        Path::new(shell.trim()).starts_with(&store) && shell.trim().ends_with("/rootfs/bin/busybox"),
        "`sh` is the image's busybox: {shell}"
    );

    // No command: the image's Entrypoint (`/usr/local/bin/kiln`) with the pod's args.
    let mut entrypoint = pod("entrypoint", "");
    entrypoint.spec.as_mut().unwrap().containers[0].command = None;
    entrypoint.spec.as_mut().unwrap().containers[0].args = Some(vec!["--version".into()]);
    api.create(&PostParams::default(), &entrypoint).await.unwrap();
    wait_pod(&api, "entrypoint", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let version = api.logs("entrypoint", &LogParams::default()).await.unwrap();
    assert!(version.starts_with("kiln "), "{version}");
    let kiln = kube.executed().last().cloned().unwrap();
    assert!(
        kiln.starts_with(&store) && kiln.ends_with("rootfs/usr/local/bin/kiln"),
        "{kiln:?}"
    );
    assert_eq!(
        std::fs::read(&kiln).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_kiln")).unwrap(),
        "the unpacked binary is the one the image carries"
    );

    // git is on the host, not in the image.
    assert!(Path::new("/usr/bin/git").exists());
    let mut host_only = pod("host-only", "");
    host_only.spec.as_mut().unwrap().containers[0].command = Some(vec!["git".into(), "--version".into()]);
    api.create(&PostParams::default(), &host_only).await.unwrap();
    let failed = wait_pod(&api, "host-only", Duration::from_secs(60), |p| {
        phase(p) == "Failed"
    })
    .await;
    let t = terminated(&failed).unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (128, Some("StartError")));
    assert!(
        t.message
            .as_deref()
            .unwrap_or("")
            .contains("exec: \"git\": executable file not found in $PATH"),
        "{t:?}"
    );
}

#[tokio::test]
async fn secret_volume_env_and_mounts_are_what_the_process_sees() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let secrets: Api<Secret> = Api::namespaced(kube.client().await, kube.namespace());
    let script = "echo data > /var/lib/kiln/out; cat /var/run/kiln/credentials/config.json; echo; \
                  (touch /var/run/kiln/credentials/x 2>/dev/null && echo writable) || echo read-only; \
                  echo \"$KILN_EXECUTE_DATA_DIR $FROM_SECRET\"; stat -c %a /var/run/kiln/credentials/config.json";
    let created = api
        .create(&PostParams::default(), &pod_with_secret("mounts", script))
        .await
        .unwrap();
    // The kubelet waits for the secret, as a real one waits to mount it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(phase(&api.get("mounts").await.unwrap()), "Pending");
    let waiting = api_error(api.logs("mounts", &LogParams::default()).await);
    assert_eq!(waiting.code, 400);
    assert_eq!(
        waiting.message,
        "container \"build\" in pod \"mounts\" is waiting to start: ContainerCreating"
    );
    let stored = secrets
        .create(&PostParams::default(), &secret(&created))
        .await
        .unwrap();
    assert!(stored.string_data.is_none(), "stringData is folded into data");
    assert_eq!(stored.type_.as_deref(), Some("Opaque"));

    wait_pod(&api, "mounts", Duration::from_secs(10), |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let log = api.logs("mounts", &LogParams::default()).await.unwrap();
    assert_eq!(
        log,
        "{\"auths\":{}}\nread-only\n/var/lib/kiln https://u:p@example.com\n644\n"
    );
    let work = kube.volume_dir("mounts", "work").expect("work volume");
    assert_eq!(std::fs::read_to_string(work.join("out")).unwrap(), "data\n");
    assert!(
        !PathBuf::from("/var/lib/kiln/out").exists(),
        "the bind mount leaked into the host's namespace"
    );
}

#[tokio::test]
async fn secrets_are_collected_with_their_owner_pod() {
    let (kube, _registry) = start().await;
    let client = kube.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), kube.namespace());
    let secrets: Api<Secret> = Api::namespaced(client, kube.namespace());
    let created = api
        .create(&PostParams::default(), &pod_with_secret("owner", "sleep 30"))
        .await
        .unwrap();
    secrets
        .create(&PostParams::default(), &secret(&created))
        .await
        .unwrap();
    let conflict = api_error(secrets.create(&PostParams::default(), &secret(&created)).await);
    assert_eq!(conflict.code, 409);
    let fetched = secrets.get("owner").await.unwrap();
    assert!(fetched.data.unwrap().contains_key("config.json"));
    wait_pod(&api, "owner", Duration::from_secs(10), |p| phase(p) == "Running").await;
    assert_eq!(kube.secrets(), vec!["owner".to_owned()]);

    api.delete("owner", &DeleteParams::default()).await.unwrap();
    wait_gone(&api, "owner", Duration::from_secs(5)).await;
    assert!(kube.secrets().is_empty(), "the owned secret survived its pod");
    assert!(secrets.get_opt("owner").await.unwrap().is_none());

    // A secret whose owner is already gone is collected too.
    let mut orphan = secret(&created);
    orphan.metadata.name = Some("orphan".into());
    secrets.create(&PostParams::default(), &orphan).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !kube.secrets().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "orphan secret never collected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Secrets' DELETE answers a Status.
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("plain".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(secrets
        .delete("plain", &DeleteParams::default())
        .await
        .unwrap()
        .is_right());
}

#[tokio::test]
async fn logs_follow_with_timestamps_and_resume_since_time() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let script = "echo line1; sleep 1.2; echo line2; sleep 1.2; echo line3";
    api.create(&PostParams::default(), &pod("logs", script))
        .await
        .unwrap();
    wait_pod(&api, "logs", Duration::from_secs(10), |p| phase(p) == "Running").await;
    let params = LogParams {
        container: Some("build".into()),
        follow: true,
        timestamps: true,
        ..Default::default()
    };
    let mut lines = api.log_stream("logs", &params).await.unwrap().lines();
    let mut seen: Vec<(Timestamp, String)> = Vec::new();
    for _ in 0..2 {
        let line = lines.try_next().await.unwrap().expect("a log line");
        let (at, text) = line.split_once(' ').expect("timestamped line");
        seen.push((at.parse().expect("RFC 3339 timestamp"), text.to_owned()));
    }
    assert_eq!(seen[0].1, "line1");
    assert_eq!(seen[1].1, "line2");
    // The stream breaks; resume from the last line's second, as Kiln does.
    kube.drop_log_streams();
    assert!(
        lines.try_next().await.unwrap_or(None).is_none(),
        "the stream went on"
    );
    let since = seen[1].0.round(k8s_openapi::jiff::Unit::Second).unwrap();
    let since = if since > seen[1].0 {
        since - k8s_openapi::jiff::SignedDuration::from_secs(1)
    } else {
        since
    };
    let resumed = LogParams {
        since_time: Some(since),
        ..params.clone()
    };
    let rest: Vec<String> = api
        .log_stream("logs", &resumed)
        .await
        .unwrap()
        .lines()
        .try_collect()
        .await
        .unwrap();
    // Follow ends when the container terminates.
    let texts: Vec<&str> = rest.iter().map(|l| l.split_once(' ').unwrap().1).collect();
    assert_eq!(texts, ["line2", "line3"], "{rest:?}");
    assert_eq!(phase(&api.get("logs").await.unwrap()), "Succeeded");
    // Plain, tail and limits.
    assert_eq!(
        api.logs("logs", &LogParams::default()).await.unwrap(),
        "line1\nline2\nline3\n"
    );
    let tail = LogParams {
        tail_lines: Some(1),
        ..Default::default()
    };
    assert_eq!(api.logs("logs", &tail).await.unwrap(), "line3\n");
    let wrong = LogParams {
        container: Some("other".into()),
        ..Default::default()
    };
    assert_eq!(api_error(api.logs("logs", &wrong).await).code, 400);
    assert_eq!(kube.request_count("get", "pods/log"), 5);
}

#[tokio::test]
async fn watcher_resumes_after_dropped_watches_and_relists_after_410() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let config = watcher::Config::default().labels(MANAGED);
    let mut events = watcher(api.clone(), config).boxed();
    let mut next = async || -> Result<Event<Pod>, watcher::Error> {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("a watch event in time")
            .expect("the watcher does not end")
    };
    assert!(matches!(next().await, Ok(Event::Init)));
    assert!(matches!(next().await, Ok(Event::InitDone)));
    let name = |e: &Event<Pod>| match e {
        Event::Apply(p) | Event::Delete(p) | Event::InitApply(p) => p.metadata.name.clone().unwrap(),
        other => panic!("unexpected {other:?}"),
    };

    api.create(&PostParams::default(), &pod("w1", "sleep 30"))
        .await
        .unwrap();
    let mut unlabelled = pod("other", "sleep 30");
    unlabelled.metadata.labels = None;
    api.create(&PostParams::default(), &unlabelled).await.unwrap();
    let e = next().await.unwrap();
    assert!(matches!(e, Event::Apply(_)) && name(&e) == "w1");
    // Until w1 runs: Pending (scheduled), Running.
    loop {
        let e = next().await.unwrap();
        assert_eq!(name(&e), "w1", "the unlabelled pod leaked through the selector");
        if let Event::Apply(p) = &e {
            if phase(p) == "Running" {
                break;
            }
        }
    }

    // A dropped watch resumes from the last resourceVersion: no re-list.
    let lists = kube.request_count("list", "pods");
    kube.drop_watches();
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.create(&PostParams::default(), &pod("w2", "sleep 30"))
        .await
        .unwrap();
    let e = next().await.unwrap();
    assert!(matches!(e, Event::Apply(_)) && name(&e) == "w2");
    assert_eq!(kube.request_count("list", "pods"), lists);
    assert!(kube.request_count("watch", "pods") >= 2);

    // Expired history: the watch gets 410 and the watcher lists again.
    kube.expire_history();
    let mut relisted = Vec::new();
    let mut saw_410 = false;
    loop {
        match next().await {
            Err(watcher::Error::WatchError(status)) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
                saw_410 = true;
            }
            Err(other) => panic!("unexpected watcher error {other:?}"),
            Ok(Event::Init) => {}
            Ok(Event::InitApply(p)) => relisted.push(p.metadata.name.unwrap()),
            Ok(Event::InitDone) => break,
            Ok(_) => {}
        }
    }
    assert!(saw_410);
    relisted.sort();
    assert_eq!(relisted, ["w1", "w2"]);
    assert_eq!(kube.request_count("list", "pods"), lists + 1);

    // And goes on watching from the new list.
    api.delete("w1", &DeleteParams::default()).await.unwrap();
    loop {
        let e = next().await.unwrap();
        if let Event::Delete(p) = e {
            assert_eq!(p.metadata.name.as_deref(), Some("w1"));
            break;
        }
    }
    // A watch from an old version after expiry (here: a fresh client) also gets the 410.
    kube.expire_history();
    let old = api
        .watch(&kube::api::WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed()
        .next()
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(old, kube::api::WatchEvent::Error(s) if s.code == 410));
}

#[tokio::test]
async fn rbac_follows_the_role_and_tokens_are_required() {
    let (kube, _registry) = start().await;
    let client = kube.client().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), kube.namespace());
    let forbidden = api_error(secrets.list(&ListParams::default()).await);
    assert_eq!((forbidden.code, forbidden.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        forbidden.message,
        "secrets is forbidden: User \"system:serviceaccount:kiln:kiln\" cannot list resource \"secrets\" in API group \"\" in the namespace \"kiln\""
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), kube.namespace());
    let patch = Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}}));
    let forbidden = api_error(pods.patch("x", &PatchParams::default(), &patch).await);
    assert_eq!(forbidden.code, 403);
    assert_eq!(
        forbidden.message,
        "pods \"x\" is forbidden: User \"system:serviceaccount:kiln:kiln\" cannot patch resource \"pods\" in API group \"\" in the namespace \"kiln\""
    );
    let elsewhere: Api<Pod> = Api::namespaced(client.clone(), "default");
    assert_eq!(api_error(elsewhere.list(&ListParams::default()).await).code, 403);
    let everywhere: Api<Pod> = Api::all(client);
    let cluster = api_error(everywhere.list(&ListParams::default()).await);
    assert!(
        cluster.message.ends_with("at the cluster scope"),
        "{}",
        cluster.message
    );
    assert_eq!(kube.forbidden_count(), 4);
    assert_eq!(kube.request_count("list", "secrets"), 1);

    let anonymous = kube.anonymous_client();
    let unauthorized = api_error(
        Api::<Pod>::namespaced(anonymous, "kiln")
            .list(&ListParams::default())
            .await,
    );
    assert_eq!(
        (unauthorized.code, unauthorized.reason.as_str()),
        (401, "Unauthorized")
    );
}

/// The API server speaks only TLS, with a serving certificate of the cluster's own CA, which
/// the kubeconfig carries (`certificate-authority-data`): a client that trusts only the
/// system roots fails the handshake, and plain HTTP gets no answer, as on a real cluster.
#[tokio::test]
async fn the_api_server_is_reached_only_through_the_kubeconfigs_ca() {
    let (kube, _registry) = start().await;
    let kubeconfig = std::fs::read_to_string(kube.kubeconfig_path()).unwrap();
    assert!(
        kubeconfig.contains("server: https://") && kubeconfig.contains("certificate-authority-data: "),
        "{kubeconfig}"
    );
    let trusting = Api::<Pod>::namespaced(kube.client().await, "kiln");
    trusting
        .list(&ListParams::default())
        .await
        .expect("through the kubeconfig");

    let mut system_roots = kube::Config::new(kube.url().parse().unwrap());
    system_roots.auth_info.token = Some(kube.token().to_owned().into());
    let untrusting = Api::<Pod>::namespaced(Client::try_from(system_roots).unwrap(), "kiln");
    let refused = untrusting.list(&ListParams::default()).await.unwrap_err();
    assert!(
        !matches!(refused, kube::Error::Api(_)),
        "no API answer without the CA: {refused}"
    );

    let plain = kube
        .https_client()
        .get(kube.url().replacen("https://", "http://", 1) + "/api")
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");
    assert_eq!(
        kube.request_count("list", "pods"),
        1,
        "only the trusting client got through"
    );
}

#[tokio::test]
async fn invalid_objects_are_rejected() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let mut p = pod("bad", "true");
    p.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("kiln.dev/build-key".into(), "a".repeat(64));
    let invalid = api_error(api.create(&PostParams::default(), &p).await);
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    let p = pod("Upper_Case", "true");
    assert_eq!(api_error(api.create(&PostParams::default(), &p).await).code, 422);
    assert_eq!(kube.pods_created(), 0);
}

#[test]
fn selectors_parse_like_the_api_server() {
    let object =
        json!({"metadata": {"name": "n", "labels": {"a": "b", "c": "d"}}, "status": {"phase": "Running"}});
    let labels = |s: &str| LabelSelector::parse(s).unwrap().matches(&object);
    assert!(labels(""));
    assert!(labels("a=b") && labels("a==b,c") && labels("x!=y") && labels("!x"));
    assert!(!labels("a!=b") && !labels("z"));
    assert!(labels("a in (x,b)") && !labels("a notin (x,b),c"));
    let fields = |s: &str| FieldSelector::parse(s).unwrap().matches(&object);
    assert!(fields("metadata.name=n,status.phase!=Failed"));
    assert!(!fields("metadata.name=m"));
}

/// [`pod`] with `patch` merged into its spec (objects key by key, as a JSON merge patch).
pub(crate) fn pod_with(name: &str, script: &str, patch: serde_json::Value) -> Pod {
    fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
            (t, p) => *t = p.clone(),
        }
    }
    let mut value = serde_json::to_value(pod(name, script)).unwrap();
    merge(&mut value, &json!({ "spec": patch }));
    serde_json::from_value(value).unwrap()
}

/// A container securityContext patch for [`pod_with`].
pub(crate) fn security(context: serde_json::Value) -> serde_json::Value {
    json!({ "containers": [{
        "name": "build",
        "image": IMAGE,
        "command": ["sh", "-c", "true"],
        "securityContext": context,
    }] })
}

/// What the API server refuses around user namespaces and privilege escalation, with the
/// field it names; and what it accepts, privileged pods in their own user namespace included.
#[tokio::test]
async fn user_namespace_and_escalation_rules_are_the_api_servers() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let refused = [
        (
            json!({ "hostUsers": false, "hostPID": true }),
            "spec.hostPID: Forbidden: when `hostUsers` is false",
        ),
        (
            json!({ "hostUsers": false, "hostNetwork": true }),
            "spec.hostNetwork: Forbidden: when `hostUsers` is false",
        ),
        (
            json!({ "hostUsers": false, "hostIPC": true }),
            "spec.hostIPC: Forbidden: when `hostUsers` is false",
        ),
        (
            security(json!({ "procMount": "Unmasked" })),
            "`hostUsers` must be false to use `Unmasked`",
        ),
        (
            security(json!({ "allowPrivilegeEscalation": false, "privileged": true })),
            "cannot set `allowPrivilegeEscalation` to false and `privileged` to true",
        ),
        (
            security(
                json!({ "allowPrivilegeEscalation": false, "capabilities": { "add": ["CAP_SYS_ADMIN"] } }),
            ),
            "cannot set `allowPrivilegeEscalation` to false and `capabilities.Add` CAP_SYS_ADMIN",
        ),
        (
            security(json!({ "seccompProfile": { "type": "Lax" } })),
            "spec.containers[0].securityContext.seccompProfile.type: Unsupported value",
        ),
        (
            security(json!({ "appArmorProfile": { "type": "Localhost" } })),
            "appArmorProfile.localhostProfile: Required value",
        ),
    ];
    for (i, (patch, message)) in refused.iter().enumerate() {
        let status = api_error(
            api.create(
                &PostParams::default(),
                &pod_with(&format!("refused-{i}"), "true", patch.clone()),
            )
            .await,
        );
        assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"), "{patch}");
        assert!(status.message.contains(message), "{patch}: {}", status.message);
    }
    assert_eq!(kube.pods_created(), 0);

    let mut kiln_like = security(json!({
        "privileged": false,
        "allowPrivilegeEscalation": false,
        "capabilities": { "drop": ["ALL"], "add": ["SYS_ADMIN"] },
        "procMount": "Unmasked",
        "seccompProfile": { "type": "RuntimeDefault" },
        "appArmorProfile": { "type": "Unconfined" },
    }));
    kiln_like["hostUsers"] = json!(false);
    let accepted = [
        kiln_like,
        json!({ "hostUsers": false, "containers": [{ "name": "build", "image": "i",
                "command": ["sh", "-c", "true"], "securityContext": { "privileged": true } }] }),
        json!({ "hostNetwork": true }),
    ];
    for (i, patch) in accepted.iter().enumerate() {
        let created = api
            .create(
                &PostParams::default(),
                &pod_with(&format!("accepted-{i}"), "true", patch.clone()),
            )
            .await
            .unwrap_or_else(|e| panic!("{patch}: {e}"));
        assert_eq!(
            created.spec.unwrap().host_users,
            patch["hostUsers"].as_bool(),
            "hostUsers is kept as given"
        );
    }
}

/// A cluster with user namespaces off drops `hostUsers` and forces `procMount` to Default
/// without an error, as the real API server does with the feature gates off.
#[tokio::test]
async fn a_cluster_without_user_namespaces_drops_the_fields_silently() {
    let (kube, _registry) = start_with(FakeKubeOptions {
        user_namespaces: false,
        ..Default::default()
    })
    .await;
    let api = pods(&kube).await;
    let mut patch = security(json!({ "procMount": "Unmasked" }));
    patch["hostUsers"] = json!(false);
    let created = api
        .create(&PostParams::default(), &pod_with("dropped", "true", patch))
        .await
        .expect("accepted, fields dropped");
    let spec = created.spec.unwrap();
    assert_eq!(spec.host_users, None);
    assert_eq!(
        spec.containers[0]
            .security_context
            .as_ref()
            .unwrap()
            .proc_mount
            .as_deref(),
        Some("Default")
    );
}

/// The kubelet gives the process what the security context says it can: the capability
/// bounding set (runtime default, drop/add, or all when privileged), no_new_privs, a
/// read-only root with writable volumes, and it refuses runAsNonRoot for root.
#[tokio::test]
async fn the_kubelet_applies_capabilities_no_new_privs_and_a_read_only_root() {
    let (kube, _registry) = start().await;
    let api = pods(&kube).await;
    let marker = format!("/kiln-fake-kube-ro-{}", std::process::id());
    let script = format!(
        "grep -E '^(CapBnd|NoNewPrivs):' /proc/self/status | tr -d '\\t'; \
         (touch {marker} 2>/dev/null && rm -f {marker} && echo root-writable) || echo root-read-only; \
         (touch /var/lib/kiln/ok && echo volume-writable) || echo volume-read-only"
    );
    // The fake can only take capabilities away from its own.
    let own = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    let mask = |caps: &[u32]| format!("{:016x}", own & caps.iter().fold(0u64, |m, c| m | (1 << c)));
    let all: Vec<u32> = (0..64).collect();
    // CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, KILL 5, SETGID 6, SETUID 7, SETPCAP 8,
    // NET_BIND_SERVICE 10, NET_RAW 13, SYS_CHROOT 18, MKNOD 27, AUDIT_WRITE 29, SETFCAP 31.
    let runtime_default = [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];
    let cases = [
        (json!({}), mask(&runtime_default), 0, "root-writable"),
        (json!({ "privileged": true }), mask(&all), 0, "root-writable"),
        (
            json!({
                "capabilities": { "drop": ["ALL"], "add": ["SYS_ADMIN", "CAP_CHOWN"] },
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
            }),
            mask(&[0, 21]),
            1,
            "root-read-only",
        ),
        (
            json!({ "capabilities": { "drop": ["NET_RAW", "MKNOD"], "add": ["NET_ADMIN"] } }),
            mask(&[0, 1, 3, 4, 5, 6, 7, 8, 10, 12, 18, 29, 31]),
            0,
            "root-writable",
        ),
    ];
    for (i, (context, bounding, nnp, root)) in cases.iter().enumerate() {
        let name = format!("caps-{i}");
        let mut patch = security(context.clone());
        patch["containers"][0]["command"] = json!(["sh", "-c", script]);
        patch["containers"][0]["volumeMounts"] = json!([{ "name": "work", "mountPath": "/var/lib/kiln" }]);
        api.create(&PostParams::default(), &pod_with(&name, &script, patch))
            .await
            .unwrap();
        let done = wait_pod(&api, &name, Duration::from_secs(10), |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
        let log = api.logs(&name, &LogParams::default()).await.unwrap();
        assert_eq!(phase(&done), "Succeeded", "{context}: {log}");
        assert_eq!(
            log,
            format!("CapBnd:{bounding}\nNoNewPrivs:{nnp}\n{root}\nvolume-writable\n"),
            "{context}"
        );
    }
    assert!(!Path::new(&marker).exists());

    let mut non_root = security(json!({ "runAsNonRoot": true, "runAsUser": 0 }));
    non_root["containers"][0]["command"] = json!(["true"]);
    api.create(&PostParams::default(), &pod_with("non-root", "true", non_root))
        .await
        .unwrap();
    let waiting = wait_pod(&api, "non-root", Duration::from_secs(10), |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c[0].state.as_ref()?.waiting.as_ref()?.reason.clone())
            .is_some_and(|r| r == "CreateContainerConfigError")
    })
    .await;
    let state = waiting.status.unwrap().container_statuses.unwrap()[0]
        .clone()
        .state
        .unwrap();
    assert!(state.waiting.unwrap().message.unwrap().contains("runAsNonRoot"));
}
