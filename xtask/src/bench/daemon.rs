//! natbinder's daemon as the benchmarks run it in the lab: started on the lab's cgroup with a control
//! socket, asked over it (`natbinder status --json`) when it is ready and when its table is clean, and
//! watched for idleness by its CPU time.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use natbinder_lab::Lab;
use serde_json::Value;

pub struct Daemon {
    pub pid: u32,
    pub natbinder: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `natbinder daemon` on the lab's cgroup in lan1, speaking `backend` to the gateway, and
    /// waits until it has found the gateway.
    pub fn start(lab: &mut Lab, natbinder: &Path, backend: &str, extra: &[&str]) -> Result<Self> {
        let socket = lab.dir.join(format!("io.natbinder-{backend}"));
        let log = lab.dir.join(format!("bench-daemon-{backend}.log"));
        let state = lab.dir.join(format!("state-{backend}"));
        let mut cmd = lab.command(&lab.lan1, false, natbinder)?;
        let file = std::fs::File::create(&log)?;
        cmd.args(["daemon", "--cgroup"])
            .arg(&lab.cgroup.path)
            .arg("--state-dir")
            .arg(&state)
            .args(["--backend", backend])
            .arg("--control-socket")
            .arg(&socket)
            .args(extra)
            .env("NATBINDER_LOG", std::env::var("BENCH_LOG").unwrap_or("warn".into()))
            .stdout(file.try_clone()?)
            .stderr(file);
        let pid = lab.spawn(cmd)?;
        let daemon = Self { pid, natbinder: natbinder.to_path_buf(), socket, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(status) = daemon.status() {
                if status["gateway"].is_string() {
                    return Ok(daemon);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "natbinder daemon ({backend}) did not find the lab's gateway within 60 s; its log:\n{}",
                    std::fs::read_to_string(&daemon.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `natbinder status --json`.
    pub fn status(&self) -> Result<Value> {
        let out = Command::new(&self.natbinder)
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .context("running natbinder status")?;
        if !out.status.success() {
            bail!("natbinder status failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        serde_json::from_slice(&out.stdout).context("natbinder status --json printed no JSON")
    }

    /// Events the kernel could not hand to the daemon so far.
    pub fn lost_events(&self) -> Result<u64> {
        Ok(self.status()?["lost_events"].as_u64().unwrap_or(0))
    }

    /// How many mappings the table holds in any state.
    pub fn mappings(&self) -> Result<u64> {
        let status = self.status()?;
        let counts = status["counts"].as_object().context("status has no counts")?;
        Ok(counts.values().filter_map(Value::as_u64).sum())
    }

    /// The daemon's CPU time so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time_of(self.pid)
    }

    /// Waits until the daemon has used no CPU for 300 ms (its work for what came before is done).
    pub fn wait_idle(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = self.cpu_time()?;
        let mut quiet_since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.cpu_time()?;
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(300) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the daemon was still busy after {limit:?}");
            }
        }
    }
}

impl Daemon {
    /// Resident memory (VmRSS), KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib_of(self.pid).context("no VmRSS in /proc/PID/status")
    }

    /// Context switches so far of each of the daemon's threads, by thread id: each is a wake-up (or a
    /// preemption).
    pub fn context_switches(&self) -> Result<std::collections::HashMap<u32, u64>> {
        let mut threads = std::collections::HashMap::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid))? {
            let task = task?;
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let switches = status
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
            threads.insert(tid, switches);
        }
        Ok(threads)
    }
}

/// Wake-ups between two [`Daemon::context_switches`] readings: threads that ended in between (tokio's
/// idle blocking threads) are left out, threads that started count from 0.
pub fn wakeups_between(
    before: &std::collections::HashMap<u32, u64>,
    after: &std::collections::HashMap<u32, u64>,
) -> u64 {
    after.iter().map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0))).sum()
}

/// Resident memory (VmRSS) of `pid` in KiB, from /proc/PID/status.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// utime + stime of `pid`, from /proc/PID/stat.
pub fn cpu_time_of(pid: u32) -> Result<Duration> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}
