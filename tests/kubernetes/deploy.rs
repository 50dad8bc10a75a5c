//! The Kustomize base in `deploy/`: `kubectl kustomize deploy/` renders it, every object is a
//! valid Kubernetes object of its kind (no misspelled or unknown field), and the objects fit
//! together: the Role grants exactly the executor's verbs to the `kiln` ServiceAccount, the
//! Service and the budget select the Deployment's pods, the ConfigMap is a Kiln config whose
//! files the Deployment's volumes provide.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{Role, RoleBinding},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

const NAMESPACE: &str = "kiln";
const IMAGE: &str = "ghcr.io/kiln-build/kiln:0.1.0";

/// The executor's verbs (the contract in the Kubernetes design): (resource, verb).
const GRANTED: &[(&str, &str)] = &[
    ("pods", "create"),
    ("pods", "get"),
    ("pods", "list"),
    ("pods", "watch"),
    ("pods", "delete"),
    ("pods/log", "get"),
    ("secrets", "create"),
    ("secrets", "get"),
    ("secrets", "delete"),
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every rendered object, typed.
#[derive(Default)]
struct Rendered {
    kinds: Vec<String>,
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    budgets: Vec<PodDisruptionBudget>,
    network_policies: Vec<NetworkPolicy>,
}

impl Rendered {
    fn deployment(&self) -> &Deployment {
        assert_eq!(self.deployments.len(), 1, "one Deployment");
        &self.deployments[0]
    }

    fn pod_spec(&self) -> &PodSpec {
        self.deployment()
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .expect("the Deployment has a pod spec")
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        self.deployment()
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .expect("the pod template has labels")
    }

    fn container(&self) -> &Container {
        let containers = &self.pod_spec().containers;
        assert_eq!(containers.len(), 1, "one container in Kiln's pod");
        &containers[0]
    }

    fn config_map(&self) -> &ConfigMap {
        assert_eq!(self.config_maps.len(), 1, "one ConfigMap");
        &self.config_maps[0]
    }

    fn kiln_toml(&self) -> &str {
        self.config_map()
            .data
            .as_ref()
            .and_then(|d| d.get("kiln.toml"))
            .expect("the ConfigMap has the key kiln.toml")
    }
}

/// `kubectl kustomize deploy/`, once for all tests.
fn rendered() -> &'static Rendered {
    static RENDERED: OnceLock<Rendered> = OnceLock::new();
    RENDERED.get_or_init(|| parse_stream(&kustomize()))
}

fn kustomize() -> String {
    let dir = deploy_dir();
    let output = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "kubectl is not installed (not on PATH): these tests render deploy/ with \
             `kubectl kustomize`. Install it, e.g. Debian's kubernetes-client package \
             (scripts/test does)"
        ),
        Err(e) => panic!("cannot run kubectl: {e}"),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed ({}):\n{}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kubectl's output is UTF-8")
}

fn parse_stream(yaml: &str) -> Rendered {
    let mut rendered = Rendered::default();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = serde_yaml_ng::Value::deserialize(document).expect("a YAML document");
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_else(|| panic!("a document without kind:\n{value:?}"))
            .to_owned();
        match kind.as_str() {
            "Namespace" => rendered.namespaces.push(typed(&value)),
            "ServiceAccount" => rendered.service_accounts.push(typed(&value)),
            "Role" => rendered.roles.push(typed(&value)),
            "RoleBinding" => rendered.role_bindings.push(typed(&value)),
            "ConfigMap" => rendered.config_maps.push(typed(&value)),
            "Deployment" => rendered.deployments.push(typed(&value)),
            "Service" => rendered.services.push(typed(&value)),
            "PodDisruptionBudget" => rendered.budgets.push(typed(&value)),
            "NetworkPolicy" => rendered.network_policies.push(typed(&value)),
            other => panic!("deploy/ renders an unexpected kind {other}"),
        }
        rendered.kinds.push(kind);
    }
    rendered
}

