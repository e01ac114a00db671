//! Socket facts the bind hooks cannot see, read over NETLINK_SOCK_DIAG (which answers for the caller's
//! network namespace only: the daemon's, exactly the one it forwards for).
//!
//! * The hooks report an AF_INET6 wildcard bind, but whether that socket also takes IPv4 (IPV6_V6ONLY
//!   off, the default) is not in `bpf_sock`. sock_diag reports it (INET_DIAG_SKV6ONLY), and the flag
//!   cannot change once a socket is bound, so one query after the event is exact.
//! * Sockets bound while no daemon ran (before it started, or while it was down after a crash), and
//!   releases lost to a full ring buffer, are found by listing the wildcard sockets that exist now.
use anyhow::{Context, Result};
use netlink_packet_core::Nla as _;
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use super::netlink::dump;
use crate::Protocol;

/// TCP sockets that are bound but neither listening nor connected (Linux 6.7+ lists them).
const TCP_BOUND_INACTIVE: u32 = 13;

/// Every socket of one family and protocol in this network namespace, in all states (TCP sockets bound
/// but not yet listening are listed since Linux 6.7).
fn dump_sockets(family: crate::Family, protocol: Protocol) -> Result<Vec<InetResponse>> {
    let request = InetRequest {
        family: match family {
            crate::Family::Ipv4 => AF_INET,
            crate::Family::Ipv6 => AF_INET6,
        },
        protocol: match protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        },
        extensions: ExtensionFlags::empty(),
        states: StateFlags::from_bits_retain(StateFlags::all().bits() | (1 << TCP_BOUND_INACTIVE)),
        socket_id: match family {
            crate::Family::Ipv4 => SocketId::new_v4(),
            crate::Family::Ipv6 => SocketId::new_v6(),
        },
    };
    let replies = dump(NETLINK_SOCK_DIAG, SockDiagMessage::InetRequest(request))
        .with_context(|| format!("listing {protocol} sockets over sock_diag"))?;
    Ok(replies
        .into_iter()
        .filter_map(|reply| match reply {
            SockDiagMessage::InetResponse(response) => Some(*response),
            _ => None,
        })
        .collect())
}

/// Whether the AF_INET6 socket with this cookie, bound to `port`, is IPv6-only. `None` when no such
/// socket exists any more (it was closed before the query).
pub fn ipv6_only(protocol: Protocol, port: u16, cookie: u64) -> Result<Option<bool>> {
    Ok(dump_sockets(crate::Family::Ipv6, protocol)?
        .iter()
        .find(|r| r.header.socket_id.source_port == port && u64::from_ne_bytes(r.header.socket_id.cookie) == cookie)
        .map(|r| r.nlas.iter().any(|nla| matches!(nla, Nla::SkV6Only(true)))))
}

/// For each of `sockets` (protocol, cookie), all AF_INET6: whether it is IPv6-only. One dump per
/// protocol answers a whole batch (a bind storm of [::] sockets would otherwise cost a dump each).
/// Sockets closed before the dump are missing from the answer.
pub fn ipv6_only_batch(sockets: &[(Protocol, u64)]) -> Result<std::collections::HashMap<u64, bool>> {
    let mut answers = std::collections::HashMap::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let wanted: std::collections::HashSet<u64> =
            sockets.iter().filter(|(p, _)| *p == protocol).map(|(_, c)| *c).collect();
        if wanted.is_empty() {
            continue;
        }
        for r in dump_sockets(crate::Family::Ipv6, protocol)? {
            let cookie = u64::from_ne_bytes(r.header.socket_id.cookie);
            if wanted.contains(&cookie) {
                answers.insert(cookie, r.nlas.iter().any(|nla| matches!(nla, Nla::SkV6Only(true))));
            }
        }
    }
    Ok(answers)
}

/// INET_DIAG_CGROUP_ID: the cgroup v2 id of the socket (Linux 5.7+), not decoded by the crate.
const INET_DIAG_CGROUP_ID: u16 = 21;
const TCP_LISTEN: u32 = 10;

/// A socket bound to a wildcard address, as sock_diag lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WildcardSocket {
    pub cookie: u64,
    pub protocol: Protocol,
    pub family: crate::Family,
    pub port: u16,
    pub uid: u32,
    /// Socket inode, to find the owning process in /proc.
    pub inode: u32,
    /// cgroup v2 id the socket was created in; None on kernels that do not report it.
    pub cgroup_id: Option<u64>,
    /// For AF_INET6: IPV6_V6ONLY.
    pub ipv6_only: bool,
    /// A server's socket: TCP listening (or bound, not yet listening), UDP not connected. Only these
    /// are adopted; the others still count as existing.
    pub serving: bool,
}

