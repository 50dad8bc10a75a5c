//! The fake kubelet: one task per pod that waits for the pod's secrets (as a real kubelet
//! waits to mount a secret volume), pulls its image ([`super::images`]), prepares its
//! volumes as per-pod host dirs, runs the first container's command (the image's file, see
//! [`super::images`]) as a local process —
//! own process group, own mount namespace with each volume bind-mounted at its mountPath,
//! its own memory cgroup when it has a memory limit ([`super::cgroup`]) — captures stdout
//! and stderr as timestamped log lines, reports Pending → Running → Succeeded/Failed with
//! the termination message, and on deletion kills the process group (SIGTERM, then SIGKILL
//! after the grace) before the pod object goes away with its owned secrets.
//!
//! The pod's life follows the kubelet's rules, each cited where it is coded: `restartPolicy`
//! decides whether an exited container starts again (with `restartCount`, `lastState` and
//! the `CrashLoopBackOff` back-off), and `activeDeadlineSeconds` after `startTime` kills the
//! container and fails the pod `DeadlineExceeded`.
//!
//! Of the container's security context it applies what a process can be given without a
//! container runtime ([`Security`]): the capability set (the runtime's default set, then
//! `drop` and `add`, or every capability when `privileged`) as the bounding set,
//! `allowPrivilegeEscalation: false` as `no_new_privs`, `readOnlyRootFilesystem` as a
//! read-only `/` under the volume mounts, `runAsUser`/`runAsGroup`, and the kubelet's
//! `runAsNonRoot` check. It cannot give a pod its own user namespace (`hostUsers: false`),
//! a seccomp or AppArmor profile, or a masked `/proc`: the API server validates those
//! fields ([`super::api`]) and the process runs with the host's.

