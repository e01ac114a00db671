//! The table's rules, one by one. No I/O and no clock but the one passed in.
use std::net::SocketAddrV4;

use super::*;

const TCP8080: MappingKey = MappingKey::ipv4(Protocol::Tcp, 8080);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);
/// A moment later: how long a test lets pass before it asks for the next piece of work.
const A_MOMENT: Duration = Duration::from_micros(500);

fn table() -> Table {
    Table::new(TableConfig::default())
}

fn sock(cookie: u64, protocol: Protocol, port: u16) -> Listener {
    Listener {
        cookie,
        protocol,
        port,
        family: Family::Ipv4,
        owner: Owner { pid: 4242, uid: 1000, gid: 1000, cgroup_id: 1, comm: "server".into(), ..Owner::default() },
    }
}

fn bind(t: &mut Table, cookie: u64, protocol: Protocol, port: u16, now: Instant) {
    t.socket_bound(sock(cookie, protocol, port), Stack::Ipv4, Found::Bind, forwarded(), now);
}

fn release(t: &mut Table, cookie: u64, now: Instant) {
    t.socket_released(cookie, Seen::Released, now);
}

fn grant(lease: Duration) -> Grant {
    Grant {
        external_port: 8080,
        lease: Lease::from_granted(lease),
        internal: SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 10), 8080),
        backend: Backend::Upnp,
        renewal: false,
        took: Duration::from_millis(5),
        handle: None,
    }
}

fn add(key: MappingKey) -> Option<Work> {
    Some(Work::Add { key, comm: "server".into() })
}

fn renew(key: MappingKey) -> Option<Work> {
    Some(Work::Renew { key, comm: "server".into() })
}

fn delete(key: MappingKey) -> Option<Work> {
    Some(Work::Delete { key })
}

#[test]
fn bind_then_add_then_release_then_delete() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    assert_eq!(t.next_work(now), add(TCP8080));
    t.record_mapped(TCP8080, grant(Duration::from_secs(3600)), now);
    assert_eq!(t.next_work(now), None);
    release(&mut t, 1, now);
    assert_eq!(t.next_work(now), delete(TCP8080), "due when the socket went");
    // Held (the thread that released it still runs): due when the hold ends.
    let held = now + Duration::from_micros(100);
    t.hold_delete(&TCP8080, held);
    assert_eq!(t.next_work(now), None);
    assert_eq!(t.next_due(), Some(held));
    assert_eq!(t.next_work(held), delete(TCP8080));
    t.record_deleted(TCP8080, Removal::Released, held);
    assert!(t.mapping(&TCP8080).is_none());
    assert_eq!(t.next_work(held), None);
}

#[test]
fn adds_go_before_deletes_that_fell_due_after_them_or_just_before_and_renewals_before_the_other_deletes() {
    let now = Instant::now();
    let mut t = table();
    let key = |port| MappingKey::ipv4(Protocol::Tcp, port);
    for (cookie, port) in [(1, 7000), (2, 7001)] {
        bind(&mut t, cookie, Protocol::Tcp, port, now);
        t.record_mapped(key(port), grant(Duration::from_secs(100)), now);
    }
    // At +50 s 7001 falls due for renewal; 7000 is closed as 9000 is bound, and 6000 right after.
    let later = now + Duration::from_secs(50);
    release(&mut t, 1, later);
    bind(&mut t, 3, Protocol::Tcp, 9000, later);
    let at = later + Duration::from_millis(1);
    bind(&mut t, 4, Protocol::Tcp, 6000, at);
    // The adds in the order they fell due (not port order), before the renewal and the delete.
    assert_eq!(t.next_work(at), add(key(9000)));
    t.record_mapped(key(9000), grant(Duration::from_secs(100)), at);
    assert_eq!(t.next_work(at), add(key(6000)));
    t.record_mapped(key(6000), grant(Duration::from_secs(100)), at);
    assert_eq!(t.next_work(at), renew(key(7001)));
    t.record_mapped(key(7001), grant(Duration::from_secs(100)), at);
    assert_eq!(t.next_work(at), delete(key(7000)));
    // A delete that fell due well before an add (its socket went earlier) goes first: deletes never
    // starve behind a program that keeps binding new ports.
    release(&mut t, 3, at);
    let after = at + ADD_FIRST_WINDOW + Duration::from_millis(1);
    bind(&mut t, 5, Protocol::Tcp, 9001, after);
    assert_eq!(t.next_work(after), delete(key(7000)));
    t.record_deleted(key(7000), Removal::Released, after);
    assert_eq!(t.next_work(after), delete(key(9000)));
    t.record_deleted(key(9000), Removal::Released, after);
    assert_eq!(t.next_work(after), add(key(9001)));
}

#[test]
fn a_port_wanted_again_before_its_delete_went_is_neither_deleted_nor_added() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_mapped(TCP8080, grant(Duration::from_secs(3600)), now);
    release(&mut t, 1, now);
    bind(&mut t, 2, Protocol::Tcp, 8080, now + Duration::from_micros(100));
    assert_eq!(t.next_work(now + Duration::from_secs(1)), None);
    assert!(matches!(t.mapping(&TCP8080).unwrap().state, MappingState::Active { .. }));
}

#[test]
fn shared_port_lives_until_last_socket() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Udp, 9000, now);
    bind(&mut t, 2, Protocol::Udp, 9000, now);
    let key = MappingKey::ipv4(Protocol::Udp, 9000);
    t.record_mapped(key, grant(Duration::from_secs(100)), now);
    release(&mut t, 1, now);
    assert_eq!(t.next_work(now), None);
    release(&mut t, 2, now);
    assert_eq!(t.next_work(now), delete(key));
}

#[test]
fn tcp_and_udp_on_one_port_are_separate_mappings() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 7000, now);
    bind(&mut t, 2, Protocol::Udp, 7000, now);
    assert_eq!(t.mappings().count(), 2);
}

