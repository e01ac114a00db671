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