/// Parses a document as its k8s-openapi type, and fails on any field that type does not
/// know: k8s-openapi ignores unknown fields, so the typed value is serialized back and must
/// equal the document.
fn typed<T: DeserializeOwned + Serialize>(document: &serde_yaml_ng::Value) -> T {
    let name = document
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("?")
        .to_owned();
    let kind = document
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("?")
        .to_owned();
    let value: T = serde_yaml_ng::from_value(document.clone())
        .unwrap_or_else(|e| panic!("{kind} {name} is not a valid {kind}: {e}"));
    let expected = serde_json::to_value(document).expect("the document as JSON");
    let actual = serde_json::to_value(&value).expect("the typed object as JSON");
    if let Some(path) = first_difference(&expected, &actual, String::new()) {
        panic!(
            "{kind} {name}: field {path} is not part of the {kind} schema (misspelled or \
             misplaced?), or does not round-trip"
        );
    }
    value
}

/// The first path at which two JSON values differ.
fn first_difference(
    expected: &serde_json::Value,
    actual: &serde_json::Value,
    path: String,
) -> Option<String> {
    use serde_json::Value;
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, value) in e {
                let at = format!("{path}.{key}");
                match a.get(key) {
                    None => return Some(at),
                    Some(other) => {
                        if let Some(found) = first_difference(value, other, at) {
                            return Some(found);
                        }
                    }
                }
            }
            a.keys()
                .find(|key| !e.contains_key(*key))
                .map(|key| format!("{path}.{key} (added)"))
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Some(format!("{path} (length)"));
            }
            e.iter()
                .zip(a)
                .enumerate()
                .find_map(|(i, (e, a))| first_difference(e, a, format!("{path}[{i}]")))
        }
        (e, a) if e == a => None,
        _ => Some(if path.is_empty() { ".".into() } else { path }),
    }
}

fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector.match_expressions.as_ref().is_none_or(|e| e.is_empty()),
        "selectors here use matchLabels only"
    );
    let wanted = selector.match_labels.as_ref().expect("matchLabels");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn renders_exactly_the_expected_kinds() {
    let rendered = rendered();
    let kinds: BTreeSet<&str> = rendered.kinds.iter().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ]
    .into();
    assert_eq!(kinds, expected);
    assert_eq!(rendered.namespaces.len(), 1);
    assert_eq!(rendered.roles.len(), 1);
    assert_eq!(rendered.role_bindings.len(), 1);
    assert_eq!(rendered.config_maps.len(), 1);
    assert_eq!(rendered.deployments.len(), 1);
    assert_eq!(rendered.services.len(), 1);
    assert_eq!(rendered.budgets.len(), 1);

    assert_eq!(rendered.namespaces[0].metadata.name.as_deref(), Some(NAMESPACE));
    let namespaced = rendered
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(rendered.roles.iter().map(|o| &o.metadata))
        .chain(rendered.role_bindings.iter().map(|o| &o.metadata))
        .chain(rendered.config_maps.iter().map(|o| &o.metadata))
        .chain(rendered.deployments.iter().map(|o| &o.metadata))
        .chain(rendered.services.iter().map(|o| &o.metadata))
        .chain(rendered.budgets.iter().map(|o| &o.metadata))
        .chain(rendered.network_policies.iter().map(|o| &o.metadata));
    for meta in namespaced {
        assert_eq!(
            meta.namespace.as_deref(),
            Some(NAMESPACE),
            "{:?} is in namespace {NAMESPACE}",
            meta.name
        );
    }
    let every = rendered
        .namespaces
        .iter()
        .map(|o| &o.metadata)
        .chain(rendered.service_accounts.iter().map(|o| &o.metadata))
        .chain(rendered.roles.iter().map(|o| &o.metadata))
        .chain(rendered.role_bindings.iter().map(|o| &o.metadata))
        .chain(rendered.config_maps.iter().map(|o| &o.metadata))
        .chain(rendered.deployments.iter().map(|o| &o.metadata))
        .chain(rendered.services.iter().map(|o| &o.metadata))
        .chain(rendered.budgets.iter().map(|o| &o.metadata))
        .chain(rendered.network_policies.iter().map(|o| &o.metadata));
    for meta in every {
        let labels = meta.labels.clone().unwrap_or_default();
        for key in ["app.kubernetes.io/name", "app.kubernetes.io/part-of"] {
            assert_eq!(
                labels.get(key).map(String::as_str),
                Some("kiln"),
                "{:?} is labelled {key}: kiln",
                meta.name
            );
        }
    }
}