use std::{
    collections::HashMap,
    convert::Infallible,
    ffi::{CStr, CString, OsString},
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::{Component, Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use axum::body::Bytes;
use futures::Stream;
use k8s_openapi::jiff::Timestamp;
use nix::{
    mount::{mount, MsFlags},
    sched::{unshare, CloneFlags},
    sys::signal::{killpg, Signal},
    unistd::Pid,
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    sync::watch,
};

use super::{
    acquire_mount_point,
    api::now_seconds,
    cgroup::{quantity_bytes, MemoryCgroup},
    images::PulledImage,
    Shared,
};

/// The kubelet's limits for the termination message (file, and the log fallback).
const MAX_MESSAGE_BYTES: usize = 4096;
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;

/// What the kubelet knows about one pod beyond its API object.
pub(crate) struct PodRuntime {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// Set to the kill grace once the pod is deleted.
    delete: watch::Sender<Option<Duration>>,
    logs: Mutex<Logs>,
    log_changes: watch::Sender<u64>,
    pgid: Mutex<Option<i32>>,
}

#[derive(Default)]
struct Logs {
    /// The current container instance's lines (a restart starts a new log).
    lines: Vec<LogLine>,
    /// The previous instance's lines (`pods/log?previous=true`).
    previous: Option<Vec<LogLine>>,
    /// Which container instance `lines` belong to (its restartCount).
    instance: u32,
    /// The container was started (or failed to): its log can be read.
    started: bool,
    /// The container terminated and every line is in: followers end.
    done: bool,
}

struct LogLine {
    at: Timestamp,
    text: Vec<u8>,
}

impl PodRuntime {
    pub fn pid(&self) -> Option<u32> {
        self.pgid.lock().unwrap().map(|p| p as u32)
    }

    pub fn has_started(&self) -> bool {
        self.logs.lock().unwrap().started
    }

    /// Sets the (one) container's status to `state`.
    pub(super) fn set_container_state(
        &self,
        shared: &Shared,
        container: &Value,
        state: Value,
        restart_count: u32,
        last_state: &Value,
    ) {
        set_status(shared, self, |p| {
            p["status"]["containerStatuses"] = json!([container_status(
                container,
                state,
                false,
                restart_count,
                last_state
            )]);
        });
    }

    /// The current container instance's log.
    pub fn log_text(&self) -> String {
        let logs = self.logs.lock().unwrap();
        let bytes: Vec<u8> = logs.lines.iter().flat_map(|l| l.text.iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether an earlier instance of the container ran (`pods/log?previous=true`).
    pub fn has_previous(&self) -> bool {
        self.logs.lock().unwrap().previous.is_some()
    }

    /// A new container instance: its log starts empty, the last one's is kept as previous.
    fn new_container(&self, instance: u32) {
        self.update_logs(|l| {
            if l.started {
                l.previous = Some(std::mem::take(&mut l.lines));
            }
            l.instance = instance;
            l.started = true;
            l.done = false;
        });
    }

    fn update_logs(&self, f: impl FnOnce(&mut Logs)) {
        f(&mut self.logs.lock().unwrap());
        self.log_changes.send_modify(|n| *n += 1);
    }
}

/// pods/log query parameters.
pub(crate) struct LogOptions {
    pub follow: bool,
    pub timestamps: bool,
    pub since: Option<Timestamp>,
    pub tail_lines: Option<usize>,
    /// The previous container instance's log (it ended: never followed).
    pub previous: bool,
    pub limit_bytes: Option<usize>,
}

/// The defaults the API server fills in on create, and the initial Pending status.
pub(crate) fn default_pod(pod: &mut Value) {
    let spec = &mut pod["spec"];
    for (field, value) in [
        ("restartPolicy", json!("Always")),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("serviceAccountName", json!("default")),
        ("securityContext", json!({})),
    ] {
        if spec[field].is_null() {
            spec[field] = value;
        }
    }
    if let Some(containers) = spec["containers"].as_array_mut() {
        for c in containers {
            let pull_policy = super::images::default_pull_policy(c["image"].as_str().unwrap_or(""));
            for (field, value) in [
                ("terminationMessagePath", "/dev/termination-log"),
                ("terminationMessagePolicy", "File"),
                ("imagePullPolicy", pull_policy),
            ] {
                if c[field].is_null() {
                    c[field] = json!(value);
                }
            }
        }
    }
    if let Some(volumes) = spec["volumes"].as_array_mut() {
        for v in volumes {
            if v["secret"].is_object() && v["secret"]["defaultMode"].is_null() {
                v["secret"]["defaultMode"] = json!(0o644);
            }
        }
    }
    let qos = qos_class(&pod["spec"]["containers"][0]);
    pod["status"] = json!({"phase": "Pending", "qosClass": qos});
}

/// Registers the pod with the kubelet and starts its task.
pub(crate) fn start(shared: Arc<Shared>, pod: &Value) {
    let runtime = Arc::new(PodRuntime {
        uid: pod["metadata"]["uid"].as_str().unwrap_or("").to_owned(),
        name: pod["metadata"]["name"].as_str().unwrap_or("").to_owned(),
        namespace: pod["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
        delete: watch::channel(None).0,
        logs: Mutex::new(Logs::default()),
        log_changes: watch::channel(0).0,
        pgid: Mutex::new(None),
    });
    shared
        .runtimes
        .lock()
        .unwrap()
        .insert(runtime.uid.clone(), runtime.clone());
    shared.live_kubelets.fetch_add(1, Ordering::SeqCst);
    let pod = pod.clone();
    tokio::spawn(async move {
        let _live = LiveGuard(shared.clone());
        run(shared, runtime, pod).await;
    });
}

/// Decrements the live kubelet count however the task ends.
struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live_kubelets.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Marks the pod deleted (deletionTimestamp, grace) and tells its kubelet; the object goes
/// away once the process is dead. Returns the pod as the DELETE response shows it.
pub(crate) fn delete(shared: &Shared, namespace: &str, name: &str, grace: Option<i64>) -> Option<Value> {
    let pod = shared.mutate(|store| {
        let current = store.get("pods", namespace, name)?.clone();
        if current["metadata"]["deletionTimestamp"].is_string() {
            return Some(current);
        }
        let grace = grace
            .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30)
            .max(0);
        let at = Timestamp::now()
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(grace))
            .unwrap_or_else(|_| Timestamp::now());
        store.update("pods", namespace, name, |p| {
            p["metadata"]["deletionTimestamp"] =
                json!(k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", at).expect("time"));
            p["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        })
    })?;
    let grace = Duration::from_secs(
        pod["metadata"]["deletionGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(0),
    )
    .min(shared.options.kill_grace);
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("");
    let runtime = shared.runtimes.lock().unwrap().get(uid).cloned();
    match runtime {
        Some(runtime) => {
            runtime.delete.send_if_modified(|d| {
                let first = d.is_none();
                if first {
                    *d = Some(grace);
                }
                first
            });
        }
        None => {
            shared.mutate(|store| store.remove("pods", namespace, name));
        }
    }
    Some(pod)
}

/// SIGKILL to every pod's process group (the handle is being dropped).
pub(crate) fn kill_all(shared: &Shared) {
    for runtime in shared.runtimes.lock().unwrap().values() {
        if let Some(pgid) = *runtime.pgid.lock().unwrap() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// Where volume `volume` of the pod with `uid` lives on the host.
pub(crate) fn volume_dir(shared: &Shared, uid: &str, volume: &str) -> PathBuf {
    shared.pods_dir.join(uid).join("volumes").join(volume)
}

/// Deletes secrets owned only by pods that no longer exist, as the garbage collector does
/// (also secrets created with an owner that is already gone).
pub(crate) fn collect_garbage(shared: &Shared) {
    shared.mutate(|store| {
        let mut doomed = Vec::new();
        let namespaces: Vec<String> = {
            let mut ns: Vec<String> = Vec::new();
            for secret in store.list_all("secrets") {
                let n = secret["metadata"]["namespace"].as_str().unwrap_or("").to_owned();
                if !ns.contains(&n) {
                    ns.push(n);
                }
            }
            ns
        };
        for namespace in namespaces {
            let live: Vec<String> = store
                .list("pods", &namespace)
                .into_iter()
                .filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
                .collect();
            for secret in store.list("secrets", &namespace) {
                let owners = secret["metadata"]["ownerReferences"].as_array();
                let Some(owners) = owners.filter(|o| !o.is_empty()) else {
                    continue;
                };
                let all_gone = owners.iter().all(|o| {
                    o["kind"] == json!("Pod")
                        && !live.iter().any(|uid| o["uid"].as_str() == Some(uid.as_str()))
                });
                if all_gone {
                    let name = secret["metadata"]["name"].as_str().unwrap_or("").to_owned();
                    doomed.push((namespace.clone(), name));
                }
            }
        }
        for (namespace, name) in doomed {
            store.remove("secrets", &namespace, &name);
        }
    });
}

/// Periodic garbage collection, until shutdown.
pub(crate) async fn garbage_collector(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => collect_garbage(&shared),
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// How a wait in the pod's life ended.
pub(super) enum Interrupt {
    /// The pod was deleted; the kill grace.
    Deleted(Duration),
    /// `activeDeadlineSeconds` passed since the pod's `startTime`.
    Deadline,
    Shutdown,
}

/// What a wait in the pod's life can be interrupted by: its deletion, its deadline, the
/// fake's shutdown.
pub(super) struct Life {
    deleted: watch::Receiver<Option<Duration>>,
    shutdown: watch::Receiver<bool>,
    /// Set once the kubelet has admitted the pod (its `startTime`), if it has a deadline.
    deadline: Option<tokio::time::Instant>,
    /// The deadline already fired (it interrupts once; afterwards only deletion counts).
    deadline_passed: bool,
}

impl Life {
    pub(super) async fn interrupted(&mut self) -> Interrupt {
        let deadline = self.deadline.filter(|_| !self.deadline_passed);
        let fired = tokio::select! {
            grace = self.deleted.wait_for(Option::is_some) => return match grace {
                Ok(grace) => Interrupt::Deleted(grace.unwrap_or_default()),
                Err(_) => Interrupt::Shutdown,
            },
            _ = self.shutdown.wait_for(|s| *s) => return Interrupt::Shutdown,
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => true,
        };
        self.deadline_passed = fired;
        Interrupt::Deadline
    }

    /// Sleeps for `duration` unless interrupted first.
    pub(super) async fn sleep(&mut self, duration: Duration) -> Option<Interrupt> {
        tokio::select! {
            _ = tokio::time::sleep(duration) => None,
            interrupt = self.interrupted() => Some(interrupt),
        }
    }
}

/// What the pod's `restartPolicy` says about a container that exited with `code`
/// (<https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#restart-policy>):
/// `Always` restarts it whatever the code, `OnFailure` only after a non-zero code, `Never`
/// never.
pub(crate) fn restarts(policy: &str, code: i32) -> bool {
    match policy {
        "Always" => true,
        "OnFailure" => code != 0,
        _ => false,
    }
}

/// The kubelet's crash-loop back-off before restart number `restart` (1-based) of a
/// container, as `doBackOff` in `pkg/kubelet/kuberuntime/kuberuntime_manager.go` computes
/// it: the first restart is immediate (the back-off entry is only created then), later ones
/// wait `initial`, doubling each time, capped at five minutes
/// (<https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#container-restarts>:
/// "exponential backoff delay (10s, 20s, 40s, …), that is capped at 300 seconds").
pub(crate) fn crash_back_off(initial: Duration, restart: u32) -> Duration {
    if restart <= 1 {
        return Duration::ZERO;
    }
    let doubled = initial.saturating_mul(1u32 << (restart - 2).min(16));
    doubled.min(MAX_BACK_OFF)
}

/// A whole-second duration as Go's `time.Duration` prints it: `10s`, `1m20s`, `5m0s`.
fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{}s", s / 60, s % 60)
    }
}

/// The cap of the kubelet's container and image-pull back-offs (`MaxContainerBackOff`).
const MAX_BACK_OFF: Duration = Duration::from_secs(300);

/// The status of a pod past its `activeDeadlineSeconds` (`pastActiveDeadline` in
/// `pkg/kubelet/kubelet_pods.go`; reason and message are the kubelet's constants).
fn deadline_exceeded(p: &mut Value) {
    p["status"]["phase"] = json!("Failed");
    p["status"]["reason"] = json!("DeadlineExceeded");
    p["status"]["message"] = json!("Pod was active on the node longer than the specified deadline");
    p["status"]["conditions"] = conditions(false);
}

async fn run(shared: Arc<Shared>, runtime: Arc<PodRuntime>, pod: Value) {
    let mut life = Life {
        deleted: runtime.delete.subscribe(),
        shutdown: shared.shutdown.subscribe(),
        deadline: None,
        deadline_passed: false,
    };
    let mut changes = shared.changes.subscribe();
    let container = pod["spec"]["containers"][0].clone();
    let policy = pod["spec"]["restartPolicy"]
        .as_str()
        .unwrap_or("Always")
        .to_owned();

    // Scheduled on the node after a while.
    if let Some(interrupt) = life.sleep(shared.options.pending_delay).await {
        return finish(&shared, &runtime, interrupt);
    }
    let ip = format!(
        "10.244.0.{}",
        shared.next_ip.fetch_add(1, Ordering::SeqCst) % 250 + 2
    );
    // `activeDeadlineSeconds` counts from the pod's startTime, which the kubelet sets when
    // it admits the pod, before volumes or images (<https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#lifecycle>).
    life.deadline = pod["spec"]["activeDeadlineSeconds"]
        .as_u64()
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    set_status(&shared, &runtime, |p| {
        p["spec"]["nodeName"] = json!("fake-node");
        p["status"] = json!({
            "phase": "Pending",
            "qosClass": qos_class(&container),
            "hostIP": "127.0.0.1",
            "startTime": now_seconds(),
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_seconds()},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now_seconds()},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now_seconds()},
            ],
            "containerStatuses": [container_status(&container, json!({"waiting": {"reason": "ContainerCreating"}}), false, 0, &json!({}))],
        });
    });
    // ContainerCreating until every secret it needs exists (a real kubelet waits to mount
    // its secret volumes).
    loop {
        changes.borrow_and_update();
        if missing_secret(&shared, &runtime.namespace, &pod, &container).is_none() {
            break;
        }
        tokio::select! {
            _ = changes.changed() => {}
            interrupt = life.interrupted() => return end_early(&shared, &runtime, &mut life, interrupt).await,
        }
    }

    let mut restart_count = 0u32;
    let mut last_state = json!({});
    loop {
        let image = match super::images::pull(
            &shared,
            &runtime,
            &container,
            &mut life,
            restart_count,
            &last_state,
        )
        .await
        {
            Ok(image) => image,
            Err(interrupt) => return end_early(&shared, &runtime, &mut life, interrupt).await,
        };
        let started_at = now_seconds();
        let prepared = prepare(&shared, &runtime, &pod, &container);
        let (code, reason, message, finished) =
            match prepared.and_then(|p| spawn(&shared, &runtime, &container, p, &image)) {
                Err(Failure::Config(message)) => {
                    // Like a missing ConfigMap key: the pod stays Pending with the reason.
                    set_status(&shared, &runtime, |p| {
                        p["status"]["containerStatuses"] = json!([container_status(
                            &container,
                            json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}}),
                            false,
                            restart_count,
                            &last_state,
                        )]);
                    });
                    let interrupt = life.interrupted().await;
                    return end_early(&shared, &runtime, &mut life, interrupt).await;
                }
                Err(Failure::Start(message)) => {
                    runtime.new_container(restart_count);
                    runtime.update_logs(|l| l.done = true);
                    (128, "StartError", message, now_seconds())
                }
                Ok((child, mounts, cgroup)) => {
                    shared.container_starts.fetch_add(1, Ordering::SeqCst);
                    let ran = run_container(
                        &shared,
                        &runtime,
                        &container,
                        &mut life,
                        child,
                        &mounts,
                        cgroup.as_ref(),
                        &ip,
                        &started_at,
                        restart_count,
                        &last_state,
                    )
                    .await;
                    let Some((code, reason)) = ran else {
                        return; // Shutdown: the handle removes everything.
                    };
                    let message = termination_message(&runtime, &container, &mounts, code);
                    (code, reason, message, now_seconds())
                }
            };
        let mut terminated = json!({
            "exitCode": code,
            "reason": reason,
            "startedAt": if reason == "StartError" { "1970-01-01T00:00:00Z".to_owned() } else { started_at.clone() },
            "finishedAt": finished,
            "containerID": format!("containerd://{}{restart_count}", runtime.uid.replace('-', "")),
        });
        if !message.is_empty() {
            terminated["message"] = json!(message);
        }
        let terminated = json!({"terminated": terminated});
        let past_deadline = life.deadline_passed;
        let restart = !past_deadline && restarts(&policy, code);
        set_status(&shared, &runtime, |p| {
            p["status"]["containerStatuses"] = json!([container_status(
                &container,
                terminated.clone(),
                false,
                restart_count,
                &last_state,
            )]);
            if past_deadline {
                deadline_exceeded(p);
            } else if restart {
                // A container about to restart keeps the pod Running
                // (<https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-phase>:
                // "at least one container is still running, or is in the process of
                // starting or restarting").
                p["status"]["phase"] = json!("Running");
                p["status"]["conditions"] = conditions_not_ready("ContainersNotReady");
            } else {
                p["status"]["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
                p["status"]["conditions"] = conditions(false);
            }
        });
        if !restart {
            // A pod that ended has no deadline left to pass.
            life.deadline = None;
            let interrupt = life.interrupted().await;
            return finish(&shared, &runtime, interrupt);
        }
        restart_count += 1;
        last_state = terminated;
        let back_off = crash_back_off(shared.options.restart_back_off, restart_count);
        if !back_off.is_zero() {
            // `CrashLoopBackOff` with the kubelet's message, the last termination kept
            // (`convertToAPIContainerStatuses` in `pkg/kubelet/kubelet_pods.go`).
            let message = format!(
                "back-off {} restarting failed container={} pod={}_{}({})",
                go_duration(back_off),
                container["name"].as_str().unwrap_or(""),
                runtime.name,
                runtime.namespace,
                runtime.uid
            );
            set_status(&shared, &runtime, |p| {
                p["status"]["containerStatuses"] = json!([container_status(
                    &container,
                    json!({"waiting": {"reason": "CrashLoopBackOff", "message": message}}),
                    false,
                    restart_count - 1,
                    &last_state,
                )]);
            });
            if let Some(interrupt) = life.sleep(back_off).await {
                return end_early(&shared, &runtime, &mut life, interrupt).await;
            }
        }
    }
}

/// The QoS class the API server gives the pod (<https://kubernetes.io/docs/concepts/workloads/pods/pod-qos/>),
/// for its one container.
fn qos_class(container: &Value) -> &'static str {
    let resources = &container["resources"];
    let (requests, limits) = (&resources["requests"], &resources["limits"]);
    let set = |v: &Value, k: &str| v[k].is_string() || v[k].is_number();
    if !set(requests, "cpu") && !set(requests, "memory") && !set(limits, "cpu") && !set(limits, "memory") {
        "BestEffort"
    } else if set(limits, "cpu")
        && set(limits, "memory")
        && ["cpu", "memory"]
            .iter()
            .all(|k| !set(requests, k) || requests[*k] == limits[*k])
    {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Runs one container instance until it exits; `None` on shutdown. Returns its exit code
/// and the terminated reason (`Completed`, `Error`, `OOMKilled`).
#[allow(clippy::too_many_arguments)]
async fn run_container(
    shared: &Shared,
    runtime: &Arc<PodRuntime>,
    container: &Value,
    life: &mut Life,
    mut child: tokio::process::Child,
    _mounts: &[Mount],
    cgroup: Option<&super::cgroup::MemoryCgroup>,
    ip: &str,
    started_at: &str,
    restart_count: u32,
    last_state: &Value,
) -> Option<(i32, &'static str)> {
    let pgid = child.id().map(|id| id as i32);
    *runtime.pgid.lock().unwrap() = pgid;
    runtime.new_container(restart_count);
    let readers = [
        child
            .stdout
            .take()
            .map(|o| tokio::spawn(capture(runtime.clone(), o))),
        child
            .stderr
            .take()
            .map(|e| tokio::spawn(capture(runtime.clone(), e))),
    ];
    set_status(shared, runtime, |p| {
        p["status"]["phase"] = json!("Running");
        p["status"]["podIP"] = json!(ip);
        p["status"]["podIPs"] = json!([{"ip": ip}]);
        p["status"]["conditions"] = conditions(true);
        p["status"]["containerStatuses"] = json!([container_status(
            container,
            json!({"running": {"startedAt": started_at}}),
            true,
            restart_count,
            last_state,
        )]);
    });

    let signal = |sig| {
        if let Some(pgid) = pgid {
            let _ = killpg(Pid::from_raw(pgid), sig);
        }
    };
    let exit: std::io::Result<ExitStatus> = tokio::select! {
        status = child.wait() => status,
        interrupt = life.interrupted() => {
            let grace = match interrupt {
                Interrupt::Deleted(grace) => grace,
                // The kubelet kills a pod past its deadline with its termination grace
                // period (`killPod` from `syncPod`).
                Interrupt::Deadline => shared.options.kill_grace,
                Interrupt::Shutdown => {
                    signal(Signal::SIGKILL);
                    let _ = child.wait().await;
                    return None;
                }
            };
            if let Interrupt::Deadline = interrupt {
                set_status(shared, runtime, deadline_exceeded);
            }
            signal(Signal::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    signal(Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    // The container is its process group: whatever the main process left behind dies
    // with it, as with a container's cgroup.
    signal(Signal::SIGKILL);
    for reader in readers.into_iter().flatten() {
        // A descendant that left the process group could hold the pipe open forever.
        let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    }
    *runtime.pgid.lock().unwrap() = None;
    runtime.update_logs(|l| l.done = true);

    let code = match &exit {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(9))
        }
        Err(_) => 128,
    };
    // The runtime reports a container the kernel's OOM killer ended as `OOMKilled`
    // (<https://kubernetes.io/docs/tasks/configure-pod-container/assign-memory-resource/#exceed-a-container-s-memory-limit>).
    let oom = cgroup.is_some_and(|c| c.oom_killed());
    let reason = match code {
        _ if oom => "OOMKilled",
        0 => "Completed",
        _ => "Error",
    };
    Some((code, reason))
}

/// A pod interrupted before or between its containers: deleted or shut down ends it, its
/// deadline fails it (`DeadlineExceeded`) and it waits for deletion.
async fn end_early(shared: &Shared, runtime: &PodRuntime, life: &mut Life, interrupt: Interrupt) {
    if let Interrupt::Deadline = interrupt {
        set_status(shared, runtime, deadline_exceeded);
        let interrupt = life.interrupted().await;
        return finish(shared, runtime, interrupt);
    }
    finish(shared, runtime, interrupt)
}

/// After deletion (its process dead): the object goes, its secrets are collected, its
/// volumes removed. On shutdown nothing is updated: the handle removes everything.
fn finish(shared: &Shared, runtime: &PodRuntime, interrupt: Interrupt) {
    if let Interrupt::Shutdown = interrupt {
        return;
    }
    shared.mutate(|store| store.remove("pods", &runtime.namespace, &runtime.name));
    collect_garbage(shared);
    shared.runtimes.lock().unwrap().remove(&runtime.uid);
    let _ = std::fs::remove_dir_all(shared.pods_dir.join(&runtime.uid));
}

fn set_status(shared: &Shared, runtime: &PodRuntime, change: impl FnOnce(&mut Value)) {
    shared.mutate(|store| store.update("pods", &runtime.namespace, &runtime.name, change));
}

/// Conditions of a pod whose container is not ready but may become so (restarting).
fn conditions_not_ready(reason: &str) -> Value {
    let mut list = conditions(true);
    for c in list.as_array_mut().into_iter().flatten().skip(2) {
        c["status"] = json!("False");
        c["reason"] = json!(reason);
    }
    list
}

fn conditions(ready: bool) -> Value {
    let now = now_seconds();
    let (status, reason) = if ready {
        ("True", None)
    } else {
        ("False", Some("PodCompleted"))
    };
    let mut list = vec![
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now}),
        json!({"type": "Initialized", "status": "True", "lastTransitionTime": now}),
        json!({"type": "ContainersReady", "status": status, "lastTransitionTime": now}),
        json!({"type": "Ready", "status": status, "lastTransitionTime": now}),
    ];
    if let Some(reason) = reason {
        list[2]["reason"] = json!(reason);
        list[3]["reason"] = json!(reason);
    }
    Value::Array(list)
}

fn container_status(
    container: &Value,
    state: Value,
    running: bool,
    restart_count: u32,
    last_state: &Value,
) -> Value {
    let image = container["image"].as_str().unwrap_or("");
    json!({
        "name": container["name"],
        "state": state,
        "lastState": last_state,
        "ready": running,
        "started": running,
        "restartCount": restart_count,
        "image": image,
        "imageID": format!("{image}@sha256:{}", "0".repeat(64)),
    })
}

/// The name of a secret the container needs (volume or env) that does not exist yet.
fn missing_secret(shared: &Shared, namespace: &str, pod: &Value, container: &Value) -> Option<String> {
    let store = shared.store.lock().unwrap();
    let volume_secrets = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["secret"].is_object() && v["secret"]["optional"] != json!(true))
        .filter_map(|v| v["secret"]["secretName"].as_str());
    let env_secrets = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["valueFrom"]["secretKeyRef"])
        .filter(|r| r.is_object() && r["optional"] != json!(true))
        .filter_map(|r| r["name"].as_str());
    volume_secrets
        .chain(env_secrets)
        .find(|name| store.get("secrets", namespace, name).is_none())
        .map(str::to_owned)
}

enum Failure {
    /// The container cannot be configured (stays Pending).
    Config(String),
    /// The process could not be started (terminated, exit 128).
    Start(String),
}

/// A bind mount in the container's namespace.
struct Mount {
    source: PathBuf,
    target: PathBuf,
    read_only: bool,
}

struct Prepared {
    mounts: Vec<Mount>,
    env: Vec<(String, String)>,
    security: Security,
}

/// Capability numbers by name (`linux/capability.h`), without the `CAP_` prefix.
const CAPABILITY_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What containerd (and Docker) give a container that asks for nothing.
const RUNTIME_DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The part of the container's security context the fake kubelet applies to the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Security {
    /// The bounding set, as capability numbers; `None` keeps every capability (privileged).
    pub capabilities: Option<Vec<u32>>,
    pub no_new_privs: bool,
    pub read_only_root: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

fn capability_number(name: &str) -> Option<u32> {
    let name = name.trim().to_ascii_uppercase();
    let name = name.strip_prefix("CAP_").unwrap_or(&name);
    CAPABILITY_NAMES.iter().position(|n| *n == name).map(|n| n as u32)
}

/// The container's security context (over the pod's, for the fields both have) as the
/// runtime and kubelet would apply it; an error is what the kubelet reports as
/// CreateContainerConfigError (or the runtime as CreateContainerError).
pub(crate) fn security(pod: &Value, container: &Value) -> Result<Security, String> {
    let sc = &container["securityContext"];
    let pod_sc = &pod["spec"]["securityContext"];
    let id = |field: &str| -> Option<u32> {
        sc[field]
            .as_u64()
            .or_else(|| pod_sc[field].as_u64())
            .map(|v| v as u32)
    };
    let capabilities = if sc["privileged"] == json!(true) {
        None
    } else {
        let mut set: Vec<u32> = RUNTIME_DEFAULT_CAPABILITIES
            .iter()
            .filter_map(|n| capability_number(n))
            .collect();
        let names = |field: &str| -> Vec<String> {
            sc["capabilities"][field]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        for name in names("drop") {
            if name.eq_ignore_ascii_case("ALL") {
                set.clear();
                continue;
            }
            let number = capability_number(&name).ok_or_else(|| format!("unknown capability {name:?}"))?;
            set.retain(|c| *c != number);
        }
        for name in names("add") {
            if name.eq_ignore_ascii_case("ALL") {
                set = (0..CAPABILITY_NAMES.len() as u32).collect();
                continue;
            }
            let number = capability_number(&name).ok_or_else(|| format!("unknown capability {name:?}"))?;
            if !set.contains(&number) {
                set.push(number);
            }
        }
        set.sort_unstable();
        Some(set)
    };
    let uid = id("runAsUser");
    let run_as_non_root = sc["runAsNonRoot"]
        .as_bool()
        .or_else(|| pod_sc["runAsNonRoot"].as_bool())
        .unwrap_or(false);
    // The image's user is the fake's own: whoever runs the tests.
    let effective_uid = uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw());
    if run_as_non_root && effective_uid == 0 {
        return Err("container has runAsNonRoot and image will run as root".into());
    }
    Ok(Security {
        capabilities,
        no_new_privs: sc["allowPrivilegeEscalation"] == json!(false),
        read_only_root: sc["readOnlyRootFilesystem"] == json!(true),
        uid,
        gid: id("runAsGroup"),
    })
}

fn decode(data: &Value) -> Vec<(String, Vec<u8>)> {
    use base64::Engine as _;
    data.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or(""))
                .unwrap_or_default();
            (k.clone(), bytes)
        })
        .collect()
}

