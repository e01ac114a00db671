//! The fake IGD itself, checked with an independent client (miniupnpc's upnpc on the LAN hosts): what a
//! client sees from each scripted fault. Daemon tests rely on these behaviours.
use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use natbinder_tests::{fake_igd::*, *};

fn lab_without_miniupnpd() -> Harness {
    Harness::lab_only(LabConfig { miniupnpd: false, ..Default::default() }).unwrap()
}

fn lan1_add(fake: &FakeIgd, h: &Harness, protocol: &str, port: u16, lease: u32) -> String {
    let (port, lease) = (port.to_string(), lease.to_string());
    fake.upnpc(&h.lab.lan1, &["-e", "selftest", "-a", &LAN1_IP.to_string(), &port, &port, protocol, &lease]).unwrap()
}

fn redirected(out: &str) -> bool {
    out.contains("is redirected to internal")
}

/// With -u, upnpc says "Found valid IGD" even for a description it could not parse; what shows that it
/// reached the gateway is an answer to GetExternalIPAddress.
fn reached_gateway(out: &str) -> bool {
    out.contains("ExternalIPAddress = ")
}

fn outcomes(fake: &FakeIgd, action: &str) -> Vec<FakeOutcome> {
    fake.requests().iter().filter(|r| r.action == action).map(|r| r.outcome).collect()
}

#[test]
fn ssdp_search_finds_the_fake_and_add_list_delete_round_trips() {
    let h = lab_without_miniupnpd();
    let fake = FakeIgd::start(&h.lab, FakeScript::new()).unwrap();

    // No -u: upnpc searches over SSDP, fetches the description and checks the IGD is connected.
    let status = run_upnpc(&h.lab.lan1, &["-s"]).unwrap();
    assert!(status.contains(&fake.rootdesc_url()), "SSDP did not lead to the fake:\n{status}");
    assert!(status.contains("Found valid IGD"), "{status}");
    assert!(status.contains(&format!("ExternalIPAddress = {EXTERNAL_IP_PLACEHOLDER}")), "{status}");
    let search = fake.requests().into_iter().find(|r| r.action == "M-SEARCH").expect("an M-SEARCH was recorded");
    assert_eq!(search.from.ip(), LAN1_IP);

    let added = lan1_add(&fake, &h, "TCP", 8080, 3600);
    assert!(redirected(&added), "{added}");
    let mappings = fake.mappings();
    assert_eq!(mappings.len(), 1);
    let m = &mappings[0];
    assert_eq!(
        (m.protocol.as_str(), m.external_port, m.internal_client, m.internal_port),
        ("TCP", 8080, LAN1_IP, 8080)
    );
    assert_eq!((m.lease, m.description.as_str()), (3600, "selftest"));
    let add = fake.requests().into_iter().find(|r| r.action == "AddPortMapping").unwrap();
    assert_eq!((add.lease, add.outcome), (Some(3600), FakeOutcome::Ok));

    // Another LAN host lists the table through GetGenericPortMappingEntry.
    let listed = parse_upnpc_list(&fake.upnpc(&h.lab.lan2, &["-l"]).unwrap());
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].external_port, listed[0].internal_client), (8080, LAN1_IP));
    assert_eq!(listed[0].description, "selftest");

    let deleted = fake.upnpc(&h.lab.lan1, &["-d", "8080", "TCP"]).unwrap();
    assert!(deleted.contains("returned : 0"), "{deleted}");
    assert!(fake.mappings().is_empty());
    assert!(parse_upnpc_list(&fake.upnpc(&h.lab.lan2, &["-l"]).unwrap()).is_empty());
    let deleted_again = fake.upnpc(&h.lab.lan1, &["-d", "8080", "TCP"]).unwrap();
    assert!(deleted_again.contains("714"), "deleting what is not there: {deleted_again}");
}

