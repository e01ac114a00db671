//! Measurements in the lab, each against a baseline taken in the same run:
//! * bind() cost with natbinder's hooks attached vs. without (ratio);
//! * bind-to-reachable: from a server's bind() to the first answer at the WAN peer (p50/p90), one
//!   server at a time, and in a churn where a program closes one port and at once binds the next (a
//!   port search, a restart), so that the previous port's delete is due when the next port's add is.
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
    let out = lab.command(&lab.lan1, true, testapp)?.args(["bind-loop", &iterations.to_string(), addr]).output()?;
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
    println!("bind()+close() in a loop of {iterations}, median of 5 runs (same run, same machine):");
    for ((label, addr), base) in cases.iter().zip(&without) {
        let runs: Vec<f64> = (0..5).map(|_| bind_loop(&lab, &testapp, iterations, addr)).collect::<Result<_>>()?;
        let hooked = median(&runs);
        println!("  {label:42} without {base:6.0} ns   with {hooked:6.0} ns   ratio {:.3}x", hooked / base);
    }
    lab.kill(daemon_pid, libc::SIGTERM);
    Ok(())
}
