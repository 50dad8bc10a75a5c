//! The dashboard on the metrics address is a surface too: beyond loopback (or with an admin
//! token configured) no page or endpoint but `/metrics` answers without the admin token, a
//! wrong token is refused without echoing anything, and every page is served with a Content
//! Security Policy that runs no inline or foreign script. (That text users wrote renders
//! as text is checked in Chromium by `tests/service/dashboard.rs`.)

use std::net::{IpAddr, Ipv4Addr};

use base64::Engine as _;
use reqwest::{header, StatusCode};

use crate::support::kiln::{KilnOptions, KilnServer};

const TOKEN: &str = "dashboard-canary-token-5d1f";

const GUARDED: &[&str] = &[
    "/",
    "/builds/3f2a9c1e-5b7d-4e0f-9a8b-0c1d2e3f4a5b",
    "/assets/dashboard.js",
    "/api/builds",
    "/api/overview",
    "/api/builds/3f2a9c1e-5b7d-4e0f-9a8b-0c1d2e3f4a5b/log",
];

async fn get(url: &str, authorization: Option<&str>) -> (StatusCode, header::HeaderMap, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(a) = authorization {
        request = request.header(header::AUTHORIZATION, a);
    }
    let resp = request.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.text().await.unwrap_or_default())
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_beyond_loopback_needs_the_admin_token() {
    let kiln = KilnServer::start(KilnOptions {
        grpc_toml: format!("admin_token = \"{TOKEN}\"\n"),
        metrics_listen_ip: Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        ..KilnOptions::embedded()
    });
    let base = format!("http://{}", kiln.metrics_addr());
    let wrong_ones = [
        None,
        Some("Bearer dashboard-canary-token-5d1".to_owned()),
        Some(basic("admin", "nope")),
        Some(basic(TOKEN, "")),
        Some(TOKEN.to_owned()),
    ];
    for path in GUARDED {
        for wrong in &wrong_ones {
            let (status, headers, body) = get(&format!("{base}{path}"), wrong.as_deref()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} with {wrong:?}: {body}");
            let challenge = headers
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok());
            assert!(
                challenge.is_some_and(|c| c.starts_with("Basic ")),
                "{path}: a login prompt"
            );
            assert!(body.contains("admin token"), "{path}: says what to send: {body}");
            assert!(!body.contains(TOKEN), "{path}: the token is echoed");
        }
        for right in [format!("Bearer {TOKEN}"), basic("anyone", TOKEN)] {
            let (status, headers, body) = get(&format!("{base}{path}"), Some(&right)).await;
            let expected = if path.starts_with("/api/builds/") {
                StatusCode::NOT_FOUND // an unknown build, but past the door
            } else {
                StatusCode::OK
            };
            assert_eq!(status, expected, "{path} with the token: {body}");
            let csp = headers
                .get(header::CONTENT_SECURITY_POLICY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(
                csp.contains("script-src 'self'") && !csp.contains("unsafe"),
                "{path}: {csp}"
            );
            assert!(!body.contains(TOKEN), "{path}: the token is on a page");
        }
    }
    // The pages load their script from the origin; none is inline.
    let (_, _, index) = get(&format!("{base}/"), Some(&format!("Bearer {TOKEN}"))).await;
    assert!(index.contains("<script src=\"/assets/dashboard.js\""), "{index}");
    assert_eq!(index.matches("<script").count(), 1, "{index}");

    // Scrapers need nothing, and the metrics hold no token.
    let (status, _, metrics) = get(&format!("{base}/metrics"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.contains("kiln_builds_started_total"));
    assert!(!metrics.contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_beyond_loopback_without_a_token_opens_to_nobody() {
    let kiln = KilnServer::start(KilnOptions {
        metrics_listen_ip: Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        ..KilnOptions::embedded()
    });
    let base = format!("http://{}", kiln.metrics_addr());
    for path in GUARDED {
        for auth in [None, Some("Bearer anything".to_owned()), Some(basic("a", "b"))] {
            let (status, _, body) = get(&format!("{base}{path}"), auth.as_deref()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
            assert!(
                body.contains("grpc.admin_token"),
                "{path}: names the setting: {body}"
            );
        }
    }
    let (status, _, _) = get(&format!("{base}/metrics"), None).await;
    assert_eq!(status, StatusCode::OK);
}