#[test]
fn released_before_mapped_needs_no_delete() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    release(&mut t, 1, now);
    assert_eq!(t.next_work(now + A_MOMENT), None);
    assert!(t.mapping(&TCP8080).is_none());
}

#[test]
fn release_during_add_deletes_afterwards() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    let _work = t.next_work(now); // the reconciler starts the add...
    release(&mut t, 1, now); // ...the socket goes meanwhile...
    t.record_mapped(TCP8080, grant(Duration::from_secs(60)), now); // ...and the add lands.
    assert_eq!(t.next_work(now + A_MOMENT), delete(TCP8080));
}

#[test]
fn rebind_during_delete_adds_again() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_mapped(TCP8080, grant(Duration::from_secs(60)), now);
    release(&mut t, 1, now);
    assert_eq!(t.next_work(now + A_MOMENT), delete(TCP8080));
    bind(&mut t, 2, Protocol::Tcp, 8080, now + A_MOMENT);
    t.record_deleted(TCP8080, Removal::Released, now + A_MOMENT);
    assert_eq!(t.next_work(now + A_MOMENT), add(TCP8080));
}

#[test]
fn renews_at_half_lease_and_permanent_mappings_never() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_mapped(TCP8080, grant(Duration::from_secs(100)), now);
    assert_eq!(t.next_work(now + Duration::from_secs(49)), None);
    assert_eq!(t.next_due(), Some(now + Duration::from_secs(50)));
    assert_eq!(t.next_work(now + Duration::from_secs(50)), renew(TCP8080));
    t.record_mapped(TCP8080, grant(Duration::ZERO), now);
    assert_eq!(t.next_work(now + Duration::from_secs(10 * 365 * 24 * 3600)), None);
}

#[test]
fn failures_back_off_and_keep_the_reason() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_failed(TCP8080, "UPnP error 501".into(), now);
    assert_eq!(t.next_work(now), None);
    assert_eq!(t.next_work(now + FIRST_RETRY), add(TCP8080));
    t.record_failed(TCP8080, "UPnP error 501".into(), now);
    assert_eq!(t.next_work(now + FIRST_RETRY), None);
    assert_eq!(t.next_work(now + FIRST_RETRY * 2), add(TCP8080));
    let MappingState::Pending { reason: PendingReason::Retrying { error, attempts, retry_in }, .. } =
        &t.mapping(&TCP8080).unwrap().state
    else {
        panic!()
    };
    assert_eq!((error.as_str(), *attempts, *retry_in), ("UPnP error 501", 2, FIRST_RETRY * 2));
    for _ in 0..40 {
        t.record_failed(TCP8080, "x".into(), now);
    }
    assert_eq!(t.next_due(), Some(now + MAX_RETRY));
}

#[test]
fn ipv6_only_and_low_ports_want_nothing_and_an_unknown_stack_waits_for_its_class() {
    let now = Instant::now();
    let mut t = table();
    let mut v6 = sock(1, Protocol::Tcp, 9090);
    v6.family = Family::Ipv6;
    t.socket_bound(v6.clone(), Stack::Ipv6Only, Found::Bind, forwarded(), now);
    bind(&mut t, 2, Protocol::Tcp, 80, now);
    t.socket_bound(Listener { cookie: 3, ..v6.clone() }, Stack::Unknown, Found::Bind, forwarded(), now);
    assert_eq!(t.next_work(now), None);
    assert_eq!(t.sockets().count(), 3, "every listener is known, mapped or not");
    t.socket_classified(3, Stack::DualStack, now);
    assert_eq!(t.next_work(now), add(MappingKey::ipv4(Protocol::Tcp, 9090)));
    // A second classification (a late answer) changes nothing.
    t.socket_classified(3, Stack::Ipv6Only, now);
    assert_eq!(t.socket(3).unwrap().stack, Stack::DualStack);
}

#[test]
fn a_conflict_is_recorded_once_mirrored_and_not_retried() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.take_outcomes();
    t.record_conflict(PortKey::new(Protocol::Tcp, 8080), Some(OTHER), Learned::Listed, GATEWAY, None);
    assert_eq!(t.mapping(&TCP8080).unwrap().state, MappingState::Conflict);
    assert_eq!(t.next_work(now + MAX_RETRY), None);
    let held = t.take_held_changes().expect("the record changed");
    assert_eq!(
        held.iter().map(|(k, h)| (*k, h.holder)).collect::<Vec<_>>(),
        vec![(PortKey::new(Protocol::Tcp, 8080), Some(OTHER))]
    );
    assert!(t.take_held_changes().is_none(), "reported once");
    assert_eq!(
        t.take_outcomes(),
        vec![Outcome::Conflict { key: PortKey::new(Protocol::Tcp, 8080), holder: Some(OTHER), offered: None }]
    );
    // Another socket on a held port is a conflict at once, with no add.
    bind(&mut t, 2, Protocol::Tcp, 8080, now);
    assert_eq!(t.next_work(now), None);
    t.bind_refused(sock(3, Protocol::Tcp, 8080));
    assert!(t.take_outcomes().iter().any(|o| matches!(o, Outcome::BindRefused { holder: Some(h), .. } if *h == OTHER)));
}

#[test]
fn a_listing_replaces_the_held_record_and_settles_conflicts() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    bind(&mut t, 2, Protocol::Udp, 6881, now);
    t.record_conflict(PortKey::new(Protocol::Tcp, 8080), Some(OTHER), Learned::Listed, GATEWAY, None);
    let udp = PortKey::new(Protocol::Udp, 6881);
    let listing = Listing { held: vec![(udp, None)], ..Listing::default() };
    assert!(t.audit_listing(GATEWAY, listing, false, now).is_empty());
    assert_eq!(t.held().map(|(k, _)| *k).collect::<Vec<_>>(), vec![udp]);
    let outcomes = t.take_outcomes();
    assert!(outcomes.contains(&Outcome::Pending { key: TCP8080, reason: PendingReason::HolderLeft }), "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Conflict { key: udp, holder: None, offered: None }), "{outcomes:?}");
    assert_eq!(t.next_work(now), add(TCP8080));
}

