//! The kernel side as the daemon sees it: loads natbinder's eBPF programs, attaches them to the watched
//! cgroup with bpf_links, and exposes what the daemon needs: the event stream, the "held elsewhere"
//! port map that makes binds fail with EADDRINUSE (the table's record, mirrored), the map of sockets
//! whose release is reported (for adopted sockets), and the drop counters.
//!
//! The links are not pinned: they detach when the daemon exits, however it exits, so that with no
//! daemon running every bind behaves exactly as it would without natbinder.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr},
    Ebpf,
};
use natbinder_common::{
    counters, names, Config, EventKind, Holder, PolicyRule, PortKey, SocketEvent, AF_INET6, IPPROTO_TCP, IPPROTO_UDP,
    POLICY_CAPACITY,
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use crate::{
    host::resync::{LossCounter, ReleaseTracker},
    table::{KernelMirror, PortKey as TablePortKey},
    Family, Protocol,
};

/// The object built from natbinder-ebpf by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/natbinder.bpf.o"));

/// A decoded ring-buffer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Bound(BoundSocket),
    Released {
        cookie: u64,
        /// When the kernel released it: see [`instant_of`].
        at_ns: u64,
        /// The thread that released it (the one exiting, for a process that ended).
        thread: u32,
    },
    /// A bind failed with EADDRINUSE because another host holds the port on the gateway.
    Refused(BoundSocket),
}

/// A socket bound to a wildcard address on an explicit, non-privileged port, as the hook saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundSocket {
    pub cookie: u64,
    /// When the hook saw the bind: see [`instant_of`].
    pub at_ns: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    pub family: Family,
    pub protocol: Protocol,
    pub port: u16,
}

/// The `Instant` of a hook's `bpf_ktime_get_ns`. Both are CLOCK_MONOTONIC: the event's age on that
/// clock, taken from now. A time not in the past (a record without one) is now.
pub fn instant_of(at_ns: u64) -> std::time::Instant {
    // In this order, the result is never earlier than the event.
    let age = monotonic_ns().saturating_sub(at_ns);
    let now = std::time::Instant::now();
    if at_ns == 0 {
        return now;
    }
    now.checked_sub(std::time::Duration::from_nanos(age)).unwrap_or(now)
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl KernelEvent {
    /// Decodes one record; a malformed record (which would mean a kernel/daemon mismatch) is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < std::mem::size_of::<SocketEvent>() {
            bail!("ring buffer record of {} bytes is shorter than a SocketEvent", bytes.len());
        }
        // SAFETY: length checked; SocketEvent is plain integers, read unaligned.
        let raw: SocketEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = EventKind::from_u32(raw.kind).ok_or_else(|| anyhow!("unknown event kind {}", raw.kind))?;
        if kind == EventKind::Released {
            return Ok(KernelEvent::Released { cookie: raw.cookie, at_ns: raw.at_ns, thread: raw.tid });
        }
        let protocol = match raw.protocol {
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            p => bail!("event for unexpected protocol {p}"),
        };
        let family = if raw.family == AF_INET6 { Family::Ipv6 } else { Family::Ipv4 };
        let comm_len = raw.comm.iter().position(|&b| b == 0).unwrap_or(raw.comm.len());
        let socket = BoundSocket {
            cookie: raw.cookie,
            at_ns: raw.at_ns,
            pid: raw.pid,
            uid: raw.uid,
            gid: raw.gid,
            cgroup_id: raw.cgroup_id,
            comm: String::from_utf8_lossy(&raw.comm[..comm_len]).into_owned(),
            family,
            protocol,
            port: raw.port,
        };
        Ok(match kind {
            EventKind::Bound => KernelEvent::Bound(socket),
            _ => KernelEvent::Refused(socket),
        })
    }
}

/// Ports other hosts hold on the gateway: binds of them fail with EADDRINUSE (when the policy
/// forwards the binder); and the users at their mapping limit, whose binds never do.
#[derive(Clone)]
pub struct HeldElsewhere {
    map: Arc<Mutex<BpfHashMap<MapData, PortKey, Holder>>>,
    /// What the table's record looked like when it was last mirrored, so that a change writes only
    /// what changed.
    mirrored: Arc<Mutex<BTreeMap<TablePortKey, Option<Ipv4Addr>>>>,
    uids_at_limit: Arc<Mutex<BpfHashMap<MapData, u32, u8>>>,
    uids_mirrored: Arc<Mutex<BTreeSet<u32>>>,
}

