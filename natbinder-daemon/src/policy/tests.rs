use std::path::Path;

use super::{kernel, spec::NumberOrText, spec::Ports, *};

fn subject<'a>(cgroup: Option<&'a str>, uid: u32, protocol: Protocol, port: u16) -> Subject<'a> {
    Subject { protocol, port, uid, gid: uid, groups: &[], cgroup, exe: None }
}

const SESSION: &str = "user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-42.scope";
const DOCKER: &str = "system.slice/docker.service";

fn desktop() -> Policy {
    Policy::new(Vec::new(), &Scope::Sessions { user_slice: true }, DEFAULT_MAX_MAPPINGS_PER_USER)
}

fn rule(text: &str) -> Rule {
    let spec: RuleSpec = toml::from_str(text).unwrap();
    spec.validate("t.toml line 1").unwrap()
}

fn rule_error(text: &str) -> String {
    let spec: RuleSpec = toml::from_str(text).unwrap();
    format!("{:#}", spec.validate("t.toml line 7").unwrap_err())
}

#[test]
fn the_desktop_default_forwards_users_sessions_and_nothing_of_the_system() {
    let p = desktop();
    let d = p.decide(&subject(Some(SESSION), 1000, Protocol::Tcp, 6881));
    assert!(d.forward && d.rule.contains("users' sessions"), "{d:?}");
    let d = p.decide(&subject(Some(DOCKER), 0, Protocol::Tcp, 8080));
    assert!(!d.forward && d.rule.contains("system services"), "{d:?}");
    // root in a user's session (sudo), and a system account's service: not forwarded either.
    assert!(!p.decide(&subject(Some(SESSION), 0, Protocol::Tcp, 6881)).forward);
    assert!(!p.decide(&subject(Some("system.slice/transmission-daemon.service"), 105, Protocol::Tcp, 51413)).forward);
    // A process whose cgroup could not be read is not forwarded.
    assert!(!p.decide(&subject(None, 1000, Protocol::Tcp, 6881)).forward);
    // "user.slice" matches the slice and below, not a sibling that merely starts with the name.
    assert!(!p.decide(&subject(Some("user.slicex/foo.scope"), 1000, Protocol::Tcp, 6881)).forward);
}

#[test]
fn the_deny_list_applies_in_sessions_and_names_its_reason() {
    let p = desktop();
    let d = p.decide(&subject(Some(SESSION), 1000, Protocol::Tcp, 8000));
    assert!(!d.forward && d.rule.contains("deny list") && d.rule.contains("http.server"), "{d:?}");
    let d = p.decide(&subject(Some(SESSION), 1000, Protocol::Tcp, 5432));
    assert!(!d.forward && d.rule.contains("PostgreSQL") && d.rule.contains("tcp/5432"), "{d:?}");
    assert!(p.decide(&subject(Some(SESSION), 1000, Protocol::Udp, 5432)).forward, "PostgreSQL is TCP only");
}

#[test]
fn without_user_slice_ordinary_users_are_forwarded_and_system_accounts_are_not() {
    let p = Policy::new(Vec::new(), &Scope::Sessions { user_slice: false }, 32);
    assert!(p.decide(&subject(Some("session-2.scope"), 1000, Protocol::Tcp, 6881)).forward);
    let d = p.decide(&subject(Some("sshd.service"), 0, Protocol::Tcp, 6881));
    assert!(!d.forward && d.rule.contains("system accounts"), "{d:?}");
}

#[test]
fn an_explicit_cgroup_forwards_everything_in_it_but_the_deny_list() {
    let p = Policy::new(Vec::new(), &Scope::Cgroup("/sys/fs/cgroup/lab".into()), 32);
    let d = p.decide(&subject(Some("lab"), 0, Protocol::Tcp, 8080));
    assert!(d.forward && d.rule.contains("/sys/fs/cgroup/lab"), "{d:?}");
    assert!(!p.decide(&subject(Some("lab"), 0, Protocol::Tcp, 6379)).forward);
}

