//! The builder Pod and its Secret exactly as Kiln asks the API server for them: pure
//! functions of one build and the `[kubernetes]` settings, and the reverse — what a pod
//! found in the cluster says about its build.
//!
//! The pod name is derived from the build key, so every replica that is asked for the same
//! image asks for the same pod, and the API server's 409 is the cross-replica de-duplication.
//!
//! Every Dockerfile is hostile, so builder pods are unprivileged by default: their own user
//! namespace (`hostUsers: false`) and the build container's security context of
//! [`default_security_context`], which says field by field why. `kubernetes.privileged`
//! brings back the old privileged pod in the node's user namespace.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{
        AppArmorProfile, Capabilities, Container, EmptyDirVolumeSource, EnvVar, Pod, PodSpec, SeccompProfile,
        Secret, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    ByteString,
};

use crate::{
    config::KubernetesConfig,
    model::{BuildId, BuildKey, ImageRef},
};

/// Selects every pod Kiln manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=kiln";
const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const LABEL_NAME: &str = "app.kubernetes.io/name";
const LABEL_KEY: &str = "kiln.dev/build-key";
const LABEL_ID: &str = "kiln.dev/build-id";
const ANNOTATION_KEY: &str = "kiln.dev/build-key";
const ANNOTATION_BASE: &str = "kiln.dev/base-ref";
const ANNOTATION_WORKSPACE: &str = "kiln.dev/workspace-ref";
const ANNOTATION_TIMEOUT: &str = "kiln.dev/timeout-seconds";
const ANNOTATION_CREATED_BY: &str = "kiln.dev/created-by";

/// The build container's name.
pub const CONTAINER: &str = "build";
/// Where the build container finds its credentials (the Secret's keys as files).
pub const CREDENTIALS_DIR: &str = "/var/run/kiln/credentials";
/// The docker config with registry credentials, inside [`CREDENTIALS_DIR`].
pub const DOCKER_CONFIG_KEY: &str = "config.json";
/// `user:password` for an https git remote, inside [`CREDENTIALS_DIR`].
pub const GIT_CREDENTIALS_KEY: &str = "git-credentials";
/// Where `kiln execute` writes its one-line outcome for the pod's status.
pub const TERMINATION_LOG: &str = "/var/run/kiln/termination-log";
/// The engine's data directory in the pod (an emptyDir).
const DATA_DIR: &str = "/var/lib/kiln";
/// `TMPDIR` of `kiln execute` (an emptyDir): the root file system is read-only, and `/tmp`
/// itself is left alone so that nothing of the image's `/tmp` is hidden.
const TMP_DIR: &str = "/var/tmp/kiln";

/// The build container's capabilities: all dropped, then these added back.
///
/// The first thirteen are the set Docker (and containerd's CRI default) gives a container,
/// which the sandbox hands on to root in a RUN step as Docker does (`CHOWN` and `FOWNER` for
/// `apt`, `SETUID`/`SETGID` for `USER`, `MKNOD`, `SETFCAP` for `setcap`, ...); `SETPCAP`
/// also lets the sandbox cut the bounding set of RUN processes and `KILL` lets its init kill
/// whatever a step leaves behind. Named here rather than inherited from the runtime, because
/// runtimes differ (CRI-O drops `MKNOD`, `NET_RAW`, `SYS_CHROOT` and `AUDIT_WRITE` by
/// default). Docker's `NET_RAW` is left out: a RUN step shares the pod's network (with
/// `engine.network = "host"`), and raw sockets there forge packets on the cluster network
/// (ARP, DNS spoofing), which is why the baseline Pod Security level refuses it; `ping` in a
/// RUN step fails without it.
///
/// Then what the sandbox itself needs: `SYS_ADMIN` for `unshare` (mount, PID, UTS, IPC,
/// network namespaces), `mount` (overlayfs, `/proc`, `/dev`, `/sys`, bind mounts),
/// `open_tree`/`move_mount` and `sethostname`; `NET_ADMIN` to bring `lo` up in the new
/// network namespace of `engine.network = "none"`. Neither reaches a RUN step: the sandbox
/// cuts the bounding set of RUN processes to Docker's set (`engine/sandbox/exec.rs`). With
/// `hostUsers: false` every one of them is a capability in the pod's user namespace only:
/// "`CAP_SYS_ADMIN` is limited to the pod's user namespace and invalid outside of it"
/// (<https://kubernetes.io/docs/concepts/workloads/pods/user-namespaces/>).
///
/// The runtime's default seccomp profile keys on these too: containerd's allows `mount`,
/// `umount2`, `unshare`, `setns`, `sethostname`, `open_tree`, `move_mount` and
/// `mount_setattr` only when the bounding set holds `CAP_SYS_ADMIN`, and `chroot` only with
/// `CAP_SYS_CHROOT` (containerd `contrib/seccomp/seccomp_default.go`).
pub const CAPABILITIES: [&str; 15] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
    // What the sandbox needs beyond a plain container.
    "SYS_ADMIN",
    "NET_ADMIN",
];