#[test]
fn misspelled_fields_are_caught() {
    // The check `typed` relies on: k8s-openapi alone accepts an unknown field.
    let yaml =
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\nautomountServiceAcountToken: false\n";
    let document: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).unwrap();
    assert!(serde_yaml_ng::from_value::<ServiceAccount>(document.clone()).is_ok());
    let caught = std::panic::catch_unwind(|| typed::<ServiceAccount>(&document));
    assert!(caught.is_err(), "the round trip catches the misspelled field");
}

#[test]
fn service_accounts_for_kiln_and_its_builder_pods() {
    let rendered = rendered();
    let by_name: BTreeMap<&str, &ServiceAccount> = rendered
        .service_accounts
        .iter()
        .map(|sa| (sa.metadata.name.as_deref().unwrap(), sa))
        .collect();
    assert_eq!(
        by_name.keys().copied().collect::<Vec<_>>(),
        ["kiln", "kiln-builder"]
    );
    assert_eq!(
        by_name["kiln-builder"].automount_service_account_token,
        Some(false),
        "builder pods get no API token"
    );
    assert_ne!(by_name["kiln"].automount_service_account_token, Some(false));
}

#[test]
fn role_grants_exactly_the_executors_verbs() {
    let rendered = rendered();
    let role = &rendered.roles[0];
    assert_eq!(role.metadata.name.as_deref(), Some("kiln"));
    let mut granted = BTreeSet::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "core API group only"
        );
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for resource in rule.resources.as_deref().unwrap_or_default() {
            for verb in &rule.verbs {
                assert!(
                    granted.insert((resource.clone(), verb.clone())),
                    "{resource} {verb} granted twice"
                );
            }
        }
    }
    let expected: BTreeSet<(String, String)> = GRANTED
        .iter()
        .map(|(r, v)| (r.to_string(), v.to_string()))
        .collect();
    assert_eq!(granted, expected);

    // The fake API server reads deploy/role.yaml itself: one plain Role document.
    let text = std::fs::read_to_string(deploy_dir().join("role.yaml")).unwrap();
    let file_role: Role = serde_yaml_ng::from_str(&text).expect("deploy/role.yaml is one Role");
    assert_eq!(file_role.rules, role.rules);
}

#[test]
fn role_binding_binds_the_role_to_kilns_service_account() {
    let rendered = rendered();
    let binding = &rendered.role_bindings[0];
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(
        Some(&binding.role_ref.name),
        rendered.roles[0].metadata.name.as_ref()
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "bound to Kiln's replicas only");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "kiln");
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(rendered.pod_spec().service_account_name.as_deref(), Some("kiln"));
}

#[test]
fn deployment_runs_two_unprivileged_replicas_with_grpc_probes() {
    let rendered = rendered();
    let spec = rendered.deployment().spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    assert!(selector_matches(&spec.selector, &rendered.pod_labels()));
    assert_eq!(
        rendered
            .pod_labels()
            .get("app.kubernetes.io/name")
            .map(String::as_str),
        Some("kiln")
    );

    let container = rendered.container();
    assert_eq!(container.image.as_deref(), Some(IMAGE));
    assert_eq!(
        container.args.as_deref(),
        Some(
            &[
                "serve".to_owned(),
                "--config".into(),
                "/etc/kiln/kiln.toml".into()
            ][..]
        )
    );
    let ports: BTreeMap<&str, i32> = container
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| (p.name.as_deref().unwrap(), p.container_port))
        .collect();
    assert_eq!(ports, BTreeMap::from([("grpc", 7070), ("metrics", 9500)]));
    for (which, probe) in [
        ("readiness", &container.readiness_probe),
        ("liveness", &container.liveness_probe),
    ] {
        let grpc = probe
            .as_ref()
            .and_then(|p| p.grpc.as_ref())
            .unwrap_or_else(|| panic!("a gRPC {which} probe"));
        assert_eq!(grpc.port, 7070, "{which} probe port");
    }
    let resources = container.resources.as_ref().expect("resources");
    for key in ["cpu", "memory"] {
        assert!(resources.requests.as_ref().is_some_and(|r| r.contains_key(key)));
        assert!(resources.limits.as_ref().is_some_and(|r| r.contains_key(key)));
    }

    let pod = rendered.pod_spec();
    let pod_security = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(pod_security.run_as_user, Some(65532));
    let security = container
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(security.privileged, None);
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert!(security.capabilities.as_ref().unwrap().add.is_none());
    let seccomp = security
        .seccomp_profile
        .as_ref()
        .or(pod_security.seccomp_profile.as_ref())
        .expect("a seccomp profile");
    assert_eq!(seccomp.type_, "RuntimeDefault");
    assert!(pod.termination_grace_period_seconds.is_some());
}

