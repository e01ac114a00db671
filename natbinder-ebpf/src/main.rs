//! natbinder's kernel side: five small hooks on the watched cgroup.
//!
//! * `bind4`/`bind6` (cgroup sock_addr) run before the kernel picks a port. They are the only place that
//!   sees the port the program *asked* for, so they mark sockets that request an explicit, non-privileged
//!   port on a wildcard address, in the daemon's network namespace, as candidates (MARKS, storage in the
//!   socket itself).
//! * `post_bind4`/`post_bind6` (cgroup sock) run once the port is allocated. A candidate whose port
//!   another host holds on the gateway fails with EADDRINUSE (as the paper's kernel did), but only if
//!   the exposure policy (POLICY, UIDS_AT_LIMIT) certainly forwards it: a program natbinder will not
//!   forward must never lose a port to another host. Any other candidate is reported, and its mark
//!   records what, and user space decides with the whole policy.
//! * `sock_release` reports the release of a socket whose mark says it was reported (it cannot read the
//!   port), or of one user space adopted (ADOPTED, by cookie, while ADOPTING says there are any).
//!
//! These hooks sit on every bind() and every TCP/UDP socket's release in the cgroup, so what natbinder
//! does not forward must cost next to nothing: a bind to a specific address is let through after one
//! read of its context, and a socket without a mark costs post_bind and sock_release one NULL test (the
//! socket's storage list) and an inlined array read. Only reported sockets pay for a socket cookie,
//! hash lookups and a ring-buffer record. Nothing here ever waits for user space.
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_ktime_get_ns, bpf_set_retval, bpf_sk_storage_get,
        },
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use natbinder_common::{
    counters, verdict, BoundSocket, Config, EventKind, Holder, PolicyRule, PortKey, SocketEvent, SocketMark,
    ADOPTED_CAPACITY, AF_INET, AF_INET6, EVENTS_BYTES, HELD_ELSEWHERE_CAPACITY, IPPROTO_TCP, IPPROTO_UDP,
    POLICY_CAPACITY, UIDS_AT_LIMIT_CAPACITY,
};

/// Return values of cgroup hooks: 1 lets the operation proceed, 0 fails it (with the errno set by
/// bpf_set_retval, EPERM otherwise).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const EADDRINUSE: i32 = 98;

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// The socket's own storage: from bind4/6 (the port asked for) to post_bind4/6 (what was reported) to
/// sock_release. Freed by the kernel with the socket, so a bind that fails between the hooks or a
/// socket that is never released through the hook leaves nothing behind.
#[btf_map]
static MARKS: SkStorage<SocketMark> = SkStorage::new();

/// cookie -> the binding, for sockets user space adopted (bound while nothing watched): they carry no
/// mark. Looked up only while ADOPTING is not 0.
#[map(name = "ADOPTED")]
static ADOPTED: HashMap<u64, BoundSocket> = HashMap::with_max_entries(ADOPTED_CAPACITY, 0);

/// How many entries ADOPTED holds (user space keeps it): 0 spares every unmarked release the lookup.
#[map(name = "ADOPTING")]
static ADOPTING: Array<u32> = Array::with_max_entries(1, 0);

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

/// The socket's mark, if bind4/6 made one. `ctx`: a cgroup sock program's context (the socket).
#[inline(always)]
fn mark_of(ctx: &SockContext) -> Option<&'static mut SocketMark> {
    // SAFETY: helper valid for cgroup sock programs, which pass their context as the socket; flags 0
    // only looks up. The storage lives as long as the socket, which outlives this program run.
    let mark = unsafe {
        bpf_sk_storage_get(ptr::from_ref(&MARKS).cast_mut().cast::<c_void>(), ctx.as_ptr(), ptr::null_mut(), 0)
    };
    unsafe { mark.cast::<SocketMark>().as_mut() }
}