#[test]
fn a_listing_decides_what_is_dropped_adopted_and_stale() {
    let now = Instant::now();
    let mut t = table();
    for (cookie, port) in [(1, 7000), (2, 7001), (3, 7002)] {
        bind(&mut t, cookie, Protocol::Tcp, port, now);
    }
    let k = |port| PortKey::new(Protocol::Tcp, port);
    // At start-up: 7000 and 7001 are found ours and wanted (adopted, renewed now), 7005 ours and
    // unwanted (an earlier run's), 7006 ours but pointing elsewhere.
    let listing =
        Listing { ours_here: [k(7000), k(7001), k(7005)].into(), ours_drifted: [k(7006)].into(), ..Listing::default() };
    let mut stale = t.audit_listing(GATEWAY, listing, true, now);
    stale.sort_by_key(|(k, _)| *k);
    assert_eq!(stale, vec![(k(7005), Removal::Leftover), (k(7006), Removal::Drifted)]);
    assert_eq!(t.next_work(now), add(MappingKey::Ipv4(k(7002))));
    t.record_mapped(MappingKey::Ipv4(k(7002)), grant(Duration::from_secs(100)), now);
    for port in [7000, 7001] {
        t.record_mapped(MappingKey::Ipv4(k(port)), grant(Duration::from_secs(100)), now);
    }
    t.take_outcomes();
    // Later the gateway lists only 7000: the other two are dropped and made again.
    let listing = Listing { ours_here: [k(7000)].into(), ..Listing::default() };
    assert!(t.audit_listing(GATEWAY, listing, false, now).is_empty());
    assert!(t.take_outcomes().contains(&Outcome::Dropped { keys: vec![k(7001), k(7002)], all: false }));
    assert_eq!(t.next_work(now), add(MappingKey::Ipv4(k(7001))));
    // An empty table: all of them gone, as after a restart.
    for port in [7001, 7002] {
        t.record_mapped(MappingKey::Ipv4(k(port)), grant(Duration::from_secs(100)), now);
    }
    t.take_outcomes();
    t.audit_listing(GATEWAY, Listing::default(), false, now);
    assert!(t.take_outcomes().contains(&Outcome::Dropped { keys: vec![k(7000), k(7001), k(7002)], all: true }));
}

#[test]
fn ports_learned_from_refusals_are_believed_for_ten_minutes_and_conflicts_rechecked() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 6881, now);
    let key = PortKey::new(Protocol::Tcp, 6881);
    t.record_conflict(key, None, Learned::Refused { at: now }, GATEWAY, None);
    t.audit_unlisted(now + Duration::from_secs(60));
    assert_eq!(t.held().count(), 1, "still believed");
    assert_eq!(t.next_work(now + Duration::from_secs(60)), add(MappingKey::Ipv4(key)), "asked again");
    t.record_conflict(key, None, Learned::Refused { at: now }, GATEWAY, None);
    t.audit_unlisted(now + HELD_ELSEWHERE_MEMORY);
    assert_eq!(t.held().count(), 0, "forgotten after ten minutes");
}

#[test]
fn renewing_all_now_touches_active_wanted_mappings_only() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_mapped(TCP8080, grant(Duration::from_secs(3600)), now);
    bind(&mut t, 2, Protocol::Tcp, 8081, now);
    let later = now + Duration::from_secs(60);
    t.record_failed(MappingKey::ipv4(Protocol::Tcp, 8081), "x".into(), later);
    t.renew_all_now(later);
    assert_eq!(t.next_work(later), renew(TCP8080));
}

#[test]
fn a_failed_renewal_still_deletes_after_release() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_mapped(TCP8080, grant(Duration::from_secs(100)), now);
    t.record_failed(TCP8080, "timeout".into(), now + Duration::from_secs(50));
    release(&mut t, 1, now + Duration::from_secs(51));
    assert_eq!(t.next_work(now + Duration::from_secs(52)), delete(TCP8080));
    assert_eq!(t.on_gateway_keys(), vec![TCP8080]);
}

#[test]
fn gateway_reset_keeps_unwanted_mappings_for_deletion_and_makes_the_rest_pending() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_mapped(TCP8080, grant(Duration::from_secs(100)), now);
    bind(&mut t, 2, Protocol::Tcp, 8081, now);
    t.record_mapped(MappingKey::ipv4(Protocol::Tcp, 8081), grant(Duration::from_secs(100)), now);
    release(&mut t, 1, now);
    t.gateway_reset(GATEWAY, now);
    assert_eq!(t.next_work(now + A_MOMENT), add(MappingKey::ipv4(Protocol::Tcp, 8081)));
    t.record_mapped(MappingKey::ipv4(Protocol::Tcp, 8081), grant(Duration::from_secs(100)), now);
    assert_eq!(t.next_work(now + A_MOMENT), delete(TCP8080));
}

#[test]
fn a_new_gateway_forgets_what_another_said_was_held() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_conflict(PortKey::new(Protocol::Tcp, 8080), None, Learned::Refused { at: now }, GATEWAY, None);
    t.gateway_reset(GATEWAY, now);
    assert_eq!(t.mapping(&TCP8080).unwrap().state, MappingState::Conflict, "the same gateway: still held");
    t.gateway_reset(Ipv4Addr::new(10, 0, 0, 1), now);
    assert_eq!(t.held().count(), 0);
    assert_eq!(t.next_work(now), add(TCP8080));
}

