//! Measurements in the lab, each against a baseline taken in the same run:
//! * bind() cost with natbinder's hooks attached vs. without (ratio);
//! * bind-to-reachable: from a server's bind() to the first answer at the WAN peer (p50/p90), one
//!   server at a time, and in a churn where a program closes one port and at once binds the next (a
//!   port search, a restart), so that the previous port's delete is due when the next port's add is;
//! * `natbinder run --wait` (UPnP IGD): how long a forwarded bind() is held, against the gateway's own
//!   add latency (a bare SOAP AddPortMapping from lan1, sampled between the same runs);
//! * what `natbinder run` costs a bind-heavy program: bind()+close() loops without any hook, in the
//!   watched cgroup (the automatic mode), under `run`, and under `run --wait`.
use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use natbinder_lab::*;

use crate::workspace_root;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `natbinder-testapp bind-loop` in lan1 (in the watched cgroup) and returns ns per bind.
fn bind_loop(lab: &Lab, testapp: &std::path::Path, iterations: usize, addr: &str) -> Result<f64> {
    let mut cmd = lab.command(&lab.lan1, true, testapp)?;
    cmd.args(["bind-loop", &iterations.to_string(), addr]);
    timed_loop(cmd)
}

/// The ns per bind a `bind-loop` command printed.
fn timed_loop(mut cmd: std::process::Command) -> Result<f64> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("bind-loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| format!("bind-loop printed {text:?}"))
}

