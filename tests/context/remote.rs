//! Remote ADD sources (`kiln::engine::remote::download`) against a real HTTP server on
//! loopback (axum): the body, its digest and `Last-Modified` mtime, `--checksum`, redirects
//! (followed, each hop checked again, bounded), the size limit, and the refusal of
//! non-public addresses — also when only a redirect leads there — before any connection.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use axum::{
    extract::Path as UrlPath,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use kiln::engine::remote::{download, AddressClass, RemoteError, RemotePolicy};
use reqwest::Url;
use sha2::{Digest as _, Sha256};

use crate::http_server::CountingServer;

const BODY: &[u8] = b"hello from the remote server\n";
/// Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example date).
const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
const LAST_MODIFIED_SECS: i64 = 784_111_777;

/// A tiny file server on 127.0.0.1 counting the requests it answers.
struct Server(CountingServer);

impl Server {
    async fn start() -> Self {
        Self(
            CountingServer::start(|port| {
                axum::Router::new()
                    .route(
                        "/files/{name}",
                        get(|UrlPath(name): UrlPath<String>| async move {
                            match name.as_str() {
                                "dated.txt" => {
                                    ([(header::LAST_MODIFIED, LAST_MODIFIED)], BODY).into_response()
                                }
                                "big.bin" => vec![7u8; 64 * 1024].into_response(),
                                _ => BODY.into_response(),
                            }
                        }),
                    )
                    .route(
                        "/redirect/{hops}",
                        get(move |UrlPath(hops): UrlPath<u32>| async move {
                            let to = if hops == 0 {
                                "/files/dated.txt".to_owned()
                            } else {
                                format!("/redirect/{}", hops - 1)
                            };
                            redirect(&to)
                        }),
                    )
                    .route(
                        "/to-metadata",
                        get(|| async { redirect("http://169.254.169.254/latest/meta-data/") }),
                    )
                    .route(
                        "/to-other-loopback",
                        get(move || async move { redirect(&format!("http://127.0.0.2:{port}/files/x")) }),
                    )
                    .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
            })
            .await,
        )
    }

    fn url(&self, path: &str) -> Url {
        Url::parse(&self.0.url(path)).unwrap()
    }

    fn requests(&self) -> usize {
        self.0.requests()
    }
}

fn redirect(to: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, to.to_owned())]).into_response()
}

/// The policy of an operator who allowed exactly the test server's address.
fn loopback_allowed() -> RemotePolicy {
    RemotePolicy {
        allowed_addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        ..RemotePolicy::default()
    }
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[tokio::test]
async fn downloads_the_body_with_its_digest_and_last_modified() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dated");
    let got = download(&server.url("/files/dated.txt"), &loopback_allowed(), &file, None)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), BODY);
    assert_eq!(got.digest, digest(BODY));
    assert_eq!(got.size, BODY.len() as u64);
    assert_eq!(got.mtime, LAST_MODIFIED_SECS);

    // Without Last-Modified: the Unix epoch, as BuildKit.
    let got = download(
        &server.url("/files/plain.txt"),
        &loopback_allowed(),
        &dir.path().join("plain"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(got.mtime, 0);

    // An error status fails, naming it.
    let err = download(
        &server.url("/missing"),
        &loopback_allowed(),
        &dir.path().join("m"),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RemoteError::Status { .. }), "{err}");
    assert!(err.to_string().contains("404"), "{err}");
}

#[tokio::test]
async fn a_checksum_is_verified_and_a_mismatch_keeps_nothing() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = digest(BODY);
    let file = dir.path().join("good");
    download(&server.url("/files/a"), &loopback_allowed(), &file, Some(&good))
        .await
        .unwrap();
    let wrong = digest(b"something else");
    let file = dir.path().join("bad");
    let err = download(&server.url("/files/a"), &loopback_allowed(), &file, Some(&wrong))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RemoteError::ChecksumMismatch { .. }), "{text}");
    assert!(text.contains(&wrong) && text.contains(&good), "{text}");
    assert!(!file.exists(), "a file that failed its checksum was kept");
}

#[tokio::test]
async fn redirects_are_followed_and_bounded() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let got = download(
        &server.url("/redirect/3"),
        &loopback_allowed(),
        &dir.path().join("r"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(got.mtime, LAST_MODIFIED_SECS);
    let err = download(
        &server.url("/redirect/11"),
        &loopback_allowed(),
        &dir.path().join("r2"),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RemoteError::TooManyRedirects { .. }), "{err}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_and_not_kept() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = RemotePolicy {
        max_bytes: 1000,
        ..loopback_allowed()
    };
    let file = dir.path().join("big");
    let err = download(&server.url("/files/big.bin"), &policy, &file, None)
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::TooLarge { limit: 1000, .. }), "{err}");
    assert!(err.to_string().contains("1000 bytes"), "{err}");
    assert!(!file.exists(), "an oversized download was kept");
}

#[tokio::test]
async fn non_public_addresses_are_refused_before_connecting() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let strict = RemotePolicy::default();
    let port = server.0.port;
    let cases = [
        (format!("http://127.0.0.1:{port}/files/a"), AddressClass::Loopback),
        (format!("http://localhost:{port}/files/a"), AddressClass::Loopback),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/files/a"),
            AddressClass::Loopback,
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            AddressClass::LinkLocal,
        ),
        ("http://10.0.0.1/x".to_owned(), AddressClass::Private),
        ("http://0.0.0.0/x".to_owned(), AddressClass::Unspecified),
    ];
    for (url, class) in cases {
        let err = download(&Url::parse(&url).unwrap(), &strict, &dir.path().join("x"), None)
            .await
            .unwrap_err();
        match &err {
            RemoteError::NonPublicAddress { class: got, .. } => assert_eq!(*got, class, "{url}: {err}"),
            other => panic!("{url}: not refused as a non-public address: {other}"),
        }
        assert!(err.to_string().contains("engine.allow_private_add_urls"), "{err}");
    }
    assert_eq!(server.requests(), 0, "a refused URL reached the server");

    // A redirect from an allowed address to a non-public one is refused at that hop.
    for (path, class) in [
        ("/to-metadata", AddressClass::LinkLocal),
        ("/to-other-loopback", AddressClass::Loopback),
    ] {
        let err = download(
            &server.url(path),
            &loopback_allowed(),
            &dir.path().join("y"),
            None,
        )
        .await
        .unwrap_err();
        match &err {
            RemoteError::NonPublicAddress { class: got, .. } => assert_eq!(*got, class, "{path}: {err}"),
            other => panic!("{path}: the redirect was not refused: {other}"),
        }
    }

    // With every private address allowed, loopback works.
    let open = RemotePolicy {
        allow_private: true,
        ..RemotePolicy::default()
    };
    let got = download(&server.url("/files/a"), &open, &dir.path().join("z"), None)
        .await
        .unwrap();
    assert_eq!(got.digest, digest(BODY));
    // A name goes to the addresses it was checked at (pinned), on the URL's port.
    let by_name = Url::parse(&format!("http://localhost:{port}/files/a")).unwrap();
    let got = download(&by_name, &open, &dir.path().join("n"), None)
        .await
        .unwrap();
    assert_eq!(got.digest, digest(BODY));
}