impl KernelMirror for HeldElsewhere {
    fn mirror(&self, held: &BTreeMap<TablePortKey, Option<Ipv4Addr>>) {
        let mut mirrored = self.mirrored.lock().unwrap_or_else(|e| e.into_inner());
        for key in mirrored.keys().filter(|k| !held.contains_key(k)) {
            self.remove(key.protocol, key.port);
        }
        for (key, holder) in held.iter().filter(|(k, h)| mirrored.get(k) != Some(h)) {
            if let Err(e) = self.insert(key.protocol, key.port, holder.unwrap_or(Ipv4Addr::UNSPECIFIED)) {
                // The map is full (more ports held elsewhere than it has room for): that port binds
                // as without natbinder, and its socket is unreachable. Nothing worse.
                warn!("{e:#}");
            }
        }
        *mirrored = held.clone();
    }

    fn mirror_uids_at_limit(&self, uids: &BTreeSet<u32>) {
        let mut mirrored = self.uids_mirrored.lock().unwrap_or_else(|e| e.into_inner());
        let mut map = self.uids_at_limit.lock().unwrap_or_else(|e| e.into_inner());
        for uid in mirrored.difference(uids) {
            let _ = map.remove(uid);
        }
        for uid in uids.difference(&mirrored) {
            if let Err(e) = map.insert(uid, 1, 0) {
                // Full: that user's binds of held ports may fail while they are not forwarded.
                warn!("marking uid {uid} as at its mapping limit in the kernel: {e}");
            }
        }
        *mirrored = uids.clone();
    }
}

impl HeldElsewhere {
    fn key(protocol: Protocol, port: u16) -> PortKey {
        PortKey { protocol: protocol.ip_proto(), port }
    }

    pub fn insert(&self, protocol: Protocol, port: u16, holder: Ipv4Addr) -> Result<()> {
        let value = Holder { ipv4_be: u32::from(holder).to_be() };
        self.map
            .lock()
            .unwrap()
            .insert(Self::key(protocol, port), value, 0)
            .with_context(|| format!("marking {protocol}/{port} as held by {holder}"))
    }

    pub fn remove(&self, protocol: Protocol, port: u16) {
        let _ = self.map.lock().unwrap().remove(&Self::key(protocol, port));
    }

    pub fn holder(&self, protocol: Protocol, port: u16) -> Option<Ipv4Addr> {
        let map = self.map.lock().unwrap();
        map.get(&Self::key(protocol, port), 0).ok().map(|h| Ipv4Addr::from(u32::from_be(h.ipv4_be)))
    }
}

/// Sockets adopted by user space (bound while nothing watched): the ADOPTED map, whose releases the
/// release hook reports by cookie, and ADOPTING, its size, which spares every other release the lookup.
#[derive(Clone)]
pub struct Releases {
    inner: Arc<Mutex<AdoptedMaps>>,
}

struct AdoptedMaps {
    adopted: BpfHashMap<MapData, u64, natbinder_common::BoundSocket>,
    adopting: Array<MapData, u32>,
    /// The cookies in `adopted`, so that `adopting` is kept without reading the map back.
    cookies: BTreeSet<u64>,
}

impl AdoptedMaps {
    fn write_count(&mut self) -> Result<()> {
        self.adopting.set(0, self.cookies.len() as u32, 0).context("writing the count of adopted sockets")
    }
}

impl ReleaseTracker for Releases {
    fn track(&self, cookie: u64, family: Family, protocol: Protocol, port: u16) -> Result<()> {
        let family = match family {
            Family::Ipv4 => natbinder_common::AF_INET,
            Family::Ipv6 => AF_INET6,
        };
        let value = natbinder_common::BoundSocket { family, protocol: protocol.ip_proto(), port, _pad: 0 };
        let mut maps = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // The count goes up before the entry exists, so the hook never skips a tracked socket.
        maps.cookies.insert(cookie);
        let tracked = maps.write_count().and_then(|()| {
            maps.adopted.insert(cookie, value, 0).with_context(|| format!("tracking the release of {protocol}/{port}"))
        });
        if tracked.is_err() {
            maps.cookies.remove(&cookie);
            let _ = maps.write_count();
        }
        tracked
    }

