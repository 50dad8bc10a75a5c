//! The node's image service: before a container starts, the kubelet makes sure its `image`
//! exists in the registry it names, following `imagePullPolicy`, and reports a missing one
//! as a real kubelet does — waiting reason `ErrImagePull` with the runtime's message, then
//! `ImagePullBackOff` while it backs off (10 s doubling to 5 min), the pod staying Pending
//! (<https://kubernetes.io/docs/concepts/containers/images/#imagepullbackoff>).
//!
//! What "pulling" checks: the manifest, by `HEAD /v2/<repository>/manifests/<tag or digest>`
//! against the registry (OCI distribution spec, "Checking if content exists in the
//! registry"). What it does not: unpack the image and run its files. The container's
//! command still runs the host's binaries (`FakeKubeOptions::container_path`, the `kiln`
//! under test first): unpacking Kiln's own image — a debug binary over 100 MB, pushed to
//! every test's registry — would cost more than it tells, so the image is checked to
//! exist where the pod says and the binary under test stands in for its content.
//!
//! The fake node has no network: it reaches loopback registries (`127.0.0.1:PORT`,
//! `localhost:PORT`, plain HTTP as containerd and Docker allow for them), and other
//! registries only through [`super::FakeKubeOptions::registry_mirrors`] — the node's
//! registry mirrors, as containerd's `hosts.toml` configures them
//! (<https://github.com/containerd/containerd/blob/main/docs/hosts.md>), so that a test can
//! serve Kiln's default `ghcr.io/kiln-build/kiln:<version>` from a registry it started.

use std::{sync::atomic::Ordering, time::Duration};

use serde_json::{json, Value};

use super::{
    kubelet::{Interrupt, Life, PodRuntime},
    Shared,
};

/// An image reference as the runtime normalizes it (`ParseNormalizedNamed` in
/// `github.com/distribution/reference`): `busybox` is `docker.io/library/busybox:latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    /// `docker.io`, `ghcr.io`, `127.0.0.1:5000`, ...
    pub registry: String,
    pub repository: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl ImageName {
    pub fn parse(image: &str) -> Option<Self> {
        if image.is_empty() || image.contains(char::is_whitespace) {
            return None;
        }
        let (name, digest) = match image.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (image, None),
        };
        let (first, rest) = match name.split_once('/') {
            Some((f, r)) if f.contains(['.', ':']) || f == "localhost" => (f.to_owned(), r.to_owned()),
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        // A tag is after the last ':' of the last path component.
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_owned(), Some(t.to_owned())),
            _ => (rest, None),
        };
        let repository = if first == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty() || repository.chars().any(|c| c.is_ascii_uppercase()) {
            return None;
        }
        let reference = match (digest, tag) {
            (Some(d), _) => d.to_owned(),
            (None, Some(t)) => t,
            (None, None) => "latest".to_owned(),
        };
        Some(Self {
            registry: first,
            repository,
            reference,
        })
    }

    /// `registry/repository:tag` or `registry/repository@digest`.
    pub fn full(&self) -> String {
        let sep = if self.reference.contains(':') { '@' } else { ':' };
        format!("{}/{}{sep}{}", self.registry, self.repository, self.reference)
    }
}

/// The `imagePullPolicy` the API server defaults: `Always` for `:latest` or no tag,
/// `IfNotPresent` otherwise
/// (<https://kubernetes.io/docs/concepts/containers/images/#imagepullpolicy-defaulting>).
pub(crate) fn default_pull_policy(image: &str) -> &'static str {
    match ImageName::parse(image) {
        Some(name) if name.reference == "latest" && !image.contains('@') => "Always",
        _ => "IfNotPresent",
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// Checks that the manifest exists in its registry; the error is containerd's message.
async fn resolve(shared: &Shared, name: &ImageName) -> Result<(), String> {
    let full = name.full();
    let failed = |why: String| {
        format!("failed to pull and unpack image \"{full}\": failed to resolve reference \"{full}\": {why}")
    };
    let mirror = shared.options.registry_mirrors.get(&name.registry).cloned();
    let Some(host) = mirror.or_else(|| is_loopback(&name.registry).then(|| name.registry.clone())) else {
        return Err(failed(format!(
            "failed to do request: Head \"https://{}/v2/{}/manifests/{}\": dial tcp: lookup {}: no such host",
            name.registry,
            name.repository,
            name.reference,
            name.registry
                .rsplit_once(':')
                .map_or(name.registry.as_str(), |(h, _)| h)
        )));
    };
    let url = format!(
        "http://{host}/v2/{}/manifests/{}",
        name.repository, name.reference
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let response = client
        .head(&url)
        .header(
            "Accept",
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
             application/vnd.docker.distribution.manifest.list.v2+json, \
             application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .map_err(|e| failed(format!("failed to do request: Head \"{url}\": {e}")))?;
    match response.status().as_u16() {
        200 => Ok(()),
        404 => Err(failed(format!("{full}: not found"))),
        401 | 403 => Err(failed(
            "pull access denied, repository does not exist or may require authorization: \
             server message: insufficient_scope: authorization failed"
                .into(),
        )),
        code => Err(failed(format!(
            "unexpected status from HEAD request to {url}: {code}"
        ))),
    }
}

/// Makes sure the container's image is on the node before it starts, as `EnsureImageExists`
/// (`pkg/kubelet/images/image_manager.go`) does; an interrupt (deletion, deadline,
/// shutdown) while waiting is returned.
pub(super) async fn pull(
    shared: &Shared,
    runtime: &PodRuntime,
    container: &Value,
    life: &mut Life,
    restart_count: u32,
    last_state: &Value,
) -> Result<(), Interrupt> {
    let image = container["image"].as_str().unwrap_or("");
    let policy = container["imagePullPolicy"]
        .as_str()
        .unwrap_or_else(|| default_pull_policy(image));
    let waiting = |reason: &str, message: &str| {
        let state = json!({"waiting": {"reason": reason, "message": message}});
        runtime.set_container_state(shared, container, state, restart_count, last_state);
    };
    let Some(name) = ImageName::parse(image) else {
        waiting(
            "InvalidImageName",
            &format!("Failed to apply default image tag {image:?}: couldn't parse image name {image:?}: invalid reference format"),
        );
        return Err(life.interrupted().await);
    };
    let present = shared.images.lock().unwrap().contains(&name.full());
    match policy {
        "Never" if !present => {
            waiting(
                "ErrImageNeverPull",
                &format!("Container image {image:?} is not present with pull policy of Never"),
            );
            return Err(life.interrupted().await);
        }
        "Never" | "IfNotPresent" if present => return Ok(()),
        _ => {}
    }
    let mut back_off = shared.options.image_pull_back_off;
    loop {
        shared.image_pulls.fetch_add(1, Ordering::SeqCst);
        let error = match resolve(shared, &name).await {
            Ok(()) => {
                shared.images.lock().unwrap().insert(name.full());
                return Ok(());
            }
            Err(error) => error,
        };
        waiting("ErrImagePull", &error);
        // The next sync reports the back-off, with the last error since Kubernetes 1.31.
        if let Some(interrupt) = life.sleep(shared.options.pending_delay).await {
            return Err(interrupt);
        }
        waiting(
            "ImagePullBackOff",
            &format!("Back-off pulling image {image:?}: ErrImagePull: {error}"),
        );
        if let Some(interrupt) = life.sleep(back_off).await {
            return Err(interrupt);
        }
        back_off = (back_off * 2).min(Duration::from_secs(300));
    }
}
