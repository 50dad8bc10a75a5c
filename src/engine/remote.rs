//! Remote ADD sources (`ADD https://host/path/file /dest`), downloaded by Kiln itself the
//! way BuildKit's HTTP source does (`llb.HTTP`, `source/http/httpsource.go`): the body is
//! stored as one file named after the URL's last path segment, never unpacked, with the
//! response's `Last-Modified` as its mtime (the Unix epoch without one), and checked against
//! `--checksum` when the line gives one.
//!
//! The download runs in Kiln's own process and network, so every URL is hostile: it must not
//! become a request forgery into the host or its cluster. Unless the operator allows private
//! destinations ([`RemotePolicy::allow_private`], `engine.allow_private_add_urls`):
//!
//! - every address a host name resolves to is classified ([`classify`]); one loopback,
//!   link-local (cloud metadata at 169.254.169.254), private, shared, unspecified, broadcast
//!   or multicast address refuses the whole URL;
//! - the connection goes to exactly the addresses checked (the resolution is pinned into the
//!   HTTP client), so a second DNS answer cannot swap them (DNS rebinding);
//! - redirects are followed by hand, at most [`MAX_REDIRECTS`], each hop checked again;
//! - no proxy from the environment, no cookies, no credentials of Kiln's (registry or git)
//!   are ever sent: only what the URL itself carries;
//! - the body is streamed to a file, never held in memory, up to [`RemotePolicy::max_bytes`];
//!   connecting and every read are bounded in time.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use reqwest::Url;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

/// At most this many redirects are followed for one URL (Go's HTTP client, which BuildKit
/// uses, stops after 10 as well).
pub const MAX_REDIRECTS: usize = 10;

/// The default of [`RemotePolicy::max_bytes`]: 10 GiB.
pub const DEFAULT_MAX_REMOTE_ADD_BYTES: u64 = 10 << 30;

/// The name BuildKit gives a URL whose path has no last segment (`https://host/`).
pub const UNNAMED_FILE: &str = "__unnamed__";

/// What a remote ADD source may reach and how much it may bring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePolicy {
    /// Whether URLs may reach loopback, link-local, private and other non-public addresses
    /// (`engine.allow_private_add_urls`). Default false.
    pub allow_private: bool,
    /// Non-public addresses allowed all the same (`engine.allowed_add_url_addresses`): an
    /// internal artifact server, say, without opening every private address.
    pub allowed_addresses: Vec<IpAddr>,
    /// The largest body downloaded for one URL (`engine.max_remote_add_bytes`).
    pub max_bytes: u64,
    /// How long connecting (and resolving) may take.
    pub connect_timeout: Duration,
    /// How long any one read of the answer may take.
    pub read_timeout: Duration,
}

impl Default for RemotePolicy {
    fn default() -> Self {
        Self {
            allow_private: false,
            allowed_addresses: Vec::new(),
            max_bytes: DEFAULT_MAX_REMOTE_ADD_BYTES,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Why an address is not public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Loopback,
    /// 169.254.0.0/16 and fe80::/10, where cloud metadata services answer.
    LinkLocal,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7 (unique local) and fec0::/10 (site-local).
    Private,
    /// 100.64.0.0/10, carrier-grade NAT.
    Shared,
    /// 0.0.0.0/8 and `::`.
    Unspecified,
    Broadcast,
    Multicast,
}

impl std::fmt::Display for AddressClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local (cloud metadata)",
            Self::Private => "private",
            Self::Shared => "shared (carrier-grade NAT)",
            Self::Unspecified => "unspecified",
            Self::Broadcast => "broadcast",
            Self::Multicast => "multicast",
        })
    }
}

