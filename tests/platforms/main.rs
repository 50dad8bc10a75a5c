//! Multi-platform builds (issue 12, point 3) through `kiln execute`: a
//! `--platform linux/amd64,linux/arm64` build pushes an OCI image index whose arm64 image ran
//! its RUN under qemu-user emulation (`uname -m` → `aarch64`) and whose amd64 image ran
//! natively; a `FROM --platform=$BUILDPLATFORM` stage runs natively for both and hands its
//! file (naming `TARGETARCH`) to the target stage with `COPY --from`. The base is
//! `base/busybox-multi` (tests/support/base_images.rs: the host's busybox for amd64, Debian's
//! `busybox-static:arm64` for arm64, as one index). Everything is read back from the
//! registry: the index, each manifest, config and layer.
//!
//! The same through the Build RPC (`source.file.platforms`, Kiln's field 104) on a real
//! `kiln serve`: the workspace image is the index, copied whole from the base repository.
//!
//! Needs root (the sandbox), an amd64 host and qemu-aarch64 registered in binfmt_misc with
//! the F flag (`scripts/test` registers it). Without them the test fails unless
//! `KILN_TEST_ALLOW_SKIP` names `qemu` (or `sandbox` for root), as tests/support/skip.rs
//! says.

#[path = "../support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::Path,
    process::{Command, Output, Stdio},
};

use kiln::{
    engine::sandbox::emulation,
    proto::builder::{
        build_source, BuildRequest, BuildSource, BuildSourceDockerfile, BuildStatus, UploadContextRequest,
    },
    registry::Platform,
};
use serde_json::Value;
use support::{
    base_images,
    docker_registry::DockerRegistry,
    kiln::{KilnOptions, KilnServer},
    skip,
};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Why the test cannot run here, if it cannot.
fn cannot_run() -> Option<(&'static str, String)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(("sandbox", "RUN's sandbox needs root".into()));
    }
    let host = Platform::host();
    if host != Platform::linux_amd64() {
        return Some((
            "qemu",
            format!("the arm64 base image is made for an amd64 host, not {host}"),
        ));
    }
    let arm64: Platform = "linux/arm64".parse().unwrap();
    emulation::check(&arm64, &host, Path::new(emulation::BINFMT_MISC))
        .err()
        .map(|e| ("qemu", e.to_string()))
}

