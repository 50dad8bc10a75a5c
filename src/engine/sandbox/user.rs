//! Resolving a Dockerfile `USER` against the image's `/etc/passwd` and `/etc/group`.
//!
//! The rules are Docker's (runc's `GetExecUser`, now `moby/sys/user`), so that a Dockerfile
//! behaves as it does under `docker build`:
//!
//! - `user` is a name or a uid; a uid needs no passwd entry (it then gets gid 0), a name does.
//!   The first matching passwd line wins.
//! - Without `:group`, the gid is the passwd entry's and the supplementary groups are every
//!   group whose member list names the user. With `:group` (a name, which must exist, or a
//!   gid, which need not), that group is the gid and there are no supplementary groups.
//! - No `USER` at all is uid 0, resolved like `0`, so root gets its supplementary groups too.
//!
//! The files are the image's, read inside the sandbox after `pivot_root`, never the host's.
//! Parsing is pure and lenient like runc's: malformed lines are skipped.

/// The ids a command runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, in `/etc/group` order (set even when empty, so that the
    /// launcher's own groups never leak into the sandbox).
    pub groups: Vec<u32>,
}

/// Why a `USER` cannot be resolved. These are the Dockerfile's mistakes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UserError {
    #[error("unable to find user {user:?}: no matching entries in the image's /etc/passwd")]
    NoSuchUser { user: String },
    #[error("unable to find group {group:?}: no matching entries in the image's /etc/group")]
    NoSuchGroup { group: String },
    #[error("{what} {value} is out of range (0 to 2147483647)")]
    OutOfRange { what: &'static str, value: u64 },
}

/// The largest uid or gid Docker accepts.
const MAX_ID: u64 = (1 << 31) - 1;

#[derive(Debug)]
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
}

#[derive(Debug)]
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let mut fields = line.trim().split(':');
        let name = fields.next().filter(|n| !n.is_empty() && !n.starts_with('#'))?;
        let _password = fields.next()?;
        let uid = fields.next()?.trim().parse().ok()?;
        let gid = fields.next()?.trim().parse().ok()?;
        Some(PasswdEntry { name, uid, gid })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let mut fields = line.trim().split(':');
        let name = fields.next().filter(|n| !n.is_empty() && !n.starts_with('#'))?;
        let _password = fields.next()?;
        let gid = fields.next()?.trim().parse().ok()?;
        let members = fields
            .next()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        Some(GroupEntry { name, gid, members })
    })
}

/// A numeric id, or `None` when `value` is not a number (then it is a name).
fn numeric(what: &'static str, value: &str) -> Result<Option<u32>, UserError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match value.parse::<u64>() {
        Ok(n) if n <= MAX_ID => Ok(Some(n as u32)),
        Ok(n) => Err(UserError::OutOfRange { what, value: n }),
        Err(_) => Err(UserError::OutOfRange {
            what,
            value: u64::MAX,
        }),
    }
}

/// Resolves `spec` (`None` for root) with the contents of the image's `/etc/passwd` and
/// `/etc/group` (empty strings when the image has none).
pub(crate) fn resolve(spec: Option<&str>, passwd: &str, group: &str) -> Result<ExecUser, UserError> {
    let spec = spec.unwrap_or("");
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
        None => (spec, None),
    };
    let uid_arg = numeric("uid", user_arg)?;

    let mut user = ExecUser {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
    };
    let matched = passwd_entries(passwd).find(|entry| match (user_arg, uid_arg) {
        ("", _) => entry.uid == 0,
        (_, Some(uid)) => entry.uid == uid,
        (name, None) => entry.name == name,
    });
    let matched_name = match (matched, uid_arg) {
        (Some(entry), _) => {
            user.uid = entry.uid;
            user.gid = entry.gid;
            Some(entry.name)
        }
        (None, Some(uid)) => {
            user.uid = uid;
            None
        }
        (None, None) if user_arg.is_empty() => None,
        (None, None) => {
            return Err(UserError::NoSuchUser {
                user: user_arg.to_owned(),
            })
        }
    };

    match group_arg {
        Some(group_arg) => {
            let gid_arg = numeric("gid", group_arg)?;
            let found = group_entries(group).find(|g| match gid_arg {
                Some(gid) => g.gid == gid,
                None => g.name == group_arg,
            });
            user.gid = match (found, gid_arg) {
                (Some(g), _) => g.gid,
                (None, Some(gid)) => gid,
                (None, None) => {
                    return Err(UserError::NoSuchGroup {
                        group: group_arg.to_owned(),
                    })
                }
            };
        }
        None => {
            if let Some(name) = matched_name {
                user.groups = group_entries(group)
                    .filter(|g| g.members.contains(&name))
                    .map(|g| g.gid)
                    .collect();
            }
        }
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        broken line\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:root\n\
        wheel:x:10:root,app\n\
        app:x:1000:\n\
        extra:x:2000:app, other\n\
        nogroup:x:65534:\n";

    fn ids(spec: Option<&str>) -> Result<(u32, u32, Vec<u32>), UserError> {
        resolve(spec, PASSWD, GROUP).map(|u| (u.uid, u.gid, u.groups))
    }

    #[test]
    fn no_user_is_root_with_roots_supplementary_groups() {
        assert_eq!(ids(None), Ok((0, 0, vec![0, 10])));
        assert_eq!(
            resolve(None, "", ""),
            Ok(ExecUser {
                uid: 0,
                gid: 0,
                groups: vec![]
            })
        );
    }

    #[test]
    fn a_name_gets_its_primary_and_supplementary_groups() {
        assert_eq!(ids(Some("app")), Ok((1000, 1000, vec![10, 2000])));
        assert_eq!(ids(Some("1000")), Ok((1000, 1000, vec![10, 2000])));
    }

    #[test]
    fn an_explicit_group_replaces_the_primary_group_and_drops_supplementary_ones() {
        assert_eq!(ids(Some("1000:1000")), Ok((1000, 1000, vec![])));
        assert_eq!(ids(Some("app:extra")), Ok((1000, 2000, vec![])));
        assert_eq!(ids(Some("app:4242")), Ok((1000, 4242, vec![])));
        assert_eq!(ids(Some("root:app")), Ok((0, 1000, vec![])));
    }

    #[test]
    fn unknown_numeric_ids_are_fine_and_unknown_names_are_not() {
        assert_eq!(ids(Some("4242")), Ok((4242, 0, vec![])));
        assert_eq!(ids(Some("4242:4343")), Ok((4242, 4343, vec![])));
        assert_eq!(
            ids(Some("ghost")),
            Err(UserError::NoSuchUser { user: "ghost".into() })
        );
        assert_eq!(
            ids(Some("app:ghosts")),
            Err(UserError::NoSuchGroup {
                group: "ghosts".into()
            })
        );
        assert_eq!(
            resolve(Some("app"), "", ""),
            Err(UserError::NoSuchUser { user: "app".into() })
        );
    }

    #[test]
    fn ids_beyond_docker_s_range_are_refused() {
        assert_eq!(
            ids(Some("2147483648")),
            Err(UserError::OutOfRange {
                what: "uid",
                value: 2_147_483_648
            })
        );
        assert!(matches!(
            ids(Some("app:99999999999999999999999")),
            Err(UserError::OutOfRange { what: "gid", .. })
        ));
    }

    #[test]
    fn the_first_matching_line_wins() {
        let passwd = "app:x:1000:1000::/:/bin/sh\napp:x:1001:1001::/:/bin/sh\n";
        assert_eq!(resolve(Some("app"), passwd, "").unwrap().uid, 1000);
    }
}
