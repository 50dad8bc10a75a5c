//! Layer tests against the real file system: pack/unpack round trips keeping every
//! attribute, overlayfs whiteouts and opaque directories both ways (with real overlay
//! mounts), reproducibility, hostile tars that try to escape, the shared layer store under
//! concurrency, and a mutation fuzz run of the unpacker. They need root (ownership,
//! `mknod`, `trusted.*` xattrs, `mount`).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    future::Future as _,
    io::{self, Read, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{lchown, symlink, FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use filetime::FileTime;
use kiln::{
    engine::layers::{
        fuzz_unpack, fuzz_unpack_into, pack_layer, unpack_layer, write_whiteout, BlobSource, Compression,
        LayerBlob, LayerError, LayerStore, PackOptions, MEDIA_TYPE_DOCKER_TAR_GZIP, MEDIA_TYPE_TAR,
        MEDIA_TYPE_TAR_GZIP, MEDIA_TYPE_TAR_ZSTD, OVERLAY_OPAQUE_XATTR,
    },
    model::Digest,
};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use sha2::{Digest as _, Sha256};

/// `cap_net_bind_service+ep` as `setcap` stores it (VFS_CAP_REVISION_2, effective).
const CAP_NET_BIND_SERVICE: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // magic_etc: revision 2 | effective
    0x00, 0x04, 0x00, 0x00, // permitted[0]: bit 10
    0x00, 0x00, 0x00, 0x00, // inheritable[0]
    0x00, 0x00, 0x00, 0x00, // permitted[1]
    0x00, 0x00, 0x00, 0x00, // inheritable[1]
];

fn set_times(path: &Path, secs: i64) {
    let t = FileTime::from_unix_time(secs, 0);
    filetime::set_symlink_file_times(path, t, t).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every kind of entry and attribute a layer can carry.
fn build_rich_tree(root: &Path) {
    let p = |rel: &str| root.join(rel);
    for dir in [
        "etc",
        "bin",
        "tmp",
        "dev",
        "run",
        "home/user",
        "shared",
        "usr/lib",
    ] {
        fs::create_dir_all(p(dir)).unwrap();
    }
    fs::write(p("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(p("etc/empty"), "").unwrap();
    fs::write(p("bin/su"), b"\x7fELF pretend".repeat(100)).unwrap();
    chmod(&p("bin/su"), 0o4755);
    fs::hard_link(p("bin/su"), p("bin/su-again")).unwrap();
    fs::write(p("bin/ping"), "ping").unwrap();
    chmod(&p("bin/ping"), 0o755);
    xattr::set(p("bin/ping"), "security.capability", &CAP_NET_BIND_SERVICE).unwrap();
    chmod(&p("tmp"), 0o1777);
    chmod(&p("shared"), 0o2775);
    lchown(p("shared"), Some(0), Some(1000)).unwrap();
    fs::write(p("home/user/notes"), "mine").unwrap();
    xattr::set(p("home/user/notes"), "user.x", b"1").unwrap();
    xattr::set(p("home/user"), "user.dir", b"yes").unwrap();
    for rel in ["home/user", "home/user/notes"] {
        lchown(p(rel), Some(1000), Some(1000)).unwrap();
    }
    chmod(&p("home/user"), 0o700);
    symlink("/bin/bash", p("bin/sh")).unwrap();
    symlink("usr/lib", p("lib")).unwrap();
    lchown(p("lib"), Some(1000), Some(1000)).unwrap();
    mknod(&p("run/fifo"), SFlag::S_IFIFO, Mode::from_bits_truncate(0o620), 0).unwrap();
    mknod(
        &p("dev/null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    mknod(
        &p("dev/loop0"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(7, 0),
    )
    .unwrap();
    chmod(&p("run/fifo"), 0o620);
    chmod(&p("dev/null"), 0o666);
    // Long names (PAX path / USTAR prefix), a long link target, an id USTAR cannot hold.
    let deep = "d".repeat(90) + "/" + &"e".repeat(90) + "/" + &"f".repeat(90);
    fs::create_dir_all(p(&deep)).unwrap();
    fs::write(p(&format!("{deep}/{}", "g".repeat(120))), "deep").unwrap();
    symlink("t".repeat(150), p("usr/lib/longlink")).unwrap();
    fs::write(p("usr/lib/big-id"), "x").unwrap();
    lchown(p("usr/lib/big-id"), Some(3_000_000), Some(3_000_001)).unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(p("usr/lib/big.bin"), big).unwrap();
    // Fixed times, children before parents (creating a child changes its parent's mtime).
    let mut all: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .collect();
    all.sort_by_key(|b| std::cmp::Reverse(b.components().count()));
    for (i, path) in all.iter().enumerate() {
        set_times(path, 1_500_000_000 + i as i64);
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    content: Option<String>,
    link: Option<OsString>,
    rdev: u64,
    xattrs: BTreeMap<OsString, Vec<u8>>,
}

/// Every attribute of every path under `root` (not the root itself), and the hardlink
/// groups (paths sharing an inode).
fn snapshot(root: &Path) -> (BTreeMap<PathBuf, Node>, Vec<Vec<PathBuf>>) {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1) {
        let entry = entry.unwrap();
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap().to_owned();
        let m = fs::symlink_metadata(path).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else {
            "block"
        };
        let xattrs = xattr::list(path)
            .unwrap()
            .filter(|k| !k.as_bytes().starts_with(b"trusted.overlay."))
            .map(|k| {
                let v = xattr::get(path, &k).unwrap().unwrap_or_default();
                (k, v)
            })
            .collect();
        if !ft.is_dir() {
            inodes.entry(m.ino()).or_default().push(rel.clone());
        }
        nodes.insert(
            rel,
            Node {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime(),
                size: if ft.is_dir() { 0 } else { m.size() },
                content: ft
                    .is_file()
                    .then(|| hex::encode(Sha256::digest(fs::read(path).unwrap()))),
                link: ft
                    .is_symlink()
                    .then(|| fs::read_link(path).unwrap().into_os_string()),
                rdev: m.rdev(),
                xattrs,
            },
        );
    }
    let groups = inodes
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    (nodes, groups)
}

fn tar_entries(blob: &Path, media_type: &str) -> Vec<(String, tar::EntryType)> {
    let data = fs::read(blob).unwrap();
    let kind = kiln::engine::layers::LayerCompression::from_media_type(media_type).unwrap();
    let mut archive = tar::Archive::new(kind.decoder(&data[..]).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.header().entry_type(),
            )
        })
        .collect()
}

fn round_trip(compression: Compression) {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    build_rich_tree(&upper);
    let opts = PackOptions {
        compression,
        source_date_epoch: None,
    };
    let blob = tmp.path().join("layer");
    let packed = pack_layer(&upper, &opts, &blob).unwrap();
    assert_eq!(packed.digest, Digest::of(&fs::read(&blob).unwrap()));
    assert_eq!(packed.media_type, compression.media_type());

    let names: Vec<String> = tar_entries(&blob, packed.media_type)
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert!(names.contains(&"etc/".to_owned()) && names.contains(&"etc/passwd".to_owned()));
    assert!(names.iter().all(|n| !n.starts_with('/') && !n.starts_with("./")));

    let unpacked = tmp.path().join("unpacked");
    let stats = unpack_layer(fs::File::open(&blob).unwrap(), packed.media_type, &unpacked).unwrap();
    assert_eq!(stats.diff_id, packed.diff_id);
    assert_eq!(stats.tar_bytes, packed.uncompressed_size);
    assert_eq!(stats.xattr_warnings, 0);

    let (want, want_links) = snapshot(&upper);
    let (got, got_links) = snapshot(&unpacked);
    assert_eq!(want.len(), got.len());
    for (path, node) in &want {
        assert_eq!(Some(node), got.get(path), "{}", path.display());
    }
    assert_eq!(want_links, got_links);
    assert_eq!(
        want_links,
        vec![vec![PathBuf::from("bin/su"), PathBuf::from("bin/su-again")]]
    );
    let su = &got[Path::new("bin/su")];
    assert_eq!((su.mode, su.uid), (0o4755, 0));
    assert_eq!(got[Path::new("tmp")].mode, 0o1777);
    assert_eq!(got[Path::new("shared")].mode, 0o2775);
    assert_eq!(
        got[Path::new("bin/ping")].xattrs[&OsString::from("security.capability")],
        CAP_NET_BIND_SERVICE
    );
    assert_eq!(got[Path::new("usr/lib/big-id")].uid, 3_000_000);

    // Packing what was unpacked gives the same layer back.
    let again = pack_layer(&unpacked, &opts, &tmp.path().join("again")).unwrap();
    assert_eq!((again.digest, again.diff_id), (packed.digest, packed.diff_id));
}

#[test]
fn gzip_round_trip_keeps_every_attribute() {
    round_trip(Compression::Gzip { level: 6 });
}

#[test]
fn zstd_round_trip_keeps_every_attribute() {
    round_trip(Compression::Zstd { level: 3 });
}

/// An overlay mount, unmounted on drop.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lowers: &[&Path], upper: Option<(&Path, &Path)>, merged: &Path) -> Self {
        let lower: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
        let mut data = format!("lowerdir={}", lower.join(":"));
        if let Some((upper, work)) = upper {
            data += &format!(",upperdir={},workdir={}", upper.display(), work.display());
        }
        nix::mount::mount(
            Some("overlay"),
            merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .unwrap_or_else(|e| panic!("mount -t overlay {data}: {e}"));
        Self(merged.to_owned())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn overlay_whiteouts_and_opaque_dirs_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |name: &str| {
        let p = tmp.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    };
    let (lower, upper, work, merged) = (d("lower"), d("upper"), d("work"), d("merged"));
    fs::write(lower.join("keep.txt"), "keep").unwrap();
    fs::write(lower.join("gone.txt"), "gone").unwrap();
    fs::create_dir(lower.join("dir")).unwrap();
    fs::write(lower.join("dir/old1"), "1").unwrap();
    fs::write(lower.join("dir/old2"), "2").unwrap();
    {
        let _mount = Overlay::mount(&[&lower], Some((&upper, &work)), &merged);
        fs::remove_file(merged.join("gone.txt")).unwrap();
        fs::remove_dir_all(merged.join("dir")).unwrap();
        fs::create_dir(merged.join("dir")).unwrap();
        fs::write(merged.join("dir/new"), "new").unwrap();
        fs::write(merged.join("added"), "added").unwrap();
    }
    let gone = fs::symlink_metadata(upper.join("gone.txt")).unwrap();
    assert!(
        gone.file_type().is_char_device() && gone.rdev() == 0,
        "overlay made a whiteout"
    );

    let blob = tmp.path().join("layer.tgz");
    let packed = pack_layer(&upper, &PackOptions::default(), &blob).unwrap();
    let entries = tar_entries(&blob, packed.media_type);
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [".wh.gone.txt", "added", "dir/", "dir/.wh..wh..opq", "dir/new"]
    );
    // Parents before children, the opaque marker right after its directory.
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert_eq!(pos("dir/.wh..wh..opq"), pos("dir/") + 1);
    assert!(entries.iter().all(|(_, t)| *t != tar::EntryType::Char));
    assert!(entries
        .iter()
        .filter(|(n, _)| n.contains(".wh."))
        .all(|(_, t)| *t == tar::EntryType::Regular));

    // And back: an overlay lower directory with a whiteout device and an opaque xattr.
    let unpacked = tmp.path().join("unpacked");
    unpack_layer(fs::File::open(&blob).unwrap(), packed.media_type, &unpacked).unwrap();
    let wh = fs::symlink_metadata(unpacked.join("gone.txt")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert_eq!(
        xattr::get(unpacked.join("dir"), OVERLAY_OPAQUE_XATTR)
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(!unpacked.join(".wh.gone.txt").exists());
    assert!(!unpacked.join("dir/.wh..wh..opq").exists());

    // Overlayfs sees the same thing in the unpacked layer as in the original upper.
    let view = d("view");
    {
        let _mount = Overlay::mount(&[&unpacked, &lower], None, &view);
        let mut top: Vec<_> = fs::read_dir(&view)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        top.sort();
        assert_eq!(top, ["added", "dir", "keep.txt"]);
        let inner: Vec<_> = fs::read_dir(view.join("dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(inner, ["new"]);
    }

    // Repacking the unpacked lower directory reproduces the layer.
    let again = pack_layer(&unpacked, &PackOptions::default(), &tmp.path().join("again")).unwrap();
    assert_eq!(again.digest, packed.digest);
}

#[test]
fn hand_written_uppers_pack_whiteouts_too() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir_all(upper.join("app/cache")).unwrap();
    fs::write(upper.join("app/old"), "x").unwrap();
    write_whiteout(&upper.join("app"), "old".as_ref()).unwrap();
    kiln::engine::layers::mark_opaque(&upper.join("app/cache")).unwrap();
    let blob = tmp.path().join("l");
    let packed = pack_layer(&upper, &PackOptions::default(), &blob).unwrap();
    let names: Vec<String> = tar_entries(&blob, packed.media_type)
        .into_iter()
        .map(|e| e.0)
        .collect();
    // A whiteout takes the place of the name it deletes in the sorted walk.
    assert_eq!(
        names,
        ["app/", "app/cache/", "app/cache/.wh..wh..opq", "app/.wh.old"]
    );
}

#[test]
fn packing_is_reproducible_and_clamps_to_source_date_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    build_rich_tree(&upper);
    // Some mtimes after the epoch we will clamp to.
    set_times(&upper.join("etc/passwd"), 1_900_000_000);
    set_times(&upper.join("etc"), 1_950_000_000);
    let epoch = 1_700_000_000;
    let opts = PackOptions {
        compression: Compression::Gzip { level: 6 },
        source_date_epoch: Some(epoch),
    };
    let first = pack_layer(&upper, &opts, &tmp.path().join("one")).unwrap();

    // Touch atimes (read everything) and ctimes (chmod/chown to the same values).
    for entry in walkdir::WalkDir::new(&upper).min_depth(1) {
        let entry = entry.unwrap();
        let m = fs::symlink_metadata(entry.path()).unwrap();
        if m.is_file() {
            let mut s = Vec::new();
            fs::File::open(entry.path()).unwrap().read_to_end(&mut s).unwrap();
        }
        // chown drops setuid bits and file capabilities: put them back, as a build step would.
        let caps = xattr::get(entry.path(), "security.capability").unwrap();
        lchown(entry.path(), Some(m.uid()), Some(m.gid())).unwrap();
        if !m.file_type().is_symlink() {
            chmod(entry.path(), m.mode() & 0o7777);
        }
        if let Some(caps) = caps {
            xattr::set(entry.path(), "security.capability", &caps).unwrap();
        }
        let mtime = FileTime::from_last_modification_time(&m);
        filetime::set_symlink_file_times(entry.path(), FileTime::from_unix_time(2_000_000_000, 7), mtime)
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = pack_layer(&upper, &opts, &tmp.path().join("two")).unwrap();
    assert_eq!(
        first,
        kiln::engine::layers::PackedLayer {
            path: first.path.clone(),
            ..second.clone()
        }
    );
    assert_eq!(fs::read(&first.path).unwrap(), fs::read(&second.path).unwrap());

    // Later mtimes differing only beyond the epoch do not change the layer.
    set_times(&upper.join("etc/passwd"), 1_999_999_999);
    let third = pack_layer(&upper, &opts, &tmp.path().join("three")).unwrap();
    assert_eq!(third.digest, first.digest);
    // Without the clamp they do.
    let unclamped = PackOptions {
        source_date_epoch: None,
        ..opts
    };
    let fourth = pack_layer(&upper, &unclamped, &tmp.path().join("four")).unwrap();
    assert_ne!(fourth.digest, first.digest);

    let data = fs::read(&first.path).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&data[..]));
    let mut seen = 0;
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        assert!(h.mtime().unwrap() <= epoch as u64);
        assert_eq!(h.username_bytes(), Some(&b""[..]));
        assert_eq!(h.groupname_bytes(), Some(&b""[..]));
        if &*e.path_bytes() == b"usr/lib/big.bin" {
            assert!(h.mtime().unwrap() < epoch as u64, "earlier mtimes are kept");
        }
        seen += 1;
    }
    assert_eq!(seen, first.entries);

    // A copy of the tree elsewhere (other inodes, other creation order) packs identically.
    let copy = tmp.path().join("copy");
    copy_tree(&upper, &copy);
    let copied = pack_layer(&copy, &opts, &tmp.path().join("copied")).unwrap();
    assert_eq!(copied.digest, first.digest);
}

/// Copies a tree keeping everything `pack_layer` looks at (via a tar round trip).
fn copy_tree(from: &Path, to: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let blob = tmp.path().join("t");
    let packed = pack_layer(from, &PackOptions::default(), &blob).unwrap();
    unpack_layer(fs::File::open(&blob).unwrap(), packed.media_type, to).unwrap();
}

// ---- hostile tars ----

fn raw_header(name: &[u8], kind: tar::EntryType, link: &[u8], size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.name[..name.len()].copy_from_slice(name);
    gnu.linkname[..link.len()].copy_from_slice(link);
    h.set_cksum();
    h
}

enum E<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    /// A PAX `path` record renaming a harmless-looking entry.
    PaxPath(&'a str, &'a str),
    /// A GNU long name.
    LongName(&'a str),
}

fn hostile_tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::File(n, data) => b.append(
                &raw_header(n.as_bytes(), tar::EntryType::Regular, b"", data.len() as u64),
                *data,
            ),
            E::Dir(n) => b.append(
                &raw_header(n.as_bytes(), tar::EntryType::Directory, b"", 0),
                io::empty(),
            ),
            E::Symlink(n, t) => b.append(
                &raw_header(n.as_bytes(), tar::EntryType::Symlink, t.as_bytes(), 0),
                io::empty(),
            ),
            E::Hardlink(n, t) => b.append(
                &raw_header(n.as_bytes(), tar::EntryType::Link, t.as_bytes(), 0),
                io::empty(),
            ),
            E::PaxPath(real, shown) => {
                b.append_pax_extensions([("path", real.as_bytes())]).unwrap();
                b.append(
                    &raw_header(shown.as_bytes(), tar::EntryType::Regular, b"", 4),
                    &b"evil"[..],
                )
            }
            E::LongName(real) => {
                let mut data = real.as_bytes().to_vec();
                data.push(0);
                b.append(
                    &raw_header(
                        b"././@LongLink",
                        tar::EntryType::GNULongName,
                        b"",
                        data.len() as u64,
                    ),
                    &data[..],
                )
                .unwrap();
                b.append(
                    &raw_header(b"short", tar::EntryType::Regular, b"", 4),
                    &b"evil"[..],
                )
            }
        }
        .unwrap();
    }
    b.into_inner().unwrap()
}

