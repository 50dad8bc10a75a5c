//! The real `kiln` binary as a child process: `kiln serve --config <tempdir>/kiln.toml` on
//! free loopback ports, with a temporary data directory, either the embedded registry or an
//! external one, and any extra TOML a test needs (build limits, supervision, ...).
//!
//! The child's stdout and stderr go to `<tempdir>/kiln.log`; when a test panics while a
//! [`KilnServer`] is alive, the log's tail is printed on drop. Drop kills and reaps the
//! child (PID 1 does not reap orphans here) and deletes the directory.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kiln::proto::{admin::admin_client::AdminClient, builder::image_builder_client::ImageBuilderClient};
use tonic::transport::{Channel, Endpoint};

/// How long `start` waits for the gRPC port to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the service log shown when something fails.
const TAIL_LINES: usize = 80;

/// Which registry the service pushes workspace images to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryMode {
    /// Kiln's embedded registry, on a free loopback port.
    Embedded,
    /// An existing registry, `registry.external = "127.0.0.1:PORT"`.
    External(String),
}

/// How to start a [`KilnServer`].
#[derive(Debug, Clone)]
pub struct KilnOptions {
    pub registry: RegistryMode,
    /// TOML appended to the generated config: whole tables such as
    /// `"[builds]\nmax_concurrent = 20\n"`. The generated config sets `data_dir` and the
    /// `[grpc]`, `[metrics]` and `[registry]` tables; do not repeat those tables here.
    pub extra_toml: String,
    /// `RUST_LOG` of the service. Default `info`.
    pub rust_log: String,
    /// Use this data directory instead of a fresh one in the server's temporary directory,
    /// e.g. to start a second service on the state a killed one left. Not deleted on drop.
    pub data_dir: Option<PathBuf>,
    /// TOML lines added to the generated `[grpc]` table (TLS paths, the admin token).
    pub grpc_toml: String,
    /// TOML lines added to the generated `[registry]` table (e.g. `pull_secret`).
    pub registry_toml: String,
    /// The IP the gRPC port listens on instead of 127.0.0.1 (e.g. `0.0.0.0`); clients still
    /// connect to `127.0.0.1:PORT`.
    pub grpc_listen_ip: Option<std::net::IpAddr>,
    /// The same for the metrics port (and the dashboard on it).
    pub metrics_listen_ip: Option<std::net::IpAddr>,
    /// Environment variables added to the service's.
    pub env: Vec<(String, String)>,
}

impl Default for KilnOptions {
    fn default() -> Self {
        Self {
            registry: RegistryMode::Embedded,
            extra_toml: String::new(),
            rust_log: "info".into(),
            data_dir: None,
            grpc_toml: String::new(),
            registry_toml: String::new(),
            grpc_listen_ip: None,
            metrics_listen_ip: None,
            env: Vec::new(),
        }
    }
}

impl KilnOptions {
    /// The embedded registry.
    pub fn embedded() -> Self {
        Self::default()
    }

    /// An external registry at `addr` (`127.0.0.1:PORT`).
    pub fn external(addr: &str) -> Self {
        Self {
            registry: RegistryMode::External(addr.to_owned()),
            ..Self::default()
        }
    }

    /// Appends `toml` to the config.
    pub fn with_toml(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        if !self.extra_toml.ends_with('\n') {
            self.extra_toml.push('\n');
        }
        self
    }
}

/// A running `kiln serve`.
pub struct KilnServer {
    child: Option<Child>,
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    registry_addr: String,
    /// Whether `registry_addr` is the service's embedded registry.
    embedded_registry: bool,
    data_dir: PathBuf,
    log_path: PathBuf,
    http: reqwest::Client,
    // Dropped last: the child must be gone before its directory is removed.
    dir: tempfile::TempDir,
}

impl KilnServer {
    /// Starts the service and waits until its gRPC port accepts connections. Retries with
    /// new ports when a port picked as free was taken before the service bound it. Blocking.
    pub fn start(options: KilnOptions) -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            match Self::try_start(&options) {
                Ok(server) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("kiln serve did not start:\n{last_error}");
    }

