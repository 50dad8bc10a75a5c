//! [`RegistryClient`]: Kiln's OCI distribution client (resolve, exists; copy is in `copy.rs`),
//! built on oci-client, with per-request credentials.
//!
//! # Credentials and oci-client's caches
//! An `oci_client::Client` remembers the first credentials it was given for a registry (its
//! auth store is keyed by registry only) and caches bearer tokens by registry + repository.
//! Sharing one across requests that bring different credentials would let one caller's
//! credentials (or token) serve another caller's request. So Kiln keeps one oci-client
//! **per (registry, credentials) pair**, in a small idle-expiring cache: requests with the
//! same credentials share connections and tokens; requests with different credentials never
//! share anything. (A fresh client per request would also be correct, but building one took
//! ~25 ms of CPU here in a debug build, mostly TLS setup, against ~2 µs for a cached one; and
//! a fresh client also repeats the `/v2/` probe and the token round trip on every call.)
//!
//! Which credentials a request uses is decided in `credentials.rs` (the installation's if the
//! policy allows, then `auth.additional`, then anonymous: mk3's order) — except on Kiln's embedded
//! registry ([`ClientConfig::embedded`]): every request there, read or write, whatever the
//! caller's policy, carries Kiln's own generated credentials, the only ones that registry
//! knows.
//!
//! # Transport
//! Loopback registries (`127.x`, `localhost`, `::1`) and `insecure_registries` are spoken to
//! over plain HTTP, everything else over HTTPS with the platform's roots. Connections time
//! out after [`CONNECT_TIMEOUT`], and a stalled read after [`ClientConfig::read_timeout`]
//! (default [`READ_TIMEOUT`]); both surface as `Unavailable` errors.
//!
//! # Retries
//! Every registry call goes through the [`RetryPolicy`] of the config (`retry.rs`): reads
//! (GET, HEAD), mounts and manifest pushes are idempotent and simply run again; blob uploads
//! resume where the registry says they stand (`blobs.rs`). Only `Unavailable` failures are
//! retried; when the budget is spent the error is `RetriesExhausted` (still `Unavailable`),
//! naming the registry and the last error.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use oci_client::{
    client::{ClientConfig as OciConfig, ClientProtocol},
    secrets::RegistryAuth,
};

use super::{
    credentials::{host_of, normalize_registry, select_credentials, CredentialSource, KilnRepositories},
    error::classify,
    manifests::{inspect, ManifestKind},
    CredentialStore, Platform, RegistryError, RegistryErrorKind, RetryPolicy,
};
use crate::model::{AuthPolicy, BasicCredentials, Digest, ImageRef, Secret};

/// How long to wait for a TCP (and TLS) connection to a registry.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a response may stall between two reads (not a limit on a whole transfer), unless
/// [`ClientConfig::read_timeout`] says otherwise.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request body of a blob upload: bigger blobs go in several chunks, and an
/// interrupted upload resumes from the last chunk the registry confirmed.
pub const UPLOAD_CHUNK_BYTES: u64 = 16 * 1024 * 1024;
/// How many oci-clients (distinct registry + credentials pairs) are kept.
const CLIENT_CACHE_CAPACITY: u64 = 512;
/// An oci-client unused for this long is dropped, with its connections and tokens.
const CLIENT_CACHE_IDLE: Duration = Duration::from_secs(10 * 60);
const USER_AGENT: &str = concat!("kiln/", env!("CARGO_PKG_VERSION"));

/// What the registry client needs to know about the installation.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The platform picked from image indexes. Default `linux/amd64`.
    pub platform: Platform,
    /// Registries (`host[:port]`, or a bare host for every port) spoken to over plain HTTP.
    /// Loopback registries always are, without being listed.
    pub insecure_registries: Vec<String>,
    /// The installation's pull secret.
    pub credentials: CredentialStore,
    /// Kiln's base-image repository (its tag is ignored); `selective` auth with
    /// `allow_baserep` opens the installation's credentials for images in it.
    pub base_repository: ImageRef,
    /// Kiln's workspace-image repository (its tag is ignored); `copy` always pushes there
    /// with the installation's credentials.
    pub workspace_repository: ImageRef,
    /// How failed registry calls are retried. Default [`RetryPolicy::default`].
    pub retry: RetryPolicy,
    /// How long a response may stall between two reads; also the longest a request may take
    /// from being sent to the head of its answer (reqwest's read timeout), so an upload chunk
    /// must go through within it. Default [`READ_TIMEOUT`].
    pub read_timeout: Duration,
    /// The largest body of one upload request (at least 1). Default [`UPLOAD_CHUNK_BYTES`].
    pub upload_chunk_bytes: u64,
    /// Kiln's embedded registry and the credentials it was started with. Default: none.
    pub embedded: Option<EmbeddedCredentials>,
}

