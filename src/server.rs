//! `kiln serve`: wires the configuration into running parts — the embedded registry, the
//! actor system, the metrics endpoint with the dashboard, and the gRPC server — and takes
//! them down again.
//!
//! [`serve`] takes its shutdown signal as a parameter so tests can run a whole server
//! in-process; [`run`] is the binary's entry point and stops on SIGINT or SIGTERM.
//!
//! It also owns two of Kiln's own surfaces:
//! - the data directory is private (`private_fs`): created 0700, and one an older Kiln left
//!   is fixed up at start;
//! - the embedded registry's credentials: generated at every start (random, held in memory,
//!   never logged), given to Kiln's registry client and the registry, and written for the
//!   operator as a docker `config.json` (0600) at `registry.embedded_credentials_file`.

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::{
    actors,
    api::{
        dashboard,
        log_http::{self, LogLinks},
        AccessLayer, AccessPolicy, AdminService, Closing, ImageBuilderService, MessageLimitLayer,
        RpcMetricsLayer, RpcTraceLayer,
    },
    config::Config,
    metrics::Metrics,
    model::{BasicCredentials, Secret},
    private_fs,
    proto::{admin::admin_server::AdminServer, builder::image_builder_server::ImageBuilderServer},
    registry::{self, ClientConfig, CredentialStore, EmbeddedCredentials, RegistryClient},
};

/// The user name of the embedded registry's generated credentials.
pub const EMBEDDED_REGISTRY_USER: &str = "kiln";

/// Kiln's own entries in the data directory, which the start-up fix-up makes private (what
/// else an operator keeps there is left alone).
const OWN_ENTRIES: &[&str] = &[
    "logs",
    "builds",
    "registry",
    "contexts",
    "engine",
    "registry-auth.json",
    "log-http.key",
];

/// Directories under the data directory whose contents are image files (unpacked layers,
/// build scratch, cache mounts, extracted contexts): made 0700 but not walked by the start-up
/// fix-up, since their modes are what builds see.
const CONTENT_TREES: &[&str] = &[
    "engine/layers",
    "engine/tmp",
    "engine/cache-mounts",
    "contexts/work",
];

/// Fresh credentials for the embedded registry: 32 random bytes, hex.
fn generate_registry_credentials() -> BasicCredentials {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    BasicCredentials {
        username: EMBEDDED_REGISTRY_USER.to_owned(),
        password: Secret::new(hex::encode(bytes)),
    }
}

/// The docker `config.json` an operator gives skopeo or podman (`--authfile`) to push to the
/// embedded registry at `registry`.
fn docker_config_json(registry: &str, creds: &BasicCredentials) -> Vec<u8> {
    use base64::Engine as _;
    let pair = format!("{}:{}", creds.username, creds.password.expose());
    let auth = base64::engine::general_purpose::STANDARD.encode(pair);
    serde_json::to_vec_pretty(&serde_json::json!({ "auths": { registry: { "auth": auth } } }))
        .expect("JSON values serialize")
}

/// Creates the data directory 0700 and makes what is in it private: what an earlier Kiln
/// left (before the actors start), and the directories the actors' start created with the
/// umask's modes (after).
fn prepare_data_dir(data_dir: &std::path::Path) -> anyhow::Result<()> {
    private_fs::create_dir_all(data_dir)
        .with_context(|| format!("data_dir: cannot create {}", data_dir.display()))?;
    fix_up_data_dir(data_dir)
}

fn fix_up_data_dir(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let changed = private_fs::fix_up_data_dir(data_dir, OWN_ENTRIES, CONTENT_TREES)
        .with_context(|| format!("data_dir: cannot make {} private", data_dir.display()))?;
    if changed > 0 {
        tracing::info!(data_dir = %data_dir.display(), changed, "data directory made private (0700/0600)");
    }
    Ok(())
}

/// Runs Kiln until SIGINT or SIGTERM. Blocking: creates its own runtime.
pub fn run(config: Config) -> anyhow::Result<()> {
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config, shutdown_signal()))
}

