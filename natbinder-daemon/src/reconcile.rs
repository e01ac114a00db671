//! The reconciler: the one component that makes the gateway agree with the ideal-state table.
//!
//! It owns the gateway connection and runs as one task, so gateway calls are serialised and never on
//! the path of a bind(): the kernel hooks only record and report, the event loop only updates the
//! table, and this task catches up. It acts when woken (a socket came or went), when work falls due
//! (lease renewals at half-life, retries with backoff) and every `interval`, when it re-reads the
//! gateway's table: ports other hosts hold go to the EADDRINUSE map, and mappings of ours that the
//! gateway dropped are re-added.
use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{watch, Notify},
    time::Instant,
};

use crate::journal::Journal;
use tracing::{debug, info, warn};

use crate::{
    gateway::{AddError, Gateway, GatewayEntry, GatewayNews, MappingRequest},
    netinfo::LanInfo,
    table::{MappingKey, MappingState, Table, Work},
    Protocol,
};

/// How long a port another host holds is remembered on gateways that cannot list their table (NAT-PMP,
/// PCP): binds of it fail with EADDRINUSE meanwhile. It is learned again, at the cost of one bind that
/// cannot be reached, when a socket next wants it.
const HELD_ELSEWHERE_MEMORY: Duration = Duration::from_secs(600);

/// Prefix of every description natbinder writes; followed by this host's name.
pub const TAG_PREFIX: &str = "natbinder@";
/// Some routers reject long descriptions (IGD 605); stay well under every known limit.
const MAX_DESCRIPTION: usize = 48;

#[derive(Clone, Debug)]
pub struct ReconcilerConfig {
    pub lease: Duration,
    /// Period of the full check against the gateway's table.
    pub interval: Duration,
    /// Ports below this are never mapped (nor asked for).
    pub min_port: u16,
    pub hostname: String,
    /// Time allowed for deleting our mappings at shutdown.
    pub shutdown_grace: Duration,
}

/// State shared between the event loop and the reconciler.
#[derive(Default)]
pub struct Shared {
    pub table: Mutex<Table>,
    /// Wakes the reconciler when the table changed.
    pub wake: Notify,
    /// Set while kernel events are being lost: the table may hold sockets that are gone, so no new
    /// mapping is made until a sock_diag listing has set it right (deletions go on).
    pub adds_paused: std::sync::atomic::AtomicBool,
    /// A sign that the gateway changed (it announced a restart, the default route moved): find it
    /// again and re-map everything now rather than at the next periodic check.
    pub gateway_changed: Notify,
    /// Asks for a full check of the gateway's table now (SIGHUP).
    pub check_now: Notify,
}

/// Where the reconciler puts ports other hosts hold (the eBPF HELD_ELSEWHERE map in the daemon).
pub trait PortBlocklist: Send + Sync + 'static {
    fn block(&self, protocol: Protocol, port: u16, holder: Ipv4Addr);
    fn replace_all(&self, entries: &[(Protocol, u16, Ipv4Addr)]);
}

impl PortBlocklist for crate::kernel::HeldElsewhere {
    fn block(&self, protocol: Protocol, port: u16, holder: Ipv4Addr) {
        if let Err(e) = self.insert(protocol, port, holder) {
            warn!("{e:#}");
        }
    }
    fn replace_all(&self, entries: &[(Protocol, u16, Ipv4Addr)]) {
        if let Err(e) = crate::kernel::HeldElsewhere::replace_all(self, entries) {
            warn!("updating the EADDRINUSE map: {e:#}");
        }
    }
}

/// Longest host name kept in a description, so the program name always fits too.
const MAX_DESCRIPTION_HOST: usize = 24;

fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

/// This host's name as it appears in descriptions.
fn description_host(hostname: &str) -> String {
    let mut host = clean(hostname);
    host.truncate(MAX_DESCRIPTION_HOST);
    host
}