/// The class of a non-public address; `None` for a public one. IPv4 addresses embedded in
/// IPv6 (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`) are
/// judged as the IPv4 address they stand for.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, ..] = ip.octets();
    Some(if a == 0 {
        AddressClass::Unspecified
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_link_local() {
        AddressClass::LinkLocal
    } else if ip.is_private() {
        AddressClass::Private
    } else if a == 100 && (64..128).contains(&b) {
        AddressClass::Shared
    } else if ip.is_broadcast() {
        AddressClass::Broadcast
    } else if ip.is_multicast() || a >= 240 {
        // 240/4 (reserved) is no destination either.
        AddressClass::Multicast
    } else {
        return None;
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    let segments = ip.segments();
    let embedded_v4 = || Ipv4Addr::from(((segments[6] as u32) << 16) | segments[7] as u32);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if ip.is_unspecified() {
        return Some(AddressClass::Unspecified);
    }
    if ip.is_loopback() {
        return Some(AddressClass::Loopback);
    }
    // ::a.b.c.d (deprecated "compatible") and 64:ff9b::a.b.c.d (NAT64) reach IPv4.
    if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(embedded_v4());
    }
    Some(match segments[0] {
        s if s & 0xffc0 == 0xfe80 => AddressClass::LinkLocal,
        s if s & 0xfe00 == 0xfc00 || s & 0xffc0 == 0xfec0 => AddressClass::Private,
        s if s & 0xff00 == 0xff00 => AddressClass::Multicast,
        _ => return None,
    })
}

/// The file name BuildKit gives the download of `url`: the last segment of its decoded path
/// (Go's `path.Base(u.Path)`), else [`UNNAMED_FILE`]. Names that are no file name (`.`,
/// `..`, or holding a NUL) are unnamed too.
pub fn file_name_of(url: &Url) -> String {
    let decoded = percent_decode(url.path());
    let trimmed = decoded.trim_end_matches('/');
    let base = trimmed.rsplit('/').next().unwrap_or("");
    if base.is_empty() || base == "." || base == ".." || base.contains('\0') {
        UNNAMED_FILE.to_owned()
    } else {
        base.to_owned()
    }
}

/// `%XX` decoding of a URL path (invalid escapes stay as they are; invalid UTF-8 is
/// replaced).
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` as messages show it: without a password it may carry.
pub fn shown(url: &Url) -> String {
    let mut url = url.clone();
    if url.password().is_some() {
        let _ = url.set_password(Some("xxxxx"));
    }
    url.to_string()
}

/// Whether `source` (an ADD source word) is an http(s) URL.
pub fn is_http_url(source: &str) -> bool {
    let lower = source.get(..8).unwrap_or(source).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// Why a remote ADD source could not be downloaded. Messages show URLs without passwords.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{url}: not a valid http(s) URL")]
    BadUrl { url: String },
    #[error(
        "{url}: {}; Kiln does not download from non-public addresses (the operator can set \
         engine.allow_private_add_urls = true)",
        which_address(host, addr, class)
    )]
    NonPublicAddress {
        url: String,
        host: String,
        addr: IpAddr,
        class: AddressClass,
    },
    #[error("{url}: cannot resolve {host}: {source}")]
    Resolve {
        url: String,
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url}: the server answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{url}: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects { url: String },
    #[error("{url}: the file is larger than the limit of {limit} bytes (engine.max_remote_add_bytes)")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: checksum mismatch: expected {expected}, got {actual}")]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("storing the download: {0}")]
    Io(#[source] std::io::Error),
}

/// `10.0.0.1 is a private address`, or `internal.example resolves to the private address
/// 10.0.0.1`.
fn which_address(host: &str, addr: &IpAddr, class: &AddressClass) -> String {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if literal.parse::<IpAddr>().is_ok() {
        format!("{host} is a {class} address")
    } else {
        format!("{host} resolves to the {class} address {addr}")
    }
}

/// A downloaded file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Where the body is (a file in the directory given to [`download`]).
    pub path: PathBuf,
    /// `sha256:<hex>` of the body.
    pub digest: String,
    pub size: u64,
    /// The response's `Last-Modified` as Unix seconds; 0 without a valid one (BuildKit).
    pub mtime: i64,
}

