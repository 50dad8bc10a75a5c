//! The Kubernetes builder: runs a Dockerfile build as one pod on a cluster, the pod running
//! `kiln execute`, and follows it to its end.
//!
//! The cluster is the coordination point between replicas. The pod's name is derived from
//! the build key, so a create that meets an existing pod (409) joins it: however many
//! replicas are asked for one image, one pod builds it. Pods carry their build's id, key
//! and references, so a replica that starts finds the builds running in the namespace and
//! attaches to them ([`KubernetesBuilder::found_builds`]). Credentials travel in a
//! per-build Secret owned by the pod (the cluster deletes it with the pod), never in the
//! pod spec. A git context is cloned again inside the pod; an uploaded context reaches it
//! through the registry, as a blob named by its digest.
//!
//! Builder pods are unprivileged, in their own user namespace ([`pod`] says why field by
//! field). A pod the API server refuses, or one it created without its user namespace (a
//! cluster with user namespaces off drops `hostUsers` silently), fails the build with the
//! setting to change; the latter is deleted before it starts.

mod logs;
pub mod pod;
mod watch;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use dashmap::DashMap;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    api::{DeleteParams, PostParams, Preconditions},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use pod::{FoundBuild, PodState};

use self::{logs::LogCursor, pod::BuilderPod, watch::PodWatch};
use super::{PreparedContext, Ticket};
use crate::{
    config::{EngineSettings, KubernetesConfig, LayerCompressionSetting},
    engine::{build::BuildInput, context::ContextStore},
    model::{BuildId, BuildKey, ContextSource, GitCredentials, GitSource, GitTarget},
    registry::{RegistryClient, RegistryError},
};

/// Why a build on the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("cannot reach the Kubernetes cluster: {0}")]
    Connect(String),
    #[error("builder pod {pod}: {message}")]
    PodFailed { pod: String, message: String },
    #[error("builder pod {pod} cannot start ({message}); it was deleted")]
    PodStuck { pod: String, message: String },
    #[error("builder pod {pod} was deleted before the build ended")]
    PodDeleted { pod: String },
    #[error("the builder pod cannot be made: {0}")]
    Spec(String),
    /// The API server (validation or an admission plugin such as Pod Security) refused the
    /// pod; `hint` says which Kiln setting is involved, when Kiln can tell.
    #[error("the API server refused builder pod {pod}: {message}{hint}")]
    PodRefused {
        pod: String,
        message: String,
        hint: &'static str,
    },
    #[error(
        "the cluster dropped hostUsers: false from builder pod {pod}, so it would have run with \
         SYS_ADMIN in the node's own user namespace; it was deleted. Pods in their own user \
         namespace need Kubernetes 1.33 or later (or the UserNamespacesSupport feature gate); \
         on a cluster without them set kubernetes.privileged = true"
    )]
    NoUserNamespaces { pod: String },
    #[error("uploaded context {0} is no longer stored on this Kiln; upload it again")]
    ContextGone(crate::model::Digest),
    #[error("handing the uploaded context to the builder pod: {0}")]
    ContextUpload(#[source] RegistryError),
}

/// How a build's log says which pod's log follows: each of these starts a line, after which
/// the build log holds the pod's log line for line.
pub const CREATED: &str = "builder pod";
pub const JOINED: &str = "joined builder pod";
pub const ATTACHED: &str = "attached to builder pod";

/// How many lines of a pod's log the build log `text` holds: the lines after the last line
/// that names the pod being followed (Kiln's own restart notices excepted).
pub fn pod_lines_in(text: &str) -> usize {
    let lines: Vec<&str> = text.split_inclusive('\n').filter(|l| l.ends_with('\n')).collect();
    let Some(start) = lines
        .iter()
        .rposition(|l| [CREATED, JOINED, ATTACHED].iter().any(|m| l.starts_with(m)))
    else {
        return 0;
    };
    lines[start + 1..]
        .iter()
        .filter(|l| !l.starts_with(super::RESTART_NOTICE))
        .count()
}

/// How long a listing waits for the pod watch's first list.
const LIST_PATIENCE: Duration = Duration::from_secs(10);

/// Runs builds as pods. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesBuilder {
    inner: Arc<Inner>,
}

