//! The builder Pod and its Secret exactly as Kiln asks the API server for them: pure
//! functions of one build and the `[kubernetes]` settings, and the reverse — what a pod
//! found in the cluster says about its build.
//!
//! The pod name is derived from the build key, so every replica that is asked for the same
//! image asks for the same pod, and the API server's 409 is the cross-replica de-duplication.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{
        Container, EmptyDirVolumeSource, EnvVar, Pod, PodSpec, Secret, SecretVolumeSource, SecurityContext,
        Volume, VolumeMount,
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
        env: Some(vec![EnvVar {
            name: "KILN_EXECUTE_DATA_DIR".into(),
            value: Some(DATA_DIR.into()),
            ..Default::default()
        }]),
        resources: settings.resources.clone(),
        security_context: Some(settings.security_context.clone().unwrap_or(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        })),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(vec![
            mount("work", DATA_DIR, false),
            mount("run", "/var/run/kiln", false),
            mount("credentials", CREDENTIALS_DIR, true),
        ]),
        ..Default::default()
    };
    let spec = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".into()),
        service_account_name: Some(settings.service_account.clone()),
        automount_service_account_token: Some(false),
        // The cluster ends the pod even when no replica is left to enforce the timeout.
        active_deadline_seconds: Some(build.timeout.as_secs().max(1) as i64),
        node_selector: (!settings.node_selector.is_empty()).then(|| settings.node_selector.clone()),
        tolerations: (!settings.tolerations.is_empty()).then(|| settings.tolerations.clone()),
        volumes: Some(vec![
            empty_dir("work"),
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

/// The Secret holding a build's credentials, owned by its pod so the cluster deletes it
/// with the pod.
pub fn secret(pod: &Pod, docker_config: Vec<u8>, git_credentials: Option<String>) -> Secret {
    let mut data = BTreeMap::from([(DOCKER_CONFIG_KEY.to_owned(), ByteString(docker_config))]);
    if let Some(git) = git_credentials {
        data.insert(GIT_CREDENTIALS_KEY.to_owned(), ByteString(git.into_bytes()));
    }
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
                let message = match (&status.reason, &status.message) {
                    (Some(r), Some(m)) => format!("builder pod failed: {r}: {m}"),
                    (Some(r), None) => format!("builder pod failed: {r}"),
                    (None, Some(m)) => format!("builder pod failed: {m}"),
                    (None, None) => "builder pod failed".to_owned(),
                };
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
        assert_eq!(
            container.security_context.as_ref().unwrap().privileged,
            Some(true)
        );
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
        let secret = secret(&pod, b"{}".to_vec(), Some("me:pw".into()));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "u-1"));
        assert_eq!(secret.metadata.name, pod.metadata.name);
        assert!(secret.data.unwrap().contains_key(GIT_CREDENTIALS_KEY));
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