    /// Called for every release the daemon reads, and for adopted sockets found gone: only the
    /// adopted ones cost more than a set lookup.
    fn untrack(&self, cookie: u64) {
        let mut maps = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !maps.cookies.remove(&cookie) {
            return;
        }
        // The hook removes an entry itself when it reports the release; either way it is gone now,
        // and the count goes down with it, so that other releases skip the lookup again.
        let _ = maps.adopted.remove(&cookie);
        if let Err(e) = maps.write_count() {
            warn!("{e:#}");
        }
    }
}

/// The drop counters.
#[derive(Clone)]
pub struct Losses {
    counters: Arc<Mutex<PerCpuArray<MapData, u64>>>,
}

impl LossCounter for Losses {
    /// Total events lost to a full ring buffer, and forwardable sockets left untracked (no mark).
    fn total(&self) -> u64 {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let read = |slot| counters.get(&slot, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        read(counters::EVENTS_DROPPED) + read(counters::UNTRACKED)
    }
}

/// The links [`KernelHooks::attach_also`] made to one cgroup.
#[derive(Default)]
pub struct AttachedLinks {
    sock: Vec<(&'static str, aya::programs::cgroup_sock::CgroupSockLinkId)>,
    sock_addr: Vec<(&'static str, aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId)>,
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct KernelHooks {
    ebpf: Ebpf,
    config: Array<MapData, Config>,
    policy: Array<MapData, PolicyRule>,
    events: AsyncFd<RingBuf<MapData>>,
    losses: Losses,
    held_elsewhere: HeldElsewhere,
    releases: Releases,
    config_value: Config,
}

/// The network namespace cookie of the calling thread (SO_NETNS_COOKIE, Linux 5.14+).
pub fn current_netns_cookie() -> Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("opening a socket to read the netns cookie")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_NETNS_COOKIE writes a u64 into the buffer we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE) (needs Linux 5.14 or later)");
    }
    Ok(cookie)
}

impl KernelHooks {
    /// Loads the programs, configures them and attaches them to `cgroup`. Binds start being reported
    /// as soon as this returns.
    pub fn attach(cgroup: &Path, netns_cookie: u64, min_port: u16) -> Result<Self> {
        Self::attach_with_buffer(cgroup, netns_cookie, min_port, natbinder_common::EVENTS_BYTES)
    }

