//! The control socket: a Varlink service (interface io.natbinder, io.natbinder.varlink) on a Unix
//! socket, /run/natbinder/io.natbinder by default. Never TCP or HTTP: who may do what is decided by
//! the peer's credentials (SO_PEERCRED, SO_PEERGROUPS), which only a local socket carries.
//!
//! * Anyone may read (Status, List, Get, ExternalAddress, Watch); the socket is 0666.
//! * Changes (Reload, and the static mappings to come) are for root, the daemon's own uid, members
//!   of the operator group (`natbinder` by default) and configured operator uids. A refusal names the
//!   rule and what to do.
//! * One client costs the others nothing: at most [`MAX_CLIENTS`] connections at once, at most
//!   [`MAX_CLIENTS_PER_USER`] of one uid, and a few more kept for root, so that one local user cannot
//!   lock out the others or the administrator (the next is told so and closed); a message must
//!   arrive whole within [`READ_TIMEOUT`] and be at most
//!   [`varlink::MAX_MESSAGE`] bytes; a reply must be taken within [`WRITE_TIMEOUT`], or the
//!   connection is closed. Every connection is its own task.
//!
//! [`varlink`] is the wire protocol, [`service`] what each method does, [`views`] the JSON shapes,
//! [`client`] the CLI's side.
use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch, Semaphore},
};
use tracing::{debug, warn};

use crate::{outcome::OutcomeBus, table::TableHandle};

pub mod client;
pub mod service;
pub mod varlink;
pub mod views;

pub const DEFAULT_SOCKET: &str = "/run/natbinder/io.natbinder";
pub const DEFAULT_OPERATOR_GROUP: &str = "natbinder";
pub const MAX_CLIENTS: usize = 64;
pub const MAX_CLIENTS_PER_USER: usize = 16;
/// Connections root can still open when the others are all taken.
pub const ROOT_RESERVE: usize = 8;
/// How long a connection may take to send its next call, whole (an idle connection is closed too).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to read a reply.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The interface's description, served by org.varlink.service.GetInterfaceDescription.
pub const INTERFACE: &str = include_str!("io.natbinder.varlink");

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// Members may change things; None: no group.
    pub operator_group: Option<String>,
    pub operator_uids: Vec<u32>,
    /// Who may start programs with `natbinder run`.
    pub run_allowed: RunAllowed,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            operator_group: Some(DEFAULT_OPERATOR_GROUP.to_string()),
            operator_uids: Vec::new(),
            run_allowed: RunAllowed::Everyone,
        }
    }
}

/// `run-allowed`: who may start programs with `natbinder run`. The policy applies to those programs
/// either way (the administrator's rules, the deny list, the per-user limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunAllowed {
    /// Every user: as on a desktop, where users' own programs are forwarded anyway.
    #[default]
    Everyone,
    /// Root, the operator group's members and operator uids.
    Operators,
}

/// A reload asked for over the socket: the event loop does it and answers with the settings that
/// need a restart, or why the configuration was refused.
pub type ReloadRequest = oneshot::Sender<std::result::Result<Vec<String>, String>>;

/// A run cgroup made for `natbinder run` (absolute path), and who waits until the kernel watches it.
pub type RunPlaced = (PathBuf, oneshot::Sender<()>);

/// What the service reads and asks for.
pub struct ControlState {
    pub table: TableHandle,
    /// `natbinder run`: its cgroups, and the answers to `run --wait`'s supervisors.
    pub runs: Arc<crate::run::cgroups::RunCgroups>,
    pub bind_waits: crate::run::wait::BindWaits,
    /// The lowest forwarded port, which `run --wait` needs to know which binds to hold.
    pub min_port: u16,
    /// A run cgroup was made: the event loop attaches the hooks to it where needed and answers.
    pub run_placed: mpsc::UnboundedSender<RunPlaced>,
    /// Where static mappings and disabled ports are kept ([`crate::operator_state`]).
    pub state_dir: PathBuf,
    /// Saves of that file, one at a time and in order.
    pub saving: tokio::sync::Mutex<()>,
    pub facts: Arc<Mutex<views::Facts>>,
    pub outcomes: OutcomeBus,
    pub reload: mpsc::UnboundedSender<ReloadRequest>,
    /// Replaced by a reload.
    pub operators: std::sync::RwLock<Operators>,
}

/// Who may change things, resolved at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operators {
    pub group: Option<(String, u32)>,
    pub uids: Vec<u32>,
    /// The daemon's own uid (root, normally).
    pub own_uid: u32,
    pub run_allowed: RunAllowed,
}

impl Operators {
    pub fn resolve(config: &ControlConfig) -> Self {
        let group = config.operator_group.as_ref().and_then(|name| match crate::policy::spec::lookup_group(name) {
            Some(gid) => Some((name.clone(), gid)),
            None => {
                debug!("operator group {name} does not exist: only root and operator uids may change things");
                None
            }
        });
        // SAFETY: geteuid cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        Self { group, uids: config.operator_uids.clone(), own_uid, run_allowed: config.run_allowed }
    }

    /// Ok if `peer` may start programs with `natbinder run`; else the rule and what to do.
    pub fn may_run(&self, peer: &Peer) -> std::result::Result<(), (String, String)> {
        match self.run_allowed {
            RunAllowed::Everyone => Ok(()),
            RunAllowed::Operators => self.may_change(peer).map_err(|(_, fix)| {
                ("run-allowed = \"operators\": `natbinder run` is for root, the operator group's members and operator uids".to_string(), fix)
            }),
        }
    }

