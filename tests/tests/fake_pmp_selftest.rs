//! The fake NAT-PMP/PCP server itself, checked with an independent client (libnatpmp's natpmpc) and raw
//! packets: what a client sees from each scripted fault. Then the lab's NAT-PMP side against the real
//! miniupnpd with UPnP off: readiness, gateway_mappings(), lan2_maps, restarts and announcements.
//! Daemon tests rely on these behaviours.
use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use natbinder_tests::{
    fake_pmp::{wire::*, *},
    *,
};

const WAIT: Duration = Duration::from_secs(1);
const NONCE: [u8; 12] = *b"natbinder-12";

fn lab_without_miniupnpd() -> Harness {
    Harness::lab_only(LabConfig { upnp: false, miniupnpd: false, ..Default::default() }).unwrap()
}

/// miniupnpd with NAT-PMP/PCP on and UPnP off.
fn natpmp_lab(config: LabConfig) -> Harness {
    Harness::lab_only(LabConfig { upnp: false, natpmp: true, ..config }).unwrap()
}

fn ask(h: &Harness, request: &[u8]) -> Reply {
    let bytes = exchange(&h.lab.lan1, request, WAIT).expect("an answer from the gateway");
    decode_reply(&bytes).unwrap_or_else(|| panic!("not a NAT-PMP/PCP reply: {bytes:02x?}"))
}

fn pcp_map(port: u16, suggested: u16, lifetime: u32, nonce: [u8; 12]) -> Vec<u8> {
    pcp_map_request(LAN1_IP, TCP, port, suggested, lifetime, nonce, false)
}

fn natpmpc_map(h: &Harness, from: &Netns, protocol: &str, port: u16, lifetime: u32) -> String {
    let (port, lifetime) = (port.to_string(), lifetime.to_string());
    run_natpmpc(from, &["-g", &GW_LAN_IP.to_string(), "-a", &port, &port, protocol, &lifetime])
        .unwrap_or_else(|e| panic!("natpmpc on {}: {e:#}", if from.name == h.lab.lan1.name { "lan1" } else { "lan2" }))
}

/// The external port natpmpc says it was given.
fn mapped_port(out: &str) -> Option<u16> {
    out.lines().find_map(|l| l.strip_prefix("Mapped public port ")?.split(' ').next()?.parse().ok())
}

fn outcomes(fake: &FakePmp) -> Vec<PmpOutcome> {
    fake.requests().iter().map(|r| r.outcome).collect()
}

/// Waits for one datagram on `socket`; None after `wait`.
fn receive(socket: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).ok()?;
    Some((buf[..n].to_vec(), from))
}

fn gateway_port() -> SocketAddr {
    SocketAddr::from((GW_LAN_IP, 5351))
}

#[test]
fn natpmpc_maps_and_deletes_through_the_fake_and_lan2_maps_with_upnp_off() {
    let h = lab_without_miniupnpd();
    let fake = FakePmp::start(&h.lab, PmpScript::new()).unwrap();

    let address = run_natpmpc(&h.lab.lan1, &["-g", &GW_LAN_IP.to_string()]).unwrap();
    assert!(address.contains(&format!("Public IP address : {EXTERNAL_IP_PLACEHOLDER}")), "{address}");
    let added = natpmpc_map(&h, &h.lab.lan1, "tcp", 8080, 3600);
    assert_eq!(mapped_port(&added), Some(8080), "{added}");
    let mappings = fake.mappings();
    assert_eq!(mappings.len(), 1);
    let m = &mappings[0];
    assert_eq!((m.protocol, m.internal_client, m.internal_port, m.external_port), (TCP, LAN1_IP, 8080, 8080));
    assert_eq!((m.lifetime, m.nonce), (3600, None));
    let add = fake.requests().into_iter().find(|r| r.opcode == 2).expect("a TCP mapping request was recorded");
    assert_eq!(
        (add.version, add.protocol, add.internal_port, add.suggested_port),
        (0, Some(TCP), Some(8080), Some(8080))
    );
    assert_eq!((add.lifetime, add.from.ip(), add.outcome), (Some(3600), &LAN1_IP, PmpOutcome::NatPmp(0)));

    // lan2_maps uses natpmpc when the lab has no UPnP; lan1 then gets the next port.
    h.lab.lan2_maps("UDP", 6881).unwrap();
    let moved = natpmpc_map(&h, &h.lab.lan1, "udp", 6881, 3600);
    assert_eq!(mapped_port(&moved), Some(6882), "{moved}");
    assert!(h.lab.lan2_maps("UDP", 6882).is_err(), "lan2_maps accepted another port than the one asked");

    let deleted = natpmpc_map(&h, &h.lab.lan1, "tcp", 8080, 0);
    assert!(!deleted.contains("FAILED"), "{deleted}");
    assert!(fake.mappings().iter().all(|m| m.external_port != 8080));
    assert_eq!(ask(&h, &natpmp_map_request(TCP, 8080, 0, 0)).result, 0, "deleting what is not there succeeds");
    assert!(h.lab.gateway_mappings().unwrap().is_empty(), "the fake forwards nothing: nftables holds no rule");
}