#[test]
fn a_leased_add_is_refused_with_725_or_402_while_lease_0_succeeds() {
    let h = lab_without_miniupnpd();
    let fake = FakeIgd::start(&h.lab, FakeScript::new().permanent_only_725()).unwrap();
    let leased = lan1_add(&fake, &h, "TCP", 8080, 3600);
    assert!(leased.contains("725") && leased.contains("OnlyPermanentLeasesSupported"), "{leased}");
    assert!(fake.mappings().is_empty());
    assert!(redirected(&lan1_add(&fake, &h, "TCP", 8080, 0)));
    assert_eq!(fake.mappings()[0].lease, 0);

    fake.set_script(FakeScript::new().invalid_args_402_on_lease());
    let leased = lan1_add(&fake, &h, "UDP", 9000, 60);
    assert!(leased.contains("402"), "{leased}");
    assert!(redirected(&lan1_add(&fake, &h, "UDP", 9000, 0)));
    let leases: Vec<Option<u32>> =
        fake.requests().iter().filter(|r| r.action == "AddPortMapping").map(|r| r.lease).collect();
    assert_eq!(leases, [Some(3600), Some(0), Some(60), Some(0)]);
    assert_eq!(
        outcomes(&fake, "AddPortMapping"),
        [FakeOutcome::UpnpError(725), FakeOutcome::Ok, FakeOutcome::UpnpError(402), FakeOutcome::Ok]
    );
}

#[test]
fn refusals_606_and_501_surface_to_the_client() {
    let h = lab_without_miniupnpd();
    let fake = FakeIgd::start(&h.lab, FakeScript::new()).unwrap();
    assert!(redirected(&lan1_add(&fake, &h, "TCP", 8080, 3600)));

    fake.set_script(FakeScript::new().not_authorized_606());
    let add = lan1_add(&fake, &h, "TCP", 8081, 3600);
    assert!(add.contains("606"), "{add}");
    let delete = fake.upnpc(&h.lab.lan1, &["-d", "8080", "TCP"]).unwrap();
    assert!(delete.contains("606"), "{delete}");
    assert_eq!(fake.mappings().len(), 1, "a refused delete removed the mapping");

    // Two failures, then the gateway recovers.
    fake.set_script(FakeScript::new().fail_adds_501(2));
    for _ in 0..2 {
        let add = lan1_add(&fake, &h, "TCP", 8081, 3600);
        assert!(add.contains("501"), "{add}");
    }
    assert!(redirected(&lan1_add(&fake, &h, "TCP", 8081, 3600)));
    assert_eq!(fake.mappings().len(), 2);
}

#[test]
fn a_full_table_answers_728_and_another_hosts_port_718() {
    let h = lab_without_miniupnpd();
    let fake = FakeIgd::start(&h.lab, FakeScript::new().table_full_728(2)).unwrap();
    assert!(redirected(&lan1_add(&fake, &h, "TCP", 8080, 3600)));
    assert!(redirected(&lan1_add(&fake, &h, "UDP", 8080, 3600)));
    let full = lan1_add(&fake, &h, "TCP", 8081, 3600);
    assert!(full.contains("728"), "{full}");
    // Renewing an entry the table already holds still works.
    assert!(redirected(&lan1_add(&fake, &h, "TCP", 8080, 7200)));

    let lan2 = LAN2_IP.to_string();
    let taken = fake.upnpc(&h.lab.lan2, &["-a", &lan2, "8080", "8080", "TCP", "3600"]).unwrap();
    assert!(taken.contains("718"), "{taken}");

    assert!(fake.upnpc(&h.lab.lan1, &["-d", "8080", "UDP"]).unwrap().contains("returned : 0"));
    assert!(redirected(&lan1_add(&fake, &h, "TCP", 8081, 3600)));
    let ports: Vec<(String, u16)> = fake.mappings().into_iter().map(|m| (m.protocol, m.external_port)).collect();
    assert_eq!(ports, [("TCP".to_string(), 8080), ("TCP".to_string(), 8081)]);
}

