//! The kernel programs on their own, in the style of aya's integration tests: the real object loaded
//! into the running kernel, attached to a child cgroup, with binding programs in a fresh network
//! namespace. No gateway is involved: these tests check the events and the EADDRINUSE decision.
use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Stdio},
    time::Duration,
};

use natbinder::{
    kernel::{current_netns_cookie, KernelEvent, KernelHooks},
    policy::{
        kernel::compile,
        spec::{NumberOrText, Ports},
        Policy, RuleSpec, Scope,
    },
    table::KernelMirror,
    Family, Protocol,
};
use natbinder_tests::*;

fn scope(cgroup: &Cgroup) -> Scope {
    Scope::Cgroup(cgroup.path.display().to_string())
}

struct Fixture {
    hooks: KernelHooks,
    ns: ScratchNetns,
    other_ns: ScratchNetns,
    cgroup: Cgroup,
    runtime: tokio::runtime::Runtime,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// What a test program printed: Ok(port) once bound, Err(message) if bind failed.
fn bind_in(ns: &Netns, cgroup: &Cgroup, args: &[&str]) -> (Child, Result<u16, String>) {
    let mut cmd = command_in(ns, Some(cgroup), testapp_bin()).unwrap();
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    match line.trim().strip_prefix("bound ").and_then(|p| p.parse().ok()) {
        Some(port) => (child, Ok(port)),
        None => {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            (child, Err(err))
        }
    }
}

impl Fixture {
    fn new() -> Self {
        let serial = serial();
        let ns = ScratchNetns::create("ebpf").unwrap();
        let other_ns = ScratchNetns::create("other").unwrap();
        let cgroup = Cgroup::create(&scratch_cgroup_name("ebpf")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let cookie = ns.0.run(|| current_netns_cookie().unwrap());
        let mut hooks = runtime.block_on(async { KernelHooks::attach(&cgroup.path, cookie, 1024) }).unwrap();
        // As with --cgroup: everything in it is forwarded, but the deny list.
        hooks.set_policy(&compile(&Policy::new(Vec::new(), &scope(&cgroup), 0), |_| None)).unwrap();
        Fixture { hooks, ns, other_ns, cgroup, runtime, _serial: serial }
    }

    fn bind(&self, args: &[&str]) -> (Child, Result<u16, String>) {
        bind_in(&self.ns.0, &self.cgroup, args)
    }

    /// Reads events until `until` matches one (included), or fails after a generous limit.
    fn events_until(&mut self, until: impl Fn(&KernelEvent) -> bool) -> Vec<KernelEvent> {
        let mut all = Vec::new();
        let hooks = &mut self.hooks;
        self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let mut batch = Vec::new();
                    hooks.read_events(&mut batch).await.unwrap();
                    for e in batch {
                        let done = until(&e);
                        all.push(e);
                        if done {
                            return;
                        }
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("expected event never came; got {all:?}"));
        });
        all
    }
}

fn bound_port(e: &KernelEvent) -> Option<u16> {
    match e {
        KernelEvent::Bound(s) => Some(s.port),
        _ => None,
    }
}

#[test]
fn a_wildcard_bind_is_reported_with_its_owner_and_released_by_cookie_on_kill() {
    let mut f = Fixture::new();
    let before_bind = natbinder::kernel::monotonic_ns();
    let (mut child, port) = f.bind(&["tcp-echo", "0.0.0.0:7000"]);
    let after_bind = natbinder::kernel::monotonic_ns();
    assert_eq!(port, Ok(7000));
    let events = f.events_until(|e| bound_port(e) == Some(7000));
    let KernelEvent::Bound(s) = events.last().unwrap() else { unreachable!() };
    assert_eq!((s.pid, s.uid, s.protocol, s.family, s.port), (child.id(), 0, Protocol::Tcp, Family::Ipv4, 7000));
    assert_eq!(s.comm, "natbinder-testa");
    assert_ne!(s.cgroup_id, 0);
    // The hook's time is on the daemon's monotonic clock: when the program bound.
    assert!((before_bind..after_bind).contains(&s.at_ns), "bound at {} ns, not within the bind", s.at_ns);
    let cookie = s.cookie;

    let before_kill = natbinder::kernel::monotonic_ns();
    child.kill().unwrap();
    child.wait().unwrap();
    let after_exit = natbinder::kernel::monotonic_ns();
    let events = f.events_until(|e| matches!(e, KernelEvent::Released { .. }));
    let Some(&KernelEvent::Released { cookie: released, at_ns, thread }) = events.last() else { unreachable!() };
    assert_eq!(released, cookie);
    // The program had one thread: it released the socket as it exited.
    assert_eq!(thread, s.pid);
    assert!((before_kill..after_exit).contains(&at_ns), "released at {at_ns} ns, not between kill and exit");
}

