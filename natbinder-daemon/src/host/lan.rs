//! Where this host sits on its LAN, read over rtnetlink: the IPv4 default route's gateway, the interface
//! it leaves by, and this host's address on that interface (the internal client of every mapping).
//!
//! [`LanWatch`] is the one record of it: discovery refreshes it before each search, the rtnetlink
//! watcher after each burst of network changes, and the announcement listeners follow it.
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use tokio::sync::watch;
use tracing::{info, warn};

use anyhow::{anyhow, Context, Result};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    route::RouteMessage,
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::protocols::NETLINK_ROUTE;

use super::netlink::{default_routes, dump};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LanInfo {
    /// Next hop of the IPv4 default route: the gateway to talk to.
    pub gateway: Ipv4Addr,
    /// This host's address on the interface the default route leaves by.
    pub local: Ipv4Addr,
    pub interface_index: u32,
}

/// Reads the default route and local address. Fails with a message that says what is missing.
pub fn lan_info() -> Result<LanInfo> {
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    let routes = dump(NETLINK_ROUTE, RouteNetlinkMessage::GetRoute(request)).context("listing routes")?;
    let best = default_routes(&routes)
        .filter_map(|r| match r.gateway {
            IpAddr::V4(gateway) => Some((r.priority, gateway, r.oif)),
            IpAddr::V6(_) => None,
        })
        .min_by_key(|(priority, ..)| *priority);
    let (_, gateway, oif) = best.ok_or_else(|| {
        anyhow!("no IPv4 default route with a gateway: natbinder needs a LAN gateway (check `ip route`)")
    })?;

    let mut request = AddressMessage::default();
    request.header.family = AddressFamily::Inet;
    let addresses = dump(NETLINK_ROUTE, RouteNetlinkMessage::GetAddress(request)).context("listing addresses")?;
    let mut candidates = Vec::new();
    for message in addresses {
        let RouteNetlinkMessage::NewAddress(address) = message else { continue };
        if address.header.index != oif {
            continue;
        }
        for attribute in &address.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) = attribute {
                candidates.push((*ip, address.header.prefix_len));
                break;
            }
        }
    }
    // Prefer the address whose subnet holds the gateway; an interface may carry several.
    let local = candidates
        .iter()
        .find(|(ip, len)| same_subnet(*ip, gateway, *len))
        .or(candidates.first())
        .map(|(ip, _)| *ip)
        .ok_or_else(|| anyhow!("the default route's interface (index {}) has no IPv4 address", oif))?;
    Ok(LanInfo { gateway, local, interface_index: oif })
}

/// What this host knows of its LAN, shared. Cheap to clone.
#[derive(Clone)]
pub struct LanWatch {
    sender: Arc<watch::Sender<Option<LanInfo>>>,
    /// Whether anything was read yet: the first reading is no change.
    read_once: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for LanWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of [`LanWatch::refresh`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refreshed {
    pub lan: Result<LanInfo, String>,
    /// Whether it differs from what was known before (the first reading counts as no change).
    pub changed: bool,
}

impl LanWatch {
    pub fn new() -> Self {
        Self { sender: Arc::new(watch::channel(None).0), read_once: Default::default() }
    }

    /// A watch that starts out knowing `lan` (tests).
    pub fn fixed(lan: LanInfo) -> Self {
        let watch = Self::new();
        watch.sender.send_replace(Some(lan));
        watch.read_once.store(true, std::sync::atomic::Ordering::SeqCst);
        watch
    }

    /// The latest reading; None before the first one or without a default route.
    pub fn current(&self) -> Option<LanInfo> {
        *self.sender.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<LanInfo>> {
        self.sender.subscribe()
    }

    /// Reads the routes and addresses again (a blocking netlink dump, off the event loop), records
    /// the result, and logs a change once, whoever noticed it first.
    pub async fn refresh(&self) -> Refreshed {
        let read = tokio::task::spawn_blocking(lan_info)
            .await
            .map_err(|e| format!("reading the routes failed: {e}"))
            .and_then(|r| r.map_err(|e| format!("{e:#}")));
        let now = read.as_ref().ok().copied();
        let first = !self.read_once.swap(true, std::sync::atomic::Ordering::SeqCst);
        let changed = self.sender.send_if_modified(|known| {
            if *known == now {
                return false;
            }
            *known = now;
            true
        });
        let changed = changed && !first;
        if changed {
            match &now {
                Some(n) => info!(
                    "network changed: gateway {} via interface {}, this host {}",
                    n.gateway, n.interface_index, n.local
                ),
                None => warn!("network changed: there is no IPv4 default route any more"),
            }
        }
        Refreshed { lan: read, changed }
    }
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    if prefix_len == 0 {
        return true;
    }
    let mask = u32::MAX.checked_shl(32 - prefix_len.min(32) as u32).unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_match() {
        let gw = Ipv4Addr::new(192, 168, 1, 1);
        assert!(same_subnet(Ipv4Addr::new(192, 168, 1, 50), gw, 24));
        assert!(!same_subnet(Ipv4Addr::new(192, 168, 2, 50), gw, 24));
        assert!(same_subnet(Ipv4Addr::new(10, 0, 0, 1), gw, 0));
        assert!(same_subnet(gw, gw, 32));
    }
}
