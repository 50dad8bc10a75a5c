//! `RUN --mount=…` specifications: a CSV list of `key=value` fields (`type=cache,target=/x`),
//! parsed as BuildKit does. Types: `bind` (the default; read-only unless `rw`), `cache`,
//! `tmpfs` (read-write), `secret`, `ssh` (read-only). Keys: `type`, `from`,
//! `source`/`src`, `target`/`dst`/`destination`, `readonly`/`ro`, `readwrite`/`rw`, `id`,
//! `sharing` (`shared`, `private`, `locked`; cache only), `mode` (octal), `uid`, `gid` (cache,
//! secret, ssh only), `size` (tmpfs only, e.g. `64m`), `required` (secret, ssh), `env`
//! (secret).
//!
//! Values are expanded with the build's variables when the step runs, so the parser only
//! validates what does not depend on them: a value containing `$` is kept raw (string fields)
//! or left for [`RunMount::expand`] (typed fields), and the cross-field checks then wait too.
//! `from=` never expands. A build must always use [`RunMount::expand`]'s result.

use thiserror::Error;

use super::expand::{expand, ExpandError};
use super::suggest;

/// What a `RUN --mount` mounts (serialises as its Dockerfile name, e.g. `"cache"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    /// A directory of the build context or of `from` (a stage or image).
    Bind,
    /// A persistent cache directory, shared between builds by `id` (default: the target).
    Cache,
    /// An empty tmpfs.
    Tmpfs,
    /// A build secret, as a file (default `/run/secrets/<id>`) or an environment variable.
    Secret,
    /// An SSH agent socket.
    Ssh,
}

impl MountType {
    const ALL: [&'static str; 5] = ["bind", "cache", "tmpfs", "secret", "ssh"];

    fn parse(value: &str) -> Option<MountType> {
        Some(match value.to_ascii_lowercase().as_str() {
            "bind" => MountType::Bind,
            "cache" => MountType::Cache,
            "tmpfs" => MountType::Tmpfs,
            "secret" => MountType::Secret,
            "ssh" => MountType::Ssh,
            _ => return None,
        })
    }

    /// The name used in a Dockerfile.
    pub fn as_str(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }
}

/// How concurrent builds share one cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSharing {
    /// Used by every build at once (the default).
    Shared,
    /// A build that finds it in use gets a fresh one.
    Private,
    /// A build waits until it is free.
    Locked,
}

/// One `RUN --mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    /// The text after `--mount=`, as written (re-parsed by [`RunMount::expand`]).
    pub spec: String,
    /// `type=` (default bind).
    pub kind: MountType,
    /// Where it is mounted; relative to the working directory when relative (empty when not
    /// given: the working directory itself, which BuildKit rejects when it is `/`).
    pub target: String,
    /// The path inside the source (context, stage or image), or the secret's id.
    pub source: Option<String>,
    /// A stage name/index or an image reference to mount from.
    pub from: Option<String>,
    /// The cache or secret id.
    pub id: Option<String>,
    /// Cache sharing (only cache mounts; `None` means shared).
    pub sharing: Option<CacheSharing>,
    /// Read-only (default: true for bind, secret and ssh; false for cache and tmpfs).
    pub read_only: bool,
    /// A missing secret or ssh socket is an error.
    pub required: bool,
    /// File mode (octal in the Dockerfile).
    pub mode: Option<u32>,
    /// Owner uid.
    pub uid: Option<u32>,
    /// Owner gid.
    pub gid: Option<u32>,
    /// tmpfs size limit in bytes.
    pub size: Option<u64>,
    /// The environment variable a secret is exposed as.
    pub env: Option<String>,
}

/// A `RUN --mount` specification is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MountError {
    /// The specification itself is wrong.
    #[error("invalid --mount={spec}: {reason}")]
    Invalid {
        /// The specification as written.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A value could not be expanded.
    #[error("invalid --mount={spec}: {source}")]
    Expand {
        /// The specification as written.
        spec: String,
        /// The expansion failure.
        source: ExpandError,
    },
}

/// How field values are treated.
enum Values<'a> {
    /// Literal: every value is validated.
    Literal,
    /// At parse time: values with `$` wait for expansion.
    Deferred,
    /// At build time: every value is expanded, then validated.
    Expanded(&'a dyn Fn(&str) -> Result<String, ExpandError>),
}

impl RunMount {
    /// Parses a specification whose values are literal.
    pub fn parse(spec: &str) -> Result<RunMount, MountError> {
        parse_mount(spec, Values::Literal)
    }

