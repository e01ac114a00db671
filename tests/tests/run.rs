//! `natbinder run [--wait] -- COMMAND` as a user sees it, against the real miniupnpd, with natbinder in
//! the test process (or as its own process where it must be frozen) and the real `natbinder run`
//! binary started in lan1 outside every cgroup natbinder watches:
//! * without --wait, a program the policy does not cover gets forwarding, and loses it when it exits
//!   or is killed; `run` becomes the program (same pid, its exit status);
//! * with --wait, over UPnP IGD and over PCP, a port another LAN host took after natbinder started
//!   fails the program's first bind() with EADDRINUSE, and its port search settles on a free port
//!   that is reachable from the WAN;
//! * a silent gateway, a frozen daemon, an absent daemon: bind() is never held beyond the timeout
//!   (plus a margin for a loaded machine), and succeeds;
//! * an unprivileged user; exit statuses and signals passed through; a program that binds from
//!   several threads at once; a statically linked program that calls bind() with a raw syscall.
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::ExitStatusExt,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use natbinder::outcome::Found;
use natbinder_tests::*;

const LIMIT: Duration = Duration::from_secs(15);
const NOBODY: u32 = 65534;
/// `run --wait`'s default: the paper's 500 ms.
const TIMEOUT: Duration = Duration::from_millis(500);
/// What a loaded 2-core machine may add to a bind that gave up waiting: reading the program's memory,
/// a few system calls, the scheduler. Generous; the figures printed show the real margin.
const MARGIN: Duration = Duration::from_millis(300);

/// Reads the next line of a program's stdout.
fn line(out: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim().to_string()
}

/// "took NS" from testapp --timed / threads.
fn took(out: &mut BufReader<std::process::ChildStdout>) -> Duration {
    let text = line(out);
    let ns =
        text.strip_prefix("took ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("not a took line: {text}"));
    Duration::from_nanos(ns)
}

fn wait_removed(h: &mut Harness, port: u16) {
    h.natbinder()
        .wait_for(LIMIT, |o| matches!(o, Outcome::Removed { key, .. } if key.port == port).then_some(()))
        .unwrap_or_else(|e| panic!("tcp/{port} was not removed: {e}"));
}

fn finish(mut child: Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < limit, "natbinder run did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills everything in the run cgroup of process `pid` (cgroup.kill, Linux 5.14), the background
/// children it forked too.
fn kill_run_cgroup(pid: u32) {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap().trim_start_matches('/').to_string();
    assert!(path.contains("natbinder-run/run-"), "{path}");
    std::fs::write(cgroup2_root().unwrap().join(path).join("cgroup.kill"), "1").unwrap();
}

fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    err
}

#[test]
fn run_forwards_a_program_outside_every_forwarded_cgroup_until_it_exits_or_is_killed() {
    let mut h = Harness::start_in_process(LabConfig::default(), &[]).unwrap();
    // The same program outside the watched cgroup, without run: not forwarded (this test can fail).
    let testapp = h.runnable_by_anyone(&testapp_bin()).unwrap();
    let mut plain = natbinder_lab::command_in(&Netns { name: h.lab.lan1.name.clone() }, None, &testapp).unwrap();
    plain.args(["tcp-echo", "0.0.0.0:9101"]).stdout(Stdio::piped());
    let mut plain = plain.spawn().unwrap();
    let mut plain_out = BufReader::new(plain.stdout.take().unwrap());
    assert_eq!(line(&mut plain_out), "bound 9101");
    assert_eq!(h.reachable_tcp(9101, Duration::from_secs(2)), None, "a program nobody forwards is not reachable");
    let _ = plain.kill();
    let _ = plain.wait();

    let (mut killed, _out) = h.run_app(None, &[], "killed", &["tcp-echo", "0.0.0.0:9100"]).unwrap();
    let (mut exits, _out2) = h.run_app(None, &[], "exits", &["udp-echo", "0.0.0.0:9102"]).unwrap();
    assert_eq!(h.reachable_tcp(9100, LIMIT).as_deref(), Some("killed:ping"));
    assert_eq!(h.reachable_udp(9102, LIMIT).as_deref(), Some("exits:ping"));
    // run became the program: the pid it was started as is the program's.
    let exe = std::fs::read_link(format!("/proc/{}/exe", killed.pid)).unwrap();
    assert!(exe.ends_with("natbinder-testapp"), "{}", exe.display());
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", killed.pid)).unwrap();
    assert!(cgroup.contains("/natbinder-run/run-"), "in a run cgroup: {cgroup}");
    let started = h.natbinder().seen(|o| match o {
        Outcome::RunStarted { pid, .. } => Some(*pid),
        _ => None,
    });
    assert!(started.contains(&killed.pid) && started.contains(&exits.pid), "{started:?}");

    // A child the program forks (sh runs the server in the background) is covered as well.
    let testapp = h.runnable_by_anyone(&testapp_bin()).unwrap();
    let mut forks = h.run_command(None, &[], &["sh", "-c", "\"$0\" tcp-echo 0.0.0.0:9103 & wait"]).unwrap();
    forks.arg(&testapp).env("TESTAPP_NAME", "forked");
    let mut forks = forks.spawn().unwrap();
    let mut forks_out = BufReader::new(forks.stdout.take().unwrap());
    assert_eq!(line(&mut forks_out), "bound 9103");
    assert_eq!(h.reachable_tcp(9103, LIMIT).as_deref(), Some("forked:ping"));
    kill_run_cgroup(forks.id());
    let _ = forks.wait();

    // SIGKILL: the mapping goes, and the port no longer reaches anything from the WAN.
    unsafe { libc::kill(killed.pid as i32, libc::SIGKILL) };
    let _ = killed.child.wait();
    wait_removed(&mut h, 9100);
    assert_eq!(h.mapping("TCP", 9100), None);
    assert_eq!(tcp_from_wan(&h.lab, 9100, "ping").answered(), None);
    // An ordinary exit (SIGTERM's default action): the same.
    unsafe { libc::kill(exits.pid as i32, libc::SIGTERM) };
    let status = exits.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "run exits as its program did");
    h.natbinder()
        .wait_for(LIMIT, |o| matches!(o, Outcome::Removed { key, .. } if key.port == 9102).then_some(()))
        .unwrap();
    assert_eq!(h.mapping("UDP", 9102), None);
}

