//! The log as a subscriber of the outcome stream: one line per outcome, worded for the person reading
//! the journal. Protocol diagnostics (a malformed packet, a retransmission) are logged where they
//! happen, in the gateway modules; everything that changes what the user gets is logged here.
//! [`describe`] words each outcome once, for the log and for `natbinder watch`.
use tracing::{debug, info, warn, Level};

use super::{DoubleNat, Found, Lease, Outcome, Removal, Seen};
use crate::table::{PendingReason, PinholeService, Stack};

/// Logs the outcome in words, with its kind and the port and program it concerns as fields of their
/// own: the journal keeps them (NATBINDER_EVENT=mapped, NATBINDER_PORT=8080, ...), so that
/// `journalctl -u natbinder NATBINDER_PORT=8080` finds one port's story.
pub fn log(outcome: &Outcome) {
    let (level, text) = describe(outcome);
    let Subject { protocol, port, pid, uid } = Subject::of(outcome);
    let event = outcome.kind();
    match level {
        Level::WARN | Level::ERROR => warn!(event, protocol, port, pid, uid, "{text}"),
        Level::INFO => info!(event, protocol, port, pid, uid, "{text}"),
        _ => debug!(event, protocol, port, pid, uid, "{text}"),
    }
}

/// The port and program an outcome is about, where it is about one.
#[derive(Default)]
struct Subject {
    protocol: Option<&'static str>,
    port: Option<u16>,
    pid: Option<u32>,
    uid: Option<u32>,
}

impl Subject {
    fn of(outcome: &Outcome) -> Subject {
        let listener = |l: &crate::table::Listener| Subject {
            protocol: Some(l.protocol.name()),
            port: Some(l.port),
            pid: Some(l.owner.pid),
            uid: Some(l.owner.uid),
        };
        let key = |protocol: crate::Protocol, port: u16| Subject {
            protocol: Some(protocol.name()),
            port: Some(port),
            ..Subject::default()
        };
        match outcome {
            Outcome::SocketBound { listener: l, .. }
            | Outcome::SocketClassified { listener: l, .. }
            | Outcome::SocketReleased { listener: l, .. }
            | Outcome::NotForwarded { listener: l, .. }
            | Outcome::BindRefused { listener: l, .. } => listener(l),
            Outcome::Mapped { key: k, .. }
            | Outcome::Conflict { key: k, .. }
            | Outcome::Removed { key: k, .. }
            | Outcome::RemoveFailed { key: k, .. } => key(k.protocol, k.port),
            Outcome::PinholeOpened { key: k, .. }
            | Outcome::PinholeClosed { key: k, .. }
            | Outcome::PinholeCloseFailed { key: k, .. } => key(k.protocol, k.port),
            Outcome::Pending { key: k, .. } => key(k.protocol(), k.port()),
            Outcome::RunStarted { pid, uid, .. } => Subject { pid: Some(*pid), uid: Some(*uid), ..Subject::default() },
            _ => Subject::default(),
        }
    }
}

