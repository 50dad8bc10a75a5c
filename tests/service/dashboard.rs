//! The dashboard on the metrics address, in headless Chromium (Debian's `chromium`): the
//! build list and a build page render, the build page's log follows a running build, text a
//! user wrote renders as text, and a screenshot of each page is written to
//! `<target dir>/test-output/dashboard/`. The builds' gauges and counters are checked on the
//! way (queued and running builds, slots, registry bytes, step cache, layer store). Without Chromium the test is skipped with a
//! reason, unless `KILN_REQUIRE_CHROMIUM` is set (as `scripts/test` does).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::Command;

use crate::{
    common::{within, Env, Mode},
    support::{base_images, kiln::sample},
};

/// Where the screenshots go: beside Cargo's `target/tmp`.
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent")
        .join("test-output")
        .join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The Chromium binary, or `None` (with the reason printed) when the test may skip.
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("chromium"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("KILN_REQUIRE_CHROMIUM").is_none(),
            "KILN_REQUIRE_CHROMIUM is set but `chromium` is not on PATH (Debian's chromium package)"
        );
        eprintln!("skipped: `chromium` is not on PATH (install Debian's chromium package)");
    }
    found
}

/// Runs headless Chromium on `url` with `args` (a fresh profile each time) and returns its
/// standard output. The page's scripts run for `virtual_ms` of virtual time first.
async fn chromium_run(chromium: &Path, url: &str, virtual_ms: u64, args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let run = Command::new(chromium)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--virtual-time-budget={virtual_ms}"),
        ])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .unwrap_or_else(|_| panic!("chromium on {url} took over 90 s"))
        .expect("running chromium");
    assert!(
        output.status.success(),
        "chromium on {url}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn dump_dom(chromium: &Path, url: &str, virtual_ms: u64) -> String {
    chromium_run(chromium, url, virtual_ms, &["--dump-dom".into()]).await
}

async fn screenshot(chromium: &Path, url: &str, file: &Path) {
    let _ = std::fs::remove_file(file);
    chromium_run(
        chromium,
        url,
        3000,
        &[
            format!("--screenshot={}", file.display()),
            "--window-size=1280,900".into(),
            "--hide-scrollbars".into(),
        ],
    )
    .await;
    let png = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(png.starts_with(b"\x89PNG"), "{} is a PNG", file.display());
    assert!(
        png.len() > 10_000,
        "{}: {} bytes, an empty page?",
        file.display(),
        png.len()
    );
}

/// The text of the element with `id` in a dumped DOM (up to its closing tag).
fn element<'a>(dom: &'a str, tag: &str, id: &str) -> &'a str {
    let open = format!("<{tag} id=\"{id}\"");
    let start = dom.find(&open).unwrap_or_else(|| panic!("no {open} in\n{dom}"));
    let end = dom[start..]
        .find(&format!("</{tag}>"))
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    let resp = http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
    serde_json::from_str(&resp.text().await.unwrap()).unwrap()
}

/// Starts `kiln build` on a context holding `dockerfile`, in the background.
fn start_build(addr: &str, dir: &Path, dockerfile: &str) -> tokio::process::Child {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", &dir.display().to_string(), "--addr", addr])
        .env_remove("KILN_ADDR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting kiln build")
}

