//! Gateway faults that a real miniupnpd cannot be made to show, against the lab's scripted fake IGD
//! (natbinder_lab::fake_igd): 725 and 402 (permanent leases only), 501, 606, 728, silence, garbage, and
//! an external address that betrays a double NAT. Each test states what the user sees: bind() never
//! waits, the daemon survives, what can be mapped is, and nothing is left behind.
//!
//! natbinder runs in the test process ([`InProcessDaemon`]): the tests wait on its outcomes.
use std::time::{Duration, Instant};

use natbinder::{
    journal::{Journal, JournalEntry},
    outcome::DoubleNat,
};
use natbinder_tests::{fake_igd::*, inprocess::log_text, *};

const LIMIT: Duration = Duration::from_secs(30);

struct FaultLab {
    // Drop order: the fake goes before the harness (and its lab).
    fake: FakeIgd,
    h: Harness,
}

fn start(script: FakeScript, daemon_args: &[&str]) -> FaultLab {
    let mut h = Harness::lab_only(LabConfig { miniupnpd: false, ..Default::default() }).unwrap();
    let fake = FakeIgd::start(&h.lab, script).unwrap();
    h.start_daemon_in_process(daemon_args).unwrap();
    FaultLab { fake, h }
}

impl FaultLab {
    fn mapped(&self, protocol: &str, port: u16) -> Option<FakeMapping> {
        self.fake.mappings().into_iter().find(|m| m.protocol == protocol && m.external_port == port)
    }

    fn wait_mapped(&self, protocol: &str, port: u16) -> Option<FakeMapping> {
        wait_for(LIMIT, || self.mapped(protocol, port))
    }

    fn wait_unmapped(&self, protocol: &str, port: u16) -> bool {
        wait_for(LIMIT, || self.mapped(protocol, port).is_none().then_some(())).is_some()
    }

    /// Starts a TCP server and returns it with how long its start and bind() took.
    fn timed_app(&mut self, name: &str, port: u16) -> (App, Duration) {
        let started = Instant::now();
        let (app, _out) = self.h.app(name, &["tcp-echo", &format!("0.0.0.0:{port}")]).unwrap();
        (app, started.elapsed())
    }

    /// What the running daemon's journal holds, read as the next start would read it.
    fn journal(&self) -> Vec<JournalEntry> {
        Journal::open(&self.h.lab.dir.join("state")).map(|j| j.entries().cloned().collect()).unwrap_or_default()
    }

    /// Waits until `port`'s mapping is refused with a reason that says `said`.
    fn wait_refused(&mut self, port: u16, said: &str) {
        let reason = self
            .h
            .natbinder()
            .wait_for(LIMIT, |o| match o {
                Outcome::Pending { key, reason: PendingReason::Retrying { error, .. } } if key.port() == port => {
                    Some(error.clone())
                }
                _ => None,
            })
            .unwrap();
        assert!(reason.contains(said), "port {port} refused for {reason:?}, not {said:?}");
    }
}

/// Waits until the in-process daemon's log holds `needle` (for the session's own diagnostics).
fn wait_log(needle: &str) {
    let found = wait_for(LIMIT, || log_text().contains(needle).then_some(()));
    assert!(found.is_some(), "natbinder never logged {needle:?}:\n{}", log_text());
}

#[test]
fn a_gateway_that_only_takes_permanent_leases_725_gets_journalled_permanent_mappings_that_are_always_deleted() {
    let mut f = start(FakeScript::new().permanent_only_725(), &[]);
    let (app, _) = f.timed_app("perm", 9100);
    let bound = Instant::now();
    let m = f.wait_mapped("TCP", 9100).expect("no permanent mapping was made after 725");
    eprintln!("recovery: 725 -> permanent mapping {:?} after bind", bound.elapsed());
    assert_eq!(m.lease, 0, "the retry asks for a permanent mapping");
    // The gateway holds it a moment before the daemon has its answer and writes the journal.
    let journalled = wait_for(LIMIT, || f.journal().iter().any(|e| e.port == 9100 && e.permanent).then_some(()));
    assert!(journalled.is_some(), "the permanent mapping is not journalled: {:?}", f.journal());
    wait_log("accepts only permanent mappings");
    drop(app);
    assert!(f.wait_unmapped("TCP", 9100), "a permanent mapping outlived its socket");
    let forgotten = wait_for(LIMIT, || (!f.journal().iter().any(|e| e.port == 9100)).then_some(()));
    assert!(forgotten.is_some(), "the journal still holds a deleted mapping: {:?}", f.journal());
}

