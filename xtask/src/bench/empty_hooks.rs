//! Programs that do nothing (`return 1`), attached to a cgroup at natbinder's five hooks: what the
//! kernel's cgroup BPF machinery costs by itself, the floor under any program at those hooks. Loaded
//! with bpf(2) directly (two instructions each), so that xtask needs no eBPF toolchain.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// (program type, attach type, name) of each hook natbinder uses (enum bpf_attach_type).
const HOOKS: [(u32, u32, &str); 5] = [
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 8, "bind4"),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 9, "bind6"),
    (BPF_PROG_TYPE_CGROUP_SOCK, 12, "post_bind4"),
    (BPF_PROG_TYPE_CGROUP_SOCK, 13, "post_bind6"),
    (BPF_PROG_TYPE_CGROUP_SOCK, 34, "sock_release"),
];

/// The links; dropping them detaches the programs.
pub struct EmptyHooks {
    _links: Vec<OwnedFd>,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zeroed bpf_attr-sized buffer laid out for `cmd`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub fn attach(cgroup: &std::path::Path) -> Result<EmptyHooks> {
    // r0 = 1 (allow); exit.
    let instructions: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = b"GPL\0";
    let cgroup_dir = std::fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let mut links = Vec::new();
    for (program_type, attach_type, name) in HOOKS {
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&program_type.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(instructions.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[68..72].copy_from_slice(&attach_type.to_ne_bytes());
        let program = match bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(fd) => fd,
            Err(e) => bail!("loading an empty {name} program: {e}"),
        };
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(cgroup_dir.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
        match bpf(BPF_LINK_CREATE, &mut attr) {
            Ok(link) => links.push(link),
            Err(e) => bail!("attaching an empty {name} program to {}: {e}", cgroup.display()),
        }
    }
    Ok(EmptyHooks { _links: links })
}
