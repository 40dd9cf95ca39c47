//! Post-copy's destination places guest RAM as 2 MiB huge pages where it
//! can, instead of 4 KiB copies that leave the VM slow after the last page.
//!
//! Each 2 MiB block of guest RAM (at a 2 MiB aligned host address, with
//! `UFFDIO_MOVE` in the kernel) is *filling* until every one of its pages is
//! accounted for: pushed pages are gathered in the block's slot of a
//! [`pager::Staging`] area (a huge page), zero and free pages are left as
//! they are there (zero) and deferred in the pager. When the last page is
//! accounted for, the slot moves into guest RAM in one `UFFDIO_MOVE`: the
//! guest gets a PMD-mapped huge page with no copy. A block that is all zero
//! or free is not placed at all: after the pager unregisters, the kernel
//! backs it with a huge page on first touch; a fault on it before then
//! places a zeroed huge page.
//!
//! A vCPU must never wait for a block to fill: a fault on a page of a
//! filling block (or a pushed page a vCPU already asked for) *breaks* the
//! block: its gathered pages are copied in as 4 KiB pages and the rest of it
//! follows one page at a time, as without this module. The destination
//! collapses broken blocks into huge pages after the migration.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use std::sync::Arc;

use pager::{Pager, Region, Staging, BLOCK_SIZE, PAGE_SIZE};

const PAGES: u64 = BLOCK_SIZE / PAGE_SIZE;
const WORDS: usize = (PAGES / 64) as usize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Filling,
    /// Pages go in one by one (4 KiB).
    Broken,
    /// Moved in as a huge page.
    Placed,
}

/// Where a block gathers: a slot of the prepared pool or of the area.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Pool(u64),
    Area(u64),
}

/// The staging slots: a pool of huge pages prepared before the migration
/// (`vmm receive --prealloc`), then the area, backed on first write.
pub struct Slots {
    area: Staging,
    pool: Option<Arc<Staging>>,
}

impl Slots {
    fn take(&self) -> io::Result<Slot> {
        if let Some(s) = self.pool.as_ref().and_then(|p| p.take()) {
            return Ok(Slot::Pool(s));
        }
        self.area.take().map(Slot::Area).ok_or_else(|| io::Error::other("no staging slot left"))
    }

    fn get(&self, s: Slot) -> (&Staging, u64) {
        match (s, &self.pool) {
            (Slot::Pool(i), Some(p)) => (p, i),
            (Slot::Area(i), _) | (Slot::Pool(i), None) => (&self.area, i),
        }
    }
}

#[derive(Default)]
struct Block {
    /// Its staging slot, taken on first use.
    slot: Option<Slot>,
    phase: Phase,
    /// Pages gathered in the slot.
    staged: [u64; WORDS],
    /// Pages known to be zero or free (deferred in the pager).
    lazy: [u64; WORDS],
}

impl Block {
    fn has(bits: &[u64; WORDS], p: u64) -> bool {
        bits[(p / 64) as usize] & (1 << (p % 64)) != 0
    }
    fn put(bits: &mut [u64; WORDS], p: u64) {
        bits[(p / 64) as usize] |= 1 << (p % 64);
    }
    fn complete(&self) -> bool {
        self.staged.iter().zip(&self.lazy).all(|(s, l)| s | l == u64::MAX)
    }
    fn any_staged(&self) -> bool {
        self.staged.iter().any(|&w| w != 0)
    }
}

/// What [`Blocks::stage`] did with a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staged {
    /// Gathered (`true`) or already accounted for (`false`).
    Gathered(bool),
    /// Not for a filling block: install it directly (4 KiB).
    Direct,
}

/// What [`Blocks::fault_lazy`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LazyFault {
    /// A zeroed huge page went in; the vCPU is awake.
    Resolved,
    /// The page was asked for (its answer installs it).
    Requested,
    /// Map a 4 KiB zero page.
    Zero,
}

/// Counters for the destination's statistics.
#[derive(Default)]
pub struct BlockCounters {
    /// Blocks moved in as huge pages with content.
    pub placed: AtomicU64,
    /// All-zero blocks placed as a zeroed huge page on a fault.
    pub zero_placed: AtomicU64,
    /// Blocks that went 4 KiB (a fault hit them while filling).
    pub broken: AtomicU64,
    /// Of those, by [`Why`].
    pub broken_why: [AtomicU64; 4],
}