#[test]
fn a_permanent_mapping_left_by_a_killed_daemon_is_deleted_by_the_next_from_its_journal() {
    let mut f = start(FakeScript::new().invalid_args_402_on_lease(), &[]);
    let (app, _) = f.timed_app("perm", 9110);
    assert_eq!(f.wait_mapped("TCP", 9110).map(|m| m.lease), Some(0), "402 on a lease leads to a permanent mapping");
    // Killed: nothing deleted, the journal as the last write left it.
    f.h.natbinder().crash().unwrap();
    drop(app);
    assert!(f.mapped("TCP", 9110).is_some(), "precondition: nobody deleted it yet");
    let restarted = Instant::now();
    f.h.start_daemon_in_process(&[]).unwrap();
    assert!(f.wait_unmapped("TCP", 9110), "the journalled permanent mapping survived the restart");
    eprintln!("recovery: orphaned permanent mapping deleted {:?} after the daemon restarted", restarted.elapsed());
}

#[test]
fn permanent_mappings_are_refused_when_the_external_address_is_not_public() {
    let mut f = start(FakeScript::new().permanent_only_725().external_ip(std::net::Ipv4Addr::new(10, 0, 0, 1)), &[]);
    let (_app, took) = f.timed_app("perm", 9120);
    assert!(took < Duration::from_secs(1));
    wait_log("not mapping permanently");
    f.wait_refused(9120, "accepts only permanent mappings");
    assert!(f.mapped("TCP", 9120).is_none(), "a permanent mapping was made behind a double NAT");
}

#[test]
fn action_failed_501_is_retried_until_it_succeeds() {
    let mut f = start(FakeScript::new().fail_adds_501(2), &[]);
    let (_app, took) = f.timed_app("retry", 9130);
    assert!(took < Duration::from_secs(1), "bind waited {took:?}");
    let started = Instant::now();
    let m = f.wait_mapped("TCP", 9130).expect("never mapped after two 501s");
    assert_eq!(m.lease, 3600);
    eprintln!("recovery: 501 twice -> mapped {:?} after bind", started.elapsed());
    let adds = f.fake.requests().iter().filter(|r| r.action == "AddPortMapping").count();
    assert_eq!(adds, 3, "two refused attempts and one that worked");
}

#[test]
fn not_authorized_606_leaves_the_socket_bound_and_says_why() {
    let mut f = start(FakeScript::new().not_authorized_606(), &[]);
    let (_app, took) = f.timed_app("denied", 9140);
    assert!(took < Duration::from_secs(1), "bind waited {took:?}");
    f.wait_refused(9140, "does not allow this mapping");
    assert!(f.mapped("TCP", 9140).is_none());
    f.h.natbinder().stop().expect("the daemon did not shut down cleanly");
}

#[test]
fn a_full_table_728_keeps_the_mapping_pending_until_room_is_made() {
    let mut f = start(FakeScript::new().table_full_728(1), &[]);
    let (first, _) = f.timed_app("first", 9150);
    assert!(f.wait_mapped("TCP", 9150).is_some());
    let (_second, _) = f.timed_app("second", 9151);
    f.wait_refused(9151, "no room for more mappings");
    assert!(f.mapped("TCP", 9151).is_none());
    drop(first);
    let freed = Instant::now();
    assert!(f.wait_mapped("TCP", 9151).is_some(), "the pending mapping was not made once room was free");
    eprintln!("recovery: 728 table full -> mapped {:?} after room was made", freed.elapsed());
}

