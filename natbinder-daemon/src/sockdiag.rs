//! Socket facts the bind hooks cannot see, read over NETLINK_SOCK_DIAG.
//!
//! The hooks report an AF_INET6 wildcard bind, but whether that socket also takes IPv4 (IPV6_V6ONLY off,
//! the default) is not in `bpf_sock`. sock_diag reports it (INET_DIAG_SKV6ONLY), and the flag cannot
//! change once a socket is bound, so one query after the event is exact.
use anyhow::{Context, Result};
use netlink_packet_sock_diag::{
    constants::{AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::{netlink_dump::dump, Protocol};

/// TCP sockets that are bound but neither listening nor connected (Linux 6.7+ lists them).
const TCP_BOUND_INACTIVE: u32 = 13;

/// Whether the AF_INET6 socket with this cookie, bound to `port`, is IPv6-only. `None` when no such
/// socket exists any more (it was closed before the query).
pub fn ipv6_only(protocol: Protocol, port: u16, cookie: u64) -> Result<Option<bool>> {
    let states = StateFlags::all().bits() | (1 << TCP_BOUND_INACTIVE);
    let request = InetRequest {
        family: AF_INET6,
        protocol: match protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        },
        extensions: ExtensionFlags::empty(),
        states: StateFlags::from_bits_retain(states),
        socket_id: SocketId::new_v6(),
    };
    let replies = dump(NETLINK_SOCK_DIAG, SockDiagMessage::InetRequest(request))
        .context("listing IPv6 sockets over sock_diag")?;
    for reply in replies {
        let SockDiagMessage::InetResponse(response) = reply else { continue };
        let id = &response.header.socket_id;
        if id.source_port != port || u64::from_ne_bytes(id.cookie) != cookie {
            continue;
        }
        let v6only = response.nlas.iter().any(|nla| matches!(nla, Nla::SkV6Only(true)));
        return Ok(Some(v6only));
    }
    Ok(None)
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
    fn reports_listening_tcp_socket() {
        let listener = std::net::TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cookie = cookie_of(listener.as_raw_fd());
        assert!(ipv6_only(Protocol::Tcp, port, cookie).unwrap().is_some());
    }
}
