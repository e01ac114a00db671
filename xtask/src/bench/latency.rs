//! From bind() to reachable and from close() to deleted, over one protocol, against the gateway's own
//! floor (a bare add and delete, before and after) and the tools users run today.
//!
//! Each natbinder sample is timed from the program's own clock reading as it called bind() or close()
//! (`--stamp`, CLOCK_MONOTONIC, the clock read here too: the syscall counts, and the daemon's work
//! when it preempts the program in it), and split with the daemon's outcomes, each at
//! the time the daemon published it (`natbinder watch --json` gives it to the microsecond): bind() ->
//! socket-bound (kernel event and the daemon's intake), -> the add sent (queueing: mapped less the
//! gateway call it reports), the gateway call, -> the first connect from the WAN peer that succeeds.
//! close() is timed to the daemon's `removed`, published as the gateway answered the delete.
use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use natbinder_lab::{run_client_tool, Lab, GW_LAN_IP, GW_WAN_IP, LAN1_IP};
use serde_json::Value;

use super::{
    daemon::Daemon,
    floor::{self, Protocol},
    report::{LatencyPanel, Series},
    stats::Samples,
};

/// CLOCK_MONOTONIC in ns (what the test program's --stamp prints).
pub fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `clock`'s reading in ns.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns as f64 - from_ns as f64) / 1e6
}

/// From the WAN peer, a fresh non-blocking connect to the gateway's `port` every millisecond, until
/// one succeeds: returns its launch time (CLOCK_MONOTONIC ns). A SYN that reaches the gateway between
/// miniupnpd's DNAT and filter rules is dropped, not refused; waiting on it would time the prober.
pub fn first_reachable(lab: &Lab, port: u16, limit: Duration) -> Option<u64> {
    lab.wan.run(move || {
        let deadline = Instant::now() + limit;
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(GW_WAN_IP).to_be() },
            sin_zero: [0; 8],
        };
        let mut in_flight: Vec<(i32, u64)> = Vec::new();
        let close_all = |fds: &mut Vec<(i32, u64)>| {
            for (fd, _) in fds.drain(..) {
                // SAFETY: fds this loop opened.
                unsafe { libc::close(fd) };
            }
        };
        while Instant::now() < deadline {
            // SAFETY: plain socket calls on fds this loop owns.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
                if fd >= 0 {
                    let launched = now_ns();
                    libc::connect(
                        fd,
                        std::ptr::from_ref(&address).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    );
                    in_flight.push((fd, launched));
                }
                let mut polls: Vec<libc::pollfd> = in_flight
                    .iter()
                    .map(|(fd, _)| libc::pollfd { fd: *fd, events: libc::POLLOUT, revents: 0 })
                    .collect();
                libc::poll(polls.as_mut_ptr(), polls.len() as u64, 1);
                let mut done = Vec::new();
                for (i, p) in polls.iter().enumerate() {
                    if p.revents == 0 {
                        continue;
                    }
                    let mut error: i32 = 0;
                    let mut len = std::mem::size_of::<i32>() as u32;
                    libc::getsockopt(
                        p.fd,
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        std::ptr::from_mut(&mut error).cast(),
                        &mut len,
                    );
                    if error == 0 && p.revents & libc::POLLOUT != 0 {
                        let launched = in_flight[i].1;
                        close_all(&mut in_flight);
                        return Some(launched);
                    }
                    done.push(i);
                }
                for i in done.into_iter().rev() {
                    libc::close(in_flight.remove(i).0);
                }
                // SYNs older than 200 ms were dropped and their retransmission is not what we time.
                let cutoff = now_ns().saturating_sub(200_000_000);
                in_flight.retain(|(fd, launched)| *launched >= cutoff || libc::close(*fd) < 0);
            }
        }
        close_all(&mut in_flight);
        None
    })
}

