//! The host's CPU budget for guests: every vCPU thread joins one cgroup
//! when it starts (`vmm --vcpu-cgroup DIR`), while the VMM's own threads
//! (devices, API, migration) stay where the process was started. This is
//! libvirt's split of a VM into `vcpuN` and `emulator` groups: several VMs'
//! vCPUs can share one quota without a migration's sending threads taking
//! from it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// The file a thread id is written to: `cgroup.threads` on cgroup v2 (the
/// group must be `threaded`), `tasks` on v1.
fn thread_file(dir: &Path) -> Option<PathBuf> {
    ["cgroup.threads", "tasks"].iter().map(|f| dir.join(f)).find(|p| p.is_file())
}

/// Sets the cgroup for every vCPU thread of this process. Checked here, so
/// that a wrong path is a clear error before any VM starts. On cgroup v2
/// DIR must be `threaded` and the process moves into its parent.
pub fn set(dir: PathBuf) -> io::Result<()> {
    if thread_file(&dir).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{}: not a cgroup directory (no cgroup.threads or tasks); create it first, e.g. \
                 mkdir /sys/fs/cgroup/cpu/guests (v1) or a threaded group on v2",
                dir.display()
            ),
        ));
    }
    // cgroup v2 puts threads of one process in different groups only inside
    // one threaded subtree: the process joins DIR's parent (its threaded
    // domain) first, and its vCPU threads then join DIR.
    let threaded = std::fs::read_to_string(dir.join("cgroup.type")).map(|t| t.trim() == "threaded").unwrap_or(false);
    if threaded {
        let parent = dir.parent().ok_or_else(|| io::Error::other("a threaded cgroup has a parent"))?;
        std::fs::write(parent.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("joining {}: {e}", parent.display())))?;
    }
    DIR.set(dir).map_err(|_| io::Error::other("the vCPU cgroup is already set"))
}

/// The calling thread's id, from /proc/thread-self (`PID/task/TID`).
fn own_tid() -> io::Result<String> {
    let link = std::fs::read_link("/proc/thread-self")?;
    link.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("unexpected /proc/thread-self: {}", link.display())))
}

/// Moves the calling thread (a vCPU) into the vCPU cgroup, if one is set.
/// A failure is logged and the vCPU runs where it is.
pub fn join(vcpu: u32) {
    let Some(dir) = DIR.get() else { return };
    let r = own_tid().and_then(|tid| {
        let file = thread_file(dir).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        std::fs::write(&file, &tid).map(|_| tid)
    });
    match r {
        Ok(tid) => log::debug!("vCPU {vcpu} (thread {tid}) joined cgroup {}", dir.display()),
        Err(e) => log::warn!("vCPU {vcpu}: cannot join cgroup {}: {e}; it runs outside it", dir.display()),
    }
}