#[test]
fn pcp_maps_renews_refuses_another_nonce_and_deletes_over_raw_packets() {
    let h = lab_without_miniupnpd();
    let fake = FakePmp::start(&h.lab, PmpScript::new()).unwrap();
    let granted = ask(&h, &pcp_map(8443, 8443, 7200, NONCE));
    assert_eq!((granted.version, granted.opcode, granted.result, granted.lifetime), (2, 0x81, 0, Some(7200)));
    assert_eq!((granted.nonce, granted.protocol, granted.internal_port), (Some(NONCE), Some(TCP), Some(8443)));
    assert_eq!((granted.external_port, granted.external_ip), (Some(8443), Some(EXTERNAL_IP_PLACEHOLDER)));
    assert_eq!(fake.mappings()[0].nonce, Some(NONCE));

    let stranger = ask(&h, &pcp_map(8443, 8443, 7200, [7; 12]));
    assert_eq!(stranger.result, u16::from(pcp_result::NOT_AUTHORIZED));
    let mismatch = ask(&h, &pcp_map_request(LAN2_IP, TCP, 9000, 9000, 60, NONCE, false));
    assert_eq!(mismatch.result, u16::from(pcp_result::ADDRESS_MISMATCH));
    let request = fake.requests().pop().unwrap();
    assert_eq!((request.client_ip, request.nonce), (Some(LAN2_IP.into()), Some(NONCE)));

    assert_eq!(ask(&h, &pcp_map(8443, 8443, 0, NONCE)).result, 0);
    assert!(fake.mappings().is_empty());
    let announce = ask(&h, &pcp_announce_request(LAN1_IP));
    assert_eq!((announce.opcode, announce.result), (0x80, 0));
}

#[test]
fn a_nat_pmp_only_gateway_answers_pcp_in_nat_pmp_format_for_n_requests() {
    let h = lab_without_miniupnpd();
    let fake = FakePmp::start(&h.lab, PmpScript::new().pcp_unsupported_for(2)).unwrap();
    for _ in 0..2 {
        let bytes = exchange(&h.lab.lan1, &pcp_map(8080, 8080, 60, NONCE), WAIT).unwrap();
        assert_eq!(bytes.len(), 8, "{bytes:02x?}");
        let reply = decode_reply(&bytes).unwrap();
        assert_eq!((reply.version, reply.opcode, reply.result), (0, 0x81, natpmp_result::UNSUPPORTED_VERSION));
    }
    assert_eq!(ask(&h, &pcp_map(8080, 8080, 60, NONCE)).version, 2, "PCP is served after two refusals");

    fake.set_script(PmpScript::new().nat_pmp_only());
    for _ in 0..3 {
        assert_eq!(ask(&h, &pcp_announce_request(LAN1_IP)).result, natpmp_result::UNSUPPORTED_VERSION);
    }
    assert_eq!(ask(&h, &natpmp_map_request(UDP, 9000, 9000, 60)).result, 0, "NAT-PMP is still served");
    assert_eq!(outcomes(&fake).iter().filter(|o| **o == PmpOutcome::NatPmpUnsupportedVersion).count(), 5);
}

