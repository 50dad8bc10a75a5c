//! The testbed's base images, made from Debian packages on this machine (no public registry)
//! and pushed into a test's registry: `REGISTRY/base/busybox:latest` (also `:1.35.0`, the
//! busybox version) and `REGISTRY/base/debian:bookworm`. The acceptance Dockerfiles build
//! `FROM ${BASE_REGISTRY}/base/...` on these.
//!
//! Same recipe as the testbed's `make-base-images.sh`, without umoci:
//! * busybox: `/bin/busybox` from `busybox-static`, the applet symlinks that
//!   `chroot ROOT /bin/busybox --install -s` puts in /bin, /sbin, /usr/bin and /usr/sbin, a
//!   minimal `/etc/passwd` and `/etc/group` (root, nobody/nogroup), `/tmp` and `/var/tmp` 1777,
//!   `/root` 0700. Byte-reproducible.
//! * debian: `debootstrap --variant=minbase bookworm DIR MIRROR` (MIRROR: the first `URIs:` of
//!   `/etc/apt/sources.list.d/debian.sources`), then cleaned like the official image (see
//!   [`clean_debian_rootfs`]). Not reproducible (file mtimes, dpkg logs), and slow (40-100 s),
//!   so the result is cached.
//!
//! Packing: the rootfs is one layer made by GNU tar exactly as the script makes it (names
//! sorted bytewise and fed NUL-separated with `--no-recursion`, numeric owners, posix format
//! without atime/ctime, `security.capability` xattrs; busybox also `--owner=0 --group=0
//! --mtime=@0`), gzip'd with `gzip -n`, and written with its config (`created` = 1970-01-01,
//! PATH, Cmd, the dpkg architecture, one history entry) and manifest into an OCI layout, the
//! way umoci writes them. The layer tar and the config are therefore byte-identical to the
//! script's (same diff_id, same config digest); only the gzip bytes (and so the manifest
//! digest) differ, because umoci compresses with Go's gzip.
//!
//! The layouts are cached under `/var/tmp/kiln-test-base-images` (override with
//! `KILN_TEST_BASE_IMAGES_DIR`), in a directory named after the recipe version and inputs, so a
//! fresh machine builds them once and later runs (and other test binaries) only push. A file
//! lock serialises building across processes, a `OnceLock` within one.

use std::{
    collections::HashSet,
    fs,
    io::Write,
    os::unix::{fs::PermissionsExt, io::AsRawFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
    time::Instant,
};

use super::tools;

/// Bump when the recipe changes: cached layouts of another version are not used.
pub const RECIPE_VERSION: &str = "v2";
/// Where layouts are cached unless `KILN_TEST_BASE_IMAGES_DIR` says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/tmp/kiln-test-base-images";
/// The Debian suite of the debian base image.
pub const DEBIAN_SUITE: &str = "bookworm";
/// The PATH both images set, as the script sets it.
pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const CREATED: &str = "1970-01-01T00:00:00Z";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI layout on disk holding one base image under one or more tags.
#[derive(Debug, Clone)]
pub struct BaseLayout {
    /// The layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`).
    pub dir: PathBuf,
    /// Repository in the registry, e.g. `base/busybox`.
    pub repository: String,
    /// Tags in the layout, pushed as the same tags; the first is the main one.
    pub tags: Vec<String>,
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
    /// `sha256:...` of the uncompressed layer.
    pub diff_id: String,
    /// `sha256:...` of the config blob.
    pub config_digest: String,
}

impl BaseLayout {
    /// `REGISTRY/REPOSITORY:TAG` of the main tag.
    pub fn reference(&self, registry: &str) -> String {
        format!("{registry}/{}:{}", self.repository, self.tags[0])
    }
}

/// `REGISTRY/base/busybox:latest`.
pub fn busybox_ref(registry: &str) -> String {
    format!("{registry}/base/busybox:latest")
}

/// `REGISTRY/base/debian:bookworm`.
pub fn debian_ref(registry: &str) -> String {
    format!("{registry}/base/debian:{DEBIAN_SUITE}")
}

/// Makes sure `REGISTRY/base/busybox:latest` (and `:1.35.0`) exist in `registry`, and with
/// `debian` also `REGISTRY/base/debian:bookworm`. Builds the layouts once per machine (cached),
/// pushes once per registry and process. Safe to call from many tests at once. Panics on
/// failure.
pub fn ensure_base_images(registry: &str, debian: bool) {
    push_once(registry, busybox_layout());
    if debian {
        push_once(registry, debian_layout());
    }
}

/// [`ensure_base_images`] for the debian image only, as a `Result`, so that a caller can gate
/// debian-based cases on it instead of failing when the machine cannot debootstrap.
pub fn try_ensure_debian(registry: &str) -> Result<(), String> {
    let layout = std::panic::catch_unwind(debian_layout).map_err(|p| panic_text(&p))?;
    std::panic::catch_unwind(|| push_once(registry, layout)).map_err(|p| panic_text(&p))
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into())
}

