//! Scale: one reconcile pass (the periodic check of `reconcile/audit.rs`) with 1,000 of natbinder's
//! mappings on the gateway, in each of the three ways the daemon reads a UPnP IGD's table:
//!
//! * in one call per protocol: IGDv2's GetListOfPortMappings;
//! * by index: IGDv1's GetGenericPortMappingEntry 0, 1, ... until the gateway says there is no more;
//! * entry by entry, where the gateway refuses to list (401): GetSpecificPortMappingEntry for each
//!   mapping the daemon holds.
//!
//! On the fake IGD, which answers at once (miniupnpd's adds slow down as its table grows). One program
//! holds 1,000 listeners throughout; the fake is switched from IGDv2 to IGDv1 with a reboot (the daemon
//! finds it again and makes every mapping again), then told to refuse the listing calls.
//!
//! A pass is asked for with SIGHUP (as `natbinder reload` does; the daemon has no other way to check
//! now, and its own timer is set far off) and timed from the gateway's side, where every request is
//! stamped as it arrives: from the pass's first request to the one the check sends once the table is
//! read and the findings recorded (GetExternalIPAddress). The floor is the same requests, as the gateway
//! recorded them, sent again from the same host by a bare client in a row, each on a new connection as
//! the daemon does.
use std::{
    io::BufRead,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use natbinder_lab::{
    fake_igd::{FakeIgd, FakeOutcome, FakeRequest, FakeScript},
    Lab, LAN1_IP,
};

use super::{
    burst::until_all,
    daemon::Daemon,
    floor,
    latency::{spawn_testapp, Watch},
    stats::Samples,
};

/// natbinder's mappings on the gateway during each pass.
pub const MAPPINGS: u16 = 1000;
/// Passes (and floors, interleaved) per way of reading the table.
const PASSES: usize = 9;
/// The listeners' first port, clear of the other parts' ports.
const FIRST_PORT: u16 = 33000;
/// The request the check sends after the audit: the end of a pass, as the gateway sees it.
const AFTER_THE_AUDIT: &str = "GetExternalIPAddress";

/// How the daemon reads the gateway's table in a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    InOneCall,
    ByIndex,
    EntryByEntry,
}

impl Reading {
    fn script(self) -> FakeScript {
        match self {
            Reading::InOneCall => FakeScript::new().igd_v2_listing(),
            Reading::ByIndex => FakeScript::new(),
            Reading::EntryByEntry => FakeScript::new().listing_refused_401(),
        }
    }

    /// The WANIPConnection version the fake serves.
    fn version(self) -> u8 {
        match self {
            Reading::InOneCall => 2,
            Reading::ByIndex | Reading::EntryByEntry => 1,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Reading::InOneCall => "the whole table in one call per protocol (IGDv2 GetListOfPortMappings)",
            Reading::ByIndex => "the whole table by index (IGDv1 GetGenericPortMappingEntry)",
            Reading::EntryByEntry => "each of our mappings, listing refused with 401 (GetSpecificPortMappingEntry)",
        }
    }
}

pub struct ScaleRow {
    pub reading: &'static str,
    pub mappings: u16,
    /// The requests of one pass, by action, in the order first sent (every pass sent the same).
    pub requests: Vec<(String, usize)>,
    /// From the pass's first request to the request after it, as the gateway stamped them, ms.
    pub pass_ms: Samples,
    /// The same requests by a bare client in a row, ms.
    pub floor_ms: Samples,
    /// The daemon's CPU time from SIGHUP until it was idle again (the pass, and the sockets' resync
    /// SIGHUP also asks for), ms.
    pub cpu_ms: Samples,
}

impl ScaleRow {
    pub fn total_requests(&self) -> usize {
        self.requests.iter().map(|(_, n)| n).sum()
    }
}

