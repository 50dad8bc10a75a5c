//! The fake API server's HTTP surface: authentication (bearer token), authorization (the
//! Role), and the REST shapes of core/v1 pods, pods/log and secrets as `kube` clients expect
//! them — objects with `kind`/`apiVersion`/`uid`/`resourceVersion`, lists with a
//! resourceVersion, newline-delimited watch events with bookmarks and 410 expiry, plain-text
//! logs, and errors as `metav1.Status` (422 with causes for invalid pods, including the rules
//! for `hostUsers: false`, `procMount` and `allowPrivilegeEscalation`).
//!
//! Also what a real API server does to clients that a test wants to see handled: lists in
//! pages (`limit`/`continue`), and on demand ([`super::FakeKube::inject`]) 429 Too Many
//! Requests with `Retry-After` or 5xx errors, each with the real Status body.
//!
//! One fallback handler parses the path itself: that keeps the authorizer in charge of every
//! request, including paths no route exists for (another namespace, the cluster scope).

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{header, HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use super::{
    admission, kubelet,
    rbac::Attributes,
    store::{Event, FieldSelector, LabelSelector},
    Shared,
};

/// An error the API server answers instead of serving a request, for the next `times`
/// requests that match (`verb`/`resource` `None` match any), with the Status bodies of
/// `k8s.io/apimachinery/pkg/api/errors`:
///
/// - 429: `NewTooManyRequests` as API Priority and Fairness rejects a request, header
///   `Retry-After` and `details.retryAfterSeconds`
///   (<https://kubernetes.io/docs/concepts/cluster-administration/flow-control/#diagnostics>);
/// - 500: `NewInternalError`; 503: `NewServiceUnavailable`; 504: `NewTimeoutError`.
#[derive(Debug, Clone)]
pub struct Fault {
    pub code: u16,
    pub times: u64,
    pub verb: Option<String>,
    pub resource: Option<String>,
    /// Seconds, for 429.
    pub retry_after: u64,
}

impl Fault {
    /// `times` 429s (Retry-After 1 s) for `verb` on `resource`.
    pub fn too_many_requests(times: u64, verb: Option<&str>, resource: Option<&str>) -> Self {
        Self {
            code: 429,
            times,
            verb: verb.map(str::to_owned),
            resource: resource.map(str::to_owned),
            retry_after: 1,
        }
    }

    /// `times` answers `code` (500, 503 or 504) for `verb` on `resource`.
    pub fn server_error(code: u16, times: u64, verb: Option<&str>, resource: Option<&str>) -> Self {
        Self {
            code,
            times,
            verb: verb.map(str::to_owned),
            resource: resource.map(str::to_owned),
            retry_after: 0,
        }
    }

    fn response(&self) -> Response {
        let (reason, message, details) = match self.code {
            429 => (
                "TooManyRequests",
                "Too many requests, please try again later.".to_owned(),
                Some(json!({"retryAfterSeconds": self.retry_after})),
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request".to_owned(),
                None,
            ),
            504 => (
                "Timeout",
                "Timeout: request did not complete within the allowed duration".to_owned(),
                Some(json!({"retryAfterSeconds": 1})),
            ),
            _ => (
                "InternalError",
                "Internal error occurred: fake kube: injected failure".to_owned(),
                Some(json!({"causes": [{"message": "fake kube: injected failure"}]})),
            ),
        };
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = status(code, reason, &message, details);
        if self.code == 429 {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_str(&self.retry_after.to_string()).expect("header"),
            );
        }
        response
    }
}

/// The injected error for this request, if one is due (and counts it as served).
fn injected(shared: &Shared, verb: &str, resource: &str) -> Option<Response> {
    let mut faults = shared.faults.lock().unwrap();
    let fault = faults.iter_mut().find(|f| {
        f.times > 0
            && f.verb.as_deref().is_none_or(|v| v == verb)
            && f.resource.as_deref().is_none_or(|r| r == resource)
    })?;
    fault.times -= 1;
    let response = fault.response();
    faults.retain(|f| f.times > 0);
    Some(response)
}

