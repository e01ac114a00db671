//! End-to-end: unmodified programs on lan1, natbinder on lan1, miniupnpd on the gateway, and the WAN
//! peer checking what it can reach. Each test says what a user would see.
//!
//! Every scenario runs three times (modules `upnp`, `pcp`, `natpmp` below): against miniupnpd speaking
//! UPnP IGD, and against miniupnpd with UPnP turned off, natbinder using PCP and then NAT-PMP. What the
//! tests read of the gateway's table comes from its nftables rules, whatever protocol made them.
use std::time::{Duration, Instant};

use natbinder_tests::*;

/// Which protocol the gateway speaks to natbinder in a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gw {
    /// miniupnpd with UPnP IGD (and NAT-PMP/PCP off), natbinder choosing on its own.
    Upnp,
    /// miniupnpd with UPnP off; natbinder chooses on its own, and PCP is what answers first.
    Pcp,
    /// miniupnpd with UPnP off; natbinder told to use NAT-PMP.
    NatPmp,
}

impl Gw {
    fn lab(self) -> LabConfig {
        match self {
            Gw::Upnp => LabConfig::default(),
            Gw::Pcp | Gw::NatPmp => LabConfig { upnp: false, natpmp: true, ..LabConfig::default() },
        }
    }

    fn daemon_args(self) -> &'static [&'static str] {
        match self {
            Gw::Upnp | Gw::Pcp => &[],
            Gw::NatPmp => &["--backend", "natpmp"],
        }
    }

    /// What the daemon logs for each mapping it makes ("mapped tcp/8080 -> ... via PCP").
    fn via(self) -> &'static str {
        match self {
            Gw::Upnp => "via UPnP IGD",
            Gw::Pcp => "via PCP",
            Gw::NatPmp => "via NAT-PMP",
        }
    }

    fn harness(self) -> Harness {
        self.harness_with(&[])
    }

    fn harness_with(self, extra: &[&str]) -> Harness {
        let mut args = self.daemon_args().to_vec();
        args.extend_from_slice(extra);
        Harness::start_with(self.lab(), &args).unwrap()
    }
}

/// A generous safety net for "eventually"; real latencies are a few milliseconds.
const LIMIT: Duration = Duration::from_secs(10);

fn wait_unmapped(h: &Harness, protocol: &str, port: u16) -> bool {
    wait_for(LIMIT, || h.mapping(protocol, port).is_none().then_some(())).is_some()
}

fn tcp_and_udp_servers_on_wildcard_are_reachable_from_the_wan(gw: Gw) {
    let mut h = gw.harness();
    let (_tcp, _o1) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    let (_udp, _o2) = h.app("game", &["udp-echo", "0.0.0.0:27015"]).unwrap();
    // TCP and UDP on the same port are two mappings.
    let (_tcp2, _o3) = h.app("tcp9000", &["tcp-echo", "0.0.0.0:9000"]).unwrap();
    let (_udp2, _o4) = h.app("udp9000", &["udp-echo", "0.0.0.0:9000"]).unwrap();

    assert_eq!(h.reachable_tcp(8080, LIMIT).as_deref(), Some("web:ping"));
    assert_eq!(h.reachable_udp(27015, LIMIT).as_deref(), Some("game:ping"));
    assert_eq!(h.reachable_tcp(9000, LIMIT).as_deref(), Some("tcp9000:ping"));
    assert_eq!(h.reachable_udp(9000, LIMIT).as_deref(), Some("udp9000:ping"));

    let m = h.mapping("TCP", 8080).expect("TCP 8080 mapped");
    assert_eq!((m.internal_client, m.internal_port), (LAN1_IP, 8080));
    if gw == Gw::Upnp {
        // NAT-PMP and PCP carry no description.
        assert!(m.description.starts_with("natbinder@"), "description names natbinder: {:?}", m.description);
    }
    assert!(h.daemon().log_text().contains(gw.via()), "the log says which protocol serves:\n{}", h.daemon().log_text());
}

