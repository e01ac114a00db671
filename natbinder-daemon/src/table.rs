//! The ideal-state table: which sockets are bound, which mappings they need, and where each mapping
//! stands on the gateway. Kernel events change the socket side; the reconciler asks it for due work
//! and records the gateway's answers. It does no I/O, so every rule here is unit-tested.
//!
//! Several sockets may need one mapping (SO_REUSEPORT, a dual-stack and an IPv4 socket, sockets
//! shared across fork have one cookie): the mapping lives while any of them does.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use crate::{kernel::BoundSocket, Protocol};

/// A gateway mapping: external port = internal port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappingKey {
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for MappingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappingState {
    /// Wanted but not (yet) on the gateway. `retry_at` paces attempts after failures.
    Pending { attempts: u32, retry_at: Instant, last_error: Option<String> },
    /// On the gateway with a lease; renewed at `renew_at` (half the lease).
    Active { renew_at: Instant, expires_at: Instant },
    /// Another host holds the port on the gateway. The socket is bound but not reachable.
    Conflict { holder: Option<Ipv4Addr> },
}

#[derive(Clone, Debug)]
pub struct Mapping {
    /// Cookies of the sockets that need this mapping; empty means it should go.
    pub sockets: BTreeSet<u64>,
    pub state: MappingState,
    /// Command name of the first socket, for the mapping's description.
    pub comm: String,
    /// The gateway may hold this mapping for us (an add succeeded and no delete since): when no socket
    /// needs it any more it must be deleted, whatever happened to later renewals.
    pub on_gateway: bool,
}

#[derive(Clone, Debug)]
pub struct SocketRecord {
    pub socket: BoundSocket,
    /// The IPv4 mapping this socket needs; None for IPv6-only sockets.
    pub mapping: Option<MappingKey>,
}

/// What the reconciler must do next for one mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    Add { key: MappingKey, comm: String },
    Renew { key: MappingKey, comm: String },
    Delete { key: MappingKey },
}

