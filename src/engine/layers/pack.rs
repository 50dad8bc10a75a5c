//! Packing an overlayfs upper directory into a reproducible, compressed layer tar.
//!
//! # Format
//! The tar is what Docker and buildah (Go's `archive/tar`) produce: USTAR headers, with a
//! PAX extended header before an entry only when it needs one (long name or link target,
//! xattrs, ids or sizes or mtimes a USTAR field cannot hold), closed by two zero blocks.
//! Names have no leading `./` or `/`; directories end with `/` (`etc/`, `etc/passwd`).
//!
//! # Reproducibility
//! The bytes depend only on the tree: entries are emitted depth-first, each directory's
//! children sorted by name bytes, parents before children. Headers hold numeric uid/gid,
//! the mode's permission and setuid/setgid/sticky bits, whole-second mtimes (clamped to
//! `SOURCE_DATE_EPOCH` when set), device numbers for nodes, and nothing else: no user or
//! group names, no atime/ctime, no inode numbers, no sub-second times. PAX records are sorted
//! by key. Gzip output has a fixed header (mtime 0, no name); zstd is single-threaded.
//!
//! # Overlay conversion
//! A whiteout (char device 0:0) becomes an empty regular file `.wh.<name>` (mode 0600, the
//! whiteout's owner and mtime, as Docker writes it); a directory whose
//! `trusted.overlay.opaque` (or, for `userxattr` mounts, `user.overlay.opaque`) is `y`
//! becomes its directory entry followed by `<dir>/.wh..wh..opq`. `trusted.overlay.*`,
//! `user.overlay.*` and `security.selinux` (host-specific) xattrs are not emitted; other
//! xattrs (`security.capability`, `user.*`, ACLs) are, as PAX `SCHILY.xattr.*`. An upper
//! directory using overlay redirects or metacopy cannot be expressed as a layer and is
//! refused. Files with more than one link become a hardlink entry to the first path seen.
//! Sockets are skipped with a warning (as Docker does).

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    fs::{self, File, Metadata, OpenOptions},
    io::{self, BufWriter, Read, Write},
    os::unix::{
        ffi::{OsStrExt, OsStringExt},
        fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
};

use tar::{EntryType, Header};

use super::{
    compress::{Encoder, HashingWriter},
    LayerError, MEDIA_TYPE_TAR_GZIP, MEDIA_TYPE_TAR_ZSTD, WHITEOUT_OPAQUE, WHITEOUT_PREFIX,
};
use crate::model::Digest;

/// How a new layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip at `level` 0–9 (Docker uses 6, the default).
    Gzip { level: u32 },
    /// zstd at `level` 1–22 (3 is zstd's default).
    Zstd { level: i32 },
}

impl Default for Compression {
    fn default() -> Self {
        Self::Gzip { level: 6 }
    }
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Gzip { .. } => MEDIA_TYPE_TAR_GZIP,
            Self::Zstd { .. } => MEDIA_TYPE_TAR_ZSTD,
        }
    }
}

/// How to pack a layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackOptions {
    pub compression: Compression,
    /// `SOURCE_DATE_EPOCH`: mtimes later than this are clamped to it.
    pub source_date_epoch: Option<i64>,
}

/// A packed layer blob on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedLayer {
    /// SHA-256 of the compressed blob (the manifest's layer digest).
    pub digest: Digest,
    /// SHA-256 of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: Digest,
    /// Compressed size in bytes.
    pub size: u64,
    /// Uncompressed tar size in bytes.
    pub uncompressed_size: u64,
    /// Tar entries written (files, directories, links, nodes, whiteouts).
    pub entries: u64,
    pub media_type: &'static str,
    /// The compressed blob.
    pub path: PathBuf,
}

impl PackedLayer {
    /// The manifest descriptor of this layer.
    pub fn descriptor(&self) -> oci_spec::image::Descriptor {
        let digest: oci_spec::image::Digest = self
            .digest
            .as_str()
            .parse()
            .expect("a Kiln digest is a valid OCI digest");
        oci_spec::image::Descriptor::new(self.media_type.into(), self.size, digest)
    }
}

