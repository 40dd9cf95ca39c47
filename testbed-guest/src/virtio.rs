//! A polling virtio-mmio (version 2) driver for virtio-blk with one split
//! virtqueue. Memory is identity mapped, so buffer addresses are physical.

use core::sync::atomic::{fence, Ordering};

const MAGIC: u32 = 0x7472_6976;
pub const STATUS_ACK: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// VIRTIO_BLK_F_FLUSH (feature bit 9).
const F_BLK_FLUSH: u32 = 1 << 9;

const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// Queue entries the driver uses.
pub const QSIZE: u16 = 16;

/// Register access by physical address.
pub struct Regs {
    pub base: u64,
}

impl Regs {
    pub fn r32(&self, off: u64) -> u32 {
        // SAFETY: `base` is a virtio-mmio window from the boot info, identity
        // mapped (uncached) by the page tables; MMIO reads have no memory effects.
        unsafe { core::ptr::read_volatile((self.base + off) as *const u32) }
    }
    pub fn w32(&self, off: u64, v: u32) {
        // SAFETY: as for `r32`.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u32, v) }
    }
    pub fn w8(&self, off: u64, v: u8) {
        // SAFETY: as for `r32` (deliberately odd-sized, for the garbage workload).
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u8, v) }
    }
}

pub fn wmem<T>(addr: u64, v: T) {
    // SAFETY: driver-owned RAM (queue and request pages), identity mapped.
    unsafe { core::ptr::write_volatile(addr as *mut T, v) }
}

pub fn rmem<T: Copy>(addr: u64) -> T {
    // SAFETY: as for `wmem`.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// A virtio-blk device driven by polling.
pub struct Blk {
    pub regs: Regs,
    /// Page holding the descriptor table (0x000), avail ring (0x100) and used ring (0x200).
    pub ring: u64,
    /// Page holding the request header (0x000) and status byte (0x800).
    pub req: u64,
    avail_idx: u16,
    used_idx: u16,
    pub capacity: u64,
    /// VIRTIO_BLK_F_FLUSH was negotiated (FLUSH requests are supported).
    pub flush: bool,
}

#[derive(Debug)]
pub enum BlkError {
    NotVirtio,
    NotBlock(u32),
    FeaturesRefused,
    Timeout,
    Status(u8),
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlkError::NotVirtio => write!(f, "no virtio-mmio device (bad magic or version)"),
            BlkError::NotBlock(id) => write!(f, "device id {id} is not a block device"),
            BlkError::FeaturesRefused => write!(f, "the device refused VIRTIO_F_VERSION_1"),
            BlkError::Timeout => write!(f, "the device did not complete a request"),
            BlkError::Status(s) => write!(f, "request failed with status {s}"),
        }
    }
}

