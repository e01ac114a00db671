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
    /// Where the cgroup2 hierarchy is mounted.
    pub root: PathBuf,
    /// The root of the cgroup2 hierarchy, i.e. the whole machine.
    pub is_root: bool,
}

/// The cgroup to watch: `requested` if given (absolute, or relative to the cgroup2 root), else the root.
/// It must exist and lie inside the cgroup2 hierarchy.
pub fn resolve_cgroup(requested: Option<&Path>) -> Result<WatchedCgroup> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    resolve_cgroup_in(&mounts, requested)
}

/// As [`resolve_cgroup`], with the mount table given as text.
pub fn resolve_cgroup_in(mounts: &str, requested: Option<&Path>) -> Result<WatchedCgroup> {
    let Some(root) = find_cgroup2_mount(mounts) else {
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
    Ok(WatchedCgroup { is_root: canonical == root, path: canonical, root })
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

    fn scratch_hierarchy(name: &str) -> PathBuf {
        // A directory tree shaped like a cgroup2 mount: each cgroup has a cgroup.procs.
        let root = std::env::temp_dir().join(format!("natbinder-cgroup-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("forwarded.slice")).unwrap();
        std::fs::create_dir_all(root.join("plain-dir")).unwrap();
        std::fs::write(root.join("cgroup.procs"), "").unwrap();
        std::fs::write(root.join("forwarded.slice/cgroup.procs"), "").unwrap();
        root
    }

    #[test]
    fn resolves_relative_and_absolute_cgroups_and_names_what_is_wrong() {
        let root = scratch_hierarchy("resolve");
        let mounts = format!("cgroup2 {} cgroup2 rw 0 0\n", root.display());
        let whole = resolve_cgroup_in(&mounts, None).unwrap();
        assert_eq!((whole.path.clone(), whole.is_root), (root.canonicalize().unwrap(), true));
        let slice = resolve_cgroup_in(&mounts, Some(Path::new("forwarded.slice"))).unwrap();
        assert_eq!((slice.path.clone(), slice.is_root), (root.join("forwarded.slice").canonicalize().unwrap(), false));
        assert_eq!(resolve_cgroup_in(&mounts, Some(&root.join("forwarded.slice"))).unwrap(), slice);

        let err = format!("{:#}", resolve_cgroup_in(&mounts, Some(Path::new("missing.slice"))).unwrap_err());
        assert!(err.contains("missing.slice does not exist") && err.contains("--cgroup"), "{err}");
        let err = format!("{:#}", resolve_cgroup_in(&mounts, Some(Path::new("plain-dir"))).unwrap_err());
        assert!(err.contains("is not a cgroup directory"), "{err}");
        let err = format!("{:#}", resolve_cgroup_in(&mounts, Some(Path::new("/tmp"))).unwrap_err());
        assert!(err.contains("is not inside the cgroup2 hierarchy"), "{err}");
        let err = format!("{:#}", resolve_cgroup_in("proc /proc proc rw 0 0\n", None).unwrap_err());
        assert!(err.contains("no cgroup2 filesystem is mounted") && err.contains("mount -t cgroup2"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