/// Watches without `timeoutSeconds` end after this, as the real server's (randomised) limit.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

type Params = HashMap<String, String>;

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<Params>,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Public, as the system:public-info-viewer ClusterRole makes them.
    match segments.as_slice() {
        ["version"] => {
            return json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                        "platform": "linux/amd64"}),
            )
        }
        ["healthz"] | ["livez"] | ["readyz"] => return (StatusCode::OK, "ok").into_response(),
        _ => {}
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token != Some(shared.options.token.as_str()) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized", None);
    }
    let Some(request) = parse_path(&segments) else {
        return discovery(&segments);
    };
    let attrs = attributes(&method, &request, &params);
    *shared
        .requests
        .lock()
        .unwrap()
        .entry((attrs.verb.clone(), attrs.full_resource()))
        .or_default() += 1;
    if let Some(response) = injected(&shared, &attrs.verb, &attrs.full_resource()) {
        return response;
    }
    if !shared.rbac.allows(&attrs) {
        shared.forbidden.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut details = json!({"kind": attrs.resource});
        if let Some(name) = &attrs.name {
            details["name"] = json!(name);
        }
        if !attrs.api_group.is_empty() {
            details["group"] = json!(attrs.api_group);
        }
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &shared.rbac.forbidden_message(&attrs),
            Some(details),
        );
    }
    let (Some(namespace), true) = (request.namespace.clone(), request.group.is_empty()) else {
        return not_found_path();
    };
    let kind = match request.resource.as_str() {
        "pods" => "Pod",
        "secrets" => "Secret",
        _ => return not_found_path(),
    };
    let resource = request.resource.as_str();
    match (
        &method,
        request.name.as_deref(),
        request.subresource.as_deref(),
        attrs.verb.as_str(),
    ) {
        (&Method::GET, None, None, "watch") => watch(shared, resource, &namespace, &params),
        (&Method::GET, None, None, _) => list(&shared, resource, kind, &namespace, &params),
        (&Method::POST, None, None, _) => create(&shared, resource, kind, &namespace, &body),
        (&Method::GET, Some(name), None, _) => get(&shared, resource, &namespace, name),
        (&Method::DELETE, Some(name), None, _) => {
            delete(&shared, resource, &namespace, name, &params, &body)
        }
        (&Method::GET, Some(name), Some("log"), _) if resource == "pods" => {
            logs(shared, &namespace, name, &params)
        }
        (_, _, Some(_), _) => not_found_path(),
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the server does not allow this method on the requested resource (fake: {method} not implemented)"),
            None,
        ),
    }
}

/// A resource request's path parts.
struct ResourceRequest {
    group: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

/// `/api/v1/...` or `/apis/<group>/<version>/...`; None for discovery paths.
fn parse_path(segments: &[&str]) -> Option<ResourceRequest> {
    let (group, rest) = match segments {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let own = |s: &&str| (*s).to_owned();
    let (namespace, rest): (Option<String>, &[&str]) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        // The Namespace objects themselves are cluster-scoped.
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (own(resource), None, None),
        [resource, name] => (own(resource), Some(own(name)), None),
        [resource, name, sub] => (own(resource), Some(own(name)), Some(own(sub))),
        _ => return None,
    };
    Some(ResourceRequest {
        group: group.to_owned(),
        namespace,
        resource,
        name,
        subresource,
    })
}

/// The verb the authorizer sees, as the real request-info resolver derives it.
fn attributes(method: &Method, request: &ResourceRequest, params: &Params) -> Attributes {
    let watch = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (method.as_str(), request.name.is_some()) {
        ("GET" | "HEAD", false) if watch => "watch",
        ("GET" | "HEAD", false) => "list",
        ("GET" | "HEAD", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (other, _) => return attrs_with(other.to_lowercase(), request),
    };
    attrs_with(verb.to_owned(), request)
}

fn attrs_with(verb: String, request: &ResourceRequest) -> Attributes {
    Attributes {
        verb,
        api_group: request.group.clone(),
        resource: request.resource.clone(),
        subresource: request.subresource.clone(),
        namespace: request.namespace.clone(),
        name: request.name.clone(),
    }
}

/// Minimal discovery documents (authenticated users may read them).
fn discovery(segments: &[&str]) -> Response {
    match segments {
        ["api"] => json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ),
        ["apis"] => json_response(
            StatusCode::OK,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        ["api", "v1"] => json_response(
            StatusCode::OK,
            &json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
                 "verbs": ["create", "delete", "get", "list", "watch"]},
                {"name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"]},
                {"name": "secrets", "singularName": "secret", "namespaced": true, "kind": "Secret",
                 "verbs": ["create", "delete", "get", "list", "watch"]},
            ]}),
        ),
        _ => not_found_path(),
    }
}

