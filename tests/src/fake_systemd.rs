//! A stand-in for systemd's manager, for what these machines cannot show: systemd is not PID 1 here.
//! It runs on a private bus (Debian's dbus-daemon, started here) and answers StartTransientUnit for a
//! scope as systemd does: it makes the scope's cgroup `<cgroup2 root>/<Slice>/<name>`, moves the PIDs
//! in, and returns a job. Every call is kept for the test to check what natbinder asked for.
//! Unlike systemd it does not remove a scope when it empties: dropping it kills what is left in its
//! scopes and removes them.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

/// One StartTransientUnit call, its properties as text ("PIDs" -> "[4242]").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransientUnit {
    pub name: String,
    pub mode: String,
    pub properties: Vec<(String, String)>,
}

impl TransientUnit {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

struct Manager {
    root: PathBuf,
    calls: Arc<Mutex<Vec<TransientUnit>>>,
    made: Arc<Mutex<Vec<PathBuf>>>,
}

fn text(value: &OwnedValue) -> String {
    if let Ok(s) = <&str>::try_from(value) {
        return s.to_string();
    }
    if let Ok(pids) = <Vec<u32>>::try_from(value.clone()) {
        return format!("{pids:?}");
    }
    format!("{value:?}")
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    async fn start_transient_unit(
        &self,
        name: String,
        mode: String,
        properties: Vec<(String, OwnedValue)>,
        _aux: Vec<(String, Vec<(String, OwnedValue)>)>,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        let call = TransientUnit {
            name: name.clone(),
            mode,
            properties: properties.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
        };
        self.calls.lock().unwrap().push(call);
        let find = |key: &str| properties.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let slice = find("Slice").and_then(|v| String::try_from(v).ok()).unwrap_or_else(|| "system.slice".into());
        let pids: Vec<u32> = find("PIDs")
            .and_then(|v| <Vec<u32>>::try_from(v).ok())
            .ok_or_else(|| zbus::fdo::Error::InvalidArgs("PIDs must be an array of uint32 (au)".into()))?;
        if !name.ends_with(".scope") {
            return Err(zbus::fdo::Error::InvalidArgs(format!("{name}: only scopes are faked")));
        }
        let dir = self.root.join(&slice).join(&name);
        if dir.exists() {
            return Err(zbus::fdo::Error::Failed(format!("Unit {name} was already loaded or has a fragment file.")));
        }
        std::fs::create_dir_all(&dir).map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
        for pid in pids {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .map_err(|e| zbus::fdo::Error::Failed(format!("moving {pid}: {e}")))?;
        }
        self.made.lock().unwrap().push(dir);
        OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/1")
            .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }
}

pub struct FakeSystemd {
    address: String,
    calls: Arc<Mutex<Vec<TransientUnit>>>,
    made: Arc<Mutex<Vec<PathBuf>>>,
    bus: Child,
    dir: PathBuf,
    // The connection serves on this runtime's threads; both live as long as the fake.
    _connection: zbus::Connection,
    _runtime: tokio::runtime::Runtime,
}

impl FakeSystemd {
    /// Starts a private bus in `dir` and the fake manager on it.
    pub fn start(dir: &std::path::Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("system_bus_socket");
        let _ = std::fs::remove_file(&socket);
        let address = format!("unix:path={}", socket.display());
        let bus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", &format!("--address={address}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dbus-daemon (the setup installs it)")?;
        let started = Instant::now();
        while !socket.exists() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("dbus-daemon did not open {} within 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let made = Arc::new(Mutex::new(Vec::new()));
        let manager = Manager { root: crate::cgroup2_root()?, calls: calls.clone(), made: made.clone() };
        let connection = runtime.block_on(async {
            zbus::connection::Builder::address(address.as_str())?
                .name("org.freedesktop.systemd1")?
                .serve_at("/org/freedesktop/systemd1", manager)?
                .build()
                .await
        })?;
        Ok(Self { address, calls, made, bus, dir: dir.to_path_buf(), _connection: connection, _runtime: runtime })
    }

    /// DBUS_SYSTEM_BUS_ADDRESS for natbinder.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn calls(&self) -> Vec<TransientUnit> {
        self.calls.lock().unwrap().clone()
    }

    /// Kills what runs in the scopes made so far and removes them (and their slice, once empty), as
    /// systemd does when a scope's processes are gone.
    pub fn end_scopes(&self) {
        for dir in self.made.lock().unwrap().drain(..) {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(&dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(slice) = dir.parent() {
                let _ = std::fs::remove_dir(slice);
            }
        }
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.end_scopes();
        let _ = self.bus.kill();
        let _ = self.bus.wait();
        let _ = std::fs::remove_file(self.dir.join("system_bus_socket"));
    }
}
