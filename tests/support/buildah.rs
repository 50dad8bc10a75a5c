//! buildah (Debian's 1.28), the peer builder the acceptance cases are checked against, run as
//! the testbed's `buildah-baseline.sh` runs it: `--isolation chroot`, `--storage-driver
//! overlay`, `--layers`, `--force-rm`, `--format docker` (buildah's OCI format drops SHELL,
//! HEALTHCHECK and ONBUILD from the config), `--build-arg BASE_REGISTRY=...`, its own
//! `--root`/`--runroot`, and a `registries.conf` with no unqualified-search registries in which
//! the loopback registry is insecure (plain HTTP). The result is pushed with
//! `--tls-verify=false`.
//!
//! Cold vs warm: a [`BuildahStorage`] is one storage root. A cold build starts from empty
//! storage (the base is pulled from the registry, no layer cache): [`buildah_build`] or
//! [`BuildahStorage::wipe`] first. A warm build reuses the storage the previous build left
//! (layer cache hits).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Mutex,
    time::Instant,
};

use super::{base_images::safe_rmtree, tools};

/// What one build produced.
#[derive(Debug, Clone)]
pub struct BuildahResult {
    /// `sha256:...` of the manifest as pushed.
    pub digest: String,
    /// Wall time of `buildah bud`.
    pub seconds: f64,
    /// Wall time of `buildah push`.
    pub push_seconds: f64,
    /// buildah's output (stdout and stderr) of the build.
    pub log: String,
}

/// Storage driver: overlay unless `KILN_TEST_BUILDAH_DRIVER` says otherwise (e.g. `vfs`).
pub fn storage_driver() -> String {
    std::env::var("KILN_TEST_BUILDAH_DRIVER").unwrap_or_else(|_| "overlay".into())
}

/// Installs buildah (and skopeo) with apt when missing.
pub fn ensure_buildah() {
    tools::ensure_installed("buildah", "buildah");
    tools::ensure_installed("skopeo", "skopeo");
}

/// One buildah storage root (`--root DIR/root --runroot DIR/run`) plus its registries.conf.
pub struct BuildahStorage {
    dir: PathBuf,
    /// Wiped and deleted on drop.
    temporary: bool,
    /// One build at a time per storage (the registries.conf is rewritten per build).
    lock: Mutex<()>,
}

impl BuildahStorage {
    /// Fresh storage under `/var/tmp` (overlay needs a filesystem that overlayfs accepts as
    /// upper dir; /var/tmp is on the root ext4), wiped and deleted on drop.
    pub fn temporary() -> Self {
        ensure_buildah();
        let dir = tempfile::Builder::new()
            .prefix("kiln-test-buildah-")
            .tempdir_in("/var/tmp")
            .expect("creating a buildah storage dir")
            .keep();
        Self {
            dir,
            temporary: true,
            lock: Mutex::new(()),
        }
    }