/// Caps glibc's malloc arenas at one per CPU, unless the operator set `MALLOC_ARENA_MAX`.
///
/// glibc gives each new thread that allocates an arena of its own, up to 8 per CPU. Kiln's
/// blocking threads come and go with file and archive work (a log's writer, an unpack), so
/// under load the process holds many half-empty arenas: measured with 200 build streams,
/// peak RSS 55.1 MB with the default and 50.5 MB with 2 arenas on 2 CPUs, at the same
/// latency. Called before the runtime starts its threads.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let arenas = libc::c_int::try_from(cpus).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt changes an allocator limit under the allocator's own lock.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

fn registry_client(config: &Config, embedded: Option<EmbeddedCredentials>) -> anyhow::Result<RegistryClient> {
    let credentials = match &config.registry.pull_secret {
        Some(path) => CredentialStore::from_docker_config_file(path)
            .with_context(|| format!("registry.pull_secret: cannot use {}", path.display()))?,
        None => CredentialStore::empty(),
    };
    Ok(RegistryClient::new(ClientConfig {
        platform: config.platform()?,
        insecure_registries: config.registry.insecure.clone(),
        credentials,
        base_repository: config.registry.base_repository()?,
        workspace_repository: config.registry.workspace_repository()?,
        retry: config.registry.retry_policy(),
        read_timeout: config.registry.read_timeout,
        upload_chunk_bytes: registry::UPLOAD_CHUNK_BYTES,
        embedded,
    })?)
}

/// Listens on `addr` for `what`; a taken address is named with the setting that moves it
/// (`key` in the config file, or the `kiln serve` flag when there is one).
async fn bind(what: &str, addr: SocketAddr, key: &str, flag: Option<&str>) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            let flag = flag.map(|f| format!("{f} or ")).unwrap_or_default();
            format!(
                " (another process listens there: stop it, or choose another address with \
                 {flag}`{key}` in the config file)"
            )
        } else {
            String::new()
        };
        anyhow::anyhow!("cannot listen for {what} on {addr}: {e}{hint}")
    })
}

fn tls(config: &Config) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&config.grpc.tls_cert, &config.grpc.tls_key) else {
        return Ok(None);
    };
    let read = |p: &PathBuf, key: &str| {
        std::fs::read(p).with_context(|| format!("{key}: cannot read {}", p.display()))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read(cert, "grpc.tls_cert")?,
        read(key, "grpc.tls_key")?,
    ));
    if let Some(ca) = &config.grpc.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "grpc.tls_client_ca")?));
    }
    Ok(Some(tls))
}