/// The build container's security context by default: the least that lets `kiln execute`
/// run its sandbox (namespaces, overlayfs, a fresh `/proc`) inside a pod that has its own
/// user namespace (`hostUsers: false`, set by [`pod`]).
///
/// - `privileged: false`: a privileged container gets every capability, every device and
///   no LSM profile; the sandbox needs none of that beyond [`CAPABILITIES`].
/// - `capabilities`: `drop: [ALL]`, `add:` [`CAPABILITIES`] (see there).
/// - `allowPrivilegeEscalation: false`: the kubelet sets `no_new_privs`, which every RUN
///   process inherits, so a setuid or file-capability program cannot raise a step's
///   privileges (as in the restricted Pod Security level; a RUN step of a non-root `USER`
///   that calls `sudo` or `su` fails, unlike in `docker build`). Kiln needs no setuid
///   helper such as `newuidmap`: in its user namespace `kiln execute` is root with
///   `SETUID`/`SETGID` and switches users itself. Kubernetes documents that this flag "is
///   true always when the container ... has CAP_SYS_ADMIN" and refuses `false` with an added
///   `CAP_SYS_ADMIN`, which is why [`CAPABILITIES`] spells it `SYS_ADMIN` (the runtime adds
///   the prefix): `no_new_privs` is no boundary for `kiln execute` itself, which holds
///   `SYS_ADMIN`, but it is for the commands of RUN steps below it.
///   (<https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#security-context-1>)
/// - `seccompProfile: RuntimeDefault`: the runtime's filter stays on for RUN steps
///   (`io_uring`, `keyctl`, `userfaultfd`, `bpf`, ... refused). It allows what the sandbox
///   needs because the bounding set holds `SYS_ADMIN`, with one exception: containerd's
///   profile does not allow `pivot_root`, so the sandbox enters the step's root with its
///   documented fallback (move the overlay onto `/`, then `chroot`).
/// - `appArmorProfile: Unconfined`: the runtimes' default AppArmor profile has
///   `deny mount,` (containerd `contrib/apparmor/template.go`), which would refuse every
///   mount of the sandbox on AppArmor nodes; rootless BuildKit's Kubernetes examples set
///   the same for the same reason (`examples/kubernetes/*.rootless.yaml`). Kubernetes ≥ 1.30.
/// - `procMount: Unmasked`: the sandbox mounts a fresh `/proc` for each step's PID
///   namespace, which the kernel refuses inside a user namespace while the container's
///   `/proc` has masked paths over it; Kubernetes accepts `Unmasked` only together with
///   `hostUsers: false` ("`hostUsers` must be false to use `Unmasked`"), and it unmasks the
///   pod's own `/proc` only, which its user namespace cannot use against the host. BuildKit's
///   `docs/rootless.md` explains the same need (`systempaths=unconfined`).
/// - `readOnlyRootFilesystem: true`: `kiln execute` writes only to its emptyDirs (the data
///   directory, `TMPDIR`, the termination log); RUN steps write to their overlay.
/// - `runAsUser: 0`, `runAsGroup: 0`, and no `runAsNonRoot`: the sandbox needs root in the
///   pod's user namespace, which is an unprivileged user on the node (the kubelet maps it
///   to a UID range above 65535 of its own); `runAsNonRoot: true` would make the kubelet
///   refuse to start it. Pod Security Admission waives these two checks for pods with
///   `hostUsers: false` (user namespaces page, "Integration with Pod security admission
///   checks").
pub fn default_security_context() -> SecurityContext {
    SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: Some(CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        app_armor_profile: Some(AppArmorProfile {
            type_: "Unconfined".into(),
            localhost_profile: None,
        }),
        proc_mount: Some("Unmasked".into()),
        read_only_root_filesystem: Some(true),
        run_as_user: Some(0),
        run_as_group: Some(0),
        ..Default::default()
    }
}