/// Hostile text that a build's Dockerfile and log carry.
const SCRIPT_TAG: &str = "<script>document.title='pwned'</script>";
const IMG_TAG: &str = "\"><img src=x onerror=alert(1)>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_builds_and_follows_a_running_build_in_chromium() {
    let Some(chromium) = chromium() else {
        return;
    };
    // One build slot: the second build waits for it, and shows as queued.
    let env = Env::start_with(Mode::Embedded, "[builds]\nmax_concurrent = 1\n");
    let registry = env.registry();
    base_images::ensure_base_images(&registry, false);
    within(300, async {
        let addr = env.kiln.grpc_addr().to_string();
        let base = format!("http://{}", env.kiln.metrics_addr());
        let http = reqwest::Client::new();
        let contexts = tempfile::tempdir().unwrap();
        let slow = format!(
            "FROM {registry}/base/busybox:latest\n\
             RUN echo \"{}\" && echo '{IMG_TAG}'\n\
             RUN for i in $(seq 1 24); do echo tick-$i; sleep 0.5; done\n",
            SCRIPT_TAG.replace('"', "\\\"")
        );
        let _slow_build = start_build(&addr, &contexts.path().join("slow"), &slow);

        // The build appears and prints its first ticks.
        let build = loop {
            let builds = get_json(&http, &format!("{base}/api/builds")).await;
            if let Some(b) = builds.as_array().and_then(|b| b.first()) {
                let log = get_json(
                    &http,
                    &format!("{base}/api/builds/{}/log", b["id"].as_str().unwrap()),
                )
                .await;
                if log["text"].as_str().unwrap_or("").contains("tick-2") {
                    break b.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let id = build["id"].as_str().unwrap().to_owned();
        assert_eq!(build["status"], "running", "{build}");

        // A second build waits for the only slot: queued, on the page and in `kiln list`.
        let queued_dockerfile = format!("FROM {registry}/base/busybox:latest\nRUN echo second\n");
        let _queued_build = start_build(&addr, &contexts.path().join("queued"), &queued_dockerfile);
        let queued = loop {
            let builds = get_json(&http, &format!("{base}/api/builds")).await;
            if let Some(q) = builds.as_array().unwrap().iter().find(|b| b["id"] != id.as_str()) {
                break q.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let queued_id = queued["id"].as_str().unwrap().to_owned();
        let queued_status = loop {
            let b = get_json(&http, &format!("{base}/api/builds/{queued_id}")).await;
            if b["status"] == "queued" || b["status"] != "running" {
                break b["status"].clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(queued_status, "queued", "the second build waits for the slot");
        let list = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["list", "--addr", &addr])
            .env_remove("KILN_ADDR")
            .output()
            .await
            .unwrap();
        let list = String::from_utf8_lossy(&list.stdout).into_owned();
        let row = list
            .lines()
            .find(|l| l.starts_with(&queued_id))
            .unwrap_or_else(|| panic!("{list}"));
        assert!(
            row.contains(" queued "),
            "kiln list shows the waiting build as queued: {row}"
        );
        // The gauges say the same.
        let metrics = env.kiln.metrics_text().await;
        for (name, value) in [
            ("kiln_build_slots", 1.0),
            ("kiln_build_slots_in_use", 1.0),
            ("kiln_builds_running", 1.0),
            ("kiln_builds_queued", 1.0),
        ] {
            assert_eq!(sample(&metrics, name), value, "{name}");
        }

        // The index page lists both builds.
        let index = dump_dom(&chromium, &format!("{base}/"), 1500).await;
        let builds_table = element(&index, "table", "builds");
        assert!(builds_table.contains(&id), "{builds_table}");
        assert!(builds_table.contains(&queued_id), "{builds_table}");
        assert!(builds_table.contains(">running<"), "{builds_table}");
        assert!(builds_table.contains(">queued<"), "{builds_table}");
        let actors = element(&index, "table", "actors");
        assert!(actors.contains(">orchestrator<"), "the actor tree: {actors}");
        assert!(element(&index, "table", "caches").contains(">resolver<"));
        assert!(
            element(&index, "table", "storage").contains("kiln_storage"),
            "the storage section"
        );

        // The build page follows the log: a later dump shows more of it.
        let page = format!("{base}/builds/{id}");
        let ticks = |dom: &str| {
            (element(dom, "pre", "log").lines())
                .filter(|l| l.starts_with("tick-"))
                .count()
        };
        let first = dump_dom(&chromium, &page, 1000).await;
        let first_ticks = ticks(&first);
        let out = output_dir();
        screenshot(&chromium, &page, &out.join("build-running.png")).await;
        assert!(element(&first, "span", "status").contains("running"), "{first}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = dump_dom(&chromium, &page, 1000).await;
        let second_ticks = ticks(&second);
        assert!(
            second_ticks > first_ticks,
            "the log grows while the build runs: {first_ticks} then {second_ticks} lines"
        );

        // Text the user wrote is text: escaped in the DOM, never an element, never run.
        let log = element(&second, "pre", "log");
        assert!(
            log.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;"),
            "{log}"
        );
        assert!(log.contains("\"&gt;&lt;img src=x onerror=alert(1)&gt;"), "{log}");
        assert!(!second.contains("<img"), "an injected element: {second}");
        assert!(
            !second.contains("<title>pwned"),
            "an injected script ran: {second}"
        );
        let timeline = &second[second.find("<div id=\"timeline\"").expect("a timeline")..];
        let timeline = &timeline[..timeline.find("<h2>Status history").expect("the history after it")];
        assert!(
            timeline.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "the step's text: {timeline}"
        );

        screenshot(&chromium, &format!("{base}/"), &out.join("index.png")).await;
        eprintln!("screenshots in {}", out.display());

        // The finished build's page: complete, with its steps timed.
        loop {
            let b = get_json(&http, &format!("{base}/api/builds/{id}")).await;
            if b["status"] != "running" {
                assert_eq!(b["status"], "done_success", "{b}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let done = dump_dom(&chromium, &page, 2000).await;
        assert!(
            element(&done, "span", "log-state").contains("(complete)"),
            "{done}"
        );
        assert_eq!(ticks(&done), 24, "the whole log, each line once");
        // Two RUN steps, neither cached (FROM is no cacheable step).
        assert!(element(&done, "td", "cache-hits").contains(">0 of 2"), "{done}");
        screenshot(&chromium, &page, &out.join("build-done.png")).await;

        // What the builds moved and how their steps went is counted.
        let queued_done = loop {
            let b = get_json(&http, &format!("{base}/api/builds/{queued_id}")).await;
            if b["status"] != "running" && b["status"] != "queued" {
                break b;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(queued_done["status"], "done_success", "{queued_done}");
        let metrics = env.kiln.metrics_text().await;
        let host = format!("{{registry=\"{registry}\"}}");
        assert!(
            sample(&metrics, &format!("kiln_registry_pulled_bytes_total{host}")) > 0.0,
            "{metrics}"
        );
        assert!(
            sample(&metrics, &format!("kiln_registry_pushed_bytes_total{host}")) > 0.0,
            "{metrics}"
        );
        // Three RUN steps ran; none was cached.
        assert!(
            sample(&metrics, "kiln_step_cache_total{result=\"miss\"}") >= 3.0,
            "{metrics}"
        );
        for name in [
            "kiln_builds_running",
            "kiln_builds_queued",
            "kiln_build_slots_in_use",
        ] {
            assert_eq!(sample(&metrics, name), 0.0, "{name} after the builds");
        }
        assert!(
            sample(&metrics, "kiln_cache_entries{cache=\"layer_store\"}") >= 1.0,
            "{metrics}"
        );
    })
    .await;
}
