//! Finding the cgroup v2 hierarchy and the cgroup the hooks attach to.
//!
//! cgroup2 is mounted at /sys/fs/cgroup on most systems and at /sys/fs/cgroup/unified on hybrid ones,
//! so the mount table decides, never a fixed path.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The first cgroup2 mount point listed in `mounts` (the text of /proc/self/mounts).
pub fn find_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// /proc/self/mounts writes space, tab, newline and backslash in paths as octal escapes.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The watched cgroup, as a canonical path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedCgroup {
    pub path: PathBuf,
    /// The root of the cgroup2 hierarchy, i.e. the whole machine.
    pub is_root: bool,
}

/// The cgroup to watch: `requested` if given (absolute, or relative to the cgroup2 root), else the root.
/// It must exist and lie inside the cgroup2 hierarchy.
pub fn resolve_cgroup(requested: Option<&Path>) -> Result<WatchedCgroup> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let Some(root) = find_cgroup2_mount(&mounts) else {
        bail!(
            "no cgroup2 filesystem is mounted (none in /proc/self/mounts): natbinder needs cgroup v2; \
             mount it with `mount -t cgroup2 none /sys/fs/cgroup` or boot with systemd.unified_cgroup_hierarchy=1"
        );
    };
    let path = match requested {
        None => root.clone(),
        Some(p) if p.is_absolute() => p.to_path_buf(),
        Some(p) => root.join(p),
    };
    let canonical = path.canonicalize().with_context(|| {
        format!("cgroup {} does not exist (create it with mkdir, or pick another --cgroup)", path.display())
    })?;
    let root = root.canonicalize().unwrap_or(root);
    if !canonical.starts_with(&root) {
        bail!("{} is not inside the cgroup2 hierarchy mounted at {}", canonical.display(), root.display());
    }
    if !canonical.join("cgroup.procs").exists() {
        bail!("{} is not a cgroup directory (it has no cgroup.procs)", canonical.display());
    }
    Ok(WatchedCgroup { is_root: canonical == root, path: canonical })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "sysfs /sys sysfs rw 0 0\ntmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(find_cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(find_cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
        let escaped = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(find_cgroup2_mount(escaped), Some(PathBuf::from("/mnt/my cgroups")));
    }

    #[test]
    fn rejects_missing_cgroup() {
        let err = resolve_cgroup(Some(Path::new("/nonexistent-natbinder-cgroup"))).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("does not exist") || text.contains("cgroup2"), "{text}");
    }
}
