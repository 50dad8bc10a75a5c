//! Fuzz target: tar extraction, the two places Kiln unpacks archives it did not make:
//! pulled layers (`kiln::engine::layers::fuzz_unpack`: plain, gzip or zstd by magic bytes,
//! into a fresh temporary directory, panicking if anything was written beside it) and
//! uploaded build contexts (`kiln::engine::context::upload::unpack_tar`, checked the same
//! way here). Malformed or hostile archives (`..`, absolute names, symlink chains, hard links
//! out, devices) must give an error or stay inside the destination.
#![no_main]

use std::{ffi::OsString, fs};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln::engine::layers::fuzz_unpack(data);

    let sandbox = tempfile::tempdir().expect("a temporary directory");
    let dest = sandbox.path().join("dest");
    let _ = kiln::engine::context::upload::unpack_tar(data, &dest);
    let beside: Vec<OsString> = fs::read_dir(sandbox.path())
        .expect("listing the sandbox")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|name| name != "dest")
        .collect();
    assert!(
        beside.is_empty(),
        "context unpack wrote outside its destination: {beside:?}"
    );
    // Read-only directories (mode 0o555 and the like) from the archive must not stop the
    // clean-up of the next run's space.
    make_writable(&dest);
});

/// Gives every directory under `dir` (not following symlinks) owner rwx, so that removal works.
fn make_writable(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(meta.permissions().mode() | 0o700));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}