/// A sandbox with `dest` to unpack into and `outside` holding a file that must survive.
struct Sandbox {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dest: PathBuf,
    outside: PathBuf,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let outside = root.join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), "secret").unwrap();
        Self {
            dest: root.join("dest"),
            root,
            outside,
            _tmp: tmp,
        }
    }

    fn outside_str(&self) -> String {
        self.outside.display().to_string()
    }

    /// Nothing but `dest` and the untouched `outside` beside each other.
    fn assert_contained(&self, what: &str) {
        let mut top: Vec<_> = fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        top.sort();
        top.retain(|n| n != "dest");
        assert_eq!(top, ["outside"], "{what}: wrote beside the destination");
        let inside: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(inside, ["secret"], "{what}: wrote into the outside directory");
        let secret = self.outside.join("secret");
        assert_eq!(fs::read(&secret).unwrap(), b"secret", "{what}");
        let m = fs::metadata(&secret).unwrap();
        assert_eq!(
            (m.nlink(), m.mode() & 0o7777, m.uid()),
            (1, 0o644, 0),
            "{what}: secret was modified"
        );
        // A hardlink to the secret inside dest would be an escape too.
        for entry in walkdir::WalkDir::new(&self.dest).into_iter().flatten() {
            let em = fs::symlink_metadata(entry.path()).unwrap();
            assert_ne!(
                (em.dev(), em.ino()),
                (m.dev(), m.ino()),
                "{what}: {}",
                entry.path().display()
            );
        }
    }
}