#[test]
fn lost_events_pause_new_mappings_until_resumed() {
    let now = Instant::now();
    let mut t = table();
    t.pause_adds(7);
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    assert_eq!(t.next_work(now), None);
    assert_eq!(t.next_due(), None);
    t.resume_adds();
    assert_eq!(t.next_work(now), add(TCP8080));
    let outcomes = t.take_outcomes();
    assert_eq!(outcomes.first(), Some(&Outcome::EventsLost { total: 7 }));
    assert_eq!(outcomes.last(), Some(&Outcome::StormOver));
}

#[test]
fn an_adopted_socket_reported_again_by_the_hook_keeps_one_record_with_its_owner() {
    let now = Instant::now();
    let mut t = table();
    let mut unknown = sock(1, Protocol::Tcp, 8080);
    unknown.owner = Owner::default();
    t.socket_bound(unknown, Stack::Ipv4, Found::Adopted, forwarded(), now);
    t.socket_bound(sock(1, Protocol::Tcp, 8080), Stack::Ipv4, Found::Bind, forwarded(), now);
    assert_eq!(t.sockets().count(), 1);
    assert_eq!(t.socket(1).unwrap().listener.owner.pid, 4242);
}

#[test]
fn a_port_bound_a_little_after_the_one_closed_before_it_is_still_added_first() {
    // The program was preempted between its close() and its bind(): 3 ms on the kernel's clock.
    let now = Instant::now();
    let mut t = table();
    let key = |port| MappingKey::ipv4(Protocol::Tcp, port);
    bind(&mut t, 1, Protocol::Tcp, 9000, now);
    t.record_mapped(key(9000), grant(Duration::from_secs(100)), now);
    release(&mut t, 1, now);
    let bound = now + Duration::from_millis(3);
    bind(&mut t, 2, Protocol::Tcp, 9001, bound);
    assert_eq!(t.next_work(bound), add(key(9001)));
    t.record_mapped(key(9001), grant(Duration::from_secs(100)), bound);
    assert_eq!(t.next_work(bound), delete(key(9000)));
    t.record_deleted(key(9000), Removal::Released, bound);
    // One bound past the window waits behind the delete.
    release(&mut t, 2, bound);
    let late = bound + ADD_FIRST_WINDOW + Duration::from_millis(1);
    bind(&mut t, 3, Protocol::Tcp, 9002, late);
    assert_eq!(t.next_work(late), delete(key(9001)));
}

#[test]
fn a_program_that_never_stops_moving_still_has_its_old_ports_deleted() {
    // Each port is closed and the next bound while the previous add is still in flight, step after
    // step: there is always an add due, and yet no delete may wait for ever.
    let mut now = Instant::now();
    let mut t = table();
    let key = |port| MappingKey::ipv4(Protocol::Tcp, port);
    bind(&mut t, 0, Protocol::Tcp, 9000, now);
    let mut gateway_calls = Vec::new();
    for step in 1..=50u16 {
        let work = t.next_work(now).expect("work is due");
        now += Duration::from_millis(10); // the gateway call
        release(&mut t, u64::from(step - 1), now);
        bind(&mut t, u64::from(step), Protocol::Tcp, 9000 + step, now);
        now += A_MOMENT * 2;
        match work {
            Work::Add { key, .. } => t.record_mapped(key, grant(Duration::from_secs(3600)), now),
            Work::Delete { key } => t.record_deleted(key, Removal::Released, now),
            other => panic!("unexpected {other:?}"),
        }
        gateway_calls.push(work);
    }
    let deletes = gateway_calls.iter().filter(|w| matches!(w, Work::Delete { .. })).count();
    assert!(deletes >= 20, "only {deletes} of 50 calls were deletes: they starve behind the adds");
    let on_gateway = t.on_gateway_keys().len();
    assert!(on_gateway <= 4, "{on_gateway} mappings on the gateway for one socket: deletes fall behind");
    assert!(t.mapping(&key(9000)).is_none(), "the first port's mapping was deleted");
}

fn forwarded() -> crate::policy::Decision {
    crate::policy::Decision::new(true, "allow everything (test)")
}