impl BlockCounters {
    /// The broken blocks by reason, for the statistics.
    pub fn broken_by_reason(&self) -> serde_json::Value {
        let n = |w: Why| self.broken_why[w as usize].load(Ordering::Relaxed);
        serde_json::json!({
            "vcpu_waited": n(Why::Wait), "fault_on_gathered": n(Why::Fault),
            "fault_after_push": n(Why::Finished), "incomplete_after_push": n(Why::Finish),
        })
    }
}

/// Why a block broke.
#[derive(Clone, Copy)]
enum Why {
    /// A vCPU waited for a page of it that was not there.
    Wait = 0,
    /// A vCPU faulted on a page gathered for it.
    Fault = 1,
    /// A fault on a zero page after the push ended.
    Finished = 2,
    /// Still incomplete when the push ended.
    Finish = 3,
}

/// The 2 MiB blocks of guest RAM and their staging area.
pub struct Blocks {
    /// (first block's gpa, blocks, index of its first state)
    table: Vec<(u64, u64, u64)>,
    state: Vec<Mutex<Block>>,
    staging: Option<Slots>,
    /// Blocks that took a prepared huge page.
    pub from_pool: AtomicU64,
    /// Set by [`Blocks::finish`]: nothing is gathered any more.
    finished: AtomicBool,
    pub counters: BlockCounters,
}

impl Blocks {
    /// The placeable blocks of `regions` (none if the kernel cannot move
    /// pages or no staging area can be mapped: everything goes 4 KiB).
    pub fn new(pager: &Pager, regions: &[Region]) -> Self {
        let mut table = Vec::new();
        let mut n = 0;
        for r in regions {
            let first = r.guest_base.next_multiple_of(BLOCK_SIZE);
            let end = (r.guest_base + r.len as u64) / BLOCK_SIZE * BLOCK_SIZE;
            if end <= first || !pager.block_placeable(first) {
                continue;
            }
            let count = (end - first) / BLOCK_SIZE;
            table.push((first, count, n));
            n += count;
        }
        let staging = if n == 0 {
            None
        } else {
            match Staging::new(n) {
                Ok(area) => Some(Slots { area, pool: pager::staging::take_pool() }),
                Err(e) => {
                    log::warn!("post-copy: no staging area for huge pages ({e}); pages go in as 4 KiB");
                    None
                }
            }
        };
        if staging.is_none() {
            table.clear();
            n = 0;
        }
        if !pager.can_move() {
            log::info!("post-copy: the kernel has no UFFDIO_MOVE; pages go in as 4 KiB and collapse afterwards");
        }
        Self {
            table,
            state: (0..n).map(|_| Mutex::new(Block::default())).collect(),
            staging,
            from_pool: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            counters: Default::default(),
        }
    }

    /// (state index, block gpa, page within the block) of `gpa`.
    fn locate(&self, gpa: u64) -> Option<(u64, u64, u64)> {
        let block = gpa / BLOCK_SIZE * BLOCK_SIZE;
        self.table
            .iter()
            .find(|&&(first, count, _)| block >= first && block < first + count * BLOCK_SIZE)
            .map(|&(first, _, base)| (base + (block - first) / BLOCK_SIZE, block, (gpa - block) / PAGE_SIZE))
    }

    fn lock(&self, slot: u64) -> std::sync::MutexGuard<'_, Block> {
        self.state[slot as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The staging slot of block `b` (taken now if it has none).
    fn slot_of<'s>(&self, slots: &'s Slots, b: &mut Block) -> io::Result<(&'s Staging, u64)> {
        let s = match b.slot {
            Some(s) => s,
            None => {
                let s = slots.take()?;
                if matches!(s, Slot::Pool(_)) {
                    self.from_pool.fetch_add(1, Ordering::Relaxed);
                }
                b.slot = Some(s);
                s
            }
        };
        Ok(slots.get(s))
    }

    /// Whether `gpa`'s block is placeable at all.
    pub fn placeable(&self, gpa: u64) -> bool {
        self.locate(gpa).is_some()
    }