#[test]
fn escape_attempts_are_refused_and_write_nothing_outside() {
    let probe = Sandbox::new();
    let outside = probe.outside_str();
    let secret = format!("{outside}/secret");
    let climb = "../".repeat(20) + &secret[1..];
    let cases: Vec<(&str, Vec<E<'_>>)> = vec![
        ("dot-dot", vec![E::File("../x", b"x")]),
        (
            "dot-dot inside",
            vec![E::Dir("a/"), E::File("a/../../outside/x", b"x")],
        ),
        (
            "symlink parent",
            vec![E::Symlink("link", &outside), E::File("link/x", b"x")],
        ),
        (
            "symlink parent dir",
            vec![E::Symlink("link", &outside), E::Dir("link/sub/")],
        ),
        (
            "relative symlink parent",
            vec![E::Symlink("up", ".."), E::File("up/outside/x", b"x")],
        ),
        (
            "nested symlink parent",
            vec![E::Dir("a/"), E::Symlink("a/b", "/"), E::File("a/b/tmp/x", b"x")],
        ),
        ("hardlink dot-dot", vec![E::Hardlink("h", "../../etc/passwd")]),
        ("hardlink climb", vec![E::Hardlink("h", &climb)]),
        ("hardlink absolute", vec![E::Hardlink("h", &secret)]),
        (
            "hardlink via symlink",
            vec![E::Symlink("link", &outside), E::Hardlink("h", "link/secret")],
        ),
        ("pax path", vec![E::PaxPath("../outside/evil", "harmless")]),
        ("gnu long name", vec![E::LongName("../../outside/evil")]),
        (
            "whiteout via symlink",
            vec![E::Symlink("link", &outside), E::File("link/.wh.secret", b"")],
        ),
        (
            "opaque via symlink",
            vec![E::Symlink("link", &outside), E::File("link/.wh..wh..opq", b"")],
        ),
    ];
    for (what, entries) in cases {
        let sandbox = Sandbox::new();
        let data = hostile_tar(&entries);
        let err = unpack_layer(&data[..], MEDIA_TYPE_TAR, &sandbox.dest).expect_err(what);
        assert!(
            matches!(err, LayerError::UnsafeEntry { .. }),
            "{what}: expected a refusal, got {err}"
        );
        assert!(err.to_string().contains("refusing tar entry"), "{what}: {err}");
        sandbox.assert_contained(what);
    }

    // Absolute names are contained (the leading `/` stripped), not refused.
    let sandbox = Sandbox::new();
    let abs = format!("{outside}/abs-file");
    let data = hostile_tar(&[E::File(&abs, b"in"), E::Symlink("abs-link", &secret)]);
    unpack_layer(&data[..], MEDIA_TYPE_TAR, &sandbox.dest).unwrap();
    // (`abs` names the probe's outside directory; the sandbox's is untouched in any case.)
    assert_eq!(fs::read(sandbox.dest.join(&abs[1..])).unwrap(), b"in");
    assert!(!Path::new(&abs).exists());
    sandbox.assert_contained("absolute names");

    // A hardlink to a symlink links the symlink itself, never what it points to.
    let sandbox = Sandbox::new();
    let secret = format!("{}/secret", sandbox.outside_str());
    let data = hostile_tar(&[E::Symlink("s", &secret), E::Hardlink("h", "s")]);
    unpack_layer(&data[..], MEDIA_TYPE_TAR, &sandbox.dest).unwrap();
    let h = fs::symlink_metadata(sandbox.dest.join("h")).unwrap();
    assert!(h.file_type().is_symlink());
    assert_eq!(fs::read_link(sandbox.dest.join("h")).unwrap(), Path::new(&secret));
    sandbox.assert_contained("hardlink to a symlink");
    probe.assert_contained("probe");
}

