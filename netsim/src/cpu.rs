//! A CPU budget for one simulated host: a cgroup whose processes together
//! get at most `cpus` CPUs' worth of time (cgroup v2 `cpu.max`, or the v1
//! CFS quota where the cpu controller is on a v1 hierarchy, as on this
//! machine). Processes are moved in by pid; the cgroup is removed on drop
//! (its processes return to the root group first).
//!
//! [`CpuBudget::for_threads`] makes a group for single threads instead:
//! `vmm --vcpu-cgroup` puts only a VM's vCPU threads in it, so that the
//! guests of one host share the quota while each VMM's own threads (devices,
//! migration) do not take from it. On cgroup v2 that is a `threaded` group
//! under a threaded domain that the VMM process joins itself.

use std::io;
use std::path::PathBuf;

const PERIOD_US: u64 = 100_000;

pub struct CpuBudget {
    dir: PathBuf,
    v2: bool,
    /// cgroup v2, a group for threads: its threaded domain (removed last).
    domain: Option<PathBuf>,
}

fn write(path: PathBuf, value: &str) -> io::Result<()> {
    std::fs::write(&path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl CpuBudget {
    /// A new group named `name` limited to `cpus` CPUs.
    pub fn create(name: &str, cpus: f64) -> io::Result<Self> {
        let quota = ((cpus * PERIOD_US as f64) as u64).max(1000);
        let v2_root = PathBuf::from("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(v2_root.join("cgroup.controllers"))
            .map(|c| c.split_whitespace().any(|x| x == "cpu"))
            .unwrap_or(false);
        let dir = if v2 { v2_root.join(name) } else { v2_root.join("cpu").join(name) };
        if v2 {
            let _ = write(v2_root.join("cgroup.subtree_control"), "+cpu");
        }
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        let b = Self { dir, v2, domain: None };
        if b.v2 {
            write(b.dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
        } else {
            write(b.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(b.dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        Ok(b)
    }

    /// A new group named `name` limited to `cpus` CPUs for threads that join
    /// it themselves ([`CpuBudget::path`], e.g. `vmm --vcpu-cgroup`).
    pub fn for_threads(name: &str, cpus: f64) -> io::Result<Self> {
        let mut b = Self::create(name, cpus)?;
        if !b.v2 {
            return Ok(b); // v1: any thread can join any group (its `tasks` file)
        }
        let domain = b.dir.clone();
        let quota = std::fs::read_to_string(domain.join("cpu.max"))?;
        write(domain.join("cpu.max"), "max")?;
        write(domain.join("cgroup.subtree_control"), "+cpu")?;
        let dir = domain.join("vcpus");
        std::fs::create_dir(&dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        b.dir = dir;
        b.domain = Some(domain);
        write(b.dir.join("cgroup.type"), "threaded")?;
        write(b.dir.join("cpu.max"), quota.trim())?;
        Ok(b)
    }

    /// The group's directory.
    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        write(self.dir.join("cgroup.procs"), &pid.to_string())
    }
}

impl Drop for CpuBudget {
    fn drop(&mut self) {
        let root = if self.v2 { PathBuf::from("/sys/fs/cgroup") } else { PathBuf::from("/sys/fs/cgroup/cpu") };
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for p in procs.lines() {
                let _ = std::fs::write(root.join("cgroup.procs"), p);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(domain) = &self.domain {
            if let Ok(procs) = std::fs::read_to_string(domain.join("cgroup.procs")) {
                for p in procs.lines() {
                    let _ = std::fs::write(root.join("cgroup.procs"), p);
                }
            }
            let _ = std::fs::remove_dir(domain);
        }
    }
}