fn list(shared: &Shared, resource: &str, kind: &str, namespace: &str, params: &Params) -> Response {
    let (labels, fields) = match selectors(params) {
        Ok(s) => s,
        Err(e) => return bad_request(&e),
    };
    let limit: Option<usize> = match params.get("limit").map(|l| l.parse::<i64>()) {
        None => None,
        Some(Ok(l)) if l > 0 => Some(l as usize),
        Some(Ok(_)) => None,
        Some(Err(_)) => return bad_request("limit must be an integer"),
    };
    let store = shared.store.lock().unwrap();
    // `continue` names the last key served and the resourceVersion of the first page
    // (base64 JSON, as `storage.EncodeContinue`); a token from before the compacted history
    // is 410 Expired (<https://kubernetes.io/docs/reference/using-api/api-concepts/#retrieving-large-results-sets-in-chunks>).
    // The fake serves later pages from the current objects, not the first page's snapshot.
    let (after, list_rv) = match params.get("continue").filter(|c| !c.is_empty()) {
        None => (None, store.rv()),
        Some(token) => match decode_continue(token) {
            None => return bad_request(&format!("continue key is not valid: {token}")),
            Some((rv, _)) if rv < store.floor() => {
                drop(store);
                shared
                    .expired_served
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return status(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    None,
                );
            }
            Some((rv, start)) => (Some(start), rv),
        },
    };
    let matching: Vec<&Value> = store
        .list(resource, namespace)
        .into_iter()
        .filter(|o| {
            after
                .as_deref()
                .is_none_or(|a| o["metadata"]["name"].as_str().unwrap_or("") > a)
        })
        .filter(|o| labels.matches(o) && fields.matches(o))
        .collect();
    let total = matching.len();
    let page = limit.unwrap_or(total).min(total);
    let next = (page < total).then(|| {
        let last = matching[page - 1]["metadata"]["name"].as_str().unwrap_or("");
        encode_continue(list_rv, last)
    });
    let items: Vec<Value> = matching[..page]
        .iter()
        .map(|o| {
            // List items carry no kind/apiVersion on the wire; the list does.
            let mut o = (*o).clone();
            if let Some(map) = o.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            o
        })
        .collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(token) = next {
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(total - page);
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{kind}List"),
            "apiVersion": "v1",
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn encode_continue(rv: u64, last: &str) -> String {
    use base64::Engine as _;
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last}\u{0}")});
    base64::engine::general_purpose::URL_SAFE.encode(token.to_string())
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE.decode(token).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    if value["v"] != "meta.k8s.io/v1" {
        return None;
    }
    let start = value["start"].as_str()?.trim_end_matches('\u{0}').to_owned();
    Some((value["rv"].as_u64()?, start))
}

fn selectors(params: &Params) -> Result<(LabelSelector, FieldSelector), String> {
    let labels = LabelSelector::parse(params.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(params.get("fieldSelector").map_or("", String::as_str))?;
    Ok((labels, fields))
}

fn watch(shared: Arc<Shared>, resource: &str, namespace: &str, params: &Params) -> Response {
    let (labels, fields) = match selectors(params) {
        Ok(s) => s,
        Err(e) => return bad_request(&e),
    };
    let bookmarks = params.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let initial_events = params.get("sendInitialEvents").is_some_and(|b| b == "true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let requested = params.get("resourceVersion").map(String::as_str).unwrap_or("");
    let from: Option<u64> = match requested {
        // "" and "0": start with the current state as ADDED events, as the real server does.
        "" | "0" => None,
        rv => match rv.parse() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resource version: {rv:?}"),
                    None,
                )
            }
        },
    };
    let (resource, namespace) = (resource.to_owned(), namespace.to_owned());
    let stream = async_stream::stream! {
        let _open = super::Gauge::hold(&shared.open_watches);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = shared.changes.subscribe();
        let mut drops = shared.watch_drops.subscribe();
        let mut shutdown = shared.shutdown.subscribe();
        changes.mark_changed();
        let matches = |o: &Value| labels.matches(o) && fields.matches(o);
        let mut cursor = match from {
            Some(rv) => rv,
            None => {
                let (initial, rv) = {
                    let store = shared.store.lock().unwrap();
                    let objects: Vec<Value> = store
                        .list(&resource, &namespace)
                        .into_iter()
                        .filter(|o| matches(o))
                        .cloned()
                        .collect();
                    (objects, store.rv())
                };
                for object in initial {
                    yield Ok::<_, Infallible>(line(&json!({"type": "ADDED", "object": object})));
                }
                if initial_events {
                    yield Ok(line(&bookmark(&resource, rv, true)));
                }
                rv
            }
        };
        loop {
            changes.borrow_and_update();
            let batch = shared.store.lock().unwrap().events_since(cursor, &resource, &namespace);
            match batch {
                Err(expired) => {
                    shared.expired_served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let message = format!(
                        "too old resource version: {} ({})",
                        expired.requested, expired.oldest
                    );
                    yield Ok(line(&json!({"type": "ERROR", "object": status_value(410, "Expired", &message, None)})));
                    break;
                }
                Ok((events, latest)) => {
                    for Event { kind, object, .. } in events.into_iter().filter(|e| matches(&e.object)) {
                        yield Ok(line(&json!({"type": kind, "object": object})));
                    }
                    cursor = latest;
                }
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = drops.changed() => break,
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::time::sleep(shared.options.bookmark_interval), if bookmarks => {
                    // Only after every event up to `cursor` went out: the client may resume
                    // from a bookmark's version without missing anything.
                    yield Ok(line(&bookmark(&resource, cursor, false)));
                }
            }
        }
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("watch response")
}

fn bookmark(resource: &str, rv: u64, initial_events_end: bool) -> Value {
    let kind = if resource == "pods" { "Pod" } else { "Secret" };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1", "metadata": metadata}})
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).expect("json");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn get(shared: &Shared, resource: &str, namespace: &str, name: &str) -> Response {
    let store = shared.store.lock().unwrap();
    match store.get(resource, namespace, name) {
        Some(object) => json_response(StatusCode::OK, object),
        None => not_found(resource, name),
    }
}

fn create(shared: &Arc<Shared>, resource: &str, kind: &str, namespace: &str, body: &[u8]) -> Response {
    let mut object: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return bad_request("the body of the request was not a JSON object"),
        Err(e) => return bad_request(&format!("the body of the request was in an unknown format: {e}")),
    };
    if let Some(k) = object.get("kind").and_then(Value::as_str) {
        if k != kind {
            return bad_request(&format!(
                "the kind {k:?} does not match the resource {resource:?}"
            ));
        }
    }
    if object["metadata"].is_null() {
        object["metadata"] = json!({});
    }
    match object["metadata"]["namespace"].as_str() {
        Some(ns) if ns != namespace => {
            return bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        }
        _ => {}
    }
    if object["metadata"]["name"].as_str().unwrap_or("").is_empty() {
        if let Some(prefix) = object["metadata"]["generateName"].as_str() {
            let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_owned();
            object["metadata"]["name"] = json!(format!("{prefix}{suffix}"));
        }
    }
    let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
    if resource == "pods" && !shared.options.user_namespaces {
        drop_user_namespace_fields(&mut object);
    }
    // Mutating admission runs before validation.
    if resource == "pods" {
        if let Err(message) = admission::service_account(&shared.options.service_accounts, namespace, &object)
        {
            return forbidden_by_admission(&name, &message);
        }
    }
    let mut causes = Vec::new();
    validate_meta(&object, &name, &mut causes);
    match resource {
        "pods" => validate_pod(&object, &mut causes),
        _ => validate_secret(&object, &mut causes),
    }
    if !causes.is_empty() {
        return invalid(kind, &name, causes);
    }
    let metadata = &mut object["metadata"];
    metadata["namespace"] = json!(namespace);
    metadata["uid"] = json!(uuid::Uuid::new_v4().to_string());
    metadata["creationTimestamp"] = json!(now_seconds());
    metadata
        .as_object_mut()
        .expect("metadata")
        .remove("resourceVersion");
    object["kind"] = json!(kind);
    object["apiVersion"] = json!("v1");
    match resource {
        "pods" => kubelet::default_pod(&mut object),
        _ => normalize_secret(&mut object),
    }
    if resource == "pods" {
        if let Err(message) = admission::pod_security(&shared.options.namespace_labels, &object) {
            return forbidden_by_admission(&name, &message);
        }
    }
    let created = shared.mutate(|store| {
        if store.get(resource, namespace, &name).is_some() {
            return None;
        }
        if resource == "pods" {
            store.pods_created += 1;
        }
        Some(store.insert(resource, namespace, object))
    });
    let Some(created) = created else {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{resource} {name:?} already exists"),
            Some(json!({"name": name, "kind": resource})),
        );
    };
    if resource == "pods" {
        kubelet::start(shared.clone(), &created);
    }
    json_response(StatusCode::CREATED, &created)
}

