//! `cargo xtask bench`: natbinder measured in the lab, each figure against a baseline taken in the same
//! run, written to BENCHMARKS.md and an SVG of the latency distributions.
//!
//! * `overhead`: what the hooks cost bind(), connect() and close(), watched cgroup vs. a sibling;
//! * `latency`: bind-to-reachable and release-to-closed per protocol, against the gateway's own floor
//!   and the tools users run today (`upnpc -a`, `natpmpc -a`);
//! * `burst`: bursts of listeners, against the gateway's own service time, and the daemon's footprint;
//! * `run --wait` and `run`'s cost;
//! * `scale`: one reconcile pass with 1,000 mappings on the gateway, listed in one call, by index, or
//!   checked entry by entry.
mod burst;
mod daemon;
mod empty_hooks;
mod floor;
mod latency;
mod overhead;
mod progstats;
mod report;
mod run_cost;
mod scale;
mod stats;

use std::path::PathBuf;

use anyhow::Result;
use floor::Protocol;
use natbinder_lab::{Lab, LabConfig};

use crate::workspace_root;

pub struct Options {
    pub samples: usize,
    /// The protocols whose latency is measured: upnp, pcp, natpmp.
    pub protocols: Vec<String>,
    pub natbinder: Option<PathBuf>,
    /// Only these parts (overhead, latency, burst, run, scale); all when empty.
    pub only: Vec<String>,
    /// The larger burst's listeners (the smaller is 100).
    pub burst: u16,
    /// Where BENCHMARKS.md and benchmarks.svg go.
    pub out: PathBuf,
    /// The command line, for the report.
    pub command: String,
}

/// The binary as built, and stripped as the packages ship it (`strip --strip-unneeded`, as `cargo xtask rpm`).
fn binary_sizes(natbinder: &std::path::Path) -> Option<(u64, u64)> {
    let built = std::fs::metadata(natbinder).ok()?.len();
    let stripped = std::env::temp_dir().join(format!("natbinder-bench-stripped-{}", std::process::id()));
    let status =
        std::process::Command::new("strip").arg("--strip-unneeded").arg("-o").arg(&stripped).arg(natbinder).status();
    let size = status.ok().filter(|s| s.success()).and_then(|_| std::fs::metadata(&stripped).ok()).map(|m| m.len());
    let _ = std::fs::remove_file(&stripped);
    Some((built, size?))
}

/// The machine and the software measured, for the report's head.
fn machine(natbinder: &std::path::Path) -> Vec<(String, String)> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_default();
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|m| m.trim().to_string()))
        .unwrap_or_default();
    let output = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = output("git", &["-C", &crate::workspace_root().to_string_lossy(), "rev-parse", "--short", "HEAD"]);
    let dirty = !output(
        "git",
        &["-C", &crate::workspace_root().to_string_lossy(), "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    let size = std::fs::metadata(natbinder).map(|m| m.len()).unwrap_or(0);
    vec![
        ("kernel".into(), read("/proc/sys/kernel/osrelease").trim().to_string()),
        ("CPU".into(), format!("{cpu}, {} cores", std::thread::available_parallelism().map_or(0, |n| n.get()))),
        ("memory".into(), memory),
        ("gateway".into(), output("sh", &["-c", "miniupnpd --version 2>&1 | head -1"])),
        (
            "natbinder".into(),
            format!(
                "{} ({commit}{}), {:.1} MiB as built",
                natbinder.display(),
                if dirty { ", modified" } else { "" },
                size as f64 / 1048576.0
            ),
        ),
    ]
}

/// Where cargo put the release build (CARGO_TARGET_DIR is honoured, as cargo does).
pub fn release_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from).join("release")
}

