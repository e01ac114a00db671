//! The core's shape as a user sees it, against the real miniupnpd, with natbinder in the test process
//! and the tests reading what it publishes:
//! * a program that closes one port and binds the next gets the new port mapped before the old one
//!   is deleted (over UPnP IGD and PCP);
//! * sockets a later cgroup's programs bound while events were lost are found by the next listing
//!   (the resync's scope is the watched cgroup's subtree as it is then, not as it was at start);
//! * the outcomes of a port another host holds: the conflict, then each refused bind.
use std::{
    io::{BufRead, Write},
    time::Duration,
};

use natbinder::gateway::Backend;
use natbinder_tests::*;

const LIMIT: Duration = Duration::from_secs(15);

fn no_upnp() -> LabConfig {
    LabConfig { upnp: false, natpmp: true, ..LabConfig::default() }
}

/// Where in the daemon's history the mapping of `port` was made, and where `port`'s mapping removed.
fn position(h: &mut Harness, what: impl Fn(&Outcome) -> bool) -> Option<usize> {
    h.natbinder().drain();
    h.natbinder().history.iter().position(|e| what(&e.outcome))
}

fn closing_one_port_and_binding_the_next_maps_the_next_first(config: LabConfig, backend: Backend) {
    let mut h = Harness::start_in_process(config, &[]).unwrap();
    let mut cmd = h.lab.command(&h.lab.lan1, true, testapp_bin()).unwrap();
    cmd.args(["churn", "8300", "3"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut churn = cmd.spawn().unwrap();
    let mut stdin = churn.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(churn.stdout.take().unwrap());
    for port in 8300..8303 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("bound {port}"));
        // (The churn program only listens: it answers no probe, so its mapping is what is waited for.)
        let mapped = |o: &Outcome| matches!(o, Outcome::Mapped { key, .. } if key.port == port);
        h.natbinder().wait_for(LIMIT, |o| mapped(o).then_some(())).unwrap();
        assert!(h.mapping("TCP", port).is_some(), "{port} is not on the gateway");
        // Let the previous port's delete finish, so each step starts with an idle gateway.
        std::thread::sleep(Duration::from_millis(200));
        writeln!(stdin, "next").unwrap();
    }
    let _ = churn.kill();
    let _ = churn.wait();
    for (old, new) in [(8300, 8301), (8301, 8302)] {
        let mapped = position(
            &mut h,
            |o| matches!(o, Outcome::Mapped { key, backend: b, .. } if key.port == new && *b == backend),
        );
        let removed = position(&mut h, |o| matches!(o, Outcome::Removed { key, .. } if key.port == old));
        assert!(
            mapped.is_some() && removed.is_some() && mapped < removed,
            "{new} was mapped at {mapped:?}, {old} removed at {removed:?}: the new port waited for the old one's delete"
        );
    }
    assert!(wait_for(LIMIT, || h.mapping("TCP", 8302).is_none().then_some(())).is_some(), "8302 left behind");
    assert!(h.mapping("TCP", 8300).is_none() && h.mapping("TCP", 8301).is_none());
}

#[test]
fn over_upnp_closing_one_port_and_binding_the_next_maps_the_next_before_deleting_the_old() {
    closing_one_port_and_binding_the_next_maps_the_next_first(LabConfig::default(), Backend::Upnp);
}

#[test]
fn over_pcp_closing_one_port_and_binding_the_next_maps_the_next_before_deleting_the_old() {
    closing_one_port_and_binding_the_next_maps_the_next_first(no_upnp(), Backend::Pcp);
}

#[test]
fn sockets_of_a_cgroup_created_after_start_whose_events_were_lost_are_found_and_forwarded() {
    // A 4 KiB ring buffer holds about 60 events: a burst of 400 binds loses most of them.
    let mut h =
        Harness::start_in_process(LabConfig::default(), &["--event-buffer-kib", "4", "--reconcile-interval", "2"])
            .unwrap();
    // A unit started after natbinder, in a cgroup below the watched one.
    let unit = h.lab.cgroup.child("later.scope").unwrap();
    let mut cmd = command_in(&h.lab.lan1, Some(&unit), testapp_bin()).unwrap();
    cmd.args(["burst", "400", "31000", "3", "--keep-last"])
        .env("TESTAPP_NAME", "late")
        .stdout(std::process::Stdio::piped());
    let mut burst = cmd.spawn().unwrap();
    let mut out = std::io::BufReader::new(burst.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "kept 3");
    h.natbinder().wait_for(LIMIT, |o| matches!(o, Outcome::EventsLost { .. }).then_some(())).unwrap();
    // The last three sockets bound are the ones whose events the full buffer lost.
    for port in 31397..31400 {
        let answer = wait_for(Duration::from_secs(30), || udp_from_wan(&h.lab, port, "ping").answered());
        assert_eq!(answer.as_deref(), Some("late:ping"), "{port} never reachable");
    }
    h.natbinder().wait_for(Duration::from_secs(30), |o| (*o == Outcome::StormOver).then_some(())).unwrap();
    let ours: Vec<u16> = h
        .lab
        .gateway_mappings()
        .unwrap()
        .iter()
        .filter(|m| m.internal_client == LAN1_IP)
        .map(|m| m.external_port)
        .collect();
    assert_eq!(ours, vec![31397, 31398, 31399], "exactly the kept sockets are forwarded");
    let _ = burst.kill();
    let _ = burst.wait();
}

#[test]
fn a_port_another_host_holds_is_a_conflict_and_each_bind_of_it_a_refusal_naming_the_holder() {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    h.lab.lan2_maps("TCP", 8350).unwrap();
    h.start_daemon_in_process(&[]).unwrap();
    for attempt in 0..2 {
        let err = h.app("second", &["tcp-echo", "0.0.0.0:8350"]).err().expect("the bind succeeded");
        assert!(err.to_string().contains("Address already in use"), "attempt {attempt}: {err}");
        let holder = h
            .natbinder()
            .wait_for(LIMIT, |o| match o {
                Outcome::BindRefused { listener, holder } if listener.port == 8350 => Some(*holder),
                _ => None,
            })
            .unwrap();
        assert_eq!(holder, Some(LAN2_IP), "the refusal names the host that holds the port");
    }
    // The same port over UDP is not held: it is mapped.
    let (_udp, _o) = h.app("udp", &["udp-echo", "0.0.0.0:8350"]).unwrap();
    let mapped =
        |o: &Outcome| matches!(o, Outcome::Mapped { key, .. } if key.port == 8350 && key.protocol == Protocol::Udp);
    h.natbinder().wait_for(LIMIT, |o| mapped(o).then_some(())).unwrap();
}