fn dual_stack_server_is_reachable_over_ipv4_and_ipv6_only_is_not_mapped(gw: Gw) {
    let mut h = gw.harness();
    let (_v6only, _o) = h.app("v6only", &["tcp-echo", "[::]:8443", "--v6only"]).unwrap();
    let (_dual, _o2) = h.app("dual", &["tcp-echo", "[::]:8444"]).unwrap();
    assert_eq!(h.reachable_tcp(8444, LIMIT).as_deref(), Some("dual:ping"));
    // The IPv6-only socket was reported before the dual-stack one, so its decision is already made.
    assert!(h.mapping("TCP", 8443).is_none(), "an IPv6-only socket got an IPv4 mapping");
    assert_eq!(tcp_from_wan(&h.lab, 8443, "ping"), Reach::Refused);
}

fn loopback_specific_address_privileged_ephemeral_and_foreign_namespace_binds_are_not_forwarded(gw: Gw) {
    let mut h = gw.harness();
    let lan1_specific = format!("{LAN1_IP}:8091");
    let (_lo, _a) = h.app("loopback", &["tcp-echo", "127.0.0.1:8090"]).unwrap();
    let (_sp, _b) = h.app("specific", &["tcp-echo", &lan1_specific]).unwrap();
    let (_pr, _c) = h.app("privileged", &["tcp-echo", "0.0.0.0:80"]).unwrap();
    let (eph, _d) = h.app("ephemeral", &["tcp-echo", "0.0.0.0:0"]).unwrap();
    let (eph_udp, _e) = h.app("ephemeral-udp", &["udp-echo", "0.0.0.0:0"]).unwrap();
    // Same cgroup, another network namespace (a container's): not this host's to forward.
    let lan2 = Netns { name: h.lab.lan2.name.clone() };
    let (_other, _f) = h.app_in(&lan2, "container", &["tcp-echo", "0.0.0.0:8092"]).unwrap();
    // A forwarded bind after all of them: once it is mapped, the others have been decided.
    let (_fence, _g) = h.app("fence", &["tcp-echo", "0.0.0.0:8093"]).unwrap();
    assert_eq!(h.reachable_tcp(8093, LIMIT).as_deref(), Some("fence:ping"));
    std::thread::sleep(Duration::from_millis(300));

    let mappings = h.lab.gateway_mappings().unwrap();
    let ours: Vec<_> = mappings.iter().filter(|m| m.internal_client == LAN1_IP).map(|m| m.external_port).collect();
    assert_eq!(ours, vec![8093], "only the wildcard bind on an explicit port >= 1024 is mapped");
    assert_eq!(tcp_from_wan(&h.lab, 8091, "ping"), Reach::Refused, "a specific-address listener leaked to the WAN");
    assert_eq!(tcp_from_wan(&h.lab, eph.port, "ping"), Reach::Refused, "an ephemeral port leaked to the WAN");
    assert!(!matches!(udp_from_wan(&h.lab, eph_udp.port, "ping"), Reach::Answered(_)));
}

fn forwarding_ends_when_the_socket_is_closed(gw: Gw) {
    let mut h = gw.harness();
    let (mut tcp, mut tcp_out) = h.app("tcp", &["tcp-echo", "0.0.0.0:8100", "--close-on-stdin"]).unwrap();
    let (mut udp, mut udp_out) = h.app("udp", &["udp-echo", "0.0.0.0:8101", "--close-on-stdin"]).unwrap();
    assert_eq!(h.reachable_tcp(8100, LIMIT).as_deref(), Some("tcp:ping"));
    assert_eq!(h.reachable_udp(8101, LIMIT).as_deref(), Some("udp:ping"));

    // close() only: the programs keep running.
    tcp.close_socket(&mut tcp_out).unwrap();
    udp.close_socket(&mut udp_out).unwrap();
    assert!(wait_unmapped(&h, "TCP", 8100), "TCP mapping still on the gateway after close()");
    assert!(wait_unmapped(&h, "UDP", 8101), "UDP mapping still on the gateway after close()");

    // A listener on the LAN address (never forwarded) proves the gateway no longer forwards the port.
    let specific_tcp = format!("{LAN1_IP}:8100");
    let specific_udp = format!("{LAN1_IP}:8101");
    let (_t, _o) = h.app("after", &["tcp-echo", &specific_tcp]).unwrap();
    let (_u, _o2) = h.app("after", &["udp-echo", &specific_udp]).unwrap();
    assert_eq!(tcp_from_wan(&h.lab, 8100, "ping"), Reach::Refused);
    assert!(!matches!(udp_from_wan(&h.lab, 8101, "ping"), Reach::Answered(_)));
}