#[test]
fn the_administrators_rules_come_first_and_can_override_the_deny_list() {
    let rules = vec![
        rule("action = \"allow\"\nports = 8000\nprotocol = \"tcp\""),
        rule("action = \"deny\"\nexe = \"/usr/bin/qbittorrent*\"\nports = 8080"),
        rule("action = \"allow\"\ncgroup = \"system.slice/transmission-daemon.service\""),
    ];
    let p = Policy::new(rules, &Scope::Sessions { user_slice: true }, 32);
    let d = p.decide(&subject(Some(SESSION), 1000, Protocol::Tcp, 8000));
    assert!(d.forward && d.rule.contains("t.toml line 1"), "{d:?}");
    let qbt = Path::new("/usr/bin/qbittorrent-nox");
    let d = p.decide(&Subject { exe: Some(qbt), ..subject(Some(SESSION), 1000, Protocol::Tcp, 8080) });
    assert!(!d.forward && d.rule.contains("exe /usr/bin/qbittorrent*"), "{d:?}");
    // Another program on 8080 goes on to the default.
    let firefox = Path::new("/usr/lib/firefox/firefox");
    assert!(p.decide(&Subject { exe: Some(firefox), ..subject(Some(SESSION), 1000, Protocol::Tcp, 8080) }).forward);
    // Unknown executable: the deny rule counts as matching.
    assert!(!p.decide(&subject(Some(SESSION), 1000, Protocol::Tcp, 8080)).forward);
    let service = "system.slice/transmission-daemon.service";
    assert!(p.decide(&subject(Some(service), 105, Protocol::Tcp, 51413)).forward);
    // The administrator's rule comes before the deny list, so it decides even for a denied port.
    assert!(p.decide(&subject(Some(service), 105, Protocol::Tcp, 9091)).forward);
}

#[test]
fn units_users_groups_and_port_ranges_match() {
    let r = rule("action = \"deny\"\nunit = \"docker-*.scope\"");
    assert!(r.matches(&subject(Some("system.slice/docker-0123abcd.scope/init.scope"), 0, Protocol::Tcp, 80)));
    assert!(!r.matches(&subject(Some(DOCKER), 0, Protocol::Tcp, 80)));
    let r = rule("action = \"allow\"\nuid = \"1000-1999\"\nports = [\"6881-6889\", 51413]\nprotocol = \"udp\"");
    assert!(r.matches(&subject(None, 1500, Protocol::Udp, 6885)));
    assert!(r.matches(&subject(None, 1500, Protocol::Udp, 51413)));
    assert!(!r.matches(&subject(None, 2000, Protocol::Udp, 6885)));
    assert!(!r.matches(&subject(None, 1500, Protocol::Tcp, 6885)));
    assert!(!r.matches(&subject(None, 1500, Protocol::Udp, 6890)));
    let r = rule("action = \"allow\"\ngroup = \"0\"");
    let groups = [0];
    assert!(r.matches(&Subject { groups: &groups, ..subject(None, 1000, Protocol::Tcp, 1) }));
    assert!(!r.matches(&subject(None, 1000, Protocol::Tcp, 1)));
    let r = rule("action = \"allow\"\nuser = \"root\"");
    assert_eq!(r.uids, Some(0..=0));
    assert!(r.describe().contains("allow uid 0"), "{}", r.describe());
}