/// Whether `reference` (`HOST:PORT/repo:tag`) exists in its (plain-HTTP) registry.
pub fn image_exists(reference: &str) -> bool {
    let mut skopeo = Command::new("skopeo");
    skopeo.args(["inspect", "--raw", "--tls-verify=false"]);
    // A Kiln server's embedded registry may want its credentials for reads too.
    let registry = reference.split('/').next().unwrap_or_default();
    if let Some(kiln) = super::registry_auth::lookup(registry) {
        skopeo.arg("--authfile").arg(&kiln.auth_file);
    }
    skopeo
        .arg(format!("docker://{reference}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The busybox layout, built on first use (cached on disk).
pub fn busybox_layout() -> &'static BaseLayout {
    static LAYOUT: OnceLock<BaseLayout> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        ensure_busybox_static();
        let version = busybox_version();
        let key = format!("busybox-{}-{RECIPE_VERSION}", sanitize(&version.full));
        cached_layout(&key, "base/busybox", &["latest", &version.upstream], |dir| {
            build_busybox(dir, &version)
        })
    })
}

/// The debian layout, built on first use (cached on disk; 40-100 s the first time).
pub fn debian_layout() -> &'static BaseLayout {
    static LAYOUT: OnceLock<BaseLayout> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        tools::ensure_installed("debootstrap", "debootstrap");
        let mirror = host_mirror();
        let sources = fs::read_to_string(DEBIAN_SOURCES).unwrap_or_default();
        let inputs = format!("{mirror}\n{sources}\n{}", apt_date_overrides());
        let key = format!(
            "debian-{DEBIAN_SUITE}-{RECIPE_VERSION}-{}",
            &sha256_hex(inputs.as_bytes())[..12]
        );
        cached_layout(&key, "base/debian", &[DEBIAN_SUITE], |dir| {
            build_debian(dir, &mirror)
        })
    })
}

/// The cache directory (created).
pub fn cache_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_TEST_BASE_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

// ---------------------------------------------------------------------------------------
// pushing