struct Inner {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    namespace: String,
    settings: KubernetesConfig,
    registry: RegistryClient,
    contexts: ContextStore,
    engine: EngineSettings,
    watch: PodWatch,
    /// This replica's name, recorded on the pods it creates.
    replica: String,
    /// Where each running build is in its pod's log, kept across restarts of its actor.
    cursors: DashMap<BuildId, Arc<std::sync::Mutex<LogCursor>>>,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl KubernetesBuilder {
    /// Connects to the cluster `settings` name and starts watching Kiln's pods there. Call
    /// it on the runtime that should drive the watch (it lives as long as the builder).
    pub async fn connect(
        settings: &KubernetesConfig,
        engine: &EngineSettings,
        registry: RegistryClient,
        contexts: ContextStore,
    ) -> Result<Self, ClusterError> {
        let connect = |e: &dyn std::fmt::Display| ClusterError::Connect(e.to_string());
        let config = match &settings.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| connect(&format!("kubernetes.kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| connect(&e))?
            }
            None => kube::Config::infer().await.map_err(|e| connect(&e))?,
        };
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| connect(&e))?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let secrets: Api<Secret> = Api::namespaced(client, &namespace);
        let stop = CancellationToken::new();
        let watch = PodWatch::start(pods.clone(), &namespace, stop.clone());
        let replica = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "kiln".into());
        let builder = Self {
            inner: Arc::new(Inner {
                pods,
                secrets,
                namespace,
                settings: settings.clone(),
                registry,
                contexts,
                engine: engine.clone(),
                watch,
                replica,
                cursors: DashMap::new(),
                stop: stop.clone(),
            }),
        };
        tokio::spawn(builder.clone().sweep_finished(stop));
        Ok(builder)
    }

    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Builds `input` in a pod (creating it, or joining the pod of the same key), passing
    /// its log to `log`. Ok when the image was pushed.
    pub async fn build(
        &self,
        ticket: &Ticket<'_>,
        input: &BuildInput,
        context: &PreparedContext,
        log: &mpsc::UnboundedSender<Bytes>,
    ) -> Result<(), ClusterError> {
        let inner = &self.inner;
        let (args, secret_data) = self.execute_args(input, context).await?;
        let spec = BuilderPod {
            id: ticket.id,
            key: ticket.key,
            base: &input.destination,
            workspace: ticket.workspace,
            timeout: ticket.timeout,
            execute_args: args,
            created_by: &inner.replica,
        };
        let wanted = pod::pod(&spec, &inner.settings).map_err(ClusterError::Spec)?;
        let name = pod::pod_name(ticket.key);
        let images: Vec<_> = input.pinned.values().collect();
        let docker_config = inner
            .registry
            .docker_config(&[&input.destination], &images, &input.auth);
        let line = |text: String| {
            let _ = log.send(Bytes::from(text + "\n"));
        };
        let pod = self.create_or_join(&wanted, ticket.id).await?;
        let created = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kiln.dev/build-id"))
            == Some(&ticket.id.to_string());
        line(match created {
            true => format!("{CREATED} {name} in namespace {}", inner.namespace),
            false => format!(
                "{JOINED} {name} in namespace {} (it builds the same image)",
                inner.namespace
            ),
        });
        // Joining replicas write the Secret too: its creator may have died between the two
        // calls, and a pod without its Secret never starts.
        let secret = pod::secret(&pod, docker_config, secret_data);
        match inner.secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        self.follow(ticket.id, &name, log).await
    }

    /// Follows the pod of a build found in the cluster (started by another replica or an
    /// earlier life of this one) to its end. The build's log already holds the first
    /// `logged_lines` lines of the pod's log (from that earlier life); they are not repeated.
    pub async fn attach(
        &self,
        build: &BuildId,
        pod: &str,
        logged_lines: usize,
        log: &mpsc::UnboundedSender<Bytes>,
    ) -> Result<(), ClusterError> {
        if !self.inner.cursors.contains_key(build) {
            let _ = log.send(Bytes::from(format!(
                "{ATTACHED} {pod} in namespace {}\n",
                self.inner.namespace
            )));
            self.inner.cursors.insert(
                build.clone(),
                Arc::new(std::sync::Mutex::new(LogCursor::after_lines(logged_lines))),
            );
        }
        self.follow(build, pod, log).await
    }

    /// Deletes the pod of `key` and its Secret (a cancelled or timed-out build).
    pub async fn abort(&self, build: &BuildId, key: &BuildKey) -> Result<(), ClusterError> {
        self.inner.cursors.remove(build);
        self.delete(&pod::pod_name(key), None).await
    }

    /// Every Kiln build whose pod is in the namespace, once the first list has been seen
    /// (or what is known after [`LIST_PATIENCE`] of an unreachable API server).
    pub async fn found_builds(&self) -> Vec<FoundBuild> {
        if tokio::time::timeout(LIST_PATIENCE, self.inner.watch.ready())
            .await
            .is_err()
        {
            tracing::warn!("the builder pod watch has not listed the namespace yet");
        }
        self.inner
            .watch
            .all()
            .iter()
            .filter_map(|p| pod::found_build(p))
            .collect()
    }

    async fn delete(&self, name: &str, uid: Option<String>) -> Result<(), ClusterError> {
        let params = DeleteParams {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        let gone = |r: Result<_, kube::Error>| match r {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(ClusterError::Api(e)),
        };
        gone(self.inner.pods.delete(name, &params).await.map(|_| ()))?;
        // The cluster deletes the Secret with its owner; deleting it here as well makes it
        // go now rather than whenever the garbage collector runs.
        gone(
            self.inner
                .secrets
                .delete(name, &DeleteParams::background())
                .await
                .map(|_| ()),
        )
    }

    /// Creates the pod, or joins the existing pod of the same key. A finished pod of an
    /// earlier build of the key (a failed one, or one kept after a forced rebuild) is
    /// replaced, not joined.
    async fn create_or_join(&self, wanted: &Pod, id: &BuildId) -> Result<Pod, ClusterError> {
        let pods = &self.inner.pods;
        let name = wanted.metadata.name.clone().unwrap_or_default();
        for _ in 0..10 {
            match pods.create(&PostParams::default(), wanted).await {
                Ok(pod) => return self.in_own_user_namespace(wanted, pod).await,
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(kube::Error::Api(s))
                    if s.code == 422 || (s.code == 403 && s.message.contains("PodSecurity")) =>
                {
                    return Err(ClusterError::PodRefused {
                        pod: name,
                        hint: refusal_hint(&s.message),
                        message: s.message,
                    })
                }
                Err(e) => return Err(e.into()),
            }
            let existing = match pods.get_opt(&name).await? {
                Some(pod) => pod,
                None => continue,
            };
            let ours = existing
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kiln.dev/build-id"))
                == Some(&id.to_string());
            let being_deleted = existing.metadata.deletion_timestamp.is_some();
            // Joined as it is: a pod of another replica (during a rolling upgrade, one made
            // with other settings) is that replica's build; deleting it would fail both.
            if !being_deleted && (ours || !PodState::of(&existing).is_terminal()) {
                return Ok(existing);
            }
            if !being_deleted {
                self.delete(&name, existing.metadata.uid.clone()).await?;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(ClusterError::Spec(format!(
            "pod {name} keeps existing: an earlier build's pod is not going away"
        )))
    }

    /// `pod` as just created when it has the user namespace `wanted` asks for. An API
    /// server with user namespaces off drops `hostUsers: false` without an error; such a pod
    /// would get the default capabilities (`SYS_ADMIN` among them) in the node's user
    /// namespace, so it is deleted before its container can start (it waits for its Secret,
    /// which is written only after this).
    async fn in_own_user_namespace(&self, wanted: &Pod, pod: Pod) -> Result<Pod, ClusterError> {
        let host_users = |p: &Pod| p.spec.as_ref().and_then(|s| s.host_users);
        if host_users(wanted) != Some(false) || host_users(&pod) == Some(false) {
            return Ok(pod);
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.delete(&name, pod.metadata.uid.clone()).await?;
        Err(ClusterError::NoUserNamespaces { pod: name })
    }

    /// Waits for `pod` to end while passing its log on; Ok when its container exited 0.
    async fn follow(
        &self,
        build: &BuildId,
        pod: &str,
        log: &mpsc::UnboundedSender<Bytes>,
    ) -> Result<(), ClusterError> {
        let inner = &self.inner;
        let cursor = inner.cursors.entry(build.clone()).or_default().clone();
        let follow = logs::follow(&inner.pods, pod, &inner.watch, &cursor, log);
        tokio::pin!(follow);
        let end = tokio::select! {
            end = self.wait_for_end(pod) => end,
            () = &mut follow => self.wait_for_end(pod).await,
        };
        // At the end the whole log is on the node; give the follower time to read its last
        // lines (it stops by itself once it has).
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut follow).await;
        inner.cursors.remove(build);
        end
    }

    /// Waits until `pod` has ended: Ok when its build container exited 0.
    async fn wait_for_end(&self, pod: &str) -> Result<(), ClusterError> {
        let watch = &self.inner.watch;
        let mut changes = watch.changes();
        let mut seen = false;
        watch.ready().await;
        loop {
            match watch.get(pod).map(|p| PodState::of(&p)) {
                Some(PodState::Succeeded) => return Ok(()),
                Some(PodState::Failed { message }) => {
                    return Err(ClusterError::PodFailed {
                        pod: pod.into(),
                        message,
                    })
                }
                Some(PodState::Waiting {
                    problem: Some(message),
                }) => {
                    return Err(ClusterError::PodFailed {
                        pod: pod.into(),
                        message,
                    })
                }
                Some(_) => seen = true,
                None if seen => return Err(ClusterError::PodDeleted { pod: pod.into() }),
                // Created but not in the watch's view yet.
                None => {}
            }
            if changes.changed().await.is_err() {
                return Err(ClusterError::Connect("the pod watch stopped".into()));
            }
        }
    }

    /// The arguments of `kiln execute` for `input`, and what the build's Secret holds
    /// besides the docker config (git credentials, build secrets), which the arguments name
    /// by their path in the pod.
    async fn execute_args(
        &self,
        input: &BuildInput,
        context: &PreparedContext,
    ) -> Result<(Vec<String>, pod::SecretData), ClusterError> {
        let engine = &self.inner.engine;
        let mut args: Vec<String> = Vec::new();
        let mut flag = |name: &str, value: String| {
            args.push(format!("--{name}"));
            args.push(value);
        };
        flag("destination", input.destination.to_string());
        let platforms: Vec<String> = input.platforms.iter().map(ToString::to_string).collect();
        flag(
            "platform",
            match platforms.as_slice() {
                [] => self.inner.registry.platform().to_string(),
                list => list.join(","),
            },
        );
        flag(
            "compression",
            match engine.compression {
                LayerCompressionSetting::Gzip => "gzip",
                LayerCompressionSetting::Zstd => "zstd",
            }
            .into(),
        );
        if let Some(level) = engine.compression_level {
            flag("compression-level", level.to_string());
        }
        flag("network", engine.network.as_str().into());
        flag("id-range", engine.id_range.clone());
        flag("allow-host-network", engine.allow_host_network.to_string());
        flag("no-new-privileges", engine.no_new_privileges.to_string());
        flag(
            "allow-private-add-urls",
            engine.allow_private_add_urls.to_string(),
        );
        flag("max-remote-add-bytes", engine.max_remote_add_bytes.to_string());
        for address in &engine.allowed_add_url_addresses {
            flag("allowed-add-url-address", address.to_string());
        }
        flag(
            "pull-secret",
            format!("{}/{}", pod::CREDENTIALS_DIR, pod::DOCKER_CONFIG_KEY),
        );
        flag("termination-log", pod::TERMINATION_LOG.into());
        for host in self.inner.registry.insecure_registries() {
            flag("insecure-registry", host.clone());
        }
        for (name, value) in &input.build_args {
            flag("build-arg", format!("{name}={value}"));
        }
        if let Some(target) = &input.target {
            flag("target", target.clone());
        }
        for (name, image) in &input.pinned {
            flag("pin", format!("{name}={image}"));
        }
        let mut secret_data = pod::SecretData::new();
        for id in input.secrets.ids() {
            let key = pod::build_secret_key(id);
            flag("secret", format!("id={id},src={}/{key}", pod::CREDENTIALS_DIR));
            secret_data.insert(key, input.secrets.expose(id).unwrap_or_default().to_vec());
        }
        match &context.origin {
            ContextSource::Git(git) => {
                let GitSource {
                    remote_uri,
                    target,
                    credentials,
                    custom_config,
                    ..
                } = git;
                flag("git", remote_uri.clone());
                match target {
                    GitTarget::Commit(rev) | GitTarget::RemoteBranch(rev) => flag("rev", rev.clone()),
                    GitTarget::RemoteHead | GitTarget::LocalBranch(_) => {}
                }
                for (key, value) in custom_config {
                    flag("git-config", format!("{key}={value}"));
                }
                if let Some(GitCredentials::Basic { user, password }) = credentials {
                    secret_data.insert(
                        pod::GIT_CREDENTIALS_KEY.to_owned(),
                        format!("{user}:{}", password.expose()).into_bytes(),
                    );
                    flag(
                        "git-credentials",
                        format!("{}/{}", pod::CREDENTIALS_DIR, pod::GIT_CREDENTIALS_KEY),
                    );
                }
            }
            ContextSource::Uploaded(digest) => {
                let path = self
                    .inner
                    .contexts
                    .path(digest)
                    .ok_or_else(|| ClusterError::ContextGone(digest.clone()))?;
                let repo = &input.destination;
                self.inner
                    .registry
                    .push_blob_file(repo, digest, &path, None, &input.auth)
                    .await
                    .map_err(ClusterError::ContextUpload)?;
                flag(
                    "context-blob",
                    format!("{}/{}@{digest}", repo.registry(), repo.repository()),
                );
            }
        }
        if !context.context_path.is_empty() {
            flag("context-path", context.context_path.clone());
        }
        flag("dockerfile", context.dockerfile_path.clone());
        Ok((args, secret_data))
    }

    /// Deletes finished builder pods (and their Secrets) older than `kubernetes.retention`,
    /// until `stop`. Every replica does this; deleting twice is harmless.
    async fn sweep_finished(self, stop: CancellationToken) {
        let retention = self.inner.settings.retention;
        let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            let now = k8s_openapi::jiff::Timestamp::now();
            for pod in self.inner.watch.all() {
                let Some(finished) = finished_at(&pod) else {
                    continue;
                };
                let age = now.duration_since(finished);
                if age.as_secs() < retention.as_secs() as i64 {
                    continue;
                }
                let name = pod.metadata.name.clone().unwrap_or_default();
                match self.delete(&name, pod.metadata.uid.clone()).await {
                    Ok(()) => tracing::info!(pod = %name, "finished builder pod removed after its retention"),
                    Err(error) => tracing::warn!(pod = %name, %error, "cannot remove a finished builder pod"),
                }
            }
        }
    }
}

/// What to do about a refused builder pod, from the API server's message.
fn refusal_hint(message: &str) -> &'static str {
    if message.contains("PodSecurity") {
        // Builder pods add SYS_ADMIN, unconfined AppArmor and an unmasked /proc: only the
        // `privileged` Pod Security level admits them (README.md, "Deploying on Kubernetes").
        " (builder pods need the namespace's Pod Security level to be privileged: label it \
         pod-security.kubernetes.io/enforce=privileged)"
    } else if ["hostUsers", "procMount", "Unmasked", "appArmorProfile"]
        .iter()
        .any(|field| message.contains(field))
    {
        // A cluster without user namespaces for pods (before Kubernetes 1.33 the feature gate
        // is off and the API server drops hostUsers, then refuses procMount: Unmasked).
        " (builder pods run in their own user namespace, hostUsers: false, which needs \
         Kubernetes 1.33 or later; on older clusters set kubernetes.privileged = true)"
    } else {
        ""
    }
}

