//! image-builder-mk3's configuration file, read as Kiln's: `kiln serve --config
//! image-builder.json` takes the file Gitpod's installer renders for mk3 unchanged
//! (`install/installer/pkg/components/image-builder-mk3/configmap.go`; the shapes are
//! `components/image-builder-api/go/config/config.go` and `common-go/baseserver`).
//!
//! Every key with a Kiln meaning is mapped onto Kiln's defaults; every other key is kept as
//! an [`IgnoredKey`] saying why, and `kiln serve` names them all in one line at start-up.
//! Unknown keys are ignored too (mk3's own parser ignores them), never refused.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::Config;

/// A key of the file that Kiln does not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredKey {
    pub key: String,
    pub why: &'static str,
}

impl std::fmt::Display for IgnoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.key, self.why)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceConfig {
    orchestrator: Orchestrator,
    #[serde(default)]
    ref_cache: Option<RefCache>,
    #[serde(default)]
    server: Option<Server>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Orchestrator {
    base_image_repository: String,
    workspace_image_repository: String,
    #[serde(default)]
    pull_secret_file: Option<PathBuf>,
    #[serde(default, rename = "enableAdditionalECRAuth")]
    enable_additional_ecr_auth: bool,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Deserialize)]
struct RefCache {
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    refs: Vec<String>,
}

#[derive(Deserialize)]
struct Server {
    #[serde(default)]
    services: Services,
}

#[derive(Default, Deserialize)]
struct Services {
    #[serde(default)]
    grpc: Option<Listener>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Deserialize)]
