//! The reconciler against an in-memory gateway, on paused tokio time: every test asserts on the
//! gateway's resulting table, which is what a user sees on the router.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    sync::{broadcast, watch},
    task::JoinHandle,
    time::Instant,
};

use super::*;
use crate::{
    gateway::{
        signals::{AnnouncedBy, Announcement, SignalSender},
        Backend, Granted, MappingRequest, OpenedPinhole, PinholeRequest,
    },
    host::lan6::{Ipv6Router, Lan6},
    journal::Journal,
    outcome::{Event, Found, OutcomeBus, Seen},
    table::{
        KernelMirror, Listener, MappingState, Owner, PendingReason, PinholeKey, PinholeService, Stack, TableConfig,
        HELD_ELSEWHERE_MEMORY,
    },
    Family, Protocol,
};

const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 20);
const HOST: &str = "testbox";
const LEASE: Duration = Duration::from_secs(3600);
const INTERVAL: Duration = Duration::from_secs(600);

/// This host's global IPv6 address in the tests.
const V6_A: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10);

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

// ---------------------------------------------------------------------------------------------------
// Fakes
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum CallKind {
    Add(MappingRequest),
    Delete(Protocol, u16),
    List,
    Lookup(Protocol, u16),
    ExternalAddress,
}

#[derive(Clone, Debug)]
struct Call {
    at: Instant,
    kind: CallKind,
}

#[derive(Default)]
struct GatewayState {
    entries: BTreeMap<(Protocol, u16), GatewayEntry>,
    calls: Vec<Call>,
    /// Remaining `Refused("UPnP error 501 ActionFailed")` answers to adds of a port.
    refuse: HashMap<(Protocol, u16), u32>,
    /// Bumped when the gateway restarts (miniupnpd then listens on a new port): handles found before
    /// get `Unreachable` until the reconciler discovers the gateway again.
    generation: u64,
    /// Found by discovery but answers nothing: every call is `Unreachable`.
    dead: bool,
    /// Remaining discovery attempts that fail (no IGD answered SSDP).
    undiscoverable: u32,
    /// Lists nothing (IGD 401 on GetGenericPortMappingEntry): only lookups of single entries work.
    list_unsupported: bool,
    /// How long each answer takes (the call takes effect at once, the reply comes later).
    latency: Duration,
    /// Speaks NAT-PMP/PCP rather than UPnP IGD: the table cannot be read, and it tells of lost
    /// mappings through `news`.
    port_control: bool,
    /// Grants this lease whatever is asked (NAT-PMP/PCP gateways may grant less).
    grant: Option<Duration>,
    /// Where the gateway's signs go (the reconciler's signals), and the session of the latest handle.
    signals: Option<SignalSender>,
    session: u64,
    /// Answers adds as a PCP server behind another NAT does (ADDRESS_MISMATCH).
    behind_another_nat: bool,
    /// What it answers about its IPv6 firewall (None: it has no pinhole service).
    firewall: Option<PinholeService>,
    /// Open pinholes by UniqueID, and the next id it hands out.
    pinholes: BTreeMap<u16, crate::table::PinholeKey>,
    next_pinhole_id: u16,
}

/// An in-memory UPnP IGD. The table is keyed by (protocol, external port) and shared by every handle.
///
/// Faults it scripts:
/// * Conflict: adding a port whose entry belongs to another internal client fails with
///   `AddError::Conflict`, as IGD answers 718 ConflictInMappingEntry ([`FakeGateway::insert`] puts
///   such an entry there);
/// * Refused: the next `n` adds of a port fail with `Refused("UPnP error 501 ActionFailed")`
///   ([`FakeGateway::refuse`]);
/// * Unreachable: after [`FakeGateway::restart`] (table lost, new control port) calls through handles
///   found before fail with `Unreachable` until `discover` hands out a new one; [`FakeGateway::kill`]
///   makes every call fail so;
/// * dropped entries: [`FakeGateway::forget`] removes an entry behind the reconciler's back;
/// * failed discovery: [`FakeGateway::undiscoverable`];
/// * slow answers: [`FakeGateway::slow`], so that the table can change while a call is in flight.
///
/// Deleting works on any entry, whoever made it (as on IGDv1), so a wrongful delete shows.
///
/// As a NAT-PMP/PCP gateway ([`FakeGateway::port_control`]): the table cannot be listed or looked up,
/// leases may be cut short ([`FakeGateway::grant`]), a restart loses every mapping and its epoch says
/// so ([`FakeGateway::lose_mappings`]), or loses them with an epoch that keeps counting
/// ([`FakeGateway::lose_mappings_silently`]: a firewall reload, `system_uptime=yes`), and an upstream
/// NAT shows as ADDRESS_MISMATCH ([`FakeGateway::behind_another_nat`]).
#[derive(Clone, Default)]
struct FakeGateway {
    state: Arc<Mutex<GatewayState>>,
    generation: u64,
}

impl FakeGateway {
    fn new() -> Self {
        Self::default()
    }

    /// A handle to the gateway as it is now (what discovery returns for session `session`).
    fn discovered(&self, session: u64, signals: SignalSender) -> Result<Self, String> {
        let mut s = self.state.lock().unwrap();
        if s.undiscoverable > 0 {
            s.undiscoverable -= 1;
            return Err("no UPnP IGD answered SSDP".into());
        }
        s.session = session;
        s.signals = Some(signals);
        Ok(Self { state: self.state.clone(), generation: s.generation })
    }

    fn port_control() -> Self {
        let gw = Self::default();
        gw.state.lock().unwrap().port_control = true;
        gw
    }
    fn grant(&self, lease: Duration) {
        self.state.lock().unwrap().grant = Some(lease);
    }
    /// A NAT-PMP/PCP gateway restarts: its table is empty and its epoch tells so in the next reply.
    fn lose_mappings(&self) {
        let mut s = self.state.lock().unwrap();
        s.entries.clear();
        let signal = Signal::LostMappings { session: s.session, why: "its epoch went back".into() };
        s.signals.as_ref().expect("discovered").send(signal);
    }
    /// The gateway loses its mappings and nothing in its epoch shows it.
    fn lose_mappings_silently(&self) {
        self.state.lock().unwrap().entries.clear();
    }
    fn behind_another_nat(&self, yes: bool) {
        self.state.lock().unwrap().behind_another_nat = yes;
    }

