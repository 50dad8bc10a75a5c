//! The registry primitives the Dockerfile engine uses (`fetch_image`, `pull_blob_to_file`,
//! `blob_exists`, `push_blob_file`, `push_blob_bytes`, `transfer_blob`,
//! `push_manifest_bytes`), each scenario against both the embedded registry (in-process) and
//! Debian's docker-registry, plus scripted peers for a registry that lies about a blob.
//!
//! Fixtures are pushed with oci-client directly (`support::images`, [`seed_blob`]), not with
//! the code under test.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use kiln::{
    engine::image::{Descriptor, ImageConfig, Manifest, OCI_CONFIG, OCI_MANIFEST},
    model::{AuthPolicy, BasicCredentials, Digest, ImageRef, InstallationCredentialScope, Secret},
    registry::{
        BlobPush, ClientConfig, CredentialStore, Platform, RegistryClient, RegistryError, RegistryErrorKind,
    },
};
use oci_client::{
    client::{ClientConfig as OciConfig, ClientProtocol},
    secrets::RegistryAuth,
    Reference,
};
use rand::{rngs::StdRng, RngCore, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinHandle,
};

use crate::support::{
    docker_registry::DockerRegistry,
    embedded_registry::EmbeddedRegistry,
    images::{image_ref, push_image, push_index, OCI_LAYER_GZIP},
};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const FIVE_MB: usize = 5 * 1024 * 1024;

// ---- the two registries ---------------------------------------------------------------------

/// A registry under test: the embedded one in this process, or a docker-registry child.
struct Reg {
    addr: String,
    _embedded: Option<EmbeddedRegistry>,
    _docker: Option<DockerRegistry>,
}

impl Reg {
    async fn embedded() -> Self {
        let embedded = EmbeddedRegistry::start().await;
        Self {
            addr: embedded.addr.clone(),
            _embedded: Some(embedded),
            _docker: None,
        }
    }

    fn docker() -> Self {
        let docker = DockerRegistry::start();
        Self {
            addr: docker.addr().to_owned(),
            _embedded: None,
            _docker: Some(docker),
        }
    }

    fn image(&self, repo: &str, tag: &str) -> ImageRef {
        image_ref(&self.addr, repo, tag)
    }
}

/// Runs a scenario against each registry, as `<scenario>::embedded` and
/// `<scenario>::docker_registry`.
macro_rules! on_both_registries {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn embedded() {
                super::$scenario(super::Reg::embedded().await).await;
            }

            #[tokio::test]
            async fn docker_registry() {
                super::$scenario(super::Reg::docker()).await;
            }
        }
    )*};
}

on_both_registries!(
    fetches_an_image,
    fetches_the_platform_image_of_an_index,
    fetches_docker_schema2_images_and_refuses_artifacts,
    pulls_a_blob_into_a_file,
    a_wrong_digest_or_size_leaves_no_file,
    pushes_blob_files_present_mounted_or_uploaded,
    a_file_that_does_not_match_its_digest_is_not_pushed,
    pushes_blob_bytes,
    pushes_a_built_manifest_and_fetches_it_back,
    transfers_blobs_within_a_registry,
);

// ---- helpers --------------------------------------------------------------------------------

fn client(reg: &str) -> RegistryClient {
    RegistryClient::new(ClientConfig::new(
        image_ref(reg, "kiln/base", "latest"),
        image_ref(reg, "kiln/workspace", "latest"),
    ))
    .unwrap()
}