fn not_forwarded_rules(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::NotForwarded { listener, rule } => {
                Some(format!("{}/{}: {rule}", listener.protocol, listener.port))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_socket_the_policy_does_not_forward_is_kept_with_its_rule_and_never_becomes_a_conflict() {
    let now = Instant::now();
    let mut t = table();
    t.record_conflict(PortKey::new(Protocol::Tcp, 8080), Some(OTHER), Learned::Listed, GATEWAY, None);
    let _ = t.take_outcomes();
    let denied = crate::policy::Decision::new(false, "deny everything (default: system services)");
    t.socket_bound(sock(1, Protocol::Tcp, 8080), Stack::Ipv4, Found::Bind, denied.clone(), now);
    let outcomes = t.take_outcomes();
    assert_eq!(not_forwarded_rules(&outcomes), ["tcp/8080: deny everything (default: system services)"]);
    assert!(!outcomes.iter().any(|o| matches!(o, Outcome::Conflict { .. })), "{outcomes:?}");
    assert!(t.mapping(&TCP8080).is_none());
    assert_eq!(t.next_work(now), None);
    assert_eq!(t.socket(1).unwrap().decision, denied);
}

#[test]
fn a_user_at_the_limit_waits_and_is_mapped_when_one_of_theirs_goes() {
    let now = Instant::now();
    let mut t = Table::new(TableConfig { max_mappings_per_user: 2, ..TableConfig::default() });
    let key = |port| MappingKey::ipv4(Protocol::Tcp, port);
    bind(&mut t, 1, Protocol::Tcp, 7000, now);
    bind(&mut t, 2, Protocol::Tcp, 7001, now);
    assert_eq!(t.take_uids_at_limit_changes(), Some(BTreeSet::from([1000])));
    let _ = t.take_outcomes();
    bind(&mut t, 3, Protocol::Tcp, 7002, now);
    let rules = not_forwarded_rules(&t.take_outcomes());
    assert!(
        rules.len() == 1 && rules[0].contains("max-mappings-per-user") && rules[0].contains("uid 1000"),
        "{rules:?}"
    );
    assert!(t.mapping(&key(7002)).is_none() && t.socket(3).unwrap().over_limit);
    // A second socket on a port the user already has costs nothing.
    bind(&mut t, 4, Protocol::Tcp, 7001, now);
    assert_eq!(t.mapping(&key(7001)).unwrap().sockets.len(), 2);
    // Another user is not affected.
    let mut other = sock(5, Protocol::Tcp, 7003);
    other.owner.uid = 1001;
    t.socket_bound(other, Stack::Ipv4, Found::Bind, forwarded(), now);
    assert!(t.mapping(&key(7003)).is_some());
    release(&mut t, 1, now);
    assert!(t.mapping(&key(7002)).is_some_and(|m| matches!(m.state, MappingState::Pending { .. })));
    assert!(!t.socket(3).unwrap().over_limit);
    assert_eq!(t.take_uids_at_limit_changes(), None, "still at the limit: 7001 and 7002");
    release(&mut t, 2, now);
    assert_eq!(t.mapping(&key(7001)).unwrap().sockets.len(), 1, "socket 4 still wants 7001");
    release(&mut t, 4, now);
    assert_eq!(t.take_uids_at_limit_changes(), Some(BTreeSet::new()));
}

#[test]
fn a_reload_removes_what_the_policy_no_longer_allows_and_maps_what_it_now_allows() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_mapped(TCP8080, grant(Duration::from_secs(3600)), now);
    bind(&mut t, 2, Protocol::Tcp, 9000, now);
    t.record_mapped(MappingKey::ipv4(Protocol::Tcp, 9000), grant(Duration::from_secs(3600)), now);
    let _ = t.take_outcomes();
    let deny_8080 = |l: &Listener| {
        if l.port == 8080 {
            crate::policy::Decision::new(false, "deny tcp/8080 (t.toml line 3)")
        } else {
            forwarded()
        }
    };
    t.apply_policy(deny_8080, 0, now);
    assert_eq!(not_forwarded_rules(&t.take_outcomes()), ["tcp/8080: deny tcp/8080 (t.toml line 3)"]);
    assert_eq!(t.next_work(now + A_MOMENT), delete(TCP8080), "the mapping comes off the gateway");
    assert!(t.socket(1).is_some(), "the socket stays, bound locally");
    // The same policy again changes nothing.
    t.apply_policy(deny_8080, 0, now);
    assert!(t.take_outcomes().is_empty());
    // Allowed again (before the delete went out): it stays on the gateway as it was.
    t.apply_policy(|_| forwarded(), 0, now);
    assert!(matches!(t.mapping(&TCP8080).unwrap().state, MappingState::Active { .. }));
    assert_eq!(t.next_work(now + A_MOMENT), None, "nothing to do: both are on the gateway and wanted");
    // Denied, deleted, then allowed: made again.
    t.apply_policy(deny_8080, 0, now);
    let _ = t.take_outcomes();
    t.record_deleted(TCP8080, Removal::Released, now + A_MOMENT);
    let removed = t.take_outcomes();
    assert!(
        removed.contains(&Outcome::Removed { key: PortKey::new(Protocol::Tcp, 8080), why: Removal::Policy }),
        "{removed:?}"
    );
    assert!(t.mapping(&TCP8080).is_none());
    t.apply_policy(|_| forwarded(), 0, now + A_MOMENT);
    assert_eq!(t.next_work(now + A_MOMENT), add(TCP8080));
}

#[test]
fn a_static_mapping_is_wanted_until_deleted_and_is_no_socket_of_the_kernels() {
    let now = Instant::now();
    let mut t = table();
    let key = PortKey::new(Protocol::Tcp, 25565);
    t.add_static(key, "minecraft", 1000, now).unwrap();
    assert_eq!(t.next_work(now), Some(Work::Add { key: MappingKey::Ipv4(key), comm: "minecraft".into() }));
    assert!(t.socket_cookies().is_empty(), "resync must not see it as a socket that went away");
    assert_eq!(t.statics(), vec![(key, "minecraft".to_string(), 1000)]);
    t.record_mapped(MappingKey::Ipv4(key), grant(Duration::from_secs(3600)), now);
    // Adding it again changes the description, renewed at once so that the gateway shows it.
    t.add_static(key, "minecraft server", 1000, now).unwrap();
    assert_eq!(t.next_work(now), Some(Work::Renew { key: MappingKey::Ipv4(key), comm: "minecraft server".into() }));
    assert_eq!(
        t.add_static(PortKey::new(Protocol::Tcp, 80), "web", 0, now),
        Err(StaticError::BelowMinPort(PortKey::new(Protocol::Tcp, 80), 1024))
    );
    assert_eq!(
        t.delete_static(PortKey::new(Protocol::Udp, 25565), now),
        Err(StaticError::NoSuchStatic(PortKey::new(Protocol::Udp, 25565)))
    );
    t.delete_static(key, now).unwrap();
    assert_eq!(t.next_work(now + A_MOMENT), delete(MappingKey::Ipv4(key)));
    assert!(t.statics().is_empty());
}

#[test]
fn a_disabled_port_comes_off_the_gateway_keeps_its_sockets_and_comes_back_on_enable() {
    let now = Instant::now();
    let mut t = table();
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    t.record_mapped(TCP8080, grant(Duration::from_secs(3600)), now);
    let _ = t.take_outcomes();
    let key = PortKey::new(Protocol::Tcp, 8080);
    t.disable(key, now);
    let rules = not_forwarded_rules(&t.take_outcomes());
    assert!(rules.len() == 1 && rules[0].contains("natbinder enable"), "{rules:?}");
    assert_eq!(t.next_work(now + A_MOMENT), delete(TCP8080));
    t.record_deleted(TCP8080, Removal::Released, now + A_MOMENT);
    assert!(t.take_outcomes().contains(&Outcome::Removed { key, why: Removal::Disabled }));
    // A new socket on the port while disabled wants nothing either.
    bind(&mut t, 2, Protocol::Tcp, 8080, now + A_MOMENT);
    assert!(t.mapping(&TCP8080).is_none() && t.socket(2).is_some());
    t.enable(key, now + A_MOMENT);
    assert_eq!(t.next_work(now + A_MOMENT), add(TCP8080));
    assert_eq!(t.mapping(&TCP8080).unwrap().sockets.len(), 2, "both sockets want it again");
}

// ---- reservations (natbinder run --wait) ------------------------------------------------------

#[test]
fn a_reservation_is_mapped_before_its_socket_exists_and_the_socket_takes_the_mapping_over() {
    let now = Instant::now();
    let mut t = table();
    let reserved = t.reserve(sock(0, Protocol::Tcp, 8080), Stack::Ipv4, forwarded(), now);
    let Reserved::Asked { cookie, key } = reserved else { panic!("{reserved:?}") };
    assert!(is_reservation(cookie) && !is_static(cookie));
    assert_eq!(key, TCP8080);
    assert_eq!(t.next_work(now), add(TCP8080), "the gateway is asked before the bind");
    t.record_mapped(TCP8080, grant(Duration::from_secs(3600)), now);
    // The program's socket, from the same process: it joins, and the reservation goes.
    bind(&mut t, 1, Protocol::Tcp, 8080, now);
    assert!(t.socket(cookie).is_none(), "claimed");
    assert_eq!(t.mapping(&TCP8080).unwrap().sockets, BTreeSet::from([1]));
    let outcomes = t.take_outcomes();
    assert!(outcomes.iter().any(|o| matches!(o, Outcome::SocketReleased { seen: Seen::Claimed, .. })));
    // Ending the reservation later changes nothing: no delete, no second add.
    t.end_reservation(cookie, now + A_MOMENT);
    assert_eq!(t.next_work(now + A_MOMENT * 10), None);
    assert!(t.socket_cookies().contains(&1) && !t.socket_cookies().contains(&cookie), "resync never sees it");
}

#[test]
fn a_reservation_no_socket_claims_lapses_and_takes_its_mapping_off_the_gateway() {
    let now = Instant::now();
    let mut t = table();
    let Reserved::Asked { cookie, .. } = t.reserve(sock(0, Protocol::Tcp, 8080), Stack::Ipv4, forwarded(), now) else {
        panic!()
    };
    t.record_mapped(TCP8080, grant(Duration::from_secs(3600)), now);
    // Another process's socket does not claim it.
    let mut other = sock(2, Protocol::Tcp, 8081);
    other.owner.pid = 7;
    t.socket_bound(other, Stack::Ipv4, Found::Bind, forwarded(), now);
    t.record_mapped(MappingKey::ipv4(Protocol::Tcp, 8081), grant(Duration::from_secs(3600)), now);
    assert!(t.socket(cookie).is_some());
    t.end_reservation(cookie, now);
    let outcomes = t.take_outcomes();
    assert!(outcomes.iter().any(|o| matches!(o, Outcome::SocketReleased { seen: Seen::Lapsed, .. })));
    assert_eq!(t.next_work(now + A_MOMENT), delete(TCP8080), "the gateway holds nothing no socket needs");
}

#[test]
fn a_reservation_says_at_once_what_is_known_taken_mapped_or_not_forwarded() {
    let now = Instant::now();
    let mut t = table();
    t.record_conflict(PortKey::new(Protocol::Tcp, 8080), Some(OTHER), Learned::Listed, GATEWAY, None);
    let r = t.reserve(sock(0, Protocol::Tcp, 8080), Stack::Ipv4, forwarded(), now);
    assert!(matches!(r, Reserved::Taken { key: TCP8080, .. }), "{r:?}");
    // A port this host already maps for another socket (SO_REUSEPORT, another process).
    bind(&mut t, 1, Protocol::Tcp, 9000, now);
    let key9000 = MappingKey::ipv4(Protocol::Tcp, 9000);
    t.record_mapped(key9000, grant(Duration::from_secs(3600)), now);
    assert!(matches!(t.reserve(sock(0, Protocol::Tcp, 9000), Stack::Ipv4, forwarded(), now), Reserved::Mapped { .. }));
    let denied = crate::policy::Decision::new(false, "deny tcp/5432 (deny list: PostgreSQL)");
    let r = t.reserve(sock(0, Protocol::Tcp, 5432), Stack::Ipv4, denied, now);
    assert!(matches!(&r, Reserved::NotForwarded { rule } if rule.contains("PostgreSQL")), "{r:?}");
    let r = t.reserve(sock(0, Protocol::Tcp, 9001), Stack::Ipv6Only, forwarded(), now);
    assert!(matches!(r, Reserved::NotForwarded { .. }), "IPv6-only needs no IPv4 mapping: {r:?}");
    t.disable(PortKey::new(Protocol::Tcp, 9002), now);
    let r = t.reserve(sock(0, Protocol::Tcp, 9002), Stack::Ipv4, forwarded(), now);
    assert!(matches!(&r, Reserved::NotForwarded { rule } if rule.contains("disable")), "{r:?}");
}

#[test]
fn a_reservation_counts_against_its_users_limit() {
    let now = Instant::now();
    let mut t = Table::new(TableConfig { max_mappings_per_user: 1, ..TableConfig::default() });
    bind(&mut t, 1, Protocol::Tcp, 9000, now);
    let r = t.reserve(sock(0, Protocol::Tcp, 8080), Stack::Ipv4, forwarded(), now);
    assert!(matches!(&r, Reserved::NotForwarded { rule } if rule.contains("max-mappings-per-user")), "{r:?}");
    assert!(t.mapping(&TCP8080).is_none());
    assert_eq!(t.sockets().filter(|s| is_reservation(s.listener.cookie)).count(), 0, "nothing left behind");
}

// ---- IPv6 pinholes ---------------------------------------------------------------------------------

const A1: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10);
const A2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0xabcd, 0x1);