/// CLOCK_REALTIME in ns.
fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// ns since the epoch of an RFC 3339 UTC time as the daemon writes it ("2026-12-02T19:35:59.123456Z").
fn epoch_ns(time: &str) -> Option<u64> {
    let (date, clock) = time.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.split('-').map(|n| n.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, "0"));
    let mut hms = hms.split(':').map(|n| n.parse::<u64>().ok());
    let (hour, minute, second) = (hms.next()??, hms.next()??, hms.next()??);
    let digits = fraction.len().min(9);
    let nanos = fraction.get(..digits)?.parse::<u64>().ok()? * 10u64.pow(9 - digits as u32);
    // Days since 1970-01-01 of a civil date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(((days * 86_400 + hour * 3600 + minute * 60 + second) * 1_000_000_000) + nanos)
}

/// `natbinder watch --json`, each line stamped with when the daemon published it (CLOCK_MONOTONIC ns;
/// the arrival here if the line has no time).
pub struct Watch {
    child: Child,
    lines: Receiver<(u64, Value)>,
}

impl Watch {
    pub fn start(daemon: &Daemon) -> Result<Self> {
        let mut child = std::process::Command::new(&daemon.natbinder)
            .args(["watch", "--json", "--socket"])
            .arg(&daemon.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting natbinder watch")?;
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        // The daemon stamps each outcome with the wall clock as it published it; this clock's reading
        // of the same moment is that less the clocks' difference.
        let realtime_ahead = realtime_ns() as i128 - now_ns() as i128;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let arrived = now_ns();
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    let published = value["time"].as_str().and_then(epoch_ns).map(|t| t as i128 - realtime_ahead);
                    let at = published.map_or(arrived, |t| t.clamp(0, arrived as i128) as u64);
                    if tx.send((at, value)).is_err() {
                        return;
                    }
                }
            }
        });
        // Connected once the daemon's watch has started: give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { child, lines })
    }

    /// The next `kind` outcome about TCP `port` (earlier other lines are skipped): (published ns, details).
    pub fn next(&self, kind: &str, port: u16, limit: Duration) -> Option<(u64, Value)> {
        let mut found = Value::Null;
        let at = self.until(limit, |_, event| {
            let details = &event["details"];
            let port_of = |field: &str| details[field].as_u64() == Some(port as u64);
            let matches = event["event"] == kind
                && details["protocol"] == "tcp"
                && (port_of("port") || port_of("internal_port") || port_of("external_port"));
            if matches {
                found = details.clone();
            }
            matches
        })?;
        Some((at, found))
    }

    /// Reads outcomes until `done` says so (then: its arrival) or `limit` passes (None).
    pub fn until(&self, limit: Duration, mut done: impl FnMut(u64, &Value) -> bool) -> Option<u64> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, event) = self.lines.recv_timeout(left).ok()?;
            if done(at, &event) {
                return Some(at);
            }
        }
    }

    /// Forgets what arrived so far.
    pub fn drain(&self) {
        while self.lines.try_recv().is_ok() {}
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test program in lan1 and the watched cgroup, with `args`, talked to over its stdin and stdout.
pub fn spawn_testapp(lab: &Lab, testapp: &Path, args: &[&str]) -> Result<(Child, ChildStdin, BufReader<ChildStdout>)> {
    let mut cmd = lab.command(&lab.lan1, true, testapp)?;
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().with_context(|| format!("starting natbinder-testapp {}", args.join(" ")))?;
    let stdin = child.stdin.take().context("no stdin")?;
    let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
    Ok((child, stdin, stdout))
}

/// Reads "bound PORT" or "closed", then "at NS", from a test program's stdout.
pub fn read_stamp(out: &mut impl BufRead, first: &str) -> Result<u64> {
    let mut line = String::new();
    out.read_line(&mut line)?;
    if !line.starts_with(first) {
        bail!("the test program printed {line:?}, not {first:?}");
    }
    line.clear();
    out.read_line(&mut line)?;
    line.trim()
        .strip_prefix("at ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("expected \"at NS\", got {line:?}"))
}