/// Runs every part of Kiln until `shutdown` resolves, then stops them all.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    prepare_data_dir(&config.data_dir)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    let mut embedded = None;
    // The embedded registry, when Kiln runs one: its collections are counted in the metrics.
    let mut collected = None;
    if config.registry.external.is_none() {
        let registry_addr = config.registry.target_registry();
        let credentials = generate_registry_credentials();
        let auth_file = config.registry.embedded_credentials_path(&config.data_dir);
        if let Some(parent) = auth_file.parent().filter(|p| !p.as_os_str().is_empty()) {
            private_fs::create_dir_all(parent).with_context(|| {
                format!(
                    "registry.embedded_credentials_file: cannot create {}",
                    parent.display()
                )
            })?;
        }
        private_fs::write_private(&auth_file, &docker_config_json(&registry_addr, &credentials))
            .with_context(|| {
                format!(
                    "registry.embedded_credentials_file: cannot write {}",
                    auth_file.display()
                )
            })?;
        let anonymous_pull = config.registry.embedded_anonymous_pull();
        if anonymous_pull && !config.registry.embedded_addr.ip().is_loopback() {
            tracing::warn!(
                addr = %config.registry.embedded_addr,
                "the embedded registry listens beyond loopback and serves anonymous pulls \
                 (registry.anonymous_pull = true): anyone who reaches it can read every image"
            );
        }
        let access = registry::server::Access::with_credentials(&credentials, anonymous_pull);
        embedded = Some(EmbeddedCredentials {
            registry: registry_addr,
            credentials,
        });
        let listener = bind(
            "the embedded registry",
            config.registry.embedded_addr,
            "registry.embedded_addr",
            Some("--registry-addr"),
        )
        .await?;
        let root = config.data_dir.join("registry");
        tracing::info!(
            addr = %config.registry.embedded_addr,
            root = %root.display(),
            anonymous_pull,
            credentials_file = %auth_file.display(),
            "embedded registry listening; writes need the credentials in credentials_file"
        );
        // Kiln's base images expire when unused; workspace images callers may still pull stay.
        let expiring = config
            .registry
            .base_repository()
            .ok()
            .filter(|base| base.registry() == config.registry.target_registry())
            .map(|base| {
                (
                    base.repository().to_owned(),
                    config.storage.registry_keep_duration,
                )
            });
        let policy = registry::server::GcPolicy {
            blob_grace: config.storage.registry_blob_grace,
            upload_max_age: config.storage.registry_upload_max_age,
            expiring: expiring.into_iter().collect(),
        };
        let embedded_registry = registry::server::EmbeddedRegistry::open(root, access, policy)
            .await
            .context("embedded registry")?;
        let (collector, every, stop) = (
            embedded_registry.clone(),
            config.storage.registry_gc_interval,
            stopped(),
        );
        tasks.spawn(async move {
            tokio::select! {
                () = collector.collect_every(every) => {}
                () = stop => {}
            }
            Ok(())
        });
        collected = Some(embedded_registry.clone());
        let stop = stopped();
        tasks.spawn(async move {
            embedded_registry
                .serve(listener, stop)
                .await
                .context("embedded registry")
        });
    }

    let metrics = Metrics::new();
    if let Some(registry) = &collected {
        metrics.watch_embedded_registry(registry.clone());
    }
    let metrics_listener = bind(
        "metrics",
        config.metrics.addr,
        "metrics.addr",
        Some("--metrics-addr"),
    )
    .await?;
    let dashboard_access = AccessPolicy::for_dashboard(&config)?;
    if !config.metrics.addr.ip().is_loopback() && config.grpc.admin_token()?.is_none() {
        tracing::warn!(
            addr = %config.metrics.addr,
            "the dashboard listens beyond loopback and no grpc.admin_token is set: it refuses \
             every request (/metrics stays open)"
        );
    }

    let registry_client = registry_client(&config, embedded)?;
    if let Some(path) = config.registry.pull_secret.clone() {
        let client = registry_client.clone();
        tasks.spawn(async move {
            registry::follow_docker_config(path, client, registry::PULL_SECRET_POLL).await;
            Ok(())
        });
    }
    let system = actors::start(&config, registry_client, metrics.clone(), collected.clone()).await?;
    let kiln = system.handle();
    fix_up_data_dir(&config.data_dir)?;

    tracing::info!(
        addr = %config.metrics.addr,
        token = dashboard_access.is_guarded(),
        "metrics on /metrics, the dashboard on /"
    );
    let (dashboard_kiln, m, stop) = (kiln.clone(), metrics.clone(), stopped());
    tasks.spawn(async move {
        dashboard::serve(metrics_listener, dashboard_kiln, m, dashboard_access, stop)
            .await
            .context("metrics and dashboard server")
    });

    let log_listener = bind(
        "the build log endpoint",
        config.logs.http_addr,
        "logs.http_addr",
        None,
    )
    .await?;
    let log_addr = log_listener.local_addr()?;
    let log_url = (config.logs.http_public_url.clone()).unwrap_or_else(|| format!("http://{log_addr}"));
    let log_links = LogLinks::load_or_create(&config.data_dir, &log_url).with_context(|| {
        format!(
            "cannot read or create the log key in {}",
            config.data_dir.display()
        )
    })?;
    tracing::info!(addr = %log_addr, url = %log_url, "build logs served over HTTP");
    let (close_streams, closing) = watch::channel(false);
    let closing = Closing::new(closing);
    let (links, logs_kiln, log_closing, stop) = (log_links.clone(), kiln.clone(), closing.clone(), stopped());
    tasks.spawn(async move {
        log_http::serve(log_listener, links, logs_kiln, log_closing, stop)
            .await
            .context("build log endpoint")
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ImageBuilderServer<ImageBuilderService>>()
        .await;
    let watch_kiln = kiln.clone();
    let watch_health = health.clone();
    let health_watch = tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let status = if watch_kiln.healthy().await {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            // Every service by its name (the overall answer is ""); any other name is
            // NotFound, as the health protocol says.
            for service in ["", "builder.ImageBuilder", "kiln.admin.v1.Admin"] {
                watch_health.set_service_status(service, status).await;
            }
        }
    });
    // Both reflection versions: grpcurl before 1.8 and most GUI clients ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;

    let max = config.grpc.max_message_bytes;
    let builder_service = ImageBuilderServer::new(ImageBuilderService::new(
        kiln.clone(),
        metrics.clone(),
        log_links,
        closing,
    ))
    .max_decoding_message_size(max);
    let admin_service = AdminServer::new(AdminService::new(kiln)).max_decoding_message_size(max);
    let mut server = Server::builder();
    let tls = tls(&config)?;
    let access = AccessPolicy::from_config(&config)?;
    if access.is_guarded() {
        tracing::info!(
            token = config.grpc.admin_token.is_some() || config.grpc.admin_token_file.is_some(),
            client_certificates = config.grpc.tls_client_ca.is_some(),
            "Admin and CancelBuild need an admin token or a client certificate"
        );
        if tls.is_none() && config.grpc.listens_beyond_loopback() {
            tracing::warn!(
                addr = %config.grpc.addr,
                "the admin token travels in clear text: set grpc.tls_cert and grpc.tls_key"
            );
        }
    }
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let grpc_listener = bind("gRPC", config.grpc.addr, "grpc.addr", Some("--grpc-addr")).await?;
    tracing::info!(addr = %config.grpc.addr, data_dir = %config.data_dir.display(), "kiln ready: gRPC listening");
    // Small unary replies must not wait for Nagle's algorithm (tens of ms per call).
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
        |s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
    let grpc = server
        .layer(RpcTraceLayer)
        .layer(RpcMetricsLayer::new(metrics))
        .layer(MessageLimitLayer)
        .layer(AccessLayer::new(access))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(builder_service)
        .add_service(admin_service)
        .serve_with_incoming_shutdown(incoming, stopped());

    tokio::pin!(grpc);
    let failed = tokio::select! {
        r = &mut grpc => Some(r.context("gRPC server")),
        Some(r) = tasks.join_next() => Some(r.context("a server task panicked").and_then(|r| r)),
        _ = shutdown => None,
    };
    if failed.is_none() {
        // SIGTERM: new builds are refused and readiness fails, so traffic moves elsewhere;
        // running builds get the grace to finish while every RPC is still served.
        health_watch.abort();
        health
            .set_not_serving::<ImageBuilderServer<ImageBuilderService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let grace = config.builds.shutdown_grace;
        tracing::info!(grace = %humantime::format_duration(grace), "draining: no new builds; running builds may finish");
        tokio::select! {
            () = system.drain(grace) => {}
            r = &mut grpc => tracing::error!(result = ?r.map_err(|e| e.to_string()), "the gRPC server stopped while draining"),
        }
    }
    // Streams still open end `Unavailable`; then the servers stop taking calls.
    let _ = close_streams.send(true);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        if failed.is_none() {
            let _ = (&mut grpc).await;
        }
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tracing::debug!("servers stopped");
    // Then the actors, on a blocking thread (it joins them).
    tokio::task::spawn_blocking(move || system.stop()).await?;
    tracing::debug!("actors stopped");
    failed.unwrap_or(Ok(()))
}
