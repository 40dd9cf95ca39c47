//! Warming the benchmark host's free memory.
//!
//! The machines here are themselves VMs whose RAM the outer hypervisor backs
//! lazily: the first touch of a physical page the kernel never used costs an
//! exit to it. Measured (1 GiB, MADV_HUGEPAGE, first touch of each page):
//! 2185 ms on never-used memory, 49 ms on memory a process had just freed;
//! MADV_COLLAPSE of 1 GiB: 2570 ms against 248 ms. A real host's RAM is
//! physically there, so this cost is an artifact of the test machine, and it
//! lands on whichever VMM first allocates huge pages (the destination of a
//! migration, inside its host's CPU budget). [`warm`] touches and frees
//! memory once so that later allocations find it backed, as on a real host.

use std::time::Instant;

/// Touches `bytes` of anonymous memory (as huge pages where the kernel
/// gives them) and frees it again. Returns the milliseconds it took.
pub fn warm(bytes: usize) -> f64 {
    let t = Instant::now();
    // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return 0.0;
    }
    // SAFETY: advice on the mapping just created.
    unsafe { libc::madvise(p, bytes, libc::MADV_HUGEPAGE) };
    for off in (0..bytes).step_by(4096) {
        // SAFETY: `off` < `bytes`, inside the live mapping.
        unsafe { std::ptr::write_volatile((p as *mut u8).add(off), 1) };
    }
    // SAFETY: unmapping exactly the mapping created above.
    unsafe { libc::munmap(p, bytes) };
    t.elapsed().as_secs_f64() * 1000.0
}
