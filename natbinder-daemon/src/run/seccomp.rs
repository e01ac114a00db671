//! seccomp user notification on bind(2), for `natbinder run --wait` (the paper's blocking bind).
//!
//! The program under `run --wait` gets a seccomp filter that turns its bind() calls into
//! notifications for a supervisor (`natbinder run` itself, never the program): the calling thread
//! sleeps in the kernel until the supervisor answers "go on" (SECCOMP_USER_NOTIF_FLAG_CONTINUE: the
//! kernel then performs the bind itself, exactly as without natbinder) or "fail with EADDRINUSE".
//! Being a kernel filter, it covers statically linked programs and raw syscalls, which LD_PRELOAD
//! would miss, and it is inherited across fork, exec and threads.
//!
//! What the filter can see is the syscall's number and raw arguments, not the socket or the address
//! behind the pointer, so it notifies every bind() whose address length is that of an IPv4 (16) or
//! IPv6 (28) address, or of a `struct sockaddr_storage` (111 or more: longer than any Unix address);
//! every other bind (Unix sockets of other lengths, netlink, packet...) and every other syscall
//! (connect included) goes through untouched. The supervisor reads the address and the socket and
//! answers at once for everything it does not forward ([`BindRequest::read`]).
//!
//! Reading the address from the program's memory is a time-of-check/time-of-use race: another thread
//! of the program could change it between the read and the kernel's own. That is harmless here: the
//! program can only mislead itself (its bind is then waited for, or not, on a port it did not bind;
//! the hooks report what it really bound, and a mapping nobody binds is removed when its reservation
//! lapses). The notification id is checked after every read, so a read never comes from another
//! process that took the pid of one that died.
//!
//! Only the native ABI is filtered (x86_64, aarch64): an x32 or 32-bit bind goes through untouched,
//! and is forwarded by the hooks as in the automatic mode, without waiting; so is a bind submitted
//! through io_uring (IORING_OP_BIND), which seccomp does not see.
use std::{
    ffi::c_void,
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use crate::{Family, Protocol};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("natbinder's bind filter knows the syscall ABI of x86_64 and aarch64 only");

/// Address lengths that make a bind() a notification (see the module's comment).
const SOCKADDR_IN_LEN: u32 = 16;
const SOCKADDR_IN6_LEN: u32 = 28;
/// One more than the longest Unix socket address (`sizeof(struct sockaddr_un)` is 110).
const LONGER_THAN_UNIX: u32 = 111;

/// Offsets into `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// The low 32 bits of args[2] (bind's addrlen) on a little-endian machine.
const DATA_ARG2_LOW: u32 = 16 + 2 * 8;

// Classic BPF opcodes (linux/filter.h).
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter program, built before fork so that the child only makes syscalls.
pub struct BindFilter {
    program: Vec<libc::sock_filter>,
}

impl Default for BindFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl BindFilter {
    pub fn new() -> Self {
        // Jump offsets count the instructions skipped: from instruction i, jt/jf land on i + 1 + n.
        let program = vec![
            /* 0 */ stmt(BPF_LD_W_ABS, DATA_ARCH),
            /* 1 */ jump(BPF_JEQ_K, AUDIT_ARCH_NATIVE, 0, 6), // another ABI: allow (8)
            /* 2 */ stmt(BPF_LD_W_ABS, DATA_NR),
            /* 3 */ jump(BPF_JEQ_K, libc::SYS_bind as u32, 0, 4), // not bind: allow (8)
            /* 4 */ stmt(BPF_LD_W_ABS, DATA_ARG2_LOW),
            /* 5 */ jump(BPF_JEQ_K, SOCKADDR_IN_LEN, 3, 0), // notify (9)
            /* 6 */ jump(BPF_JEQ_K, SOCKADDR_IN6_LEN, 2, 0), // notify (9)
            /* 7 */ jump(BPF_JGE_K, LONGER_THAN_UNIX, 1, 0), // notify (9)
            /* 8 */ stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
            /* 9 */ stmt(BPF_RET_K, libc::SECCOMP_RET_USER_NOTIF),
        ];
        Self { program }
    }

    /// Installs the filter on the calling thread (and so on everything it forks or execs) and returns
    /// the listener, the fd on which the supervisor receives the notifications.
    ///
    /// Meant for the child between fork and exec: it allocates nothing and makes only syscalls.
    /// `no_new_privs`: set PR_SET_NO_NEW_PRIVS first, which an unprivileged process needs before it
    /// may install a filter (a setuid program it runs then gains no privileges).
    ///
    /// # Safety
    /// Changes the calling process for good; only for a process about to exec the supervised program.
    pub unsafe fn install(&self, no_new_privs: bool) -> io::Result<RawFd> {
        if no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let program = libc::sock_fprog { len: self.program.len() as u16, filter: self.program.as_ptr().cast_mut() };
        let install = |flags: libc::c_ulong| {
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &program as *const libc::sock_fprog)
        };
        // WAIT_KILLABLE_RECV (Linux 5.19): once the supervisor holds a notification, only a fatal signal
        // interrupts the waiting bind. Without it, a program whose runtime signals its threads all the
        // time (Go's preemption) would restart the bind, and so its wait, again and again.
        let flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
        let mut fd = install(flags);
        if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) && !no_new_privs {
            // root without CAP_SYS_ADMIN (a container): it needs no_new_privs too.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            fd = install(flags);
        }
        if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            fd = install(libc::SECCOMP_FILTER_FLAG_NEW_LISTENER);
        }
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd as RawFd)
    }
}

