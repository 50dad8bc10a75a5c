//! Remote ADD sources (`ADD http://…`), which Kiln downloads in its own process and
//! network, through the real `kiln serve`:
//!
//! - with the operator's allow-list naming the loopback test server
//!   (`engine.allowed_add_url_addresses`), files land as BuildKit places them: named after
//!   the URL (or the destination), mode 0600 (or `--chmod`), owner 0:0 (or `--chown`),
//!   `Last-Modified` as mtime (else the epoch), archives not unpacked, URL and context
//!   sources in one ADD; `--checksum` verified; a body over `engine.max_remote_add_bytes`,
//!   a redirect to the cloud metadata address and COPY of a URL fail naming the line;
//! - with the defaults, URLs to loopback (by address and as `localhost`) and to
//!   169.254.169.254 fail naming the line and why, and the server never sees a request.

use axum::{
    extract::Path as UrlPath,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
};

use super::{
    busybox_in, digest_of, gzip, raw_tar, read_log, request, run_build, upload, uploaded_source, within,
    Client, Entry, Outcome,
};
use crate::support::{
    http_server::CountingServer,
    kiln::{KilnOptions, KilnServer},
};

const BODY: &[u8] = b"hello from the remote server\n";
const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
const LAST_MODIFIED_SECS: i64 = 784_111_777;

/// A file server on 127.0.0.1 counting the requests it gets.
async fn file_server(archive: Vec<u8>) -> CountingServer {
    CountingServer::start(move |_| {
        axum::Router::new()
            .route(
                "/files/{name}",
                get(move |UrlPath(name): UrlPath<String>| {
                    let archive = archive.clone();
                    async move {
                        match name.as_str() {
                            "archive.tar.gz" => archive.into_response(),
                            "big.bin" => vec![1u8; 256 * 1024].into_response(),
                            _ => ([(header::LAST_MODIFIED, LAST_MODIFIED)], BODY).into_response(),
                        }
                    }
                }),
            )
            .route(
                "/to-metadata",
                get(|| async {
                    (
                        StatusCode::FOUND,
                        [(header::LOCATION, "http://169.254.169.254/latest/meta-data/")],
                    )
                }),
            )
    })
    .await
}

/// Builds `dockerfile` with `files` beside it in an uploaded context.
async fn build(client: &mut Client, dockerfile: &str, files: &[(&str, &[u8])]) -> (Outcome, String) {
    let mut entries = vec![Entry::File("Dockerfile", dockerfile.as_bytes())];
    entries.extend(files.iter().map(|(name, data)| Entry::File(name, data)));
    let digest = upload(client, &raw_tar(&entries)).await;
    let outcome = run_build(client, request(uploaded_source(&digest))).await;
    let mut text = outcome.text();
    if let Some(id) = outcome
        .messages
        .iter()
        .find_map(|m| m.info.as_ref().map(|i| i.build_id.clone()))
        .filter(|id| !id.is_empty())
    {
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&read_log(client, &id).await));
    }
    (outcome, text)
}