    fn try_start(options: &KilnOptions) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-server-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let grpc_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let grpc_listen = SocketAddr::new(options.grpc_listen_ip.unwrap_or(grpc_addr.ip()), grpc_addr.port());
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics_listen = SocketAddr::new(
            options.metrics_listen_ip.unwrap_or(metrics_addr.ip()),
            metrics_addr.port(),
        );
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let (registry_table, registry_addr) = match &options.registry {
            RegistryMode::Embedded => {
                let addr = format!("127.0.0.1:{}", free_port());
                (format!("[registry]\nembedded_addr = \"{addr}\"\n"), addr)
            }
            RegistryMode::External(addr) => (format!("[registry]\nexternal = \"{addr}\"\n"), addr.clone()),
        };
        let config = format!(
            "data_dir = {data_dir:?}\n\n[grpc]\naddr = \"{grpc_listen}\"\n{}\n[metrics]\naddr = \"{metrics_listen}\"\n\n\
             {registry_table}{}\n{}",
            options.grpc_toml,
            options.registry_toml,
            options.extra_toml,
            data_dir = data_dir.display().to_string(),
        );
        let config_path = dir.path().join("kiln.toml");
        std::fs::write(&config_path, config).map_err(|e| format!("writing the config: {e}"))?;
        let log_path = dir.path().join("kiln.log");
        let log = File::create(&log_path).map_err(|e| format!("creating the log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;

        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", &options.rust_log)
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .env_remove("KILN_ADDR")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", env!("CARGO_BIN_EXE_kiln")))?;
        // reqwest is built without a default TLS provider; the metrics endpoint is plain HTTP,
        // but building a client still needs one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let mut server = Self {
            child: Some(child),
            grpc_addr,
            metrics_addr,
            registry_addr,
            embedded_registry: options.registry == RegistryMode::Embedded,
            data_dir,
            log_path,
            http,
            dir,
        };
        server.wait_ready()?;
        server.register_registry_credentials()?;
        Ok(server)
    }

    /// The generated credentials of the embedded registry (read from the file the service
    /// writes at start), registered for the support helpers that push images.
    fn register_registry_credentials(&self) -> Result<(), String> {
        if self.embedded_registry {
            let creds =
                super::registry_auth::read_auth_file(&self.registry_auth_file(), &self.registry_addr)?;
            super::registry_auth::register(&self.registry_addr, creds);
        }
        Ok(())
    }

    /// Where the service writes its embedded registry's credentials (the default
    /// `registry.embedded_credentials_file`).
    pub fn registry_auth_file(&self) -> PathBuf {
        self.data_dir.join("registry-auth.json")
    }