    /// As [`KernelHooks::attach`], with a ring buffer of `event_buffer_bytes` (a power of two, at least
    /// one page): small buffers let tests provoke and check the lost-event path.
    pub fn attach_with_buffer(
        cgroup: &Path,
        netns_cookie: u64,
        min_port: u16,
        event_buffer_bytes: u32,
    ) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this natbinder was built with NATBINDER_SKIP_EBPF=1 and has no kernel programs; rebuild it without that variable");
        }
        bump_memlock_rlimit();
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(names::EVENTS, event_buffer_bytes)
            .load(EBPF_OBJECT)
            .map_err(|e| explain(anyhow!(e).context("loading natbinder's eBPF object into the kernel")))?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_ebpf_logger(logger),
            Err(e) => debug!("eBPF logging unavailable: {e}"),
        }

        let mut config: Array<MapData, Config> = Array::try_from(take_map(&mut ebpf, names::CONFIG)?)?;
        let config_value = Config { netns_cookie, min_port, enabled: 1, _pad: 0, policy_len: 0 };
        config.set(0, config_value, 0).context("writing the hooks' configuration")?;
        let events = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?)?;
        let events = register_readable(events).context("registering the event ring buffer with tokio")?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, names::COUNTERS)?)?;
        let losses = Losses { counters: Arc::new(Mutex::new(counters)) };
        let held = BpfHashMap::try_from(take_map(&mut ebpf, names::HELD_ELSEWHERE)?)?;
        let uids_at_limit = BpfHashMap::try_from(take_map(&mut ebpf, names::UIDS_AT_LIMIT)?)?;
        let policy = Array::try_from(take_map(&mut ebpf, names::POLICY)?)?;
        let held_elsewhere = HeldElsewhere {
            map: Arc::new(Mutex::new(held)),
            mirrored: Default::default(),
            uids_at_limit: Arc::new(Mutex::new(uids_at_limit)),
            uids_mirrored: Default::default(),
        };
        let adopted = BpfHashMap::try_from(take_map(&mut ebpf, names::ADOPTED)?)?;
        let adopting = Array::try_from(take_map(&mut ebpf, names::ADOPTING)?)?;
        let releases =
            Releases { inner: Arc::new(Mutex::new(AdoptedMaps { adopted, adopting, cookies: BTreeSet::new() })) };

        for name in [names::SOCK_RELEASE, names::POST_BIND4, names::POST_BIND6] {
            let program: &mut CgroupSock = program(&mut ebpf, name)?.try_into()?;
            program.load().map_err(|e| explain(anyhow!(e).context(format!("loading {name}"))))?;
        }
        for name in [names::BIND4, names::BIND6] {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            program.load().map_err(|e| explain(anyhow!(e).context(format!("loading {name}"))))?;
        }
        let mut hooks = Self { ebpf, config, policy, events, losses, held_elsewhere, releases, config_value };
        // The watched cgroup's links live as long as the hooks.
        let _links = hooks.attach_also(cgroup)?;
        Ok(hooks)
    }

    /// Attaches the programs to one more cgroup (`natbinder run`'s, when the watched cgroup does not
    /// contain it), with the same maps: its binds are reported like the others. The cgroup must not
    /// be inside one already attached, or its binds would be seen twice. The links die with the
    /// cgroup; [`KernelHooks::detach_links`] gives back what they hold.
    pub fn attach_also(&mut self, cgroup: &Path) -> Result<AttachedLinks> {
        let cgroup_file = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mut links = AttachedLinks::default();
        // Release first, then post_bind, then bind: a socket is never recorded before its release can be seen.
        for name in [names::SOCK_RELEASE, names::POST_BIND4, names::POST_BIND6] {
            let program: &mut CgroupSock = program(&mut self.ebpf, name)?.try_into()?;
            let link = program
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(|e| explain(anyhow!(e).context(format!("attaching {name} to {}", cgroup.display()))))?;
            links.sock.push((name, link));
        }
        for name in [names::BIND4, names::BIND6] {
            let program: &mut CgroupSockAddr = program(&mut self.ebpf, name)?.try_into()?;
            let link = program
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(|e| explain(anyhow!(e).context(format!("attaching {name} to {}", cgroup.display()))))?;
            links.sock_addr.push((name, link));
        }
        Ok(links)
    }

    /// Detaches links made by [`KernelHooks::attach_also`] (those of a cgroup that is gone).
    pub fn detach_links(&mut self, links: AttachedLinks) {
        for (name, link) in links.sock {
            if let Ok(Ok(program)) = program(&mut self.ebpf, name).map(<&mut CgroupSock>::try_from) {
                let _ = program.detach(link);
            }
        }
        for (name, link) in links.sock_addr {
            if let Ok(Ok(program)) = program(&mut self.ebpf, name).map(<&mut CgroupSockAddr>::try_from) {
                let _ = program.detach(link);
            }
        }
    }

    pub fn held_elsewhere(&self) -> HeldElsewhere {
        self.held_elsewhere.clone()
    }

    pub fn releases(&self) -> Releases {
        self.releases.clone()
    }

    pub fn losses(&self) -> Losses {
        self.losses.clone()
    }

    /// Waits until events are available and decodes all of them into `out`.
    pub async fn read_events(&mut self, out: &mut Vec<KernelEvent>) -> Result<()> {
        let mut guard = self.events.readable_mut().await.context("waiting on the event ring buffer")?;
        drain(guard.get_inner_mut(), out);
        guard.clear_ready();
        Ok(())
    }

    /// Decodes into `out` the events the ring holds now, without waiting: what the kernel reported
    /// before this call is then all in hand.
    pub fn read_available(&mut self, out: &mut Vec<KernelEvent>) {
        drain(self.events.get_mut(), out);
    }

    /// Total events lost to a full ring buffer, and forwardable sockets left untracked (no mark).
    pub fn lost_events(&self) -> u64 {
        self.losses.total()
    }

    /// Gives the kernel programs the exposure policy ([`crate::policy::kernel`]). While it is being
    /// written the kernel has none, and refuses no bind: never one it should not.
    pub fn set_policy(&mut self, rules: &[PolicyRule]) -> Result<()> {
        if rules.len() > POLICY_CAPACITY as usize {
            bail!("the compiled policy has {} entries; the kernel's map holds {POLICY_CAPACITY}", rules.len());
        }
        self.config_value.policy_len = 0;
        self.config.set(0, self.config_value, 0).context("clearing the kernel's policy")?;
        for (i, rule) in rules.iter().enumerate() {
            self.policy.set(i as u32, *rule, 0).with_context(|| format!("writing kernel policy entry {i}"))?;
        }
        self.config_value.policy_len = rules.len() as u32;
        self.config.set(0, self.config_value, 0).context("writing the kernel's policy")
    }

    /// Turns every hook into a no-op without detaching (used at shutdown, before mappings are deleted).
    pub fn disable(&mut self) -> Result<()> {
        let value = Config { enabled: 0, ..self.config_value };
        self.config.set(0, value, 0).context("disabling the hooks")
    }

    /// Detaches and unloads everything.
    pub fn detach(self) {
        drop(self.ebpf);
    }
}