/// The build container's security context with `kubernetes.privileged = true`: what Kiln
/// used before builder pods had user namespaces.
fn privileged_security_context() -> SecurityContext {
    SecurityContext {
        privileged: Some(true),
        ..Default::default()
    }
}

/// The name of the pod (and of its Secret) that builds `key`.
pub fn pod_name(key: &BuildKey) -> String {
    format!("kiln-build-{}", short_key(key))
}

/// Label values are at most 63 characters; 128 bits of the key are plenty to tell builds apart.
fn short_key(key: &BuildKey) -> &str {
    &key.as_str()[..32]
}

/// What one build's pod runs.
#[derive(Debug, Clone)]
pub struct BuilderPod<'a> {
    pub id: &'a BuildId,
    pub key: &'a BuildKey,
    pub base: &'a ImageRef,
    pub workspace: &'a ImageRef,
    pub timeout: Duration,
    /// The arguments of `kiln execute`.
    pub execute_args: Vec<String>,
    /// The replica creating it (for people reading `kubectl describe`).
    pub created_by: &'a str,
}

/// The Pod for `build`, with the settings' template merged over it.
pub fn pod(build: &BuilderPod<'_>, settings: &KubernetesConfig) -> Result<Pod, String> {
    let name = pod_name(build.key);
    let labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), "kiln".to_owned()),
        (LABEL_NAME.to_owned(), "kiln-builder".to_owned()),
        (LABEL_KEY.to_owned(), short_key(build.key).to_owned()),
        (LABEL_ID.to_owned(), build.id.to_string()),
    ]);
    let annotations = BTreeMap::from([
        (ANNOTATION_KEY.to_owned(), build.key.to_string()),
        (ANNOTATION_BASE.to_owned(), build.base.to_string()),
        (ANNOTATION_WORKSPACE.to_owned(), build.workspace.to_string()),
        (ANNOTATION_TIMEOUT.to_owned(), build.timeout.as_secs().to_string()),
        (ANNOTATION_CREATED_BY.to_owned(), build.created_by.to_owned()),
    ]);
    let mut command = vec!["kiln".to_owned(), "execute".to_owned()];
    command.extend(build.execute_args.iter().cloned());
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    };
    let empty_dir = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(settings.builder_image.clone()),
        command: Some(command),
        env: Some(vec![
            EnvVar {
                name: "KILN_EXECUTE_DATA_DIR".into(),
                value: Some(DATA_DIR.into()),
                ..Default::default()
            },
            EnvVar {
                name: "TMPDIR".into(),
                value: Some(TMP_DIR.into()),
                ..Default::default()
            },
        ]),
        resources: settings.resources.clone(),
        // An explicit security context replaces the default whole: merging field by field
        // would leave an operator unsure what the container really gets.
        security_context: Some(match (&settings.security_context, settings.privileged) {
            (Some(context), _) => context.clone(),
            (None, true) => privileged_security_context(),
            (None, false) => default_security_context(),
        }),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(vec![
            mount("work", DATA_DIR, false),
            mount("tmp", TMP_DIR, false),
            mount("run", "/var/run/kiln", false),
            mount("credentials", CREDENTIALS_DIR, true),
        ]),
        ..Default::default()
    };
    let spec = PodSpec {
        containers: vec![container],
        // Root in the pod is then an unprivileged user of the node, and every capability
        // above is valid in the pod's user namespace only. Needs Kubernetes ≥ 1.33 (beta, on
        // by default; stable in 1.36), Linux ≥ 6.3 and containerd ≥ 2.0 or CRI-O ≥ 1.25 with
        // runc ≥ 1.2 or crun ≥ 1.9 (<https://kubernetes.io/docs/concepts/workloads/pods/user-namespaces/>).
        // Its volumes are emptyDirs and a Secret, which user namespaces have always allowed.
        host_users: (!settings.privileged).then_some(false),
        restart_policy: Some("Never".into()),
        service_account_name: Some(settings.service_account.clone()),
        automount_service_account_token: Some(false),
        // The cluster ends the pod even when no replica is left to enforce the timeout.
        active_deadline_seconds: Some(build.timeout.as_secs().max(1) as i64),
        node_selector: (!settings.node_selector.is_empty()).then(|| settings.node_selector.clone()),
        tolerations: (!settings.tolerations.is_empty()).then(|| settings.tolerations.clone()),
        volumes: Some(vec![
            empty_dir("work"),
            empty_dir("tmp"),
            empty_dir("run"),
            Volume {
                name: "credentials".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(name.clone()),
                    default_mode: Some(0o400),
                    optional: Some(false),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    match &settings.pod_template {
        None => Ok(pod),
        Some(template) => {
            let mut value = serde_json::to_value(&pod).map_err(|e| e.to_string())?;
            let patch = serde_json::to_value(template).map_err(|e| e.to_string())?;
            merge_patch(&mut value, &patch);
            serde_json::from_value(value)
                .map_err(|e| format!("kubernetes.pod_template does not make a valid Pod: {e}"))
        }
    }
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The key of build secret `id` in a build's Secret, inside [`CREDENTIALS_DIR`] (ids are
/// at most 200 characters of `[A-Za-z0-9._-]`, a valid Secret key with this prefix).
pub fn build_secret_key(id: &str) -> String {
    format!("build-secret-{id}")
}

/// What a build's Secret holds besides the docker config: git credentials, build secrets.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// The Secret holding a build's credentials and build secrets, owned by its pod so the
/// cluster deletes it with the pod.
pub fn secret(pod: &Pod, docker_config: Vec<u8>, extra: SecretData) -> Secret {
    let mut data = BTreeMap::from([(DOCKER_CONFIG_KEY.to_owned(), ByteString(docker_config))]);
    data.extend(extra.into_iter().map(|(k, v)| (k, ByteString(v))));
    let labels = pod.metadata.labels.clone();
    Secret {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            labels,
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// What a pod found in the cluster says about its build.
#[derive(Debug, Clone)]
pub struct FoundBuild {
    pub pod: String,
    pub id: BuildId,
    pub key: BuildKey,
    pub base: ImageRef,
    pub workspace: ImageRef,
    pub timeout: Duration,
    pub created: Option<std::time::SystemTime>,
    pub state: PodState,
}

/// Reads a Kiln builder pod's labels and annotations; `None` for a pod that is not one.
pub fn found_build(pod: &Pod) -> Option<FoundBuild> {
    let meta = &pod.metadata;
    let labels = meta.labels.as_ref()?;
    let annotations = meta.annotations.as_ref()?;
    let created = meta
        .creation_timestamp
        .as_ref()
        .map(|t| std::time::SystemTime::from(t.0));
    Some(FoundBuild {
        pod: meta.name.clone()?,
        id: BuildId::parse(labels.get(LABEL_ID)?)?,
        key: BuildKey::parse(annotations.get(ANNOTATION_KEY)?)?,
        base: annotations.get(ANNOTATION_BASE)?.parse().ok()?,
        workspace: annotations.get(ANNOTATION_WORKSPACE)?.parse().ok()?,
        timeout: Duration::from_secs(annotations.get(ANNOTATION_TIMEOUT)?.parse().ok()?),
        created,
        state: PodState::of(pod),
    })
}

/// Where a builder pod is, as far as its build is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Not running yet; `problem` is set when it cannot start (e.g. its image cannot be pulled).
    Waiting {
        problem: Option<String>,
    },
    Running,
    /// The build container exited 0.
    Succeeded,
    /// The build container (or the pod) failed; the message says why.
    Failed {
        message: String,
    },
}

/// Appended to the failure of a builder pod with `hostUsers: false` whose container never
/// started.
pub const NEVER_STARTED_HINT: &str = "; its container never started: `kubectl describe pod` \
     shows why; if the node cannot run pods in their own user namespace (hostUsers: false \
     needs Kubernetes 1.33 or later, Linux 6.3, containerd 2.0 or CRI-O 1.25), build on nodes \
     that can (kubernetes.node_selector) or set kubernetes.privileged = true";

/// Waiting reasons that do not resolve on their own.
const STUCK_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

impl PodState {
    pub fn of(pod: &Pod) -> Self {
        let Some(status) = &pod.status else {
            return Self::Waiting { problem: None };
        };
        let container = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == CONTAINER);
        let state = container.and_then(|c| c.state.as_ref());
        if let Some(terminated) = state.and_then(|s| s.terminated.as_ref()) {
            if terminated.exit_code == 0 {
                return Self::Succeeded;
            }
            let message = terminated
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    format!(
                        "builder container exited with code {} ({})",
                        terminated.exit_code,
                        terminated.reason.as_deref().unwrap_or("Error")
                    )
                });
            return Self::Failed { message };
        }
        match status.phase.as_deref() {
            Some("Succeeded") => return Self::Succeeded,
            Some("Failed") => {
                let mut message = match (&status.reason, &status.message) {
                    (Some(r), Some(m)) => format!("builder pod failed: {r}: {m}"),
                    (Some(r), None) => format!("builder pod failed: {r}"),
                    (None, Some(m)) => format!("builder pod failed: {m}"),
                    (None, None) => "builder pod failed".to_owned(),
                };
                // A node that cannot give the pod its user namespace leaves it Pending, with
                // the reason only in the pod's events, until the deadline ends it.
                let never_started = state.is_none_or(|s| s.running.is_none() && s.terminated.is_none());
                let own_user_namespace = pod.spec.as_ref().and_then(|s| s.host_users) == Some(false);
                if never_started && own_user_namespace {
                    message.push_str(NEVER_STARTED_HINT);
                }
                return Self::Failed { message };
            }
            _ => {}
        }
        if state.is_some_and(|s| s.running.is_some()) {
            return Self::Running;
        }
        let problem = state
            .and_then(|s| s.waiting.as_ref())
            .filter(|w| w.reason.as_deref().is_some_and(|r| STUCK_REASONS.contains(&r)))
            .map(|w| {
                format!(
                    "{}: {}",
                    w.reason.as_deref().unwrap_or_default(),
                    w.message.as_deref().unwrap_or_default()
                )
            });
        Self::Waiting { problem }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> BuildKey {
        BuildKey::parse(&"ab".repeat(32)).unwrap()
    }

    fn build<'a>(id: &'a BuildId, key: &'a BuildKey, base: &'a ImageRef, ws: &'a ImageRef) -> BuilderPod<'a> {
        BuilderPod {
            id,
            key,
            base,
            workspace: ws,
            timeout: Duration::from_secs(600),
            execute_args: vec!["--destination".into(), base.to_string()],
            created_by: "replica-0",
        }
    }

    #[test]
    fn a_pod_reads_back_as_the_build_it_was_made_for() {
        let (id, key) = (BuildId::random(), key());
        let base: ImageRef = "registry.example/kiln/base:x".parse().unwrap();
        let ws: ImageRef = "registry.example/kiln/ws:y".parse().unwrap();
        let pod = pod(&build(&id, &key, &base, &ws), &KubernetesConfig::default()).unwrap();
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some(&*format!("kiln-build-{}", "ab".repeat(16)))
        );
        let found = found_build(&pod).unwrap();
        assert_eq!(
            (found.id, found.key, found.base, found.workspace),
            (id, key, base, ws)
        );
        assert_eq!(found.state, PodState::Waiting { problem: None });
        let container = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(container.command.as_ref().unwrap()[..2], ["kiln", "execute"]);
    }

    /// The whole default pod for a sample build, field for field: removing or changing any
    /// setting (above all the security ones) must be a visible decision.
    #[test]
    fn the_default_pod_is_pinned() {
        let id = BuildId::parse("0b6c1a57-3f3e-4c56-9a51-1d1e2b3c4d5e").unwrap();
        let key = key();
        let base: ImageRef = "registry.example/kiln/base:x".parse().unwrap();
        let ws: ImageRef = "registry.example/kiln/ws:y".parse().unwrap();
        let pod = pod(&build(&id, &key, &base, &ws), &KubernetesConfig::default()).unwrap();
        let short = "ab".repeat(16);
        let name = format!("kiln-build-{short}");
        let expected = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {
                    "app.kubernetes.io/managed-by": "kiln",
                    "app.kubernetes.io/name": "kiln-builder",
                    "kiln.dev/build-id": "0b6c1a57-3f3e-4c56-9a51-1d1e2b3c4d5e",
                    "kiln.dev/build-key": short,
                },
                "annotations": {
                    "kiln.dev/base-ref": "registry.example/kiln/base:x",
                    "kiln.dev/build-key": "ab".repeat(32),
                    "kiln.dev/created-by": "replica-0",
                    "kiln.dev/timeout-seconds": "600",
                    "kiln.dev/workspace-ref": "registry.example/kiln/ws:y",
                },
            },
            "spec": {
                "hostUsers": false,
                "restartPolicy": "Never",
                "activeDeadlineSeconds": 600,
                "serviceAccountName": "kiln-builder",
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "build",
                    "image": crate::config::KILN_IMAGE,
                    "command": ["kiln", "execute", "--destination", "registry.example/kiln/base:x"],
                    "env": [
                        { "name": "KILN_EXECUTE_DATA_DIR", "value": "/var/lib/kiln" },
                        { "name": "TMPDIR", "value": "/var/tmp/kiln" },
                    ],
                    "securityContext": {
                        "privileged": false,
                        "allowPrivilegeEscalation": false,
                        "capabilities": {
                            "drop": ["ALL"],
                            "add": [
                                "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                                "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID",
                                "SETPCAP", "SETUID", "SYS_CHROOT", "SYS_ADMIN", "NET_ADMIN",
                            ],
                        },
                        "seccompProfile": { "type": "RuntimeDefault" },
                        "appArmorProfile": { "type": "Unconfined" },
                        "procMount": "Unmasked",
                        "readOnlyRootFilesystem": true,
                        "runAsUser": 0,
                        "runAsGroup": 0,
                    },
                    "terminationMessagePath": "/var/run/kiln/termination-log",
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "volumeMounts": [
                        { "name": "work", "mountPath": "/var/lib/kiln" },
                        { "name": "tmp", "mountPath": "/var/tmp/kiln" },
                        { "name": "run", "mountPath": "/var/run/kiln" },
                        { "name": "credentials", "mountPath": "/var/run/kiln/credentials", "readOnly": true },
                    ],
                }],
                "volumes": [
                    { "name": "work", "emptyDir": {} },
                    { "name": "tmp", "emptyDir": {} },
                    { "name": "run", "emptyDir": {} },
                    { "name": "credentials", "secret": {
                        "secretName": name, "defaultMode": 0o400, "optional": false } },
                ],
            },
        });
        let actual = serde_json::to_value(&pod).unwrap();
        assert_eq!(
            actual,
            expected,
            "the default builder pod changed:\n{}",
            serde_json::to_string_pretty(&actual).unwrap()
        );
    }

    /// What makes a builder pod end once and on time holds for every variant of the pod:
    /// `restartPolicy: Never` (a finished build is never run again) and
    /// `activeDeadlineSeconds` = the build timeout (at least 1 s: 0 is invalid), privileged
    /// or not, whatever security context the settings give.
    #[test]
    fn every_builder_pod_ends_once_and_at_its_timeout() {
        let (id, key) = (BuildId::random(), key());
        let base: ImageRef = "r.example/b:x".parse().unwrap();
        let own: SecurityContext = serde_json::from_value(serde_json::json!({ "privileged": true })).unwrap();
        for settings in [
            KubernetesConfig::default(),
            KubernetesConfig {
                privileged: true,
                ..Default::default()
            },
            KubernetesConfig {
                security_context: Some(own),
                ..Default::default()
            },
        ] {
            for (timeout, deadline) in [(Duration::from_secs(90), 90), (Duration::from_millis(300), 1)] {
                let mut spec = build(&id, &key, &base, &base);
                spec.timeout = timeout;
                let pod = pod(&spec, &settings).unwrap().spec.unwrap();
                assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
                assert_eq!(pod.active_deadline_seconds, Some(deadline));
            }
        }
    }

    /// Credentials reach the pod only through its Secret: nothing of them is in the spec,
    /// whatever the build is given.
    #[test]
    fn no_credential_is_in_the_pod_spec() {
        let (id, key) = (BuildId::random(), key());
        let base: ImageRef = "r.example/b:x".parse().unwrap();
        let mut spec = build(&id, &key, &base, &base);
        spec.execute_args.extend([
            "--git-credentials".to_owned(),
            format!("{CREDENTIALS_DIR}/{GIT_CREDENTIALS_KEY}"),
            "--pull-secret".to_owned(),
            format!("{CREDENTIALS_DIR}/{DOCKER_CONFIG_KEY}"),
        ]);
        let mut pod = pod(&spec, &KubernetesConfig::default()).unwrap();
        pod.metadata.uid = Some("u-1".into());
        let secret = secret(
            &pod,
            br#"{"auths":{"r.example":{"auth":"c2VjcmV0LXB1c2gtdG9rZW4="}}}"#.to_vec(),
            SecretData::from([(GIT_CREDENTIALS_KEY.to_owned(), b"me:secret-git-password".to_vec())]),
        );
        let text = serde_json::to_string(&pod).unwrap();
        for leak in [
            "secret-git-password",
            "c2VjcmV0LXB1c2gtdG9rZW4=",
            "secret-push-token",
            "auths",
        ] {
            assert!(!text.contains(leak), "{leak} is in the pod spec: {text}");
        }
        // ... and all of them are in the Secret the pod mounts.
        let data = secret.data.unwrap();
        assert_eq!(data[GIT_CREDENTIALS_KEY].0, b"me:secret-git-password");
        assert!(String::from_utf8_lossy(&data[DOCKER_CONFIG_KEY].0).contains("c2VjcmV0LXB1c2gtdG9rZW4="));
        let volumes = pod.spec.unwrap().volumes.unwrap();
        let mounted = volumes.iter().find(|v| v.name == "credentials").unwrap();
        assert_eq!(mounted.secret.as_ref().unwrap().secret_name, secret.metadata.name);
    }

    #[test]
    fn privileged_brings_back_the_old_pod_and_a_security_context_replaces_the_default() {
        let (id, key) = (BuildId::random(), key());
        let base: ImageRef = "r.example/b:x".parse().unwrap();
        let privileged = KubernetesConfig {
            privileged: true,
            ..Default::default()
        };
        let pod_of = |settings: &KubernetesConfig| pod(&build(&id, &key, &base, &base), settings).unwrap();
        let spec = pod_of(&privileged).spec.unwrap();
        assert_eq!(
            spec.host_users, None,
            "privileged pods use the node's user namespace"
        );
        assert_eq!(
            spec.containers[0].security_context,
            Some(SecurityContext {
                privileged: Some(true),
                ..Default::default()
            })
        );

        let own: SecurityContext =
            serde_json::from_value(serde_json::json!({ "capabilities": { "add": ["SYS_ADMIN"] } })).unwrap();
        let replaced = KubernetesConfig {
            security_context: Some(own.clone()),
            ..Default::default()
        };
        let spec = pod_of(&replaced).spec.unwrap();
        assert_eq!(spec.host_users, Some(false));
        assert_eq!(
            spec.containers[0].security_context,
            Some(own),
            "replaced whole, not merged"
        );

        // The template has the last word, hostUsers included.
        let template = KubernetesConfig {
            pod_template: Some(toml::from_str("spec = { hostUsers = true }").unwrap()),
            ..Default::default()
        };
        assert_eq!(pod_of(&template).spec.unwrap().host_users, Some(true));
    }

    #[test]
    fn a_pod_in_its_own_user_namespace_that_never_started_says_what_to_check() {
        let pod = |host_users: Option<bool>, state: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "p" },
                "spec": { "hostUsers": host_users, "containers": [{ "name": "build" }] },
                "status": { "phase": "Failed", "reason": "DeadlineExceeded",
                            "message": "Pod was active on the node longer than the specified deadline",
                            "containerStatuses": [{ "name": "build", "image": "i", "imageID": "",
                                                    "ready": false, "restartCount": 0, "state": state }] },
            }))
            .unwrap()
        };
        let waiting = serde_json::json!({ "waiting": { "reason": "ContainerCreating" } });
        let PodState::Failed { message } = PodState::of(&pod(Some(false), waiting.clone())) else {
            panic!("not failed")
        };
        assert!(
            message.contains("DeadlineExceeded") && message.ends_with(NEVER_STARTED_HINT),
            "{message}"
        );
        // Not for a pod without a user namespace, nor for one whose container ran.
        let PodState::Failed { message } = PodState::of(&pod(None, waiting)) else {
            panic!("not failed")
        };
        assert!(!message.contains("never started"), "{message}");
        let ran = serde_json::json!({ "running": { "startedAt": "2026-01-01T00:00:00Z" } });
        let PodState::Failed { message } = PodState::of(&pod(Some(false), ran)) else {
            panic!("not failed")
        };
        assert!(!message.contains("never started"), "{message}");
    }

    #[test]
    fn the_template_is_a_merge_patch() {
        let (id, key) = (BuildId::random(), key());
        let base: ImageRef = "r.example/b:x".parse().unwrap();
        let settings = KubernetesConfig {
            pod_template: Some(
                toml::from_str(
                    "spec = { priorityClassName = \"builds\", automountServiceAccountToken = true }\n\
                     metadata = { labels = { team = \"a\" } }",
                )
                .unwrap(),
            ),
            ..Default::default()
        };
        let pod = pod(&build(&id, &key, &base, &base), &settings).unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.priority_class_name.as_deref(), Some("builds"));
        assert_eq!(spec.automount_service_account_token, Some(true));
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("a"));
        assert_eq!(labels.get(LABEL_MANAGED_BY).map(String::as_str), Some("kiln"));
    }

    #[test]
    fn the_secret_is_owned_by_its_pod() {
        let (id, key) = (BuildId::random(), key());
        let base: ImageRef = "r.example/b:x".parse().unwrap();
        let mut pod = pod(&build(&id, &key, &base, &base), &KubernetesConfig::default()).unwrap();
        pod.metadata.uid = Some("u-1".into());
        let extra = SecretData::from([
            (GIT_CREDENTIALS_KEY.to_owned(), b"me:pw".to_vec()),
            (build_secret_key("npmrc"), b"token".to_vec()),
        ]);
        let secret = secret(&pod, b"{}".to_vec(), extra);
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "u-1"));
        assert_eq!(secret.metadata.name, pod.metadata.name);
        let data = secret.data.unwrap();
        assert!(data.contains_key(GIT_CREDENTIALS_KEY));
        assert_eq!(data["build-secret-npmrc"].0, b"token");
    }

    #[test]
    fn pod_states_follow_the_build_container() {
        let pod = |status: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({ "metadata": { "name": "p" }, "status": status }))
                .unwrap()
        };
        let waiting = pod(serde_json::json!({ "phase": "Pending", "containerStatuses": [
            { "name": "build", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
              "state": { "waiting": { "reason": "ContainerCreating" } } }] }));
        assert_eq!(PodState::of(&waiting), PodState::Waiting { problem: None });
        let stuck = pod(serde_json::json!({ "phase": "Pending", "containerStatuses": [
            { "name": "build", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
              "state": { "waiting": { "reason": "ImagePullBackOff", "message": "no such image" } } }] }));
        assert_eq!(
            PodState::of(&stuck),
            PodState::Waiting {
                problem: Some("ImagePullBackOff: no such image".into())
            }
        );
        let failed = pod(serde_json::json!({ "phase": "Failed", "containerStatuses": [
            { "name": "build", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
              "state": { "terminated": { "exitCode": 1, "reason": "Error",
                                          "message": "Dockerfile line 3: RUN false exited with code 1\n" } } }] }));
        assert_eq!(
            PodState::of(&failed),
            PodState::Failed {
                message: "Dockerfile line 3: RUN false exited with code 1".into()
            }
        );
        let deadline = pod(
            serde_json::json!({ "phase": "Failed", "reason": "DeadlineExceeded",
                                                "message": "Pod was active on the node longer than the specified deadline" }),
        );
        assert!(
            matches!(PodState::of(&deadline), PodState::Failed { message } if message.contains("DeadlineExceeded"))
        );
        let done = pod(serde_json::json!({ "phase": "Succeeded", "containerStatuses": [
            { "name": "build", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
              "state": { "terminated": { "exitCode": 0 } } }] }));
        assert_eq!(PodState::of(&done), PodState::Succeeded);
    }
}