    /// Parses this mount's [`spec`](Self::spec) again with every value expanded in `env`
    /// (the step's ARG and ENV values): the mount a build must use.
    pub fn expand(
        &self,
        env: &impl Fn(&str) -> Option<String>,
        escape: char,
    ) -> Result<RunMount, MountError> {
        let expander = |value: &str| expand(value, env, escape);
        parse_mount(&self.spec, Values::Expanded(&expander))
    }

    /// The cache id of a cache mount: `id`, or else the target (as BuildKit does).
    pub fn cache_id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.target)
    }
}

/// Parse-time parsing of `--mount=<spec>` (see the module doc); the message says what is
/// wrong with it.
pub(crate) fn parse_deferred(spec: &str) -> Result<RunMount, String> {
    parse_mount(spec, Values::Deferred).map_err(|e| e.to_string())
}

fn parse_mount(spec: &str, values: Values<'_>) -> Result<RunMount, MountError> {
    let invalid = |reason: String| MountError::Invalid {
        spec: spec.to_string(),
        reason,
    };
    let fields = csv_fields(spec).map_err(|r| invalid(r.to_string()))?;
    let mut m = RunMount {
        spec: spec.to_string(),
        kind: MountType::Bind,
        target: String::new(),
        source: None,
        from: None,
        id: None,
        sharing: None,
        read_only: false,
        required: false,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        env: None,
    };
    let mut readonly_set = false;
    let mut deferred = false;
    for field in &fields {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.to_ascii_lowercase(), v),
            None => {
                match field.to_ascii_lowercase().as_str() {
                    "readonly" | "ro" => m.read_only = true,
                    "readwrite" | "rw" => m.read_only = false,
                    "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => m.required = true,
                    "required" => {
                        return Err(invalid(format!(
                            "unexpected key 'required' for mount type '{}'",
                            m.kind.as_str()
                        )))
                    }
                    _ => {
                        return Err(invalid(format!(
                            "invalid field '{field}': it must be a key=value pair"
                        )))
                    }
                }
                readonly_set |= !field.eq_ignore_ascii_case("required");
                continue;
            }
        };
        let value = match &values {
            Values::Expanded(expander) => expander(value).map_err(|source| MountError::Expand {
                spec: spec.to_string(),
                source,
            })?,
            Values::Deferred if value.contains('$') => {
                if key == "from" && value.find('$') != Some(value.len() - 1) {
                    return Err(invalid(
                        "'from' doesn't support variable expansion, define an alias stage instead".into(),
                    ));
                }
                deferred = true;
                let raw = Some(value.to_string());
                match key.as_str() {
                    "target" | "dst" | "destination" => m.target = value.to_string(),
                    "source" | "src" => m.source = raw,
                    "id" => m.id = raw,
                    "env" => m.env = raw,
                    _ => {}
                }
                continue;
            }
            _ => value.to_string(),
        };
        let wrong_type = |key: &str, kind: MountType| {
            invalid(format!(
                "unexpected key '{key}' for mount type '{}'",
                kind.as_str()
            ))
        };
        match key.as_str() {
            "type" => {
                m.kind = MountType::parse(&value).ok_or_else(|| {
                    invalid(format!(
                        "unsupported mount type {value:?}{} (expected one of {})",
                        suggestion(&value, &MountType::ALL),
                        MountType::ALL.join(", ")
                    ))
                })?
            }
            "from" => m.from = Some(value),
            "source" | "src" => m.source = Some(value),
            "target" | "dst" | "destination" => m.target = value,
            "readonly" | "ro" => {
                m.read_only =
                    parse_bool(&value).ok_or_else(|| invalid(format!("invalid value for {key}: {value}")))?;
                readonly_set = true;
            }
            "readwrite" | "rw" => {
                m.read_only = !parse_bool(&value)
                    .ok_or_else(|| invalid(format!("invalid value for {key}: {value}")))?;
                readonly_set = true;
            }
            "required" => {
                if !matches!(m.kind, MountType::Secret | MountType::Ssh) {
                    return Err(wrong_type(&key, m.kind));
                }
                m.required =
                    parse_bool(&value).ok_or_else(|| invalid(format!("invalid value for {key}: {value}")))?;
            }
            "size" => {
                if m.kind != MountType::Tmpfs {
                    return Err(wrong_type(&key, m.kind));
                }
                m.size = Some(
                    parse_ram_size(&value)
                        .ok_or_else(|| invalid(format!("invalid value for size: {value}")))?,
                );
            }
            "id" => m.id = Some(value),
            "sharing" => {
                m.sharing = Some(match value.to_ascii_lowercase().as_str() {
                    "shared" => CacheSharing::Shared,
                    "private" => CacheSharing::Private,
                    "locked" => CacheSharing::Locked,
                    _ => {
                        return Err(invalid(format!(
                            "unsupported sharing value {value:?} (expected shared, private or locked)"
                        )))
                    }
                })
            }
            "mode" => {
                m.mode = Some(
                    parse_u32(&value, 8).ok_or_else(|| invalid(format!("invalid value {value} for mode")))?,
                )
            }
            "uid" => {
                m.uid = Some(
                    parse_u32(&value, 10).ok_or_else(|| invalid(format!("invalid value {value} for uid")))?,
                )
            }
            "gid" => {
                m.gid = Some(
                    parse_u32(&value, 10).ok_or_else(|| invalid(format!("invalid value {value} for gid")))?,
                )
            }
            "env" => m.env = Some(value),
            _ => {
                const KEYS: [&str; 19] = [
                    "type",
                    "from",
                    "source",
                    "target",
                    "readonly",
                    "id",
                    "sharing",
                    "required",
                    "size",
                    "mode",
                    "uid",
                    "gid",
                    "src",
                    "dst",
                    "destination",
                    "ro",
                    "rw",
                    "readwrite",
                    "env",
                ];
                return Err(invalid(format!(
                    "unexpected key '{key}' in '{field}'{}",
                    suggestion(&key, &KEYS)
                )));
            }
        }
    }
    if !readonly_set {
        m.read_only = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
    }
    if deferred {
        return Ok(m);
    }
    if !matches!(m.kind, MountType::Secret | MountType::Ssh | MountType::Cache) {
        for (name, set) in [
            ("mode", m.mode.is_some()),
            ("uid", m.uid.is_some()),
            ("gid", m.gid.is_some()),
        ] {
            if set {
                return Err(invalid(format!(
                    "{name} not allowed for {:?} type mounts",
                    m.kind.as_str()
                )));
            }
        }
    }
    if m.kind == MountType::Secret {
        if m.from.is_some() {
            return Err(invalid("secret mount should not have a from".into()));
        }
        if m.sharing.is_some() {
            return Err(invalid("secret mount should not define sharing".into()));
        }
        if m.source.is_none() && m.target.is_empty() && m.id.is_none() {
            return Err(invalid("a secret mount needs one of id, source or target".into()));
        }
        if m.source.is_some() && m.id.is_some() {
            return Err(invalid("both source and id can't be set".into()));
        }
    }
    if m.sharing.is_some() && m.kind != MountType::Cache {
        return Err(invalid(format!(
            "invalid cache sharing set for {} mount",
            m.kind.as_str()
        )));
    }
    Ok(m)
}