/// Probes `port` on the gateway's WAN address from the WAN peer until a connection succeeds, and
/// returns how long after `bound` that was (None after 10 s).
fn first_reachable(lab: &Lab, port: u16, bound: Instant) -> Option<Duration> {
    lab.wan.run(move || {
        while bound.elapsed() < Duration::from_secs(10) {
            let addr = std::net::SocketAddr::from((GW_WAN_IP, port));
            // RTT inside the lab is tens of microseconds: a SYN that needs longer than 5 ms was dropped
            // (miniupnpd adds its DNAT rule before its filter rule), so probe again.
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(5)).is_ok() {
                return Some(bound.elapsed());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    })
}

/// `natbinder-testapp churn`: `samples` steps from `from`, each "close this port, bind the next";
/// returns each new port's bind-to-reachable in ms. `pause`: how long after a port is reachable the
/// program takes its next step.
fn churn(lab: &Lab, testapp: &std::path::Path, samples: usize, from: u16, pause: Duration) -> Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(samples);
    let mut cmd = lab.command(&lab.lan1, true, testapp)?;
    cmd.args(["churn", &from.to_string(), &samples.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    for _ in 0..samples {
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let bound = Instant::now();
        let port: u16 = line
            .trim()
            .strip_prefix("bound ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("churn printed {line:?}"))?;
        let reached =
            first_reachable(lab, port, bound).with_context(|| format!("churn port {port} never became reachable"))?;
        latencies.push(reached.as_secs_f64() * 1e3);
        std::thread::sleep(pause);
        std::io::Write::write_all(&mut stdin, b"next\n")?;
    }
    let _ = child.kill();
    let _ = child.wait();
    // Let the daemon remove the last mapping.
    std::thread::sleep(Duration::from_millis(200));
    Ok(latencies)
}

fn print_latencies(label: &str, latencies: &mut [f64]) {
    latencies.sort_by(f64::total_cmp);
    println!(
        "  {label:44} p50 {:5.1} ms   p90 {:5.1} ms   max {:5.1} ms",
        percentile(latencies, 0.5),
        percentile(latencies, 0.9),
        latencies.last().unwrap()
    );
}

/// `backend`: upnp (miniupnpd with UPnP IGD), or pcp / natpmp (miniupnpd with UPnP off, natbinder told
/// to use that protocol). `natbinder`: the daemon binary to measure (default: this tree's release build).
pub fn run(samples: usize, backend: &str, natbinder: Option<std::path::PathBuf>) -> Result<()> {
    let release = workspace_root().join("target/release");
    let natbinder = natbinder.unwrap_or_else(|| release.join("natbinder"));
    let testapp = release.join("natbinder-testapp");
    let config = match backend {
        "upnp" => LabConfig::default(),
        _ => LabConfig { upnp: false, natpmp: true, ..LabConfig::default() },
    };
    let mut lab = Lab::start(config)?;

    // 1. bind() overhead: the same bind+close loop, without and with the hooks. Loopback binds take the
    //    hooks' fast path (what every other program on the machine pays); wildcard binds are reported,
    //    so they also pay for the event and compete with the daemon and miniupnpd for the CPU.
    let iterations = 20_000;
    let cases = [
        ("loopback 127.0.0.1:40000 (not forwarded)", "127.0.0.1:40000"),
        ("wildcard 0.0.0.0:40000 (forwarded)", "0.0.0.0:40000"),
    ];
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut without = Vec::new();
    for (_, addr) in cases {
        let runs: Vec<f64> = (0..5).map(|_| bind_loop(&lab, &testapp, iterations, addr)).collect::<Result<_>>()?;
        without.push(median(&runs));
    }
    let mut cmd = lab.command(&lab.lan1, false, &natbinder)?;
    let log = std::fs::File::create(lab.dir.join("bench-daemon.log"))?;
    cmd.args(["daemon", "--cgroup"])
        .arg(&lab.cgroup.path)
        .arg("--state-dir")
        .arg(lab.dir.join("state"))
        .args(["--backend", backend])
        .env("NATBINDER_LOG", std::env::var("BENCH_LOG").unwrap_or("warn".into()))
        .stdout(log.try_clone()?)
        .stderr(log);
    // Builds from before the control socket (`--natbinder PATH`, to compare) do not know the flag.
    let help = std::process::Command::new(&natbinder).args(["daemon", "--help"]).output()?;
    if String::from_utf8_lossy(&help.stdout).contains("--control-socket") {
        cmd.arg("--control-socket").arg(lab.dir.join("io.natbinder"));
    }
    let daemon_pid = lab.spawn(cmd)?;
    wait_for(Duration::from_secs(30), || {
        let log = std::fs::read_to_string(lab.dir.join("bench-daemon.log")).ok()?;
        log.is_empty().then_some(())
    });
    // With NATBINDER_LOG=warn there is no "ready" line: wait for the hooks by probing one bind's effect.
    std::thread::sleep(Duration::from_secs(2));
    // 2. bind-to-reachable latency (before the bind loops below, whose event storm would delay it).
    //    One server at a time: each mapping is removed before the next server binds.
    let mut single = Vec::with_capacity(samples);
    for i in 0..samples {
        let port = 20000 + i as u16;
        let mut cmd = lab.command(&lab.lan1, true, &testapp)?;
        cmd.args(["tcp-echo", &format!("0.0.0.0:{port}")]).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        let reached = first_reachable(&lab, port, Instant::now());
        let _ = child.kill();
        let _ = child.wait();
        // Let the daemon remove this mapping before the next sample, so each bind is measured alone.
        std::thread::sleep(Duration::from_millis(100));
        single.push(reached.context("a server never became reachable")?.as_secs_f64() * 1e3);
    }
    //    Churn: one program closes its port and binds the next at once, so the previous port's
    //    delete and the next port's add fall due together. Settled: the next step comes 100 ms after
    //    the port is reachable (a port search or a restart, now and then). Back to back: at once (a
    //    program that never stops moving, which measures the gateway's add + delete throughput).
    let settled = churn(&lab, &testapp, samples, 24000, Duration::from_millis(100))?;
    let back_to_back = churn(&lab, &testapp, samples, 26000, Duration::ZERO)?;
    println!(
        "bind-to-reachable from the WAN peer, {samples} samples each (release build, miniupnpd 2.3 nftables, {backend}):"
    );
    print_latencies("one server at a time", &mut single);
    print_latencies("churn: close one port, bind the next, settled", &mut settled.clone());
    print_latencies("churn: the same, back to back", &mut back_to_back.clone());
    // 3. run --wait, also before the bind loops: their storm of events pauses new mappings for a while.
    let knows_run = std::process::Command::new(&natbinder).args(["run", "--help"]).output()?.status.success();
    if knows_run && backend == "upnp" {
        run_wait(&lab, &natbinder, &testapp, samples)?;
    }
    println!("bind()+close() in a loop of {iterations}, median of 5 runs (same run, same machine):");
    for ((label, addr), base) in cases.iter().zip(&without) {
        let runs: Vec<f64> = (0..5).map(|_| bind_loop(&lab, &testapp, iterations, addr)).collect::<Result<_>>()?;
        let hooked = median(&runs);
        println!("  {label:42} without {base:6.0} ns   with {hooked:6.0} ns   ratio {:.3}x", hooked / base);
    }
    if knows_run {
        run_cost(&lab, &natbinder, &testapp)?;
    }
    lab.kill(daemon_pid, libc::SIGTERM);
    Ok(())
}

/// The gateway's own add latency: one SOAP AddPortMapping for `port` from lan1 (a new TCP connection,
/// as natbinder makes), in ms; the mapping is deleted again, untimed.
fn bare_soap_add(lab: &Lab, port: u16) -> Result<f64> {
    use std::io::{Read, Write};
    let port = port.to_string();
    let action = |name: &str, arguments: &str| -> Result<Duration> {
        let body = format!(
            "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
             <u:{name} xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:2\">{arguments}</u:{name}>\
             </s:Body></s:Envelope>"
        );
        let request = format!(
            "POST /ctl/IPConn HTTP/1.1\r\nHost: {GW_LAN_IP}:{}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
             SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:2#{name}\"\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            lab.config.http_port,
            body.len()
        );
        let (http_port, name) = (lab.config.http_port, name.to_string());
        lab.lan1.run(move || {
            let started = Instant::now();
            let mut stream = std::net::TcpStream::connect((GW_LAN_IP, http_port))?;
            stream.write_all(request.as_bytes())?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            let took = started.elapsed();
            if !reply.starts_with("HTTP/1.1 200") {
                bail!("the gateway refused {name}: {}", reply.lines().next().unwrap_or(""));
            }
            Ok(took)
        })
    };
    let add = action(
        "AddPortMapping",
        &format!(
            "<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>TCP</NewProtocol>\
             <NewInternalPort>{port}</NewInternalPort><NewInternalClient>{LAN1_IP}</NewInternalClient>\
             <NewEnabled>1</NewEnabled><NewPortMappingDescription>bench floor</NewPortMappingDescription>\
             <NewLeaseDuration>3600</NewLeaseDuration>"
        ),
    )?;
    action(
        "DeletePortMapping",
        &format!(
            "<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>TCP</NewProtocol>"
        ),
    )?;
    Ok(add.as_secs_f64() * 1e3)
}

/// `natbinder run --wait`: how long a server's bind() is held (it returns once the gateway mapped the
/// port), against the gateway's own add latency, sampled alternately.
fn run_wait(lab: &Lab, natbinder: &std::path::Path, testapp: &std::path::Path, samples: usize) -> Result<()> {
    let mut floor = Vec::with_capacity(samples);
    let mut held = Vec::with_capacity(samples);
    for i in 0..samples {
        floor.push(bare_soap_add(lab, 30000 + i as u16)?);
        let port = 31000 + i as u16;
        let mut cmd = lab.command(&lab.lan1, false, natbinder)?;
        cmd.args(["run", "--wait", "--socket"])
            .arg(lab.dir.join("io.natbinder"))
            .arg("--")
            .arg(testapp)
            .args(["tcp-echo", &format!("0.0.0.0:{port}"), "--timed"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn()?;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut bound, mut took) = (String::new(), String::new());
        out.read_line(&mut bound)?;
        out.read_line(&mut took)?;
        let ns: f64 = took
            .trim()
            .strip_prefix("took ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("run --wait printed {bound:?} {took:?}"))?;
        held.push(ns / 1e6);
        if first_reachable(lab, port, Instant::now()).is_none_or(|d| d > Duration::from_millis(50)) {
            bail!("tcp/{port} was not reachable at once after bind() returned under --wait");
        }
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(100));
    }
    floor.sort_by(f64::total_cmp);
    held.sort_by(f64::total_cmp);
    println!("natbinder run --wait, {samples} samples each, alternating (UPnP IGD):");
    print_latencies("the gateway's own add (bare SOAP call)", &mut floor);
    print_latencies("bind() held by run --wait until mapped", &mut held);
    println!(
        "  added by natbinder over the gateway's add: p50 {:+.1} ms, p90 {:+.1} ms",
        percentile(&held, 0.5) - percentile(&floor, 0.5),
        percentile(&held, 0.9) - percentile(&floor, 0.9)
    );
    Ok(())
}

/// What `natbinder run` costs a program that binds and closes in a loop: binds no hook sees, binds
/// in the watched cgroup (the automatic mode), under `run` (which execs the program in a run cgroup),
/// and under `run --wait` (each bind of an inet address goes through the supervisor). Not forwarded
/// addresses only, so that no gateway call is timed.
fn run_cost(lab: &Lab, natbinder: &std::path::Path, testapp: &std::path::Path) -> Result<()> {
    let iterations = 5_000;
    let socket = lab.dir.join("io.natbinder");
    let loop_under = |how: &str, addr: &str| -> Result<f64> {
        let n = iterations.to_string();
        let cmd = match how {
            "none" => {
                let mut cmd = lab.command(&lab.lan1, false, testapp)?;
                cmd.args(["bind-loop", &n, addr]);
                cmd
            }
            "watched" => {
                let mut cmd = lab.command(&lab.lan1, true, testapp)?;
                cmd.args(["bind-loop", &n, addr]);
                cmd
            }
            _ => {
                let mut cmd = lab.command(&lab.lan1, false, natbinder)?;
                cmd.args(["run", "--socket"]).arg(&socket);
                if how == "run --wait" {
                    cmd.arg("--wait");
                }
                cmd.arg("--").arg(testapp).args(["bind-loop", &n, addr]);
                cmd
            }
        };
        timed_loop(cmd)
    };
    println!("bind()+close() x {iterations} under natbinder run, median of 5 runs, interleaved (ns per bind):");
    for addr in ["127.0.0.1:40000", "0.0.0.0:0"] {
        let hows = ["none", "watched", "run", "run --wait"];
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); hows.len()];
        for _ in 0..5 {
            for (i, how) in hows.iter().enumerate() {
                runs[i].push(loop_under(how, addr)?);
            }
        }
        let medians: Vec<f64> = runs
            .iter_mut()
            .map(|r| {
                r.sort_by(f64::total_cmp);
                r[r.len() / 2]
            })
            .collect();
        println!(
            "  {addr:16} no hooks {:6.0}   automatic mode {:6.0} ({:.2}x)   run {:6.0} ({:.2}x)   run --wait {:6.0} ({:.2}x)",
            medians[0],
            medians[1],
            medians[1] / medians[0],
            medians[2],
            medians[2] / medians[0],
            medians[3],
            medians[3] / medians[0]
        );
    }
    Ok(())
}