fn pinhole(port: u16, address: Ipv6Addr) -> MappingKey {
    MappingKey::Ipv6Pinhole(PinholeKey { protocol: Protocol::Tcp, port, address })
}

fn bind_stack(t: &mut Table, cookie: u64, port: u16, stack: Stack, now: Instant) {
    let mut listener = sock(cookie, Protocol::Tcp, port);
    listener.family = Family::Ipv6;
    t.socket_bound(listener, stack, Found::Bind, forwarded(), now);
}

fn wanted(t: &Table, cookie: u64) -> Vec<MappingKey> {
    t.socket(cookie).unwrap().mappings.clone()
}

fn pinhole_table(now: Instant) -> Table {
    let mut t = table();
    t.set_ipv6_addresses(BTreeSet::from([A1, A2]), BTreeSet::new(), now);
    t.set_pinhole_service(PinholeService::Needed, now);
    t
}

#[test]
fn each_stack_wants_what_it_takes_a_pinhole_per_address() {
    let now = Instant::now();
    let mut t = pinhole_table(now);
    bind(&mut t, 1, Protocol::Tcp, 8001, now);
    bind_stack(&mut t, 2, 8002, Stack::DualStack, now);
    bind_stack(&mut t, 3, 8003, Stack::Ipv6Only, now);
    assert_eq!(wanted(&t, 1), vec![MappingKey::ipv4(Protocol::Tcp, 8001)], "0.0.0.0: the IPv4 mapping only");
    assert_eq!(
        wanted(&t, 2),
        vec![MappingKey::ipv4(Protocol::Tcp, 8002), pinhole(8002, A1), pinhole(8002, A2)],
        "dual-stack: the mapping and a pinhole per address"
    );
    assert_eq!(wanted(&t, 3), vec![pinhole(8003, A1), pinhole(8003, A2)], "v6only: pinholes only");
    // An unclassified [::] socket waits; once read, it wants what its stack takes.
    bind_stack(&mut t, 4, 8004, Stack::Unknown, now);
    assert!(wanted(&t, 4).is_empty());
    t.socket_classified(4, Stack::Ipv6Only, now);
    assert_eq!(wanted(&t, 4), vec![pinhole(8004, A1), pinhole(8004, A2)]);
}

