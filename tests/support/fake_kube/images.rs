//! The node's image service: before a container starts, the kubelet makes sure its `image`
//! exists in the registry it names, following `imagePullPolicy`, and reports a missing one
//! as a real kubelet does — waiting reason `ErrImagePull` with the runtime's message, then
//! `ImagePullBackOff` while it backs off (10 s doubling to 5 min), the pod staying Pending
//! (<https://kubernetes.io/docs/concepts/containers/images/#imagepullbackoff>).
//!
//! Pulling is what containerd does for the kubelet: the manifest (an index resolved to its
//! `linux/amd64` entry), the config and every layer are fetched from the registry (OCI
//! distribution spec), each checked against its digest, and the layers unpacked in order
//! (plain, gzip or zstd tar; `.wh.` whiteouts and opaque directories applied) into the node's
//! image store, once per manifest digest. The container then runs the image's own files:
//! its command (or the image's `Entrypoint`/`Cmd`) is looked up in the unpacked root file
//! system (see [`PulledImage::executable`]), so a builder pod runs the Kiln binary the image
//! carries (`support::builder_image`), never the host's.
//!
//! The fake node has no network: it reaches loopback registries (`127.0.0.1:PORT`,
//! `localhost:PORT`, plain HTTP as containerd and Docker allow for them), and other
//! registries only through [`super::FakeKubeOptions::registry_mirrors`] — the node's
//! registry mirrors, as containerd's `hosts.toml` configures them
//! (<https://github.com/containerd/containerd/blob/main/docs/hosts.md>), so that a test can
//! serve Kiln's default `ghcr.io/kiln-build/kiln:<version>` from a registry it started.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

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

/// An image on the node: its unpacked root file system and what the runtime reads from its
/// config.
#[derive(Debug)]
pub struct PulledImage {
    pub rootfs: PathBuf,
    /// `Env`, `Entrypoint`, `Cmd` and `WorkingDir` of the image config.
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
}

impl PulledImage {
    /// The image's `PATH` (its `Env`), or the runtime's default.
    pub fn path(&self) -> &str {
        self.env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    }

    /// The host path of `program` in the image as an exec in the container finds it: a name
    /// with a `/` as is (relative to `working_dir`), any other through `path`'s directories;
    /// symbolic links followed inside the root file system, an absolute target from its
    /// root. `None` when no such executable file is in the image.
    pub fn executable(&self, program: &str, path: &str, working_dir: &str) -> Option<PathBuf> {
        let candidates: Vec<String> = if program.contains('/') {
            let absolute = if program.starts_with('/') {
                program.to_owned()
            } else {
                format!("{}/{program}", working_dir.trim_end_matches('/'))
            };
            vec![absolute]
        } else {
            path.split(':')
                .filter(|d| d.starts_with('/'))
                .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
                .collect()
        };
        candidates.iter().find_map(|c| {
            let host = self.resolve_in_root(c)?;
            let meta = std::fs::metadata(&host).ok()?;
            (meta.is_file() && std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0)
                .then_some(host)
        })
    }

    /// `path` (absolute, in the image) on the host, every symbolic link on the way resolved
    /// inside the root file system; `..` never climbs above it.
    fn resolve_in_root(&self, path: &str) -> Option<PathBuf> {
        let mut pending: Vec<String> = path
            .split('/')
            .rev()
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        let mut resolved: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(component) = pending.pop() {
            match component.as_str() {
                "." => continue,
                ".." => {
                    resolved.pop();
                    continue;
                }
                _ => {}
            }
            let host = resolved
                .iter()
                .fold(self.rootfs.clone(), |p, c| p.join(c))
                .join(&component);
            match std::fs::symlink_metadata(&host) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return None; // ELOOP
                    }
                    let target = std::fs::read_link(&host).ok()?;
                    let target = target.to_str()?;
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    pending.extend(
                        target
                            .split('/')
                            .rev()
                            .filter(|c| !c.is_empty())
                            .map(str::to_owned),
                    );
                }
                Ok(_) => resolved.push(component),
                Err(_) => return None,
            }
        }
        Some(resolved.iter().fold(self.rootfs.clone(), |p, c| p.join(c)))
    }
}

