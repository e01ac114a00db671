//! natbinder: makes NAT transparent to programs that listen.
//!
//! Where each concern lives (ARCHITECTURE.md at the repository's root has the map and the path of a
//! bind event):
//! * [`kernel`]: the eBPF hooks as the daemon sees them (load, attach, events, the EADDRINUSE map);
//! * [`host`]: facts about this host (cgroups, sock_diag, resync, LAN, rtnetlink, kernel probes);
//! * [`table`]: the ideal-state table, the heart: it decides what the gateway should hold;
//! * [`outcome`]: what happened, published as a typed stream (the log is one subscriber);
//! * [`policy`]: which bound sockets are forwarded (rules, the deny list, the scope's default), and
//!   the same policy compiled for the kernel programs;
//! * [`gateway`]: wire protocols to the LAN gateway (UPnP IGD, PCP, NAT-PMP), which one serves, and
//!   one session per gateway found;
//! * [`reconcile`]: turns the table's decisions into gateway calls; [`journal`]: what it made;
//! * [`operator_state`]: static mappings and disabled ports, kept across restarts;
//! * [`control`]: the control socket (Varlink, io.natbinder), its service and the CLI's client;
//! * [`run`]: `natbinder run [--wait]`: its cgroups and its answers in the daemon, and in the CLI the
//!   command itself with its seccomp supervisor (the paper's blocking bind);
//! * [`doctor`]: `natbinder doctor`, what this machine offers natbinder and what to do about what it lacks;
//! * [`service_manager`]: the daemon as a systemd service (readiness, status, watchdog);
//! * [`daemon`]: wiring and lifecycle (`run(config, shutdown)`); [`cli`] and [`config`]: the command line.
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod doctor;
pub mod gateway;
pub mod host;
pub mod journal;
pub mod kernel;
pub mod operator_state;
pub mod outcome;
pub mod policy;
pub mod reconcile;
pub mod run;
pub mod service_manager;
pub mod table;

use std::fmt;

/// Transport protocol of a socket and of its mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// "tcp" or "udp", as everything natbinder prints says it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn ip_proto(self) -> u16 {
        match self {
            Protocol::Tcp => natbinder_common::IPPROTO_TCP,
            Protocol::Udp => natbinder_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