#[test]
fn pinholes_open_renew_and_close_with_the_socket_by_the_gateways_id() {
    let now = Instant::now();
    let mut t = pinhole_table(now);
    t.set_ipv6_addresses(BTreeSet::from([A1]), BTreeSet::new(), now);
    bind_stack(&mut t, 1, 8080, Stack::Ipv6Only, now);
    let key = pinhole(8080, A1);
    assert_eq!(t.next_work(now), add(key));
    t.take_outcomes();
    let opened = Grant { handle: Some(GatewayHandle::PinholeId(7)), ..grant(Duration::from_secs(100)) };
    t.record_mapped(key, opened, now);
    assert!(matches!(t.take_outcomes()[..], [Outcome::PinholeOpened { renewal: false, .. }]));
    assert_eq!(t.mapping(&key).unwrap().handle, Some(GatewayHandle::PinholeId(7)));
    assert_eq!(t.next_work(now + Duration::from_secs(50)), renew(key), "renewed at half the lease");
    // A renewal that finds it gone opens it again; the old id names nothing any more.
    t.record_pinholes_dropped(&[PinholeKey { protocol: Protocol::Tcp, port: 8080, address: A1 }], now);
    assert!(t.take_outcomes().iter().any(|o| matches!(o, Outcome::PinholesDropped { .. })));
    assert_eq!(t.mapping(&key).unwrap().handle, None);
    assert_eq!(t.next_work(now), add(key));
    t.record_mapped(key, Grant { handle: Some(GatewayHandle::PinholeId(9)), ..opened }, now);
    release(&mut t, 1, now);
    assert_eq!(t.next_work(now + A_MOMENT), delete(key));
    assert_eq!(t.mapping(&key).unwrap().handle, Some(GatewayHandle::PinholeId(9)), "closed by its id");
    t.record_deleted(key, Removal::Released, now + A_MOMENT);
    assert!(t.take_outcomes().iter().any(|o| matches!(o, Outcome::PinholeClosed { why: Removal::Released, .. })));
    assert!(t.mapping(&key).is_none());
}