fn forwarding_ends_when_the_program_is_killed(gw: Gw) {
    let mut h = gw.harness();
    let (tcp, _o) = h.app("victim", &["tcp-echo", "0.0.0.0:8200"]).unwrap();
    let (udp, _o2) = h.app("victim", &["udp-echo", "0.0.0.0:8201"]).unwrap();
    assert!(h.reachable_tcp(8200, LIMIT).is_some());
    assert!(h.reachable_udp(8201, LIMIT).is_some());
    drop(tcp); // SIGKILL: no close(), no exit handler
    drop(udp);
    assert!(wait_unmapped(&h, "TCP", 8200), "the killed program's TCP port is still mapped");
    assert!(wait_unmapped(&h, "UDP", 8201), "the killed program's UDP port is still mapped");
    assert_eq!(tcp_from_wan(&h.lab, 8200, "ping"), Reach::Refused);
}

fn sockets_sharing_a_port_keep_one_mapping_until_the_last_is_released(gw: Gw) {
    let mut h = gw.harness();
    let (first, _o1) = h.app("first", &["tcp-echo", "0.0.0.0:8700", "--reuseport"]).unwrap();
    let (second, _o2) = h.app("second", &["tcp-echo", "0.0.0.0:8700", "--reuseport"]).unwrap();
    assert!(h.reachable_tcp(8700, LIMIT).is_some());
    let ours = |h: &Harness| h.lab.gateway_mappings().unwrap().iter().filter(|m| m.external_port == 8700).count();
    assert_eq!(ours(&h), 1, "two sockets on one port share one mapping");

    drop(first);
    // The survivor keeps the port reachable: every new connection now lands on it.
    assert_eq!(
        wait_for(LIMIT, || tcp_from_wan(&h.lab, 8700, "ping").answered().filter(|a| a == "second:ping")).as_deref(),
        Some("second:ping")
    );
    assert!(h.mapping("TCP", 8700).is_some(), "the mapping went with the first of two sockets");

    drop(second);
    assert!(wait_unmapped(&h, "TCP", 8700), "the mapping outlived the last socket");
    assert_eq!(tcp_from_wan(&h.lab, 8700, "ping"), Reach::Refused);
}

fn rtorrent_experiment_ports_held_by_another_host_fail_with_eaddrinuse(gw: Gw) {
    let mut h = Harness::lab_only(gw.lab()).unwrap();
    // Another LAN host holds the odd ports of 10000-10009 on the gateway.
    for port in (10001..=10009).step_by(2) {
        h.lab.lan2_maps("TCP", port).unwrap();
    }
    h.start_daemon(gw.daemon_args()).unwrap();
    if gw != Gw::Upnp {
        // NAT-PMP and PCP cannot list the gateway's table: a port another host holds is learned when
        // mapping it is refused, so the first bind of each still succeeds (and is not reachable).
        // Scouts learn them here; every bind after that fails as with UPnP IGD, for ten minutes.
        for port in (10001..=10009).step_by(2) {
            let (_scout, _o) = h.app("scout", &["tcp-echo", &format!("0.0.0.0:{port}")]).unwrap();
            h.daemon().wait_log(&format!("tcp/{port} is held on the gateway"), LIMIT).unwrap();
        }
    }

    let mut apps = Vec::new();
    for i in 0..5 {
        let (app, out) = h.app(&format!("rtorrent{i}"), &["first-free", "10000", "10009"]).unwrap();
        apps.push((app, out));
    }
    let ports: Vec<u16> = apps.iter().map(|(a, _)| a.port).collect();
    assert_eq!(ports, vec![10000, 10002, 10004, 10006, 10008], "each instance got the next even port");
    for (i, port) in ports.iter().enumerate() {
        assert_eq!(
            h.reachable_tcp(*port, LIMIT),
            Some(format!("rtorrent{i}:ping")),
            "instance {i} unreachable on {port}"
        );
    }
    let sixth = h.app("rtorrent5", &["first-free", "10000", "10009"]);
    let err = sixth.err().expect("a sixth instance found a port").to_string();
    assert!(err.contains("Address already in use"), "sixth instance failed with: {err}");

    // The other host's mappings are untouched.
    let mut held: Vec<u16> = h
        .lab
        .gateway_mappings()
        .unwrap()
        .iter()
        .filter(|m| m.internal_client == LAN2_IP)
        .map(|m| m.external_port)
        .collect();
    held.sort();
    assert_eq!(held, vec![10001, 10003, 10005, 10007, 10009]);
    assert!(h.daemon().log_text().contains("EADDRINUSE"), "the daemon explains refused binds");
}

