//! The policy compiled for the kernel programs: what they can check at bind time (the cgroup's
//! ancestry, uid, primary gid, protocol, port), systemd socket-bind style.
//!
//! The kernel needs one answer only: does the policy *certainly* forward this bind? Only then may a
//! port another host holds fail it with EADDRINUSE. So every rule becomes entries whose verdict is
//! exact where the kernel can check the rule's conditions, and UNKNOWN (stop, never refuse) where it
//! cannot: an executable, a cgroup glob, a unit, a cgroup that does not exist yet, a group the
//! process may hold as a supplementary one. Erring that way costs at most one bind that succeeds but
//! cannot be reached from the internet; erring the other way would break a program natbinder does
//! not even forward.
use natbinder_common::{verdict, PolicyRule, IPPROTO_TCP, IPPROTO_UDP, POLICY_CAPACITY};

use super::{Action, Policy, Rule};
use crate::Protocol;

/// Compiles `policy`. `resolve` gives a cgroup path's (depth below the cgroup2 root, cgroup id), if
/// that cgroup exists.
pub fn compile(policy: &Policy, resolve: impl Fn(&str) -> Option<(u16, u64)>) -> Vec<PolicyRule> {
    let mut out = Vec::new();
    for rule in policy.rules() {
        compile_rule(rule, &resolve, &mut out);
    }
    let capacity = POLICY_CAPACITY as usize;
    if out.len() > capacity {
        // What does not fit is not known to the kernel: stop there.
        out.truncate(capacity - 1);
        out.push(PolicyRule { verdict: verdict::UNKNOWN, ..any() });
    }
    out
}

fn any() -> PolicyRule {
    PolicyRule {
        cgroup_id: 0,
        uid_min: 0,
        uid_max: u32::MAX,
        gid: u32::MAX,
        port_min: 0,
        port_max: u16::MAX,
        cgroup_level: 0,
        protocol: 0,
        verdict: verdict::UNKNOWN,
        _pad: [0; 11],
    }
}

fn compile_rule(rule: &Rule, resolve: &impl Fn(&str) -> Option<(u16, u64)>, out: &mut Vec<PolicyRule>) {
    let exact = match rule.action {
        Action::Allow => verdict::FORWARD,
        Action::Deny => verdict::LOCAL,
    };
    let mut base = any();
    let mut certain = rule.unit.is_none() && rule.exe.is_none();
    if let Some(pattern) = &rule.cgroup {
        let literal = !pattern.as_str().contains(['*', '?', '[']);
        match literal.then(|| resolve(pattern.as_str())).flatten() {
            Some((level, id)) => {
                base.cgroup_level = level;
                base.cgroup_id = id;
            }
            // natbinder's own cgroup, not made yet: nothing binds there until it is, and then this is
            // compiled again.
            None if literal && rule.recompiled_when_made => return,
            None => certain = false,
        }
    }
    if let Some(uids) = &rule.uids {
        base.uid_min = *uids.start();
        base.uid_max = *uids.end();
    }
    base.protocol = match rule.protocol {
        None => 0,
        Some(Protocol::Tcp) => IPPROTO_TCP,
        Some(Protocol::Udp) => IPPROTO_UDP,
    };
    let ranges: Vec<(u16, u16)> = if rule.ports.is_empty() {
        vec![(0, u16::MAX)]
    } else {
        rule.ports.iter().map(|r| (*r.start(), *r.end())).collect()
    };
    for (first, last) in ranges {
        let entry = PolicyRule { port_min: first, port_max: last, ..base };
        match rule.gid {
            // The kernel sees the primary gid only: a match there is certain; otherwise the group may
            // still be a supplementary one.
            Some(gid) => {
                out.push(PolicyRule { gid, verdict: if certain { exact } else { verdict::UNKNOWN }, ..entry });
                out.push(PolicyRule { verdict: verdict::UNKNOWN, ..entry });
            }
            None => out.push(PolicyRule { verdict: if certain { exact } else { verdict::UNKNOWN }, ..entry }),
        }
    }
}

/// What the kernel programs would decide for a bind, evaluated here as natbinder-ebpf's
/// `policy_forwards` does, so that the compiled rules can be checked against the whole policy
/// (policy/tests.rs).
pub fn kernel_forwards(
    rules: &[PolicyRule],
    ancestors: &[u64],
    uid: u32,
    gid: u32,
    protocol: Protocol,
    port: u16,
) -> bool {
    let protocol = match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    };
    for rule in rules {
        let in_cgroup = rule.cgroup_id == 0 || ancestors.get(rule.cgroup_level as usize) == Some(&rule.cgroup_id);
        if (rule.uid_min..=rule.uid_max).contains(&uid)
            && (rule.port_min..=rule.port_max).contains(&port)
            && (rule.protocol == 0 || rule.protocol == protocol)
            && (rule.gid == u32::MAX || rule.gid == gid)
            && in_cgroup
        {
            return rule.verdict == verdict::FORWARD;
        }
    }
    false
}