/// The description of a mapping: names natbinder, this host and the program.
pub fn description(hostname: &str, comm: &str) -> String {
    let mut d = format!("{TAG_PREFIX}{} {}", description_host(hostname), clean(comm));
    d.truncate(MAX_DESCRIPTION);
    d
}

/// Whether `description` was written by natbinder on the host called `hostname`.
pub fn is_ours(description: &str, hostname: &str) -> bool {
    description
        .strip_prefix(TAG_PREFIX)
        .and_then(|rest| rest.split(' ').next())
        .is_some_and(|owner| owner == description_host(hostname))
}

pub struct Reconciler<B: PortBlocklist> {
    pub config: ReconcilerConfig,
    pub shared: Arc<Shared>,
    pub blocklist: B,
    pub journal: Mutex<Journal>,
    /// Learned per gateway: it refuses leases (IGD 725, or 402 on a leased add).
    pub permanent_only: std::sync::atomic::AtomicBool,
    /// The gateway's external address as last read, to report changes and double NAT once each.
    pub external_address: Mutex<Option<IpAddr>>,
    /// Ports other hosts hold, learned from refused adds on gateways that cannot list their table.
    held_elsewhere: Mutex<HashMap<MappingKey, (Ipv4Addr, Instant)>>,
    /// Whether "another NAT sits in between" (PCP ADDRESS_MISMATCH) was reported for this gateway.
    reported_nat_in_between: std::sync::atomic::AtomicBool,
}

impl<B: PortBlocklist> Reconciler<B> {
    pub fn new(config: ReconcilerConfig, shared: Arc<Shared>, blocklist: B, journal: Journal) -> Self {
        Self {
            config,
            shared,
            blocklist,
            journal: Mutex::new(journal),
            permanent_only: Default::default(),
            external_address: Mutex::new(None),
            held_elsewhere: Mutex::default(),
            reported_nat_in_between: Default::default(),
        }
    }
}

/// Whether `ip`, as a gateway's external address, means another NAT sits upstream (or none is known):
/// unspecified, loopback, RFC 1918 private, RFC 6598 shared (100.64/10, carrier-grade NAT), link-local.
pub fn is_behind_another_nat(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_loopback(),
    }
}

enum Outcome {
    /// The gateway stopped answering, or the network changed: find it again.
    Rediscover,
    /// Shut down. `interrupted`: an add or renewal that was cut short, which the gateway may hold.
    Stop { interrupted: Option<MappingKey> },
}

/// Resolves once `stop` turns true (the guard wait_for returns must not live across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn work_key(work: &Work) -> MappingKey {
    match work {
        Work::Add { key, .. } | Work::Renew { key, .. } | Work::Delete { key } => *key,
    }
}

