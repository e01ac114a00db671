//! The cgroups `natbinder run` puts programs in, one per run:
//! * where systemd runs, a transient scope `natbinder.slice/natbinder-run-PID.scope` that systemd
//!   makes and removes ([`super::systemd`]): systemd owns the cgroups of its units, and a program in
//!   the daemon's own service cgroup would be killed at each restart of the daemon;
//! * elsewhere, `natbinder-run/run-PID` under the daemon's own cgroup, which the daemon makes, and
//!   removes once empty ([`RunCgroups::sweep`]).
//!
//! The hooks see these cgroups (attached to the base, or to each scope, when the watched cgroup does
//! not contain them) and the policy forwards what runs in them ([`crate::policy::Policy::with_runs`]).
//! The caller moves in at once; the program it starts, with everything that program forks, stays
//! there. Populated run cgroups outlive the daemon, and a daemon started later watches them again
//! (its resync adopts their sockets).
use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context, Result};
use tracing::debug;

use super::systemd::{self, SystemdScopes};

/// The base's name, below the daemon's own cgroup, where systemd does not manage cgroups.
pub const BASE_NAME: &str = "natbinder-run";

/// `run-cgroups`: who makes the cgroups of `natbinder run`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RunPlacement {
    /// systemd where it runs (/run/systemd/system exists), the daemon elsewhere.
    #[default]
    Auto,
    /// Transient scopes in natbinder.slice, asked of systemd over D-Bus.
    Systemd,
    /// natbinder-run/ under the daemon's own cgroup.
    Daemon,
}

enum Maker {
    Daemon,
    Systemd(SystemdScopes),
    /// The daemon could not make its base (why): `natbinder run` is refused, the rest works.
    Unavailable(String),
}

pub struct RunCgroups {
    /// The cgroup2 mount.
    root: PathBuf,
    /// The base, absolute: natbinder.slice, or natbinder-run under the daemon's cgroup.
    base: PathBuf,
    maker: Maker,
    /// Creating a run cgroup and moving a process in is one step for [`RunCgroups::sweep`], which
    /// would otherwise remove a cgroup made a moment ago and still empty.
    busy: Mutex<()>,
}

