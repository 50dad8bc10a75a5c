//! A fault-injecting HTTP proxy on loopback, between a client (Kiln) and a real registry.
//!
//! Each connection carries one request: the proxy reads the request head, decides with a
//! seeded random draw whether to inject a fault, and otherwise forwards the request upstream
//! with `Connection: close` and relays the answer. So every request is seen, and a fault hits
//! exactly one request. The faults:
//!
//! - [`Fault::Status`] (429, 500, 503, ...): answered by the proxy with an OCI error envelope
//!   (`TOOMANYREQUESTS`, `UNKNOWN`, `UNAVAILABLE`); the request body is read and dropped first,
//!   so the client sees the status, not a broken pipe. Nothing reaches the registry.
//! - [`Fault::Stall`]: the request is read (body included) and then nothing is answered for
//!   the configured stall time; then the connection is closed. Nothing reaches the registry.
//! - [`Fault::Reset`]: the connection is reset (RST). A request with a body first sends half
//!   of the body upstream (so the registry sees an upload break off mid-stream); one without
//!   is reset before anything goes upstream.
//! - [`Fault::Truncate`]: the request goes upstream; of the answer the client gets the head and
//!   half the body, then the connection closes. An answer without a body loses half its head.
//!
//! Draws come from one `StdRng` seeded by [`FaultPlan::seed`] in the order requests arrive;
//! [`FaultProxy::set_plan`] swaps the plan (and reseeds) between test phases. The proxy counts
//! what it injected ([`FaultProxy::stats`]) and records every request ([`FaultProxy::log`]).
//! A plan may also hold every request for a while ([`FaultPlan::latency`]) so that concurrent
//! requests overlap; the stats then say how many requests were held at most at once
//! ([`FaultStats::max_concurrent`]). A request is held after its head was read and before
//! anything of its answer was sent, so its client is still waiting for it: the count is
//! never more than the client's own concurrency, and it is exact when the latency is well
//! above the rest of a request's time.
//! It runs on its own thread and runtime and stops on drop, closing every connection.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

/// The largest request or response head the proxy reads.
const MAX_HEAD: usize = 64 * 1024;

/// One kind of injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// Answer with this HTTP status and an OCI error envelope.
    Status(u16),
    /// Answer nothing for the plan's stall time, then close.
    Stall,
    /// Reset the connection (after half the request body went upstream).
    Reset,
    /// Cut the answer short (half the body, or half the head when there is no body).
    Truncate,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(code) => write!(f, "{code}"),
            Self::Stall => f.write_str("stall"),
            Self::Reset => f.write_str("reset"),
            Self::Truncate => f.write_str("truncate"),
        }
    }
}

/// What the proxy injects, and how often.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Faults with their probabilities (summing to at most 1), drawn once per request: a
    /// request gets the first fault whose cumulative probability covers the draw, or none.
    pub faults: Vec<(Fault, f64)>,
    /// How long a [`Fault::Stall`] holds the request. Default 3 s.
    pub stall: Duration,
    /// Seeds the draws. Default 1.
    pub seed: u64,
    /// Only requests with one of these methods (`"PATCH"`, ...) may get a fault; all when
    /// empty (the default).
    pub methods: Vec<String>,
    /// How long every request is held before it is answered or forwarded. Default none.
    pub latency: Duration,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            faults: Vec::new(),
            stall: Duration::from_secs(3),
            seed: 1,
            methods: Vec::new(),
            latency: Duration::ZERO,
        }
    }
}

impl FaultPlan {
    /// No faults: a transparent proxy.
    pub fn none() -> Self {
        Self::default()
    }

    /// One fault at `rate` (0 to 1), seeded with `seed`.
    pub fn one(fault: Fault, rate: f64, seed: u64) -> Self {
        Self {
            faults: vec![(fault, rate)],
            seed,
            ..Self::default()
        }
    }

    pub fn with_stall(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn only_methods(mut self, methods: &[&str]) -> Self {
        self.methods = methods.iter().map(|m| (*m).to_owned()).collect();
        self
    }
}

/// Counts since the proxy started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests whose head was read.
    pub requests: u64,
    /// Requests forwarded without a fault.
    pub passed: u64,
    /// Injected faults by kind.
    pub injected: BTreeMap<Fault, u64>,
    /// Requests being held now (head read, [`FaultPlan::latency`] not yet over).
    pub in_flight: u64,
    /// The most requests held at once.
    pub max_concurrent: u64,
}

impl FaultStats {
    /// Faults injected in all.
    pub fn total_injected(&self) -> u64 {
        self.injected.values().sum()
    }
}

/// One request the proxy saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// The request target (path and query).
    pub target: String,
    /// Request headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub fault: Option<Fault>,
}

impl Seen {
    /// The value of request header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    plan: FaultPlan,
    rng: StdRng,
    stats: FaultStats,
    log: Vec<Seen>,
}

