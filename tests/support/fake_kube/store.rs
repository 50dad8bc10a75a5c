//! The fake API server's "etcd": every object as JSON keyed by (resource, namespace, name),
//! one global resourceVersion counter, and the bounded window of watch events that a watch
//! from an older resourceVersion is replayed from (or refused with 410 when it has been
//! forgotten). Also the label and field selector matching used by list and watch.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;

/// How many events are retained for replay; older ones are forgotten, as etcd compacts.
const HISTORY_LIMIT: usize = 10_000;

/// (resource, namespace, name), e.g. ("pods", "kiln", "kiln-build-…").
pub type Key = (String, String, String);

/// One change, as a watch stream reports it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub resource: String,
    pub namespace: String,
    /// ADDED, MODIFIED or DELETED.
    pub kind: &'static str,
    pub object: Value,
}

/// Why a watch cannot be served from the retained history.
#[derive(Debug)]
pub struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

#[derive(Default)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    events: VecDeque<Event>,
    /// Events with rv <= floor are forgotten: a watch must start at or after it.
    floor: u64,
    pub pods_created: u64,
}

impl Store {
    /// The current (latest) resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion a watch or list continuation may start from.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
    }

    /// Every object of `resource` in `namespace`, in name order.
    pub fn list(&self, resource: &str, namespace: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|((r, ns, _), _)| r == resource && ns == namespace)
            .map(|(_, v)| v)
            .collect()
    }

    /// Every object of `resource` in every namespace.
    pub fn list_all(&self, resource: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, v)| v)
            .collect()
    }

    /// Stores a new object (the caller checked it is absent), stamping its resourceVersion.
    pub fn insert(&mut self, resource: &str, namespace: &str, mut object: Value) -> Value {
        let rv = self.bump();
        set_rv(&mut object, rv);
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        self.objects
            .insert((resource.to_owned(), namespace.to_owned(), name), object.clone());
        self.record(rv, resource, namespace, "ADDED", &object);
        object
    }

    /// Changes an object in place; a change bumps the resourceVersion and emits MODIFIED.
    pub fn update(
        &mut self,
        resource: &str,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        let mut object = self.objects.get(&key)?.clone();
        change(&mut object);
        let rv = self.bump();
        set_rv(&mut object, rv);
        self.objects.insert(key, object.clone());
        self.record(rv, resource, namespace, "MODIFIED", &object);
        Some(object)
    }

    /// Removes an object; the DELETED event carries the deletion's resourceVersion.
    pub fn remove(&mut self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        let mut object = self.objects.remove(&key)?;
        let rv = self.bump();
        set_rv(&mut object, rv);
        self.record(rv, resource, namespace, "DELETED", &object);
        Some(object)
    }

    /// Events of `resource` in `namespace` after `since`, and the resourceVersion the
    /// caller has now seen everything up to (the latest, matching or not).
    pub fn events_since(
        &self,
        since: u64,
        resource: &str,
        namespace: &str,
    ) -> Result<(Vec<Event>, u64), Expired> {
        if since < self.floor {
            return Err(Expired {
                requested: since,
                oldest: self.floor,
            });
        }
        let events = self
            .events
            .iter()
            .filter(|e| e.rv > since && e.resource == resource && e.namespace == namespace)
            .cloned()
            .collect();
        Ok((events, self.rv.max(since)))
    }

    /// Forgets every event: any resourceVersion a client holds is now too old to watch from.
    pub fn expire(&mut self) {
        // A bump with no event, so that even a client that saw the very latest version
        // must re-list: its version is now below the floor.
        self.bump();
        self.events.clear();
        self.floor = self.rv;
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, rv: u64, resource: &str, namespace: &str, kind: &'static str, object: &Value) {
        self.events.push_back(Event {
            rv,
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            kind,
            object: object.clone(),
        });
        while self.events.len() > HISTORY_LIMIT {
            if let Some(old) = self.events.pop_front() {
                self.floor = old.rv;
            }
        }
    }
}

fn set_rv(object: &mut Value, rv: u64) {
    object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector (`a=b,c!=d,e,!f,g in (x,y),h notin (z)`); empty matches all.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(term)?);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }
}

/// Splits on commas that are not inside `(...)`, since set values are comma-separated too.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once("==") {
        return Ok(Requirement::Equals(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once('=') {
        return Ok(Requirement::Equals(k.trim().to_owned(), v.trim().to_owned()));
    }
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("unable to parse requirement: {term:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(Requirement::NotIn(k.trim().to_owned(), set(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(Requirement::In(k.trim().to_owned(), set(rest)?));
    }
    if term.contains(char::is_whitespace) || term.contains('(') {
        return Err(format!("unable to parse requirement: {term:?}"));
    }
    Ok(Requirement::Exists(term.to_owned()))
}

/// A parsed field selector (`metadata.name=x,status.phase!=Running`); empty matches all.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: '{term}'; can't understand '{term}'"));
            };
            terms.push((field.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field
                .split('.')
                .try_fold(object, |v, part| v.get(part))
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == value) == *equal
        })
    }
}