pub fn measure(lab: &mut Lab, natbinder: &Path, testapp: &Path) -> Result<Vec<ScaleRow>> {
    let limit = Duration::from_secs(60) + Duration::from_millis(50) * u32::from(MAPPINGS);
    let fake = FakeIgd::start(lab, Reading::InOneCall.script())?;
    // The daemon's own check an hour off: every pass measured is one asked for.
    let daemon =
        Daemon::start(lab, natbinder, "upnp", &["--max-mappings-per-user", "0", "--reconcile-interval", "3600"])?;
    let rows = passes_of_each_reading(lab, &fake, &daemon, testapp, limit);
    lab.kill(daemon.pid, libc::SIGTERM);
    // The lab's directory goes with the lab; the daemon's log is worth a look afterwards.
    let _ = std::fs::copy(&daemon.log, std::env::temp_dir().join("natbinder-bench-daemon-scale.log"));
    rows
}

/// With the daemon running: holds the listeners, and measures the passes of each way of reading.
fn passes_of_each_reading(
    lab: &Lab,
    fake: &FakeIgd,
    daemon: &Daemon,
    testapp: &Path,
    limit: Duration,
) -> Result<Vec<ScaleRow>> {
    let watch = Watch::start(daemon)?;
    let ports = FIRST_PORT..FIRST_PORT + MAPPINGS;
    // Its stdin stays open until the end: at a line or at EOF, it closes the listeners.
    let (holder, _holder_stdin, mut holder_out) =
        spawn_testapp(lab, testapp, &["hold", &MAPPINGS.to_string(), &FIRST_PORT.to_string()])?;
    let _holder = KilledOnDrop(holder);
    let mut line = String::new();
    holder_out.read_line(&mut line)?;
    if !line.starts_with("bound") {
        bail!("the test program printed {line:?}, not \"bound\"");
    }
    until_all(&watch, "mapped", ports.clone(), limit)?;
    let mut rows = Vec::new();
    let mut version = Reading::InOneCall.version();
    for reading in [Reading::InOneCall, Reading::ByIndex, Reading::EntryByEntry] {
        fake.set_script(reading.script());
        if reading.version() != version {
            // The daemon reads the description once per gateway found: a reboot makes it find the
            // gateway again, with its new service, and make every mapping again. The first
            // announcement the daemon hears is only noted (the fake announces nothing before its
            // reboot), so a check finds the reboot: its first call is refused on the old HTTP port.
            watch.drain();
            fake.reboot().context("rebooting the fake IGD to change its WANIPConnection version")?;
            hang_up(daemon)?;
            until_all(&watch, "mapped", ports.clone(), limit)
                .context("the daemon making its mappings again after the fake IGD's reboot")?;
            version = reading.version();
        }
        if fake.mappings().len() != usize::from(MAPPINGS) {
            bail!("the fake IGD holds {} mappings, not {MAPPINGS}", fake.mappings().len());
        }
        rows.push(passes(lab, fake, daemon, &watch, reading, limit)?);
    }
    Ok(rows)
}