#[test]
fn run_wait_over_upnp_fails_the_first_bind_of_a_port_another_host_took_and_the_search_settles_on_a_reachable_port() {
    let h = Harness::start_in_process(LabConfig::default(), &[]).unwrap();
    // lan2 takes 6881 and 7881 after natbinder started: natbinder learns of them at the next periodic
    // check, a minute away.
    h.lab.lan2_maps("TCP", 6881).unwrap();
    h.lab.lan2_maps("TCP", 7881).unwrap();

    // Without --wait (the automatic mode), the search stops on the taken port: bound, unreachable.
    let (auto, mut out) = h.run_app(None, &[], "auto", &["first-free", "7881", "7890"]).unwrap();
    assert_eq!((auto.port, line(&mut out)), (7881, "searched".to_string()), "without --wait the first bind succeeds");
    assert_eq!(h.reachable_tcp(7881, Duration::from_secs(2)), None, "and the program cannot be reached");

    // With --wait: EADDRINUSE on the taken port in the very first bind(), then a free port.
    let (mut app, mut out) = h.run_app(None, &["--wait"], "searcher", &["first-free", "6881", "6890"]).unwrap();
    assert_eq!(app.port, 6882);
    assert_eq!(line(&mut out), format!("refused 6881 {}", libc::EADDRINUSE));
    assert_eq!(line(&mut out), "searched");
    assert_eq!(h.reachable_tcp(6882, LIMIT).as_deref(), Some("searcher:ping"));
    let m = h.mapping("TCP", 6882).unwrap();
    assert_eq!(m.internal_client, LAN1_IP);
    // The refused port still belongs to lan2; natbinder left nothing of its own there.
    assert_eq!(h.mapping("TCP", 6881).unwrap().internal_client, LAN2_IP);
    let _ = app.child.kill();
}