const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Fetches the image from `host` (the registry or its mirror) and unpacks it into the node's
/// image store, unless that manifest is there already.
async fn fetch(shared: &Shared, name: &ImageName, host: &str) -> Result<PulledImage, String> {
    let full = name.full();
    let failed = |why: String| format!("failed to pull and unpack image \"{full}\": {why}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let get = |path: String| {
        let client = client.clone();
        let url = format!("http://{host}/v2/{}/{path}", name.repository);
        async move {
            let response = client
                .get(&url)
                .header("Accept", MANIFEST_TYPES)
                .send()
                .await
                .map_err(|e| format!("failed to do request: GET \"{url}\": {e}"))?;
            if !response.status().is_success() {
                return Err(format!(
                    "unexpected status from GET request to {url}: {}",
                    response.status().as_u16()
                ));
            }
            response
                .bytes()
                .await
                .map(|b| b.to_vec())
                .map_err(|e| format!("reading {url}: {e}"))
        }
    };
    let checked = |bytes: Vec<u8>, digest: &str| {
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if actual == digest {
            Ok(bytes)
        } else {
            Err(format!("failed commit on ref \"{digest}\": unexpected commit digest {actual}, expected {digest}: failed precondition"))
        }
    };
    let mut manifest_bytes = get(format!("manifests/{}", name.reference))
        .await
        .map_err(failed)?;
    let mut manifest: Value = serde_json::from_slice(&manifest_bytes).map_err(|e| failed(e.to_string()))?;
    if manifest["manifests"].is_array() {
        let entry = manifest["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
            .cloned()
            .ok_or_else(|| failed("no match for platform in manifest: not found".into()))?;
        let digest = entry["digest"].as_str().unwrap_or_default().to_owned();
        manifest_bytes =
            checked(get(format!("manifests/{digest}")).await.map_err(failed)?, &digest).map_err(failed)?;
        manifest = serde_json::from_slice(&manifest_bytes).map_err(|e| failed(e.to_string()))?;
    }
    let manifest_digest = hex::encode(Sha256::digest(&manifest_bytes));
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let config_bytes = checked(
        get(format!("blobs/{config_digest}")).await.map_err(failed)?,
        &config_digest,
    )
    .map_err(failed)?;
    let config: Value = serde_json::from_slice(&config_bytes).map_err(|e| failed(e.to_string()))?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let image_dir = shared.images_dir.join(&manifest_digest);
    let rootfs = image_dir.join("rootfs");
    if !image_dir.exists() {
        // Unpacked aside and renamed into place: an image in the store is always whole.
        let unpacking = shared.images_dir.join(format!("{manifest_digest}.unpacking"));
        let _ = std::fs::remove_dir_all(&unpacking);
        std::fs::create_dir_all(unpacking.join("rootfs")).map_err(|e| failed(e.to_string()))?;
        for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
            let digest = layer["digest"].as_str().unwrap_or_default().to_owned();
            let media_type = layer["mediaType"].as_str().unwrap_or_default().to_owned();
            let bytes =
                checked(get(format!("blobs/{digest}")).await.map_err(failed)?, &digest).map_err(failed)?;
            let root = unpacking.join("rootfs");
            tokio::task::spawn_blocking(move || unpack_layer(&bytes, &media_type, &root))
                .await
                .expect("unpacking")
                .map_err(|e| failed(format!("failed to extract layer {digest}: {e}")))?;
        }
        std::fs::rename(&unpacking, &image_dir).map_err(|e| failed(e.to_string()))?;
    }
    Ok(PulledImage {
        rootfs,
        env: strings(&config["config"]["Env"]),
        entrypoint: strings(&config["config"]["Entrypoint"]),
        cmd: strings(&config["config"]["Cmd"]),
        working_dir: config["config"]["WorkingDir"].as_str().unwrap_or("").to_owned(),
    })
}

/// Unpacks one layer over `root`, applying its whiteouts (OCI image spec, "Representing
/// Changes": `.wh.NAME` removes NAME, `.wh..wh..opq` empties its directory).
fn unpack_layer(bytes: &[u8], media_type: &str, root: &Path) -> std::io::Result<()> {
    let reader: Box<dyn Read> = if media_type.ends_with("gzip") {
        Box::new(flate2::read::GzDecoder::new(bytes))
    } else if media_type.ends_with("zstd") {
        Box::new(zstd::stream::read::Decoder::new(bytes)?)
    } else {
        Box::new(bytes)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
        {
            return Err(std::io::Error::other(format!(
                "{}: a path outside the layer",
                path.display()
            )));
        }
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            let dir = root.join(path.parent().unwrap_or(Path::new("")));
            if hidden == ".wh..opq" {
                for child in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let _ =
                        std::fs::remove_dir_all(child.path()).or_else(|_| std::fs::remove_file(child.path()));
                }
            } else {
                let victim = dir.join(hidden);
                let _ = std::fs::remove_dir_all(&victim).or_else(|_| std::fs::remove_file(&victim));
            }
            continue;
        }
        entry.unpack_in(root).map_err(|e| {
            // The tar crate's error names the path; its cause says why.
            let cause = std::error::Error::source(&e)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            std::io::Error::new(e.kind(), format!("{e}{cause}"))
        })?;
    }
    Ok(())
}

/// Checks that the manifest exists in its registry (returning the host to pull from); the
/// error is containerd's message.
async fn resolve(shared: &Shared, name: &ImageName) -> Result<String, String> {
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
        200 => Ok(host),
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
/// (`pkg/kubelet/images/image_manager.go`) does, and returns it; an interrupt (deletion,
/// deadline, shutdown) while waiting is returned.
pub(super) async fn pull(
    shared: &Shared,
    runtime: &PodRuntime,
    container: &Value,
    life: &mut Life,
    restart_count: u32,
    last_state: &Value,
) -> Result<Arc<PulledImage>, Interrupt> {
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
    let present = shared.images.lock().unwrap().get(&name.full()).cloned();
    match policy {
        "Never" if present.is_none() => {
            waiting(
                "ErrImageNeverPull",
                &format!("Container image {image:?} is not present with pull policy of Never"),
            );
            return Err(life.interrupted().await);
        }
        "Never" | "IfNotPresent" if present.is_some() => return Ok(present.unwrap()),
        _ => {}
    }
    let mut back_off = shared.options.image_pull_back_off;
    loop {
        shared.image_pulls.fetch_add(1, Ordering::SeqCst);
        let pulled = match resolve(shared, &name).await {
            Ok(host) => {
                // The kubelet pulls one image at a time unless told otherwise
                // (`serializeImagePulls`, <https://kubernetes.io/docs/concepts/containers/images/#serial-and-parallel-image-pulls>).
                let _serial = shared.pulling.lock().await;
                fetch(shared, &name, &host).await
            }
            Err(error) => Err(error),
        };
        let error = match pulled {
            Ok(image) => {
                let image = Arc::new(image);
                shared.images.lock().unwrap().insert(name.full(), image.clone());
                return Ok(image);
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
