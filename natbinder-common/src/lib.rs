//! The `#[repr(C)]` types that cross the kernel/user boundary: ring-buffer events, map keys and values.
//!
//! Every struct is laid out by hand with explicit padding fields so that no byte is left implicit: the
//! eBPF side copies these structs into maps and ring buffers, and the verifier rejects reads of
//! uninitialised stack bytes. The size assertions at the bottom keep the two sides in agreement.
#![no_std]

/// IANA protocol numbers as the kernel reports them in `bpf_sock.protocol`.
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;

/// Address families as in `bpf_sock.family`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Names of the maps and programs in the eBPF object, used by the loader.
pub mod names {
    pub const CONFIG: &str = "CONFIG";
    pub const EVENTS: &str = "EVENTS";
    pub const MARKS: &str = "MARKS";
    pub const ADOPTED: &str = "ADOPTED";
    pub const ADOPTING: &str = "ADOPTING";
    pub const HELD_ELSEWHERE: &str = "HELD_ELSEWHERE";
    pub const COUNTERS: &str = "COUNTERS";
    pub const POLICY: &str = "POLICY";
    pub const UIDS_AT_LIMIT: &str = "UIDS_AT_LIMIT";
    pub const BIND4: &str = "natbinder_bind4";
    pub const BIND6: &str = "natbinder_bind6";
    pub const POST_BIND4: &str = "natbinder_post_bind4";
    pub const POST_BIND6: &str = "natbinder_post_bind6";
    pub const SOCK_RELEASE: &str = "natbinder_sock_release";
}

/// Capacities of the maps. Sockets the hooks saw bind are marked in the socket itself (MARKS, socket
/// storage), which has no capacity; ADOPTED holds those user space found bound while nothing watched.
pub const ADOPTED_CAPACITY: u32 = 65536;
pub const HELD_ELSEWHERE_CAPACITY: u32 = 8192;
/// Entries of the POLICY array: the exposure policy as the kernel can evaluate it.
pub const POLICY_CAPACITY: u32 = 64;
/// Entries of UIDS_AT_LIMIT: users who hold as many mappings as they may.
pub const UIDS_AT_LIMIT_CAPACITY: u32 = 4096;
/// Ring buffer size in bytes (a power of two multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// The single entry of the CONFIG array map, written by the daemon before it attaches the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Network namespace cookie of the daemon: binds in any other namespace are not reported.
    pub netns_cookie: u64,
    /// Lowest port that is forwarded (ports below it pass untouched); the paper's 1024.
    pub min_port: u16,
    /// 1 while the daemon wants binds reported; 0 makes every hook a no-op.
    pub enabled: u8,
    pub _pad: u8,
    /// How many POLICY entries are in use (at most POLICY_CAPACITY).
    pub policy_len: u32,
}

/// What a POLICY entry says about the binds it matches.
pub mod verdict {
    /// The policy forwards it: a port another host holds fails the bind with EADDRINUSE.
    pub const FORWARD: u8 = 1;
    /// The policy does not forward it: the bind always succeeds.
    pub const LOCAL: u8 = 2;
    /// The policy decides on something the kernel cannot see (an executable, a cgroup pattern): the
    /// kernel stops here and never refuses, and user space decides.
    pub const UNKNOWN: u8 = 3;
}

/// One entry of the POLICY array. Entries are tried in order and the first that matches gives the
/// verdict; none matching means LOCAL. This is the exposure policy compiled into what the kernel can
/// check at bind time (cgroup ancestry, uid, primary gid, protocol, port), systemd socket-bind style.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyRule {
    /// Matches binds whose cgroup is this one or below it (0: any cgroup).
    pub cgroup_id: u64,
    pub uid_min: u32,
    pub uid_max: u32,
    /// Primary gid to match; u32::MAX: any.
    pub gid: u32,
    pub port_min: u16,
    pub port_max: u16,
    /// Depth of `cgroup_id` below the cgroup2 root (the root is level 0).
    pub cgroup_level: u16,
    /// IPPROTO_TCP or IPPROTO_UDP; 0: both.
    pub protocol: u16,
    /// A `verdict` value.
    pub verdict: u8,
    pub _pad: [u8; 11],
}

