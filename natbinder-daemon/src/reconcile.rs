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
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{watch, Notify},
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    gateway::{AddError, Gateway, GatewayEntry, MappingRequest},
    netinfo::LanInfo,
    table::{MappingKey, MappingState, Table, Work},
    Protocol,
};

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
}

enum Outcome {
    /// The gateway stopped answering: find it again.
    Rediscover,
    Stop,
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
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    discovery_delay = (discovery_delay * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            last_discovery_error.clear();
            info!("gateway: {}; this host is {} on its LAN", gateway.describe(), lan.local);
            match gateway.external_address().await {
                Ok(ip) => info!("gateway's external address: {ip}"),
                Err(e) => warn!("could not read the gateway's external address: {e}"),
            }
            // Whatever we believed about the gateway's table is stale after (re)discovery.
            self.shared.table.lock().unwrap().gateway_reset(Instant::now().into_std());
            let session = Instant::now();
            match self.serve(&gateway, &lan, &mut stop).await {
                Outcome::Stop => {
                    self.remove_all(&gateway, &lan).await;
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
                return Outcome::Stop;
            }
            let work = self.shared.table.lock().unwrap().due_work(Instant::now().into_std());
            for item in work {
                if let Err(AddError::Unreachable(e)) = self.perform(gateway, lan, item).await {
                    debug!("gateway unreachable: {e}");
                    return Outcome::Rediscover;
                }
            }
            if Instant::now() >= next_check {
                if let Err(AddError::Unreachable(_)) = self.check_gateway_table(gateway, lan, false).await {
                    return Outcome::Rediscover;
                }
                next_check = Instant::now() + self.config.interval;
                continue;
            }
            let next_due = self.shared.table.lock().unwrap().next_due().map(Instant::from_std);
            let wake_at = next_due.map_or(next_check, |d| d.min(next_check));
            tokio::select! {
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = stop.wait_for(|s| *s) => return Outcome::Stop,
            }
        }
    }

    fn request(&self, lan: &LanInfo, key: MappingKey, comm: &str) -> MappingRequest {
        MappingRequest {
            protocol: key.protocol,
            port: key.port,
            internal_client: lan.local,
            lease: self.config.lease,
            description: description(&self.config.hostname, comm),
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
                let result = gateway.add(&self.request(lan, key, &comm)).await;
                let now = Instant::now().into_std();
                match result {
                    Ok(()) => {
                        info!(
                            "mapped {key} -> {}:{} (lease {}s) in {:.1} ms",
                            lan.local,
                            key.port,
                            self.config.lease.as_secs(),
                            started.elapsed().as_secs_f64() * 1e3
                        );
                        self.shared.table.lock().unwrap().record_mapped(key, self.config.lease, now);
                        Ok(())
                    }
                    Err(AddError::Conflict) => {
                        let holder = self.holder_of(gateway, lan, key).await;
                        let who = holder.map_or("another host".to_string(), |h| h.to_string());
                        warn!(
                            "{key} is held on the gateway by {who}: the socket is bound but not reachable from outside; \
                             further binds of this port will fail with EADDRINUSE"
                        );
                        self.blocklist.block(key.protocol, key.port, holder.unwrap_or(Ipv4Addr::UNSPECIFIED));
                        self.shared.table.lock().unwrap().record_conflict(key, holder);
                        Ok(())
                    }
                    Err(AddError::Unreachable(e)) => {
                        self.shared.table.lock().unwrap().record_failed(key, e.clone(), now);
                        Err(AddError::Unreachable(e))
                    }
                    Err(AddError::Refused(e)) => {
                        warn!("could not map {key}: {e}; will retry");
                        self.shared.table.lock().unwrap().record_failed(key, e, now);
                        Ok(())
                    }
                }
            }
            Work::Delete { key } => {
                let result = gateway.delete(key.protocol, key.port).await;
                match result {
                    Ok(()) => {
                        info!("removed mapping {key}");
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
        let entries = match gateway.list().await {
            Ok(entries) => entries,
            Err(AddError::Unreachable(e)) => return Err(AddError::Unreachable(e)),
            Err(e) => {
                warn!("could not read the gateway's port mapping table: {e}");
                return Ok(());
            }
        };
        let now = Instant::now().into_std();
        let mut held = Vec::new();
        let mut ours_listed = HashSet::new();
        let mut stale = Vec::new();
        for entry in &entries {
            let key = MappingKey { protocol: entry.protocol, port: entry.external_port };
            match entry.internal_ipv4() {
                Some(ip) if ip == lan.local => {
                    if is_ours(&entry.description, &self.config.hostname) {
                        ours_listed.insert(key);
                        if startup && !self.shared.table.lock().unwrap().adopt_existing(key, now) {
                            stale.push(key);
                        }
                    }
                }
                other => {
                    if entry.enabled {
                        held.push((entry.protocol, entry.external_port, other.unwrap_or(Ipv4Addr::UNSPECIFIED)));
                    }
                }
            }
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
            for key in dropped {
                warn!("the gateway dropped mapping {key}; adding it again");
                table.record_deleted(key, now);
            }
        }
        for key in stale {
            match gateway.delete(key.protocol, key.port).await {
                Ok(()) => {
                    info!("removed {key}, left on the gateway by an earlier natbinder run with no socket needing it")
                }
                Err(AddError::Unreachable(e)) => return Err(AddError::Unreachable(e)),
                Err(e) => warn!("could not remove stale mapping {key}: {e}"),
            }
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Shutdown: delete every mapping we hold, within the grace period.
    async fn remove_all<G: Gateway>(&self, gateway: &G, _lan: &LanInfo) {
        let keys = self.shared.table.lock().unwrap().active_keys();
        let deadline = Instant::now() + self.config.shutdown_grace;
        for key in keys {
            match tokio::time::timeout_at(deadline, gateway.delete(key.protocol, key.port)).await {
                Ok(Ok(())) => {
                    info!("removed mapping {key}");
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
