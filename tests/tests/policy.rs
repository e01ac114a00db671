//! The exposure policy as a user sees it, against the real miniupnpd, with natbinder in the test
//! process and real eBPF programs:
//! * the desktop default (no --cgroup): a program in a user's session is forwarded; a system service
//!   is not, and a port another host holds does not make its bind fail; a port on the deny list is
//!   not forwarded, even for a user;
//! * a reload (SIGHUP) removes what the new policy denies, keeps the rest where it is, and refuses a
//!   bad file with its line, keeping the running policy;
//! * the limit per user: the binds over it work locally, are not refused for held ports, and are
//!   mapped when one of the user's mappings goes.
use std::time::Duration;

use natbinder::{outcome::Removal, policy::Scope};
use natbinder_lab::{cgroup2_root, Cgroup};
use natbinder_tests::{inprocess::log_text, *};

const LIMIT: Duration = Duration::from_secs(15);
/// An ordinary user's uid: nobody's (65534 >= 1000).
const NOBODY: u32 = 65534;

/// A user's session scope and a system service, where systemd would put them. The slices are made
/// only if this machine has none (and then removed); the scope and the service always are.
struct Desktop {
    session: Cgroup,
    service: Cgroup,
    // Dropped last: fields drop in order, and a slice with children cannot be removed.
    _slices: Vec<Cgroup>,
}

impl Desktop {
    fn new() -> Self {
        let root = cgroup2_root().unwrap();
        let mut slices = Vec::new();
        for slice in ["user.slice", "system.slice"] {
            if !root.join(slice).exists() {
                slices.push(Cgroup::create(slice).unwrap());
            }
        }
        let id = std::process::id();
        let session = Cgroup::create(&format!("user.slice/natbinder-lab-{id}.scope")).unwrap();
        let service = Cgroup::create(&format!("system.slice/natbinder-lab-{id}.service")).unwrap();
        Desktop { session, service, _slices: slices }
    }
}