impl<B: PortBlocklist> Reconciler<B> {
    /// Runs until `stop` turns true, then deletes every mapping it made and returns.
    /// `discover` finds the gateway (and where this host is); it is called again whenever the gateway
    /// stops answering.
    pub async fn run<G, D, F>(self, mut discover: D, mut stop: watch::Receiver<bool>)
    where
        G: Gateway,
        D: FnMut() -> F,
        F: Future<Output = Result<(G, LanInfo), String>>,
    {
        let mut discovery_delay = Duration::from_secs(1);
        let mut last_discovery_error = String::new();
        loop {
            let found = tokio::select! {
                found = discover() => found,
                // The gateway announced itself while we searched (it just came back): search again now.
                _ = self.shared.gateway_changed.notified() => continue,
                _ = stop.wait_for(|s| *s) => return,
            };
            let (gateway, lan) = match found {
                Ok(found) => found,
                Err(e) => {
                    if e != last_discovery_error {
                        warn!("{e}; retrying in the background (bound sockets wait in the table)");
                        last_discovery_error = e;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(discovery_delay) => {}
                        _ = self.shared.gateway_changed.notified() => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    discovery_delay = (discovery_delay * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            last_discovery_error.clear();
            info!("gateway: {} ({}); this host is {} on its LAN", gateway.describe(), gateway.backend(), lan.local);
            self.permanent_only.store(false, std::sync::atomic::Ordering::SeqCst);
            self.reported_nat_in_between.store(false, std::sync::atomic::Ordering::SeqCst);
            self.check_external_address(&gateway).await;
            // Whatever we believed about the gateway's table is stale after (re)discovery.
            self.shared.table.lock().unwrap().gateway_reset(Instant::now().into_std());
            let session = Instant::now();
            match self.serve(&gateway, &lan, &mut stop).await {
                Outcome::Stop { interrupted } => {
                    self.remove_all(&gateway, interrupted).await;
                    return;
                }
                Outcome::Rediscover => {
                    warn!("lost contact with {}; looking for the gateway again", gateway.describe());
                }
            }
            // A gateway that is found but does not answer must not be rediscovered in a busy loop:
            // back off unless the session was a healthy one.
            if session.elapsed() >= self.config.interval {
                discovery_delay = Duration::from_secs(1);
            }
            tokio::select! {
                _ = tokio::time::sleep(discovery_delay) => {}
                // The gateway announced itself (it is back): look now.
                _ = self.shared.gateway_changed.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            discovery_delay = (discovery_delay * 2).min(Duration::from_secs(30));
        }
    }

    async fn serve<G: Gateway>(&self, gateway: &G, lan: &LanInfo, stop: &mut watch::Receiver<bool>) -> Outcome {
        if let Err(AddError::Unreachable(_)) = self.check_gateway_table(gateway, lan, true).await {
            return Outcome::Rediscover;
        }
        let (sockets, mappings) = {
            let table = self.shared.table.lock().unwrap();
            (table.sockets().count(), table.mappings().count())
        };
        info!("ready: {sockets} bound sockets, {mappings} mappings to keep on {}", gateway.describe());
        let mut next_check = Instant::now() + self.config.interval;
        loop {
            if *stop.borrow() {
                return Outcome::Stop { interrupted: None };
            }
            let mut work = self.shared.table.lock().unwrap().due_work(Instant::now().into_std());
            if self.shared.adds_paused.load(std::sync::atomic::Ordering::SeqCst) {
                work.retain(|w| !matches!(w, Work::Add { .. }));
            }
            for item in work {
                let key = work_key(&item);
                let adding = !matches!(item, Work::Delete { .. });
                // NAT-PMP and PCP retransmit for up to two minutes to a silent gateway: a network change
                // or a shutdown must not wait for that.
                let result = tokio::select! {
                    result = self.perform(gateway, lan, item) => result,
                    _ = self.shared.gateway_changed.notified() => {
                        info!("the gateway changed or restarted; finding it again and re-mapping");
                        return Outcome::Rediscover;
                    }
                    _ = stopped(stop) => return Outcome::Stop { interrupted: adding.then_some(key) },
                };
                if let Err(AddError::Unreachable(e)) = result {
                    debug!("gateway unreachable: {e}");
                    return Outcome::Rediscover;
                }
            }
            if Instant::now() >= next_check {
                let check = tokio::select! {
                    check = self.check_gateway_table(gateway, lan, false) => check,
                    _ = self.shared.gateway_changed.notified() => return Outcome::Rediscover,
                    _ = stopped(stop) => return Outcome::Stop { interrupted: None },
                };
                if let Err(AddError::Unreachable(_)) = check {
                    return Outcome::Rediscover;
                }
                if gateway.can_read_table() {
                    self.check_external_address(gateway).await;
                }
                if gateway.preferred_protocol_answers().await {
                    info!("a protocol preferred to {} now answers at the gateway: choosing again", gateway.backend());
                    return Outcome::Rediscover;
                }
                next_check = Instant::now() + self.config.interval;
                continue;
            }
            let adds_allowed = !self.shared.adds_paused.load(std::sync::atomic::Ordering::SeqCst);
            let next_due = self.shared.table.lock().unwrap().next_due(adds_allowed).map(Instant::from_std);
            let wake_at = next_due.map_or(next_check, |d| d.min(next_check));
            tokio::select! {
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = self.shared.gateway_changed.notified() => {
                    info!("the gateway changed or restarted; finding it again and re-mapping");
                    return Outcome::Rediscover;
                }
                _ = self.shared.check_now.notified() => next_check = Instant::now(),
                news = gateway.news() => match news {
                    GatewayNews::LostMappings(why) => {
                        info!("{} lost its mappings ({why}); making them all again", gateway.describe());
                        self.shared.table.lock().unwrap().gateway_reset(Instant::now().into_std());
                    }
                    GatewayNews::Changed => {
                        self.check_external_address(gateway).await;
                    }
                },
                _ = stopped(stop) => return Outcome::Stop { interrupted: None },
            }
        }
    }

    /// Reads the external address; reports a change, and a double NAT once per change.
    async fn check_external_address<G: Gateway>(&self, gateway: &G) -> Option<IpAddr> {
        self.read_external_address(gateway).await.ok().flatten()
    }

    /// As [`Self::check_external_address`], but a gateway that does not answer is an error.
    async fn read_external_address<G: Gateway>(&self, gateway: &G) -> Result<Option<IpAddr>, AddError> {
        let ip = match gateway.external_address().await {
            Ok(ip) => ip,
            Err(AddError::Unreachable(e)) => {
                warn!("could not read the gateway's external address: {e}");
                return Err(AddError::Unreachable(e));
            }
            Err(AddError::Unsupported(why)) => {
                debug!("the gateway's external address is not known yet: {why}");
                return Ok(None);
            }
            Err(e) => {
                warn!("could not read the gateway's external address: {e}");
                return Ok(None);
            }
        };
        let previous = self.external_address.lock().unwrap().replace(ip);
        if previous != Some(ip) {
            match previous {
                None => info!("gateway's external address: {ip}"),
                Some(old) => warn!("the gateway's external address changed from {old} to {ip}"),
            }
            if is_behind_another_nat(ip) {
                warn!(
                    "the gateway's external address {ip} is not a public one: there is another NAT upstream \
                     (double NAT, or carrier-grade NAT). Mappings are still made on this gateway, but they \
                     will not make this host reachable from the internet"
                );
            }
        }
        Ok(Some(ip))
    }

    /// The lease to ask for: the configured one, or none (permanent) on gateways that refuse leases.
    fn lease(&self) -> Duration {
        if self.permanent_only.load(std::sync::atomic::Ordering::SeqCst) {
            Duration::ZERO
        } else {
            self.config.lease
        }
    }

    fn request(&self, lan: &LanInfo, key: MappingKey, comm: &str, lease: Duration) -> MappingRequest {
        MappingRequest {
            protocol: key.protocol,
            port: key.port,
            internal_client: lan.local,
            lease,
            description: description(&self.config.hostname, comm),
        }
    }

    fn journal_record(&self, key: MappingKey, lan: &LanInfo, lease: Duration) {
        if let Err(e) = self.journal.lock().unwrap().record(key, lan.local, lan.gateway, lease) {
            warn!("{e:#}");
        }
    }

    fn journal_forget(&self, key: &MappingKey) {
        if let Err(e) = self.journal.lock().unwrap().forget(key) {
            warn!("{e:#}");
        }
    }

    /// A gateway refused a leased mapping (725, or 402 on a lease). A permanent one is taken only once
    /// the external address checked out: otherwise rules that never expire could pile up on a gateway
    /// that is not even the way out. Returns whether natbinder may now map permanently.
    async fn accept_permanent_leases<G: Gateway>(&self, gateway: &G, why: &str) -> Result<bool, AddError> {
        match gateway.external_address().await {
            Ok(ip) if !is_behind_another_nat(ip) => {
                if !self.permanent_only.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    warn!(
                        "{} accepts only permanent mappings ({why}); natbinder will map without a lease, journal \
                         every mapping and delete each itself when its socket goes",
                        gateway.describe()
                    );
                }
                Ok(true)
            }
            Ok(ip) => {
                warn!("the gateway accepts only permanent mappings ({why}) and its external address {ip} is not public: not mapping permanently");
                Ok(false)
            }
            Err(AddError::Unreachable(e)) => Err(AddError::Unreachable(e)),
            Err(e) => {
                warn!("the gateway accepts only permanent mappings ({why}) and its external address could not be read ({e}): not mapping permanently");
                Ok(false)
            }
        }
    }

    async fn perform<G: Gateway>(&self, gateway: &G, lan: &LanInfo, work: Work) -> Result<(), AddError> {
        match work {
            Work::Add { key, comm } | Work::Renew { key, comm } => {
                if key.port < self.config.min_port || key.port == 0 {
                    warn!("not mapping {key}: below the minimum port {}", self.config.min_port);
                    self.shared.table.lock().unwrap().record_conflict(key, None);
                    return Ok(());
                }
                let started = Instant::now();
                let mut lease = self.lease();
                let mut result = gateway.add(&self.request(lan, key, &comm, lease)).await.map(|g| g.lease);
                if let Err(AddError::PermanentOnly(why)) = &result {
                    if lease.is_zero() {
                        result = Err(AddError::Refused(format!("{why}, even without a lease")));
                    } else if self.accept_permanent_leases(gateway, why).await? {
                        lease = Duration::ZERO;
                        result = gateway.add(&self.request(lan, key, &comm, lease)).await.map(|g| g.lease);
                    }
                }
                let now = Instant::now().into_std();
                match result {
                    Ok(granted) => {
                        let lease = granted;
                        let lease_text = if lease.is_zero() {
                            "permanent".to_string()
                        } else {
                            format!("lease {}s", lease.as_secs())
                        };
                        info!(
                            "mapped {key} -> {}:{} via {} ({lease_text}) in {:.1} ms",
                            lan.local,
                            key.port,
                            gateway.backend(),
                            started.elapsed().as_secs_f64() * 1e3
                        );
                        self.held_elsewhere.lock().unwrap().remove(&key);
                        self.journal_record(key, lan, lease);
                        self.shared.table.lock().unwrap().record_mapped(key, lease, now);
                        Ok(())
                    }
                    Err(AddError::Conflict) => {
                        let holder = self.holder_of(gateway, lan, key).await;
                        let who = holder.map_or("another host".to_string(), |h| h.to_string());
                        warn!(
                            "{key} is held on the gateway by {who}: the socket is bound but not reachable from outside; \
                             further binds of this port will fail with EADDRINUSE"
                        );
                        let holder_ip = holder.unwrap_or(Ipv4Addr::UNSPECIFIED);
                        self.blocklist.block(key.protocol, key.port, holder_ip);
                        if !gateway.can_read_table() {
                            self.held_elsewhere.lock().unwrap().insert(key, (holder_ip, Instant::now()));
                        }
                        self.shared.table.lock().unwrap().record_conflict(key, holder);
                        Ok(())
                    }
                    Err(e @ AddError::BehindAnotherNat(_)) => {
                        if !self.reported_nat_in_between.swap(true, std::sync::atomic::Ordering::SeqCst) {
                            warn!(
                                "{e}. The gateway at {} is not on this host's LAN side of every NAT (double NAT): \
                                 its mappings would not reach this host. Will retry in case the network changes",
                                lan.gateway
                            );
                        }
                        self.shared.table.lock().unwrap().record_failed(key, e.to_string(), now);
                        Ok(())
                    }
                    Err(AddError::Unreachable(e)) => {
                        self.shared.table.lock().unwrap().record_failed(key, e.clone(), now);
                        Err(AddError::Unreachable(e))
                    }
                    Err(
                        e @ (AddError::Refused(_)
                        | AddError::PermanentOnly(_)
                        | AddError::NoResources(_)
                        | AddError::NotAuthorized(_)
                        | AddError::Unsupported(_)),
                    ) => {
                        warn!("could not map {key}: {e}; will retry");
                        self.shared.table.lock().unwrap().record_failed(key, e.to_string(), now);
                        Ok(())
                    }
                }
            }
            Work::Delete { key } => {
                let result = gateway.delete(key.protocol, key.port).await;
                match result {
                    Ok(()) => {
                        info!("removed mapping {key}");
                        self.journal_forget(&key);
                        self.shared.table.lock().unwrap().record_deleted(key, Instant::now().into_std());
                        Ok(())
                    }
                    Err(AddError::Unreachable(e)) => Err(AddError::Unreachable(e)),
                    Err(e) => {
                        // The lease bounds how long a mapping we failed to delete can outlive its socket.
                        warn!("could not remove mapping {key}: {e}; its lease will end it");
                        self.shared.table.lock().unwrap().record_deleted(key, Instant::now().into_std());
                        Ok(())
                    }
                }
            }
        }
    }

    async fn holder_of<G: Gateway>(&self, gateway: &G, lan: &LanInfo, key: MappingKey) -> Option<Ipv4Addr> {
        let entries = gateway.list().await.ok()?;
        entries
            .iter()
            .find(|e| e.protocol == key.protocol && e.external_port == key.port)
            .and_then(GatewayEntry::internal_ipv4)
            .filter(|ip| *ip != lan.local)
    }

    /// Reads the gateway's table and brings our view in line with it:
    /// * ports other hosts hold become the EADDRINUSE set, and conflicts that ended are retried;
    /// * at start-up, mappings a previous natbinder on this host left behind are adopted if a socket
    ///   wants them, deleted otherwise;
    /// * an Active mapping of ours that the gateway no longer lists is re-added.
    async fn check_gateway_table<G: Gateway>(&self, gateway: &G, lan: &LanInfo, startup: bool) -> Result<(), AddError> {
        if !gateway.can_read_table() {
            return self.check_without_table(gateway, lan, startup).await;
        }
        let entries = match gateway.list().await {
            Ok(entries) => entries,
            Err(AddError::Unreachable(e)) => return Err(AddError::Unreachable(e)),
            Err(e) => {
                debug!("could not list the gateway's port mapping table ({e}); checking our mappings one by one");
                return self.check_our_mappings_one_by_one(gateway, lan).await;
            }
        };
        let now = Instant::now().into_std();
        let mut held = Vec::new();
        let mut ours_listed = HashSet::new();
        let mut stale = Vec::new();
        let mut listed_keys = HashSet::new();
        for entry in &entries {
            let key = MappingKey { protocol: entry.protocol, port: entry.external_port };
            listed_keys.insert(key);
            let client = entry.internal_ipv4();
            // Ours: tagged with this host's name and pointing here, or made by us according to the
            // journal (also after this host's address changed, or on gateways that drop descriptions).
            let journalled = self
                .journal
                .lock()
                .unwrap()
                .get(&key)
                .is_some_and(|j| j.gateway == lan.gateway && Some(j.internal_client) == client);
            // Some routers report the internal client by host name rather than address: with our tag,
            // such an entry is taken as ours (never as another host's, which would block our own port).
            let client_is_here = client == Some(lan.local) || client.is_none();
            let tagged_here = client_is_here && is_ours(&entry.description, &self.config.hostname);
            if !(journalled || tagged_here) {
                if client != Some(lan.local) && entry.enabled {
                    held.push((entry.protocol, entry.external_port, client.unwrap_or(Ipv4Addr::UNSPECIFIED)));
                }
                continue;
            }
            let points_here = client_is_here && entry.internal_port == entry.external_port;
            if points_here {
                ours_listed.insert(key);
            }
            let wanted = self.shared.table.lock().unwrap().mapping(&key).is_some_and(|m| !m.sockets.is_empty());
            if !points_here {
                // Drifted (another internal client or port): delete, and add again if a socket wants it.
                info!(
                    "{key} on the gateway points to {}:{}, not here: repairing",
                    entry.internal_client, entry.internal_port
                );
                stale.push(key);
            } else if startup && !self.shared.table.lock().unwrap().adopt_existing(key, now) {
                stale.push(key);
            } else if !wanted && !startup {
                // Ours, pointing here, but no socket wants it and the table no longer tracks it (a delete
                // that failed earlier): delete it now.
                let tracked = self.shared.table.lock().unwrap().mapping(&key).is_some();
                if !tracked {
                    stale.push(key);
                }
            }
        }
        // Journal entries for this gateway that it no longer lists are gone: nothing left to delete.
        let gone: Vec<MappingKey> = self
            .journal
            .lock()
            .unwrap()
            .entries()
            .filter(|j| j.gateway == lan.gateway)
            .filter_map(|j| j.key())
            .filter(|k| !listed_keys.contains(k))
            .collect();
        for key in gone {
            self.journal_forget(&key);
        }
        self.blocklist.replace_all(&held);
        let held_keys: HashMap<MappingKey, Ipv4Addr> =
            held.iter().map(|(p, port, ip)| (MappingKey { protocol: *p, port: *port }, *ip)).collect();
        {
            let mut table = self.shared.table.lock().unwrap();
            let mut retry = Vec::new();
            let mut dropped = Vec::new();
            for (key, m) in table.mappings() {
                match m.state {
                    MappingState::Conflict { .. } if !held_keys.contains_key(key) => retry.push(*key),
                    MappingState::Active { .. } if !startup && !ours_listed.contains(key) && !m.sockets.is_empty() => {
                        dropped.push(*key)
                    }
                    _ => {}
                }
            }
            for key in retry {
                info!("{key} is no longer held by another host; mapping it");
                table.record_deleted(key, now);
            }
            let active = table.mappings().filter(|(_, m)| matches!(m.state, MappingState::Active { .. })).count();
            if dropped.len() > 1 && dropped.len() == active {
                warn!("the gateway lost all {} of our mappings (did it restart?); adding them again", dropped.len());
            }
            for key in dropped {
                if active <= 1 {
                    warn!("the gateway dropped mapping {key}; adding it again");
                }
                table.record_deleted(key, now);
            }
        }
        for key in stale {
            match gateway.delete(key.protocol, key.port).await {
                Ok(()) => {
                    info!("removed {key}, left on the gateway by an earlier natbinder run with no socket needing it");
                    self.journal_forget(&key);
                    self.shared.table.lock().unwrap().record_deleted(key, now);
                }
                Err(AddError::Unreachable(e)) => return Err(AddError::Unreachable(e)),
                Err(e) => warn!("could not remove stale mapping {key}: {e}"),
            }
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// For gateways that cannot list their table: GetSpecificPortMappingEntry for each mapping we hold;
    /// one that is gone or points elsewhere is added again.
    async fn check_our_mappings_one_by_one<G: Gateway>(&self, gateway: &G, lan: &LanInfo) -> Result<(), AddError> {
        let active: Vec<MappingKey> = {
            let table = self.shared.table.lock().unwrap();
            table
                .mappings()
                .filter(|(_, m)| matches!(m.state, MappingState::Active { .. }) && !m.sockets.is_empty())
                .map(|(k, _)| *k)
                .collect()
        };
        for key in active {
            let entry = match gateway.lookup(key.protocol, key.port).await {
                Ok(entry) => entry,
                Err(AddError::Unreachable(e)) => return Err(AddError::Unreachable(e)),
                Err(e) => {
                    warn!("could not check mapping {key} on the gateway: {e}");
                    continue;
                }
            };
            let here = entry
                .as_ref()
                .is_some_and(|e| e.internal_ipv4().is_none_or(|ip| ip == lan.local) && e.internal_port == key.port);
            if !here {
                warn!("the gateway dropped mapping {key}; adding it again");
                self.shared.table.lock().unwrap().record_deleted(key, Instant::now().into_std());
            }
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// For gateways whose table cannot be read (NAT-PMP, PCP). Renewals keep our mappings there, and
    /// the epoch in every reply shows a gateway that lost them; this check adds:
    /// * an exchange now (its epoch is checked, and the external address read where the protocol can);
    /// * at start-up, the journal's mappings for this gateway that no socket wants are deleted (the
    ///   protocols name a mapping by this host, protocol and port, and PCP's nonce is derived again);
    ///   the ones a socket wants are renewed now;
    /// * ports learned to be held by other hosts become the EADDRINUSE set, for a while, and each
    ///   socket refused that way is tried again, in case the port came free.
    async fn check_without_table<G: Gateway>(&self, gateway: &G, lan: &LanInfo, startup: bool) -> Result<(), AddError> {
        self.read_external_address(gateway).await?;
        let now = Instant::now().into_std();
        if startup {
            let journalled: Vec<MappingKey> = self
                .journal
                .lock()
                .unwrap()
                .entries()
                .filter(|j| j.gateway == lan.gateway && j.internal_client == lan.local)
                .filter_map(|j| j.key())
                .collect();
            for key in journalled {
                if self.shared.table.lock().unwrap().adopt_existing(key, now) {
                    continue;
                }
                match gateway.delete(key.protocol, key.port).await {
                    Ok(()) => {
                        info!(
                            "removed {key}, left on the gateway by an earlier natbinder run with no socket needing it"
                        );
                        self.journal_forget(&key);
                    }
                    Err(AddError::Unreachable(e)) => return Err(AddError::Unreachable(e)),
                    Err(e) => {
                        warn!("could not remove {key}, left by an earlier natbinder run: {e}; its lease will end it")
                    }
                }
            }
        }
        let held: Vec<(Protocol, u16, Ipv4Addr)> = {
            let mut learned = self.held_elsewhere.lock().unwrap();
            let fresh = Instant::now();
            learned.retain(|_, (_, when)| fresh.duration_since(*when) < HELD_ELSEWHERE_MEMORY);
            learned.iter().map(|(k, (ip, _))| (k.protocol, k.port, *ip)).collect()
        };
        self.blocklist.replace_all(&held);
        {
            let mut table = self.shared.table.lock().unwrap();
            let refused: Vec<MappingKey> = table
                .mappings()
                .filter(|(_, m)| matches!(m.state, MappingState::Conflict { .. }) && !m.sockets.is_empty())
                .map(|(k, _)| *k)
                .collect();
            for key in refused {
                debug!("{key} was held by another host: trying again");
                table.record_deleted(key, now);
            }
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Shutdown: delete every mapping we hold, within the grace period, and `interrupted`, an add
    /// that was cut short and may have reached the gateway.
    async fn remove_all<G: Gateway>(&self, gateway: &G, interrupted: Option<MappingKey>) {
        let mut keys = self.shared.table.lock().unwrap().active_keys();
        if let Some(key) = interrupted.filter(|k| !keys.contains(k)) {
            keys.push(key);
        }
        let deadline = Instant::now() + self.config.shutdown_grace;
        for key in keys {
            match tokio::time::timeout_at(deadline, gateway.delete(key.protocol, key.port)).await {
                Ok(Ok(())) => {
                    info!("removed mapping {key}");
                    self.journal_forget(&key);
                    self.shared.table.lock().unwrap().record_deleted(key, Instant::now().into_std());
                }
                Ok(Err(e)) => warn!("could not remove mapping {key} at shutdown: {e}; its lease will end it"),
                Err(_) => {
                    warn!("shutdown grace period over; remaining mappings end with their leases");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
