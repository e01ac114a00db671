//! Bringing the table's sockets in line with the sockets that exist, from sock_diag.
//!
//! The hooks see every bind while the daemon runs. This covers the rest: sockets bound before the daemon
//! started or while it was down (a crash), and releases lost when the ring buffer overflowed. It runs at
//! start, every reconcile interval, on SIGHUP, and every half second while kernel events are being
//! lost, until a listing shows that none were lost while it was taken: then the table is exact again.
//!
//! The listings and the /proc walk block, so they run off the event loop; the scope (the watched
//! cgroup's subtree) is computed afresh each time, so child cgroups created later are covered.
use std::{
    collections::{HashMap, HashSet},
    ops::RangeInclusive,
    os::unix::fs::MetadataExt,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Result;
use tokio::sync::{watch, Notify};
use tracing::warn;

use super::{
    cgroup::WatchedCgroup,
    process,
    sockdiag::{self, WildcardSocket},
};
use crate::{
    outcome::{Found, Seen},
    policy::exposure::Exposure,
    table::{Listener, Owner, Stack, TableHandle},
    Family, Protocol,
};

/// How soon the sockets are listed again while kernel events are being lost.
const STORM_RECHECK: Duration = Duration::from_millis(500);

/// Which sockets the daemon is responsible for.
#[derive(Clone, Debug)]
pub struct Scope {
    /// cgroup ids of the watched cgroup and its descendants; None when the whole machine is watched.
    pub cgroup_ids: Option<HashSet<u64>>,
    pub min_port: u16,
    /// sock_diag cannot tell an explicit bind from an ephemeral one: sockets found on a port of the
    /// local (ephemeral) range were most likely bound to port 0 or are clients, so they are not adopted.
    pub ephemeral: RangeInclusive<u16>,
}

impl Scope {
    /// The scope of `cgroup` (a directory in the cgroup2 hierarchy; `is_root` for the hierarchy's root),
    /// and of `also` (`natbinder run`'s cgroups, when `cgroup` does not contain them).
    pub fn for_cgroup(
        cgroup: &Path,
        is_root: bool,
        also: Option<&Path>,
        min_port: u16,
        ephemeral: RangeInclusive<u16>,
    ) -> Self {
        let cgroup_ids = (!is_root).then(|| {
            let mut ids = cgroup_subtree_ids(cgroup);
            if let Some(also) = also {
                ids.extend(cgroup_subtree_ids(also));
            }
            ids
        });
        Self { cgroup_ids, min_port, ephemeral }
    }

    pub fn wants(&self, socket: &WildcardSocket) -> bool {
        if !socket.serving || socket.port < self.min_port || self.ephemeral.contains(&socket.port) {
            return false;
        }
        match (&self.cgroup_ids, socket.cgroup_id) {
            (None, _) => true,
            (Some(ids), Some(id)) => ids.contains(&id),
            // A kernel that does not report the cgroup: only the whole-machine scope can adopt.
            (Some(_), None) => false,
        }
    }
}

/// cgroup v2 ids are the inode numbers of the cgroup directories.
pub fn cgroup_subtree_ids(root: &Path) -> HashSet<u64> {
    let mut ids = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        ids.insert(meta.ino());
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
    ids
}

/// What a resync changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Live sockets the table does not know.
    pub adopt: Vec<WildcardSocket>,
    /// Table sockets missing from two listings in a row: their release was lost.
    pub gone: Vec<u64>,
}

/// Remembers table sockets missing from the last listing. On kernels before 6.7 one miss is not enough
/// to drop a socket: a TCP socket between bind() and listen() is invisible to their sock_diag.
#[derive(Debug, Default)]
pub struct Resync {
    missing_once: HashSet<u64>,
    /// The listing shows every bound socket (Linux 6.7+ lists bound, not listening TCP sockets).
    pub complete_listings: bool,
}

impl Resync {
    pub fn new() -> Self {
        Self { missing_once: HashSet::new(), complete_listings: kernel_lists_bound_tcp_sockets() }
    }

    pub fn plan(&mut self, known: &HashSet<u64>, live: &[WildcardSocket], scope: &Scope) -> Plan {
        let live_cookies: HashSet<u64> = live.iter().map(|s| s.cookie).collect();
        let adopt: Vec<WildcardSocket> =
            live.iter().filter(|s| !known.contains(&s.cookie) && scope.wants(s)).cloned().collect();
        let missing: HashSet<u64> = known.difference(&live_cookies).copied().collect();
        let gone: Vec<u64> = if self.complete_listings {
            missing.iter().copied().collect()
        } else {
            missing.intersection(&self.missing_once).copied().collect()
        };
        self.missing_once = missing.difference(&gone.iter().copied().collect()).copied().collect();
        Plan { adopt, gone }
    }
}