/// Packs the upper directory `upper` into the compressed layer blob `out` (created or
/// truncated; removed again on error). See the module docs for the exact format.
pub fn pack_layer(upper: &Path, opts: &PackOptions, out: &Path) -> Result<PackedLayer, LayerError> {
    let result = pack_inner(upper, opts, out);
    if result.is_err() {
        let _ = fs::remove_file(out);
    }
    result
}

/// [`pack_layer`] on a blocking thread.
pub async fn pack_layer_async(
    upper: PathBuf,
    opts: PackOptions,
    out: PathBuf,
) -> Result<PackedLayer, LayerError> {
    let what = upper.display().to_string();
    tokio::task::spawn_blocking(move || pack_layer(&upper, &opts, &out))
        .await
        .map_err(|source| LayerError::Task { what, source })?
}

/// Packs several `(upper, out)` pairs concurrently, on as many threads as there are CPUs
/// (at most one per job). Results are in job order; the first failing job's error (in
/// job order) is returned after every job has finished.
pub fn pack_layers_parallel(
    jobs: Vec<(PathBuf, PathBuf)>,
    opts: &PackOptions,
) -> Result<Vec<PackedLayer>, LayerError> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len());
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<PackedLayer, LayerError>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((upper, out)) = jobs.get(i) else { break };
                let result = pack_layer(upper, opts, out);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect()
}

type Sink = HashingWriter<Encoder<HashingWriter<BufWriter<File>>>>;

fn pack_inner(upper: &Path, opts: &PackOptions, out: &Path) -> Result<PackedLayer, LayerError> {
    let file = File::create(out).map_err(LayerError::io("creating", out))?;
    let compressed = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let encoder = match opts.compression {
        Compression::Gzip { level } => Encoder::gzip(compressed, level),
        Compression::Zstd { level } => {
            Encoder::zstd(compressed, level).map_err(|source| write_error(out, source))?
        }
    };
    let mut packer = Packer {
        out_path: out,
        tar: HashingWriter::new(encoder),
        opts,
        links: HashMap::new(),
        buf: vec![0; 256 * 1024],
        entries: 0,
    };
    packer.walk(upper)?;
    packer
        .tar
        .write_all(&[0; 1024])
        .map_err(|source| write_error(out, source))?;
    let entries = packer.entries;
    let (encoder, diff_id, uncompressed_size) = packer.tar.finish();
    let compressed = encoder.finish().map_err(|source| write_error(out, source))?;
    let (buffered, digest, size) = compressed.finish();
    buffered
        .into_inner()
        .map_err(|e| write_error(out, e.into_error()))?;
    Ok(PackedLayer {
        digest,
        diff_id,
        size,
        uncompressed_size,
        entries,
        media_type: opts.compression.media_type(),
        path: out.to_owned(),
    })
}

fn write_error(path: &Path, source: io::Error) -> LayerError {
    LayerError::WriteArchive {
        path: path.to_owned(),
        source,
    }
}

/// One tar entry to write.
struct TarEntry {
    name: Vec<u8>,
    kind: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    size: u64,
    link: Vec<u8>,
    dev: (u32, u32),
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

struct Packer<'a> {
    out_path: &'a Path,
    tar: Sink,
    opts: &'a PackOptions,
    /// (dev, inode) of multiply-linked files → the name they were first written under.
    links: HashMap<(u64, u64), Vec<u8>>,
    buf: Vec<u8>,
    entries: u64,
}

