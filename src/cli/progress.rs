//! The progress display of `kiln build`: status lines when the status changes, the build's
//! log bytes as they arrive, and the final line.
//!
//! Everything is written to one `Write` (stdout in the CLI, a buffer in tests). Log output
//! is raw bytes that need not end in a newline; a status line that follows such output
//! starts on a fresh line so the two never run together.

use std::io::{self, Write};

use crate::proto::builder::{BuildResponse, BuildStatus};

/// What `kiln build` has seen so far: the first `ref`, `base_ref` and build id the server
/// sent (later messages may leave them empty), and the last status shown.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BuildView {
    pub workspace_ref: String,
    pub base_ref: String,
    pub build_id: String,
    pub status: Option<BuildStatus>,
    pub message: String,
}

impl BuildView {
    /// Folds one `Build` stream message in. Returns true if the status, a reference, the
    /// build id or the message changed, i.e. when a new status line is worth showing.
    pub fn update(&mut self, resp: &BuildResponse) -> bool {
        let before = self.clone();
        let info = resp.info.as_ref();
        fill(&mut self.workspace_ref, &resp.r#ref);
        fill(&mut self.workspace_ref, info.map_or("", |i| i.r#ref.as_str()));
        fill(&mut self.base_ref, &resp.base_ref);
        fill(&mut self.base_ref, info.map_or("", |i| i.base_ref.as_str()));
        fill(&mut self.build_id, info.map_or("", |i| i.build_id.as_str()));
        self.status = Some(resp.status());
        if !resp.message.is_empty() {
            self.message = resp.message.clone();
        }
        *self != before
    }

    /// True once a `done_*` status arrived.
    pub fn is_done(&self) -> bool {
        matches!(
            self.status,
            Some(BuildStatus::DoneSuccess | BuildStatus::DoneFailure)
        )
    }

    /// The status line: `status: running  build=ID  ref=REF  base_ref=REF  (message)`,
    /// leaving out what is not known yet.
    pub fn status_line(&self) -> String {
        let status = self.status.unwrap_or(BuildStatus::Unknown).as_str_name();
        let mut line = format!("status: {status}");
        for (key, value) in [
            ("build", &self.build_id),
            ("ref", &self.workspace_ref),
            ("base_ref", &self.base_ref),
        ] {
            if !value.is_empty() {
                line.push_str(&format!("  {key}={value}"));
            }
        }
        if !self.message.is_empty() && !self.is_done() {
            line.push_str(&format!("  ({})", self.message));
        }
        line
    }
}

fn fill(slot: &mut String, value: &str) {
    if slot.is_empty() && !value.is_empty() {
        *slot = value.to_owned();
    }
}

/// Interleaves status lines and raw log bytes on one writer.
pub struct ProgressPrinter<W: Write> {
    out: W,
    /// False after log bytes that did not end in a newline.
    at_line_start: bool,
}

impl<W: Write> ProgressPrinter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            at_line_start: true,
        }
    }

    /// Writes one full line (status or final), starting a fresh line first if needed.
    pub fn line(&mut self, text: &str) -> io::Result<()> {
        if !self.at_line_start {
            self.out.write_all(b"\n")?;
        }
        writeln!(self.out, "{text}")?;
        self.at_line_start = true;
        self.out.flush()
    }

    /// Writes log bytes as they are.
    pub fn log_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.out.write_all(bytes)?;
        self.at_line_start = bytes.ends_with(b"\n");
        self.out.flush()
    }

    /// Ends a log that stopped mid-line, so that what follows starts on its own line.
    pub fn finish_line(&mut self) -> io::Result<()> {
        if !self.at_line_start {
            self.out.write_all(b"\n")?;
            self.at_line_start = true;
        }
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::builder::BuildInfo;

    fn running(id: &str) -> BuildResponse {
        BuildResponse {
            r#ref: "reg/ws:abc".into(),
            base_ref: "reg/base@sha256:1".into(),
            status: BuildStatus::Running as i32,
            message: String::new(),
            info: Some(BuildInfo {
                build_id: id.into(),
                status: BuildStatus::Running as i32,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn status_lines_only_on_change() {
        let mut view = BuildView::default();
        assert!(view.update(&running("b1")));
        assert_eq!(
            view.status_line(),
            "status: running  build=b1  ref=reg/ws:abc  base_ref=reg/base@sha256:1"
        );
        // The same message again changes nothing; a later message without refs keeps them.
        assert!(!view.update(&running("b1")));
        let done = BuildResponse {
            status: BuildStatus::DoneSuccess as i32,
            ..Default::default()
        };
        assert!(view.update(&done));
        assert!(view.is_done());
        assert_eq!(view.workspace_ref, "reg/ws:abc");
        assert_eq!(view.build_id, "b1");
    }

    #[test]
    fn refs_come_from_info_when_the_top_level_is_empty() {
        let mut view = BuildView::default();
        let resp = BuildResponse {
            status: BuildStatus::Running as i32,
            info: Some(BuildInfo {
                r#ref: "r".into(),
                base_ref: "b".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        view.update(&resp);
        assert_eq!((view.workspace_ref.as_str(), view.base_ref.as_str()), ("r", "b"));
        assert_eq!(view.status_line(), "status: running  ref=r  base_ref=b");
    }

    #[test]
    fn status_lines_never_join_a_partial_log_line() {
        let mut p = ProgressPrinter::new(Vec::new());
        p.line("status: running").unwrap();
        p.log_bytes(b"step 1\nstep 2 (no newline)").unwrap();
        p.line("status: done_success").unwrap();
        p.log_bytes(b"tail\n").unwrap();
        p.finish_line().unwrap();
        p.log_bytes(b"more").unwrap();
        p.finish_line().unwrap();
        assert_eq!(
            String::from_utf8(p.into_inner()).unwrap(),
            "status: running\nstep 1\nstep 2 (no newline)\nstatus: done_success\ntail\nmore\n"
        );
    }
}
