//! Who may call the operator RPCs: a tower layer in front of every gRPC service.
//!
//! `kiln.admin.v1.Admin/*` and `builder.ImageBuilder/CancelBuild` can crash actors and stop
//! other people's builds. When Kiln listens beyond loopback (`grpc.addr` is not 127.0.0.0/8 or
//! `::1`), or whenever `grpc.admin_token` is configured, such a call needs one of:
//!
//! - the metadata `authorization: Bearer <grpc.admin_token>` (compared in constant time), or
//! - a client certificate verified against `grpc.tls_client_ca` (mutual TLS).
//!
//! A call with neither is `Unauthenticated`; a call with a wrong token is `PermissionDenied`;
//! both messages say what to send. Every other RPC (Build, Logs, ListBuilds, ...) is open.
//! The token never reaches a log line or an error message.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use sha2::{Digest as _, Sha256};
use tonic::{
    transport::server::{TcpConnectInfo, TlsConnectInfo},
    Status,
};

use crate::{
    config::{Config, ConfigError},
    model::Secret,
};

/// gRPC paths (services end with `/`) that need credentials when access is guarded.
const PROTECTED: &[&str] = &["/kiln.admin.v1.Admin/", "/builder.ImageBuilder/CancelBuild"];

/// Whether the RPC at `path` (`/package.Service/Method`) is an operator RPC.
pub fn is_protected(path: &str) -> bool {
    PROTECTED.iter().any(|p| {
        if p.ends_with('/') {
            path.starts_with(p)
        } else {
            path == *p
        }
    })
}

/// What the operator RPCs need, derived from the config once at start-up.
#[derive(Clone)]
pub struct AccessPolicy {
    guard: Option<Guard>,
}

#[derive(Clone)]
struct Guard {
    /// SHA-256 of the admin token. Comparing digests keeps the comparison's time independent
    /// of where a wrong token differs and of the token's length.
    token_digest: Option<[u8; 32]>,
    /// Whether a verified client certificate is enough (`grpc.tls_client_ca` is set).
    client_certificates: bool,
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.guard {
            None => f.write_str("AccessPolicy::Open"),
            Some(g) => f
                .debug_struct("AccessPolicy::Guarded")
                .field("token", &g.token_digest.map(|_| "<redacted>"))
                .field("client_certificates", &g.client_certificates)
                .finish(),
        }
    }
}

impl AccessPolicy {
    /// Everything open (a loopback listener without a token).
    pub fn open() -> Self {
        Self { guard: None }
    }

    /// Operator RPCs need `token` (when given) or, with `client_certificates`, a verified
    /// client certificate.
    pub fn guarded(token: Option<&Secret>, client_certificates: bool) -> Self {
        Self {
            guard: Some(Guard {
                token_digest: token.map(|t| digest(t.expose().as_bytes())),
                client_certificates,
            }),
        }
    }

    /// The policy `config` asks for: guarded when `grpc.addr` is not loopback or an admin
    /// token is configured, open otherwise.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let token = config.grpc.admin_token()?;
        let client_certificates = config.grpc.tls_client_ca.is_some();
        if config.grpc.listens_beyond_loopback() || token.is_some() {
            Ok(Self::guarded(token.as_ref(), client_certificates))
        } else {
            Ok(Self::open())
        }
    }

    /// The dashboard's policy (`api::dashboard`, on `metrics.addr`): guarded when that
    /// address is not loopback or an admin token is configured, as the Admin API. Only the
    /// token opens it: a browser has no client certificate to offer over plain HTTP.
    pub fn for_dashboard(config: &Config) -> Result<Self, ConfigError> {
        let token = config.grpc.admin_token()?;
        if !config.metrics.addr.ip().is_loopback() || token.is_some() {
            Ok(Self::guarded(token.as_ref(), false))
        } else {
            Ok(Self::open())
        }
    }

    /// Decides one dashboard request by its `Authorization` header: `Bearer <token>`, or
    /// HTTP Basic with the token as the password (what a browser sends after its login
    /// prompt; the user name is ignored). `Err` says what to send.
    pub fn check_http(&self, authorization: Option<&[u8]>) -> Result<(), &'static str> {
        let Some(guard) = &self.guard else {
            return Ok(());
        };
        let Some(expected) = &guard.token_digest else {
            return Err("the dashboard beyond loopback needs grpc.admin_token, and this Kiln has none");
        };
        let what_to_send =
            "send `Authorization: Bearer <grpc.admin_token>`, or log in with the admin token as the password";
        let token = authorization.and_then(|raw| {
            bearer_token(raw)
                .map(<[u8]>::to_vec)
                .or_else(|| basic_password(raw))
        });
        match token {
            Some(token) if constant_time_eq(expected, &digest(&token)) => Ok(()),
            _ => Err(what_to_send),
        }
    }

    /// Whether operator RPCs need credentials at all.
    pub fn is_guarded(&self) -> bool {
        self.guard.is_some()
    }

    /// Decides one call to `path`. `authorization` is the raw `authorization` metadata, if
    /// any; `verified_client_certificate` whether the TLS handshake verified a client
    /// certificate.
    pub fn check(
        &self,
        path: &str,
        authorization: Option<&[u8]>,
        verified_client_certificate: bool,
    ) -> Result<(), Status> {
        let Some(guard) = &self.guard else {
            return Ok(());
        };
        if !is_protected(path) {
            return Ok(());
        }
        if guard.client_certificates && verified_client_certificate {
            return Ok(());
        }
        let what_to_send = guard.what_to_send();
        let Some(raw) = authorization else {
            return Err(Status::unauthenticated(format!(
                "{path} needs credentials: {what_to_send}"
            )));
        };
        let Some(token) = bearer_token(raw) else {
            return Err(Status::unauthenticated(format!(
                "{path}: the authorization metadata is not `Bearer <token>`; {what_to_send}"
            )));
        };
        match &guard.token_digest {
            Some(expected) if constant_time_eq(expected, &digest(token)) => Ok(()),
            Some(_) => Err(Status::permission_denied(format!(
                "{path}: the bearer token does not match grpc.admin_token"
            ))),
            None => Err(Status::permission_denied(format!(
                "{path}: this Kiln has no grpc.admin_token, so bearer tokens are not accepted; \
                 {what_to_send}"
            ))),
        }
    }
}

