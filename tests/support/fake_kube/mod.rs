//! A fake Kubernetes cluster for Kiln's Kubernetes executor tests: an API server (HTTPS only,
//! its CA in the kubeconfig) speaking the real REST shapes for pods, pods/log and secrets (with watch, 410 expiry, `limit`/
//! `continue` pages, RBAC from `deploy/role.yaml`, ServiceAccount and Pod Security admission,
//! owner-reference GC, the API server's validation of user-namespace and privilege-escalation
//! fields, and 429/5xx answers on demand), and a kubelet that runs each pod's container
//! command as a local process in its own mount namespace, volumes bind-mounted in place: it
//! pulls and unpacks the image from the registry it names, obeys `restartPolicy` and
//! `activeDeadlineSeconds`, enforces a memory limit in a cgroup, and applies as much of the
//! security context as a process can be given (capabilities, no_new_privs, read-only root,
//! user). A pod's own user namespace, seccomp and AppArmor profiles and `/proc` masking are
//! validated but not applied: the process runs with the host's. The container's program is
//! the image's file, pulled and unpacked (see [`images`]); without a chroot, the files it
//! opens are the host's.
//!
//! Tests read its counters to act on evidence rather than time: open watches and log
//! streams, 410s served, container starts, image pulls, requests by verb.
//!
//! [`FakeKube`] owns everything it starts: its server thread and runtime, every pod process
//! (killed by process group), the per-pod volume dirs and the mount points it had to create
//! on the host. Dropping it removes all of that.
//!
//! Layout: [`store`] (objects, resourceVersions, event history, selectors), [`rbac`] (the
//! Role), [`admission`] (ServiceAccount, PodSecurity), [`api`] (HTTP routes, injected
//! faults), [`tls`] (HTTPS with the cluster's own CA, in the kubeconfig), [`kubelet`] (pod
//! lifecycle and processes), [`images`] (pulls), [`cgroup`] (memory limits).

pub mod admission;
pub mod api;
pub mod cgroup;
pub mod images;
pub mod kubelet;
pub mod rbac;
pub mod store;
pub mod tls;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{oneshot, watch};

/// How the fake cluster behaves; [`FakeKubeOptions::default`] suits most tests.
#[derive(Clone, Debug)]
pub struct FakeKubeOptions {
    /// The namespace Kiln's ServiceAccount `kiln` lives in (and the kubeconfig's context).
    pub namespace: String,
    /// The Role whose rules the ServiceAccount is granted. Default
    /// `<CARGO_MANIFEST_DIR>/deploy/role.yaml`.
    pub role_path: PathBuf,
    /// The bearer token in the kubeconfig; any other token (or none) gets 401.
    pub token: String,
    /// The host directories a container process finds tools in after its image's own `PATH`
    /// (the tools its image would carry: git, slirp4netns). Default: the usual system
    /// directories. The program a pod names always comes from its image.
    pub container_path: OsString,
    /// Extra environment for every container process (before the pod's own `env`).
    pub container_env: Vec<(String, String)>,
    /// How long a pod stays Pending (ContainerCreating) at least before its process starts.
    pub pending_delay: Duration,
    /// Time between SIGTERM and SIGKILL when a pod is deleted (capped by the pod's own
    /// grace period).
    pub kill_grace: Duration,
    /// Interval of BOOKMARK events on watches that asked for them.
    pub bookmark_interval: Duration,
    /// Whether the API server knows pods in their own user namespace. `false` is a cluster
    /// with the `UserNamespacesSupport` and `ProcMountType` feature gates off (both were off
    /// by default before Kubernetes 1.33): it drops `hostUsers` from new pods and forces
    /// `procMount` to `Default`, without a word. Default `true`.
    pub user_namespaces: bool,
    /// The node's registry mirrors: registry host (`ghcr.io`) → `HOST:PORT` of a plain-HTTP
    /// registry that serves its images (see [`images`]). Default: none.
    pub registry_mirrors: HashMap<String, String>,
    /// The kubelet's first crash-loop back-off (the second restart waits this long, later
    /// ones double it, capped at 5 min). Default 10 s, as the kubelet's.
    pub restart_back_off: Duration,
    /// The kubelet's first image-pull back-off. Default 10 s, as the kubelet's.
    pub image_pull_back_off: Duration,
    /// The ServiceAccounts that exist in the namespace. Default `default` (every namespace
    /// has it), and `kiln` and `kiln-builder` (`deploy/serviceaccount.yaml`).
    pub service_accounts: Vec<String>,
    /// The namespace's labels; `pod-security.kubernetes.io/enforce` makes the API server
    /// apply that Pod Security level to new pods (see [`admission`]). Default: none.
    pub namespace_labels: BTreeMap<String, String>,
}