/// The files Kiln's config names exist in the pod: kiln.toml from the generated ConfigMap,
/// the admin token from the Secret `kiln-admin-token`, and a writable data dir.
#[test]
fn deployment_mounts_the_config_the_token_and_a_writable_data_dir() {
    let rendered = rendered();
    let pod = rendered.pod_spec();
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let mounts = rendered.container().volume_mounts.as_deref().unwrap_or_default();
    let config_map_name = rendered.config_map().metadata.name.as_deref().unwrap();
    assert!(
        config_map_name.starts_with("kiln-config-"),
        "a generated, hashed name"
    );

    // Every file under each mount: (path in the container, source).
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    let mut writable: Vec<&str> = Vec::new();
    for mount in mounts {
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("no volume {}", mount.name));
        let at = |path: &str| format!("{}/{path}", mount.mount_path.trim_end_matches('/'));
        if volume.empty_dir.is_some() {
            assert_ne!(mount.read_only, Some(true));
            writable.push(&mount.mount_path);
        }
        let mut sources = Vec::new();
        if let Some(cm) = &volume.config_map {
            sources.push((format!("configmap {}", cm.name), cm.items.clone()));
        }
        if let Some(secret) = &volume.secret {
            let name = secret.secret_name.clone().unwrap_or_default();
            sources.push((format!("secret {name}"), secret.items.clone()));
        }
        for source in volume
            .projected
            .as_ref()
            .and_then(|p| p.sources.clone())
            .unwrap_or_default()
        {
            if let Some(cm) = source.config_map {
                sources.push((format!("configmap {}", cm.name), cm.items));
            }
            if let Some(secret) = source.secret {
                sources.push((format!("secret {}", secret.name), secret.items));
            }
        }
        for (source, items) in sources {
            for item in items.expect("volumes list their keys (items)") {
                files.insert(at(&item.path), format!("{source} key {}", item.key));
            }
        }
    }
    assert_eq!(
        files.get("/etc/kiln/kiln.toml").map(String::as_str),
        Some(format!("configmap {config_map_name} key kiln.toml").as_str())
    );
    assert_eq!(
        files.get("/etc/kiln/admin-token/token").map(String::as_str),
        Some("secret kiln-admin-token key token")
    );
    assert!(writable.contains(&"/var/lib/kiln"), "the data dir is an emptyDir");

    let config: toml::Table = rendered.kiln_toml().parse().expect("kiln.toml is TOML");
    assert_eq!(config["data_dir"].as_str(), Some("/var/lib/kiln"));
    assert_eq!(
        config["grpc"]["admin_token_file"].as_str(),
        Some("/etc/kiln/admin-token/token")
    );
    if let Some(pull_secret) = config["registry"].get("pull_secret") {
        assert!(files.contains_key(pull_secret.as_str().unwrap()));
    }
}