impl RunCgroups {
    /// Where runs go on this machine. systemd is reached on the system bus (DBUS_SYSTEM_BUS_ADDRESS, or
    /// its standard socket). With the daemon making them, the base is created now if missing.
    pub fn prepare(root: &Path, placement: RunPlacement) -> Result<Self> {
        let by_systemd = match placement {
            RunPlacement::Auto => systemd::systemd_runs(),
            RunPlacement::Systemd => true,
            RunPlacement::Daemon => false,
        };
        if by_systemd {
            return Ok(Self {
                root: root.to_path_buf(),
                base: root.join(systemd::SLICE),
                maker: Maker::Systemd(SystemdScopes::new()),
                busy: Mutex::new(()),
            });
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("/proc/self/cgroup has no cgroup2 line: natbinder needs cgroup v2")?;
        let base = root.join(own.trim_start_matches('/')).join(BASE_NAME);
        let maker = match std::fs::create_dir_all(&base) {
            Ok(()) => Maker::Daemon,
            Err(e) => {
                let why = format!(
                    "creating {} for the programs `natbinder run` starts: {e} (natbinder needs CAP_DAC_OVERRIDE \
                     to make cgroups itself; or set run-cgroups = \"systemd\")",
                    base.display()
                );
                tracing::warn!("{why}; `natbinder run` is refused until that is fixed");
                Maker::Unavailable(why)
            }
        };
        Ok(Self { root: root.to_path_buf(), base, maker, busy: Mutex::new(()) })
    }

    /// Whether the daemon makes the run cgroups, under a base that exists from the start.
    pub fn by_daemon(&self) -> bool {
        matches!(self.maker, Maker::Daemon)
    }

    /// Whether systemd makes the run cgroups (one scope each, made and removed by systemd).
    pub fn by_systemd(&self) -> bool {
        matches!(self.maker, Maker::Systemd(_))
    }

    /// The cgroup2 mount.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The base: natbinder.slice (which exists only while a run does), or natbinder-run.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The base relative to the cgroup2 root, as the policy names cgroups.
    pub fn base_relative(&self) -> String {
        relative(&self.root, &self.base)
    }

    /// Whether `cgroup` (relative to the cgroup2 root) is a run cgroup or below one.
    pub fn contains(&self, cgroup: &str) -> bool {
        let base = self.base_relative();
        let cgroup = cgroup.trim_matches('/');
        cgroup.strip_prefix(base.as_str()).is_some_and(|rest| rest.starts_with('/'))
    }

    /// Moves process `pid` (running `program`) into a new run cgroup and returns that cgroup
    /// (relative to the cgroup2 root). `pidfd` must refer to the same process, opened before: the
    /// move counts only if the process is still alive after it, so a pid taken over by another
    /// process meanwhile is never moved. `owner`: the process must belong to that uid (None: any,
    /// for root's calls), so that a caller whose pid was reused can at worst move another process of
    /// its own user.
    pub async fn place(
        self: &Arc<Self>,
        pid: u32,
        pidfd: OwnedFd,
        owner: Option<u32>,
        program: &str,
    ) -> Result<String> {
        if let Some(uid) = owner {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("reading /proc/{pid}/status"))?;
            let real: Option<u32> = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok());
            if real != Some(uid) {
                bail!("pid {pid} is not uid {uid}'s: the caller went away and its pid was reused");
            }
        }
        match &self.maker {
            Maker::Systemd(scopes) => {
                let cgroup = scopes.start_scope(pid, program).await?;
                if !alive(&pidfd) {
                    bail!("pid {pid} exited while it was being moved into its run cgroup");
                }
                Ok(cgroup)
            }
            Maker::Unavailable(why) => bail!("natbinder run is unavailable: {why}"),
            Maker::Daemon => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.make_and_move(pid, &pidfd))
                    .await
                    .context("moving the caller into its run cgroup")?
            }
        }
    }

    /// natbinder-run/run-PID, made, with `pid` moved in.
    fn make_and_move(&self, pid: u32, pidfd: &OwnedFd) -> Result<String> {
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let mut dir = self.base.join(format!("run-{pid}"));
        let mut n = 1;
        loop {
            match std::fs::create_dir(&dir) {
                Ok(()) => break,
                // A run of an earlier process with this pid, still running: pick another name.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100 => {
                    n += 1;
                    dir = self.base.join(format!("run-{pid}-{n}"));
                }
                Err(e) => return Err(e).with_context(|| format!("creating the run cgroup {}", dir.display())),
            }
        }
        if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
            let _ = std::fs::remove_dir(&dir);
            return Err(e).with_context(|| format!("moving pid {pid} into {}", dir.display()));
        }
        if !alive(pidfd) {
            let _ = std::fs::remove_dir(&dir);
            bail!("pid {pid} exited while it was being moved into its run cgroup");
        }
        Ok(relative(&self.root, &dir))
    }

    /// Removes the run cgroups nothing runs in any more; returns how many are still in use. (systemd
    /// removes its scopes itself.)
    pub fn sweep(&self) -> usize {
        if !matches!(self.maker, Maker::Daemon) {
            return 0;
        }
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(entries) = std::fs::read_dir(&self.base) else { return 0 };
        let mut in_use = 0;
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let dir = entry.path();
            if populated(&dir) {
                in_use += 1;
                continue;
            }
            // A program that made cgroups of its own below its run cgroup: those go first.
            remove_tree(&dir);
        }
        in_use
    }

    /// At shutdown: the empty run cgroups go, and the base too if nothing runs there. Programs still
    /// running keep theirs.
    pub fn finish(&self) {
        if matches!(self.maker, Maker::Daemon) && self.sweep() == 0 {
            let _ = std::fs::remove_dir(&self.base);
        }
    }
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).map(|p| p.display().to_string()).unwrap_or_else(|_| path.display().to_string())
}

/// cgroup.events says "populated 1" while a process runs in the cgroup or below it.
fn populated(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
        // Unreadable: leave it alone.
        Err(_) => true,
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        debug!("could not remove the empty run cgroup {}: {e}", dir.display());
    }
}

/// Whether the process behind `pidfd` is still running (a zombie is not).
fn alive(pidfd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut poll = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd, no wait. A pidfd is readable once its process has exited.
    let rc = unsafe { libc::poll(&mut poll, 1, 0) };
    rc == 0
}

/// A pidfd for `pid` (pidfd_open, Linux 5.3).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the fd it returns is owned at once.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_cgroups_are_below_the_base_and_nowhere_else() {
        let root = PathBuf::from("/sys/fs/cgroup");
        let runs = RunCgroups {
            root: root.clone(),
            base: root.join("system.slice/natbinder.service/natbinder-run"),
            maker: Maker::Daemon,
            busy: Mutex::new(()),
        };
        assert_eq!(runs.base_relative(), "system.slice/natbinder.service/natbinder-run");
        assert!(runs.contains("system.slice/natbinder.service/natbinder-run/run-42"));
        assert!(runs.contains("/system.slice/natbinder.service/natbinder-run/run-42/inner"));
        assert!(!runs.contains("system.slice/natbinder.service/natbinder-run"), "the base itself holds nothing");
        assert!(!runs.contains("system.slice/natbinder.service/natbinder-run-other/run-1"));
        assert!(!runs.contains("user.slice"));
    }

    #[test]
    fn a_pidfd_tells_a_running_process_from_an_exited_one() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let pidfd = pidfd_open(child.id()).unwrap();
        assert!(alive(&pidfd));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!alive(&pidfd));
    }
}