#[test]
fn bad_rules_name_the_line_the_key_and_the_fix() {
    let e = rule_error("cgroup = \"x\"");
    assert!(e.contains("t.toml line 7") && e.contains("no action"), "{e}");
    let e = rule_error("action = \"permit\"");
    assert!(e.contains("\"permit\"") && e.contains("allow"), "{e}");
    let e = rule_error("action = \"deny\"\nports = \"9000-8000\"");
    assert!(e.contains("ports") && e.contains("empty range"), "{e}");
    let e = rule_error("action = \"deny\"\nports = 70000");
    assert!(e.contains("70000"), "{e}");
    let e = rule_error("action = \"deny\"\nports = \"http\"");
    assert!(e.contains("\"http\" is not a port"), "{e}");
    let e = rule_error("action = \"deny\"\nprotocol = \"sctp\"");
    assert!(e.contains("sctp") && e.contains("udp"), "{e}");
    let e = rule_error("action = \"deny\"\nuser = \"no-such-user-natbinder\"");
    assert!(e.contains("no such user") && e.contains("getent"), "{e}");
    let e = rule_error("action = \"deny\"\nexe = \"firefox\"");
    assert!(e.contains("absolute"), "{e}");
    let e = rule_error("action = \"deny\"\ncgroup = \"a[\"");
    assert!(e.contains("glob"), "{e}");
    let e = rule_error("action = \"deny\"\nuid = 1\nuser = \"root\"");
    assert!(e.contains("both uid and user"), "{e}");
    let e = rule_error("action = \"deny\"\nports = []");
    assert!(e.contains("matches nothing"), "{e}");
    assert!(toml::from_str::<RuleSpec>("action = \"deny\"\nport = 1").is_err(), "unknown keys are refused");
    let _ = (NumberOrText::Number(1), Ports::List(Vec::new()));
}

/// Cgroups of a pretend machine: (path, depth, id); `ancestors` lists ids from the root down.
const CGROUPS: &[(&str, u16, u64)] = &[
    ("user.slice", 1, 11),
    ("user.slice/user-1000.slice", 2, 12),
    ("system.slice", 1, 21),
    ("system.slice/docker.service", 2, 22),
    ("system.slice/transmission-daemon.service", 2, 23),
];

fn resolve(path: &str) -> Option<(u16, u64)> {
    CGROUPS.iter().find(|(p, _, _)| *p == path).map(|(_, level, id)| (*level, *id))
}

fn ancestors(path: &str) -> Vec<u64> {
    let mut ids = vec![1];
    let mut prefix = String::new();
    for part in path.split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        ids.push(resolve(&prefix).map_or(999, |(_, id)| id));
    }
    ids
}