/// The credentials of Kiln's own embedded registry (`registry` is its `host:port`).
#[derive(Debug, Clone)]
pub struct EmbeddedCredentials {
    pub registry: String,
    pub credentials: BasicCredentials,
}

impl ClientConfig {
    /// A configuration with the defaults: `linux/amd64`, no insecure registries, no
    /// installation credentials.
    pub fn new(base_repository: ImageRef, workspace_repository: ImageRef) -> Self {
        Self {
            platform: Platform::default(),
            insecure_registries: Vec::new(),
            credentials: CredentialStore::empty(),
            base_repository,
            workspace_repository,
            retry: RetryPolicy::default(),
            read_timeout: READ_TIMEOUT,
            upload_chunk_bytes: UPLOAD_CHUNK_BYTES,
            embedded: None,
        }
    }
}

/// Kiln's registry client. Cheap to clone; clones share connections and token caches.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    platform: Platform,
    /// Normalised `host[:port]` or `host` entries.
    insecure_registries: Vec<String>,
    /// The installation's credentials; replaced when the pull secret changes
    /// ([`RegistryClient::replace_credentials`]).
    credentials: watch::Sender<CredentialStore>,
    kiln: KilnRepositories,
    retry: RetryPolicy,
    read_timeout: Duration,
    upload_chunk_bytes: u64,
    /// The embedded registry (normalised `host:port`) and Kiln's credentials for it.
    embedded: Option<(String, BasicCredentials)>,
    /// One oci-client per (registry, credentials); see the module doc for why.
    clients: moka::future::Cache<ClientKey, Oci>,
}

/// The identity of an oci-client: a registry and the exact credentials it authenticates with.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    registry: String,
    credentials: Option<(String, Secret)>,
}

