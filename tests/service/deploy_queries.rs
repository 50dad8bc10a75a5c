//! `deploy/grafana/kiln-dashboard.json` and `deploy/prometheus/kiln-alerts.yaml` query only
//! metrics Kiln exports: every PromQL expression in them is tokenized, its metric names
//! taken, and each checked against the `/metrics` of a running `kiln serve`.

use std::{collections::BTreeSet, path::PathBuf};

use kiln::proto::builder::ListBuildsRequest;

use crate::support::kiln::{KilnOptions, KilnServer};

/// PromQL words that are not metric names when they are not followed by `(`: aggregation
/// operators (`sum by (x) (…)`), clause keywords, binary operators, literals.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "Inf",
    "NaN",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names `expr` reads, with `_bucket`, `_sum` and `_count` taken off.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_past = |from: usize, close: char| {
        let mut j = from + 1;
        while j < chars.len() && chars[j] != close {
            if chars[j] == '"' || chars[j] == '\'' || chars[j] == '`' {
                let quote = chars[j];
                j += 1;
                while j < chars.len() && chars[j] != quote {
                    j += if chars[j] == '\\' { 2 } else { 1 };
                }
            }
            j += 1;
        }
        j + 1
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            // Label matchers and range or subquery durations.
            '{' => i = skip_past(i, '}'),
            '[' => i = skip_past(i, ']'),
            '"' | '\'' | '`' => {
                let mut j = i + 1;
                while j < chars.len() && chars[j] != c {
                    j += if chars[j] == '\\' { 2 } else { 1 };
                }
                i = j + 1;
            }
            // Grafana's variables (`$__rate_interval`).
            '$' => {
                i += 1;
                while i < chars.len() && is_part(chars[i]) {
                    i += 1;
                }
            }
            // Numbers, durations, exponents: a word starting with a digit or a dot.
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (is_part(chars[i]) || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_start(c) => {
                let start = i;
                while i < chars.len() && is_part(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let called = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) {
                    if called {
                        i = skip_past(next, ')');
                    }
                    continue;
                }
                if called || KEYWORDS.contains(&word.as_str()) {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(&word);
                names.insert(base.to_owned());
            }
            _ => i += 1,
        }
    }
    names
}

/// Every name `/metrics` exposes: sample names and declared families (a counter family
/// `x` as `x_total`), with `_bucket`, `_sum` and `_count` taken off.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let strip = |n: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(n)
            .to_owned()
    };
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(strip(name));
                if kind == "counter" {
                    names.insert(format!("{name}_total"));
                }
            }
        } else if !line.starts_with('#') {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if !name.is_empty() {
                names.insert(strip(&name));
            }
        }
    }
    names
}

fn deploy_file(path: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `expr` of the Grafana dashboard's panels (rows' nested panels included).
fn dashboard_queries() -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&deploy_file("grafana/kiln-dashboard.json")).expect("the dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// Every rule's `expr` of the alert rules.
fn alert_queries() -> Vec<String> {
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&deploy_file("prometheus/kiln-alerts.yaml")).expect("the rules are YAML");
    let groups = rules["groups"].as_sequence().expect("a `groups` list");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("each group has `rules`").clone())
        .map(|rule| {
            assert!(
                rule["alert"].as_str().is_some(),
                "a rule without `alert`: {rule:?}"
            );
            rule["expr"].as_str().expect("each rule has an `expr`").to_owned()
        })
        .collect()
}

#[test]
fn the_tokenizer_finds_metric_names_only() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (le, method) (rate(kiln_grpc_request_duration_seconds_bucket{method!~"x|y", code="Ok"}[$__rate_interval])))"#
        ),
        ["kiln_grpc_request_duration_seconds"]
    );
    assert_eq!(
        names("process_open_fds / process_max_fds > 0.8 and on (instance, job) kiln_build_slots offset 5m"),
        ["kiln_build_slots", "process_max_fds", "process_open_fds"]
    );
    assert_eq!(
        names("sum without(kind) (increase(kiln_actor_restarts_total[5m:1m])) > 1e-9 unless bool nan"),
        ["kiln_actor_restarts_total"]
    );
    assert_eq!(
        names(r#"count(up{job="kiln"}) - sum(kiln_x_count) * sum(kiln_y_sum)"#),
        ["kiln_x", "kiln_y", "up"]
    );
}

#[test]
fn exported_names_come_from_samples_and_declarations() {
    let text = "# TYPE kiln_a counter\n# TYPE kiln_h histogram\nkiln_h_bucket{le=\"1\"} 0\n\
                kiln_h_sum 0\nkiln_g 3\n# EOF\n";
    let names = exported_names(text);
    for n in ["kiln_a", "kiln_a_total", "kiln_h", "kiln_g"] {
        assert!(names.contains(n), "{n} in {names:?}");
    }
    assert!(!names.contains("kiln_b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_and_alert_queries_name_metrics_kiln_exports() {
    let kiln = KilnServer::start(KilnOptions::embedded());
    // The per-RPC families have a series once an RPC was served.
    let listed = kiln
        .builder()
        .await
        .list_builds(ListBuildsRequest::default())
        .await;
    assert!(listed.is_ok(), "{listed:?}");
    let exported = exported_names(&kiln.metrics_text().await);

    let (dashboard, alerts) = (dashboard_queries(), alert_queries());
    assert!(dashboard.len() >= 20, "{} dashboard queries", dashboard.len());
    assert!(alerts.len() >= 4, "{} alert rules", alerts.len());
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for (file, expr) in (dashboard.iter().map(|e| ("grafana/kiln-dashboard.json", e)))
        .chain(alerts.iter().map(|e| ("prometheus/kiln-alerts.yaml", e)))
    {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{file}: no metric in {expr:?}");
        for name in names {
            if !exported.contains(&name) {
                unknown.push(format!("{file}: {name} (in {expr:?})"));
            }
            used.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "queries name metrics Kiln does not export:\n{}",
        unknown.join("\n")
    );
    // The alerts the issue asks for are there.
    for needed in [
        "kiln_builds_completed_total",
        "kiln_actor_restarts_total",
        "kiln_builds_queued",
        "kiln_storage_bytes",
        "kiln_storage_budget_bytes",
    ] {
        assert!(
            alerts.iter().any(|e| metric_names(e).contains(needed)),
            "no alert on {needed}"
        );
    }
    assert!(used.len() >= 20, "{} metrics used", used.len());
}