/// Downloads `url` into a new file `file` under `dir`, following `policy` (see the module
/// documentation). With `checksum` (`sha256:<hex>`), a body of another digest is an error
/// and its file is removed.
pub async fn download(
    url: &Url,
    policy: &RemotePolicy,
    file: &Path,
    checksum: Option<&str>,
) -> Result<Download, RemoteError> {
    let mut current = url.clone();
    let mut hops = 0;
    let response = loop {
        let response = get_once(&current, policy).await?;
        if !response.status().is_redirection() {
            break response;
        }
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| current.join(l).ok());
        let Some(next) = location else {
            // A 3xx without a usable Location is the answer (as Go's client treats it).
            break response;
        };
        hops += 1;
        if hops > MAX_REDIRECTS {
            return Err(RemoteError::TooManyRedirects { url: shown(url) });
        }
        current = next;
    };
    let shown_url = shown(&current);
    if !response.status().is_success() {
        return Err(RemoteError::Status {
            url: shown_url,
            status: response.status(),
        });
    }
    let too_large = || RemoteError::TooLarge {
        url: shown_url.clone(),
        limit: policy.max_bytes,
    };
    if response.content_length().is_some_and(|n| n > policy.max_bytes) {
        return Err(too_large());
    }
    let mtime = response
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64);
    let result = store_body(response, policy, file, &shown_url, too_large).await;
    let (digest, size) = match result {
        Ok(stored) => stored,
        Err(e) => {
            let _ = tokio::fs::remove_file(file).await;
            return Err(e);
        }
    };
    if let Some(expected) = checksum {
        if expected != digest {
            let _ = tokio::fs::remove_file(file).await;
            return Err(RemoteError::ChecksumMismatch {
                url: shown(url),
                expected: expected.to_owned(),
                actual: digest,
            });
        }
    }
    Ok(Download {
        path: file.to_owned(),
        digest,
        size,
        mtime,
    })
}

/// Streams the body to `file`, hashing and counting it; `(digest, size)`.
async fn store_body(
    mut response: reqwest::Response,
    policy: &RemotePolicy,
    file: &Path,
    url: &str,
    too_large: impl Fn() -> RemoteError,
) -> Result<(String, u64), RemoteError> {
    let mut out = tokio::fs::File::create(file).await.map_err(RemoteError::Io)?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    loop {
        let chunk = tokio::time::timeout(policy.read_timeout, response.chunk())
            .await
            .map_err(|_| RemoteError::Fetch {
                url: url.to_owned(),
                reason: format!("no data for {:?}", policy.read_timeout),
            })?
            .map_err(|e| RemoteError::Fetch {
                url: url.to_owned(),
                reason: format!("the answer was cut short: {}", error_kind(&e)),
            })?;
        let Some(chunk) = chunk else { break };
        size += chunk.len() as u64;
        if size > policy.max_bytes {
            return Err(too_large());
        }
        hash.update(&chunk);
        out.write_all(&chunk).await.map_err(RemoteError::Io)?;
    }
    out.flush().await.map_err(RemoteError::Io)?;
    Ok((format!("sha256:{}", hex::encode(hash.finalize())), size))
}