impl State {
    fn new(plan: FaultPlan) -> Self {
        Self {
            rng: StdRng::seed_from_u64(plan.seed),
            plan,
            stats: FaultStats::default(),
            log: Vec::new(),
        }
    }

    /// Draws the fault for one request and records it; the request is held until
    /// [`State::released`].
    fn decide(&mut self, head: &RequestHead) -> (Option<Fault>, Duration, Duration) {
        self.stats.requests += 1;
        self.stats.in_flight += 1;
        self.stats.max_concurrent = self.stats.max_concurrent.max(self.stats.in_flight);
        let eligible = self.plan.methods.is_empty() || self.plan.methods.contains(&head.method);
        let fault = if eligible && !self.plan.faults.is_empty() {
            let draw: f64 = self.rng.random();
            let mut cumulative = 0.0;
            self.plan.faults.iter().find_map(|(fault, p)| {
                cumulative += p;
                (draw < cumulative).then_some(*fault)
            })
        } else {
            None
        };
        match fault {
            Some(f) => *self.stats.injected.entry(f).or_default() += 1,
            None => self.stats.passed += 1,
        }
        self.log.push(Seen {
            method: head.method.clone(),
            target: head.target.clone(),
            headers: head.headers.clone(),
            fault,
        });
        (fault, self.plan.stall, self.plan.latency)
    }

    /// A request's latency is over. (After a `set_plan` meanwhile, the count may already be
    /// zero.)
    fn released(&mut self) {
        self.stats.in_flight = self.stats.in_flight.saturating_sub(1);
    }
}

/// A running fault proxy.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: String,
    state: Arc<Mutex<State>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a free loopback port in front of `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str, plan: FaultPlan) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the proxy port");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(State::new(plan)));
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = state.clone();
        let target = upstream.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("tokio listener");
                    let accept = async {
                        loop {
                            let Ok((client, _)) = listener.accept().await else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            let state = shared.clone();
                            let target = target.clone();
                            tokio::spawn(async move {
                                let _ = handle(client, &target, &state).await;
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime cancels every connection task and closes its sockets.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawning the proxy thread");
        Self {
            addr,
            upstream: upstream.to_owned(),
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`: use it as the registry part of image references.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The registry behind the proxy.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Replaces the plan, reseeds the draws, and clears the counts and the log.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.lock() = State::new(plan);
    }

    /// What was injected since the start or the last [`set_plan`](Self::set_plan).
    pub fn stats(&self) -> FaultStats {
        self.lock().stats.clone()
    }

    /// Every request since the start or the last [`set_plan`](Self::set_plan), in order.
    pub fn log(&self) -> Vec<Seen> {
        self.lock().log.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
struct RequestHead {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl RequestHead {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn body(&self) -> BodyFraming {
        if self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            BodyFraming::Chunked
        } else {
            BodyFraming::Length(
                self.header("content-length")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0),
            )
        }
    }

    /// The head as sent upstream: the same, with `Connection: close`.
    fn upstream_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        for (name, value) in &self.headers {
            if name == "connection" || name == "keep-alive" || name == "proxy-connection" {
                continue;
            }
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("connection: close\r\n\r\n");
        out.into_bytes()
    }
}

#[derive(Debug, Clone, Copy)]
enum BodyFraming {
    Length(u64),
    Chunked,
}

/// Reads up to the end of an HTTP head; returns the head and whatever followed it.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too large"));
        }
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_request(head: &[u8]) -> Option<RequestHead> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let target = first.next()?.to_owned();
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(RequestHead {
        method,
        target,
        headers,
    })
}

/// The status and the body length an answer announces (`None`: until the connection closes
/// or chunked).
fn parse_response(head: &[u8]) -> Option<(u16, Option<u64>)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok());
    Some((status, length))
}

/// Reads and drops a request body of the given framing; `already` holds bytes read with the
/// head.
async fn drain_body<R: AsyncRead + Unpin>(
    r: &mut R,
    framing: BodyFraming,
    already: Vec<u8>,
) -> std::io::Result<()> {
    match framing {
        BodyFraming::Length(len) => {
            let mut left = len.saturating_sub(already.len() as u64);
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = r.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Ok(());
                }
                left -= n as u64;
            }
            Ok(())
        }
        BodyFraming::Chunked => {
            let mut reader = Buffered { buf: already, pos: 0 };
            loop {
                let line = reader.line(r).await?;
                let size = u64::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| std::io::Error::other("bad chunk size"))?;
                if size == 0 {
                    // Trailers, up to an empty line.
                    while !reader.line(r).await?.is_empty() {}
                    return Ok(());
                }
                reader.skip(r, size + 2).await?;
            }
        }
    }
}

/// A tiny line reader for chunked bodies.
struct Buffered {
    buf: Vec<u8>,
    pos: usize,
}