/// The kernel's agreement, checked over a grid: whenever the compiled rules would refuse a bind
/// (certainly forwarded), the whole policy forwards it. And where the policy can be decided from
/// what the kernel sees, the kernel does refuse, so that EADDRINUSE still works for users' programs.
#[test]
fn the_kernel_refuses_only_what_the_policy_forwards() {
    let policies = [
        desktop(),
        Policy::new(Vec::new(), &Scope::Cgroup("lab".into()), 32),
        Policy::new(Vec::new(), &Scope::Sessions { user_slice: false }, 32),
        Policy::new(
            vec![
                rule("action = \"deny\"\nexe = \"/usr/bin/x*\"\nports = 9999"),
                rule("action = \"allow\"\ncgroup = \"system.slice/transmission-daemon.service\""),
                rule("action = \"deny\"\ngroup = \"100\"\nports = \"7000-7999\""),
                rule("action = \"allow\"\ncgroup = \"system.slice/docker-*.scope\""),
                rule("action = \"deny\"\nuser = \"root\"\nprotocol = \"udp\""),
            ],
            &Scope::Sessions { user_slice: true },
            32,
        ),
    ];
    let paths = [SESSION, DOCKER, "system.slice/transmission-daemon.service", "system.slice/docker-1.scope", "lab"];
    for (n, policy) in policies.iter().enumerate() {
        let compiled = kernel::compile(policy, resolve);
        assert!(compiled.len() <= natbinder_common::POLICY_CAPACITY as usize);
        for path in paths {
            for uid in [0, 100, 999, 1000, 65534] {
                for gid in [0, 100, 1000] {
                    for protocol in [Protocol::Tcp, Protocol::Udp] {
                        for port in [1024, 5432, 6881, 7500, 8000, 8080, 51413, 65535] {
                            let kernel = kernel::kernel_forwards(&compiled, &ancestors(path), uid, gid, protocol, port);
                            let exe = Path::new("/usr/bin/yes");
                            let s =
                                Subject { protocol, port, uid, gid, groups: &[], cgroup: Some(path), exe: Some(exe) };
                            let decided = policy.decide(&s);
                            if kernel {
                                assert!(
                                    decided.forward,
                                    "policy {n}: the kernel refuses what is not forwarded: {s:?} {decided:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    // And it is not simply "never": a user's program on a plain port is refused when held elsewhere.
    let compiled = kernel::compile(&desktop(), resolve);
    assert!(kernel::kernel_forwards(&compiled, &ancestors(SESSION), 1000, 1000, Protocol::Tcp, 6881));
    assert!(!kernel::kernel_forwards(&compiled, &ancestors(SESSION), 1000, 1000, Protocol::Tcp, 5432));
    assert!(!kernel::kernel_forwards(&compiled, &ancestors(DOCKER), 0, 0, Protocol::Tcp, 6881));
    let lab = kernel::compile(&Policy::new(Vec::new(), &Scope::Cgroup("lab".into()), 32), resolve);
    assert!(kernel::kernel_forwards(&lab, &ancestors("lab"), 0, 0, Protocol::Tcp, 8080));
}

#[test]
fn programs_started_with_run_are_forwarded_wherever_they_came_from_but_the_deny_list_and_rules_still_apply() {
    const RUNS: &str = "system.slice/natbinder.service/natbinder-run";
    let rules = vec![rule("action = \"allow\"\nports = 6379"), rule("action = \"deny\"\nports = 7000")];
    let p = Policy::new(rules, &Scope::Sessions { user_slice: true }, 32).with_runs(RUNS);
    let run = format!("{RUNS}/run-4242");
    // root, a system account: forwarded in a run cgroup, as the default would not.
    let d = p.decide(&subject(Some(&run), 0, Protocol::Tcp, 51413));
    assert!(d.forward && d.rule.contains("natbinder run"), "{d:?}");
    assert!(p.decide(&subject(Some(&format!("{run}/child")), 105, Protocol::Udp, 6881)).forward);
    // The deny list still applies; a rule of the administrator's decides first, either way.
    let d = p.decide(&subject(Some(&run), 0, Protocol::Tcp, 5432));
    assert!(!d.forward && d.rule.contains("deny list"), "{d:?}");
    assert!(p.decide(&subject(Some(&run), 0, Protocol::Tcp, 6379)).forward, "allowed by a rule");
    assert!(!p.decide(&subject(Some(&run), 0, Protocol::Tcp, 7000)).forward, "denied by a rule");
    // Outside the run cgroups, nothing changed.
    assert!(!p.decide(&subject(Some("system.slice/natbinder.service"), 0, Protocol::Tcp, 51413)).forward);
    assert!(!p.decide(&subject(Some("system.slice/natbinder.service/natbinder-run-x/a"), 0, Protocol::Tcp, 1)).forward);
    // The kernel knows it exactly: a held port fails the bind in a run cgroup.
    let resolve = |path: &str| (path == RUNS).then_some((3u16, 77u64));
    let compiled = kernel::compile(&p, resolve);
    let ancestors = [1, 2, 3, 77, 78];
    assert!(kernel::kernel_forwards(&compiled, &ancestors, 0, 0, Protocol::Tcp, 51413));
    assert!(!kernel::kernel_forwards(&compiled, &ancestors, 0, 0, Protocol::Tcp, 5432));
}

#[test]
fn while_run_cgroups_do_not_exist_the_kernel_still_refuses_what_the_scope_certainly_forwards() {
    // systemd makes natbinder.slice with the first run: before, the kernel needs no entry for it, and
    // must not stop at one it cannot check (that would end every EADDRINUSE).
    let p = Policy::new(Vec::new(), &Scope::Cgroup("lab".into()), 32).with_runs("natbinder.slice");
    let compiled = kernel::compile(&p, |_| None);
    assert!(kernel::kernel_forwards(&compiled, &[1, 2], 0, 0, Protocol::Tcp, 51413));
    let resolved = kernel::compile(&p, |path| (path == "natbinder.slice").then_some((1u16, 9u64)));
    assert!(kernel::kernel_forwards(&resolved, &[1, 9, 10], 0, 0, Protocol::Tcp, 51413), "in a run scope");
}