fn validate_meta(object: &Value, name: &str, causes: &mut Vec<Value>) {
    if name.is_empty() {
        causes.push(cause(
            "FieldValueRequired",
            "metadata.name",
            "Required value: name or generateName is required",
        ));
    } else if !is_dns_subdomain(name) {
        causes.push(cause(
            "FieldValueInvalid",
            "metadata.name",
            &format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        ));
    }
    if let Some(labels) = object["metadata"]["labels"].as_object() {
        for (key, value) in labels {
            let value = value.as_str().unwrap_or("");
            if !is_qualified_name(key) {
                causes.push(cause("FieldValueInvalid", "metadata.labels", &format!("Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.'")));
            }
            if !is_label_value(value) {
                causes.push(cause("FieldValueInvalid", "metadata.labels", &format!("Invalid value: {value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character, at most 63 characters")));
            }
        }
    }
    if let Some(annotations) = object["metadata"]["annotations"].as_object() {
        let size: usize = annotations
            .iter()
            .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
            .sum();
        if size > 256 * 1024 {
            causes.push(cause(
                "FieldValueTooLong",
                "metadata.annotations",
                "Too long: must have at most 262144 bytes",
            ));
        }
        for key in annotations.keys() {
            if !is_qualified_name(key) {
                causes.push(cause("FieldValueInvalid", "metadata.annotations", &format!("Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.'")));
            }
        }
    }
    if let Some(owners) = object["metadata"]["ownerReferences"].as_array() {
        for (i, owner) in owners.iter().enumerate() {
            for field in ["apiVersion", "kind", "name", "uid"] {
                if owner[field].as_str().unwrap_or("").is_empty() {
                    causes.push(cause(
                        "FieldValueRequired",
                        &format!("metadata.ownerReferences[{i}].{field}"),
                        "Required value",
                    ));
                }
            }
        }
        if owners.iter().filter(|o| o["controller"] == json!(true)).count() > 1 {
            causes.push(cause(
                "FieldValueInvalid",
                "metadata.ownerReferences",
                "Invalid value: only one reference can have Controller set to true",
            ));
        }
    }
}

