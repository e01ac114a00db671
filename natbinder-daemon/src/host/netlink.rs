//! One blocking request/dump exchange over a netlink socket, shared by the rtnetlink and sock_diag
//! queries. These are local kernel calls that answer in microseconds, so they run inline.
use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_sys::{Socket, SocketAddr};

/// Sends `request` as a dump request on a new socket of `protocol` and returns every reply message.
pub fn dump<T>(protocol: isize, request: T) -> Result<Vec<T>>
where
    T: NetlinkSerializable + NetlinkDeserializable + std::fmt::Debug,
{
    let mut socket = Socket::new(protocol).context("opening a netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket.connect(&SocketAddr::new(0, 0)).context("connecting a netlink socket")?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).context("sending a netlink request")?;

    let mut replies = Vec::new();
    let mut recv_buf = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut recv_buf[..], 0).context("receiving a netlink reply")?;
        let mut offset = 0;
        while offset < size {
            let message =
                NetlinkMessage::<T>::deserialize(&recv_buf[offset..size]).context("decoding a netlink reply")?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        bail!("netlink request failed: {}", std::io::Error::from_raw_os_error(-code.get()));
                    }
                }
                NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// A default route with a next hop, as a route dump lists it (either family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefaultRoute {
    pub gateway: std::net::IpAddr,
    /// The interface it leaves by.
    pub oif: u32,
    /// Lower is preferred.
    pub priority: u32,
}

/// The unicast default routes with a gateway among `routes` (a route dump's replies).
pub fn default_routes(routes: &[netlink_packet_route::RouteNetlinkMessage]) -> impl Iterator<Item = DefaultRoute> + '_ {
    use netlink_packet_route::{
        route::{RouteAddress, RouteAttribute, RouteType},
        RouteNetlinkMessage,
    };
    routes.iter().filter_map(|message| {
        let RouteNetlinkMessage::NewRoute(route) = message else { return None };
        if route.header.destination_prefix_length != 0 || route.header.kind != RouteType::Unicast {
            return None;
        }
        let (mut gateway, mut oif, mut priority) = (None, None, 0);
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some((*ip).into()),
                RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some((*ip).into()),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Priority(p) => priority = *p,
                _ => {}
            }
        }
        Some(DefaultRoute { gateway: gateway?, oif: oif?, priority })
    })
}
