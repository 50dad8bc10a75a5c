//! Issue 9, point 11: limits. Huge logs, sparse archive entries, ARG expansion bombs and queue
//! time are bounded, and the service stays healthy.
//!
//! - A RUN printing 1 GiB (`yes | head -c 1G`) under `logs.max_bytes_per_build = 1 MiB` and
//!   under the default 100 MiB, and one printing 256 MiB without a single newline: each build
//!   succeeds, its stored log is
//!   the head and the tail of the output (at most the cap) around one `[… N bytes clipped …]`
//!   line, ending with Kiln's closing line; a follower from offset 0 and a read after the end
//!   get the same bytes, as on disk; the server's RSS grows less than 50 MiB.
//! - ARG expansion bombs (exponential growth of one word; many large words): the build fails
//!   with a message naming the Dockerfile line and the limit; the server's RSS stays bounded
//!   and it builds again afterwards.
//! - EXPOSE ranges over the whole port space on many lines: the build succeeds and the
//!   server's RSS stays bounded; a port of thousands of digits fails naming the line.
//! - A build queued behind `builds.max_concurrent = 1` for longer than `builds.timeout`
//!   succeeds: the timeout clock starts when the build gets its slot.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use kiln::proto::builder::{BuildStatus, ListBuildsRequest};

use super::{build_dockerfile, busybox_in, find, read_log, rss_bytes, within, Outcome};
use crate::support::kiln::{KilnOptions, KilnServer};

/// How far above its baseline the server's RSS may grow in these tests.
const RSS_GROWTH_BOUND: u64 = 200 << 20;