#[test]
fn run_wait_over_pcp_fails_the_first_bind_of_a_port_another_host_took_and_the_search_settles_on_a_reachable_port() {
    let config = LabConfig { upnp: false, natpmp: true, ..LabConfig::default() };
    let mut h = Harness::start_in_process(config, &[]).unwrap();
    h.lab.lan2_maps("TCP", 9250).unwrap();
    let (app, mut out) = h.run_app(None, &["--wait"], "searcher", &["first-free", "9250", "9260"]).unwrap();
    assert_eq!(app.port, 9251);
    assert_eq!(line(&mut out), format!("refused 9250 {}", libc::EADDRINUSE));
    assert_eq!(h.reachable_tcp(9251, LIMIT).as_deref(), Some("searcher:ping"));
    assert_eq!(h.mapping("TCP", 9250).unwrap().internal_client, LAN2_IP);
    // natbinder's reason: the gateway offered another port for 9250, which it gave back.
    let offered = h.natbinder().seen(|o| match o {
        Outcome::Conflict { key, offered, .. } if key.port == 9250 => Some(*offered),
        _ => None,
    });
    assert!(matches!(offered.as_slice(), [Some(p)] if *p != 9250), "{offered:?}");
    drop(app);
}

#[test]
fn a_silent_gateway_holds_a_bind_no_longer_than_the_timeout_and_the_bind_succeeds() {
    let config = LabConfig { upnp: false, natpmp: true, ..LabConfig::default() };
    let h = Harness::start_in_process(config, &[]).unwrap();
    h.lab.silence_port_control().unwrap();
    let mut apps = Vec::new();
    for (timeout_ms, port) in [(None, 9270u16), (Some(200u64), 9271)] {
        let timeout = timeout_ms.map_or(TIMEOUT, Duration::from_millis);
        let ms = timeout.as_millis().to_string();
        let mut run_args = vec!["--wait"];
        if timeout_ms.is_some() {
            run_args.extend(["--timeout", ms.as_str()]);
        }
        let address = format!("0.0.0.0:{port}");
        let (app, mut out) = h.run_app(None, &run_args, "silent", &["tcp-echo", &address, "--timed"]).unwrap();
        let took = took(&mut out);
        println!("silent gateway, --timeout {timeout:?}: bind() took {took:?}");
        assert_eq!(app.port, port, "the bind succeeded");
        assert!(took >= timeout - Duration::from_millis(20), "it waited for the gateway: {took:?}");
        assert!(took < timeout + MARGIN, "held {took:?}, beyond {timeout:?} + {MARGIN:?}");
        apps.push(app);
    }
    // Once the gateway answers again, the pending mapping is made.
    h.lab.unsilence_port_control().unwrap();
    assert!(h.reachable_tcp(9270, Duration::from_secs(30)).is_some());
}

/// `natbinder run --wait` of a testapp that binds `port` once a line arrives on its stdin (sh's $0 is
/// the testapp), returned once the daemon has taken `run` in.
fn bind_on_cue(h: &mut Harness, port: u16) -> (Child, BufReader<std::process::ChildStdout>) {
    let testapp = h.runnable_by_anyone(&testapp_bin()).unwrap();
    let script = format!("read go; exec \"$0\" tcp-echo 0.0.0.0:{port} --timed");
    let mut cmd = h.run_command(None, &["--wait"], &["sh", "-c", &script]).unwrap();
    cmd.arg(&testapp);
    let mut child = cmd.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    h.daemon().wait_log(&format!("natbinder run: pid {} ", child.id()), LIMIT).unwrap();
    (child, out)
}

/// Tells a [`bind_on_cue`] program to bind, and returns how long its bind() took.
fn cue(child: &mut Child, out: &mut BufReader<std::process::ChildStdout>, port: u16) -> Duration {
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    assert_eq!(line(out), format!("bound {port}"));
    took(out)
}

