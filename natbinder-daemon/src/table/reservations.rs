//! Binds announced before they happen: `natbinder run --wait` holds a program's bind() until the
//! gateway has answered (the paper's blocking bind), so the mapping must be wanted before the socket
//! exists.
//!
//! A reservation is kept as a socket of its own, as a static mapping is: its cookie is in a range the
//! kernel never hands out, its owner is the program about to bind. So it goes through everything a
//! socket does (the policy's decision, the per-user limit, disabled ports, the held-elsewhere record,
//! retries, the journal) and its mapping is made like any other. Then one of two things happens:
//! * the program's socket is bound, by the same process, and joins the mapping: the reservation is
//!   claimed and goes, and the mapping stays, now the socket's (it never leaves the gateway);
//! * no such socket comes (the bind failed locally, the program changed its mind, EADDRINUSE was
//!   answered): the reservation lapses, and with it a mapping no socket needs.
use std::{sync::Arc, time::Instant};

use super::{Listener, MappingKey, MappingState, PendingReason, Stack, Table};
use crate::{
    outcome::{Found, Seen},
    policy::Decision,
};

/// Socket cookies in [RESERVATION_COOKIE_BASE, STATIC_COOKIE_BASE) are reservations. The kernel counts
/// its cookies up from 1 and would need 2^62 sockets to get here.
pub const RESERVATION_COOKIE_BASE: u64 = 1 << 62;

pub fn is_reservation(cookie: u64) -> bool {
    (RESERVATION_COOKIE_BASE..super::statics::STATIC_COOKIE_BASE).contains(&cookie)
}

/// What a reservation's mapping is when it is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reserved {
    /// Wanted, and the gateway is asked (or will be): wait for its answer.
    Asked { cookie: u64, key: MappingKey },
    /// Already on the gateway for another socket of this host: nothing to wait for.
    Mapped { cookie: u64, key: MappingKey },
    /// Another host holds the port.
    Taken { cookie: u64, key: MappingKey },
    /// Pending for a reason the gateway's answer would not change now (the gateway refused it for a
    /// passing reason, kernel events are being lost).
    Pending { cookie: u64, key: MappingKey, reason: PendingReason },
    /// Not forwarded: the policy, the user's limit, or a disabled port. Nothing was reserved.
    NotForwarded { rule: Arc<str> },
}

impl Table {
    /// The process `listener.owner.pid` is about to bind `listener`'s port on a wildcard address
    /// (`stack` says which families it takes); `decision` is the policy's. Wants the mapping now on
    /// its behalf and says where it stands. The caller ends the reservation
    /// ([`Table::end_reservation`]) once the bind had its time.
    pub fn reserve(&mut self, mut listener: Listener, stack: Stack, decision: Decision, now: Instant) -> Reserved {
        if !decision.forward {
            return Reserved::NotForwarded { rule: decision.rule };
        }
        let Some(key) = self.wanted_ipv4_key(&listener, stack) else {
            return Reserved::NotForwarded { rule: Arc::from("below the lowest forwarded port, or IPv6-only") };
        };
        self.next_reservation += 1;
        let cookie = RESERVATION_COOKIE_BASE + self.next_reservation;
        listener.cookie = cookie;
        let pid = listener.owner.pid;
        self.reservations.insert(cookie, (key, pid));
        self.socket_bound(listener, stack, Found::Announced, decision, now);
        let record = self.sockets.get(&cookie).expect("just added");
        if !record.mappings.contains(&key) {
            // Over the user's limit, or the port is disabled: it wants nothing.
            let rule = if record.over_limit {
                Arc::from("max-mappings-per-user: this user holds as many mappings as they may")
            } else {
                Arc::from(super::statics::DISABLED_RULE)
            };
            self.end_reservation(cookie, now);
            return Reserved::NotForwarded { rule };
        }
        match self.mappings.get(&key).map(|m| &m.state) {
            Some(MappingState::Active { .. }) => Reserved::Mapped { cookie, key },
            Some(MappingState::Conflict) => Reserved::Taken { cookie, key },
            Some(MappingState::Pending {
                reason: reason @ (PendingReason::Retrying { .. } | PendingReason::EventStorm),
                ..
            }) => Reserved::Pending { cookie, key, reason: reason.clone() },
            _ => Reserved::Asked { cookie, key },
        }
    }

    /// The reservation had its time: if no socket claimed it, it goes, and so does its mapping unless
    /// another socket wants it. Nothing if it was claimed already.
    pub fn end_reservation(&mut self, cookie: u64, now: Instant) {
        if self.reservations.remove(&cookie).is_some() {
            self.socket_released(cookie, Seen::Lapsed, now);
        }
    }

    /// A socket of process `pid` now wants `key`: reservations of that process for it are claimed.
    /// The socket is in the mapping already, so the mapping stays where it is.
    pub(super) fn claim_reservations(&mut self, key: MappingKey, pid: u32, now: Instant) {
        let claimed: Vec<u64> =
            self.reservations.iter().filter(|(_, (k, p))| *k == key && *p == pid).map(|(c, _)| *c).collect();
        for cookie in claimed {
            self.reservations.remove(&cookie);
            self.socket_released(cookie, Seen::Claimed, now);
        }
    }
}