#[test]
fn an_igd_v2_lists_its_table_in_one_call_and_a_refusing_gateway_only_answers_entry_by_entry() {
    let h = lab_without_miniupnpd();
    let fake = FakeIgd::start(&h.lab, FakeScript::new().igd_v2_listing()).unwrap();
    for port in [8082, 8080, 8081] {
        assert!(redirected(&lan1_add(&fake, &h, "TCP", port, 3600)));
    }
    assert!(redirected(&lan1_add(&fake, &h, "UDP", 9000, 3600)));

    // upnpc -L asks for each protocol's listing in one GetListOfPortMappings call (IGD:2 only).
    let listing = fake.upnpc(&h.lab.lan2, &["-L"]).unwrap();
    let mut listed: Vec<(String, u16, Ipv4Addr)> =
        parse_upnpc_list(&listing).into_iter().map(|m| (m.protocol, m.external_port, m.internal_client)).collect();
    // miniupnpc prints each protocol's listing last entry first.
    listed.sort();
    assert_eq!(
        listed,
        [
            ("TCP".to_string(), 8080, LAN1_IP),
            ("TCP".to_string(), 8081, LAN1_IP),
            ("TCP".to_string(), 8082, LAN1_IP),
            ("UDP".to_string(), 9000, LAN1_IP)
        ],
        "{listing}"
    );
    assert_eq!(outcomes(&fake, "GetListOfPortMappings"), [FakeOutcome::Ok, FakeOutcome::Ok]);
    assert!(parse_upnpc_list(&listing).iter().all(|m| m.description == "selftest"), "{listing}");

    // Listing refused both ways; a mapping is still read by its key (upnpc -a reads it back with
    // GetSpecificPortMappingEntry to print where it is redirected).
    fake.set_script(FakeScript::new().igd_v2_listing().listing_refused_401());
    fake.take_requests();
    let refused = fake.upnpc(&h.lab.lan2, &["-L"]).unwrap();
    assert!(parse_upnpc_list(&refused).is_empty() && refused.contains("401"), "{refused}");
    let refused = fake.upnpc(&h.lab.lan2, &["-l"]).unwrap();
    assert!(parse_upnpc_list(&refused).is_empty() && refused.contains("401"), "{refused}");
    assert!(redirected(&lan1_add(&fake, &h, "TCP", 8083, 3600)));
    assert!(outcomes(&fake, "GetListOfPortMappings").iter().all(|o| *o == FakeOutcome::UpnpError(401)));
    assert_eq!(outcomes(&fake, "GetGenericPortMappingEntry"), [FakeOutcome::UpnpError(401)]);
    assert_eq!(outcomes(&fake, "GetSpecificPortMappingEntry"), [FakeOutcome::Ok]);

    // An IGDv1 gateway has no such call.
    drop(fake);
    let fake = FakeIgd::start(&h.lab, FakeScript::new()).unwrap();
    assert!(redirected(&lan1_add(&fake, &h, "TCP", 8080, 3600)));
    let listing = fake.upnpc(&h.lab.lan2, &["-L"]).unwrap();
    assert!(parse_upnpc_list(&listing).is_empty(), "{listing}");
    assert!(outcomes(&fake, "GetListOfPortMappings").iter().all(|o| *o == FakeOutcome::UpnpError(401)));
    assert_eq!(parse_upnpc_list(&fake.upnpc(&h.lab.lan2, &["-l"]).unwrap()).len(), 1);
}

#[test]
fn silence_makes_the_client_time_out() {
    let h = lab_without_miniupnpd();
    let fake = FakeIgd::start(&h.lab, FakeScript::new().silent_ssdp()).unwrap();
    let search = run_upnpc(&h.lab.lan1, &["-s"]).unwrap();
    assert!(!search.contains("Found valid IGD"), "{search}");
    assert!(outcomes(&fake, "M-SEARCH").contains(&FakeOutcome::Silence));

    // The description fetch is accepted and never answered.
    fake.set_script(FakeScript::new().silent_http());
    let started = Instant::now();
    let status = fake.upnpc(&h.lab.lan1, &["-s"]).unwrap();
    assert!(!reached_gateway(&status), "{status}");
    assert!(started.elapsed() >= Duration::from_secs(1), "upnpc gave up at once: {status}");
    assert_eq!(outcomes(&fake, "GET /rootDesc.xml"), [FakeOutcome::Silence]);

    // Found, then hanging: every SOAP call times out.
    fake.set_script(FakeScript::new().silent_control());
    let add = lan1_add(&fake, &h, "TCP", 8080, 3600);
    assert!(!redirected(&add), "{add}");
    assert!(fake.mappings().is_empty());
    assert!(outcomes(&fake, "AddPortMapping").iter().all(|o| *o == FakeOutcome::Silence));
}

