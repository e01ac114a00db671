//! The reconciler: turns the table's decisions into gateway calls, and the gateway's answers back
//! into the table. It runs as one task, so calls to the gateway are serialised and never on the path of
//! a bind(): the kernel hooks only record and report, the event loop only updates the table, and this
//! task catches up.
//!
//! * This file: the run loop. It finds the gateway (a [`GatewaySession`] per gateway found), takes the
//!   table's most urgent work one item at a time (so that a new mapping never waits behind deletes),
//!   acts on [`Signal`]s, and runs the periodic check every `interval`.
//! * [`audit`]: the periodic check, one of three kinds: reading the gateway's whole table, checking our
//!   mappings entry by entry, or, where no table can be read (NAT-PMP, PCP), an exchange and a renewal
//!   of every mapping, which is both the check and the repair.
//! * [`ownership`]: which of the gateway's mappings are ours (the tag and the journal).
//! * [`pinholes`]: IPv6 pinholes: whether the gateway needs them, and the calls for each.
//! * [`precise_timer`]: waits for work due within milliseconds (a delete held for the thread that
//!   released its port), to the microsecond.
//! * [`intake`]: the kernel's events read to the end before a delete.
use std::{future::Future, net::SocketAddrV4, time::Duration};

use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use crate::{
    gateway::{
        session::GatewaySession,
        signals::{Signal, Signals},
        AddError, Gateway, GatewayEntry,
    },
    host::{lan::LanInfo, lan6::Lan6Watch},
    outcome::{Lease, Outcome, Removal},
    table::{Grant, Learned, MappingKey, PortKey, TableHandle, Work},
};

pub mod audit;
pub mod intake;
pub mod ownership;
pub mod pinholes;
mod precise_timer;

pub use ownership::{description, is_ours, Ownership, TAG_PREFIX};

#[derive(Clone, Debug)]
pub struct ReconcilerConfig {
    pub lease: Duration,
    /// Period of the full check against the gateway.
    pub interval: Duration,
    /// Time allowed for deleting our mappings at shutdown.
    pub shutdown_grace: Duration,
    /// Keep a mapping the gateway grants on another external port (`keep-gateway-chosen-ports`).
    pub keep_gateway_chosen_ports: bool,
}

pub struct Reconciler {
    pub config: ReconcilerConfig,
    /// New settings from a reload: taken at the next turn of the loop.
    settings: Option<watch::Receiver<ReconcilerConfig>>,
    pub table: TableHandle,
    pub signals: Signals,
    pub ownership: Ownership,
    /// This host's IPv6 addresses and router: where pinhole requests go, and from.
    pub lan6: Lan6Watch,
    sessions: u64,
    /// The event loop, asked to read the kernel's ring to its end before a delete goes.
    intake: Option<intake::IntakeFlush>,
    /// When the last such flush was asked: deletes that fell due before then need none.
    intake_read_at: Option<std::time::Instant>,
    /// Whether `Ready` was published since start (the first session's check, or the first search
    /// that found nothing).
    ready_published: bool,
}

/// Why a session ended.
enum Ended {
    /// The gateway stopped answering, or changed: find it again.
    Rediscover(String),
    /// A signal said the gateway or the network changed: find it again now, without a backoff.
    Changed(String),
    /// Shut down. `interrupted`: an add or renewal that was cut short, which the gateway may hold.
    Stop { interrupted: Option<MappingKey> },
}

/// What handling a signal asks of the session.
enum Flow {
    Continue,
    CheckNow,
    Rediscover(String),
}

/// How long after its release a port's delete may wait for the thread that released it to stop
/// running, and how often that is looked at. Not more often: "running" includes waiting for a CPU,
/// and a daemon that looks every 25 us keeps a program on a busy machine waiting for one (in the
/// benchmarks, close() to deleted went from 0.9 to 2.1 ms, p50).
const RELEASER_HOLD_LIMIT: Duration = Duration::from_millis(5);
const RELEASER_HOLD_STEP: Duration = Duration::from_micros(100);

/// Resolves once `stop` turns true (the guard wait_for returns must not live across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn std_now() -> std::time::Instant {
    Instant::now().into_std()
}

impl Reconciler {
    pub fn new(config: ReconcilerConfig, table: TableHandle, signals: Signals, ownership: Ownership) -> Self {
        Self {
            config,
            settings: None,
            table,
            signals,
            ownership,
            lan6: Lan6Watch::new(),
            sessions: 0,
            intake: None,
            intake_read_at: None,
            ready_published: false,
        }
    }

