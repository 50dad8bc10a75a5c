//! Issue 9, points 5–8 and 11 (RUN's side): what a RUN step can reach. Each test runs a
//! Dockerfile on a real `kiln serve` and asserts confinement from inside (what the step
//! prints) and from outside (listeners that must see no connection, the build's outcome).

use std::net::{IpAddr, TcpListener};

use kiln::proto::builder::BuildStatus;

use super::{build_dockerfile, busybox_in, read_log, within, KilnOptions, KilnServer};

/// The host's address on its default route (not loopback).
fn host_address() -> IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route and source address.
    probe
        .connect("192.0.2.1:9")
        .expect("these tests need a non-loopback IPv4 route");
    probe.local_addr().unwrap().ip()
}

/// The lines of `log` that start with `prefix`, without it.
fn tagged<'a>(log: &'a str, prefix: &str) -> Vec<&'a str> {
    log.lines().filter_map(|l| l.strip_prefix(prefix)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_is_namespaced_unprivileged_and_cannot_reach_the_host_s_loopback() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    // A port of the test's own on the host's loopback: nothing may connect to it.
    let canary = TcpListener::bind("127.0.0.1:0").unwrap();
    canary.set_nonblocking(true).unwrap();
    let registry_port: u16 = kiln.registry_addr().rsplit(':').next().unwrap().parse().unwrap();
    let ports = [
        ("grpc", kiln.grpc_addr().port()),
        ("metrics", kiln.metrics_addr().port()),
        ("registry", registry_port),
        ("canary", canary.local_addr().unwrap().port()),
    ];
    let host = host_address();
    let mut probes = String::new();
    for (name, port) in ports {
        for address in ["127.0.0.1".to_string(), "10.0.2.2".into(), host.to_string()] {
            probes.push_str(&format!(
                "nc -w 3 {address} {port} </dev/null && echo PORT:reached:{name}:{address} || echo PORT:refused:{name}:{address}; "
            ));
        }
    }
    let dockerfile = format!(
        "FROM {base}\n\
         RUN sed 's/^/UIDMAP:/' /proc/self/uid_map; id -u | sed 's/^/ID:/'; \
             grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status | sed 's/^/STATUS:/'; \
             tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' ' | sed 's/^/IFACES:/'; echo; \
             unshare -U true 2>/dev/null && echo NESTED:allowed || echo NESTED:refused; \
             ls /proc | grep -cE '^[0-9]+$' | sed 's/^/PIDS:/'; \
             {probes}\n"
    );
    within(300, async {
        let mut client = kiln.builder().await;
        let outcome = build_dockerfile(&mut client, &dockerfile).await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
        let log =
            String::from_utf8_lossy(&read_log(&mut client, &outcome.build_id().unwrap()).await).into_owned();

        let uid_map: Vec<Vec<&str>> = tagged(&log, "UIDMAP:")
            .iter()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(uid_map.len(), 1, "{log}");
        assert_eq!(uid_map[0][0], "0", "{log}");
        assert_ne!(uid_map[0][1], "0", "the step's root must not be host root: {log}");
        assert_eq!(tagged(&log, "ID:"), ["0"], "{log}");
        let status = tagged(&log, "STATUS:");
        let field = |name: &str| {
            status
                .iter()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {name} in {status:?}"))
        };
        assert_eq!(field("Seccomp:"), "2", "a seccomp filter: {log}");
        for caps in ["CapEff:", "CapBnd:"] {
            let bits = u64::from_str_radix(field(caps), 16).unwrap();
            assert_eq!(bits & (1 << 13), 0, "{caps} holds CAP_NET_RAW: {log}");
            assert_eq!(bits & (1 << 21), 0, "{caps} holds CAP_SYS_ADMIN: {log}");
        }
        assert_eq!(
            tagged(&log, "IFACES:"),
            ["lo tap0 "],
            "no host interface to sniff: {log}"
        );
        assert_eq!(tagged(&log, "NESTED:"), ["refused"], "{log}");
        let pids: usize = tagged(&log, "PIDS:")[0].parse().unwrap();
        assert!(pids <= 8, "the step sees host processes ({pids} pids): {log}");
        let reached: Vec<&str> = tagged(&log, "PORT:reached:");
        assert!(
            reached.is_empty(),
            "host loopback ports reached from RUN: {reached:?}"
        );
        assert_eq!(tagged(&log, "PORT:refused:").len(), ports.len() * 3, "{log}");
    })
    .await;
    assert!(
        canary.accept().is_err(),
        "something connected to the host's loopback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_networking_needs_the_operator_s_consent() {
    // `network = "none"` by default and `--network=host` in the Dockerfile: still refused.
    let mut kiln = KilnServer::start(KilnOptions::embedded().with_toml("[engine]\nnetwork = \"none\"\n"));
    let base = busybox_in(&kiln);
    within(300, async {
        let mut client = kiln.builder().await;
        let outcome = build_dockerfile(
            &mut client,
            &format!("FROM {base}\nRUN --network=host echo escaped\n"),
        )
        .await;
        let text = outcome.assert_ended(BuildStatus::DoneFailure);
        assert!(
            text.contains("line 2") && text.contains("engine.allow_host_network"),
            "{text}"
        );
        // `none` is honoured: only lo.
        let outcome = build_dockerfile(
            &mut client,
            &format!(
                "FROM {base}\nRUN tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sed 's/^/IF:/'\n"
            ),
        )
        .await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
        let log =
            String::from_utf8_lossy(&read_log(&mut client, &outcome.build_id().unwrap()).await).into_owned();
        assert_eq!(tagged(&log, "IF:"), ["lo"], "{log}");
    })
    .await;
    assert!(kiln.is_running());

    // The operator's consent: host networking works.
    let mut kiln =
        KilnServer::start(KilnOptions::embedded().with_toml("[engine]\nallow_host_network = true\n"));
    let base = busybox_in(&kiln);
    within(300, async {
        let mut client = kiln.builder().await;
        let outcome = build_dockerfile(
            &mut client,
            &format!(
                "FROM {base}\nRUN --network=host tail -n +3 /proc/net/dev | grep -c . | sed 's/^/N:/'\n"
            ),
        )
        .await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
        let log =
            String::from_utf8_lossy(&read_log(&mut client, &outcome.build_id().unwrap()).await).into_owned();
        let host_ifaces = std::fs::read_to_string("/proc/net/dev").unwrap().lines().count() - 2;
        assert_eq!(tagged(&log, "N:"), [host_ifaces.to_string().as_str()], "{log}");
    })
    .await;
    assert!(kiln.is_running());

    // And a configuration asking for the host's network without consent does not start.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "[engine]\nnetwork = \"host\"\n").unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--config"])
        .arg(config.path())
        .arg("--data-dir")
        .arg(data_dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = serve.kill();
            panic!("kiln serve started with network = \"host\" and no consent");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("engine.network") && stderr.contains("allow_host_network"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_the_memory_or_pids_limit_fails_its_build_only_naming_the_limit() {
    let mut kiln = KilnServer::start(
        KilnOptions::embedded().with_toml("[engine.limits]\nmemory = \"64MiB\"\npids = 32\n"),
    );
    let base = busybox_in(&kiln);
    within(300, async {
        let mut client = kiln.builder().await;
        // dd touches its whole 200 MiB buffer: the kernel's OOM killer ends it.
        let outcome = build_dockerfile(
            &mut client,
            &format!("FROM {base}\nRUN echo start\nRUN dd if=/dev/zero of=/dev/null bs=200M count=1\n"),
        )
        .await;
        let text = outcome.assert_ended(BuildStatus::DoneFailure);
        assert!(
            text.contains("line 3") && text.contains("memory limit of 64 MiB (engine.limits.memory)"),
            "{text}"
        );
        // A fork bomb in miniature: the shell cannot fork past 32 processes.
        let outcome = build_dockerfile(
            &mut client,
            &format!("FROM {base}\nRUN for i in $(seq 64); do sleep 3 & done; wait\n"),
        )
        .await;
        let text = outcome.assert_ended(BuildStatus::DoneFailure);
        assert!(
            text.contains("line 2") && text.contains("limit of 32 processes (engine.limits.pids)"),
            "{text}"
        );
        // Other builds go on: one within the limits succeeds on the same service.
        let outcome = build_dockerfile(
            &mut client,
            &format!("FROM {base}\nRUN dd if=/dev/zero of=/dev/null bs=8M count=1 && sleep 0.1 & wait\n"),
        )
        .await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
    })
    .await;
    assert!(kiln.is_running(), "the service died with its build");
}

/// `(keyctl, add_key, unshare)` system call numbers of this architecture.
#[cfg(target_arch = "x86_64")]
const SYSCALLS: (u32, u32, u32) = (250, 248, 272);
#[cfg(target_arch = "aarch64")]
const SYSCALLS: (u32, u32, u32) = (219, 217, 97);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_s_keyring_packet_sockets_and_nested_namespaces_are_refused() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    super::base_images::ensure_base_images(kiln.registry_addr(), true);
    let base = super::base_images::debian_ref(kiln.registry_addr());
    let (keyctl, add_key, unshare) = SYSCALLS;
    // Perl (in every Debian image) makes the raw system calls; each prints its errno text.
    let perl = format!(
        "$r = syscall({keyctl}, 0, -3, 0); print \"KEYCTL:$r:$!\\n\"; \
         my ($type, $desc, $payload) = (\"user\", \"kiln\", \"x\"); \
         $r = syscall({add_key}, $type, $desc, $payload, 1, -3); print \"ADDKEY:$r:$!\\n\"; \
         $r = syscall({unshare}, 0x10000000); print \"UNSHARE:$r:$!\\n\"; \
         use Socket; socket(my $s, 17, SOCK_RAW, 0x0300) ? print \"PACKET:open\\n\" : print \"PACKET:$!\\n\";"
    );
    let dockerfile = format!("FROM {base}\nRUN perl -e '{perl}'; wc -c < /proc/keys | sed 's/^/KEYS:/'\n");
    within(600, async {
        let mut client = kiln.builder().await;
        let outcome = build_dockerfile(&mut client, &dockerfile).await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
        let log =
            String::from_utf8_lossy(&read_log(&mut client, &outcome.build_id().unwrap()).await).into_owned();
        for call in ["KEYCTL:", "ADDKEY:", "UNSHARE:"] {
            assert_eq!(tagged(&log, call), ["-1:Operation not permitted"], "{call} {log}");
        }
        assert_eq!(tagged(&log, "PACKET:"), ["Operation not permitted"], "{log}");
        assert_eq!(tagged(&log, "KEYS:"), ["0"], "/proc/keys is masked: {log}");
    })
    .await;
}