#[test]
fn only_explicit_unprivileged_wildcard_binds_in_the_watched_namespace_are_reported() {
    let mut f = Fixture::new();
    let mut children = Vec::new();
    for args in [
        &["tcp-echo", "127.0.0.1:7010"][..],
        &["tcp-echo", "0.0.0.0:0"],
        &["udp-echo", "0.0.0.0:0"],
        &["tcp-echo", "0.0.0.0:1023"],
        &["udp-echo", "[::1]:7011"],
    ] {
        let (child, port) = f.bind(args);
        assert!(port.is_ok(), "{args:?} should bind: {port:?}");
        children.push(child);
    }
    // The same cgroup in another network namespace: a container's bind.
    let (child, port) = bind_in(&f.other_ns.0, &f.cgroup, &["tcp-echo", "0.0.0.0:7012"]);
    assert_eq!(port, Ok(7012));
    children.push(child);
    // The fence: reported, and after all the others in the ring buffer.
    let (child, _) = f.bind(&["udp-echo", "0.0.0.0:7013"]);
    children.push(child);
    let (child, _) = f.bind(&["tcp-echo", "[::]:7014"]);
    children.push(child);

    let events = f.events_until(|e| bound_port(e) == Some(7014));
    let bound: Vec<(Protocol, Family, u16)> = events
        .iter()
        .filter_map(|e| match e {
            KernelEvent::Bound(s) => Some((s.protocol, s.family, s.port)),
            _ => None,
        })
        .collect();
    assert_eq!(bound, vec![(Protocol::Udp, Family::Ipv4, 7013), (Protocol::Tcp, Family::Ipv6, 7014)]);
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn a_port_held_elsewhere_fails_the_bind_with_eaddrinuse_for_that_protocol_only() {
    let mut f = Fixture::new();
    let holder = std::net::Ipv4Addr::new(192, 168, 77, 20);
    f.hooks.held_elsewhere().insert(Protocol::Tcp, 7020, holder).unwrap();

    let (_c1, refused) = f.bind(&["tcp-echo", "0.0.0.0:7020"]);
    let err = refused.expect_err("bind of a port held elsewhere succeeded");
    assert!(err.contains("Address already in use"), "{err}");
    let events = f.events_until(|e| matches!(e, KernelEvent::Refused(_)));
    assert!(matches!(events.last(), Some(KernelEvent::Refused(s)) if s.port == 7020 && s.protocol == Protocol::Tcp));

    // The dual-stack form of the same bind is refused too.
    let (_c2, refused6) = f.bind(&["tcp-echo", "[::]:7020"]);
    assert!(refused6.unwrap_err().contains("Address already in use"));
    // UDP on that port, and a specific address, are not held elsewhere.
    let (mut c3, udp) = f.bind(&["udp-echo", "0.0.0.0:7020"]);
    assert_eq!(udp, Ok(7020));
    let (mut c4, lo) = f.bind(&["tcp-echo", "127.0.0.1:7020"]);
    assert_eq!(lo, Ok(7020));

    // Once the other host lets go, the port binds again.
    f.hooks.held_elsewhere().remove(Protocol::Tcp, 7020);
    let _ = c4.kill();
    let _ = c4.wait();
    let (mut c5, again) = f.bind(&["tcp-echo", "0.0.0.0:7020"]);
    assert_eq!(again, Ok(7020));
    for c in [&mut c3, &mut c5] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn detaching_restores_plain_bind_behaviour() {
    let f = Fixture::new();
    f.hooks.held_elsewhere().insert(Protocol::Udp, 7030, std::net::Ipv4Addr::new(10, 0, 0, 2)).unwrap();
    let (_c, refused) = f.bind(&["udp-echo", "0.0.0.0:7030"]);
    let err = refused.expect_err("precondition: a port held elsewhere is refused while attached");
    assert!(err.contains("Address already in use"), "refused for another reason: {err}");
    let Fixture { hooks, ns, cgroup, runtime, _serial, other_ns } = f;
    hooks.detach();
    let (mut c, port) = bind_in(&ns.0, &cgroup, &["udp-echo", "0.0.0.0:7030"]);
    assert_eq!(port, Ok(7030), "a bind still failed after the hooks were detached");
    let _ = c.kill();
    let _ = c.wait();
    drop((runtime, other_ns));
}

/// EADDRINUSE only for binds the policy certainly forwards: a rule that denies the port, a rule the
/// kernel cannot check (an executable), and a user at their limit all let the bind of a held port
/// succeed, and the next policy puts the refusal back.
#[test]
fn a_held_port_fails_the_bind_only_for_programs_the_policy_forwards() {
    let mut f = Fixture::new();
    let holder = std::net::Ipv4Addr::new(192, 168, 77, 20);
    for port in [7040, 7041] {
        f.hooks.held_elsewhere().insert(Protocol::Tcp, port, holder).unwrap();
    }
    let rule = |spec: RuleSpec| spec.validate("test").unwrap();
    let deny = |port: u64| RuleSpec {
        action: Some("deny".into()),
        ports: Some(Ports::One(NumberOrText::Number(port))),
        ..RuleSpec::default()
    };
    let with_rules = |rules| compile(&Policy::new(rules, &scope(&f.cgroup), 0), |_| None);
    let refused = |f: &Fixture, port: u16| {
        let (mut child, result) = f.bind(&["tcp-echo", &format!("0.0.0.0:{port}")]);
        let _ = child.kill();
        let _ = child.wait();
        match result {
            Ok(_) => false,
            Err(e) if e.contains("Address already in use") => true,
            Err(e) => panic!("bind of {port} failed otherwise: {e}"),
        }
    };

    let deny_7040 = with_rules(vec![rule(deny(7040))]);
    f.hooks.set_policy(&deny_7040).unwrap();
    assert!(!refused(&f, 7040), "a port the policy does not forward lost its bind to another host");
    assert!(refused(&f, 7041), "a forwarded port another host holds was not refused");

    // A rule on the executable: the kernel cannot tell, so it refuses nothing it matches.
    let by_exe = with_rules(vec![rule(RuleSpec { exe: Some("/usr/bin/*".into()), ..deny(7041) })]);
    f.hooks.set_policy(&by_exe).unwrap();
    assert!(!refused(&f, 7041));
    assert!(refused(&f, 7040), "the new policy forwards 7040 again");

    // A user at the limit is not forwarded, so not refused.
    f.hooks.set_policy(&with_rules(Vec::new())).unwrap();
    let mirror = f.hooks.held_elsewhere();
    mirror.mirror_uids_at_limit(&[0].into());
    assert!(!refused(&f, 7041), "a user at the limit lost the port to another host");
    mirror.mirror_uids_at_limit(&Default::default());
    assert!(refused(&f, 7041));

    // The desktop default does not forward root: never refused.
    let desktop = compile(&Policy::new(Vec::new(), &Scope::Sessions { user_slice: true }, 0), |_| None);
    f.hooks.set_policy(&desktop).unwrap();
    assert!(!refused(&f, 7041));
}

#[test]
fn the_last_events_of_a_storm_are_read_without_another_bind_to_wake_the_reader() {
    // The programs wake the reader at most once per millisecond: a record committed without a
    // wake-up must still be read (the reader reads again after each window), never left waiting for
    // the next bind. A program binds 100 ports, then closes all but the last at once: the releases
    // come within the window of the last wake-up, and nothing follows them. All of them are read, or
    // the reader has gone to sleep on them (the limit in events_until).
    let mut f = Fixture::new();
    for round in 0..20u16 {
        let from = 20000 + round * 100;
        let mut storm = command_in(&f.ns.0, Some(&f.cgroup), testapp_bin()).unwrap();
        storm.args(["burst", "100", &from.to_string(), "1", "--keep-last"]).stdout(Stdio::null());
        let mut storm = storm.spawn().unwrap();
        let (bound, released) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        f.events_until(|e| {
            match e {
                KernelEvent::Bound(s) if (from..from + 100).contains(&s.port) => bound.set(bound.get() + 1),
                KernelEvent::Released { .. } => released.set(released.get() + 1),
                _ => {}
            }
            (bound.get(), released.get()) == (100, 99)
        });
        storm.kill().unwrap();
        storm.wait().unwrap();
        f.events_until(|e| matches!(e, KernelEvent::Released { .. }));
    }
}
