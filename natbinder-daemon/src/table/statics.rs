//! Mappings an operator asks for (`natbinder add`, the Windows NAT traversal API's static mappings),
//! and ports an operator turned off (`natbinder disable`).
//!
//! A static mapping is kept in the table as a socket that natbinder holds itself: its cookie is in a
//! range the kernel never hands out, it has no process, and it lives until `delete`. Everything else
//! (retries, conflicts, renewals, the gateway's restarts, the journal) is the same as for a program's
//! socket. A disabled port keeps its sockets and static mapping, but wants nothing from the gateway
//! until `enable`.
use std::{sync::Arc, time::Instant};

use super::{Listener, MappingKey, Owner, PortKey, SocketRecord, Stack, Table};
use crate::{
    outcome::{Found, Outcome, Removal},
    policy::Decision,
    Family,
};

/// Socket cookies at or above this are static mappings. The kernel counts its cookies up from 1.
pub const STATIC_COOKIE_BASE: u64 = 1 << 63;

pub fn static_cookie(key: PortKey) -> u64 {
    STATIC_COOKIE_BASE | (u64::from(key.protocol.ip_proto()) << 16) | u64::from(key.port)
}

pub fn is_static(cookie: u64) -> bool {
    cookie >= STATIC_COOKIE_BASE
}

/// Why an operator's change could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StaticError {
    #[error("{0} is below the lowest forwarded port {1}: natbinder never maps privileged ports")]
    BelowMinPort(PortKey, u16),
    #[error("there is no static mapping {0} (a program's port is turned off with `natbinder disable`)")]
    NoSuchStatic(PortKey),
    #[error("natbinder knows no socket or mapping on {0}")]
    NoSuchMapping(PortKey),
}

/// Why a disabled port's sockets are not forwarded, as `list`, `watch` and the log say it.
pub const DISABLED_RULE: &str = "disabled with `natbinder disable`; `natbinder enable` forwards it again";

impl Table {
    /// A static mapping of `key`, described as `description`, on behalf of `uid`. Adding one that
    /// exists changes its description.
    pub fn add_static(&mut self, key: PortKey, description: &str, uid: u32, now: Instant) -> Result<(), StaticError> {
        let min_port = self.config.min_port;
        if key.port < min_port {
            return Err(StaticError::BelowMinPort(key, min_port));
        }
        let cookie = static_cookie(key);
        if self.sockets.contains_key(&cookie) {
            return self.describe(key, description, now);
        }
        let listener = Listener {
            cookie,
            protocol: key.protocol,
            port: key.port,
            family: Family::Ipv4,
            owner: Owner { uid, gid: uid, comm: description.to_string(), ..Owner::default() },
        };
        let decision = Decision::new(true, "static mapping (natbinder add)");
        self.socket_bound(listener, Stack::Ipv4, Found::Static, decision, now);
        Ok(())
    }

    pub fn delete_static(&mut self, key: PortKey, now: Instant) -> Result<(), StaticError> {
        let cookie = static_cookie(key);
        if !self.sockets.contains_key(&cookie) {
            return Err(StaticError::NoSuchStatic(key));
        }
        self.socket_released(cookie, crate::outcome::Seen::Deleted, now);
        Ok(())
    }

    /// The static mappings, with their descriptions and the uid that added each.
    pub fn statics(&self) -> Vec<(PortKey, String, u32)> {
        let mut all: Vec<(PortKey, String, u32)> = self
            .sockets
            .values()
            .filter(|r| is_static(r.listener.cookie))
            .map(|r| {
                let key = PortKey::new(r.listener.protocol, r.listener.port);
                (key, r.listener.owner.comm.clone(), r.listener.owner.uid)
            })
            .collect();
        all.sort();
        all
    }

    /// Changes the description the gateway shows for `key` (renewed now, so that it shows there).
    pub fn describe(&mut self, key: PortKey, description: &str, now: Instant) -> Result<(), StaticError> {
        let cookie = static_cookie(key);
        if let Some(record) = self.sockets.get_mut(&cookie) {
            record.listener.owner.comm = description.to_string();
        }
        let Some(m) = self.mappings.get_mut(&MappingKey::Ipv4(key)) else {
            return match self.sockets.contains_key(&cookie) || self.disabled.contains(&key) {
                true => Ok(()),
                false => Err(StaticError::NoSuchMapping(key)),
            };
        };
        m.comm = description.to_string();
        if let super::MappingState::Active { renew_at, .. } = &mut m.state {
            *renew_at = now;
        }
        Ok(())
    }

    pub fn disabled(&self) -> impl Iterator<Item = &PortKey> {
        self.disabled.iter()
    }

    pub fn is_disabled(&self, key: PortKey) -> bool {
        self.disabled.contains(&key)
    }

    /// Stops forwarding `key` without forgetting it: its mapping comes off the gateway, its sockets
    /// stay bound (reachable on the LAN), and so does a static mapping's entry.
    pub fn disable(&mut self, key: PortKey, now: Instant) {
        if !self.disabled.insert(key) {
            return;
        }
        let wanting: Vec<u64> = self
            .sockets
            .values()
            .filter(|r| {
                r.mappings.contains(&MappingKey::Ipv4(key))
                    || (r.listener.port == key.port && r.listener.protocol == key.protocol)
                        && (r.over_limit || !r.mappings.is_empty())
            })
            .map(|r| r.listener.cookie)
            .collect();
        for cookie in wanting {
            let record = self.sockets.get_mut(&cookie).expect("listed above");
            record.over_limit = false;
            let listener = record.listener.clone();
            self.unwant_all(cookie, Removal::Disabled, now);
            self.publish(Outcome::NotForwarded { listener, rule: Arc::from(DISABLED_RULE) });
        }
    }

    /// Forwards `key` again after [`Table::disable`].
    pub fn enable(&mut self, key: PortKey, now: Instant) {
        if !self.disabled.remove(&key) {
            return;
        }
        let mut waiting: Vec<u64> = self
            .sockets
            .values()
            .filter(|r| r.listener.protocol == key.protocol && r.listener.port == key.port)
            .filter(|r| r.decision.forward && r.mappings.is_empty())
            .map(|r| r.listener.cookie)
            .collect();
        waiting.sort_unstable();
        for cookie in waiting {
            let record = &self.sockets[&cookie];
            let keys = self.wanted_keys(&record.listener, record.stack);
            self.want_all(keys, cookie, now);
        }
    }

    /// Whether the socket's port is disabled (then it wants nothing).
    pub(super) fn disabled_for(&self, record: &SocketRecord) -> bool {
        self.disabled.contains(&PortKey::new(record.listener.protocol, record.listener.port))
    }
}