    fn insert(&self, entry: GatewayEntry) {
        self.state.lock().unwrap().entries.insert((entry.protocol, entry.external_port), entry);
    }
    fn forget(&self, protocol: Protocol, port: u16) {
        self.state.lock().unwrap().entries.remove(&(protocol, port));
    }
    fn refuse(&self, protocol: Protocol, port: u16, times: u32) {
        self.state.lock().unwrap().refuse.insert((protocol, port), times);
    }
    fn restart(&self) {
        let mut s = self.state.lock().unwrap();
        s.entries.clear();
        s.generation += 1;
    }
    fn kill(&self) {
        self.state.lock().unwrap().dead = true;
    }
    fn undiscoverable(&self, times: u32) {
        self.state.lock().unwrap().undiscoverable = times;
    }
    fn cannot_list(&self) {
        self.state.lock().unwrap().list_unsupported = true;
    }
    fn slow(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    fn entries(&self) -> BTreeMap<(Protocol, u16), GatewayEntry> {
        self.state.lock().unwrap().entries.clone()
    }
    fn entry(&self, protocol: Protocol, port: u16) -> Option<GatewayEntry> {
        self.state.lock().unwrap().entries.get(&(protocol, port)).cloned()
    }
    fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }
    /// Every add of this port (successful or not), with when it was made.
    fn adds(&self, protocol: Protocol, port: u16) -> Vec<(Instant, MappingRequest)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c.kind {
                CallKind::Add(r) if r.protocol == protocol && r.port == port => Some((c.at, r)),
                _ => None,
            })
            .collect()
    }
    fn deletes(&self) -> Vec<(Protocol, u16)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c.kind {
                CallKind::Delete(p, port) => Some((p, port)),
                _ => None,
            })
            .collect()
    }
    fn lists(&self) -> usize {
        self.calls().iter().filter(|c| c.kind == CallKind::List).count()
    }

    /// Logs the call and says whether this handle can reach the gateway.
    /// A network round trip.
    async fn reply(&self) {
        let latency = self.state.lock().unwrap().latency;
        if latency.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(latency).await;
        }
    }

    fn enter(&self, kind: CallKind) -> Result<std::sync::MutexGuard<'_, GatewayState>, AddError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(Call { at: Instant::now(), kind });
        if s.dead || s.generation != self.generation {
            return Err(AddError::Unreachable("connection refused".into()));
        }
        Ok(s)
    }

    fn do_add(&self, r: &MappingRequest) -> Result<Granted, AddError> {
        let mut s = self.enter(CallKind::Add(r.clone()))?;
        let key = (r.protocol, r.port);
        if s.behind_another_nat {
            return Err(AddError::BehindAnotherNat("PCP result 12 ADDRESS_MISMATCH".into()));
        }
        let lease = s.grant.unwrap_or(r.lease);
        if let Some(left) = s.refuse.get_mut(&key).filter(|n| **n > 0) {
            *left -= 1;
            return Err(AddError::Refused("UPnP error 501 ActionFailed".into()));
        }
        if s.entries.get(&key).is_some_and(|e| e.internal_client != r.internal_client.to_string()) {
            return Err(AddError::Conflict);
        }
        let entry = GatewayEntry {
            protocol: r.protocol,
            external_port: r.port,
            internal_client: r.internal_client.to_string(),
            internal_port: r.port,
            description: r.description.clone(),
            lease_secs: lease.as_secs() as u32,
            enabled: true,
        };
        s.entries.insert(key, entry);
        Ok(Granted::lease(lease))
    }
}

impl FakeGateway {
    /// A gateway that firewalls inbound IPv6 and opens pinholes on request (WANIPv6FirewallControl).
    fn with_pinholes(self) -> Self {
        self.state.lock().unwrap().firewall = Some(PinholeService::Needed);
        self
    }
    fn pinholes(&self) -> BTreeMap<u16, crate::table::PinholeKey> {
        self.state.lock().unwrap().pinholes.clone()
    }
    /// Forgets every pinhole behind the reconciler's back (a firewall reload).
    fn forget_pinholes(&self) {
        self.state.lock().unwrap().pinholes.clear();
    }
}

impl Gateway for FakeGateway {
    async fn pinhole_service(&self, _router: Ipv6Router, _from: std::net::Ipv6Addr) -> PinholeService {
        let firewall = self.state.lock().unwrap().firewall.clone();
        firewall.unwrap_or(PinholeService::Unavailable { why: "no WANIPv6FirewallControl".into() })
    }

    async fn open_pinhole(&self, request: &PinholeRequest) -> Result<OpenedPinhole, AddError> {
        let mut s = self.state.lock().unwrap();
        s.next_pinhole_id += 1;
        let id = s.next_pinhole_id;
        s.pinholes.insert(id, request.key);
        Ok(OpenedPinhole { lease: request.lease, id: Some(id) })
    }

    async fn renew_pinhole(&self, request: &PinholeRequest, id: Option<u16>) -> Result<OpenedPinhole, AddError> {
        let s = self.state.lock().unwrap();
        match id.and_then(|id| s.pinholes.get(&id)) {
            Some(key) if *key == request.key => Ok(OpenedPinhole { lease: request.lease, id }),
            _ => Err(AddError::Gone("UPnP error 704 NoSuchEntry".into())),
        }
    }

    async fn close_pinhole(&self, _request: &PinholeRequest, id: Option<u16>) -> Result<(), AddError> {
        if let Some(id) = id {
            self.state.lock().unwrap().pinholes.remove(&id);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("fake IGD at {ROUTER}")
    }

    fn backend(&self) -> Backend {
        if self.state.lock().unwrap().port_control {
            Backend::Pcp
        } else {
            Backend::Upnp
        }
    }

    fn can_read_table(&self) -> bool {
        !self.state.lock().unwrap().port_control
    }

    async fn add(&self, request: &MappingRequest) -> Result<Granted, AddError> {
        let result = self.do_add(request);
        self.reply().await;
        result
    }

    async fn delete(&self, protocol: Protocol, port: u16) -> Result<(), AddError> {
        let result = self.enter(CallKind::Delete(protocol, port)).map(|mut s| {
            s.entries.remove(&(protocol, port));
        });
        self.reply().await;
        result
    }

    async fn list(&self) -> Result<Vec<GatewayEntry>, AddError> {
        let result = self.enter(CallKind::List).and_then(|s| {
            if s.port_control {
                Err(AddError::Unsupported("PCP cannot list the gateway's mappings"))
            } else if s.list_unsupported {
                Err(AddError::Refused("UPnP error 401 Invalid Action".into()))
            } else {
                Ok(s.entries.values().cloned().collect())
            }
        });
        self.reply().await;
        result
    }

    async fn lookup(&self, protocol: Protocol, port: u16) -> Result<Option<GatewayEntry>, AddError> {
        let result = self.enter(CallKind::Lookup(protocol, port)).and_then(|s| {
            if s.port_control {
                Err(AddError::Unsupported("PCP cannot look up a mapping"))
            } else {
                Ok(s.entries.get(&(protocol, port)).cloned())
            }
        });
        self.reply().await;
        result
    }

    async fn external_address(&self) -> Result<Option<IpAddr>, AddError> {
        let result = self.enter(CallKind::ExternalAddress).map(|_| Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))));
        self.reply().await;
        result
    }
}

/// The kernel's EADDRINUSE map as the table mirrors it.
#[derive(Clone, Default)]
struct FakeMirror(Arc<Mutex<HeldMap>>);

/// (protocol, port) -> holder, as the kernel map holds it.
type HeldMap = BTreeMap<(Protocol, u16), Option<Ipv4Addr>>;