fn push_once(registry: &str, layout: &BaseLayout) {
    static PUSHED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut pushed = PUSHED.lock().unwrap_or_else(|p| p.into_inner());
    let pushed = pushed.get_or_insert_with(HashSet::new);
    let key = format!("{registry} {} {}", layout.dir.display(), layout.manifest_digest);
    // The address alone does not name a registry: a test's registry that stopped frees its
    // port for the next one, which starts empty. So a push remembered is checked too.
    let first = layout
        .tags
        .first()
        .map(|tag| format!("{registry}/{}:{tag}", layout.repository));
    if pushed.contains(&key) && first.as_deref().is_some_and(image_exists) {
        return;
    }
    tools::ensure_installed("skopeo", "skopeo");
    for tag in &layout.tags {
        let dest = format!("{registry}/{}:{tag}", layout.repository);
        let mut skopeo = Command::new("skopeo");
        skopeo.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        // A Kiln server's embedded registry takes writes only with its credentials.
        if let Some(kiln) = super::registry_auth::lookup(registry) {
            skopeo.arg("--dest-authfile").arg(&kiln.auth_file);
        }
        let out = skopeo
            .arg(format!("oci:{}:{tag}", layout.dir.display()))
            .arg(format!("docker://{dest}"))
            .output()
            .unwrap_or_else(|e| panic!("running skopeo: {e}"));
        assert!(
            out.status.success(),
            "skopeo copy oci:{}:{tag} docker://{dest} failed: {}",
            layout.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    pushed.insert(key);
}

// ---------------------------------------------------------------------------------------
// the cache

/// The layout cached as `<cache>/<key>`, built by `build` into a scratch directory (under a
/// cross-process lock) when missing.
fn cached_layout(
    key: &str,
    repository: &str,
    tags: &[&str],
    build: impl FnOnce(&Path) -> (String, String),
) -> BaseLayout {
    let cache = cache_dir();
    let final_dir = cache.join(key);
    let _lock = FileLock::acquire(&cache.join(format!("{key}.lock")));
    if !final_dir.join("complete").exists() {
        // Leftovers of builds that died (we hold the lock, so nobody is building this key).
        if let Ok(entries) = fs::read_dir(&cache) {
            for entry in entries.filter_map(|e| e.ok()) {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{key}.partial-"))
                {
                    safe_rmtree(&entry.path());
                }
            }
        }
        let partial = cache.join(format!("{key}.partial-{}", std::process::id()));
        fs::create_dir_all(&partial).unwrap();
        let started = Instant::now();
        let (diff_id, config_digest) = build(&partial);
        fs::write(
            partial.join("complete"),
            format!("diff_id={diff_id}\nconfig={config_digest}\n"),
        )
        .unwrap();
        safe_rmtree(&final_dir);
        fs::rename(&partial, &final_dir)
            .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", partial.display(), final_dir.display()));
        eprintln!(
            "base_images: built {key} in {:.1} s ({})",
            started.elapsed().as_secs_f64(),
            final_dir.display()
        );
    }
    let complete = fs::read_to_string(final_dir.join("complete")).unwrap();
    let field = |name: &str| {
        complete
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_owned()
    };
    let layout_dir = final_dir.join("oci");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout_dir.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    BaseLayout {
        dir: layout_dir,
        repository: repository.to_owned(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        manifest_digest,
        diff_id: field("diff_id"),
        config_digest: field("config"),
    }
}

/// An exclusive `flock` on a file, released on drop.
struct FileLock(fs::File);

impl FileLock {
    fn acquire(path: &Path) -> Self {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Self(file)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

// ---------------------------------------------------------------------------------------
// busybox

struct BusyboxVersion {
    /// dpkg's version, e.g. `1:1.35.0-4+deb12u1+b1`.
    full: String,
    /// Without epoch and Debian revision, e.g. `1.35.0`: the second tag.
    upstream: String,
}

fn ensure_busybox_static() {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if dpkg_installed("busybox-static") {
        return;
    }
    // Not tools::ensure_installed: the dynamically linked `busybox` package also provides a
    // `busybox` binary, and only busybox-static's runs inside an empty rootfs.
    eprintln!("base_images: installing Debian package busybox-static");
    let install = || {
        Command::new("apt-get")
            .args([
                "-o",
                "DPkg::Lock::Timeout=600",
                "-q",
                "install",
                "-y",
                "busybox-static",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600", "-q", "update"])
            .status();
        assert!(install(), "apt-get install busybox-static failed");
    }
    assert!(
        dpkg_installed("busybox-static"),
        "busybox-static still not installed"
    );
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

fn busybox_version() -> BusyboxVersion {
    let full = run_stdout(Command::new("dpkg-query").args(["-W", "-f=${Version}", "busybox-static"]));
    let full = full.trim().to_owned();
    let no_epoch = full.split_once(':').map_or(full.as_str(), |(_, v)| v);
    let upstream = no_epoch.split('-').next().unwrap_or(no_epoch).to_owned();
    BusyboxVersion { full, upstream }
}

/// Builds the busybox layout into `work/oci`; returns (diff_id, config digest).
fn build_busybox(work: &Path, version: &BusyboxVersion) -> (String, String) {
    let root = work.join("rootfs");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "home", "var/tmp", "proc", "sys", "dev",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for d in [
        "", "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "home", "var", "proc", "sys", "dev",
    ] {
        chmod(&root.join(d), 0o755);
    }
    chmod(&root.join("tmp"), 0o1777);
    chmod(&root.join("var/tmp"), 0o1777);
    chmod(&root.join("root"), 0o700);
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copying /bin/busybox");
    chmod(&root.join("bin/busybox"), 0o755);
    // The applet symlinks in their canonical places, all pointing to /bin/busybox.
    run(Command::new("chroot")
        .arg(&root)
        .args(["/bin/busybox", "--install", "-s"]));
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    chmod(&root.join("etc/passwd"), 0o644);
    chmod(&root.join("etc/group"), 0o644);
    let result = pack_rootfs(
        &root,
        work,
        &["latest", &version.upstream],
        &format!("busybox-static {} rootfs (make-base-images.sh)", version.upstream),
        "sh",
        &["--owner=0", "--group=0", "--mtime=@0"],
        &host_arch(),
    );
    safe_rmtree(&root);
    result
}

// ---------------------------------------------------------------------------------------
// multi-platform busybox

/// The applets the arm64 busybox image links (its binary cannot be run here to list them
/// without emulation).
const ARM64_APPLETS: [&str; 16] = [
    "sh", "uname", "cat", "echo", "ls", "mkdir", "true", "false", "test", "env", "id", "stat", "wc", "grep",
    "cp", "rm",
];

/// `REGISTRY/base/busybox-multi:latest`: an OCI image index of the host's busybox image
/// ([`busybox_layout`]) for linux/amd64 and one for linux/arm64 made from Debian's
/// `busybox-static:arm64` (downloaded with `apt-get download`, after `dpkg
/// --add-architecture arm64` when the machine lacks it). Pushed once per registry and
/// process; returns the reference. Only meaningful on an amd64 host.
pub fn ensure_multiarch_busybox(registry: &str) -> String {
    static LAYOUT: OnceLock<BaseLayout> = OnceLock::new();
    let layout = LAYOUT.get_or_init(|| {
        let amd64 = busybox_layout();
        let arm64 = arm64_busybox_layout();
        let key = format!(
            "busybox-multi-{}-{}-{RECIPE_VERSION}",
            &amd64.manifest_digest[7..19],
            &arm64.manifest_digest[7..19]
        );
        cached_layout(&key, "base/busybox-multi", &["latest"], |work| {
            build_index_layout(work, &[(amd64, "amd64"), (arm64, "arm64")])
        })
    });
    push_all_once(registry, layout);
    layout.reference(registry)
}

/// An OCI layout at `work/oci` whose one tag is an image index of `images` (each a
/// single-image layout, with its architecture); returns (`""`, index digest).
fn build_index_layout(work: &Path, images: &[(&BaseLayout, &str)]) -> (String, String) {
    let layout = work.join("oci");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut entries = Vec::new();
    for (image, arch) in images {
        for blob in fs::read_dir(image.dir.join("blobs/sha256")).unwrap() {
            let blob = blob.unwrap();
            fs::copy(blob.path(), blobs.join(blob.file_name())).unwrap();
        }
        let size = fs::metadata(image.dir.join("blobs/sha256").join(&image.manifest_digest[7..]))
            .unwrap()
            .len();
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.manifest_digest,
            "size": size,
            "platform": { "architecture": arch, "os": "linux" },
        }));
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .unwrap();
    let index_hex = sha256_hex(&index);
    fs::write(blobs.join(&index_hex), &index).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{index_hex}"),
            "size": index.len(),
            "annotations": { REF_NAME: "latest" },
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    (String::new(), format!("sha256:{index_hex}"))
}

/// `skopeo copy --all` of each tag of `layout` (an index and every image in it), once per
/// registry and process.
fn push_all_once(registry: &str, layout: &BaseLayout) {
    static PUSHED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut pushed = PUSHED.lock().unwrap_or_else(|p| p.into_inner());
    let pushed = pushed.get_or_insert_with(HashSet::new);
    let key = format!("{registry} {}", layout.dir.display());
    if pushed.contains(&key) {
        return;
    }
    tools::ensure_installed("skopeo", "skopeo");
    for tag in &layout.tags {
        let dest = format!("{registry}/{}:{tag}", layout.repository);
        let mut skopeo = Command::new("skopeo");
        skopeo.args(["copy", "--all", "--quiet", "--dest-tls-verify=false"]);
        if let Some(kiln) = super::registry_auth::lookup(registry) {
            skopeo.arg("--dest-authfile").arg(&kiln.auth_file);
        }
        run(skopeo
            .arg(format!("oci:{}:{tag}", layout.dir.display()))
            .arg(format!("docker://{dest}")));
    }
    pushed.insert(key);
}

/// The arm64 busybox layout (`base/busybox-arm64`), built on first use (cached on disk).
pub fn arm64_busybox_layout() -> &'static BaseLayout {
    static LAYOUT: OnceLock<BaseLayout> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let deb_dir = cache_dir().join("debs-arm64");
        let deb = download_arm64_busybox(&deb_dir);
        let name = deb.file_name().unwrap().to_string_lossy().into_owned();
        let applets = &sha256_hex(ARM64_APPLETS.join(" ").as_bytes())[..8];
        let key = format!("busybox-arm64-{}-{applets}-{RECIPE_VERSION}", sanitize(&name));
        cached_layout(&key, "base/busybox-arm64", &["latest"], |work| {
            build_arm64_busybox(work, &deb)
        })
    })
}

/// Downloads `busybox-static:arm64` into `dir` (once); returns the .deb's path.
fn download_arm64_busybox(dir: &Path) -> PathBuf {
    static DOWNLOAD: Mutex<()> = Mutex::new(());
    let _guard = DOWNLOAD.lock().unwrap_or_else(|p| p.into_inner());
    fs::create_dir_all(dir).unwrap();
    let _lock = FileLock::acquire(&dir.join(".lock"));
    let find = || {
        fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy().starts_with("busybox-static_")
                        && n.to_string_lossy().ends_with("_arm64.deb")
                })
            })
    };
    if let Some(deb) = find() {
        return deb;
    }
    let foreign = run_stdout(Command::new("dpkg").arg("--print-foreign-architectures"));
    if !foreign.lines().any(|a| a.trim() == "arm64") {
        eprintln!("base_images: dpkg --add-architecture arm64 (to download busybox-static:arm64)");
        run(Command::new("dpkg").args(["--add-architecture", "arm64"]));
        run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "-q", "update"]));
    }
    eprintln!("base_images: apt-get download busybox-static:arm64");
    let download = || {
        Command::new("apt-get")
            .args(["-q", "download", "busybox-static:arm64"])
            .current_dir(dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "-q", "update"]));
        assert!(download(), "apt-get download busybox-static:arm64 failed");
    }
    find().expect("apt-get download wrote no busybox-static arm64 .deb")
}

