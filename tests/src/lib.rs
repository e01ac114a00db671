//! Helpers for natbinder's end-to-end tests: the lab with a natbinder daemon on lan1 and ordinary
//! programs (natbinder-testapp) started in the watched cgroup.
use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
pub use natbinder_lab::*;

pub mod fake_systemd;
pub mod inprocess;
pub use inprocess::InProcessDaemon;
pub use natbinder::{
    outcome::{Outcome, Removal},
    table::{MappingKey, PendingReason, PortKey},
    Protocol,
};

/// A binary of this workspace built next to the test executable (target/<profile>/NAME).
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`, as `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// The natbinder binary under test: $NATBINDER_BIN, or the one built with these tests.
pub fn natbinder_bin() -> PathBuf {
    match std::env::var_os("NATBINDER_BIN") {
        Some(p) => p.into(),
        None => workspace_bin("natbinder"),
    }
}

pub fn testapp_bin() -> PathBuf {
    workspace_bin("natbinder-testapp")
}

/// A running natbinder daemon in lan1.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` (after `from` bytes), returning the time it took.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return Ok(start.elapsed());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("natbinder exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            if start.elapsed() > limit {
                bail!("natbinder did not log {needle:?} within {limit:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` and waits for the process to end; returns its exit status.
    pub fn stop(&mut self, signal: i32, limit: Duration) -> Result<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                bail!("natbinder did not exit within {limit:?} of signal {signal}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program under test, started in the watched cgroup.
pub struct App {
    pub pid: u32,
    pub port: u16,
    pub child: Child,
}

impl App {
    /// Asks a `--close-on-stdin` app to close its socket (it keeps running) and waits until it has.
    pub fn close_socket(&mut self, stdout: &mut BufReader<std::process::ChildStdout>) -> Result<()> {
        use std::io::Write;
        writeln!(self.child.stdin.as_mut().context("app has no stdin")?)?;
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "closed" {
            bail!("app answered {line:?} instead of closed");
        }
        Ok(())
    }
}

/// Lab tests share the kernel (cgroup hooks, namespaces): they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Harness {
    // Field order = drop order: the daemon stops before the lab is torn down, and the lock goes last.
    pub daemon: Option<Daemon>,
    /// natbinder in this process, for tests that wait on its outcomes.
    pub inproc: Option<InProcessDaemon>,
    pub lab: Lab,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Harness {
    pub fn start() -> Result<Self> {
        Self::start_with(LabConfig::default(), &[])
    }

    pub fn start_with(config: LabConfig, daemon_args: &[&str]) -> Result<Self> {
        let mut h = Self::lab_only(config)?;
        h.start_daemon(daemon_args)?;
        Ok(h)
    }

    /// The lab without a daemon (start it later with [`Harness::start_daemon`]).
    pub fn lab_only(config: LabConfig) -> Result<Self> {
        let serial = serial();
        let lab = Lab::start(config)?;
        Ok(Harness { daemon: None, inproc: None, lab, _serial: serial })
    }

    /// Starts natbinder in lan1 (outside the watched cgroup) and waits until it is ready.
    pub fn start_daemon(&mut self, extra: &[&str]) -> Result<()> {
        self.start_daemon_with_env(extra, &[])
    }

    /// As [`Harness::start_daemon`], with these environment variables set for natbinder.
    pub fn start_daemon_with_env(&mut self, extra: &[&str], env: &[(&str, &str)]) -> Result<()> {
        let log_path = self.lab.dir.join(format!("natbinder-{}.log", Instant::now().elapsed().as_nanos()));
        let log = File::create(&log_path)?;
        let mut cmd = self.lab.command(&self.lab.lan1, false, natbinder_bin())?;
        cmd.arg("daemon")
            .arg("--cgroup")
            .arg(&self.lab.cgroup.path)
            .arg("--state-dir")
            .arg(self.lab.dir.join("state"))
            .arg("--control-socket")
            .arg(self.control_socket())
            .args(extra)
            .envs(env.iter().copied())
            .env("NATBINDER_LOG", "natbinder=debug,info")
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting natbinder")?;
        let mut daemon = Daemon { child, log: log_path };
        daemon.wait_log("ready:", Duration::from_secs(30))?;
        self.daemon = Some(daemon);
        Ok(())
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon running")
    }

    /// The lab with natbinder running in this process in lan1 (see [`InProcessDaemon`]).
    pub fn start_in_process(config: LabConfig, daemon_args: &[&str]) -> Result<Self> {
        let mut h = Self::lab_only(config)?;
        h.start_daemon_in_process(daemon_args)?;
        Ok(h)
    }

    /// Starts natbinder in this process, in lan1, watching the lab's cgroup; waits until it is ready.
    pub fn start_daemon_in_process(&mut self, extra: &[&str]) -> Result<()> {
        let cgroup = self.lab.cgroup.path.display().to_string();
        let mut args = vec!["--cgroup", cgroup.as_str()];
        args.extend_from_slice(extra);
        self.start_daemon_in_process_machine_wide(&args)
    }

    /// Starts natbinder in this process, in lan1, watching the whole machine (unless `extra` names a
    /// --cgroup), so that the desktop default policy decides; waits until it is ready.
    pub fn start_daemon_in_process_machine_wide(&mut self, extra: &[&str]) -> Result<()> {
        let mut args = vec![
            "--state-dir".to_string(),
            self.lab.dir.join("state").display().to_string(),
            "--control-socket".to_string(),
            self.control_socket().display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        self.inproc = Some(InProcessDaemon::start(&self.lab.lan1, &args)?);
        Ok(())
    }

    /// Starts natbinder-testapp in lan1, in `cgroup`, as `uid` (gid the same), and waits for "bound
    /// PORT". The binary is copied where any user may run it.
    pub fn app_as(
        &mut self,
        cgroup: &Cgroup,
        uid: u32,
        name: &str,
        args: &[&str],
    ) -> Result<(App, BufReader<std::process::ChildStdout>)> {
        let bin = self.runnable_by_anyone(&testapp_bin())?;
        let ns = Netns { name: self.lab.lan1.name.clone() };
        let mut cmd = natbinder_lab::command_in_as(&ns, Some(cgroup), Some((uid, uid)), &bin)?;
        cmd.args(args).env("TESTAPP_NAME", name).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        spawn_app(cmd, name)
    }

    /// `natbinder run RUN_ARGS -- PROGRAM...` in lan1, outside every cgroup natbinder watches (in
    /// this test's own cgroup), as `uid` (None: root), talking to this lab's daemon. "testapp" as
    /// PROGRAM's first word is natbinder-testapp. stdin, stdout and stderr are piped.
    pub fn run_command(&self, uid: Option<u32>, run_args: &[&str], program: &[&str]) -> Result<std::process::Command> {
        let natbinder = self.runnable_by_anyone(&natbinder_bin())?;
        let testapp = self.runnable_by_anyone(&testapp_bin())?;
        let ns = Netns { name: self.lab.lan1.name.clone() };
        let mut cmd = natbinder_lab::command_in_as(&ns, None, uid.map(|u| (u, u)), &natbinder)?;
        cmd.arg("run").arg("--socket").arg(self.control_socket()).args(run_args).arg("--");
        for (i, word) in program.iter().enumerate() {
            if i == 0 && *word == "testapp" {
                cmd.arg(&testapp);
            } else {
                cmd.arg(word);
            }
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        Ok(cmd)
    }

    /// Starts [`Harness::run_command`] with natbinder-testapp named `name` and waits for "bound PORT".
    pub fn run_app(
        &self,
        uid: Option<u32>,
        run_args: &[&str],
        name: &str,
        app_args: &[&str],
    ) -> Result<(App, BufReader<std::process::ChildStdout>)> {
        let program: Vec<&str> = std::iter::once("testapp").chain(app_args.iter().copied()).collect();
        let mut cmd = self.run_command(uid, run_args, &program)?;
        cmd.env("TESTAPP_NAME", name);
        spawn_app(cmd, name)
    }

    /// A copy of `program` that every user may run (the build's own directory may be private).
    pub fn runnable_by_anyone(&self, program: &std::path::Path) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let bin_dir = self.lab.dir.join("bin");
        let bin = bin_dir.join(program.file_name().context("a program's file name")?);
        if !bin.exists() {
            std::fs::create_dir_all(&bin_dir)?;
            std::fs::copy(program, &bin)?;
            for path in [&self.lab.dir, &bin_dir, &bin] {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        Ok(bin)
    }

    /// The daemon's control socket in this lab.
    pub fn control_socket(&self) -> PathBuf {
        self.lab.dir.join("io.natbinder")
    }

    /// Runs `natbinder ARGS --socket <this lab's>` as `uid` (None: root) and returns its exit code,
    /// stdout and stderr.
    pub fn cli_as(&self, uid: Option<u32>, args: &[&str]) -> Result<(i32, String, String)> {
        use std::os::unix::process::CommandExt;
        let mut cmd = match uid {
            // std drops root's supplementary groups when it switches uid.
            Some(uid) => {
                let mut cmd = std::process::Command::new(self.runnable_by_anyone(&natbinder_bin())?);
                cmd.uid(uid).gid(uid);
                cmd
            }
            None => std::process::Command::new(natbinder_bin()),
        };
        cmd.args(args).arg("--socket").arg(self.control_socket());
        let out = cmd.output().context("running the natbinder CLI")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// As [`Harness::cli_as`], as root.
    pub fn cli(&self, args: &[&str]) -> Result<(i32, String, String)> {
        self.cli_as(None, args)
    }

    /// The in-process daemon.
    pub fn natbinder(&mut self) -> &mut InProcessDaemon {
        self.inproc.as_mut().expect("natbinder running in process")
    }

    /// Starts natbinder-testapp with `args` in `ns`, in the watched cgroup, and waits for "bound PORT".
    /// Returns the app and its stdout reader.
    pub fn app_in(
        &mut self,
        ns: &Netns,
        name: &str,
        args: &[&str],
    ) -> Result<(App, BufReader<std::process::ChildStdout>)> {
        let mut cmd = self.lab.command(ns, true, testapp_bin())?;
        cmd.args(args).env("TESTAPP_NAME", name).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        spawn_app(cmd, name)
    }

    pub fn app(&mut self, name: &str, args: &[&str]) -> Result<(App, BufReader<std::process::ChildStdout>)> {
        let ns = Netns { name: self.lab.lan1.name.clone() };
        self.app_in(&ns, name, args)
    }

    /// What the program behind `port` answers the WAN peer over TCP, once it answers within `limit`.
    pub fn reachable_tcp(&self, port: u16, limit: Duration) -> Option<String> {
        wait_for(limit, || tcp_from_wan(&self.lab, port, "ping").answered())
    }

    /// As [`Harness::reachable_tcp`], over UDP.
    pub fn reachable_udp(&self, port: u16, limit: Duration) -> Option<String> {
        wait_for(limit, || udp_from_wan(&self.lab, port, "ping").answered())
    }

    /// The gateway's entry for `protocol`/`port`, as its nftables rules show it (whatever protocol made it).
    pub fn mapping(&self, protocol: &str, port: u16) -> Option<GatewayMapping> {
        self.lab
            .gateway_mappings()
            .expect("listing the gateway's mappings")
            .into_iter()
            .find(|m| m.protocol == protocol && m.external_port == port)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = &self.daemon {
                eprintln!("---- natbinder log ----\n{}", d.log_text());
            }
            if self.inproc.is_some() {
                eprintln!("---- natbinder log (in process) ----\n{}", inprocess::log_text());
            }
            eprintln!("---- miniupnpd log ----\n{}", self.lab.miniupnpd_log());
        }
        // The daemon goes first so that it cannot act on a half-removed lab.
        self.daemon = None;
        self.inproc = None;
        // Programs started with `natbinder run` live in run cgroups outside the lab's: end them, and
        // remove their cgroups (and the base, if no other run is left).
        self.lab.kill_processes_in(&self.lab.lan1);
        if let Ok(runs) = cgroup2_root().and_then(|root| {
            natbinder::run::cgroups::RunCgroups::prepare(&root, natbinder::run::cgroups::RunPlacement::Daemon)
        }) {
            let deadline = Instant::now() + Duration::from_secs(2);
            while runs.sweep() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            runs.finish();
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns a natbinder-testapp command and waits for its "bound PORT" line.
fn spawn_app(mut cmd: std::process::Command, name: &str) -> Result<(App, BufReader<std::process::ChildStdout>)> {
    let mut child = cmd.spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let Some(port) = line.trim().strip_prefix("bound ").and_then(|p| p.parse().ok()) else {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
        let _ = child.wait();
        return Err(anyhow!("{name} did not bind: {}", err.trim()));
    };
    Ok((App { pid: child.id(), port, child }, stdout))
}
