//! Online garbage collection of the embedded registry (`EmbeddedRegistry::collect_garbage`),
//! against the real server over HTTP with real clients (skopeo, Kiln's `RegistryClient`):
//! unreferenced blobs go after the grace period and referenced ones stay, an abandoned
//! upload goes, Kiln's base-image tags expire when unused, and pushes racing collections stay
//! complete and pullable.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use kiln::{
    model::{AuthPolicy, Digest, InstallationCredentialScope},
    registry::{
        server::{Access, EmbeddedRegistry, GcPolicy, GcReport},
        ClientConfig, RegistryClient,
    },
};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tempfile::TempDir;

use super::server::{http_client, oci_ref, skopeo, text};
use crate::support::{
    images::image_ref,
    oci_layout::{self, Descriptor, OciLayout, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST},
};

/// An embedded registry served in this process, with its collector at hand.
struct GcRegistry {
    addr: SocketAddr,
    root: TempDir,
    registry: EmbeddedRegistry,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl GcRegistry {
    async fn start(policy: GcPolicy) -> Self {
        let root = tempfile::tempdir().unwrap();
        let registry = EmbeddedRegistry::open(root.path().to_path_buf(), Access::open(), policy)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = registry.clone();
        tokio::spawn(async move {
            serving
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            addr,
            root,
            registry,
            http: http_client(),
            _stop: stop,
        }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("http://{}{path}", self.addr))
    }

    async fn status(&self, method: Method, path: &str) -> StatusCode {
        self.request(method, path).send().await.unwrap().status()
    }

    async fn collect(&self) -> GcReport {
        self.registry.collect_garbage().await.expect("a collection")
    }

    /// The digests in the content store.
    fn stored(&self) -> HashSet<String> {
        std::fs::read_dir(self.root.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| format!("sha256:{}", e.unwrap().file_name().to_str().unwrap()))
            .collect()
    }

    /// Pushes the layout's `tag` to `repo:tag` with skopeo.
    async fn push(&self, home: &Path, layout: &OciLayout, tag: &str, repo: &str) {
        skopeo(
            home,
            &[
                "copy",
                "--dest-tls-verify=false",
                &oci_ref(&layout.dir, tag),
                &format!("docker://{}/{repo}:{tag}", self.host()),
            ],
        )
        .await;
    }

    /// Pulls `repo:tag` with skopeo into a fresh layout (every blob is fetched and checked).
    async fn pull(&self, home: &Path, repo: &str, tag: &str) {
        let dir = tempfile::tempdir().unwrap();
        skopeo(
            home,
            &[
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{}/{repo}:{tag}", self.host()),
                &oci_ref(dir.path(), "pulled"),
            ],
        )
        .await;
    }
}

fn every_digest(image: &oci_layout::Image) -> Vec<String> {
    image
        .layers
        .iter()
        .chain([&image.config, &image.manifest])
        .map(|d| d.digest.clone())
        .collect()
}

fn home() -> TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreferenced_blobs_abandoned_uploads_and_unused_base_tags_go_the_rest_stays() {
    const GRACE: Duration = Duration::from_secs(2);
    let registry = GcRegistry::start(GcPolicy {
        blob_grace: GRACE,
        upload_max_age: GRACE,
        expiring: vec![("kiln/base-images".into(), Duration::from_secs(3))],
    })
    .await;
    let home = home();
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&work.path().join("src"));
    let kept = layout.add_image("amd64", &[2_000, 70_000]);
    let deleted = layout.add_image("amd64", &[3_000]);
    let old_base = layout.add_image("amd64", &[4_000]);
    let used_base = layout.add_image("amd64", &[5_000]);
    for (tag, image) in [
        ("kept", &kept),
        ("deleted", &deleted),
        ("old", &old_base),
        ("used", &used_base),
    ] {
        layout.tag(tag, &image.manifest);
    }
    registry.push(home.path(), &layout, "kept", "team/app").await;
    registry.push(home.path(), &layout, "deleted", "team/old").await;
    registry
        .push(home.path(), &layout, "old", "kiln/base-images")
        .await;
    registry
        .push(home.path(), &layout, "used", "kiln/base-images")
        .await;
    let path = format!("/v2/team/old/manifests/{}", deleted.manifest.digest);
    assert_eq!(registry.status(Method::DELETE, &path).await, StatusCode::ACCEPTED);
    // An orphan blob, and an upload a client started and left.
    let orphan = oci_layout::random_bytes(1000);
    let orphan_digest = Digest::of(&orphan).to_string();
    let resp = registry
        .request(
            Method::POST,
            &format!("/v2/team/app/blobs/uploads/?digest={orphan_digest}"),
        )
        .body(orphan.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", text(resp).await);
    let resp = registry
        .request(Method::POST, "/v2/team/app/blobs/uploads/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let resp = registry
        .request(Method::PATCH, &location)
        .body(vec![7u8; 500])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "{}", text(resp).await);
    let before = registry.stored();

    // Within the grace period nothing goes.
    assert_eq!(registry.collect().await, GcReport::default());
    assert_eq!(registry.stored(), before);

    // `used` is pulled by tag half-way through its keep duration; `old` is not.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let resp = registry
        .request(Method::GET, "/v2/kiln/base-images/manifests/used")
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1600)).await;

    let report = registry.collect().await;
    let removed: HashSet<String> = before.difference(&registry.stored()).cloned().collect();
    let mut expected: HashSet<String> = every_digest(&deleted).into_iter().collect();
    expected.extend(every_digest(&old_base));
    expected.insert(orphan_digest.clone());
    assert_eq!(removed, expected, "exactly the unreferenced blobs go");
    for digest in every_digest(&kept).into_iter().chain(every_digest(&used_base)) {
        assert!(registry.stored().contains(&digest), "{digest} was referenced");
    }
    assert_eq!(
        (report.blobs, report.tags, report.manifests, report.uploads),
        (expected.len() as u64, 1, 1, 1)
    );
    let sizes: u64 = [&deleted, &old_base]
        .iter()
        .flat_map(|i| i.layers.iter().chain([&i.config, &i.manifest]))
        .map(|d: &Descriptor| d.size)
        .sum();
    assert_eq!(report.bytes, sizes + orphan.len() as u64 + 500);
    assert_eq!(registry.registry.gc_removed_bytes(), report.bytes);

    // What stays pulls whole; what went is unknown, the upload too.
    registry.pull(home.path(), "team/app", "kept").await;
    registry.pull(home.path(), "kiln/base-images", "used").await;
    let blob = format!("/v2/team/app/blobs/{orphan_digest}");
    assert_eq!(registry.status(Method::HEAD, &blob).await, StatusCode::NOT_FOUND);
    let old_tag = "/v2/kiln/base-images/manifests/old";
    assert_eq!(registry.status(Method::GET, old_tag).await, StatusCode::NOT_FOUND);
    assert_eq!(
        registry.status(Method::PATCH, &location).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        std::fs::read_dir(registry.root.path().join("uploads"))
            .unwrap()
            .count(),
        0
    );
    // No dangling links: the repository that lost its image has no layer links left.
    let links = registry.root.path().join("repositories/team/old/_layers/sha256");
    assert_eq!(std::fs::read_dir(links).unwrap().count(), 0);
}