impl Default for FakeKubeOptions {
    fn default() -> Self {
        // The host's tools that stand in for the image's packages (git, slirp4netns, …);
        // the program itself always comes from the image.
        let path = OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        Self {
            namespace: "kiln".to_owned(),
            role_path: Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/role.yaml"),
            token: format!("fake-kube-token-{}", uuid::Uuid::new_v4().simple()),
            container_path: path,
            container_env: Vec::new(),
            pending_delay: Duration::from_millis(50),
            kill_grace: Duration::from_secs(2),
            bookmark_interval: Duration::from_secs(1),
            user_namespaces: true,
            registry_mirrors: HashMap::new(),
            restart_back_off: Duration::from_secs(10),
            image_pull_back_off: Duration::from_secs(10),
            service_accounts: ["default", "kiln", "kiln-builder"].map(str::to_owned).to_vec(),
            namespace_labels: BTreeMap::new(),
        }
    }
}

/// State shared by the routes, the kubelet and the handle.
pub(crate) struct Shared {
    pub options: FakeKubeOptions,
    pub rbac: rbac::Rbac,
    pub store: Mutex<store::Store>,
    /// The latest resourceVersion, for watch streams and the kubelet to wake on changes.
    pub changes: watch::Sender<u64>,
    /// Bumped by [`FakeKube::drop_watches`]: every open watch stream ends.
    pub watch_drops: watch::Sender<u64>,
    /// Bumped by [`FakeKube::drop_log_streams`]: every open log stream ends.
    pub log_drops: watch::Sender<u64>,
    /// Set when the handle is dropped: kubelets kill their processes and stop.
    pub shutdown: watch::Sender<bool>,
    pub requests: Mutex<HashMap<(String, String), u64>>,
    pub forbidden: AtomicU64,
    /// Kubelet state per pod uid.
    pub runtimes: Mutex<HashMap<String, Arc<kubelet::PodRuntime>>>,
    /// Running kubelet tasks, so that drop can wait for every process to be reaped.
    pub live_kubelets: AtomicUsize,
    /// Where per-pod volume dirs go.
    pub pods_dir: PathBuf,
    /// Host mount points this fake holds (see [`acquire_mount_point`]).
    pub mount_points: Mutex<BTreeSet<PathBuf>>,
    pub next_ip: AtomicU32,
    /// Container instances started (restarts included).
    pub container_starts: AtomicU64,
    /// Images on the node by full name, for `imagePullPolicy: IfNotPresent`.
    pub images: Mutex<HashMap<String, Arc<images::PulledImage>>>,
    /// The node's image store: unpacked images by manifest digest.
    pub images_dir: PathBuf,
    /// Held while an image is pulled: pulls are serial.
    pub pulling: tokio::sync::Mutex<()>,
    /// The host path of every program a container started with, in order.
    pub executed: Mutex<Vec<PathBuf>>,
    /// Pull attempts, failed ones included.
    pub image_pulls: AtomicU64,
    /// Watch streams open now.
    pub open_watches: AtomicUsize,
    /// pods/log streams open now.
    pub open_log_streams: AtomicUsize,
    /// 410 Gone answers (watch events and list continuations) served so far.
    pub expired_served: AtomicU64,
    /// Errors to answer requests with, in order (see [`FakeKube::inject`]).
    pub faults: Mutex<Vec<api::Fault>>,
}

/// Counts one open stream while it lives.
pub(crate) struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    pub fn hold(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    /// Runs `f` on the store and wakes watchers and kubelets if it changed anything.
    pub fn mutate<T>(&self, f: impl FnOnce(&mut store::Store) -> T) -> T {
        let (result, rv) = {
            let mut store = self.store.lock().unwrap();
            let result = f(&mut store);
            (result, store.rv())
        };
        self.changes.send_if_modified(|current| {
            let changed = *current != rv;
            *current = rv;
            changed
        });
        result
    }
}