    /// Ok if `peer` may change things; else the rule and what to do, for the refusal.
    pub fn may_change(&self, peer: &Peer) -> std::result::Result<(), (String, String)> {
        if peer.uid == 0 || peer.uid == self.own_uid || self.uids.contains(&peer.uid) {
            return Ok(());
        }
        if let Some((_, gid)) = &self.group {
            if peer.gid == *gid || peer.groups.contains(gid) {
                return Ok(());
            }
        }
        let rule = "changes are for root, the operator group's members and operator uids".to_string();
        let fix = match &self.group {
            Some((name, _)) => format!(
                "run it with sudo, or have an administrator add you to the {name} group (`sudo usermod -aG {name} $USER`, then log in again)"
            ),
            None => "run it with sudo, or have an administrator add your uid to operator-uids in natbinder.toml".to_string(),
        };
        Err((rule, fix))
    }
}

/// The caller, as the kernel vouches for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub groups: Vec<u32>,
}

fn peer_of(stream: &UnixStream) -> io::Result<Peer> {
    let cred = stream.peer_cred()?;
    Ok(Peer { uid: cred.uid(), gid: cred.gid(), pid: cred.pid(), groups: peer_groups(stream) })
}

/// SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups at connect time.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * 4) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `groups`, which has that many.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / 4);
    groups
}

/// The bound socket; the file is removed when this is dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` (creating its directory), refusing if another natbinder answers there; a stale
    /// socket file from a crashed run is replaced.
    pub fn bind(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("creating {} for the control socket (use --control-socket to put it elsewhere)", dir.display())
            })?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another natbinder is running: its control socket {} answers (stop it, or give this one another --control-socket)",
                    path.display()
                );
            }
            std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding the control socket {}", path.display()))?;
        // Anyone may read: what each peer may do is decided per call from its credentials.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .with_context(|| format!("making {} usable by every user", path.display()))?;
        Ok(Self { listener, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `stop`.
    pub async fn serve(self, state: Arc<ControlState>, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        let root_slots = Arc::new(Semaphore::new(ROOT_RESERVE));
        let per_user: Arc<Mutex<std::collections::HashMap<u32, usize>>> = Default::default();
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = stop.wait_for(|s| *s) => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("control socket: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (state, stop) = (state.clone(), stop.clone());
            let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
            let slot = slots.clone().try_acquire_owned().or_else(|e| match uid {
                0 => root_slots.clone().try_acquire_owned(),
                _ => Err(e),
            });
            let user_slot = UserSlot::take(&per_user, uid);
            match (slot, user_slot) {
                (Ok(slot), Some(user_slot)) => {
                    tokio::spawn(async move {
                        service::connection(stream, state, stop).await;
                        drop((slot, user_slot));
                    });
                }
                (Ok(_), None) => {
                    tokio::spawn(service::turn_away(stream, MAX_CLIENTS_PER_USER));
                }
                (Err(_), _) => {
                    tokio::spawn(service::turn_away(stream, MAX_CLIENTS));
                }
            }
        }
    }
}

/// One of a uid's [`MAX_CLIENTS_PER_USER`] connections (root has no such limit); given back on drop.
struct UserSlot {
    counts: Arc<Mutex<std::collections::HashMap<u32, usize>>>,
    uid: u32,
}

impl UserSlot {
    fn take(counts: &Arc<Mutex<std::collections::HashMap<u32, usize>>>, uid: u32) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(uid).or_default();
        if uid != 0 && *n >= MAX_CLIENTS_PER_USER {
            return None;
        }
        *n += 1;
        Some(Self { counts: counts.clone(), uid })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer { uid, gid, pid: None, groups: groups.to_vec() }
    }

    #[test]
    fn root_the_daemons_uid_operator_uids_and_the_operator_group_may_change_and_nobody_else() {
        let operators = Operators {
            group: Some(("natbinder".into(), 990)),
            uids: vec![1001],
            own_uid: 0,
            run_allowed: RunAllowed::Everyone,
        };
        assert!(operators.may_change(&peer(0, 0, &[])).is_ok());
        assert!(operators.may_change(&peer(1001, 1001, &[])).is_ok(), "an operator uid");
        assert!(operators.may_change(&peer(1000, 1000, &[27, 990])).is_ok(), "a member of the group");
        assert!(operators.may_change(&peer(1002, 990, &[])).is_ok(), "the group as primary group");
        let (rule, fix) = operators.may_change(&peer(1000, 1000, &[27])).unwrap_err();
        assert!(rule.contains("operator group") && fix.contains("usermod -aG natbinder"), "{rule} / {fix}");
        let no_group = Operators { group: None, uids: Vec::new(), own_uid: 0, run_allowed: RunAllowed::Everyone };
        let (_, fix) = no_group.may_change(&peer(1000, 1000, &[990])).unwrap_err();
        assert!(fix.contains("operator-uids"), "{fix}");
        assert!(operators.may_run(&peer(1000, 1000, &[27])).is_ok(), "run-allowed = everyone");
        let strict = Operators { run_allowed: RunAllowed::Operators, ..operators };
        let (rule, _) = strict.may_run(&peer(1000, 1000, &[27])).unwrap_err();
        assert!(rule.contains("run-allowed"), "{rule}");
        assert!(strict.may_run(&peer(1000, 1000, &[990])).is_ok(), "an operator");
    }
}