/// One port at a time: what each natbinder sample measured, in ms.
#[derive(Default)]
struct Singles {
    reachable: Vec<f64>,
    deleted: Vec<f64>,
    intake: Vec<f64>,
    release_intake: Vec<f64>,
    release_to_removed: Vec<f64>,
    queueing: Vec<f64>,
    gateway: Vec<f64>,
    to_connect: Vec<f64>,
    floor_add: Vec<f64>,
    floor_reachable: Vec<f64>,
    floor_delete: Vec<f64>,
}

/// natbinder one port at a time, each sample right after a floor sample (its add and delete), so that
/// the gateway's moods fall on both alike.
fn singles(
    lab: &Lab,
    daemon: &Daemon,
    watch: &Watch,
    testapp: &Path,
    protocol: Protocol,
    samples: usize,
    from: u16,
) -> Result<Singles> {
    let mut s = Singles::default();
    for i in 0..samples {
        let floor_port = from + 2000 + i as u16;
        let sample = floor_sample(lab, protocol, floor_port, None)?;
        s.floor_add.push(sample.add);
        s.floor_reachable.push(sample.reachable);
        s.floor_delete.push(floor::delete(lab, protocol, floor_port)?);
        let port = from + i as u16;
        watch.drain();
        let address = format!("0.0.0.0:{port}");
        let (mut child, mut stdin, mut out) =
            spawn_testapp(lab, testapp, &["tcp-echo", &address, "--close-on-stdin", "--stamp"])?;
        let bound_at = read_stamp(&mut out, "bound")?;
        let Some(reached_at) = first_reachable(lab, port, Duration::from_secs(10)) else {
            let list = std::process::Command::new(&daemon.natbinder)
                .args(["list", "--socket"])
                .arg(&daemon.socket)
                .output()?;
            bail!(
                "tcp/{port} never became reachable from the WAN peer; natbinder list:\n{}\ndaemon log:\n{}",
                String::from_utf8_lossy(&list.stdout),
                std::fs::read_to_string(&daemon.log).unwrap_or_default()
            );
        };
        let (event_at, _) =
            watch.next("socket-bound", port, Duration::from_secs(5)).context("no socket-bound outcome")?;
        let (mapped_at, mapped) = watch.next("mapped", port, Duration::from_secs(5)).context("no mapped outcome")?;
        let took_ms = mapped["took_ms"].as_f64().unwrap_or(0.0);
        s.reachable.push(ms_between(bound_at, reached_at));
        s.intake.push(ms_between(bound_at, event_at));
        s.gateway.push(took_ms);
        s.queueing.push(ms_between(event_at, mapped_at) - took_ms);
        s.to_connect.push(ms_between(mapped_at, reached_at));
        stdin.write_all(b"close\n")?;
        let closed_at = read_stamp(&mut out, "closed")?;
        let (released_at, _) =
            watch.next("socket-released", port, Duration::from_secs(5)).context("no socket-released outcome")?;
        let (removed_at, _) = watch.next("removed", port, Duration::from_secs(5)).context("no removed outcome")?;
        s.deleted.push(ms_between(closed_at, removed_at));
        s.release_intake.push(ms_between(closed_at, released_at));
        s.release_to_removed.push(ms_between(released_at, removed_at));
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(s)
}

/// A program that closes its port and at once binds the next, `samples` times: bind-to-reachable.
/// `settled`: each step waits until the daemon has deleted the port before last (nothing is in flight
/// at the gateway when the program steps, so only the order of the add and the delete is tested);
/// otherwise it steps as soon as its port is reachable, and the add can find a delete in flight.
/// Returns the latencies and, settled, in how many steps the daemon deleted the port before ahead of
/// the new port's add (its `removed` published before the `mapped`).
fn churn(
    lab: &Lab,
    watch: &Watch,
    testapp: &Path,
    samples: usize,
    from: u16,
    settled: bool,
) -> Result<(Vec<f64>, usize)> {
    let mut latencies = Vec::with_capacity(samples);
    let mut deleted_first = 0;
    let (mut child, mut stdin, mut out) =
        spawn_testapp(lab, testapp, &["churn", &from.to_string(), &samples.to_string(), "--stamp"])?;
    watch.drain();
    for i in 0..samples {
        let bound_at = read_stamp(&mut out, "bound")?;
        let port = from + i as u16;
        let reached = first_reachable(lab, port, Duration::from_secs(10))
            .with_context(|| format!("churn: tcp/{port} never became reachable"))?;
        latencies.push(ms_between(bound_at, reached));
        if settled && i > 0 {
            let (mut mapped_at, mut removed_at) = (None, None);
            watch
                .until(Duration::from_secs(10), |at, event| {
                    let external_port = event["details"]["external_port"].as_u64();
                    if event["event"] == "mapped" && external_port == Some(port.into()) {
                        mapped_at = Some(at);
                    }
                    if event["event"] == "removed" && external_port == Some((port - 1).into()) {
                        removed_at = Some(at);
                    }
                    mapped_at.is_some() && removed_at.is_some()
                })
                .with_context(|| format!("churn: no mapped outcome for tcp/{port} or no removed for the one before"))?;
            deleted_first += usize::from(removed_at < mapped_at);
        }
        stdin.write_all(b"next\n")?;
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok((latencies, deleted_first))
}

/// One sample of the gateway's floor, timed as natbinder's samples are.
struct FloorSample {
    /// The bare add, to its answer (ms).
    add: f64,
    /// The bare add, to the first connect from the WAN peer that succeeds (ms).
    reachable: f64,
}

/// A bare add of TCP `port` while the WAN peer probes it from the moment the add is sent, as natbinder's
/// samples are probed: the probes' SYNs and the prober's CPU weigh on the gateway alike. A listener on
/// lan1's own address answers them (a specific address: natbinder does not forward it). `then_delete`:
/// a port whose bare delete follows the add's answer at once (natbinder's order in a churn). The
/// mapping is left on the gateway.
fn floor_sample(lab: &Lab, protocol: Protocol, port: u16, then_delete: Option<u16>) -> Result<FloorSample> {
    let _listener = lab
        .lan1
        .run(move || std::net::TcpListener::bind((LAN1_IP, port)))
        .with_context(|| format!("the floor's listener on {LAN1_IP}:{port}"))?;
    let started = now_ns();
    std::thread::scope(|scope| {
        let probe = scope.spawn(|| first_reachable(lab, port, Duration::from_secs(10)));
        let add = floor::add(lab, protocol, port)?;
        if let Some(before) = then_delete {
            floor::delete(lab, protocol, before)?;
        }
        let reached = probe.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        let reached = reached.with_context(|| format!("the floor's tcp/{port} never became reachable"))?;
        Ok(FloorSample { add, reachable: ms_between(started, reached) })
    })
}

/// The gateway's floor in the same churn as natbinder's: a bare client adds the next port and, once
/// that is answered, deletes the port before. What the gateway does with the delete while it already
/// forwards the new port shows here as it does in natbinder's churn.
fn floor_churn(lab: &Lab, protocol: Protocol, samples: usize, from: u16) -> Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let port = from + i as u16;
        let before = (i > 0).then(|| port - 1);
        latencies.push(floor_sample(lab, protocol, port, before)?.reachable);
    }
    floor::delete(lab, protocol, from + samples as u16 - 1)?;
    Ok(latencies)
}