fn prepare(
    shared: &Shared,
    runtime: &PodRuntime,
    pod: &Value,
    container: &Value,
) -> Result<Prepared, Failure> {
    let config = |e: String| Failure::Config(e);
    let secret = |name: &str| -> Option<Value> {
        shared
            .store
            .lock()
            .unwrap()
            .get("secrets", &runtime.namespace, name)
            .cloned()
    };
    // Volumes.
    let mut sources: HashMap<String, (PathBuf, bool)> = HashMap::new();
    for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or("").to_owned();
        let dir = volume_dir(shared, &runtime.uid, &name);
        if volume["emptyDir"].is_object() {
            std::fs::create_dir_all(&dir).map_err(|e| config(format!("emptyDir {name}: {e}")))?;
            sources.insert(name, (dir, false));
        } else if volume["secret"].is_object() {
            std::fs::create_dir_all(&dir).map_err(|e| config(format!("secret volume {name}: {e}")))?;
            let spec = &volume["secret"];
            let default_mode = spec["defaultMode"].as_u64().unwrap_or(0o644) as u32;
            let data = spec["secretName"]
                .as_str()
                .and_then(secret)
                .map(|s| decode(&s["data"]))
                .unwrap_or_default();
            let items = spec["items"].as_array();
            for (key, bytes) in data {
                let (path, mode) = match items {
                    None => (key.clone(), default_mode),
                    Some(items) => match items.iter().find(|i| i["key"].as_str() == Some(key.as_str())) {
                        Some(item) => (
                            item["path"].as_str().unwrap_or(&key).to_owned(),
                            item["mode"].as_u64().map_or(default_mode, |m| m as u32),
                        ),
                        None => continue,
                    },
                };
                let file = dir.join(&path);
                if let Some(parent) = file.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                std::fs::write(&file, &bytes)
                    .and_then(|()| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)))
                    .map_err(|e| config(format!("secret volume {name}: {}: {e}", file.display())))?;
            }
            sources.insert(name, (dir, true));
        } else if let Some(path) = volume["hostPath"]["path"].as_str() {
            sources.insert(name, (PathBuf::from(path), false));
        } else {
            return Err(config(format!(
                "volume {name}: only emptyDir, secret and hostPath volumes are supported by the fake kubelet"
            )));
        }
    }
    // Mounts, parents before children: a mount point inside another volume is made in that
    // volume's dir (as runc makes it in the rootfs), only top-level ones on the host.
    let mut wanted: Vec<&Value> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    wanted.sort_by_key(|m| {
        Path::new(m["mountPath"].as_str().unwrap_or(""))
            .components()
            .count()
    });
    let mut mounts: Vec<Mount> = Vec::new();
    for m in wanted {
        let name = m["name"].as_str().unwrap_or("");
        let (dir, secret_volume) = sources
            .get(name)
            .ok_or_else(|| config(format!("volume mount {name}: no such volume")))?;
        let mut source = dir.clone();
        if let Some(sub) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
            if Path::new(sub)
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
            {
                return Err(config(format!(
                    "subPath {sub:?} must be a relative path without '..'"
                )));
            }
            source = source.join(sub);
            std::fs::create_dir_all(&source).map_err(|e| config(format!("subPath {sub}: {e}")))?;
        }
        let target = PathBuf::from(m["mountPath"].as_str().unwrap_or(""));
        let parent = mounts
            .iter()
            .filter(|p| target.starts_with(&p.target) && target != p.target)
            .max_by_key(|p| p.target.components().count());
        match parent {
            Some(parent) => {
                let point = parent
                    .source
                    .join(target.strip_prefix(&parent.target).expect("prefix"));
                std::fs::create_dir_all(&point)
                    .map_err(|e| config(format!("mount point {}: {e}", point.display())))?;
            }
            None => acquire_mount_point(shared, &target)
                .map_err(|e| config(format!("mount point {}: {e}", target.display())))?,
        }
        mounts.push(Mount {
            source,
            target,
            read_only: *secret_volume || m["readOnly"] == json!(true),
        });
    }
    // Environment.
    let mut env = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or("").to_owned();
        let value_from = &e["valueFrom"];
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if value_from["secretKeyRef"].is_object() {
            let r = &value_from["secretKeyRef"];
            let (secret_name, key) = (r["name"].as_str().unwrap_or(""), r["key"].as_str().unwrap_or(""));
            let found = secret(secret_name)
                .and_then(|s| decode(&s["data"]).into_iter().find(|(k, _)| k == key))
                .map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
            match found {
                Some(v) => v,
                None if r["optional"] == json!(true) => continue,
                None => {
                    return Err(config(format!(
                        "couldn't find key {key} in Secret {}/{secret_name}",
                        runtime.namespace
                    )))
                }
            }
        } else if let Some(path) = value_from["fieldRef"]["fieldPath"].as_str() {
            let store = shared.store.lock().unwrap();
            let current = store
                .get("pods", &runtime.namespace, &runtime.name)
                .cloned()
                .unwrap_or(Value::Null);
            path.split('.')
                .try_fold(&current, |v, part| v.get(part))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        } else if value_from.is_object() {
            return Err(config(format!(
                "env {name}: only value, secretKeyRef and fieldRef are supported by the fake kubelet"
            )));
        } else {
            String::new()
        };
        env.push((name, value));
    }
    let security = security(pod, container).map_err(config)?;
    Ok(Prepared {
        mounts,
        env,
        security,
    })
}

