//! Identity stage: user lookup in the container's /etc/passwd and
//! /etc/group, then groups, gid, uid, capabilities and no_new_privs.

use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};

use super::{Context, StageResult};
use crate::container::config::{CapsConfig, ProcessConfig, UserConfig};

#[derive(Debug, Clone, PartialEq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// Resolve against the (already chroot'ed) container root.
pub fn resolve_user(u: &UserConfig) -> StageResult<Ids> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_in(u, &passwd, &group)
}

fn field(line: &str, i: usize) -> Option<&str> {
    line.split(':').nth(i)
}

pub fn resolve_in(u: &UserConfig, passwd: &str, group: &str) -> StageResult<Ids> {
    let Some(spec) = u.username.as_deref() else {
        let home = passwd
            .lines()
            .find(|l| field(l, 2).and_then(|f| f.parse().ok()) == Some(u.uid))
            .and_then(|l| field(l, 5))
            .unwrap_or("/")
            .to_string();
        return Ok(Ids {
            uid: u.uid,
            gid: u.gid,
            groups: u.additional_gids.clone(),
            home,
        });
    };
    let (user, grp) = match spec.split_once(':') {
        Some((a, b)) => (a, Some(b)),
        None => (spec, None),
    };
    let entry = passwd.lines().find(|l| {
        field(l, 0) == Some(user) || (user.parse::<u32>().is_ok() && field(l, 2) == Some(user))
    });
    let (uid, mut gid, home, name) = match entry {
        Some(l) => (
            field(l, 2)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| format!("bad /etc/passwd line {l:?}"))?,
            field(l, 3).and_then(|f| f.parse().ok()).unwrap_or(0),
            field(l, 5).unwrap_or("/").to_string(),
            field(l, 0).unwrap_or(user).to_string(),
        ),
        None => match user.parse::<u32>() {
            Ok(n) => (n, n, "/".to_string(), String::new()),
            Err(_) => {
                return Err(format!(
                "unable to find user {user:?}: no matching entries in the container's /etc/passwd"
            ))
            }
        },
    };
    if let Some(g) = grp {
        gid = match group
            .lines()
            .find(|l| field(l, 0) == Some(g) || field(l, 2) == Some(g))
            .and_then(|l| field(l, 2))
            .and_then(|f| f.parse().ok())
        {
            Some(n) => n,
            None => g.parse().map_err(|_| {
                format!(
                    "unable to find group {g:?}: no matching entries in the container's /etc/group"
                )
            })?,
        };
    }
    let mut groups = u.additional_gids.clone();
    if !name.is_empty() {
        for l in group.lines() {
            let members = field(l, 3).unwrap_or("");
            if members.split(',').any(|m| m == name) {
                if let Some(g) = field(l, 2).and_then(|f| f.parse().ok()) {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    Ok(Ids {
        uid,
        gid,
        groups,
        home,
    })
}

fn cap_set(names: &[String]) -> StageResult<CapsHashSet> {
    names
        .iter()
        .map(|n| Capability::from_str(n).ctx(|| format!("capability {n:?}")))
        .collect()
}

pub fn apply(ids: &Ids, p: &ProcessConfig) -> StageResult<()> {
    let c: &CapsConfig = &p.capabilities;
    if let Some(b) = &c.bounding {
        let keep = cap_set(b)?;
        for cap in caps::all() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)
                    .ctx(|| format!("drop {cap} from bounding set"))?;
            }
        }
    }
    // Keep permitted capabilities across the uid change; set them below.
    nix::sys::prctl::set_keepcaps(true).ctx(|| "PR_SET_KEEPCAPS".into())?;
    let groups: Vec<nix::unistd::Gid> = ids
        .groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).ctx(|| "setgroups".into())?;
    let gid = nix::unistd::Gid::from_raw(ids.gid);
    nix::unistd::setresgid(gid, gid, gid).ctx(|| format!("setgid {}", ids.gid))?;
    let uid = nix::unistd::Uid::from_raw(ids.uid);
    nix::unistd::setresuid(uid, uid, uid).ctx(|| format!("setuid {}", ids.uid))?;
    nix::sys::prctl::set_keepcaps(false).ctx(|| "PR_SET_KEEPCAPS".into())?;
    if c.bounding.is_some() || c.permitted.is_some() || c.effective.is_some() {
        // Shrink effective first (it must stay within permitted), then
        // permitted, then inheritable (bounded by permitted).
        let eff = cap_set(c.effective.as_deref().unwrap_or_default())?;
        caps::set(None, CapSet::Effective, &eff).ctx(|| "set effective caps".into())?;
        let permitted = cap_set(c.permitted.as_deref().unwrap_or_default())?;
        caps::set(None, CapSet::Permitted, &permitted).ctx(|| "set permitted caps".into())?;
        let inh = cap_set(c.inheritable.as_deref().unwrap_or_default())?;
        caps::set(None, CapSet::Inheritable, &inh).ctx(|| "set inheritable caps".into())?;
        if let Some(amb) = &c.ambient {
            for cap in cap_set(amb)? {
                caps::raise(None, CapSet::Ambient, cap).ctx(|| format!("raise ambient {cap}"))?;
            }
        }
    }
    if p.no_new_privs {
        nix::sys::prctl::set_no_new_privs().ctx(|| "no_new_privs".into())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/var/www:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww:x:33:alice\nstaff:x:50:alice,bob\nusers:x:100:\n";

    fn user(name: Option<&str>) -> UserConfig {
        UserConfig {
            uid: 7,
            gid: 8,
            additional_gids: vec![9],
            username: name.map(str::to_string),
        }
    }

    #[test]
    fn numeric_ids_pass_through() {
        let ids = resolve_in(&user(None), PASSWD, GROUP).unwrap();
        assert_eq!((ids.uid, ids.gid, ids.groups.clone()), (7, 8, vec![9]));
        assert_eq!(ids.home, "/");
    }

    #[test]
    fn name_lookup_with_supplementary_groups() {
        let ids = resolve_in(&user(Some("alice")), PASSWD, GROUP).unwrap();
        assert_eq!(
            ids,
            Ids {
                uid: 1000,
                gid: 1000,
                groups: vec![9, 33, 50],
                home: "/home/alice".into()
            }
        );
    }

    #[test]
    fn user_and_group() {
        let ids = resolve_in(&user(Some("www:users")), PASSWD, GROUP).unwrap();
        assert_eq!((ids.uid, ids.gid), (33, 100));
        let ids = resolve_in(&user(Some("4242:4343")), PASSWD, GROUP).unwrap();
        assert_eq!((ids.uid, ids.gid), (4242, 4343));
    }

    #[test]
    fn unknown_user_is_clear_error() {
        let e = resolve_in(&user(Some("nosuchuser")), PASSWD, GROUP).unwrap_err();
        assert!(e.contains("nosuchuser") && e.contains("/etc/passwd"), "{e}");
        let e = resolve_in(&user(Some("alice:nogroup")), PASSWD, GROUP).unwrap_err();
        assert!(e.contains("nogroup"), "{e}");
    }
}