impl Packer<'_> {
    /// Emits every entry below `root`, depth-first, children sorted by name bytes.
    fn walk(&mut self, root: &Path) -> Result<(), LayerError> {
        let mut stack: Vec<(PathBuf, Vec<u8>, std::vec::IntoIter<OsString>)> =
            vec![(root.to_owned(), Vec::new(), sorted_children(root)?.into_iter())];
        while let Some((dir, rel, children)) = stack.last_mut() {
            let Some(name) = children.next() else {
                stack.pop();
                continue;
            };
            let abs = dir.join(&name);
            let mut child_rel = rel.clone();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(name.as_bytes());
            let meta = fs::symlink_metadata(&abs).map_err(LayerError::io("inspecting", &abs))?;
            self.emit(&abs, &child_rel, &meta)?;
            if meta.is_dir() {
                let children = sorted_children(&abs)?.into_iter();
                stack.push((abs, child_rel, children));
            }
        }
        Ok(())
    }

    fn emit(&mut self, abs: &Path, rel: &[u8], meta: &Metadata) -> Result<(), LayerError> {
        let ft = meta.file_type();
        let mut entry = TarEntry {
            name: rel.to_vec(),
            kind: EntryType::Regular,
            mode: meta.mode() & 0o7777,
            uid: meta.uid().into(),
            gid: meta.gid().into(),
            mtime: self.clamp(meta.mtime()),
            size: 0,
            link: Vec::new(),
            dev: (0, 0),
            xattrs: BTreeMap::new(),
        };
        if ft.is_char_device() && meta.rdev() == 0 {
            // Overlay whiteout → OCI whiteout.
            let (parent, base) = match rel.iter().rposition(|b| *b == b'/') {
                Some(i) => (&rel[..=i], &rel[i + 1..]),
                None => (&rel[..0], rel),
            };
            entry.name = [parent, WHITEOUT_PREFIX.as_bytes(), base].concat();
            entry.mode = 0o600;
            return self.write_entry(&entry, None);
        }
        if ft.is_socket() {
            tracing::warn!(path = %abs.display(), "skipping socket: a layer cannot hold one");
            return Ok(());
        }
        let OverlayXattrs { opaque, xattrs } = read_xattrs(abs)?;
        entry.xattrs = xattrs;
        if ft.is_dir() {
            entry.kind = EntryType::Directory;
            entry.name.push(b'/');
            self.write_entry(&entry, None)?;
            if opaque {
                let marker = TarEntry {
                    name: [&entry.name[..], WHITEOUT_OPAQUE.as_bytes()].concat(),
                    kind: EntryType::Regular,
                    mode: entry.mode & 0o777,
                    xattrs: BTreeMap::new(),
                    ..entry
                };
                self.write_entry(&marker, None)?;
            }
            return Ok(());
        }
        if meta.nlink() > 1 {
            match self.links.get(&(meta.dev(), meta.ino())) {
                Some(first) => {
                    entry.kind = EntryType::Link;
                    entry.link = first.clone();
                    return self.write_entry(&entry, None);
                }
                None => {
                    self.links.insert((meta.dev(), meta.ino()), rel.to_vec());
                }
            }
        }
        if ft.is_symlink() {
            entry.kind = EntryType::Symlink;
            entry.link = fs::read_link(abs)
                .map_err(LayerError::io("reading symlink", abs))?
                .into_os_string()
                .into_vec();
            self.write_entry(&entry, None)
        } else if ft.is_file() {
            entry.size = meta.size();
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(abs)
                .map_err(LayerError::io("opening", abs))?;
            self.write_entry(&entry, Some((file, abs)))
        } else {
            entry.kind = if ft.is_fifo() {
                EntryType::Fifo
            } else if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            };
            if !ft.is_fifo() {
                let rdev = meta.rdev();
                entry.dev = (libc::major(rdev), libc::minor(rdev));
            }
            self.write_entry(&entry, None)
        }
    }

    fn clamp(&self, mtime: i64) -> i64 {
        match self.opts.source_date_epoch {
            Some(epoch) => mtime.min(epoch),
            None => mtime,
        }
    }

    fn write_entry(&mut self, entry: &TarEntry, data: Option<(File, &Path)>) -> Result<(), LayerError> {
        let out = self.out_path;
        let (header, pax) = build_header(entry);
        if !pax.is_empty() {
            let body = pax_body(&pax);
            let mut ph = Header::new_ustar();
            let base = entry
                .name
                .strip_suffix(b"/")
                .unwrap_or(&entry.name)
                .rsplit(|b| *b == b'/')
                .next()
                .unwrap_or(b"");
            let mut pax_name = [b"PaxHeaders.0/", base].concat();
            pax_name.truncate(100);
            set_bytes(&mut ph.as_ustar_mut().expect("ustar header").name, &pax_name);
            ph.set_entry_type(EntryType::XHeader);
            ph.set_mode(0o644);
            ph.set_uid(0);
            ph.set_gid(0);
            ph.set_mtime(0);
            ph.set_size(body.len() as u64);
            let _ = ph.set_device_major(0);
            let _ = ph.set_device_minor(0);
            ph.set_cksum();
            self.tar
                .write_all(ph.as_bytes())
                .map_err(|e| write_error(out, e))?;
            self.tar.write_all(&body).map_err(|e| write_error(out, e))?;
            self.pad(body.len() as u64)?;
        }
        self.tar
            .write_all(header.as_bytes())
            .map_err(|e| write_error(out, e))?;
        if let Some((mut file, path)) = data {
            let mut remaining = entry.size;
            while remaining > 0 {
                let want = remaining.min(self.buf.len() as u64) as usize;
                let n = match file.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        return Err(LayerError::FileChanged {
                            path: path.to_owned(),
                            expected: entry.size,
                        })
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(LayerError::io("reading", path)(e)),
                };
                self.tar
                    .write_all(&self.buf[..n])
                    .map_err(|e| write_error(out, e))?;
                remaining -= n as u64;
            }
            let mut probe = [0u8; 1];
            if file.read(&mut probe).map_err(LayerError::io("reading", path))? != 0 {
                return Err(LayerError::FileChanged {
                    path: path.to_owned(),
                    expected: entry.size,
                });
            }
            self.pad(entry.size)?;
        }
        self.entries += 1;
        Ok(())
    }

    fn pad(&mut self, len: u64) -> Result<(), LayerError> {
        let rem = (len % 512) as usize;
        if rem != 0 {
            self.tar
                .write_all(&[0u8; 512][..512 - rem])
                .map_err(|e| write_error(self.out_path, e))?;
        }
        Ok(())
    }
}

