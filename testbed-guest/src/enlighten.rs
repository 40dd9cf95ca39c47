//! A polling driver for the enlightenment device (virtio ID 63, ABI in
//! `bitmap-abi`): vCPU 0 posts a few command buffers at boot and checks the
//! command queue's used index at every heartbeat. On Prepare it builds the
//! free bitmap and the priority map from what the testbed knows about its
//! own memory (fixed layout, image, stacks, driver pages, the workloads'
//! regions) and replies Ready. From Ready until Done or Abort the guest
//! *holds* its free frames, as the Linux module does: the workloads leave
//! them alone and the stats page's `HELD_FRAMES` says how many are held, so
//! a host that never releases them (a migration destination forgetting the
//! Done) is visible; Done and Abort release them and are acknowledged.

use testbed_abi::{
    BootInfo, BOOT_INFO_GPA, GDT_GPA, IMAGE_GPA, MAX_PAGE_DIRECTORIES, MMIO_HOLE_END, PAGE_SIZE, PAGE_TABLES_GPA,
    STACKS_GPA, STACK_SIZE, STATS_GPA,
};

use crate::virtio::{rmem, wmem, Regs, SplitQueue, F_WRITE, STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK};
use crate::virtio::{STATUS_FEATURES_OK, STATUS_NEEDS_RESET};
use crate::PageAlloc;

/// The device ABI, shared verbatim with the host and the Linux module.
#[allow(dead_code)]
#[path = "../../bitmap-abi/src/wire.rs"]
mod wire;

pub use wire::Class;
use wire::{Command, Extent, Kind, ReadyInfo, NUM_CLASSES};

/// Command buffers kept posted on the command queue.
const NCMD: u16 = 4;
/// Size of one command buffer.
const CMD_BUF: u64 = 256;
/// Reply buffers (used round-robin) and their size.
const NREPLY: u16 = 4;
const REPLY_BUF: u64 = 512;
/// Offset of the reply buffers in the buffer page.
const REPLY_OFF: u64 = 0x800;
/// Memory regions the driver knows about.
const MAX_REGIONS: usize = 48;

#[derive(Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    class: Class,
}

/// The driver.
pub struct Enlighten {
    regs: Regs,
    cmdq: SplitQueue,
    replyq: SplitQueue,
    bufs: u64,
    free_map: u64,
    prio_map: u64,
    frames: u64,
    ram: [(u64, u64); testbed_abi::MAX_MEM_REGIONS],
    nram: usize,
    regions: [Region; MAX_REGIONS],
    nregions: usize,
    prepared: bool,
    tsc_khz: u64,
    /// Commands handled.
    pub commands: u64,
}

impl Enlighten {
    /// Finds device 63 in the boot info and initialises it with pages from
    /// `heap`. `None` when there is no such device (QEMU) or it cannot be
    /// set up (reported on the console).
    pub fn init(bi: &BootInfo, heap: &mut PageAlloc, tsc_khz: u64) -> Option<Self> {
        let dev = bi.virtio_devices().iter().find(|d| d.device_id == wire::DEVICE_ID)?;
        match Self::setup(bi, dev.base, heap, tsc_khz) {
            Ok(e) => Some(e),
            Err(why) => {
                crate::println!("testbed: enlightenment device at {:#x}: {why}; continuing without it", dev.base);
                None
            }
        }
    }