fn validate_pod(object: &Value, causes: &mut Vec<Value>) {
    let containers = object["spec"]["containers"].as_array();
    if containers.is_none_or(|c| c.is_empty()) {
        causes.push(cause("FieldValueRequired", "spec.containers", "Required value"));
    }
    for (i, c) in containers.into_iter().flatten().enumerate() {
        if c["name"].as_str().unwrap_or("").is_empty() {
            causes.push(cause(
                "FieldValueRequired",
                &format!("spec.containers[{i}].name"),
                "Required value",
            ));
        }
        if c["image"].as_str().unwrap_or("").is_empty() {
            causes.push(cause(
                "FieldValueRequired",
                &format!("spec.containers[{i}].image"),
                "Required value",
            ));
        }
        let volumes: Vec<&str> = object["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .collect();
        for (j, m) in c["volumeMounts"].as_array().into_iter().flatten().enumerate() {
            let name = m["name"].as_str().unwrap_or("");
            if !volumes.contains(&name) {
                causes.push(cause(
                    "FieldValueNotFound",
                    &format!("spec.containers[{i}].volumeMounts[{j}].name"),
                    &format!("Not found: {name:?}"),
                ));
            }
            if !m["mountPath"].as_str().unwrap_or("").starts_with('/') {
                causes.push(cause(
                    "FieldValueInvalid",
                    &format!("spec.containers[{i}].volumeMounts[{j}].mountPath"),
                    "Invalid value: must be an absolute path",
                ));
            }
        }
    }
    validate_security(object, causes);
    let policy = object["spec"]["restartPolicy"].as_str().unwrap_or("Always");
    if !["Always", "OnFailure", "Never"].contains(&policy) {
        causes.push(cause(
            "FieldValueNotSupported",
            "spec.restartPolicy",
            &format!("Unsupported value: {policy:?}"),
        ));
    }
}

/// The API server's rules for the security fields Kiln sets (`ValidatePodSpec` and
/// `ValidateSecurityContext` in `pkg/apis/core/validation`): a pod in its own user namespace
/// shares no host namespace and only such a pod may have an unmasked `/proc`
/// (<https://kubernetes.io/docs/concepts/workloads/pods/user-namespaces/#limitations>);
/// `allowPrivilegeEscalation: false` goes neither with `privileged` nor with an added
/// `CAP_SYS_ADMIN` (spelled so: the check compares the string); profile types are known.
/// `privileged: true` with `hostUsers: false` is accepted, as by the real server (BuildKit's
/// `examples/kubernetes/*.userns.yaml` run so).
fn validate_security(object: &Value, causes: &mut Vec<Value>) {
    let spec = &object["spec"];
    let own_user_namespace = spec["hostUsers"] == json!(false);
    if own_user_namespace {
        for field in ["hostNetwork", "hostPID", "hostIPC"] {
            if spec[field] == json!(true) {
                causes.push(cause(
                    "FieldValueForbidden",
                    &format!("spec.{field}"),
                    "Forbidden: when `hostUsers` is false",
                ));
            }
        }
    }
    let profile = |value: &Value, path: &str, causes: &mut Vec<Value>| {
        if value.is_null() {
            return;
        }
        match value["type"].as_str().unwrap_or("") {
            "RuntimeDefault" | "Unconfined" => {}
            "Localhost" if value["localhostProfile"].as_str().is_some_and(|p| !p.is_empty()) => {}
            "Localhost" => causes.push(cause(
                "FieldValueRequired",
                &format!("{path}.localhostProfile"),
                "Required value: must be set when seccomp type is Localhost",
            )),
            other => causes.push(cause(
                "FieldValueNotSupported",
                &format!("{path}.type"),
                &format!("Unsupported value: {other:?}: supported values: \"Localhost\", \"RuntimeDefault\", \"Unconfined\""),
            )),
        }
    };
    profile(
        &spec["securityContext"]["seccompProfile"],
        "spec.securityContext.seccompProfile",
        causes,
    );
    profile(
        &spec["securityContext"]["appArmorProfile"],
        "spec.securityContext.appArmorProfile",
        causes,
    );
    for (i, c) in spec["containers"].as_array().into_iter().flatten().enumerate() {
        let sc = &c["securityContext"];
        let path = format!("spec.containers[{i}].securityContext");
        profile(&sc["seccompProfile"], &format!("{path}.seccompProfile"), causes);
        profile(&sc["appArmorProfile"], &format!("{path}.appArmorProfile"), causes);
        match sc["procMount"].as_str() {
            None | Some("Default") => {}
            Some("Unmasked") if own_user_namespace => {}
            Some("Unmasked") => causes.push(cause(
                "FieldValueInvalid",
                &format!("{path}.procMount"),
                "Invalid value: \"Unmasked\": `hostUsers` must be false to use `Unmasked`",
            )),
            Some(other) => causes.push(cause(
                "FieldValueNotSupported",
                &format!("{path}.procMount"),
                &format!("Unsupported value: {other:?}: supported values: \"Default\", \"Unmasked\""),
            )),
        }
        if sc["allowPrivilegeEscalation"] == json!(false) {
            if sc["privileged"] == json!(true) {
                causes.push(cause(
                    "FieldValueInvalid",
                    &path,
                    "Invalid value: cannot set `allowPrivilegeEscalation` to false and `privileged` to true",
                ));
            }
            let adds = sc["capabilities"]["add"].as_array().into_iter().flatten();
            if adds.filter_map(Value::as_str).any(|c| c == "CAP_SYS_ADMIN") {
                causes.push(cause(
                    "FieldValueInvalid",
                    &path,
                    "Invalid value: cannot set `allowPrivilegeEscalation` to false and `capabilities.Add` CAP_SYS_ADMIN",
                ));
            }
        }
    }
}

/// What an API server with the `UserNamespacesSupport` and `ProcMountType` feature gates
/// off does to a new pod before validating it (`dropDisabledFields` in `pkg/api/pod`):
/// `hostUsers` is dropped and a `procMount` forced to `Default`, silently.
fn drop_user_namespace_fields(object: &mut Value) {
    if let Some(spec) = object["spec"].as_object_mut() {
        spec.remove("hostUsers");
    }
    for c in object["spec"]["containers"].as_array_mut().into_iter().flatten() {
        if c["securityContext"]["procMount"].is_string() {
            c["securityContext"]["procMount"] = json!("Default");
        }
    }
}

fn validate_secret(object: &Value, causes: &mut Vec<Value>) {
    for field in ["data", "stringData"] {
        for key in object[field].as_object().into_iter().flatten().map(|(k, _)| k) {
            let ok = !key.is_empty()
                && key.len() <= 253
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
            if !ok {
                causes.push(cause("FieldValueInvalid", &format!("{field}[{key}]"), "Invalid value: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
            }
        }
    }
}

/// The API server folds `stringData` into `data` (base64) and defaults the type.
fn normalize_secret(object: &mut Value) {
    use base64::Engine as _;
    if let Some(Value::Object(strings)) = object.as_object_mut().and_then(|o| o.remove("stringData")) {
        if !object["data"].is_object() {
            object["data"] = json!({});
        }
        for (k, v) in strings {
            let encoded = base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""));
            object["data"][k] = json!(encoded);
        }
    }
    if object["type"].as_str().unwrap_or("").is_empty() {
        object["type"] = json!("Opaque");
    }
}

fn delete(
    shared: &Arc<Shared>,
    resource: &str,
    namespace: &str,
    name: &str,
    params: &Params,
    body: &[u8],
) -> Response {
    let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let existing = shared
        .store
        .lock()
        .unwrap()
        .get(resource, namespace, name)
        .cloned();
    let Some(existing) = existing else {
        return not_found(resource, name);
    };
    let uid = existing["metadata"]["uid"].as_str().unwrap_or("").to_owned();
    if let Some(want) = options["preconditions"]["uid"].as_str() {
        if want != uid {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!("Operation cannot be fulfilled on {resource} {name:?}: Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"),
                Some(json!({"name": name, "kind": resource})),
            );
        }
    }
    if let Some(want) = options["preconditions"]["resourceVersion"].as_str() {
        let have = existing["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if want != have {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!("Operation cannot be fulfilled on {resource} {name:?}: Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {have}"),
                Some(json!({"name": name, "kind": resource})),
            );
        }
    }
    if resource == "pods" {
        let grace = params
            .get("gracePeriodSeconds")
            .and_then(|g| g.parse::<i64>().ok())
            .or_else(|| options["gracePeriodSeconds"].as_i64());
        match kubelet::delete(shared, namespace, name, grace) {
            Some(pod) => json_response(StatusCode::OK, &pod),
            None => not_found(resource, name),
        }
    } else {
        match shared.mutate(|store| store.remove(resource, namespace, name)) {
            Some(_) => json_response(
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": {"name": name, "kind": resource, "uid": uid}}),
            ),
            None => not_found(resource, name),
        }
    }
}

