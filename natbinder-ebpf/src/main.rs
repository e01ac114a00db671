//! natbinder's kernel side: four small hooks on the watched cgroup.
//!
//! * `bind4`/`bind6` (cgroup sock_addr) run before the kernel picks a port. They are the only place that
//!   sees the port the program *asked* for, so they note sockets that request an explicit, non-privileged
//!   port on a wildcard address, in the daemon's network namespace, as candidates.
//! * `post_bind4`/`post_bind6` (cgroup sock) run once the port is allocated. A candidate whose port
//!   another host holds on the gateway fails with EADDRINUSE (as the paper's kernel did), but only if
//!   the exposure policy (POLICY, UIDS_AT_LIMIT) certainly forwards it: a program natbinder will not
//!   forward must never lose a port to another host. Any other candidate is recorded in BOUND and
//!   reported, and user space decides with the whole policy.
//! * `sock_release` reports the release of a recorded socket, matched by cookie: it cannot read the port.
//!
//! Everything else costs one failed lookup at most, and nothing here ever waits for user space.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_set_retval,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use natbinder_common::{
    counters, verdict, BoundSocket, Config, EventKind, Holder, PolicyRule, PortKey, SocketEvent, AF_INET, AF_INET6,
    BOUND_CAPACITY, CANDIDATES_CAPACITY, EVENTS_BYTES, HELD_ELSEWHERE_CAPACITY, IPPROTO_TCP, IPPROTO_UDP,
    POLICY_CAPACITY, UIDS_AT_LIMIT_CAPACITY,
};

/// Return values of cgroup hooks: 1 lets the operation proceed, 0 fails it (with the errno set by
/// bpf_set_retval, EPERM otherwise).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const EADDRINUSE: i32 = 98;

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// cookie -> requested port, from bind4/6 to post_bind4/6 of the same bind() call. LRU so that a bind
/// that fails between the two hooks (port already bound locally) cannot leak an entry for good.
#[map(name = "CANDIDATES")]
static CANDIDATES: LruHashMap<u64, u16> = LruHashMap::with_max_entries(CANDIDATES_CAPACITY, 0);

/// cookie -> the reported binding, until sock_release.
#[map(name = "BOUND")]
static BOUND: HashMap<u64, BoundSocket> = HashMap::with_max_entries(BOUND_CAPACITY, 0);

/// Ports other LAN hosts hold on the gateway: binding one fails with EADDRINUSE. Kept by the daemon.
#[map(name = "HELD_ELSEWHERE")]
static HELD_ELSEWHERE: HashMap<PortKey, Holder> = HashMap::with_max_entries(HELD_ELSEWHERE_CAPACITY, 0);

/// The exposure policy as the kernel can check it (see [`PolicyRule`]); CONFIG.policy_len entries.
#[map(name = "POLICY")]
static POLICY: Array<PolicyRule> = Array::with_max_entries(POLICY_CAPACITY, 0);

