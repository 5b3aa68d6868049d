//! What the test process holds, for the leak checks of the hostile-client,
//! fault-injection and soak tests: open descriptors, live tokio tasks and
//! resident memory. The mirror runs in the test process, so these are its
//! figures (plus the test's own).

/// Open descriptors, live tokio tasks, resident bytes.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub fds: usize,
    pub tasks: usize,
    pub rss: u64,
}

/// The process's usage now. Must run inside a tokio runtime.
pub fn usage() -> Usage {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    Usage {
        fds,
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        rss: pages * page_size(),
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}
