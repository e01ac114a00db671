//! What the exposure policy needs to know about the program behind a bind: its cgroup's path, its
//! executable and its supplementary groups, read from /proc and the cgroup2 filesystem.
//!
//! These reads are small (one procfs file or link each, microseconds) and happen on the event loop as
//! binds come. A program may be gone by then (a crash right after bind): then the cgroup is found from
//! the id the kernel reported, by a walk of the cgroup2 tree that is cached, and what cannot be found
//! stays unknown, which the policy never reads as "forward".
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// Most cgroups a walk looks at, so that a pathological tree cannot stall the loop for long.
const WALK_LIMIT: usize = 100_000;

/// cgroup ids to paths (relative to the cgroup2 root), and back.
pub struct CgroupNames {
    root: PathBuf,
    by_id: Mutex<HashMap<u64, String>>,
}

impl CgroupNames {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), by_id: Mutex::new(HashMap::new()) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of the cgroup `pid` bound in (`cgroup_id`, as the kernel reported it). pid 0, or a
    /// process that is gone or has moved since: by the id.
    pub fn path_of(&self, pid: u32, cgroup_id: u64) -> Option<String> {
        if pid != 0 {
            if let Some(path) = read_proc_cgroup(pid) {
                if cgroup_id == 0 || self.resolve(&path).is_some_and(|(_, id)| id == cgroup_id) {
                    return Some(path);
                }
            }
        }
        if cgroup_id == 0 {
            return None;
        }
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = by_id.get(&cgroup_id) {
            return Some(path.clone());
        }
        *by_id = walk(&self.root);
        by_id.get(&cgroup_id).cloned()
    }

    /// The depth below the root and the id of the cgroup at `path`, if it exists. On cgroup2 a
    /// directory's inode number is the cgroup's id.
    pub fn resolve(&self, path: &str) -> Option<(u16, u64)> {
        let path = path.trim_matches('/');
        let meta = std::fs::metadata(self.root.join(path)).ok()?;
        let depth = if path.is_empty() { 0 } else { path.split('/').count() };
        (meta.is_dir() && depth <= u16::MAX as usize).then_some((depth as u16, meta.ino()))
    }
}

/// "0::/user.slice/..." from /proc/PID/cgroup, without its leading slash.
fn read_proc_cgroup(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    parse_proc_cgroup(&text)
}

fn parse_proc_cgroup(text: &str) -> Option<String> {
    let path = text.lines().find_map(|line| line.strip_prefix("0::"))?;
    // "(deleted)": the cgroup went away; the id decides then.
    (!path.ends_with(" (deleted)")).then(|| path.trim_start_matches('/').to_string())
}

fn walk(root: &Path) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        if found.len() >= WALK_LIMIT {
            break;
        }
        if let Ok(meta) = std::fs::metadata(&dir) {
            found.insert(meta.ino(), rel.clone());
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                stack.push((entry.path(), child));
            }
        }
    }
    found
}

/// The program's executable, if it is still there to ask.
pub fn exe(pid: u32) -> Option<PathBuf> {
    (pid != 0).then(|| std::fs::read_link(format!("/proc/{pid}/exe")).ok()).flatten()
}

/// The process's real gid ("Gid:" in /proc/PID/status), for sockets found by listing rather than by
/// their bind, whose event would have carried it.
pub fn primary_gid(pid: u32) -> Option<u32> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Gid:"))?.split_whitespace().next()?.parse().ok()
}

/// The process's supplementary groups ("Groups:" in /proc/PID/status).
pub fn supplementary_groups(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new();
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Vec::new() };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|groups| groups.split_whitespace().filter_map(|g| g.parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether thread `tid` is running or waiting for a CPU (state R in /proc/TID/stat): a program that
/// has just closed a port and is still running may be on its way to binding the next. Sleeping,
/// stopped, exiting or gone: false.
pub fn thread_is_running(tid: u32) -> bool {
    tid != 0 && std::fs::read(format!("/proc/{tid}/stat")).is_ok_and(|stat| stat_state(&stat) == Some(b'R'))
}

/// The state letter of a /proc/PID/stat line: after the command name, which may hold spaces and
/// parentheses, so after the last ')'.
fn stat_state(stat: &[u8]) -> Option<u8> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat.get(close + 2).copied()
}

/// The calling thread's id, as the hooks report it.
#[cfg(test)]
pub fn current_thread() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// A thread blocked on a channel until this is dropped, for tests of what a sleeping thread means.
#[cfg(test)]
pub struct SleepingThread {
    pub tid: u32,
    wake: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(test)]
impl SleepingThread {
    /// Returns once the thread is seen asleep (or panics after a second).
    pub fn start() -> Self {
        let (wake, asleep) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            tid_tx.send(current_thread()).unwrap();
            let _ = asleep.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let asleep = (0..1000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            !thread_is_running(tid)
        });
        assert!(asleep, "a thread blocked on a channel was never seen asleep");
        Self { tid, wake: Some(wake), thread: Some(thread) }
    }
}

#[cfg(test)]
impl Drop for SleepingThread {
    fn drop(&mut self) {
        drop(self.wake.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_running_while_it_runs_and_not_while_it_sleeps_or_after_it_ends() {
        assert!(thread_is_running(current_thread()), "this thread, reading its own state, runs");
        let sleeper = SleepingThread::start();
        let tid = sleeper.tid;
        assert!(!thread_is_running(tid));
        drop(sleeper);
        assert!(!thread_is_running(tid), "a thread that ended");
        assert!(!thread_is_running(0));
    }

    #[test]
    fn the_state_is_read_after_a_command_name_with_spaces_and_parentheses() {
        assert_eq!(stat_state(b"42 (a) b) c) S 1 42 42 0"), Some(b'S'));
        assert_eq!(stat_state(b"42 (x) R 1"), Some(b'R'));
        assert_eq!(stat_state(b"42 (x"), None);
        assert_eq!(stat_state(b"42 (x)"), None);
    }

    #[test]
    fn proc_cgroup_lines_are_read_as_paths_below_the_root() {
        assert_eq!(
            parse_proc_cgroup("0::/user.slice/user-1000.slice/session-2.scope\n").as_deref(),
            Some("user.slice/user-1000.slice/session-2.scope")
        );
        assert_eq!(parse_proc_cgroup("12:cpu:/x\n0::/\n").as_deref(), Some(""));
        assert_eq!(parse_proc_cgroup("0::/gone (deleted)\n"), None);
        assert_eq!(parse_proc_cgroup("1:name=systemd:/x\n"), None);
    }

    #[test]
    fn this_process_is_found_by_pid_and_by_its_cgroup_id() {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let root = crate::host::cgroup::find_cgroup2_mount(&mounts).expect("cgroup2 is mounted here");
        let names = CgroupNames::new(&root);
        let me = std::process::id();
        let path = names.path_of(me, 0).expect("our own cgroup");
        let (depth, id) = names.resolve(&path).expect("our cgroup exists");
        assert_eq!(depth as usize, if path.is_empty() { 0 } else { path.split('/').count() });
        // By id alone (as for a program that has exited), through the walk.
        assert_eq!(names.path_of(0, id).as_deref(), Some(path.as_str()));
        assert_eq!(names.path_of(0, u64::MAX - 7), None);
        assert!(exe(me).is_some_and(|e| e.is_absolute()));
        assert_eq!(exe(0), None);
        let _ = supplementary_groups(me);
    }
}