fn cstring(path: &Path) -> Result<CString, Failure> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| Failure::Config(e.to_string()))
}

fn spawn(
    shared: &Shared,
    runtime: &PodRuntime,
    container: &Value,
    prepared: Prepared,
    image: &PulledImage,
) -> Result<(tokio::process::Child, Vec<Mount>, Option<MemoryCgroup>), Failure> {
    let strings = |field: &str| -> Option<Vec<String>> {
        container[field]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
    };
    // `command` replaces the image's Entrypoint and drops its Cmd; `args` replaces the Cmd
    // (<https://kubernetes.io/docs/tasks/inject-data-application/define-command-argument-container/#notes>).
    let argv: Vec<String> = match (strings("command"), strings("args")) {
        (Some(command), args) => command.into_iter().chain(args.unwrap_or_default()).collect(),
        (None, Some(args)) => image.entrypoint.iter().cloned().chain(args).collect(),
        (None, None) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(Failure::Start(
            "failed to create containerd task: failed to create shim task: OCI runtime create failed: \
             runc create failed: unable to start container process: error during container init: \
             no command specified: unknown"
                .into(),
        ));
    };
    let working_dir = container["workingDir"]
        .as_str()
        .filter(|w| !w.is_empty())
        .or(Some(image.working_dir.as_str()).filter(|w| !w.is_empty()))
        .unwrap_or("/");
    let workdir = cstring(Path::new(working_dir))?;
    // The container's environment: the image's, then the container's own over it.
    let mut env: Vec<(String, String)> = image
        .env
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    env.extend(prepared.env.iter().cloned());
    let container_path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or_else(|| image.path().to_owned(), |(_, v)| v.clone());
    // The program is the image's file, found as runc's exec finds it.
    let Some(executable) = image.executable(program, &container_path, working_dir) else {
        return Err(Failure::Start(format!(
            "failed to create containerd task: failed to create shim task: OCI runtime create failed: \
             runc create failed: unable to start container process: error during container init: \
             exec: \"{program}\": executable file not found in $PATH: unknown"
        )));
    };
    // Without a chroot, what the program execs in turn is looked up through the image's
    // directories first, then the host's tools that the image would carry (`git`,
    // `slirp4netns`, …).
    let mut process_path = OsString::new();
    for dir in container_path.split(':').filter(|d| d.starts_with('/')) {
        process_path.push(image.rootfs.join(dir.trim_start_matches('/')));
        process_path.push(":");
    }
    process_path.push(&shared.options.container_path);
    shared.executed.lock().unwrap().push(executable.clone());
    // Everything the child needs is allocated here: after fork only async-signal-safe
    // calls are allowed, and mount/unshare/chdir on prepared C strings are just syscalls.
    let mut binds: Vec<(CString, CString, bool)> = Vec::new();
    for m in &prepared.mounts {
        binds.push((cstring(&m.source)?, cstring(&m.target)?, m.read_only));
    }
    let security = prepared.security.clone();
    let memory = match container["resources"]["limits"]["memory"].as_str() {
        None => None,
        Some(limit) => {
            let bytes = quantity_bytes(limit)
                .ok_or_else(|| Failure::Config(format!("invalid memory limit {limit:?}")))?;
            let name = format!("{}-{}", runtime.uid, uuid::Uuid::new_v4().simple());
            Some(MemoryCgroup::create(&name, bytes).map_err(|e| {
                Failure::Start(format!(
                    "the fake kubelet cannot enforce the memory limit {limit}: {e}"
                ))
            })?)
        }
    };
    let join_cgroup = memory.as_ref().map(|m| m.procs.clone());
    let last_capability: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let mut command = tokio::process::Command::new(&executable);
    command
        .arg0(program)
        .args(args)
        .env_clear()
        .env("HOME", "/root")
        .env("HOSTNAME", &runtime.name)
        .envs(shared.options.container_env.iter().cloned())
        .envs(env)
        .env("PATH", process_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure only makes syscalls (mount, chdir, prctl, set*id) on data prepared
    // before the fork.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &join_cgroup {
                // "0" is the writing process itself: the container is in its memory cgroup
                // before it runs anything.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            unshare(CloneFlags::CLONE_NEWNS)?;
            // Our mounts must not propagate back to the host's namespace.
            mount(
                None::<&CStr>,
                c"/",
                None::<&CStr>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&CStr>,
            )?;
            for (source, target, read_only) in &binds {
                mount(
                    Some(source.as_c_str()),
                    target.as_c_str(),
                    None::<&CStr>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&CStr>,
                )?;
                if *read_only {
                    mount(
                        None::<&CStr>,
                        target.as_c_str(),
                        None::<&CStr>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&CStr>,
                    )?;
                }
            }
            if security.read_only_root {
                // Only the root mount: the volumes bound above stay writable, as in a
                // container whose root file system is read-only.
                mount(
                    None::<&CStr>,
                    c"/",
                    None::<&CStr>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&CStr>,
                )?;
            }
            nix::unistd::chdir(workdir.as_c_str())?;
            if let Some(kept) = &security.capabilities {
                // Root's capabilities after execve are its bounding set; nothing inherited or
                // ambient may add to it.
                libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
                for cap in (0..=last_capability).filter(|c| !kept.contains(c)) {
                    if libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            if security.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Last: the bounding set and mounts above need this process's capabilities.
            if let Some(gid) = security.gid {
                nix::unistd::setgroups(&[])?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
            }
            if let Some(uid) = security.uid {
                nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
            }
            Ok(())
        });
    }
    match command.spawn() {
        Ok(child) => Ok((child, prepared.mounts, memory)),
        Err(e) => Err(Failure::Start(format!(
            "failed to create containerd task: failed to start {program:?}: {e}"
        ))),
    }
}

