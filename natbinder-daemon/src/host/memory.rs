//! The daemon's heap, kept small for a background service (idle RSS is a goal: BENCHMARKS.md).

/// glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps what was
/// freed in each. The daemon allocates on one thread and briefly on a few others (spawn_blocking): one
/// arena serves them without contention, and keeps freed memory where malloc_trim finds it. Called
/// before the runtime starts any thread.
pub fn use_one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes an allocator setting; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands the heap glibc keeps after frees back to the system. Called once start-up's large allocations
/// are over (the kernel's BTF, 5 MB on 6.18, parsed to relocate the programs, and the first socket
/// dump: about 2 MiB), and after each periodic check of the gateway, the quiet moment after whatever
/// came before (a burst of mappings made and deleted leaves its heap free but resident).
pub fn give_back_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the system; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