/// Every TCP and UDP socket bound to 0.0.0.0 or [::] on a port, in this network namespace; `serving`
/// tells the listening and unconnected ones.
pub fn wildcard_sockets() -> Result<Vec<WildcardSocket>> {
    let mut found = Vec::new();
    for family in [crate::Family::Ipv4, crate::Family::Ipv6] {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for response in dump_sockets(family, protocol)? {
                let id = &response.header.socket_id;
                if !id.source_address.is_unspecified() || id.source_port == 0 {
                    continue;
                }
                let state = u32::from(response.header.state);
                let serving = match protocol {
                    Protocol::Tcp => state == TCP_LISTEN || state == TCP_BOUND_INACTIVE,
                    // A connected UDP socket is a client's, even on a wildcard address.
                    Protocol::Udp => id.destination_port == 0,
                };
                let mut cgroup_id = None;
                let mut ipv6_only = false;
                for nla in response.nlas.iter() {
                    match nla {
                        Nla::SkV6Only(v) => ipv6_only = *v,
                        Nla::Other(attr) if attr.kind() == INET_DIAG_CGROUP_ID && attr.value_len() == 8 => {
                            let mut value = [0u8; 8];
                            attr.emit_value(&mut value);
                            cgroup_id = Some(u64::from_ne_bytes(value));
                        }
                        _ => {}
                    }
                }
                found.push(WildcardSocket {
                    cookie: u64::from_ne_bytes(id.cookie),
                    protocol,
                    family,
                    port: id.source_port,
                    uid: response.header.uid,
                    inode: response.header.inode,
                    cgroup_id,
                    ipv6_only,
                    serving,
                });
            }
        }
    }
    Ok(found)
}

/// The local port range (net.ipv4.ip_local_port_range): ports the kernel hands out to bind(port 0)
/// and to clients. A socket found on one of them was most likely not asked for explicitly.
pub fn ephemeral_port_range() -> std::ops::RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().filter_map(|w| w.parse::<u16>().ok());
            Some(it.next()?..=it.next()?)
        })
        .unwrap_or(32768..=60999)
}

/// net.ipv6.bindv6only: whether AF_INET6 sockets are IPv6-only unless they say otherwise (default no).
pub fn system_default_is_ipv6_only() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn cookie_of(fd: i32) -> u64 {
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes a u64 into the buffer we own.
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
        };
        assert_eq!(rc, 0);
        cookie
    }

    #[test]
    fn reports_dual_stack_udp_socket() {
        let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let cookie = cookie_of(socket.as_raw_fd());
        // Rust's std leaves IPV6_V6ONLY at the system default, which is off unless bindv6only is set.
        let expected = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap().trim() == "1";
        assert_eq!(ipv6_only(Protocol::Udp, port, cookie).unwrap(), Some(expected));
        assert_eq!(ipv6_only(Protocol::Udp, port, cookie.wrapping_add(1)).unwrap(), None);
    }

    #[test]
    fn lists_wildcard_listeners_with_their_cgroup() {
        let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cookie = cookie_of(listener.as_raw_fd());
        let udp = std::net::UdpSocket::bind("[::]:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        let loopback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let loopback_port = loopback.local_addr().unwrap().port();
        let all = wildcard_sockets().unwrap();
        let tcp = all.iter().find(|s| s.cookie == cookie).expect("the listener is listed");
        assert_eq!((tcp.protocol, tcp.family, tcp.port), (Protocol::Tcp, crate::Family::Ipv4, port));
        assert!(tcp.cgroup_id.is_some_and(|id| id != 0), "cgroup id reported: {tcp:?}");
        assert!(all
            .iter()
            .any(|s| s.protocol == Protocol::Udp && s.family == crate::Family::Ipv6 && s.port == udp_port));
        assert!(!all.iter().any(|s| s.port == loopback_port), "a loopback listener is not a wildcard one");
    }

    #[test]
    fn reports_listening_tcp_socket() {
        let listener = std::net::TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cookie = cookie_of(listener.as_raw_fd());
        assert!(ipv6_only(Protocol::Tcp, port, cookie).unwrap().is_some());
    }

    #[test]
    fn classifies_a_batch_in_one_dump_per_protocol() {
        use std::os::fd::AsRawFd;
        let dual = std::net::UdpSocket::bind("[::]:0").unwrap();
        let v6only = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        v6only.set_only_v6(true).unwrap();
        v6only.bind(&"[::]:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        v6only.listen(1).unwrap();
        let (dual_cookie, v6_cookie) = (cookie_of(dual.as_raw_fd()), cookie_of(v6only.as_raw_fd()));
        let answers =
            ipv6_only_batch(&[(Protocol::Udp, dual_cookie), (Protocol::Tcp, v6_cookie), (Protocol::Tcp, 1)]).unwrap();
        let default = system_default_is_ipv6_only();
        assert_eq!(answers.get(&dual_cookie), Some(&default));
        assert_eq!(answers.get(&v6_cookie), Some(&true));
        assert_eq!(answers.get(&1), None, "a socket that does not exist has no answer");
    }
}
