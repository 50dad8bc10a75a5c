//! Issue 9, point 11: limits. Huge logs, sparse archive entries, ARG expansion bombs and queue
//! time are bounded, and the service stays healthy.
//!
//! - A RUN printing 100 MB under `logs.max_bytes_per_build = 1 MiB`: the build succeeds, its
//!   stored log is the cap plus one marker line plus Kiln's closing line, on disk as through
//!   Logs, and the server's RSS stays bounded.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_log_is_capped_and_the_build_goes_on() {
    const CAP: usize = 1 << 20;
    const PRINTED: usize = 100_000_000;
    let kiln = KilnServer::start(
        KilnOptions::embedded().with_toml(&format!("[logs]\nmax_bytes_per_build = {CAP}\n")),
    );
    let base = busybox_in(&kiln);
    let pid = kiln.pid().expect("a running server");
    within(600, async {
        let mut client = kiln.builder().await;
        let rss = RssSampler::start(pid);
        let outcome = build_dockerfile(
            &mut client,
            &format!("FROM {base}\nRUN yes kiln-hostile-log-line | head -c {PRINTED}; echo after-$((6*7))\n"),
        )
        .await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
        let id = outcome.build_id().expect("a build id");
        let log = read_log(&mut client, &id).await;
        let marker = format!("log truncated at {CAP} bytes (logs.max_bytes_per_build)");
        let text = String::from_utf8_lossy(&log);
        assert_eq!(text.matches(&marker).count(), 1, "one marker line in the log");
        // The cap, the marker line and Kiln's own closing line ("pushed …"), nothing more.
        assert!(
            log.len() <= CAP + 4096,
            "the stored log has {} bytes, the cap is {CAP}",
            log.len()
        );
        let at = find(&log, marker.as_bytes()).unwrap();
        assert!(at <= CAP + 64, "the marker comes at {at}, past the cap");
        assert!(
            !text[at..].contains("kiln-hostile-log-line"),
            "output after the marker"
        );
        assert!(
            text[at..].contains("pushed "),
            "the verdict line is missing after the marker:\n{}",
            &text[at..]
        );
        let on_disk = std::fs::metadata(kiln.data_dir().join(format!("logs/{id}.log")))
            .expect("the log file")
            .len();
        assert_eq!(on_disk as usize, log.len(), "the file and Logs disagree");
        eprintln!(
            "capped log: {} bytes of {PRINTED} printed; RSS growth {:.1} MiB",
            log.len(),
            rss.growth() as f64 / 1048576.0
        );
        assert!(
            rss.growth() < RSS_GROWTH_BOUND,
            "RSS grew by {} MiB",
            rss.growth() >> 20
        );

        // The service is healthy and builds again.
        client
            .list_builds(ListBuildsRequest {})
            .await
            .expect("ListBuilds");
        let again = build_dockerfile(&mut client, &format!("FROM {base}\nRUN echo fine-$((6*7))\n")).await;
        again.assert_ended(BuildStatus::DoneSuccess);
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