#[test]
fn a_frozen_or_absent_daemon_never_holds_a_bind_beyond_the_timeout_and_the_program_runs() {
    let mut h = Harness::start().unwrap();
    // The program binds after the daemon has been frozen.
    let (mut child, mut out) = bind_on_cue(&mut h, 9280);
    let daemon_pid = h.daemon().pid() as i32;
    unsafe { libc::kill(daemon_pid, libc::SIGSTOP) };
    let frozen = cue(&mut child, &mut out, 9280);
    unsafe { libc::kill(daemon_pid, libc::SIGCONT) };
    println!("frozen daemon: bind() took {frozen:?}");
    assert!(frozen < TIMEOUT + MARGIN, "held {frozen:?} by a frozen daemon");
    let _ = child.kill();
    let _ = child.wait();

    // An absent daemon, after run started under it: the bind goes on at once.
    let (mut child, mut out) = bind_on_cue(&mut h, 9281);
    h.daemon().stop(libc::SIGKILL, LIMIT).unwrap();
    let absent = cue(&mut child, &mut out, 9281);
    println!("absent daemon: bind() took {absent:?}");
    assert!(absent < TIMEOUT + MARGIN, "held {absent:?} by an absent daemon");
    let _ = child.kill();
    let _ = child.wait();

    // No daemon at all when run starts: it says so, and the program runs with plain binds.
    let (mut app, _out) = h.run_app(None, &["--wait"], "alone", &["tcp-echo", "0.0.0.0:9282"]).unwrap();
    assert_eq!(app.port, 9282);
    let _ = app.child.kill();
    let _ = app.child.wait();
    let err = stderr_of(&mut app.child);
    assert!(err.contains("natbinder is not running") && err.contains("plain binds"), "{err}");
}

#[test]
fn run_as_an_unprivileged_user_passes_exit_statuses_and_signals_through() {
    let mut h = Harness::start_in_process(LabConfig::default(), &[]).unwrap();
    // Forwarding works for an ordinary user, with and without --wait.
    let (app, _o) = h.run_app(Some(NOBODY), &[], "nobody", &["tcp-echo", "0.0.0.0:9290"]).unwrap();
    let (waited, _o2) = h.run_app(Some(NOBODY), &["--wait"], "nobody-wait", &["tcp-echo", "0.0.0.0:9291"]).unwrap();
    assert_eq!(h.reachable_tcp(9290, LIMIT).as_deref(), Some("nobody:ping"));
    assert_eq!(
        h.reachable_tcp(9291, Duration::from_secs(2)).as_deref(),
        Some("nobody-wait:ping"),
        "mapped when bind() returned"
    );
    let owners = h.natbinder().seen(|o| match o {
        Outcome::Mapped { key, .. } if key.port == 9291 => Some(()),
        _ => None,
    });
    assert_eq!(owners.len(), 1, "mapped once: the socket took over its reservation");
    drop((app, waited));

    for wait in [&[][..], &["--wait"][..]] {
        // Exit status.
        let child = h.run_command(Some(NOBODY), wait, &["sh", "-c", "exit 7"]).unwrap().spawn().unwrap();
        assert_eq!(finish(child, LIMIT).code(), Some(7), "{wait:?}");
        // Death by a signal.
        let child = h.run_command(Some(NOBODY), wait, &["sh", "-c", "kill -KILL $$"]).unwrap().spawn().unwrap();
        assert_eq!(finish(child, LIMIT).signal(), Some(libc::SIGKILL), "{wait:?}");
        // A program that cannot be started: 127, as env(1) says it.
        let out = h.run_command(Some(NOBODY), wait, &["/nonexistent/program"]).unwrap().output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(127), "{wait:?}: {err}");
        assert!(err.contains("cannot run /nonexistent/program"), "{err}");
    }

    // SIGHUP, SIGINT and SIGTERM sent to run reach the program (with --wait, run is its supervisor).
    let script = "trap 'echo hup' HUP; trap 'echo int' INT; trap 'echo term; exit 3' TERM; echo ready; \
                  while :; do sleep 0.05; done";
    let mut child = h.run_command(Some(NOBODY), &["--wait"], &["sh", "-c", script]).unwrap().spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    assert_eq!(line(&mut out), "ready");
    let run_pid = child.id() as i32;
    for (signal, answer) in [(libc::SIGHUP, "hup"), (libc::SIGINT, "int"), (libc::SIGTERM, "term")] {
        unsafe { libc::kill(run_pid, signal) };
        assert_eq!(line(&mut out), answer);
    }
    assert_eq!(finish(child, LIMIT).code(), Some(3));
}