// ---- the layer store ----

fn sample_tar() -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("u");
    fs::create_dir_all(upper.join("usr/share")).unwrap();
    // Incompressible bytes, so that the compressed blob takes a while to stream.
    let mut rng = Rng(42);
    let noise: Vec<u8> = (0..512 * 1024).map(|_| rng.next() as u8).collect();
    fs::write(upper.join("usr/share/noise"), noise).unwrap();
    for i in 0..50 {
        fs::write(
            upper.join(format!("usr/share/f{i}")),
            vec![b'a' + (i % 26) as u8; 4096 * i],
        )
        .unwrap();
    }
    let blob = tmp.path().join("l.tar.zst");
    let packed = pack_layer(
        &upper,
        &PackOptions {
            compression: Compression::Zstd { level: 1 },
            source_date_epoch: Some(0),
        },
        &blob,
    )
    .unwrap();
    let mut tar = Vec::new();
    zstd::stream::read::Decoder::new(fs::File::open(&packed.path).unwrap())
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
    tar
}

/// An async reader that yields small chunks with a pause, so that concurrent callers
/// really overlap.
struct SlowReader {
    data: Vec<u8>,
    pos: usize,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for SlowReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(std::time::Duration::from_millis(2))));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.sleep = None;
        let n = buf.remaining().min(16 * 1024).min(this.data.len() - this.pos);
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ensure_unpacks_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LayerStore::open(tmp.path().join("store")).unwrap());
    let tar = sample_tar();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let blob = LayerBlob {
        digest: Digest::of(&gz),
        media_type: MEDIA_TYPE_DOCKER_TAR_GZIP.into(),
        diff_id: Some(Digest::of(&tar)),
    };
    let fetches = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // All six call `ensure` together, while the first fetch streams for ≥ 64 ms: without
    // single-flight the others would find no index entry and fetch too.
    let barrier = Arc::new(tokio::sync::Barrier::new(6));
    for _ in 0..6 {
        let (store, blob, gz, fetches) = (store.clone(), blob.clone(), gz.clone(), fetches.clone());
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store
                .ensure(&blob, || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, io::Error>(BlobSource::AsyncReader(Box::new(SlowReader {
                        data: gz,
                        pos: 0,
                        sleep: None,
                    })))
                })
                .await
                .unwrap()
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "one fetch for six concurrent builds"
    );
    assert_eq!(results.iter().filter(|r| r.unpacked.is_some()).count(), 1);
    let dir = &results[0].dir.clone();
    assert!(results
        .iter()
        .all(|r| &r.dir == dir && r.diff_id == Digest::of(&tar)));
    assert_eq!(store.get(&Digest::of(&tar)).as_ref(), Some(dir));
    assert_eq!(fs::read(dir.join("usr/share/f3")).unwrap(), vec![b'd'; 4096 * 3]);
    assert_eq!(fs::read_dir(tmp.path().join("store/tmp")).unwrap().count(), 0);

    // The same content as zstd and as a plain tar (other blobs, one diff_id), concurrently,
    // from a file and a blocking reader: one shared directory.
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    let zst_path = tmp.path().join("blob.zst");
    fs::write(&zst_path, &zst).unwrap();
    let zblob = LayerBlob {
        digest: Digest::of(&zst),
        media_type: MEDIA_TYPE_TAR_ZSTD.into(),
        diff_id: None,
    };
    let tblob = LayerBlob {
        digest: Digest::of(&tar),
        media_type: MEDIA_TYPE_TAR.into(),
        diff_id: None,
    };
    let (z, t) = tokio::join!(
        store.ensure(&zblob, || async {
            Ok::<_, io::Error>(BlobSource::File(zst_path.clone()))
        }),
        store.ensure(&tblob, || async {
            Ok::<_, io::Error>(BlobSource::Reader(Box::new(io::Cursor::new(tar.clone()))))
        }),
    );
    let (z, t) = (z.unwrap(), t.unwrap());
    assert_eq!((&z.dir, &t.dir), (dir, dir));
    assert_eq!(
        fs::read_dir(tmp.path().join("store/by-diff-id")).unwrap().count(),
        1
    );
    assert_eq!(
        fs::read_dir(tmp.path().join("store/by-digest")).unwrap().count(),
        3
    );

    // Reopened (as after a restart), the store still knows every blob and fetches nothing.
    drop(results);
    let store = Arc::into_inner(store).expect("no other users");
    drop(store);
    fs::create_dir_all(tmp.path().join("store/tmp/crashed-unpack/etc")).unwrap();
    let store = LayerStore::open(tmp.path().join("store")).unwrap();
    assert_eq!(fs::read_dir(tmp.path().join("store/tmp")).unwrap().count(), 0);
    let again = store
        .ensure(&blob, || async {
            Err::<BlobSource, _>(io::Error::other("must not fetch"))
        })
        .await
        .unwrap();
    assert_eq!(&again.dir, dir);
    assert!(again.unpacked.is_none());
}

