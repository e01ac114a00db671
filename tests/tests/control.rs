//! The control socket and the `natbinder` CLI as a user sees them, against the real miniupnpd, with
//! natbinder in the test process and the real CLI binary run as root and as an ordinary user:
//! * every read command, for people (aligned text, checked as a snapshot once pids and times are
//!   masked) and as JSON (the documented fields);
//! * watch shows what happens as it happens;
//! * who may change things: anyone may read, an ordinary user may not reload (exit 4, and why);
//! * exit codes: 2 bad arguments, 3 the daemon not running, 1 nothing on that port;
//! * a hostile client (garbage, a huge message, many idle connections, a watcher that never reads)
//!   costs the others nothing, and the daemon stays up.
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use natbinder_tests::{inprocess::log_text, *};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(15);
const NOBODY: u32 = 65534;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// The lab with a forwarded web server on tcp/8080, Redis's port (deny list) not forwarded, and
/// another LAN host holding tcp/7020.
fn lab_with_three_ports() -> (Harness, Vec<App>) {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    h.lab.lan2_maps("TCP", 7020).unwrap();
    h.start_daemon_in_process(&[]).unwrap();
    let (web, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    let (redis, _o2) = h.app("redis", &["tcp-echo", "0.0.0.0:6379"]).unwrap();
    assert!(h.reachable_tcp(8080, LIMIT).is_some());
    h.natbinder()
        .wait_for(LIMIT, |o| matches!(o, Outcome::NotForwarded { listener, .. } if listener.port == 6379).then_some(()))
        .unwrap();
    (h, vec![web, redis])
}

/// Masks what changes from run to run: pids and lease times.
fn masked(text: &str, pids: &[u32]) -> String {
    let mut text = text.to_string();
    for pid in pids {
        text = text.replace(&format!("{pid} natbinder-testa"), "PID natbinder-testa");
    }
    let lease = regex_lite_lease(&text);
    text.replace(&lease, "LEASE")
}

/// The lease column's value on the mapped line ("59m59s").
fn regex_lite_lease(text: &str) -> String {
    text.lines().find(|l| l.contains(" mapped ")).and_then(|l| l.split_whitespace().nth(4)).unwrap_or("?").to_string()
}

#[test]
fn every_read_command_shows_what_natbinder_does_for_people_and_as_json() {
    let (h, apps) = lab_with_three_ports();
    let pids: Vec<u32> = apps.iter().map(|a| a.pid).collect();

    let (code, out, err) = h.cli(&["status"]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("daemon:            natbinder ") && out.contains(", running"), "{out}");
    assert!(out.contains("gateway:           UPnP IGD at 192.168.77.1"), "{out}");
    assert!(out.contains("external address:  11.77.77.77"), "{out}");
    assert!(
        out.contains("mappings:          1 mapped, 0 pending, 0 conflict, 1 not forwarded, 0 disabled, 0 removing"),
        "{out}"
    );
    let (code, out, _) = h.cli(&["status", "--json"]).unwrap();
    let status = json(&out);
    assert_eq!(code, 0);
    assert_eq!(status["backend"], "UPnP IGD");
    assert_eq!(status["external_address"], "11.77.77.77");
    assert_eq!(status["policy_scope"], "cgroup");
    assert_eq!((status["counts"]["mapped"].as_u64(), status["counts"]["not_forwarded"].as_u64()), (Some(1), Some(1)));
    assert_eq!(status["lost_events"], 0);

    let (code, out, err) = h.cli(&["list"]).unwrap();
    assert_eq!(code, 0, "{err}");
    let expected = "\
PROTO  EXTERNAL  INTERNAL  STATE          LEASE  BACKEND   OWNERS                           WHY
tcp    6379      6379      not-forwarded  -      -         PID natbinder-testa (uid 0)  deny tcp/6379 (deny list: Redis: no password by default, and it can write files)
tcp    8080      8080      mapped         LEASE  UPnP IGD  PID natbinder-testa (uid 0)
";
    // Column widths follow the content (pids differ in length): compare with runs of spaces as one,
    // and check the alignment on the output itself.
    let squeezed = |t: &str| t.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect::<Vec<_>>();
    assert_eq!(squeezed(&masked(&out, &pids)), squeezed(expected), "list:\n{out}");
    let column = |line: &str, word: &str| line.find(word);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(column(lines[0], "STATE"), column(lines[1], "not-forwarded"), "aligned:\n{out}");
    assert_eq!(column(lines[0], "STATE"), column(lines[2], "mapped"), "aligned:\n{out}");
    let (_, out, _) = h.cli(&["list", "--json"]).unwrap();
    let list = json(&out);
    let rows = list["mappings"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let web = rows.iter().find(|r| r["external_port"] == 8080).unwrap();
    assert_eq!(
        (web["protocol"].as_str(), web["internal_port"].as_u64(), web["state"].as_str()),
        (Some("tcp"), Some(8080), Some("mapped"))
    );
    assert_eq!(web["owners"][0]["pid"], pids[0]);
    assert!(web["lease_left_seconds"].as_u64().is_some_and(|l| l > 3500 && l <= 3600), "{web}");
    assert_eq!(web["backend"], "UPnP IGD");

    let (_, out, _) = h.cli(&["list", "--all"]).unwrap();
    let other =
        out.lines().find(|l| l.contains("7020")).unwrap_or_else(|| panic!("--all shows the other host's port:\n{out}"));
    assert!(other.contains("other-host") && other.contains("held by 192.168.77.20"), "{other}");

    let (code, out, _) = h.cli(&["get", "tcp", "8080", "--json"]).unwrap();
    assert_eq!(code, 0);
    assert_eq!(json(&out)["mapping"]["state"], "mapped");
    let (code, out, _) = h.cli(&["get", "tcp", "6379"]).unwrap();
    assert!(code == 0 && out.contains("not-forwarded") && out.contains("Redis"), "{out}");
    let (code, _, err) = h.cli(&["get", "tcp", "9999"]).unwrap();
    assert!(code == 1 && err.contains("no socket or mapping on tcp/9999"), "{code} {err}");

    let (code, out, _) = h.cli(&["external-ip"]).unwrap();
    assert_eq!((code, out.trim()), (0, "11.77.77.77"));
    let (_, out, _) = h.cli(&["external-ip", "--json"]).unwrap();
    assert_eq!(json(&out)["address"], "11.77.77.77");
    drop(apps);
}

#[test]
fn bad_arguments_exit_2_and_a_daemon_that_is_not_running_exits_3() {
    let h = Harness::lab_only(LabConfig::default()).unwrap();
    for args in [&["get", "sctp", "80"][..], &["get", "tcp", "0"], &["get", "tcp", "70000"], &["lits"]] {
        let (code, _, err) = h.cli(args).unwrap();
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    let (code, _, err) = h.cli(&["status"]).unwrap();
    assert!(code == 3 && err.contains("natbinder is not running"), "{code}: {err}");
}

#[test]
fn anyone_may_read_but_only_root_and_operators_may_reload() {
    let (h, _apps) = lab_with_three_ports();
    let (code, out, err) = h.cli_as(Some(NOBODY), &["list", "--json"]).unwrap();
    assert_eq!(code, 0, "an ordinary user may list: {err}");
    assert_eq!(json(&out)["mappings"].as_array().map(|m| m.len()), Some(2));
    let (code, _, err) = h.cli_as(Some(NOBODY), &["reload"]).unwrap();
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("not permitted to reload") && err.contains("sudo"),
        "the refusal names the rule and the fix: {err}"
    );
    let (code, out, err) = h.cli(&["reload"]).unwrap();
    assert!(code == 0 && out.contains("reloaded"), "{code} {out} {err}");
}

#[test]
fn watch_shows_what_happens_as_it_happens() {
    let (mut h, _apps) = lab_with_three_ports();
    let (mut watch, mut lines) = spawn_watch(&h, &["--json"]);
    // The watch is connected once the daemon has published anything since; a bind does.
    std::thread::sleep(Duration::from_millis(300));
    let (_late, _o) = h.app("late", &["udp-echo", "0.0.0.0:8081"]).unwrap();
    let deadline = Instant::now() + LIMIT;
    let mut seen = Vec::new();
    let mapped = loop {
        assert!(Instant::now() < deadline, "no mapped event for udp/8081 in:\n{seen:#?}");
        let line = lines.next().expect("watch ended").unwrap();
        let event = json(&line);
        seen.push(event["event"].as_str().unwrap_or("?").to_string());
        if event["event"] == "mapped" && event["details"]["external_port"] == 8081 {
            break event;
        }
    };
    assert_eq!(mapped["details"]["protocol"], "udp");
    assert!(mapped["text"].as_str().is_some_and(|t| t.contains("mapped udp/8081")), "{mapped}");
    assert!(mapped["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{mapped}");
    assert!(seen.contains(&"socket-bound".to_string()), "{seen:?}");
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = h.natbinder().drain();
}

/// `natbinder watch EXTRA` against this lab's daemon, and its lines.
fn spawn_watch(
    h: &Harness,
    extra: &[&str],
) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut watch = Command::new(natbinder_bin())
        .arg("watch")
        .args(extra)
        .arg("--socket")
        .arg(h.control_socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    (watch, lines)
}

fn raw_call(stream: &mut UnixStream, message: &[u8]) -> Value {
    stream.write_all(message).unwrap();
    reply(stream)
}

fn reply(stream: &mut UnixStream) -> Value {
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let mut bytes = Vec::new();
    let mut byte = [0u8];
    while stream.read(&mut byte).unwrap() == 1 && byte[0] != 0 {
        bytes.push(byte[0]);
    }
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)))
}

