//! The ideal-state table: the heart of natbinder. It decides what the gateway should hold.
//!
//! Events go in: sockets bound, released, refused (from the kernel hooks), sockets adopted and found
//! gone (from sock_diag listings), and the gateway's answers as the reconciler records them. The table
//! decides, and owns what it decided:
//! * which mappings are wanted, and which socket wants each: an IPv4 port mapping (external port =
//!   internal port) for a socket that takes IPv4, and an IPv6 firewall pinhole per global address of
//!   this host for one that takes IPv6, where the gateway's firewall needs them ([`PinholeService`]);
//! * why a wanted mapping is pending, its retries and their backoff;
//! * conflicts, with the holder, and the one record of ports other hosts hold on the gateway, which
//!   [`TableHandle`] mirrors into the kernel so that binds of them fail with EADDRINUSE;
//! * mappings the gateway dropped, and what to do about leftovers an audit found;
//! * the order of work: a new mapping never waits behind a delete.
//!
//! Every decision is published as an [`Outcome`]. The table does no I/O and knows nothing of the
//! kernel's or the gateway's types, so each rule here is unit-tested (`tests.rs`).
//!
//! Several sockets may want one mapping (SO_REUSEPORT, a dual-stack and an IPv4 socket, sockets
//! shared across fork have one cookie): the mapping lives while any of them does.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    gateway::Backend,
    outcome::{Found, Lease, Outcome, Removal, Seen},
    policy::Decision,
    Family, Protocol,
};

pub mod handle;
pub mod key;
pub mod reservations;
pub mod statics;

pub use handle::{KernelMirror, TableHandle};
pub use key::{MappingKey, PinholeKey, PortKey};
pub use reservations::{is_reservation, Reserved};
pub use statics::{is_static, static_cookie, StaticError, DISABLED_RULE};

/// Who holds a socket, as far as natbinder could tell (pid 0: not known, e.g. adopted from sock_diag
/// with no process found).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    /// The cgroup, relative to the cgroup2 root; None if it could not be told.
    pub cgroup: Option<String>,
    /// The program's executable, if it could be read before the program went.
    pub exe: Option<PathBuf>,
    /// Supplementary groups, where the policy needs them.
    pub groups: Vec<u32>,
}

/// A socket listening on a wildcard address on an explicit port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// The kernel's socket cookie: what the release is reported by.
    pub cookie: u64,
    pub protocol: Protocol,
    pub port: u16,
    pub family: Family,
    pub owner: Owner,
}

/// Which address families a listener takes traffic for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// AF_INET on 0.0.0.0.
    Ipv4,
    /// AF_INET6 on [::] with IPV6_V6ONLY off: IPv4 too.
    DualStack,
    /// AF_INET6 on [::] with IPV6_V6ONLY on.
    Ipv6Only,
    /// AF_INET6, and whether it is IPv6-only is still being read (sock_diag, off the event loop).
    Unknown,
}

impl Stack {
    /// Whether the socket takes IPv4 traffic, and so needs an IPv4 port mapping.
    pub fn takes_ipv4(self) -> bool {
        matches!(self, Stack::Ipv4 | Stack::DualStack)
    }

    /// Whether the socket takes IPv6 traffic, and so needs pinholes where the gateway firewalls IPv6.
    pub fn takes_ipv6(self) -> bool {
        matches!(self, Stack::DualStack | Stack::Ipv6Only)
    }
}

/// Whether the gateway must be asked to let IPv6 traffic in, as the reconciler learned it of the
/// gateway in use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PinholeService {
    /// Not known yet (no gateway checked): no pinhole is wanted.
    #[default]
    Unknown,
    /// The gateway firewalls inbound IPv6 and opens pinholes on request: [::] listeners want them.
    Needed,
    /// The gateway's IPv6 firewall is off: everything already reaches this host, nothing to open.
    FirewallOpen,
    /// The gateway cannot be asked (no WANIPv6FirewallControl, no IPv6 router, inbound pinholes not
    /// allowed): [::] listeners stay unreachable over IPv6 from the internet, and `why` says so.
    Unavailable { why: String },
}

/// Why a wanted mapping is not on the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingReason {
    /// Just wanted: the add is queued.
    Queued,
    /// Kernel events were lost: new mappings wait until a sock_diag listing has set the table right.
    EventStorm,
    /// A gateway was (re)found, or the gateway lost its state: it is made again.
    GatewayChanged,
    /// The gateway dropped it from its table (or a renewal showed it gone): it is made again.
    Dropped,
    /// The host that held the port let go of it: natbinder maps it now.
    HolderLeft,
    /// The port was held by another host, on a gateway that cannot list its table: asked again, in
    /// case it came free.
    RecheckHeld,
    /// The gateway refused for a passing reason; tried again after a backoff.
    Retrying { error: String, attempts: u32, retry_in: Duration },
}

/// Where a mapping stands on the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappingState {
    /// Wanted but not (yet) on the gateway; the next attempt is at `retry_at`.
    Pending { reason: PendingReason, attempts: u32, retry_at: Instant },
    /// On the gateway; renewed at `renew_at` (half the lease). `expires_at` None: permanent.
    Active { renew_at: Instant, expires_at: Option<Instant> },
    /// Another host holds the port on the gateway (the holder is in [`Table::held`]). The socket is
    /// bound but cannot be reached.
    Conflict,
}

/// How the gateway names a mapping, where that is not what natbinder names it by: IGDv2 pinholes are
/// addressed by the UniqueID the gateway returned when it made them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayHandle {
    PinholeId(u16),
}