async fn capture(runtime: Arc<PodRuntime>, output: impl AsyncRead + Unpin) {
    let mut reader = BufReader::new(output);
    loop {
        let mut text = Vec::new();
        match reader.read_until(b'\n', &mut text).await {
            Ok(0) | Err(_) => return,
            Ok(_) => runtime.update_logs(|l| {
                l.lines.push(LogLine {
                    at: Timestamp::now(),
                    text,
                })
            }),
        }
    }
}

/// terminationMessagePath's content (it lies in a volume), else with
/// FallbackToLogsOnError and a failure the log's tail.
fn termination_message(runtime: &PodRuntime, container: &Value, mounts: &[Mount], code: i32) -> String {
    let path = PathBuf::from(
        container["terminationMessagePath"]
            .as_str()
            .unwrap_or("/dev/termination-log"),
    );
    let host = mounts
        .iter()
        .filter(|m| path.starts_with(&m.target))
        .max_by_key(|m| m.target.components().count())
        .map(|m| m.source.join(path.strip_prefix(&m.target).expect("prefix")));
    let mut message = host
        .and_then(|h| std::fs::read(h).ok())
        .map(|mut bytes| {
            bytes.truncate(MAX_MESSAGE_BYTES);
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    if message.is_empty()
        && code != 0
        && container["terminationMessagePolicy"].as_str() == Some("FallbackToLogsOnError")
    {
        let logs = runtime.logs.lock().unwrap();
        let start = logs.lines.len().saturating_sub(FALLBACK_LOG_LINES);
        let tail: Vec<u8> = logs.lines[start..]
            .iter()
            .flat_map(|l| l.text.iter().copied())
            .collect();
        let from = tail.len().saturating_sub(FALLBACK_LOG_BYTES);
        message = String::from_utf8_lossy(&tail[from..]).into_owned();
    }
    message
}

/// The container log as pods/log serves it: lines at or after `since`, the last
/// `tail_lines`, each prefixed with its RFC 3339 nano timestamp if asked, following new
/// lines until the container terminates (or [`super::FakeKube::drop_log_streams`]).
pub(crate) fn log_stream(
    shared: Arc<Shared>,
    runtime: Arc<PodRuntime>,
    options: LogOptions,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    async_stream::stream! {
        let _open = super::Gauge::hold(&shared.open_log_streams);
        let mut changes = runtime.log_changes.subscribe();
        let mut drops = shared.log_drops.subscribe();
        let mut shutdown = shared.shutdown.subscribe();
        let mut next = 0usize;
        let mut first = true;
        let mut budget = options.limit_bytes.unwrap_or(usize::MAX);
        let instance = runtime.logs.lock().unwrap().instance;
        loop {
            changes.borrow_and_update();
            let (chunks, done) = {
                let logs = runtime.logs.lock().unwrap();
                let (all, done): (&[LogLine], bool) = if options.previous {
                    (logs.previous.as_deref().unwrap_or_default(), true)
                } else if logs.instance != instance {
                    // The container this stream followed was replaced by a restart.
                    (&[], true)
                } else {
                    (&logs.lines, logs.done)
                };
                let mut lines: Vec<&LogLine> = all[next.min(all.len())..]
                    .iter()
                    .filter(|l| options.since.is_none_or(|s| l.at >= s))
                    .collect();
                next = all.len();
                if std::mem::take(&mut first) {
                    if let Some(tail) = options.tail_lines {
                        lines.drain(..lines.len().saturating_sub(tail));
                    }
                }
                let chunks: Vec<Vec<u8>> = lines
                    .into_iter()
                    .map(|l| {
                        let mut out = Vec::with_capacity(l.text.len() + 32);
                        if options.timestamps {
                            out.extend_from_slice(format!("{} ", l.at).as_bytes());
                        }
                        out.extend_from_slice(&l.text);
                        out
                    })
                    .collect();
                (chunks, done)
            };
            for mut chunk in chunks {
                if budget == 0 {
                    return;
                }
                chunk.truncate(budget);
                budget -= chunk.len();
                yield Ok(Bytes::from(chunk));
            }
            if !options.follow || done {
                return;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = drops.changed() => return,
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}
