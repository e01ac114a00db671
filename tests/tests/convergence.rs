//! The gateway converges on the ideal state when the world misbehaves: sockets bound while no daemon
//! watched, a daemon killed while programs die, event storms that overflow the ring buffer, gateway
//! restarts and mappings removed behind natbinder's back. All against the real miniupnpd in the lab.
use std::time::{Duration, Instant};

use natbinder_tests::*;

const LIMIT: Duration = Duration::from_secs(15);

/// A daemon with `interval`, a server on `port` reachable from the WAN, and then its mapping deleted
/// on the gateway behind natbinder's back (by miniupnpc from lan1).
fn mapping_deleted_behind_our_back(interval: &str, port: u16) -> (Harness, App) {
    let mut h = Harness::start_with(LabConfig::default(), &["--reconcile-interval", interval]).unwrap();
    let (app, _o) = h.app("victim", &["tcp-echo", &format!("0.0.0.0:{port}")]).unwrap();
    assert!(h.reachable_tcp(port, LIMIT).is_some());
    h.lab.upnpc(&h.lab.lan1, &["-d", &port.to_string(), "TCP"]).unwrap();
    assert_eq!(tcp_from_wan(&h.lab, port, "ping"), Reach::Refused, "precondition: the mapping is gone");
    (h, app)
}

fn ours(h: &Harness) -> Vec<(String, u16)> {
    let mut v: Vec<(String, u16)> = h
        .lab
        .gateway_mappings()
        .unwrap()
        .into_iter()
        .filter(|m| m.internal_client == LAN1_IP)
        .map(|m| (m.protocol, m.external_port))
        .collect();
    v.sort();
    v
}

#[test]
fn a_program_bound_before_the_daemon_started_is_forwarded_and_followed() {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    let (early, _o) = h.app("early", &["tcp-echo", "0.0.0.0:8800"]).unwrap();
    h.start_daemon(&[]).unwrap();
    assert_eq!(h.reachable_tcp(8800, LIMIT).as_deref(), Some("early:ping"));
    assert!(h.daemon().log_text().contains("adopted tcp/8800"), "the daemon says it adopted the socket");
    // Its release is followed like any other.
    drop(early);
    assert!(wait_for(LIMIT, || ours(&h).is_empty().then_some(())).is_some(), "mapping left: {:?}", ours(&h));
}

#[test]
fn after_a_daemon_sigkill_the_next_one_keeps_live_programs_and_cleans_up_dead_ones() {
    let mut h = Harness::start().unwrap();
    let (dies, _o1) = h.app("dies", &["tcp-echo", "0.0.0.0:8810"]).unwrap();
    let (lives, _o2) = h.app("lives", &["udp-echo", "0.0.0.0:8811"]).unwrap();
    assert!(h.reachable_tcp(8810, LIMIT).is_some());
    assert!(wait_for(LIMIT, || h.mapping("UDP", 8811)).is_some());

    h.daemon().stop(libc::SIGKILL, LIMIT).unwrap();
    drop(dies); // dies while no daemon watches
    let restarted = Instant::now();
    h.start_daemon(&[]).unwrap();
    let cleaned = wait_for(LIMIT, || (ours(&h) == vec![("UDP".to_string(), 8811)]).then(|| restarted.elapsed()));
    assert!(cleaned.is_some(), "after restart the gateway holds {:?}", ours(&h));
    eprintln!("recovery: daemon SIGKILL + program died -> gateway table exact {:?} after restart", cleaned.unwrap());
    assert!(matches!(udp_from_wan(&h.lab, 8811, "ping"), Reach::Answered(a) if a == "lives:ping"));
    assert_eq!(tcp_from_wan(&h.lab, 8810, "ping"), Reach::Refused);

    // The adopted socket's release is seen: its mapping goes with it.
    drop(lives);
    assert!(wait_for(LIMIT, || ours(&h).is_empty().then_some(())).is_some(), "mapping left: {:?}", ours(&h));
}

