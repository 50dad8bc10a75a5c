//! Authorization as the real API server does it for Kiln's ServiceAccount: the rules of the
//! Role in `deploy/role.yaml`, bound in the fake's namespace only. Testing against the very
//! file that is deployed is the point: a verb Kiln uses but the Role lacks fails here as it
//! would in a cluster, with the same 403 Status.

use std::path::Path;

use k8s_openapi::api::rbac::v1::{PolicyRule, Role};
use serde::Deserialize;

/// What a request asks to do, as the authorizer sees it.
#[derive(Debug, Clone)]
pub struct Attributes {
    pub verb: String,
    pub api_group: String,
    pub resource: String,
    pub subresource: Option<String>,
    /// None for cluster-scoped requests (e.g. `GET /api/v1/pods` across namespaces).
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Attributes {
    /// `pods` or `pods/log`: the name RBAC rules and the request counters use.
    pub fn full_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }
}

/// The Role's rules, granted to `user` in `namespace`.
pub struct Rbac {
    rules: Vec<PolicyRule>,
    namespace: String,
    pub user: String,
}

impl Rbac {
    /// Reads the first `kind: Role` document of `path`.
    pub fn load(path: &Path, namespace: &str, user: &str) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("reading the Role {}: {e}", path.display()))?;
        let mut role = None;
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(document)
                .map_err(|e| format!("parsing {}: {e}", path.display()))?;
            if value.get("kind").and_then(|k| k.as_str()) == Some("Role") {
                let parsed: Role = serde_yaml_ng::from_value(value)
                    .map_err(|e| format!("parsing the Role in {}: {e}", path.display()))?;
                role = Some(parsed);
                break;
            }
        }
        let role = role.ok_or_else(|| format!("{} holds no Role", path.display()))?;
        Ok(Self {
            rules: role.rules.unwrap_or_default(),
            namespace: namespace.to_owned(),
            user: user.to_owned(),
        })
    }

    /// Whether the Role grants the request. A Role only ever applies in its own namespace.
    pub fn allows(&self, attrs: &Attributes) -> bool {
        if attrs.namespace.as_deref() != Some(self.namespace.as_str()) {
            return false;
        }
        let resource = attrs.full_resource();
        self.rules.iter().any(|rule| {
            let groups = rule.api_groups.as_deref().unwrap_or_default();
            let resources = rule.resources.as_deref().unwrap_or_default();
            let names = rule.resource_names.as_deref().unwrap_or_default();
            let group_ok = groups.iter().any(|g| g == "*" || *g == attrs.api_group);
            let verb_ok = rule.verbs.iter().any(|v| v == "*" || *v == attrs.verb);
            let resource_ok = resources.iter().any(|r| {
                r == "*"
                    || *r == resource
                    || attrs
                        .subresource
                        .as_ref()
                        .is_some_and(|sub| *r == format!("*/{sub}"))
            });
            // As in RBAC: a rule limited to names never matches a request without one.
            let name_ok =
                names.is_empty() || attrs.name.as_ref().is_some_and(|n| names.iter().any(|x| x == n));
            group_ok && verb_ok && resource_ok && name_ok
        })
    }

    /// The real API server's message: `pods "x" is forbidden: User "…" cannot get resource
    /// "pods/log" in API group "" in the namespace "kiln"`.
    pub fn forbidden_message(&self, attrs: &Attributes) -> String {
        let qualified = if attrs.api_group.is_empty() {
            attrs.resource.clone()
        } else {
            format!("{}.{}", attrs.resource, attrs.api_group)
        };
        let subject = match &attrs.name {
            Some(name) => format!("{qualified} {name:?}"),
            None => qualified,
        };
        let scope = match &attrs.namespace {
            Some(ns) => format!("in the namespace {ns:?}"),
            None => "at the cluster scope".to_owned(),
        };
        format!(
            "{subject} is forbidden: User {:?} cannot {} resource {:?} in API group {:?} {scope}",
            self.user,
            attrs.verb,
            attrs.full_resource(),
            attrs.api_group
        )
    }
}
