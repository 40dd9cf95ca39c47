//! Disk image locks: exactly one VMM holds a disk image at a time.
//!
//! Each VMM takes an exclusive `flock` on every disk image it attaches
//! (on a file of its own, separate from the device's). A second VMM (a
//! restore of a running VM's snapshot, a stray destination) cannot take the
//! image. A migration hands the lock over at its commit: the destination
//! builds the VM without the locks and takes them, waiting, only after the
//! source committed and let go ([`migrate::vm::MigratableVm::committed`]); a
//! source that did not commit keeps them, so the destination does not run.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::VmError;

/// An exclusive lock on one disk image, released when dropped.
#[derive(Debug)]
pub struct DiskLock {
    _file: File,
    pub path: PathBuf,
}

fn try_lock(path: &Path) -> Result<Option<DiskLock>, VmError> {
    let file = File::open(path).map_err(|e| VmError::Config(format!("disk {}: {e}", path.display())))?;
    // SAFETY: flock on a file descriptor this function owns; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(Some(DiskLock { _file: file, path: path.to_path_buf() }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(VmError::Config(format!("disk {}: cannot lock it: {e}", path.display())))
    }
}

impl DiskLock {
    /// Locks `path` now, or fails if another VMM holds it.
    pub fn acquire(path: &Path) -> Result<Self, VmError> {
        try_lock(path)?.ok_or_else(|| {
            VmError::Config(format!(
                "disk {} is in use by another VMM (it holds the image's lock); stop that VM first",
                path.display()
            ))
        })
    }

    /// Locks `path`, waiting up to `wait` for its holder to let go.
    pub fn acquire_within(path: &Path, wait: Duration) -> Result<Self, VmError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(l) = try_lock(path)? {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(VmError::Config(format!(
                    "disk {} is still held by another VMM after {:.0} s",
                    path.display(),
                    wait.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Locks every path (all or none).
    pub fn acquire_all(paths: &[PathBuf], wait: Option<Duration>) -> Result<Vec<Self>, VmError> {
        paths
            .iter()
            .map(|p| match wait {
                Some(w) => Self::acquire_within(p, w),
                None => Self::acquire(p),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let p = std::env::temp_dir().join(format!("disk-lock-{}", std::process::id()));
        std::fs::write(&p, b"image").unwrap();
        let first = DiskLock::acquire(&p).unwrap();
        let e = DiskLock::acquire(&p).unwrap_err();
        assert!(e.to_string().contains("in use by another VMM"), "{e}");
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || DiskLock::acquire_within(&p, Duration::from_secs(5)).map(|_| ()))
        };
        std::thread::sleep(Duration::from_millis(100));
        drop(first);
        waiter.join().unwrap().unwrap();
        assert!(DiskLock::acquire_within(&p, Duration::from_millis(50)).is_ok());
        let _ = std::fs::remove_file(&p);
    }
}