    /// Storage in `dir`, kept on drop (a warm cache across runs).
    pub fn at(dir: &Path) -> Self {
        ensure_buildah();
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self {
            dir: dir.to_owned(),
            temporary: false,
            lock: Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn base_command(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(self.dir.join("storage/root"))
            .arg("--runroot")
            .arg(self.dir.join("storage/run"))
            .arg("--storage-driver")
            .arg(storage_driver())
            .env("CONTAINERS_REGISTRIES_CONF", self.dir.join("registries.conf"))
            .env("BUILDAH_ISOLATION", "chroot");
        cmd
    }

    /// Empties the storage (containers, images, leftover mounts): the next build is cold.
    pub fn wipe(&self) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wipe_locked();
    }

    fn wipe_locked(&self) {
        let storage = self.dir.join("storage");
        if !storage.exists() {
            return;
        }
        let _ = self.base_command().args(["rm", "--all"]).output();
        let _ = self.base_command().args(["rmi", "--all", "--force"]).output();
        safe_rmtree(&storage);
    }

    /// Builds `case_dir/Dockerfile` with `case_dir` as context: see [`BuildahStorage::build_with`].
    pub fn build(
        &self,
        case_dir: &Path,
        registry: &str,
        dest_ref: &str,
        build_args: &[(String, String)],
        target: Option<&str>,
    ) -> Result<BuildahResult, String> {
        self.build_with(
            case_dir,
            &case_dir.join("Dockerfile"),
            registry,
            dest_ref,
            build_args,
            target,
        )
    }

    /// Builds `dockerfile` with context `context_dir`, `--build-arg BASE_REGISTRY=registry`
    /// plus `build_args`, tags the image `dest_ref` and pushes it there.
    pub fn build_with(
        &self,
        context_dir: &Path,
        dockerfile: &Path,
        registry: &str,
        dest_ref: &str,
        build_args: &[(String, String)],
        target: Option<&str>,
    ) -> Result<BuildahResult, String> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        // No unqualified-search registries; the loopback registry is plain HTTP.
        fs::write(
            self.dir.join("registries.conf"),
            format!(
                "unqualified-search-registries = []\nshort-name-mode = \"enforcing\"\n\
                 [[registry]]\nlocation = \"{registry}\"\ninsecure = true\n"
            ),
        )
        .map_err(|e| e.to_string())?;

        let mut cmd = self.base_command();
        cmd.args([
            "bud",
            "--isolation",
            "chroot",
            "--layers",
            "--force-rm",
            "--tls-verify=false",
        ])
        .args(["--format", "docker"])
        .arg("--build-arg")
        .arg(format!("BASE_REGISTRY={registry}"));
        for (k, v) in build_args {
            cmd.arg("--build-arg").arg(format!("{k}={v}"));
        }
        if let Some(target) = target {
            cmd.args(["--target", target]);
        }
        cmd.arg("-f")
            .arg(dockerfile)
            .arg("-t")
            .arg(dest_ref)
            .arg(context_dir);
        let started = Instant::now();
        let out = cmd.output().map_err(|e| format!("running buildah: {e}"))?;
        let seconds = started.elapsed().as_secs_f64();
        let log = combined(&out);
        if !out.status.success() {
            return Err(format!(
                "buildah bud of {} failed ({}) after {seconds:.1} s:\n{}",
                dockerfile.display(),
                out.status,
                tail(&log, 60)
            ));
        }

        let digest_file = self.dir.join("push.digest");
        let _ = fs::remove_file(&digest_file);
        let started = Instant::now();
        let mut push = self.base_command();
        push.args(["push", "--tls-verify=false"]);
        // A Kiln server's embedded registry takes writes only with its credentials.
        let registry = dest_ref.split('/').next().unwrap_or_default();
        if let Some(kiln) = super::registry_auth::lookup(registry) {
            push.arg("--authfile").arg(&kiln.auth_file);
        }
        let out = push
            .arg("--digestfile")
            .arg(&digest_file)
            .arg(dest_ref)
            .arg(format!("docker://{dest_ref}"))
            .output()
            .map_err(|e| format!("running buildah push: {e}"))?;
        let push_seconds = started.elapsed().as_secs_f64();
        if !out.status.success() {
            return Err(format!(
                "buildah push {dest_ref} failed ({}):\n{}",
                out.status,
                combined(&out)
            ));
        }
        let digest = fs::read_to_string(&digest_file)
            .map_err(|e| format!("reading {}: {e}", digest_file.display()))?
            .trim()
            .to_owned();
        if !digest.starts_with("sha256:") {
            return Err(format!("buildah push wrote no digest: {digest:?}"));
        }
        Ok(BuildahResult {
            digest,
            seconds,
            push_seconds,
            log,
        })
    }
}

impl Drop for BuildahStorage {
    fn drop(&mut self) {
        if self.temporary {
            self.wipe_locked();
            safe_rmtree(&self.dir);
        }
    }
}

/// A cold build: fresh temporary storage (wiped afterwards), the base pulled from `registry`.
/// Builds `case_dir/Dockerfile` with `case_dir` as context and pushes it to `dest_ref`.
pub fn buildah_build(
    case_dir: &Path,
    registry: &str,
    dest_ref: &str,
    build_args: &[(String, String)],
    target: Option<&str>,
) -> Result<BuildahResult, String> {
    BuildahStorage::temporary().build(case_dir, registry, dest_ref, build_args, target)
}

fn combined(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