struct Listener {
    address: String,
    #[serde(default)]
    tls: Option<Tls>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Tls {
    #[serde(default)]
    ca_path: Option<PathBuf>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// Why an orchestrator key has no Kiln meaning.
fn orchestrator_key(key: &str) -> &'static str {
    match key {
        "wsman" => "Kiln builds without ws-manager",
        "pullSecret" => "Kiln reads the mounted file, pullSecretFile",
        "builderImage" => "Kiln builds in its own sandbox or builder pods",
        "subassemblyBucketName" | "subassemblyBucketPrefix" => "subassemblies are not supported",
        _ => "not an mk3 key Kiln knows",
    }
}

/// Whether `text` is mk3's JSON rather than Kiln's TOML: a JSON object.
pub fn looks_like_mk3(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// Kiln's configuration from mk3's `image-builder.json`: Kiln's defaults with mk3's
/// settings, and the keys left out. The error names the key.
pub fn parse(text: &str) -> Result<(Config, Vec<IgnoredKey>), String> {
    let mk3: ServiceConfig =
        serde_json::from_str(text).map_err(|e| format!("image-builder-mk3 JSON: {e}"))?;
    let mut config = Config::default();
    let mut ignored = Vec::new();
    let mut ignore = |key: String, why| ignored.push(IgnoredKey { key, why });

    let orchestrator = mk3.orchestrator;
    let workspace = orchestrator.workspace_image_repository.trim().to_owned();
    let registry = workspace
        .split_once('/')
        .map(|(host, _)| host.to_owned())
        .filter(|host| host.contains('.') || host.contains(':') || host == "localhost")
        .ok_or_else(|| {
            format!("orchestrator.workspaceImageRepository: {workspace:?} does not name its registry host")
        })?;
    config.registry.external = Some(registry);
    config.registry.base_repository = Some(orchestrator.base_image_repository.trim().to_owned());
    config.registry.workspace_repository = Some(workspace);
    config.registry.pull_secret = orchestrator.pull_secret_file;
    if orchestrator.enable_additional_ecr_auth {
        ignore(
            "orchestrator.enableAdditionalECRAuth".into(),
            "ECR credentials from IRSA are not fetched; put them in the pull secret",
        );
    }
    for key in orchestrator.other.keys() {
        ignore(format!("orchestrator.{key}"), orchestrator_key(key));
    }

    if let Some(ref_cache) = mk3.ref_cache {
        if let Some(interval) = ref_cache.interval.filter(|i| !i.is_empty()) {
            config.warmer.interval = humantime::parse_duration(&interval)
                .map_err(|e| format!("refCache.interval: {interval:?}: {e}"))?;
        }
        config.warmer.refs = ref_cache.refs;
    }

    if let Some(server) = mk3.server {
        if let Some(grpc) = server.services.grpc {
            config.grpc.addr = go_listen_address(&grpc.address).ok_or_else(|| {
                format!(
                    "server.services.grpc.address: {:?} is not HOST:PORT",
                    grpc.address
                )
            })?;
            if let Some(tls) = grpc.tls {
                config.grpc.tls_cert = Some(tls.cert_path);
                config.grpc.tls_key = Some(tls.key_path);
                // mk3 verifies client certificates against the CA (`WithSetClientCAs`).
                config.grpc.tls_client_ca = tls.ca_path;
            }
        }
        for key in server.services.other.keys() {
            ignore(
                format!("server.services.{key}"),
                "Kiln's HTTP endpoints are metrics.addr and logs.http_addr",
            );
        }
    }
    for key in mk3.other.keys() {
        ignore(key.clone(), "not an mk3 key Kiln knows");
    }
    Ok((config, ignored))
}

/// A Go listen address (`0.0.0.0:8080`, `:8080`, `[::]:8080`) as a socket address.
fn go_listen_address(address: &str) -> Option<SocketAddr> {
    match address.strip_prefix(':') {
        Some(port) => Some(SocketAddr::from(([0, 0, 0, 0], port.parse().ok()?))),
        None => address.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Gitpod's installer renders for a workspace cluster (configmap.go).
    const RENDERED: &str = r#"{
        "orchestrator": {
            "wsman": {"address": "ws-manager-mk2:8080", "tls": {"ca": "/wsman-certs/ca.crt", "crt": "/wsman-certs/tls.crt", "key": "/wsman-certs/tls.key"}},
            "pullSecret": "builtin-registry-auth",
            "pullSecretFile": "/config/pull-secret/pull-secret.json",
            "baseImageRepository": "registry.gitpod.example.com/base-images",
            "workspaceImageRepository": "registry.gitpod.example.com/workspace-images",
            "builderImage": "eu.gcr.io/gitpod-core-dev/build/image-builder-mk3/bob:commit-1",
            "enableAdditionalECRAuth": false
        },
        "refCache": {"interval": "6h0m0s", "refs": ["gitpod/workspace-full:latest"]},
        "server": {"services": {"grpc": {"address": "0.0.0.0:8080", "tls": {"caPath": "/certs/ca.crt", "certPath": "/certs/tls.crt", "keyPath": "/certs/tls.key"}}}}
    }"#;

    #[test]
    fn the_installers_file_maps_onto_kiln() {
        assert!(looks_like_mk3(RENDERED));
        let (config, ignored) = parse(RENDERED).unwrap();
        assert_eq!(
            config.registry.external.as_deref(),
            Some("registry.gitpod.example.com")
        );
        assert_eq!(
            config.registry.base_repository.as_deref(),
            Some("registry.gitpod.example.com/base-images")
        );
        assert_eq!(
            config.registry.workspace_repository.as_deref(),
            Some("registry.gitpod.example.com/workspace-images")
        );
        assert_eq!(
            config.registry.pull_secret.as_deref(),
            Some(std::path::Path::new("/config/pull-secret/pull-secret.json"))
        );
        assert_eq!(config.warmer.interval, std::time::Duration::from_secs(6 * 3600));
        assert_eq!(config.warmer.refs, ["gitpod/workspace-full:latest"]);
        assert_eq!(config.grpc.addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(
            config.grpc.tls_client_ca.as_deref(),
            Some(std::path::Path::new("/certs/ca.crt"))
        );
        let keys: Vec<&str> = ignored.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "orchestrator.builderImage",
                "orchestrator.pullSecret",
                "orchestrator.wsman"
            ]
        );
        assert!(ignored.iter().all(|i| !i.why.is_empty()));
        config.validate().unwrap();
    }

    #[test]
    fn mistakes_name_the_key_and_unknown_keys_are_listed() {
        let no_host = RENDERED.replace("registry.gitpod.example.com/workspace-images", "workspace-images");
        assert!(parse(&no_host).unwrap_err().contains("workspaceImageRepository"));
        let bad_interval = RENDERED.replace("6h0m0s", "often");
        assert!(parse(&bad_interval).unwrap_err().contains("refCache.interval"));
        let bad_address = RENDERED.replace("0.0.0.0:8080", "eight-thousand");
        assert!(parse(&bad_address)
            .unwrap_err()
            .contains("server.services.grpc.address"));
        let extra = RENDERED.replacen('{', r#"{"pprof": {"addr": ":6060"},"#, 1);
        let (_, ignored) = parse(&extra).unwrap();
        assert!(ignored.iter().any(|i| i.key == "pprof"));
        assert_eq!(go_listen_address(":8080"), Some("0.0.0.0:8080".parse().unwrap()));
    }
}