/// The outcome in words, and how loudly the log says it.
pub fn describe(outcome: &Outcome) -> (Level, String) {
    match outcome {
        Outcome::Watching { cgroup, min_port, netns_cookie } => (Level::INFO, format!(
            "watching binds of ports >= {min_port} on 0.0.0.0 and [::] in cgroup {} (network namespace cookie {netns_cookie})",
            cgroup.display()
        )),
        Outcome::SocketBound { listener: l, stack, found: Found::Bind } => (Level::INFO, format!(
            "pid {} ({}) uid {} bound {}/{} on {}{}",
            l.owner.pid,
            l.owner.comm,
            l.owner.uid,
            l.protocol,
            l.port,
            l.family,
            if *stack == Stack::Ipv6Only { " (IPv6-only: no IPv4 mapping)" } else { "" }
        )),
        Outcome::SocketBound { listener: l, found: Found::Adopted, .. } => (Level::INFO, format!(
            "adopted {}/{} on {} held by pid {} ({}), bound while natbinder was not watching",
            l.protocol, l.port, l.family, l.owner.pid, l.owner.comm
        )),
        Outcome::SocketBound { listener: l, found: Found::Static, .. } => (
            Level::INFO,
            format!("static mapping {}/{} added (\"{}\", uid {})", l.protocol, l.port, l.owner.comm, l.owner.uid),
        ),
        Outcome::SocketBound { listener: l, found: Found::Announced, .. } => (Level::INFO, format!(
            "pid {} ({}) uid {} is about to bind {}/{} on {} (natbinder run --wait): mapping it first",
            l.owner.pid, l.owner.comm, l.owner.uid, l.protocol, l.port, l.family
        )),
        Outcome::RunStarted { pid, uid, program, cgroup } => (Level::INFO, format!(
            "natbinder run: pid {pid} ({program}) uid {uid} moved to {cgroup}; its wildcard binds and its children's are forwarded"
        )),
        Outcome::SocketClassified { listener: l, stack: Stack::Ipv6Only } => {
            (Level::INFO, format!("{}/{} on [::] (pid {}) is IPv6-only: no IPv4 mapping", l.protocol, l.port, l.owner.pid))
        }
        Outcome::SocketClassified { listener: l, stack } => {
            (Level::DEBUG, format!("{}/{} on [::] (pid {}) is {stack:?}", l.protocol, l.port, l.owner.pid))
        }
        Outcome::SocketReleased { listener: l, seen: Seen::Released } => {
            (Level::INFO, format!("released {}/{} (pid {}, {})", l.protocol, l.port, l.owner.pid, l.owner.comm))
        }
        Outcome::SocketReleased { listener: l, seen: Seen::Deleted } => {
            (Level::INFO, format!("static mapping {}/{} deleted", l.protocol, l.port))
        }
        Outcome::SocketReleased { listener: l, seen: Seen::Claimed } => (
            Level::DEBUG,
            format!("pid {} bound {}/{} as announced: its socket holds the mapping", l.owner.pid, l.protocol, l.port),
        ),
        Outcome::SocketReleased { listener: l, seen: Seen::Lapsed } => (
            Level::INFO,
            format!("pid {} did not bind {}/{} as announced (its bind failed or was refused)", l.owner.pid, l.protocol, l.port),
        ),
        Outcome::SocketReleased { listener: l, seen: Seen::Missing } => {
            (Level::INFO, format!("{}/{} is gone (its release was not seen)", l.protocol, l.port))
        }
        Outcome::PolicyApplied { scope, rules, kernel_entries, max_mappings_per_user } => {
            let scope = match scope {
                crate::policy::Scope::Sessions { user_slice: true } => {
                    "programs in users' sessions (user.slice, uid >= 1000)".to_string()
                }
                crate::policy::Scope::Sessions { user_slice: false } => {
                    "ordinary users' programs (uid >= 1000; no user.slice here)".to_string()
                }
                crate::policy::Scope::Cgroup(path) => format!("everything in {path}"),
            };
            let limit = match max_mappings_per_user {
                0 => "no limit per user".to_string(),
                n => format!("at most {n} mappings per user"),
            };
            (Level::INFO, format!("exposure policy: forwarding {scope}, but the deny list; {rules} rules, {kernel_entries} in the kernel; {limit}"))
        }
        Outcome::NeedsRestart { settings } => (
            Level::WARN,
            format!("reloaded; these settings changed but apply only after a restart: {}", settings.join(", ")),
        ),
        Outcome::ReloadRefused { error } => (Level::WARN, format!("reload refused, the running policy stays: {error}")),
        Outcome::NotForwarded { listener: l, rule } => (Level::INFO, format!(
            "not forwarding {}/{} of pid {} ({}) uid {}: {rule}",
            l.protocol, l.port, l.owner.pid, l.owner.comm, l.owner.uid
        )),
        Outcome::BindRefused { listener: l, holder } => (Level::WARN, format!(
            "refused bind of {}/{} by pid {} ({}) with EADDRINUSE: another host{} holds that port on the gateway",
            l.protocol,
            l.port,
            l.owner.pid,
            l.owner.comm,
            holder.map(|h| format!(" ({h})")).unwrap_or_default()
        )),
        Outcome::Mapped { key, external_port, internal, lease, backend, renewal, took } if *external_port != key.port => {
            let lease = match lease {
                Lease::Permanent => "permanent".to_string(),
                Lease::For(d) => format!("lease {}s", d.as_secs()),
            };
            let renewal = if *renewal { ", a renewal" } else { "" };
            (
                Level::WARN,
                format!(
                    "mapped {key} -> {internal} via {backend} on external port {external_port}, which the gateway chose \
                     (kept: keep-gateway-chosen-ports is on) ({lease}) in {:.1} ms{renewal}",
                    took.as_secs_f64() * 1e3
                ),
            )
        }
        Outcome::Mapped { key, internal, lease, backend, renewal, took, .. } => {
            let lease = match lease {
                Lease::Permanent => "permanent".to_string(),
                Lease::For(d) => format!("lease {}s", d.as_secs()),
            };
            let renewal = if *renewal { ", a renewal" } else { "" };
            (Level::INFO, format!("mapped {key} -> {internal} via {backend} ({lease}) in {:.1} ms{renewal}", took.as_secs_f64() * 1e3))
        }
        Outcome::Pending { key, reason } => match reason {
            PendingReason::Retrying { error, retry_in, .. } => {
                (Level::WARN, format!("could not map {key}: {error}; will retry in {:.0} s", retry_in.as_secs_f64()))
            }
            PendingReason::HolderLeft => (Level::INFO, format!("{key} is no longer held by another host; mapping it")),
            PendingReason::RecheckHeld => (Level::DEBUG, format!("{key} was held by another host: trying again")),
            other => (Level::DEBUG, format!("{key} pending: {other:?}")),
        },
        Outcome::Conflict { key, holder, offered } => (Level::WARN, format!(
            "{key} is held on the gateway by {}{}: a socket bound to it is not reachable from outside; \
             further binds of this port will fail with EADDRINUSE",
            holder.map_or("another host".to_string(), |h| h.to_string()),
            offered.map(|o| format!(" (the gateway offered external port {o} instead, which natbinder deleted)")).unwrap_or_default()
        )),
        Outcome::Dropped { keys, all } if *all && keys.len() > 1 => {
            (Level::WARN, format!("the gateway lost all {} of our mappings (did it restart?); adding them again", keys.len()))
        }
        Outcome::Dropped { keys, .. } => {
            let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            (Level::WARN, format!("the gateway dropped mapping {}; adding it again", keys.join(", ")))
        }
        Outcome::Removed { key, why } => match why {
            Removal::Released | Removal::Shutdown => (Level::INFO, format!("removed mapping {key}")),
            Removal::Leftover => {
                (Level::INFO, format!("removed {key}, left on the gateway by an earlier natbinder run with no socket needing it"))
            }
            Removal::Drifted => (Level::INFO, format!("removed {key}, which pointed elsewhere")),
            Removal::Policy => (Level::INFO, format!("removed mapping {key}: the policy no longer forwards it")),
            Removal::Disabled => (Level::INFO, format!("removed mapping {key}: disabled by an operator")),
            // Only pinholes are removed for these; said here for completeness.
            Removal::AddressGone | Removal::NotNeeded => (Level::INFO, format!("removed mapping {key}")),
        },
        Outcome::RemoveFailed { key, error } => (Level::WARN, format!("could not remove mapping {key}: {error}; its lease will end it")),
        Outcome::PinholeOpened { key, lease, backend, renewal, took } => {
            let lease = match lease {
                Lease::Permanent => "permanent".to_string(),
                Lease::For(d) => format!("lease {}s", d.as_secs()),
            };
            let renewal = if *renewal { ", a renewal" } else { "" };
            (Level::INFO, format!(
                "opened pinhole {}/{} to [{}] via {backend} ({lease}) in {:.1} ms{renewal}",
                key.protocol, key.port, key.address, took.as_secs_f64() * 1e3
            ))
        }
        Outcome::PinholeClosed { key, why } => {
            let why = match why {
                Removal::Released | Removal::Shutdown => String::new(),
                Removal::Leftover => ", left by an earlier natbinder run with no socket needing it".to_string(),
                Removal::Drifted => ", which pointed elsewhere".to_string(),
                Removal::Policy => ": the policy no longer forwards it".to_string(),
                Removal::Disabled => ": disabled by an operator".to_string(),
                Removal::AddressGone => ": the address is no longer this host's to offer (gone, or about to expire)".to_string(),
                Removal::NotNeeded => ": the gateway no longer needs pinholes".to_string(),
            };
            (Level::INFO, format!("closed pinhole {}/{} to [{}]{why}", key.protocol, key.port, key.address))
        }
        Outcome::PinholeCloseFailed { key, error } => (Level::WARN, format!(
            "could not close pinhole {}/{} to [{}]: {error}; its lease will end it", key.protocol, key.port, key.address
        )),
        Outcome::PinholesDropped { keys } => {
            let keys: Vec<String> = keys.iter().map(|k| format!("{}/{} to [{}]", k.protocol, k.port, k.address)).collect();
            (Level::WARN, format!("the gateway dropped pinhole {}; opening it again", keys.join(", ")))
        }
        Outcome::Ipv6AddressesChanged { added, deprecated, removed } => {
            let list = |a: &[std::net::Ipv6Addr]| a.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
            let mut parts = Vec::new();
            if !added.is_empty() {
                parts.push(format!("{} now offered to [::] listeners", list(added)));
            }
            if !deprecated.is_empty() {
                parts.push(format!("{} deprecated (its pinholes stay, no new ones)", list(deprecated)));
            }
            if !removed.is_empty() {
                parts.push(format!("{} gone or about to expire (its pinholes close)", list(removed)));
            }
            (Level::INFO, format!("IPv6 address {}", parts.join("; ")))
        }
        Outcome::Ipv6Firewall { gateway, service } => match service {
            PinholeService::Needed => (Level::INFO, format!("{gateway} firewalls inbound IPv6: [::] listeners get pinholes")),
            PinholeService::FirewallOpen => (Level::INFO, format!(
                "{gateway} lets all inbound IPv6 in (its firewall is off): [::] listeners need no pinholes"
            )),
            PinholeService::Unavailable { why } => (Level::WARN, format!(
                "[::] listeners are not opened over IPv6 at {gateway}: {why}"
            )),
            PinholeService::Unknown => (Level::DEBUG, format!("{gateway}: IPv6 firewall not checked yet")),
        },
        Outcome::GatewayFound { gateway, backend, local } => {
            (Level::INFO, format!("gateway: {gateway} ({backend}); this host is {local} on its LAN"))
        }
        Outcome::GatewayNotFound { why } => {
            (Level::WARN, format!("{why}; retrying in the background (bound sockets wait in the table)"))
        }
        Outcome::GatewayLost { gateway, why } => (Level::WARN, format!("{why}; looking for the gateway again (was {gateway})")),
        Outcome::GatewayLostMappings { gateway, why } => {
            (Level::INFO, format!("{gateway} lost its mappings ({why}); making them all again"))
        }
        Outcome::Ready { gateway: Some(gateway), sockets, mappings } => {
            (Level::INFO, format!("ready: {sockets} bound sockets, {mappings} mappings to keep on {gateway}"))
        }
        Outcome::Ready { gateway: None, sockets, .. } => {
            (Level::INFO, format!("ready: no gateway found yet; {sockets} bound sockets wait for one"))
        }
        Outcome::ExternalAddress { address, previous: None } => (Level::INFO, format!("gateway's external address: {address}")),
        Outcome::ExternalAddress { address, previous: Some(old) } => {
            (Level::WARN, format!("the gateway's external address changed from {old} to {address}"))
        }
        Outcome::DoubleNat(DoubleNat::UpstreamAddress(ip)) => (Level::WARN, format!(
            "the gateway's external address {ip} is not a public one: there is another NAT upstream (double NAT, or \
             carrier-grade NAT). Mappings are still made on this gateway, but they will not make this host \
             reachable from the internet"
        )),
        Outcome::DoubleNat(DoubleNat::InBetween { gateway, detail }) => (Level::WARN, format!(
            "{detail}. The gateway at {gateway} is not on this host's LAN side of every NAT (double NAT): its \
             mappings would not reach this host. Will retry in case the network changes"
        )),
        Outcome::EventsLost { total } => (Level::WARN, format!(
            "socket events were lost (ring buffer or socket map full; {total} so far): pausing new mappings and \
             resynchronising from sock_diag until the storm settles"
        )),
        Outcome::StormOver => (Level::INFO, "event storm over: the table matches the sockets again; resuming new mappings".to_string()),
    }
}
