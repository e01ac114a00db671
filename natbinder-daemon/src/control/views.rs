//! What the control interface shows, in the shapes io.natbinder.varlink documents: the table as
//! `Mapping` objects, the daemon's facts for `Status`, and outcomes as `Watch` events. The JSON is
//! stable: fields are only ever added.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use serde_json::{json, Value};

use crate::{
    gateway::Backend,
    outcome::{log::describe, DoubleNat, Event, Lease, Outcome},
    policy::Scope,
    table::{
        is_static, Listener, MappingKey, MappingState, PendingReason, PinholeService, PortKey, Table, DISABLED_RULE,
    },
    Protocol,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OwnerView {
    pub pid: u32,
    pub program: String,
    pub uid: u32,
    pub cgroup: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MappingView {
    pub protocol: String,
    pub external_port: u16,
    pub internal_port: u16,
    pub state: &'static str,
    /// A static mapping (`natbinder add`), with its description.
    #[serde(rename = "static")]
    pub static_mapping: bool,
    pub description: Option<String>,
    pub reason: Option<String>,
    pub holder: Option<String>,
    pub owners: Vec<OwnerView>,
    pub lease_left_seconds: Option<u64>,
    pub permanent: bool,
    pub backend: Option<String>,
    /// On a conflict: the external port the gateway offered instead (deleted by natbinder).
    pub offered_port: Option<u16>,
    /// An IPv6 firewall pinhole to this address of this host (no NAT: external = internal); None for
    /// an IPv4 port mapping.
    pub pinhole_address: Option<String>,
}

fn owner(l: &Listener) -> OwnerView {
    OwnerView { pid: l.owner.pid, program: l.owner.comm.clone(), uid: l.owner.uid, cgroup: l.owner.cgroup.clone() }
}

pub fn pending_reason(reason: &PendingReason) -> String {
    match reason {
        PendingReason::Queued => "queued".into(),
        PendingReason::EventStorm => "kernel events were lost: waiting for a listing of the sockets".into(),
        PendingReason::GatewayChanged => "the gateway changed or lost its state: being made again".into(),
        PendingReason::Dropped => "the gateway dropped it: being made again".into(),
        PendingReason::HolderLeft => "the host that held the port let go of it".into(),
        PendingReason::RecheckHeld => "was held by another host: asking again".into(),
        PendingReason::Retrying { error, attempts, retry_in } => {
            format!("{error} (attempt {attempts}; next in {} s)", retry_in.as_secs())
        }
    }
}

/// Every mapping the table wants or is removing, and every bound socket it does not forward, sorted
/// by protocol and port. `all`: also the ports other hosts hold on the gateway.
pub fn list(table: &Table, all: bool, now: Instant) -> Vec<MappingView> {
    let mut views = Vec::new();
    for (key, m) in table.mappings() {
        let port_key = PortKey::new(key.protocol(), key.port());
        let pinhole = match key {
            MappingKey::Ipv4(_) => None,
            MappingKey::Ipv6Pinhole(p) => Some(p.address),
        };
        let owners: Vec<OwnerView> = m
            .sockets
            .iter()
            .filter(|c| !is_static(**c))
            .filter_map(|c| table.socket(*c))
            .map(|r| owner(&r.listener))
            .collect();
        let pinned = m.sockets.iter().find(|c| is_static(**c)).and_then(|c| table.socket(*c));
        let (state, reason, lease_left, permanent) = match (&m.state, m.sockets.is_empty()) {
            (_, true) => ("removing", Some("no socket needs it any more".to_string()), None, false),
            (MappingState::Active { expires_at, .. }, false) => match expires_at {
                Some(at) => ("mapped", None, Some(at.saturating_duration_since(now).as_secs()), false),
                None => ("mapped", None, None, true),
            },
            (MappingState::Pending { reason, .. }, false) => ("pending", Some(pending_reason(reason)), None, false),
            (MappingState::Conflict, false) => {
                let offered = table.held().find(|(k, _)| **k == port_key).and_then(|(_, h)| h.offered);
                let reason = match offered {
                    Some(o) => format!(
                        "another host holds the port on the gateway; it offered external port {o} instead, which natbinder deleted"
                    ),
                    None => "another host holds the port on the gateway".into(),
                };
                ("conflict", Some(reason), None, false)
            }
        };
        // Only IPv4 ports are held by other hosts: a pinhole opens this host's own address.
        let held = table.held().find(|(k, _)| **k == port_key && pinhole.is_none()).map(|(_, h)| *h);
        let holder = held.and_then(|h| h.holder).map(|h| h.to_string());
        views.push(MappingView {
            protocol: port_key.protocol.to_string(),
            external_port: m.external_port.unwrap_or(port_key.port),
            internal_port: port_key.port,
            state,
            static_mapping: pinned.is_some(),
            description: pinned.map(|r| r.listener.owner.comm.clone()),
            reason,
            holder: if state == "conflict" { holder } else { None },
            owners,
            lease_left_seconds: lease_left,
            permanent,
            backend: m.backend.filter(|_| state == "mapped").map(|b| b.to_string()),
            offered_port: held.and_then(|h| h.offered).filter(|_| state == "conflict"),
            pinhole_address: pinhole.map(|a| a.to_string()),
        });
    }
    let min_port = table.config().min_port;
    for record in table.sockets() {
        let l = &record.listener;
        if !record.mappings.is_empty() || l.port < min_port || !record.stack.takes_ipv4() {
            continue;
        }
        let key = PortKey::new(l.protocol, l.port);
        let disabled = table.is_disabled(key);
        let pinned = is_static(l.cookie);
        let reason = if disabled {
            DISABLED_RULE.to_string()
        } else if record.decision.forward && record.over_limit {
            format!("max-mappings-per-user: uid {} holds as many mappings as it may", l.owner.uid)
        } else {
            record.decision.rule.to_string()
        };
        let state = if disabled { "disabled" } else { "not-forwarded" };
        // Several sockets on one port that is not forwarded: one entry, every owner.
        let protocol = l.protocol.to_string();
        if let Some(v) =
            views.iter_mut().find(|v| v.state == state && v.protocol == protocol && v.external_port == l.port)
        {
            if pinned {
                v.static_mapping = true;
                v.description = Some(l.owner.comm.clone());
            } else {
                v.owners.push(owner(l));
            }
            continue;
        }
        views.push(MappingView {
            protocol,
            external_port: l.port,
            internal_port: l.port,
            state,
            static_mapping: pinned,
            description: pinned.then(|| l.owner.comm.clone()),
            reason: Some(reason),
            holder: None,
            owners: if pinned { Vec::new() } else { vec![owner(l)] },
            lease_left_seconds: None,
            permanent: false,
            backend: None,
            offered_port: None,
            pinhole_address: None,
        });
    }
    if all {
        for (key, held) in table.held() {
            if views.iter().any(|v| v.protocol == key.protocol.to_string() && v.external_port == key.port) {
                continue;
            }
            views.push(MappingView {
                protocol: key.protocol.to_string(),
                external_port: key.port,
                internal_port: key.port,
                state: "other-host",
                static_mapping: false,
                description: None,
                reason: None,
                holder: held.holder.map(|h| h.to_string()),
                owners: Vec::new(),
                lease_left_seconds: None,
                permanent: false,
                backend: None,
                offered_port: None,
                pinhole_address: None,
            });
        }
    }
    views.sort_by(|a, b| {
        (&a.protocol, a.external_port, &a.pinhole_address, a.state).cmp(&(
            &b.protocol,
            b.external_port,
            &b.pinhole_address,
            b.state,
        ))
    });
    views
}

/// The entry for `protocol`/`port` (the program's port; or the external one, where the gateway
/// chose another), if the table has one.
pub fn get(table: &Table, protocol: Protocol, port: u16, now: Instant) -> Option<MappingView> {
    let name = protocol.to_string();
    let views: Vec<MappingView> =
        list(table, true, now).into_iter().filter(|v| v.protocol == name && v.pinhole_address.is_none()).collect();
    let by_internal = views.iter().position(|v| v.internal_port == port);
    let index = by_internal.or_else(|| views.iter().position(|v| v.external_port == port))?;
    views.into_iter().nth(index)
}

/// The pinholes opened (or being opened) for `protocol`/`port`, one per address of this host.
pub fn pinholes_of(table: &Table, protocol: Protocol, port: u16, now: Instant) -> Vec<MappingView> {
    let name = protocol.to_string();
    list(table, false, now)
        .into_iter()
        .filter(|v| v.protocol == name && v.internal_port == port && v.pinhole_address.is_some())
        .collect()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub mapped: usize,
    pub pending: usize,
    pub conflict: usize,
    pub not_forwarded: usize,
    pub disabled: usize,
    pub removing: usize,
}

pub fn counts(views: &[MappingView]) -> Counts {
    let mut c = Counts::default();
    for v in views {
        match v.state {
            "mapped" => c.mapped += 1,
            "pending" => c.pending += 1,
            "conflict" => c.conflict += 1,
            "not-forwarded" => c.not_forwarded += 1,
            "disabled" => c.disabled += 1,
            "removing" => c.removing += 1,
            _ => {}
        }
    }
    c
}

/// What the daemon knows of its situation, kept up to date from the outcome stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub gateway: Option<(String, Backend)>,
    pub gateway_problem: Option<String>,
    pub external_address: Option<IpAddr>,
    pub double_nat: Option<String>,
    pub cgroup: Option<PathBuf>,
    pub policy_scope: Option<Scope>,
    pub max_mappings_per_user: u32,
    pub lost_events: u64,
    /// What the gateway in use needs for IPv6 listeners.
    pub ipv6_firewall: PinholeService,
    /// This host's addresses that pinholes are opened for.
    pub ipv6_addresses: BTreeSet<Ipv6Addr>,
}

impl Facts {
    pub fn observe(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Watching { cgroup, .. } => self.cgroup = Some(cgroup.clone()),
            Outcome::PolicyApplied { scope, max_mappings_per_user, .. } => {
                self.policy_scope = Some(scope.clone());
                self.max_mappings_per_user = *max_mappings_per_user;
            }
            Outcome::GatewayFound { gateway, backend, .. } => {
                self.gateway = Some((gateway.clone(), *backend));
                self.gateway_problem = None;
                self.double_nat = None;
            }
            Outcome::GatewayNotFound { why } => {
                self.gateway = None;
                self.gateway_problem = Some(why.clone());
            }
            Outcome::GatewayLost { why, .. } => {
                self.gateway = None;
                self.gateway_problem = Some(why.clone());
                self.external_address = None;
            }
            Outcome::ExternalAddress { address, .. } => self.external_address = Some(*address),
            Outcome::DoubleNat(d) => {
                self.double_nat = Some(match d {
                    DoubleNat::UpstreamAddress(ip) => {
                        format!("the gateway's external address {ip} is not public: another NAT is upstream")
                    }
                    DoubleNat::InBetween { detail, .. } => detail.clone(),
                })
            }
            Outcome::EventsLost { total } => self.lost_events = *total,
            Outcome::Ipv6Firewall { service, .. } => self.ipv6_firewall = service.clone(),
            Outcome::Ipv6AddressesChanged { added, deprecated, removed } => {
                self.ipv6_addresses.extend(added);
                for address in deprecated.iter().chain(removed) {
                    self.ipv6_addresses.remove(address);
                }
            }
            _ => {}
        }
    }

    pub fn status(&self, version: &str, views: &[MappingView]) -> Value {
        let scope = match &self.policy_scope {
            Some(Scope::Sessions { user_slice: true }) => "sessions",
            Some(Scope::Sessions { user_slice: false }) => "users",
            Some(Scope::Cgroup(_)) => "cgroup",
            None => "unknown",
        };
        json!({
            "version": version,
            "gateway": self.gateway.as_ref().map(|(g, _)| g),
            "backend": self.gateway.as_ref().map(|(_, b)| b.to_string()),
            "gateway_problem": self.gateway_problem,
            "external_address": self.external_address.map(|a| a.to_string()),
            "double_nat": self.double_nat,
            "cgroup": self.cgroup.as_ref().map(|c| c.display().to_string()).unwrap_or_default(),
            "policy_scope": scope,
            "max_mappings_per_user": self.max_mappings_per_user,
            "counts": counts(views),
            "lost_events": self.lost_events,
            "ipv6": {
                "firewall": match &self.ipv6_firewall {
                    PinholeService::Unknown => "unknown",
                    PinholeService::Needed => "pinholes",
                    PinholeService::FirewallOpen => "open",
                    PinholeService::Unavailable { .. } => "unavailable",
                },
                "detail": match &self.ipv6_firewall {
                    PinholeService::Unavailable { why } => Some(why.clone()),
                    _ => None,
                },
                "addresses": self.ipv6_addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            },
        })
    }
}