/// Stands for "never" in the schedule of a permanent mapping.
const PERMANENT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Retry pacing for mappings the gateway refused for a passing reason.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Table {
    sockets: HashMap<u64, SocketRecord>,
    mappings: BTreeMap<MappingKey, Mapping>,
}

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a bound socket. `forward_ipv4` is false for IPv6-only sockets. Returns the mapping key
    /// when this socket made a mapping wanted that was not wanted before.
    pub fn add_socket(&mut self, socket: BoundSocket, forward_ipv4: bool, now: Instant) -> Option<MappingKey> {
        let cookie = socket.cookie;
        if let Some(known) = self.sockets.get_mut(&cookie) {
            // Adopted from sock_diag first and reported by the hook since: keep the richer record.
            if known.socket.pid == 0 {
                known.socket = socket;
            }
            return None;
        }
        let key = forward_ipv4.then_some(MappingKey { protocol: socket.protocol, port: socket.port });
        let mut newly_wanted = None;
        if let Some(key) = key {
            let mapping = self.mappings.entry(key).or_insert_with(|| {
                newly_wanted = Some(key);
                Mapping {
                    sockets: BTreeSet::new(),
                    state: MappingState::Pending { attempts: 0, retry_at: now, last_error: None },
                    comm: socket.comm.clone(),
                    on_gateway: false,
                }
            });
            if mapping.sockets.is_empty() {
                newly_wanted = Some(key);
                mapping.comm = socket.comm.clone();
            }
            mapping.sockets.insert(cookie);
        }
        self.sockets.insert(cookie, SocketRecord { socket, mapping: key });
        newly_wanted
    }

    /// Forgets a released socket. Returns the mapping key if that mapping is no longer needed.
    pub fn remove_socket(&mut self, cookie: u64) -> Option<MappingKey> {
        let record = self.sockets.remove(&cookie)?;
        let key = record.mapping?;
        let mapping = self.mappings.get_mut(&key)?;
        mapping.sockets.remove(&cookie);
        if !mapping.sockets.is_empty() {
            return None;
        }
        // Never on the gateway: nothing to undo.
        if !mapping.on_gateway {
            self.mappings.remove(&key);
        }
        Some(key)
    }

    pub fn socket(&self, cookie: u64) -> Option<&SocketRecord> {
        self.sockets.get(&cookie)
    }

    pub fn mapping(&self, key: &MappingKey) -> Option<&Mapping> {
        self.mappings.get(key)
    }

    pub fn mappings(&self) -> impl Iterator<Item = (&MappingKey, &Mapping)> {
        self.mappings.iter()
    }

    pub fn sockets(&self) -> impl Iterator<Item = &SocketRecord> {
        self.sockets.values()
    }

    pub fn socket_cookies(&self) -> std::collections::HashSet<u64> {
        self.sockets.keys().copied().collect()
    }

    /// Everything due at `now`, in port order.
    pub fn due_work(&self, now: Instant) -> Vec<Work> {
        let mut work = Vec::new();
        for (key, m) in &self.mappings {
            let key = *key;
            if m.sockets.is_empty() {
                if m.on_gateway {
                    work.push(Work::Delete { key });
                }
                continue;
            }
            match &m.state {
                MappingState::Active { renew_at, .. } if *renew_at <= now => {
                    work.push(Work::Renew { key, comm: m.comm.clone() })
                }
                MappingState::Pending { retry_at, .. } if *retry_at <= now => {
                    work.push(Work::Add { key, comm: m.comm.clone() })
                }
                _ => {}
            }
        }
        work
    }

    /// When the next piece of work falls due, if any is scheduled; adds of pending mappings count only
    /// if `adds_allowed`.
    pub fn next_due(&self, adds_allowed: bool) -> Option<Instant> {
        self.mappings
            .values()
            .filter(|m| !m.sockets.is_empty())
            .filter_map(|m| match m.state {
                MappingState::Active { renew_at, .. } => Some(renew_at),
                MappingState::Pending { retry_at, .. } if adds_allowed => Some(retry_at),
                MappingState::Pending { .. } | MappingState::Conflict { .. } => None,
            })
            .min()
    }

    /// The gateway accepted an add or renewal with `lease`.
    /// A zero `lease` is a permanent mapping: never renewed (the periodic check still verifies it).
    pub fn record_mapped(&mut self, key: MappingKey, lease: Duration, now: Instant) {
        let lease = if lease.is_zero() { PERMANENT } else { lease };
        let state = MappingState::Active { renew_at: now + lease / 2, expires_at: now + lease };
        // An empty socket set stays Active so that the next pass deletes it. If the last socket went
        // while the add was in flight, remove_socket dropped the pending mapping: track it again.
        match self.mappings.get_mut(&key) {
            Some(m) => {
                m.state = state;
                m.on_gateway = true;
            }
            None => {
                let mapping = Mapping { sockets: BTreeSet::new(), state, comm: String::new(), on_gateway: true };
                self.mappings.insert(key, mapping);
            }
        }
    }

    /// The gateway refused for a passing reason: keep it pending, retry with backoff.
    /// A failed renewal keeps `on_gateway`: the old lease may still be running.
    pub fn record_failed(&mut self, key: MappingKey, error: String, now: Instant) {
        let Some(m) = self.mappings.get_mut(&key) else { return };
        if m.sockets.is_empty() {
            if !m.on_gateway {
                self.mappings.remove(&key);
            }
            return;
        }
        let attempts = match &m.state {
            MappingState::Pending { attempts, .. } => attempts + 1,
            _ => 1,
        };
        let delay = FIRST_RETRY.saturating_mul(1 << (attempts - 1).min(16)).min(MAX_RETRY);
        m.state = MappingState::Pending { attempts, retry_at: now + delay, last_error: Some(error) };
    }

    /// Another host holds the port.
    pub fn record_conflict(&mut self, key: MappingKey, holder: Option<Ipv4Addr>) {
        let Some(m) = self.mappings.get_mut(&key) else { return };
        m.on_gateway = false;
        if m.sockets.is_empty() {
            self.mappings.remove(&key);
        } else {
            m.state = MappingState::Conflict { holder };
        }
    }

    /// The mapping is gone from the gateway. If a socket wanted it again meanwhile, it is re-added.
    pub fn record_deleted(&mut self, key: MappingKey, now: Instant) {
        let Some(m) = self.mappings.get_mut(&key) else { return };
        m.on_gateway = false;
        if m.sockets.is_empty() {
            self.mappings.remove(&key);
        } else {
            m.state = MappingState::Pending { attempts: 0, retry_at: now, last_error: None };
        }
    }

    /// The gateway already holds this mapping for us (found at start-up): adopt it if wanted, and
    /// renew it now so that its lease and description are ours. Returns false if nothing wants it.
    pub fn adopt_existing(&mut self, key: MappingKey, now: Instant) -> bool {
        match self.mappings.get_mut(&key) {
            Some(m) if !m.sockets.is_empty() => {
                m.on_gateway = true;
                if !matches!(m.state, MappingState::Active { .. }) {
                    m.state = MappingState::Active { renew_at: now, expires_at: now };
                }
                true
            }
            _ => false,
        }
    }

    /// Mappings the gateway may hold for us (for shutdown).
    pub fn active_keys(&self) -> Vec<MappingKey> {
        self.mappings.iter().filter(|(_, m)| m.on_gateway).map(|(k, _)| *k).collect()
    }

    /// What the gateway holds is unknown (it was rediscovered, it may have restarted): every wanted
    /// mapping becomes pending. Unwanted ones it may still hold stay, to be deleted (deleting a mapping
    /// that is not there is harmless).
    pub fn gateway_reset(&mut self, now: Instant) {
        self.mappings.retain(|_, m| !m.sockets.is_empty() || m.on_gateway);
        for m in self.mappings.values_mut().filter(|m| !m.sockets.is_empty()) {
            if !matches!(m.state, MappingState::Conflict { .. }) {
                m.state = MappingState::Pending { attempts: 0, retry_at: now, last_error: None };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(cookie: u64, protocol: Protocol, port: u16) -> BoundSocket {
        BoundSocket::for_test(cookie, protocol, port)
    }

    const TCP8080: MappingKey = MappingKey { protocol: Protocol::Tcp, port: 8080 };

    #[test]
    fn bind_then_add_then_release_then_delete() {
        let now = Instant::now();
        let mut t = Table::new();
        assert_eq!(t.add_socket(sock(1, Protocol::Tcp, 8080), true, now), Some(TCP8080));
        assert_eq!(t.due_work(now), vec![Work::Add { key: TCP8080, comm: "server".into() }]);
        t.record_mapped(TCP8080, Duration::from_secs(3600), now);
        assert!(t.due_work(now).is_empty());
        assert_eq!(t.remove_socket(1), Some(TCP8080));
        assert_eq!(t.due_work(now), vec![Work::Delete { key: TCP8080 }]);
        t.record_deleted(TCP8080, now);
        assert!(t.mapping(&TCP8080).is_none());
        assert!(t.due_work(now).is_empty());
    }

    #[test]
    fn shared_port_lives_until_last_socket() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Udp, 9000), true, now);
        assert_eq!(t.add_socket(sock(2, Protocol::Udp, 9000), true, now), None);
        let key = MappingKey { protocol: Protocol::Udp, port: 9000 };
        t.record_mapped(key, Duration::from_secs(100), now);
        assert_eq!(t.remove_socket(1), None);
        assert!(t.due_work(now).is_empty());
        assert_eq!(t.remove_socket(2), Some(key));
        assert_eq!(t.due_work(now), vec![Work::Delete { key }]);
    }

    #[test]
    fn tcp_and_udp_on_one_port_are_separate_mappings() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 7000), true, now);
        t.add_socket(sock(2, Protocol::Udp, 7000), true, now);
        assert_eq!(t.due_work(now).len(), 2);
    }

    #[test]
    fn released_before_mapped_needs_no_delete() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 8080), true, now);
        t.remove_socket(1);
        assert!(t.due_work(now).is_empty());
        assert!(t.mapping(&TCP8080).is_none());
    }

    #[test]
    fn release_during_add_deletes_afterwards() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 8080), true, now);
        let _work = t.due_work(now); // the reconciler starts the add...
        t.remove_socket(1); // ...the socket goes meanwhile...
        t.record_mapped(TCP8080, Duration::from_secs(60), now); // ...and the add lands.
        assert_eq!(t.due_work(now), vec![Work::Delete { key: TCP8080 }]);
    }

    #[test]
    fn rebind_during_delete_adds_again() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 8080), true, now);
        t.record_mapped(TCP8080, Duration::from_secs(60), now);
        t.remove_socket(1);
        assert_eq!(t.due_work(now), vec![Work::Delete { key: TCP8080 }]);
        t.add_socket(sock(2, Protocol::Tcp, 8080), true, now);
        t.record_deleted(TCP8080, now);
        assert_eq!(t.due_work(now), vec![Work::Add { key: TCP8080, comm: "server".into() }]);
    }

    #[test]
    fn renews_at_half_lease() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 8080), true, now);
        t.record_mapped(TCP8080, Duration::from_secs(100), now);
        assert!(t.due_work(now + Duration::from_secs(49)).is_empty());
        assert_eq!(t.next_due(true), Some(now + Duration::from_secs(50)));
        assert_eq!(
            t.due_work(now + Duration::from_secs(50)),
            vec![Work::Renew { key: TCP8080, comm: "server".into() }]
        );
    }

    #[test]
    fn failures_back_off_and_keep_the_reason() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 8080), true, now);
        t.record_failed(TCP8080, "UPnP error 501".into(), now);
        assert!(t.due_work(now).is_empty());
        assert_eq!(t.due_work(now + FIRST_RETRY).len(), 1);
        t.record_failed(TCP8080, "UPnP error 501".into(), now);
        assert!(t.due_work(now + FIRST_RETRY).is_empty());
        assert_eq!(t.due_work(now + FIRST_RETRY * 2).len(), 1);
        let MappingState::Pending { last_error, attempts, .. } = &t.mapping(&TCP8080).unwrap().state else { panic!() };
        assert_eq!((last_error.as_deref(), *attempts), (Some("UPnP error 501"), 2));
        for _ in 0..40 {
            t.record_failed(TCP8080, "x".into(), now);
        }
        assert_eq!(t.next_due(true), Some(now + MAX_RETRY));
    }

    #[test]
    fn conflict_is_not_retried_and_ipv6_only_needs_nothing() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 8080), true, now);
        t.record_conflict(TCP8080, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(t.due_work(now + MAX_RETRY).is_empty());
        assert_eq!(t.add_socket(sock(2, Protocol::Tcp, 9090), false, now), None);
        assert!(t.due_work(now).is_empty());
        assert_eq!(t.remove_socket(2), None);
    }

    #[test]
    fn a_failed_renewal_still_deletes_after_release() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 8080), true, now);
        t.record_mapped(TCP8080, Duration::from_secs(100), now);
        t.record_failed(TCP8080, "timeout".into(), now + Duration::from_secs(50));
        t.remove_socket(1);
        assert_eq!(t.due_work(now + Duration::from_secs(51)), vec![Work::Delete { key: TCP8080 }]);
        assert_eq!(t.active_keys(), vec![TCP8080]);
    }

    #[test]
    fn gateway_reset_keeps_unwanted_mappings_for_deletion() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 8080), true, now);
        t.record_mapped(TCP8080, Duration::from_secs(100), now);
        t.remove_socket(1);
        t.gateway_reset(now);
        assert_eq!(t.due_work(now), vec![Work::Delete { key: TCP8080 }]);
    }

    #[test]
    fn gateway_reset_makes_everything_pending() {
        let now = Instant::now();
        let mut t = Table::new();
        t.add_socket(sock(1, Protocol::Tcp, 8080), true, now);
        t.record_mapped(TCP8080, Duration::from_secs(100), now);
        t.gateway_reset(now);
        assert_eq!(t.due_work(now), vec![Work::Add { key: TCP8080, comm: "server".into() }]);
    }
}
