//! What happened, as a typed stream: every decision of the table and every fact learned about the
//! gateway is published here once, in the order it was made.
//!
//! Subscribers:
//! * the log ([`log`]), called in line, so that no line is ever lost or reordered;
//! * anyone holding a [`tokio::sync::broadcast`] receiver from [`OutcomeBus::subscribe`]: the tests,
//!   the control socket (its `Watch`, and the facts behind `Status`), and `natbinder run --wait`
//!   next. A receiver that falls more than [`CAPACITY`] events behind is told so
//!   (`RecvError::Lagged`) and must read the state afresh. Events travel as `Arc<Event>`: the
//!   channel's ring holds a pointer per slot, allocated and touched up front, so its size is what
//!   a daemon with nothing to do keeps resident.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::broadcast;

use crate::{
    gateway::Backend,
    table::{Listener, MappingKey, PendingReason, PinholeKey, PinholeService, PortKey, Stack},
};

pub mod log;

/// How many published events a slow subscriber may fall behind before it is told it lagged: a
/// burst of a few thousand sockets, at a handful of outcomes each, published between two turns of
/// the subscriber's task. The ring is allocated whole at start (about 80 bytes a slot); 65,536 slots
/// of whole events kept 12.5 MiB resident in an idle daemon.
pub const CAPACITY: usize = 16_384;

/// How a socket came to the table's knowledge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Reported by the bind hook as it happened.
    Bind,
    /// Found by a sock_diag listing: bound before natbinder watched, or while its events were lost.
    Adopted,
    /// A static mapping an operator added (`natbinder add`, or restored at start).
    Static,
    /// A bind announced before it happens, by `natbinder run --wait` (a reservation).
    Announced,
}

/// How a socket's end was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Reported by the release hook (close, exit, crash).
    Released,
    /// Missing from sock_diag listings: its release event was lost.
    Missing,
    /// A static mapping an operator deleted.
    Deleted,
    /// A reservation whose socket was bound: the socket holds the mapping now.
    Claimed,
    /// A reservation no socket claimed in time (the bind failed, or was refused).
    Lapsed,
}

/// Why a mapping was removed from the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// The last socket that needed it was released.
    Released,
    /// An earlier natbinder run on this host left it, and no socket needs it.
    Leftover,
    /// It pointed elsewhere (another internal client or port): removed so that it can be made right.
    Drifted,
    /// natbinder is shutting down.
    Shutdown,
    /// The policy no longer forwards it (a reload).
    Policy,
    /// An operator turned the port off (`natbinder disable`).
    Disabled,
    /// A pinhole's address is no longer this host's to offer (gone, or about to expire).
    AddressGone,
    /// The gateway no longer needs pinholes (its IPv6 firewall is off, or another gateway serves).
    NotNeeded,
}

/// Why the host is not reachable from the internet through this gateway, although mappings work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DoubleNat {
    /// The gateway's external address is not a public one: another NAT sits upstream of it.
    UpstreamAddress(IpAddr),
    /// The gateway saw this host's requests come from another address: another NAT sits between this
    /// host and the gateway (PCP ADDRESS_MISMATCH).
    InBetween { gateway: Ipv4Addr, detail: String },
}

/// The lease a gateway granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// Ends unless renewed; renewed at half of it.
    For(Duration),
    /// Never ends on its own (gateways that take only permanent mappings): natbinder deletes it itself.
    Permanent,
}

impl Lease {
    pub fn from_granted(granted: Duration) -> Self {
        if granted.is_zero() {
            Lease::Permanent
        } else {
            Lease::For(granted)
        }
    }
}

