//! natbinder: makes NAT transparent to programs that listen.
//!
//! Where each concern lives:
//! * [`kernel`]: the eBPF hooks as the daemon sees them (load, attach, events, EADDRINUSE map);
//! * [`gateway`]: wire protocols to the LAN gateway (UPnP IGD, PCP, NAT-PMP) and which one serves;
//! * [`table`]: the ideal-state table, binding -> mapping, and [`reconcile`]: the one component that
//!   makes the gateway agree with it;
//! * [`daemon`]: wiring and lifecycle (`run(config, shutdown)`); [`cli`]: the command line.
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod gateway;
pub mod journal;
pub mod kernel;
pub mod netinfo;
mod netlink_dump;
pub mod netwatch;
pub mod reconcile;
pub mod resync;
pub mod sockdiag;
pub mod table;

use std::fmt;

/// Transport protocol of a socket and of its mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn ip_proto(self) -> u16 {
        match self {
            Protocol::Tcp => natbinder_common::IPPROTO_TCP,
            Protocol::Udp => natbinder_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Address family a socket was bound with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    /// AF_INET6 on [::]; dual-stack unless IPV6_V6ONLY is set.
    Ipv6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "0.0.0.0",
            Family::Ipv6 => "[::]",
        })
    }
}