/// Sends `fd` over the Unix socket `channel` (SCM_RIGHTS). Allocates nothing: safe between fork and
/// exec.
///
/// # Safety
/// `channel` and `fd` must be open file descriptors.
pub unsafe fn send_fd(channel: RawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // Room for one cmsghdr carrying one int, aligned for cmsghdr.
    let mut control = [0u64; 4];
    let mut msg: libc::msghdr = std::mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as _;
    let cmsg = libc::CMSG_FIRSTHDR(&msg);
    (*cmsg).cmsg_level = libc::SOL_SOCKET;
    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    if libc::sendmsg(channel, &msg, 0) < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one fd sent with [`send_fd`].
pub fn receive_fd(channel: RawFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer in it points at a buffer that outlives the call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        if libc::recvmsg(channel, &mut msg, libc::MSG_CMSG_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no file descriptor came with the message"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// One bind() waiting for the supervisor.
#[derive(Clone, Copy, Debug)]
pub struct Notification {
    pub id: u64,
    /// The calling thread's id (in the supervisor's pid namespace).
    pub tid: u32,
    pub fd: i32,
    pub addr: u64,
    pub addr_len: u32,
}

/// The supervisor's end of the filter.
pub struct Listener {
    fd: OwnedFd,
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Listener {
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Asks the kernel to wake the program's thread on the supervisor's CPU when answered
    /// (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6): a round trip costs less. Older kernels: no-op.
    pub fn prefer_sync_wake_up(&self) {
        const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
        // SAFETY: the ioctl reads nothing from memory; a kernel that lacks it answers EINVAL.
        unsafe {
            libc::ioctl(self.fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        };
    }

    /// Takes the next notification. Call when the fd is readable; ENOENT means the caller went away
    /// (a signal, or it died) before it could be taken.
    pub fn receive(&self) -> io::Result<Notification> {
        // SAFETY: the kernel fills the zeroed struct; it must be zeroed on entry.
        let mut raw: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Notification {
            id: raw.id,
            tid: raw.pid,
            fd: raw.data.args[0] as i32,
            addr: raw.data.args[1],
            addr_len: raw.data.args[2] as u32,
        })
    }

    /// Whether the notification still stands: its thread still waits in that bind(). Checked after
    /// each read of the program's memory or fds, which the pid alone could not vouch for.
    pub fn still_valid(&self, id: u64) -> bool {
        // SAFETY: the ioctl reads the u64 we pass by pointer.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0 }
    }

    /// Lets the kernel perform the bind as it would without natbinder.
    pub fn proceed(&self, id: u64) -> io::Result<()> {
        self.answer(libc::seccomp_notif_resp {
            id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        })
    }

    /// Fails the bind with `errno` without performing it.
    pub fn fail(&self, id: u64, errno: i32) -> io::Result<()> {
        self.answer(libc::seccomp_notif_resp { id, val: 0, error: -errno, flags: 0 })
    }

    fn answer(&self, mut response: libc::seccomp_notif_resp) -> io::Result<()> {
        // SAFETY: the kernel reads the struct we pass by pointer.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &mut response) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What a bind() asks for, as far as forwarding goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindAddress {
    pub family: Family,
    pub ip: IpAddr,
    pub port: u16,
}

impl BindAddress {
    /// Parses a `struct sockaddr_in` / `sockaddr_in6` as the program passed it; None for any other
    /// family or a length too short for the family (the kernel then fails the bind itself).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let family = u16::from_ne_bytes(bytes.get(0..2)?.try_into().ok()?);
        let port = u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?);
        match i32::from(family) {
            libc::AF_INET => {
                let octets: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
                Some(Self { family: Family::Ipv4, ip: IpAddr::V4(Ipv4Addr::from(octets)), port })
            }
            libc::AF_INET6 if bytes.len() >= SOCKADDR_IN6_LEN as usize => {
                let octets: [u8; 16] = bytes.get(8..24)?.try_into().ok()?;
                Some(Self { family: Family::Ipv6, ip: IpAddr::V6(Ipv6Addr::from(octets)), port })
            }
            _ => None,
        }
    }

    /// A wildcard address on an explicit port: what natbinder forwards. Port 0, loopback and specific
    /// addresses are not.
    pub fn is_wildcard_with_port(&self) -> bool {
        self.port != 0 && self.ip.is_unspecified()
    }
}

/// The socket being bound, as read through a copy of the program's descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketKind {
    /// TCP or UDP; None for anything else (SCTP, raw, ...), which natbinder does not forward.
    pub protocol: Option<Protocol>,
    /// IPV6_V6ONLY, for AF_INET6 sockets: such a socket takes no IPv4, and needs no IPv4 mapping.
    pub v6only: bool,
}

/// The thread group (process) a thread belongs to, from /proc/TID/status.
pub fn process_of_thread(tid: u32) -> io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no Tgid in /proc/{tid}/status")))
}

/// Reads `len` bytes at `addr` in thread `tid`'s memory (process_vm_readv; the same permission as
/// ptrace: one's own descendants, or root).
pub fn read_memory(tid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buffer = vec![0u8; len];
    let local = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut c_void, iov_len: len };
    // SAFETY: the local iovec points at `buffer`, which has `len` bytes; the remote one is only read
    // by the kernel, which checks it.
    let read = unsafe { libc::process_vm_readv(tid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    buffer.truncate(read as usize);
    Ok(buffer)
}

/// The kind of socket behind descriptor `fd` of process `pid`, read through a copy of the descriptor
/// (pidfd_getfd, Linux 5.6; the same permission as ptrace).
pub fn socket_kind(pid: u32, fd: i32) -> io::Result<SocketKind> {
    // SAFETY: plain syscalls; every fd they return is owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    let copy = unsafe { OwnedFd::from_raw_fd(copy as RawFd) };
    let option = |level, name| -> io::Result<i32> {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`.
        let rc = unsafe { libc::getsockopt(copy.as_raw_fd(), level, name, (&mut value as *mut i32).cast(), &mut len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    let domain = option(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let protocol = match (option(libc::SOL_SOCKET, libc::SO_TYPE)?, option(libc::SOL_SOCKET, libc::SO_PROTOCOL)?) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => Some(Protocol::Tcp),
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => Some(Protocol::Udp),
        _ => None,
    };
    let v6only = domain == libc::AF_INET6 && option(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0;
    Ok(SocketKind { protocol, v6only })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[4..8].copy_from_slice(&ip);
        b
    }

    fn sockaddr_in6(ip: Ipv6Addr, port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 28];
        b[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[8..24].copy_from_slice(&ip.octets());
        b
    }

    #[test]
    fn reads_ipv4_and_ipv6_addresses_and_tells_which_are_forwarded() {
        let any = BindAddress::parse(&sockaddr_in([0, 0, 0, 0], 8080)).unwrap();
        assert_eq!((any.family, any.port, any.is_wildcard_with_port()), (Family::Ipv4, 8080, true));
        assert!(!BindAddress::parse(&sockaddr_in([0, 0, 0, 0], 0)).unwrap().is_wildcard_with_port(), "port 0");
        assert!(!BindAddress::parse(&sockaddr_in([127, 0, 0, 1], 8080)).unwrap().is_wildcard_with_port());
        assert!(!BindAddress::parse(&sockaddr_in([192, 168, 1, 2], 8080)).unwrap().is_wildcard_with_port());
        let any6 = BindAddress::parse(&sockaddr_in6(Ipv6Addr::UNSPECIFIED, 51413)).unwrap();
        assert_eq!((any6.family, any6.port, any6.is_wildcard_with_port()), (Family::Ipv6, 51413, true));
        assert!(!BindAddress::parse(&sockaddr_in6(Ipv6Addr::LOCALHOST, 51413)).unwrap().is_wildcard_with_port());
        // sockaddr_storage-sized buffers hold the same.
        let mut storage = sockaddr_in([0, 0, 0, 0], 7000);
        storage.resize(128, 0);
        assert_eq!(BindAddress::parse(&storage).unwrap().port, 7000);
    }

    #[test]
    fn other_families_and_short_addresses_are_not_forwarded() {
        let mut unix = vec![0u8; 16];
        unix[0..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(BindAddress::parse(&unix), None);
        assert_eq!(BindAddress::parse(&[2]), None);
        assert_eq!(BindAddress::parse(&sockaddr_in6(Ipv6Addr::UNSPECIFIED, 1)[..20]), None, "short for AF_INET6");
        assert_eq!(BindAddress::parse(&[]), None);
    }

    /// The filter, run by the kernel's own seccomp in a forked child: every bind() of an IPv4 or IPv6
    /// address (and of a sockaddr_storage) waits for the test's answer; a Unix bind goes through.
    /// The answers are the supervisor's: proceed (the kernel binds), or EADDRINUSE.
    #[test]
    fn the_kernel_asks_the_supervisor_about_inet_binds_only_and_does_what_it_answers() {
        let filter = BindFilter::new();
        let (parent_end, child_end) = UnixDatagram::pair().unwrap();
        let dir = std::env::temp_dir().join(format!("natbinder-seccomp-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let unix_path = dir.join("s");
        let _ = std::fs::remove_file(&unix_path);
        let unix_path = unix_path.as_os_str().as_encoded_bytes().to_vec();
        assert!(unix_path.len() < 100);
        // SAFETY: the child makes only syscalls and allocation-free calls before _exit.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            unsafe {
                let code = match filter.install(true) {
                    Ok(fd) => {
                        let _ = send_fd(child_end.as_raw_fd(), fd);
                        libc::close(fd);
                        child_binds(&unix_path)
                    }
                    Err(_) => 90,
                };
                libc::_exit(code);
            }
        }
        drop(child_end);
        let listener = Listener::new(receive_fd(parent_end.as_raw_fd()).expect("the listener from the child"));
        // 1: tcp 0.0.0.0:0 -> proceed. 2: udp [::]:P -> EADDRINUSE. 3: sockaddr_storage-sized -> proceed.
        // The Unix bind in between must not arrive here.
        let mut seen = Vec::new();
        for answer in [Some(0), Some(libc::EADDRINUSE), Some(0)] {
            let n = listener.receive().expect("a notification");
            let bytes = read_memory(n.tid, n.addr, n.addr_len.min(128) as usize).unwrap();
            assert!(listener.still_valid(n.id));
            let address = BindAddress::parse(&bytes).expect("an inet address");
            let pid = process_of_thread(n.tid).unwrap();
            assert_eq!(pid, child as u32);
            let kind = socket_kind(pid, n.fd).unwrap();
            seen.push((address.family, kind.protocol, n.addr_len));
            match answer {
                Some(0) => listener.proceed(n.id).unwrap(),
                Some(errno) => listener.fail(n.id, errno).unwrap(),
                None => unreachable!(),
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            seen,
            vec![
                (Family::Ipv4, Some(Protocol::Tcp), 16),
                (Family::Ipv6, Some(Protocol::Udp), 28),
                (Family::Ipv4, Some(Protocol::Udp), 128)
            ]
        );
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "the child saw other results than answered (code = step that failed)");
    }

    /// The child's binds, with raw syscalls only (the test process has threads: the child of a fork
    /// must not allocate). Returns 0 if each had the result the test answers, else the failing step.
    fn child_binds(unix_path: &[u8]) -> i32 {
        // SAFETY: plain syscalls on sockets this function opens, with structs on its stack.
        unsafe {
            let bind_inet = |kind: i32, ip: Ipv4Addr, len: u32| {
                let socket = libc::socket(libc::AF_INET, kind, 0);
                let mut storage: libc::sockaddr_storage = std::mem::zeroed();
                let sin = (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_addr.s_addr = u32::from(ip).to_be();
                libc::bind(socket, (&storage as *const libc::sockaddr_storage).cast(), len)
            };
            if bind_inet(libc::SOCK_STREAM, Ipv4Addr::UNSPECIFIED, 16) != 0 {
                return 1;
            }
            let unix = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0);
            let mut sun: libc::sockaddr_un = std::mem::zeroed();
            sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, b) in unix_path.iter().enumerate() {
                sun.sun_path[i] = *b as libc::c_char;
            }
            let sun_len = size_of::<libc::sockaddr_un>() as u32;
            if libc::bind(unix, (&sun as *const libc::sockaddr_un).cast(), sun_len) != 0 {
                return 2;
            }
            let udp6 = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0);
            let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            let rc = libc::bind(udp6, (&sin6 as *const libc::sockaddr_in6).cast(), 28);
            if rc == 0 || *libc::__errno_location() != libc::EADDRINUSE {
                return 3;
            }
            // sizeof(struct sockaddr_storage) as the length, as some C programs pass it.
            if bind_inet(libc::SOCK_DGRAM, Ipv4Addr::LOCALHOST, size_of::<libc::sockaddr_storage>() as u32) != 0 {
                return 4;
            }
            0
        }
    }
}