fn suggestion(value: &str, options: &[&str]) -> String {
    suggest(value, options)
        .map(|s| format!(" (did you mean {s:?}?)"))
        .unwrap_or_default()
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn parse_u32(value: &str, radix: u32) -> Option<u32> {
    if value.is_empty() || !value.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(value, radix).ok()
}

/// A size like `64m`, `1.5GiB`, `1024` (binary units, as docker's `RAMInBytes`).
fn parse_ram_size(value: &str) -> Option<u64> {
    let number_len = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(number_len);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') || number.contains("..") {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let unit = unit.strip_prefix(' ').unwrap_or(unit).to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return None,
    };
    let bytes = number * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// The fields of one CSV record (Go's `encoding/csv` rules: `"` quotes a whole field, `""`
/// inside it is a quote, a quote inside an unquoted field is an error).
fn csv_fields(spec: &str) -> Result<Vec<String>, &'static str> {
    if spec.is_empty() {
        return Err("the mount specification is empty");
    }
    let mut fields = Vec::new();
    let mut chars = spec.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("a quoted field is not closed"),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
            match chars.next() {
                None => return Ok(fields),
                Some(',') => continue,
                Some(_) => return Err("extraneous text after a quoted field"),
            }
        }
        loop {
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => break,
                Some('"') => return Err("bare \" in a non-quoted field"),
                Some(c) => field.push(c),
            }
        }
        fields.push(field);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> RunMount {
        RunMount::parse(spec).unwrap_or_else(|e| panic!("{spec}: {e}"))
    }

    fn reason(spec: &str) -> String {
        match RunMount::parse(spec).expect_err(spec) {
            MountError::Invalid { reason, .. } => reason,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn cache_mount() {
        let m = parse("type=cache,target=/root/.cache,id=pip,sharing=locked,mode=0755,uid=1000,gid=1000");
        assert_eq!(m.kind, MountType::Cache);
        assert_eq!(m.target, "/root/.cache");
        assert_eq!(m.id.as_deref(), Some("pip"));
        assert_eq!(m.sharing, Some(CacheSharing::Locked));
        assert_eq!((m.mode, m.uid, m.gid), (Some(0o755), Some(1000), Some(1000)));
        assert!(!m.read_only);
        assert_eq!(m.cache_id(), "pip");
        assert_eq!(parse("type=cache,dst=/x").cache_id(), "/x");
        assert_eq!(serde_json::to_string(&m.kind).unwrap(), "\"cache\"");
    }

    #[test]
    fn defaults_and_flags() {
        let bind = parse("target=/src,source=.,from=builder");
        assert_eq!(bind.kind, MountType::Bind);
        assert!(bind.read_only);
        assert!(!parse("type=bind,target=/src,rw").read_only);
        assert!(!parse("type=bind,target=/src,readwrite=true").read_only);
        assert!(parse("type=cache,target=/c,ro").read_only);
        assert!(!parse("type=tmpfs,target=/t").read_only);
        assert_eq!(parse("type=tmpfs,target=/t,size=64m").size, Some(64 << 20));
        assert_eq!(parse("type=tmpfs,target=/t,size=1024").size, Some(1024));
        let secret = parse("type=secret,id=token,required,env=TOKEN");
        assert!(secret.read_only && secret.required);
        assert_eq!(secret.env.as_deref(), Some("TOKEN"));
        assert_eq!(parse("type=ssh").kind, MountType::Ssh);
        assert_eq!(parse("\"type=bind\",\"target=/a,b\"").target, "/a,b");
    }

    #[test]
    fn errors() {
        assert!(reason("type=volume,target=/x").contains("unsupported mount type \"volume\""));
        assert!(reason("type=cahce,target=/x").contains("did you mean \"cache\"?"));
        assert_eq!(
            reason("type=cache,target=/x,sharing=weird"),
            "unsupported sharing value \"weird\" (expected shared, private or locked)"
        );
        assert_eq!(
            reason("type=bind,target=/x,uid=1"),
            "uid not allowed for \"bind\" type mounts"
        );
        assert_eq!(
            reason("type=cache,target=/x,mode=999"),
            "invalid value 999 for mode"
        );
        assert_eq!(
            reason("type=cache,target"),
            "invalid field 'target': it must be a key=value pair"
        );
        assert_eq!(
            reason("type=cache,size=1m"),
            "unexpected key 'size' for mount type 'cache'"
        );
        assert!(reason("type=cache,tagret=/x").contains("did you mean \"target\"?"));
        assert_eq!(
            reason("type=secret"),
            "a secret mount needs one of id, source or target"
        );
        assert_eq!(
            reason("type=secret,id=a,from=b"),
            "secret mount should not have a from"
        );
        assert_eq!(
            reason("type=bind,target=/x,sharing=shared"),
            "invalid cache sharing set for bind mount"
        );
        assert_eq!(
            reason("required,type=secret,id=x"),
            "unexpected key 'required' for mount type 'bind'"
        );
        assert_eq!(reason(""), "the mount specification is empty");
        assert_eq!(reason("target=a\"b"), "bare \" in a non-quoted field");
    }

    #[test]
    fn deferred_values_expand_later() {
        let m = parse_deferred("type=cache,target=$HOME/.cache,uid=$UID").unwrap();
        assert_eq!(m.target, "$HOME/.cache");
        assert_eq!(m.uid, None);
        assert!(parse_deferred("type=bind,from=$STAGE,target=/x")
            .unwrap_err()
            .contains("doesn't support variable expansion"));
        let env = |name: &str| match name {
            "HOME" => Some("/root".to_string()),
            "UID" => Some("1000".to_string()),
            _ => None,
        };
        let expanded = m.expand(&env, '\\').unwrap();
        assert_eq!(expanded.target, "/root/.cache");
        assert_eq!(expanded.uid, Some(1000));
        let bad = parse_deferred("type=bind,target=/x,uid=$UID").unwrap();
        assert!(bad
            .expand(&env, '\\')
            .unwrap_err()
            .to_string()
            .contains("uid not allowed"));
    }
}
