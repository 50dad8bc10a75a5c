//! The admission plugins a pod passes on create, after authorization and before it is stored:
//!
//! - **ServiceAccount** (mutating; `plugin/pkg/admission/serviceaccount/admission.go`): a pod
//!   whose `serviceAccountName` does not exist in its namespace is refused, 403, "error
//!   looking up service account NS/NAME: serviceaccount \"NAME\" not found"
//!   (<https://kubernetes.io/docs/reference/access-authn-authz/admission-controllers/#serviceaccount>).
//! - **PodSecurity** (validating; `k8s.io/pod-security-admission`): when the namespace has
//!   the label `pod-security.kubernetes.io/enforce`, a pod that violates that level is
//!   refused, 403, "violates PodSecurity \"LEVEL:VERSION\": REASON (DETAIL), ..."
//!   (<https://kubernetes.io/docs/concepts/security/pod-security-admission/>), checking the
//!   controls of <https://kubernetes.io/docs/concepts/security/pod-security-standards/> that
//!   concern the fields a pod like Kiln's can set. As deploy/README.md states, pods with
//!   `hostUsers: false` are not checked for `runAsNonRoot` and `runAsUser`.

use std::collections::BTreeMap;

use serde_json::Value;

/// `Err(message)` when the ServiceAccount admission plugin refuses the pod.
pub fn service_account(service_accounts: &[String], namespace: &str, pod: &Value) -> Result<(), String> {
    let name = pod["spec"]["serviceAccountName"].as_str().unwrap_or("default");
    if service_accounts.iter().any(|s| s == name) {
        return Ok(());
    }
    Err(format!(
        "error looking up service account {namespace}/{name}: serviceaccount \"{name}\" not found"
    ))
}

/// The capabilities `baseline` allows to add.
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

/// `Err(message)` when PodSecurity admission refuses the pod for the namespace's labels.
pub fn pod_security(labels: &BTreeMap<String, String>, pod: &Value) -> Result<(), String> {
    let Some(level) = labels.get("pod-security.kubernetes.io/enforce") else {
        return Ok(());
    };
    let version = labels
        .get("pod-security.kubernetes.io/enforce-version")
        .map_or("latest", String::as_str);
    let violations = match level.as_str() {
        "privileged" => return Ok(()),
        "baseline" => baseline(pod),
        "restricted" => {
            let mut all = baseline(pod);
            all.extend(restricted(pod));
            all
        }
        // The API server refuses such a label on the namespace; nothing to check against.
        _ => return Ok(()),
    };
    if violations.is_empty() {
        return Ok(());
    }
    let text: Vec<String> = violations
        .iter()
        .map(|(reason, detail)| format!("{reason} ({detail})"))
        .collect();
    Err(format!(
        "violates PodSecurity \"{level}:{version}\": {}",
        text.join(", ")
    ))
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(|f| pod["spec"][f].as_array().into_iter().flatten())
}

/// One violation per control: (reason, detail), details joined as the library does.
fn control(
    out: &mut Vec<(String, String)>,
    reason: &str,
    offenders: Vec<String>,
    detail: impl Fn(&str) -> String,
) {
    if offenders.is_empty() {
        return;
    }
    let (noun, names) = if offenders.len() == 1 {
        ("container", format!("{:?}", offenders[0]))
    } else {
        let quoted: Vec<String> = offenders.iter().map(|o| format!("{o:?}")).collect();
        ("containers", quoted.join(", "))
    };
    out.push((reason.to_owned(), detail(&format!("{noun} {names}"))));
}

