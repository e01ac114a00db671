//! NAT-PMP and PCP beyond the core scenarios (those run for every protocol in forwarding.rs): short
//! lifetimes, gateway restarts seen by announcement and by epoch, gateways that lose their mappings
//! while their epoch keeps counting (a firewall reload, `system_uptime=yes`), hostile LAN hosts,
//! moving off a protocol the gateway stopped offering, and — against the scripted fake NAT-PMP/PCP
//! server (natbinder-lab/src/fake_pmp.rs) — what miniupnpd will not show: a NAT-PMP-only gateway,
//! each result code, silence, ICMP port unreachable, wrong nonces, garbage, and another external port
//! than asked.
//!
//! natbinder runs in the test process ([`InProcessDaemon`]): the tests wait on its outcomes.
use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use natbinder::{gateway::Backend, outcome::Lease};
use natbinder_tests::{fake_pmp::*, inprocess::log_text, *};

/// A generous safety net for "eventually"; real latencies are a few milliseconds.
const LIMIT: Duration = Duration::from_secs(10);

fn no_upnp() -> LabConfig {
    LabConfig { upnp: false, natpmp: true, ..LabConfig::default() }
}

/// Our mapping of `port` on the real gateway, as its nftables rules show it.
fn mapped_here(h: &Harness, protocol: &str, port: u16) -> bool {
    h.mapping(protocol, port).is_some_and(|m| m.internal_client == LAN1_IP && m.internal_port == port)
}

/// Matches a mapping of `port` made or renewed, giving its lease and protocol.
fn mapped(port: u16) -> impl FnMut(&Outcome) -> Option<(Lease, Backend)> {
    move |o| match o {
        Outcome::Mapped { key, lease, backend, .. } if key.port == port => Some((*lease, *backend)),
        _ => None,
    }
}

/// Waits until the in-process daemon's log holds `needle` (for protocol diagnostics, which are logged
/// where they happen rather than published as outcomes).
fn wait_log(needle: &str) {
    let found = wait_for(LIMIT, || log_text().contains(needle).then_some(()));
    assert!(found.is_some(), "natbinder never logged {needle:?}:\n{}", log_text());
}

/// The lab with the fake NAT-PMP/PCP server on the gateway instead of miniupnpd.
fn fake_lab(script: PmpScript) -> (Harness, FakePmp) {
    let h =
        Harness::lab_only(LabConfig { upnp: false, natpmp: true, miniupnpd: false, ..LabConfig::default() }).unwrap();
    let fake = FakePmp::start(&h.lab, script).unwrap();
    (h, fake)
}

fn fake_holds(fake: &FakePmp, protocol: u8, port: u16) -> bool {
    fake.mappings().iter().any(|m| {
        m.protocol == protocol && m.internal_client == LAN1_IP && m.internal_port == port && m.external_port == port
    })
}

// ---- miniupnpd with UPnP off ----------------------------------------------------------------------