#[test]
fn a_program_that_binds_from_several_threads_at_once_gets_every_port_mapped_and_no_bind_waits_beyond_the_timeout() {
    let h = Harness::start_in_process(LabConfig::default(), &[]).unwrap();
    let (app, mut out) = h.run_app(None, &["--wait"], "threads", &["threads", "8", "9400"]).unwrap();
    let longest = took(&mut out);
    println!("8 threads binding at once under --wait: the longest bind() took {longest:?}");
    assert!(longest < TIMEOUT + MARGIN, "{longest:?}");
    for port in 9400..9408 {
        assert_eq!(h.reachable_tcp(port, LIMIT).as_deref(), Some("threads:ping"), "tcp/{port}");
    }
    drop(app);
}

#[test]
fn a_statically_linked_program_binding_with_a_raw_syscall_is_held_too() {
    let h = Harness::start_in_process(LabConfig::default(), &[]).unwrap();
    h.lab.lan2_maps("TCP", 9500).unwrap();
    let source = h.lab.dir.join("rawbind.c");
    std::fs::write(&source, RAW_BIND_C).unwrap();
    let binary = h.lab.dir.join("rawbind");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("gcc (the setup installs it)");
    assert!(built.status.success(), "gcc: {}", String::from_utf8_lossy(&built.stderr));
    let headers = std::process::Command::new("readelf").arg("-l").arg(&binary).output().expect("readelf (binutils)");
    let headers = String::from_utf8_lossy(&headers.stdout);
    assert!(headers.contains("LOAD") && !headers.contains("INTERP"), "not a static binary:\n{headers}");
    let binary = binary.display().to_string();
    let out = h.run_command(None, &["--wait"], &[&binary, "9500", "9501"]).unwrap().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [format!("9500 errno {}", libc::EADDRINUSE), "9501 ok".to_string()],
        "{text}"
    );
}

/// Two raw bind(2) syscalls, no libc wrapper, in a static binary.
const RAW_BIND_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <netinet/in.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sin;
        memset(&sin, 0, sizeof sin);
        sin.sin_family = AF_INET;
        sin.sin_port = htons(atoi(argv[i]));
        long rc = syscall(SYS_bind, fd, &sin, sizeof sin);
        if (rc == 0) printf("%s ok\n", argv[i]); else printf("%s errno %d\n", argv[i], errno);
        fflush(stdout);
    }
    return 0;
}
"#;