/// What happened to a socket. Values of `SocketEvent::kind`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A TCP or UDP socket was bound to a wildcard address on an explicit, non-privileged port.
    Bound = 1,
    /// A socket previously reported as Bound was released (closed, or its last holder exited).
    Released = 2,
    /// A bind was failed with EADDRINUSE because another host holds the port on the gateway.
    Refused = 3,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Bound),
            2 => Some(Self::Released),
            3 => Some(Self::Refused),
            _ => None,
        }
    }
}

/// One ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketEvent {
    /// `bpf_get_socket_cookie`: the socket's identity for its whole life; Released is matched by it.
    pub cookie: u64,
    /// cgroup v2 id of the process that bound (0 for Released).
    pub cgroup_id: u64,
    /// When the hook ran, `bpf_ktime_get_ns` (CLOCK_MONOTONIC): user space orders a release and the
    /// next bind by when the program made them, not by when it got round to reading them.
    pub at_ns: u64,
    /// An `EventKind` value.
    pub kind: u32,
    /// Thread-group id (the process id users know) of the binder, or of the releaser for Released.
    pub pid: u32,
    /// The thread that bound or released: a release's delete waits while it is still running (it may
    /// be on its way to binding the next port).
    pub tid: u32,
    /// uid and gid of the binder; 0 for Released.
    pub uid: u32,
    pub gid: u32,
    pub _pad32: u32,
    /// AF_INET or AF_INET6 (an AF_INET6 socket on [::] may also accept IPv4).
    pub family: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u16,
    /// Port in host byte order.
    pub port: u16,
    pub _pad: u16,
    /// The binder's command name (`comm`), NUL-padded.
    pub comm: [u8; 16],
}

/// What natbinder keeps in a socket it saw bind (MARKS, socket-local storage): bind4/6 note the port the
/// program asked for, post_bind4/6 what it reported, and sock_release reads it back. The kernel frees it
/// with the socket, so nothing has to be cleaned up, and a socket without one costs the release hook a
/// NULL test instead of a socket cookie and a hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketMark {
    /// The socket's cookie, once reported (post_bind); 0 before.
    pub cookie: u64,
    /// The explicit port bind() asked for (host byte order); 0 once post_bind has looked at it.
    pub requested_port: u16,
    /// What was reported as Bound (protocol 0: nothing, so the release is not reported).
    pub family: u16,
    pub protocol: u16,
    pub port: u16,
}

/// Value of the ADOPTED map, keyed by socket cookie: what sock_release reports for a socket user space
/// adopted (bound while nothing watched, found over sock_diag), which carries no mark.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoundSocket {
    pub family: u16,
    pub protocol: u16,
    pub port: u16,
    pub _pad: u16,
}

/// Key of the HELD_ELSEWHERE map: a port another LAN host holds on the gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub protocol: u16,
    pub port: u16,
}

/// Value of the HELD_ELSEWHERE map: the holder's IPv4 address (network byte order), for the logs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub ipv4_be: u32,
}

/// Slots of the COUNTERS per-CPU array.
pub mod counters {
    /// Events that could not be written because the ring buffer was full.
    pub const EVENTS_DROPPED: u32 = 0;
    /// Forwardable sockets that could not be tracked: their mark could not be allocated.
    pub const UNTRACKED: u32 = 1;
    pub const COUNT: u32 = 2;
}

const _: () = assert!(core::mem::size_of::<Config>() == 16);
const _: () = assert!(core::mem::size_of::<PolicyRule>() == 40);
const _: () = assert!(core::mem::size_of::<SocketEvent>() == 72);
const _: () = assert!(core::mem::size_of::<BoundSocket>() == 8);
const _: () = assert!(core::mem::size_of::<SocketMark>() == 16);
const _: () = assert!(core::mem::size_of::<PortKey>() == 4);
const _: () = assert!(core::mem::size_of::<Holder>() == 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are #[repr(C)], made only of integers, with every padding byte named.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SocketEvent {}
    unsafe impl aya::Pod for super::BoundSocket {}
    unsafe impl aya::Pod for super::SocketMark {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::Holder {}
    unsafe impl aya::Pod for super::PolicyRule {}
}
