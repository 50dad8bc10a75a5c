//! The embedded registry server (`kiln::registry::server::serve`), in-process on a random
//! loopback port with a temporary root: driven by skopeo as a real client, and by raw HTTP
//! for the protocol corners (chunked uploads, ranges, errors, pagination).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle};

use crate::support::{
    oci_layout::{self, OciLayout, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST},
    tools,
};
use kiln::model::Digest;

/// A registry running in this process.
struct TestRegistry {
    addr: SocketAddr,
    root: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    http: reqwest::Client,
}

impl TestRegistry {
    async fn start() -> Self {
        // RUST_LOG=kiln=debug shows the server's per-request spans in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let root = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kiln::registry::server::serve(
            listener,
            root.path().to_path_buf(),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            root,
            stop: Some(stop),
            task: Some(task),
            http: http_client(),
        }
    }

    /// `127.0.0.1:PORT`
    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// Stops the server; `serve` must return `Ok`.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("serve did not return after shutdown")
            .unwrap();
        result.expect("serve failed");
    }

    /// Upload-in-progress files left in the root.
    fn leftover_uploads(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root.path().join("uploads"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// Pushes `bytes` to `repo` with a monolithic `POST ?digest=`.
    async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = Digest::of(bytes).to_string();
        let resp = self
            .request(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            )
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED, "{}", text(resp).await);
        digest
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> reqwest::Response {
        self.request(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Pushes a small image (config + one layer) to `repo:tag`; returns the manifest bytes.
    async fn push_image(&self, repo: &str, tag: &str) -> Vec<u8> {
        let layer = oci_layout::random_bytes(100);
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let layer_digest = self.push_blob(repo, &layer).await;
        let config_digest = self.push_blob(repo, config).await;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": layer.len()}],
        }))
        .unwrap();
        let resp = self.put_manifest(repo, tag, OCI_MANIFEST, &manifest).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{}", text(resp).await);
        manifest
    }
}

