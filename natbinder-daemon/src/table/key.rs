//! What the table keys its desired state by. Each key says its address family, because the two
//! families need different things from the gateway:
//! * IPv4: a port mapping on the gateway's NAT, external port = internal port, to this host's LAN
//!   address. The gateway names it by protocol and external port, as natbinder does.
//! * IPv6: a firewall pinhole for one of this host's global addresses. natbinder names it by what it
//!   opens (protocol, port, address); the gateway names it by the id it returns when the pinhole is
//!   made, which the table keeps beside it (see [`super::GatewayHandle`]).
use std::{fmt, net::Ipv6Addr};

use crate::Protocol;

/// An IPv4 port mapping: external port = internal port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub protocol: Protocol,
    pub port: u16,
}

impl PortKey {
    pub const fn new(protocol: Protocol, port: u16) -> Self {
        Self { protocol, port }
    }
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)
    }
}

/// An IPv6 firewall pinhole: inbound `protocol` traffic to `address`:`port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinholeKey {
    pub protocol: Protocol,
    pub port: u16,
    pub address: Ipv6Addr,
}

/// One thing natbinder wants the gateway to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MappingKey {
    Ipv4(PortKey),
    Ipv6Pinhole(PinholeKey),
}

impl MappingKey {
    pub const fn ipv4(protocol: Protocol, port: u16) -> Self {
        MappingKey::Ipv4(PortKey::new(protocol, port))
    }

    pub fn protocol(&self) -> Protocol {
        match self {
            MappingKey::Ipv4(k) => k.protocol,
            MappingKey::Ipv6Pinhole(k) => k.protocol,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            MappingKey::Ipv4(k) => k.port,
            MappingKey::Ipv6Pinhole(k) => k.port,
        }
    }

    /// The IPv4 port mapping this key names, if it names one.
    pub fn as_ipv4(&self) -> Option<PortKey> {
        match self {
            MappingKey::Ipv4(k) => Some(*k),
            MappingKey::Ipv6Pinhole(_) => None,
        }
    }
}

impl From<PortKey> for MappingKey {
    fn from(key: PortKey) -> Self {
        MappingKey::Ipv4(key)
    }
}

impl fmt::Display for MappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // As every log line and test has read it since the first release: "tcp/8080".
            MappingKey::Ipv4(k) => k.fmt(f),
            MappingKey::Ipv6Pinhole(k) => write!(f, "{}/{} pinhole to [{}]", k.protocol, k.port, k.address),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_print_as_logs_always_printed_them_and_order_ipv4_first() {
        let v4 = MappingKey::ipv4(Protocol::Udp, 27015);
        assert_eq!(v4.to_string(), "udp/27015");
        let v6 = MappingKey::Ipv6Pinhole(PinholeKey {
            protocol: Protocol::Tcp,
            port: 8080,
            address: "2001:db8::10".parse().unwrap(),
        });
        assert_eq!(v6.to_string(), "tcp/8080 pinhole to [2001:db8::10]");
        assert!(v4 < v6);
        assert_eq!((v6.protocol(), v6.port(), v6.as_ipv4()), (Protocol::Tcp, 8080, None));
        assert_eq!(v4.as_ipv4(), Some(PortKey::new(Protocol::Udp, 27015)));
    }
}
