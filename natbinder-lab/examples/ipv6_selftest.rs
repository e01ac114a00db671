//! Checks the lab's IPv6 mode against the real miniupnpd (run as root):
//! `cargo run -p natbinder-lab --example ipv6_selftest`. Everything stays inside the lab's namespaces.
use std::{
    io::{Read, Write},
    net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use natbinder_lab::*;

/// Echo servers on [::]:port (TCP and UDP) in `ns`, served from threads of this process.
fn echo(ns: &Netns, port: u16) -> Result<()> {
    let (tcp, udp) = ns.run(move || -> Result<(TcpListener, UdpSocket)> {
        Ok((TcpListener::bind(("::", port))?, UdpSocket::bind(("::", port))?))
    })?;
    std::thread::spawn(move || {
        for mut c in tcp.incoming().flatten() {
            let mut buf = [0u8; 512];
            let n = c.read(&mut buf).unwrap_or(0);
            let peer = c.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let _ = c.write_all(format!("tcp{port}:{} from {peer}", String::from_utf8_lossy(&buf[..n])).as_bytes());
        }
    });
    std::thread::spawn(move || loop {
        let mut buf = [0u8; 512];
        if let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("udp{port}:{}", String::from_utf8_lossy(&buf[..n])).as_bytes(), from);
        }
    });
    Ok(())
}

fn add_pinhole(
    lab: &Lab,
    from: &Netns,
    source: Ipv6Addr,
    gateway: Ipv6Addr,
    client: &str,
    port: u16,
    protocol: &str,
) -> Result<PinholeSoapReply> {
    let port = port.to_string();
    lab.pinhole_soap(
        from,
        Some(source),
        gateway,
        "AddPinhole",
        &[
            ("RemoteHost", ""),
            ("RemotePort", "0"),
            ("InternalClient", client),
            ("InternalPort", &port),
            ("Protocol", protocol),
            ("LeaseTime", "3600"),
        ],
    )
}

/// The source address a WAN server sees for a TCP connection from `ns`.
fn seen_from_wan(lab: &Lab, ns: &Netns) -> Result<Ipv6Addr> {
    let listener = lab.wan.run(|| TcpListener::bind((WAN_PEER_IP6, 0)))?;
    let port = listener.local_addr()?.port();
    ns.run(move || {
        std::net::TcpStream::connect_timeout(&SocketAddr::from((WAN_PEER_IP6, port)), Duration::from_secs(2))
    })?;
    let (_, peer) = listener.accept()?;
    match peer.ip() {
        std::net::IpAddr::V6(a) => Ok(a),
        other => anyhow::bail!("IPv4 peer {other}"),
    }
}

