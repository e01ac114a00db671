//! The daemon's side of `natbinder run --wait`: a program's bind() is held by its supervisor, which
//! asks here (io.natbinder.AwaitBind) whether the port is the program's on the gateway. The answer is
//! the paper's:
//! * mapped (or already mapped for another socket of this host): the bind goes on;
//! * taken: another host holds the port (718, another host in the table, or a NAT-PMP/PCP grant of
//!   another port): the bind fails with EADDRINUSE, so the program's port search moves on;
//! * anything else (not forwarded, no gateway, a gateway error, no answer in time): the bind goes
//!   on, and the mapping stays pending as in the automatic mode.
//!
//! The mapping is wanted before the socket exists, through a reservation in the table
//! ([`crate::table::reservations`]) that the socket claims when it is bound, or that lapses
//! [`RESERVATION_HOLD`] after the answer, taking with it a mapping that no socket needs.
use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::broadcast::error::RecvError;

use super::cgroups::RunCgroups;
use crate::{
    control::views::Facts,
    host::cgroup::WatchedCgroup,
    outcome::Outcome,
    policy::exposure::Exposure,
    table::{Listener, MappingKey, Owner, PendingReason, PortKey, Reserved, Stack, TableHandle},
    Family, Protocol,
};

/// How long a reservation waits for its socket after the answer. The supervisor lets the bind go on
/// at once; this only has to outlast a machine under load.
pub const RESERVATION_HOLD: Duration = Duration::from_secs(5);

/// The longest wait a supervisor may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// What the supervisor asks: process `pid` is about to bind `protocol`/`port` on a wildcard address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindRequest {
    pub pid: u32,
    pub protocol: Protocol,
    pub port: u16,
    pub family: Family,
    /// An AF_INET6 socket with IPV6_V6ONLY: it takes no IPv4, so it needs no IPv4 mapping.
    pub v6only: bool,
    pub wait: Duration,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// On the gateway: the bind goes on, and the port is reachable.
    Mapped { external_port: u16 },
    /// Another host holds the port: the bind fails with EADDRINUSE.
    Taken { holder: Option<Ipv4Addr>, offered: Option<u16> },
    /// The bind goes on; the mapping stays pending (no gateway, a gateway error, events lost).
    Pending { reason: String },
    /// The policy does not forward it: the bind goes on, untouched.
    NotForwarded { rule: String },
    /// The process is outside every cgroup natbinder watches.
    NotWatched,
    /// The gateway did not answer within the wait: the bind goes on; the mapping stays pending.
    TimedOut,
}

impl Verdict {
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Mapped { .. } => "mapped",
            Verdict::Taken { .. } => "taken",
            Verdict::Pending { .. } => "pending",
            Verdict::NotForwarded { .. } => "not-forwarded",
            Verdict::NotWatched => "not-watched",
            Verdict::TimedOut => "timed-out",
        }
    }
}

/// Why a caller may not ask about a process.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WaitRefused {
    #[error("process {0} does not exist")]
    NoSuchProcess(u32),
    #[error("process {pid} belongs to uid {owner}: only its owner or root may wait for its binds")]
    NotYours { pid: u32, owner: u32 },
}

/// What answering needs; shared by the control socket's connections.
pub struct BindWaits {
    pub table: TableHandle,
    pub exposure: Arc<Exposure>,
    pub facts: Arc<Mutex<Facts>>,
    pub watched: WatchedCgroup,
    pub runs: Arc<RunCgroups>,
}