fn status_works(h: &Harness) {
    let started = Instant::now();
    let (code, _, err) = h.cli(&["status"]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "status took {:?}", started.elapsed());
}

#[test]
fn a_hostile_client_costs_the_others_nothing_and_the_daemon_stays_up() {
    let (mut h, _apps) = lab_with_three_ports();
    let socket = h.control_socket();

    // Garbage, then a well-formed message that is no call, then one too long: each gets an error.
    let mut s = UnixStream::connect(&socket).unwrap();
    let r = raw_call(&mut s, b"\xff\xfe garbage\0");
    assert_eq!(r["error"], "io.natbinder.InvalidMessage", "{r}");
    let mut s = UnixStream::connect(&socket).unwrap();
    let r =
        raw_call(&mut s, b"{\"method\":\"io.natbinder.Get\",\"parameters\":{\"protocol\":\"tcp\",\"port\":\"x\"}}\0");
    assert_eq!(
        (r["error"].as_str(), r["parameters"]["parameter"].as_str()),
        (Some("org.varlink.service.InvalidParameter"), Some("port"))
    );
    let r = raw_call(&mut s, b"{\"method\":\"io.natbinder.Nothing\"}\0");
    assert_eq!(r["error"], "org.varlink.service.MethodNotFound");
    let r = raw_call(&mut s, b"{\"method\":\"org.varlink.service.GetInterfaceDescription\",\"parameters\":{\"interface\":\"io.natbinder\"}}\0");
    assert!(r["parameters"]["description"].as_str().is_some_and(|d| d.contains("interface io.natbinder")), "{r}");
    let mut s = UnixStream::connect(&socket).unwrap();
    let huge = vec![b' '; 100 * 1024];
    let _ = s.write_all(&huge);
    let r = reply(&mut s);
    assert_eq!(r["error"], "io.natbinder.InvalidMessage");
    assert!(r["parameters"]["problem"].as_str().is_some_and(|p| p.contains("longer than")), "{r}");
    status_works(&h);

    // An ordinary user opens connections and sends nothing: past its share it is turned away, and
    // root is not.
    let mut idle = Vec::new();
    let mut turned_away = None;
    for i in 0..20 {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", "import socket,sys,time\ns=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(1)\ntry:\n  sys.stdout.write(s.recv(4096).decode(errors='replace')); sys.exit(0)\nexcept socket.timeout: pass\ntime.sleep(60)"])
            .arg(&socket)
            .stdout(Stdio::piped());
        std::os::unix::process::CommandExt::uid(&mut cmd, NOBODY);
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        if i >= 16 && turned_away.is_none() {
            std::thread::sleep(Duration::from_millis(1100));
            let mut out = String::new();
            let mut stdout = child.stdout.take().unwrap();
            stdout.read_to_string(&mut out).ok();
            turned_away = Some(out);
            let _ = child.kill();
        }
        idle.push(child);
    }
    let away = turned_away.unwrap();
    assert!(away.contains("io.natbinder.TooManyClients"), "the 17th idle connection of one user was kept: {away:?}");
    status_works(&h);
    let (code, _, err) = h.cli_as(Some(NOBODY - 1), &["status"]).unwrap();
    assert_eq!(code, 0, "another user is served: {err}");
    for mut c in idle {
        let _ = c.kill();
        let _ = c.wait();
    }

    // A watcher that never reads while a thousand binds come and go: it is dropped, others served.
    let mut stuck = UnixStream::connect(&socket).unwrap();
    stuck.write_all(b"{\"method\":\"io.natbinder.Watch\",\"more\":true}\0").unwrap();
    let (_burst, _o) = h.app("burst", &["burst", "1000", "30000", "5"]).unwrap();
    status_works(&h);
    for port in 30000..30005 {
        assert!(h.reachable_udp(port, LIMIT).is_some(), "burst's kept socket {port} was not mapped:\n{}", log_text());
    }
    status_works(&h);
    let _ = h.natbinder().drain();
}