/// Shared by bind4 and bind6 once the address is known to be the wildcard.
#[inline(always)]
fn note_candidate(ctx: &SockAddrContext, addr: &bpf_sock_addr) {
    // user_port is in network byte order in the low 16 bits; 0 asks for an ephemeral port, the most
    // common wildcard bind of all (clients that bind before connect), so it is ruled out first.
    let port = u16::from_be(addr.user_port as u16);
    if port == 0 {
        return;
    }
    let Some(cfg) = config() else { return };
    if port < cfg.min_port || !is_forwardable_protocol(addr.protocol) {
        return;
    }
    // SAFETY: helper valid for sock_addr programs; the context pointer comes from the kernel.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie {
        return;
    }
    let mut fresh = SocketMark::default();
    // SAFETY: the context's socket is valid for this run; F_CREATE allocates the mark if missing.
    let mark = unsafe { MARKS.get_or_insert_ptr_mut(ctx, Some(&mut fresh)) };
    match unsafe { mark.as_mut() } {
        // An existing mark is a socket whose earlier bind() failed (a socket is bound only once).
        Some(mark) => mark.requested_port = port,
        None => {
            // Without a mark the release could not be reported; the daemon resynchronises.
            count(counters::UNTRACKED);
            warn!(ctx, "natbinder: no memory for a socket mark, port {} not tracked", port);
        }
    }
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

/// post_bind4 and post_bind6, for a socket bound to the wildcard address: decide, record and report.
#[inline(always)]
fn post_bind(ctx: &SockContext, family: u16) -> i32 {
    // Every bind that bind4/6 did not mark: one NULL test.
    let Some(mark) = mark_of(ctx) else { return ALLOW };
    let requested = mark.requested_port;
    mark.requested_port = 0;
    let sock: &bpf_sock = unsafe { &*ctx.sock };
    let protocol = sock.protocol as u16;
    let port = sock.src_port as u16;
    // A mark left by an earlier bind() of this socket that failed after bind4 (the port was taken
    // locally) must not make a later ephemeral bind of the same socket look explicit.
    if requested == 0 || port != requested {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };

    let key = PortKey { protocol, port };
    let held = unsafe { HELD_ELSEWHERE.get(&key) }.is_some();
    if held && config().is_some_and(|cfg| policy_forwards(cfg, protocol, port)) {
        emit(cookie, EventKind::Refused, family, protocol, port);
        // SAFETY: cgroup hooks may set the syscall's return value; bind() then fails with EADDRINUSE
        // and the kernel releases the port it had just allocated.
        unsafe { bpf_set_retval(-EADDRINUSE) };
        return DENY;
    }

    *mark = SocketMark { cookie, requested_port: 0, family, protocol, port };
    emit(cookie, EventKind::Bound, family, protocol, port);
    ALLOW
}

#[inline(always)]
fn emit(cookie: u64, kind: EventKind, family: u16, protocol: u16, port: u16) {
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        count(counters::EVENTS_DROPPED);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let (uid, gid, cgroup_id, comm) = if matches!(kind, EventKind::Released) {
        (0, 0, 0, [0u8; 16])
    } else {
        let uid_gid = bpf_get_current_uid_gid();
        (
            uid_gid as u32,
            (uid_gid >> 32) as u32,
            unsafe { bpf_get_current_cgroup_id() },
            bpf_get_current_comm().unwrap_or([0u8; 16]),
        )
    };
    entry.write(SocketEvent {
        cookie,
        cgroup_id,
        // SAFETY: a helper every program type may call; it reads a clock.
        at_ns: unsafe { bpf_ktime_get_ns() },
        kind: kind as u32,
        pid,
        tid,
        uid,
        gid,
        _pad32: 0,
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
    // A bind to a specific address is never forwarded: decided from the context, before any helper.
    if unsafe { (*ctx.sock).src_ip4 } != 0 {
        return ALLOW;
    }
    post_bind(&ctx, AF_INET)
}

#[cgroup_sock(post_bind6)]
pub fn natbinder_post_bind6(ctx: SockContext) -> i32 {
    let ip = unsafe { (*ctx.sock).src_ip6 };
    if ip[0] != 0 || ip[1] != 0 || ip[2] != 0 || ip[3] != 0 {
        return ALLOW;
    }
    post_bind(&ctx, AF_INET6)
}

#[cgroup_sock(sock_release)]
pub fn natbinder_sock_release(ctx: SockContext) -> i32 {
    if let Some(mark) = mark_of(&ctx) {
        if mark.protocol != 0 {
            let m = *mark;
            mark.protocol = 0;
            emit(m.cookie, EventKind::Released, m.family, m.protocol, m.port);
        }
        return ALLOW;
    }
    if ADOPTING.get(0).is_some_and(|n| *n != 0) {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(bound) = unsafe { ADOPTED.get(&cookie) } {
            let b = *bound;
            let _ = ADOPTED.remove(&cookie);
            emit(cookie, EventKind::Released, b.family, b.protocol, b.port);
        }
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
