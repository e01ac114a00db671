//! Facts about this host, each read in one place:
//! * [`cgroup`]: the cgroup2 mount and the watched cgroup;
//! * [`sockdiag`]: sockets as NETLINK_SOCK_DIAG lists them (IPV6_V6ONLY, wildcard listeners);
//! * [`resync`]: bringing the table's sockets in line with the sockets that exist;
//! * [`lan`]: where this host sits on its LAN (default route, local address), and [`netwatch`], which
//!   follows its changes over rtnetlink; [`lan6`]: the IPv6 addresses pinholes are opened for, and the
//!   IPv6 router;
//! * [`netlink`]: the one blocking netlink dump both of those use;
//! * [`probes`]: what this kernel supports, probed rather than read from a version string;
//! * [`process`]: what the exposure policy needs about a bind's program (cgroup path, exe, groups),
//!   and whether a thread still runs;
//! * [`memory`]: one malloc arena, and the freed heap given back at quiet moments.
//!
//! Everything here that blocks (socket dumps, the /proc walk, netlink dumps) is called from the async
//! side through `spawn_blocking`, never on the event loop itself.
pub mod cgroup;
pub mod firewall;
pub mod lan;
pub mod lan6;
pub mod memory;
pub mod netlink;
pub mod netwatch;
pub mod probes;
pub mod process;
pub mod resync;
pub mod sockdiag;

/// This host's name, as mappings' descriptions carry it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