/// Samples the RSS of `pid` every 50 ms until dropped; `peak()` is the highest seen.
struct RssSampler {
    baseline: u64,
    peak: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let baseline = rss_bytes(pid);
        let peak = Arc::new(AtomicU64::new(baseline));
        let done = Arc::new(AtomicBool::new(false));
        let (p, d) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !d.load(Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if status.contains("VmRSS") {
                        p.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { baseline, peak, done }
    }

    /// The growth over the baseline so far.
    fn growth(&self) -> u64 {
        self.peak.load(Ordering::Relaxed).saturating_sub(self.baseline)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// How far the server's RSS may grow while a build prints far past its log cap.
const CLIPPED_LOG_RSS_BOUND: u64 = 50 << 20;

/// The log cap of most clipping tests: 1 MiB (a head of 512 KiB, a tail of 512 KiB).
const CAP: usize = 1 << 20;

/// `logs.max_bytes_per_build`'s default.
const DEFAULT_CAP: usize = 100 << 20;

/// Runs `command` in a RUN under a log cap of `cap` bytes (the server's), following its log
/// from offset 0 while it runs and sampling the server's RSS; checks the clipped log (the
/// head, one marker line, the tail; the follower's bytes, Logs' and the file's the same) and
/// returns it.
async fn clipped_build(kiln: &KilnServer, base: &str, command: &str, printed: u64, cap: usize) -> Vec<u8> {
    let pid = kiln.pid().expect("a running server");
    let mut client = kiln.builder().await;
    let rss = RssSampler::start(pid);
    // A follower from offset 0 while the build runs (the first build running on this server).
    let mut follower_client = kiln.builder().await;
    let follower = tokio::spawn(async move {
        loop {
            let builds = follower_client
                .list_builds(ListBuildsRequest {})
                .await
                .expect("ListBuilds")
                .into_inner()
                .builds;
            if let Some(running) = builds.iter().find(|b| b.status == BuildStatus::Running as i32) {
                return read_log(&mut follower_client, &running.build_id).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let dockerfile = format!("FROM {base}\nRUN {command}; echo; echo after-$((6*7))\n");
    let outcome = build_dockerfile(&mut client, &dockerfile).await;
    outcome.assert_ended(BuildStatus::DoneSuccess);
    let id = outcome.build_id().expect("a build id");
    let log = read_log(&mut client, &id).await;
    let text = String::from_utf8_lossy(&log);
    let marker_at = find(&log, "[… ".as_bytes()).unwrap_or_else(|| {
        panic!(
            "no clip marker in the log of {} bytes: {}",
            log.len(),
            &text[..text.len().min(3000)]
        )
    });
    let marker_end = marker_at + log[marker_at..].iter().position(|b| *b == b'\n').unwrap() + 1;
    let marker = &text[marker_at..marker_end];
    assert_eq!(text.matches("bytes clipped …]").count(), 1, "one marker line");
    let clipped: u64 = marker
        .trim_start_matches("[… ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a byte count in {marker:?}"));
    let (head, tail) = (&log[..marker_at], &log[marker_end..]);
    assert!(
        head.len() + tail.len() <= cap + 1,
        "head {} + tail {} bytes, the cap is {cap}",
        head.len(),
        tail.len()
    );
    assert!(head.len() >= cap / 2, "the head has {} bytes", head.len());
    assert!(head.starts_with(b"build "), "the head starts with Kiln's header");
    assert!(
        clipped >= printed - cap as u64,
        "{clipped} bytes clipped of {printed} printed"
    );
    assert!(
        tail.ends_with(b"\n") && String::from_utf8_lossy(tail).contains("after-42\n"),
        "the tail ends with the command's last line"
    );
    assert!(
        String::from_utf8_lossy(&tail[tail.len().saturating_sub(4096)..]).contains("pushed "),
        "the verdict line ends the tail"
    );
    let on_disk = std::fs::read(kiln.data_dir().join(format!("logs/{id}.log"))).expect("the log file");
    assert!(on_disk == log, "the file and Logs disagree");
    let followed = follower.await.expect("the follower");
    assert!(
        followed == log,
        "the follower from 0 got {} bytes, a read after the end {}",
        followed.len(),
        log.len()
    );
    assert!(
        !kiln.data_dir().join(format!("logs/{id}.clip")).exists(),
        "the clipped tail's segments are removed"
    );
    eprintln!(
        "clipped log: {} bytes of {printed} printed ({clipped} clipped); RSS growth {:.1} MiB",
        log.len(),
        rss.growth() as f64 / 1048576.0
    );
    assert!(
        rss.growth() < CLIPPED_LOG_RSS_BOUND,
        "RSS grew by {} MiB",
        rss.growth() >> 20
    );
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_log_keeps_its_head_and_tail_and_the_build_goes_on() {
    let kiln = KilnServer::start(
        KilnOptions::embedded().with_toml(&format!("[logs]\nmax_bytes_per_build = {CAP}\n")),
    );
    let base = busybox_in(&kiln);
    within(900, async {
        let log = clipped_build(
            &kiln,
            &base,
            "yes kiln-hostile-log-line | head -c 1073741824",
            1 << 30,
            CAP,
        )
        .await;
        // The head holds the first lines of output, the tail the last ones.
        let text = String::from_utf8_lossy(&log);
        assert!(text[..CAP / 2].contains("kiln-hostile-log-line\nkiln-hostile-log-line\n"));
        assert!(text[text.len() - CAP / 4..].contains("kiln-hostile-log-line\nkiln-hostile-log-line\n"));

        // The service is healthy and builds again.
        let mut client = kiln.builder().await;
        client
            .list_builds(ListBuildsRequest {})
            .await
            .expect("ListBuilds");
        let again = build_dockerfile(&mut client, &format!("FROM {base}\nRUN echo fine-$((6*7))\n")).await;
        again.assert_ended(BuildStatus::DoneSuccess);
    })
    .await;
}

/// The same at the default cap: 50 MiB of head followed live, 50 MiB of tail copied in at
/// the end, and still no memory growth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_log_at_the_default_cap_keeps_its_head_and_tail() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    within(900, async {
        let log = clipped_build(
            &kiln,
            &base,
            "yes kiln-hostile-log-line | head -c 1073741824",
            1 << 30,
            DEFAULT_CAP,
        )
        .await;
        assert!(log.len() > DEFAULT_CAP - 4096, "the log has {} bytes", log.len());
    })
    .await;
}

/// One line of 256 MiB, no newline anywhere: clipped like any output, the marker on a line of
/// its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_line_without_newlines_is_clipped() {
    let kiln = KilnServer::start(
        KilnOptions::embedded().with_toml(&format!("[logs]\nmax_bytes_per_build = {CAP}\n")),
    );
    let base = busybox_in(&kiln);
    within(900, async {
        let log = clipped_build(
            &kiln,
            &base,
            "head -c 268435456 /dev/zero | tr '\\0' x",
            256 << 20,
            CAP,
        )
        .await;
        let marker_at = find(&log, "[… ".as_bytes()).unwrap();
        assert_eq!(log[marker_at - 1], b'\n', "the marker starts a line of its own");
        assert!(log[marker_at - 1 - CAP / 4..marker_at - 1]
            .iter()
            .all(|b| *b == b'x'));
    })
    .await;
}

/// The failure text of a build: its error, or its last message and its log.
async fn failure_text(client: &mut super::Client, outcome: &Outcome) -> String {
    if let Some(status) = &outcome.error {
        super::assert_not_unknown(status);
        return status.message().to_owned();
    }
    assert_eq!(
        outcome.last_status(),
        Some(BuildStatus::DoneFailure),
        "the bomb must fail the build: {}",
        outcome.text()
    );
    let log = match outcome.build_id() {
        Some(id) => String::from_utf8_lossy(&read_log(client, &id).await).into_owned(),
        None => String::new(),
    };
    format!("{}\n{log}", outcome.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arg_expansion_bombs_fail_naming_the_line_and_memory_stays_bounded() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let pid = kiln.pid().expect("a running server");
    within(300, async {
        let mut client = kiln.builder().await;
        let rss = RssSampler::start(pid);

        // Exponential: 64 B, 1 KiB, 16 KiB, 256 KiB, 4 MiB (line 6), 64 MiB, 1 GiB, ...
        let sixteen = |v: &str| format!("${v}").repeat(16);
        let bomb = format!(
            "FROM {base}\nARG a={}\nARG b={}\nARG c={}\nARG d={}\nARG e={}\nARG f={}\nARG g={}\nRUN echo $g\n",
            "x".repeat(64),
            sixteen("a"),
            sixteen("b"),
            sixteen("c"),
            sixteen("d"),
            sixteen("e"),
            sixteen("f"),
        );
        assert!(bomb.len() < 2048);
        let outcome = build_dockerfile(&mut client, &bomb).await;
        let text = failure_text(&mut client, &outcome).await;
        assert!(
            text.contains("line 6") && text.contains("1048576 bytes"),
            "the error must name the line and the limit: {}",
            &text[..text.len().min(2000)]
        );

        // Many words under the word limit add up past the total one.
        let mut wide = format!("FROM {base}\nARG a={}\nARG b={}\nARG c={}\n", "x".repeat(64), sixteen("a"), sixteen("b"));
        wide.push_str(&format!("ARG d={}\n", "$c".repeat(48)));
        for i in 0..40 {
            wide.push_str(&format!("ENV E{i}=$d\n"));
        }
        wide.push_str("RUN true\n");
        let outcome = build_dockerfile(&mut client, &wide).await;
        let text = failure_text(&mut client, &outcome).await;
        assert!(
            text.contains("in total") && text.contains("line "),
            "the error must name the line and the total limit: {}",
            &text[..text.len().min(2000)]
        );

        eprintln!("expansion bombs: RSS growth {:.1} MiB", rss.growth() as f64 / 1048576.0);
        assert!(rss.growth() < RSS_GROWTH_BOUND, "RSS grew by {} MiB", rss.growth() >> 20);
        let again = build_dockerfile(&mut client, &format!("FROM {base}\nARG v=fine\nRUN echo $v-$((6*7))\n")).await;
        again.assert_ended(BuildStatus::DoneSuccess);
    })
    .await;
}

/// EXPOSE ranges over the whole port space, many times over: one key per port as Docker
/// records them (no cap, as in Docker), but keys merge, so the config holds at most
/// 3 × 65536 of them however many lines repeat the ranges; the server's RSS stays bounded. A
/// port number of thousands of digits fails naming the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_port_space_expose_ranges_stay_bounded() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let pid = kiln.pid().expect("a running server");
    within(600, async {
        let mut client = kiln.builder().await;
        let rss = RssSampler::start(pid);
        let mut dockerfile = format!("FROM {base}\n");
        for _ in 0..20 {
            dockerfile.push_str("EXPOSE 0-65535/tcp 0-65535/udp 0-65535/sctp\n");
        }
        dockerfile.push_str("RUN echo ports-$((6*7))\n");
        let outcome = build_dockerfile(&mut client, &dockerfile).await;
        outcome.assert_ended(BuildStatus::DoneSuccess);

        let huge = format!(
            "FROM {base}\nEXPOSE 80\nEXPOSE 1-{}/tcp\nRUN true\n",
            "9".repeat(4000)
        );
        let outcome = build_dockerfile(&mut client, &huge).await;
        let text = failure_text(&mut client, &outcome).await;
        assert!(
            text.contains("line 3") && text.contains("out of range"),
            "the error must name the line and say why: {}",
            &text[..text.len().min(2000)]
        );
        eprintln!(
            "EXPOSE ranges: RSS growth {:.1} MiB",
            rss.growth() as f64 / 1048576.0
        );
        assert!(
            rss.growth() < RSS_GROWTH_BOUND,
            "RSS grew by {} MiB",
            rss.growth() >> 20
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_time_does_not_count_against_the_timeout() {
    const TIMEOUT_SECS: u64 = 20;
    let kiln = KilnServer::start(KilnOptions::embedded().with_toml(&format!(
        "[builds]\nmax_concurrent = 1\ntimeout = \"{TIMEOUT_SECS}s\"\n"
    )));
    let base = busybox_in(&kiln);
    within(300, async {
        // A holds the only slot for ~16 s; B queues behind it, then runs ~8 s: B's whole time
        // is past the timeout, its own run well within it.
        let mut a_client = kiln.builder().await;
        let a_dockerfile = format!("FROM {base}\nRUN sleep 15; echo slot-holder-$((6*7))\n");
        let a = tokio::spawn(async move { build_dockerfile(&mut a_client, &a_dockerfile).await });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut b_client = kiln.builder().await;
        let started = Instant::now();
        let b = build_dockerfile(
            &mut b_client,
            &format!("FROM {base}\nRUN sleep 8; echo queued-$((6*7))\n"),
        )
        .await;
        let waited = started.elapsed();
        let a = a.await.unwrap();
        assert_eq!(a.last_status(), Some(BuildStatus::DoneSuccess), "A: {}", a.text());
        assert!(
            waited > Duration::from_secs(TIMEOUT_SECS),
            "B took {waited:?}, not longer than the timeout: the test proves nothing"
        );
        assert_eq!(
            b.last_status(),
            Some(BuildStatus::DoneSuccess),
            "B queued for a slot and then ran within the timeout, yet: {}",
            b.text()
        );
        let log = read_log(&mut b_client, &b.build_id().expect("a build id")).await;
        assert!(
            find(&log, b"waiting for a free build slot").is_some(),
            "B did not wait for a slot: {}",
            String::from_utf8_lossy(&log)
        );
    })
    .await;
}