#[test]
fn scripted_result_codes_reach_the_client_for_the_next_n_requests() {
    let h = lab_without_miniupnpd();
    let fake = FakePmp::start(&h.lab, PmpScript::new().natpmp_result(natpmp_result::NOT_AUTHORIZED, 1)).unwrap();
    let refused = natpmpc_map(&h, &h.lab.lan1, "tcp", 8080, 3600);
    assert!(mapped_port(&refused).is_none(), "{refused}");
    assert!(refused.contains("NOT AUTHORIZED") || refused.contains("-51"), "{refused}");
    assert_eq!(mapped_port(&natpmpc_map(&h, &h.lab.lan1, "tcp", 8080, 3600)), Some(8080), "the second one succeeds");

    for (code, lifetime) in [
        (pcp_result::NOT_AUTHORIZED, 0),
        (pcp_result::NO_RESOURCES, 30),
        (pcp_result::USER_EX_QUOTA, 30),
        (pcp_result::CANNOT_PROVIDE_EXTERNAL, 0),
        (pcp_result::ADDRESS_MISMATCH, 0),
    ] {
        fake.set_script(PmpScript::new().pcp_result(code, 2));
        for _ in 0..2 {
            let reply = ask(&h, &pcp_map(9000, 9000, 60, NONCE));
            assert_eq!((reply.result, reply.lifetime), (u16::from(code), Some(lifetime)), "code {code}");
        }
        assert_eq!(ask(&h, &pcp_map(9000, 9000, 60, NONCE)).result, 0, "code {code}: the third one succeeds");
    }
    fake.set_script(PmpScript::new().natpmp_result(natpmp_result::OUT_OF_RESOURCES, ALWAYS));
    for _ in 0..3 {
        assert_eq!(ask(&h, &natpmp_map_request(UDP, 9001, 9001, 60)).result, natpmp_result::OUT_OF_RESOURCES);
    }
    assert_eq!(ask(&h, &natpmp_address_request()).result, 0, "address requests are not refused");
}

#[test]
fn short_lifetimes_and_other_external_ports_are_granted_and_expire() {
    let h = lab_without_miniupnpd();
    let fake = FakePmp::start(&h.lab, PmpScript::new().lifetime_cap(2).external_port_offset(100)).unwrap();
    let added = natpmpc_map(&h, &h.lab.lan1, "udp", 6881, 3600);
    assert_eq!(mapped_port(&added), Some(6981), "{added}");
    assert!(added.contains("liftime 2") || added.contains("lifetime 2"), "{added}");
    let pcp = ask(&h, &pcp_map(8080, 8080, 3600, NONCE));
    assert_eq!((pcp.lifetime, pcp.external_port), (Some(2), Some(8180)));
    // A renewal keeps its port, whatever it suggests.
    assert_eq!(ask(&h, &pcp_map(8080, 8080, 3600, NONCE)).external_port, Some(8180));
    assert_eq!(fake.mappings().len(), 2);
    assert!(wait_for(Duration::from_secs(5), || fake.mappings().is_empty().then_some(())).is_some(), "nothing expired");
}

