//! This host's IPv6 side of the LAN, read over rtnetlink: the addresses a [::] listener can be reached
//! on from the internet (each gets its own firewall pinhole on the gateway), and the IPv6 router,
//! which is where pinhole requests go.
//!
//! Which addresses get pinholes: global unicast addresses on the LAN interface (the IPv4 default
//! route's), usable now. Left out:
//! * link-local and unique local (fc00::/7) addresses: the internet cannot send to them;
//! * tentative addresses and those whose duplicate address detection failed: not this host's yet, or
//!   not at all;
//! * tentative addresses and those whose duplicate address detection failed: not this host's yet, or
//!   not at all.
//!
//! Deprecated addresses (preferred lifetime over, e.g. a privacy address after a day) are left alone:
//! RFC 4862 keeps them for what already uses them, and peers that learned one (a tracker, a friend)
//! may still connect to it, so the pinholes already opened for one stay; no new ones are opened for
//! it. They are closed [`CLOSE_BEFORE_EXPIRY`] before the address's valid lifetime ends, while this
//! host still holds it: the gateway takes a close only from the address the pinhole opens, and once
//! the address is gone only the pinhole's lease can end it.
//!
//! Temporary (privacy) addresses do get pinholes: a [::] listener answers on every address, and peers
//! learn of the listener through the address the program's own outgoing traffic used, which is the
//! temporary one by default.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope},
    route::RouteMessage,
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::protocols::NETLINK_ROUTE;
use tokio::sync::watch;

use super::netlink::{default_routes, dump};

/// The IPv6 router to send pinhole requests to: the next hop of the IPv6 default route, usually a
/// link-local address, which needs the interface (`scope_id`) to be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Router {
    pub address: Ipv6Addr,
    pub interface_index: u32,
}

impl Ipv6Router {
    /// The zone to connect with: link-local next hops need their interface.
    pub fn scope_id(&self) -> u32 {
        if is_link_local(self.address) {
            self.interface_index
        } else {
            0
        }
    }
}

/// How long before a deprecated address's valid lifetime ends its pinholes are closed.
pub const CLOSE_BEFORE_EXPIRY: Duration = Duration::from_secs(60);

/// What the IPv6 side of the LAN offers: what pinholes are opened for, and to whom they are asked of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lan6 {
    /// The LAN interface these were read from.
    pub interface_index: u32,
    pub router: Option<Ipv6Router>,
    /// The addresses pinholes are opened for (see the module's rules).
    pub addresses: BTreeSet<Ipv6Addr>,
    /// Deprecated addresses still valid for longer than [`CLOSE_BEFORE_EXPIRY`]: their pinholes stay,
    /// no new ones are opened.
    pub deprecated: BTreeSet<Ipv6Addr>,
    /// When the first of `deprecated` comes within [`CLOSE_BEFORE_EXPIRY`] of its end: the addresses
    /// are to be read again then (the kernel says nothing until the address is gone).
    pub read_again_at: Option<Instant>,
}

/// Where an address stands for pinholes (the module's rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Pinholes are opened for it.
    Preferred,
    /// Deprecated, valid for `valid_secs` more (u32::MAX: forever): its pinholes stay, for now.
    Deprecated { valid_secs: u32 },
    /// Never gets pinholes.
    Unusable,
}

/// One IPv6 address as the kernel lists it, with what decides whether it gets pinholes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostAddress6 {
    pub address: Ipv6Addr,
    pub interface_index: u32,
    pub scope: AddressScope,
    pub flags: AddressFlags,
    /// Seconds of preferred lifetime left (u32::MAX: forever); 0 means deprecated.
    pub preferred_secs: u32,
    /// Seconds of valid lifetime left (u32::MAX: forever); the kernel removes the address at 0.
    pub valid_secs: u32,
}

impl HostAddress6 {
    pub fn standing(&self) -> Standing {
        let not_ours = AddressFlags::Tentative | AddressFlags::Dadfailed;
        if self.scope != AddressScope::Universe
            || !is_global_unicast(self.address)
            || self.flags.intersects(not_ours)
            || self.valid_secs == 0
        {
            Standing::Unusable
        } else if self.flags.contains(AddressFlags::Deprecated) || self.preferred_secs == 0 {
            Standing::Deprecated { valid_secs: self.valid_secs }
        } else {
            Standing::Preferred
        }
    }

    /// Whether pinholes are opened for this address.
    pub fn gets_pinholes(&self) -> bool {
        self.standing() == Standing::Preferred
    }
}

fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// Global unicast as the internet can reach it: not unspecified, loopback, multicast, link-local,
/// unique local (fc00::/7), or IPv4-mapped.
fn is_global_unicast(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || is_link_local(ip)
        || first & 0xfe00 == 0xfc00
        || ip.to_ipv4_mapped().is_some())
}

/// Reads the IPv6 addresses on `interface_index` (the LAN interface) and the IPv6 default route.
pub fn lan6(interface_index: u32) -> Result<Lan6> {
    let mut request = AddressMessage::default();
    request.header.family = AddressFamily::Inet6;
    let messages = dump(NETLINK_ROUTE, RouteNetlinkMessage::GetAddress(request)).context("listing IPv6 addresses")?;
    let read_at = Instant::now();
    let host_addresses = messages.iter().filter_map(|m| match m {
        RouteNetlinkMessage::NewAddress(a) => host_address(a).filter(|a| a.interface_index == interface_index),
        _ => None,
    });
    let mut lan6 = Lan6 { interface_index, ..Lan6::default() };
    for address in host_addresses {
        match address.standing() {
            Standing::Preferred => {
                lan6.addresses.insert(address.address);
            }
            Standing::Deprecated { valid_secs: u32::MAX } => {
                lan6.deprecated.insert(address.address);
            }
            Standing::Deprecated { valid_secs } => {
                let Some(left) = Duration::from_secs(u64::from(valid_secs)).checked_sub(CLOSE_BEFORE_EXPIRY) else {
                    continue;
                };
                if left.is_zero() {
                    continue;
                }
                lan6.deprecated.insert(address.address);
                let at = read_at + left;
                lan6.read_again_at = Some(lan6.read_again_at.map_or(at, |earlier| earlier.min(at)));
            }
            Standing::Unusable => {}
        }
    }

    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet6;
    let routes = dump(NETLINK_ROUTE, RouteNetlinkMessage::GetRoute(request)).context("listing IPv6 routes")?;
    lan6.router = default_router(&routes, interface_index);
    Ok(lan6)
}

/// One address message, read; None for what is not an IPv6 address.
pub fn host_address(message: &AddressMessage) -> Option<HostAddress6> {
    let mut address = None;
    let mut flags = AddressFlags::from_bits_retain(u32::from(message.header.flags.bits()));
    let (mut preferred_secs, mut valid_secs) = (u32::MAX, u32::MAX);
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Address(IpAddr::V6(ip)) => address = Some(*ip),
            AddressAttribute::Local(IpAddr::V6(ip)) if address.is_none() => address = Some(*ip),
            // The 32-bit flags, where the kernel sends them, supersede the header's 8 bits.
            AddressAttribute::Flags(f) => flags = *f,
            AddressAttribute::CacheInfo(info) => (preferred_secs, valid_secs) = (info.ifa_preferred, info.ifa_valid),
            _ => {}
        }
    }
    Some(HostAddress6 {
        address: address?,
        interface_index: message.header.index,
        scope: message.header.scope,
        flags,
        preferred_secs,
        valid_secs,
    })
}

/// The next hop of the best IPv6 default route, preferring one that leaves by the LAN interface.
fn default_router(routes: &[RouteNetlinkMessage], interface_index: u32) -> Option<Ipv6Router> {
    default_routes(routes)
        .filter_map(|r| match r.gateway {
            IpAddr::V6(address) => {
                Some((r.oif != interface_index, r.priority, Ipv6Router { address, interface_index: r.oif }))
            }
            IpAddr::V4(_) => None,
        })
        .min_by_key(|(elsewhere, priority, _)| (*elsewhere, *priority))
        .map(|(_, _, router)| router)
}

/// The one record of [`Lan6`], shared: netwatch refreshes it, the daemon feeds its addresses to the
/// table, and the pinhole clients read the router. Cheap to clone.
#[derive(Clone, Default)]
pub struct Lan6Watch {
    sender: Arc<watch::Sender<Lan6>>,
}

impl Lan6Watch {
    pub fn new() -> Self {
        Self::default()
    }

    /// A watch that starts out knowing `lan6` (tests).
    pub fn fixed(lan6: Lan6) -> Self {
        let watch = Self::new();
        watch.sender.send_replace(lan6);
        watch
    }