fn logs(shared: Arc<Shared>, namespace: &str, name: &str, params: &Params) -> Response {
    let pod = shared.store.lock().unwrap().get("pods", namespace, name).cloned();
    let Some(pod) = pod else {
        return not_found("pods", name);
    };
    let containers: Vec<String> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    let container = match params.get("container") {
        Some(c) if !containers.contains(c) => {
            return bad_request(&format!("container {c} is not valid for pod {name}"))
        }
        Some(c) => c.clone(),
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return bad_request(&format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            ))
        }
    };
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("");
    let runtime = shared.runtimes.lock().unwrap().get(uid).cloned();
    let previous = params.get("previous").is_some_and(|p| p == "true");
    if previous && !runtime.as_ref().is_some_and(|r| r.has_previous()) {
        return bad_request(&format!(
            "previous terminated container {container:?} in pod {name:?} not found"
        ));
    }
    let Some(runtime) = runtime.filter(|r| r.has_started()) else {
        let reason = pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            .as_str()
            .unwrap_or("ContainerCreating");
        return bad_request(&format!(
            "container {container:?} in pod {name:?} is waiting to start: {reason}"
        ));
    };
    let since = match params.get("sinceTime").map(|t| t.parse::<Timestamp>()) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return bad_request(&format!("invalid sinceTime: {e}")),
    };
    let since_seconds = params.get("sinceSeconds").and_then(|s| s.parse::<i64>().ok());
    let since = since.or_else(|| {
        since_seconds.and_then(|s| {
            Timestamp::now()
                .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(s))
                .ok()
        })
    });
    let options = kubelet::LogOptions {
        follow: params.get("follow").is_some_and(|f| f == "true"),
        timestamps: params.get("timestamps").is_some_and(|f| f == "true"),
        since,
        tail_lines: params.get("tailLines").and_then(|t| t.parse().ok()),
        limit_bytes: params.get("limitBytes").and_then(|t| t.parse().ok()),
        previous,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(kubelet::log_stream(shared, runtime, options)))
        .expect("log response")
}