#[test]
fn spoiled_replies_silence_garbage_truncation_wrong_opcode_and_wrong_nonce() {
    let h = lab_without_miniupnpd();
    let fake = FakePmp::start(&h.lab, PmpScript::new().reply_fault(ReplyFault::Silence, 2)).unwrap();
    // natpmpc retransmits (250 ms, then 500 ms) and gets through on the third try.
    let started = Instant::now();
    let out = natpmpc_map(&h, &h.lab.lan1, "tcp", 8080, 3600);
    assert_eq!(mapped_port(&out), Some(8080), "{out}");
    assert!(started.elapsed() >= Duration::from_millis(600), "natpmpc was answered at once");
    assert_eq!(outcomes(&fake).iter().filter(|o| **o == PmpOutcome::Fault(ReplyFault::Silence)).count(), 2);

    fake.set_script(PmpScript::new().reply_fault(ReplyFault::Silence, 1));
    let silent = exchange(&h.lab.lan1, &natpmp_address_request(), Duration::from_millis(300));
    assert!(matches!(silent.map_err(|e| e.kind()), Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)));

    fake.set_script(PmpScript::new().reply_fault(ReplyFault::Garbage, 1));
    let garbage = exchange(&h.lab.lan1, &natpmp_map_request(UDP, 9000, 9000, 60), WAIT).unwrap();
    assert!(decode_reply(&garbage).is_none(), "{garbage:02x?}");
    fake.set_script(PmpScript::new().reply_fault(ReplyFault::Truncated, 1));
    assert_eq!(exchange(&h.lab.lan1, &natpmp_map_request(UDP, 9000, 9000, 60), WAIT).unwrap().len(), 8);
    fake.set_script(PmpScript::new().reply_fault(ReplyFault::WrongOpcode, 1));
    assert_eq!(ask(&h, &natpmp_map_request(UDP, 9000, 9000, 60)).opcode, 130, "a TCP answer to a UDP request");
    assert!(fake.mappings().iter().all(|m| m.external_port != 9000), "spoiled replies made a mapping");

    fake.set_script(PmpScript::new().reply_fault(ReplyFault::WrongNonce, 1));
    let wrong = ask(&h, &pcp_map(8443, 8443, 60, NONCE));
    assert_eq!((wrong.result, wrong.nonce), (0, Some(NONCE.map(|b| !b))));
    assert_eq!(ask(&h, &pcp_map(8443, 8443, 60, NONCE)).nonce, Some(NONCE), "the next reply is right");
    assert_eq!(fake.mappings().len(), 2);
}

#[test]
fn reboots_epochs_and_announcements_from_the_fake() {
    let h = lab_without_miniupnpd();
    let fake = FakePmp::start(&h.lab, PmpScript::new()).unwrap();
    let listener = announcement_listener(&h.lab.lan1, LAN1_IP).unwrap();
    assert_eq!(ask(&h, &natpmp_map_request(TCP, 8080, 8080, 3600)).result, 0);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(fake.epoch() >= 1);

    fake.reset_epoch();
    assert_eq!(fake.epoch(), 0);
    assert_eq!(fake.mappings().len(), 1, "an epoch reset keeps the table");
    fake.reboot();
    assert!(fake.mappings().is_empty(), "a reboot loses the table");
    assert_eq!(ask(&h, &natpmp_address_request()).epoch, 0);

    fake.announce(Announcement::Both).unwrap();
    let (natpmp, from) = receive(&listener, WAIT).expect("a NAT-PMP announcement");
    assert_eq!(from, gateway_port());
    assert_eq!(natpmp, natpmp_announcement(0, EXTERNAL_IP_PLACEHOLDER));
    let (pcp, from) = receive(&listener, WAIT).expect("a PCP ANNOUNCE");
    assert_eq!((from, pcp), (gateway_port(), pcp_announcement(0)));

    fake.set_script(PmpScript::new().external_ip(Ipv4Addr::new(100, 64, 0, 1)));
    fake.announce(Announcement::NatPmp).unwrap();
    let (natpmp, _) = receive(&listener, WAIT).unwrap();
    assert_eq!(decode_reply(&natpmp).unwrap().external_ip, Some(Ipv4Addr::new(100, 64, 0, 1)));
    assert!(receive(&listener, Duration::from_millis(200)).is_none(), "one announcement per kind");
}