impl Blk {
    /// Resets and initialises the device at `base` using two driver pages.
    pub fn init(base: u64, ring: u64, req: u64) -> Result<Self, BlkError> {
        let regs = Regs { base };
        if regs.r32(0) != MAGIC || regs.r32(4) != 2 {
            return Err(BlkError::NotVirtio);
        }
        let id = regs.r32(8);
        if id != 2 {
            return Err(BlkError::NotBlock(id));
        }
        regs.w32(0x70, 0);
        regs.w32(0x70, STATUS_ACK | STATUS_DRIVER);
        regs.w32(0x14, 0);
        // VIRTIO_BLK_F_FLUSH, if offered: the device may cache writes; we flush.
        let flush = regs.r32(0x10) & F_BLK_FLUSH != 0;
        regs.w32(0x14, 1);
        if regs.r32(0x10) & 1 == 0 {
            return Err(BlkError::FeaturesRefused);
        }
        regs.w32(0x24, 0);
        regs.w32(0x20, if flush { F_BLK_FLUSH } else { 0 });
        regs.w32(0x24, 1);
        regs.w32(0x20, 1); // VIRTIO_F_VERSION_1
        regs.w32(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if regs.r32(0x70) & STATUS_FEATURES_OK == 0 {
            return Err(BlkError::FeaturesRefused);
        }
        // SAFETY: the two pages belong to the driver.
        unsafe {
            core::ptr::write_bytes(ring as *mut u8, 0, 4096);
            core::ptr::write_bytes(req as *mut u8, 0, 4096);
        }
        regs.w32(0x30, 0);
        let max = regs.r32(0x34);
        let size = (QSIZE as u32).min(max);
        regs.w32(0x38, size);
        regs.w32(0x80, ring as u32);
        regs.w32(0x84, (ring >> 32) as u32);
        regs.w32(0x90, (ring + 0x100) as u32);
        regs.w32(0x94, ((ring + 0x100) >> 32) as u32);
        regs.w32(0xa0, (ring + 0x200) as u32);
        regs.w32(0xa4, ((ring + 0x200) >> 32) as u32);
        regs.w32(0x44, 1);
        regs.w32(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let lo = regs.r32(0x100) as u64;
        let hi = regs.r32(0x104) as u64;
        Ok(Self { regs, ring, req, avail_idx: 0, used_idx: 0, capacity: lo | hi << 32, flush })
    }

    /// Writes descriptor `i`.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.ring + i as u64 * 16;
        wmem(d, addr);
        wmem(d + 8, len);
        wmem(d + 12, flags);
        wmem(d + 14, next);
    }

    /// Makes the chain at `head` available and notifies; with `bump` the
    /// avail index is advanced by that much instead of one (garbage).
    pub fn submit(&mut self, head: u16, bump: u16) {
        let avail = self.ring + 0x100;
        wmem(avail + 4 + 2 * (self.avail_idx % QSIZE) as u64, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(bump);
        wmem(avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.regs.w32(0x50, 0);
    }

    /// Waits (bounded) for the device to use one more buffer.
    pub fn wait(&mut self) -> Result<(), BlkError> {
        self.wait_spins(10_000_000)
    }

    /// Waits for the device to use one more buffer, for at most `spins` polls.
    pub fn wait_spins(&mut self, spins: u32) -> Result<(), BlkError> {
        for _ in 0..spins {
            let idx: u16 = rmem(self.ring + 0x200 + 2);
            if idx != self.used_idx {
                self.used_idx = self.used_idx.wrapping_add(1);
                self.regs.w32(0x64, self.regs.r32(0x60));
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(BlkError::Timeout)
    }

    /// The status byte of the last request (0xff: the device did not write it).
    pub fn last_status(&self) -> u8 {
        rmem(self.req + 0x800)
    }

    /// One request: header, optional data buffer, status.
    pub fn request(&mut self, kind: u32, sector: u64, buf: u64, len: u32) -> Result<(), BlkError> {
        wmem(self.req, kind);
        wmem(self.req + 4, 0u32);
        wmem(self.req + 8, sector);
        wmem(self.req + 0x800, 0xffu8);
        let status_addr = self.req + 0x800;
        if len == 0 {
            self.desc(0, self.req, 16, F_NEXT, 1);
            self.desc(1, status_addr, 1, F_WRITE, 0);
        } else {
            let data_flags = if kind == T_OUT { F_NEXT } else { F_NEXT | F_WRITE };
            self.desc(0, self.req, 16, F_NEXT, 1);
            self.desc(1, buf, len, data_flags, 2);
            self.desc(2, status_addr, 1, F_WRITE, 0);
        }
        self.submit(0, 1);
        self.wait()?;
        match rmem::<u8>(status_addr) {
            0 => Ok(()),
            s => Err(BlkError::Status(s)),
        }
    }
}

/// One split virtqueue in a driver page laid out like [`Blk`]'s: descriptor
/// table at 0x000, avail ring at 0x100, used ring at 0x200 (room for
/// [`QSIZE`] entries each).
pub struct SplitQueue {
    pub ring: u64,
    pub size: u16,
    avail_idx: u16,
    used_idx: u16,
}

impl SplitQueue {
    /// Zeroes `ring` (a driver page), configures queue `index` of the
    /// device (before DRIVER_OK) and marks it ready. With `no_interrupt`
    /// the driver asks the device not to interrupt (it polls).
    pub fn setup(regs: &Regs, index: u32, ring: u64, no_interrupt: bool) -> Option<Self> {
        // SAFETY: the page belongs to the driver.
        unsafe { core::ptr::write_bytes(ring as *mut u8, 0, 4096) };
        regs.w32(0x30, index);
        let max = regs.r32(0x34);
        if max == 0 {
            return None;
        }
        let size = (QSIZE as u32).min(max) as u16;
        regs.w32(0x38, size as u32);
        for (off, addr) in [(0x80, ring), (0x90, ring + 0x100), (0xa0, ring + 0x200)] {
            regs.w32(off, addr as u32);
            regs.w32(off + 4, (addr >> 32) as u32);
        }
        if no_interrupt {
            wmem(ring + 0x100, 1u16); // VIRTQ_AVAIL_F_NO_INTERRUPT
        }
        regs.w32(0x44, 1);
        Some(Self { ring, size, avail_idx: 0, used_idx: 0 })
    }

    /// Writes descriptor `i`.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16) {
        let d = self.ring + (i % self.size) as u64 * 16;
        wmem(d, addr);
        wmem(d + 8, len);
        wmem(d + 12, flags);
        wmem(d + 14, 0u16);
    }

    /// Makes the chain at `head` available (the caller notifies).
    pub fn push(&mut self, head: u16) {
        let avail = self.ring + 0x100;
        wmem(avail + 4 + 2 * (self.avail_idx % self.size) as u64, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wmem(avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// The avail index the next [`push`](Self::push) uses.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// True if the device used a buffer not yet taken (one RAM read).
    pub fn has_used(&self) -> bool {
        rmem::<u16>(self.ring + 0x202) != self.used_idx
    }

    /// The next used buffer as (head, length written), if any.
    pub fn take_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = self.ring + 0x204 + (self.used_idx % self.size) as u64 * 8;
        let id: u32 = rmem(e);
        let len: u32 = rmem(e + 4);
        self.used_idx = self.used_idx.wrapping_add(1);
        Some((id as u16, len))
    }
}
