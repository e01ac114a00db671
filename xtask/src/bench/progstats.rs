//! The kernel's own accounting of natbinder's programs (BPF_ENABLE_STATS): run count and total run
//! time per program, read over the bpf(2) syscall, so that the overhead figures can say how much of a
//! slower bind() is natbinder's code and how much is the cgroup hook machinery and its side effects.
use std::{
    collections::BTreeMap,
    os::fd::{FromRawFd, OwnedFd},
};

use anyhow::{bail, Result};

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Offsets in `struct bpf_prog_info` (include/uapi/linux/bpf.h), stable ABI.
const INFO_NAME: usize = 64;
const INFO_RUN_TIME_NS: usize = 192;
const INFO_RUN_CNT: usize = 200;
const INFO_SIZE: usize = 256;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> libc::c_long {
    // SAFETY: attr is a zeroed bpf_attr-sized buffer laid out for `cmd`.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) }
}

/// Run-time statistics are collected while this lives (the kernel stops when its fd closes).
pub struct StatsEnabled(#[allow(dead_code)] OwnedFd);

pub fn enable() -> Result<StatsEnabled> {
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
    let fd = bpf(BPF_ENABLE_STATS, &mut attr);
    if fd < 0 {
        bail!("BPF_ENABLE_STATS failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(StatsEnabled(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// (run time ns, run count) of every loaded program whose name starts with `prefix`, by program id
/// (names are cut to 15 characters by the kernel: the id tells apart the post_bind4 and post_bind6).
pub fn snapshot(prefix: &str) -> BTreeMap<u32, (String, u64, u64)> {
    let mut programs = BTreeMap::new();
    let mut id = 0u32;
    loop {
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&id.to_ne_bytes());
        if bpf(BPF_PROG_GET_NEXT_ID, &mut attr) < 0 {
            return programs;
        }
        id = u32::from_ne_bytes(attr[4..8].try_into().unwrap());
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&id.to_ne_bytes());
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue;
        }
        // SAFETY: a new fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = [0u8; INFO_SIZE];
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(INFO_SIZE as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) < 0 {
            continue;
        }
        let name = &info[INFO_NAME..INFO_NAME + 16];
        let name = String::from_utf8_lossy(&name[..name.iter().position(|b| *b == 0).unwrap_or(16)]).into_owned();
        if name.starts_with(prefix) {
            let read = |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().unwrap());
            programs.insert(id, (name, read(INFO_RUN_TIME_NS), read(INFO_RUN_CNT)));
        }
    }
}

/// What ran between two snapshots: (program name, mean ns per run, runs), programs that ran only.
pub fn delta(
    before: &BTreeMap<u32, (String, u64, u64)>,
    after: &BTreeMap<u32, (String, u64, u64)>,
) -> Vec<(String, f64, u64)> {
    after
        .iter()
        .filter_map(|(id, (name, time, count))| {
            let (t0, c0) = before.get(id).map_or((0, 0), |(_, t, c)| (*t, *c));
            let runs = count.saturating_sub(c0);
            (runs > 0).then(|| (name.clone(), time.saturating_sub(t0) as f64 / runs as f64, runs))
        })
        .collect()
}