/// Adds to a failure to load or attach what the kernel probes say is missing, or what else to check.
fn explain(error: anyhow::Error) -> anyhow::Error {
    let missing = crate::host::probes::missing();
    if missing.is_empty() {
        error.context(
            "the kernel has every feature natbinder needs; check that natbinder runs as root (or with CAP_BPF, \
             CAP_NET_ADMIN and CAP_SYS_RESOURCE) and that no security module forbids bpf(2)",
        )
    } else {
        error.context(format!("this kernel lacks what natbinder needs: {}", missing.join("; ")))
    }
}

/// Registers a map's fd with tokio for readiness.
/// Decodes every record the ring holds into `out`.
fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<KernelEvent>) {
    while let Some(item) = ring.next() {
        match KernelEvent::decode(&item) {
            Ok(event) => out.push(event),
            Err(e) => warn!("dropping an undecodable kernel event: {e:#}"),
        }
    }
}

fn register_readable<T: AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: the fd belongs to `inner`, which the AsyncFd owns, so it stays open while registered.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; raising it is harmless on newer ones.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!("could not raise RLIMIT_MEMLOCK; fine on Linux 5.11 and later");
    }
}

fn spawn_ebpf_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let Ok(mut logger) = register_readable(logger) else { return };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u32, family: u16, protocol: u16) -> Vec<u8> {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"rtorren");
        let ev = SocketEvent {
            cookie: 42,
            cgroup_id: 7,
            at_ns: 5_000_000_000,
            kind,
            pid: 1234,
            tid: 1235,
            uid: 1000,
            gid: 1000,
            _pad32: 0,
            family,
            protocol,
            port: 10000,
            _pad: 0,
            comm,
        };
        // SAFETY: SocketEvent is plain data.
        unsafe {
            std::slice::from_raw_parts((&ev as *const SocketEvent).cast::<u8>(), std::mem::size_of::<SocketEvent>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_bound_and_released() {
        let KernelEvent::Bound(b) = KernelEvent::decode(&raw(1, 2, 6)).unwrap() else { panic!() };
        assert_eq!((b.cookie, b.pid, b.port, b.protocol, b.family), (42, 1234, 10000, Protocol::Tcp, Family::Ipv4));
        assert_eq!(b.comm, "rtorren");
        assert_eq!(b.at_ns, 5_000_000_000);
        assert_eq!(
            KernelEvent::decode(&raw(2, 10, 17)).unwrap(),
            KernelEvent::Released { cookie: 42, at_ns: 5_000_000_000, thread: 1235 }
        );
        assert!(
            matches!(KernelEvent::decode(&raw(3, 10, 17)).unwrap(), KernelEvent::Refused(s) if s.family == Family::Ipv6)
        );
    }

    #[test]
    fn a_kernel_time_is_placed_on_the_instant_clock() {
        let before = std::time::Instant::now();
        let at = instant_of(monotonic_ns() - 3_000_000);
        let after = std::time::Instant::now();
        let three_ms = std::time::Duration::from_millis(3);
        assert!(at + three_ms >= before && at + three_ms <= after);
        // No time, or one not yet come: now.
        assert!(instant_of(0) >= after);
        assert!(instant_of(u64::MAX) >= after);
    }

    #[test]
    fn rejects_malformed_records() {
        assert!(KernelEvent::decode(&[0u8; 10]).is_err());
        assert!(KernelEvent::decode(&raw(9, 2, 6)).is_err());
        assert!(KernelEvent::decode(&raw(1, 2, 1)).is_err());
    }
}