/// `upnpc -a` or `natpmpc -a` from lan1, timed to its exit, and the mapping deleted again (untimed).
fn tool_adds(lab: &Lab, tool: &str, samples: usize, from: u16) -> Result<Vec<f64>> {
    let mut took = Vec::with_capacity(samples);
    let lan1 = LAN1_IP.to_string();
    let gw = GW_LAN_IP.to_string();
    for i in 0..samples {
        let port = (from + i as u16).to_string();
        let started = Instant::now();
        let (add, delete): (Vec<&str>, Vec<&str>) = if tool == "upnpc" {
            (vec!["-a", &lan1, &port, &port, "TCP", "3600"], vec!["-d", &port, "TCP"])
        } else {
            (vec!["-g", &gw, "-a", &port, &port, "tcp", "3600"], vec!["-g", &gw, "-a", &port, "0", "tcp", "0"])
        };
        let printed = run_client_tool(&lab.lan1, tool, 30, &add)?;
        took.push(started.elapsed().as_secs_f64() * 1e3);
        let mapped = if tool == "upnpc" {
            printed.contains("is redirected to internal")
        } else {
            printed.contains("Mapped public port")
        };
        if !mapped {
            bail!("`{tool} {}` did not map the port: {printed}", add.join(" "));
        }
        run_client_tool(&lab.lan1, tool, 30, &delete)?;
    }
    Ok(took)
}