/// A layer of random bytes, written to the layout.
fn fresh_layer(layout: &OciLayout) -> Descriptor {
    layout.write_blob(OCI_LAYER_GZIP, &oci_layout::random_bytes(4_000))
}

/// An image of `layers` (a unique config each time), tagged `tag` in the layout.
fn image_of(layout: &mut OciLayout, tag: &str, layers: &[&Descriptor]) {
    let config = json!({ "architecture": "amd64", "os": "linux", "created_by": tag });
    let config = layout.write_blob(OCI_CONFIG, &serde_json::to_vec(&config).unwrap());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": layers.iter().map(|l| l.to_json()).collect::<Vec<_>>(),
    });
    let manifest = layout.write_blob(OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap());
    layout.tag(tag, &manifest);
}

/// Collections run back to back while images are pushed with skopeo and copied with Kiln's
/// client, each reusing layers of images deleted before (unreferenced, and past the grace
/// period unless a push stamps them): every push completes, every image kept pulls whole,
/// and what was deleted is gone at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_racing_collections_stay_complete_and_pullable() {
    const ITERATIONS: usize = 200;
    // Longer than any gap between a skopeo or Kiln client's check of a blob and its manifest
    // (the protocol's one assumption), on a loaded test machine too.
    const GRACE: Duration = Duration::from_secs(2);
    let registry = GcRegistry::start(GcPolicy {
        blob_grace: GRACE,
        upload_max_age: Duration::from_secs(600),
        expiring: Vec::new(),
    })
    .await;
    let host = registry.host();
    let client = RegistryClient::new(ClientConfig::new(
        image_ref(&host, "race/base", "latest"),
        image_ref(&host, "race/ws", "latest"),
    ))
    .unwrap();
    let anonymous = AuthPolicy {
        installation: InstallationCredentialScope::Nowhere,
        additional: BTreeMap::new(),
    };
    let home = home();
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::create(&work.path().join("src"));

    let running = Arc::new(AtomicBool::new(true));
    let collections = Arc::new(AtomicU64::new(0));
    let removed = Arc::new(AtomicU64::new(0));
    let collector = {
        let (registry, running) = (registry.registry.clone(), running.clone());
        let (collections, removed) = (collections.clone(), removed.clone());
        tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                let report = registry.collect_garbage().await.expect("a collection");
                collections.fetch_add(1, Ordering::Relaxed);
                removed.fetch_add(report.blobs, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut layers = vec![fresh_layer(&layout)];
    let mut previous: Option<(String, Digest)> = None;
    for i in 0..ITERATIONS {
        let tag = format!("v{i}");
        // Fresh layers of images deleted one and eight iterations ago: unreferenced, the
        // older one usually past the grace period, some at its edge.
        let recent = layers[layers.len().saturating_sub(2)].clone();
        let older = layers[layers.len().saturating_sub(9)].clone();
        let fresh = fresh_layer(&layout);
        let mut image_layers = vec![&fresh, &recent];
        if older != recent {
            image_layers.push(&older);
        }
        image_of(&mut layout, &tag, &image_layers);
        layers.push(fresh);
        registry.push(home.path(), &layout, &tag, "race/app").await;
        // Kiln's client: resolve, then copy into another repository (mounts, a manifest PUT).
        let pinned = client
            .resolve(&image_ref(&host, "race/app", &tag), &anonymous)
            .await
            .unwrap_or_else(|e| panic!("iteration {i}: resolve: {e}"));
        let copied = client
            .copy(&pinned, &image_ref(&host, "race/ws", &tag), &anonymous, &|_| {})
            .await
            .unwrap_or_else(|e| panic!("iteration {i}: copy: {e}"));
        assert_eq!(Some(&copied), pinned.digest(), "the copy has the pushed manifest");
        // The previous image goes, in both repositories: its layers are garbage unless the
        // next push reuses them.
        if let Some((old_tag, old)) = previous.replace((tag.clone(), copied)) {
            for repo in ["race/app", "race/ws"] {
                let path = format!("/v2/{repo}/manifests/{old}");
                assert_eq!(
                    registry.status(Method::DELETE, &path).await,
                    StatusCode::ACCEPTED,
                    "{old_tag}"
                );
            }
        }
        if i % 25 == 24 {
            registry.pull(home.path(), "race/app", &tag).await;
            registry.pull(home.path(), "race/ws", &tag).await;
        }
    }
    running.store(false, Ordering::Relaxed);
    collector.await.unwrap();
    let (last_tag, last) = previous.unwrap();
    registry.pull(home.path(), "race/app", &last_tag).await;
    registry.pull(home.path(), "race/ws", &last_tag).await;

    tokio::time::sleep(GRACE + Duration::from_millis(100)).await;
    registry.collect().await;
    // Left: the last image (manifest, config, its layers), nothing else.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(registry.root.path().join("blobs/sha256").join(last.hex())).unwrap(),
    )
    .unwrap();
    let mut expected: HashSet<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    expected.insert(manifest["config"]["digest"].as_str().unwrap().to_owned());
    expected.insert(last.to_string());
    assert_eq!(registry.stored(), expected);
    eprintln!(
        "{ITERATIONS} pushes and copies raced {} collections, which removed {} blobs meanwhile",
        collections.load(Ordering::Relaxed),
        removed.load(Ordering::Relaxed)
    );
    assert!(
        removed.load(Ordering::Relaxed) > 0,
        "the collections raced the pushes"
    );
}