impl BindWaits {
    /// Answers `request` from `caller_uid`, waiting for the gateway at most `request.wait`.
    pub async fn answer(&self, caller_uid: u32, request: BindRequest) -> Result<Verdict, WaitRefused> {
        let owner = process_owner(request.pid).ok_or(WaitRefused::NoSuchProcess(request.pid))?;
        // SAFETY: geteuid cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        if caller_uid != 0 && caller_uid != own_uid && caller_uid != owner.uid {
            return Err(WaitRefused::NotYours { pid: request.pid, owner: owner.uid });
        }
        let mut listener =
            Listener { cookie: 0, protocol: request.protocol, port: request.port, family: request.family, owner };
        let decision = self.exposure.admit(&mut listener);
        if !listener.owner.cgroup.as_deref().is_some_and(|c| self.watches(c)) {
            return Ok(Verdict::NotWatched);
        }
        let stack = match (request.family, request.v6only) {
            (Family::Ipv4, _) => Stack::Ipv4,
            (Family::Ipv6, false) => Stack::DualStack,
            (Family::Ipv6, true) => Stack::Ipv6Only,
        };
        // Subscribed before the reservation, so that no answer of the gateway is missed.
        let mut outcomes = self.table.outcomes().subscribe();
        let now = Instant::now();
        let reserved = self.table.update(|t| t.reserve(listener, stack, decision, now));
        let (cookie, key) = match &reserved {
            Reserved::NotForwarded { rule } => return Ok(Verdict::NotForwarded { rule: rule.to_string() }),
            Reserved::Asked { cookie, key }
            | Reserved::Mapped { cookie, key }
            | Reserved::Taken { cookie, key }
            | Reserved::Pending { cookie, key, .. } => (*cookie, *key),
        };
        let verdict = match reserved {
            Reserved::Mapped { .. } => self.mapped_now(key),
            Reserved::Taken { .. } => self.taken_now(key),
            Reserved::Pending { reason, .. } => Verdict::Pending { reason: pending_reason(&reason) },
            _ => match self.no_gateway() {
                Some(why) => Verdict::Pending { reason: why },
                None => {
                    let wait = request.wait.min(MAX_WAIT);
                    match tokio::time::timeout(wait, self.gateway_answer(key, &mut outcomes)).await {
                        Ok(verdict) => verdict,
                        Err(_) => Verdict::TimedOut,
                    }
                }
            },
        };
        if let Verdict::Taken { .. } = verdict {
            // The bind fails without being performed: nothing will claim it. (A supervisor that gave
            // up waiting has let the bind go on, and that socket claimed the reservation already.)
            self.table.update(|t| t.end_reservation(cookie, Instant::now()));
        } else {
            let table = self.table.clone();
            tokio::spawn(async move {
                tokio::time::sleep(RESERVATION_HOLD).await;
                table.update(|t| t.end_reservation(cookie, Instant::now()));
            });
        }
        Ok(verdict)
    }

    /// Whether the hooks see binds in `cgroup` (relative to the cgroup2 root).
    fn watches(&self, cgroup: &str) -> bool {
        if self.runs.contains(cgroup) || self.watched.is_root {
            return true;
        }
        let watched = self.watched.path.strip_prefix(&self.watched.root).map(|p| p.display().to_string());
        let Ok(watched) = watched else { return false };
        let cgroup = cgroup.trim_matches('/');
        cgroup == watched || cgroup.strip_prefix(watched.as_str()).is_some_and(|rest| rest.starts_with('/'))
    }

    fn no_gateway(&self) -> Option<String> {
        let facts = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        match (&facts.gateway, &facts.gateway_problem) {
            (None, Some(why)) => Some(format!("no gateway: {why}")),
            _ => None,
        }
    }

    fn mapped_now(&self, key: MappingKey) -> Verdict {
        let external = self.table.read(|t| t.mapping(&key).and_then(|m| m.external_port));
        Verdict::Mapped { external_port: external.unwrap_or(key.port()) }
    }

    fn taken_now(&self, key: MappingKey) -> Verdict {
        let held = key.as_ipv4().and_then(|k| self.table.read(|t| t.held().find(|(h, _)| **h == k).map(|(_, h)| *h)));
        Verdict::Taken { holder: held.and_then(|h| h.holder), offered: held.and_then(|h| h.offered) }
    }

    /// The gateway's first answer about `key`.
    async fn gateway_answer(
        &self,
        key: MappingKey,
        outcomes: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<crate::outcome::Event>>,
    ) -> Verdict {
        let port_key: Option<PortKey> = key.as_ipv4();
        loop {
            let event = match outcomes.recv().await {
                Ok(event) => event,
                // Too far behind to tell what happened in order: read where the mapping stands.
                Err(RecvError::Lagged(_)) => match self.state_now(key) {
                    Some(verdict) => return verdict,
                    None => continue,
                },
                Err(RecvError::Closed) => return Verdict::Pending { reason: "natbinder is shutting down".into() },
            };
            match &event.outcome {
                Outcome::Mapped { key: k, external_port, .. } if Some(*k) == port_key => {
                    return Verdict::Mapped { external_port: *external_port }
                }
                Outcome::Conflict { key: k, holder, offered } if Some(*k) == port_key => {
                    return Verdict::Taken { holder: *holder, offered: *offered }
                }
                Outcome::Pending { key: k, reason: reason @ PendingReason::Retrying { .. } } if *k == key => {
                    return Verdict::Pending { reason: pending_reason(reason) }
                }
                Outcome::GatewayLost { why, .. } => return Verdict::Pending { reason: format!("gateway lost: {why}") },
                _ => {}
            }
        }
    }

    fn state_now(&self, key: MappingKey) -> Option<Verdict> {
        use crate::table::MappingState;
        let state = self.table.read(|t| t.mapping(&key).map(|m| m.state.clone()))?;
        match state {
            MappingState::Active { .. } => Some(self.mapped_now(key)),
            MappingState::Conflict => Some(self.taken_now(key)),
            MappingState::Pending { reason: reason @ PendingReason::Retrying { .. }, .. } => {
                Some(Verdict::Pending { reason: pending_reason(&reason) })
            }
            MappingState::Pending { .. } => None,
        }
    }
}

fn pending_reason(reason: &PendingReason) -> String {
    match reason {
        PendingReason::Retrying { error, .. } => format!("the gateway refused for now: {error}"),
        PendingReason::EventStorm => "kernel events were lost: new mappings wait for a listing of the sockets".into(),
        other => format!("{other:?}"),
    }
}

/// uid, gid and command name of process `pid`, from /proc.
fn process_owner(pid: u32) -> Option<Owner> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let first = |field: &str| -> Option<u32> {
        status.lines().find_map(|l| l.strip_prefix(field))?.split_whitespace().next()?.parse().ok()
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    Some(Owner { pid, uid: first("Uid:")?, gid: first("Gid:")?, comm: comm.trim_end().to_string(), ..Owner::default() })
}
