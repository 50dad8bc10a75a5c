//! Layer compression: media type ↔ compression, decoders, and hashing reader/writer
//! wrappers so that every layer byte stream is digested as it passes, never re-read.
//!
//! Encoders are configured for reproducibility: the gzip header carries no file name and
//! mtime 0 (flate2 writes OS byte 255), and zstd runs single-threaded, so identical input
//! and level give identical output with the same library versions.

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use super::{
    digest_of, LayerError, MEDIA_TYPE_DOCKER_TAR_GZIP, MEDIA_TYPE_TAR, MEDIA_TYPE_TAR_GZIP,
    MEDIA_TYPE_TAR_ZSTD,
};
use crate::model::Digest;

/// How a layer blob is compressed, as its media type says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    /// The compression a layer media type names. Accepts the OCI layer types (also the
    /// non-distributable ones), Docker schema 2 `rootfs.diff.tar.gzip` (and `foreign`), and
    /// the Docker-style `tar.gzip`/`tar.zstd` spellings.
    pub fn from_media_type(media_type: &str) -> Result<Self, LayerError> {
        let mt = media_type.split(';').next().unwrap_or("").trim();
        let unsupported = || LayerError::UnsupportedMediaType {
            media_type: media_type.to_owned(),
        };
        let kind = match mt {
            MEDIA_TYPE_TAR | "application/vnd.docker.image.rootfs.diff.tar" => Self::None,
            MEDIA_TYPE_TAR_GZIP | MEDIA_TYPE_DOCKER_TAR_GZIP => Self::Gzip,
            MEDIA_TYPE_TAR_ZSTD => Self::Zstd,
            _ => {
                let is_layer = mt.starts_with("application/vnd.oci.image.layer.")
                    || mt.starts_with("application/vnd.docker.image.rootfs.");
                if !is_layer {
                    return Err(unsupported());
                }
                if mt.ends_with(".tar") {
                    Self::None
                } else if mt.ends_with("tar+gzip") || mt.ends_with("tar.gzip") {
                    Self::Gzip
                } else if mt.ends_with("tar+zstd") || mt.ends_with("tar.zstd") {
                    Self::Zstd
                } else {
                    return Err(unsupported());
                }
            }
        };
        Ok(kind)
    }

    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::None => MEDIA_TYPE_TAR,
            Self::Gzip => MEDIA_TYPE_TAR_GZIP,
            Self::Zstd => MEDIA_TYPE_TAR_ZSTD,
        }
    }

    /// A reader of the uncompressed tar stream. Gzip accepts concatenated members.
    pub fn decoder<'a, R: Read + 'a>(self, reader: R) -> Result<Box<dyn Read + 'a>, LayerError> {
        Ok(match self {
            Self::None => Box::new(reader),
            Self::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
            Self::Zstd => Box::new(
                zstd::stream::read::Decoder::new(reader)
                    .map_err(|source| LayerError::ReadArchive { source })?,
            ),
        })
    }
}

/// A reader that hashes (SHA-256) and counts every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads the rest of the stream (so the digest covers all of it) and returns
    /// (digest, byte count).
    pub fn drain(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((digest_of(self.hasher), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A writer that hashes (SHA-256) and counts every byte written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, digest_of(self.hasher), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reproducible gzip or zstd encoder.
pub enum Encoder<W: Write> {
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    /// A gzip encoder at `level` (0–9) with a fixed header (no name, mtime 0).
    pub fn gzip(inner: W, level: u32) -> Self {
        let level = flate2::Compression::new(level.min(9));
        Self::Gzip(flate2::GzBuilder::new().mtime(0).write(inner, level))
    }

    /// A single-threaded zstd encoder at `level` (1–22), with a content checksum.
    pub fn zstd(inner: W, level: i32) -> io::Result<Self> {
        let mut enc = zstd::stream::write::Encoder::new(inner, level)?;
        enc.include_checksum(true)?;
        Ok(Self::Zstd(enc))
    }

    /// Ends the compressed stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Self::Gzip(e) => e.finish(),
            Self::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Gzip(e) => e.write(buf),
            Self::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Gzip(e) => e.flush(),
            Self::Zstd(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_map_to_compression() {
        let cases = [
            (MEDIA_TYPE_TAR, LayerCompression::None),
            (MEDIA_TYPE_TAR_GZIP, LayerCompression::Gzip),
            (MEDIA_TYPE_TAR_ZSTD, LayerCompression::Zstd),
            (MEDIA_TYPE_DOCKER_TAR_GZIP, LayerCompression::Gzip),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                LayerCompression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                LayerCompression::Zstd,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                LayerCompression::None,
            ),
        ];
        for (mt, want) in cases {
            assert_eq!(LayerCompression::from_media_type(mt).unwrap(), want, "{mt}");
        }
        for bad in [
            "application/json",
            "application/vnd.oci.image.layer.v1.tar+bzip2",
            "",
        ] {
            assert!(LayerCompression::from_media_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashing_wrappers_agree_with_digest_of() {
        let data = b"hello layer".repeat(1000);
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let (out, digest, n) = w.finish();
        assert_eq!(out, data);
        assert_eq!(n, data.len() as u64);
        assert_eq!(digest, Digest::of(&data));
        let mut r = HashingReader::new(&data[..]);
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        let (digest2, n2) = r.drain().unwrap();
        assert_eq!((digest2, n2), (Digest::of(&data), data.len() as u64));
    }

    #[test]
    fn encoders_are_deterministic_and_decodable() {
        let data = b"abcdefgh".repeat(5000);
        for kind in [LayerCompression::Gzip, LayerCompression::Zstd] {
            let encode = || {
                let mut enc = match kind {
                    LayerCompression::Gzip => Encoder::gzip(Vec::new(), 6),
                    _ => Encoder::zstd(Vec::new(), 3).unwrap(),
                };
                enc.write_all(&data).unwrap();
                enc.finish().unwrap()
            };
            let a = encode();
            assert_eq!(a, encode());
            let mut back = Vec::new();
            kind.decoder(&a[..]).unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, data);
        }
        // gzip header: magic, deflate, no flags, mtime 0.
        let gz = {
            let mut e = Encoder::gzip(Vec::new(), 6);
            e.write_all(b"x").unwrap();
            e.finish().unwrap()
        };
        assert_eq!(&gz[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    }
}