#[test]
fn service_and_budget_select_kilns_pods() {
    let rendered = rendered();
    let labels = rendered.pod_labels();
    let service = rendered.services[0].spec.as_ref().unwrap();
    assert_eq!(service.type_.as_deref(), Some("ClusterIP"));
    let selector = service.selector.as_ref().expect("the Service selects pods");
    assert!(!selector.is_empty());
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the Service's selector {selector:?} matches the pod labels {labels:?}"
    );
    let container_ports: BTreeMap<String, i32> = rendered
        .container()
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    let ports: BTreeMap<&str, (i32, i32, Option<&str>)> = service
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let target = match p.target_port.as_ref().expect("targetPort") {
                IntOrString::Int(port) => *port,
                IntOrString::String(name) => container_ports[name],
            };
            (
                p.name.as_deref().unwrap(),
                (p.port, target, p.app_protocol.as_deref()),
            )
        })
        .collect();
    assert_eq!(ports["grpc"], (7070, 7070, Some("grpc")));
    assert_eq!(ports["metrics"].0, 9500);
    assert_eq!(ports["metrics"].1, 9500);
    assert_eq!(ports.len(), 2);

    let budget = rendered.budgets[0].spec.as_ref().unwrap();
    assert_eq!(budget.min_available, Some(IntOrString::Int(1)));
    assert!(selector_matches(budget.selector.as_ref().unwrap(), &labels));
}

#[test]
fn network_policies_cover_kiln_and_builder_pods() {
    let rendered = rendered();
    let kiln_pods = rendered.pod_labels();
    let builder_pods = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "kiln-builder".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), "kiln".to_owned()),
    ]);
    let selecting = |labels: &BTreeMap<String, String>| -> Vec<&NetworkPolicy> {
        rendered
            .network_policies
            .iter()
            .filter(|p| {
                let selector = p.spec.as_ref().unwrap().pod_selector.as_ref();
                selector.is_some_and(|s| selector_matches(s, labels))
            })
            .collect()
    };

    let kiln = selecting(&kiln_pods);
    assert_eq!(kiln.len(), 1, "one policy for Kiln's replicas");
    let spec = kiln[0].spec.as_ref().unwrap();
    let mut ports = BTreeSet::new();
    for rule in spec.ingress.as_deref().unwrap_or_default() {
        for port in rule.ports.as_deref().unwrap_or_default() {
            match port.port {
                Some(IntOrString::Int(number)) => ports.insert(number),
                ref other => panic!("ingress port {other:?}: use port numbers"),
            };
        }
    }
    assert_eq!(ports, BTreeSet::from([7070, 9500]));
    assert!(spec.egress.as_ref().is_some_and(|e| !e.is_empty()));

    let builder = selecting(&builder_pods);
    assert_eq!(builder.len(), 1, "one policy for builder pods");
    let spec = builder[0].spec.as_ref().unwrap();
    assert!(spec
        .policy_types
        .as_ref()
        .unwrap()
        .contains(&"Ingress".to_owned()));
    assert!(
        spec.ingress.as_deref().unwrap_or_default().is_empty(),
        "no ingress"
    );
    assert!(spec.egress.as_ref().is_some_and(|e| !e.is_empty()));
}

#[test]
fn config_map_is_a_kiln_config_for_kubernetes() {
    let rendered = rendered();
    let text = rendered.kiln_toml();

    // The values the rest of deploy/ relies on, read as plain TOML.
    let table: toml::Table = text.parse().expect("kiln.toml is TOML");
    assert_eq!(table["builds"]["executor"].as_str(), Some("kubernetes"));
    assert_eq!(table["grpc"]["addr"].as_str(), Some("0.0.0.0:7070"));
    assert_eq!(table["metrics"]["addr"].as_str(), Some("0.0.0.0:9500"));
    let kubernetes = table["kubernetes"].as_table().expect("a [kubernetes] table");
    assert_eq!(kubernetes["namespace"].as_str(), Some(NAMESPACE));
    assert_eq!(kubernetes["builder_image"].as_str(), Some(IMAGE));
    assert_eq!(kubernetes["service_account"].as_str(), Some("kiln-builder"));
    assert!(rendered
        .service_accounts
        .iter()
        .any(|sa| sa.metadata.name.as_deref() == Some("kiln-builder")));

    // And as Kiln reads it: every key known, every value valid. The admin token file exists
    // only in the pod, so validation reads a stand-in.
    let mut config = kiln::config::Config::parse(text)
        .unwrap_or_else(|e| panic!("deploy/kiln-kubernetes.toml is not a valid Kiln config: {e}"));
    assert_eq!(config.data_dir, Path::new("/var/lib/kiln"));
    assert_eq!(config.grpc.addr.to_string(), "0.0.0.0:7070");
    assert_eq!(config.metrics.addr.to_string(), "0.0.0.0:9500");
    assert_eq!(
        config.grpc.admin_token_file.as_deref(),
        Some(Path::new("/etc/kiln/admin-token/token"))
    );
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef\n").unwrap();
    config.grpc.admin_token_file = Some(token);
    config
        .validate()
        .unwrap_or_else(|e| panic!("deploy/kiln-kubernetes.toml does not validate: {e}"));
    assert!(config
        .registry
        .workspace_repository()
        .unwrap()
        .to_string()
        .starts_with("registry.example.com/kiln/workspace"));
}