fn anonymous() -> AuthPolicy {
    AuthPolicy {
        installation: InstallationCredentialScope::Nowhere,
        additional: BTreeMap::new(),
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Pushes `data` as a blob of `repo` with oci-client (chunked upload), not with Kiln.
async fn seed_blob(registry: &str, repo: &str, data: &[u8]) -> Digest {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = oci_client::Client::new(OciConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    client
        .store_auth_if_needed(registry, &RegistryAuth::Anonymous)
        .await;
    let digest = Digest::of(data);
    let reference = Reference::with_tag(registry.into(), repo.into(), "unused".into());
    client
        .push_blob(&reference, data.to_vec(), digest.as_str())
        .await
        .unwrap_or_else(|e| panic!("seeding blob {digest} in {registry}/{repo}: {e}"));
    digest
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[track_caller]
fn assert_kind<T: std::fmt::Debug>(
    result: Result<T, RegistryError>,
    kind: RegistryErrorKind,
) -> RegistryError {
    match result {
        Ok(v) => panic!("expected a {kind} error, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "wrong kind for: {e} ({e:?})");
            e
        }
    }
}

fn manifest_json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

// ---- fetch_image ----------------------------------------------------------------------------

async fn fetches_an_image(reg: Reg) {
    let digest = push_image(&reg.addr, "base/app", "1", 3, 101).await;
    let c = client(&reg.addr);
    let tagged = reg.image("base/app", "1");
    let fetched = c
        .fetch_image(&tagged, &Platform::linux_amd64(), &anonymous())
        .await
        .unwrap();

    assert_eq!(fetched.reference, tagged.pinned(digest.clone()));
    assert_eq!(Digest::of(&fetched.manifest_bytes), digest);
    assert_eq!(fetched.manifest_media_type, OCI_MANIFEST);
    let manifest = manifest_json(&fetched.manifest_bytes);
    assert_eq!(fetched.config_digest.as_str(), manifest["config"]["digest"]);
    assert_eq!(Digest::of(&fetched.config_bytes), fetched.config_digest);
    assert_eq!(
        fetched.config_bytes.len() as u64,
        manifest["config"]["size"].as_u64().unwrap()
    );
    let config: ImageConfig = serde_json::from_slice(&fetched.config_bytes).unwrap();
    assert_eq!(
        (config.os.as_str(), config.architecture.as_str()),
        ("linux", "amd64")
    );
    assert_eq!(config.rootfs.diff_ids.len(), 3);

    let listed = manifest["layers"].as_array().unwrap();
    assert_eq!(fetched.layers.len(), 3);
    for (layer, listed) in fetched.layers.iter().zip(listed) {
        assert_eq!(layer.digest.as_str(), listed["digest"]);
        assert_eq!(layer.size, listed["size"].as_u64().unwrap());
        assert_eq!(layer.media_type, OCI_LAYER_GZIP);
    }

    // The pinned form fetches the same, and a missing tag is NotFound.
    let again = c
        .fetch_image(&fetched.reference, &Platform::linux_amd64(), &anonymous())
        .await
        .unwrap();
    assert_eq!(again, fetched);
    assert_kind(
        c.fetch_image(
            &reg.image("base/app", "nope"),
            &Platform::linux_amd64(),
            &anonymous(),
        )
        .await,
        RegistryErrorKind::NotFound,
    );
}

async fn fetches_the_platform_image_of_an_index(reg: Reg) {
    let (index, platforms) = push_index(
        &reg.addr,
        "base/multi",
        "1",
        &["linux/arm64/v8", "linux/amd64", "linux/arm/v7"],
    )
    .await;
    let digest_of = |p: &str| platforms.iter().find(|(q, _)| q == p).unwrap().1.clone();
    let tagged = reg.image("base/multi", "1");

    let amd64 = client(&reg.addr)
        .fetch_image(&tagged, &Platform::linux_amd64(), &anonymous())
        .await
        .unwrap();
    assert_eq!(amd64.reference, tagged.pinned(digest_of("linux/amd64")));
    assert_eq!(Digest::of(&amd64.manifest_bytes), digest_of("linux/amd64"));
    let config: ImageConfig = serde_json::from_slice(&amd64.config_bytes).unwrap();
    assert_eq!(config.architecture, "amd64");
    assert_eq!(amd64.layers.len(), 1);

    // Through the index's own digest too.
    let arm64 = client(&reg.addr)
        .fetch_image(
            &tagged.pinned(index),
            &"linux/arm64".parse().unwrap(),
            &anonymous(),
        )
        .await
        .unwrap();
    assert_eq!(arm64.reference, tagged.pinned(digest_of("linux/arm64/v8")));
    let config: ImageConfig = serde_json::from_slice(&arm64.config_bytes).unwrap();
    assert_eq!(
        (config.architecture.as_str(), config.variant.as_deref()),
        ("arm64", Some("v8"))
    );
    assert_ne!(arm64.layers, amd64.layers);

    let err = assert_kind(
        client(&reg.addr)
            .fetch_image(&tagged, &"linux/s390x".parse().unwrap(), &anonymous())
            .await,
        RegistryErrorKind::NotFound,
    );
    assert!(err.to_string().contains("linux/s390x"), "{err}");
}

async fn fetches_docker_schema2_images_and_refuses_artifacts(reg: Reg) {
    let c = client(&reg.addr);
    let layer = random(4096, 102);
    let layer_digest = seed_blob(&reg.addr, "base/docker", &layer).await;
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = seed_blob(&reg.addr, "base/docker", config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": { "mediaType": DOCKER_CONFIG, "size": config.len(), "digest": config_digest.to_string() },
        "layers": [{ "mediaType": DOCKER_LAYER, "size": layer.len(), "digest": layer_digest.to_string() }],
    }))
    .unwrap();
    let tagged = reg.image("base/docker", "schema2");
    let digest = c
        .push_manifest_bytes(&tagged, manifest.clone(), DOCKER_MANIFEST, &anonymous())
        .await
        .unwrap();
    let fetched = c
        .fetch_image(&tagged, &Platform::linux_amd64(), &anonymous())
        .await
        .unwrap();
    assert_eq!(fetched.reference, tagged.pinned(digest));
    assert_eq!(fetched.manifest_bytes, manifest);
    assert_eq!(fetched.manifest_media_type, DOCKER_MANIFEST);
    assert_eq!(fetched.config_bytes, config);
    assert_eq!(fetched.config_digest, config_digest);
    assert_eq!(fetched.layers.len(), 1);
    assert_eq!(fetched.layers[0].digest, layer_digest);
    assert_eq!(fetched.layers[0].size, 4096);
    assert_eq!(fetched.layers[0].media_type, DOCKER_LAYER);

    // An OCI manifest whose config is not an image config (an artifact) is not an image.
    const HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";
    let artifact = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": HELM_CONFIG, "size": config.len(), "digest": config_digest.to_string() },
        "layers": [],
    }))
    .unwrap();
    let chart = reg.image("base/docker", "chart");
    c.push_manifest_bytes(&chart, artifact, OCI_MANIFEST, &anonymous())
        .await
        .unwrap();
    let err = assert_kind(
        c.fetch_image(&chart, &Platform::linux_amd64(), &anonymous())
            .await,
        RegistryErrorKind::InvalidInput,
    );
    assert!(err.to_string().contains(HELM_CONFIG), "{err}");
}

