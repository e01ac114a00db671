//! Listening to a multicast group on the LAN, for the gateway's announcements: SSDP NOTIFY on
//! 239.255.255.250:1900 and NAT-PMP/PCP announcements on 224.0.0.1:5350.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

/// A socket that receives `group`:`port`, joined on the interface that holds `interface`.
///
/// * Bound to the group address itself, not to a wildcard address: it receives only that group's
///   datagrams, and natbinder's own bind hook has nothing to forward for it.
/// * SO_REUSEADDR and SO_REUSEPORT: other listeners on this host (miniupnpc, a browser, another
///   NAT-PMP client) keep receiving them too.
pub fn listen(group: Ipv4Addr, port: u16, interface: Ipv4Addr) -> io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let context = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} for {group}:{port}: {e}"));
    let socket =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| context("opening a socket", e))?;
    socket.set_reuse_address(true).map_err(|e| context("SO_REUSEADDR", e))?;
    socket.set_reuse_port(true).map_err(|e| context("SO_REUSEPORT", e))?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(group, port)).into()).map_err(|e| context("binding", e))?;
    socket.join_multicast_v4(&group, &interface).map_err(|e| context(&format!("joining on {interface}"), e))?;
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn receives_the_group_and_shares_the_port() {
        // Loopback carries multicast when the group is joined on 127.0.0.1.
        let group = Ipv4Addr::new(239, 255, 77, 77);
        let port = {
            let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let first = listen(group, port, Ipv4Addr::LOCALHOST).unwrap();
        let second = listen(group, port, Ipv4Addr::LOCALHOST).expect("a second listener shares the port");
        let sender = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        sender.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
        sender.set_multicast_loop_v4(true).unwrap();
        sender.send_to(b"hello", &SocketAddr::V4(SocketAddrV4::new(group, port)).into()).unwrap();
        let mut buf = [0u8; 16];
        for listener in [&first, &second] {
            let (n, _) = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv_from(&mut buf))
                .await
                .expect("the datagram arrives")
                .unwrap();
            assert_eq!(&buf[..n], b"hello");
        }
    }
}
