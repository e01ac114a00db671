//! `natbinder run`: how long `--wait` holds a forwarded bind() against the gateway's own add, and what
//! `run` and `run --wait` cost a program that binds and closes in a loop. Written as a report section.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::Path,
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use natbinder_lab::Lab;

use super::{
    daemon::Daemon,
    floor::{self, Protocol},
    latency::{first_reachable, now_ns},
    stats::Samples,
};

/// The ns per operation a loop of natbinder-testapp printed.
fn timed_loop(mut cmd: std::process::Command) -> Result<f64> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("bind-loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| format!("bind-loop printed {text:?}"))
}

/// `natbinder run --wait` over UPnP IGD: how long a server's bind() is held (it returns once the gateway
/// mapped the port), against a bare add, sampled alternately. Returns the section's Markdown.
pub fn run_wait(lab: &Lab, daemon: &Daemon, testapp: &Path, samples: usize) -> Result<String> {
    let (mut floor, mut held) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for i in 0..samples {
        floor.push(floor::add_and_delete(lab, Protocol::Upnp, 32000 + i as u16)?.0);
        let port = 33000 + i as u16;
        let mut cmd = lab.command(&lab.lan1, false, &daemon.natbinder)?;
        cmd.args(["run", "--wait", "--socket"])
            .arg(&daemon.socket)
            .arg("--")
            .arg(testapp)
            .args(["tcp-echo", &format!("0.0.0.0:{port}"), "--timed"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut bound, mut took) = (String::new(), String::new());
        out.read_line(&mut bound)?;
        out.read_line(&mut took)?;
        let returned_at = now_ns();
        let Some(ns) = took.trim().strip_prefix("took ").and_then(|n| n.parse::<f64>().ok()) else {
            let _ = child.kill();
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
            bail!("natbinder run --wait printed {bound:?} {took:?}: {}", stderr.trim());
        };
        held.push(ns / 1e6);
        let reached = first_reachable(lab, port, Duration::from_secs(5));
        if reached.is_none_or(|at| at.saturating_sub(returned_at) > 50_000_000) {
            bail!("tcp/{port} was not reachable at once after bind() returned under --wait");
        }
        let _ = child.kill();
        let _ = child.wait();
        daemon.wait_idle(Duration::from_secs(30))?;
    }
    let (floor, held) = (Samples::new(floor), Samples::new(held));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "A server started with `natbinder run --wait` over UPnP IGD: its forwarded bind() returns once the \
         gateway has mapped the port (and the port is reachable at once, checked from the WAN peer). \
         {samples} samples, alternating with a bare add.\n"
    );
    let _ = writeln!(md, "| what (ms) | p50 | p90 | p99 |\n|---|---|---|---|");
    for (what, s) in [("the gateway's own add (bare SOAP call)", &floor), ("bind() held by run --wait", &held)] {
        let _ = writeln!(md, "| {what} | {:.1} | {:.1} | {:.1} |", s.median(), s.percentile(0.9), s.percentile(0.99));
    }
    let _ = writeln!(
        md,
        "\nAdded by natbinder over the gateway's add: p50 {:+.1} ms, p90 {:+.1} ms.",
        held.median() - floor.median(),
        held.percentile(0.9) - floor.percentile(0.9)
    );
    Ok(md)
}

/// What `natbinder run` costs a program that binds and closes in a loop: binds no hook sees, binds in
/// the watched cgroup (the automatic mode), under `run` (which execs the program in a run cgroup), and
/// under `run --wait` (each bind of an internet address goes through the supervisor). Addresses that
/// are not forwarded only, so that no gateway call is timed. Returns the section's Markdown.
pub fn run_cost(lab: &Lab, daemon: &Daemon, testapp: &Path) -> Result<String> {
    let iterations = 5_000.to_string();
    let loop_under = |how: &str, addr: &str| -> Result<f64> {
        let cmd = match how {
            "none" | "watched" => {
                let mut cmd = lab.command(&lab.lan1, how == "watched", testapp)?;
                cmd.args(["bind-loop", &iterations, addr]);
                cmd
            }
            _ => {
                let mut cmd = lab.command(&lab.lan1, false, &daemon.natbinder)?;
                cmd.args(["run", "--socket"]).arg(&daemon.socket);
                if how == "run --wait" {
                    cmd.arg("--wait");
                }
                cmd.arg("--").arg(testapp).args(["bind-loop", &iterations, addr]);
                cmd
            }
        };
        timed_loop(cmd)
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "socket()+bind()+close() x 5,000 in lan1, median of 5 interleaved runs, ns per bind: no hook, the \
         watched cgroup (the automatic mode), under `natbinder run`, and under `run --wait`.\n"
    );
    let _ = writeln!(md, "| address | no hook | automatic mode | run | run --wait |\n|---|---|---|---|---|");
    let hows = ["none", "watched", "run", "run --wait"];
    for addr in ["127.0.0.1:10001", "0.0.0.0:0"] {
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); hows.len()];
        for _ in 0..5 {
            for (i, how) in hows.iter().enumerate() {
                runs[i].push(loop_under(how, addr)?);
            }
        }
        let medians: Vec<f64> = runs.into_iter().map(|r| Samples::new(r).median()).collect();
        let _ = writeln!(
            md,
            "| {addr} | {:.0} | {:.0} ({:.2}x) | {:.0} ({:.2}x) | {:.0} ({:.2}x) |",
            medians[0],
            medians[1],
            medians[1] / medians[0],
            medians[2],
            medians[2] / medians[0],
            medians[3],
            medians[3] / medians[0]
        );
    }
    Ok(md)
}
