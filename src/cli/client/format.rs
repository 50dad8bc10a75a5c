//! How results are shown: tables, key-value lists, JSON and timestamps.

use super::*;

/// A build's status as people read it: `queued` for a running build that waits for a
/// build slot, else the wire name.
pub fn status_name(b: &BuildInfo) -> &'static str {
    if b.queued && b.status() == BuildStatus::Running {
        "queued"
    } else {
        b.status().as_str_name()
    }
}

/// The `kiln list` table: BUILD ID, STATUS, STARTED, REF.
pub fn builds_table(builds: &[BuildInfo]) -> String {
    let rows: Vec<Vec<String>> = builds
        .iter()
        .map(|b| {
            vec![
                dash_if_empty(&b.build_id),
                status_name(b).to_owned(),
                started(b.started_at),
                dash_if_empty(&b.r#ref),
            ]
        })
        .collect();
    table(&["BUILD ID", "STATUS", "STARTED", "REF"], &rows)
}

/// One build as JSON. `log_info` is left out: its headers may carry access tokens.
pub fn build_info_json(b: &BuildInfo) -> Value {
    json!({
        "build_id": b.build_id,
        "status": b.status().as_str_name(),
        "queued": b.queued,
        "ref": b.r#ref,
        "base_ref": b.base_ref,
        "started_at": b.started_at,
        "started": (b.started_at > 0).then(|| rfc3339(b.started_at)),
    })
}

/// `kiln list --json`: an array of [`build_info_json`].
pub fn builds_json(builds: &[BuildInfo]) -> Value {
    Value::Array(builds.iter().map(build_info_json).collect())
}

/// `kiln status --json`.
pub fn build_response_json(r: &BuildResponse) -> Value {
    json!({
        "ref": r.r#ref,
        "base_ref": r.base_ref,
        "status": r.status().as_str_name(),
        "message": r.message,
        "info": r.info.as_ref().map(build_info_json),
    })
}

/// `kiln status` as text: one `key: value` line per known field.
pub fn build_response_text(r: &BuildResponse) -> String {
    let info = r.info.clone().unwrap_or_default();
    let first = |a: &str, b: &str| if a.is_empty() { b.to_owned() } else { a.to_owned() };
    let fields = [
        ("build id", info.build_id.clone()),
        (
            "status",
            match &r.info {
                Some(i) if i.queued && r.status() == BuildStatus::Running => "queued".to_owned(),
                _ => r.status().as_str_name().to_owned(),
            },
        ),
        ("ref", first(&r.r#ref, &info.r#ref)),
        ("base ref", first(&r.base_ref, &info.base_ref)),
        (
            "started",
            if info.started_at > 0 {
                rfc3339(info.started_at)
            } else {
                String::new()
            },
        ),
        ("message", r.message.clone()),
    ];
    key_values(&fields)
}

// ---------------------------------------------------------------------------------------
// kiln resolve / cancel

/// The line `kiln admin warm` prints.
pub fn warm_summary(images: u64, failed: u64) -> String {
    let noun = if images == 1 { "image" } else { "images" };
    if failed == 0 {
        format!("{images} {noun} warmed\n")
    } else {
        format!("{images} {noun} warmed, {failed} failed (see the service's log)\n")
    }
}

/// The `kiln admin du` table: KIND, BYTES, BUDGET, REMOVED, then the engine store's total.
pub fn disk_usage_table(usage: &DiskUsageResponse) -> String {
    let size = |b: u64| crate::engine::storage::human_bytes(b);
    let budget = |b: u64| if b == 0 { "-".to_owned() } else { size(b) };
    let mut rows: Vec<Vec<String>> = usage
        .kinds
        .iter()
        .map(|k| {
            vec![
                k.kind.clone(),
                size(k.bytes),
                budget(k.budget_bytes),
                size(k.removed_bytes),
            ]
        })
        .collect();
    rows.push(vec![
        "engine (total)".into(),
        size(usage.engine_bytes),
        budget(usage.engine_budget_bytes),
        size(
            usage
                .kinds
                .iter()
                .filter(|k| k.kind != "contexts")
                .map(|k| k.removed_bytes)
                .sum(),
        ),
    ]);
    table(&["KIND", "BYTES", "BUDGET", "REMOVED"], &rows)
}

/// `kiln admin du --json`.
pub fn disk_usage_json(usage: &DiskUsageResponse) -> Value {
    json!({
        "engine_bytes": usage.engine_bytes,
        "engine_budget_bytes": usage.engine_budget_bytes,
        "kinds": usage.kinds.iter().map(|k| json!({
            "kind": k.kind,
            "bytes": k.bytes,
            "budget_bytes": k.budget_bytes,
            "removed_bytes": k.removed_bytes,
        })).collect::<Vec<_>>(),
    })
}

/// What `kiln admin prune` prints.
pub fn prune_summary(resp: &PruneResponse) -> String {
    let size = |b: u64| crate::engine::storage::human_bytes(b);
    let parts: Vec<String> = resp
        .removed
        .iter()
        .filter(|k| k.bytes > 0)
        .map(|k| format!("{} {}", k.kind, size(k.bytes)))
        .collect();
    let detail = if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    };
    format!(
        "removed {}{detail}; the engine store holds {}\n",
        size(resp.removed_bytes),
        size(resp.engine_bytes)
    )
}

/// The `kiln admin actors` table: NAME, KIND, RESTARTS, MAILBOX.
pub fn actors_table(actors: &[ActorInfo]) -> String {
    let rows: Vec<Vec<String>> = actors
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.kind.clone(),
                a.restarts.to_string(),
                a.mailbox_len.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "KIND", "RESTARTS", "MAILBOX"], &rows)
}

/// `kiln admin actors --json`.
pub fn actors_json(actors: &[ActorInfo]) -> Value {
    Value::Array(
        actors
            .iter()
            .map(|a| {
                json!({"name": a.name, "kind": a.kind, "restarts": a.restarts, "mailbox_len": a.mailbox_len})
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// Formatting

/// A plain-text table: columns padded to their widest cell and separated by two spaces, the
/// last column unpadded, one line per row, a trailing newline. Headers alone when there
/// are no rows.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key: value` lines with the values aligned, leaving out empty values.
pub fn key_values(fields: &[(&str, String)]) -> String {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in fields.iter().filter(|(_, v)| !v.is_empty()) {
        out.push_str(&format!(
            "{:<width$}  {value}\n",
            format!("{key}:"),
            width = width + 1
        ));
    }
    out
}

pub(super) fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

pub(super) fn started(unix_seconds: i64) -> String {
    if unix_seconds > 0 {
        rfc3339(unix_seconds)
    } else {
        "-".into()
    }
}

/// Unix seconds as RFC 3339 in UTC, e.g. `2024-05-01T12:00:00Z`.
pub fn rfc3339(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
pub(super) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
