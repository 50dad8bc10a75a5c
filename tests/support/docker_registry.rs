//! A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution 2.x) on a
//! free loopback port, with its own config, storage and log in a temporary directory, and
//! optionally htpasswd auth. It is killed, reaped and its directory deleted on drop.
//!
//! The process starts with an empty environment (PATH only): distribution reads `REGISTRY_*`
//! variables as config overrides, and nothing from the test's environment may move it.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

const BINARY: &str = "/usr/bin/docker-registry";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `docker-registry`.
pub struct DockerRegistry {
    child: Child,
    addr: String,
    credentials: Option<(String, String)>,
    dir: tempfile::TempDir,
}

impl DockerRegistry {
    /// A registry without auth.
    pub fn start() -> Self {
        Self::start_with_auth(None)
    }

    /// A registry that wants HTTP basic auth (htpasswd) for everything when `auth` is given.
    pub fn start_with_auth(auth: Option<(&str, &str)>) -> Self {
        ensure_binary();
        let mut last_error = String::new();
        // The port is picked by binding :0 and releasing it, so another process may take it
        // before the registry binds: retry a few times.
        for _ in 0..5 {
            match Self::try_start(auth) {
                Ok(registry) => return registry,
                Err(e) => last_error = e,
            }
        }
        panic!("docker-registry did not start: {last_error}");
    }

    fn try_start(auth: Option<(&str, &str)>) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-docker-registry-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).map_err(|e| e.to_string())?;

        let auth_section = match auth {
            Some((user, password)) => {
                let hash = bcrypt::hash_with_result(password, 5)
                    .map_err(|e| e.to_string())?
                    .format_for_version(bcrypt::Version::TwoY);
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).map_err(|e| e.to_string())?;
                format!(
                    "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: kiln-test-fixed-http-secret\n  headers:\n    \
             X-Content-Type-Options: [nosniff]\n\
             {auth_section}",
            storage.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;

        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&config_path)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawning {BINARY}: {e}"))?;
        let mut registry = Self {
            child,
            addr,
            credentials: auth.map(|(u, p)| (u.to_owned(), p.to_owned())),
            dir,
        };
        registry.wait_ready(&log_path)?;
        Ok(registry)
    }

    fn wait_ready(&mut self, log_path: &Path) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "exited with {status} during startup:\n{}",
                    tail(log_path)
                ));
            }
            if matches!(probe(&self.addr), Some(200 | 401)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "no answer on {} within {STARTUP_TIMEOUT:?}:\n{}",
            self.addr,
            tail(log_path)
        ))
    }

    /// `127.0.0.1:PORT`, as image references name the registry.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The user name and password the registry accepts, if it has auth.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The registry's log so far (access log included), for failing assertions.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The directory holding config, storage and log.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        // Kill and reap: PID 1 here does not reap orphans, so an unreaped child would stay a
        // zombie. The tempdir is removed when `dir` drops, after this.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Installs Debian's docker-registry when the binary is missing (once per test binary).
fn ensure_binary() {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if Path::new(BINARY).exists() {
        return;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "docker-registry"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").arg("update").status();
        assert!(install(), "apt-get install docker-registry failed");
    }
    assert!(
        Path::new(BINARY).exists(),
        "{BINARY} still missing after apt-get install"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// The HTTP status of `GET /v2/`, or `None` when nothing answers yet.
fn probe(addr: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
