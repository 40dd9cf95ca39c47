//! A staging area for 2 MiB blocks: pages are gathered in a huge page here
//! and moved into guest RAM as one block ([`crate::Pager::move_block`]), so
//! the guest gets huge pages straight away instead of 4 KiB copies.
//!
//! The area is one private anonymous mapping with `MADV_HUGEPAGE`, one
//! 2 MiB slot per block of the guest RAM it stages for. Only slots in use
//! hold memory: the first write to a slot allocates its (zeroed) huge page,
//! a move takes the page away, [`Staging::release`] drops it. Slots are
//! handed out once each ([`Staging::take`]).
//!
//! Allocating and zeroing a huge page is the costly part, and after the
//! switch-over it runs inside the VM's CPU budget. A destination can
//! prepare a pool of huge pages before any migration arrives
//! ([`prepare_pool`], `vmm receive --prealloc`), as QEMU's `-mem-prealloc`
//! prepares guest RAM; blocks then take their slot from the pool first.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{BLOCK_SIZE, PAGE_SIZE};

/// The staging mapping (unmapped on drop).
pub struct Staging {
    addr: usize,
    map_len: usize,
    base: usize,
    slots: u64,
    /// Slots handed out by `take`.
    next: AtomicU64,
    /// Slots below this are backed already (`prefault`); `u64::MAX` for an
    /// area whose slots are backed on first write.
    ready: AtomicU64,
    /// Ends `prefault` early (a migration took the pool: its CPU is the VM's now).
    stop: AtomicBool,
}

// SAFETY: the mapping is plain memory owned by this value; callers
// coordinate access to a slot (one writer per slot, under their lock).
unsafe impl Send for Staging {}
// SAFETY: as above; `&self` methods touch disjoint slots or only read.
unsafe impl Sync for Staging {}

impl Staging {
    /// Reserves `slots` slots (address space only, NORESERVE).
    pub fn new(slots: u64) -> io::Result<Self> {
        let map_len = (slots.max(1) * BLOCK_SIZE + BLOCK_SIZE) as usize;
        // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = p as usize;
        let base = addr.next_multiple_of(BLOCK_SIZE as usize);
        // SAFETY: advice on the mapping just created; it changes only how
        // the kernel backs it.
        if unsafe { libc::madvise(base as *mut libc::c_void, (slots * BLOCK_SIZE) as usize, libc::MADV_HUGEPAGE) } != 0
        {
            log::debug!("staging: madvise(MADV_HUGEPAGE): {}", io::Error::last_os_error());
        }
        Ok(Self {
            addr,
            map_len,
            base,
            slots,
            next: AtomicU64::new(0),
            ready: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
        })
    }

    /// A slot no one has used (for a pool: only one already backed).
    pub fn take(&self) -> Option<u64> {
        let limit = self.slots.min(self.ready.load(Ordering::Acquire));
        self.next.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok()
    }

    /// Backs the slots one after the other (a huge page each where the
    /// kernel gives one); `take` hands out only those done. Returns the
    /// number of slots backed.
    pub fn prefault(&self) -> u64 {
        self.ready.store(0, Ordering::Release);
        for slot in 0..self.slots {
            if self.stop.load(Ordering::Acquire) {
                return slot;
            }
            let a = self.base + (slot * BLOCK_SIZE) as usize;
            // SAFETY: inside the mapping; `take` has not handed this slot
            // out yet (it is at `ready`), so nothing else uses it; the byte
            // was zero.
            unsafe { std::ptr::write_volatile(a as *mut u8, 0) };
            self.ready.store(slot + 1, Ordering::Release);
        }
        self.slots
    }

    /// Number of slots.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    pub(crate) fn slot_addr(&self, slot: u64) -> io::Result<usize> {
        if slot >= self.slots {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("staging slot {slot} out of range")));
        }
        Ok(self.base + (slot * BLOCK_SIZE) as usize)
    }

    /// Writes one page at page `page` (0..512) of slot `slot`.
    pub fn write(&self, slot: u64, page: u64, data: &[u8]) -> io::Result<()> {
        let a = self.page_addr(slot, page, data.len())?;
        // SAFETY: [a, a+len) lies inside the mapping (checked); the caller
        // owns the slot, so nothing else writes it concurrently.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), a as *mut u8, data.len()) };
        Ok(())
    }

    /// Copies page `page` of slot `slot` out.
    pub fn read(&self, slot: u64, page: u64, out: &mut [u8]) -> io::Result<()> {
        let a = self.page_addr(slot, page, out.len())?;
        // SAFETY: as in `write`, reading.
        unsafe { std::ptr::copy_nonoverlapping(a as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Makes sure page `page` of slot `slot`, a page that is zero, is
    /// backed (the first touch of a slot gets a zeroed huge page where the
    /// kernel can give one), so a move carries it rather than a hole.
    pub fn touch_zero(&self, slot: u64, page: u64) -> io::Result<()> {
        let a = self.page_addr(slot, page, PAGE_SIZE as usize)?;
        // SAFETY: inside the mapping; the page is zero (the caller never
        // wrote it), so writing a zero byte changes no content.
        unsafe { std::ptr::write_volatile(a as *mut u8, 0) };
        Ok(())
    }

    /// Drops whatever memory slot `slot` still holds.
    pub fn release(&self, slot: u64) -> io::Result<()> {
        let a = self.slot_addr(slot)?;
        // SAFETY: MADV_DONTNEED on one slot of our own private mapping; the
        // slot's content is not needed any more (the caller installed it).
        if unsafe { libc::madvise(a as *mut libc::c_void, BLOCK_SIZE as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn page_addr(&self, slot: u64, page: u64, len: usize) -> io::Result<usize> {
        if page >= BLOCK_SIZE / PAGE_SIZE || len as u64 != PAGE_SIZE {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("page {page} of a slot (len {len})")));
        }
        Ok(self.slot_addr(slot)? + (page * PAGE_SIZE) as usize)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.map_len) };
    }
}

static POOL: Mutex<Option<Arc<Staging>>> = Mutex::new(None);

/// Prepares a pool of `bytes` of huge pages for the next post-copy
/// destination in this process, backed on a background thread (it can be
/// taken while still being prepared: only backed slots are handed out).
pub fn prepare_pool(bytes: u64) -> io::Result<()> {
    let slots = bytes.div_ceil(BLOCK_SIZE);
    if slots == 0 {
        return Ok(());
    }
    let pool = Arc::new(Staging::new(slots)?);
    pool.ready.store(0, Ordering::Release);
    *POOL.lock().unwrap_or_else(|e| e.into_inner()) = Some(pool.clone());
    std::thread::Builder::new().name("huge-pool".into()).spawn(move || {
        let t = std::time::Instant::now();
        let n = pool.prefault();
        log::info!("prepared {n} huge pages ({} MiB) in {:.0} ms", n * 2, t.elapsed().as_secs_f64() * 1000.0);
    })?;
    Ok(())
}

/// Takes the pool [`prepare_pool`] made, if any; its preparation stops
/// where it is (what is backed by then is used).
pub fn take_pool() -> Option<Arc<Staging>> {
    let pool = POOL.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = &pool {
        p.stop.store(true, Ordering::Release);
    }
    pool
}