/// The floor's adds and deletes, `samples` of each, ports from `from`.
fn floor_samples(lab: &Lab, protocol: Protocol, samples: usize, from: u16) -> Result<(Vec<FloorSample>, Vec<f64>)> {
    let (mut adds, mut deletes) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let port = from + i as u16;
        adds.push(floor_sample(lab, protocol, port, None)?);
        deletes.push(floor::delete(lab, protocol, port)?);
    }
    Ok((adds, deletes))
}

/// Everything over one protocol, with the daemon already running on the lab's gateway.
pub fn measure(lab: &Lab, daemon: &Daemon, testapp: &Path, protocol: Protocol, samples: usize) -> Result<LatencyPanel> {
    let name = match protocol {
        Protocol::Upnp => "UPnP IGD",
        Protocol::Pcp => "PCP",
        Protocol::NatPmp => "NAT-PMP",
    };
    println!("{name}: the gateway's floor, natbinder one port at a time and in a churn, and the users' tool");
    let watch = Watch::start(daemon)?;
    let half = samples.div_ceil(2);
    let single = singles(lab, daemon, &watch, testapp, protocol, samples, 20000)?;
    let (churned, deleted_first) = churn(lab, &watch, testapp, half, 24000, true)?;
    let (back_to_back, _) = churn(lab, &watch, testapp, half, 25000, false)?;
    daemon.wait_idle(Duration::from_secs(60))?;
    let churn_floor = floor_churn(lab, protocol, half, 27000)?;
    // And the floor once more after the churn, alone: the gateway as it is at the end of the run.
    let (after_add, after_delete) = floor_samples(lab, protocol, half, 26000)?;
    let floor_during_p50 = Samples::new(single.floor_reachable.clone()).median();
    let floor_after_p50 = Samples::new(after_add.iter().map(|s| s.reachable).collect()).median();
    let (mut floor_add, mut floor_reachable, mut floor_delete) =
        (single.floor_add, single.floor_reachable, single.floor_delete);
    floor_add.extend(after_add.iter().map(|s| s.add));
    floor_reachable.extend(after_add.iter().map(|s| s.reachable));
    floor_delete.extend(after_delete);
    let tool = match protocol {
        Protocol::Upnp => Some(("upnpc -a (discovery, then the add)", tool_adds(lab, "upnpc", 8, 28000)?)),
        Protocol::NatPmp => Some(("natpmpc -a", tool_adds(lab, "natpmpc", 20, 28000)?)),
        Protocol::Pcp => None,
    };
    let series = |label: &str, values: Vec<f64>, plotted| Series {
        label: label.to_string(),
        samples: Samples::new(values),
        plotted,
    };
    let mut panel = LatencyPanel {
        protocol: name.to_string(),
        series: vec![
            series("natbinder: bind() to reachable from the WAN", single.reachable, true),
            series("natbinder in a churn: close one port, bind the next", churned, true),
            series("the same churn back to back (a delete may be in flight)", back_to_back, false),
            series(
                "the gateway's floor in the churn: a bare add, then the delete of the port before",
                churn_floor,
                false,
            ),
            series("the gateway's floor: a bare add, to reachable from the WAN", floor_reachable, true),
            series("the gateway's floor: a bare add, to its answer", floor_add, false),
            series("natbinder: close() to deleted at the gateway", single.deleted, false),
            series("the gateway's floor: a bare delete", floor_delete, false),
            series("split: bind() to the daemon's socket-bound", single.intake, false),
            series("split: queued in the daemon before the add", single.queueing, false),
            series("split: the gateway's add, as the daemon timed it", single.gateway, false),
            series("split: mapped to the first successful connect", single.to_connect, false),
            series("split: close() to the daemon's socket-released", single.release_intake, false),
            series("split: socket-released to removed (the delete's answer)", single.release_to_removed, false),
        ],
        goals: Vec::new(),
        notes: Vec::new(),
    };
    if let Some((label, took)) = tool {
        panel.series.insert(3, series(label, took, true));
    }
    panel.notes.push(format!(
        "The floor was sampled before each of natbinder's samples (to reachable p50 {floor_during_p50:.1} ms) and \
         alone at the end ({floor_after_p50:.1} ms); the floor rows hold both. The WAN peer probes the floor's \
         port from the moment its add is sent, as it probes natbinder's from bind(): a SYN every millisecond \
         until one is answered, which the gateway (on the same two CPUs) serves alike in both."
    ));
    let get = |label: &str| panel.series.iter().find(|s| s.label.starts_with(label)).map(|s| &s.samples);
    let (Some(reach), Some(churned), Some(reach_floor), Some(add), Some(churn_floor), Some(deleted), Some(delete)) = (
        get("natbinder: bind()"),
        get("natbinder in a churn"),
        get("the gateway's floor: a bare add, to reachable"),
        get("the gateway's floor: a bare add, to its answer"),
        get("the gateway's floor in the churn"),
        get("natbinder: close()"),
        get("the gateway's floor: a bare delete"),
    ) else {
        unreachable!()
    };
    let mut goals = Vec::new();
    for (what, ours, floor) in [
        ("bind() to reachable", reach, reach_floor),
        ("in a churn", churned, churn_floor),
        ("close() to deleted", deleted, delete),
    ] {
        goals.push((
            format!(
                "{what}: p50 {:.1} ms vs. the floor's {:.1} ms + 1 ms; p99 {:.1} ms vs. 2 x the floor's {:.1} ms",
                ours.median(),
                floor.median(),
                ours.percentile(0.99),
                floor.percentile(0.99)
            ),
            ours.median() <= floor.median() + 1.0 && ours.percentile(0.99) <= 2.0 * floor.percentile(0.99),
        ));
    }
    panel.goals = goals;
    if churned.median() <= churn_floor.median() + 1.0 && churned.percentile(0.99) > 2.0 * churn_floor.percentile(0.99) {
        panel.notes.push(format!(
            "What bounds the churn's p99: met at p50, missed at p99, which among {} samples is the second slowest: \
             the tails of two CPUs shared by the program, the daemon, the gateway and the WAN peer. natbinder's churn \
             p99 is {:.1} ms against its one-port-at-a-time p99 of {:.1} ms; the bare client's churn p99 is {:.1} ms \
             against its single add's {:.1} ms.",
            churned.len(),
            churned.percentile(0.99),
            reach.percentile(0.99),
            churn_floor.percentile(0.99),
            reach_floor.percentile(0.99)
        ));
    }
    let release_intake = get("split: close() to the daemon's socket-released").expect("a series of the panel");
    let to_removed = get("split: socket-released to removed").expect("a series of the panel");
    if deleted.median() > delete.median() + 1.0 || deleted.percentile(0.99) > 2.0 * delete.percentile(0.99) {
        panel.notes.push(format!(
            "What bounds close() to deleted: no fixed wait. The release reaches the daemon in p50 {:.2} ms (p99 \
             {:.2} ms); from there to the delete's answer takes p50 {:.2} ms (p99 {:.2} ms), against the bare \
             delete's p50 {:.2} ms (p99 {:.2} ms). The difference, p50 {:.2} ms, is the daemon's: it holds the \
             delete in 100 us steps while the thread that closed still runs (this test program writes its stamp \
             just after close(), so it often does), has the event loop read the kernel's events to the end, \
             journals, and makes the call through its HTTP client. Against a gateway whose own delete p99 is \
             under a millisecond, that work, on two CPUs shared with the gateway and the WAN peer, is the bound.",
            release_intake.median(),
            release_intake.percentile(0.99),
            to_removed.median(),
            to_removed.percentile(0.99),
            delete.median(),
            delete.percentile(0.99),
            to_removed.median() - delete.median()
        ));
    }
    panel.notes.push(format!(
        "A churn is judged against the same churn made by a bare client (the next port's add, then the delete \
         of the port before, the new port probed from the WAN peer from the moment its add is sent): p50 {:.1} \
         ms, against {:.1} ms for a bare add alone, to reachable. The difference is the gateway's: what it does to a new \
         port while it deletes the one before. natbinder deleted the port before ahead of the new port's \
         add in {deleted_first} of {} steps (before a delete it waits while the thread that closed the port still \
         runs, reads the kernel's events to the end, and asks first for a port bound up to 10 ms after the \
         release).",
        churn_floor.median(),
        reach_floor.median(),
        half.saturating_sub(1)
    ));
    // Where bind() to reachable spends its time over the floor, from the split's medians.
    if let (Some(intake), Some(queueing), Some(call), Some(connect)) = (
        get("split: bind() to the daemon's socket-bound"),
        get("split: queued in the daemon"),
        get("split: the gateway's add"),
        get("split: mapped to the first"),
    ) {
        panel.notes.push(format!(
            "Where bind() to reachable goes (medians of the split): the kernel event reaching the daemon {:.2} ms, \
             queueing in the daemon {:.2} ms, the daemon's own add {:.2} ms against the bare client's {:.2} ms \
             ({:+.2} ms; both while the WAN peer probes), then {:.2} ms to the first connect that succeeds \
             (negative: the gateway forwards before it answers). The add is the gateway's time: what natbinder \
             adds to it is the rest.",
            intake.median(),
            queueing.median(),
            call.median(),
            add.median(),
            call.median() - add.median(),
            connect.median()
        ));
    }
    if let Some(back_to_back) = get("the same churn back to back") {
        panel.notes.push(format!(
            "Back to back, the program binds its next port while the daemon's delete of the port before is at \
             the gateway: natbinder sends one request at a time, so the add waits for it. That churn's p50 is \
             {:.1} ms against the floor's add + delete p50 of {:.1} ms.",
            back_to_back.median(),
            add.median() + delete.median()
        ));
    }
    for s in &panel.series {
        println!(
            "  {:58} p50 {:7.2} ms  p99 {:7.2} ms  (n {})",
            s.label,
            s.samples.median(),
            s.samples.percentile(0.99),
            s.samples.len()
        );
    }
    Ok(panel)
}

#[cfg(test)]
mod tests {
    use super::epoch_ns;

    #[test]
    fn the_daemons_times_are_read_to_the_nanosecond_since_the_epoch() {
        assert_eq!(epoch_ns("1970-01-01T00:00:00.000000Z"), Some(0));
        assert_eq!(epoch_ns("2026-12-02T19:35:59.123456Z"), Some(1_796_240_159_123_456_000));
        assert_eq!(epoch_ns("2000-02-29T00:00:00.5Z"), Some(951_782_400_500_000_000));
        assert_eq!(epoch_ns("2026-12-02 19:35:59Z"), None);
        assert_eq!(epoch_ns("2026-12-02T19:35:59.123456"), None);
    }
}
