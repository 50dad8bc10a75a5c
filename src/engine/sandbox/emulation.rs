//! Whether a RUN for another architecture than the host's can run here: through qemu-user
//! emulation registered in binfmt_misc, which the kernel applies when the command's ELF
//! binary is of a foreign architecture. The sandbox runs such a command exactly as a native
//! one (same namespaces, seccomp, capabilities); the kernel starts the registered
//! interpreter in its place.
//!
//! The handler must be registered with the `F` ("fix binary") flag: the kernel then opens the
//! interpreter when it is registered, so it works inside the step's root, which has no qemu
//! of its own (Debian's `qemu-user-static` registers so through systemd-binfmt). The
//! registration is the host's (binfmt_misc of the initial user namespace, which the
//! sandbox's user namespaces see): Kiln checks it and never changes it.

use std::path::{Path, PathBuf};

use crate::registry::Platform;

/// Where binfmt_misc is mounted.
pub const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

/// Why a RUN for `target` cannot run on this `host`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("RUN for {target} on a {host} host needs qemu-user emulation: {missing}")]
pub struct EmulationUnavailable {
    pub target: String,
    pub host: String,
    /// The missing piece and how to add it.
    pub missing: String,
}

/// The binfmt_misc handler name (`qemu-<name>`, as Debian, systemd-binfmt and
/// tonistiigi/binfmt name them) for an OCI architecture; `None` for one qemu-user does not
/// emulate.
fn qemu_name(platform: &Platform) -> Option<&'static str> {
    Some(match platform.architecture.as_str() {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "arm" => "arm",
        "386" => "i386",
        "ppc64le" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64le" => "mips64el",
        "loong64" => "loongarch64",
        _ => return None,
    })
}

/// Whether commands for `target` run on `host` without emulation: the same architecture,
/// or 32-bit x86 on amd64 (the CPU runs it natively).
pub fn native(target: &Platform, host: &Platform) -> bool {
    target.os == host.os
        && (target.architecture == host.architecture
            || (host.architecture == "amd64" && target.architecture == "386"))
}

/// Checks that RUN for `target` can run on `host` (through `binfmt_misc`, normally
/// [`BINFMT_MISC`]): natively, or through an enabled qemu handler with the `F` flag.
pub fn check(target: &Platform, host: &Platform, binfmt_misc: &Path) -> Result<(), EmulationUnavailable> {
    if native(target, host) {
        return Ok(());
    }
    let unavailable = |missing: String| EmulationUnavailable {
        target: target.to_string(),
        host: host.to_string(),
        missing,
    };
    if target.os != "linux" {
        return Err(unavailable(format!("{} commands cannot run on Linux", target.os)));
    }
    let Some(name) = qemu_name(target) else {
        return Err(unavailable(format!(
            "qemu-user has no emulator for the {} architecture",
            target.architecture
        )));
    };
    let register = format!(
        "install qemu-user-static (apt-get install qemu-user-static) and register qemu-{name} in \
         binfmt_misc with the F flag (systemctl restart systemd-binfmt, or write the line of \
         /usr/lib/binfmt.d/qemu-{name}.conf to {}/register)",
        binfmt_misc.display()
    );
    let status = std::fs::read_to_string(binfmt_misc.join("status"));
    match status.as_deref().map(str::trim) {
        Ok("enabled") => {}
        Ok(_) => {
            return Err(unavailable(format!(
                "binfmt_misc is disabled (echo 1 > {}/status)",
                binfmt_misc.display()
            )))
        }
        Err(_) => {
            return Err(unavailable(format!(
                "binfmt_misc is not mounted at {0} (mount -t binfmt_misc binfmt_misc {0}); then {register}",
                binfmt_misc.display()
            )))
        }
    }
    let entry: PathBuf = binfmt_misc.join(format!("qemu-{name}"));
    let Ok(text) = std::fs::read_to_string(&entry) else {
        return Err(unavailable(format!(
            "no qemu-{name} handler is registered: {register}"
        )));
    };
    let enabled = text.lines().next().map(str::trim) == Some("enabled");
    let flags = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("flags:"))
        .unwrap_or("")
        .trim();
    if !enabled {
        return Err(unavailable(format!(
            "the qemu-{name} handler is disabled (echo 1 > {})",
            entry.display()
        )));
    }
    if !flags.contains('F') {
        return Err(unavailable(format!(
            "the qemu-{name} handler is registered without the F flag (flags: {flags:?}), so its \
             interpreter is not reachable inside the step's root: {register}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(s: &str) -> Platform {
        s.parse().unwrap()
    }

    fn binfmt(status: Option<&str>, entries: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        if let Some(status) = status {
            std::fs::write(dir.path().join("status"), status).unwrap();
        }
        for (name, text) in entries {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    const AARCH64_F: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n\
                             flags: OCF\noffset 0\nmagic 7f454c46\n";

    #[test]
    fn the_hosts_own_architecture_and_386_on_amd64_need_nothing() {
        let none = Path::new("/nonexistent/binfmt_misc");
        let amd64 = platform("linux/amd64");
        assert!(check(&amd64, &amd64, none).is_ok());
        assert!(check(&platform("linux/386"), &amd64, none).is_ok());
        assert!(!native(&platform("linux/arm64"), &amd64));
    }

    #[test]
    fn a_registered_handler_with_the_f_flag_is_enough() {
        let dir = binfmt(Some("enabled\n"), &[("qemu-aarch64", AARCH64_F)]);
        check(&platform("linux/arm64"), &platform("linux/amd64"), dir.path()).unwrap();
    }

    #[test]
    fn each_missing_piece_is_named() {
        let (arm64, amd64) = (platform("linux/arm64"), platform("linux/amd64"));
        let err = |dir: &Path| check(&arm64, &amd64, dir).unwrap_err().to_string();
        let unmounted = err(Path::new("/nonexistent/binfmt_misc"));
        assert!(
            unmounted.starts_with("RUN for linux/arm64 on a linux/amd64 host needs qemu-user emulation: binfmt_misc is not mounted"),
            "{unmounted}"
        );
        assert!(unmounted.contains("qemu-user-static"), "{unmounted}");
        let dir = binfmt(Some("enabled\n"), &[]);
        assert!(err(dir.path()).contains("no qemu-aarch64 handler is registered: install qemu-user-static"));
        let dir = binfmt(Some("disabled\n"), &[("qemu-aarch64", AARCH64_F)]);
        assert!(err(dir.path()).contains("binfmt_misc is disabled"));
        let dir = binfmt(
            Some("enabled\n"),
            &[("qemu-aarch64", &AARCH64_F.replace("enabled", "disabled"))],
        );
        assert!(err(dir.path()).contains("the qemu-aarch64 handler is disabled"));
        let dir = binfmt(
            Some("enabled\n"),
            &[("qemu-aarch64", &AARCH64_F.replace("OCF", "OC"))],
        );
        assert!(err(dir.path()).contains("without the F flag"));
        let windows = check(&platform("windows/amd64"), &amd64, dir.path()).unwrap_err();
        assert!(windows
            .to_string()
            .contains("windows commands cannot run on Linux"));
        let odd = check(&platform("linux/sparc64"), &amd64, dir.path()).unwrap_err();
        assert!(odd
            .to_string()
            .contains("no emulator for the sparc64 architecture"));
    }
}