impl Buffered {
    async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn line<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<String> {
        loop {
            if let Some(end) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[self.pos..self.pos + end]).into_owned();
                self.pos += end + 2;
                return Ok(line);
            }
            self.fill(r).await?;
        }
    }

    async fn skip<R: AsyncRead + Unpin>(&mut self, r: &mut R, mut n: u64) -> std::io::Result<()> {
        loop {
            let available = (self.buf.len() - self.pos) as u64;
            if available >= n {
                self.pos += n as usize;
                return Ok(());
            }
            n -= available;
            self.pos = self.buf.len();
            self.fill(r).await?;
        }
    }
}

/// The proxy's own error answer for a status fault.
fn error_answer(status: u16, head_only: bool) -> Vec<u8> {
    let (code, reason) = match status {
        429 => ("TOOMANYREQUESTS", "Too Many Requests"),
        503 => ("UNAVAILABLE", "Service Unavailable"),
        500 => ("UNKNOWN", "Internal Server Error"),
        _ => ("UNKNOWN", "Injected"),
    };
    let body = format!(
        r#"{{"errors":[{{"code":"{code}","message":"injected by the fault proxy","detail":null}}]}}"#
    );
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         docker-distribution-api-version: registry/2.0\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

async fn handle(mut client: TcpStream, upstream: &str, state: &Mutex<State>) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let (head_bytes, rest) = read_head(&mut client).await?;
    let Some(head) = parse_request(&head_bytes) else {
        return Ok(());
    };
    let (fault, stall, latency) = state.lock().unwrap_or_else(|p| p.into_inner()).decide(&head);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    state.lock().unwrap_or_else(|p| p.into_inner()).released();
    let is_head = head.method == "HEAD";
    match fault {
        Some(Fault::Status(status)) => {
            drain_body(&mut client, head.body(), rest).await?;
            client.write_all(&error_answer(status, is_head)).await?;
            client.shutdown().await
        }
        Some(Fault::Stall) => {
            let deadline = tokio::time::Instant::now() + stall;
            let _ = tokio::time::timeout_at(deadline, drain_body(&mut client, head.body(), rest)).await;
            tokio::time::sleep_until(deadline).await;
            Ok(())
        }
        Some(Fault::Reset) => {
            if let BodyFraming::Length(len) = head.body() {
                if len > 0 {
                    // Half the body goes upstream, then both connections are reset.
                    let mut up = TcpStream::connect(upstream).await?;
                    up.write_all(&head.upstream_bytes()).await?;
                    let half = len / 2;
                    let mut sent = 0u64;
                    let first = rest.len().min(usize::try_from(half).unwrap_or(usize::MAX));
                    up.write_all(&rest[..first]).await?;
                    sent += first as u64;
                    let mut buf = vec![0u8; 64 * 1024];
                    while sent < half {
                        let want = buf.len().min(usize::try_from(half - sent).unwrap_or(usize::MAX));
                        let n = client.read(&mut buf[..want]).await?;
                        if n == 0 {
                            break;
                        }
                        up.write_all(&buf[..n]).await?;
                        sent += n as u64;
                    }
                    up.flush().await?;
                    // Let the registry take in what it got before the connection breaks.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = up.set_zero_linger();
                    drop(up);
                }
            }
            let _ = client.set_zero_linger();
            drop(client);
            Ok(())
        }
        None | Some(Fault::Truncate) => {
            let mut up = TcpStream::connect(upstream).await?;
            let _ = up.set_nodelay(true);
            up.write_all(&head.upstream_bytes()).await?;
            up.write_all(&rest).await?;
            let (mut client_read, mut client_write) = client.into_split();
            let (mut up_read, mut up_write) = up.into_split();
            // The request body (if any) keeps flowing upstream while the answer comes back.
            let to_upstream = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut up_write).await;
            });
            let result = if fault.is_none() {
                tokio::io::copy(&mut up_read, &mut client_write).await.map(|_| ())
            } else {
                truncate_answer(&mut up_read, &mut client_write, is_head).await
            };
            to_upstream.abort();
            let _ = client_write.shutdown().await;
            result
        }
    }
}

/// Relays the head of the upstream answer and half its body (or half its head when it has
/// no body), then stops.
async fn truncate_answer<R, W>(up: &mut R, client: &mut W, is_head: bool) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (head, mut body) = read_head(up).await?;
    let (status, length) = parse_response(&head).unwrap_or((0, Some(0)));
    let has_body = !is_head && status != 204 && status != 304 && length != Some(0);
    if !has_body {
        client.write_all(&head[..head.len() / 2]).await?;
        return client.flush().await;
    }
    client.write_all(&head).await?;
    let keep = match length {
        Some(len) => len / 2,
        // Unknown length: half of what came with the head, at least a byte short.
        None => (body.len() / 2) as u64,
    };
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let take = body.len().min(usize::try_from(keep - sent).unwrap_or(usize::MAX));
        client.write_all(&body[..take]).await?;
        sent += take as u64;
        if sent >= keep {
            break;
        }
        let n = up.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        body = buf[..n].to_vec();
    }
    client.flush().await
}