/// The gap between a client's requests: a blob that is unreferenced and past the grace
/// period, then checked with `HEAD` (the client will skip its upload), survives a collection
/// that runs before the client's manifest `PUT`, which then succeeds. A cross-repository
/// mount stamps the blob the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_a_push_checked_survives_until_its_manifest_arrives() {
    const GRACE: Duration = Duration::from_millis(500);
    let registry = GcRegistry::start(GcPolicy {
        blob_grace: GRACE,
        upload_max_age: Duration::from_secs(600),
        expiring: Vec::new(),
    })
    .await;
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = oci_layout::random_bytes(2_000);
    let mut digests = Vec::new();
    for bytes in [&config, &layer] {
        let digest = Digest::of(bytes).to_string();
        let resp = registry
            .request(
                Method::POST,
                &format!("/v2/gap/app/blobs/uploads/?digest={digest}"),
            )
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        digests.push(digest);
    }
    tokio::time::sleep(GRACE + Duration::from_millis(100)).await;
    // The client checks its blobs (one in the repository, one by mounting it elsewhere).
    let head = format!("/v2/gap/app/blobs/{}", digests[0]);
    assert_eq!(registry.status(Method::HEAD, &head).await, StatusCode::OK);
    let mount = format!("/v2/gap/other/blobs/uploads/?mount={}&from=gap/app", digests[1]);
    assert_eq!(registry.status(Method::POST, &mount).await, StatusCode::CREATED);
    assert_eq!(
        registry.collect().await.blobs,
        0,
        "checked blobs are in their grace period"
    );
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digests[0], "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": digests[1], "size": layer.len()}],
    }))
    .unwrap();
    let resp = registry
        .request(Method::PUT, "/v2/gap/app/manifests/v1")
        .header("content-type", OCI_MANIFEST)
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", text(resp).await);
    tokio::time::sleep(GRACE + Duration::from_millis(100)).await;
    assert_eq!(registry.collect().await.blobs, 0, "referenced blobs stay");
    registry.pull(home().path(), "gap/app", "v1").await;
}