/// `kiln execute` of `dockerfile` (a context holding only it) with `args`.
fn kiln_execute(dockerfile: &str, args: &[&str]) -> Output {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("execute")
        .arg("--context")
        .arg(&context)
        .arg("--data-dir")
        .arg(work.path().join("data"))
        .args(["--network", "none"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running kiln execute")
}

fn text(output: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The registry's plain-HTTP API of repository `repo`.
struct Repo {
    base: String,
    http: reqwest::Client,
}

impl Repo {
    fn new(registry: &str, repo: &str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            base: format!("http://{registry}/v2/{repo}"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    /// A manifest (or index) by tag or digest, with its media type.
    async fn manifest(&self, reference: &str) -> (String, Value) {
        let response = self
            .http
            .get(format!("{}/manifests/{reference}", self.base))
            .header("Accept", format!("{INDEX}, {MANIFEST}"))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{reference}: {}",
            response.status()
        );
        let media_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        (
            media_type,
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap(),
        )
    }

    async fn blob(&self, digest: &str) -> Vec<u8> {
        let response = self
            .http
            .get(format!("{}/blobs/{digest}", self.base))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{digest}: {}", response.status());
        response.bytes().await.unwrap().to_vec()
    }

    /// The image config and the regular files of the image `manifest` names (path → text,
    /// later layers winning).
    async fn image(&self, manifest: &Value) -> (Value, BTreeMap<String, String>) {
        let config = self.blob(manifest["config"]["digest"].as_str().unwrap()).await;
        let mut files = BTreeMap::new();
        for layer in manifest["layers"].as_array().unwrap() {
            let blob = self.blob(layer["digest"].as_str().unwrap()).await;
            let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
            for entry in archive.entries().unwrap() {
                let mut entry = entry.unwrap();
                if entry.header().entry_type().is_file() {
                    let path = entry.path().unwrap().to_string_lossy().into_owned();
                    let mut content = String::new();
                    if entry.read_to_string(&mut content).is_ok() {
                        files.insert(path, content);
                    }
                }
            }
        }
        (serde_json::from_slice(&config).unwrap(), files)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_list_pushes_an_index_whose_arm64_image_ran_under_emulation() {
    if let Some((what, reason)) = cannot_run() {
        skip::allow_or_fail(what, &reason);
        return;
    }
    let registry = DockerRegistry::start();
    let base = base_images::ensure_multiarch_busybox(registry.addr());
    let dockerfile = "ARG BASE\n\
         FROM --platform=$BUILDPLATFORM $BASE AS tools\n\
         ARG TARGETARCH\n\
         ARG TARGETPLATFORM\n\
         RUN echo \"built on $(uname -m) for $TARGETARCH ($TARGETPLATFORM)\" > /cross\n\
         FROM $BASE\n\
         ARG TARGETARCH\n\
         ARG BUILDPLATFORM\n\
         RUN uname -m > /arch && echo \"$TARGETARCH on $BUILDPLATFORM\" > /args\n\
         COPY --from=tools /cross /cross\n";
    let destination = format!("{}/out/multi:latest", registry.addr());
    let output = kiln_execute(
        dockerfile,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--destination",
            &destination,
            "--build-arg",
            &format!("BASE={base}"),
        ],
    );
    assert!(output.status.success(), "{}", text(&output));

    let repo = Repo::new(registry.addr(), "out/multi");
    let (media_type, index) = repo.manifest("latest").await;
    assert_eq!(media_type, INDEX, "{index}");
    assert_eq!(index["mediaType"], INDEX);
    let entries = index["manifests"].as_array().unwrap();
    let platforms: Vec<String> = entries
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["platform"]["os"].as_str().unwrap(),
                e["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"], "{index}");
    let expected = [("amd64", "x86_64"), ("arm64", "aarch64")];
    for (entry, (arch, machine)) in entries.iter().zip(expected) {
        assert_eq!(entry["mediaType"], MANIFEST);
        let digest = entry["digest"].as_str().unwrap();
        let (media_type, manifest) = repo.manifest(digest).await;
        assert_eq!(media_type, MANIFEST);
        let (config, files) = repo.image(&manifest).await;
        assert_eq!(config["architecture"], arch, "{config}");
        assert_eq!(config["os"], "linux", "{config}");
        assert_eq!(
            files.get("arch").map(|s| s.trim()),
            Some(machine),
            "{arch}: {:?}",
            files.keys()
        );
        assert_eq!(
            files.get("args").map(|s| s.trim()),
            Some(format!("{arch} on linux/amd64").as_str()),
            "{arch}"
        );
        // The tools stage ran natively (x86_64) for both targets, knowing the target.
        assert_eq!(
            files.get("cross").map(|s| s.trim()),
            Some(format!("built on x86_64 for {arch} (linux/{arch})").as_str()),
            "{arch}"
        );
    }
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("building for linux/arm64"), "{log}");

    // One platform pushes a plain manifest, as before.
    let single = format!("{}/out/single:latest", registry.addr());
    let output = kiln_execute(
        dockerfile,
        &[
            "--platform",
            "linux/arm64",
            "--destination",
            &single,
            "--build-arg",
            &format!("BASE={base}"),
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    let repo = Repo::new(registry.addr(), "out/single");
    let (media_type, manifest) = repo.manifest("latest").await;
    assert_eq!(media_type, MANIFEST);
    let (config, files) = repo.image(&manifest).await;
    assert_eq!(config["architecture"], "arm64");
    assert_eq!(files.get("arch").map(|s| s.trim()), Some("aarch64"));
}

#[test]
fn bad_platforms_fail_naming_the_flag_or_the_line() {
    // Refused before any image is pulled or RUN runs: no registry, no root needed.
    let destination = "127.0.0.1:1/out/x:latest";
    for (dockerfile, args, wanted) in [
        (
            "FROM scratch\n",
            vec!["--platform", "linux/../arm64"],
            "--platform: invalid platform \"linux/../arm64\"",
        ),
        (
            "FROM scratch\n",
            vec!["--platform", "linux/arm64,linux/arm64"],
            "--platform: linux/arm64 is given twice",
        ),
        (
            "FROM --platform=linux/../../etc scratch\n",
            vec![],
            "Dockerfile line 1: FROM --platform: invalid platform",
        ),
        (
            "\nFROM --platform=garbage scratch\n",
            vec![],
            "Dockerfile line 2: FROM --platform: invalid platform \"garbage\"",
        ),
    ] {
        let mut all = args.clone();
        all.extend(["--destination", destination]);
        let output = kiln_execute(dockerfile, &all);
        let shown = text(&output);
        assert!(!output.status.success(), "{dockerfile:?} {args:?}: {shown}");
        assert!(
            shown.contains(wanted),
            "{dockerfile:?} {args:?}: wanted {wanted:?} in {shown}"
        );
    }
}

/// An uncompressed tar of one file, `Dockerfile`.
fn dockerfile_tar(dockerfile: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .unwrap();
    builder.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_build_rpc_takes_a_platform_list_and_the_workspace_image_is_the_index() {
    if let Some((what, reason)) = cannot_run() {
        skip::allow_or_fail(what, &reason);
        return;
    }
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = base_images::ensure_multiarch_busybox(kiln.registry_addr());
    let dockerfile = format!("FROM {base}\nRUN uname -m > /arch\n");
    let mut client = kiln.builder().await;
    let digest = client
        .upload_context(tokio_stream::iter([UploadContextRequest {
            chunk: dockerfile_tar(&dockerfile),
        }]))
        .await
        .unwrap()
        .into_inner()
        .digest;
    let request = |platforms: &[&str]| BuildRequest {
        source: Some(BuildSource {
            from: Some(build_source::From::File(BuildSourceDockerfile {
                context_digest: digest.clone(),
                dockerfile_path: "Dockerfile".into(),
                context_path: ".".into(),
                platforms: platforms.iter().map(|p| (*p).to_owned()).collect(),
                ..Default::default()
            })),
        }),
        triggered_by: "kiln-platforms-test".into(),
        ..Default::default()
    };
    let build = |platforms: &'static [&'static str]| {
        let request = request(platforms);
        let mut client = client.clone();
        async move {
            let mut stream = client.build(request).await.unwrap().into_inner();
            let mut last = None;
            while let Some(message) = stream.message().await.unwrap() {
                last = Some(message);
            }
            last.unwrap()
        }
    };
    let multi = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        build(&["linux/amd64", "linux/arm64"]),
    )
    .await
    .unwrap();
    assert_eq!(multi.status(), BuildStatus::DoneSuccess, "{multi:?}");
    // The default platform alone is another build (its own key, its own workspace image).
    let single = tokio::time::timeout(std::time::Duration::from_secs(300), build(&[]))
        .await
        .unwrap();
    assert_eq!(single.status(), BuildStatus::DoneSuccess, "{single:?}");
    assert_ne!(multi.r#ref, single.r#ref);

    let (repo, tag) = multi.r#ref.rsplit_once(':').unwrap();
    let repo = Repo::new(kiln.registry_addr(), repo.split_once('/').unwrap().1);
    let (media_type, index) = repo.manifest(tag).await;
    assert_eq!(media_type, INDEX, "{index}");
    let mut machines = Vec::new();
    for entry in index["manifests"].as_array().unwrap() {
        let (_, manifest) = repo.manifest(entry["digest"].as_str().unwrap()).await;
        let (config, files) = repo.image(&manifest).await;
        assert_eq!(config["architecture"], entry["platform"]["architecture"]);
        machines.push(files["arch"].trim().to_owned());
    }
    assert_eq!(machines, ["x86_64", "aarch64"]);
    let (repo, tag) = single.r#ref.rsplit_once(':').unwrap();
    let repo = Repo::new(kiln.registry_addr(), repo.split_once('/').unwrap().1);
    assert_eq!(repo.manifest(tag).await.0, MANIFEST);
}
