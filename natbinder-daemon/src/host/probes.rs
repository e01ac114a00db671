//! What this kernel supports of what natbinder relies on, probed rather than read from a version
//! string (distributions backport; containers lie about versions): BTF, the cgroup socket program
//! types, bpf_link for cgroups, the helpers the programs call, and SO_NETNS_COOKIE. The daemon runs
//! them to explain a failure to attach; `natbinder doctor` shows them all.
use std::os::fd::AsRawFd;

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, is_program_supported, BpfHelper},
};

/// One probed feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// What was probed, as a user would name it.
    pub feature: &'static str,
    /// Ok: present. Err: why not, and what to do.
    pub result: Result<(), String>,
}

fn probe(feature: &'static str, result: Result<(), String>) -> Probe {
    Probe { feature, result }
}

/// BTF for the running kernel (CO-RE relocations and aya's loader need it).
pub fn btf() -> Probe {
    let result = std::fs::metadata("/sys/kernel/btf/vmlinux")
        .map(|_| ())
        .map_err(|e| format!("/sys/kernel/btf/vmlinux: {e}: boot a kernel built with CONFIG_DEBUG_INFO_BTF=y"));
    probe("BTF (/sys/kernel/btf/vmlinux)", result)
}

fn program_type(feature: &'static str, kind: ProgramType) -> Probe {
    let result = match is_program_supported(kind) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the kernel refuses this program type: it needs CONFIG_CGROUP_BPF=y".to_string()),
        Err(e) => Err(format!("could not probe ({e}); probing needs root or CAP_BPF")),
    };
    probe(feature, result)
}

fn helper(feature: &'static str, kind: ProgramType, helper: BpfHelper, needs: &str) -> Probe {
    let result = match is_helper_supported(kind, helper) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("not offered to this program type: it needs {needs}")),
        Err(e) => Err(format!("could not probe ({e}); probing needs root or CAP_BPF")),
    };
    probe(feature, result)
}

/// bpf_link for cgroup programs (Linux 5.7): the links that detach when the daemon dies, however it
/// dies. BPF_LINK_CREATE with no program answers EBADF where the command exists, EINVAL where not.
pub fn cgroup_bpf_link() -> Probe {
    const BPF_LINK_CREATE: libc::c_long = 28;
    let mut attr = [0u32; 16];
    attr[0] = u32::MAX; // prog_fd -1
                        // SAFETY: bpf(2) reads `attr`, which we own, for its stated size.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_mut_ptr(), std::mem::size_of_val(&attr) as libc::c_uint)
    };
    let errno = std::io::Error::last_os_error().raw_os_error();
    let result = match (rc, errno) {
        (_, Some(libc::EBADF)) => Ok(()),
        (_, Some(libc::EPERM)) => Err("could not probe: bpf(2) needs root or CAP_BPF".to_string()),
        (_, Some(libc::EINVAL)) => Err("this kernel has no BPF_LINK_CREATE: natbinder needs Linux 5.7 or later".into()),
        (rc, errno) => Err(format!("unexpected answer to BPF_LINK_CREATE: {rc} ({errno:?})")),
    };
    probe("bpf_link for cgroup programs", result)
}

/// SO_NETNS_COOKIE (Linux 5.14): how the programs tell the daemon's network namespace from others.
pub fn so_netns_cookie() -> Probe {
    let result =
        std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("opening a socket: {e}")).and_then(|socket| {
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
            if rc == 0 {
                Ok(())
            } else {
                Err(format!("{}: natbinder needs Linux 5.14 or later", std::io::Error::last_os_error()))
            }
        });
    probe("SO_NETNS_COOKIE", result)
}

/// Every probe, in the order a reader would check them.
pub fn all() -> Vec<Probe> {
    vec![
        btf(),
        program_type("cgroup socket programs (post_bind, sock_release)", ProgramType::CgroupSock),
        program_type("cgroup socket address programs (bind4, bind6)", ProgramType::CgroupSockAddr),
        cgroup_bpf_link(),
        helper(
            "bpf_get_socket_cookie in cgroup socket programs",
            ProgramType::CgroupSock,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "Linux 5.10 or later",
        ),
        helper(
            "bpf_set_retval in cgroup socket programs (bind() failing with EADDRINUSE)",
            ProgramType::CgroupSock,
            BpfHelper::BPF_FUNC_set_retval,
            "Linux 5.19 or later",
        ),
        so_netns_cookie(),
    ]
}

/// What is missing, one line each; empty when everything is there.
pub fn missing() -> Vec<String> {
    all().into_iter().filter_map(|p| p.result.err().map(|why| format!("{}: {why}", p.feature))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machines natbinder is built and tested on (and CI, as root) have everything: a probe that
    /// fails here is a broken probe, or a machine natbinder cannot run on.
    #[test]
    fn this_kernel_has_everything_natbinder_needs() {
        if unsafe { libc::geteuid() } != 0 {
            // Probing program types needs root; `cargo xtask test` runs the tests as root.
            eprintln!("not root: only the probes that need no privilege run");
            assert_eq!(btf().result, Ok(()));
            assert_eq!(so_netns_cookie().result, Ok(()));
            return;
        }
        assert_eq!(missing(), Vec::<String>::new());
    }
}