impl Guard {
    fn what_to_send(&self) -> &'static str {
        match (self.token_digest.is_some(), self.client_certificates) {
            (true, true) => {
                "send the metadata `authorization: Bearer <grpc.admin_token>` (kiln --token) or \
                 connect with a client certificate signed by grpc.tls_client_ca"
            }
            (true, false) => "send the metadata `authorization: Bearer <grpc.admin_token>` (kiln --token)",
            (false, _) => {
                "connect with a client certificate signed by grpc.tls_client_ca (kiln --tls-cert \
                 and --tls-key)"
            }
        }
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, as in HTTP).
fn bearer_token(raw: &[u8]) -> Option<&[u8]> {
    let raw = raw.trim_ascii();
    let (scheme, rest) = raw.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (rest.first().is_some_and(u8::is_ascii_whitespace) && !token.is_empty()).then_some(token)
}

/// The password of `Basic <base64(user:password)>` (the scheme is case-insensitive).
fn basic_password(raw: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let raw = raw.trim_ascii();
    let (scheme, rest) = raw.split_at_checked(5)?;
    if !scheme.eq_ignore_ascii_case(b"basic") || !rest.first().is_some_and(u8::is_ascii_whitespace) {
        return None;
    }
    let pair = base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()?;
    let colon = pair.iter().position(|b| *b == b':')?;
    let password = &pair[colon + 1..];
    (!password.is_empty()).then(|| password.to_vec())
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares every byte, whatever the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(difference) == 0
}

/// Applies an [`AccessPolicy`] to every request of the gRPC server.
#[derive(Clone)]
pub struct AccessLayer {
    policy: Arc<AccessPolicy>,
}