/// Whether this kernel's sock_diag lists TCP sockets that are bound but not listening (Linux 6.7+).
fn kernel_lists_bound_tcp_sockets() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

/// Makes the release hook report a socket bound while nothing watched (the kernel's ADOPTED map).
pub trait ReleaseTracker: Send + Sync + 'static {
    fn track(&self, cookie: u64, family: Family, protocol: Protocol, port: u16) -> Result<()>;
    fn untrack(&self, cookie: u64);
}

/// How many kernel events were lost so far (ring buffer or socket map full).
pub trait LossCounter: Send + Sync + 'static {
    fn total(&self) -> u64;
}

/// Runs resyncs: one at a time, when asked and every `interval`.
pub struct Resynchronizer<T: ReleaseTracker> {
    cgroup: WatchedCgroup,
    /// `natbinder run`'s cgroups, where `cgroup` does not contain them.
    also: Option<std::path::PathBuf>,
    table: TableHandle,
    exposure: Arc<Exposure>,
    tracker: T,
    resync: Resync,
}

impl<T: ReleaseTracker> Resynchronizer<T> {
    pub fn new(cgroup: WatchedCgroup, table: TableHandle, exposure: Arc<Exposure>, tracker: T) -> Self {
        Self { cgroup, also: None, table, exposure, tracker, resync: Resync::new() }
    }

    /// Also adopts sockets in `cgroup`'s subtree.
    pub fn also_watching(mut self, cgroup: Option<std::path::PathBuf>) -> Self {
        self.also = cgroup;
        self
    }

    /// Lists the sockets and applies the plan: adopts live wildcard sockets the table lacks, drops
    /// table sockets that no longer exist.
    pub async fn run_once(&mut self) {
        let (path, is_root, also) = (self.cgroup.path.clone(), self.cgroup.is_root, self.also.clone());
        let min_port = self.table.read(|t| t.config().min_port);
        // What the table knows, read before the listing: a socket bound while the listing runs is in
        // the table but may not be in the listing, and must not be taken for one that went away.
        // (One released meanwhile is gone from both, or its release event follows.)
        let known = self.table.read(|t| t.socket_cookies());
        let listed = blocking(move || {
            let scope = Scope::for_cgroup(&path, is_root, also.as_deref(), min_port, sockdiag::ephemeral_port_range());
            Ok((scope, sockdiag::wildcard_sockets()?))
        })
        .await;
        let (scope, live) = match listed {
            Ok(listed) => listed,
            Err(e) => {
                warn!("could not list sockets for resynchronisation: {e:#}");
                return;
            }
        };
        let plan = self.resync.plan(&known, &live, &scope);
        if plan.adopt.is_empty() && plan.gone.is_empty() {
            return;
        }
        let inodes: HashSet<u32> = plan.adopt.iter().map(|s| s.inode).collect();
        let owners = blocking(move || Ok(socket_owners(&inodes))).await.unwrap_or_default();
        let mut adopted = Vec::new();
        for socket in &plan.adopt {
            if let Err(e) = self.tracker.track(socket.cookie, socket.family, socket.protocol, socket.port) {
                warn!("{e:#}; not adopting it");
                continue;
            }
            let (pid, comm) = owners.get(&socket.inode).cloned().unwrap_or((0, String::from("?")));
            let owner = Owner {
                pid,
                uid: socket.uid,
                gid: process::primary_gid(pid).unwrap_or(0),
                cgroup_id: socket.cgroup_id.unwrap_or(0),
                comm,
                ..Owner::default()
            };
            let mut listener = Listener {
                cookie: socket.cookie,
                protocol: socket.protocol,
                port: socket.port,
                family: socket.family,
                owner,
            };
            let decision = self.exposure.admit(&mut listener);
            let stack = match (socket.family, socket.ipv6_only) {
                (Family::Ipv4, _) => Stack::Ipv4,
                (Family::Ipv6, true) => Stack::Ipv6Only,
                (Family::Ipv6, false) => Stack::DualStack,
            };
            let now = std::time::Instant::now();
            self.table.update(|t| t.socket_bound(listener, stack, Found::Adopted, decision, now));
            adopted.push(socket.cookie);
        }
        if !adopted.is_empty() {
            // A socket closed between the listing and track() would never report its release.
            if let Ok(again) = blocking(sockdiag::wildcard_sockets).await {
                let still: HashSet<u64> = again.iter().map(|s| s.cookie).collect();
                for cookie in adopted.into_iter().filter(|c| !still.contains(c)) {
                    self.tracker.untrack(cookie);
                    self.table.update(|t| t.socket_released(cookie, Seen::Missing, std::time::Instant::now()));
                }
            }
        }
        for cookie in plan.gone {
            self.table.update(|t| t.socket_released(cookie, Seen::Missing, std::time::Instant::now()));
            self.tracker.untrack(cookie);
        }
    }