const MAX_OCTAL_7: u64 = 0o7777777;
const MAX_OCTAL_11: u64 = 0o77777777777;

/// The USTAR header of `entry` and the PAX records it needs.
fn build_header(entry: &TarEntry) -> (Header, BTreeMap<String, Vec<u8>>) {
    let mut pax = BTreeMap::new();
    let mut h = Header::new_ustar();
    {
        let ustar = h.as_ustar_mut().expect("ustar header");
        match split_ustar_name(&entry.name) {
            Some((prefix, name)) => {
                set_bytes(&mut ustar.prefix, prefix);
                set_bytes(&mut ustar.name, name);
            }
            None => {
                set_bytes(&mut ustar.name, &entry.name[..entry.name.len().min(100)]);
                pax.insert("path".to_owned(), entry.name.clone());
            }
        }
        if entry.link.len() <= 100 {
            set_bytes(&mut ustar.linkname, &entry.link);
        } else {
            set_bytes(&mut ustar.linkname, &entry.link[..100]);
            pax.insert("linkpath".to_owned(), entry.link.clone());
        }
    }
    h.set_entry_type(entry.kind);
    h.set_mode(entry.mode);
    let mut id = |key: &str, value: u64| {
        if value <= MAX_OCTAL_7 {
            value
        } else {
            pax.insert(key.to_owned(), value.to_string().into_bytes());
            0
        }
    };
    let (uid, gid) = (id("uid", entry.uid), id("gid", entry.gid));
    h.set_uid(uid);
    h.set_gid(gid);
    if entry.size <= MAX_OCTAL_11 {
        h.set_size(entry.size);
    } else {
        h.set_size(0);
        pax.insert("size".to_owned(), entry.size.to_string().into_bytes());
    }
    match u64::try_from(entry.mtime) {
        Ok(t) if t <= MAX_OCTAL_11 => h.set_mtime(t),
        _ => {
            h.set_mtime(0);
            pax.insert("mtime".to_owned(), entry.mtime.to_string().into_bytes());
        }
    }
    let _ = h.set_device_major(entry.dev.0);
    let _ = h.set_device_minor(entry.dev.1);
    for (key, value) in &entry.xattrs {
        pax.insert(
            format!("SCHILY.xattr.{}", String::from_utf8_lossy(key)),
            value.clone(),
        );
    }
    h.set_cksum();
    (h, pax)
}

