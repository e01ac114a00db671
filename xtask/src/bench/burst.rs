//! Bursts: N listeners opened within a second, then closed, over UPnP IGD. What a user would ask: how
//! long until all are forwarded, how long until the table is clean, were events lost, and how many
//! requests did the gateway get for each mapping (one add and one delete is the goal). Judged against
//! the gateway's own service time for the same requests: N bare adds, then N bare deletes, in a row.
//!
//! And the same burst closed at once, as a program that gives up its ports straight away: a socket
//! released before its add was sent must cost no request at all.
use std::{io::Write, path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use natbinder_lab::{fake_igd::FakeIgd, Lab};

use super::{
    daemon::Daemon,
    floor,
    latency::{read_stamp, spawn_testapp, Watch},
};

pub struct BurstRow {
    /// The gateway: "miniupnpd" or "the fake IGD".
    pub gateway: &'static str,
    pub listeners: u16,
    /// From the last bind() to the last mapping's `mapped`, ms.
    pub to_forwarded_ms: f64,
    /// From close() to the last mapping's `removed`, ms.
    pub to_clean_ms: f64,
    pub lost_events: u64,
    /// SOAP requests miniupnpd received from lan1 while the listeners were open, and after they closed.
    pub requests_open: usize,
    pub requests_closed: usize,
    /// The gateway's own time for N adds and N deletes in a row (bare client), ms: the mean of the
    /// floor taken before the burst (ports in order) and after it (the daemon's order).
    pub floor_adds_ms: f64,
    pub floor_deletes_ms: f64,
    /// The floor before and after, (adds, deletes) each.
    pub floor_before_ms: (f64, f64),
    pub floor_after_ms: (f64, f64),
    /// The same listeners closed as soon as they were bound: mappings made (and deleted) and requests.
    pub closed_at_once_mapped: usize,
    pub closed_at_once_requests: usize,
    /// The daemon's footprint while the burst was being forwarded: peak RSS (KiB) and CPU time (ms).
    pub peak_rss_kib: u64,
    pub cpu_ms: f64,
    /// Idle with every listener forwarded, for [`IDLE`]: RSS, CPU time and wake-ups.
    pub idle: Option<Idle>,
}

pub struct Idle {
    pub seconds: u64,
    pub rss_kib: u64,
    pub cpu_ms: f64,
    pub wakeups: u64,
    /// Requests the gateway got meanwhile: the periodic check's, if one fell in the period.
    pub requests: usize,
}

/// How long the daemon is watched idle, all mappings made.
pub const IDLE: Duration = Duration::from_secs(60);

/// The gateway the burst runs against.
pub enum Gateway<'a> {
    /// The lab's miniupnpd: its requests are counted in its log.
    Miniupnpd,
    /// The scripted fake IGD, for bursts larger than miniupnpd takes quickly (each add costs it more as
    /// its nftables table grows). It answers at once, so what is timed is natbinder's own work. It counts
    /// each request by action.
    Fake(&'a FakeIgd),
}

impl Gateway<'_> {
    /// (HTTP port, WANIPConnection version).
    fn endpoint(&self, lab: &Lab) -> (u16, u8) {
        match self {
            Gateway::Miniupnpd => (lab.config.http_port, 2),
            Gateway::Fake(fake) => (fake.http_port(), 1),
        }
    }

    /// Mark the start of a phase: counting starts from here.
    fn mark(&self, lab: &Lab) -> usize {
        match self {
            Gateway::Miniupnpd => lab.miniupnpd_log().len(),
            Gateway::Fake(fake) => {
                fake.take_requests();
                0
            }
        }
    }

    /// Control requests since `mark` (for miniupnpd, SOAP POSTs it logged from this host).
    fn requests_since(&self, lab: &Lab, mark: usize) -> usize {
        match self {
            Gateway::Miniupnpd => {
                let log = lab.miniupnpd_log();
                log.get(mark..).unwrap_or("").lines().filter(|l| l.contains(": POST /ctl/IPConn")).count()
            }
            Gateway::Fake(fake) => fake.take_requests().iter().filter(|r| r.action.ends_with("PortMapping")).count(),
        }
    }
}

/// Waits for an outcome of `kind` about each port in `ports`; returns when the last was published, and
/// the ports in the order their outcomes came (the order the daemon sent its requests in).
pub fn until_all(watch: &Watch, kind: &str, ports: std::ops::Range<u16>, limit: Duration) -> Result<(u64, Vec<u16>)> {
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::with_capacity(ports.len());
    let wanted = ports.len();
    let last = watch
        .until(limit, |_, event| {
            let details = &event["details"];
            let port = details["internal_port"].as_u64().or(details["external_port"].as_u64()).unwrap_or(0) as u16;
            if event["event"] == kind && ports.contains(&port) && seen.insert(port) {
                order.push(port);
            }
            seen.len() == wanted
        })
        .with_context(|| format!("{} of {wanted} `{kind}` outcomes within {limit:?}", seen.len()))?;
    Ok((last, order))
}

/// A bare client's adds of `adds`, then deletes of `deletes`, in those orders: the sums of their
/// service times (adds, deletes), ms.
fn floor_in_a_row(
    lab: &Lab,
    http_port: u16,
    version: u8,
    adds: impl IntoIterator<Item = u16>,
    deletes: impl IntoIterator<Item = u16>,
) -> Result<(f64, f64)> {
    let (mut adds_ms, mut deletes_ms) = (0.0, 0.0);
    for port in adds {
        adds_ms += floor::upnp_add(lab, http_port, version, port)?;
    }
    for port in deletes {
        deletes_ms += floor::upnp_delete(lab, http_port, version, port)?;
    }
    Ok((adds_ms, deletes_ms))
}