    fn setup(bi: &BootInfo, base: u64, heap: &mut PageAlloc, tsc_khz: u64) -> Result<Self, &'static str> {
        let regs = Regs { base };
        if regs.r32(0) != 0x7472_6976 || regs.r32(4) != 2 || regs.r32(8) != wire::DEVICE_ID {
            return Err("not a virtio-mmio v2 enlightenment device");
        }
        let mut ram = [(0u64, 0u64); testbed_abi::MAX_MEM_REGIONS];
        let mut nram = 0;
        for r in bi.mem_regions() {
            ram[nram] = (r.start, r.start + r.len);
            nram += 1;
        }
        let frames = ram[..nram].iter().map(|r| r.1).max().unwrap_or(0) / PAGE_SIZE;
        let free_len = wire::free_bitmap_len(frames);
        let prio_len = wire::priority_map_len(frames);
        let (Some(ring0), Some(ring1), Some(bufs), Some(free_map), Some(prio_map)) = (
            heap.alloc(PAGE_SIZE),
            heap.alloc(PAGE_SIZE),
            heap.alloc(PAGE_SIZE),
            heap.alloc(free_len),
            heap.alloc(prio_len),
        ) else {
            return Err("not enough RAM for its pages and maps");
        };
        regs.w32(0x70, 0);
        regs.w32(0x70, STATUS_ACK | STATUS_DRIVER);
        regs.w32(0x14, 0);
        let offered = regs.r32(0x10) as u64;
        regs.w32(0x14, 1);
        let high = regs.r32(0x10);
        if high & 1 == 0 {
            return Err("VIRTIO_F_VERSION_1 not offered");
        }
        regs.w32(0x24, 0);
        regs.w32(0x20, (offered & (wire::F_PRIORITY | wire::F_FREE)) as u32);
        regs.w32(0x24, 1);
        regs.w32(0x20, 1);
        regs.w32(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if regs.r32(0x70) & STATUS_FEATURES_OK == 0 {
            return Err("features refused");
        }
        let cmdq = SplitQueue::setup(&regs, wire::CMD_QUEUE as u32, ring0, true).ok_or("no command queue")?;
        let replyq = SplitQueue::setup(&regs, wire::REPLY_QUEUE as u32, ring1, true).ok_or("no reply queue")?;
        regs.w32(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        if regs.r32(0x70) & STATUS_NEEDS_RESET != 0 {
            return Err("the device needs a reset");
        }
        let mut e = Self {
            regs,
            cmdq,
            replyq,
            bufs,
            free_map,
            prio_map,
            frames,
            ram,
            nram,
            regions: [Region { start: 0, end: 0, class: Class::Other }; MAX_REGIONS],
            nregions: 0,
            prepared: false,
            tsc_khz,
            commands: 0,
        };
        // The fixed layout.
        let top = e.ram[..nram].iter().map(|r| r.1).max().unwrap_or(0).max(MMIO_HOLE_END);
        let dirs = top.div_ceil(1 << 30).min(MAX_PAGE_DIRECTORIES);
        e.note(GDT_GPA, PAGE_SIZE, Class::KernelAllocated);
        e.note(BOOT_INFO_GPA, PAGE_SIZE, Class::KernelAllocated);
        e.note(STATS_GPA, PAGE_SIZE, Class::MemoryIo);
        e.note(PAGE_TABLES_GPA, (2 + dirs) * PAGE_SIZE, Class::KernelAllocated);
        e.note(STACKS_GPA, bi.vcpus as u64 * STACK_SIZE, Class::KernelAllocated);
        e.note(IMAGE_GPA, crate::boot32::image_end().saturating_sub(IMAGE_GPA), Class::Kernel);
        e.note(ring0, PAGE_SIZE, Class::MemoryIo);
        e.note(ring1, PAGE_SIZE, Class::MemoryIo);
        e.note(bufs, PAGE_SIZE, Class::MemoryIo);
        e.note(free_map, free_len, Class::KernelAllocated);
        e.note(prio_map, prio_len, Class::KernelAllocated);
        // SAFETY: the buffer page belongs to the driver.
        unsafe { core::ptr::write_bytes(bufs as *mut u8, 0, PAGE_SIZE as usize) };
        for i in 0..NCMD.min(e.cmdq.size) {
            e.cmdq.desc(i, bufs + i as u64 * CMD_BUF, CMD_BUF as u32, F_WRITE);
            e.cmdq.push(i);
        }
        e.regs.w32(0x50, wire::CMD_QUEUE as u32);
        crate::println!(
            "testbed: enlightenment device at {base:#x}: {frames} frames, maps at {free_map:#x}/{prio_map:#x}"
        );
        Ok(e)
    }

    /// Records that `[start, start + len)` holds memory of `class` (the
    /// highest priority wins where regions overlap).
    pub fn note(&mut self, start: u64, len: u64, class: Class) {
        if len == 0 || self.nregions == MAX_REGIONS {
            return;
        }
        self.regions[self.nregions] = Region { start, end: start + len, class };
        self.nregions += 1;
    }

    /// Handles the commands the host delivered since the last call: cheap
    /// (one RAM read) when there are none.
    pub fn poll(&mut self) {
        if !self.cmdq.has_used() {
            return;
        }
        for _ in 0..self.cmdq.size {
            let Some((head, len)) = self.cmdq.take_used() else { break };
            let head = head % NCMD;
            let addr = self.bufs + head as u64 * CMD_BUF;
            let mut msg = [0u8; CMD_BUF as usize];
            let n = (len as usize).min(msg.len());
            for (i, b) in msg[..n].iter_mut().enumerate() {
                *b = rmem(addr + i as u64);
            }
            self.handle(&msg[..n]);
            self.commands += 1;
            // Repost the buffer.
            self.cmdq.desc(head, addr, CMD_BUF as u32, F_WRITE);
            self.cmdq.push(head);
        }
        self.regs.w32(0x50, wire::CMD_QUEUE as u32);
        self.regs.w32(0x64, self.regs.r32(0x60));
    }

    fn handle(&mut self, msg: &[u8]) {
        let mut out = [0u8; REPLY_BUF as usize];
        let n = match Command::decode(msg) {
            Ok(Command::Prepare(p)) => {
                self.prepared = true;
                match self.prepare(p.seq, &mut out) {
                    Ok(n) => Ok(n),
                    Err(_) => wire::encode_error(p.seq, wire::error_code::NO_MEMORY, &mut out),
                }
            }
            Ok(Command::Done { seq }) if !self.prepared => {
                wire::encode_error(seq, wire::error_code::BAD_STATE, &mut out)
            }
            Ok(Command::Done { seq } | Command::Abort { seq }) => {
                self.prepared = false;
                crate::hw::stat64(testbed_abi::stats_off::HELD_FRAMES, 0);
                wire::encode_simple(Kind::Ack, seq, &mut out)
            }
            Err(_) => {
                // Echo the sequence number if at least the header is readable.
                let seq = msg.get(8..12).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
                wire::encode_error(seq, wire::error_code::BAD_COMMAND, &mut out)
            }
        };
        match n {
            Ok(n) => self.reply(&out[..n]),
            Err(e) => crate::println!("testbed: enlighten: cannot encode a reply: {e}"),
        }
    }

    /// Posts one reply on the reply queue (processed by the device during
    /// the notify).
    fn reply(&mut self, msg: &[u8]) {
        while self.replyq.take_used().is_some() {}
        let slot = self.replyq.avail_idx() % NREPLY;
        let addr = self.bufs + REPLY_OFF + slot as u64 * REPLY_BUF;
        for (i, b) in msg.iter().enumerate() {
            wmem(addr + i as u64, *b);
        }
        self.replyq.desc(slot, addr, msg.len() as u32, 0);
        self.replyq.push(slot);
        self.regs.w32(0x50, wire::REPLY_QUEUE as u32);
        for _ in 0..1000 {
            if self.replyq.take_used().is_some() {
                break;
            }
            core::hint::spin_loop();
        }
    }

    fn us(&self, ticks: u64) -> u64 {
        (ticks as u128 * 1000 / self.tsc_khz.max(1) as u128) as u64
    }

    /// Builds both maps and encodes the Ready reply.
    fn prepare(&mut self, seq: u32, out: &mut [u8]) -> Result<usize, wire::WireError> {
        let frames = self.frames;
        let free_len = wire::free_bitmap_len(frames);
        let prio_len = wire::priority_map_len(frames);
        let t0 = crate::hw::rdtsc();
        // SAFETY: both maps are driver-owned RAM allocated at init with
        // exactly these sizes; nothing else refers to them.
        let (prio, free) = unsafe {
            (
                core::slice::from_raw_parts_mut(self.prio_map as *mut u8, prio_len as usize),
                core::slice::from_raw_parts_mut(self.free_map as *mut u8, free_len as usize),
            )
        };
        // Classify: not RAM = Other, RAM = Free, then the known regions.
        let pair = |c: Class| c as u8 | (c as u8) << 4;
        prio.fill(pair(Class::Other));
        for &(s, e) in &self.ram[..self.nram] {
            fill_class(prio, s.div_ceil(PAGE_SIZE), (e / PAGE_SIZE).min(frames), pair(Class::Free))?;
        }
        for r in &self.regions[..self.nregions] {
            let end = r.end.div_ceil(PAGE_SIZE).min(frames);
            for pfn in r.start / PAGE_SIZE..end {
                wire::raise_class(prio, pfn, r.class)?;
            }
        }
        let t1 = crate::hw::rdtsc();
        // Sweep: the free frames, and the class counts.
        let mut counts = [0u64; NUM_CLASSES];
        for (i, byte) in free.iter_mut().enumerate() {
            let mut bits = 0u8;
            let first = i as u64 * 8;
            for k in 0..8u64.min(frames - first) {
                let c = wire::class_of(prio, first + k)?;
                counts[c as usize] += 1;
                if c == Class::Free {
                    bits |= 1 << k;
                }
            }
            *byte = bits;
        }
        let t2 = crate::hw::rdtsc();
        // From the Ready on, the free frames are held until Done/Abort.
        crate::hw::stat64(testbed_abi::stats_off::HELD_FRAMES, counts[Class::Free as usize]);
        let info = ReadyInfo {
            seq,
            frames,
            sweep_us: self.us(t2 - t1),
            classify_us: self.us(t1 - t0),
            class_counts: counts,
            free_extents: 1,
            prio_extents: 1,
        };
        info.encode(
            &[Extent { gpa: self.free_map, len: free_len }],
            &[Extent { gpa: self.prio_map, len: prio_len }],
            out,
        )
    }
}

/// Sets frames `first..end` to the class pair `pair` (both nibbles), whole
/// bytes where possible.
fn fill_class(map: &mut [u8], first: u64, end: u64, pair: u8) -> Result<(), wire::WireError> {
    let class = Class::from_u8(pair & 0xf).ok_or(wire::WireError::BadClass(pair & 0xf))?;
    let mut pfn = first;
    while pfn < end && pfn % 2 != 0 {
        wire::set_class(map, pfn, class)?;
        pfn += 1;
    }
    let whole_end = end - end % 2;
    if whole_end > pfn {
        map.get_mut((pfn / 2) as usize..(whole_end / 2) as usize).ok_or(wire::WireError::OutOfRange)?.fill(pair);
        pfn = whole_end;
    }
    while pfn < end {
        wire::set_class(map, pfn, class)?;
        pfn += 1;
    }
    Ok(())
}