#[test]
fn an_address_change_moves_the_pinholes_and_deprecated_ones_are_left_alone() {
    let now = Instant::now();
    let mut t = pinhole_table(now);
    t.set_ipv6_addresses(BTreeSet::from([A1]), BTreeSet::new(), now);
    bind_stack(&mut t, 1, 8080, Stack::DualStack, now);
    for key in [MappingKey::ipv4(Protocol::Tcp, 8080), pinhole(8080, A1)] {
        t.record_mapped(key, grant(Duration::from_secs(3600)), now);
    }
    t.take_outcomes();
    // A new privacy address comes and the old one is deprecated: the new one gets a pinhole, the old
    // one keeps its own (peers may still know it), and a listener bound now gets none for it.
    t.set_ipv6_addresses(BTreeSet::from([A2]), BTreeSet::from([A1]), now);
    let outcomes = t.take_outcomes();
    assert!(
        matches!(&outcomes[0], Outcome::Ipv6AddressesChanged { added, deprecated, removed }
            if *added == [A2] && *deprecated == [A1] && removed.is_empty()),
        "{outcomes:?}"
    );
    assert_eq!(wanted(&t, 1), vec![MappingKey::ipv4(Protocol::Tcp, 8080), pinhole(8080, A1), pinhole(8080, A2)]);
    assert_eq!(t.next_work(now), add(pinhole(8080, A2)));
    t.record_mapped(pinhole(8080, A2), grant(Duration::from_secs(3600)), now);
    assert_eq!(t.next_work(now + A_MOMENT), None, "the deprecated address's pinhole stays");
    bind_stack(&mut t, 2, 8090, Stack::Ipv6Only, now);
    assert_eq!(wanted(&t, 2), vec![pinhole(8090, A2)], "no new pinhole for a deprecated address");
    t.record_mapped(pinhole(8090, A2), grant(Duration::from_secs(3600)), now);

    // Its valid lifetime nearly over (or the address gone): its pinholes close.
    t.take_outcomes();
    t.set_ipv6_addresses(BTreeSet::from([A2]), BTreeSet::new(), now);
    let outcomes = t.take_outcomes();
    assert!(matches!(&outcomes[0], Outcome::Ipv6AddressesChanged { removed, .. } if *removed == [A1]));
    assert_eq!(wanted(&t, 1), vec![MappingKey::ipv4(Protocol::Tcp, 8080), pinhole(8080, A2)]);
    assert_eq!(t.next_work(now + A_MOMENT), delete(pinhole(8080, A1)));
    t.record_deleted(pinhole(8080, A1), Removal::Released, now + A_MOMENT);
    assert!(t
        .take_outcomes()
        .iter()
        .any(|o| matches!(o, Outcome::PinholeClosed { why: Removal::AddressGone, key } if key.address == A1)));
    assert!(matches!(t.mapping(&MappingKey::ipv4(Protocol::Tcp, 8080)).unwrap().state, MappingState::Active { .. }));

    // A firewall that opens drops the pinholes of deprecated addresses too.
    t.set_ipv6_addresses(BTreeSet::new(), BTreeSet::from([A2]), now);
    t.set_pinhole_service(PinholeService::FirewallOpen, now);
    assert_eq!(wanted(&t, 1), vec![MappingKey::ipv4(Protocol::Tcp, 8080)]);
}

#[test]
fn a_gateway_whose_firewall_is_open_needs_no_pinholes() {
    let now = Instant::now();
    let mut t = pinhole_table(now);
    bind_stack(&mut t, 1, 8080, Stack::DualStack, now);
    t.record_mapped(pinhole(8080, A1), grant(Duration::from_secs(3600)), now);
    t.set_pinhole_service(PinholeService::FirewallOpen, now);
    assert_eq!(wanted(&t, 1), vec![MappingKey::ipv4(Protocol::Tcp, 8080)], "the mapping stays");
    assert!(t.mapping(&pinhole(8080, A2)).is_none(), "never opened: simply forgotten");
    assert_eq!(t.next_work(now + A_MOMENT), add(MappingKey::ipv4(Protocol::Tcp, 8080)));
    assert!(t.mapping(&pinhole(8080, A1)).unwrap().sockets.is_empty(), "the opened one is closed");
    // Unknown (no gateway checked) wants nothing either; Needed again wants them back.
    t.set_pinhole_service(PinholeService::Needed, now);
    assert_eq!(wanted(&t, 1).len(), 3);
}

#[test]
fn a_ports_mapping_and_pinholes_count_once_against_the_users_limit() {
    let now = Instant::now();
    let mut t = Table::new(TableConfig { max_mappings_per_user: 2, ..TableConfig::default() });
    t.set_ipv6_addresses(BTreeSet::from([A1, A2]), BTreeSet::new(), now);
    t.set_pinhole_service(PinholeService::Needed, now);
    bind_stack(&mut t, 1, 8001, Stack::DualStack, now);
    bind_stack(&mut t, 2, 8002, Stack::Ipv6Only, now);
    assert_eq!(wanted(&t, 1).len(), 3);
    assert_eq!(wanted(&t, 2).len(), 2);
    assert!(t.uids_at_limit().contains(&1000));
    bind_stack(&mut t, 3, 8003, Stack::DualStack, now);
    assert!(wanted(&t, 3).is_empty() && t.socket(3).unwrap().over_limit, "a third port waits");
    release(&mut t, 2, now);
    assert_eq!(wanted(&t, 3).len(), 3, "admitted whole when a port frees up");
}

#[test]
fn a_gateway_reset_opens_pinholes_again_without_their_old_ids() {
    let now = Instant::now();
    let mut t = pinhole_table(now);
    bind_stack(&mut t, 1, 8080, Stack::Ipv6Only, now);
    let key = pinhole(8080, A1);
    t.record_mapped(key, Grant { handle: Some(GatewayHandle::PinholeId(3)), ..grant(Duration::from_secs(3600)) }, now);
    t.gateway_reset(GATEWAY, now);
    assert_eq!(t.mapping(&key).unwrap().handle, None);
    assert!(matches!(
        t.mapping(&key).unwrap().state,
        MappingState::Pending { reason: PendingReason::GatewayChanged, .. }
    ));
    assert!(t.adopt_pinhole(PinholeKey { protocol: Protocol::Tcp, port: 8080, address: A1 }, Some(11), now));
    assert_eq!(t.mapping(&key).unwrap().handle, Some(GatewayHandle::PinholeId(11)), "the journal's id adopted");
    assert!(!t.adopt_pinhole(PinholeKey { protocol: Protocol::Udp, port: 1, address: A1 }, Some(1), now));
}
