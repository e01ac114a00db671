//! The exposure policy: which bound sockets natbinder forwards, and which rule said so.
//!
//! A policy is a list of rules tried in order; the first that matches decides. The list is:
//! 1. the administrator's rules, from the configuration file (`[[rule]]`), in file order;
//! 2. the shipped deny list ([`deny_list`]): ports that are local-only by convention;
//! 3. programs started with `natbinder run` ([`Policy::with_runs`]), which are forwarded wherever
//!    they came from;
//! 4. the scope's default ([`Scope`]): with no `--cgroup`, programs in users' sessions are forwarded
//!    and system services are not; with an explicit `--cgroup`, everything in it is forwarded.
//!
//! A decision always names its rule, so that `natbinder list` and the log can say why a port is or
//! is not forwarded. The kernel programs get the same policy, compiled into what they can check at
//! bind time ([`kernel`]), so that a program natbinder will not forward is never refused with
//! EADDRINUSE for a port another host holds. The per-user limit is the table's (it counts mappings).
use std::{fmt, ops::RangeInclusive, path::Path, sync::Arc};

use glob::{MatchOptions, Pattern};

use crate::Protocol;

pub mod deny_list;
pub mod exposure;
pub mod kernel;
pub mod spec;

pub use spec::{PolicySpec, RuleSpec};

/// The first uid of ordinary users on Debian, Ubuntu and Fedora (login.defs UID_MIN); lower ones are
/// system accounts.
pub const FIRST_USER_UID: u32 = 1000;

/// The default limit of concurrent mappings per uid.
pub const DEFAULT_MAX_MAPPINGS_PER_USER: u32 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// What the daemon knows about the program behind a bind. Fields it could not learn (the program
/// exited at once, /proc unreadable) are None.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject<'a> {
    pub protocol: Protocol,
    pub port: u16,
    pub uid: u32,
    /// The primary gid, and the supplementary groups where known.
    pub gid: u32,
    pub groups: &'a [u32],
    /// The cgroup, relative to the cgroup2 root ("user.slice/user-1000.slice/session-2.scope").
    pub cgroup: Option<&'a str>,
    pub exe: Option<&'a Path>,
}

/// One rule, validated. Every condition that is set must hold for the rule to match.
#[derive(Clone, Debug)]
pub struct Rule {
    pub action: Action,
    /// Where it came from, for people: "/etc/natbinder/natbinder.toml line 12", "deny list", ...
    pub origin: String,
    /// Why, for built-in rules.
    pub reason: Option<String>,
    /// Matches the cgroup or any of its ancestors.
    pub cgroup: Option<Pattern>,
    /// Matches any component of the cgroup path (systemd units: "docker-*.scope").
    pub unit: Option<Pattern>,
    pub uids: Option<RangeInclusive<u32>>,
    pub gid: Option<u32>,
    pub exe: Option<Pattern>,
    pub protocol: Option<Protocol>,
    /// Empty: every port.
    pub ports: Vec<RangeInclusive<u16>>,
    /// The cgroup is natbinder's own and the kernel's policy is compiled again whenever it is made
    /// (`natbinder run`'s): while it does not exist no bind can come from it, so the kernel needs no
    /// entry for it. (An administrator's cgroup may appear at any time: it compiles to UNKNOWN.)
    pub recompiled_when_made: bool,
}

impl Rule {
    fn new(action: Action, origin: impl Into<String>) -> Self {
        Self {
            action,
            origin: origin.into(),
            reason: None,
            cgroup: None,
            unit: None,
            uids: None,
            gid: None,
            exe: None,
            protocol: None,
            ports: Vec::new(),
            recompiled_when_made: false,
        }
    }

    /// Whether the rule matches. A condition on something not known about the subject counts as
    /// met for a deny rule and unmet for an allow rule: not knowing never forwards more.
    pub fn matches(&self, subject: &Subject) -> bool {
        let unknown = self.action == Action::Deny;
        if self.protocol.is_some_and(|p| p != subject.protocol) {
            return false;
        }
        if !self.ports.is_empty() && !self.ports.iter().any(|r| r.contains(&subject.port)) {
            return false;
        }
        if self.uids.as_ref().is_some_and(|r| !r.contains(&subject.uid)) {
            return false;
        }
        if self.gid.is_some_and(|g| g != subject.gid && !subject.groups.contains(&g)) {
            return false;
        }
        if let Some(pattern) = &self.cgroup {
            match subject.cgroup {
                Some(path) if !cgroup_or_ancestor_matches(pattern, path) => return false,
                None if !unknown => return false,
                _ => {}
            }
        }
        if let Some(pattern) = &self.unit {
            match subject.cgroup {
                Some(path) if !path.split('/').any(|unit| pattern.matches(unit)) => return false,
                None if !unknown => return false,
                _ => {}
            }
        }
        if let Some(pattern) = &self.exe {
            match subject.exe {
                Some(exe) if !pattern.matches_path_with(exe, PATH_MATCH) => return false,
                None if !unknown => return false,
                _ => {}
            }
        }
        true
    }

