//! An operator's changes through the CLI, against the real miniupnpd with natbinder in the test
//! process: static mappings (add, describe, delete) and turning a program's port off and on
//! (disable, enable), each kept across a restart of the daemon, and refused to ordinary users.
use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Duration,
};

use natbinder_tests::{inprocess::log_text, *};

const LIMIT: Duration = Duration::from_secs(15);
const NOBODY: u32 = 65534;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn ok(h: &Harness, args: &[&str]) -> String {
    let (code, out, err) = h.cli(args).unwrap();
    assert_eq!(code, 0, "natbinder {args:?}: {err}\n{}", log_text());
    out
}

fn restart(h: &mut Harness) {
    h.natbinder().stop().unwrap();
    h.start_daemon_in_process(&[]).unwrap();
}

#[test]
fn a_static_mapping_forwards_a_port_survives_a_restart_and_goes_on_delete() {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    h.start_daemon_in_process(&[]).unwrap();
    // A server outside the watched cgroup: natbinder never sees its bind.
    let mut cmd = h.lab.command(&h.lab.lan1, false, testapp_bin()).unwrap();
    cmd.args(["tcp-echo", "0.0.0.0:25565"]).env("TESTAPP_NAME", "outside").stdout(Stdio::piped());
    let mut server = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "bound 25565");
    assert_eq!(tcp_from_wan(&h.lab, 25565, "ping"), Reach::Refused, "precondition: nothing forwards it");

    let (code, _, err) = h.cli_as(Some(NOBODY), &["add", "tcp", "25565"]).unwrap();
    assert!(code == 4 && err.contains("not permitted to add tcp/25565"), "{code}: {err}");
    let out = ok(&h, &["add", "tcp", "25565", "--description", "minecraft"]);
    assert!(out.contains("static \"minecraft\""), "{out}");
    assert_eq!(h.reachable_tcp(25565, LIMIT).as_deref(), Some("outside:ping"));
    assert!(
        h.mapping("TCP", 25565).is_some_and(|m| m.description.contains("minecraft")),
        "{:?}",
        h.mapping("TCP", 25565)
    );
    let (code, _, err) = h.cli(&["add", "tcp", "80"]).unwrap();
    assert!(code == 1 && err.contains("privileged"), "{code}: {err}");
    let (code, _, err) = h.cli(&["add", "tcp", "25566", "--description", &"x".repeat(65)]).unwrap();
    assert!(code == 2 && err.contains("description"), "{code}: {err}");

    ok(&h, &["describe", "tcp", "25565", "survival world"]);
    // On the gateway, natbinder's own tag: "natbinder@HOST DESCRIPTION", spaces made underscores so
    // that it reads back as one word.
    let described = wait_for(LIMIT, || h.mapping("TCP", 25565).filter(|m| m.description.ends_with(" survival_world")));
    assert!(described.is_some(), "the gateway shows the new description: {:?}", h.mapping("TCP", 25565));

    restart(&mut h);
    assert_eq!(h.reachable_tcp(25565, LIMIT).as_deref(), Some("outside:ping"), "restored after a restart");
    let entry = json(&ok(&h, &["get", "tcp", "25565", "--json"]));
    assert_eq!(
        (entry["mapping"]["static"].as_bool(), entry["mapping"]["description"].as_str()),
        (Some(true), Some("survival world"))
    );
    assert_eq!(entry["mapping"]["state"], "mapped");

    let (code, _, err) = h.cli_as(Some(NOBODY), &["delete", "tcp", "25565"]).unwrap();
    assert!(code == 4 && err.contains("not permitted to delete tcp/25565"), "{code}: {err}");
    ok(&h, &["delete", "tcp", "25565"]);
    assert!(wait_for(LIMIT, || h.mapping("TCP", 25565).is_none().then_some(())).is_some(), "deleted from the gateway");
    assert_eq!(tcp_from_wan(&h.lab, 25565, "ping"), Reach::Refused);
    let (code, _, err) = h.cli(&["delete", "tcp", "25565"]).unwrap();
    assert!(code == 1 && err.contains("no static mapping tcp/25565"), "{code}: {err}");
    restart(&mut h);
    std::thread::sleep(Duration::from_millis(300));
    assert!(h.mapping("TCP", 25565).is_none(), "a deleted static mapping came back after a restart");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn disable_takes_a_programs_port_off_the_gateway_until_enable_even_across_a_restart() {
    let mut h = Harness::lab_only(LabConfig::default()).unwrap();
    h.start_daemon_in_process(&[]).unwrap();
    let (_web, _o) = h.app("web", &["tcp-echo", "0.0.0.0:8080"]).unwrap();
    assert!(h.reachable_tcp(8080, LIMIT).is_some());

    let (code, _, err) = h.cli_as(Some(NOBODY), &["disable", "tcp", "8080"]).unwrap();
    assert_eq!(code, 4, "{err}");
    let out = ok(&h, &["disable", "tcp", "8080"]);
    assert!(out.contains("disabled"), "{out}");
    assert!(wait_for(LIMIT, || h.mapping("TCP", 8080).is_none().then_some(())).is_some(), "off the gateway");
    assert_eq!(tcp_from_wan(&h.lab, 8080, "ping"), Reach::Refused);
    let status = json(&ok(&h, &["status", "--json"]));
    assert_eq!(status["counts"]["disabled"], 1, "{status}");

    restart(&mut h);
    std::thread::sleep(Duration::from_millis(300));
    assert!(h.mapping("TCP", 8080).is_none(), "disabled is remembered across a restart");
    let entry = json(&ok(&h, &["get", "tcp", "8080", "--json"]));
    assert_eq!(entry["mapping"]["state"], "disabled", "{entry}");

    ok(&h, &["enable", "tcp", "8080"]);
    assert_eq!(h.reachable_tcp(8080, LIMIT).as_deref(), Some("web:ping"), "enable puts it back");
}
