//! A slow loopback TCP proxy in front of a registry, so that copies through it take seconds:
//! builds stay running long enough to be joined late, cancelled or crashed on purpose.
//!
//! Bytes from the client go upstream as they come; bytes from upstream are forwarded in
//! chunks of at most `max_chunk` bytes, each after a pause of `delay`. The proxy runs on its
//! own thread and runtime (so it works under any test runtime, or none) and stops on drop,
//! closing every connection.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

/// The default largest chunk forwarded from upstream at once.
pub const DEFAULT_MAX_CHUNK: usize = 16 * 1024;

/// A running proxy.
pub struct SlowProxy {
    addr: SocketAddr,
    upstream: String,
    connections: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SlowProxy {
    /// A proxy to `upstream` (`127.0.0.1:PORT`) that pauses `delay` before each chunk of at
    /// most [`DEFAULT_MAX_CHUNK`] bytes from upstream.
    pub fn start(upstream: &str, delay: Duration) -> Self {
        Self::start_with(upstream, delay, DEFAULT_MAX_CHUNK)
    }

    /// [`SlowProxy::start`] with a chunk size.
    pub fn start_with(upstream: &str, delay: Duration, max_chunk: usize) -> Self {
        assert!(max_chunk > 0, "max_chunk must be positive");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the proxy port");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let (stop_tx, stop_rx) = oneshot::channel();
        let connections = Arc::new(AtomicU64::new(0));
        let counter = connections.clone();
        let target = upstream.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("slow-proxy-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
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
                            counter.fetch_add(1, Ordering::Relaxed);
                            let target = target.clone();
                            tokio::spawn(async move {
                                if let Ok(upstream) = TcpStream::connect(&target).await {
                                    relay(client, upstream, delay, max_chunk).await;
                                }
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime cancels every relay and closes its sockets.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawning the proxy thread");
        Self {
            addr,
            upstream: upstream.to_owned(),
            connections,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`: use it as the registry part of image references.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The registry behind the proxy.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies both ways until either side closes; upstream → client slowly.
async fn relay(client: TcpStream, upstream: TcpStream, delay: Duration, max_chunk: usize) {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let to_upstream = async {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
    };
    let to_client = async {
        let mut buf = vec![0u8; max_chunk];
        loop {
            let n = match upstream_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            tokio::time::sleep(delay).await;
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::pin!(to_upstream, to_client);
    tokio::select! {
        () = &mut to_upstream => {
            // The client finished sending; keep delivering the answer until upstream closes.
            (&mut to_client).await;
        }
        // Upstream closed: the connection is over.
        () = &mut to_client => {}
    }
}