    /// Whether the page at `gpa` is gathered in a filling block.
    pub fn is_staged(&self, gpa: u64) -> bool {
        self.locate(gpa).is_some_and(|(slot, _, p)| {
            let b = self.lock(slot);
            b.phase == Phase::Filling && Block::has(&b.staged, p)
        })
    }

    /// A pushed or demanded page: gathered if its block is filling. A vCPU
    /// waiting for it must then be released with [`Blocks::break_at`].
    pub fn stage(&self, pager: &Pager, gpa: u64, data: &[u8]) -> io::Result<Staged> {
        let (Some((slot, block, p)), Some(staging)) = (self.locate(gpa), &self.staging) else {
            return Ok(Staged::Direct);
        };
        let mut b = self.lock(slot);
        if b.phase != Phase::Filling {
            return Ok(Staged::Direct);
        }
        if Block::has(&b.staged, p) || Block::has(&b.lazy, p) {
            return Ok(Staged::Gathered(false));
        }
        // Checked under the block's lock: `finish` visits this block after
        // setting the flag, so nothing gathered is left behind.
        if self.finished.load(Ordering::Acquire) {
            return Ok(Staged::Direct);
        }
        let (area, i) = self.slot_of(staging, &mut b)?;
        area.write(i, p, data)?;
        Block::put(&mut b.staged, p);
        if b.complete() {
            self.place(pager, staging, block, &mut b)?;
        }
        Ok(Staged::Gathered(true))
    }

    /// A vCPU waits for the page at `gpa`, which is not present: if its
    /// block is still filling it cannot wait for the rest, so the block
    /// breaks (gathered pages go in as 4 KiB pages now).
    pub fn break_at(&self, pager: &Pager, gpa: u64) -> io::Result<()> {
        let (Some((slot, block, _)), Some(staging)) = (self.locate(gpa), &self.staging) else {
            return Ok(());
        };
        let mut b = self.lock(slot);
        if b.phase == Phase::Filling {
            self.break_block(pager, staging, block, &mut b, Why::Wait)?;
        }
        Ok(())
    }

    /// Known-zero (or free) pages `[gpa, gpa + pages * 4 KiB)`: deferred in
    /// the pager, left zero in their blocks' slots.
    pub fn defer(&self, pager: &Pager, gpa: u64, pages: u64) -> io::Result<()> {
        let end = gpa + pages * PAGE_SIZE;
        let mut a = gpa;
        while a < end {
            let block_end = ((a / BLOCK_SIZE) + 1) * BLOCK_SIZE;
            let stop = block_end.min(end);
            match (self.locate(a), &self.staging) {
                (Some((slot, block, _)), Some(staging)) => {
                    let mut b = self.lock(slot);
                    if b.phase == Phase::Filling {
                        for q in (a - block) / PAGE_SIZE..(stop - block) / PAGE_SIZE {
                            if !Block::has(&b.staged, q) {
                                Block::put(&mut b.lazy, q);
                                pager.defer(block + q * PAGE_SIZE, PAGE_SIZE)?;
                            }
                        }
                        if b.complete() && b.any_staged() {
                            self.place(pager, staging, block, &mut b)?;
                        }
                    } else {
                        pager.defer(a, stop - a)?;
                    }
                }
                _ => {
                    pager.defer(a, stop - a)?;
                }
            }
            a = stop;
        }
        Ok(())
    }

    /// A fault on a deferred (zero or free) page. A block that is all zero
    /// gets a zeroed huge page ([`LazyFault::Resolved`], the vCPU woken); a
    /// block still filling asks the source (`request`, under the block's
    /// lock), whose answer brings the rest of the block when that is cheap,
    /// so it can go in whole; otherwise the caller maps a 4 KiB zero page.
    pub fn fault_lazy(&self, pager: &Pager, gpa: u64, request: impl FnOnce()) -> io::Result<LazyFault> {
        let (Some((slot, block, _)), Some(staging)) = (self.locate(gpa), &self.staging) else {
            return Ok(LazyFault::Zero);
        };
        let mut b = self.lock(slot);
        if b.phase != Phase::Filling {
            return Ok(LazyFault::Zero);
        }
        if b.complete() && !b.any_staged() {
            let (area, i) = self.slot_of(staging, &mut b)?;
            for q in 0..PAGES {
                area.touch_zero(i, q)?;
            }
            return match pager.move_block(block, area, i) {
                Ok(()) => {
                    b.phase = Phase::Placed;
                    self.counters.zero_placed.fetch_add(1, Ordering::Relaxed);
                    Ok(LazyFault::Resolved)
                }
                Err((moved, e)) => {
                    log::debug!("post-copy: placing a zero block at {block:#x} ({moved} bytes moved): {e}");
                    let _ = area.release(i);
                    b.phase = Phase::Broken;
                    self.counters.broken.fetch_add(1, Ordering::Relaxed);
                    Ok(LazyFault::Zero)
                }
            };
        }
        if !self.finished.load(Ordering::Acquire) {
            request();
            return Ok(LazyFault::Requested);
        }
        self.break_block(pager, staging, block, &mut b, Why::Finished)?;
        Ok(LazyFault::Zero)
    }