fn main() -> Result<()> {
    let t = Instant::now();
    let mut lab = Lab::start(LabConfig { ipv6: true, natpmp: true, ..Default::default() })?;
    println!("ipv6 lab up in {:?}", t.elapsed());
    echo(&lab.lan1, 7001)?;
    echo(&lab.lan2, 7001)?;

    // IPv4 UPnP still works (a dual-stack HTTP socket, no ipv6_listening_ip).
    let listed = lab.upnpc(&lab.lan1, &["-l"])?;
    ensure!(listed.contains("ExternalIPAddress = 11.77.77.77"), "{listed}");

    // No pinhole: the gateway drops the WAN peer's packets.
    ensure!(tcp6_from_wan(&lab, LAN1_IP6, 7001, "x") == Reach::TimedOut);
    ensure!(udp6_from_wan(&lab, LAN1_IP6, 7001, "x") == Reach::TimedOut);

    // A UPnP pinhole, sent to the global address.
    let r = add_pinhole(&lab, &lab.lan1, LAN1_IP6, GW_LAN_IP6, "2001:db8:77::10", 7001, "6")?;
    let id: u16 = r.field("UniqueID").context(r.body.clone())?.parse()?;
    let holes = lab.gateway_pinholes()?;
    println!("after AddPinhole: {holes:?}");
    ensure!(holes.len() == 1 && holes[0].unique_id == Some(id) && holes[0].internal_client == LAN1_IP6);
    ensure!(holes[0].protocol == "TCP" && holes[0].internal_port == 7001 && holes[0].description == "IGD2 pinhole");
    let left = holes[0].remaining().unwrap();
    ensure!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600), "{left:?}");
    let reach = tcp6_from_wan(&lab, LAN1_IP6, 7001, "hi");
    ensure!(reach == Reach::Answered(format!("tcp7001:hi from {WAN_PEER_IP6}")), "{reach:?}");
    ensure!(udp6_from_wan(&lab, LAN1_IP6, 7001, "x") == Reach::TimedOut, "only TCP is open");
    ensure!(tcp6_from_wan(&lab, LAN2_IP6, 7001, "x") == Reach::TimedOut, "only lan1 is open");

    // UDP, sent to the gateway's link-local address (the LAN hosts' default router).
    let r = add_pinhole(&lab, &lab.lan1, LAN1_IP6, GW_LAN_LL6, "2001:db8:77::10", 7001, "17")?;
    ensure!(r.field("UniqueID").is_some(), "{}", r.body);
    ensure!(udp6_from_wan(&lab, LAN1_IP6, 7001, "u") == Reach::Answered("udp7001:u".into()));

    // Refusals: another host's address; an address written non-canonically.
    let r = add_pinhole(&lab, &lab.lan2, LAN2_IP6, GW_LAN_IP6, "2001:db8:77::10", 7002, "6")?;
    ensure!(r.error_code() == Some(606), "{}", r.body);
    let r = add_pinhole(&lab, &lab.lan1, LAN1_IP6, GW_LAN_IP6, "2001:0db8:77::10", 7002, "6")?;
    ensure!(r.error_code() == Some(606), "{}", r.body);

    // DeletePinhole.
    let id_text = id.to_string();
    let r = lab.pinhole_soap(&lab.lan1, Some(LAN1_IP6), GW_LAN_IP6, "DeletePinhole", &[("UniqueID", &id_text)])?;
    ensure!(r.status == 200, "{}", r.body);
    ensure!(tcp6_from_wan(&lab, LAN1_IP6, 7001, "x") == Reach::TimedOut);
    ensure!(lab.gateway_pinholes()?.len() == 1);

    // PCP MAP over IPv6, then delete with lifetime 0.
    let nonce = [7u8; 12];
    let reply = lab.pcp_map6(&lab.lan1, LAN1_IP6, nonce, 6, 7001, 3600)?;
    println!("PCP MAP: {reply:?}");
    ensure!(reply.result == 0 && reply.external_port == 7001 && reply.external_address == LAN1_IP6);
    ensure!(lab.gateway_pinholes()?.iter().any(|p| p.description == "PCP MAP 070707070707070707070707"));
    ensure!(tcp6_from_wan(&lab, LAN1_IP6, 7001, "p").answered().is_some());
    let reply = lab.pcp_map6(&lab.lan1, LAN1_IP6, nonce, 6, 7001, 0)?;
    ensure!(reply.result == 0 && reply.lifetime == 0, "{reply:?}");
    ensure!(tcp6_from_wan(&lab, LAN1_IP6, 7001, "x") == Reach::TimedOut);

    // Another host's pinhole.
    let lan2_id = lab.lan2_opens_pinhole("TCP", 7001, 600)?;
    ensure!(lab.gateway_pinholes()?.iter().any(|p| p.internal_client == LAN2_IP6 && p.unique_id == Some(lan2_id)));
    ensure!(tcp6_from_wan(&lab, LAN2_IP6, 7001, "y").answered().is_some());

    // Outbound IPv6 is not masqueraded.
    ensure!(seen_from_wan(&lab, &lab.lan1)? == LAN1_IP6);

    // Privacy addresses: the kernel's temporary address becomes the source; rotation deprecates it.
    let temp = lab.enable_temporary_addresses6(&lab.lan1, LAN1_IP6)?;
    ensure!(seen_from_wan(&lab, &lab.lan1)? == temp, "temporary {temp} is the source");
    let temp2 = lab.rotate_temporary_address6(&lab.lan1, 600)?;
    let addresses = lab.addresses6(&lab.lan1)?;
    println!("lan1 after rotation: {addresses:?}");
    ensure!(addresses.iter().any(|a| a.address == temp && a.temporary && a.deprecated));
    ensure!(addresses.iter().any(|a| a.address == temp2 && a.temporary && !a.deprecated && !a.tentative));
    ensure!(seen_from_wan(&lab, &lab.lan1)? == temp2);
    // A pinhole for the new address, asked from the kernel's default source (the new address).
    let r = lab.pinhole_soap(
        &lab.lan1,
        None,
        GW_LAN_IP6,
        "AddPinhole",
        &[
            ("RemoteHost", ""),
            ("RemotePort", "0"),
            ("InternalClient", &temp2.to_string()),
            ("InternalPort", "7001"),
            ("Protocol", "6"),
            ("LeaseTime", "60"),
        ],
    )?;
    ensure!(r.field("UniqueID").is_some(), "{}", r.body);
    ensure!(tcp6_from_wan(&lab, temp2, 7001, "t").answered().is_some());
    // An extra address, then removed.
    let extra: Ipv6Addr = "2001:db8:77::99".parse()?;
    lab.address6(&lab.lan1, AddressChange::Add, extra, &[])?;
    ensure!(lab.addresses6(&lab.lan1)?.iter().any(|a| a.address == extra && !a.tentative));
    lab.address6(&lab.lan1, AddressChange::Delete, extra, &[])?;
    ensure!(!lab.addresses6(&lab.lan1)?.iter().any(|a| a.address == extra));

    // A miniupnpd restart keeps pinholes; a stop (flushing its chains) loses them.
    let before = lab.gateway_pinholes()?.len();
    lab.restart_miniupnpd()?;
    ensure!(lab.gateway_pinholes()?.len() == before);
    ensure!(tcp6_from_wan(&lab, LAN2_IP6, 7001, "y").answered().is_some());
    lab.stop_miniupnpd();
    lab.start_miniupnpd()?;
    ensure!(lab.gateway_pinholes()?.is_empty());
    ensure!(tcp6_from_wan(&lab, LAN2_IP6, 7001, "y") == Reach::TimedOut);
    drop(lab);

    // ipv6_listening_ip: the lab still starts (its probe uses IPv6), IPv4 UPnP is gone.
    let lab = Lab::start(LabConfig { ipv6: true, ipv6_listening_ip: true, ..Default::default() })?;
    let listed = lab.upnpc(&lab.lan1, &["-l"]);
    ensure!(listed.is_err() || !listed.as_ref().unwrap().contains("ExternalIPAddress = 11"), "{listed:?}");
    let r = add_pinhole(&lab, &lab.lan1, LAN1_IP6, GW_LAN_IP6, "2001:db8:77::10", 7001, "6")?;
    ensure!(r.field("UniqueID").is_some(), "{}", r.body);
    ensure!(add_pinhole(&lab, &lab.lan1, LAN1_IP6, GW_LAN_LL6, "2001:db8:77::10", 7001, "6").is_err());
    drop(lab);

    // The default lab has no IPv6 beyond link-local.
    let t = Instant::now();
    let lab = Lab::start(LabConfig::default())?;
    println!("ipv4 lab up in {:?}", t.elapsed());
    ensure!(lab.addresses6(&lab.lan1)?.is_empty());
    ensure!(std::fs::read_to_string(lab.dir.join("miniupnpd.conf"))?.contains("ipv6_disable=yes"));
    // IPv4 as before: outbound masqueraded, a UPnP mapping reached through the gateway's WAN address.
    let listener = lab.wan.run(|| TcpListener::bind((WAN_PEER_IP, 0)))?;
    let port = listener.local_addr()?.port();
    lab.lan1.run(move || {
        std::net::TcpStream::connect_timeout(&SocketAddr::from((WAN_PEER_IP, port)), Duration::from_secs(2))
    })?;
    ensure!(listener.accept()?.1.ip() == std::net::IpAddr::V4(GW_WAN_IP));
    echo(&lab.lan1, 7001)?;
    ensure!(tcp_from_wan(&lab, 7001, "x") == Reach::Refused);
    let out = lab.upnpc(&lab.lan1, &["-a", &LAN1_IP.to_string(), "7001", "7001", "TCP", "0"])?;
    ensure!(out.contains("is redirected to internal"), "{out}");
    ensure!(tcp_from_wan(&lab, 7001, "v4").answered().is_some());
    println!("ipv6 lab self-test passed");
    Ok(())
}
