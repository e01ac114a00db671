//! IPv6: [::] listeners on lan1 get firewall pinholes on the lab's real miniupnpd (UPnP IGDv2
//! WANIPv6FirewallControl), for each of lan1's global addresses, and the WAN peer checks what it can
//! reach at lan1's own addresses (IPv6 has no NAT). Each test says what a user would see; the
//! `recovery:` lines give the times the closing notes quote.
use std::{
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use natbinder_tests::*;

/// A generous safety net for "eventually"; real latencies are a few milliseconds.
const LIMIT: Duration = Duration::from_secs(15);

fn ipv6_lab() -> LabConfig {
    LabConfig { ipv6: true, ..LabConfig::default() }
}

fn harness() -> Harness {
    Harness::start_with(ipv6_lab(), &[]).unwrap()
}

/// The pinholes the gateway holds for lan1's `address`, as (protocol, port), sorted.
fn pinholes_to(h: &Harness, address: Ipv6Addr) -> Vec<(String, u16)> {
    let mut found: Vec<(String, u16)> = h
        .lab
        .gateway_pinholes()
        .expect("listing the gateway's pinholes")
        .into_iter()
        .filter(|p| p.internal_client == address)
        .map(|p| (p.protocol, p.internal_port))
        .collect();
    found.sort();
    found
}

fn reachable6(h: &Harness, address: Ipv6Addr, port: u16) -> Option<String> {
    wait_for(LIMIT, || tcp6_from_wan(&h.lab, address, port, "ping").answered())
}

fn pinholed(h: &Harness, address: Ipv6Addr, port: u16) -> bool {
    pinholes_to(h, address).iter().any(|(_, p)| *p == port)
}

/// Waits until the gateway holds a pinhole to `address`:`port` (polled every 10 ms: the figure is
/// what the gateway's own table shows, not a WAN probe's timeout); how long that took from `since`.
fn opened6(h: &Harness, address: Ipv6Addr, port: u16, since: Instant) -> Option<Duration> {
    wait_for(LIMIT, || pinholed(h, address, port).then(|| since.elapsed()))
}

/// Waits until the gateway no longer holds the pinhole, and checks that the WAN peer no longer gets
/// through; how long the pinhole took to go from `since`.
fn closed6(h: &Harness, address: Ipv6Addr, port: u16, since: Instant) -> Option<Duration> {
    let took = wait_for(LIMIT, || (!pinholed(h, address, port)).then(|| since.elapsed()))?;
    tcp6_from_wan(&h.lab, address, port, "ping").answered().is_none().then_some(took)
}

#[test]
fn a_v6only_server_is_reachable_over_ipv6_only_while_it_listens() {
    let mut h = harness();
    let started = Instant::now();
    let (mut app, mut out) = h.app("v6", &["tcp-echo", "[::]:8443", "--v6only", "--close-on-stdin"]).unwrap();
    let took = opened6(&h, LAN1_IP6, 8443, started).expect("no pinhole for the listener");
    eprintln!("recovery: bind -> pinhole open in {took:?}");
    assert_eq!(reachable6(&h, LAN1_IP6, 8443).as_deref(), Some("v6:ping"));
    assert_eq!(pinholes_to(&h, LAN1_IP6), vec![("TCP".to_string(), 8443)]);
    assert!(h.mapping("TCP", 8443).is_none(), "an IPv6-only socket got an IPv4 mapping");
    assert_ne!(tcp_from_wan(&h.lab, 8443, "ping").answered().as_deref(), Some("v6:ping"));

    // A port nobody listens on stays closed: no pinhole, and the gateway's firewall drops it.
    assert!(!matches!(tcp6_from_wan(&h.lab, LAN1_IP6, 8999, "ping"), Reach::Answered(_)));
    assert!(!pinholes_to(&h, LAN1_IP6).iter().any(|(_, p)| *p == 8999));

    // close() only: the program keeps running, the pinhole goes.
    let closing = Instant::now();
    app.close_socket(&mut out).unwrap();
    let took = closed6(&h, LAN1_IP6, 8443, closing).expect("the pinhole outlived the socket");
    eprintln!("recovery: close() -> pinhole closed in {took:?}");
    // A listener on loopback alone proves the gateway no longer lets the port in.
    let (_after, _o) = h.app("after", &["tcp-echo", "[::1]:8443"]).unwrap();
    assert!(tcp6_from_wan(&h.lab, LAN1_IP6, 8443, "ping").answered().is_none());
}

#[test]
fn a_dual_stack_server_is_reachable_over_ipv4_and_ipv6_and_udp_too() {
    let mut h = harness();
    let (_tcp, _o) = h.app("dual", &["tcp-echo", "[::]:8444"]).unwrap();
    let (_udp, _o2) = h.app("game", &["udp-echo", "[::]:27015"]).unwrap();
    let (_v4, _o3) = h.app("v4", &["tcp-echo", "0.0.0.0:8445"]).unwrap();
    assert_eq!(h.reachable_tcp(8444, LIMIT).as_deref(), Some("dual:ping"), "over IPv4, through the NAT");
    assert_eq!(reachable6(&h, LAN1_IP6, 8444).as_deref(), Some("dual:ping"), "over IPv6, through the pinhole");
    let udp = wait_for(LIMIT, || udp6_from_wan(&h.lab, LAN1_IP6, 27015, "ping").answered());
    assert_eq!(udp.as_deref(), Some("game:ping"));
    assert_eq!(h.reachable_tcp(8445, LIMIT).as_deref(), Some("v4:ping"));
    assert_eq!(
        pinholes_to(&h, LAN1_IP6),
        vec![("TCP".to_string(), 8444), ("UDP".to_string(), 27015)],
        "a 0.0.0.0 socket gets no pinhole"
    );

    // What natbinder says of it.
    let (code, list, _) = h.cli(&["list"]).unwrap();
    assert_eq!(code, 0);
    assert!(list.contains(&format!("[{LAN1_IP6}]:8444")), "list shows the pinhole:\n{list}");
    let (_, status, _) = h.cli(&["status"]).unwrap();
    assert!(status.contains("pinhole per address"), "status says what IPv6 gets:\n{status}");
    let (code, get, _) = h.cli(&["get", "tcp", "8444", "--json"]).unwrap();
    assert_eq!(code, 0);
    let get: serde_json::Value = serde_json::from_str(&get).unwrap();
    assert_eq!(get["pinholes"][0]["pinhole_address"], LAN1_IP6.to_string(), "{get}");
}

#[test]
fn pinholes_go_when_the_program_is_killed_and_when_natbinder_stops() {
    let mut h = harness();
    let (victim, _o) = h.app("victim", &["tcp-echo", "[::]:8200", "--v6only"]).unwrap();
    assert!(reachable6(&h, LAN1_IP6, 8200).is_some());
    let killed = Instant::now();
    drop(victim); // SIGKILL: no close(), no exit handler
    let took = closed6(&h, LAN1_IP6, 8200, killed).expect("the killed program's pinhole is still open");
    eprintln!("recovery: SIGKILL of the program -> pinhole closed in {took:?}");

    let (_a, _o2) = h.app("a", &["tcp-echo", "[::]:8401"]).unwrap();
    let (_b, _o3) = h.app("b", &["udp-echo", "[::]:8402"]).unwrap();
    assert!(reachable6(&h, LAN1_IP6, 8401).is_some());
    assert!(wait_for(LIMIT, || (pinholes_to(&h, LAN1_IP6).len() == 2).then_some(())).is_some());
    let started = Instant::now();
    let status = h.daemon().stop(libc::SIGTERM, LIMIT).unwrap();
    assert!(status.success(), "natbinder exited with {status}:\n{}", h.daemon().log_text());
    eprintln!("recovery: SIGTERM of natbinder -> exited with every pinhole closed in {:?}", started.elapsed());
    assert_eq!(pinholes_to(&h, LAN1_IP6), vec![], "pinholes left after SIGTERM");
    assert!(tcp6_from_wan(&h.lab, LAN1_IP6, 8401, "ping").answered().is_none());
}

#[test]
fn a_restarted_daemon_closes_the_pinholes_a_crashed_run_left() {
    let mut h = harness();
    let (orphan, _o) = h.app("orphan", &["tcp-echo", "[::]:8500", "--v6only"]).unwrap();
    let (_kept, _o2) = h.app("kept", &["tcp-echo", "[::]:8501", "--v6only"]).unwrap();
    assert!(reachable6(&h, LAN1_IP6, 8500).is_some() && reachable6(&h, LAN1_IP6, 8501).is_some());
    h.daemon().stop(libc::SIGKILL, LIMIT).unwrap();
    drop(orphan);
    assert_eq!(pinholes_to(&h, LAN1_IP6).len(), 2, "precondition: a SIGKILLed daemon cannot clean up");
    h.start_daemon(&[]).unwrap();
    assert_eq!(
        pinholes_to(&h, LAN1_IP6),
        vec![("TCP".to_string(), 8501)],
        "the crashed run's pinhole without a program is closed, the one still listening stays"
    );
    assert_eq!(reachable6(&h, LAN1_IP6, 8501).as_deref(), Some("kept:ping"));
}

#[test]
fn an_address_change_moves_the_pinhole() {
    let mut h = harness();
    let (_app, _o) = h.app("server", &["tcp-echo", "[::]:8600"]).unwrap();
    assert!(reachable6(&h, LAN1_IP6, 8600).is_some());

    // A new address (a new privacy address, a new prefix): opened for it too.
    let new: Ipv6Addr = "2001:db8:77::6:1".parse().unwrap();
    let lan1 = Netns { name: h.lab.lan1.name.clone() };
    let started = Instant::now();
    h.lab.address6(&lan1, AddressChange::Add, new, &["nodad"]).unwrap();
    let took = opened6(&h, new, 8600, started).expect("no pinhole for the new address");
    eprintln!("recovery: new address -> pinhole open for it in {took:?}");
    assert_eq!(reachable6(&h, new, 8600).as_deref(), Some("server:ping"));

    // The old one is deprecated (as a privacy address is when its successor comes, valid for a day
    // more): left alone. Its pinhole stays, for peers that still know it; a listener bound now gets
    // none for it.
    h.lab.address6(&lan1, AddressChange::Change, LAN1_IP6, &["preferred_lft", "0", "valid_lft", "86400"]).unwrap();
    let heard = wait_for(LIMIT, || h.daemon().log_text().contains("deprecated (its pinholes stay").then_some(()));
    assert!(heard.is_some(), "natbinder did not notice the deprecation:\n{}", h.daemon().log_text());
    let (_later, _o2) = h.app("later", &["tcp-echo", "[::]:8601", "--v6only"]).unwrap();
    assert!(
        opened6(&h, new, 8601, Instant::now()).is_some(),
        "the listener bound later is reachable at the new address"
    );
    assert!(!pinholed(&h, LAN1_IP6, 8601), "a pinhole was opened for a deprecated address");
    assert_eq!(
        reachable6(&h, LAN1_IP6, 8600).as_deref(),
        Some("server:ping"),
        "the deprecated address lost its pinhole"
    );

    // Its valid lifetime nearly over (here 63 s, within natbinder's 60 s margin in 3 s): closed while
    // the address is still there to ask the gateway, which takes a close only from the address it opens.
    let started = Instant::now();
    h.lab.address6(&lan1, AddressChange::Change, LAN1_IP6, &["preferred_lft", "0", "valid_lft", "63"]).unwrap();
    let took = closed6(&h, LAN1_IP6, 8600, started).expect("the expiring address kept its pinhole");
    eprintln!("recovery: address 63 s from expiry -> its pinhole closed in {took:?} (due at 3 s)");
    assert!(took >= Duration::from_secs(2), "closed before its time: {took:?}");
    assert!(
        h.lab.addresses6(&lan1).unwrap().iter().any(|a| a.address == LAN1_IP6),
        "closed by natbinder, not by expiry"
    );
    assert_eq!(
        pinholes_to(&h, new),
        vec![("TCP".to_string(), 8600), ("TCP".to_string(), 8601)],
        "the new address keeps its own"
    );

    // An address removed outright can no longer ask: the gateway takes requests about a pinhole only
    // from the address it opens. natbinder says so, and the pinhole's lease ends it.
    h.lab.address6(&lan1, AddressChange::Delete, new, &[]).unwrap();
    let said = wait_for(LIMIT, || {
        let log = h.daemon().log_text();
        log.lines()
            .any(|l| {
                l.contains(&format!("could not close pinhole tcp/8600 to [{new}]")) && l.contains("lease will end it")
            })
            .then_some(())
    });
    assert!(said.is_some(), "natbinder did not say the pinhole outlives its address:\n{}", h.daemon().log_text());
    assert!(h.reachable_tcp(8600, LIMIT).is_some(), "IPv4 is untouched by IPv6 address changes");
}

#[test]
fn a_gateway_reboot_restores_the_pinholes() {
    let mut h = harness();
    let (_app, _o) = h.app("server", &["tcp-echo", "[::]:8700", "--v6only"]).unwrap();
    assert!(reachable6(&h, LAN1_IP6, 8700).is_some());
    // A reboot: miniupnpd stops, its rules are flushed, it starts again (new HTTP port, new boot id).
    h.lab.stop_miniupnpd();
    assert!(tcp6_from_wan(&h.lab, LAN1_IP6, 8700, "ping").answered().is_none(), "precondition: the reboot lost it");
    h.lab.start_miniupnpd().unwrap();
    let started = Instant::now();
    let took = opened6(&h, LAN1_IP6, 8700, started).expect("the pinhole was not restored");
    eprintln!("recovery: gateway reboot -> pinhole restored {took:?} after the gateway answered");
    assert_eq!(reachable6(&h, LAN1_IP6, 8700).as_deref(), Some("server:ping"));
    assert_eq!(pinholes_to(&h, LAN1_IP6), vec![("TCP".to_string(), 8700)]);
}

/// The same lab gateway with UPnP off: natbinder finds PCP and asks for pinholes with PCP MAP over
/// IPv6, from the address each opens, to the router's link-local address.
#[test]
fn a_pcp_gateway_opens_and_closes_pinholes_with_the_listener() {
    let mut h = Harness::start_with(LabConfig { upnp: false, natpmp: true, ..ipv6_lab() }, &[]).unwrap();
    let started = Instant::now();
    let (mut app, mut out) = h.app("pcp6", &["tcp-echo", "[::]:8800", "--close-on-stdin"]).unwrap();
    let took = opened6(&h, LAN1_IP6, 8800, started).expect("no PCP pinhole for the listener");
    eprintln!("recovery (PCP): bind -> pinhole open in {took:?}");
    assert_eq!(reachable6(&h, LAN1_IP6, 8800).as_deref(), Some("pcp6:ping"));
    assert_eq!(h.reachable_tcp(8800, LIMIT).as_deref(), Some("pcp6:ping"), "dual-stack: IPv4 through the NAT too");
    let described = h.lab.gateway_pinholes().unwrap();
    assert!(
        described.iter().any(|p| p.internal_port == 8800 && p.description.starts_with("PCP MAP")),
        "the pinhole is PCP's: {described:?}"
    );
    let (_, status, _) = h.cli(&["status"]).unwrap();
    assert!(status.contains("pinhole per address"), "status says what IPv6 gets:\n{status}");
    assert!(!pinholed(&h, LAN1_IP6, 8999), "a port nobody listens on stays closed");

    let closing = Instant::now();
    app.close_socket(&mut out).unwrap();
    let took = closed6(&h, LAN1_IP6, 8800, closing).expect("the PCP pinhole outlived the socket");
    eprintln!("recovery (PCP): close() -> pinhole closed in {took:?}");

    // Killed, and a daemon stopping: the same as over UPnP.
    let (victim, _o) = h.app("victim", &["udp-echo", "[::]:8801", "--v6only"]).unwrap();
    assert!(wait_for(LIMIT, || udp6_from_wan(&h.lab, LAN1_IP6, 8801, "ping").answered()).is_some());
    let killed = Instant::now();
    drop(victim);
    let took = wait_for(LIMIT, || (!pinholed(&h, LAN1_IP6, 8801)).then(|| killed.elapsed()));
    eprintln!("recovery (PCP): SIGKILL of the program -> pinhole closed in {took:?}");
    assert!(took.is_some(), "the killed program's PCP pinhole is still open");
    let (_kept, _o2) = h.app("kept", &["tcp-echo", "[::]:8802"]).unwrap();
    assert!(reachable6(&h, LAN1_IP6, 8802).is_some());
    let status = h.daemon().stop(libc::SIGTERM, LIMIT).unwrap();
    assert!(status.success(), "natbinder exited with {status}:\n{}", h.daemon().log_text());
    assert_eq!(pinholes_to(&h, LAN1_IP6), vec![], "PCP pinholes left after SIGTERM");
}

/// A gateway that grants 4 s at most: natbinder renews the PCP pinhole before it ends, and a renewed
/// pinhole still closes with its socket. miniupnpd refuses to delete a pinhole it renewed (it loses
/// the nonce): natbinder shortens it to the gateway's minimum lifetime instead, 1 s here.
#[test]
fn a_pcp_pinhole_lives_on_renewals_and_closes_after_them() {
    let config = LabConfig { upnp: false, natpmp: true, min_lifetime: Some(1), max_lifetime: Some(4), ..ipv6_lab() };
    let mut h = Harness::start_with(config, &[]).unwrap();
    let (mut app, mut out) = h.app("renewed", &["tcp-echo", "[::]:8810", "--v6only", "--close-on-stdin"]).unwrap();
    assert!(reachable6(&h, LAN1_IP6, 8810).is_some());
    // Three granted lifetimes later it still lets the WAN in.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(tcp6_from_wan(&h.lab, LAN1_IP6, 8810, "ping").answered().as_deref(), Some("renewed:ping"));
    let renewals = h.daemon().log_text().lines().filter(|l| l.contains("8810") && l.contains("a renewal")).count();
    assert!(renewals >= 2, "the pinhole was not renewed:\n{}", h.daemon().log_text());
    let closing = Instant::now();
    app.close_socket(&mut out).unwrap();
    let took = closed6(&h, LAN1_IP6, 8810, closing).expect("a renewed PCP pinhole outlived its socket");
    assert!(
        h.daemon().log_text().contains("shortened lifetime of 1 s"),
        "not closed by natbinder but by its lease:\n{}",
        h.daemon().log_text()
    );
    eprintln!("recovery (PCP): close() after renewals -> pinhole closed in {took:?}");
}