/// See [`Table::delete_hold`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeleteHold {
    pub released_at: Instant,
    pub due: Instant,
    pub released_by: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct Mapping {
    /// Cookies of the sockets that want this mapping; empty means it should go.
    pub sockets: BTreeSet<u64>,
    pub state: MappingState,
    /// Command name of the socket that made it wanted, for the mapping's description.
    pub comm: String,
    /// The gateway may hold this mapping for us (an add succeeded and no delete since): when no socket
    /// needs it any more it must be deleted, whatever happened to later renewals.
    pub on_gateway: bool,
    /// When the last socket that wanted it went (on the kernel's clock, for a release the hook saw):
    /// its delete falls due then, unless a socket wants it again first.
    pub unwanted_since: Option<Instant>,
    pub handle: Option<GatewayHandle>,
    /// The user the mapping counts against (the uid of the socket that made it wanted).
    pub uid: u32,
    /// Why it became unwanted, when that was not its last socket's release (a reload's policy).
    pub unwanted_by: Option<Removal>,
    /// The thread whose release of the last socket made it unwanted, as the hook saw it.
    pub released_by: Option<u32>,
    /// Its delete is held until then: the thread that released it was still running (the
    /// reconciler's [`Table::hold_delete`]).
    pub delete_held_until: Option<Instant>,
    /// The protocol that last mapped it.
    pub backend: Option<Backend>,
    /// The external port the gateway chose, when it is not the internal one (kept only with
    /// `keep-gateway-chosen-ports`).
    pub external_port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct SocketRecord {
    pub listener: Listener,
    pub stack: Stack,
    /// What the exposure policy decided for it, and which rule.
    pub decision: Decision,
    /// Forwarded by the policy but waiting: its user holds as many mappings as they may. It is
    /// mapped when one of theirs goes.
    pub over_limit: bool,
    /// The mappings this socket wants: its IPv4 mapping first, then its pinholes. Empty when it
    /// wants none (not forwarded, below the minimum port, not classified yet, or no pinhole needed).
    pub mappings: Vec<MappingKey>,
}

/// How the table learned that another host holds a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// The gateway's table lists it (UPnP IGD): true until the next listing says otherwise.
    Listed,
    /// The gateway refused to map it to us (718, or another port offered by NAT-PMP/PCP), on a gateway
    /// whose table cannot be listed: believed for [`HELD_ELSEWHERE_MEMORY`].
    Refused { at: Instant },
}

/// A port another host holds on the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldElsewhere {
    /// None when the gateway did not say who.
    pub holder: Option<Ipv4Addr>,
    pub learned: Learned,
    /// The gateway that said so: what another gateway says does not count.
    pub gateway: Ipv4Addr,
    /// The external port the gateway offered instead, if it did (deleted: external = internal, or
    /// nothing).
    pub offered: Option<u16>,
}

/// How long a port another host holds is believed on gateways that cannot list their table (NAT-PMP,
/// PCP): binds of it fail with EADDRINUSE meanwhile. It is learned again, at the cost of one bind that
/// cannot be reached, when a socket next wants it.
pub const HELD_ELSEWHERE_MEMORY: Duration = Duration::from_secs(600);

/// What the reconciler must do next for one mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    Add { key: MappingKey, comm: String },
    Renew { key: MappingKey, comm: String },
    Delete { key: MappingKey },
}

impl Work {
    pub fn key(&self) -> MappingKey {
        match self {
            Work::Add { key, .. } | Work::Renew { key, .. } | Work::Delete { key } => *key,
        }
    }
}

/// What the gateway granted, as the reconciler records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The external port: the internal one, unless the gateway chose another and it was kept.
    pub external_port: u16,
    pub lease: Lease,
    /// Where an IPv4 mapping points (this host's LAN address); not used for pinholes, whose key says.
    pub internal: SocketAddrV4,
    pub backend: Backend,
    pub renewal: bool,
    pub took: Duration,
    /// How the gateway names it from now on (an IGD pinhole's UniqueID); None: as natbinder does.
    pub handle: Option<GatewayHandle>,
}

/// What a listing of the gateway's table showed, sorted by the reconciler's ownership rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Ports other hosts hold, with the holder where the gateway names one.
    pub held: Vec<(PortKey, Option<Ipv4Addr>)>,
    /// Ours, pointing at this host and port.
    pub ours_here: BTreeSet<PortKey>,
    /// Ours (by tag or journal), but pointing at another internal client or port.
    pub ours_drifted: BTreeSet<PortKey>,
}

/// Retry pacing for mappings the gateway refused for a passing reason.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// Ports below this are never mapped (nor asked for).
    pub min_port: u16,
    /// Concurrent mappings one uid may hold; 0: no limit.
    pub max_mappings_per_user: u32,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self { min_port: 1024, max_mappings_per_user: 0 }
    }
}

/// A program that closes one port binds the next at once (a port search, a restart, a BitTorrent
/// client moving on), and the gateway answers one request at a time: the new port's add, which
/// someone waits for, must go before the old port's delete, which nobody waits for (it is
/// asynchronous in the paper's design). So an add goes before a delete that fell due up to this long
/// before the add's socket was bound, both on the kernel's clock (the events carry the hook's
/// time): a program preempted between its close() and its bind(), by this daemon's own work among
/// others, binds a little after its release. Beyond it the delete goes first, so that deletes do not
/// starve behind a program that keeps binding new ports. The reconciler does its part before a
/// delete goes: it waits while the thread that released the port still runs, and has the event
/// loop read what the kernel reported (`reconcile::intake`). No fixed wait is paid on each close.
pub const ADD_FIRST_WINDOW: Duration = Duration::from_millis(10);

#[derive(Default)]
pub struct Table {
    config: TableConfig,
    sockets: HashMap<u64, SocketRecord>,
    mappings: BTreeMap<MappingKey, Mapping>,
    held: BTreeMap<PortKey, HeldElsewhere>,
    /// Set while kernel events are being lost: the table may hold sockets that are gone, so no new
    /// mapping is made until a sock_diag listing has set it right (renewals and deletes go on).
    adds_paused: bool,
    /// Decisions not yet published ([`TableHandle`] publishes them after each change).
    outbox: Vec<Outcome>,
    /// The held-elsewhere record changed since it was last mirrored.
    held_changed: bool,
    /// The users at their limit, as last mirrored.
    uids_at_limit: BTreeSet<u32>,
    /// Ports an operator turned off ([`statics`]).
    disabled: BTreeSet<PortKey>,
    /// Binds announced by `natbinder run --wait` and not yet claimed by their socket
    /// ([`reservations`]): cookie -> (the mapping, the process that will bind).
    reservations: BTreeMap<u64, (MappingKey, u32)>,
    next_reservation: u64,
    /// This host's addresses that pinholes are opened for ([`crate::host::lan6`]).
    ipv6_addresses: BTreeSet<Ipv6Addr>,
    /// Its deprecated addresses: pinholes already open for them stay, none are opened.
    ipv6_deprecated: BTreeSet<Ipv6Addr>,
    pinhole_service: PinholeService,
}

impl Table {
    pub fn new(config: TableConfig) -> Self {
        Self { config, ..Self::default() }
    }

    pub fn config(&self) -> TableConfig {
        self.config
    }

    fn publish(&mut self, outcome: Outcome) {
        self.outbox.push(outcome);
    }