fn a_port_another_host_maps_later_is_refused_after_the_next_check(gw: Gw) {
    let mut h = gw.harness_with(&["--reconcile-interval", "1"]);
    h.lab.lan2_maps("UDP", 6881).unwrap();
    let refused = wait_for(LIMIT, || match h.app("late", &["udp-echo", "0.0.0.0:6881"]) {
        Err(e) if e.to_string().contains("Address already in use") => Some(()),
        _ => None,
    });
    assert!(refused.is_some(), "binding a port lan2 holds kept succeeding");
    // TCP on the same port is a different mapping and still works.
    let (_t, _o) = h.app("tcp", &["tcp-echo", "0.0.0.0:6881"]).unwrap();
    assert!(h.reachable_tcp(6881, LIMIT).is_some());
}

fn sigterm_removes_every_mapping_and_later_binds_are_untouched(gw: Gw) {
    let mut h = gw.harness();
    h.lab.lan2_maps("TCP", 8400).unwrap();
    let (_a, _o) = h.app("a", &["tcp-echo", "0.0.0.0:8401"]).unwrap();
    let (_b, _o2) = h.app("b", &["udp-echo", "0.0.0.0:8402"]).unwrap();
    assert!(h.reachable_tcp(8401, LIMIT).is_some());
    assert!(h.reachable_udp(8402, LIMIT).is_some());

    let started = Instant::now();
    let status = h.daemon().stop(libc::SIGTERM, LIMIT).unwrap();
    assert!(status.success(), "natbinder exited with {status}:\n{}", h.daemon().log_text());
    eprintln!("SIGTERM to exit: {:?}", started.elapsed());

    let left: Vec<_> = h.lab.gateway_mappings().unwrap().into_iter().filter(|m| m.internal_client == LAN1_IP).collect();
    assert!(left.is_empty(), "mappings left after SIGTERM: {left:?}");
    assert_eq!(tcp_from_wan(&h.lab, 8401, "ping"), Reach::Refused);
    assert!(h.mapping("TCP", 8400).is_some(), "the other host's mapping was removed");

    // With no daemon, binds behave as without natbinder: nothing is mapped, and a port another host
    // holds binds fine.
    let (_c, _o3) = h.app("c", &["tcp-echo", "0.0.0.0:8403"]).unwrap();
    let (_d, _o4) = h.app("d", &["tcp-echo", "0.0.0.0:8400"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(h.mapping("TCP", 8403).is_none(), "a bind after shutdown was forwarded");
}

fn a_restarted_daemon_removes_what_an_earlier_run_left_behind(gw: Gw) {
    let mut h = gw.harness();
    let (app, _o) = h.app("orphan", &["tcp-echo", "0.0.0.0:8500"]).unwrap();
    assert!(h.reachable_tcp(8500, LIMIT).is_some());
    h.daemon().stop(libc::SIGKILL, LIMIT).unwrap();
    drop(app);
    assert!(h.mapping("TCP", 8500).is_some(), "precondition: a SIGKILLed daemon cannot clean up");
    h.start_daemon(gw.daemon_args()).unwrap();
    assert!(h.mapping("TCP", 8500).is_none(), "the stale mapping survived the restart");
    assert!(h.daemon().log_text().contains("earlier natbinder run"));
}

fn bind_never_waits_for_a_silent_gateway(gw: Gw) {
    let mut h = gw.harness();
    let (_warm, _o) = h.app("warm", &["tcp-echo", "0.0.0.0:8600"]).unwrap();
    assert!(h.reachable_tcp(8600, LIMIT).is_some());
    // Freeze the real gateway: its HTTP server accepts nothing while stopped.
    let pid: i32 = std::fs::read_to_string(h.lab.dir.join("miniupnpd.pid")).unwrap().trim().parse().unwrap();
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut slowest = Duration::ZERO;
    let mut apps = Vec::new();
    for port in 8601..8611 {
        let started = Instant::now();
        let app = h.app("busy", &["tcp-echo", &format!("0.0.0.0:{port}")]).unwrap();
        slowest = slowest.max(started.elapsed());
        apps.push(app);
    }
    unsafe { libc::kill(pid, libc::SIGCONT) };
    eprintln!("slowest program start + bind with the gateway frozen: {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "a bind waited for the gateway: {slowest:?}");
    for port in 8601..8611 {
        assert!(h.reachable_tcp(port, LIMIT).is_some(), "{port} not reachable after the gateway came back");
    }
}

macro_rules! scenarios {
    ($module:ident, $gw:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn tcp_and_udp_servers_on_wildcard_are_reachable_from_the_wan() {
                super::tcp_and_udp_servers_on_wildcard_are_reachable_from_the_wan($gw)
            }

            #[test]
            fn dual_stack_server_is_reachable_over_ipv4_and_ipv6_only_is_not_mapped() {
                super::dual_stack_server_is_reachable_over_ipv4_and_ipv6_only_is_not_mapped($gw)
            }

            #[test]
            fn loopback_specific_address_privileged_ephemeral_and_foreign_namespace_binds_are_not_forwarded() {
                super::loopback_specific_address_privileged_ephemeral_and_foreign_namespace_binds_are_not_forwarded($gw)
            }

            #[test]
            fn forwarding_ends_when_the_socket_is_closed() {
                super::forwarding_ends_when_the_socket_is_closed($gw)
            }

            #[test]
            fn forwarding_ends_when_the_program_is_killed() {
                super::forwarding_ends_when_the_program_is_killed($gw)
            }

            #[test]
            fn sockets_sharing_a_port_keep_one_mapping_until_the_last_is_released() {
                super::sockets_sharing_a_port_keep_one_mapping_until_the_last_is_released($gw)
            }

            #[test]
            fn rtorrent_experiment_ports_held_by_another_host_fail_with_eaddrinuse() {
                super::rtorrent_experiment_ports_held_by_another_host_fail_with_eaddrinuse($gw)
            }

            #[test]
            fn a_port_another_host_maps_later_is_refused_after_the_next_check() {
                super::a_port_another_host_maps_later_is_refused_after_the_next_check($gw)
            }

            #[test]
            fn sigterm_removes_every_mapping_and_later_binds_are_untouched() {
                super::sigterm_removes_every_mapping_and_later_binds_are_untouched($gw)
            }

            #[test]
            fn a_restarted_daemon_removes_what_an_earlier_run_left_behind() {
                super::a_restarted_daemon_removes_what_an_earlier_run_left_behind($gw)
            }

            #[test]
            fn bind_never_waits_for_a_silent_gateway() {
                super::bind_never_waits_for_a_silent_gateway($gw)
            }
        }
    };
}

scenarios!(upnp, Gw::Upnp);
scenarios!(pcp, Gw::Pcp);
scenarios!(natpmp, Gw::NatPmp);