/// Splits `name` into USTAR (prefix, name) fields, as Go's `archive/tar` does; `None` when
/// it does not fit (then a PAX `path` record carries it).
fn split_ustar_name(name: &[u8]) -> Option<(&[u8], &[u8])> {
    if name.len() <= 100 {
        return Some((&[], name));
    }
    let limit = name.len().min(156);
    // The last '/' within the first 156 bytes whose suffix fits into the name field.
    let i = name[..limit].iter().rposition(|b| *b == b'/')?;
    let (prefix, rest) = (&name[..i], &name[i + 1..]);
    (!prefix.is_empty() && prefix.len() <= 155 && !rest.is_empty() && rest.len() <= 100)
        .then_some((prefix, rest))
}

fn set_bytes(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    field[..value.len()].copy_from_slice(value);
}

/// PAX records `"<len> <key>=<value>\n"`, sorted by key.
fn pax_body(records: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut body = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        body.extend_from_slice(format!("{len} {key}=").as_bytes());
        body.extend_from_slice(value);
        body.push(b'\n');
    }
    body
}

fn sorted_children(dir: &Path) -> Result<Vec<OsString>, LayerError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(LayerError::io("listing", dir))? {
        names.push(entry.map_err(LayerError::io("listing", dir))?.file_name());
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

struct OverlayXattrs {
    opaque: bool,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// The xattrs of `path` worth keeping, and whether overlay marked it opaque.
fn read_xattrs(path: &Path) -> Result<OverlayXattrs, LayerError> {
    let mut out = OverlayXattrs {
        opaque: false,
        xattrs: BTreeMap::new(),
    };
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(LayerError::io("listing xattrs of", path)(e)),
    };
    for name in names {
        let key = name.as_bytes();
        let overlay = key
            .strip_prefix(b"trusted.overlay.")
            .or_else(|| key.strip_prefix(b"user.overlay."));
        if let Some(what) = overlay {
            match what {
                b"redirect" | b"metacopy" => {
                    return Err(LayerError::OverlayFeature {
                        path: path.to_owned(),
                        xattr: name.to_string_lossy().into_owned(),
                    })
                }
                b"opaque" => {
                    let value = xattr::get(path, &name).map_err(LayerError::io("reading xattr of", path))?;
                    out.opaque |= value.as_deref() == Some(b"y");
                }
                _ => {}
            }
            continue;
        }
        if key == b"security.selinux" {
            continue;
        }
        if let Some(value) = xattr::get(path, &name).map_err(LayerError::io("reading xattr of", path))? {
            out.xattrs.insert(key.to_vec(), value);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn entries_of(blob: &Path, compression: Compression) -> Vec<(String, EntryType, u64, u32)> {
        let data = fs::read(blob).unwrap();
        let kind = match compression {
            Compression::Gzip { .. } => super::super::LayerCompression::Gzip,
            Compression::Zstd { .. } => super::super::LayerCompression::Zstd,
        };
        let mut archive = tar::Archive::new(kind.decoder(&data[..]).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                let h = e.header();
                (name, h.entry_type(), h.uid().unwrap(), h.mode().unwrap())
            })
            .collect()
    }

    #[test]
    fn pax_lengths_count_themselves() {
        let mut records = BTreeMap::new();
        records.insert("path".to_owned(), vec![b'a'; 3]);
        assert_eq!(pax_body(&records), b"12 path=aaa\n");
        records.clear();
        // 3 + 4 + 91 = 98 → with "99" it is 100, needing three digits: "101".
        records.insert("path".to_owned(), vec![b'a'; 91]);
        let body = pax_body(&records);
        assert!(
            body.starts_with(b"101 path="),
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(body.len(), 101);
    }

    #[test]
    fn ustar_names_split_like_go() {
        let short = b"etc/passwd";
        assert_eq!(split_ustar_name(short), Some((&b""[..], &short[..])));
        let long = [vec![b'd'; 120], b"/file".to_vec()].concat();
        assert_eq!(split_ustar_name(&long), Some((&long[..120], &b"file"[..])));
        assert_eq!(split_ustar_name(&[b'x'; 200]), None);
    }

    #[test]
    fn packs_in_sorted_order_with_dir_slashes() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("b/sub")).unwrap();
        fs::write(upper.join("a.txt"), "a").unwrap();
        fs::write(upper.join("b/sub/z"), "z").unwrap();
        fs::write(upper.join("b/c"), "c").unwrap();
        symlink("a.txt", upper.join("ln")).unwrap();
        fs::set_permissions(upper.join("a.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
        let long = "n".repeat(150);
        fs::write(upper.join(&long), "long").unwrap();
        let out = tmp.path().join("layer.tgz");
        let packed = pack_layer(&upper, &PackOptions::default(), &out).unwrap();
        assert_eq!(packed.media_type, MEDIA_TYPE_TAR_GZIP);
        assert_eq!(packed.size, fs::metadata(&out).unwrap().len());
        assert_eq!(packed.digest, Digest::of(&fs::read(&out).unwrap()));
        let names: Vec<_> = entries_of(&out, PackOptions::default().compression)
            .into_iter()
            .map(|(n, _, _, m)| (n, m))
            .collect();
        let want: Vec<(String, u32)> = vec![
            ("a.txt".into(), 0o4755),
            ("b/".into(), 0o755),
            ("b/c".into(), 0o644),
            ("b/sub/".into(), 0o755),
            ("b/sub/z".into(), 0o644),
            ("ln".into(), 0o777),
            (long, 0o644),
        ];
        assert_eq!(names, want);
        assert_eq!(packed.entries, 7);
    }

    #[test]
    fn parallel_packing_matches_serial() {
        let tmp = tempfile::tempdir().unwrap();
        let mut jobs = Vec::new();
        for i in 0..3 {
            let upper = tmp.path().join(format!("u{i}"));
            fs::create_dir_all(&upper).unwrap();
            fs::write(upper.join("f"), vec![i as u8; 10_000]).unwrap();
            jobs.push((upper, tmp.path().join(format!("l{i}.tar.zst"))));
        }
        let opts = PackOptions {
            compression: Compression::Zstd { level: 3 },
            source_date_epoch: Some(0),
        };
        let parallel = pack_layers_parallel(jobs.clone(), &opts).unwrap();
        for ((upper, _), got) in jobs.iter().zip(&parallel) {
            let serial = pack_layer(upper, &opts, &tmp.path().join("serial")).unwrap();
            assert_eq!((&serial.digest, &serial.diff_id), (&got.digest, &got.diff_id));
        }
        assert_ne!(parallel[0].digest, parallel[1].digest);
        let missing = vec![(tmp.path().join("nope"), tmp.path().join("nope.tgz"))];
        assert!(pack_layers_parallel(missing, &opts).is_err());
        assert!(!tmp.path().join("nope.tgz").exists());
    }

    #[test]
    fn descriptor_names_the_blob() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("l");
        let upper = tempfile::tempdir().unwrap();
        let packed = pack_layer(upper.path(), &PackOptions::default(), &out).unwrap();
        let d = packed.descriptor();
        assert_eq!(d.size(), packed.size);
        assert_eq!(d.digest().to_string(), packed.digest.to_string());
        assert_eq!(d.media_type().to_string(), MEDIA_TYPE_TAR_GZIP);
        // An empty layer is two zero blocks.
        assert_eq!(packed.uncompressed_size, 1024);
        assert_eq!(packed.diff_id, Digest::of(&[0u8; 1024]));
    }
}