/// An oci-client together with the credentials it was set up with, and a plain HTTP client
/// with the same transport settings for what oci-client cannot do (resumable uploads).
#[derive(Clone)]
pub(crate) struct Oci {
    pub client: oci_client::Client,
    pub auth: RegistryAuth,
    pub http: reqwest::Client,
    /// `http` or `https`, for URLs built by hand.
    pub scheme: &'static str,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("platform", &self.inner.platform)
            .field("insecure_registries", &self.inner.insecure_registries)
            .field("credentials", &*self.inner.credentials.borrow())
            .field("kiln", &self.inner.kiln)
            .field("retry", &self.inner.retry)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// Creates the client. Installs rustls's ring crypto provider for the process if none is
    /// installed yet (idempotent).
    pub fn new(config: ClientConfig) -> Result<Self, RegistryError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let clients = moka::future::Cache::builder()
            .max_capacity(CLIENT_CACHE_CAPACITY)
            .time_to_idle(CLIENT_CACHE_IDLE)
            .build();
        for repository in [&config.base_repository, &config.workspace_repository] {
            super::stats::seed_host(repository.registry());
        }
        Ok(Self {
            inner: Arc::new(Inner {
                platform: config.platform,
                insecure_registries: config
                    .insecure_registries
                    .iter()
                    .map(|r| normalize_registry(r))
                    .collect(),
                credentials: watch::Sender::new(config.credentials),
                kiln: KilnRepositories {
                    base: config.base_repository,
                    workspace: config.workspace_repository,
                },
                retry: config.retry,
                read_timeout: config.read_timeout,
                upload_chunk_bytes: config.upload_chunk_bytes.max(1),
                embedded: config
                    .embedded
                    .map(|e| (normalize_registry(&e.registry), e.credentials)),
                clients,
            }),
        })
    }

    /// Uses `store` as the installation's credentials from now on (a rotated pull secret).
    /// Requests under way keep the credentials they started with; cached oci-clients and
    /// resolutions are keyed by the credentials they used, so none outlives its credentials.
    pub fn replace_credentials(&self, store: CredentialStore) {
        self.inner.credentials.send_replace(store);
    }

    /// Registries spoken to over plain HTTP besides loopback ones (`registry.insecure`).
    pub fn insecure_registries(&self) -> &[String] {
        &self.inner.insecure_registries
    }

    /// The platform picked from image indexes.
    pub fn platform(&self) -> &Platform {
        &self.inner.platform
    }

    /// How failed registry calls are retried.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    /// The largest body of one upload request.
    pub(crate) fn upload_chunk_bytes(&self) -> u64 {
        self.inner.upload_chunk_bytes
    }

    /// Tag → digest. An image index is resolved to the manifest for the configured platform,
    /// and that manifest's digest is returned. A reference that already has a digest is
    /// fetched too: that proves it exists (the bytes are checked against the digest) and
    /// tells an index from an image. Returns `image.pinned(digest)`.
    ///
    /// This GETs the manifest (small) rather than HEADing it: a HEAD cannot tell an index from
    /// an image through oci-client, and an index must be looked into anyway. The platform
    /// manifest itself is not fetched; the registry vouches for the index's entries.
    pub async fn resolve(&self, image: &ImageRef, auth: &AuthPolicy) -> Result<ImageRef, RegistryError> {
        let oci = self.oci_for_request(image, auth).await?;
        let (body, digest) = self.fetch_manifest(&oci, image).await?;
        let digest = match inspect(image, &body)? {
            ManifestKind::Image { .. } => parse_digest(image, &digest)?,
            ManifestKind::Index { .. } => self.choose_platform(image, &body, self.platform())?,
        };
        Ok(image.pinned(digest))
    }

    /// Tag → the digest of exactly the manifest it names: an image index stays the index
    /// (what Kiln itself pushed, which for a multi-platform build is an index). Returns
    /// `image.pinned(digest)`.
    pub async fn resolve_exact(
        &self,
        image: &ImageRef,
        auth: &AuthPolicy,
    ) -> Result<ImageRef, RegistryError> {
        let oci = self.oci_for_request(image, auth).await?;
        let (body, digest) = self.fetch_manifest(&oci, image).await?;
        inspect(image, &body)?;
        Ok(image.pinned(parse_digest(image, &digest)?))
    }

    /// Whether the manifest exists (a HEAD, falling back to a GET when the registry sends no
    /// digest header). A registry that says "not found" (404, `MANIFEST_UNKNOWN`,
    /// `NAME_UNKNOWN`) gives `Ok(false)`; every other failure is an error.
    pub async fn exists(&self, image: &ImageRef, auth: &AuthPolicy) -> Result<bool, RegistryError> {
        let oci = self.oci_for_request(image, auth).await?;
        let reference = image.to_oci();
        self.inner
            .retry
            .run(image.registry(), "check manifest", || async {
                match oci.client.fetch_manifest_digest(&reference, &oci.auth).await {
                    Ok(_) => Ok(true),
                    Err(e) if classify(&e) == RegistryErrorKind::NotFound => Ok(false),
                    Err(e) => Err(RegistryError::CheckManifest {
                        reference: image.to_string(),
                        source: Arc::new(e),
                    }),
                }
            })
            .await
    }

    /// The oci-client for a request about `image` under the caller's policy.
    pub(crate) async fn oci_for_request(
        &self,
        image: &ImageRef,
        auth: &AuthPolicy,
    ) -> Result<Oci, RegistryError> {
        let (creds, source) = self.credentials_for_request(image, auth);
        tracing::debug!(registry = image.registry(), credentials = ?source, "registry credentials chosen");
        self.oci(image, creds.as_ref()).await
    }

    /// A docker `config.json` with exactly the credentials a build elsewhere (a builder pod)
    /// needs: the installation's for Kiln's own repositories in `kiln`, and for each of
    /// `images` what `auth` lets this client use for it. Registries without credentials are
    /// left out (anonymous).
    pub fn docker_config(&self, kiln: &[&ImageRef], images: &[&ImageRef], auth: &AuthPolicy) -> Vec<u8> {
        use base64::Engine as _;
        let mut auths = serde_json::Map::new();
        let mut add = |image: &ImageRef, creds: Option<BasicCredentials>| {
            if let Some(creds) = creds {
                let pair = format!("{}:{}", creds.username, creds.password.expose());
                auths.entry(normalize_registry(image.registry())).or_insert_with(
                    || serde_json::json!({ "auth": base64::engine::general_purpose::STANDARD.encode(pair) }),
                );
            }
        };
        for image in kiln {
            add(image, self.kiln_credentials(image).0);
        }
        for image in images {
            add(image, self.credentials_for_request(image, auth).0);
        }
        serde_json::to_vec(&serde_json::json!({ "auths": auths })).expect("JSON values serialize")
    }

    /// The oci-client for Kiln's own repositories: the installation's credentials for the
    /// registry, whatever the caller's policy says (Kiln pushes there on its own behalf).
    pub(crate) async fn oci_for_kiln(&self, image: &ImageRef) -> Result<Oci, RegistryError> {
        let (creds, source) = self.kiln_credentials(image);
        tracing::debug!(registry = image.registry(), credentials = ?source, "registry credentials chosen");
        self.oci(image, creds.as_ref()).await
    }

    /// Kiln's own credentials when `image` is on the embedded registry.
    fn embedded_credentials(&self, image: &ImageRef) -> Option<BasicCredentials> {
        let (registry, creds) = self.inner.embedded.as_ref()?;
        (normalize_registry(image.registry()) == *registry).then(|| creds.clone())
    }

    /// The credentials for a request under the caller's policy: Kiln's own on the embedded
    /// registry, else what `credentials.rs` picks.
    /// A fingerprint of the credentials a request about `image` under `auth` would use
    /// (never the secret itself): what a cache of such requests' answers is keyed by, so an
    /// answer obtained with credentials is never served to a request that may not use them.
    /// Decided by the same code that chooses the credentials.
    pub fn credentials_fingerprint(&self, image: &ImageRef, auth: &AuthPolicy) -> [u8; 32] {
        use sha2::{Digest as _, Sha256};
        let (creds, source) = self.credentials_for_request(image, auth);
        let mut h = Sha256::new();
        h.update([source as u8]);
        if let Some(creds) = creds {
            h.update(creds.username.as_bytes());
            h.update(b"\0");
            h.update(creds.password.expose().as_bytes());
        }
        h.finalize().into()
    }

    fn credentials_for_request(
        &self,
        image: &ImageRef,
        auth: &AuthPolicy,
    ) -> (Option<BasicCredentials>, CredentialSource) {
        match self.embedded_credentials(image) {
            Some(creds) => (Some(creds), CredentialSource::Embedded),
            None => select_credentials(image, auth, &self.inner.credentials.borrow(), &self.inner.kiln),
        }
    }

    /// The credentials Kiln writes its own repositories with: the embedded registry's, or
    /// the installation's for the registry, or none.
    fn kiln_credentials(&self, image: &ImageRef) -> (Option<BasicCredentials>, CredentialSource) {
        if let Some(creds) = self.embedded_credentials(image) {
            return (Some(creds), CredentialSource::Embedded);
        }
        let installation = self.inner.credentials.borrow().get(image.registry()).cloned();
        match installation {
            Some(creds) => (Some(creds), CredentialSource::Installation),
            None => (None, CredentialSource::Anonymous),
        }
    }

    async fn oci(&self, image: &ImageRef, creds: Option<&BasicCredentials>) -> Result<Oci, RegistryError> {
        let key = ClientKey {
            registry: image.registry().to_owned(),
            credentials: creds.map(|c| (c.username.clone(), c.password.clone())),
        };
        self.inner
            .clients
            .try_get_with(key, self.build_oci(image, creds))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn build_oci(
        &self,
        image: &ImageRef,
        creds: Option<&BasicCredentials>,
    ) -> Result<Oci, RegistryError> {
        let registry = image.registry();
        let protocol_is_http = self.is_plain_http(registry);
        let protocol = if protocol_is_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let platform = self.inner.platform.clone();
        let config = OciConfig {
            protocol,
            // Kiln resolves indexes itself; this only serves oci-client's own pull helpers.
            platform_resolver: Some(Box::new(move |entries| {
                entries
                    .iter()
                    .find(|e| platform.matches_entry(e))
                    .map(|e| e.digest.clone())
            })),
            // One streamed PUT per blob: chunked uploads would send one PATCH per network
            // read of the source stream.
            use_monolithic_push: true,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(self.inner.read_timeout),
            user_agent: USER_AGENT,
            ..OciConfig::default()
        };
        let setup_error = |e: oci_client::errors::OciDistributionError| RegistryError::ClientSetup {
            registry: registry.to_owned(),
            source: Arc::new(e),
        };
        let client = oci_client::Client::try_from(config).map_err(setup_error)?;
        // The same transport settings as oci-client's own reqwest client.
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(self.inner.read_timeout)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| setup_error(e.into()))?;
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.expose().to_owned()),
            None => RegistryAuth::Anonymous,
        };
        // Calls that take no `auth` argument (blob HEAD, mount, blob pull/push) use the stored
        // one; store it now, once, for the registry this client is for.
        client
            .store_auth_if_needed(image.to_oci().resolve_registry(), &auth)
            .await;
        tracing::debug!(
            registry,
            plain_http = self.is_plain_http(registry),
            "oci client created"
        );
        let scheme = match protocol_is_http {
            true => "http",
            false => "https",
        };
        Ok(Oci {
            client,
            auth,
            http,
            scheme,
        })
    }

    fn is_plain_http(&self, registry: &str) -> bool {
        let registry = normalize_registry(registry);
        let host = host_of(&registry);
        host == "localhost"
            || host == "::1"
            || host.starts_with("127.")
            || self
                .inner
                .insecure_registries
                .iter()
                .any(|r| *r == registry || r == host)
    }
}

/// Parses a digest the registry handed out into Kiln's `Digest` (sha256 only).
pub(crate) fn parse_digest(reference: &ImageRef, digest: &str) -> Result<Digest, RegistryError> {
    digest.parse().map_err(|_| RegistryError::UnsupportedDigest {
        reference: reference.to_string(),
        digest: digest.to_owned(),
    })
}