#[track_caller]
fn assert_failed_naming(case: &str, outcome: &Outcome, text: &str, names: &[&str]) {
    assert!(
        outcome.error.is_some()
            || outcome.last_status() == Some(kiln::proto::builder::BuildStatus::DoneFailure),
        "{case}: the build did not fail:\n{text}"
    );
    for name in names {
        assert!(text.contains(name), "{case}: does not name {name:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_add_sources_land_as_buildkit_places_them() {
    let kiln =
        KilnServer::start(KilnOptions::embedded().with_toml(
            "[engine]\nallowed_add_url_addresses = [\"127.0.0.1\"]\nmax_remote_add_bytes = 100000\n",
        ));
    let base = busybox_in(&kiln);
    let archive = gzip(&raw_tar(&[Entry::File("inside.txt", b"packed\n")]));
    let server = file_server(archive.clone()).await;
    within(600, async {
        let mut client = kiln.builder().await;
        let hello = server.url("/files/hello.txt");
        let good = digest_of(BODY);
        let dockerfile = format!(
            "FROM {base}\n\
             ADD {hello} /d/\n\
             ADD --chown=42:43 --chmod=755 {hello} /d/renamed\n\
             ADD {} local.txt /m/\n\
             ADD --checksum={good} {hello} /c/\n\
             RUN stat -c 'STAT %n %a %u:%g %Y %s' /d/hello.txt /d/renamed /m/archive.tar.gz /m/local.txt \
                 /c/hello.txt && test ! -e /m/inside.txt && cat /d/hello.txt\n",
            server.url("/files/archive.tar.gz"),
        );
        let (outcome, log) = build(&mut client, &dockerfile, &[("local.txt", b"local\n")]).await;
        assert_eq!(
            outcome.last_status(),
            Some(kiln::proto::builder::BuildStatus::DoneSuccess),
            "{log}"
        );
        let size = BODY.len();
        for expected in [
            format!("STAT /d/hello.txt 600 0:0 {LAST_MODIFIED_SECS} {size}"),
            format!("STAT /d/renamed 755 42:43 {LAST_MODIFIED_SECS} {size}"),
            format!("STAT /m/archive.tar.gz 600 0:0 0 {}", archive.len()),
            "STAT /m/local.txt 644 0:0".to_owned(),
            format!("STAT /c/hello.txt 600 0:0 {LAST_MODIFIED_SECS} {size}"),
            "hello from the remote server".to_owned(),
        ] {
            assert!(log.contains(&expected), "missing {expected:?}:\n{log}");
        }

        // A checksum that does not match names the line and both digests.
        let wrong = digest_of(b"not the body");
        let dockerfile = format!("FROM {base}\nADD --checksum={wrong} {hello} /c/\n");
        let (outcome, text) = build(&mut client, &dockerfile, &[]).await;
        assert_failed_naming("bad checksum", &outcome, &text, &["line 2", &wrong, &good]);

        // Over the limit.
        let dockerfile = format!("FROM {base}\nADD {} /b/\n", server.url("/files/big.bin"));
        let (outcome, text) = build(&mut client, &dockerfile, &[]).await;
        assert_failed_naming("too large", &outcome, &text, &["line 2", "limit of 100000 bytes"]);

        // A redirect from the allowed server to the metadata address.
        let dockerfile = format!("FROM {base}\nADD {} /x/\n", server.url("/to-metadata"));
        let (outcome, text) = build(&mut client, &dockerfile, &[]).await;
        assert_failed_naming(
            "redirect to metadata",
            &outcome,
            &text,
            &["line 2", "169.254.169.254", "link-local"],
        );

        // COPY never downloads.
        let before = server.requests();
        let dockerfile = format!("FROM {base}\nCOPY {hello} /x/\n");
        let (outcome, text) = build(&mut client, &dockerfile, &[]).await;
        assert_failed_naming("COPY of a URL", &outcome, &text, &["line 2", "COPY"]);
        assert_eq!(server.requests(), before, "COPY downloaded");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_add_urls_to_private_addresses_are_refused() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    let base = busybox_in(&kiln);
    let server = file_server(Vec::new()).await;
    within(600, async {
        let mut client = kiln.builder().await;
        let port = server.port;
        let cases = [
            (format!("http://127.0.0.1:{port}/files/x"), "loopback"),
            (format!("http://localhost:{port}/files/x"), "loopback"),
            (
                "http://169.254.169.254/latest/meta-data/".to_owned(),
                "link-local",
            ),
        ];
        for (url, why) in cases {
            let dockerfile = format!("FROM {base}\nADD {url} /x/\n");
            let (outcome, text) = build(&mut client, &dockerfile, &[]).await;
            assert_failed_naming(
                &url,
                &outcome,
                &text,
                &["line 2", why, "engine.allow_private_add_urls"],
            );
        }
        assert_eq!(server.requests(), 0, "a refused URL reached the server");
    })
    .await;
}