impl FakeMirror {
    fn held(&self) -> HeldMap {
        self.0.lock().unwrap().clone()
    }
}

impl KernelMirror for FakeMirror {
    fn mirror(&self, held: &BTreeMap<PortKey, Option<Ipv4Addr>>) {
        *self.0.lock().unwrap() = held.iter().map(|(k, h)| ((k.protocol, k.port), *h)).collect();
    }
}

// ---------------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------------

fn config() -> ReconcilerConfig {
    ReconcilerConfig {
        lease: LEASE,
        interval: INTERVAL,
        shutdown_grace: Duration::from_secs(5),
        keep_gateway_chosen_ports: false,
    }
}

fn lan() -> LanInfo {
    LanInfo { gateway: ROUTER, local: LOCAL, interface_index: 2 }
}

/// A plain IPv4 server socket, as the bind hook reports it.
fn sock(cookie: u64, protocol: Protocol, port: u16) -> Listener {
    Listener {
        cookie,
        protocol,
        port,
        family: Family::Ipv4,
        owner: Owner { pid: 4242, uid: 1000, gid: 1000, cgroup_id: 1, comm: "server".into(), ..Owner::default() },
    }
}

fn entry(protocol: Protocol, port: u16, client: Ipv4Addr, description: &str) -> GatewayEntry {
    GatewayEntry {
        protocol,
        external_port: port,
        internal_client: client.to_string(),
        internal_port: port,
        description: description.into(),
        lease_secs: 0,
        enabled: true,
    }
}

fn key(protocol: Protocol, port: u16) -> MappingKey {
    MappingKey::ipv4(protocol, port)
}

/// Lets the reconciler run until it waits (paused time only moves once every task is idle). Longer
/// than a delete is held for the thread that released its port, so that a release's delete has
/// happened.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