fn names_where(pod: &Value, pred: impl Fn(&Value) -> bool) -> Vec<String> {
    containers(pod)
        .filter(|c| pred(&c["securityContext"]))
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

fn baseline(pod: &Value) -> Vec<(String, String)> {
    let spec = &pod["spec"];
    let mut out = Vec::new();
    let host: Vec<String> = ["hostNetwork", "hostPID", "hostIPC"]
        .into_iter()
        .filter(|f| spec[*f] == Value::Bool(true))
        .map(|f| format!("{f}=true"))
        .collect();
    if !host.is_empty() {
        out.push(("host namespaces".to_owned(), host.join(", ")));
    }
    control(
        &mut out,
        "privileged",
        names_where(pod, |sc| sc["privileged"] == Value::Bool(true)),
        |who| format!("{who} must not set securityContext.privileged=true"),
    );
    let mut added = Vec::new();
    for c in containers(pod) {
        let caps: Vec<String> = c["securityContext"]["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|cap| !BASELINE_CAPABILITIES.contains(cap))
            .map(|cap| format!("{cap:?}"))
            .collect();
        if !caps.is_empty() {
            added.push(format!(
                "container {:?} must not include {} in securityContext.capabilities.add",
                c["name"].as_str().unwrap_or(""),
                caps.join(", ")
            ));
        }
    }
    if !added.is_empty() {
        out.push(("non-default capabilities".to_owned(), added.join("; ")));
    }
    let host_paths: Vec<String> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["hostPath"].is_object())
        .filter_map(|v| v["name"].as_str().map(|n| format!("{n:?}")))
        .collect();
    if !host_paths.is_empty() {
        let noun = if host_paths.len() == 1 {
            "volume"
        } else {
            "volumes"
        };
        out.push((
            "hostPath volumes".to_owned(),
            format!("{noun} {}", host_paths.join(", ")),
        ));
    }
    control(
        &mut out,
        "forbidden AppArmor profile",
        names_where(pod, |sc| {
            sc["appArmorProfile"]["type"]
                .as_str()
                .is_some_and(|t| t == "Unconfined")
        }),
        |who| format!("{who} must not set securityContext.appArmorProfile.type to \"Unconfined\""),
    );
    control(
        &mut out,
        "procMount",
        names_where(pod, |sc| sc["procMount"].as_str().is_some_and(|m| m != "Default")),
        |who| format!("{who} must not set securityContext.procMount to \"Unmasked\""),
    );
    let pod_unconfined = spec["securityContext"]["seccompProfile"]["type"] == "Unconfined";
    if pod_unconfined {
        out.push((
            "seccompProfile".to_owned(),
            "pod must not set securityContext.seccompProfile.type to \"Unconfined\"".to_owned(),
        ));
    }
    control(
        &mut out,
        "seccompProfile",
        names_where(pod, |sc| sc["seccompProfile"]["type"] == "Unconfined"),
        |who| format!("{who} must not set securityContext.seccompProfile.type to \"Unconfined\""),
    );
    out
}

fn restricted(pod: &Value) -> Vec<(String, String)> {
    let spec = &pod["spec"];
    let own_user_namespace = spec["hostUsers"] == Value::Bool(false);
    let mut out = Vec::new();
    control(
        &mut out,
        "allowPrivilegeEscalation != false",
        names_where(pod, |sc| sc["allowPrivilegeEscalation"] != Value::Bool(false)),
        |who| format!("{who} must set securityContext.allowPrivilegeEscalation=false"),
    );
    let mut caps = Vec::new();
    let no_drop_all = names_where(pod, |sc| {
        !sc["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c == "ALL")
    });
    if !no_drop_all.is_empty() {
        let mut v = Vec::new();
        control(&mut v, "", no_drop_all, |who| {
            format!("{who} must set securityContext.capabilities.drop=[\"ALL\"]")
        });
        caps.push(v.remove(0).1);
    }
    for c in containers(pod) {
        let adds: Vec<String> = c["securityContext"]["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|cap| *cap != "NET_BIND_SERVICE")
            .map(|cap| format!("{cap:?}"))
            .collect();
        if !adds.is_empty() {
            caps.push(format!(
                "container {:?} must not include {} in securityContext.capabilities.add",
                c["name"].as_str().unwrap_or(""),
                adds.join(", ")
            ));
        }
    }
    if !caps.is_empty() {
        out.push(("unrestricted capabilities".to_owned(), caps.join("; ")));
    }
    if !own_user_namespace {
        let pod_non_root = spec["securityContext"]["runAsNonRoot"] == Value::Bool(true);
        control(
            &mut out,
            "runAsNonRoot != true",
            names_where(pod, |sc| match sc["runAsNonRoot"].as_bool() {
                Some(v) => !v,
                None => !pod_non_root,
            }),
            |who| format!("pod or {who} must set securityContext.runAsNonRoot=true"),
        );
        control(
            &mut out,
            "runAsUser=0",
            names_where(pod, |sc| sc["runAsUser"] == 0),
            |who| format!("{who} must not set runAsUser=0"),
        );
    }
    let pod_profile = spec["securityContext"]["seccompProfile"]["type"]
        .as_str()
        .is_some_and(|t| t == "RuntimeDefault" || t == "Localhost");
    control(
        &mut out,
        "seccompProfile",
        names_where(pod, |sc| match sc["seccompProfile"]["type"].as_str() {
            Some(t) => t != "RuntimeDefault" && t != "Localhost",
            None => !pod_profile,
        }),
        |who| {
            format!("pod or {who} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\"")
        },
    );
    let allowed = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    let restricted_volumes: Vec<String> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| {
            v.as_object()
                .is_some_and(|o| o.keys().any(|k| k != "name" && !allowed.contains(&k.as_str())))
        })
        .filter_map(|v| v["name"].as_str().map(|n| format!("{n:?}")))
        .collect();
    if !restricted_volumes.is_empty() {
        out.push((
            "restricted volume types".to_owned(),
            format!("volumes {}", restricted_volumes.join(", ")),
        ));
    }
    out
}