/// One thing that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel programs are attached: binds in `cgroup` of ports >= `min_port` are followed.
    Watching {
        cgroup: PathBuf,
        min_port: u16,
        netns_cookie: u64,
    },
    /// The exposure policy in force: at start, and after each reload.
    PolicyApplied {
        scope: crate::policy::Scope,
        /// Rules in all: the administrator's, the deny list's and the scope's default.
        rules: usize,
        /// Entries the kernel programs check at bind time.
        kernel_entries: usize,
        max_mappings_per_user: u32,
    },
    /// A reload was refused (a bad configuration file); the running policy stays.
    ReloadRefused {
        error: String,
    },
    /// A reload changed settings that only a restart applies; they keep their running values.
    NeedsRestart {
        settings: Vec<String>,
    },
    /// A socket that listens on a wildcard address entered the table. `stack` is what it needs:
    /// [`Stack::Unknown`] for an AF_INET6 socket whose IPV6_V6ONLY is still being read.
    SocketBound {
        listener: Listener,
        stack: Stack,
        found: Found,
    },
    /// An AF_INET6 socket turned out dual-stack or IPv6-only.
    SocketClassified {
        listener: Listener,
        stack: Stack,
    },
    SocketReleased {
        listener: Listener,
        seen: Seen,
    },
    /// The exposure policy does not forward this socket (or not yet: its user is at their limit):
    /// it stays bound, reachable on the LAN only. `rule` says which rule decided.
    NotForwarded {
        listener: Listener,
        rule: std::sync::Arc<str>,
    },
    /// `natbinder run` put process `pid` (running `program`) in `cgroup`: its binds, and those of
    /// everything it starts, are forwarded under the policy.
    RunStarted {
        pid: u32,
        uid: u32,
        program: String,
        cgroup: String,
    },
    /// A bind failed with EADDRINUSE because another host holds the port on the gateway.
    BindRefused {
        listener: Listener,
        holder: Option<Ipv4Addr>,
    },
    /// The gateway holds the mapping (an add or a renewal succeeded).
    Mapped {
        key: PortKey,
        /// `key`'s port, unless the gateway chose another and `keep-gateway-chosen-ports` kept it.
        external_port: u16,
        internal: SocketAddrV4,
        lease: Lease,
        backend: Backend,
        renewal: bool,
        /// How long the gateway call(s) took.
        took: Duration,
    },
    /// A mapping is wanted but not on the gateway, and why.
    Pending {
        key: MappingKey,
        reason: PendingReason,
    },
    /// Another host holds the port on the gateway: the socket stays bound but cannot be reached, and
    /// further binds of the port fail with EADDRINUSE.
    Conflict {
        key: PortKey,
        holder: Option<Ipv4Addr>,
        /// The external port the gateway offered instead (NAT-PMP, PCP), which natbinder deleted.
        offered: Option<u16>,
    },
    /// Mappings of ours the gateway no longer held (checked against its table, or by renewing them).
    /// `all`: every mapping natbinder had there was gone, as after a restart.
    Dropped {
        keys: Vec<PortKey>,
        all: bool,
    },
    Removed {
        key: PortKey,
        why: Removal,
    },
    /// A delete failed; the mapping's lease will end it.
    RemoveFailed {
        key: PortKey,
        error: String,
    },
    /// The gateway's firewall lets `key` in (a pinhole opened or renewed).
    PinholeOpened {
        key: PinholeKey,
        lease: Lease,
        backend: Backend,
        renewal: bool,
        took: Duration,
    },
    PinholeClosed {
        key: PinholeKey,
        why: Removal,
    },
    /// Closing a pinhole failed; its lease will end it.
    PinholeCloseFailed {
        key: PinholeKey,
        error: String,
    },
    /// Pinholes of ours the gateway no longer held (a renewal found them gone): opened again.
    PinholesDropped {
        keys: Vec<PinholeKey>,
    },
    /// This host's IPv6 addresses that pinholes are opened for changed: `added` get pinholes,
    /// `deprecated` keep theirs but get no new ones, `removed` (gone, or about to expire) lose theirs.
    Ipv6AddressesChanged {
        added: Vec<std::net::Ipv6Addr>,
        deprecated: Vec<std::net::Ipv6Addr>,
        removed: Vec<std::net::Ipv6Addr>,
    },
    /// What the gateway in use needs for IPv6 listeners to be reached.
    Ipv6Firewall {
        gateway: String,
        service: PinholeService,
    },
    /// A gateway was found and is being used.
    GatewayFound {
        gateway: String,
        backend: Backend,
        local: Ipv4Addr,
    },
    /// The search found no gateway (reported once per distinct reason); bound sockets wait.
    GatewayNotFound {
        why: String,
    },
    /// The gateway in use stopped answering or changed; natbinder looks for it again.
    GatewayLost {
        gateway: String,
        why: String,
    },
    /// The gateway lost its mappings (its epoch went back, or it said so); all are made again.
    GatewayLostMappings {
        gateway: String,
        why: String,
    },
    /// The first check of a session is done: natbinder keeps `mappings` mappings for `sockets`
    /// sockets on `gateway`. None: no gateway was found yet, and the sockets wait for one.
    Ready {
        gateway: Option<String>,
        sockets: usize,
        mappings: usize,
    },
    ExternalAddress {
        address: IpAddr,
        previous: Option<IpAddr>,
    },
    DoubleNat(DoubleNat),
    /// Kernel events were lost (ring buffer or socket map full): new mappings wait until a sock_diag
    /// listing has set the table right. `total`: events lost since start.
    EventsLost {
        total: u64,
    },
    /// A listing found the table exact again after events were lost: new mappings resume.
    StormOver,
}