#[test]
fn a_fake_that_stops_listening_gets_port_unreachable_and_listens_again() {
    let h = lab_without_miniupnpd();
    let fake = FakePmp::start(&h.lab, PmpScript::new()).unwrap();
    let listener = announcement_listener(&h.lab.lan1, LAN1_IP).unwrap();
    fake.stop_listening().unwrap();
    let refused = exchange(&h.lab.lan1, &natpmp_address_request(), WAIT);
    assert_eq!(refused.map_err(|e| e.kind()), Err(ErrorKind::ConnectionRefused));
    let started = Instant::now();
    let out = run_natpmpc(&h.lab.lan1, &["-g", &GW_LAN_IP.to_string()]).unwrap();
    assert!(!out.contains("Public IP address"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(2), "natpmpc kept retrying a closed port: {out}");
    // Announcements still come from 192.168.77.1:5351.
    fake.announce(Announcement::Pcp).unwrap();
    assert_eq!(receive(&listener, WAIT).map(|(_, from)| from), Some(gateway_port()));

    fake.listen().unwrap();
    assert_eq!(ask(&h, &natpmp_address_request()).result, 0);
}

#[test]
fn a_hostile_lan_host_can_send_forged_announcements_and_unicast_replies() {
    let h = lab_without_miniupnpd();
    let listener = announcement_listener(&h.lab.lan1, LAN1_IP).unwrap();
    let forged = natpmp_announcement(0, Ipv4Addr::new(6, 6, 6, 6));
    let group = SocketAddrV4::new(Ipv4Addr::new(224, 0, 0, 1), 5350);
    h.lab.send_from(&h.lab.lan2, 5351, group, &forged).unwrap();
    let (bytes, from) = receive(&listener, WAIT).expect("the forged multicast announcement");
    assert_eq!((bytes, from), (forged, SocketAddr::from((LAN2_IP, 5351))));
    let reply = pcp_announcement(0);
    h.lab.send_from(&h.lab.lan2, 0, SocketAddrV4::new(LAN1_IP, 5350), &reply).unwrap();
    let (bytes, from) = receive(&listener, WAIT).expect("the forged unicast datagram");
    assert_eq!((bytes, from.ip()), (reply, LAN2_IP.into()));
}

#[test]
fn with_upnp_off_the_real_gateway_is_ready_lists_nat_pmp_and_pcp_mappings_and_lan2_maps() {
    let mut h = natpmp_lab(LabConfig::default());
    // Lab::start waited for a NAT-PMP answer: no sleep needed before the first request.
    assert_eq!(ask(&h, &natpmp_address_request()).external_ip, Some(EXTERNAL_IP_PLACEHOLDER));
    h.lab.lan2_maps("UDP", 6881).unwrap();
    h.lab.lan2_maps("UDP", 6881).unwrap(); // a renewal keeps the port
    assert_eq!(mapped_port(&natpmpc_map(&h, &h.lab.lan1, "tcp", 8080, 3600)), Some(8080));
    let pcp = ask(&h, &pcp_map(8443, 8443, 3600, NONCE));
    assert_eq!((pcp.result, pcp.external_port, pcp.nonce), (0, Some(8443), Some(NONCE)));
    // lan1 asking for lan2's port is given the next one.
    let moved = natpmpc_map(&h, &h.lab.lan1, "udp", 6881, 3600);
    assert_eq!(mapped_port(&moved), Some(6882), "{moved}");
    assert!(h.lab.lan2_maps("UDP", 6882).is_err(), "lan2_maps accepted another port than the one asked");

    let mut mappings = h.lab.gateway_mappings().unwrap();
    mappings.sort_by_key(|m| (m.protocol.clone(), m.external_port));
    let summary: Vec<(&str, u16, Ipv4Addr, u16)> =
        mappings.iter().map(|m| (m.protocol.as_str(), m.external_port, m.internal_client, m.internal_port)).collect();
    assert_eq!(
        summary,
        [
            ("TCP", 8080, LAN1_IP, 8080),
            ("TCP", 8443, LAN1_IP, 8443),
            ("UDP", 6881, LAN2_IP, 6881),
            ("UDP", 6882, LAN1_IP, 6881)
        ]
    );
    assert_eq!(mappings[0].description, "NAT-PMP 8080 tcp");
    assert!(mappings[1].description.starts_with("PCP MAP "), "{:?}", mappings[1]);
    assert_eq!(h.mapping("UDP", 6881).map(|m| m.description), Some("NAT-PMP 6881 udp".to_string()));

    // A restart keeps the rules (reloaded from the lease file) and starts a new epoch.
    std::thread::sleep(Duration::from_millis(2100));
    assert!(ask(&h, &natpmp_address_request()).epoch >= 2);
    let before = h.lab.gateway_mappings().unwrap();
    h.lab.restart_miniupnpd().unwrap();
    assert!(ask(&h, &natpmp_address_request()).epoch <= 1, "the epoch did not restart");
    assert_eq!(h.lab.gateway_mappings().unwrap(), before);
    // A reboot-like stop loses them.
    h.lab.stop_miniupnpd();
    assert!(h.lab.gateway_mappings().unwrap().is_empty());
    assert_eq!(
        exchange(&h.lab.lan1, &natpmp_address_request(), WAIT).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused)
    );
    h.lab.start_miniupnpd().unwrap();
    assert!(ask(&h, &natpmp_address_request()).epoch <= 1);
    assert!(h.lab.gateway_mappings().unwrap().is_empty());
    h.lab.lan2_maps("TCP", 10001).unwrap();
}

