//! Reaching the service: endpoint URIs, TLS, the admin bearer token, and connected gRPC
//! clients.

use super::*;

/// The endpoint URI for `--addr`: `HOST:PORT` (plain text), `http://HOST:PORT` or
/// `https://HOST:PORT` (TLS).
pub fn endpoint_uri(addr: &str) -> Result<String, ClientError> {
    endpoint_uri_with(addr, false)
}

/// Like [`endpoint_uri`]; with `tls` (a `--tls-*` flag was given) a bare `HOST:PORT` means
/// `https://HOST:PORT`, and `http://` is a contradiction.
pub fn endpoint_uri_with(addr: &str, tls: bool) -> Result<String, ClientError> {
    let uri = if addr.starts_with("https://") {
        addr.to_owned()
    } else if addr.starts_with("http://") {
        if tls {
            return Err(ClientError::Usage(format!(
                "--addr {addr}: --tls-ca, --tls-cert and --tls-key need TLS; use https://HOST:PORT or HOST:PORT"
            )));
        }
        addr.to_owned()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    match uri.parse::<tonic::transport::Uri>() {
        Ok(parsed) if parsed.host().is_some() && parsed.port_u16().is_some() => Ok(uri),
        _ => Err(ClientError::Usage(format!("--addr {addr}: expected HOST:PORT"))),
    }
}

/// Adds `authorization: Bearer <token>` to every call when `--token`/`KILN_TOKEN` is set.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// The interceptor for `token`; a token that cannot be metadata is a usage error (which
    /// does not echo it).
    pub fn new(token: Option<&Secret>) -> Result<Self, ClientError> {
        let Some(token) = token else {
            return Ok(Self(None));
        };
        let token = token.expose().trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Usage(
                "--token (KILN_TOKEN): must be printable ASCII without spaces".into(),
            ));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Usage("--token (KILN_TOKEN): not a valid token".into()))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The transport every client command uses: a channel, plus the bearer token if any.
pub type Transport = InterceptedService<Channel, BearerToken>;

/// The TLS settings of `--tls-*` (or the system's roots alone, for `https://`).
pub(super) fn client_tls(client: &ClientArgs, uri: &str) -> Result<ClientTlsConfig, ClientError> {
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| ClientError::Usage(format!("{flag} {}: {e}", path.display())))
    };
    let mut tls = ClientTlsConfig::new();
    if let Some(host) = uri
        .parse::<tonic::transport::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
    {
        // `[::1]` names the IP address ::1.
        tls = tls.domain_name(host.trim_start_matches('[').trim_end_matches(']'));
    }
    tls = match &client.tls_ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&client.tls_cert, &client.tls_key) {
        tls = tls.identity(Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
    }
    Ok(tls)
}

/// Connects to the service at `--addr`, over TLS for `https://` or `--tls-*`.
pub(super) async fn connect_channel(client: &ClientArgs) -> Result<Channel, ClientError> {
    let uri = endpoint_uri_with(&client.addr, client.wants_tls())?;
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|_| ClientError::Usage(format!("--addr {}: expected HOST:PORT", client.addr)))?
        .connect_timeout(CONNECT_TIMEOUT);
    if uri.starts_with("https://") {
        // rustls needs a process-wide crypto provider; Kiln uses ring everywhere.
        let _ = rustls::crypto::ring::default_provider().install_default();
        endpoint = endpoint
            .tls_config(client_tls(client, &uri)?)
            .map_err(|e| ClientError::Usage(format!("--addr {}: {}", client.addr, error_chain(&e))))?;
    }
    endpoint.connect().await.map_err(|e| ClientError::Connect {
        addr: client.addr.clone(),
        detail: error_chain(&e),
    })
}

/// Connects to the service at `--addr` with the client's credentials.
pub(super) async fn connect(client: &ClientArgs) -> Result<Transport, ClientError> {
    let token = BearerToken::new(client.token.as_ref())?;
    let channel = connect_channel(client).await?;
    Ok(InterceptedService::new(channel, token))
}

/// An error and its sources, `outer: inner: innermost` (tonic's transport error alone says
/// only "transport error").
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

pub(super) async fn builder(client: &ClientArgs) -> Result<ImageBuilderClient<Transport>, ClientError> {
    Ok(ImageBuilderClient::new(connect(client).await?))
}

// ---------------------------------------------------------------------------------------
// kiln build
