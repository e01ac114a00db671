//! `natbinder doctor` as an administrator sees it, the real binary run in the lab's lan1:
//! * on a machine that has everything, with miniupnpd: nothing blocks, each protocol is reported with
//!   its answer time, the external address is public, the daemon answers;
//! * it names what is missing, with a non-zero exit: no privilege (an ordinary user), no cgroup2
//!   mount (a mount namespace without it);
//! * it warns about what makes mappings useless: an input filter that drops (nftables in lan1), a
//!   double NAT (a scripted fake IGD reporting a private external address, which the lab's miniupnpd
//!   is not set up to show), a stale control socket.
use natbinder_lab::fake_igd::{FakeIgd, FakeScript};
use natbinder_tests::*;
use serde_json::Value;

const NOBODY: u32 = 65534;

/// Runs `natbinder doctor --json ARGS` in lan1 as `uid` (None: root), optionally through `wrap` (a
/// command that runs natbinder); returns the exit code and the report.
fn doctor(h: &Harness, uid: Option<u32>, wrap: &[&str], args: &[&str]) -> (i32, Value) {
    let natbinder = h.runnable_by_anyone(&natbinder_bin()).unwrap();
    let ns = Netns { name: h.lab.lan1.name.clone() };
    let (program, mut words): (std::ffi::OsString, Vec<std::ffi::OsString>) = match wrap.split_first() {
        Some((first, rest)) => {
            (first.into(), rest.iter().map(Into::into).chain([natbinder.into_os_string()]).collect())
        }
        None => (natbinder.into_os_string(), Vec::new()),
    };
    words.extend(["doctor", "--json", "--discovery-timeout", "2", "--socket"].map(Into::into));
    words.push(h.control_socket().into_os_string());
    words.extend(args.iter().map(Into::into));
    let mut cmd = natbinder_lab::command_in_as(&ns, None, uid.map(|u| (u, u)), program).unwrap();
    cmd.args(words);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}

/// The checks of `area` whose status is `status`, their details.
fn found(report: &Value, area: &str, status: &str) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["area"] == area && c["status"] == status)
        .map(|c| c["detail"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn on_a_machine_with_everything_nothing_blocks_and_each_protocol_is_timed() {
    let config = LabConfig { natpmp: true, ..LabConfig::default() };
    let mut h = Harness::lab_only(config).unwrap();
    h.start_daemon_in_process(&[]).unwrap();
    // The report for people, as the closing note quotes it.
    let natbinder = natbinder_bin();
    let mut text = natbinder_lab::command_in(&Netns { name: h.lab.lan1.name.clone() }, None, &natbinder).unwrap();
    let text = text.args(["doctor", "--discovery-timeout", "2", "--socket"]).arg(h.control_socket()).output().unwrap();
    println!("{}", String::from_utf8_lossy(&text.stdout));
    assert_eq!(text.status.code(), Some(0));

    let (code, report) = doctor(&h, None, &[], &[]);
    assert_eq!((code, &report["blocked"]), (0, &Value::Bool(false)), "{report:#}");
    assert!(found(&report, "kernel", "fail").is_empty(), "{report:#}");
    assert_eq!(found(&report, "privileges", "ok"), ["running as root"]);
    assert!(found(&report, "cgroup2", "ok")[0].contains("cgroup2 is mounted at"));
    let gateways = found(&report, "gateway", "ok");
    for protocol in ["UPnP IGD", "PCP", "NAT-PMP"] {
        let line = gateways.iter().find(|g| g.starts_with(protocol)).unwrap_or_else(|| panic!("{report:#}"));
        assert!(line.contains("192.168.77.1") && line.contains(" answered in ") && line.ends_with(" ms"), "{line}");
    }
    assert!(gateways.iter().any(|g| g == "external address 11.77.77.77 (public: no double NAT)"), "{gateways:?}");
    assert_eq!(found(&report, "firewall", "ok").len(), 1);
    assert!(found(&report, "daemon", "ok")[0].starts_with("natbinder "), "{report:#}");

    // An input chain that drops by default, in lan1: a mapping's connections would die here.
    h.lab.lan1.exec("nft", &["add table inet guard"]).unwrap();
    h.lab
        .lan1
        .exec("nft", &["add chain inet guard input { type filter hook input priority 0 ; policy drop ; }"])
        .unwrap();
    // Answers to what lan1 sends (the gateway's) still come in.
    h.lab.lan1.exec("nft", &["add rule inet guard input ct state established,related accept"]).unwrap();
    let (code, report) = doctor(&h, None, &[], &[]);
    let warned = found(&report, "firewall", "warn");
    assert_eq!(code, 0, "a firewall does not keep natbinder from working");
    // `status` says so too.
    let (code, out, err) = h.cli(&["status"]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("firewall may drop") && out.contains("inet guard, chain input"), "{out}");
    assert!(
        warned.len() == 1
            && warned[0].contains("nftables table inet guard, chain input")
            && warned[0].contains("policy is drop"),
        "{warned:?}"
    );
}

#[test]
fn it_names_a_missing_privilege_and_a_missing_cgroup2_mount_and_exits_non_zero() {
    let h = Harness::lab_only(LabConfig::default()).unwrap();
    let (code, report) = doctor(&h, Some(NOBODY), &[], &[]);
    assert_eq!(code, 1, "{report:#}");
    let failed = found(&report, "privileges", "fail");
    assert!(failed.len() == 1 && failed[0].contains("not root") && failed[0].contains("CAP_BPF"), "{report:#}");
    assert!(report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["fix"].as_str().is_some_and(|f| f.contains("sudo natbinder doctor"))));

    // A mount namespace of its own, where cgroup2 is unmounted.
    let root = cgroup2_root().unwrap();
    let script = format!("umount {} && exec \"$0\" \"$@\"", root.display());
    let (code, report) =
        doctor(&h, None, &["unshare", "--mount", "--propagation", "private", "sh", "-c", &script], &[]);
    assert_eq!(code, 1, "{report:#}");
    let failed = found(&report, "cgroup2", "fail");
    assert!(failed.len() == 1 && failed[0].contains("no cgroup2 filesystem is mounted"), "{report:#}");
    // Nothing leaked out of that namespace.
    assert!(cgroup2_root().is_ok());
}

#[test]
fn it_warns_of_a_double_nat_and_of_a_stale_control_socket() {
    let h = Harness::lab_only(LabConfig { miniupnpd: false, ..Default::default() }).unwrap();
    let _fake = FakeIgd::start(&h.lab, FakeScript::new().external_ip(std::net::Ipv4Addr::new(100, 64, 0, 1))).unwrap();
    // A control socket whose daemon is gone.
    let stale = std::os::unix::net::UnixListener::bind(h.control_socket()).unwrap();
    drop(stale);
    let (code, report) = doctor(&h, None, &[], &[]);
    assert_eq!(code, 0, "{report:#}");
    let warned = found(&report, "gateway", "warn");
    assert!(warned.len() == 1 && warned[0].contains("double NAT") && warned[0].contains("100.64.0.1"), "{report:#}");
    let daemon = found(&report, "daemon", "warn");
    assert!(daemon.len() == 1 && daemon[0].contains("stale control socket"), "{report:#}");
    // With no socket file at all, the daemon is simply not running.
    std::fs::remove_file(h.control_socket()).unwrap();
    let (_, report) = doctor(&h, None, &[], &[]);
    assert!(found(&report, "daemon", "info")[0].contains("not running"), "{report:#}");
}