#[test]
fn the_real_gateway_caps_pcp_lifetimes_with_max_lifetime_but_not_nat_pmp() {
    let h = natpmp_lab(LabConfig { min_lifetime: Some(1), max_lifetime: Some(3), ..Default::default() });
    let pcp = ask(&h, &pcp_map(8443, 8443, 3600, NONCE));
    assert_eq!((pcp.result, pcp.lifetime), (0, Some(3)));
    let natpmp = ask(&h, &natpmp_map_request(TCP, 8080, 8080, 3600));
    assert_eq!((natpmp.result, natpmp.lifetime), (0, Some(3600)));
    let gone = wait_for(Duration::from_secs(8), || h.mapping("TCP", 8443).is_none().then_some(()));
    assert!(gone.is_some(), "the 3 s PCP mapping did not expire");
    assert!(h.mapping("TCP", 8080).is_some());
}

#[test]
fn the_real_gateway_announces_on_restart_and_on_sigusr1() {
    let mut h = natpmp_lab(LabConfig::default());
    let listener = announcement_listener(&h.lab.lan1, LAN1_IP).unwrap();
    h.lab.announce_address_change().unwrap();
    let (natpmp, from) = receive(&listener, WAIT).expect("a NAT-PMP announcement after SIGUSR1");
    assert_eq!((from, decode_reply(&natpmp).unwrap().external_ip), (gateway_port(), Some(EXTERNAL_IP_PLACEHOLDER)));
    let (pcp, from) = receive(&listener, WAIT).expect("a PCP ANNOUNCE after SIGUSR1");
    assert_eq!((from, pcp), (gateway_port(), pcp_announcement(0)));
    assert!(receive(&listener, Duration::from_millis(300)).is_none());

    h.lab.restart_miniupnpd().unwrap();
    let (pcp, from) = receive(&listener, WAIT).expect("a PCP ANNOUNCE after a restart");
    assert_eq!((from, decode_reply(&pcp).unwrap().opcode), (gateway_port(), 0x80));
    assert!(receive(&listener, Duration::from_millis(500)).is_none(), "miniupnpd 2.3.1 announces a start once");
}

#[test]
fn with_nat_pmp_off_the_real_gateway_answers_with_port_unreachable() {
    let h = Harness::lab_only(LabConfig::default()).unwrap();
    let refused = exchange(&h.lab.lan1, &natpmp_address_request(), WAIT);
    assert_eq!(refused.map_err(|e| e.kind()), Err(ErrorKind::ConnectionRefused));
    // UPnP mappings still list with their descriptions.
    h.lab.lan2_maps("TCP", 10001).unwrap();
    assert_eq!(h.mapping("TCP", 10001).map(|m| m.description), Some("other-host".to_string()));
}
