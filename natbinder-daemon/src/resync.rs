//! Bringing the table's sockets in line with the sockets that exist, from sock_diag.
//!
//! The hooks see every bind while the daemon runs. This covers the rest: sockets bound before the daemon
//! started or while it was down (a crash), and releases lost when the ring buffer overflowed. It runs at
//! start, whenever the kernel side reports lost events, and every reconcile interval.
use std::{
    collections::{HashMap, HashSet},
    ops::RangeInclusive,
    os::unix::fs::MetadataExt,
    path::Path,
};

use crate::sockdiag::WildcardSocket;

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
    /// The scope of `cgroup` (a directory in the cgroup2 hierarchy; `is_root` for the hierarchy's root).
    pub fn for_cgroup(cgroup: &Path, is_root: bool, min_port: u16, ephemeral: RangeInclusive<u16>) -> Self {
        let cgroup_ids = (!is_root).then(|| cgroup_subtree_ids(cgroup));
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