    /// What was decided since the last call, in order.
    pub fn take_outcomes(&mut self) -> Vec<Outcome> {
        std::mem::take(&mut self.outbox)
    }

    /// The users at their mapping limit, if that changed since the last call.
    pub fn take_uids_at_limit_changes(&mut self) -> Option<BTreeSet<u32>> {
        let now = self.uids_at_limit();
        (now != self.uids_at_limit).then(|| {
            self.uids_at_limit = now.clone();
            now
        })
    }

    /// Users who hold as many mappings as they may.
    pub fn uids_at_limit(&self) -> BTreeSet<u32> {
        let max = self.config.max_mappings_per_user;
        if max == 0 {
            return BTreeSet::new();
        }
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for (uid, _, _) in self.forwarded_ports() {
            *counts.entry(uid).or_default() += 1;
        }
        counts.into_iter().filter(|(_, n)| *n >= max).map(|(uid, _)| uid).collect()
    }

    /// Each port a user forwards, once: its IPv4 mapping and its pinholes are one thing the user asked
    /// for (a reachable port). Allocation-free, as it runs for every socket waiting on its user's
    /// limit whenever a mapping goes.
    fn forwarded_ports(&self) -> impl Iterator<Item = (u32, Protocol, u16)> + '_ {
        let mut last_pinhole: Option<(u32, Protocol, u16)> = None;
        self.mappings.iter().filter(|(_, m)| !m.sockets.is_empty()).filter_map(move |(key, m)| {
            let port = (m.uid, key.protocol(), key.port());
            match key {
                MappingKey::Ipv4(_) => Some(port),
                // Pinholes of one port are adjacent in the map's order (protocol, port, address).
                MappingKey::Ipv6Pinhole(_) => {
                    let counted = last_pinhole == Some(port)
                        || self
                            .mappings
                            .get(&MappingKey::ipv4(port.1, port.2))
                            .is_some_and(|v4| v4.uid == m.uid && !v4.sockets.is_empty());
                    last_pinhole = Some(port);
                    (!counted).then_some(port)
                }
            }
        })
    }

    /// How many ports `uid` has forwarded (see [`Table::forwarded_ports`]).
    fn mappings_of(&self, uid: u32) -> u32 {
        self.forwarded_ports().filter(|(u, _, _)| *u == uid).count() as u32
    }

    /// Whether `uid` already forwards `key`'s port (then another key for it is not one more mapping).
    fn forwards_port(&self, uid: u32, key: MappingKey) -> bool {
        self.mappings.iter().any(|(k, m)| {
            m.uid == uid && !m.sockets.is_empty() && k.protocol() == key.protocol() && k.port() == key.port()
        })
    }

    /// The held-elsewhere record, if it changed since the last call.
    pub fn take_held_changes(&mut self) -> Option<Vec<(PortKey, HeldElsewhere)>> {
        std::mem::take(&mut self.held_changed).then(|| self.held.iter().map(|(k, h)| (*k, *h)).collect())
    }

    // ---- sockets ------------------------------------------------------------------------------

    /// A socket listens on a wildcard address. `stack`: what it takes (Unknown for an AF_INET6 socket
    /// not classified yet; [`Table::socket_classified`] follows). `decision`: the exposure policy's.
    pub fn socket_bound(&mut self, listener: Listener, stack: Stack, found: Found, decision: Decision, now: Instant) {
        let cookie = listener.cookie;
        if let Some(known) = self.sockets.get_mut(&cookie) {
            // Adopted from sock_diag first and reported by the hook since: keep the richer record.
            if known.listener.owner.pid == 0 && listener.owner.pid != 0 {
                known.listener.owner = listener.owner;
            }
            return;
        }
        self.publish(Outcome::SocketBound { listener: listener.clone(), stack, found });
        if !decision.forward && self.forwardable_port(&listener) {
            self.publish(Outcome::NotForwarded { listener: listener.clone(), rule: decision.rule.clone() });
        }
        let keys = if decision.forward { self.wanted_keys(&listener, stack) } else { Vec::new() };
        self.sockets
            .insert(cookie, SocketRecord { listener, stack, decision, over_limit: false, mappings: Vec::new() });
        self.want_all(keys, cookie, now);
    }

    /// An AF_INET6 socket was found dual-stack or IPv6-only.
    pub fn socket_classified(&mut self, cookie: u64, stack: Stack, now: Instant) {
        let Some(record) = self.sockets.get_mut(&cookie) else { return };
        if record.stack != Stack::Unknown || stack == Stack::Unknown {
            return;
        }
        record.stack = stack;
        let listener = record.listener.clone();
        let forward = record.decision.forward;
        let keys = if forward { self.wanted_keys(&listener, stack) } else { Vec::new() };
        self.publish(Outcome::SocketClassified { listener: listener.clone(), stack });
        self.want_all(keys, cookie, now);
    }

    /// Whether the listener's port is one natbinder forwards at all (not below the minimum).
    fn forwardable_port(&self, listener: &Listener) -> bool {
        listener.port >= self.config.min_port && listener.port != 0
    }

    /// The IPv4 mapping a listener on `stack` wants, if it takes IPv4.
    fn wanted_ipv4_key(&self, listener: &Listener, stack: Stack) -> Option<MappingKey> {
        (stack.takes_ipv4() && self.forwardable_port(listener))
            .then(|| MappingKey::ipv4(listener.protocol, listener.port))
    }

    /// Whether a listener on `stack` may have pinholes at all.
    fn takes_pinholes(&self, listener: &Listener, stack: Stack) -> bool {
        stack.takes_ipv6() && self.forwardable_port(listener) && self.pinhole_service == PinholeService::Needed
    }

    /// The pinholes a listener on `stack` wants: one per address, where the gateway needs them.
    fn wanted_pinholes(&self, listener: &Listener, stack: Stack) -> Vec<MappingKey> {
        if !self.takes_pinholes(listener, stack) {
            return Vec::new();
        }
        self.ipv6_addresses
            .iter()
            .map(|address| {
                MappingKey::Ipv6Pinhole(PinholeKey {
                    protocol: listener.protocol,
                    port: listener.port,
                    address: *address,
                })
            })
            .collect()
    }

    /// Everything a forwarded listener on `stack` wants: its IPv4 mapping first, then its pinholes.
    fn wanted_keys(&self, listener: &Listener, stack: Stack) -> Vec<MappingKey> {
        let mut keys: Vec<MappingKey> = self.wanted_ipv4_key(listener, stack).into_iter().collect();
        keys.extend(self.wanted_pinholes(listener, stack));
        keys
    }

    /// Socket `cookie` wants each of `keys`, in order, as long as it may (its user's limit, a disabled
    /// port stop it at the first key).
    fn want_all(&mut self, keys: Vec<MappingKey>, cookie: u64, now: Instant) {
        for key in keys {
            self.want(key, cookie, now);
            let Some(record) = self.sockets.get(&cookie) else { return };
            if !record.mappings.contains(&key) {
                return;
            }
        }
    }

    /// Socket `cookie` wants mapping `key`: the socket's record says so, and the mapping is wanted,
    /// unless it would be one more than its user may hold.
    fn want(&mut self, key: MappingKey, cookie: u64, now: Instant) {
        let Some(record) = self.sockets.get(&cookie) else { return };
        if self.disabled_for(record) {
            let listener = record.listener.clone();
            self.publish(Outcome::NotForwarded { listener, rule: Arc::from(statics::DISABLED_RULE) });
            return;
        }
        let (uid, comm) = (record.listener.owner.uid, record.listener.owner.comm.clone());
        let max = self.config.max_mappings_per_user;
        let new_for_user = !self.forwards_port(uid, key);
        if max > 0 && new_for_user && self.mappings_of(uid) >= max {
            let record = self.sockets.get_mut(&cookie).expect("looked up above");
            if !record.over_limit {
                record.over_limit = true;
                let listener = record.listener.clone();
                let rule: Arc<str> = format!(
                    "max-mappings-per-user: uid {uid} already holds {max} mappings; mapped when one of them goes"
                )
                .into();
                self.publish(Outcome::NotForwarded { listener, rule });
            }
            return;
        }
        let record = self.sockets.get_mut(&cookie).expect("looked up above");
        record.over_limit = false;
        if !record.mappings.contains(&key) {
            record.mappings.push(key);
        }
        let held = key.as_ipv4().and_then(|k| self.held.get(&k).copied());
        let reason = if self.adds_paused { PendingReason::EventStorm } else { PendingReason::Queued };
        let mut published = None;
        match self.mappings.get_mut(&key) {
            Some(m) => {
                if m.sockets.is_empty() {
                    m.comm = comm;
                    m.uid = uid;
                    m.unwanted_since = None;
                    m.unwanted_by = None;
                    m.released_by = None;
                    m.delete_held_until = None;
                    // Wanted again before its delete: it stays as it is on the gateway.
                    if let MappingState::Pending { .. } = m.state {
                        m.state = MappingState::Pending { reason: reason.clone(), attempts: 0, retry_at: now };
                        published = Some(Outcome::Pending { key, reason });
                    }
                }
                m.sockets.insert(cookie);
            }
            None => {
                let state = if held.is_some() {
                    MappingState::Conflict
                } else {
                    MappingState::Pending { reason: reason.clone(), attempts: 0, retry_at: now }
                };
                published = Some(match (held, key.as_ipv4()) {
                    (Some(h), Some(port_key)) => {
                        Outcome::Conflict { key: port_key, holder: h.holder, offered: h.offered }
                    }
                    _ => Outcome::Pending { key, reason },
                });
                let mapping = Mapping {
                    sockets: BTreeSet::from([cookie]),
                    state,
                    comm,
                    on_gateway: false,
                    unwanted_since: None,
                    handle: None,
                    uid,
                    unwanted_by: None,
                    released_by: None,
                    delete_held_until: None,
                    backend: None,
                    external_port: None,
                };
                self.mappings.insert(key, mapping);
            }
        }
        if let Some(outcome) = published {
            self.publish(outcome);
        }
        if !is_reservation(cookie) && !is_static(cookie) {
            let pid = self.sockets.get(&cookie).map_or(0, |r| r.listener.owner.pid);
            self.claim_reservations(key, pid, now);
        }
    }

    /// Sockets that waited for their user's limit get the mappings that freed up, oldest first.
    fn admit_over_limit(&mut self, now: Instant) {
        if self.config.max_mappings_per_user == 0 {
            return;
        }
        let mut waiting: Vec<(u64, Vec<MappingKey>)> = self
            .sockets
            .values()
            .filter(|r| r.over_limit)
            .map(|r| (r.listener.cookie, self.wanted_keys(&r.listener, r.stack)))
            .collect();
        waiting.sort_unstable();
        for (cookie, keys) in waiting {
            self.want_all(keys, cookie, now);
        }
    }

    /// The socket no longer wants its mapping: released (by `released_by`, where the hook saw the
    /// thread), or (`why` = Policy) the policy no longer forwards it.
    fn unwant(&mut self, cookie: u64, key: MappingKey, why: Removal, released_by: Option<u32>, now: Instant) {
        if let Some(record) = self.sockets.get_mut(&cookie) {
            record.mappings.retain(|k| *k != key);
        }
        let Some(mapping) = self.mappings.get_mut(&key) else { return };
        mapping.sockets.remove(&cookie);
        if !mapping.sockets.is_empty() {
            return;
        }
        if mapping.on_gateway {
            mapping.unwanted_since = Some(now);
            mapping.released_by = released_by;
            mapping.delete_held_until = None;
            mapping.unwanted_by = (why != Removal::Released).then_some(why);
        } else {
            // Never on the gateway: nothing to undo.
            self.mappings.remove(&key);
        }
        self.admit_over_limit(now);
    }

    /// The socket wants none of its mappings any more.
    fn unwant_all(&mut self, cookie: u64, why: Removal, now: Instant) {
        let keys = self.sockets.get(&cookie).map(|r| r.mappings.clone()).unwrap_or_default();
        for key in keys {
            self.unwant(cookie, key, why, None, now);
        }
    }

    /// The hook saw `thread` release a socket: as [`Table::socket_released`], and the mappings it
    /// leaves unwanted note the thread (see [`Table::delete_hold`]).
    pub fn socket_released_by(&mut self, cookie: u64, thread: u32, now: Instant) {
        self.release(cookie, Seen::Released, Some(thread), now);
    }

    /// A socket is gone: released (the hook saw it) or missing from sock_diag listings.
    pub fn socket_released(&mut self, cookie: u64, seen: Seen, now: Instant) {
        self.release(cookie, seen, None, now);
    }

    fn release(&mut self, cookie: u64, seen: Seen, thread: Option<u32>, now: Instant) {
        let Some(record) = self.sockets.remove(&cookie) else { return };
        self.publish(Outcome::SocketReleased { listener: record.listener, seen });
        for key in record.mappings {
            self.unwant(cookie, key, Removal::Released, thread, now);
        }
    }

    /// The policy changed (a reload): every socket is decided again with `decide`, and the limit is
    /// now `max_mappings_per_user`. Mappings the new policy no longer allows are removed (their
    /// sockets stay bound, locally); sockets it now allows are mapped. Nothing else moves.
    pub fn apply_policy(&mut self, decide: impl Fn(&Listener) -> Decision, max_mappings_per_user: u32, now: Instant) {
        self.config.max_mappings_per_user = max_mappings_per_user;
        // Static mappings are an operator's explicit choice: the policy does not apply to them.
        let mut cookies: Vec<u64> = self.sockets.keys().copied().filter(|c| !is_static(*c)).collect();
        cookies.sort_unstable();
        for cookie in &cookies {
            let record = self.sockets.get_mut(cookie).expect("listed above");
            let decision = decide(&record.listener);
            let was = std::mem::replace(&mut record.decision, decision.clone());
            if was == decision {
                continue;
            }
            let listener = record.listener.clone();
            if !decision.forward {
                record.over_limit = false;
                self.unwant_all(*cookie, Removal::Policy, now);
                if self.forwardable_port(&listener) {
                    self.publish(Outcome::NotForwarded { listener, rule: decision.rule });
                }
            }
        }
        // Then those now allowed, and those the new limit lets in, in the order they were bound.
        for cookie in cookies {
            let Some(record) = self.sockets.get(&cookie) else { continue };
            if record.decision.forward && record.mappings.is_empty() {
                let keys = self.wanted_keys(&record.listener, record.stack);
                self.want_all(keys, cookie, now);
            }
        }
    }

    /// A bind failed with EADDRINUSE in the kernel, because of the held-elsewhere record.
    pub fn bind_refused(&mut self, listener: Listener) {
        let holder = self.held.get(&PortKey::new(listener.protocol, listener.port)).and_then(|h| h.holder);
        self.publish(Outcome::BindRefused { listener, holder });
    }

    // ---- IPv6 ---------------------------------------------------------------------------------

    /// This host's addresses that pinholes are opened for changed (a new privacy address, a prefix
    /// change, an address deprecated or gone): each [::] listener gets pinholes for the new ones, and
    /// those of the old ones are closed.
    pub fn set_ipv6_addresses(&mut self, addresses: BTreeSet<Ipv6Addr>, deprecated: BTreeSet<Ipv6Addr>, now: Instant) {
        if addresses == self.ipv6_addresses && deprecated == self.ipv6_deprecated {
            return;
        }
        let added: Vec<Ipv6Addr> = addresses.difference(&self.ipv6_addresses).copied().collect();
        let newly_deprecated: Vec<Ipv6Addr> = deprecated.difference(&self.ipv6_deprecated).copied().collect();
        let removed: Vec<Ipv6Addr> = self
            .ipv6_addresses
            .union(&self.ipv6_deprecated)
            .filter(|a| !addresses.contains(a) && !deprecated.contains(a))
            .copied()
            .collect();
        self.ipv6_addresses = addresses;
        self.ipv6_deprecated = deprecated;
        self.publish(Outcome::Ipv6AddressesChanged { added, deprecated: newly_deprecated, removed });
        self.rewant_pinholes(Removal::AddressGone, now);
    }

    /// What the gateway in use needs for IPv6 (the reconciler asks it at each new session).
    pub fn set_pinhole_service(&mut self, service: PinholeService, now: Instant) {
        if service == self.pinhole_service {
            return;
        }
        self.pinhole_service = service;
        self.rewant_pinholes(Removal::NotNeeded, now);
    }

    pub fn pinhole_service(&self) -> &PinholeService {
        &self.pinhole_service
    }

    pub fn ipv6_addresses(&self) -> &BTreeSet<Ipv6Addr> {
        &self.ipv6_addresses
    }

    pub fn ipv6_deprecated(&self) -> &BTreeSet<Ipv6Addr> {
        &self.ipv6_deprecated
    }

    /// Brings every forwarded socket's pinholes in line with the addresses and the service: those no
    /// longer wanted go (`why`), new ones are wanted, in the order the sockets were bound.
    fn rewant_pinholes(&mut self, why: Removal, now: Instant) {
        let mut cookies: Vec<u64> = self.sockets.keys().copied().collect();
        cookies.sort_unstable();
        for cookie in cookies {
            let record = &self.sockets[&cookie];
            // Sockets that want nothing (not forwarded, waiting for their user's limit, disabled, not
            // classified) are settled when that changes.
            if !record.decision.forward || record.over_limit || self.disabled_for(record) {
                continue;
            }
            let wanted = self.wanted_pinholes(&record.listener, record.stack);
            // A deprecated address's pinholes stay as long as the listener may have pinholes at all.
            let keeps_deprecated = self.takes_pinholes(&record.listener, record.stack);
            let stale: Vec<MappingKey> = record
                .mappings
                .iter()
                .filter(|k| match k {
                    MappingKey::Ipv6Pinhole(p) => {
                        let kept = keeps_deprecated && self.ipv6_deprecated.contains(&p.address);
                        !(wanted.contains(k) || kept)
                    }
                    MappingKey::Ipv4(_) => false,
                })
                .copied()
                .collect();
            let new: Vec<MappingKey> = wanted.into_iter().filter(|k| !record.mappings.contains(k)).collect();
            for key in stale {
                self.unwant(cookie, key, why, None, now);
            }
            self.want_all(new, cookie, now);
        }
    }

    // ---- storms -------------------------------------------------------------------------------

    /// Kernel events were lost (`total` so far): pause new mappings until a listing sets things right.
    pub fn pause_adds(&mut self, total: u64) {
        if !self.adds_paused {
            self.adds_paused = true;
            self.publish(Outcome::EventsLost { total });
        }
    }

    /// A listing found nothing lost since the previous one: the table is exact again.
    pub fn resume_adds(&mut self) {
        if std::mem::take(&mut self.adds_paused) {
            for m in self.mappings.values_mut() {
                if let MappingState::Pending { reason: reason @ PendingReason::EventStorm, .. } = &mut m.state {
                    *reason = PendingReason::Queued;
                }
            }
            self.publish(Outcome::StormOver);
        }
    }

    pub fn adds_paused(&self) -> bool {
        self.adds_paused
    }

    // ---- work ---------------------------------------------------------------------------------

    /// The most urgent piece of work due at `now`. New mappings (someone waits for them) before any
    /// delete that fell due after them or shortly before ([`ADD_FIRST_WINDOW`]); a delete falls due
    /// when its socket went (or later, held), so the add of a port bound as another closes goes
    /// first, while deletes never starve behind a program that keeps moving. Then renewals (their
    /// leases have half their time left), then the remaining deletes.
    pub fn next_work(&self, now: Instant) -> Option<Work> {
        let mut add: Option<(Instant, MappingKey, &Mapping)> = None;
        let mut renew: Option<(Instant, MappingKey, &Mapping)> = None;
        let mut delete: Option<(Instant, MappingKey)> = None;
        for (key, m) in &self.mappings {
            if m.sockets.is_empty() {
                if m.on_gateway {
                    let due = self.delete_due(m);
                    if due <= now && delete.is_none_or(|(d, _)| due < d) {
                        delete = Some((due, *key));
                    }
                }
                continue;
            }
            match m.state {
                MappingState::Pending { retry_at, .. }
                    if !self.adds_paused && retry_at <= now && add.is_none_or(|(d, _, _)| retry_at < d) =>
                {
                    add = Some((retry_at, *key, m));
                }
                MappingState::Active { renew_at, .. }
                    if renew_at <= now && renew.is_none_or(|(d, _, _)| renew_at < d) =>
                {
                    renew = Some((renew_at, *key, m));
                }
                _ => {}
            }
        }
        if let Some((due, key, m)) = add {
            // A delete that fell due well before this add did goes first, so that deletes never
            // starve behind a program that keeps moving (its table would grow, and every add slow
            // down).
            if let Some((_, key)) = delete.filter(|(d, _)| *d + ADD_FIRST_WINDOW < due) {
                return Some(Work::Delete { key });
            }
            return Some(Work::Add { key, comm: m.comm.clone() });
        }
        if let Some((_, key, m)) = renew {
            return Some(Work::Renew { key, comm: m.comm.clone() });
        }
        delete.map(|(_, key)| Work::Delete { key })
    }

    /// For the delete of `key`, released and still on the gateway: when its socket went, when it
    /// falls due (later, if held), and the thread that released it, if the hook saw one.
    pub fn delete_hold(&self, key: &MappingKey) -> Option<DeleteHold> {
        let m = self.mappings.get(key).filter(|m| m.sockets.is_empty() && m.on_gateway)?;
        let released_at = m.unwanted_since?;
        Some(DeleteHold { released_at, due: self.delete_due(m), released_by: m.released_by })
    }

    /// Holds the delete of `key` until `until` (the thread that released it is still running): a
    /// port it binds before then is mapped first.
    pub fn hold_delete(&mut self, key: &MappingKey, until: Instant) {
        if let Some(m) = self.mappings.get_mut(key).filter(|m| m.sockets.is_empty()) {
            m.delete_held_until = Some(until);
        }
    }

    /// When an unwanted mapping's delete falls due.
    fn delete_due(&self, m: &Mapping) -> Instant {
        // Unwanted since before this table knew it (a release during its add): now.
        let due = m.unwanted_since.unwrap_or_else(Instant::now);
        m.delete_held_until.map_or(due, |held| held.max(due))
    }

    /// When the next piece of work falls due, if any is scheduled.
    pub fn next_due(&self) -> Option<Instant> {
        self.mappings
            .values()
            .filter_map(|m| {
                if m.sockets.is_empty() {
                    return m.on_gateway.then(|| self.delete_due(m));
                }
                match m.state {
                    MappingState::Active { renew_at, .. } => Some(renew_at),
                    MappingState::Pending { retry_at, .. } if !self.adds_paused => Some(retry_at),
                    MappingState::Pending { .. } | MappingState::Conflict => None,
                }
            })
            .min()
    }

    // ---- the gateway's answers ----------------------------------------------------------------

    /// The gateway accepted an add or renewal.
    pub fn record_mapped(&mut self, key: MappingKey, grant: Grant, now: Instant) {
        let (renew_at, expires_at) = match grant.lease {
            Lease::For(lease) => (now + lease / 2, Some(now + lease)),
            // Never renewed (the periodic check still verifies it).
            Lease::Permanent => (now + Duration::from_secs(100 * 365 * 24 * 3600), None),
        };
        let state = MappingState::Active { renew_at, expires_at };
        match self.mappings.get_mut(&key) {
            Some(m) => {
                m.state = state;
                m.on_gateway = true;
                m.backend = Some(grant.backend);
                m.external_port = (grant.external_port != key.port()).then_some(grant.external_port);
                if grant.handle.is_some() {
                    m.handle = grant.handle;
                }
            }
            // The last socket went while the add was in flight, and took the pending mapping with it:
            // track it again so that it is deleted.
            None => {
                let mapping = Mapping {
                    sockets: BTreeSet::new(),
                    state,
                    comm: String::new(),
                    on_gateway: true,
                    unwanted_since: Some(now),
                    handle: grant.handle,
                    uid: 0,
                    unwanted_by: None,
                    released_by: None,
                    delete_held_until: None,
                    backend: None,
                    external_port: None,
                };
                self.mappings.insert(key, mapping);
            }
        }
        if let Some(port_key) = key.as_ipv4() {
            // Ours now, whatever was believed before.
            if self.held.remove(&port_key).is_some() {
                self.held_changed = true;
            }
            self.publish(Outcome::Mapped {
                key: port_key,
                external_port: grant.external_port,
                internal: grant.internal,
                lease: grant.lease,
                backend: grant.backend,
                renewal: grant.renewal,
                took: grant.took,
            });
        }
        if let MappingKey::Ipv6Pinhole(pinhole) = key {
            self.publish(Outcome::PinholeOpened {
                key: pinhole,
                lease: grant.lease,
                backend: grant.backend,
                renewal: grant.renewal,
                took: grant.took,
            });
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
        let retry_in = FIRST_RETRY.saturating_mul(1 << (attempts - 1).min(16)).min(MAX_RETRY);
        let reason = PendingReason::Retrying { error, attempts, retry_in };
        m.state = MappingState::Pending { reason: reason.clone(), attempts, retry_at: now + retry_in };
        self.publish(Outcome::Pending { key, reason });
    }

    /// Another host holds the port (the gateway said so when asked to map it).
    pub fn record_conflict(
        &mut self,
        key: PortKey,
        holder: Option<Ipv4Addr>,
        learned: Learned,
        gateway: Ipv4Addr,
        offered: Option<u16>,
    ) {
        self.held.insert(key, HeldElsewhere { holder, learned, gateway, offered });
        self.held_changed = true;
        let mapping_key = MappingKey::Ipv4(key);
        if let Some(m) = self.mappings.get_mut(&mapping_key) {
            m.on_gateway = false;
            if m.sockets.is_empty() {
                self.mappings.remove(&mapping_key);
            } else {
                m.state = MappingState::Conflict;
            }
        }
        self.publish(Outcome::Conflict { key, holder, offered });
    }

    /// The mapping is gone from the gateway (a delete succeeded). If a socket wants it again by now,
    /// it is made again.
    pub fn record_deleted(&mut self, key: MappingKey, why: Removal, now: Instant) {
        let why = match (why, self.mappings.get(&key).and_then(|m| m.unwanted_by)) {
            (Removal::Released, Some(by)) => by,
            _ => why,
        };
        match key {
            MappingKey::Ipv4(port_key) => self.publish(Outcome::Removed { key: port_key, why }),
            MappingKey::Ipv6Pinhole(pinhole) => self.publish(Outcome::PinholeClosed { key: pinhole, why }),
        }
        self.forget_gateway_copy(key, PendingReason::Queued, now);
    }

    /// A delete failed: the lease bounds how long the mapping outlives its socket.
    pub fn record_delete_failed(&mut self, key: MappingKey, error: String, now: Instant) {
        match key {
            MappingKey::Ipv4(port_key) => self.publish(Outcome::RemoveFailed { key: port_key, error }),
            MappingKey::Ipv6Pinhole(pinhole) => self.publish(Outcome::PinholeCloseFailed { key: pinhole, error }),
        }
        self.forget_gateway_copy(key, PendingReason::Queued, now);
    }

    fn forget_gateway_copy(&mut self, key: MappingKey, reason: PendingReason, now: Instant) {
        let Some(m) = self.mappings.get_mut(&key) else { return };
        m.on_gateway = false;
        m.handle = None;
        if m.sockets.is_empty() {
            self.mappings.remove(&key);
        } else if !matches!(m.state, MappingState::Conflict) {
            m.state = MappingState::Pending { reason: reason.clone(), attempts: 0, retry_at: now };
            self.publish(Outcome::Pending { key, reason });
        }
    }

    /// Pinholes of ours the gateway no longer holds (a renewal found them gone): opened again.
    pub fn record_pinholes_dropped(&mut self, keys: &[PinholeKey], now: Instant) {
        let dropped: Vec<PinholeKey> = keys
            .iter()
            .copied()
            .filter(|k| self.mappings.get(&MappingKey::Ipv6Pinhole(*k)).is_some_and(|m| !m.sockets.is_empty()))
            .collect();
        if dropped.is_empty() {
            return;
        }
        self.publish(Outcome::PinholesDropped { keys: dropped.clone() });
        for key in dropped {
            self.forget_gateway_copy(MappingKey::Ipv6Pinhole(key), PendingReason::Dropped, now);
        }
    }

    /// Mappings of ours the gateway no longer holds (an audit found them gone): made again.
    pub fn record_dropped(&mut self, keys: &[PortKey], now: Instant) {
        let dropped: Vec<PortKey> = keys
            .iter()
            .copied()
            .filter(|k| self.mappings.get(&MappingKey::Ipv4(*k)).is_some_and(|m| !m.sockets.is_empty()))
            .collect();
        if dropped.is_empty() {
            return;
        }
        let active = self.mappings.values().filter(|m| matches!(m.state, MappingState::Active { .. })).count();
        let all = dropped.len() == active;
        self.publish(Outcome::Dropped { keys: dropped.clone(), all });
        for key in dropped {
            self.forget_gateway_copy(MappingKey::Ipv4(key), PendingReason::Dropped, now);
        }
    }

    /// The gateway already holds this mapping for us (found at start-up): adopt it if wanted, and
    /// renew it now so that its lease and description are ours. Returns false if nothing wants it.
    pub fn adopt_existing(&mut self, key: MappingKey, now: Instant) -> bool {
        match self.mappings.get_mut(&key) {
            Some(m) if !m.sockets.is_empty() => {
                m.on_gateway = true;
                if !matches!(m.state, MappingState::Active { .. }) {
                    m.state = MappingState::Active { renew_at: now, expires_at: Some(now) };
                }
                true
            }
            _ => false,
        }
    }

    /// A pinhole an earlier run opened (the journal says, with its id): adopted if wanted, and
    /// renewed now, which also checks that the gateway still holds it. False if nothing wants it.
    pub fn adopt_pinhole(&mut self, key: PinholeKey, id: Option<u16>, now: Instant) -> bool {
        let key = MappingKey::Ipv6Pinhole(key);
        if !self.adopt_existing(key, now) {
            return false;
        }
        if let Some(m) = self.mappings.get_mut(&key) {
            m.handle = id.map(GatewayHandle::PinholeId).or(m.handle);
        }
        true
    }

    /// Every pinhole on the gateway is renewed now: the renewal is the check (the gateway says when
    /// it no longer knows one) and the repair.
    pub fn renew_pinholes_now(&mut self, now: Instant) {
        for (_, m) in
            self.mappings.iter_mut().filter(|(k, m)| matches!(k, MappingKey::Ipv6Pinhole(_)) && !m.sockets.is_empty())
        {
            if let MappingState::Active { renew_at, .. } = &mut m.state {
                *renew_at = (*renew_at).min(now);
            }
        }
    }

    /// What the gateway holds is unknown: a gateway was (re)found, or the gateway lost its state.
    /// Every wanted mapping is made again, except where a port is still believed held by another host
    /// on `gateway`; what other gateways said is forgotten. Unwanted mappings the gateway may still
    /// hold stay, to be deleted (deleting what is not there is harmless).
    pub fn gateway_reset(&mut self, gateway: Ipv4Addr, now: Instant) {
        let before = self.held.len();
        self.held.retain(|_, h| h.gateway == gateway);
        self.held_changed |= self.held.len() != before;
        let held = &self.held;
        let mut pending = Vec::new();
        self.mappings.retain(|_, m| !m.sockets.is_empty() || m.on_gateway);
        for (key, m) in self.mappings.iter_mut().filter(|(_, m)| !m.sockets.is_empty()) {
            if matches!(key, MappingKey::Ipv6Pinhole(_)) {
                // Its UniqueID named it on the gateway as it was: after a restart it names nothing,
                // or another host's pinhole.
                m.handle = None;
            }
            let still_held = key.as_ipv4().is_some_and(|k| held.contains_key(&k));
            if matches!(m.state, MappingState::Conflict) && still_held {
                continue;
            }
            let reason = PendingReason::GatewayChanged;
            m.state = MappingState::Pending { reason: reason.clone(), attempts: 0, retry_at: now };
            pending.push(Outcome::Pending { key: *key, reason });
        }
        self.outbox.extend(pending);
    }

    // ---- audits -------------------------------------------------------------------------------

    /// What a listing of `gateway`'s table means. Returns the mappings to delete, and why: at
    /// start-up, ours that no socket wants (an earlier run's); later, ours the table no longer tracks
    /// (a delete that failed); and ours that point elsewhere (made again if wanted). Also:
    /// * mappings the gateway lost are made again ([`Outcome::Dropped`]);
    /// * the held-elsewhere record becomes exactly what the gateway lists: conflicts that ended are
    ///   mapped, and wanted ports another host took become conflicts.
    pub fn audit_listing(
        &mut self,
        gateway: Ipv4Addr,
        listing: Listing,
        startup: bool,
        now: Instant,
    ) -> Vec<(PortKey, Removal)> {
        let mut stale: Vec<(PortKey, Removal)> = listing.ours_drifted.iter().map(|k| (*k, Removal::Drifted)).collect();
        for key in &listing.ours_here {
            let mapping_key = MappingKey::Ipv4(*key);
            if startup {
                if !self.adopt_existing(mapping_key, now) {
                    stale.push((*key, Removal::Leftover));
                }
            } else if !self.mappings.contains_key(&mapping_key) {
                stale.push((*key, Removal::Leftover));
            }
        }
        if !startup {
            let dropped: Vec<PortKey> = self
                .mappings
                .iter()
                .filter(|(_, m)| matches!(m.state, MappingState::Active { .. }) && !m.sockets.is_empty())
                .filter_map(|(k, _)| k.as_ipv4())
                .filter(|k| !listing.ours_here.contains(k))
                .collect();
            self.record_dropped(&dropped, now);
        }
        let listed: BTreeMap<PortKey, HeldElsewhere> = listing
            .held
            .iter()
            .map(|(k, holder)| {
                (*k, HeldElsewhere { holder: *holder, learned: Learned::Listed, gateway, offered: None })
            })
            .collect();
        if listed != self.held {
            self.held = listed;
            self.held_changed = true;
        }
        self.settle_conflicts(now, PendingReason::HolderLeft);
        stale
    }

    /// For gateways that cannot list their table: ports learned to be held elsewhere are forgotten
    /// after [`HELD_ELSEWHERE_MEMORY`], and every socket refused that way is tried again, in case the
    /// port came free.
    pub fn audit_unlisted(&mut self, now: Instant) {
        let before = self.held.len();
        self.held.retain(|_, h| match h.learned {
            Learned::Listed => true,
            Learned::Refused { at } => now.saturating_duration_since(at) < HELD_ELSEWHERE_MEMORY,
        });
        self.held_changed |= self.held.len() != before;
        let mut retried = Vec::new();
        for (key, m) in self.mappings.iter_mut() {
            if matches!(m.state, MappingState::Conflict) && !m.sockets.is_empty() {
                let reason = PendingReason::RecheckHeld;
                m.state = MappingState::Pending { reason: reason.clone(), attempts: 0, retry_at: now };
                retried.push(Outcome::Pending { key: *key, reason });
            }
        }
        self.outbox.extend(retried);
    }

    /// Every mapping on the gateway is renewed now. On gateways whose table cannot be read, a renewal
    /// is the check and the repair at once: it is idempotent, and it makes again a mapping the gateway
    /// lost without telling (a firewall reload, a restart with an epoch that kept counting).
    pub fn renew_all_now(&mut self, now: Instant) {
        for m in self.mappings.values_mut().filter(|m| !m.sockets.is_empty()) {
            if let MappingState::Active { renew_at, .. } = &mut m.state {
                *renew_at = (*renew_at).min(now);
            }
        }
    }

    /// Conflicts whose port is no longer held become pending; pending ports now held become conflicts.
    fn settle_conflicts(&mut self, now: Instant, reason: PendingReason) {
        let mut outcomes = Vec::new();
        for (key, m) in self.mappings.iter_mut().filter(|(_, m)| !m.sockets.is_empty()) {
            let Some(port_key) = key.as_ipv4() else { continue };
            let held = self.held.get(&port_key);
            match (&m.state, held) {
                (MappingState::Conflict, None) => {
                    m.state = MappingState::Pending { reason: reason.clone(), attempts: 0, retry_at: now };
                    outcomes.push(Outcome::Pending { key: *key, reason: reason.clone() });
                }
                (MappingState::Pending { .. }, Some(h)) => {
                    m.state = MappingState::Conflict;
                    outcomes.push(Outcome::Conflict { key: port_key, holder: h.holder, offered: h.offered });
                }
                _ => {}
            }
        }
        self.outbox.extend(outcomes);
    }

    // ---- reading ------------------------------------------------------------------------------

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

    /// The cookies of the kernel's sockets in the table (static mappings and reservations are not
    /// sockets the kernel knows).
    pub fn socket_cookies(&self) -> HashSet<u64> {
        self.sockets.keys().copied().filter(|c| !is_static(*c) && !is_reservation(*c)).collect()
    }

    /// The ports other hosts hold on the gateway, as far as natbinder knows.
    pub fn held(&self) -> impl Iterator<Item = (&PortKey, &HeldElsewhere)> {
        self.held.iter()
    }

    /// Mappings the gateway may hold for us (for shutdown).
    pub fn on_gateway_keys(&self) -> Vec<MappingKey> {
        self.mappings.iter().filter(|(_, m)| m.on_gateway).map(|(k, _)| *k).collect()
    }

    /// Wanted mappings the table believes are on the gateway.
    pub fn active_wanted(&self) -> Vec<MappingKey> {
        self.mappings
            .iter()
            .filter(|(_, m)| matches!(m.state, MappingState::Active { .. }) && !m.sockets.is_empty())
            .map(|(k, _)| *k)
            .collect()
    }
}

#[cfg(test)]
mod tests;