/// Every command, for people and as JSON: exit 0, text that is not JSON, JSON that parses with the
/// documented top-level fields.
#[test]
fn every_command_answers_for_people_and_in_json() {
    let (mut h, _apps) = lab_with_three_ports();
    let commands: &[(&[&str], &str)] = &[
        (&["status"], "counts"),
        (&["list"], "mappings"),
        (&["list", "--all"], "mappings"),
        (&["get", "tcp", "8080"], "mapping"),
        (&["external-ip"], "address"),
        (&["reload"], "needs_restart"),
        (&["add", "tcp", "25000", "--description", "game"], "static"),
        (&["describe", "tcp", "25000", "game server"], "description"),
        (&["disable", "tcp", "25000"], "state"),
        (&["enable", "tcp", "25000"], "state"),
    ];
    for (args, field) in commands {
        let (code, out, err) = h.cli(args).unwrap();
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(!out.trim().is_empty() && !out.trim_start().starts_with('{'), "{args:?} for people:\n{out}");
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let (code, out, err) = h.cli(&with_json).unwrap();
        assert_eq!(code, 0, "{with_json:?}: {err}");
        let value = json(&out);
        assert!(value.get(*field).is_some(), "{with_json:?} has no {field}: {out}");
    }
    let (code, out, _) = h.cli(&["delete", "tcp", "25000"]).unwrap();
    assert!(code == 0 && out.contains("deleted the static mapping tcp/25000"), "{out}");

    // watch for people: one line per outcome, "TIME  TEXT".
    let (mut watch, mut lines) = spawn_watch(&h, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let (_late, _o) = h.app("late", &["tcp-echo", "0.0.0.0:8082"]).unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        assert!(Instant::now() < deadline, "watch showed no mapping of tcp/8082");
        let line = lines.next().expect("watch ended").unwrap();
        let (time, text) = line.split_once("  ").unwrap_or_else(|| panic!("not TIME  TEXT: {line}"));
        assert!(time.ends_with('Z') && time.len() == 24, "{line}");
        if text.starts_with("mapped tcp/8082") {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = h.natbinder().drain();
}