    /// A fault on a page that is not deferred: if it is gathered, its block
    /// breaks (the page goes in now and the vCPU wakes); otherwise
    /// `request` runs (under the block's lock, so a push cannot gather the
    /// page unseen in between).
    pub fn fault_data(&self, pager: &Pager, gpa: u64, request: impl FnOnce()) -> io::Result<()> {
        let (Some((slot, block, p)), Some(staging)) = (self.locate(gpa), &self.staging) else {
            request();
            return Ok(());
        };
        let mut b = self.lock(slot);
        if b.phase == Phase::Filling && Block::has(&b.staged, p) {
            return self.break_block(pager, staging, block, &mut b, Why::Fault);
        }
        request();
        Ok(())
    }

    /// At the end of the push: places every complete block still filling
    /// and breaks the rest that hold gathered pages (pages still missing
    /// then come on demand, and go in directly).
    pub fn finish(&self, pager: &Pager) -> io::Result<()> {
        self.finished.store(true, Ordering::Release);
        let Some(staging) = &self.staging else { return Ok(()) };
        for &(first, count, base) in &self.table {
            for i in 0..count {
                let (slot, block) = (base + i, first + i * BLOCK_SIZE);
                let mut b = self.lock(slot);
                if b.phase != Phase::Filling || !b.any_staged() {
                    continue;
                }
                if b.complete() {
                    self.place(pager, staging, block, &mut b)?;
                } else {
                    self.break_block(pager, staging, block, &mut b, Why::Finish)?;
                }
            }
        }
        Ok(())
    }

    /// Whether the block at `block_gpa` should be collapsed into a huge
    /// page after the migration: it went in as 4 KiB pages.
    pub fn went_small(&self, block_gpa: u64) -> bool {
        match self.locate(block_gpa) {
            Some((slot, _, _)) => self.lock(slot).phase == Phase::Broken,
            None => true,
        }
    }

    fn break_block(&self, pager: &Pager, staging: &Slots, block: u64, b: &mut Block, why: Why) -> io::Result<()> {
        self.install_small(pager, staging, block, b, 0)?;
        b.phase = Phase::Broken;
        self.counters.broken.fetch_add(1, Ordering::Relaxed);
        self.counters.broken_why[why as usize].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Copies the gathered pages from page `from` on in as 4 KiB pages and
    /// frees the slot.
    fn install_small(&self, pager: &Pager, staging: &Slots, block: u64, b: &Block, from: u64) -> io::Result<()> {
        let Some(s) = b.slot else { return Ok(()) };
        let (area, i) = staging.get(s);
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for p in from..PAGES {
            if Block::has(&b.staged, p) {
                area.read(i, p, &mut buf)?;
                pager.install(block + p * PAGE_SIZE, &buf)?;
            }
        }
        area.release(i)
    }

    fn place(&self, pager: &Pager, staging: &Slots, block: u64, b: &mut Block) -> io::Result<()> {
        let (area, i) = self.slot_of(staging, b)?;
        for q in 0..PAGES {
            if !Block::has(&b.staged, q) {
                area.touch_zero(i, q)?;
            }
        }
        match pager.move_block(block, area, i) {
            Ok(()) => {
                b.phase = Phase::Placed;
                self.counters.placed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err((moved, e)) => {
                log::warn!("post-copy: moving block {block:#x} in failed after {moved} bytes ({e}); copying the rest");
                self.install_small(pager, staging, block, b, moved / PAGE_SIZE)?;
                b.phase = Phase::Broken;
                self.counters.broken.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}