/// README.md's Kubernetes section shows valid `[kubernetes]` settings, and its table of the
/// builder container's security context is the one Kiln makes (every field, every value).
#[test]
fn readme_builder_security_matches_the_pod_kiln_makes() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("\n## Deploying on Kubernetes\n")
        .nth(1)
        .expect("README.md has a section \"Deploying on Kubernetes\"");
    let section = section.split("\n## ").next().unwrap();
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section shows the [kubernetes] settings in a toml block");
    let config = kiln::config::Config::parse(block)
        .unwrap_or_else(|e| panic!("README's [kubernetes] example is not a valid Kiln config: {e}"));
    config.validate().unwrap();
    assert!(config.kubernetes.privileged);

    let context = serde_json::to_value(kiln::executor::kubernetes::pod::default_security_context()).unwrap();
    let rows: BTreeMap<&str, &str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` | "))
        .map(|(field, rest)| (field, rest.split(" | ").next().unwrap()))
        .collect();
    let mut documented = BTreeSet::new();
    for (field, value) in &rows {
        for field in field.split("`/`") {
            documented.insert(field.to_owned());
            let actual = &context[field];
            let shown = match actual {
                serde_json::Value::Object(o) if o.contains_key("type") => {
                    format!("`{}`", o["type"].as_str().unwrap())
                }
                serde_json::Value::String(s) => format!("`{s}`"),
                other => format!("`{other}`"),
            };
            if field == "capabilities" {
                for cap in ["SYS_ADMIN", "NET_ADMIN"] {
                    assert!(kiln::executor::kubernetes::pod::CAPABILITIES.contains(&cap));
                    assert!(
                        value.contains(&format!("`{cap}`")),
                        "README capabilities row lacks {cap}"
                    );
                }
                assert!(!kiln::executor::kubernetes::pod::CAPABILITIES.contains(&"NET_RAW"));
                assert!(value.contains("drop `ALL`") && value.contains("but `NET_RAW`"));
            } else {
                assert_eq!(value, &shown, "README's value of {field}");
            }
        }
    }
    let set: BTreeSet<String> = context.as_object().unwrap().keys().cloned().collect();
    assert_eq!(documented, set, "README's table lists every field of the default");
}

/// Pod Security Standards as far as builder pods touch them
/// (<https://kubernetes.io/docs/concepts/security/pod-security-standards/>): what `baseline`
/// and `restricted` refuse in `pod`, with the relaxation for pods in their own user
/// namespace (runAsNonRoot and runAsUser are not checked).
fn pod_security_violations(pod: &k8s_openapi::api::core::v1::Pod) -> (Vec<String>, Vec<String>) {
    const BASELINE_CAPABILITIES: [&str; 13] = [
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ];
    let spec = pod.spec.as_ref().unwrap();
    let (mut baseline, mut restricted) = (Vec::new(), Vec::new());
    for (field, on) in [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ] {
        if on == Some(true) {
            baseline.push(field.to_owned());
        }
    }
    let own_user_namespace = spec.host_users == Some(false);
    for c in &spec.containers {
        let sc = c.security_context.clone().unwrap_or_default();
        if sc.privileged == Some(true) {
            baseline.push("privileged".into());
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        for cap in caps.add.iter().flatten() {
            if !BASELINE_CAPABILITIES.contains(&cap.trim_start_matches("CAP_")) {
                baseline.push(format!("capability {cap}"));
            }
            if cap != "NET_BIND_SERVICE" {
                restricted.push(format!("capability {cap}"));
            }
        }
        if !caps.drop.iter().flatten().any(|c| c == "ALL") {
            restricted.push("capabilities.drop ALL".into());
        }
        if sc
            .app_armor_profile
            .as_ref()
            .is_some_and(|p| !["RuntimeDefault", "Localhost"].contains(&p.type_.as_str()))
        {
            baseline.push("appArmorProfile".into());
        }
        if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
            baseline.push("procMount".into());
        }
        match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
            Some("Unconfined") => baseline.push("seccompProfile".into()),
            Some("RuntimeDefault" | "Localhost") => {}
            _ => restricted.push("seccompProfile".into()),
        }
        if sc.allow_privilege_escalation != Some(false) {
            restricted.push("allowPrivilegeEscalation".into());
        }
        if !own_user_namespace && sc.run_as_non_root != Some(true) {
            restricted.push("runAsNonRoot".into());
        }
    }
    restricted.extend(baseline.iter().cloned());
    (baseline, restricted)
}

/// The namespace enforces the strictest Pod Security level that Kiln's builder pods (as Kiln
/// makes them from `deploy/kiln-kubernetes.toml`) pass, and Kiln's replicas pass
/// `restricted`.
#[test]
fn the_namespace_enforces_the_strictest_level_builder_pods_pass() {
    use kiln::{
        executor::kubernetes::pod,
        model::{BuildId, BuildKey, ImageRef},
    };
    let rendered = rendered();
    let config = kiln::config::Config::parse(rendered.kiln_toml()).unwrap();
    let (id, key) = (BuildId::random(), BuildKey::parse(&"ab".repeat(32)).unwrap());
    let image: ImageRef = "registry.example.com/kiln/base:x".parse().unwrap();
    let build = pod::BuilderPod {
        id: &id,
        key: &key,
        base: &image,
        workspace: &image,
        timeout: std::time::Duration::from_secs(600),
        execute_args: Vec::new(),
        created_by: "test",
    };
    let builder = pod::pod(&build, &config.kubernetes).unwrap();
    let (baseline, restricted) = pod_security_violations(&builder);
    let strictest = match (baseline.is_empty(), restricted.is_empty()) {
        (_, true) => "restricted",
        (true, false) => "baseline",
        (false, false) => "privileged",
    };
    // What keeps builder pods out of `baseline`, and nothing else.
    assert_eq!(
        baseline,
        [
            "capability SYS_ADMIN",
            "capability NET_ADMIN",
            "appArmorProfile",
            "procMount"
        ],
        "builder pods fail baseline for a new reason"
    );
    let labels = rendered.namespaces[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some(strictest)
    );
    assert_eq!(
        labels.get("pod-security.kubernetes.io/audit").map(String::as_str),
        Some("restricted")
    );

    let replicas = k8s_openapi::api::core::v1::Pod {
        spec: rendered.deployment().spec.as_ref().unwrap().template.spec.clone(),
        ..Default::default()
    };
    // The replicas set runAsNonRoot at pod level; the checker reads the container's.
    let mut replicas = replicas;
    let spec = replicas.spec.as_mut().unwrap();
    let non_root = spec.security_context.as_ref().and_then(|s| s.run_as_non_root);
    let seccomp = spec
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.clone());
    for c in &mut spec.containers {
        let sc = c.security_context.get_or_insert_with(Default::default);
        sc.run_as_non_root = sc.run_as_non_root.or(non_root);
        sc.seccomp_profile = sc.seccomp_profile.clone().or(seccomp.clone());
    }
    assert_eq!(pod_security_violations(&replicas).1, Vec::<String>::new());
}
