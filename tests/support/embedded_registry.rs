//! Kiln's embedded registry served in-process on `127.0.0.1:0` with a temporary root,
//! stopped (and its files removed) on drop.

use tokio::{sync::oneshot, task::JoinHandle};

pub struct EmbeddedRegistry {
    pub addr: String,
    _root: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl EmbeddedRegistry {
    pub async fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kiln::registry::server::serve(
            listener,
            root.path().to_path_buf(),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            _root: root,
            stop: Some(stop),
            task,
        }
    }
}

impl Drop for EmbeddedRegistry {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.abort();
    }
}
