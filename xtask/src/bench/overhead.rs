//! What natbinder's hooks cost the programs they watch: the same loop in the watched cgroup (programs
//! attached, daemon running) and in a sibling cgroup without programs, in interleaved rounds.
//!
//! Rounds alternate their order (sibling first, then watched first) so that drift in the machine falls
//! on both sides alike, and each round's ratio is taken against the sibling run next to it. Where the
//! daemon has work (forwarded paths), the next run waits until it is idle again, so that its work is
//! charged to the watched runs that caused it and never to a baseline run.
use std::{path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use natbinder_lab::{command_in, Cgroup, Lab, LAN1_IP};

use super::{daemon::Daemon, progstats, stats::Samples};

/// The hook a program name (cut to 15 characters by the kernel) stands for.
fn hook_name(program: &str) -> &str {
    match program {
        "natbinder_bind4" => "bind4",
        "natbinder_bind6" => "bind6",
        "natbinder_post_" => "post_bind",
        "natbinder_sock_" => "sock_release",
        other => other,
    }
}

/// One measured path.
pub struct OverheadRow {
    pub path: String,
    /// Whether natbinder forwards the binds on this path (its goal is 1.05x; 1.02x otherwise).
    pub forwarded: bool,
    pub rounds: usize,
    /// ns per operation, one value per round: no programs, empty programs at the same hooks, natbinder.
    pub baseline_ns: Samples,
    pub empty_ns: Samples,
    pub watched_ns: Samples,
    /// watched / baseline of each round.
    pub ratios: Samples,
    /// empty / baseline of each round: the cgroup BPF machinery's own cost, the floor under any hook.
    pub empty_ratios: Samples,
    /// natbinder's programs in one more watched run with the kernel's run-time statistics on:
    /// (hook, mean ns per run, runs per operation).
    pub programs: Vec<(String, f64, f64)>,
}

impl OverheadRow {
    pub fn goal(&self) -> f64 {
        if self.forwarded {
            1.05
        } else {
            1.02
        }
    }
}

struct Case {
    path: String,
    forwarded: bool,
    rounds: usize,
    args: Vec<String>,
    /// Operations in one run (for runs per operation).
    operations: u64,
}

/// Rounds of each path natbinder does not forward. A run's noise on these machines is several percent
/// (the rounds' IQR spans about 0.1x), and the goal is judged at 2%: the median of 101 paired ratios
/// pins the ratio to better than 1%.
const ROUNDS: usize = 101;

/// The CPU every timed loop runs on, baseline and watched alike: the daemon and the gateway have the
/// other(s), as a busy program would leave them.
const LOOP_CPU: &str = "1";

fn cases() -> Vec<Case> {
    let n = |v: u32| v.to_string();
    let case = |path: String, forwarded, rounds, args: &[&str]| {
        let operations = match args {
            ["bind-ports", rounds, _, count] => rounds.parse::<u64>().unwrap() * count.parse::<u64>().unwrap(),
            [_, n, ..] => n.parse().unwrap(),
            _ => unreachable!(),
        };
        Case { path, forwarded, rounds, args: args.iter().map(|a| a.to_string()).collect(), operations }
    };
    // Ports below the ephemeral range, where no socket of the daemon or the bench can be.
    let lan = format!("{LAN1_IP}:10001");
    vec![
        case(
            "socket+bind+close, UDP 127.0.0.1:10001".into(),
            false,
            ROUNDS,
            &["bind-loop", &n(10_000), "127.0.0.1:10001"],
        ),
        case(
            format!("socket+bind+close, UDP {lan} (the LAN address)"),
            false,
            ROUNDS,
            &["bind-loop", &n(10_000), &lan],
        ),
        case(
            "socket+bind+close, UDP 0.0.0.0:0 (ephemeral)".into(),
            false,
            ROUNDS,
            &["bind-loop", &n(10_000), "0.0.0.0:0"],
        ),
        case("UDP client socket+connect+close to a local socket".into(), false, ROUNDS, &["connect-loop", &n(10_000)]),
        case(
            "forwarded: socket+bind+close, UDP 0.0.0.0:10002, again and again".into(),
            true,
            9,
            &["bind-loop", &n(30_000), "0.0.0.0:10002"],
        ),
        case(
            "forwarded storm: UDP 0.0.0.0:11000-11099 open at once, closed, 100 times".into(),
            true,
            7,
            &["bind-ports", "100", "11000", "100"],
        ),
    ]
}

/// Runs the testapp with `args` in `cgroup` (in lan1) and returns the ns per operation it printed. A
/// bind that finds its port taken is retried (up to 3 times, 200 ms apart), and who held the port is
/// printed: a run that failed measures nothing.
fn run_once(lab: &Lab, cgroup: &Cgroup, testapp: &Path, args: &[String]) -> Result<f64> {
    let mut attempt = 0;
    loop {
        let mut cmd = command_in(&lab.lan1, Some(cgroup), "taskset")?;
        cmd.args(["-c", LOOP_CPU]).arg(testapp).args(args);
        let out = cmd.output().with_context(|| format!("running natbinder-testapp {}", args.join(" ")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            attempt += 1;
            if stderr.contains("os error 98") && attempt <= 3 {
                let holders = lab.lan1.exec("ss", &["-uantp"]).unwrap_or_default();
                eprintln!(
                    "  retrying natbinder-testapp {} ({}); sockets in lan1:\n{holders}",
                    args.join(" "),
                    stderr.trim()
                );
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            bail!("natbinder-testapp {} in {} failed: {}", args.join(" "), cgroup.path.display(), stderr.trim());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        return text.trim().parse().with_context(|| format!("natbinder-testapp {} printed {text:?}", args.join(" ")));
    }
}

/// After a forwarded run: until the daemon has deleted every mapping the run made and is idle. The
/// lab's gateway shares this machine's two CPUs (a real one is another box): its deletes must not land
/// on the next run.
fn settle(daemon: &Daemon) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while daemon.mappings()? > 0 {
        if std::time::Instant::now() > deadline {
            bail!("the daemon still held {} mappings 300 s after a forwarded run", daemon.mappings()?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.wait_idle(Duration::from_secs(120))
}

pub fn measure(lab: &Lab, daemon: &Daemon, testapp: &Path) -> Result<Vec<OverheadRow>> {
    // Beside the lab's cgroup, at the same depth, so that both inherit the same ancestors' programs.
    let sibling = Cgroup::create(&natbinder_lab::scratch_cgroup_name("bench-sibling"))?;
    let empty = Cgroup::create(&natbinder_lab::scratch_cgroup_name("bench-empty"))?;
    let _hooks = super::empty_hooks::attach(&empty.path)?;
    let mut rows = Vec::new();
    for case in cases() {
        let (mut baseline, mut empties, mut watched) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ratios, mut empty_ratios) = (Vec::new(), Vec::new());
        // One run of each untimed first: page cache, the daemon's first mapping of the port.
        for cgroup in [&sibling, &empty, &lab.cgroup] {
            run_once(lab, cgroup, testapp, &case.args)?;
        }
        daemon.wait_idle(Duration::from_secs(120))?;
        for round in 0..case.rounds {
            // The three in an order that turns each round, so that none is always first or last.
            let mut order = [0usize, 1, 2];
            order.rotate_left(round % 3);
            let mut ns = [0.0; 3];
            for arm in order {
                let cgroup = [&sibling, &empty, &lab.cgroup][arm];
                ns[arm] = run_once(lab, cgroup, testapp, &case.args)?;
                if arm == 2 && case.forwarded {
                    settle(daemon)?;
                }
            }
            baseline.push(ns[0]);
            empties.push(ns[1]);
            watched.push(ns[2]);
            ratios.push(ns[2] / ns[0]);
            empty_ratios.push(ns[1] / ns[0]);
        }
        // Where the watched side's time goes in natbinder's own code.
        let stats = progstats::enable()?;
        let before = progstats::snapshot("natbinder");
        run_once(lab, &lab.cgroup, testapp, &case.args)?;
        let programs = progstats::delta(&before, &progstats::snapshot("natbinder"))
            .into_iter()
            .map(|(name, ns, runs)| (hook_name(&name).to_string(), ns, runs as f64 / case.operations as f64))
            .collect();
        drop(stats);
        if case.forwarded {
            settle(daemon)?;
        }
        let row = OverheadRow {
            path: case.path,
            forwarded: case.forwarded,
            rounds: case.rounds,
            baseline_ns: Samples::new(baseline),
            empty_ns: Samples::new(empties),
            watched_ns: Samples::new(watched),
            ratios: Samples::new(ratios),
            empty_ratios: Samples::new(empty_ratios),
            programs,
        };
        println!(
            "  {:72} {:7.0} ns -> {:7.0} ns   {:.3}x ({:.3}-{:.3}); empty programs {:.3}x",
            row.path,
            row.baseline_ns.median(),
            row.watched_ns.median(),
            row.ratios.median(),
            row.ratios.percentile(0.25),
            row.ratios.percentile(0.75),
            row.empty_ratios.median()
        );
        for (hook, ns, per_op) in &row.programs {
            println!("      {hook:14} {ns:6.0} ns per run, {per_op:.2} runs per operation");
        }
        rows.push(row);
    }
    Ok(rows)
}
