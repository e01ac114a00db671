//! Where this host sits on its LAN, read over rtnetlink: the IPv4 default route's gateway, the interface
//! it leaves by, and this host's address on that interface (the internal client of every mapping).
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, Context, Result};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::netlink_dump::dump;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LanInfo {
    /// Next hop of the IPv4 default route: the gateway to talk to.
    pub gateway: Ipv4Addr,
    /// This host's address on the interface the default route leaves by.
    pub local: Ipv4Addr,
    pub interface_index: u32,
}

#[derive(Debug)]
struct DefaultRoute {
    gateway: Ipv4Addr,
    oif: u32,
    priority: u32,
}

/// Reads the default route and local address. Fails with a message that says what is missing.
pub fn lan_info() -> Result<LanInfo> {
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    let routes = dump(NETLINK_ROUTE, RouteNetlinkMessage::GetRoute(request)).context("listing routes")?;
    let mut best: Option<DefaultRoute> = None;
    for message in routes {
        let RouteNetlinkMessage::NewRoute(route) = message else { continue };
        if route.header.destination_prefix_length != 0 || route.header.kind != RouteType::Unicast {
            continue;
        }
        let (mut gateway, mut oif, mut priority) = (None, None, 0);
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Priority(p) => priority = *p,
                _ => {}
            }
        }
        if let (Some(gateway), Some(oif)) = (gateway, oif) {
            if best.as_ref().is_none_or(|b| priority < b.priority) {
                best = Some(DefaultRoute { gateway, oif, priority });
            }
        }
    }
    let route = best.ok_or_else(|| {
        anyhow!("no IPv4 default route with a gateway: natbinder needs a LAN gateway (check `ip route`)")
    })?;

    let mut request = AddressMessage::default();
    request.header.family = AddressFamily::Inet;
    let addresses = dump(NETLINK_ROUTE, RouteNetlinkMessage::GetAddress(request)).context("listing addresses")?;
    let mut candidates = Vec::new();
    for message in addresses {
        let RouteNetlinkMessage::NewAddress(address) = message else { continue };
        if address.header.index != route.oif {
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
        .find(|(ip, len)| same_subnet(*ip, route.gateway, *len))
        .or(candidates.first())
        .map(|(ip, _)| *ip)
        .ok_or_else(|| anyhow!("the default route's interface (index {}) has no IPv4 address", route.oif))?;
    Ok(LanInfo { gateway: route.gateway, local, interface_index: route.oif })
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