async fn sleep(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

fn secs(d: Duration) -> u64 {
    d.as_secs_f64().round() as u64
}

struct Harness {
    table: TableHandle,
    mirror: FakeMirror,
    signals: Signals,
    outcomes: broadcast::Receiver<Arc<Event>>,
    discoveries: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Harness {
    /// Starts `Reconciler::run` with `bound` already in the table (sockets found at start-up).
    fn start_with(gateway: &FakeGateway, config: ReconcilerConfig, bound: &[Listener]) -> Self {
        Self::start_with_journal(gateway, config, bound, Journal::in_memory())
    }

    fn start_with_journal(
        gateway: &FakeGateway,
        config: ReconcilerConfig,
        bound: &[Listener],
        journal: Journal,
    ) -> Self {
        Self::start_full(gateway, config, bound, journal, None)
    }

    /// With an event loop that reads the kernel's events only when the reconciler asks.
    fn start_with_intake(gateway: &FakeGateway, intake: intake::IntakeFlush) -> Self {
        Self::start_full(gateway, config(), &[], Journal::in_memory(), Some(intake))
    }

    fn start_full(
        gateway: &FakeGateway,
        config: ReconcilerConfig,
        bound: &[Listener],
        journal: Journal,
        intake: Option<intake::IntakeFlush>,
    ) -> Self {
        let bus = OutcomeBus::silent();
        let outcomes = bus.subscribe();
        let mirror = FakeMirror::default();
        let table = TableHandle::new(TableConfig::default(), bus, mirror.clone());
        for socket in bound {
            table.update(|t| {
                t.socket_bound(socket.clone(), Stack::Ipv4, Found::Adopted, forwarded(), Instant::now().into_std())
            });
        }
        let signals = Signals::new();
        let discoveries = Arc::new(AtomicUsize::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let lan6 = Lan6 {
            router: Some(Ipv6Router { address: "fe80::1".parse().unwrap(), interface_index: 2 }),
            addresses: [V6_A].into(),
            ..Lan6::default()
        };
        table.update(|t| t.set_ipv6_addresses(lan6.addresses.clone(), Default::default(), Instant::now().into_std()));
        let mut reconciler =
            Reconciler::new(config, table.clone(), signals.clone(), Ownership::new(HOST.into(), journal))
                .with_lan6(Lan6Watch::fixed(lan6));
        if let Some(intake) = intake {
            reconciler = reconciler.with_intake(intake);
        }
        let (found, count, sender) = (gateway.clone(), discoveries.clone(), signals.sender());
        let discover = move |session: u64| {
            count.fetch_add(1, Ordering::SeqCst);
            let found = found.discovered(session, sender.clone());
            async move { found.map(|g| (g, lan())) }
        };
        let task = tokio::spawn(reconciler.run(discover, stop_rx));
        Self { table, mirror, signals, outcomes, discoveries, stop, task }
    }

    async fn start(gateway: &FakeGateway) -> Self {
        let h = Self::start_with(gateway, config(), &[]);
        settle().await;
        h
    }

    /// What the event loop does for a Bound event.
    fn bind_with(&self, socket: Listener, stack: Stack) {
        self.table.update(|t| t.socket_bound(socket, stack, Found::Bind, forwarded(), Instant::now().into_std()));
    }
    fn bind(&self, cookie: u64, protocol: Protocol, port: u16) {
        self.bind_with(sock(cookie, protocol, port), Stack::Ipv4);
    }
    /// What the event loop does for a Released event.
    fn release(&self, cookie: u64) {
        self.table.update(|t| t.socket_released(cookie, Seen::Released, Instant::now().into_std()));
    }

    /// What the event loop does for a Released event the hook saw `thread` cause.
    fn release_by(&self, cookie: u64, thread: u32) {
        self.table.update(|t| t.socket_released_by(cookie, thread, Instant::now().into_std()));
    }

    fn state(&self, protocol: Protocol, port: u16) -> Option<MappingState> {
        self.table.read(|t| t.mapping(&key(protocol, port)).map(|m| m.state.clone()))
    }
    fn held(&self) -> HeldMap {
        self.mirror.held()
    }
    fn discoveries(&self) -> usize {
        self.discoveries.load(Ordering::SeqCst)
    }
    /// Everything published since the last call.
    fn outcomes(&mut self) -> Vec<Outcome> {
        std::iter::from_fn(|| self.outcomes.try_recv().ok()).map(|e| e.outcome.clone()).collect()
    }

    /// Stops the reconciler as the daemon does at shutdown and waits for it to finish.
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the reconciler did not stop within 60 s")
            .expect("the reconciler task panicked");
    }
}

fn pending_error(state: Option<MappingState>) -> Option<String> {
    match state {
        Some(MappingState::Pending { reason: PendingReason::Retrying { error, .. }, .. }) => Some(error),
        _ => None,
    }
}

fn assert_ours(e: &GatewayEntry, port: u16) {
    assert_eq!(e.external_port, port);
    assert_eq!(e.internal_port, port, "external port = internal port");
    assert_eq!(e.internal_client, LOCAL.to_string());
    assert_eq!(e.lease_secs as u64, LEASE.as_secs(), "finite lease as configured");
    assert!(e.description.starts_with(&format!("natbinder@{HOST} ")), "description {:?}", e.description);
    assert!(e.enabled);
}

// ---------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn bound_socket_becomes_a_mapping() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    assert!(gw.entries().is_empty());

    h.bind(1, TCP, 8080);
    settle().await;

    let entries = gw.entries();
    assert_eq!(entries.len(), 1);
    let e = &entries[&(TCP, 8080)];
    assert_ours(e, 8080);
    assert_eq!(e.description, "natbinder@testbox server");
    assert!(matches!(h.state(TCP, 8080), Some(MappingState::Active { .. })));
    assert!(h.held().is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn tcp_and_udp_are_separate_mappings_and_ipv6_only_or_low_ports_map_nothing() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 7000);
    h.bind(2, UDP, 7000);
    let mut v6only = sock(3, TCP, 7001);
    v6only.family = Family::Ipv6;
    h.bind_with(v6only, Stack::Ipv6Only);
    // A [::] socket still being classified wants nothing yet; once dual-stack, its IPv4 mapping.
    let mut dual = sock(5, UDP, 7002);
    dual.family = Family::Ipv6;
    h.bind_with(dual, Stack::Unknown);
    settle().await;
    assert!(gw.adds(UDP, 7002).is_empty(), "mapped before it was known to take IPv4");
    h.table.update(|t| t.socket_classified(5, Stack::DualStack, Instant::now().into_std()));
    h.bind(4, TCP, 80); // below min_port
    settle().await;

    let ports: Vec<_> = gw.entries().into_keys().collect();
    assert_eq!(ports, vec![(TCP, 7000), (UDP, 7000), (UDP, 7002)]);
    assert!(gw.adds(TCP, 80).is_empty(), "a port below min_port must not even be asked for");
    assert!(gw.adds(TCP, 7001).is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn release_deletes_the_mapping() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    settle().await;
    assert!(gw.entry(TCP, 8080).is_some());

    h.release(1);
    settle().await;
    assert!(gw.entries().is_empty());
    assert_eq!(gw.deletes(), vec![(TCP, 8080)]);
    assert!(h.state(TCP, 8080).is_none(), "the table forgets a deleted mapping");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn socket_released_while_its_add_is_in_flight_is_deleted() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    gw.slow(Duration::from_millis(50));
    h.bind(1, TCP, 8080);
    settle().await; // the add has reached the gateway; its answer is on the way
    assert_eq!(gw.adds(TCP, 8080).len(), 1);
    h.release(1);

    sleep(1).await;
    assert!(gw.entries().is_empty(), "a mapping for a closed socket was left on the gateway");
    assert_eq!(gw.deletes(), vec![(TCP, 8080)]);
    assert!(h.state(TCP, 8080).is_none());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shared_port_keeps_one_mapping_until_the_last_socket_goes() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    h.bind(1, UDP, 9000);
    h.bind(2, UDP, 9000);
    settle().await;
    assert_eq!(gw.adds(UDP, 9000).len(), 1, "one mapping for both sockets");

    h.release(1);
    settle().await;
    assert_ours(&gw.entry(UDP, 9000).expect("still needed by socket 2"), 9000);
    assert!(gw.deletes().is_empty());

    h.release(2);
    settle().await;
    assert!(gw.entries().is_empty());
    assert_eq!(gw.deletes(), vec![(UDP, 9000)]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_the_lease() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    settle().await;
    let first = gw.adds(TCP, 8080)[0].0;

    tokio::time::sleep_until(first + LEASE / 2 - Duration::from_secs(1)).await;
    assert_eq!(gw.adds(TCP, 8080).len(), 1, "no renewal before half the lease");

    sleep(2).await;
    let adds = gw.adds(TCP, 8080);
    assert_eq!(adds.len(), 2, "renewed at half the lease");
    assert_eq!(secs(adds[1].0 - first), LEASE.as_secs() / 2);
    assert_eq!(adds[1].1, adds[0].1, "the renewal asks for the same mapping and lease");
    assert_ours(&gw.entry(TCP, 8080).unwrap(), 8080);

    // And again half a lease later: the mapping never lapses while the socket lives.
    tokio::time::sleep_until(first + LEASE + Duration::from_secs(1)).await;
    assert_eq!(gw.adds(TCP, 8080).len(), 3);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn conflict_blocks_the_port_and_is_not_retried() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    // Another host takes the port after our start-up check, before our socket binds.
    let theirs = entry(TCP, 8080, OTHER, "Plex");
    gw.insert(theirs.clone());

    h.bind(1, TCP, 8080);
    settle().await;
    assert_eq!(h.held(), BTreeMap::from([((TCP, 8080), Some(OTHER))]));
    assert_eq!(h.state(TCP, 8080), Some(MappingState::Conflict));
    assert_eq!(gw.entry(TCP, 8080), Some(theirs.clone()), "the other host's entry is untouched");

    // Hours later, through renewals' and checks' times: never retried, never touched, still blocked.
    sleep(3 * LEASE.as_secs()).await;
    assert_eq!(gw.adds(TCP, 8080).len(), 1);
    assert!(gw.deletes().is_empty());
    assert_eq!(gw.entry(TCP, 8080), Some(theirs));
    assert_eq!(h.held().get(&(TCP, 8080)), Some(&Some(OTHER)));

    // Releasing our socket must not delete their entry either.
    h.release(1);
    settle().await;
    h.stop().await;
    assert!(gw.deletes().is_empty());
    assert_eq!(gw.entries().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn conflict_that_ends_is_mapped_at_the_next_check() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    gw.insert(entry(TCP, 8080, OTHER, "Plex"));
    h.bind(1, TCP, 8080);
    settle().await;
    assert!(matches!(h.state(TCP, 8080), Some(MappingState::Conflict)));

    gw.forget(TCP, 8080); // the other host lets go
    sleep(INTERVAL.as_secs() + 1).await;
    assert_ours(&gw.entry(TCP, 8080).expect("mapped once the port is free"), 8080);
    assert!(h.held().is_empty(), "no longer held elsewhere");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refused_is_retried_with_backoff_until_it_succeeds() {
    let gw = FakeGateway::new();
    gw.refuse(TCP, 8080, 3);
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    settle().await;
    assert!(gw.entry(TCP, 8080).is_none());
    assert!(matches!(h.state(TCP, 8080), Some(MappingState::Pending { attempts: 1, .. })));
    assert!(pending_error(h.state(TCP, 8080)).is_some_and(|e| e.contains("501")));

    sleep(10).await;
    let times: Vec<Instant> = gw.adds(TCP, 8080).into_iter().map(|(at, _)| at).collect();
    assert_eq!(times.len(), 4, "three refusals, then success");
    let gaps: Vec<u64> = times.windows(2).map(|w| secs(w[1] - w[0])).collect();
    assert_eq!(gaps, vec![1, 2, 4], "exponential backoff");
    assert_ours(&gw.entry(TCP, 8080).unwrap(), 8080);
    assert!(matches!(h.state(TCP, 8080), Some(MappingState::Active { .. })));
    assert!(h.held().is_empty(), "a refusal is not a conflict");
    assert_eq!(h.discoveries(), 1, "a refusal is not a lost gateway");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn unreachable_gateway_is_rediscovered_and_mappings_readded() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    settle().await;
    assert!(gw.entry(TCP, 8080).is_some());
    assert_eq!(h.discoveries(), 1);

    // The router restarts: its table is gone and the old control URL refuses connections.
    gw.restart();
    h.bind(2, UDP, 9000);
    sleep(5).await;

    assert_eq!(h.discoveries(), 2, "Unreachable makes the reconciler discover the gateway again");
    let entries = gw.entries();
    assert_eq!(entries.keys().copied().collect::<Vec<_>>(), vec![(TCP, 8080), (UDP, 9000)]);
    assert_ours(&entries[&(TCP, 8080)], 8080);
    assert_ours(&entries[&(UDP, 9000)], 9000);
    assert_eq!(gw.adds(TCP, 8080).len(), 2, "the old mapping was re-added");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_discovery_is_retried_and_waiting_sockets_get_mapped() {
    let gw = FakeGateway::new();
    gw.undiscoverable(2);
    let h = Harness::start_with(&gw, config(), &[sock(1, TCP, 8080)]);
    settle().await;
    assert!(gw.calls().is_empty());

    sleep(4).await; // retries after 1 s and 2 s more
    assert_eq!(h.discoveries(), 3);
    assert_ours(&gw.entry(TCP, 8080).expect("mapped once the gateway is found"), 8080);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn gateway_that_is_found_but_never_answers_is_not_hammered() {
    let gw = FakeGateway::new();
    gw.kill();
    let h = Harness::start_with(&gw, config(), &[sock(1, TCP, 8080)]);
    // Without a pause between rediscoveries this loops without ever letting time move.
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert!(h.discoveries() <= 2, "rediscovered {} times without time passing", h.discoveries());

    sleep(120).await;
    let n = h.discoveries();
    assert!((3..=10).contains(&n), "{n} discoveries in two minutes: expected a backoff");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn startup_cleans_our_leftovers_adopts_wanted_ones_and_leaves_the_rest() {
    let gw = FakeGateway::new();
    let leftover = entry(TCP, 20000, LOCAL, &description(HOST, "oldprog"));
    let our_tag_other_address = entry(TCP, 20001, OTHER, &description(HOST, "oldprog"));
    let other_host_tag = entry(TCP, 20002, LOCAL, "natbinder@otherbox srv");
    let not_natbinder = entry(UDP, 20003, LOCAL, "Skype");
    let mut wanted = entry(TCP, 20004, LOCAL, &description(HOST, "web"));
    wanted.lease_secs = 120;
    for e in [&leftover, &our_tag_other_address, &other_host_tag, &not_natbinder, &wanted] {
        gw.insert(e.clone());
    }

    let h = Harness::start_with(&gw, config(), &[sock(1, TCP, 20004)]);
    settle().await;

    assert_eq!(gw.deletes(), vec![(TCP, 20000)], "only our leftover with no socket is deleted");
    assert_eq!(gw.entry(TCP, 20001), Some(our_tag_other_address.clone()));
    assert_eq!(gw.entry(TCP, 20002), Some(other_host_tag.clone()));
    assert_eq!(gw.entry(UDP, 20003), Some(not_natbinder.clone()));
    for (p, port) in [(TCP, 20001), (TCP, 20002), (UDP, 20003)] {
        assert!(gw.adds(p, port).is_empty());
    }
    assert_eq!(h.held(), BTreeMap::from([((TCP, 20001), Some(OTHER))]), "another address holds 20001");

    // Adopted: renewed right away with our lease and description, not deleted and added.
    assert_eq!(gw.adds(TCP, 20004).len(), 1);
    let adopted = gw.entry(TCP, 20004).unwrap();
    assert_ours(&adopted, 20004);
    assert_eq!(adopted.description, "natbinder@testbox server");
    assert!(matches!(h.state(TCP, 20004), Some(MappingState::Active { .. })));

    // Later checks and shutdown do not touch the others either.
    sleep(2 * LEASE.as_secs()).await;
    h.stop().await;
    assert_eq!(gw.deletes(), vec![(TCP, 20000), (TCP, 20004)]);
    assert_eq!(
        gw.entries().into_values().collect::<Vec<_>>(),
        vec![our_tag_other_address, other_host_tag, not_natbinder]
    );
}

#[tokio::test(start_paused = true)]
async fn periodic_check_readds_a_mapping_the_gateway_dropped() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    h.bind(2, TCP, 8081);
    settle().await;
    let first = gw.adds(TCP, 8080)[0].0;
    let lists = gw.lists();

    gw.forget(TCP, 8080);
    sleep(INTERVAL.as_secs() - 10).await;
    assert!(gw.entry(TCP, 8080).is_none(), "no check yet");

    sleep(20).await;
    assert!(gw.lists() > lists, "the periodic check read the table");
    let adds = gw.adds(TCP, 8080);
    assert_eq!(adds.len(), 2, "re-added by the check");
    assert!(adds[1].0 - first < LEASE / 2, "by the check, not by the renewal");
    assert_ours(&gw.entry(TCP, 8080).unwrap(), 8080);
    assert_eq!(gw.adds(TCP, 8081).len(), 1, "mappings still there are left alone");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_gateway_that_cannot_list_is_checked_entry_by_entry() {
    let gw = FakeGateway::new();
    gw.cannot_list();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    h.bind(2, TCP, 8081);
    settle().await;
    gw.forget(TCP, 8080);
    sleep(INTERVAL.as_secs() + 10).await;
    assert_eq!(gw.adds(TCP, 8080).len(), 2, "the dropped mapping was looked up and re-added");
    assert_eq!(gw.adds(TCP, 8081).len(), 1, "the one still there was left alone");
    assert_ours(&gw.entry(TCP, 8080).unwrap(), 8080);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stop_deletes_our_mappings_and_only_ours() {
    let gw = FakeGateway::new();
    let theirs = entry(UDP, 5000, OTHER, "game console");
    gw.insert(theirs.clone());
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    h.bind(2, UDP, 9000);
    h.bind(3, UDP, 5000); // conflicts with the other host
    settle().await;
    assert_eq!(gw.entries().len(), 3);

    h.stop().await;
    assert_eq!(gw.entries().into_values().collect::<Vec<_>>(), vec![theirs]);
    let mut deleted = gw.deletes();
    deleted.sort();
    assert_eq!(deleted, vec![(TCP, 8080), (UDP, 9000)]);
}

#[test]
fn descriptions_are_sanitised_truncated_and_recognised() {
    assert_eq!(description("testbox", "nginx"), "natbinder@testbox nginx");
    assert!(is_ours("natbinder@testbox nginx", "testbox"));

    let odd_host = "my host<b>é";
    let d = description(odd_host, "web server<1>");
    assert_eq!(d, "natbinder@my_host_b__ web_server_1_");
    assert!(is_ours(&d, odd_host));

    let long_host = "kitchen-media-center.home.example.internal";
    let long_comm = "a-very-long-program-name-ü";
    let d = description(long_host, long_comm);
    assert!(d.len() <= 48, "{d:?} is {} bytes", d.len());
    assert_eq!(d, "natbinder@kitchen-media-center.hom a-very-long-p");
    assert!(is_ours(&d, long_host));

    for (host, comm) in [(odd_host, "x"), (long_host, long_comm), ("ünïcødé", "ünï cødé"), ("", "")] {
        let d = description(host, comm);
        assert!(d.starts_with(TAG_PREFIX));
        assert!(d.len() <= 48);
        assert!(d.chars().all(|c| c.is_ascii_graphic() || c == ' '), "{d:?}");
        assert_eq!(d.matches(' ').count(), 1, "{d:?}");
        assert!(is_ours(&d, host), "{d:?} should be ours on {host:?}");
    }

    assert!(!is_ours(&description("otherbox", "nginx"), "testbox"));
    assert!(!is_ours(&description("testbox2", "nginx"), "testbox"), "a longer name is another host");
    assert!(!is_ours(&description("testbox", "nginx"), "testbox2"));
    assert!(!is_ours(&description("test", "box nginx"), "testbox"));
    assert!(!is_ours("Skype", "testbox"));
    assert!(!is_ours("natbinder testbox nginx", "testbox"));
    assert!(!is_ours("NATBINDER@testbox nginx", "testbox"));
}

// ---------------------------------------------------------------------------------------------------
// NAT-PMP/PCP-like gateways: no table to read, granted leases, news of lost mappings
// ---------------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_shorter_lease_than_asked_is_renewed_at_half_of_what_was_granted() {
    let gw = FakeGateway::port_control();
    // A VPN provider's NAT-PMP gateway: 60 s, whatever is asked.
    gw.grant(Duration::from_secs(60));
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 51413);
    settle().await;
    let first = gw.adds(TCP, 51413)[0].0;
    sleep(100).await;
    let times: Vec<u64> = gw.adds(TCP, 51413).iter().map(|(at, _)| secs(*at - first)).collect();
    assert_eq!(times, vec![0, 30, 60, 90], "renewed every 30 s");
    assert!(gw.adds(TCP, 51413).iter().all(|(_, r)| r.lease == LEASE), "each renewal asks for the configured lease");
    h.stop().await;
    assert!(gw.entries().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_gateway_that_lost_its_mappings_gets_them_all_again_at_once() {
    let gw = FakeGateway::port_control();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    h.bind(2, UDP, 27015);
    settle().await;
    assert_eq!(gw.entries().len(), 2);

    sleep(10).await;
    let lost_at = Instant::now();
    gw.lose_mappings();
    settle().await;
    assert_eq!(gw.entries().len(), 2, "both mappings made again");
    for (p, port) in [(TCP, 8080), (UDP, 27015)] {
        let adds = gw.adds(p, port);
        assert_eq!(adds.len(), 2);
        assert!(adds[1].0 - lost_at < Duration::from_millis(10), "re-added at once, not at the next renewal");
    }
    assert_eq!(h.discoveries(), 1, "the same gateway keeps serving: no new search");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_port_held_elsewhere_is_learned_from_the_refusal_retried_at_checks_and_forgotten_later() {
    let gw = FakeGateway::port_control();
    let h = Harness::start(&gw).await;
    let theirs = entry(TCP, 6881, OTHER, "");
    gw.insert(theirs.clone());

    h.bind(1, TCP, 6881);
    settle().await;
    assert_eq!(h.state(TCP, 6881), Some(MappingState::Conflict));
    assert_eq!(h.held(), BTreeMap::from([((TCP, 6881), None)]), "later binds fail");

    // Each check tries again, in case the port came free; the block stays while it is still held.
    sleep(INTERVAL.as_secs() + 1).await;
    assert_eq!(gw.adds(TCP, 6881).len(), 2);
    assert!(h.held().contains_key(&(TCP, 6881)));
    assert_eq!(gw.entry(TCP, 6881), Some(theirs), "the other host's mapping is untouched");

    // The other host lets go: the next check maps it, and the block goes with the check after.
    gw.forget(TCP, 6881);
    sleep(INTERVAL.as_secs()).await;
    assert!(gw.entry(TCP, 6881).is_some_and(|e| e.internal_client == LOCAL.to_string()));
    assert!(matches!(h.state(TCP, 6881), Some(MappingState::Active { .. })));
    sleep(INTERVAL.as_secs()).await;
    assert!(h.held().is_empty());

    // Learned again elsewhere; with no socket wanting it, the block is dropped after ten minutes.
    gw.insert(entry(UDP, 6882, OTHER, ""));
    h.bind(2, UDP, 6882);
    settle().await;
    h.release(2);
    settle().await;
    assert!(h.held().contains_key(&(UDP, 6882)));
    sleep(HELD_ELSEWHERE_MEMORY.as_secs() + INTERVAL.as_secs()).await;
    assert!(!h.held().contains_key(&(UDP, 6882)));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn at_start_journalled_mappings_are_deleted_or_renewed_without_reading_the_table() {
    let gw = FakeGateway::port_control();
    gw.insert(entry(TCP, 20000, LOCAL, ""));
    gw.insert(entry(TCP, 20004, LOCAL, ""));
    let mut journal = Journal::in_memory();
    for port in [20000, 20004] {
        let _ = journal.record(PortKey::new(TCP, port), LOCAL, ROUTER, LEASE);
    }
    // Another gateway's journal entry is not this one's business.
    let _ = journal.record(PortKey::new(TCP, 20005), LOCAL, OTHER, LEASE);
    let h = Harness::start_with_journal(&gw, config(), &[sock(1, TCP, 20004)], journal);
    settle().await;
    assert_eq!(gw.deletes(), vec![(TCP, 20000)], "the orphan is deleted, by protocol and port");
    assert_eq!(gw.adds(TCP, 20004).len(), 1, "the wanted one is renewed");
    assert!(matches!(h.state(TCP, 20004), Some(MappingState::Active { .. })));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn another_nat_in_between_is_reported_and_retried_with_backoff() {
    let gw = FakeGateway::port_control();
    gw.behind_another_nat(true);
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    settle().await;
    match pending_error(h.state(TCP, 8080)) {
        Some(e) => assert!(e.contains("ADDRESS_MISMATCH"), "{e}"),
        None => panic!("expected a pending mapping with the reason, got {:?}", h.state(TCP, 8080)),
    }
    sleep(4).await;
    assert_eq!(gw.adds(TCP, 8080).len(), 3, "retried after 1 s and 2 s");
    gw.behind_another_nat(false);
    sleep(5).await;
    assert!(matches!(h.state(TCP, 8080), Some(MappingState::Active { .. })));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_a_gateway_that_went_silent_and_deletes_what_was_in_flight() {
    let gw = FakeGateway::port_control();
    let h = Harness::start(&gw).await;
    // NAT-PMP retransmits for two minutes to a silent gateway.
    gw.slow(Duration::from_secs(120));
    h.bind(1, TCP, 8080);
    settle().await;
    assert!(gw.entry(TCP, 8080).is_some(), "the add reached the gateway; its answer has not come back");
    let started = Instant::now();
    h.stop().await;
    assert!(started.elapsed() <= Duration::from_secs(6), "shutdown took {:?}", started.elapsed());
    assert_eq!(gw.deletes(), vec![(TCP, 8080)], "the add cut short is deleted all the same");
}

// ---------------------------------------------------------------------------------------------------
// The order of work, outcomes, signals
// ---------------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_new_mapping_never_waits_behind_the_delete_of_the_port_closed_just_before() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    settle().await;
    gw.slow(Duration::from_millis(20));
    let program = crate::host::process::current_thread(); // running whenever the reconciler looks
                                                          // A port search, or a restart: close one port and bind the next at once, twice over.
    for (old, new, port) in [(1, 2, 8081), (2, 3, 8082)] {
        h.release_by(old, program);
        // The reconciler sees the release and holds the delete while the program still runs; the
        // bind comes meanwhile (no time passes).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        h.bind(new, TCP, port);
        sleep(1).await;
    }
    let order: Vec<CallKind> = gw
        .calls()
        .into_iter()
        .map(|c| c.kind)
        .filter(|k| matches!(k, CallKind::Add(_) | CallKind::Delete(..)))
        .map(|k| match k {
            CallKind::Add(r) => CallKind::Add(MappingRequest { description: String::new(), ..r }),
            other => other,
        })
        .collect();
    let add = |port| {
        CallKind::Add(MappingRequest {
            protocol: TCP,
            port,
            internal_client: LOCAL,
            lease: LEASE,
            description: String::new(),
            accept_other_port: false,
        })
    };
    assert_eq!(
        order,
        vec![add(8080), add(8081), CallKind::Delete(TCP, 8080), add(8082), CallKind::Delete(TCP, 8081)],
        "each new port was asked for before the previous one was deleted"
    );
    assert_eq!(gw.entries().into_keys().collect::<Vec<_>>(), vec![(TCP, 8082)]);
    h.stop().await;
}

/// Adds and deletes, in the order the gateway got them.
fn adds_and_deletes(gw: &FakeGateway) -> Vec<(&'static str, u16)> {
    gw.calls()
        .into_iter()
        .filter_map(|c| match c.kind {
            CallKind::Add(r) => Some(("add", r.port)),
            CallKind::Delete(_, port) => Some(("delete", port)),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_bind_the_event_loop_has_not_read_yet_still_goes_before_the_delete_of_the_port_closed_before_it() {
    let gw = FakeGateway::new();
    let (flush, mut flush_requests) = intake::channel();
    let h = Harness::start_with_intake(&gw, flush);
    // The event loop, behind: the next bind is in the kernel's ring, read only when a flush asks.
    let (table, flushes) = (h.table.clone(), Arc::new(AtomicUsize::new(0)));
    let unread: Arc<std::sync::Mutex<Vec<(Listener, std::time::Instant)>>> = Default::default();
    let event_loop = {
        let (unread, flushes) = (unread.clone(), flushes.clone());
        tokio::spawn(async move {
            while let Some(done) = flush_requests.recv().await {
                flushes.fetch_add(1, Ordering::SeqCst);
                for (socket, at) in unread.lock().unwrap().drain(..) {
                    table.update(|t| t.socket_bound(socket, Stack::Ipv4, Found::Bind, forwarded(), at));
                }
                let _ = done.send(());
            }
        })
    };
    settle().await;
    h.bind(1, TCP, 8080);
    settle().await;
    // Closed, and the next port bound at once (paused time: no time passes); the loop has read the
    // release only, which the hook saw no thread make.
    let released = Instant::now().into_std();
    h.release(1);
    unread.lock().unwrap().push((sock(2, TCP, 8081), released));
    sleep(1).await;
    assert_eq!(
        adds_and_deletes(&gw),
        vec![("add", 8080), ("add", 8081), ("delete", 8080)],
        "the bind read late was asked for before the delete"
    );
    // A burst of releases: one flush covers every delete that fell due before it.
    for (cookie, port) in (10..20).zip(9000..) {
        h.bind(cookie, TCP, port);
    }
    settle().await;
    let before = flushes.load(Ordering::SeqCst);
    for cookie in 10..20 {
        h.release(cookie);
    }
    sleep(1).await;
    assert_eq!(gw.deletes().len(), 11, "{:?}", gw.deletes());
    assert_eq!(flushes.load(Ordering::SeqCst) - before, 1, "one flush for the whole burst");
    h.stop().await;
    event_loop.abort();
}

#[tokio::test(start_paused = true)]
async fn a_release_s_delete_waits_while_the_thread_that_released_it_still_runs() {
    // This test's thread: running whenever the reconciler looks.
    let running = crate::host::process::current_thread();
    let sleeper = crate::host::process::SleepingThread::start();
    let sleeping = sleeper.tid;
    for (releaser, expected) in [
        // Still running after its close() (a program preempted before its next bind): the next
        // port, bound 3 ms later, is asked for first.
        (running, vec![("add", 8081), ("delete", 8080)]),
        // Asleep: nothing is coming; the delete goes at once.
        (sleeping, vec![("delete", 8080), ("add", 8081)]),
    ] {
        let gw = FakeGateway::new();
        let h = Harness::start(&gw).await;
        h.bind(1, TCP, 8080);
        settle().await;
        let calls = adds_and_deletes(&gw).len();
        h.release_by(1, releaser);
        tokio::time::sleep(Duration::from_millis(3)).await;
        h.bind(2, TCP, 8081);
        sleep(1).await;
        assert_eq!(adds_and_deletes(&gw)[calls..], expected, "released by thread {releaser}");
        h.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_port_bound_again_before_its_delete_keeps_its_mapping_untouched() {
    let gw = FakeGateway::new();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    settle().await;
    // The program binds the port again before its delete went: nothing to delete, nothing to add.
    h.release(1);
    h.bind(2, TCP, 8080);
    sleep(1).await;
    assert!(gw.deletes().is_empty());
    assert_eq!(gw.adds(TCP, 8080).len(), 1);
    assert!(matches!(h.state(TCP, 8080), Some(MappingState::Active { .. })));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn outcomes_say_what_happened_in_order() {
    let gw = FakeGateway::new();
    gw.insert(entry(UDP, 6881, OTHER, "qBittorrent"));
    let mut h = Harness::start(&gw).await;
    h.outcomes();
    h.bind(1, TCP, 8080);
    h.bind(2, UDP, 6881);
    settle().await;
    h.release(1);
    settle().await;
    let seen: Vec<Outcome> = h
        .outcomes()
        .into_iter()
        .filter(|o| !matches!(o, Outcome::SocketBound { .. } | Outcome::SocketReleased { .. }))
        .map(|o| match o {
            Outcome::Mapped { key, external_port, internal, lease, backend, renewal, .. } => {
                Outcome::Mapped { key, external_port, internal, lease, backend, renewal, took: Duration::ZERO }
            }
            other => other,
        })
        .collect();
    let tcp = PortKey::new(TCP, 8080);
    assert_eq!(
        seen,
        vec![
            Outcome::Pending { key: key(TCP, 8080), reason: PendingReason::Queued },
            // Held by lan's other host since the start-up listing: no add is even tried.
            Outcome::Conflict { key: PortKey::new(UDP, 6881), holder: Some(OTHER), offered: None },
            Outcome::Mapped {
                key: tcp,
                external_port: 8080,
                internal: std::net::SocketAddrV4::new(LOCAL, 8080),
                lease: Lease::For(LEASE),
                backend: Backend::Upnp,
                renewal: false,
                took: Duration::ZERO,
            },
            Outcome::Removed { key: tcp, why: Removal::Released },
        ]
    );
    assert!(gw.adds(UDP, 6881).is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_port_control_gateway_that_lost_its_mappings_silently_gets_them_back_at_the_next_check() {
    // A firewall reload on the router, or a restart whose epoch is the system's uptime: the epoch rule
    // sees nothing and no table can be read. The renewal at each check is the check and the repair.
    let gw = FakeGateway::port_control();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    settle().await;
    sleep(10).await;
    gw.lose_mappings_silently();
    let lost = Instant::now();
    sleep(INTERVAL.as_secs()).await;
    let adds = gw.adds(TCP, 8080);
    assert_eq!(adds.len(), 2, "renewed once, at the check");
    assert!(adds[1].0 - lost <= INTERVAL, "back within one interval, long before half the lease");
    assert_ours(&gw.entry(TCP, 8080).expect("made again"), 8080);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn any_announcement_from_a_port_control_gateway_renews_every_mapping_at_once() {
    let gw = FakeGateway::port_control();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    h.bind(2, UDP, 27015);
    settle().await;
    sleep(10).await;
    gw.lose_mappings_silently();
    let announced = Instant::now();
    h.signals.sender().send(Signal::Announced(Announcement {
        by: AnnouncedBy::Pcp,
        epoch_secs: 1_000_000,
        external_address: None,
        received: announced.into_std(),
    }));
    settle().await;
    assert_eq!(gw.entries().len(), 2, "both made again at once");
    for (p, port) in [(TCP, 8080), (UDP, 27015)] {
        assert!(gw.adds(p, port)[1].0 - announced < Duration::from_millis(10));
    }
    assert_eq!(h.discoveries(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_sign_of_a_new_network_finds_the_gateway_again_and_an_earlier_sessions_news_is_ignored() {
    let gw = FakeGateway::port_control();
    let h = Harness::start(&gw).await;
    h.bind(1, TCP, 8080);
    settle().await;
    h.signals.sender().send(Signal::Rediscover("the network changed".into()));
    settle().await;
    assert_eq!(h.discoveries(), 2);
    assert_eq!(gw.adds(TCP, 8080).len(), 2, "made again on the gateway found anew");
    // News from the first session's client arrives late: it is not this gateway's.
    h.signals.sender().send(Signal::LostMappings { session: 1, why: "its epoch went back".into() });
    settle().await;
    assert_eq!(gw.adds(TCP, 8080).len(), 2);
    h.stop().await;
}

fn forwarded() -> crate::policy::Decision {
    crate::policy::Decision::new(true, "allow everything (test)")
}

// ---------------------------------------------------------------------------------------------------
// IPv6 pinholes
// ---------------------------------------------------------------------------------------------------

fn v6_sock(cookie: u64, port: u16) -> Listener {
    Listener { family: Family::Ipv6, ..sock(cookie, TCP, port) }
}

fn pinhole_key(port: u16) -> PinholeKey {
    PinholeKey { protocol: TCP, port, address: V6_A }
}

#[tokio::test(start_paused = true)]
async fn a_dual_stack_listener_gets_its_mapping_and_a_pinhole_that_follow_it() {
    let gw = FakeGateway::new().with_pinholes();
    let mut h = Harness::start(&gw).await;
    assert!(h.outcomes().iter().any(|o| matches!(o, Outcome::Ipv6Firewall { service: PinholeService::Needed, .. })));
    h.bind_with(v6_sock(1, 8080), Stack::DualStack);
    settle().await;
    assert!(gw.entries().contains_key(&(TCP, 8080)), "the IPv4 mapping");
    assert_eq!(gw.pinholes().values().copied().collect::<Vec<_>>(), vec![pinhole_key(8080)], "and the pinhole");
    // The gateway forgets it (a firewall reload): the renewal at the next check finds it gone.
    gw.forget_pinholes();
    sleep(INTERVAL.as_secs() + 1).await;
    assert!(h.outcomes().iter().any(|o| matches!(o, Outcome::PinholesDropped { .. })));
    assert_eq!(gw.pinholes().len(), 1, "opened again");
    h.release(1);
    settle().await;
    assert!(gw.pinholes().is_empty() && gw.entries().is_empty(), "both gone with the socket");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pinholes_close_at_shutdown_and_an_earlier_runs_are_closed_or_adopted_at_start() {
    let gw = FakeGateway::new().with_pinholes();
    // An earlier run opened two pinholes and crashed; one listener is still there.
    let mut journal = Journal::in_memory();
    for (id, port) in [(41, 9001), (42, 9002)] {
        gw.state.lock().unwrap().pinholes.insert(id, pinhole_key(port));
        let _ = journal.record_pinhole(pinhole_key(port), ROUTER, Some(id), LEASE);
    }
    gw.state.lock().unwrap().next_pinhole_id = 100;
    let h = Harness::start_with_journal(&gw, config(), &[], journal);
    h.bind_with(v6_sock(1, 9002), Stack::Ipv6Only);
    // The socket is in the table before the session starts, as sockets adopted at start-up are.
    settle().await;
    let open: Vec<(u16, u16)> = gw.pinholes().iter().map(|(id, k)| (*id, k.port)).collect();
    // The leftover nobody wants is closed; the wanted one is adopted by its id and renewed, not
    // opened a second time.
    assert_eq!(open, vec![(42, 9002)]);
    h.stop().await;
    assert!(gw.pinholes().is_empty(), "closed at shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_gateway_with_its_ipv6_firewall_off_gets_no_pinholes() {
    let gw = FakeGateway::new();
    gw.state.lock().unwrap().firewall = Some(PinholeService::FirewallOpen);
    let mut h = Harness::start(&gw).await;
    h.bind_with(v6_sock(1, 8080), Stack::DualStack);
    settle().await;
    assert!(gw.pinholes().is_empty());
    assert!(gw.entries().contains_key(&(TCP, 8080)));
    assert!(h
        .outcomes()
        .iter()
        .any(|o| matches!(o, Outcome::Ipv6Firewall { service: PinholeService::FirewallOpen, .. })));
    h.stop().await;
}