// ---- pull_blob_to_file ----------------------------------------------------------------------

async fn pulls_a_blob_into_a_file(reg: Reg) {
    let data = random(FIVE_MB, 103);
    let digest = seed_blob(&reg.addr, "base/blobs", &data).await;
    let c = client(&reg.addr);
    let repo = reg.image("base/blobs", "any");
    let dir = tempfile::tempdir().unwrap();

    let dest = dir.path().join("layer");
    let n = c
        .pull_blob_to_file(&repo, &digest, Some(data.len() as u64), &dest, &anonymous())
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    assert!(std::fs::read(&dest).unwrap() == data, "the pulled file differs");
    assert_eq!(listing(dir.path()), ["layer"]);

    // Without an expected size, and over an existing file.
    let n = c
        .pull_blob_to_file(&repo, &digest, None, &dest, &anonymous())
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    assert!(std::fs::read(&dest).unwrap() == data);
    assert_eq!(listing(dir.path()), ["layer"]);
}

async fn a_wrong_digest_or_size_leaves_no_file(reg: Reg) {
    let data = random(FIVE_MB, 104);
    let digest = seed_blob(&reg.addr, "base/blobs", &data).await;
    let c = client(&reg.addr);
    let repo = reg.image("base/blobs", "any");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("layer");

    // A digest the repository does not have.
    let unknown = Digest::of(b"not in the registry");
    assert_kind(
        c.pull_blob_to_file(&repo, &unknown, Some(data.len() as u64), &dest, &anonymous())
            .await,
        RegistryErrorKind::NotFound,
    );
    assert_eq!(listing(dir.path()), Vec::<String>::new());

    // The right digest with the wrong size, smaller and larger.
    for size in [data.len() as u64 - 1, data.len() as u64 + 1] {
        let err = assert_kind(
            c.pull_blob_to_file(&repo, &digest, Some(size), &dest, &anonymous())
                .await,
            RegistryErrorKind::Internal,
        );
        assert!(
            matches!(err, RegistryError::BlobSizeMismatch { expected, .. } if expected == size),
            "{err:?}"
        );
        assert_eq!(listing(dir.path()), Vec::<String>::new());
    }
}