    /// Reads the kernel's events to the end (through `intake`) before each delete: see [`intake`].
    pub fn with_intake(mut self, intake: intake::IntakeFlush) -> Self {
        self.intake = Some(intake);
        self
    }

    /// Before the delete of `key`, released: whether to pick the work again, because the delete is
    /// held a little longer (the thread that released the port is still running, perhaps on its way
    /// to binding the next one: a port search, or a program preempted between its close() and its
    /// bind(), by this daemon among others), or because the event loop was asked to read what the
    /// kernel has reported (a bind it holds may now go first). See [`intake`].
    async fn before_delete(&mut self, key: &MappingKey) -> bool {
        let Some(hold) = self.table.read(|t| t.delete_hold(key)) else { return false };
        let now = std_now();
        if let Some(thread) = hold.released_by {
            if now < hold.released_at + RELEASER_HOLD_LIMIT && crate::host::process::thread_is_running(thread) {
                self.table.update(|t| t.hold_delete(key, now + RELEASER_HOLD_STEP));
                return true;
            }
        }
        let Some(intake) = &self.intake else { return false };
        if self.intake_read_at.is_some_and(|read| read >= hold.due) {
            return false;
        }
        self.intake_read_at = Some(intake.flush(std_now).await);
        true
    }

    /// Reads this host's IPv6 side from `lan6` (the daemon's record, which netwatch keeps current).
    pub fn with_lan6(mut self, lan6: Lan6Watch) -> Self {
        self.lan6 = lan6;
        self
    }

    /// Follows `settings` (a reload): a new lease applies to the next add or renewal, a new interval
    /// from now, keep-gateway-chosen-ports to the next add.
    pub fn following(mut self, settings: watch::Receiver<ReconcilerConfig>) -> Self {
        self.settings = Some(settings);
        self
    }

    /// Takes new settings if a reload sent any; true if it did.
    fn take_settings(&mut self) -> bool {
        let Some(settings) = &mut self.settings else { return false };
        if !settings.has_changed().unwrap_or(false) {
            return false;
        }
        self.config = settings.borrow_and_update().clone();
        true
    }

    async fn settings_changed(settings: &mut Option<watch::Receiver<ReconcilerConfig>>) {
        if let Some(settings) = settings {
            if settings.changed().await.is_ok() {
                return;
            }
        }
        std::future::pending::<()>().await
    }