/// One GET of `url`, to addresses checked against `policy` and pinned; redirects are not
/// followed.
async fn get_once(url: &Url, policy: &RemotePolicy) -> Result<reqwest::Response, RemoteError> {
    let shown_url = shown(url);
    let bad_url = || RemoteError::BadUrl {
        url: shown_url.clone(),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad_url());
    }
    let port = url.port_or_known_default().ok_or_else(bad_url)?;
    let host = url.host().ok_or_else(bad_url)?;
    let (domain, addrs): (Option<String>, Vec<SocketAddr>) = match host {
        url::Host::Ipv4(ip) => (None, vec![SocketAddr::new(ip.into(), port)]),
        url::Host::Ipv6(ip) => (None, vec![SocketAddr::new(ip.into(), port)]),
        url::Host::Domain(name) => {
            let name = name.to_owned();
            let resolved = tokio::time::timeout(
                policy.connect_timeout,
                tokio::net::lookup_host((name.as_str(), port)),
            )
            .await
            .map_err(|_| RemoteError::Fetch {
                url: shown_url.clone(),
                reason: format!("resolving {name} took longer than {:?}", policy.connect_timeout),
            })?
            .map_err(|source| RemoteError::Resolve {
                url: shown_url.clone(),
                host: name.clone(),
                source,
            })?
            .collect::<Vec<_>>();
            if resolved.is_empty() {
                return Err(RemoteError::Resolve {
                    url: shown_url.clone(),
                    host: name.clone(),
                    source: std::io::Error::other("no address"),
                });
            }
            (Some(name), resolved)
        }
    };
    if !policy.allow_private {
        for addr in &addrs {
            if policy.allowed_addresses.contains(&addr.ip()) {
                continue;
            }
            if let Some(class) = classify(addr.ip()) {
                return Err(RemoteError::NonPublicAddress {
                    url: shown_url,
                    host: url.host_str().unwrap_or_default().to_owned(),
                    addr: addr.ip(),
                    class,
                });
            }
        }
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(policy.connect_timeout)
        .read_timeout(policy.read_timeout)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
    if let Some(domain) = &domain {
        // Connect to exactly the addresses checked above: no second resolution.
        builder = builder.resolve_to_addrs(domain, &addrs);
    }
    let client = builder.build().map_err(|e| RemoteError::Fetch {
        url: shown_url.clone(),
        reason: format!("cannot set up the HTTP client: {}", error_kind(&e)),
    })?;
    client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| RemoteError::Fetch {
            url: shown_url,
            reason: error_kind(&e),
        })
}

/// What went wrong with a request, without the URL reqwest's messages carry.
fn error_kind(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.contains("://") {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ip: &str) -> Option<AddressClass> {
        classify(ip.parse().unwrap())
    }

    #[test]
    fn non_public_addresses_are_classified() {
        use AddressClass::*;
        let cases = [
            ("127.0.0.1", Some(Loopback)),
            ("127.255.1.2", Some(Loopback)),
            ("169.254.169.254", Some(LinkLocal)),
            ("10.1.2.3", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(Shared)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("255.255.255.255", Some(Broadcast)),
            ("224.0.0.1", Some(Multicast)),
            ("::1", Some(Loopback)),
            ("::", Some(Unspecified)),
            ("fe80::1", Some(LinkLocal)),
            ("fd00::1", Some(Private)),
            ("fc00::1", Some(Private)),
            ("ff02::1", Some(Multicast)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::10.0.0.1", Some(Private)),
            ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
            // Public.
            ("8.8.8.8", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("2606:4700::1111", None),
            ("::ffff:1.1.1.1", None),
        ];
        for (ip, want) in cases {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[test]
    fn files_are_named_after_the_last_path_segment() {
        let name = |u: &str| file_name_of(&Url::parse(u).unwrap());
        assert_eq!(name("https://example.com/a/b/file.tar.gz"), "file.tar.gz");
        assert_eq!(name("https://example.com/a/dir/"), "dir");
        assert_eq!(name("https://example.com/f?x=1#y"), "f");
        assert_eq!(name("https://example.com/a%20b"), "a b");
        assert_eq!(name("https://example.com/x/a%2Fb"), "b");
        assert_eq!(name("https://example.com/"), UNNAMED_FILE);
        assert_eq!(name("https://example.com"), UNNAMED_FILE);
        assert_eq!(name("https://example.com/x/%2E%2E"), UNNAMED_FILE);
        assert_eq!(name("https://example.com/x/a%00b"), UNNAMED_FILE);
        assert_eq!(name("https://example.com/%zz"), "%zz");
    }

    #[test]
    fn urls_are_shown_without_passwords() {
        let url = Url::parse("https://user:hunter2@example.com/f").unwrap();
        let text = shown(&url);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("example.com/f"), "{text}");
        assert!(is_http_url("HTTPS://x/y") && is_http_url("http://x") && !is_http_url("git@x:y"));
    }
}
