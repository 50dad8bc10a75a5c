//! Searching test outputs for secrets: every place a test collects (files, logs, replies,
//! metrics) is searched byte by byte for each secret and its base64 forms, compressed
//! layers decompressed, so a leak in any encoding is found.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use base64::Engine as _;

/// The forms a secret can take in output: itself, and its base64 at each of the three
/// alignments it can have inside a longer encoded string (only the characters that depend on
/// the secret alone), padded and unpadded, standard and URL-safe alphabet.
pub fn encoded_forms(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let mut forms = vec![secret.to_owned()];
    for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
        for pad in 0..3usize {
            let mut bytes = vec![0u8; pad];
            bytes.extend_from_slice(secret.as_bytes());
            let encoded = engine.encode(&bytes);
            let start = (8 * pad).div_ceil(6);
            let end = 8 * (pad + secret.len()) / 6;
            forms.push(encoded[start..end].to_owned());
        }
    }
    forms.sort();
    forms.dedup();
    forms
}

/// The canaries (or their encodings) found in `haystack`, as `canary (form)`.
pub fn find_canaries(haystack: &[u8], canaries: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for canary in canaries {
        for form in encoded_forms(canary) {
            if memmem(haystack, form.as_bytes()) {
                found.push(if form == *canary {
                    form
                } else {
                    format!("{canary} (as {form})")
                });
            }
        }
    }
    found
}

pub fn memmem(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

/// Every file under `dir` (recursively, symlinks not followed) with its bytes.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
    {
        if entry.file_type().is_file() {
            let mut bytes = Vec::new();
            if let Ok(mut f) = std::fs::File::open(entry.path()) {
                let _ = f.read_to_end(&mut bytes);
            }
            out.push((entry.path().to_owned(), bytes));
        }
    }
    out
}

/// Gzip'd files (layers, compressed blobs) decompressed too, so that a secret inside a
/// layer is found.
pub fn with_gunzipped(bytes: Vec<u8>) -> Vec<u8> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut plain = Vec::new();
        if flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut plain)
            .is_ok()
        {
            let mut all = bytes;
            all.extend_from_slice(&plain);
            return all;
        }
    }
    bytes
}