/// When a builder pod's container ended, if it has.
fn finished_at(pod: &Pod) -> Option<k8s_openapi::jiff::Timestamp> {
    let status = pod.status.as_ref()?;
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref());
    match terminated {
        Some(t) => t.finished_at.as_ref().map(|t| t.0),
        // A pod that failed without its container running (e.g. deadline exceeded).
        None if PodState::of(pod).is_terminal() => pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_lines_of_a_build_log_are_counted_after_the_last_pod_line() {
        let log = "build 1 of r\nbase image b\nbuilder pod p in namespace kiln\none\ntwo\n\
                   build actor restarted (incarnation 2); resuming\nthree\npartial";
        assert_eq!(pod_lines_in(log), 3);
        assert_eq!(pod_lines_in("build 1 of r\nbase image b\n"), 0);
        let again = format!("{log}\n{ATTACHED} p in namespace kiln\none\n");
        assert_eq!(pod_lines_in(&again), 1);
    }

    #[test]
    fn a_refused_pod_names_the_setting_to_change() {
        let psa = "pods \"kiln-build-x\" is forbidden: violates PodSecurity \"baseline:latest\": \
                   non-default capabilities (container \"build\" must not include \"SYS_ADMIN\")";
        assert!(refusal_hint(psa).contains("pod-security.kubernetes.io/enforce=privileged"));
        let old_cluster = "Pod \"kiln-build-x\" is invalid: spec.containers[0].securityContext.procMount: \
                           Invalid value: \"Unmasked\": `hostUsers` must be false to use `Unmasked`";
        assert!(refusal_hint(old_cluster).contains("kubernetes.privileged = true"));
        assert_eq!(
            refusal_hint("Pod \"x\" is invalid: spec.containers[0].image: Required value"),
            ""
        );
    }
}