/// uids that hold as many mappings as they may: their binds are not forwarded, so never refused.
#[map(name = "UIDS_AT_LIMIT")]
static UIDS_AT_LIMIT: HashMap<u32, u8> = HashMap::with_max_entries(UIDS_AT_LIMIT_CAPACITY, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[inline(always)]
fn config() -> Option<&'static Config> {
    match CONFIG.get(0) {
        Some(c) if c.enabled != 0 => Some(c),
        _ => None,
    }
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; this program is its only writer on this CPU while it runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn is_forwardable_protocol(protocol: u32) -> bool {
    protocol == IPPROTO_TCP as u32 || protocol == IPPROTO_UDP as u32
}

/// Shared by bind4 and bind6 once the address is known to be the wildcard.
#[inline(always)]
fn note_candidate(ctx: &SockAddrContext, addr: &bpf_sock_addr) {
    let Some(cfg) = config() else { return };
    if !is_forwardable_protocol(addr.protocol) {
        return;
    }
    // user_port is in network byte order in the low 16 bits; 0 asks for an ephemeral port.
    let port = u16::from_be(addr.user_port as u16);
    if port == 0 || port < cfg.min_port {
        return;
    }
    // SAFETY: helper valid for sock_addr programs; the context pointer comes from the kernel.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = CANDIDATES.insert(&cookie, &port, 0);
}

#[cgroup_sock_addr(bind4)]
pub fn natbinder_bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let addr = unsafe { &*ctx.sock_addr };
    if addr.user_ip4 == 0 {
        note_candidate(&ctx, addr);
    }
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn natbinder_bind6(ctx: SockAddrContext) -> i32 {
    let addr = unsafe { &*ctx.sock_addr };
    let ip = addr.user_ip6;
    if ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 0 {
        note_candidate(&ctx, addr);
    }
    ALLOW
}

#[inline(always)]
fn rule_matches(rule: &PolicyRule, uid: u32, gid: u32, protocol: u16, port: u16) -> bool {
    if uid < rule.uid_min || uid > rule.uid_max || port < rule.port_min || port > rule.port_max {
        return false;
    }
    if (rule.protocol != 0 && rule.protocol != protocol) || (rule.gid != u32::MAX && rule.gid != gid) {
        return false;
    }
    // SAFETY: helper valid in cgroup programs; 0 when the bind's cgroup is not that deep.
    rule.cgroup_id == 0 || unsafe { bpf_get_current_ancestor_cgroup_id(rule.cgroup_level as i32) } == rule.cgroup_id
}

/// Whether the exposure policy certainly forwards this bind: the first matching POLICY entry says
/// FORWARD. An UNKNOWN entry, no entry, or a user at their limit: not certain, so never refused.
#[inline(always)]
fn policy_forwards(cfg: &Config, protocol: u16, port: u16) -> bool {
    let uid_gid = bpf_get_current_uid_gid();
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    if unsafe { UIDS_AT_LIMIT.get(&uid) }.is_some() {
        return false;
    }
    let mut i = 0;
    while i < POLICY_CAPACITY && i < cfg.policy_len {
        let Some(rule) = POLICY.get(i) else { return false };
        if rule_matches(rule, uid, gid, protocol, port) {
            return rule.verdict == verdict::FORWARD;
        }
        i += 1;
    }
    false
}

/// post_bind4 and post_bind6: decide, record and report.
#[inline(always)]
fn post_bind(ctx: &SockContext, family: u16) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Fast path for every bind that is not a candidate: one failed lookup.
    let Some(requested) = (unsafe { CANDIDATES.get(&cookie) }).copied() else {
        return ALLOW;
    };
    let _ = CANDIDATES.remove(&cookie);
    let sock: &bpf_sock = unsafe { &*ctx.sock };
    let protocol = sock.protocol as u16;
    let port = sock.src_port as u16;
    // A candidate left by an earlier bind() of this socket that failed after bind4 (the port was taken
    // locally) must not make a later ephemeral bind of the same socket look explicit.
    if port != requested {
        return ALLOW;
    }

    let key = PortKey { protocol, port };
    let held = unsafe { HELD_ELSEWHERE.get(&key) }.is_some();
    if held && config().is_some_and(|cfg| policy_forwards(cfg, protocol, port)) {
        emit(cookie, EventKind::Refused, family, protocol, port);
        // SAFETY: cgroup hooks may set the syscall's return value; bind() then fails with EADDRINUSE
        // and the kernel releases the port it had just allocated.
        unsafe { bpf_set_retval(-EADDRINUSE) };
        return DENY;
    }

    let bound = BoundSocket { family, protocol, port, _pad: 0 };
    if BOUND.insert(&cookie, &bound, 0).is_err() {
        // Without a BOUND entry the release could not be matched; the daemon resynchronises.
        count(counters::BOUND_FULL);
        warn!(ctx, "natbinder: BOUND map full, port {} not tracked", port);
        return ALLOW;
    }
    emit(cookie, EventKind::Bound, family, protocol, port);
    ALLOW
}

#[inline(always)]
fn emit(cookie: u64, kind: EventKind, family: u16, protocol: u16, port: u16) {
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        count(counters::EVENTS_DROPPED);
        return;
    };
    let (pid, uid, gid, cgroup_id, comm) = if matches!(kind, EventKind::Released) {
        (0, 0, 0, 0, [0u8; 16])
    } else {
        let uid_gid = bpf_get_current_uid_gid();
        (
            (bpf_get_current_pid_tgid() >> 32) as u32,
            uid_gid as u32,
            (uid_gid >> 32) as u32,
            unsafe { bpf_get_current_cgroup_id() },
            bpf_get_current_comm().unwrap_or([0u8; 16]),
        )
    };
    entry.write(SocketEvent {
        cookie,
        cgroup_id,
        kind: kind as u32,
        pid,
        uid,
        gid,
        family,
        protocol,
        port,
        _pad: 0,
        comm,
    });
    entry.submit(0);
}

#[cgroup_sock(post_bind4)]
pub fn natbinder_post_bind4(ctx: SockContext) -> i32 {
    post_bind(&ctx, AF_INET)
}

#[cgroup_sock(post_bind6)]
pub fn natbinder_post_bind6(ctx: SockContext) -> i32 {
    post_bind(&ctx, AF_INET6)
}

#[cgroup_sock(sock_release)]
pub fn natbinder_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(bound) = unsafe { BOUND.get(&cookie) } {
        let b = *bound;
        let _ = BOUND.remove(&cookie);
        emit(cookie, EventKind::Released, b.family, b.protocol, b.port);
    }
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
