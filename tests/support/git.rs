//! Real git repositories for tests: a directory of files committed on `main`, reached by a
//! `file://` URL as a caller's remote would be, or a bare repository behind a dumb-HTTP
//! server that wants basic auth ([`GitHttpServer`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use base64::Engine as _;

/// Runs `git` in `dir` with no user or system configuration, failing the test on error.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Kiln Test")
        .env("GIT_AUTHOR_EMAIL", "test@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "Kiln Test")
        .env("GIT_COMMITTER_EMAIL", "test@kiln.invalid")
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Writes `files` (path, content) into `dir`, commits them on `main` and returns the
/// repository's `file://` URL.
pub fn repository(dir: &Path, files: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for (path, content) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "test"]);
    format!("file://{}", dir.display())
}

/// A git server over dumb HTTP that wants basic auth for every request: serves the files of
/// the bare repositories under `root` and counts the requests it let through.
pub struct GitHttpServer {
    pub addr: SocketAddr,
    pub authorized: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl GitHttpServer {
    pub async fn start(root: PathBuf, user: &str, password: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let authorized = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (ok, no) = (authorized.clone(), refused.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (root, expected, ok, no) = (root.clone(), expected.clone(), ok.clone(), no.clone());
                tokio::spawn(async move {
                    let _ = serve_git_connection(stream, &root, &expected, &ok, &no).await;
                });
            }
        });
        Self {
            addr,
            authorized,
            refused,
            task,
        }
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 connection: requests without a body (git's dumb protocol only GETs), each
/// answered, until the client closes.
async fn serve_git_connection(
    mut stream: tokio::net::TcpStream,
    root: &Path,
    expected_auth: &str,
    authorized: &AtomicUsize,
    refused: &AtomicUsize,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        buffer.drain(..head_end);
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let path = request_line.split(' ').nth(1).unwrap_or("/");
        let auth = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.trim().to_owned());
        let response = if auth.as_deref() != Some(expected_auth) {
            refused.fetch_add(1, Ordering::SeqCst);
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"kiln-test\"\r\nContent-Length: 0\r\n\r\n".to_vec()
        } else {
            authorized.fetch_add(1, Ordering::SeqCst);
            let path = path.split('?').next().unwrap_or_default().trim_start_matches('/');
            let file = root.join(path);
            match (path.contains(".."), std::fs::read(&file)) {
                (false, Ok(body)) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&body);
                    r
                }
                _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            }
        };
        stream.write_all(&response).await?;
    }
}

/// A bare repository `<root>/app.git` with one commit holding `Dockerfile`, ready for dumb
/// HTTP.
pub fn bare_repository(root: &Path, dockerfile: &str) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("Dockerfile"), dockerfile).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "Dockerfile"]);
    git(
        &work,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            "app",
        ],
    );
    git(root, &["clone", "-q", "--bare", "work", "app.git"]);
    let bare = root.join("app.git");
    git(&bare, &["repack", "-a", "-d", "-q"]);
    git(&bare, &["update-server-info"]);
}