#[tokio::test]
async fn store_refuses_a_hostile_layer_and_keeps_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = LayerStore::open(tmp.path().join("store")).unwrap();
    let data = hostile_tar(&[E::Symlink("etc", "/etc"), E::File("etc/passwd", b"pwned")]);
    let blob = LayerBlob {
        digest: Digest::of(&data),
        media_type: MEDIA_TYPE_TAR.into(),
        diff_id: None,
    };
    let err = store
        .ensure(&blob, || async {
            Ok::<_, io::Error>(BlobSource::Reader(Box::new(io::Cursor::new(data.clone()))))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::UnsafeEntry { .. }), "{err}");
    assert_eq!(fs::read_dir(tmp.path().join("store/tmp")).unwrap().count(), 0);
    assert_eq!(
        fs::read_dir(tmp.path().join("store/by-diff-id")).unwrap().count(),
        0
    );
    assert!(store.lookup(&blob.digest).is_none());
}

// ---- fuzzing ----

/// xorshift64*: a deterministic, dependency-free generator for mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        if data.is_empty() {
            data.push(0);
        }
        let at = rng.below(data.len());
        match rng.below(8) {
            0 => data[at] ^= 1 << rng.below(8),
            1 => data[at] = rng.next() as u8,
            // Interesting bytes for names, types and octal fields.
            2 => data[at] = b"/.0127x\0L5"[rng.below(10)],
            3 => data.truncate(at),
            4 => {
                let len = rng.below(64).min(data.len() - at);
                let chunk = data[at..at + len].to_vec();
                let to = rng.below(data.len());
                data.splice(to..to, chunk);
            }
            5 => {
                // Overwrite a name with a hostile one.
                let evil: &[u8] = [
                    &b"../x"[..],
                    b"/etc/x",
                    b"l/x",
                    b"a/../../x",
                    b".wh..wh..opq",
                    b".wh.l",
                ][rng.below(6)];
                let block = at / 512 * 512;
                let end = (block + evil.len()).min(data.len());
                data[block..end].copy_from_slice(&evil[..end - block]);
            }
            6 => {
                // Duplicate a whole block (entries twice, headers without data, …).
                let block = at / 512 * 512;
                let end = (block + 512).min(data.len());
                let chunk = data[block..end].to_vec();
                data.splice(block..block, chunk);
            }
            _ => {
                // Point a link target somewhere else.
                let block = at / 512 * 512;
                let target: &[u8] = [&b"../../x"[..], b"/", b"l", b"a/f", b"up/outside"][rng.below(5)];
                if block + 257 <= data.len() {
                    data[block + 157..block + 257].fill(0);
                    data[block + 157..block + 157 + target.len()].copy_from_slice(target);
                }
            }
        }
    }
    data
}