#[test]
fn garbage_makes_the_client_fail() {
    let h = lab_without_miniupnpd();
    let fake = FakeIgd::start(&h.lab, FakeScript::new()).unwrap();
    for kind in [GarbageKind::NotHttp, GarbageKind::TruncatedHttp, GarbageKind::MalformedXml, GarbageKind::HugeBody] {
        fake.set_script(FakeScript::new().garbage_http(kind));
        let status = fake.upnpc(&h.lab.lan1, &["-s"]).unwrap();
        assert!(!reached_gateway(&status), "{kind:?}: {status}");
        assert_eq!(outcomes(&fake, "GET /rootDesc.xml").last(), Some(&FakeOutcome::Garbage(kind)));

        fake.set_script(FakeScript::new().garbage_control(kind));
        let add = lan1_add(&fake, &h, "TCP", 8080, 3600);
        assert!(!redirected(&add), "{kind:?}: {add}");
        assert_eq!(outcomes(&fake, "AddPortMapping").last(), Some(&FakeOutcome::Garbage(kind)));
    }
    assert!(fake.mappings().is_empty());
}

#[test]
fn external_address_is_scripted_for_double_nat() {
    let h = lab_without_miniupnpd();
    let fake = FakeIgd::start(&h.lab, FakeScript::new().external_ip(Ipv4Addr::new(100, 64, 0, 1))).unwrap();
    let status = fake.upnpc(&h.lab.lan1, &["-s"]).unwrap();
    assert!(status.contains("ExternalIPAddress = 100.64.0.1"), "{status}");
}

#[test]
fn a_reboot_empties_the_table_moves_the_http_port_and_announces_a_new_bootid() {
    let h = lab_without_miniupnpd();
    let fake = FakeIgd::start(&h.lab, FakeScript::new()).unwrap();
    assert!(redirected(&lan1_add(&fake, &h, "TCP", 8080, 3600)));
    let (old_port, old_url) = (fake.http_port(), fake.rootdesc_url());

    // A LAN host listening for SSDP announcements, as a client watching for reboots would.
    let listener = h.lab.lan1.run(|| {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 1900)).unwrap();
        socket.join_multicast_v4(&Ipv4Addr::new(239, 255, 255, 250), &LAN1_IP).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        socket
    });
    let new_port = fake.reboot().unwrap();
    assert_ne!(new_port, old_port);
    assert_eq!((fake.http_port(), fake.boot_id()), (new_port, 2));
    assert!(fake.mappings().is_empty());

    let mut buf = [0u8; 2048];
    let (n, from) = listener.recv_from(&mut buf).expect("an ssdp:alive NOTIFY after the reboot");
    let notify = String::from_utf8_lossy(&buf[..n]);
    assert_eq!(from.ip(), GW_LAN_IP);
    assert!(notify.starts_with("NOTIFY * HTTP/1.1\r\n") && notify.contains("NTS: ssdp:alive"), "{notify}");
    assert!(notify.contains("BOOTID.UPNP.ORG: 2\r\n"), "{notify}");
    assert!(notify.contains(&format!("LOCATION: {}\r\n", fake.rootdesc_url())), "{notify}");

    // The old port refuses; a new search finds the new one, with an empty table.
    let stale = run_upnpc(&h.lab.lan1, &["-u", &old_url, "-l"]).unwrap();
    assert!(!reached_gateway(&stale) && parse_upnpc_list(&stale).is_empty(), "{stale}");
    let found = run_upnpc(&h.lab.lan1, &["-l"]).unwrap();
    assert!(found.contains(&fake.rootdesc_url()), "{found}");
    assert!(parse_upnpc_list(&found).is_empty(), "{found}");
}