/// Builds the arm64 busybox layout into `work/oci` from `deb`; returns (diff_id, config
/// digest). Same rootfs as [`build_busybox`], with [`ARM64_APPLETS`] linked.
fn build_arm64_busybox(work: &Path, deb: &Path) -> (String, String) {
    let extracted = work.join("deb");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&extracted));
    let root = work.join("rootfs");
    for d in ["bin", "etc", "root", "tmp", "proc", "sys", "dev"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    chmod(&root.join("tmp"), 0o1777);
    chmod(&root.join("root"), 0o700);
    fs::copy(extracted.join("bin/busybox"), root.join("bin/busybox")).expect("copying the arm64 busybox");
    chmod(&root.join("bin/busybox"), 0o755);
    for applet in ARM64_APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    let result = pack_rootfs(
        &root,
        work,
        &["latest"],
        "busybox-static:arm64 rootfs",
        "sh",
        &["--owner=0", "--group=0", "--mtime=@0"],
        "arm64",
    );
    safe_rmtree(&root);
    safe_rmtree(&extracted);
    result
}

// ---------------------------------------------------------------------------------------
// debian

const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";

/// The host's Debian mirror: the first `URIs:` of debian.sources, else the first URL of a
/// `deb` line in sources.list.
pub fn host_mirror() -> String {
    if let Ok(text) = fs::read_to_string(DEBIAN_SOURCES) {
        if let Some(uri) = deb822_first(&text, "uris:") {
            return uri;
        }
    }
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() == Some("deb") {
                if let Some(url) = words.find(|w| w.contains("://")) {
                    return url.to_owned();
                }
            }
        }
    }
    panic!("no Debian mirror in {DEBIAN_SOURCES} or /etc/apt/sources.list");
}