/// rtorrent from Debian's package, as a user runs it: a BitTorrent client that searches a port range
/// for its listener, on a dual-stack [::] socket that it binds again after a failed bind(). It is
/// given no torrent, no DHT, no PEX and no UDP trackers, so it contacts nothing; the lab has no way
/// out anyway.
#[test]
fn rtorrent_under_run_wait_skips_the_port_another_host_took_and_is_reachable_on_the_next() {
    let mut h = Harness::start_in_process(LabConfig::default(), &[]).unwrap();
    h.lab.lan2_maps("TCP", 6891).unwrap();
    let dir = h.lab.dir.join("rtorrent");
    std::fs::create_dir_all(dir.join("session")).unwrap();
    std::fs::create_dir_all(dir.join("downloads")).unwrap();
    let rc = dir.join("rtorrent.rc");
    std::fs::write(
        &rc,
        format!(
            "directory.default.set = {0}/downloads\nsession.path.set = {0}/session\n\
             network.port_range.set = 6891-6899\nnetwork.port_random.set = no\n\
             dht.mode.set = disable\nprotocol.pex.set = no\ntrackers.use_udp.set = no\n\
             system.daemon.set = true\n",
            dir.display()
        ),
    )
    .unwrap();
    let import = format!("import={}", rc.display());
    let mut rtorrent = h
        .run_command(None, &["--wait"], &["rtorrent", "-n", "-o", &import])
        .unwrap()
        .spawn()
        .expect("rtorrent (setup installs it)");
    let bound = h
        .natbinder()
        .wait_for(LIMIT, |o| match o {
            Outcome::SocketBound { listener, found: Found::Bind, .. }
                if listener.owner.comm.starts_with("rtorrent") =>
            {
                Some((listener.port, listener.family))
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(bound, (6892, natbinder::Family::Ipv6), "rtorrent settled on the next port, on [::]");
    // Mapped before its bind() returned, as the paper's bind is.
    assert_eq!(h.mapping("TCP", 6892).map(|m| m.internal_client), Some(LAN1_IP));
    let reached = wait_for(LIMIT, || {
        h.lab.wan.run(|| {
            let peer = std::net::SocketAddr::from((GW_WAN_IP, 6892));
            std::net::TcpStream::connect_timeout(&peer, Duration::from_secs(2)).ok().map(|_| ())
        })
    });
    assert!(reached.is_some(), "rtorrent is reachable from the WAN on 6892");
    assert_eq!(h.mapping("TCP", 6891).unwrap().internal_client, LAN2_IP);
    let bound_6891 = h.natbinder().seen(|o| match o {
        Outcome::SocketBound { listener, found: Found::Bind, .. } if listener.port == 6891 => Some(()),
        _ => None,
    });
    assert!(bound_6891.is_empty(), "its bind of 6891 failed before the kernel bound anything");
    let _ = rtorrent.kill();
    let _ = rtorrent.wait();
}

/// Where systemd runs, `run` asks it for a transient scope (systemd is not PID 1 on these machines: a
/// stand-in for its manager answers on a private bus, and makes the scope as systemd does). The
/// program runs in `natbinder.slice/natbinder-run-PID.scope`, outside the cgroup natbinder watches,
/// and is forwarded there (without --wait, only the hooks attached to the scope can have seen its
/// bind); a second run, with --wait, after the first scope and its slice are gone, too.
#[test]
fn where_systemd_runs_run_asks_it_for_a_transient_scope_and_the_program_is_forwarded_there() {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    let systemd = natbinder_tests::fake_systemd::FakeSystemd::start(&h.lab.dir.join("dbus")).unwrap();
    h.start_daemon_with_env(&["--run-cgroups", "systemd"], &[("DBUS_SYSTEM_BUS_ADDRESS", systemd.address())]).unwrap();
    for (port, name, wait) in [(9600u16, "first", false), (9601, "second", true)] {
        let address = format!("0.0.0.0:{port}");
        let run_args: &[&str] = if wait { &["--wait"] } else { &[] };
        let (mut app, _out) = h.run_app(None, run_args, name, &["tcp-echo", &address]).unwrap();
        // Without --wait, run became the program; with it, the program is run's child. The scope is
        // named after run, and holds the program either way.
        let run_pid = app.pid;
        let program = if wait { child_of(run_pid) } else { run_pid };
        let cgroup = std::fs::read_to_string(format!("/proc/{program}/cgroup")).unwrap();
        assert!(cgroup.trim().ends_with(&format!("/natbinder.slice/natbinder-run-{run_pid}.scope")), "{cgroup}");
        assert_eq!(h.reachable_tcp(port, LIMIT).as_deref(), Some(format!("{name}:ping").as_str()));
        let call = systemd.calls().pop().unwrap();
        assert_eq!((call.name.clone(), call.mode.as_str()), (format!("natbinder-run-{run_pid}.scope"), "fail"));
        assert_eq!(call.property("PIDs"), Some(format!("[{run_pid}]").as_str()));
        assert_eq!(call.property("Slice"), Some("natbinder.slice"));
        assert_eq!(call.property("CollectMode"), Some("inactive-or-failed"));
        assert!(call.property("Description").is_some_and(|d| d.starts_with("natbinder run: ")), "{call:?}");
        let _ = app.child.kill();
        let _ = app.child.wait();
        // Released by the hooks at once (a lapsed reservation would take seconds).
        h.daemon().wait_log(&format!("released tcp/{port}"), Duration::from_secs(2)).unwrap();
        h.daemon().wait_log(&format!("removed mapping tcp/{port}"), LIMIT).unwrap();
        // systemd removes an empty scope, and the slice with its last scope.
        systemd.end_scopes();
    }
    assert_eq!(systemd.calls().len(), 2);
}

/// The child of process `parent` (there is one).
fn child_of(parent: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap();
    children.split_whitespace().next().and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{parent} has no child"))
}