fn listener_json(l: &Listener) -> Value {
    json!({
        "protocol": l.protocol.to_string(),
        "port": l.port,
        "family": l.family.to_string(),
        "owner": owner(l),
    })
}

fn key_json(key: &MappingKey) -> Value {
    match key {
        MappingKey::Ipv4(k) => {
            json!({"protocol": k.protocol.to_string(), "external_port": k.port, "internal_port": k.port})
        }
        MappingKey::Ipv6Pinhole(k) => {
            json!({"protocol": k.protocol.to_string(), "port": k.port, "address": k.address.to_string()})
        }
    }
}

/// The outcome's fields, for `Watch`'s `details`.
pub fn details(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::SocketBound { listener, .. }
        | Outcome::SocketClassified { listener, .. }
        | Outcome::SocketReleased { listener, .. } => listener_json(listener),
        Outcome::NotForwarded { listener, rule } => {
            let mut v = listener_json(listener);
            v["rule"] = json!(rule.to_string());
            v
        }
        Outcome::RunStarted { pid, uid, program, cgroup } => {
            json!({"pid": pid, "uid": uid, "program": program, "cgroup": cgroup})
        }
        Outcome::BindRefused { listener, holder } => {
            let mut v = listener_json(listener);
            v["holder"] = json!(holder.map(|h| h.to_string()));
            v
        }
        Outcome::Mapped { key, external_port, internal, lease, backend, renewal, took } => json!({
            "protocol": key.protocol.to_string(),
            "external_port": external_port,
            "internal_port": internal.port(),
            "internal_address": internal.ip().to_string(),
            "lease_seconds": match lease { Lease::For(d) => Some(d.as_secs()), Lease::Permanent => None },
            "permanent": *lease == Lease::Permanent,
            "backend": backend.to_string(),
            "renewal": renewal,
            "took_ms": took.as_secs_f64() * 1e3,
        }),
        Outcome::Pending { key, reason } => {
            let mut v = key_json(key);
            v["reason"] = json!(pending_reason(reason));
            v
        }
        Outcome::Conflict { key, holder, offered } => json!({
            "protocol": key.protocol.to_string(), "external_port": key.port, "internal_port": key.port,
            "holder": holder.map(|h| h.to_string()), "offered_port": offered,
        }),
        Outcome::Removed { key, why } => json!({
            "protocol": key.protocol.to_string(), "external_port": key.port, "internal_port": key.port,
            "why": format!("{why:?}").to_lowercase(),
        }),
        Outcome::RemoveFailed { key, error } => json!({
            "protocol": key.protocol.to_string(), "external_port": key.port, "error": error,
        }),
        Outcome::PinholeOpened { key, lease, backend, renewal, took } => json!({
            "protocol": key.protocol.to_string(),
            "port": key.port,
            "address": key.address.to_string(),
            "lease_seconds": match lease { Lease::For(d) => Some(d.as_secs()), Lease::Permanent => None },
            "backend": backend.to_string(),
            "renewal": renewal,
            "took_ms": took.as_secs_f64() * 1e3,
        }),
        Outcome::PinholeClosed { key, why } => json!({
            "protocol": key.protocol.to_string(), "port": key.port, "address": key.address.to_string(),
            "why": format!("{why:?}").to_lowercase(),
        }),
        Outcome::PinholeCloseFailed { key, error } => json!({
            "protocol": key.protocol.to_string(), "port": key.port, "address": key.address.to_string(), "error": error,
        }),
        Outcome::PinholesDropped { keys } => json!({
            "pinholes": keys.iter().map(|k| format!("{}/{} [{}]", k.protocol, k.port, k.address)).collect::<Vec<_>>(),
        }),
        Outcome::Ipv6AddressesChanged { added, deprecated, removed } => json!({
            "added": added.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "deprecated": deprecated.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "removed": removed.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        }),
        Outcome::Ipv6Firewall { gateway, service } => json!({
            "gateway": gateway,
            "service": match service {
                PinholeService::Unknown => "unknown",
                PinholeService::Needed => "pinholes",
                PinholeService::FirewallOpen => "open",
                PinholeService::Unavailable { .. } => "unavailable",
            },
            "detail": match service { PinholeService::Unavailable { why } => Some(why.clone()), _ => None },
        }),
        Outcome::Dropped { keys, all } => json!({
            "mappings": keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(), "all": all,
        }),
        Outcome::GatewayFound { gateway, backend, local } => json!({
            "gateway": gateway, "backend": backend.to_string(), "local_address": local.to_string(),
        }),
        Outcome::GatewayNotFound { why } => json!({"why": why}),
        Outcome::GatewayLost { gateway, why } | Outcome::GatewayLostMappings { gateway, why } => {
            json!({"gateway": gateway, "why": why})
        }
        Outcome::ExternalAddress { address, previous } => json!({
            "address": address.to_string(), "previous": previous.map(|p| p.to_string()),
        }),
        Outcome::EventsLost { total } => json!({"total": total}),
        Outcome::ReloadRefused { error } => json!({"error": error}),
        Outcome::NeedsRestart { settings } => json!({"settings": settings}),
        Outcome::Ready { gateway, sockets, mappings } => {
            json!({"gateway": gateway, "sockets": sockets, "mappings": mappings})
        }
        Outcome::Watching { cgroup, min_port, .. } => {
            json!({"cgroup": cgroup.display().to_string(), "min_port": min_port})
        }
        Outcome::PolicyApplied { rules, kernel_entries, max_mappings_per_user, .. } => json!({
            "rules": rules, "kernel_entries": kernel_entries, "max_mappings_per_user": max_mappings_per_user,
        }),
        Outcome::DoubleNat(_) | Outcome::StormOver => json!({}),
    }
}

/// One `Watch` reply.
pub fn watch_event(event: &Event, now: Instant) -> Value {
    let age = now.saturating_duration_since(event.at);
    let wall = SystemTime::now().checked_sub(age).unwrap_or(SystemTime::now());
    json!({
        "seq": event.seq,
        "time": rfc3339(wall.duration_since(UNIX_EPOCH).unwrap_or_default()),
        "event": event.outcome.kind(),
        "text": describe(&event.outcome).1,
        "details": details(&event.outcome),
    })
}

/// UTC, to the microsecond: "2026-12-02T19:35:59.123456Z". As fine as that, so that a watcher can tell
/// when the daemon saw an event apart from when the watcher read it (the benchmarks time the daemon's
/// intake and its gateway calls from these).
pub fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since_epoch.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(Duration::from_micros(1_796_240_159_123_456)), "2026-12-02T19:35:59.123456Z");
        assert_eq!(rfc3339(Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000000Z");
    }
}