    pub fn current(&self) -> Lan6 {
        self.sender.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Lan6> {
        self.sender.subscribe()
    }

    /// Reads the addresses and the router of `interface_index` again (off the event loop). Returns
    /// whether the router changed: pinholes must then be asked of the new one. A failed read keeps
    /// what was known and says why.
    pub async fn refresh(&self, interface_index: u32) -> Result<bool, String> {
        let read = tokio::task::spawn_blocking(move || lan6(interface_index))
            .await
            .map_err(|e| format!("reading IPv6 addresses failed: {e}"))?
            .map_err(|e| format!("{e:#}"))?;
        let mut router_changed = false;
        self.sender.send_if_modified(|known| {
            if *known == read {
                return false;
            }
            router_changed = known.router != read.router;
            *known = read;
            true
        });
        Ok(router_changed)
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::{
        address::{AddressHeaderFlags, CacheInfo},
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteType},
    };

    use super::*;

    fn address(ip: &str, scope: AddressScope, flags: AddressFlags, preferred: u32) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.index = 2;
        m.header.scope = scope;
        m.header.flags = AddressHeaderFlags::from_bits_retain(flags.bits() as u8);
        m.attributes.push(AddressAttribute::Address(ip.parse().unwrap()));
        m.attributes.push(AddressAttribute::Flags(flags));
        let mut info = CacheInfo::default();
        info.ifa_preferred = preferred;
        info.ifa_valid = preferred.saturating_add(3600);
        m.attributes.push(AddressAttribute::CacheInfo(info));
        m
    }

    fn gets(m: &AddressMessage) -> bool {
        host_address(m).unwrap().gets_pinholes()
    }

    #[test]
    fn global_usable_addresses_get_pinholes_and_the_rest_do_not() {
        let none = AddressFlags::empty();
        assert!(gets(&address("2001:db8:77::10", AddressScope::Universe, AddressFlags::Permanent, u32::MAX)));
        assert!(
            gets(&address("2001:db8:77::abcd", AddressScope::Universe, AddressFlags::Secondary, 3600)),
            "temporary"
        );
        assert!(!gets(&address("fe80::1", AddressScope::Link, AddressFlags::Permanent, u32::MAX)), "link-local");
        assert!(!gets(&address("fd00::10", AddressScope::Universe, none, u32::MAX)), "unique local");
        assert!(!gets(&address("2001:db8::1", AddressScope::Universe, AddressFlags::Tentative, 3600)), "tentative");
        assert!(!gets(&address("2001:db8::2", AddressScope::Universe, AddressFlags::Dadfailed, 3600)), "DAD failed");
        let standing = |m: &AddressMessage| host_address(m).unwrap().standing();
        assert_eq!(
            standing(&address("2001:db8::3", AddressScope::Universe, AddressFlags::Deprecated, 0)),
            Standing::Deprecated { valid_secs: 3600 },
            "deprecated: its pinholes stay until it nearly expires"
        );
        assert_eq!(
            standing(&address("2001:db8::4", AddressScope::Universe, none, 0)),
            Standing::Deprecated { valid_secs: 3600 },
            "preferred lifetime over"
        );
        let mut expired = address("2001:db8::5", AddressScope::Universe, AddressFlags::Deprecated, 0);
        for attribute in &mut expired.attributes {
            if let AddressAttribute::CacheInfo(info) = attribute {
                info.ifa_valid = 0;
            }
        }
        assert_eq!(standing(&expired), Standing::Unusable, "valid lifetime over");
        assert!(!gets(&address("::ffff:10.0.0.1", AddressScope::Universe, none, u32::MAX)), "IPv4-mapped");
        let mut v4 = AddressMessage::default();
        v4.attributes.push(AddressAttribute::Address("192.168.1.10".parse().unwrap()));
        assert!(host_address(&v4).is_none());
    }

    fn route(gateway: &str, oif: u32, priority: u32) -> RouteNetlinkMessage {
        let mut m = RouteMessage::default();
        m.header = RouteHeader { address_family: AddressFamily::Inet6, kind: RouteType::Unicast, ..m.header };
        m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet6(gateway.parse().unwrap())));
        m.attributes.push(RouteAttribute::Oif(oif));
        m.attributes.push(RouteAttribute::Priority(priority));
        RouteNetlinkMessage::NewRoute(m)
    }

    #[test]
    fn the_router_is_the_default_route_on_the_lan_interface_first() {
        let routes = [route("fe80::9", 7, 100), route("fe80::1", 2, 1024), route("fe80::2", 2, 600)];
        let router = default_router(&routes, 2).unwrap();
        assert_eq!(router, Ipv6Router { address: "fe80::2".parse().unwrap(), interface_index: 2 });
        assert_eq!(router.scope_id(), 2, "a link-local router needs its interface");
        let elsewhere = default_router(&routes[..1], 2).unwrap();
        assert_eq!(elsewhere.interface_index, 7, "another interface's route is better than none");
        let global = Ipv6Router { address: "2001:db8:77::1".parse().unwrap(), interface_index: 2 };
        assert_eq!(global.scope_id(), 0);
        assert!(default_router(&[], 2).is_none());
    }
}
