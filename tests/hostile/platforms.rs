//! Issue 12, point 3 (hostile side): `FROM --platform` is user input. Garbage, a platform
//! with `../` and an expansion bomb fail the build naming the line; a RUN emulated for
//! linux/arm64 is confined exactly as a native one (same user namespace mapping, seccomp,
//! capabilities; no host file visible).

use kiln::{engine::sandbox::emulation, proto::builder::BuildStatus, registry::Platform};

use super::{
    base_images, build_dockerfile, raw_tar, read_log, request, run_build, skip, upload, uploaded_source,
    within, Entry, KilnOptions, KilnServer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_from_platforms_fail_naming_the_line() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let bomb = format!(
        "ARG X={}\nFROM --platform={} scratch\n",
        "x".repeat(1024),
        "${X}".repeat(2048)
    );
    let cases = [
        (
            "FROM --platform=linux/../../etc scratch\n",
            &["Dockerfile line 1: FROM --platform: invalid platform \"linux/../../etc\""][..],
        ),
        (
            "FROM scratch\nFROM --platform=$NOPE/arm64 scratch\n",
            &["Dockerfile line 2: FROM --platform: invalid platform \"/arm64\""],
        ),
        (
            "FROM --platform=Linux/ARM64!; scratch\n",
            &["Dockerfile line 1: FROM --platform: invalid platform"],
        ),
        (bomb.as_str(), &["Dockerfile line 2: FROM: cannot expand"]),
    ];
    within(120, async {
        let mut client = kiln.builder().await;
        for (dockerfile, wanted) in cases {
            let outcome = build_dockerfile(&mut client, dockerfile).await;
            let text = if outcome.error.is_some() {
                outcome.text()
            } else {
                outcome.assert_ended(BuildStatus::DoneFailure)
            };
            for wanted in wanted {
                assert!(
                    text.contains(wanted),
                    "{:.200}: wanted {wanted:?} in {text:.2000}",
                    dockerfile
                );
            }
        }
        // The request's own list (`source.file.platforms`) is refused before anything runs.
        let digest = upload(
            &mut client,
            &raw_tar(&[Entry::File("Dockerfile", b"FROM scratch\n")]),
        )
        .await;
        for (platforms, wanted) in [
            (
                vec!["linux/../../etc"],
                "source.file.platforms: invalid platform \"linux/../../etc\"",
            ),
            (
                vec!["linux/arm64", "linux/aarch64"],
                "source.file.platforms: linux/arm64 is given twice",
            ),
            (
                vec!["linux/amd64"; 9],
                "source.file.platforms: at most 8 platforms",
            ),
        ] {
            let mut req = request(uploaded_source(&digest));
            if let Some(kiln::proto::builder::build_source::From::File(file)) =
                req.source.as_mut().and_then(|s| s.from.as_mut())
            {
                file.platforms = platforms.iter().map(|p| (*p).to_owned()).collect();
            }
            let message = run_build(&mut client, req).await.refusal("platforms");
            assert!(message.contains(wanted), "{platforms:?}: {message}");
        }
    })
    .await;
}

/// A RUN printing what confines it, each line tagged with `tag`.
fn probe(tag: &str, sentinel: &str) -> String {
    format!(
        "RUN echo \"{tag}MACHINE:$(uname -m)\"; \
             while read a b c; do echo \"{tag}UIDMAP:$a $b $c\"; done < /proc/self/uid_map; \
             grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status | sed 's/^/{tag}STATUS:/' | tr -d '\\t '; \
             test -e {sentinel} && echo {tag}HOST:visible || echo {tag}HOST:hidden; \
             unshare -U true 2>/dev/null && echo {tag}NESTED:allowed || echo {tag}NESTED:refused\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emulated_run_is_confined_as_a_native_one() {
    let host = Platform::host();
    let arm64: Platform = "linux/arm64".parse().unwrap();
    if host != Platform::linux_amd64() {
        skip::allow_or_fail(
            "qemu",
            &format!("the arm64 base image is made for an amd64 host, not {host}"),
        );
        return;
    }
    if let Err(e) = emulation::check(&arm64, &host, std::path::Path::new(emulation::BINFMT_MISC)) {
        skip::allow_or_fail("qemu", &e.to_string());
        return;
    }
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = base_images::ensure_multiarch_busybox(kiln.registry_addr());
    // A file on the host the steps must not see, at a path that exists in neither image.
    let sentinel = tempfile::Builder::new()
        .prefix("kiln-host-sentinel-")
        .tempfile()
        .unwrap();
    let sentinel = sentinel.path().to_str().unwrap().to_owned();
    let dockerfile = format!(
        "FROM --platform=linux/arm64 {base} AS emulated\n{}\
         FROM --platform=linux/amd64 {base}\nCOPY --from=emulated /etc/group /emulated-group\n{}",
        probe("EMU:", &sentinel),
        probe("NAT:", &sentinel),
    );
    within(300, async {
        let mut client = kiln.builder().await;
        let outcome = build_dockerfile(&mut client, &dockerfile).await;
        outcome.assert_ended(BuildStatus::DoneSuccess);
        let log =
            String::from_utf8_lossy(&read_log(&mut client, &outcome.build_id().unwrap()).await).into_owned();
        let tagged = |tag: &str| -> Vec<String> {
            log.lines()
                .filter_map(|l| l.strip_prefix(tag))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(tagged("EMU:MACHINE:"), ["aarch64"], "{log}");
        assert_eq!(tagged("NAT:MACHINE:"), ["x86_64"], "{log}");
        for what in ["UIDMAP:", "STATUS:", "HOST:", "NESTED:"] {
            let (emulated, native) = (tagged(&format!("EMU:{what}")), tagged(&format!("NAT:{what}")));
            assert!(!native.is_empty(), "{what}: {log}");
            assert_eq!(emulated, native, "{what} differs under emulation: {log}");
        }
        assert!(tagged("NAT:STATUS:").contains(&"Seccomp:2".to_string()), "{log}");
        assert_eq!(tagged("NAT:HOST:"), ["hidden"], "{log}");
        assert_eq!(tagged("NAT:NESTED:"), ["refused"], "{log}");
        assert_ne!(tagged("NAT:UIDMAP:")[0].split(' ').nth(1), Some("0"), "{log}");
    })
    .await;
}
