//! Measurements in the lab, each against a baseline taken in the same run:
//! * bind() cost with natbinder's hooks attached vs. without (ratio);
//! * bind-to-reachable: from a server's bind() to the first answer at the WAN peer (p50/p90).
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
fn bind_loop(lab: &Lab, testapp: &std::path::Path, iterations: usize) -> Result<f64> {
    let out = lab.command(&lab.lan1, true, testapp)?.args(["bind-loop", &iterations.to_string()]).output()?;
    if !out.status.success() {
        bail!("bind-loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| format!("bind-loop printed {text:?}"))
}

pub fn run(samples: usize) -> Result<()> {
    let release = workspace_root().join("target/release");
    let natbinder = release.join("natbinder");
    let testapp = release.join("natbinder-testapp");
    let mut lab = Lab::start(LabConfig::default())?;

    // 1. bind() overhead: the same explicit wildcard bind+close loop, without and with the hooks.
    let iterations = 20_000;
    let without: Vec<f64> = (0..5).map(|_| bind_loop(&lab, &testapp, iterations)).collect::<Result<_>>()?;
    let mut cmd = lab.command(&lab.lan1, false, &natbinder)?;
    let log = std::fs::File::create(lab.dir.join("bench-daemon.log"))?;
    cmd.args(["daemon", "--cgroup"]).arg(&lab.cgroup.path).stdout(log.try_clone()?).stderr(log);
    let daemon_pid = lab.spawn(cmd)?;
    wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(lab.dir.join("bench-daemon.log")).ok()?.contains("ready:").then_some(())
    })
    .context("natbinder did not become ready")?;
    let with: Vec<f64> = (0..5).map(|_| bind_loop(&lab, &testapp, iterations)).collect::<Result<_>>()?;
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (base, hooked) = (median(&without), median(&with));
    println!("bind()+close() of a forwardable UDP socket, {iterations} per run, median of 5 runs:");
    println!("  without natbinder: {base:.0} ns   with natbinder: {hooked:.0} ns   ratio: {:.3}x", hooked / base);

    // 2. bind-to-reachable latency.
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let port = 20000 + i as u16;
        let mut cmd = lab.command(&lab.lan1, true, &testapp)?;
        cmd.args(["tcp-echo", &format!("0.0.0.0:{port}")]).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        let bound = Instant::now();
        let reached = wait_for(Duration::from_secs(10), || {
            matches!(tcp_from_wan(&lab, port, "x"), Reach::Answered(_)).then_some(bound.elapsed())
        });
        let _ = child.kill();
        let _ = child.wait();
        latencies.push(reached.context("a server never became reachable")?.as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    println!("bind-to-reachable from the WAN peer, {samples} servers (release build, miniupnpd 2.3 nftables):");
    println!(
        "  p50 {:.1} ms   p90 {:.1} ms   max {:.1} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        latencies.last().unwrap()
    );
    lab.kill(daemon_pid, libc::SIGTERM);
    Ok(())
}