fn fuzz_seeds(outside: &str) -> Vec<Vec<u8>> {
    let secret = format!("{outside}/secret");
    let mut seeds = vec![
        hostile_tar(&[
            E::Dir("a/"),
            E::File("a/f", b"data"),
            E::Hardlink("a/g", "a/f"),
            E::Symlink("a/s", "f"),
            E::File("b/c/d", b"implicit parents"),
            E::File("a/.wh.x", b""),
        ]),
        hostile_tar(&[
            E::Dir("./"),
            E::File("/abs", b"abs"),
            E::Dir("d/"),
            E::File("d/.wh..wh..opq", b""),
        ]),
        hostile_tar(&[
            E::Dir("a/"),
            E::File("a/f", b"data"),
            E::Symlink("l", outside),
            E::File("l/x", b"x"),
        ]),
        hostile_tar(&[
            E::Symlink("up", ".."),
            E::Hardlink("h", &secret),
            E::File("a/.wh..wh..opq", b""),
            E::File("a/.wh.f", b""),
        ]),
        hostile_tar(&[
            E::PaxPath("../outside/evil", "harmless"),
            E::LongName("a/long/name"),
        ]),
        hostile_tar(&[
            E::File("f", b"f"),
            E::Hardlink("g", "f"),
            E::Hardlink("h", "l/secret"),
        ]),
    ];
    // A real packed layer: PAX xattrs, long names, devices, whiteouts.
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("u");
    fs::create_dir_all(upper.join("dir/sub")).unwrap();
    fs::write(upper.join("dir/sub/file"), "x".repeat(700)).unwrap();
    xattr::set(upper.join("dir/sub/file"), "user.k", b"v").unwrap();
    symlink(outside, upper.join("dir/out")).unwrap();
    fs::hard_link(upper.join("dir/sub/file"), upper.join("dir/hl")).unwrap();
    mknod(&upper.join("dir/wh"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
    kiln::engine::layers::mark_opaque(&upper.join("dir/sub")).unwrap();
    fs::write(upper.join("n".repeat(120)), "long").unwrap();
    let blob = tmp.path().join("l.tar.gz");
    let packed = pack_layer(&upper, &PackOptions::default(), &blob).unwrap();
    let gz = fs::read(&packed.path).unwrap();
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut tar)
        .unwrap();
    seeds.push(tar);
    seeds.push(gz);
    seeds
}

#[test]
fn fuzzed_tars_never_panic_or_escape() {
    let probe = Sandbox::new();
    let seeds = fuzz_seeds(&probe.outside_str());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut refused) = (0, 0);
    let iterations = 3000;
    for i in 0..iterations {
        let sandbox = Sandbox::new();
        // Point absolute names (symlink targets) at this sandbox's outside directory.
        let mut seed = replace_all(
            &seeds[i % seeds.len()],
            probe.outside_str().as_bytes(),
            sandbox.outside_str().as_bytes(),
        );
        fix_checksums(&mut seed);
        let data = if i < seeds.len() {
            seed
        } else {
            let mut data = mutate(&mut rng, &seed);
            // Mostly keep mutated headers parseable, so that their fields reach the unpacker.
            if rng.below(4) != 0 {
                fix_checksums(&mut data);
            }
            data
        };
        let result = std::panic::catch_unwind(|| fuzz_unpack_into(&data, &sandbox.dest));
        match result {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("unpacking input {i} panicked: {}", hex::encode(&data)),
        }
        sandbox.assert_contained(&format!("fuzz input {i}"));
    }
    assert_eq!(ok + refused, iterations);
    assert!(
        ok > 100 && refused > 100,
        "mutations exercise both paths: {ok} ok, {refused} refused"
    );
    probe.assert_contained("probe");
    // The self-checking entry point on a few inputs.
    for seed in &seeds {
        let _ = fuzz_unpack(seed);
    }
}

/// Recomputes the checksum of every block that looks like a USTAR/GNU header.
fn fix_checksums(data: &mut [u8]) {
    for block in data.chunks_exact_mut(512) {
        if &block[257..262] == b"ustar" {
            block[148..156].fill(b' ');
            let sum: u32 = block.iter().map(|b| *b as u32).sum();
            block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        }
    }
}

fn replace_all(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.len() != to.len() {
        return data.to_vec();
    }
    let mut out = data.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn unsupported_media_types_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let err = unpack_layer(&b""[..], "application/vnd.oci.image.config.v1+json", tmp.path()).unwrap_err();
    assert!(matches!(err, LayerError::UnsupportedMediaType { .. }), "{err}");
    let err = unpack_layer(&b"not gzip"[..], MEDIA_TYPE_TAR_GZIP, tmp.path()).unwrap_err();
    assert!(matches!(err, LayerError::ReadArchive { .. }), "{err}");
}