#[test]
fn a_silent_gateway_never_delays_bind_and_is_used_again_once_it_answers() {
    let mut f = start(FakeScript::new(), &[]);
    // It falls silent once the daemon is up: requests are accepted and never answered.
    f.fake.set_script(FakeScript::new().silent_control());
    let mut slowest = Duration::ZERO;
    let mut apps = Vec::new();
    for port in 9160..9165 {
        let (app, took) = f.timed_app("quiet", port);
        slowest = slowest.max(took);
        apps.push(app);
    }
    eprintln!("slowest start+bind with a silent gateway: {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "bind waited for a silent gateway: {slowest:?}");
    f.fake.set_script(FakeScript::new());
    let answering = Instant::now();
    for port in 9160..9165 {
        assert!(f.wait_mapped("TCP", port).is_some(), "{port} not mapped once the gateway answered");
    }
    eprintln!("recovery: silent gateway -> all 5 mapped {:?} after it answered again", answering.elapsed());
}

#[test]
fn garbage_from_the_gateway_never_crashes_the_daemon() {
    let mut f = start(FakeScript::new(), &[]);
    for (i, kind) in
        [GarbageKind::NotHttp, GarbageKind::TruncatedHttp, GarbageKind::MalformedXml, GarbageKind::HugeBody]
            .into_iter()
            .enumerate()
    {
        f.fake.set_script(FakeScript::new().garbage_control(kind));
        let port = 9170 + i as u16;
        let (_app, took) = f.timed_app("garbage", port);
        assert!(took < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(300));
        f.fake.set_script(FakeScript::new());
        let sane = Instant::now();
        // A daemon that died would publish nothing more: waiting fails with what it last said.
        let mapped = |o: &Outcome| matches!(o, Outcome::Mapped { key, .. } if key.port == port);
        f.h.natbinder().wait_for(LIMIT, |o| mapped(o).then_some(())).unwrap();
        assert!(f.wait_mapped("TCP", port).is_some(), "nothing mapped after {kind:?} stopped:\n{}", log_text());
        eprintln!("recovery: garbage {kind:?} -> mapped {:?} after the gateway answered sanely", sane.elapsed());
    }
}

#[test]
fn a_double_nat_is_reported_plainly_once() {
    let mut f =
        start(FakeScript::new().external_ip(std::net::Ipv4Addr::new(100, 64, 0, 1)), &["--reconcile-interval", "1"]);
    let (_app, _) = f.timed_app("cgnat", 9180);
    assert!(f.wait_mapped("TCP", 9180).is_some(), "mappings are still made on the first gateway");
    std::thread::sleep(Duration::from_secs(3)); // a few periodic checks
    let reported = f.h.natbinder().seen(|o| match o {
        Outcome::DoubleNat(what) => Some(what.clone()),
        _ => None,
    });
    let cgnat: std::net::IpAddr = std::net::Ipv4Addr::new(100, 64, 0, 1).into();
    assert_eq!(reported, vec![DoubleNat::UpstreamAddress(cgnat)], "reported once per change");
    assert_eq!(log_text().matches("double NAT").count(), 1, "and logged once:\n{}", log_text());
    // The upstream NAT goes away: the new, public address is noticed and published.
    f.fake.set_script(FakeScript::new());
    let changed = Instant::now();
    let public: std::net::IpAddr = EXTERNAL_IP_PLACEHOLDER.into();
    let (_, at) =
        f.h.natbinder()
            .wait_for_timed(LIMIT, |o| {
                (*o == Outcome::ExternalAddress { address: public, previous: Some(cgnat) }).then_some(())
            })
            .unwrap();
    eprintln!("recovery: external address change -> published {:?} after (check interval 1 s)", at - changed);
    let again = f.h.natbinder().seen(|o| matches!(o, Outcome::DoubleNat(_)).then_some(()));
    assert_eq!(again.len(), 1, "a public address is no double NAT");
}
