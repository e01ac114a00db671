//! Rules as the configuration file writes them (`[[rule]]` tables), and their validation into
//! [`Rule`]s. Every error names the file, the line and the key, and says what to write instead.
//!
//! ```toml
//! [[rule]]
//! action = "allow"                      # or "deny"
//! cgroup = "system.slice/transmission-daemon.service"   # glob; matches it and everything below
//! unit = "docker-*.scope"               # glob over the cgroup path's components
//! user = "alice"                        # or uid = 1000, or uid = "1000-1999"
//! group = "games"
//! exe = "/usr/bin/transmission-daemon"  # glob
//! protocol = "tcp"                      # or "udp"; both when absent
//! ports = ["51413", "6881-6889"]        # or ports = 51413, or ports = "6881-6889"
//! ```
use std::{ffi::CString, ops::RangeInclusive};

use anyhow::{anyhow, bail, Result};
use glob::Pattern;
use serde::Deserialize;

use super::{Action, Rule};
use crate::Protocol;

/// One `[[rule]]` table, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuleSpec {
    pub action: Option<String>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub uid: Option<NumberOrText>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub exe: Option<String>,
    pub protocol: Option<String>,
    pub ports: Option<Ports>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum NumberOrText {
    Number(u64),
    Text(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Ports {
    One(NumberOrText),
    List(Vec<NumberOrText>),
}

/// The policy part of the configuration: the rules with where each was written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySpec {
    /// (origin, rule): origin is "FILE line N".
    pub rules: Vec<(String, RuleSpec)>,
}

impl PolicySpec {
    /// Validates every rule, in order. The first bad one is the error.
    pub fn validate(&self) -> Result<Vec<Rule>> {
        self.rules.iter().map(|(origin, spec)| spec.validate(origin)).collect()
    }
}

impl RuleSpec {
    pub fn validate(&self, origin: &str) -> Result<Rule> {
        let fail = |what: String| anyhow!("{origin}: [[rule]] {what}");
        let action = match self.action.as_deref() {
            Some("allow") => Action::Allow,
            Some("deny") => Action::Deny,
            Some(other) => {
                return Err(fail(format!("action = \"{other}\" is not an action: use \"allow\" or \"deny\"")))
            }
            None => return Err(fail("has no action: add action = \"allow\" or action = \"deny\"".into())),
        };
        let mut rule = Rule::new(action, origin);
        let glob = |key: &str, text: &str| {
            if text.is_empty() {
                return Err(fail(format!("{key} is empty: give a name or a glob, or leave {key} out")));
            }
            // cgroup paths are relative to the cgroup2 root; executables are absolute.
            let text = if key == "exe" { text } else { text.trim_matches('/') };
            Pattern::new(text).map_err(|e| fail(format!("{key} = \"{text}\" is not a valid glob: {e}")))
        };
        rule.cgroup = self.cgroup.as_deref().map(|c| glob("cgroup", c)).transpose()?;
        rule.unit = self.unit.as_deref().map(|u| glob("unit", u)).transpose()?;
        if let Some(exe) = &self.exe {
            if !exe.starts_with('/') {
                return Err(fail(format!(
                    "exe = \"{exe}\" is not an absolute path: write the full path, e.g. /usr/bin/{exe}"
                )));
            }
            rule.exe = Some(glob("exe", exe)?);
        }
        rule.uids = match (&self.uid, &self.user) {
            (Some(_), Some(_)) => return Err(fail("has both uid and user: keep one".into())),
            (Some(uid), None) => Some(uid_range(uid).map_err(|e| fail(format!("uid: {e}")))?),
            (None, Some(name)) => {
                let uid = lookup_user(name).ok_or_else(|| {
                    fail(format!("user = \"{name}\": no such user on this machine (check `getent passwd {name}`)"))
                })?;
                Some(uid..=uid)
            }
            (None, None) => None,
        };
        if let Some(name) = &self.group {
            let gid = match name.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => lookup_group(name).ok_or_else(|| {
                    fail(format!("group = \"{name}\": no such group on this machine (check `getent group {name}`)"))
                })?,
            };
            rule.gid = Some(gid);
        }
        rule.protocol = match self.protocol.as_deref() {
            None => None,
            Some("tcp") => Some(Protocol::Tcp),
            Some("udp") => Some(Protocol::Udp),
            Some(other) => {
                return Err(fail(format!("protocol = \"{other}\" is not a protocol: use \"tcp\" or \"udp\"")))
            }
        };
        rule.ports = match &self.ports {
            None => Vec::new(),
            Some(Ports::One(one)) => vec![port_range(one).map_err(|e| fail(format!("ports: {e}")))?],
            Some(Ports::List(list)) if list.is_empty() => {
                return Err(fail("ports = [] matches nothing: list ports, or leave ports out for all".into()))
            }
            Some(Ports::List(list)) => {
                list.iter().map(port_range).collect::<Result<_>>().map_err(|e| fail(format!("ports: {e}")))?
            }
        };
        Ok(rule)
    }
}

fn range_of(value: &NumberOrText, max: u64, what: &str) -> Result<(u64, u64)> {
    let parse = |text: &str| -> Result<u64> {
        text.trim()
            .parse::<u64>()
            .map_err(|_| anyhow!("\"{text}\" is not a {what}: write a number or a range such as \"1000-1999\""))
    };
    let (first, last) = match value {
        NumberOrText::Number(n) => (*n, *n),
        NumberOrText::Text(text) => match text.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let n = parse(text)?;
                (n, n)
            }
        },
    };
    if first > last {
        bail!("{first}-{last} is an empty range: write the lower {what} first");
    }
    if last > max {
        bail!("{last} is not a {what} (at most {max})");
    }
    Ok((first, last))
}

fn uid_range(value: &NumberOrText) -> Result<RangeInclusive<u32>> {
    let (first, last) = range_of(value, u32::MAX as u64, "uid")?;
    Ok(first as u32..=last as u32)
}

fn port_range(value: &NumberOrText) -> Result<RangeInclusive<u16>> {
    let (first, last) = range_of(value, u16::MAX as u64, "port")?;
    if first == 0 {
        bail!("port 0 is not a port a program can listen on: start at 1");
    }
    Ok(first as u16..=last as u16)
}

/// A user's uid through the system's name service (files, LDAP, systemd-userdb).
pub fn lookup_user(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    let mut buffer = vec![0u8; 16 * 1024];
    // SAFETY: getpwnam_r writes into `entry` and `buffer`, both ours and sized as passed.
    unsafe {
        let mut entry: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(name.as_ptr(), &mut entry, buffer.as_mut_ptr().cast(), buffer.len(), &mut found);
        (rc == 0 && !found.is_null()).then_some(entry.pw_uid)
    }
}

/// A group's gid through the system's name service.
pub fn lookup_group(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    let mut buffer = vec![0u8; 64 * 1024];
    // SAFETY: as in lookup_user.
    unsafe {
        let mut entry: libc::group = std::mem::zeroed();
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(name.as_ptr(), &mut entry, buffer.as_mut_ptr().cast(), buffer.len(), &mut found);
        (rc == 0 && !found.is_null()).then_some(entry.gr_gid)
    }
}
