//! A censored log (`LogsRequest.censored`): the build's image references removed from its
//! text, as image-builder-mk3 removes them from every log it serves (`orchestrator.go`,
//! `censor`: the workspace and base references and their repositories, replaced by
//! nothing). Kiln removes them only when the caller asks.
//!
//! The log arrives in chunks that may split a reference anywhere, so a chunk's tail that
//! may be the start of a reference waits for the next chunk (or the end of the log).

use bytes::Bytes;
use futures::{Stream, StreamExt as _};

use super::{error::BuildError, orchestrator::BuildRefs};

/// Removes a fixed set of words from a byte stream cut into arbitrary chunks.
#[derive(Debug)]
pub struct Censor {
    /// Longest first: where a reference starts, so does its repository (a prefix of it).
    words: Vec<Vec<u8>>,
    /// Bytes that may be the start of a word the next chunk completes.
    held: Vec<u8>,
}

impl Censor {
    /// A censor of `refs`: both references and both repositories (`host[:port]/path`).
    pub fn of(refs: &BuildRefs) -> Self {
        let mut words: Vec<Vec<u8>> = [&refs.workspace, &refs.base]
            .into_iter()
            .flat_map(|r| [r.to_string(), format!("{}/{}", r.registry(), r.repository())])
            .map(String::into_bytes)
            .filter(|w| !w.is_empty())
            .collect();
        words.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        words.dedup();
        Self {
            words,
            held: Vec::new(),
        }
    }

    /// What of `chunk` (after what was held) can go out now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        let mut text = std::mem::take(&mut self.held);
        text.extend_from_slice(chunk);
        self.scan(&text, false)
    }

    /// The rest, at the end of the log.
    pub fn finish(&mut self) -> Bytes {
        let text = std::mem::take(&mut self.held);
        self.scan(&text, true)
    }

    /// Copies `text` without the words, matching the longest word at each place. Before the
    /// end, a tail that may be the start of a word is held instead.
    fn scan(&mut self, text: &[u8], at_end: bool) -> Bytes {
        let mut out = Vec::with_capacity(text.len());
        let mut at = 0;
        while at < text.len() {
            let rest = &text[at..];
            // First: a longer word the next chunk may complete (a reference whose
            // repository is already here).
            if !at_end
                && self
                    .words
                    .iter()
                    .any(|w| w.len() > rest.len() && w.starts_with(rest))
            {
                self.held = rest.to_vec();
                break;
            }
            if let Some(word) = self.words.iter().find(|w| rest.starts_with(w)) {
                at += word.len();
                continue;
            }
            out.push(text[at]);
            at += 1;
        }
        Bytes::from(out)
    }

    /// `stream` censored.
    pub fn apply(
        mut self,
        stream: impl Stream<Item = Result<Bytes, BuildError>> + Send + 'static,
    ) -> impl Stream<Item = Result<Bytes, BuildError>> + Send + 'static {
        async_stream::try_stream! {
            futures::pin_mut!(stream);
            while let Some(chunk) = stream.next().await {
                let out = self.push(&chunk?);
                if !out.is_empty() {
                    yield out;
                }
            }
            let rest = self.finish();
            if !rest.is_empty() {
                yield rest;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs() -> BuildRefs {
        BuildRefs {
            workspace: "reg.example:5000/kiln/workspace-images:abc".parse().unwrap(),
            base: "reg.example:5000/kiln/base-images:def".parse().unwrap(),
        }
    }

    fn censor_all(chunks: &[&str]) -> String {
        let mut censor = Censor::of(&refs());
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&censor.push(chunk.as_bytes()));
        }
        out.extend_from_slice(&censor.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn references_and_repositories_are_removed_wherever_the_chunks_split_them() {
        let log = "pushing reg.example:5000/kiln/workspace-images:abc\n\
                   from reg.example:5000/kiln/base-images:def and reg.example:5000/kiln/base-images@sha256:00\n\
                   done\n";
        let expected = "pushing \nfrom  and @sha256:00\ndone\n";
        assert_eq!(censor_all(&[log]), expected);
        // Every split point, and one byte at a time.
        for at in 0..log.len() {
            assert_eq!(censor_all(&[&log[..at], &log[at..]]), expected, "split at {at}");
        }
        let bytes: Vec<String> = log.chars().map(String::from).collect();
        let bytes: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(censor_all(&bytes), expected);
        // Text without references passes unchanged.
        assert_eq!(censor_all(&["plain ", "text"]), "plain text");
    }
}
