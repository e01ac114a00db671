//! Transient systemd scopes for `natbinder run`, where systemd manages the machine's cgroups.
//!
//! systemd owns every cgroup of the units it runs: a process moved into the daemon's own service
//! cgroup would be killed with it at each `systemctl restart natbinder`, and would confuse systemd's
//! accounting. So, where systemd runs, `run` asks it (org.freedesktop.systemd1.Manager
//! StartTransientUnit over the system bus, as `systemd-run --scope` does) for a scope of its own,
//! `natbinder-run-PID.scope` in `natbinder.slice`, holding the caller's pid. systemd removes the scope
//! when its last process exits.
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::OnceCell;
use zbus::zvariant::{OwnedObjectPath, Value};

/// The slice the scopes go in, at the top of the hierarchy beside system.slice and user.slice.
pub const SLICE: &str = "natbinder.slice";

/// How long systemd may take to move the caller into its new scope once the job is queued.
const MOVE_TIMEOUT: Duration = Duration::from_secs(5);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;
}

/// Whether systemd manages this machine (sd_booted(3): /run/systemd/system exists).
pub fn systemd_runs() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// A client of systemd's manager on the system bus (DBUS_SYSTEM_BUS_ADDRESS, or its standard
/// socket), connected on first use.
#[derive(Default)]
pub struct SystemdScopes {
    connection: OnceCell<zbus::Connection>,
}

impl SystemdScopes {
    pub fn new() -> Self {
        Self::default()
    }

    async fn connection(&self) -> Result<&zbus::Connection> {
        self.connection.get_or_try_init(zbus::Connection::system).await.context(
            "connecting to systemd over the system bus (is D-Bus running? run-cgroups = \"daemon\" has \
                 natbinder make the cgroups of `natbinder run` itself)",
        )
    }

    /// Starts a scope holding `pid` and returns its cgroup (relative to the cgroup2 root) once `pid`
    /// is in it. `program` names it for people (`systemctl status`).
    pub async fn start_scope(&self, pid: u32, program: &str) -> Result<String> {
        let manager = ManagerProxy::new(self.connection().await?).await.context("reaching systemd's manager")?;
        let description = format!("natbinder run: {program}");
        let mut n = 1;
        let unit = loop {
            let unit =
                if n == 1 { format!("natbinder-run-{pid}.scope") } else { format!("natbinder-run-{pid}-{n}.scope") };
            let properties = [
                ("PIDs", Value::from(vec![pid])),
                ("Slice", Value::from(SLICE)),
                ("Description", Value::from(description.as_str())),
                // Gone from systemd's memory once it ends, whatever its last process's status.
                ("CollectMode", Value::from("inactive-or-failed")),
            ];
            match manager.start_transient_unit(&unit, "fail", &properties, &[]).await {
                Ok(_job) => break unit,
                // A scope of an earlier process with this pid still runs (its children do): another name.
                Err(zbus::Error::MethodError(name, _, _)) if name.as_str().ends_with("UnitExists") && n < 100 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("asking systemd for the scope {unit}")),
            }
        };
        // The job moves the process when it runs, a moment after the call returned.
        let suffix = format!("/{SLICE}/{unit}");
        let started = Instant::now();
        loop {
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if let Some(path) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) {
                if path.ends_with(&suffix) {
                    return Ok(path.trim_start_matches('/').to_string());
                }
            }
            if started.elapsed() > MOVE_TIMEOUT {
                bail!("systemd did not move pid {pid} into {unit} within {MOVE_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