pub fn run(options: Options) -> Result<()> {
    let release = release_dir();
    let natbinder = options.natbinder.clone().unwrap_or_else(|| release.join("natbinder"));
    let testapp = release.join("natbinder-testapp");
    let started = std::time::Instant::now();
    let mut report = report::Report { command: options.command.clone(), ..Default::default() };
    let wants = |part: &str| options.only.is_empty() || options.only.iter().any(|p| p == part);
    for (protocol, backend) in [(Protocol::Upnp, "upnp"), (Protocol::Pcp, "pcp"), (Protocol::NatPmp, "natpmp")] {
        let does_overhead = protocol == Protocol::Upnp && wants("overhead");
        let does_burst = protocol == Protocol::Upnp && wants("burst");
        let does_run = protocol == Protocol::Upnp && wants("run");
        let does_latency = wants("latency") && options.protocols.iter().any(|p| p == backend);
        if !(does_overhead || does_latency || does_burst || does_run) {
            continue;
        }
        let config = match protocol {
            Protocol::Upnp => LabConfig::default(),
            _ => LabConfig { upnp: false, natpmp: true, ..LabConfig::default() },
        };
        let mut lab = Lab::start(config)?;
        // The bursts hold more mappings than a desktop user may by default.
        let daemon = daemon::Daemon::start(&mut lab, &natbinder, backend, &["--max-mappings-per-user", "0"])?;
        if does_overhead {
            println!("bind()/connect()/close() in the watched cgroup vs. a sibling without programs (median ns per operation, ratio: median of rounds, IQR):");
            report.overhead = overhead::measure(&lab, &daemon, &testapp)?;
        }
        if does_latency {
            report.latency.push(latency::measure(&lab, &daemon, &testapp, protocol, options.samples)?);
        }
        if does_run {
            println!("natbinder run --wait, and what run costs a bind loop");
            let wait = run_cost::run_wait(&lab, &daemon, &testapp, options.samples.min(50))?;
            report.sections.push(("`natbinder run --wait`: the paper's blocking bind()".into(), wait));
            let cost = run_cost::run_cost(&lab, &daemon, &testapp)?;
            report.sections.push(("What `natbinder run` costs a bind loop".into(), cost));
        }
        if does_burst {
            println!("a burst of listeners over UPnP IGD (miniupnpd):");
            report.bursts.push(burst::measure(&lab, burst::Gateway::Miniupnpd, &daemon, &testapp, 100, 30000, true)?);
        }
        lab.kill(daemon.pid, libc::SIGTERM);
        // The lab's directory goes with the lab; the daemon's log is worth a look afterwards.
        let kept = std::env::temp_dir().join(format!("natbinder-bench-daemon-{backend}.log"));
        let _ = std::fs::copy(&daemon.log, &kept);
    }
    if wants("burst") {
        // miniupnpd's adds slow down as its nftables table grows: the larger burst runs against the
        // fake IGD, which answers at once, so that what is timed is natbinder's own work.
        let mut lab = Lab::start(LabConfig { miniupnpd: false, ..LabConfig::default() })?;
        let fake = natbinder_lab::fake_igd::FakeIgd::start(&lab, natbinder_lab::fake_igd::FakeScript::new())?;
        let daemon = daemon::Daemon::start(&mut lab, &natbinder, "upnp", &["--max-mappings-per-user", "0"])?;
        println!("a burst of listeners over UPnP IGD (the fake IGD):");
        report.bursts.push(burst::measure(
            &lab,
            burst::Gateway::Fake(&fake),
            &daemon,
            &testapp,
            options.burst,
            31000,
            false,
        )?);
        lab.kill(daemon.pid, libc::SIGTERM);
    }
    if wants("scale") {
        // 1,000 mappings: the fake IGD again, for the same reason as the larger burst.
        let mut lab = Lab::start(LabConfig { miniupnpd: false, ..LabConfig::default() })?;
        println!("one reconcile pass with {} mappings on the gateway (the fake IGD):", scale::MAPPINGS);
        report.scale = scale::measure(&mut lab, &natbinder, &testapp)?;
    }
    report.took_seconds = started.elapsed().as_secs_f64();
    report.machine = machine(&natbinder);
    report.binary = binary_sizes(&natbinder);
    report.write(&options.out)
}