    /// Runs until `stop` turns true: every `interval`, when `requested`, and while the table pauses
    /// new mappings for lost events, every half second until a listing saw no loss while it was taken.
    pub async fn run(
        mut self,
        interval: Duration,
        requested: Arc<Notify>,
        losses: impl LossCounter,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut next = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = requested.notified() => {
                    // A storm that overflowed the buffer may still be going on: let it pass first.
                    if self.table.read(|t| t.adds_paused()) {
                        tokio::time::sleep(STORM_RECHECK).await;
                    }
                }
                _ = stopped(&mut stop) => return,
            }
            let lost_before = losses.total();
            self.run_once().await;
            let paused = self.table.read(|t| t.adds_paused());
            if paused && losses.total() == lost_before {
                self.table.update(|t| t.resume_adds());
            }
            let again = if self.table.read(|t| t.adds_paused()) { STORM_RECHECK } else { interval };
            next = tokio::time::Instant::now() + again;
        }
    }
}

/// Resolves once `stop` turns true (the guard wait_for returns must not live across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn blocking<R: Send + 'static>(work: impl FnOnce() -> Result<R> + Send + 'static) -> Result<R> {
    tokio::task::spawn_blocking(work).await.map_err(|e| anyhow::anyhow!("a blocking task failed: {e}"))?
}

/// Finds the processes holding sockets with these inodes (for logs): inode -> (pid, comm).
pub fn socket_owners(inodes: &HashSet<u32>) -> HashMap<u32, (u32, String)> {
    let mut owners = HashMap::new();
    if inodes.is_empty() {
        return owners;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return owners };
    for proc_entry in procs.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            if inodes.contains(&inode) && !owners.contains_key(&inode) {
                let comm = std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                owners.insert(inode, (pid, comm.trim().to_string()));
            }
        }
        if owners.len() == inodes.len() {
            break;
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Family, Protocol};

    fn live(cookie: u64, port: u16, cgroup: u64) -> WildcardSocket {
        WildcardSocket {
            cookie,
            protocol: Protocol::Tcp,
            family: Family::Ipv4,
            port,
            uid: 0,
            inode: 1,
            cgroup_id: Some(cgroup),
            ipv6_only: false,
            serving: true,
        }
    }

    fn scope(ids: Option<&[u64]>) -> Scope {
        Scope { cgroup_ids: ids.map(|i| i.iter().copied().collect()), min_port: 1024, ephemeral: 32768..=60999 }
    }

    #[test]
    fn adopts_unknown_sockets_in_scope_only() {
        let mut r = Resync::default();
        let known: HashSet<u64> = [1].into();
        let mut client = live(6, 8083, 7);
        client.serving = false;
        let found = [live(1, 8080, 7), live(2, 8081, 7), live(3, 8082, 9), live(4, 40000, 7), live(5, 80, 7), client];
        let plan = r.plan(&known, &found, &scope(Some(&[7])));
        assert_eq!(plan.adopt.iter().map(|s| s.cookie).collect::<Vec<_>>(), vec![2]);
        assert!(plan.gone.is_empty());
        let plan = Resync::default().plan(&known, &found, &scope(None));
        assert_eq!(plan.adopt.iter().map(|s| s.cookie).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn with_complete_listings_one_miss_is_enough() {
        let mut r = Resync { complete_listings: true, ..Resync::default() };
        let known: HashSet<u64> = [1, 2].into();
        assert_eq!(r.plan(&known, &[live(1, 8080, 7)], &scope(None)).gone, vec![2]);
    }

    #[test]
    fn a_socket_is_gone_only_after_two_missed_listings() {
        let mut r = Resync::default();
        let known: HashSet<u64> = [1, 2].into();
        let s = scope(None);
        assert!(r.plan(&known, &[live(1, 8080, 7)], &s).gone.is_empty());
        // Seen again: the miss is forgiven.
        assert!(r.plan(&known, &[live(1, 8080, 7), live(2, 8081, 7)], &s).gone.is_empty());
        assert!(r.plan(&known, &[live(1, 8080, 7)], &s).gone.is_empty());
        assert_eq!(r.plan(&known, &[live(1, 8080, 7)], &s).gone, vec![2]);
    }

    #[test]
    fn sockets_of_unknown_cgroup_are_adopted_only_machine_wide() {
        let mut s = live(1, 8080, 0);
        s.cgroup_id = None;
        assert!(!scope(Some(&[7])).wants(&s));
        assert!(scope(None).wants(&s));
    }

    #[test]
    fn finds_the_owner_of_a_socket() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap().ino() as u32;
        let owners = socket_owners(&[inode].into());
        assert_eq!(owners.get(&inode).map(|(pid, _)| *pid), Some(std::process::id()));
    }
}