    /// Runs until `stop` turns true, then deletes every mapping it made and returns. `discover(id)`
    /// finds the gateway (and where this host is) for session `id`; it is called again whenever the
    /// gateway stops answering or a signal says it changed.
    pub async fn run<G, D, F>(mut self, mut discover: D, mut stop: watch::Receiver<bool>)
    where
        G: Gateway,
        D: FnMut(u64) -> F,
        F: Future<Output = Result<(G, LanInfo), String>>,
    {
        let mut discovery_delay = Duration::from_secs(1);
        let mut last_discovery_error = String::new();
        loop {
            self.sessions += 1;
            let id = self.sessions;
            let search = discover(id);
            tokio::pin!(search);
            let found = loop {
                tokio::select! {
                    found = &mut search => break Some(found),
                    signal = self.signals.next() => {
                        // The gateway announced itself, or the network changed, while we searched: it
                        // may just have come back, so search again now.
                        if matches!(signal, Signal::Rediscover(_) | Signal::Announced(_)) {
                            break None;
                        }
                    }
                    _ = stopped(&mut stop) => return,
                }
            };
            let Some(found) = found else { continue };
            let (gateway, lan) = match found {
                Ok(found) => found,
                Err(e) => {
                    if e != last_discovery_error {
                        self.table.outcomes().publish(Outcome::GatewayNotFound { why: e.clone() });
                        last_discovery_error = e;
                    }
                    self.publish_ready(None);
                    if !self.wait_before_searching(discovery_delay, &mut stop).await {
                        return;
                    }
                    discovery_delay = (discovery_delay * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            last_discovery_error.clear();
            let mut session = GatewaySession::new(id, gateway, lan, self.table.outcomes().clone())
                .accept_other_ports(self.config.keep_gateway_chosen_ports);
            self.table.outcomes().publish(Outcome::GatewayFound {
                gateway: session.describe(),
                backend: session.backend(),
                local: lan.local,
            });
            // Whatever we believed about the gateway's table is stale after (re)discovery.
            self.table.update(|t| t.gateway_reset(lan.gateway, std_now()));
            let _ = session.refresh_external_address().await;
            let started = Instant::now();
            match self.serve(&mut session, &mut stop).await {
                Ended::Stop { interrupted } => {
                    self.remove_all(&session, interrupted).await;
                    return;
                }
                Ended::Rediscover(why) => {
                    self.table.outcomes().publish(Outcome::GatewayLost { gateway: session.describe(), why });
                }
                Ended::Changed(why) => {
                    self.table.outcomes().publish(Outcome::GatewayLost { gateway: session.describe(), why });
                    continue;
                }
            }
            // A gateway that is found but does not answer must not be rediscovered in a busy loop:
            // back off unless the session was a healthy one.
            if started.elapsed() >= self.config.interval {
                discovery_delay = Duration::from_secs(1);
            }
            if !self.wait_before_searching(discovery_delay, &mut stop).await {
                return;
            }
            discovery_delay = (discovery_delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Waits `delay` before the next search, or less if the gateway announces itself or the network
    /// changes. False: stop.
    async fn wait_before_searching(&self, delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                signal = self.signals.next() => {
                    if matches!(signal, Signal::Rediscover(_) | Signal::Announced(_)) {
                        return true;
                    }
                }
                _ = stopped(stop) => return false,
            }
        }
    }

    fn publish_ready(&mut self, gateway: Option<String>) {
        if gateway.is_none() && self.ready_published {
            return;
        }
        self.ready_published = true;
        let (sockets, mappings) = self.table.read(|t| (t.sockets().count(), t.mappings().count()));
        self.table.outcomes().publish(Outcome::Ready { gateway, sockets, mappings });
    }

    async fn serve<G: Gateway>(&mut self, session: &mut GatewaySession<G>, stop: &mut watch::Receiver<bool>) -> Ended {
        // Before the first check, so that the pinholes an earlier run left are found wanted or not.
        self.check_pinhole_service(session).await;
        let first_check = self.audit(session, true).await;
        self.audit_pinholes(session, true).await;
        match first_check {
            Err(AddError::Unreachable(e)) => {
                return Ended::Rediscover(format!("{} did not answer: {e}", session.describe()))
            }
            Err(e) => debug!("the first check of {} failed: {e}", session.describe()),
            Ok(()) => {}
        }
        self.publish_ready(Some(session.describe()));
        let timer = precise_timer::PreciseTimer::new();
        let mut next_check = Instant::now() + self.config.interval;
        let mut deferred: Option<Signal> = None;
        loop {
            if *stop.borrow() {
                return Ended::Stop { interrupted: None };
            }
            if self.take_settings() {
                session.set_accept_other_ports(self.config.keep_gateway_chosen_ports);
                next_check = next_check.min(Instant::now() + self.config.interval);
            }
            if let Some(signal) = deferred.take().or_else(|| self.signals.try_next()) {
                match self.on_signal(session, signal).await {
                    Flow::Continue => {}
                    Flow::CheckNow => next_check = Instant::now(),
                    Flow::Rediscover(why) => return Ended::Changed(why),
                }
                continue;
            }
            if let Some(work) = self.table.read(|t| t.next_work(std_now())) {
                let key = work.key();
                if matches!(work, Work::Delete { .. }) && self.before_delete(&key).await {
                    continue;
                }
                let adding = !matches!(work, Work::Delete { .. });
                // NAT-PMP and PCP retransmit for up to two minutes to a silent gateway: a network change
                // or a shutdown must not wait for that. Other signals wait for the call to end.
                let signals = self.signals.clone();
                let result = tokio::select! {
                    result = self.perform(session, work) => result,
                    why = signals.until_rediscover() => return Ended::Changed(why),
                    _ = stopped(stop) => return Ended::Stop { interrupted: adding.then_some(key) },
                };
                if let Err(AddError::Unreachable(e)) = result {
                    return Ended::Rediscover(format!("{} did not answer: {e}", session.describe()));
                }
                continue;
            }
            if Instant::now() >= next_check {
                let signals = self.signals.clone();
                let check = tokio::select! {
                    check = self.periodic_check(session) => check,
                    why = signals.until_rediscover() => return Ended::Changed(why),
                    _ = stopped(stop) => return Ended::Stop { interrupted: None },
                };
                if let Flow::Rediscover(why) = check {
                    return Ended::Rediscover(why);
                }
                crate::host::memory::give_back_freed_heap();
                next_check = Instant::now() + self.config.interval;
                continue;
            }
            let next_due = self.table.read(|t| t.next_due()).map(Instant::from_std);
            let wake_at = next_due.map_or(next_check, |d| d.min(next_check));
            let mut settings = self.settings.clone();
            tokio::select! {
                _ = self.table.changed() => {}
                _ = Self::settings_changed(&mut settings) => {}
                _ = timer.sleep_until(wake_at) => {}
                signal = self.signals.next() => deferred = Some(signal),
                _ = stopped(stop) => return Ended::Stop { interrupted: None },
            }
        }
    }

    async fn periodic_check<G: Gateway>(&mut self, session: &mut GatewaySession<G>) -> Flow {
        match self.audit(session, false).await {
            Err(AddError::Unreachable(e)) => {
                return Flow::Rediscover(format!("{} did not answer: {e}", session.describe()))
            }
            Err(e) => debug!("checking {} failed: {e}", session.describe()),
            Ok(()) => {}
        }
        self.check_pinhole_service(session).await;
        self.audit_pinholes(session, false).await;
        if session.gateway.can_read_table() {
            if let Err(AddError::Unreachable(e)) = session.refresh_external_address().await {
                return Flow::Rediscover(format!("{} did not answer: {e}", session.describe()));
            }
        }
        if session.gateway.preferred_protocol_answers().await {
            return Flow::Rediscover(format!(
                "a protocol preferred to {} now answers at the gateway: choosing again",
                session.backend()
            ));
        }
        Flow::Continue
    }

    async fn on_signal<G: Gateway>(&mut self, session: &mut GatewaySession<G>, signal: Signal) -> Flow {
        match signal {
            Signal::Rediscover(why) => Flow::Rediscover(why),
            Signal::CheckNow => Flow::CheckNow,
            Signal::LostMappings { session: id, why } if id == session.id => {
                self.gateway_lost_mappings(session, why);
                Flow::Continue
            }
            Signal::LostMappings { session: id, why } => {
                debug!("ignoring news of an earlier gateway session ({id}): {why}");
                Flow::Continue
            }
            Signal::Announced(announcement) => {
                if let Some(why) = session.observe_announcement(&announcement) {
                    self.gateway_lost_mappings(session, why);
                }
                if session.gateway.can_read_table() {
                    // Its table tells the rest.
                    return Flow::CheckNow;
                }
                // A gateway that lost its mappings but kept its epoch (a firewall reload, an epoch that
                // is the system's uptime) shows nothing else: renewing every mapping is the check and
                // the repair. The exchange checks the epoch, and reads the external address.
                self.table.update(|t| t.renew_all_now(std_now()));
                if let Err(AddError::Unreachable(e)) = session.refresh_external_address().await {
                    return Flow::Rediscover(format!("{} did not answer: {e}", session.describe()));
                }
                Flow::Continue
            }
        }
    }

    fn gateway_lost_mappings<G: Gateway>(&mut self, session: &GatewaySession<G>, why: String) {
        self.table.outcomes().publish(Outcome::GatewayLostMappings { gateway: session.describe(), why });
        self.table.update(|t| t.gateway_reset(session.address(), std_now()));
    }

    /// One piece of the table's work, as gateway calls; the answer goes back into the table.
    async fn perform<G: Gateway>(&mut self, session: &mut GatewaySession<G>, work: Work) -> Result<(), AddError> {
        let key = work.key();
        let port_key = match key {
            MappingKey::Ipv4(port_key) => port_key,
            MappingKey::Ipv6Pinhole(pinhole) => return self.perform_pinhole(session, work, pinhole).await,
        };
        let renewal = matches!(work, Work::Renew { .. });
        match work {
            Work::Add { comm, .. } | Work::Renew { comm, .. } => {
                let description = self.ownership.description(&comm);
                // Written ahead: a daemon killed while the request is on its way still knows to delete it.
                let asked = if session.permanent_only() { Duration::ZERO } else { self.config.lease };
                let journalling = Instant::now();
                self.ownership.record(port_key, &session.lan, asked).await;
                debug!("journalled {key} in {:.2} ms", journalling.elapsed().as_secs_f64() * 1e3);
                let started = Instant::now();
                let result = session.add(port_key, &description, self.config.lease).await;
                let now = std_now();
                let held_before = self.table.read(|t| t.mapping(&key).is_some_and(|m| m.on_gateway));
                match result {
                    Ok(granted) => {
                        self.ownership.record(port_key, &session.lan, granted.lease).await;
                        let grant = Grant {
                            external_port: granted.external_port.unwrap_or(port_key.port),
                            lease: Lease::from_granted(granted.lease),
                            internal: SocketAddrV4::new(session.lan.local, port_key.port),
                            backend: session.backend(),
                            renewal,
                            took: started.elapsed(),
                            handle: None,
                        };
                        self.table.update(|t| t.record_mapped(key, grant, std_now()));
                        Ok(())
                    }
                    Err(e @ (AddError::Conflict | AddError::OtherPortOffered { .. })) => {
                        let offered = match e {
                            AddError::OtherPortOffered { offered } => Some(offered),
                            _ => None,
                        };
                        let holder = self.holder_of(session, port_key).await;
                        let learned = if session.gateway.can_read_table() {
                            Learned::Listed
                        } else {
                            Learned::Refused { at: now }
                        };
                        let gateway = session.address();
                        if !held_before {
                            self.ownership.forget(port_key).await;
                        }
                        self.table.update(|t| t.record_conflict(port_key, holder, learned, gateway, offered));
                        Ok(())
                    }
                    Err(e @ AddError::BehindAnotherNat(_)) => {
                        session.note_nat_in_between(&e.to_string());
                        if !held_before {
                            self.ownership.forget(port_key).await;
                        }
                        self.table.update(|t| t.record_failed(key, e.to_string(), now));
                        Ok(())
                    }
                    // The request may have reached the gateway: the journal keeps it, to be deleted if unwanted.
                    Err(AddError::Unreachable(e)) => {
                        self.table.update(|t| t.record_failed(key, format!("the gateway did not answer: {e}"), now));
                        Err(AddError::Unreachable(e))
                    }
                    Err(e) => {
                        if !held_before {
                            self.ownership.forget(port_key).await;
                        }
                        self.table.update(|t| t.record_failed(key, e.to_string(), now));
                        Ok(())
                    }
                }
            }
            Work::Delete { .. } => match session.delete(port_key).await {
                Ok(()) => {
                    self.ownership.forget(port_key).await;
                    self.table.update(|t| t.record_deleted(key, Removal::Released, std_now()));
                    Ok(())
                }
                Err(AddError::Unreachable(e)) => Err(AddError::Unreachable(e)),
                Err(e) => {
                    self.table.update(|t| t.record_delete_failed(key, e.to_string(), std_now()));
                    Ok(())
                }
            },
        }
    }

    /// Who holds a port the gateway would not map for us, where its table says.
    async fn holder_of<G: Gateway>(&self, session: &GatewaySession<G>, key: PortKey) -> Option<std::net::Ipv4Addr> {
        if !session.gateway.can_read_table() {
            return None;
        }
        let entries = session.gateway.list().await.ok()?;
        entries
            .iter()
            .find(|e| e.protocol == key.protocol && e.external_port == key.port)
            .and_then(GatewayEntry::internal_ipv4)
            .filter(|ip| *ip != session.lan.local)
    }

    /// Shutdown: delete every mapping we hold, within the grace period, and `interrupted`, an add
    /// that was cut short and may have reached the gateway.
    async fn remove_all<G: Gateway>(&mut self, session: &GatewaySession<G>, interrupted: Option<MappingKey>) {
        let mut keys = self.table.read(|t| t.on_gateway_keys());
        if let Some(key) = interrupted.filter(|k| !keys.contains(k)) {
            keys.push(key);
        }
        let deadline = Instant::now() + self.config.shutdown_grace;
        for key in keys {
            let port_key = match key {
                MappingKey::Ipv4(port_key) => port_key,
                MappingKey::Ipv6Pinhole(pinhole) => {
                    if tokio::time::timeout_at(deadline, self.close_at_shutdown(session, pinhole)).await.is_err() {
                        warn!("shutdown grace period over; remaining pinholes end with their leases");
                        break;
                    }
                    continue;
                }
            };
            match tokio::time::timeout_at(deadline, session.delete(port_key)).await {
                Ok(Ok(())) => {
                    self.ownership.forget(port_key).await;
                    self.table.update(|t| t.record_deleted(key, Removal::Shutdown, std_now()));
                }
                Ok(Err(e)) => {
                    self.table.update(|t| t.record_delete_failed(key, format!("{e} (at shutdown)"), std_now()))
                }
                Err(_) => {
                    warn!("shutdown grace period over; remaining mappings end with their leases");
                    break;
                }
            }
        }
        info!("removed this host's mappings from {}", session.describe());
    }
}

#[cfg(test)]
mod tests;