/// A plain-HTTP client. reqwest is built (through oci-client) without a rustls crypto
/// provider, so install the crate's (ring) before building one.
pub(crate) fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub(crate) async fn text(resp: reqwest::Response) -> String {
    resp.text().await.unwrap_or_default()
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {resp:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

/// The status and the first error code of an error response.
async fn error_of(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    assert_eq!(header(&resp, "content-type"), "application/json");
    let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    let code = body["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error envelope: {body}"))
        .to_owned();
    assert!(body["errors"][0]["message"].is_string(), "{body}");
    (status, code)
}

// ---------------------------------------------------------------------------------------
// skopeo

/// Runs skopeo with an isolated HOME (no credentials, no shared blob-info cache) and
/// returns its stdout; panics with its stderr on failure.
pub(crate) async fn skopeo(home: &Path, args: &[&str]) -> Vec<u8> {
    tools::ensure_installed("skopeo", "skopeo");
    let output = tokio::process::Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("REGISTRY_AUTH_FILE", home.join("auth.json"))
        .kill_on_drop(true)
        .output()
        .await
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

pub(crate) fn oci_ref(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushes_inspects_lists_and_pulls_an_image() {
    let registry = TestRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).unwrap();

    let mut layout = OciLayout::create(&work.path().join("src"));
    // One layer bigger than the server's 64 KiB read buffer and than one HTTP chunk.
    let image = layout.add_image("amd64", &[3_000, 300_000]);
    layout.tag("v1", &image.manifest);

    let dest = format!("docker://{}/kiln/round-trip", registry.host());
    for tag in ["v1", "v2"] {
        skopeo(
            &home,
            &[
                "copy",
                "--dest-tls-verify=false",
                &oci_ref(&layout.dir, "v1"),
                &format!("{dest}:{tag}"),
            ],
        )
        .await;
    }

    // The manifest is stored byte for byte.
    let raw = skopeo(
        &home,
        &["inspect", "--tls-verify=false", "--raw", &format!("{dest}:v1")],
    )
    .await;
    assert_eq!(raw, image.manifest_bytes);

    let inspected: Value = serde_json::from_slice(
        &skopeo(&home, &["inspect", "--tls-verify=false", &format!("{dest}:v1")]).await,
    )
    .unwrap();
    assert_eq!(inspected["Digest"], image.manifest.digest.as_str());
    assert_eq!(inspected["Architecture"], "amd64");
    assert_eq!(inspected["Os"], "linux");
    let layers: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(inspected["Layers"], json!(layers));
    assert_eq!(inspected["RepoTags"], json!(["v1", "v2"]));

    let tags: Value =
        serde_json::from_slice(&skopeo(&home, &["list-tags", "--tls-verify=false", &dest]).await).unwrap();
    assert_eq!(tags["Tags"], json!(["v1", "v2"]));

    // Raw view of what was stored.
    let resp = registry
        .request(Method::GET, "/v2/kiln/round-trip/manifests/v2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-type"), OCI_MANIFEST);
    assert_eq!(header(&resp, "docker-content-digest"), image.manifest.digest);

    // Pull it back into another layout: same manifest, same blobs.
    let pulled = work.path().join("pulled");
    skopeo(
        &home,
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("{dest}:v1"),
            &oci_ref(&pulled, "back"),
        ],
    )
    .await;
    let descriptor = oci_layout::resolve(&pulled, "back").expect("pulled tag in index.json");
    assert_eq!(descriptor.digest, image.manifest.digest);
    assert_eq!(
        oci_layout::read_blob(&pulled, &descriptor.digest),
        image.manifest_bytes
    );
    for blob in image.layers.iter().chain([&image.config]) {
        assert_eq!(
            oci_layout::read_blob(&pulled, &blob.digest),
            oci_layout::read_blob(&layout.dir, &blob.digest),
            "blob {}",
            blob.digest
        );
    }

    assert!(
        registry.leftover_uploads().is_empty(),
        "{:?}",
        registry.leftover_uploads()
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_between_repositories_of_the_registry() {
    let registry = TestRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut layout = OciLayout::create(&work.path().join("src"));
    let image = layout.add_image("amd64", &[10_000, 20_000]);
    layout.tag("1", &image.manifest);

    let a = format!("docker://{}/kiln/a:1", registry.host());
    let b = format!("docker://{}/kiln/b/nested:1", registry.host());
    skopeo(
        &home,
        &["copy", "--dest-tls-verify=false", &oci_ref(&layout.dir, "1"), &a],
    )
    .await;
    skopeo(
        &home,
        &[
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &a,
            &b,
        ],
    )
    .await;

    let raw = skopeo(&home, &["inspect", "--tls-verify=false", "--raw", &b]).await;
    assert_eq!(raw, image.manifest_bytes);
    for blob in image.layers.iter().chain([&image.config]) {
        let resp = registry
            .request(Method::HEAD, &format!("/v2/kiln/b/nested/blobs/{}", blob.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{}", blob.digest);
        assert_eq!(header(&resp, "content-length"), blob.size.to_string());
    }
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushes_and_pulls_a_multi_arch_index() {
    let registry = TestRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut layout = OciLayout::create(&work.path().join("src"));
    let amd64 = layout.add_image("amd64", &[5_000]);
    let arm64 = layout.add_image("arm64", &[6_000, 7_000]);
    let index = layout.add_index(&[&amd64, &arm64]);
    layout.tag("multi", &index.descriptor);

    let dest = format!("docker://{}/kiln/multi-arch:multi", registry.host());
    skopeo(
        &home,
        &[
            "copy",
            "--all",
            "--dest-tls-verify=false",
            &oci_ref(&layout.dir, "multi"),
            &dest,
        ],
    )
    .await;

    let raw = skopeo(&home, &["inspect", "--tls-verify=false", "--raw", &dest]).await;
    assert_eq!(raw, index.bytes);
    for image in [&amd64, &arm64] {
        let by_digest = format!(
            "docker://{}/kiln/multi-arch@{}",
            registry.host(),
            image.manifest.digest
        );
        let raw = skopeo(&home, &["inspect", "--tls-verify=false", "--raw", &by_digest]).await;
        assert_eq!(raw, image.manifest_bytes);
    }
    let resp = registry
        .request(Method::HEAD, "/v2/kiln/multi-arch/manifests/multi")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-type"), OCI_INDEX);
    assert_eq!(header(&resp, "docker-content-digest"), index.descriptor.digest);
    assert_eq!(header(&resp, "content-length"), index.bytes.len().to_string());

    let pulled = work.path().join("pulled");
    skopeo(
        &home,
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &dest,
            &oci_ref(&pulled, "multi"),
        ],
    )
    .await;
    let descriptor = oci_layout::resolve(&pulled, "multi").unwrap();
    assert_eq!(descriptor.digest, index.descriptor.digest);
    assert_eq!(oci_layout::read_blob(&pulled, &descriptor.digest), index.bytes);
    for image in [&amd64, &arm64] {
        assert_eq!(
            oci_layout::read_blob(&pulled, &image.manifest.digest),
            image.manifest_bytes
        );
        for layer in &image.layers {
            assert_eq!(
                oci_layout::read_blob(&pulled, &layer.digest),
                oci_layout::read_blob(&layout.dir, &layer.digest)
            );
        }
    }
    registry.stop().await;
}

// ---------------------------------------------------------------------------------------
// raw HTTP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_endpoint_answers_with_the_api_version() {
    let registry = TestRegistry::start().await;
    let resp = registry.request(Method::GET, "/v2/").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "docker-distribution-api-version"), "registry/2.0");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"{}");

    let resp = registry.request(Method::GET, "/v3/").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = registry
        .request(Method::POST, "/v2/a/tags/list")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED".into())
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_with_content_ranges_then_ranged_reads() {
    let registry = TestRegistry::start().await;
    let blob = oci_layout::random_bytes(250_000);
    let digest = Digest::of(&blob).to_string();

    let resp = registry
        .request(Method::POST, "/v2/kiln/chunked/blobs/uploads/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&resp, "range"), "0-0");
    let uuid = header(&resp, "docker-upload-uuid");
    let location = header(&resp, "location");
    assert_eq!(location, format!("/v2/kiln/chunked/blobs/uploads/{uuid}"));

    let chunks = [&blob[..100_000], &blob[100_000..200_000], &blob[200_000..]];
    let mut offset = 0usize;
    for (i, chunk) in chunks.iter().enumerate() {
        let end = offset + chunk.len() - 1;
        let resp = registry
            .request(Method::PATCH, &location)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{offset}-{end}"))
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::ACCEPTED,
            "chunk {i}: {}",
            text(resp).await
        );
        assert_eq!(header(&resp, "range"), format!("0-{end}"));
        offset = end + 1;

        if i == 0 {
            // A chunk that does not start where the upload ends is refused, and changes nothing.
            for bad_start in [0, 50_000, 150_000] {
                let resp = registry
                    .request(Method::PATCH, &location)
                    .header("content-range", format!("{bad_start}-{}", bad_start + 9))
                    .body(vec![0u8; 10])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    error_of(resp).await.0,
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "start {bad_start}"
                );
            }
            // A Content-Range that announces more bytes than the body has: refused, rolled back.
            let resp = registry
                .request(Method::PATCH, &location)
                .header("content-range", format!("{offset}-{}", offset + 99))
                .body(vec![0u8; 10])
                .send()
                .await
                .unwrap();
            assert_eq!(
                error_of(resp).await,
                (StatusCode::BAD_REQUEST, "SIZE_INVALID".into())
            );
            let resp = registry.request(Method::GET, &location).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
            assert_eq!(header(&resp, "range"), format!("0-{end}"));
            assert_eq!(header(&resp, "docker-upload-uuid"), uuid);
        }
    }

    let resp = registry
        .request(Method::PUT, &format!("{location}?digest={digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", text(resp).await);
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/kiln/chunked/blobs/{digest}")
    );
    // The session is gone.
    let resp = registry.request(Method::GET, &location).send().await.unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN".into())
    );

    let blob_path = format!("/v2/kiln/chunked/blobs/{digest}");
    let resp = registry.request(Method::HEAD, &blob_path).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-length"), blob.len().to_string());
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    assert_eq!(header(&resp, "content-type"), "application/octet-stream");
    assert!(resp.bytes().await.unwrap().is_empty());

    let resp = registry.request(Method::GET, &blob_path).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), blob.as_slice());

    let resp = registry
        .request(Method::GET, &blob_path)
        .header("range", "bytes=1000-70999")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&resp, "content-range"),
        format!("bytes 1000-70999/{}", blob.len())
    );
    assert_eq!(header(&resp, "content-length"), "70000");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &blob[1000..71000]);

    let resp = registry
        .request(Method::GET, &blob_path)
        .header("range", "bytes=999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "content-range"), format!("bytes */{}", blob.len()));
    assert_eq!(
        error_of(resp).await,
        (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID".into())
    );

    // Other repositories do not see the blob.
    let resp = registry
        .request(Method::GET, &format!("/v2/kiln/other/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN".into())
    );

    // Delete unlinks it.
    let resp = registry.request(Method::DELETE, &blob_path).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = registry.request(Method::GET, &blob_path).send().await.unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN".into())
    );

    assert!(registry.leftover_uploads().is_empty());
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_digest_is_refused_and_the_upload_discarded() {
    let registry = TestRegistry::start().await;
    let blob = b"the real content".to_vec();
    let claimed = Digest::of(b"something else").to_string();

    // Session upload, body in the final PUT.
    let resp = registry
        .request(Method::POST, "/v2/kiln/bad/blobs/uploads/")
        .send()
        .await
        .unwrap();
    let location = header(&resp, "location");
    let resp = registry
        .request(Method::PUT, &format!("{location}?digest={claimed}"))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    let resp = registry.request(Method::GET, &location).send().await.unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN".into())
    );

    // Monolithic upload.
    let resp = registry
        .request(
            Method::POST,
            &format!("/v2/kiln/bad/blobs/uploads/?digest={claimed}"),
        )
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );

    // Neither digest is stored, nothing is left behind.
    for digest in [claimed.clone(), Digest::of(&blob).to_string()] {
        let resp = registry
            .request(Method::HEAD, &format!("/v2/kiln/bad/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
    assert!(
        registry.leftover_uploads().is_empty(),
        "{:?}",
        registry.leftover_uploads()
    );
    assert!(std::fs::read_dir(registry.root.path().join("blobs/sha256"))
        .unwrap()
        .next()
        .is_none());

    // Unsupported and malformed digests.
    let sha512 = format!("sha512:{}", "a".repeat(128));
    for digest in [sha512.as_str(), "sha256:short", "nonsense"] {
        let resp = registry
            .request(
                Method::POST,
                &format!("/v2/kiln/bad/blobs/uploads/?digest={digest}"),
            )
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(resp).await,
            (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into()),
            "{digest}"
        );
        let resp = registry
            .request(Method::GET, &format!("/v2/kiln/bad/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(resp).await,
            (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into()),
            "{digest}"
        );
    }
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_uploads_are_gone() {
    let registry = TestRegistry::start().await;
    let resp = registry
        .request(Method::POST, "/v2/kiln/cancel/blobs/uploads/")
        .send()
        .await
        .unwrap();
    let location = header(&resp, "location");
    let resp = registry
        .request(Method::PATCH, &location)
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&resp, "range"), "0-999");
    assert_eq!(registry.leftover_uploads().len(), 1);

    // The session belongs to its repository.
    let foreign = location.replace("/kiln/cancel/", "/kiln/other/");
    let resp = registry.request(Method::GET, &foreign).send().await.unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN".into())
    );

    let resp = registry.request(Method::DELETE, &location).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(registry.leftover_uploads().is_empty());
    let resp = registry
        .request(Method::PATCH, &location)
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN".into())
    );
    let resp = registry
        .request(Method::PATCH, "/v2/kiln/cancel/blobs/uploads/not-a-uuid")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN".into())
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_repository_mounts_need_the_blob_in_the_source() {
    let registry = TestRegistry::start().await;
    let blob = oci_layout::random_bytes(4096);
    let digest = registry.push_blob("kiln/source", &blob).await;

    let resp = registry
        .request(
            Method::POST,
            &format!("/v2/kiln/target/blobs/uploads/?mount={digest}&from=kiln/source"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/kiln/target/blobs/{digest}")
    );
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    let resp = registry
        .request(Method::GET, &format!("/v2/kiln/target/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), blob.as_slice());

    // From a repository that does not have it: a normal upload session starts instead.
    let resp = registry
        .request(
            Method::POST,
            &format!("/v2/kiln/third/blobs/uploads/?mount={digest}&from=kiln/elsewhere"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert!(header(&resp, "location").starts_with("/v2/kiln/third/blobs/uploads/"));
    let resp = registry
        .request(Method::HEAD, &format!("/v2/kiln/third/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_verified_before_they_are_stored() {
    let registry = TestRegistry::start().await;
    let repo = "kiln/manifests";
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_digest = registry.push_blob(repo, config).await;
    let missing = Digest::of(b"never pushed").to_string();
    let manifest = |layer: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer, "size": 12}],
        }))
        .unwrap()
    };

    // A layer that is not in the repository.
    let resp = registry
        .put_manifest(repo, "v1", OCI_MANIFEST, &manifest(&missing))
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN".into())
    );
    // The layer exists, but in another repository.
    let layer = b"layer bytes!";
    let elsewhere = registry.push_blob("kiln/elsewhere", layer).await;
    let resp = registry
        .put_manifest(repo, "v1", OCI_MANIFEST, &manifest(&elsewhere))
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN".into())
    );

    let layer_digest = registry.push_blob(repo, layer).await;
    let good = manifest(&layer_digest);
    let good_digest = Digest::of(&good).to_string();
    // Pushed by a digest that is not its own.
    let resp = registry.put_manifest(repo, &missing, OCI_MANIFEST, &good).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    // Content-Type that disagrees with the body, or is not a manifest type.
    for ct in ["application/vnd.oci.image.index.v1+json", "text/plain"] {
        let resp = registry.put_manifest(repo, "v1", ct, &good).await;
        assert_eq!(
            error_of(resp).await,
            (StatusCode::BAD_REQUEST, "MANIFEST_INVALID".into()),
            "{ct}"
        );
    }
    let resp = registry
        .put_manifest(repo, "v1", OCI_MANIFEST, b"{not json")
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID".into())
    );
    // Too large.
    let huge = vec![b' '; 4 * 1024 * 1024 + 1];
    let resp = registry.put_manifest(repo, "v1", OCI_MANIFEST, &huge).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "MANIFEST_INVALID".into())
    );
    // Nothing above created a tag.
    let resp = registry
        .request(Method::GET, &format!("/v2/{repo}/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );

    // A good push by digest, then by tag.
    let resp = registry
        .put_manifest(repo, &good_digest, OCI_MANIFEST, &good)
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = registry.put_manifest(repo, "v1", OCI_MANIFEST, &good).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/{repo}/manifests/{good_digest}")
    );
    assert_eq!(header(&resp, "docker-content-digest"), good_digest);
    for reference in ["v1", good_digest.as_str()] {
        let resp = registry
            .request(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))
            .header("accept", "application/vnd.docker.distribution.manifest.v2+json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&resp, "docker-content-digest"), good_digest);
        assert_eq!(resp.bytes().await.unwrap().as_ref(), good.as_slice());
    }

    // An index whose child is not in the repository, then one whose child is.
    let index = |child: &str, size: usize| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": size,
                           "platform": {"architecture": "amd64", "os": "linux"}}],
        }))
        .unwrap()
    };
    let resp = registry
        .put_manifest(repo, "multi", OCI_INDEX, &index(&missing, 10))
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN".into())
    );
    // A blob is not a manifest.
    let resp = registry
        .put_manifest(repo, "multi", OCI_INDEX, &index(&layer_digest, layer.len()))
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN".into())
    );
    let resp = registry
        .put_manifest(repo, "multi", OCI_INDEX, &index(&good_digest, good.len()))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    // Delete by digest: the manifest and its tag go.
    let resp = registry
        .request(Method::DELETE, &format!("/v2/{repo}/manifests/{good_digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    for reference in ["v1", good_digest.as_str()] {
        let resp = registry
            .request(Method::HEAD, &format!("/v2/{repo}/manifests/{reference}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{reference}");
    }
    let resp = registry
        .request(Method::DELETE, &format!("/v2/{repo}/manifests/{good_digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_invalid_names() {
    let registry = TestRegistry::start().await;
    let resp = registry
        .request(Method::GET, "/v2/kiln/nothing-here/tags/list")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN".into())
    );
    let resp = registry
        .request(Method::GET, "/v2/kiln/nothing-here/manifests/latest")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN".into())
    );

    for bad in [
        "/v2/Kiln/Upper/tags/list",
        "/v2/kiln/-dash/blobs/uploads/",
        "/v2/a/_hidden/manifests/x",
        "/v2/a..b/manifests/x",
    ] {
        let resp = registry.request(Method::POST, bad).send().await.unwrap();
        assert_eq!(
            error_of(resp).await,
            (StatusCode::BAD_REQUEST, "NAME_INVALID".into()),
            "{bad}"
        );
    }
    let resp = registry
        .request(
            Method::POST,
            "/v2/kiln/x/blobs/uploads/?mount=sha256:00&from=kiln/y",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID".into())
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_sorted_and_paginated() {
    let registry = TestRegistry::start().await;
    let repo = "kiln/paged";
    let manifest = registry.push_image(repo, "t3").await;
    for tag in ["t1", "t5", "t2", "t4"] {
        let resp = registry.put_manifest(repo, tag, OCI_MANIFEST, &manifest).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
    }

    let resp = registry
        .request(Method::GET, &format!("/v2/{repo}/tags/list"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("link").is_none());
    let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"name": repo, "tags": ["t1", "t2", "t3", "t4", "t5"]})
    );

    // Follow the Link headers two at a time.
    let mut next = Some(format!("/v2/{repo}/tags/list?n=2"));
    let mut pages = Vec::new();
    while let Some(path) = next.take() {
        let resp = registry.request(Method::GET, &path).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        if let Some(link) = resp.headers().get("link") {
            let link = link.to_str().unwrap();
            assert!(link.ends_with(">; rel=\"next\""), "{link}");
            next = Some(link[1..link.find('>').unwrap()].to_owned());
        }
        let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        pages.push(body["tags"].clone());
        assert!(pages.len() <= 3, "pagination does not end: {pages:?}");
    }
    assert_eq!(
        pages,
        vec![json!(["t1", "t2"]), json!(["t3", "t4"]), json!(["t5"])]
    );

    let resp = registry
        .request(Method::GET, &format!("/v2/{repo}/tags/list?last=t4"))
        .send()
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(body["tags"], json!(["t5"]));
    let resp = registry
        .request(Method::GET, &format!("/v2/{repo}/tags/list?n=many"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID".into())
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_of_one_blob_are_safe() {
    let registry = TestRegistry::start().await;
    let blob = oci_layout::random_bytes(512 * 1024);
    let digest = Digest::of(&blob).to_string();
    let mut uploads = Vec::new();
    for i in 0..8 {
        let url = registry.url(&format!("/v2/kiln/race{}/blobs/uploads/?digest={digest}", i % 2));
        let http = registry.http.clone();
        let body = blob.clone();
        uploads.push(tokio::spawn(async move {
            http.post(url).body(body).send().await.unwrap().status()
        }));
    }
    for upload in uploads {
        assert_eq!(upload.await.unwrap(), StatusCode::CREATED);
    }
    for repo in ["kiln/race0", "kiln/race1"] {
        let resp = registry
            .request(Method::GET, &format!("/v2/{repo}/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(Digest::of(&resp.bytes().await.unwrap()).to_string(), digest);
    }
    assert!(registry.leftover_uploads().is_empty());
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_serving_and_storage_survives_a_restart() {
    let registry = TestRegistry::start().await;
    let manifest = registry.push_image("kiln/persisted", "v1").await;
    let addr = registry.addr;
    let root = registry.root.path().to_path_buf();
    // Keep the directory: stop() consumes the registry, so move the TempDir out first.
    let TestRegistry {
        root: kept,
        stop,
        task,
        ..
    } = registry;
    let _ = stop.unwrap().send(());
    task.unwrap().await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(kiln::registry::server::serve(listener, root, async move {
        let _ = stopped.await;
    }));
    let resp = http_client()
        .get(format!("http://{addr}/v2/kiln/persisted/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), manifest.as_slice());
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    drop(kept);
}