/// A peer that answers every request with `200` and the same body (a registry serving the
/// wrong bytes for a blob), with a `Content-Length` or chunked.
struct Liar {
    addr: String,
    task: JoinHandle<()>,
}

impl Liar {
    async fn start(body: Vec<u8>, chunked: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let body = std::sync::Arc::new(body);
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let is_head = head.starts_with(b"HEAD ");
                    let mut response = if chunked {
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            .to_owned()
                            .into_bytes()
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes()
                    };
                    if !is_head {
                        if chunked {
                            response.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                            response.extend_from_slice(&body);
                            response.extend_from_slice(b"\r\n0\r\n\r\n");
                        } else {
                            response.extend_from_slice(&body);
                        }
                    }
                    let _ = conn.write_all(&response).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for Liar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_registry_serving_wrong_bytes_leaves_no_file() {
    let data = random(FIVE_MB, 105);
    let digest = Digest::of(&data);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("layer");

    // The same length, other bytes: the digest check at the end refuses it.
    let liar = Liar::start(random(FIVE_MB, 106), false).await;
    let repo = image_ref(&liar.addr, "base/blobs", "any");
    let err = assert_kind(
        client(&liar.addr)
            .pull_blob_to_file(&repo, &digest, Some(data.len() as u64), &dest, &anonymous())
            .await,
        RegistryErrorKind::Internal,
    );
    match &err {
        RegistryError::BlobDigestMismatch { expected, actual, .. } => {
            assert_eq!(expected, &digest);
            assert_eq!(actual, Digest::of(&random(FIVE_MB, 106)).as_str());
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert_eq!(listing(dir.path()), Vec::<String>::new());

    // More bytes than expected, with no length announced: cut off as they arrive.
    let liar = Liar::start(random(FIVE_MB + 1, 107), true).await;
    let repo = image_ref(&liar.addr, "base/blobs", "any");
    let err = assert_kind(
        client(&liar.addr)
            .pull_blob_to_file(&repo, &digest, Some(data.len() as u64), &dest, &anonymous())
            .await,
        RegistryErrorKind::Internal,
    );
    assert!(matches!(err, RegistryError::BlobSizeMismatch { .. }), "{err:?}");
    assert_eq!(listing(dir.path()), Vec::<String>::new());
}

// ---- push_blob_file / push_blob_bytes / blob_exists -------------------------------------------

async fn pushes_blob_files_present_mounted_or_uploaded(reg: Reg) {
    let c = client(&reg.addr);
    let dir = tempfile::tempdir().unwrap();
    let workspace = reg.image("kiln/workspace", "x");

    // Present: the repository already has it.
    let present = random(100_000, 108);
    let present_digest = seed_blob(&reg.addr, "kiln/workspace", &present).await;
    let path = write_file(dir.path(), "present", &present);
    assert_eq!(
        c.push_blob_file(&workspace, &present_digest, &path, None, &anonymous())
            .await
            .unwrap(),
        BlobPush::Present
    );

    // Mounted: another repository of the same registry has it.
    let shared = random(200_000, 109);
    let shared_digest = seed_blob(&reg.addr, "base/shared", &shared).await;
    let path = write_file(dir.path(), "shared", &shared);
    let from = reg.image("base/shared", "any");
    assert!(!c
        .blob_exists(&workspace, &shared_digest, &anonymous())
        .await
        .unwrap());
    assert_eq!(
        c.push_blob_file(&workspace, &shared_digest, &path, Some(&from), &anonymous())
            .await
            .unwrap(),
        BlobPush::Mounted {
            from: "base/shared".into()
        }
    );
    assert!(c
        .blob_exists(&workspace, &shared_digest, &anonymous())
        .await
        .unwrap());

    // Uploaded: nobody has it (a mount source without it falls back to the upload).
    let fresh = random(FIVE_MB + 12_345, 110);
    let fresh_digest = Digest::of(&fresh);
    let path = write_file(dir.path(), "fresh", &fresh);
    assert!(!c
        .blob_exists(&workspace, &fresh_digest, &anonymous())
        .await
        .unwrap());
    assert_eq!(
        c.push_blob_file(&workspace, &fresh_digest, &path, Some(&from), &anonymous())
            .await
            .unwrap(),
        BlobPush::Uploaded {
            bytes: fresh.len() as u64
        }
    );
    assert!(c
        .blob_exists(&workspace, &fresh_digest, &anonymous())
        .await
        .unwrap());
    // What arrived is the file.
    let back = dir.path().join("back");
    c.pull_blob_to_file(
        &workspace,
        &fresh_digest,
        Some(fresh.len() as u64),
        &back,
        &anonymous(),
    )
    .await
    .unwrap();
    assert!(std::fs::read(&back).unwrap() == fresh);

    // Pushing it again finds it.
    assert_eq!(
        c.push_blob_file(&workspace, &fresh_digest, &path, None, &anonymous())
            .await
            .unwrap(),
        BlobPush::Present
    );

    // An empty blob uploads too.
    let empty = write_file(dir.path(), "empty", b"");
    assert_eq!(
        c.push_blob_file(&workspace, &Digest::of(b""), &empty, None, &anonymous())
            .await
            .unwrap(),
        BlobPush::Uploaded { bytes: 0 }
    );

    // A missing file is a local error naming it.
    let err = assert_kind(
        c.push_blob_file(
            &workspace,
            &Digest::of(b"nothing"),
            &dir.path().join("missing"),
            None,
            &anonymous(),
        )
        .await,
        RegistryErrorKind::Internal,
    );
    assert!(err.to_string().contains("missing"), "{err}");
}

async fn a_file_that_does_not_match_its_digest_is_not_pushed(reg: Reg) {
    let c = client(&reg.addr);
    let dir = tempfile::tempdir().unwrap();
    let workspace = reg.image("kiln/workspace", "x");
    let claimed = Digest::of(b"what the caller thinks is in the file");
    let path = write_file(dir.path(), "layer", &random(FIVE_MB, 111));
    let err = assert_kind(
        c.push_blob_file(&workspace, &claimed, &path, None, &anonymous())
            .await,
        RegistryErrorKind::Internal,
    );
    assert!(
        matches!(&err, RegistryError::LocalBlobMismatch { path: p, .. } if *p == path),
        "{err:?}"
    );
    assert!(!c.blob_exists(&workspace, &claimed, &anonymous()).await.unwrap());
    let actual = Digest::of(&std::fs::read(&path).unwrap());
    assert!(!c.blob_exists(&workspace, &actual, &anonymous()).await.unwrap());
}

async fn pushes_blob_bytes(reg: Reg) {
    let c = client(&reg.addr);
    let workspace = reg.image("kiln/workspace", "x");
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let digest = Digest::of(&config);
    assert_eq!(
        c.push_blob_bytes(&workspace, &digest, config.clone(), &anonymous())
            .await
            .unwrap(),
        BlobPush::Uploaded {
            bytes: config.len() as u64
        }
    );
    assert!(c.blob_exists(&workspace, &digest, &anonymous()).await.unwrap());
    assert_eq!(
        c.push_blob_bytes(&workspace, &digest, config.clone(), &anonymous())
            .await
            .unwrap(),
        BlobPush::Present
    );
    let err = assert_kind(
        c.push_blob_bytes(&workspace, &Digest::of(b"x"), config, &anonymous())
            .await,
        RegistryErrorKind::Internal,
    );
    assert!(matches!(err, RegistryError::BlobBytesMismatch { .. }), "{err:?}");
}

// ---- push_manifest_bytes --------------------------------------------------------------------

async fn pushes_a_built_manifest_and_fetches_it_back(reg: Reg) {
    let c = client(&reg.addr);
    let dir = tempfile::tempdir().unwrap();
    let workspace = reg.image("kiln/workspace", "build-1");

    let layer = random(300_000, 112);
    let layer_digest = Digest::of(&layer);
    let path = write_file(dir.path(), "layer.tar.gz", &layer);
    c.push_blob_file(&workspace, &layer_digest, &path, None, &anonymous())
        .await
        .unwrap();

    let mut config = ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        ..Default::default()
    };
    config.set_env("PATH", "/usr/local/bin:/usr/bin:/bin");
    config.rootfs.diff_ids.push(Digest::of(b"the uncompressed layer"));
    let config_bytes = config.to_bytes();
    let config_digest = Digest::of(&config_bytes);
    c.push_blob_bytes(&workspace, &config_digest, config_bytes.clone(), &anonymous())
        .await
        .unwrap();

    let mut manifest = Manifest::new(
        Descriptor {
            media_type: OCI_CONFIG.into(),
            digest: config_digest.clone(),
            size: config_bytes.len() as u64,
        },
        vec![Descriptor {
            media_type: OCI_LAYER_GZIP.into(),
            digest: layer_digest.clone(),
            size: layer.len() as u64,
        }],
    );
    manifest
        .annotations
        .insert("org.opencontainers.image.title".into(), "kiln test".into());
    let bytes = manifest.to_bytes();
    let digest = c
        .push_manifest_bytes(&workspace, bytes.clone(), OCI_MANIFEST, &anonymous())
        .await
        .unwrap();
    assert_eq!(digest, Digest::of(&bytes));

    let fetched = c
        .fetch_image(&workspace, &Platform::linux_amd64(), &anonymous())
        .await
        .unwrap();
    assert_eq!(fetched.reference, workspace.pinned(digest.clone()));
    assert_eq!(fetched.manifest_bytes, bytes);
    assert_eq!(fetched.manifest_media_type, OCI_MANIFEST);
    assert_eq!(fetched.config_bytes, config_bytes);
    assert_eq!(fetched.config_digest, config_digest);
    assert_eq!(
        serde_json::from_slice::<ImageConfig>(&fetched.config_bytes).unwrap(),
        config
    );
    assert_eq!(fetched.layers.len(), 1);
    assert_eq!(
        (
            &fetched.layers[0].digest,
            fetched.layers[0].size,
            fetched.layers[0].media_type.as_str()
        ),
        (&layer_digest, layer.len() as u64, OCI_LAYER_GZIP)
    );

    // By digest: the same bytes under their own digest, in another repository of Kiln's.
    let other = reg.image("kiln/workspace/cache", "unused");
    c.push_blob_bytes(&other, &config_digest, config_bytes.clone(), &anonymous())
        .await
        .unwrap();
    c.push_blob_file(&other, &layer_digest, &path, Some(&workspace), &anonymous())
        .await
        .unwrap();
    let pinned = other.pinned(digest.clone());
    assert_eq!(
        c.push_manifest_bytes(&pinned, bytes.clone(), OCI_MANIFEST, &anonymous())
            .await
            .unwrap(),
        digest
    );
    assert!(c.exists(&pinned, &anonymous()).await.unwrap());
    assert_eq!(
        c.fetch_image(&pinned, &Platform::linux_amd64(), &anonymous())
            .await
            .unwrap()
            .manifest_bytes,
        bytes
    );

    // A target naming another digest, and a media type that is no manifest's, are refused.
    assert_kind(
        c.push_manifest_bytes(
            &other.pinned(Digest::of(b"other")),
            bytes.clone(),
            OCI_MANIFEST,
            &anonymous(),
        )
        .await,
        RegistryErrorKind::InvalidInput,
    );
    assert_kind(
        c.push_manifest_bytes(&workspace, bytes, "application/json", &anonymous())
            .await,
        RegistryErrorKind::InvalidInput,
    );
}

// ---- transfer_blob --------------------------------------------------------------------------

async fn transfers_blobs_within_a_registry(reg: Reg) {
    let c = client(&reg.addr);
    let data = random(400_000, 113);
    let digest = seed_blob(&reg.addr, "base/src", &data).await;
    let source = reg.image("base/src", "any");
    let target = reg.image("kiln/workspace", "x");
    let size = data.len() as u64;
    assert_eq!(
        c.transfer_blob(&source, &target, &digest, size, &anonymous())
            .await
            .unwrap(),
        BlobPush::Mounted {
            from: "base/src".into()
        }
    );
    assert_eq!(
        c.transfer_blob(&source, &target, &digest, size, &anonymous())
            .await
            .unwrap(),
        BlobPush::Present
    );
    assert!(c.blob_exists(&target, &digest, &anonymous()).await.unwrap());
}

#[tokio::test]
async fn transfers_blobs_across_registries() {
    let embedded = Reg::embedded().await;
    let docker = Reg::docker();
    for (from, to, seed) in [(&embedded, &docker, 114), (&docker, &embedded, 115)] {
        let data = random(FIVE_MB, seed);
        let digest = seed_blob(&from.addr, "library/src", &data).await;
        let source = from.image("library/src", "any");
        let target = to.image("kiln/workspace", "x");
        let c = client(&to.addr);
        assert!(!c.blob_exists(&target, &digest, &anonymous()).await.unwrap());
        assert_eq!(
            c.transfer_blob(&source, &target, &digest, data.len() as u64, &anonymous())
                .await
                .unwrap(),
            BlobPush::Uploaded {
                bytes: data.len() as u64
            },
            "{} → {}",
            from.addr,
            to.addr
        );
        assert!(c.blob_exists(&target, &digest, &anonymous()).await.unwrap());
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        c.pull_blob_to_file(&target, &digest, Some(data.len() as u64), &dest, &anonymous())
            .await
            .unwrap();
        assert!(std::fs::read(&dest).unwrap() == data);
        assert_eq!(
            c.transfer_blob(&source, &target, &digest, data.len() as u64, &anonymous())
                .await
                .unwrap(),
            BlobPush::Present
        );

        // A blob the source does not have fails as NotFound, and nothing arrives.
        let missing = Digest::of(b"nowhere");
        assert_kind(
            c.transfer_blob(&source, &target, &missing, 7, &anonymous()).await,
            RegistryErrorKind::NotFound,
        );
        assert!(!c.blob_exists(&target, &missing, &anonymous()).await.unwrap());
    }
}

// ---- credentials ----------------------------------------------------------------------------

const USER: &str = "kiln-user";
const CANARY: &str = "canary-Eng1ne-io-5b2d";

/// Writes use the installation's credentials whatever the policy; reads follow the policy.
#[tokio::test]
async fn writes_use_the_installation_credentials_and_reads_the_policy() {
    let reg = DockerRegistry::start_with_auth(Some((USER, CANARY)));
    let workspace = image_ref(reg.addr(), "kiln/workspace", "x");
    let blob = b"{\"os\":\"linux\"}".to_vec();
    let digest = Digest::of(&blob);

    let err = assert_kind(
        client(reg.addr())
            .push_blob_bytes(&workspace, &digest, blob.clone(), &anonymous())
            .await,
        RegistryErrorKind::Unauthenticated,
    );
    assert!(!format!("{err} {err:?}").contains(CANARY));

    let mut config = ClientConfig::new(
        image_ref(reg.addr(), "kiln/base", "latest"),
        image_ref(reg.addr(), "kiln/workspace", "latest"),
    );
    config.credentials = CredentialStore::empty().with(
        reg.addr(),
        BasicCredentials {
            username: USER.into(),
            password: Secret::new(CANARY),
        },
    );
    let installed = RegistryClient::new(config).unwrap();
    assert_eq!(
        installed
            .push_blob_bytes(&workspace, &digest, blob.clone(), &anonymous())
            .await
            .unwrap(),
        BlobPush::Uploaded {
            bytes: blob.len() as u64
        }
    );

    // Reading with a policy that allows no credentials is refused; with one that allows the
    // installation's, it works.
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("blob");
    let err = assert_kind(
        installed
            .pull_blob_to_file(&workspace, &digest, None, &dest, &anonymous())
            .await,
        RegistryErrorKind::Unauthenticated,
    );
    assert!(!format!("{err} {err:?}").contains(CANARY));
    assert!(!dest.exists());
    let everywhere = AuthPolicy {
        installation: InstallationCredentialScope::Everywhere,
        additional: BTreeMap::new(),
    };
    installed
        .pull_blob_to_file(&workspace, &digest, None, &dest, &everywhere)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), blob);
    assert!(installed
        .blob_exists(&workspace, &digest, &everywhere)
        .await
        .unwrap());
}