fn is_dns_label_like(part: &str) -> bool {
    !part.is_empty()
        && part
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !part.starts_with('-')
        && !part.ends_with('-')
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label_like)
}

/// `prefix/name` or `name`, where name ≤ 63 chars of `[A-Za-z0-9_.-]`, alphanumeric at
/// both ends, and prefix a DNS subdomain.
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Now as metav1.Time serializes it (RFC 3339, whole seconds).
pub(crate) fn now_seconds() -> String {
    k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", Timestamp::now()).expect("formatting time")
}

fn cause(reason: &str, field: &str, message: &str) -> Value {
    json!({"reason": reason, "field": field, "message": message})
}

fn invalid(kind: &str, name: &str, causes: Vec<Value>) -> Response {
    let message = causes
        .iter()
        .map(|c| {
            format!(
                "{}: {}",
                c["field"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &format!("{kind} {name:?} is invalid: [{message}]"),
        Some(json!({"name": name, "kind": kind, "causes": causes})),
    )
}

/// An admission plugin's refusal (`admission.NewForbidden`): `pods "NAME" is forbidden: WHY`.
fn forbidden_by_admission(name: &str, why: &str) -> Response {
    status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!("pods {name:?} is forbidden: {why}"),
        Some(json!({"name": name, "kind": "pods"})),
    )
}

fn not_found(resource: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} {name:?} not found"),
        Some(json!({"name": name, "kind": resource})),
    )
}

fn not_found_path() -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        None,
    )
}

fn bad_request(message: &str) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

pub(crate) fn status_value(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut value = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        value["details"] = details;
    }
    value
}

fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Response {
    json_response(code, &status_value(code.as_u16(), reason, message, details))
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(value).expect("json")))
        .expect("response")
}