/// A running fake cluster. See the module documentation.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    ca_pem: String,
    ca_der: Vec<u8>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    // Declared last: removed after everything that writes into it has stopped.
    root: tempfile::TempDir,
}

impl FakeKube {
    /// A fake cluster with [`FakeKubeOptions::default`].
    pub fn start() -> Self {
        Self::start_with(FakeKubeOptions::default())
    }

    /// A fake cluster serving on `127.0.0.1:<free port>` from its own thread and runtime
    /// (so it works under any test runtime, or none), its kubeconfig written.
    pub fn start_with(options: FakeKubeOptions) -> Self {
        let root = tempfile::Builder::new()
            .prefix("kiln-fake-kube-")
            .tempdir()
            .expect("fake kube temp dir");
        let pods_dir = root.path().join("pods");
        std::fs::create_dir_all(&pods_dir).expect("pods dir");
        let user = format!("system:serviceaccount:{}:kiln", options.namespace);
        let rbac = rbac::Rbac::load(&options.role_path, &options.namespace, &user)
            .unwrap_or_else(|e| panic!("fake kube: {e}"));
        let shared = Arc::new(Shared {
            options: options.clone(),
            rbac,
            store: Mutex::new(store::Store::default()),
            changes: watch::channel(0).0,
            watch_drops: watch::channel(0).0,
            log_drops: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            requests: Mutex::new(HashMap::new()),
            forbidden: AtomicU64::new(0),
            runtimes: Mutex::new(HashMap::new()),
            live_kubelets: AtomicUsize::new(0),
            pods_dir,
            mount_points: Mutex::new(BTreeSet::new()),
            next_ip: AtomicU32::new(0),
            container_starts: AtomicU64::new(0),
            images: Mutex::new(HashMap::new()),
            images_dir: root.path().join("images"),
            pulling: tokio::sync::Mutex::new(()),
            executed: Mutex::new(Vec::new()),
            image_pulls: AtomicU64::new(0),
            open_watches: AtomicUsize::new(0),
            open_log_streams: AtomicUsize::new(0),
            expired_served: AtomicU64::new(0),
            faults: Mutex::new(Vec::new()),
        });

        let tls = tls::ServerTls::generate();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding fake kube");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("fake kube address");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server_shared = shared.clone();
        let (ca_pem, ca_der) = (tls.ca_pem.clone(), tls.ca_der.clone());
        let thread = std::thread::Builder::new()
            .name(format!("fake-kube-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("fake kube runtime");
                runtime.block_on(async move {
                    let listener =
                        tls.listen(tokio::net::TcpListener::from_std(listener).expect("tokio listener"));
                    tokio::spawn(kubelet::garbage_collector(server_shared.clone()));
                    let app = api::router(server_shared);
                    let server = axum::serve(listener, app);
                    tokio::select! {
                        result = server => {
                            if let Err(e) = result {
                                tracing::warn!("fake kube server failed: {e}");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // Open watch and log streams would keep a graceful shutdown waiting forever.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("fake kube thread");

        let kubeconfig = root.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr, &options, &ca_pem)).expect("writing kubeconfig");
        Self {
            ca_pem,
            ca_der,
            shared,
            addr,
            kubeconfig,
            stop: Some(stop_tx),
            thread: Some(thread),
            root,
        }
    }

    /// The kubeconfig file pointing at this cluster: server `https://127.0.0.1:PORT`, its
    /// CA, the bearer token, and a current context with the namespace.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The host path of every program a container was started with (the image's files,
    /// unpacked in the node's image store), in order.
    pub fn executed(&self) -> Vec<PathBuf> {
        self.shared.executed.lock().unwrap().clone()
    }

    /// The node's image store, where pulled images are unpacked.
    pub fn image_store(&self) -> &Path {
        &self.shared.images_dir
    }

    /// The cluster CA's certificate (PEM), which the kubeconfig carries.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A plain HTTPS client that trusts the cluster's CA (for raw API requests).
    pub fn https_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_preconfigured_tls(tls::client_config(&self.ca_der))
            .no_proxy()
            .build()
            .expect("HTTPS client")
    }

    /// A `kube::Client` that trusts the cluster's CA and sends no credentials.
    pub fn anonymous_client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("the fake's URL"));
        config.root_cert = Some(vec![self.ca_der.clone()]);
        kube::Client::try_from(config).expect("kube client")
    }

    pub fn namespace(&self) -> &str {
        &self.shared.options.namespace
    }

    pub fn token(&self) -> &str {
        &self.shared.options.token
    }

    /// A `kube::Client` configured from [`FakeKube::kubeconfig_path`], as Kiln would load it.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("reading kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("kube config");
        kube::Client::try_from(config).expect("kube client")
    }

    /// How many pods were ever created (successfully).
    pub fn pods_created(&self) -> u64 {
        self.shared.store.lock().unwrap().pods_created
    }

    /// The pods that exist now (including those being deleted), in name order.
    pub fn pods(&self) -> Vec<Pod> {
        let store = self.shared.store.lock().unwrap();
        store
            .list("pods", self.namespace())
            .into_iter()
            .map(|v| serde_json::from_value(v.clone()).expect("stored pod"))
            .collect()
    }

    /// One pod by name, if it exists.
    pub fn pod(&self, name: &str) -> Option<Pod> {
        let store = self.shared.store.lock().unwrap();
        store
            .get("pods", self.namespace(), name)
            .map(|v| serde_json::from_value(v.clone()).expect("stored pod"))
    }

    /// Names of the secrets that exist now.
    pub fn secrets(&self) -> Vec<String> {
        let store = self.shared.store.lock().unwrap();
        store
            .list("secrets", self.namespace())
            .into_iter()
            .filter_map(|v| v["metadata"]["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// The host directory behind volume `volume` of pod `pod` while the pod exists (an
    /// emptyDir's content, or the files of a secret volume).
    pub fn volume_dir(&self, pod: &str, volume: &str) -> Option<PathBuf> {
        let uid = {
            let store = self.shared.store.lock().unwrap();
            store.get("pods", self.namespace(), pod)?["metadata"]["uid"]
                .as_str()?
                .to_owned()
        };
        let dir = kubelet::volume_dir(&self.shared, &uid, volume);
        dir.exists().then_some(dir)
    }

    /// The process id (= process group id) of the pod's running container process.
    pub fn pod_pid(&self, pod: &str) -> Option<u32> {
        let uid = {
            let store = self.shared.store.lock().unwrap();
            store.get("pods", self.namespace(), pod)?["metadata"]["uid"]
                .as_str()?
                .to_owned()
        };
        let runtime = self.shared.runtimes.lock().unwrap().get(&uid).cloned()?;
        runtime.pid()
    }

    /// The temp dir holding the kubeconfig and every pod's volumes (gone after drop).
    pub fn state_dir(&self) -> &Path {
        self.root.path()
    }

    /// Ends every open watch stream (as an API server restart or a load balancer would);
    /// clients re-watch from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.watch_drops.send_modify(|g| *g += 1);
    }

    /// Forgets the whole event history: every watch from a resourceVersion a client holds
    /// now gets an ERROR event with a 410 Expired Status, open ones included.
    pub fn expire_history(&self) {
        self.shared.mutate(|store| store.expire());
    }

    /// Ends every open log stream (followers see the stream end before the container does).
    pub fn drop_log_streams(&self) {
        self.shared.log_drops.send_modify(|g| *g += 1);
    }

    /// Authenticated requests so far with this verb (`get`, `list`, `watch`, `create`,
    /// `update`, `patch`, `delete`, `deletecollection`) on this resource (`pods`,
    /// `pods/log`, `secrets`), whether or not they were allowed.
    pub fn request_count(&self, verb: &str, resource: &str) -> u64 {
        let requests = self.shared.requests.lock().unwrap();
        requests
            .get(&(verb.to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Every authenticated request so far, by (verb, resource).
    pub fn request_counts(&self) -> BTreeMap<(String, String), u64> {
        let requests = self.shared.requests.lock().unwrap();
        requests.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Requests answered 403 Forbidden so far.
    pub fn forbidden_count(&self) -> u64 {
        self.shared.forbidden.load(Ordering::SeqCst)
    }

    /// Watch streams open now (a client that is following changes).
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// pods/log streams open now.
    pub fn open_log_streams(&self) -> usize {
        self.shared.open_log_streams.load(Ordering::SeqCst)
    }

    /// 410 Gone answers served so far (watches from an expired resourceVersion, expired
    /// list continue tokens).
    pub fn expired_served(&self) -> u64 {
        self.shared.expired_served.load(Ordering::SeqCst)
    }

    /// Container instances the kubelet started so far, restarts included.
    pub fn container_starts(&self) -> u64 {
        self.shared.container_starts.load(Ordering::SeqCst)
    }

    /// Image pull attempts so far, failed ones included.
    pub fn image_pulls(&self) -> u64 {
        self.shared.image_pulls.load(Ordering::SeqCst)
    }

    /// Answers the next requests that match `fault` with its error instead of serving
    /// them (an API server under load or failing; see [`api::Fault`]).
    pub fn inject(&self, fault: api::Fault) {
        self.shared.faults.lock().unwrap().push(fault);
    }

    /// Injected errors not yet served.
    pub fn pending_faults(&self) -> u64 {
        self.shared.faults.lock().unwrap().iter().map(|f| f.times).sum()
    }

    /// The pod's container log so far (the current instance's).
    pub fn pod_log(&self, pod: &str) -> Option<String> {
        let uid = {
            let store = self.shared.store.lock().unwrap();
            store.get("pods", self.namespace(), pod)?["metadata"]["uid"]
                .as_str()?
                .to_owned()
        };
        let runtime = self.shared.runtimes.lock().unwrap().get(&uid).cloned()?;
        Some(runtime.log_text())
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        // Kill from here too, in case the runtime is too busy to do it promptly.
        kubelet::kill_all(&self.shared);
        // Kubelets reap their processes before exiting; wait for that so that no pod
        // process outlives the handle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shared.live_kubelets.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let held = std::mem::take(&mut *self.shared.mount_points.lock().unwrap());
        for path in held {
            release_mount_point(&path);
        }
        // `root` (kubeconfig and pod dirs) is removed when the field drops.
    }
}

fn kubeconfig_yaml(addr: SocketAddr, options: &FakeKubeOptions, ca_pem: &str) -> String {
    use base64::Engine as _;
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: fake\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {ca}\n\
         users:\n\
         - name: kiln\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: fake\n  context:\n    cluster: fake\n    user: kiln\n    namespace: {ns}\n\
         current-context: fake\n",
        token = options.token,
        ns = options.namespace,
        ca = base64::engine::general_purpose::STANDARD.encode(ca_pem),
    )
}

/// Host mount points, shared by every fake in this process: (holders, dirs created for it,
/// deepest last). Concurrent tests mount at the same paths (`/var/lib/kiln`), so the dirs
/// one fake created must stay until the last fake using them is dropped.
type MountPointRegistry = Mutex<HashMap<PathBuf, (usize, Vec<PathBuf>)>>;

fn mount_point_registry() -> &'static MountPointRegistry {
    static REGISTRY: OnceLock<MountPointRegistry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Makes sure directory `path` exists on the host as a mount point, creating it and any
/// missing ancestors if needed; they are removed again when the last holder releases it.
pub(crate) fn acquire_mount_point(shared: &Shared, path: &Path) -> std::io::Result<()> {
    let mut held = shared.mount_points.lock().unwrap();
    if held.contains(path) {
        // Another test process (not covered by the registry) may have removed it since.
        return std::fs::create_dir_all(path);
    }
    let mut registry = mount_point_registry().lock().unwrap();
    if let Some((holders, _)) = registry.get_mut(path) {
        *holders += 1;
    } else {
        let mut missing = Vec::new();
        let mut cursor = Some(path);
        while let Some(p) = cursor {
            if p.exists() {
                break;
            }
            missing.push(p.to_path_buf());
            cursor = p.parent();
        }
        missing.reverse();
        std::fs::create_dir_all(path)?;
        registry.insert(path.to_path_buf(), (1, missing));
    }
    held.insert(path.to_path_buf());
    Ok(())
}

fn release_mount_point(path: &Path) {
    let mut registry = mount_point_registry().lock().unwrap();
    let Some((holders, _)) = registry.get_mut(path) else {
        return;
    };
    *holders -= 1;
    if *holders == 0 {
        let (_, created) = registry.remove(path).expect("registered");
        // Only empty dirs: the mounts lived in the pods' own namespaces, so the host side
        // is empty unless someone else put something there, which is not ours to delete.
        for dir in created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