#[test]
fn pcp_mappings_granted_short_lifetimes_stay_up_over_several_lifetimes() {
    // The gateway grants 4 s whatever is asked (a VPN provider grants 60 s): natbinder must renew every
    // 2 s, asking for the port it was granted.
    let config = LabConfig { min_lifetime: Some(1), max_lifetime: Some(4), ..no_upnp() };
    let mut h = Harness::start_in_process(config, &[]).unwrap();
    let (_app, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    assert!(h.reachable_tcp(8080, LIMIT).is_some());
    // Four lifetimes: without renewals the gateway would have dropped the mapping three times over.
    let until = Instant::now() + Duration::from_secs(16);
    while Instant::now() < until {
        if tcp_from_wan(&h.lab, 8080, "ping").answered().is_none() {
            // miniupnpd renews by replacing the rule; a connection attempt that lands in that instant is
            // refused. A lapse is not that short: the mapping would stay gone until the next renewal.
            eprintln!("one probe failed at {:?}; the mapping: {:?}", until.elapsed(), h.mapping("TCP", 8080));
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(tcp_from_wan(&h.lab, 8080, "ping").answered().as_deref(), Some("web:ping"), "lapsed");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let grants = h.natbinder().seen(mapped(8080));
    assert!(grants.iter().all(|g| *g == (Lease::For(Duration::from_secs(4)), Backend::Pcp)), "{grants:?}");
    assert!((7..=10).contains(&grants.len()), "{} adds/renewals in 16 s of 4 s lifetimes", grants.len());
}

#[test]
fn natpmp_mappings_granted_short_lifetimes_are_renewed_at_half_asking_for_the_same_port() {
    let (mut h, fake) = fake_lab(PmpScript::new().lifetime_cap(2));
    h.start_daemon_in_process(&["--backend", "natpmp"]).unwrap();
    let (_app, _o) = h.app("game", &["udp-echo", "0.0.0.0:27015"]).unwrap();
    let granted = h.natbinder().wait_for(LIMIT, mapped(27015)).unwrap();
    assert_eq!(granted, (Lease::For(Duration::from_secs(2)), Backend::NatPmp), "the granted lifetime is followed");
    fake.take_requests();
    std::thread::sleep(Duration::from_millis(4500));
    let renewals: Vec<PmpRequest> =
        fake.requests().into_iter().filter(|r| r.opcode == 1 && r.lifetime != Some(0)).collect();
    assert!((4..=5).contains(&renewals.len()), "{} renewals in 4.5 s of 2 s lifetimes", renewals.len());
    for r in &renewals {
        assert_eq!((r.internal_port, r.suggested_port), (Some(27015), Some(27015)), "asks for the port it had");
        assert_eq!(r.lifetime, Some(3600), "asks for the configured lease each time");
    }
    assert!(fake_holds(&fake, UDP, 27015));
}

/// Restarts the gateway losing its state (a reboot) and returns how long after it answered again the
/// mapping of tcp/8080 was back.
fn reboot_and_time_recovery(h: &mut Harness) -> Duration {
    assert!(mapped_here(h, "TCP", 8080));
    // The epoch rule allows 2 s of slack: a restart must come later than that after the last answer.
    std::thread::sleep(Duration::from_secs(4));
    // A rebooting router is silent; without this a check landing while miniupnpd is down would meet
    // ICMP port unreachable and find the gateway again, and the test would not be testing the epoch rule.
    h.lab.silence_port_control().unwrap();
    h.lab.stop_miniupnpd();
    assert!(!mapped_here(h, "TCP", 8080), "precondition: the reboot lost the mapping");
    h.lab.start_miniupnpd().unwrap();
    h.lab.unsilence_port_control().unwrap();
    let back = Instant::now();
    assert!(wait_for(LIMIT, || mapped_here(h, "TCP", 8080).then_some(())).is_some(), "the mapping never came back");
    let recovery = back.elapsed();
    assert!(h.reachable_tcp(8080, LIMIT).is_some());
    recovery
}

fn restart_seen_by_announcement(args: &[&str], name: &str) {
    // No periodic check and no renewal for an hour: only the announcement can tell.
    let mut all = vec!["--reconcile-interval", "3600"];
    all.extend_from_slice(args);
    let mut h = Harness::start_in_process(no_upnp(), &all).unwrap();
    let (_app, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    assert!(h.reachable_tcp(8080, LIMIT).is_some());
    let recovery = reboot_and_time_recovery(&mut h);
    eprintln!("recovery: {name} gateway reboot seen by its announcement: mapping back {recovery:?} after it answered");
    assert!(recovery < Duration::from_secs(5), "{recovery:?}");
    assert!(log_text().contains("announced itself"), "{}", log_text());
    let lost = h.natbinder().seen(|o| matches!(o, Outcome::GatewayLostMappings { .. }).then_some(()));
    assert!(!lost.is_empty(), "the reboot was not recognised as lost mappings");
}

#[test]
fn a_pcp_gateway_restart_is_seen_by_its_announcement() {
    restart_seen_by_announcement(&["--backend", "pcp"], "PCP");
}

#[test]
fn a_natpmp_gateway_restart_is_seen_by_its_announcement() {
    restart_seen_by_announcement(&["--backend", "natpmp"], "NAT-PMP");
}

fn restart_seen_by_epoch(args: &[&str], name: &str) {
    let mut all = vec!["--reconcile-interval", "1"];
    all.extend_from_slice(args);
    let mut h = Harness::start_in_process(no_upnp(), &all).unwrap();
    // Multicast lost on the way (Wi-Fi does that): the gateway's announcements never arrive.
    h.lab.drop_announcements().unwrap();
    let (_app, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    assert!(h.reachable_tcp(8080, LIMIT).is_some());
    let recovery = reboot_and_time_recovery(&mut h);
    eprintln!("recovery: {name} gateway reboot seen by its epoch (announcements lost, 1 s checks): {recovery:?}");
    assert!(recovery < Duration::from_secs(5), "{recovery:?}");
    assert!(!log_text().contains("announced itself"), "an announcement got through the drop rule:\n{}", log_text());
    let why = h.natbinder().seen(|o| match o {
        Outcome::GatewayLostMappings { why, .. } => Some(why.clone()),
        _ => None,
    });
    assert!(why.iter().any(|w| w.contains("epoch")), "the epoch rule did not see the reboot: {why:?}");
}

#[test]
fn a_pcp_gateway_restart_is_seen_by_its_epoch_when_announcements_are_lost() {
    restart_seen_by_epoch(&["--backend", "pcp"], "PCP");
}

#[test]
fn a_natpmp_gateway_restart_is_seen_by_its_epoch_when_announcements_are_lost() {
    restart_seen_by_epoch(&["--backend", "natpmp"], "NAT-PMP");
}

#[test]
fn with_keep_gateway_chosen_ports_the_offered_port_is_kept_shown_and_deleted_with_its_socket() {
    for backend in ["pcp", "natpmp"] {
        let (mut h, fake) = fake_lab(PmpScript::new().external_port_offset(1));
        h.start_daemon_in_process(&["--backend", backend, "--keep-gateway-chosen-ports"]).unwrap();
        let (_a, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
        let external = h
            .natbinder()
            .wait_for(LIMIT, |o| match o {
                Outcome::Mapped { key, external_port, .. } if key.port == 8080 => Some(*external_port),
                _ => None,
            })
            .unwrap();
        assert_eq!(external, 8081, "{backend}: the mapping is on the port the gateway chose");
        let kept = fake.mappings().into_iter().find(|m| m.internal_client == LAN1_IP && m.internal_port == 8080);
        assert_eq!(kept.map(|m| m.external_port), Some(8081), "{backend}: kept on the gateway");
        let (code, out, err) = h.cli(&["get", "tcp", "8080", "--json"]).unwrap();
        assert_eq!(code, 0, "{err}");
        let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
        let m = &shown["mapping"];
        assert_eq!(
            (m["state"].as_str(), m["external_port"].as_u64(), m["internal_port"].as_u64()),
            (Some("mapped"), Some(8081), Some(8080)),
            "{out}"
        );
        assert!(log_text().contains("on external port 8081, which the gateway chose"), "{backend}: the log says so");
        // The program goes: the mapping goes.
        drop(_a);
        let gone = wait_for(LIMIT, || fake.mappings().iter().all(|m| m.internal_client != LAN1_IP).then_some(()));
        assert!(gone.is_some(), "{backend}: the kept mapping outlived its socket: {:?}", fake.mappings());
    }
}

/// The daemon's NAT-PMP/PCP request socket on lan1 (connected to the gateway's port 5351).
fn daemon_client_port(h: &Harness) -> u16 {
    let out = h.lab.lan1.exec("ss", &["-H", "-u", "-a", "-n", "-p"]).unwrap();
    out.lines()
        // Only natbinder opens sockets in lan1 here (the programs under test only listen).
        .filter(|l| l.contains(&format!("{GW_LAN_IP}:5351")))
        .find_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix(&format!("{LAN1_IP}:"))?.parse().ok()))
        .unwrap_or_else(|| panic!("no natbinder socket to the gateway's port 5351 in:\n{out}"))
}

#[test]
fn replies_and_announcements_from_another_lan_host_are_ignored() {
    let mut h = Harness::start_in_process(no_upnp(), &["--backend", "pcp", "--reconcile-interval", "3600"]).unwrap();
    let (_app, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    assert!(h.reachable_tcp(8080, LIMIT).is_some());
    h.natbinder().wait_for(LIMIT, mapped(8080)).unwrap();
    let lan2 = Netns { name: h.lab.lan2.name.clone() };
    let client = SocketAddrV4::new(LAN1_IP, daemon_client_port(&h));
    // lan2 claims to be a gateway that just restarted (epoch 0) with another external address, by
    // multicast and unicast, from the NAT-PMP/PCP server port; and answers the daemon's socket directly.
    for _ in 0..3 {
        for payload in [wire::pcp_announcement(0), wire::natpmp_announcement(0, "10.9.9.9".parse().unwrap())] {
            h.lab.send_from(&lan2, 5351, SocketAddrV4::new(ALL_HOSTS_GROUP, ANNOUNCE_PORT), &payload).unwrap();
            h.lab.send_from(&lan2, 5351, SocketAddrV4::new(LAN1_IP, ANNOUNCE_PORT), &payload).unwrap();
            h.lab.send_from(&lan2, 5351, client, &payload).unwrap();
        }
    }
    wait_log("ignoring an announcement from 192.168.77.20");
    std::thread::sleep(Duration::from_millis(500));
    let believed: Vec<Outcome> = h
        .natbinder()
        .drain()
        .into_iter()
        .filter(|o| {
            matches!(o, Outcome::GatewayLostMappings { .. } | Outcome::ExternalAddress { .. } | Outcome::Mapped { .. })
        })
        .collect();
    assert!(believed.is_empty(), "a forged packet was believed: {believed:?}");
    assert!(!log_text().contains("announced"), "a forged announcement was taken:\n{}", log_text());
    // Control: the real gateway's announcement is believed, and every mapping is renewed at once.
    h.lab.announce_address_change().unwrap();
    wait_log("announced");
    h.natbinder().wait_for(LIMIT, mapped(8080)).unwrap();
}

#[test]
fn mappings_move_to_pcp_when_the_gateway_turns_upnp_off() {
    let mut h = Harness::start_in_process(LabConfig { upnp: true, natpmp: true, ..LabConfig::default() }, &[]).unwrap();
    let (app, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    assert!(h.reachable_tcp(8080, LIMIT).is_some());
    assert_eq!(h.natbinder().wait_for(LIMIT, mapped(8080)).unwrap().1, Backend::Upnp);

    // The router's owner turns UPnP off; miniupnpd restarts with NAT-PMP/PCP only, its rules kept.
    h.lab.config.upnp = false;
    let restarted = Instant::now();
    h.lab.restart_miniupnpd().unwrap();
    let pcp = |o: &Outcome| matches!(o, Outcome::Mapped { key, backend: Backend::Pcp, .. } if key.port == 8080);
    let (_, at) = h.natbinder().wait_for_timed(LIMIT, |o| pcp(o).then_some(())).unwrap();
    eprintln!(
        "recovery: UPnP turned off on the gateway: mapping served by PCP {:?} after the restart began",
        at.duration_since(restarted)
    );
    assert!(mapped_here(&h, "TCP", 8080));
    assert!(h.reachable_tcp(8080, LIMIT).is_some());
    // And it is PCP's now: closing the program removes it.
    drop(app);
    let removed = |o: &Outcome| matches!(o, Outcome::Removed { key, .. } if key.port == 8080);
    h.natbinder().wait_for(LIMIT, |o| removed(o).then_some(())).unwrap();
    assert!(!mapped_here(&h, "TCP", 8080));
}

// ---- gateways that lose their mappings while their epoch keeps counting ---------------------------

/// The mapping of tcp/8080 is made; then `lose` makes the gateway forget it without its epoch telling,
/// checks that it did, and returns when the gateway was answering again. Returns how long after that
/// the WAN peer could reach the program again.
fn loss_with_a_counting_epoch(
    config: LabConfig,
    args: &[&str],
    lose: impl FnOnce(&mut Harness) -> Instant,
) -> (Harness, Duration) {
    let mut h = Harness::start_in_process(config, args).unwrap();
    let (app, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    assert!(h.reachable_tcp(8080, LIMIT).is_some());
    // Past the epoch rule's slack: a loss now would show in the epoch if it could.
    std::thread::sleep(Duration::from_secs(3));
    let lost = lose(&mut h);
    // The reconcile interval bounds this; the limit is only a safety net above it.
    let back = h.reachable_tcp(8080, Duration::from_secs(75)).map(|_| lost.elapsed());
    let back = back.unwrap_or_else(|| panic!("never reachable again:\n{}", log_text()));
    let lost_seen = h.natbinder().seen(|o| matches!(o, Outcome::GatewayLostMappings { .. }).then_some(()));
    assert!(lost_seen.is_empty(), "the epoch showed the loss after all: this test would show nothing new");
    drop(app);
    (h, back)
}

fn restart_with_uptime_epoch(h: &mut Harness) -> Instant {
    h.lab.stop_miniupnpd();
    assert!(!mapped_here(h, "TCP", 8080), "precondition: the restart lost the mapping");
    h.lab.start_miniupnpd().unwrap();
    Instant::now()
}

fn reload_firewall(h: &mut Harness) -> Instant {
    h.lab.flush_gateway_rules().unwrap();
    assert!(!mapped_here(h, "TCP", 8080), "precondition: the reload lost the mapping");
    Instant::now()
}

fn uptime_epoch() -> LabConfig {
    LabConfig { system_uptime: true, ..no_upnp() }
}

#[test]
fn a_gateway_whose_epoch_is_its_uptime_is_repaired_at_its_announcement_after_a_restart() {
    for backend in ["pcp", "natpmp"] {
        // No check for an hour: only the announcement can tell.
        let args = ["--backend", backend, "--reconcile-interval", "3600"];
        let (mut h, back) = loss_with_a_counting_epoch(uptime_epoch(), &args, restart_with_uptime_epoch);
        eprintln!(
            "recovery: {backend} restart with system_uptime=yes, seen by its announcement: reachable {back:?} after \
             the gateway answered"
        );
        assert!(back < Duration::from_secs(10), "{backend}: {back:?}");
        let renewed = h.natbinder().seen(|o| matches!(o, Outcome::Mapped { renewal: true, .. }).then_some(()));
        assert!(!renewed.is_empty(), "{backend}: repaired by a renewal");
    }
}

#[test]
fn a_gateway_whose_epoch_is_its_uptime_is_repaired_at_the_next_check_when_announcements_are_lost() {
    for backend in ["pcp", "natpmp"] {
        let args = ["--backend", backend, "--reconcile-interval", "5"];
        let (_h, back) = loss_with_a_counting_epoch(uptime_epoch(), &args, |h| {
            h.lab.drop_announcements().unwrap();
            restart_with_uptime_epoch(h)
        });
        eprintln!(
            "recovery: {backend} restart with system_uptime=yes, announcements lost, --reconcile-interval 5: \
             reachable {back:?} later"
        );
        assert!(back < Duration::from_secs(5) + LIMIT, "{backend}: {back:?}");
    }
}

#[test]
fn a_firewall_reload_on_the_router_is_repaired_within_one_default_interval() {
    // miniupnpd keeps running and says nothing; its epoch goes on. The default interval is 60 s.
    let (_h, back) = loss_with_a_counting_epoch(no_upnp(), &["--backend", "pcp"], reload_firewall);
    eprintln!(
        "recovery: PCP gateway's firewall reloaded (rules flushed), default 60 s interval: reachable {back:?} later"
    );
    assert!(back <= Duration::from_secs(61), "{back:?}");
}

#[test]
fn a_natpmp_gateway_whose_firewall_is_reloaded_is_repaired_at_the_next_check() {
    let args = ["--backend", "natpmp", "--reconcile-interval", "5"];
    let (_h, back) = loss_with_a_counting_epoch(no_upnp(), &args, reload_firewall);
    eprintln!("recovery: NAT-PMP gateway's firewall reloaded, --reconcile-interval 5: reachable {back:?} later");
    assert!(back <= Duration::from_secs(6), "{back:?}");
}

// ---- the scripted fake NAT-PMP/PCP server ---------------------------------------------------------

/// Matches a mapping of `port` made with `backend`.
fn mapped_with(port: u16, backend: Backend) -> impl FnMut(&Outcome) -> Option<()> {
    move |o| matches!(o, Outcome::Mapped { key, backend: b, .. } if key.port == port && *b == backend).then_some(())
}

#[test]
fn a_natpmp_only_gateway_is_served_by_natpmp_and_pcp_is_asked_again_after_a_network_change() {
    let (mut h, fake) = fake_lab(PmpScript::new().nat_pmp_only());
    h.start_daemon_in_process(&[]).unwrap();
    let (_app, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    h.natbinder().wait_for(LIMIT, mapped_with(8080, Backend::NatPmp)).unwrap();
    assert!(fake.mappings().iter().any(|m| m.internal_port == 8080 && m.nonce.is_none()), "made with NAT-PMP");

    // The gateway's firmware learns PCP; the next search (a network change) asks PCP again.
    fake.set_script(PmpScript::new());
    h.lab.lan1.exec("ip", &["route", "del", "default"]).unwrap();
    h.natbinder().wait_for(LIMIT, |o| matches!(o, Outcome::GatewayNotFound { .. }).then_some(())).unwrap();
    h.lab.lan1.exec("ip", &["route", "add", "default", "via", &GW_LAN_IP.to_string()]).unwrap();
    h.natbinder().wait_for(LIMIT, mapped_with(8080, Backend::Pcp)).unwrap();
    assert!(fake.mappings().iter().any(|m| m.internal_port == 8080 && m.nonce.is_some()), "made again with PCP");
}

#[test]
fn a_natpmp_only_gateway_that_learns_pcp_is_served_by_pcp_after_the_next_check() {
    let (mut h, fake) = fake_lab(PmpScript::new().nat_pmp_only());
    h.start_daemon_in_process(&["--reconcile-interval", "1"]).unwrap();
    let (_app, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    h.natbinder().wait_for(LIMIT, mapped_with(8080, Backend::NatPmp)).unwrap();
    // Each check asks whether PCP answers now; the answer "unsupported" is not kept.
    std::thread::sleep(Duration::from_millis(2500));
    let asked = fake.requests().iter().filter(|r| r.version == 2).count();
    assert!(asked >= 3, "PCP asked {asked} times: at start and at each 1 s check");
    assert!(h
        .natbinder()
        .seen(|o| matches!(o, Outcome::Mapped { backend: Backend::Pcp, .. }).then_some(()))
        .is_empty());
    fake.set_script(PmpScript::new());
    h.natbinder().wait_for(LIMIT, mapped_with(8080, Backend::Pcp)).unwrap();
    assert!(fake.mappings().iter().any(|m| m.internal_port == 8080 && m.nonce.is_some()), "made again with PCP");
}

/// Waits for `port`'s mapping to be refused with a reason that says `said`, then to be made.
fn refused_then_mapped(h: &mut Harness, port: u16, said: &str) {
    let reason = h
        .natbinder()
        .wait_for(LIMIT, |o| match o {
            Outcome::Pending { key, reason: PendingReason::Retrying { error, .. } } if key.port() == port => {
                Some(error.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(reason.contains(said), "port {port}: the reason {reason:?} does not say {said:?}");
    h.natbinder().wait_for(LIMIT, mapped(port)).unwrap();
}

#[test]
fn pcp_result_codes_are_reported_with_their_meaning_and_retried() {
    let (mut h, fake) = fake_lab(PmpScript::new());
    h.start_daemon_in_process(&["--backend", "pcp"]).unwrap();
    let cases = [
        (pcp_result::NOT_AUTHORIZED, "NOT_AUTHORIZED"),
        (pcp_result::NO_RESOURCES, "NO_RESOURCES"),
        (pcp_result::USER_EX_QUOTA, "USER_EX_QUOTA"),
        (pcp_result::ADDRESS_MISMATCH, "another NAT sits between this host and the gateway"),
    ];
    let mut apps = Vec::new();
    for (i, (code, said)) in cases.into_iter().enumerate() {
        let port = 9000 + i as u16;
        fake.set_script(PmpScript::new().pcp_result(code, 1));
        apps.push(h.app("srv", &["tcp-echo", &format!("0.0.0.0:{port}")]).unwrap());
        // Retried after a second, and then mapped.
        refused_then_mapped(&mut h, port, said);
        assert!(fake_holds(&fake, TCP, port));
    }
    let double_nat = h.natbinder().seen(|o| matches!(o, Outcome::DoubleNat(_)).then_some(()));
    assert_eq!(double_nat.len(), 1, "ADDRESS_MISMATCH is reported as a NAT in between, once");
}

#[test]
fn natpmp_result_codes_are_reported_with_their_meaning_and_retried() {
    let mut apps = Vec::new();
    let (mut h, fake) = fake_lab(PmpScript::new());
    h.start_daemon_in_process(&["--backend", "natpmp"]).unwrap();
    let cases = [
        (natpmp_result::NOT_AUTHORIZED, "NAT-PMP result 2 (not authorized/refused)"),
        (natpmp_result::NETWORK_FAILURE, "NAT-PMP result 3 (network failure)"),
        (natpmp_result::OUT_OF_RESOURCES, "NAT-PMP result 4 (out of resources)"),
    ];
    for (i, (code, said)) in cases.into_iter().enumerate() {
        let port = 9100 + i as u16;
        fake.set_script(PmpScript::new().natpmp_result(code, 1));
        apps.push(h.app("srv", &["udp-echo", &format!("0.0.0.0:{port}")]).unwrap());
        refused_then_mapped(&mut h, port, said);
        assert!(fake_holds(&fake, UDP, port));
    }
}

#[test]
fn retransmissions_follow_the_rfc_schedule_and_port_unreachable_ends_them_at_once() {
    let (mut h, fake) = fake_lab(PmpScript::new());
    h.start_daemon_in_process(&["--backend", "pcp"]).unwrap();
    // Four requests go unanswered: sent at 0, 0.25, 0.75, 1.75 s; the fifth (3.75 s) is answered.
    fake.set_script(PmpScript::new().reply_fault(ReplyFault::Silence, 4));
    fake.take_requests();
    let (_app, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    h.natbinder().wait_for(LIMIT, mapped(8080)).unwrap();
    let sent: Vec<Instant> = fake.requests().iter().filter(|r| r.internal_port == Some(8080)).map(|r| r.at).collect();
    assert_eq!(sent.len(), 5, "four silences, one answer");
    let gaps: Vec<u128> = sent.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    eprintln!("recovery: silent PCP gateway: retransmission gaps {gaps:?} ms, mapped at the fifth request");
    for (gap, expected) in gaps.iter().zip([250u128, 500, 1000, 2000]) {
        assert!(gap.abs_diff(expected) < 100, "retransmission gaps {gaps:?} ms, expected 250, 500, 1000, 2000");
    }
    assert!(fake_holds(&fake, TCP, 8080));

    // Nothing listens on 5351 any more: the gateway's ICMP port unreachable ends the exchange at once,
    // and the daemon looks for the gateway again rather than retransmitting for two minutes.
    fake.stop_listening().unwrap();
    let bound = Instant::now();
    let (_app2, _o2) = h.app("web2", &["tcp-echo", "0.0.0.0:8081"]).unwrap();
    let lost = |o: &Outcome| matches!(o, Outcome::GatewayLost { why, .. } if why.contains("ICMP port unreachable"));
    let (_, at) = h.natbinder().wait_for_timed(LIMIT, |o| lost(o).then_some(())).unwrap();
    let noticed = at - bound;
    eprintln!("recovery: ICMP port unreachable ended the exchange and was reported {noticed:?} after the bind");
    assert!(noticed < Duration::from_secs(1), "took {noticed:?}");
    fake.listen().unwrap();
    let listening = Instant::now();
    h.natbinder().wait_for(Duration::from_secs(40), mapped(8081)).unwrap();
    eprintln!("recovery: NAT-PMP/PCP server back: mapped {:?} after it listened again", listening.elapsed());
    assert!(fake_holds(&fake, TCP, 8081));
}

#[test]
fn replies_with_a_wrong_nonce_or_garbage_are_ignored() {
    let (mut h, fake) = fake_lab(PmpScript::new().reply_fault(ReplyFault::WrongNonce, 2));
    h.start_daemon_in_process(&["--backend", "pcp"]).unwrap();
    let (_a, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    h.natbinder().wait_for(LIMIT, mapped(8080)).unwrap();
    assert!(log_text().contains("answers another request"), "the wrong-nonce reply was noticed");
    fake.set_script(PmpScript::new().reply_fault(ReplyFault::Garbage, 2));
    let (_b, _o2) = h.app("web", &["tcp-echo", "0.0.0.0:8081"]).unwrap();
    h.natbinder().wait_for(LIMIT, mapped(8081)).unwrap();
    assert!(log_text().contains("malformed packet"), "the garbage was noticed");
    assert!(fake_holds(&fake, TCP, 8080) && fake_holds(&fake, TCP, 8081));
}

#[test]
fn another_external_port_than_asked_is_never_kept_and_the_port_is_refused_next_time() {
    for backend in ["pcp", "natpmp"] {
        let (mut h, fake) = fake_lab(PmpScript::new().external_port_offset(1));
        h.start_daemon_in_process(&["--backend", backend]).unwrap();
        let (_a, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
        let offered = h
            .natbinder()
            .wait_for(LIMIT, |o| match o {
                Outcome::Conflict { key, offered, .. } if key.port == 8080 => Some(*offered),
                _ => None,
            })
            .unwrap();
        assert_eq!(offered, Some(8081), "{backend}: the conflict says which port the gateway offered");
        // `natbinder list` says so too, and that the offer was deleted.
        let (code, out, err) = h.cli(&["get", "tcp", "8080", "--json"]).unwrap();
        assert_eq!(code, 0, "{err}");
        let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (shown["mapping"]["state"].as_str(), shown["mapping"]["offered_port"].as_u64()),
            (Some("conflict"), Some(8081)),
            "{out}"
        );
        assert!(
            shown["mapping"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("offered external port 8081") && r.contains("deleted")),
            "{out}"
        );
        assert!(
            fake.mappings().iter().all(|m| m.internal_client != LAN1_IP),
            "{backend}: a mapping on another external port was kept: {:?}",
            fake.mappings()
        );
        drop(_a);
        let again = wait_for(LIMIT, || match h.app("again", &["tcp-echo", "0.0.0.0:8080"]) {
            Err(e) if e.to_string().contains("Address already in use") => Some(()),
            _ => None,
        });
        assert!(again.is_some(), "{backend}: binding the refused port again succeeded");
        let refused = |o: &Outcome| matches!(o, Outcome::BindRefused { listener, .. } if listener.port == 8080);
        h.natbinder().wait_for(LIMIT, |o| refused(o).then_some(())).unwrap();
    }
}