/// The first word after `key` (lower-case, with the colon) at the start of a deb822 line.
fn deb822_first(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let first = words.next()?;
        if first.to_ascii_lowercase() == key {
            words.next().map(str::to_owned)
        } else {
            None
        }
    })
}

/// `Acquire::Check-Valid-Until` / `Acquire::Check-Date` lines of the host's apt config (the
/// script's `grep -rhsiE '^[[:space:]]*Acquire::Check-(Valid-Until|Date)[[:space:]]'`), files
/// in name order.
fn apt_date_overrides() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/apt.conf")];
    if let Ok(entries) = fs::read_dir("/etc/apt/apt.conf.d") {
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        names.sort();
        files.extend(names);
    }
    let mut out = String::new();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            let trimmed = line.trim_start().to_ascii_lowercase();
            let matches = ["acquire::check-valid-until", "acquire::check-date"]
                .iter()
                .any(|p| {
                    trimmed
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_whitespace()))
                });
            if matches {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Builds the debian layout into `work/oci`; returns (diff_id, config digest).
fn build_debian(work: &Path, mirror: &str) -> (String, String) {
    let root = work.join("rootfs");
    let debs = cache_dir().join("debootstrap-debs");
    fs::create_dir_all(&debs).unwrap();
    let log_path = work.join("debootstrap.log");
    eprintln!(
        "base_images: debootstrap --variant=minbase {DEBIAN_SUITE} from {mirror} (40-100 s; log {})",
        log_path.display()
    );
    let log = fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    let status = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--cache-dir={}", debs.display()))
        .args([DEBIAN_SUITE])
        .arg(&root)
        .arg(mirror)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap_or_else(|e| panic!("running debootstrap: {e}"));
    if !status.success() {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        safe_rmtree(&root);
        panic!(
            "debootstrap failed ({status}); last lines of {}:\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    eprintln!(
        "base_images: debootstrap took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    clean_debian_rootfs(&root, mirror);
    let result = pack_rootfs(
        &root,
        work,
        &[DEBIAN_SUITE],
        &format!("debootstrap --variant=minbase {DEBIAN_SUITE} {mirror} (make-base-images.sh)"),
        "bash",
        &[],
        &host_arch(),
    );
    safe_rmtree(&root);
    result
}

/// Makes the debootstrapped rootfs look like an official container base image, step for step
/// as `make-base-images.sh` does it.
pub fn clean_debian_rootfs(root: &Path, mirror: &str) {
    // apt: no downloaded .debs or .bin caches, no lists (but an empty lists/partial)
    for entry in walkdir::WalkDir::new(root.join("var/cache/apt"))
        .into_iter()
        .filter_map(|e| e.ok())
    {
        let name = entry.file_name().to_string_lossy();
        if entry.file_type().is_file() && (name.ends_with(".deb") || name.ends_with(".bin")) {
            fs::remove_file(entry.path()).unwrap();
        }
    }
    remove_children(&root.join("var/lib/apt/lists"), &[]);
    fs::create_dir_all(root.join("var/lib/apt/lists/partial")).unwrap();
    // empty /dev, /proc, /sys, /tmp; /run but for /run/lock (emptied)
    for d in ["dev", "proc", "sys", "tmp"] {
        remove_children(&root.join(d), &[]);
    }
    remove_children(&root.join("run"), &["lock"]);
    if root.join("run/lock").is_dir() {
        remove_children(&root.join("run/lock"), &[]);
    }
    for f in [
        "etc/resolv.conf",
        "etc/hostname",
        "var/cache/ldconfig/aux-cache",
        "var/log/bootstrap.log",
    ] {
        let p = root.join(f);
        if p.symlink_metadata().is_ok() {
            fs::remove_file(&p).unwrap_or_else(|e| panic!("removing {}: {e}", p.display()));
        }
    }
    // the other logs truncated
    for entry in walkdir::WalkDir::new(root.join("var/log"))
        .into_iter()
        .filter_map(|e| e.ok())
    {
        if entry.file_type().is_file() {
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(entry.path())
                .unwrap();
        }
    }
    // apt sources: the host's debian.sources verbatim when it is for this suite
    let _ = fs::remove_file(root.join("etc/apt/sources.list"));
    let host_sources = fs::read_to_string(DEBIAN_SOURCES).ok();
    let host_suite = host_sources.as_deref().and_then(|t| deb822_first(t, "suites:"));
    let dest = root.join("etc/apt/sources.list.d/debian.sources");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    if host_suite.as_deref() == Some(DEBIAN_SUITE) {
        fs::write(&dest, host_sources.unwrap()).unwrap();
    } else {
        let mut text = format!(
            "Types: deb\nURIs: {mirror}\nSuites: {DEBIAN_SUITE} {DEBIAN_SUITE}-updates\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
        if mirror.ends_with("/debian") {
            text.push_str(&format!(
                "\nTypes: deb\nURIs: {mirror}-security\nSuites: {DEBIAN_SUITE}-security\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ));
        }
        fs::write(&dest, text).unwrap();
    }
    chmod(&dest, 0o644);
    // debuerreotype-style apt tweaks
    let conf = root.join("etc/apt/apt.conf.d");
    fs::create_dir_all(&conf).unwrap();
    fs::write(
        conf.join("docker-clean"),
        "DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };\n\
         APT::Update::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };\n\
         Dir::Cache::pkgcache \"\";\n\
         Dir::Cache::srcpkgcache \"\";\n",
    )
    .unwrap();
    fs::write(
        conf.join("docker-gzip-indexes"),
        "Acquire::GzipIndexes \"true\";\n",
    )
    .unwrap();
    fs::write(conf.join("docker-no-languages"), "Acquire::Languages \"none\";\n").unwrap();
    fs::write(
        conf.join("docker-autoremove-suggests"),
        "APT::AutoRemove::SuggestsImportant \"false\";\n",
    )
    .unwrap();
    for f in [
        "docker-clean",
        "docker-gzip-indexes",
        "docker-no-languages",
        "docker-autoremove-suggests",
    ] {
        chmod(&conf.join(f), 0o644);
    }
    // the host's "ignore Release-file dates" settings (see the testbed README, pitfall 9)
    let overrides = apt_date_overrides();
    if !overrides.is_empty() {
        let f = conf.join("99testbed-mirror");
        fs::write(
            &f,
            format!("// copied from the build host by make-base-images.sh\n{overrides}"),
        )
        .unwrap();
        chmod(&f, 0o644);
    }
    // never start daemons from maintainer scripts during builds
    let policy = root.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\nexit 101\n").unwrap();
    chmod(&policy, 0o755);
}

/// Removes everything in `dir` except the direct children named in `keep` (no error when
/// `dir` is missing). Never crosses into mounts.
fn remove_children(dir: &Path, keep: &[&str]) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        if keep.iter().any(|k| entry.file_name() == **k) {
            continue;
        }
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            safe_rmtree(&path);
        } else {
            fs::remove_file(&path).unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// packing

/// Packs `rootfs` as the single layer of an OCI layout at `work/oci`, tagged `tags`; returns
/// (diff_id, config digest).
fn pack_rootfs(
    rootfs: &Path,
    work: &Path,
    tags: &[&str],
    created_by: &str,
    cmd: &str,
    tar_opts: &[&str],
    arch: &str,
) -> (String, String) {
    // names sorted bytewise (LC_ALL=C sort -z), NUL-separated, without a ./ prefix
    let mut names: Vec<Vec<u8>> = walkdir::WalkDir::new(rootfs)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            use std::os::unix::ffi::OsStrExt;
            let e = e.unwrap_or_else(|e| panic!("walking {}: {e}", rootfs.display()));
            e.path()
                .strip_prefix(rootfs)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec()
        })
        .collect();
    names.sort();
    let list = work.join("files.list");
    let mut f = fs::File::create(&list).unwrap();
    for n in &names {
        f.write_all(n).unwrap();
        f.write_all(b"\0").unwrap();
    }
    drop(f);
    let tar_path = work.join("layer.tar");
    run(Command::new("tar")
        .arg("--create")
        .arg("--file")
        .arg(&tar_path)
        .arg("--directory")
        .arg(rootfs)
        .args(["--null", "--no-recursion", "--files-from"])
        .arg(&list)
        .args([
            "--numeric-owner",
            "--format=posix",
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            "--xattrs",
            "--xattrs-include=security.capability",
        ])
        .args(tar_opts));
    let diff_id = format!("sha256:{}", sha256_file(&tar_path));
    let gz_path = work.join("layer.tar.gz");
    let gz = fs::File::create(&gz_path).unwrap();
    let status = Command::new("gzip")
        .args(["-n", "-6", "-c"])
        .arg(&tar_path)
        .stdout(gz)
        .status()
        .expect("running gzip");
    assert!(status.success(), "gzip failed");
    fs::remove_file(&tar_path).unwrap();
    fs::remove_file(&list).unwrap();

    let layout = work.join("oci");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let layer_hex = sha256_file(&gz_path);
    let layer_size = fs::metadata(&gz_path).unwrap().len();
    fs::rename(&gz_path, blobs.join(&layer_hex)).unwrap();

    // The config and manifest as umoci writes them (same keys, same order, Go's json.Encoder
    // newline at the end).
    let config = format!(
        "{{\"created\":\"{CREATED}\",\"architecture\":{arch},\"os\":\"linux\",\"config\":{{\"Env\":[{env}],\
         \"Cmd\":[{cmd}]}},\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[\"{diff_id}\"]}},\
         \"history\":[{{\"created\":\"{CREATED}\",\"created_by\":{created_by}}}]}}\n",
        arch = json_str(arch.trim()),
        env = json_str(&format!("PATH={IMAGE_PATH}")),
        cmd = json_str(cmd),
        created_by = json_str(created_by),
    );
    let config_hex = sha256_hex(config.as_bytes());
    fs::write(blobs.join(&config_hex), &config).unwrap();
    let manifest = format!(
        "{{\"schemaVersion\":2,\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\
         \"digest\":\"sha256:{config_hex}\",\"size\":{config_size}}},\"layers\":[{{\"mediaType\":\
         \"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:{layer_hex}\",\"size\":{layer_size}}}]}}\n",
        config_size = config.len(),
    );
    let manifest_hex = sha256_hex(manifest.as_bytes());
    fs::write(blobs.join(&manifest_hex), &manifest).unwrap();
    let entries: Vec<String> = tags
        .iter()
        .map(|tag| {
            format!(
                "{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:{manifest_hex}\",\
                 \"size\":{},\"annotations\":{{\"{REF_NAME}\":{}}}}}",
                manifest.len(),
                json_str(tag)
            )
        })
        .collect();
    fs::write(
        layout.join("index.json"),
        format!("{{\"schemaVersion\":2,\"manifests\":[{}]}}", entries.join(",")),
    )
    .unwrap();
    (diff_id, format!("sha256:{config_hex}"))
}

// ---------------------------------------------------------------------------------------
// helpers

/// dpkg's name of this machine's architecture (`amd64`, `arm64`, …), which is OCI's too.
fn host_arch() -> String {
    run_stdout(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_owned()
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_stdout(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Hex sha256 of bytes in memory.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Hex sha256 of a (possibly large) file, with `sha256sum` (fast even in debug builds).
pub fn sha256_file(path: &Path) -> String {
    let out = run_stdout(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// Deletes a directory tree that may contain mounts (an aborted debootstrap or build leaves
/// proc/sys or overlays mounted): unmounts everything below it first (lazily, deepest first)
/// and never crosses filesystems while deleting.
pub fn safe_rmtree(dir: &Path) {
    if dir.symlink_metadata().is_err() {
        return;
    }
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let s = dir.to_string_lossy();
    assert!(
        !matches!(
            s.as_ref(),
            "/" | "/usr" | "/var" | "/etc" | "/tmp" | "/var/tmp" | "/root" | "/home"
        ),
        "refusing to delete {s}"
    );
    for m in mounts_below(&dir).into_iter().rev() {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    let _ = Command::new("rm")
        .args(["-rf", "--one-file-system", "--"])
        .arg(&dir)
        .status();
}

/// Mount points strictly below `dir`, sorted.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}/", dir.display());
    let mut out: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| m.starts_with(&prefix))
        .map(PathBuf::from)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
pub fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
