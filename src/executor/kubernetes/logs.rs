//! Following a builder container's log into the build's log, resumed after a dropped
//! connection without gaps or duplicates.
//!
//! The API server cannot resume a log at a byte offset, only at a time (`sinceTime`, whole
//! seconds). So Kiln asks for timestamped lines and keeps a [`LogCursor`]: the timestamp of
//! the last line it passed on and how many lines carried exactly that timestamp. On a
//! reconnect it asks from that second on and skips what it has already passed on.

use std::sync::Mutex;

use bytes::Bytes;
use futures::{AsyncBufReadExt as _, TryStreamExt as _};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{api::LogParams, Api};
use tokio::sync::mpsc;

use super::{
    pod::{PodState, CONTAINER},
    watch::PodWatch,
};

/// Where a log follower is in a container's log.
#[derive(Debug, Clone, Default)]
pub struct LogCursor {
    last: Option<Timestamp>,
    /// Lines passed on whose timestamp is `last`.
    seen_at_last: usize,
    /// Lines at the start of the container log that the build's log already holds (written
    /// by an earlier life of this Kiln): read, but not passed on again.
    already_logged: usize,
}

impl LogCursor {
    /// A cursor for a build whose log already holds the first `lines` lines of the
    /// container log.
    pub fn after_lines(lines: usize) -> Self {
        Self {
            already_logged: lines,
            ..Self::default()
        }
    }

    /// `sinceTime` for the next request: the last line's second, rounded down (the API
    /// server reads whole seconds, and kube rounds to the nearest one).
    fn since(&self) -> Option<Timestamp> {
        self.last.and_then(|t| Timestamp::from_second(t.as_second()).ok())
    }

    /// Takes one new line as the API server sends it with `timestamps=true`, and returns
    /// its text without the timestamp.
    fn accept<'a>(&mut self, line: &'a str) -> Option<&'a str> {
        let Some((stamp, text)) = line
            .split_once(' ')
            .and_then(|(s, text)| Some((s.parse::<Timestamp>().ok()?, text)))
        else {
            // Not a timestamped line (an API server that ignored the flag): pass it on.
            return Some(line);
        };
        match self.last {
            Some(last) if stamp == last => self.seen_at_last += 1,
            _ => {
                self.last = Some(stamp);
                self.seen_at_last = 1;
            }
        }
        if self.already_logged > 0 {
            self.already_logged -= 1;
            return None;
        }
        Some(text)
    }
}

/// Follows `pod`'s build container log from `cursor` until the container has ended and
/// everything it wrote has been passed to `out`. Returns early when the pod is gone.
pub async fn follow(
    api: &Api<Pod>,
    pod: &str,
    watch: &PodWatch,
    cursor: &Mutex<LogCursor>,
    out: &mpsc::UnboundedSender<Bytes>,
) {
    let cursor = || cursor.lock().unwrap_or_else(|e| e.into_inner());
    let mut changes = watch.changes();
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let state = watch.get(pod).map(|p| PodState::of(&p));
        if let Some(PodState::Waiting { .. }) | None = state {
            // Not started (or not seen yet): nothing to read. Wait for the pod to change.
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        let ended_before = state.as_ref().is_some_and(PodState::is_terminal);
        let params = LogParams {
            container: Some(CONTAINER.into()),
            follow: true,
            timestamps: true,
            since_time: cursor().since(),
            ..Default::default()
        };
        let mut replay = Replay::new(&cursor());
        match api.log_stream(pod, &params).await {
            Ok(stream) => {
                let mut lines = stream.lines();
                loop {
                    match lines.try_next().await {
                        Ok(Some(line)) => {
                            let text = replay.accept(&mut cursor(), &line).map(str::to_owned);
                            if let Some(text) = text {
                                let _ = out.send(Bytes::from(format!("{text}\n")));
                            }
                            backoff = std::time::Duration::from_millis(100);
                        }
                        Ok(None) => break,
                        Err(error) => {
                            tracing::debug!(pod, %error, "builder log stream broke; resuming");
                            break;
                        }
                    }
                }
            }
            Err(kube::Error::Api(status)) if status.code == 404 => return,
            Err(error) => tracing::debug!(pod, %error, "cannot read the builder log yet"),
        }
        if ended_before {
            // The container had ended before this read began, so the read got everything.
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
    }
}

/// Skips, on one connection, the lines at the cursor's instant that earlier connections
/// passed on already.
struct Replay {
    at: Option<Timestamp>,
    skip: usize,
}

impl Replay {
    fn new(cursor: &LogCursor) -> Self {
        Self {
            at: cursor.last,
            skip: cursor.seen_at_last,
        }
    }

    fn accept<'a>(&mut self, cursor: &mut LogCursor, line: &'a str) -> Option<&'a str> {
        let stamp = line
            .split_once(' ')
            .and_then(|(s, _)| s.parse::<Timestamp>().ok());
        match (stamp, self.at) {
            (Some(stamp), Some(at)) if stamp < at => None,
            (Some(stamp), Some(at)) if stamp == at && self.skip > 0 => {
                self.skip -= 1;
                None
            }
            _ => {
                self.at = None;
                cursor.accept(line)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(cursor: &mut LogCursor, lines: &[&str]) -> Vec<String> {
        let mut replay = Replay::new(cursor);
        lines
            .iter()
            .filter_map(|l| replay.accept(cursor, l).map(str::to_owned))
            .collect()
    }

    #[test]
    fn a_reconnect_passes_on_each_line_once() {
        let mut cursor = LogCursor::default();
        let first = feed(
            &mut cursor,
            &[
                "2026-11-30T10:00:00.100000000Z a",
                "2026-11-30T10:00:01.500000000Z b",
                "2026-11-30T10:00:01.500000000Z c",
            ],
        );
        assert_eq!(first, ["a", "b", "c"]);
        assert_eq!(cursor.since().unwrap().to_string(), "2026-11-30T10:00:01Z");
        // The server answers from the whole second: b and c again (same instant), then more,
        // including a line at that very instant that was not seen before.
        let second = feed(
            &mut cursor,
            &[
                "2026-11-30T10:00:01.200000000Z before",
                "2026-11-30T10:00:01.500000000Z b",
                "2026-11-30T10:00:01.500000000Z c",
                "2026-11-30T10:00:01.500000000Z d",
                "2026-11-30T10:00:02.000000000Z e",
            ],
        );
        assert_eq!(second, ["d", "e"]);
    }

    #[test]
    fn lines_already_in_the_build_log_are_not_passed_on_again() {
        let mut cursor = LogCursor::after_lines(2);
        let lines = [
            "2026-11-30T10:00:00.1Z a",
            "2026-11-30T10:00:00.2Z b",
            "2026-11-30T10:00:00.3Z c",
        ];
        assert_eq!(feed(&mut cursor, &lines), ["c"]);
        assert_eq!(feed(&mut cursor, &lines), Vec::<String>::new());
    }

    #[test]
    fn lines_without_timestamps_pass_through() {
        let mut cursor = LogCursor::default();
        assert_eq!(feed(&mut cursor, &["plain", "text"]), ["plain", "text"]);
    }
}