impl AccessLayer {
    pub fn new(policy: AccessPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = AccessControl<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessControl {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AccessLayer`] makes: refuses operator calls without credentials before
/// they reach the service.
#[derive(Clone)]
pub struct AccessControl<S> {
    inner: S,
    policy: Arc<AccessPolicy>,
}

/// Whether the connection's TLS handshake verified a client certificate. With
/// `grpc.tls_client_ca` set, rustls only completes handshakes whose certificate chain
/// verifies against it.
fn has_client_certificate<B>(req: &http::Request<B>) -> bool {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .is_some_and(|certs| !certs.is_empty())
}

fn peer<B>(req: &http::Request<B>) -> Option<std::net::SocketAddr> {
    req.extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            req.extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

impl<S, B, R> tower::Service<http::Request<B>> for AccessControl<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let verdict = self.policy.check(
            req.uri().path(),
            req.headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            has_client_certificate(&req),
        );
        match verdict {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                tracing::warn!(
                    method = %req.uri().path(),
                    peer = ?peer(&req),
                    code = ?status.code(),
                    "refused an operator call without valid credentials"
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    const ADMIN: &str = "/kiln.admin.v1.Admin/ListActors";
    const CANCEL: &str = "/builder.ImageBuilder/CancelBuild";

    #[test]
    fn the_dashboard_opens_to_the_token_as_bearer_or_basic_password() {
        use base64::Engine as _;
        let basic = |pair: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair));
        assert_eq!(AccessPolicy::open().check_http(None), Ok(()));
        let policy = AccessPolicy::guarded(Some(&Secret::new("s3cret-token")), false);
        assert!(policy.check_http(None).is_err());
        assert_eq!(policy.check_http(Some(b"Bearer s3cret-token")), Ok(()));
        assert_eq!(
            policy.check_http(Some(basic("admin:s3cret-token").as_bytes())),
            Ok(())
        );
        assert_eq!(policy.check_http(Some(basic(":s3cret-token").as_bytes())), Ok(()));
        for wrong in [
            "Bearer s3cret-toke".to_owned(),
            "Bearer".to_owned(),
            basic("s3cret-token:"),
            basic("admin:wrong"),
            "Basic !!!".to_owned(),
            "s3cret-token".to_owned(),
        ] {
            let refused = policy.check_http(Some(wrong.as_bytes()));
            assert!(refused.is_err(), "{wrong:?} was let in");
            assert!(!refused.unwrap_err().contains("s3cret"), "the token leaks");
        }
        let no_token = AccessPolicy::guarded(None, true);
        assert!(no_token.check_http(Some(b"Bearer x")).is_err());
    }

    #[test]
    fn only_operator_rpcs_are_protected() {
        assert!(is_protected(ADMIN));
        assert!(is_protected("/kiln.admin.v1.Admin/RestartActor"));
        assert!(is_protected(CANCEL));
        for open in [
            "/builder.ImageBuilder/Build",
            "/builder.ImageBuilder/ListBuilds",
            "/builder.ImageBuilder/CancelBuildX",
            "/grpc.health.v1.Health/Check",
            "/kiln.admin.v1.AdminX/ListActors",
        ] {
            assert!(!is_protected(open), "{open}");
        }
    }

    #[test]
    fn an_open_policy_lets_everything_through() {
        assert!(AccessPolicy::open().check(ADMIN, None, false).is_ok());
    }

    #[test]
    fn a_token_is_needed_and_checked() {
        let token = Secret::new("s3cret-canary");
        let policy = AccessPolicy::guarded(Some(&token), false);
        let code = |auth: Option<&str>| {
            policy
                .check(ADMIN, auth.map(str::as_bytes), false)
                .map_err(|s| s.code())
        };
        assert_eq!(code(None), Err(Code::Unauthenticated));
        assert_eq!(code(Some("Basic czNjcmV0")), Err(Code::Unauthenticated));
        assert_eq!(code(Some("Bearer")), Err(Code::Unauthenticated));
        assert_eq!(code(Some("Bearer wrong")), Err(Code::PermissionDenied));
        assert_eq!(code(Some("Bearer s3cret-canaryX")), Err(Code::PermissionDenied));
        assert_eq!(code(Some("Bearer s3cret-canary")), Ok(()));
        assert_eq!(code(Some("bearer   s3cret-canary ")), Ok(()));
        // A client certificate does not count without grpc.tls_client_ca.
        assert!(policy.check(CANCEL, None, true).is_err());
        // Read RPCs need nothing.
        assert!(policy
            .check("/builder.ImageBuilder/ListBuilds", None, false)
            .is_ok());
    }

    #[test]
    fn messages_say_what_to_send_and_never_echo_the_token() {
        let token = Secret::new("s3cret-canary");
        let policy = AccessPolicy::guarded(Some(&token), true);
        let missing = policy.check(CANCEL, None, false).unwrap_err();
        assert!(
            missing.message().contains("authorization: Bearer"),
            "{}",
            missing.message()
        );
        assert!(
            missing.message().contains("client certificate"),
            "{}",
            missing.message()
        );
        let wrong = policy
            .check(CANCEL, Some(b"Bearer s3cret-canar"), false)
            .unwrap_err();
        assert!(
            wrong.message().contains("grpc.admin_token"),
            "{}",
            wrong.message()
        );
        for status in [missing, wrong] {
            assert!(!status.message().contains("s3cret"), "{}", status.message());
        }
        assert!(!format!("{policy:?}").contains("s3cret"));
    }

    #[test]
    fn a_verified_client_certificate_is_enough_with_a_client_ca() {
        let policy = AccessPolicy::guarded(None, true);
        assert!(policy.check(ADMIN, None, true).is_ok());
        assert_eq!(
            policy.check(ADMIN, None, false).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            policy.check(ADMIN, Some(b"Bearer x"), false).unwrap_err().code(),
            Code::PermissionDenied
        );
    }

    #[test]
    fn the_config_decides_the_policy() {
        let config = |text: &str| Config::parse(text).unwrap();
        assert!(!AccessPolicy::from_config(&Config::default())
            .unwrap()
            .is_guarded());
        let beyond = config("[grpc]\naddr = \"0.0.0.0:7070\"\nadmin_token = \"t\"\n");
        assert!(AccessPolicy::from_config(&beyond).unwrap().is_guarded());
        // A configured token is asked for on loopback too.
        let local = config("[grpc]\nadmin_token = \"t\"\n");
        assert!(AccessPolicy::from_config(&local).unwrap().is_guarded());
    }

    #[test]
    fn comparison_is_exact() {
        let a = digest(b"a");
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn the_layer_answers_refusals_itself() {
        use tower::{Layer as _, Service as _, ServiceExt as _};
        let token = Secret::new("t");
        let layer = AccessLayer::new(AccessPolicy::guarded(Some(&token), false));
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("reached")))
        });
        let mut svc = layer.layer(inner);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let req = http::Request::builder().uri(ADMIN).body(()).unwrap();
            let resp = svc.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(resp.body(), "");
            let status = Status::from_header_map(resp.headers()).unwrap();
            assert_eq!(status.code(), Code::Unauthenticated);

            let req = http::Request::builder()
                .uri(ADMIN)
                .header("authorization", "Bearer t")
                .body(())
                .unwrap();
            let resp = svc.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(resp.body(), "reached");
        });
    }
}
