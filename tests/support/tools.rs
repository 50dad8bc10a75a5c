//! External tools the tests drive (skopeo, ...): found on `PATH`, or installed with apt so
//! that the suite works on a fresh machine.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

/// Serialises installs within one test binary (apt's own lock, waited on below, serialises
/// them across binaries).
static INSTALLING: Mutex<()> = Mutex::new(());

/// The full path of `binary` if it is an executable file on `PATH`.
pub fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes sure `binary` is on `PATH`, installing Debian's `debian_package` with apt-get if it
/// is not (refreshing the package lists first if the plain install fails). Panics if the
/// binary is still missing afterwards.
pub fn ensure_installed(binary: &str, debian_package: &str) {
    let _guard = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if find_on_path(binary).is_some() {
        return;
    }
    eprintln!("{binary} not found on PATH: installing Debian package {debian_package}");
    if !apt_get(&["install", "-y", debian_package]) {
        assert!(apt_get(&["update"]), "apt-get update failed");
        assert!(
            apt_get(&["install", "-y", debian_package]),
            "apt-get install -y {debian_package} failed"
        );
    }
    assert!(
        find_on_path(binary).is_some(),
        "installed {debian_package}, but {binary} is still not on PATH"
    );
}

fn apt_get(args: &[&str]) -> bool {
    let status = Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=600", "-q"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match status {
        Ok(status) => status.success(),
        Err(e) => panic!("cannot run apt-get: {e}"),
    }
}