/// The program holding the listeners, ended however the measurement ends.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn passes(
    lab: &Lab,
    fake: &FakeIgd,
    daemon: &Daemon,
    watch: &Watch,
    reading: Reading,
    limit: Duration,
) -> Result<ScaleRow> {
    let (mut pass_ms, mut floor_ms, mut cpu_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut requests: Option<Vec<(String, usize)>> = None;
    for _ in 0..PASSES {
        daemon.wait_idle(limit)?;
        fake.take_requests();
        watch.drain();
        let cpu_before = daemon.cpu_time()?;
        hang_up(daemon)?;
        let pass = one_pass(fake, limit)?;
        daemon.wait_idle(limit)?;
        cpu_ms.push((daemon.cpu_time()? - cpu_before).as_secs_f64() * 1e3);
        let after: Vec<String> = fake.take_requests().split_off(pass.len()).into_iter().map(|r| r.action).collect();
        if !after.is_empty() {
            bail!("the daemon sent more after its check over {}: {after:?}", reading.label());
        }
        // Nothing may have changed: every mapping was found where it should be.
        let mut changed = None;
        watch.until(Duration::from_millis(50), |_, event| {
            let kind = event["event"].as_str().unwrap_or("");
            if ["mapped", "dropped", "removed", "pending"].contains(&kind) {
                changed = Some(kind.to_string());
            }
            changed.is_some()
        });
        if let Some(kind) = changed {
            bail!(
                "a pass over {} made the daemon report `{kind}`: it should find every mapping in place",
                reading.label()
            );
        }
        let by_action = count_by_action(&pass);
        match &requests {
            Some(first) if *first != by_action => {
                bail!("passes over {} sent different requests: {first:?}, then {by_action:?}", reading.label())
            }
            _ => requests = Some(by_action),
        }
        pass_ms.push(pass.last().map_or(0.0, |end| (end.at - pass[0].at).as_secs_f64() * 1e3));

        let calls: Vec<floor::SoapCall> =
            pass[..pass.len() - 1].iter().map(|r| (r.action.clone(), r.arguments.clone())).collect();
        let (took, statuses) = floor::upnp_in_a_row(lab, fake.http_port(), reading.version(), &calls)?;
        let floor_requests = fake.take_requests();
        let same_answers = floor_requests.len() == calls.len()
            && floor_requests.iter().zip(&pass).all(|(floor, daemon)| floor.outcome == daemon.outcome)
            && statuses
                .iter()
                .zip(&pass)
                .all(|(status, daemon)| (*status == 200) == (daemon.outcome == FakeOutcome::Ok));
        if !same_answers {
            let daemon: Vec<(&str, FakeOutcome)> =
                pass.iter().take(3).map(|r| (r.action.as_str(), r.outcome)).collect();
            let floor: Vec<(&str, FakeOutcome)> =
                floor_requests.iter().take(3).map(|r| (r.action.as_str(), r.outcome)).collect();
            bail!(
                "the floor's requests over {} were not answered as the daemon's were: the daemon's {daemon:?}..., \
                 the floor's {floor:?}... (HTTP {:?}...)",
                reading.label(),
                &statuses[..statuses.len().min(3)]
            );
        }
        floor_ms.push(took);
    }
    let row = ScaleRow {
        reading: reading.label(),
        mappings: MAPPINGS,
        requests: requests.unwrap_or_default(),
        pass_ms: Samples::new(pass_ms),
        floor_ms: Samples::new(floor_ms),
        cpu_ms: Samples::new(cpu_ms),
    };
    println!(
        "  {}: {} requests ({}), pass {:.0} ms (floor {:.0} ms), daemon CPU {:.0} ms",
        row.reading,
        row.total_requests(),
        row.requests.iter().map(|(a, n)| format!("{n} {a}")).collect::<Vec<_>>().join(", "),
        row.pass_ms.median(),
        row.floor_ms.median(),
        row.cpu_ms.median()
    );
    Ok(row)
}

/// SIGHUP: the daemon reloads its policy and checks its sockets and the gateway now.
fn hang_up(daemon: &Daemon) -> Result<()> {
    // SAFETY: plain kill(2) on the daemon we started.
    if unsafe { libc::kill(daemon.pid as i32, libc::SIGHUP) } != 0 {
        bail!("sending SIGHUP to the daemon: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for the pass SIGHUP asked for; returns its requests, the last being the one after the audit.
fn one_pass(fake: &FakeIgd, limit: Duration) -> Result<Vec<FakeRequest>> {
    let deadline = Instant::now() + limit;
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let requests = fake.requests();
        if let Some(end) = requests.iter().position(|r| r.action == AFTER_THE_AUDIT) {
            let pass = &requests[..=end];
            if let Some(other) = pass.iter().find(|r| r.from.ip() != std::net::IpAddr::V4(LAN1_IP)) {
                bail!("a request from {} came in the middle of a pass: {}", other.from, other.action);
            }
            if end == 0 {
                bail!("the check sent {AFTER_THE_AUDIT} without reading the table first");
            }
            return Ok(pass.to_vec());
        }
        if Instant::now() > deadline {
            bail!(
                "no {AFTER_THE_AUDIT} within {limit:?} of SIGHUP: the pass did not end ({} requests so far)",
                requests.len()
            );
        }
    }
}

/// The pass's requests (the one after the audit left out) by action, in the order first sent.
fn count_by_action(pass: &[FakeRequest]) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for request in &pass[..pass.len() - 1] {
        match counts.iter_mut().find(|(action, _)| *action == request.action) {
            Some((_, n)) => *n += 1,
            None => counts.push((request.action.clone(), 1)),
        }
    }
    counts
}