impl Outcome {
    /// The outcome's kind, as `Watch` and the journal (NATBINDER_EVENT=) name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Watching { .. } => "watching",
            Outcome::PolicyApplied { .. } => "policy-applied",
            Outcome::ReloadRefused { .. } => "reload-refused",
            Outcome::NeedsRestart { .. } => "needs-restart",
            Outcome::SocketBound { .. } => "socket-bound",
            Outcome::SocketClassified { .. } => "socket-classified",
            Outcome::SocketReleased { .. } => "socket-released",
            Outcome::NotForwarded { .. } => "not-forwarded",
            Outcome::RunStarted { .. } => "run-started",
            Outcome::BindRefused { .. } => "bind-refused",
            Outcome::Mapped { .. } => "mapped",
            Outcome::Pending { .. } => "pending",
            Outcome::Conflict { .. } => "conflict",
            Outcome::Dropped { .. } => "dropped",
            Outcome::Removed { .. } => "removed",
            Outcome::RemoveFailed { .. } => "remove-failed",
            Outcome::PinholeOpened { .. } => "pinhole-opened",
            Outcome::PinholeClosed { .. } => "pinhole-closed",
            Outcome::PinholeCloseFailed { .. } => "pinhole-close-failed",
            Outcome::PinholesDropped { .. } => "pinholes-dropped",
            Outcome::Ipv6AddressesChanged { .. } => "ipv6-addresses-changed",
            Outcome::Ipv6Firewall { .. } => "ipv6-firewall",
            Outcome::GatewayFound { .. } => "gateway-found",
            Outcome::GatewayNotFound { .. } => "gateway-not-found",
            Outcome::GatewayLost { .. } => "gateway-lost",
            Outcome::GatewayLostMappings { .. } => "gateway-lost-mappings",
            Outcome::Ready { .. } => "ready",
            Outcome::ExternalAddress { .. } => "external-address",
            Outcome::DoubleNat(_) => "double-nat",
            Outcome::EventsLost { .. } => "events-lost",
            Outcome::StormOver => "storm-over",
        }
    }
}

/// One published outcome, numbered and timed.
#[derive(Clone, Debug)]
pub struct Event {
    /// 1, 2, 3, ... in publication order.
    pub seq: u64,
    pub at: Instant,
    pub outcome: Outcome,
}

type InlineSubscriber = Box<dyn Fn(&Event) + Send + Sync>;

struct BusInner {
    sender: broadcast::Sender<Arc<Event>>,
    seq: AtomicU64,
    inline: Vec<InlineSubscriber>,
}

/// Where outcomes are published. Cheap to clone; all clones publish to the same subscribers.
#[derive(Clone)]
pub struct OutcomeBus {
    inner: Arc<BusInner>,
}

impl Default for OutcomeBus {
    fn default() -> Self {
        Self::with_log()
    }
}

impl OutcomeBus {
    /// A bus whose only in-line subscriber is the log.
    pub fn with_log() -> Self {
        Self::with_inline(vec![Box::new(|event: &Event| log::log(&event.outcome))])
    }

    /// A bus with no in-line subscriber (unit tests that read the stream themselves).
    pub fn silent() -> Self {
        Self::with_inline(Vec::new())
    }

    fn with_inline(inline: Vec<InlineSubscriber>) -> Self {
        let (sender, _) = broadcast::channel(CAPACITY);
        Self { inner: Arc::new(BusInner { sender, seq: AtomicU64::new(0), inline }) }
    }

    /// A receiver of every outcome published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.sender.subscribe()
    }

    pub fn publish(&self, outcome: Outcome) {
        let event = Event { seq: self.inner.seq.fetch_add(1, Ordering::SeqCst) + 1, at: Instant::now(), outcome };
        for subscriber in &self.inner.inline {
            subscriber(&event);
        }
        // No receiver is fine: nobody is watching.
        let _ = self.inner.sender.send(Arc::new(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_see_every_outcome_in_order_numbered() {
        let bus = OutcomeBus::silent();
        let mut rx = bus.subscribe();
        bus.publish(Outcome::StormOver);
        bus.publish(Outcome::EventsLost { total: 3 });
        let first = rx.try_recv().unwrap();
        let second = rx.try_recv().unwrap();
        assert_eq!((first.seq, &first.outcome), (1, &Outcome::StormOver));
        assert_eq!((second.seq, &second.outcome), (2, &Outcome::EventsLost { total: 3 }));
        assert!(second.at >= first.at);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_bus_without_receivers_still_publishes() {
        let bus = OutcomeBus::with_log();
        bus.publish(Outcome::StormOver);
        let mut late = bus.subscribe();
        assert!(late.try_recv().is_err(), "a late subscriber sees only what comes after it");
    }
}