    /// The rule as people read it: "deny tcp/5432 (deny list: PostgreSQL)".
    pub fn describe(&self) -> String {
        let mut conditions = Vec::new();
        if let Some(p) = &self.cgroup {
            conditions.push(format!("cgroup {}", p.as_str()));
        }
        if let Some(p) = &self.unit {
            conditions.push(format!("unit {}", p.as_str()));
        }
        if let Some(r) = &self.uids {
            conditions.push(match (r.start(), r.end()) {
                (a, b) if a == b => format!("uid {a}"),
                (a, &u32::MAX) => format!("uid >= {a}"),
                (a, b) => format!("uid {a}-{b}"),
            });
        }
        if let Some(g) = self.gid {
            conditions.push(format!("gid {g}"));
        }
        if let Some(p) = &self.exe {
            conditions.push(format!("exe {}", p.as_str()));
        }
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|r| if r.start() == r.end() { r.start().to_string() } else { format!("{}-{}", r.start(), r.end()) })
            .collect();
        match (self.protocol, ports.is_empty()) {
            (Some(p), false) => conditions.push(format!("{p}/{}", ports.join(","))),
            (None, false) => conditions.push(format!("port {}", ports.join(","))),
            (Some(p), true) => conditions.push(p.to_string()),
            (None, true) => {}
        }
        let what = if conditions.is_empty() { "everything".to_string() } else { conditions.join(" ") };
        match &self.reason {
            Some(reason) => format!("{} {what} ({}: {reason})", self.action, self.origin),
            None => format!("{} {what} ({})", self.action, self.origin),
        }
    }
}

const PATH_MATCH: MatchOptions =
    MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: false };

fn cgroup_or_ancestor_matches(pattern: &Pattern, path: &str) -> bool {
    let path = path.trim_matches('/');
    let mut prefix_end = path.len();
    loop {
        if pattern.matches_with(&path[..prefix_end], PATH_MATCH) {
            return true;
        }
        match path[..prefix_end].rfind('/') {
            Some(i) => prefix_end = i,
            None => return false,
        }
    }
}

/// Which programs the policy forwards when no rule of the administrator's matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// No `--cgroup` given: the whole machine is watched, and programs in users' sessions are
    /// forwarded. `user_slice`: whether this machine has systemd's user.slice; without it, ordinary
    /// users' programs (uid >= 1000) are.
    Sessions { user_slice: bool },
    /// `--cgroup DIR`: the administrator chose the scope; everything in it is forwarded.
    Cgroup(String),
}

/// Who decided, in a form that can be shown and compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub forward: bool,
    /// The rule that decided, as [`Rule::describe`] writes it.
    pub rule: Arc<str>,
}

impl Decision {
    pub fn new(forward: bool, rule: &str) -> Self {
        Self { forward, rule: rule.into() }
    }
}

/// The validated policy.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    /// Where the scope's default rules begin (after the deny list).
    defaults_at: usize,
    max_mappings_per_user: u32,
}

impl Policy {
    /// The administrator's `rules` (already validated, in order), then the deny list, then `scope`'s
    /// default. `max_mappings_per_user` 0 means no limit.
    pub fn new(mut rules: Vec<Rule>, scope: &Scope, max_mappings_per_user: u32) -> Self {
        for denied in deny_list::DENY_LIST {
            let mut rule = Rule::new(Action::Deny, "deny list");
            rule.reason = Some(denied.reason.to_string());
            rule.protocol = denied.protocol;
            rule.ports = vec![denied.first..=denied.last];
            rules.push(rule);
        }
        let defaults_at = rules.len();
        match scope {
            Scope::Sessions { user_slice: true } => {
                let mut users = Rule::new(Action::Allow, "default");
                users.reason = Some("programs in users' sessions are forwarded".into());
                users.cgroup = Some(Pattern::new("user.slice").expect("a literal pattern"));
                users.uids = Some(FIRST_USER_UID..=u32::MAX);
                rules.push(users);
                let mut rest = Rule::new(Action::Deny, "default");
                rest.reason = Some("system services and root are not forwarded; a [[rule]] can allow one".into());
                rules.push(rest);
            }
            Scope::Sessions { user_slice: false } => {
                let mut users = Rule::new(Action::Allow, "default");
                users.reason = Some("ordinary users' programs are forwarded (this machine has no user.slice)".into());
                users.uids = Some(FIRST_USER_UID..=u32::MAX);
                rules.push(users);
                let mut rest = Rule::new(Action::Deny, "default");
                rest.reason = Some("system accounts and root are not forwarded; a [[rule]] can allow one".into());
                rules.push(rest);
            }
            Scope::Cgroup(path) => {
                let mut all = Rule::new(Action::Allow, "scope");
                all.reason = Some(format!("everything in the watched cgroup {path} is forwarded"));
                rules.push(all);
            }
        }
        Self { rules, defaults_at, max_mappings_per_user }
    }

    /// Forwards what runs in `natbinder run`'s cgroups, below `base` (relative to the cgroup2 root):
    /// after the administrator's rules and the deny list, before the scope's default, so that a
    /// program started with `run` is forwarded wherever it came from, and yet the deny list applies
    /// unless a rule of the administrator's allows the port.
    pub fn with_runs(mut self, base: &str) -> Self {
        let mut runs = Rule::new(Action::Allow, "natbinder run");
        runs.reason = Some("programs started with `natbinder run` are forwarded".into());
        runs.cgroup = Some(Pattern::new(&Pattern::escape(base.trim_matches('/'))).expect("an escaped literal"));
        runs.recompiled_when_made = true;
        self.rules.insert(self.defaults_at, runs);
        self.defaults_at += 1;
        self
    }

    /// The first rule that matches decides; the scope's default always matches, so there is one.
    pub fn decide(&self, subject: &Subject) -> Decision {
        let rule = self.rules.iter().find(|r| r.matches(subject));
        match rule {
            Some(rule) => Decision { forward: rule.action == Action::Allow, rule: rule.describe().into() },
            None => Decision { forward: false, rule: "no rule matched".into() },
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether a rule needs the program's supplementary groups (read only then).
    pub fn uses_groups(&self) -> bool {
        self.rules.iter().any(|r| r.gid.is_some())
    }

    /// 0: no limit.
    pub fn max_mappings_per_user(&self) -> u32 {
        self.max_mappings_per_user
    }
}

#[cfg(test)]
mod tests;