    /// The embedded registry's current credentials (user, password).
    pub fn registry_credentials(&self) -> Option<(String, String)> {
        super::registry_auth::lookup(&self.registry_addr).map(|c| (c.username, c.password))
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "kiln serve exited with {status} during start-up:\n{}",
                        self.log_tail()
                    ));
                }
            }
            if TcpStream::connect_timeout(&self.grpc_addr, Duration::from_millis(200)).is_ok()
                && self.is_running()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(format!(
            "kiln serve did not accept gRPC connections on {} within {STARTUP_TIMEOUT:?}:\n{}",
            self.grpc_addr,
            self.log_tail()
        ))
    }

    /// `127.0.0.1:PORT` of the gRPC API.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// `127.0.0.1:PORT` of the metrics endpoint.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The registry Kiln pushes to (`127.0.0.1:PORT`): the embedded one or the external one.
    pub fn registry_addr(&self) -> &str {
        &self.registry_addr
    }

    /// `<registry>/kiln/workspace-images`.
    pub fn workspace_repository(&self) -> String {
        format!("{}/kiln/workspace-images", self.registry_addr)
    }

    /// The service's data directory (`<tempdir>/data` unless [`KilnOptions::data_dir`]).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// The config file the service runs with (`<tempdir>/kiln.toml`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("kiln.toml")
    }

    /// The service's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A new gRPC channel to the service (HTTP/2; one channel multiplexes many calls).
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.grpc_addr))
            .expect("a valid endpoint")
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connecting to kiln at {}: {e}\n{}",
                    self.grpc_addr,
                    self.log_tail()
                )
            })
    }

    /// A `builder.ImageBuilder` client on a new channel.
    pub async fn builder(&self) -> ImageBuilderClient<Channel> {
        ImageBuilderClient::new(self.channel().await)
    }

    /// A `kiln.admin.v1.Admin` client on a new channel.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics_addr);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
        resp.text().await.unwrap_or_else(|e| panic!("reading {url}: {e}"))
    }

    /// The value of one sample, named with its labels exactly as exposed, e.g.
    /// `kiln_builds_completed_total{outcome="cancelled"}`. A sample of a declared metric not
    /// exposed yet is 0; a metric not declared at all fails the test.
    pub async fn metric(&self, name_with_labels: &str) -> f64 {
        sample(&self.metrics_text().await, name_with_labels)
    }

    /// The value of a sample once it equals `expected`, polling for up to 10 s; the last
    /// value read if it never does. Counters are updated just after the state change they
    /// count becomes visible to clients, so read them with this after observing the change.
    pub async fn metric_eventually(&self, name_with_labels: &str, expected: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.metric(name_with_labels).await;
            if value == expected || Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The service log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last lines of the service log.
    pub fn log_tail(&self) -> String {
        tail(&self.log_path, TAIL_LINES)
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM, as Kubernetes does to a pod it stops, and returns at once.
    pub fn send_sigterm(&self) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .expect("running kill");
            assert!(status.success(), "kill -TERM {}", child.id());
        }
    }

    /// Waits up to `within` for the service to exit by itself, polling without blocking the
    /// runtime; reaps it. Whether it exited.
    pub async fn exited_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.child.as_mut().map(Child::try_wait) {
                None | Some(Ok(Some(_))) => {
                    self.child = None;
                    return true;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        false
    }

    /// Stops the service as an operator would (SIGTERM), waits up to `grace` for it to exit,
    /// then kills it; reaps it either way. Returns whether it exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        self.send_sigterm();
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Starts the service again on the same config file — same ports, same data directory —
    /// e.g. after [`KilnServer::kill`] (a service still running is killed first). `options`
    /// gives the environment (`rust_log`, `env`); the config is not rewritten. The new
    /// process logs to the same file. Blocking; panics if the service does not come back.
    pub fn restart(&mut self, options: &KilnOptions) {
        self.kill();
        let mut last_error = String::new();
        for _ in 0..3 {
            let log = std::fs::OpenOptions::new()
                .append(true)
                .open(&self.log_path)
                .expect("opening the service log");
            let log_err = log.try_clone().expect("cloning the log handle");
            let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
                .arg("serve")
                .arg("--config")
                .arg(self.config_path())
                .env("RUST_LOG", &options.rust_log)
                .envs(options.env.iter().map(|(k, v)| (k, v)))
                .env_remove("KILN_ADDR")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", env!("CARGO_BIN_EXE_kiln")));
            self.child = Some(child);
            match self
                .wait_ready()
                .and_then(|()| self.register_registry_credentials())
            {
                Ok(()) => return,
                Err(e) => {
                    last_error = e;
                    self.kill();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!("kiln serve did not restart:\n{last_error}");
    }

    /// Kills (SIGKILL) and reaps the service now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for KilnServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- kiln serve log (last {TAIL_LINES} lines of {}) ----\n{}\n---- end of kiln log ----",
                self.log_path.display(),
                self.log_tail()
            );
        }
        self.kill();
    }
}

/// The value of `name_with_labels` in Prometheus/OpenMetrics text; 0 when absent.
pub fn sample(text: &str, name_with_labels: &str) -> f64 {
    let family = name_with_labels.split('{').next().unwrap_or(name_with_labels);
    // A counter's family is declared without its `_total` suffix (OpenMetrics).
    let declared = |name: &str| {
        text.lines().any(|l| {
            l.strip_prefix("# TYPE ")
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|declared| declared == name)
        })
    };
    assert!(
        declared(family) || family.strip_suffix("_total").is_some_and(declared),
        "the metric {family} is not exposed at all (renamed or never registered?)"
    );
    // A labelled sample of a declared family appears with its first observation: 0 before.
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name_with_labels)?;
            let value = rest.strip_prefix(' ')?.split_whitespace().next()?;
            value.parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

fn tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