pub fn measure(
    lab: &Lab,
    gateway: Gateway,
    daemon: &Daemon,
    testapp: &Path,
    listeners: u16,
    from: u16,
    with_idle: bool,
) -> Result<BurstRow> {
    let limit = Duration::from_secs(60) + Duration::from_millis(200) * listeners as u32;
    // The gateway's service time before the burst as well as after it: its speed drifts within a run
    // (miniupnpd's after a thousand requests of the parts before), and the burst falls in between.
    // Ports of their own, 5000 up.
    let (http_port, version) = gateway.endpoint(lab);
    let floor_ports = from + 5000..from + 5000 + listeners;
    let floor_before_ms = floor_in_a_row(lab, http_port, version, floor_ports.clone(), floor_ports)?;
    let watch = Watch::start(daemon)?;
    let lost_before = daemon.lost_events()?;
    let opening = gateway.mark(lab);
    let (mut child, mut stdin, mut out) =
        spawn_testapp(lab, testapp, &["hold", &listeners.to_string(), &from.to_string(), "--stamp"])?;
    let bound_at = read_stamp(&mut out, "bound")?;
    let ports = from..from + listeners;
    let cpu_before = daemon.cpu_time()?;
    // RSS sampled every 50 ms while the burst is forwarded.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (sampling, pid) = (sampling.clone(), daemon.pid);
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                let rss = super::daemon::rss_kib_of(pid).unwrap_or(0);
                peak = peak.max(rss);
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let mapped = until_all(&watch, "mapped", ports.clone(), limit);
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let peak_rss_kib = sampler.join().unwrap_or(0);
    let (mapped_at, add_order) = mapped?;
    let cpu_ms = (daemon.cpu_time()? - cpu_before).as_secs_f64() * 1e3;
    daemon.wait_idle(limit)?;
    let requests_open = gateway.requests_since(lab, opening);
    let idle = if with_idle {
        let idling = gateway.mark(lab);
        let (cpu, switches) = (daemon.cpu_time()?, daemon.context_switches()?);
        std::thread::sleep(IDLE);
        Some(Idle {
            seconds: IDLE.as_secs(),
            rss_kib: daemon.rss_kib()?,
            cpu_ms: (daemon.cpu_time()? - cpu).as_secs_f64() * 1e3,
            wakeups: super::daemon::wakeups_between(&switches, &daemon.context_switches()?),
            requests: gateway.requests_since(lab, idling),
        })
    } else {
        None
    };
    let closing = gateway.mark(lab);
    stdin.write_all(b"close\n")?;
    let closed_at = read_stamp(&mut out, "closed")?;
    let (clean_at, delete_order) = until_all(&watch, "removed", ports.clone(), limit)?;
    daemon.wait_idle(limit)?;
    if daemon.mappings()? != 0 {
        bail!("the table was not empty after the burst of {listeners} closed");
    }
    let _ = child.kill();
    let _ = child.wait();
    let requests_closed = gateway.requests_since(lab, closing);
    let lost_events = daemon.lost_events()? - lost_before;

    // The same burst, closed as soon as it is bound: the second process of the run, so pause first
    // until the kernel has freed the ports of the first.
    std::thread::sleep(Duration::from_millis(200));
    let at_once = gateway.mark(lab);
    watch.drain();
    let (mut child, mut stdin, mut out) =
        spawn_testapp(lab, testapp, &["hold", &listeners.to_string(), &from.to_string()])?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    stdin.write_all(b"close\n")?;
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    daemon.wait_idle(limit)?;
    let mut mapped = 0;
    watch.until(Duration::from_millis(100), |_, event| {
        mapped += usize::from(event["event"] == "mapped");
        false
    });
    let _ = child.kill();
    let _ = child.wait();
    let closed_at_once_requests = gateway.requests_since(lab, at_once);
    if daemon.mappings()? != 0 {
        bail!("the table was not empty after the burst of {listeners} closed at once");
    }

    // The gateway's own service time for the same requests, in the order the daemon sent them
    // (miniupnpd finds a rule to delete by walking its chain: the order changes what a delete costs).
    // Ports of their own, 5000 up: the gateway may still be closing the burst's last connections.
    let floor_after_ms = floor_in_a_row(
        lab,
        http_port,
        version,
        add_order.into_iter().map(|p| p + 5000),
        delete_order.into_iter().map(|p| p + 5000),
    )?;
    let (floor_adds_ms, floor_deletes_ms) =
        ((floor_before_ms.0 + floor_after_ms.0) / 2.0, (floor_before_ms.1 + floor_after_ms.1) / 2.0);
    let row = BurstRow {
        gateway: match gateway {
            Gateway::Miniupnpd => "miniupnpd",
            Gateway::Fake(_) => "the fake IGD",
        },
        listeners,
        to_forwarded_ms: (mapped_at as f64 - bound_at as f64) / 1e6,
        to_clean_ms: (clean_at as f64 - closed_at as f64) / 1e6,
        lost_events,
        requests_open,
        requests_closed,
        floor_adds_ms,
        floor_deletes_ms,
        floor_before_ms,
        floor_after_ms,
        closed_at_once_mapped: mapped,
        closed_at_once_requests,
        peak_rss_kib,
        cpu_ms,
        idle,
    };
    println!(
        "  {listeners:5} listeners: all forwarded in {:.0} ms (floor: {:.0} ms of adds), clean in {:.0} ms (floor {:.0} ms), \
         {} + {} requests, {} events lost; closed at once: {} mapped, {} requests",
        row.to_forwarded_ms,
        row.floor_adds_ms,
        row.to_clean_ms,
        row.floor_deletes_ms,
        row.requests_open,
        row.requests_closed,
        row.lost_events,
        row.closed_at_once_mapped,
        row.closed_at_once_requests
    );
    Ok(row)
}