fn not_forwarded(h: &mut Harness, port: u16) -> String {
    h.natbinder()
        .wait_for(LIMIT, |o| match o {
            Outcome::NotForwarded { listener, rule } if listener.port == port => Some(rule.to_string()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("no NotForwarded for {port}: {e:#}\n{}", log_text()))
}

#[test]
fn the_desktop_default_forwards_a_users_program_and_keeps_system_services_and_denied_ports_local() {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    let desktop = Desktop::new();
    // Another LAN host holds tcp/7020 on the gateway.
    h.lab.lan2_maps("TCP", 7020).unwrap();
    h.start_daemon_in_process_machine_wide(&[]).unwrap();
    let scope = h.natbinder().seen(|o| match o {
        Outcome::PolicyApplied { scope, .. } => Some(scope.clone()),
        _ => None,
    });
    assert_eq!(scope, [Scope::Sessions { user_slice: true }]);

    // A user's program is forwarded.
    let (_web, _o) = h.app_as(&desktop.session, NOBODY, "web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    assert_eq!(h.reachable_tcp(8080, LIMIT).as_deref(), Some("web:ping"));

    // A system service (root, in system.slice) is not, and the rule says why.
    let (_svc, _o) = h.app_as(&desktop.service, 0, "svc", &["tcp-echo", "0.0.0.0:9000"]).unwrap();
    let rule = not_forwarded(&mut h, 9000);
    assert!(rule.contains("system services"), "{rule}");
    // Nor is root's, even in a user's session (sudo).
    let (_root, _o) = h.app_as(&desktop.session, 0, "root", &["tcp-echo", "0.0.0.0:9001"]).unwrap();
    let rule = not_forwarded(&mut h, 9001);
    assert!(rule.contains("root"), "{rule}");
    // Nor is a user's `python3 -m http.server` on its default port: the deny list.
    let (_files, _o) = h.app_as(&desktop.session, NOBODY, "files", &["tcp-echo", "0.0.0.0:8000"]).unwrap();
    let rule = not_forwarded(&mut h, 8000);
    assert!(rule.contains("deny list") && rule.contains("http.server"), "{rule}");
    // Neither reaches the gateway nor the WAN; the socket works on the LAN side.
    std::thread::sleep(Duration::from_millis(300));
    assert!(h.mapping("TCP", 9000).is_none() && h.mapping("TCP", 8000).is_none(), "{:?}", h.lab.gateway_mappings());
    assert_eq!(tcp_from_wan(&h.lab, 9000, "ping"), Reach::Refused);
    assert_eq!(tcp_from_wan(&h.lab, 8000, "ping"), Reach::Refused);

    // The port another host holds: a user's program is refused with EADDRINUSE (its port search moves
    // on), a system service's bind succeeds, because natbinder would not forward it anyway.
    let err = h.app_as(&desktop.session, NOBODY, "user", &["tcp-echo", "0.0.0.0:7020"]).err().map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.contains("Address already in use")), "{err:?}\n{}", log_text());
    let refused = h
        .natbinder()
        .wait_for(LIMIT, |o| matches!(o, Outcome::BindRefused { listener, .. } if listener.port == 7020).then_some(()));
    assert!(refused.is_ok(), "natbinder's hook refused it: {refused:?}");
    let (_svc2, _o) = h
        .app_as(&desktop.service, 0, "svc2", &["tcp-echo", "0.0.0.0:7020"])
        .unwrap_or_else(|e| panic!("a service natbinder does not forward lost the port to another host: {e:#}"));
    let rule = not_forwarded(&mut h, 7020);
    assert!(rule.contains("system services"), "{rule}");
    assert!(h.mapping("TCP", 7020).is_some_and(|m| m.internal_client == LAN2_IP), "the other host's mapping stays");
}

#[test]
fn a_reload_removes_what_the_new_policy_denies_keeps_the_rest_and_refuses_a_bad_file() {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    let file = h.lab.dir.join("natbinder.toml");
    std::fs::write(&file, "").unwrap();
    h.start_daemon_in_process(&["--config", file.to_str().unwrap()]).unwrap();
    let (_a, _o) = h.app("a", &["tcp-echo", "0.0.0.0:9000"]).unwrap();
    let (_b, _o2) = h.app("b", &["tcp-echo", "0.0.0.0:9001"]).unwrap();
    assert!(h.reachable_tcp(9000, LIMIT).is_some() && h.reachable_tcp(9001, LIMIT).is_some());
    h.natbinder().drain();
    let before_reload = h.natbinder().history.len();
    let hangup = || {
        // SAFETY: plain kill(2) on this process; the in-process daemon handles SIGHUP.
        unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    };

    std::fs::write(&file, "# no 9001 here\n[[rule]]\naction = \"deny\"\nports = 9001\n").unwrap();
    hangup();
    let removed = h.natbinder().wait_for(LIMIT, |o| {
        matches!(o, Outcome::Removed { key, why: Removal::Policy } if key.port == 9001).then_some(())
    });
    assert!(removed.is_ok(), "{}", log_text());
    assert_eq!(tcp_from_wan(&h.lab, 9001, "ping"), Reach::Refused);
    assert_eq!(h.reachable_tcp(9000, LIMIT).as_deref(), Some("a:ping"));
    let rule = h.natbinder().seen(|o| match o {
        Outcome::NotForwarded { listener, rule } if listener.port == 9001 => Some(rule.to_string()),
        _ => None,
    });
    assert!(rule.iter().any(|r| r.contains("line 2")), "the rule names its line: {rule:?}");
    h.natbinder().drain();
    let moved: Vec<&Outcome> = h.natbinder().history[before_reload..]
        .iter()
        .map(|e| &e.outcome)
        .filter(|o| match o {
            Outcome::Removed { key, .. } | Outcome::Mapped { key, renewal: false, .. } => key.port == 9000,
            _ => false,
        })
        .collect();
    assert!(moved.is_empty(), "the reload moved a mapping the new policy still allows: {moved:?}");

    std::fs::write(&file, "[[rule]]\naction = \"deny\"\nports = \"9001-9000\"\n").unwrap();
    hangup();
    let refusal = h
        .natbinder()
        .wait_for(LIMIT, |o| match o {
            Outcome::ReloadRefused { error } => Some(error.clone()),
            _ => None,
        })
        .unwrap();
    assert!(refusal.contains("natbinder.toml line 1") && refusal.contains("empty range"), "{refusal}");
    assert!(h.mapping("TCP", 9000).is_some() && h.mapping("TCP", 9001).is_none(), "the running policy stays");

    std::fs::write(&file, "").unwrap();
    hangup();
    assert_eq!(h.reachable_tcp(9001, LIMIT).as_deref(), Some("b:ping"), "allowed again, mapped again");

    // Other settings: the lease applies to the next mapping; min-port only after a restart, and
    // `natbinder reload` says so.
    std::fs::write(&file, "lease-seconds = 120\nmin-port = 2000\n").unwrap();
    let (code, out, err) = h.cli(&["reload"]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("apply only after a restart: min-port"), "{out}");
    let (_c, _o3) = h.app("c", &["tcp-echo", "0.0.0.0:9002"]).unwrap();
    let lease = h
        .natbinder()
        .wait_for(LIMIT, |o| match o {
            Outcome::Mapped { key, lease, .. } if key.port == 9002 => Some(*lease),
            _ => None,
        })
        .unwrap();
    assert_eq!(lease, natbinder::outcome::Lease::For(Duration::from_secs(120)), "the reloaded lease is asked for");
}

#[test]
fn a_user_over_the_limit_binds_locally_is_never_refused_and_is_mapped_when_a_slot_frees() {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    h.lab.lan2_maps("TCP", 7020).unwrap();
    h.start_daemon_in_process(&["--max-mappings-per-user", "2"]).unwrap();
    let (first, _o1) = h.app("first", &["tcp-echo", "0.0.0.0:9100"]).unwrap();
    let (_second, _o2) = h.app("second", &["tcp-echo", "0.0.0.0:9101"]).unwrap();
    assert!(h.reachable_tcp(9100, LIMIT).is_some() && h.reachable_tcp(9101, LIMIT).is_some());
    let (_third, _o3) = h.app("third", &["tcp-echo", "0.0.0.0:9102"]).unwrap();
    let rule = not_forwarded(&mut h, 9102);
    assert!(rule.contains("max-mappings-per-user") && rule.contains("uid 0"), "{rule}");
    assert_eq!(tcp_from_wan(&h.lab, 9102, "ping"), Reach::Refused);
    // At the limit, a bind of a port another host holds is not forwarded, so it is not refused.
    let (_held, _o4) = h
        .app("held", &["tcp-echo", "0.0.0.0:7020"])
        .unwrap_or_else(|e| panic!("a bind over the limit was refused for a held port: {e:#}"));
    drop(_held);
    // The first program exits: the waiting one takes its place.
    drop(first);
    assert_eq!(h.reachable_tcp(9102, LIMIT).as_deref(), Some("third:ping"));
}

#[test]
fn an_administrators_rule_denies_a_users_program_by_its_executable_and_allows_a_system_service() {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    let desktop = Desktop::new();
    h.lab.lan2_maps("TCP", 7020).unwrap();
    // Programs started by app_as run from this copy of the test app.
    let exe = h.lab.dir.join("bin").join("natbinder-testapp");
    let config = h.lab.dir.join("natbinder.toml");
    let service = desktop.service.path.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::write(
        &config,
        format!(
            "[[rule]]\naction = \"deny\"\nexe = \"{}\"\nports = \"7000-7999\"\n\n\
             [[rule]]\naction = \"allow\"\ncgroup = \"system.slice/{service}\"\nports = 9000\n",
            exe.display()
        ),
    )
    .unwrap();
    h.start_daemon_in_process_machine_wide(&["--config", config.to_str().unwrap()]).unwrap();

    // The user's program on 7500 is denied by its executable; the rule names its line.
    let (_denied, _o) = h.app_as(&desktop.session, NOBODY, "denied", &["tcp-echo", "0.0.0.0:7500"]).unwrap();
    let rule = not_forwarded(&mut h, 7500);
    assert!(rule.contains("exe") && rule.contains("natbinder.toml line 1"), "{rule}");
    // The kernel cannot check an executable, so it refuses nothing that rule might cover: the port
    // another host holds still binds for the user's program, which is not forwarded.
    let (_held, _o) = h
        .app_as(&desktop.session, NOBODY, "held", &["tcp-echo", "0.0.0.0:7020"])
        .unwrap_or_else(|e| panic!("a program the policy may deny lost its port to another host: {e:#}"));
    // The system service the second rule allows is forwarded.
    let (_svc, _o) = h.app_as(&desktop.service, 0, "svc", &["tcp-echo", "0.0.0.0:9000"]).unwrap();
    assert_eq!(h.reachable_tcp(9000, LIMIT).as_deref(), Some("svc:ping"));
    assert!(h.mapping("TCP", 7500).is_none());
}