#[test]
fn a_burst_of_a_thousand_listeners_that_overflows_the_event_buffer_leaves_the_table_exact() {
    // A 4 KiB ring buffer holds about 60 events: the burst overflows it for certain.
    let mut h =
        Harness::start_with(LabConfig::default(), &["--event-buffer-kib", "4", "--reconcile-interval", "2"]).unwrap();
    let started = Instant::now();
    let (_burst, _o) = h.app("burst", &["burst", "1000", "30000", "5"]).unwrap();
    let want: Vec<(String, u16)> = (30000..30005).map(|p| ("UDP".to_string(), p)).collect();
    let settled = wait_for(Duration::from_secs(60), || {
        if ours(&h) != want {
            return None;
        }
        // Exact and stable: still exact after a further full check.
        std::thread::sleep(Duration::from_secs(3));
        (ours(&h) == want).then_some(())
    });
    assert!(settled.is_some(), "gateway holds {} of ours, want the 5 kept sockets: {:?}", ours(&h).len(), ours(&h));
    assert!(h.daemon().log_text().contains("events were lost"), "the overflow was not noticed");
    eprintln!(
        "recovery: 1000-listener burst overflowing the event buffer -> table exact and stable {:?} after it began \
         (includes a 3 s stability wait)",
        started.elapsed()
    );
    // The kept sockets answer, so each one is reachable from the WAN, not merely listed.
    for port in 30000..30005 {
        let answer = wait_for(LIMIT, || udp_from_wan(&h.lab, port, "ping").answered());
        assert_eq!(answer.as_deref(), Some("burst:ping"), "kept socket {port} is not reachable from the WAN");
    }
    // And the 995 closed ones are not: a sample of them, from both ends of the burst.
    for port in [30005, 30500, 30999] {
        assert!(udp_from_wan(&h.lab, port, "ping").answered().is_none(), "closed port {port} still answers");
    }
}

#[test]
fn mappings_deleted_behind_natbinders_back_come_back_at_the_next_check() {
    let (h, _app) = mapping_deleted_behind_our_back("2", 8820);
    let deleted = Instant::now();
    assert_eq!(h.reachable_tcp(8820, LIMIT).as_deref(), Some("victim:ping"));
    eprintln!(
        "recovery: mapping deleted behind our back -> reachable again {:?} later (check interval 2 s)",
        deleted.elapsed()
    );
}

#[test]
fn a_gateway_restart_on_a_new_port_with_an_empty_table_is_repaired_within_five_seconds() {
    // The periodic check is an hour away: only the restart's own signs can bring the mappings back.
    let mut h = Harness::start_with(LabConfig::default(), &["--reconcile-interval", "3600"]).unwrap();
    let (_tcp, _o1) = h.app("web", &["tcp-echo", "0.0.0.0:8900"]).unwrap();
    let (_udp, _o2) = h.app("game", &["udp-echo", "0.0.0.0:8901"]).unwrap();
    assert!(h.reachable_tcp(8900, LIMIT).is_some());

    // Power cycle: rules and leases gone, and it comes back on another HTTP port.
    h.lab.stop_miniupnpd();
    assert_eq!(tcp_from_wan(&h.lab, 8900, "ping"), Reach::Refused, "precondition: the restart lost the mapping");
    h.lab.config.http_port = 5556;
    h.lab.start_miniupnpd().unwrap();
    let answering = Instant::now();
    assert_eq!(h.reachable_tcp(8900, LIMIT).as_deref(), Some("web:ping"));
    let recovered = answering.elapsed();
    assert!(wait_for(LIMIT, || h.mapping("UDP", 8901)).is_some(), "the UDP mapping did not come back");
    eprintln!("recovery: gateway restart on a new port, empty table -> reachable {recovered:?} after it answered");
    assert!(recovered < Duration::from_secs(5), "recovery took {recovered:?}");
}

#[test]
fn a_change_of_default_route_is_noticed_and_the_mappings_are_kept() {
    let mut h = Harness::start().unwrap();
    let (_tcp, _o1) = h.app("web", &["tcp-echo", "0.0.0.0:8910"]).unwrap();
    assert!(h.reachable_tcp(8910, LIMIT).is_some());
    let lan1 = h.lab.lan1.name.clone();
    let ip = |args: &[&str]| {
        let status = std::process::Command::new("ip").args(["-n", &lan1]).args(args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["route", "del", "default"]);
    h.daemon().wait_log("no IPv4 default route", LIMIT).unwrap();
    ip(&["route", "add", "default", "via", &GW_LAN_IP.to_string()]);
    let restored = Instant::now();
    h.daemon().wait_log("network changed: gateway 192.168.77.1", LIMIT).unwrap();
    assert_eq!(h.reachable_tcp(8910, LIMIT).as_deref(), Some("web:ping"));
    eprintln!("recovery: default route removed and restored -> noticed, reachable {:?} after", restored.elapsed());
    assert_eq!(ours(&h), vec![("TCP".to_string(), 8910)]);
}

#[test]
fn sighup_makes_the_daemon_check_the_gateway_now() {
    let (mut h, _app) = mapping_deleted_behind_our_back("3600", 8830);
    let pid = h.daemon().pid() as i32;
    let hup = Instant::now();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(h.reachable_tcp(8830, LIMIT).as_deref(), Some("victim:ping"));
    eprintln!("recovery: mapping deleted behind our back, SIGHUP -> reachable again {:?} later", hup.elapsed());
}
