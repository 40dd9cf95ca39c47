// SPDX-License-Identifier: GPL-2.0-only

//! `enlighten`: the project's guest kernel module.
//!
//! A virtio driver (device ID [`wire::DEVICE_ID`], transport-agnostic: it
//! binds over virtio-mmio in our VMM and virtio-pci in QEMU) for the
//! enlightenment device. On the host's *Prepare* it
//! 1. **sweeps** the buddy allocator: takes free blocks out of it, highest
//!    order first, with no reclaim at all (`__GFP_NOWARN | __GFP_NORETRY |
//!    __GFP_NOMEMALLOC`, like virtio-balloon's free page hinting), stopping
//!    at a margin above each zone's high watermark, and marks them in the
//!    **free bitmap**. The pages stay allocated (held) until *Done*, *Abort*,
//!    device removal or module unload, so they are free for certain while the
//!    host uses the map. The free bitmap is itself the record of the held
//!    pages (each block is split into order-0 pages), and it lives in kernel
//!    memory that is migrated, so a guest resumed elsewhere can still give
//!    them back. A shrinker gives held pages back (and clears their bits)
//!    while the maps are being built if the guest comes under memory
//!    pressure, and before replying the module tops the reserve up again if
//!    allocations racing with it ate into it (a partial map); if it had to
//!    give back more than it kept, it replies `BACKED_OFF` and releases
//!    everything.
//! 2. **classifies** every frame into the **priority map** from the kernel's
//!    own bookkeeping: kernel image (reserved part) -> Kernel; slab, reserved and other
//!    allocated kernel pages -> Kernel_Allocated; page tables -> Page_Table;
//!    LRU file pages -> File_Active / File_Inactive; frames mapped by a
//!    process with a thread that ran within the active window -> User_Code
//!    (executable VMA) or User_Data; holes -> Memory_IO; anything else
//!    -> Other; held frames -> Free. The highest class wins.
//! 3. replies *Ready* with the guest-physical extents of both maps
//!    (vmalloc'd, so possibly several extents each).
//!
//! Timings, counts and both maps are in debugfs (`/sys/kernel/debug/enlighten/`).
//! All `unsafe` is at the FFI edge (kernel bindings) with `SAFETY` comments.

use kernel::ffi::{c_int, c_uint, c_ulong, c_void};
use core::ptr;
use kernel::bindings;
use kernel::prelude::*;

/// The guest/host wire format, shared verbatim with the host (`bitmap-abi`).
///
/// The kernel's Rust flags warn about two things in it, both expected for a
/// shared file: `unreachable_pub` (its items are `pub` for the host crate but
/// the module is private here) and `dead_code` (not every item is used here).
#[allow(dead_code, unreachable_pub)]
#[path = "../../bitmap-abi/src/wire.rs"]
mod wire;

use wire::{Class, Command, Extent, ReadyInfo, NUM_CLASSES};

module! {
    type: Enlighten,
    name: "enlighten",
    author: "vmm project",
    description: "Enlightened post-copy: free and priority bitmaps for the host over a virtio device",
    license: "GPL",
}

/// Command buffers kept posted on the command queue.
const NCMD: usize = 4;
/// Size of each command buffer (every valid command is much shorter).
const CMD_BUF: usize = 256;
/// Reply buffers (one reply per command; reclaimed when the host is done).
const NREPLY: usize = 4;
/// Size of each reply buffer: a Ready with up to ~1000 extents.
const REPLY_BUF: usize = 16384;

/// Bits of `enl_page_info` (mirrors `rust/helpers/enlighten.c` in the kernel
/// patch `guest-image/patches/`).
mod pi {
    pub(crate) const INVALID: u32 = 1 << 0;
    pub(crate) const BUDDY: u32 = 1 << 1;
    pub(crate) const RESERVED: u32 = 1 << 2;
    pub(crate) const TABLE: u32 = 1 << 3;
    pub(crate) const SLAB: u32 = 1 << 4;
    pub(crate) const LRU: u32 = 1 << 5;
    pub(crate) const ACTIVE: u32 = 1 << 6;
    pub(crate) const SWAPBACKED: u32 = 1 << 8;
    pub(crate) const REFCOUNT: u32 = 1 << 10;
    pub(crate) const OFFLINE: u32 = 1 << 12;
    pub(crate) const ORDER_SHIFT: u32 = 24;
}

/// Statistics and debugfs-visible state (one instance, address stable).
#[repr(C)]
struct Stats {
    prepares: u64,
    readies: u64,
    dones: u64,
    aborts: u64,
    errors: u64,
    rejected: u64,
    backoffs: u64,
    pressure_released: u64,
    frames: u64,
    held_pages: u64,
    sweep_us: u64,
    classify_us: u64,
    prepare_us: u64,
    release_us: u64,
    active_processes: u64,
    idle_processes: u64,
    map_extents: u64,
    /// 1 from Ready until the held frames are given back (Done, Abort,
    /// removal): the time a migrating VM is suspended.
    holding: u64,
    class_counts: [u64; NUM_CLASSES],
    free_blob: bindings::debugfs_blob_wrapper,
    prio_blob: bindings::debugfs_blob_wrapper,
}

/// The maps of one Prepare (vmalloc'd: kernel memory, migrated with the VM).
struct Maps {
    frames: u64,
    free: *mut u8,
    free_len: usize,
    prio: *mut u8,
    prio_len: usize,
}

impl Maps {
    fn alloc(frames: u64) -> Option<Maps> {
        let free_len = usize::try_from(wire::free_bitmap_len(frames)).ok()?;
        let prio_len = usize::try_from(wire::priority_map_len(frames)).ok()?;
        // SAFETY: vzalloc of a non-zero size; the result is checked.
        let free = unsafe { bindings::enl_vzalloc(free_len as c_ulong) }.cast::<u8>();
        // SAFETY: as above.
        let prio = unsafe { bindings::enl_vzalloc(prio_len as c_ulong) }.cast::<u8>();
        let m = Maps { frames, free, free_len, prio, prio_len };
        if free.is_null() || prio.is_null() {
            drop(m);
            return None;
        }
        Some(m)
    }

    fn free_map(&mut self) -> &mut [u8] {
        // SAFETY: `free` is our vmalloc'd buffer of `free_len` bytes, alive
        // as long as `self`; the caller holds `&mut self`.
        unsafe { core::slice::from_raw_parts_mut(self.free, self.free_len) }
    }

    fn prio_map(&mut self) -> &mut [u8] {
        // SAFETY: as for `free_map`.
        unsafe { core::slice::from_raw_parts_mut(self.prio, self.prio_len) }
    }

    /// Guest-physical extents of a vmalloc'd buffer (physically contiguous
    /// pages merged).
    fn extents(buf: *mut u8, len: usize, out: &mut KVec<Extent>) -> Result {
        let page = wire::PAGE_SIZE as usize;
        let mut off = 0usize;
        while off < len {
            // SAFETY: `buf + off` lies inside our vmalloc'd buffer.
            let pfn = unsafe { bindings::vmalloc_to_pfn(buf.add(off).cast::<c_void>()) } as u64;
            let n = (len - off).min(page) as u64;
            let gpa = pfn * wire::PAGE_SIZE;
            match out.last_mut() {
                Some(e) if e.gpa + e.len == gpa => e.len += n,
                _ => out.push(Extent { gpa, len: n }, GFP_KERNEL)?,
            }
            off += page;
        }
        Ok(())
    }
}

impl Drop for Maps {
    fn drop(&mut self) {
        // SAFETY: both are null or our vmalloc'd buffers, freed once.
        unsafe {
            bindings::vfree(self.free.cast::<c_void>());
            bindings::vfree(self.prio.cast::<c_void>());
        }
    }
}

/// One bound device. `work` must stay the first field: the work function
/// gets a pointer to it and casts it back.
#[repr(C)]
struct Dev {
    work: bindings::work_struct,
    /// What the shrinker shares (a separate allocation, only under its lock).
    held: *mut Held,
    vdev: *mut bindings::virtio_device,
    cmd_vq: *mut bindings::virtqueue,
    reply_vq: *mut bindings::virtqueue,
    cmd_bufs: KVec<KVec<u8>>,
    reply_bufs: KVec<KVec<u8>>,
    reply_busy: [bool; NREPLY],
    shrinker: *mut bindings::shrinker,
    stats: *mut Stats,
    maps: Option<Maps>,
    /// Sequence number of the Prepare whose maps are current (frames held).
    ready_seq: Option<u32>,
    removing: bool,
}

/// The part of a device the shrinker (any reclaiming thread) shares with the
/// work item. Its own allocation: neither side ever holds a reference to
/// the other's data; `state` is only touched with `lock` held (see
/// [`with_held`]).
#[repr(C)]
struct Held {
    lock: bindings::spinlock_t,
    state: HeldState,
}

struct HeldState {
    /// The current free bitmap (the vmalloc'd buffer of `Dev::maps`), or
    /// null; `free_len` bytes covering `frames` frames.
    free: *mut u8,
    free_len: usize,
    frames: u64,
    /// The maps are being built: the shrinker may give held pages back.
    sweeping: bool,
    held: u64,
    released_under_pressure: u64,
    /// Where give_back looks for held pages next (byte index).
    cursor: usize,
    /// Pages the sweep leaves free above each zone's high watermark.
    margin: i64,
}

/// Runs `f` on the shared state with its lock held.
fn with_held<R>(h: *mut Held, f: impl FnOnce(&mut HeldState) -> R) -> R {
    // SAFETY: `h` is a live Held (freed only after the shrinker and the work
    // item are gone); its lock was initialised at probe.
    unsafe { bindings::spin_lock(ptr::addr_of_mut!((*h).lock)) };
    // SAFETY: every access to `state` happens here, under the lock, so this
    // is the only reference to it.
    let r = f(unsafe { &mut *ptr::addr_of_mut!((*h).state) });
    // SAFETY: we hold the lock.
    unsafe { bindings::spin_unlock(ptr::addr_of_mut!((*h).lock)) };
    r
}

fn now_ns() -> u64 {
    // SAFETY: reads a clock.
    unsafe { bindings::enl_clock_ns() }
}

fn cond_resched() {
    // SAFETY: called from process context (work item) without locks held.
    unsafe { bindings::enl_cond_resched() }
}

impl Dev {
    fn stats(&mut self) -> &mut Stats {
        // SAFETY: `stats` points to the module's Stats, which outlives every
        // device (devices are removed before the module frees it).
        unsafe { &mut *self.stats }
    }

    /// Posts command buffer `i` on the command queue.
    fn post_cmd(&mut self, i: usize) -> Result {
        let vq = self.cmd_vq;
        let buf = self.cmd_bufs[i].as_mut_ptr();
        let mut sg = core::mem::MaybeUninit::<bindings::scatterlist>::zeroed();
        // SAFETY: `buf` is a kmalloc'd buffer of CMD_BUF bytes owned by the
        // device until it is detached; sg is initialised by sg_init_one.
        let r = unsafe {
            bindings::sg_init_one(sg.as_mut_ptr(), buf.cast::<c_void>(), CMD_BUF as c_uint);
            bindings::virtqueue_add_inbuf(vq, sg.as_mut_ptr(), 1, (i + 1) as *mut c_void, bindings::GFP_KERNEL)
        };
        if r < 0 {
            return Err(Error::from_errno(r));
        }
        Ok(())
    }

    /// Takes back reply buffers the host has consumed.
    fn reclaim_replies(&mut self) {
        loop {
            let mut len: c_uint = 0;
            // SAFETY: reply_vq is live; only the work item (or remove after
            // reset) uses it.
            let tok = unsafe { bindings::virtqueue_get_buf(self.reply_vq, &mut len) } as usize;
            if tok == 0 {
                break;
            }
            if (1..=NREPLY).contains(&tok) {
                self.reply_busy[tok - 1] = false;
            }
        }
    }

    /// Sends a reply: `fill` encodes it into a free reply buffer.
    fn reply(&mut self, fill: impl FnOnce(&mut [u8]) -> core::result::Result<usize, wire::WireError>) {
        self.reclaim_replies();
        let Some(i) = self.reply_busy.iter().position(|b| !b) else {
            pr_warn!("no free reply buffer; reply dropped\n");
            return;
        };
        let vq = self.reply_vq;
        let buf = &mut self.reply_bufs[i];
        let n = match fill(&mut buf[..]) {
            Ok(n) => n,
            Err(e) => {
                pr_err!("encoding a reply failed: {}\n", e);
                return;
            }
        };
        let mut sg = core::mem::MaybeUninit::<bindings::scatterlist>::zeroed();
        // SAFETY: `buf` is kmalloc'd and stays untouched until the host
        // returns it (reply_busy); n <= REPLY_BUF.
        let r = unsafe {
            bindings::sg_init_one(sg.as_mut_ptr(), buf.as_ptr().cast::<c_void>(), n as c_uint);
            let r = bindings::virtqueue_add_outbuf(
                vq,
                sg.as_mut_ptr(),
                1,
                (i + 1) as *mut c_void,
                bindings::GFP_KERNEL,
            );
            if r == 0 {
                bindings::virtqueue_kick(vq);
            }
            r
        };
        if r == 0 {
            self.reply_busy[i] = true;
        } else {
            pr_err!("posting a reply failed: {}\n", r);
        }
    }

    fn reply_error(&mut self, seq: u32, code: u32) {
        self.stats().errors += 1;
        self.reply(|b| wire::encode_error(seq, code, b));
    }

    /// The work item: handles every command the host has delivered.
    fn run(&mut self) {
        self.reclaim_replies();
        loop {
            let mut len: c_uint = 0;
            // SAFETY: cmd_vq is live; only this work item uses it.
            let tok = unsafe { bindings::virtqueue_get_buf(self.cmd_vq, &mut len) } as usize;
            if tok == 0 || !(1..=NCMD).contains(&tok) {
                break;
            }
            let i = tok - 1;
            let n = (len as usize).min(CMD_BUF);
            let mut msg = [0u8; CMD_BUF];
            msg[..n].copy_from_slice(&self.cmd_bufs[i][..n]);
            if let Err(e) = self.post_cmd(i) {
                pr_err!("re-posting command buffer {} failed: {:?}\n", i, e);
            } else {
                // SAFETY: cmd_vq is live.
                unsafe { bindings::virtqueue_kick(self.cmd_vq) };
            }
            if !self.removing {
                self.handle(&msg[..n]);
            }
        }
    }

    fn handle(&mut self, msg: &[u8]) {
        let cmd = match Command::decode(msg) {
            Ok(c) => c,
            Err(e) => {
                // Reply to the sequence number if the header is readable.
                let seq = if msg.len() >= 12 { u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]) } else { 0 };
                pr_warn!("rejected a {}-byte command (seq {}): {}\n", msg.len(), seq, e);
                self.stats().rejected += 1;
                self.reply_error(seq, wire::error_code::BAD_COMMAND);
                return;
            }
        };
        match cmd {
            Command::Prepare(p) => {
                if self.ready_seq.is_some() {
                    pr_warn!("Prepare {} while holding the maps of {:?}: rejected\n", p.seq, self.ready_seq);
                    self.stats().rejected += 1;
                    self.reply_error(p.seq, wire::error_code::BAD_STATE);
                    return;
                }
                self.stats().prepares += 1;
                self.prepare(p.seq, p.active_window_ms);
            }
            Command::Done { seq } | Command::Abort { seq } => {
                let done = matches!(cmd, Command::Done { .. });
                if done && self.ready_seq.is_none() {
                    pr_warn!("Done {} without Prepare: rejected\n", seq);
                    self.stats().rejected += 1;
                    self.reply_error(seq, wire::error_code::BAD_STATE);
                    return;
                }
                let t0 = now_ns();
                self.release_all();
                let st = self.stats();
                st.release_us = (now_ns() - t0) / 1000;
                if done {
                    st.dones += 1;
                } else {
                    st.aborts += 1;
                }
                self.reply(|b| wire::encode_simple(wire::Kind::Ack, seq, b));
            }
        }
    }

    /// Gives every held page back and frees the maps.
    fn release_all(&mut self) {
        with_held(self.held, |h| {
            h.sweeping = false;
            h.held = 0;
            h.free = ptr::null_mut();
            h.free_len = 0;
        });
        self.ready_seq = None;
        let maps = self.maps.take();
        {
            let st = self.stats();
            st.held_pages = 0;
            st.holding = 0;
            st.free_blob.size = 0;
            st.prio_blob.size = 0;
            st.free_blob.data = ptr::null_mut();
            st.prio_blob.data = ptr::null_mut();
        }
        let Some(mut maps) = maps else { return };
        let frames = maps.frames;
        let map = maps.free_map();
        let mut freed = 0u64;
        for (i, byte) in map.iter_mut().enumerate() {
            if *byte == 0 {
                continue;
            }
            for bit in 0..8u64 {
                let pfn = i as u64 * 8 + bit;
                if *byte & (1 << bit) != 0 && pfn < frames {
                    // SAFETY: the bit is set only for a page we allocated
                    // (order 0 after split_page) and still hold.
                    unsafe { bindings::__free_pages(bindings::enl_pfn_to_page(pfn as c_ulong), 0) };
                    freed += 1;
                }
            }
            *byte = 0;
            if freed % 8192 == 0 {
                cond_resched();
            }
        }
        drop(maps);
        // SAFETY: process context; moves the freed pages out of the per-CPU
        // lists so they show in MemFree at once.
        unsafe { bindings::enl_drain_pages() };
    }

    /// Takes free pages out of the buddy allocator into the free bitmap.
    fn sweep(&mut self) {
        // SAFETY: reads a counter.
        let total = unsafe { bindings::enl_totalram_pages() } as i64;
        // Leave 1/64 of RAM (at least 8 MiB, at most 128 MiB) above each
        // zone's high watermark, so allocations racing with the sweep (and,
        // in a guest that keeps running after Ready, until Done) find memory
        // without reclaim.
        let margin = (total / 64).clamp(2048, 32768);
        with_held(self.held, |h| h.margin = margin);
        let mut n = 0u64;
        // Zone by zone: the allocator prefers the highest zone and falls
        // back to lower ones only below their low watermark, which the
        // margin keeps us from reaching; so sweep ZONE_NORMAL (and whatever
        // an unrestricted allocation gets) first, then ZONE_DMA32 alone.
        let dma32 = 1u32 << bindings::___GFP_DMA32_BIT;
        for gfp in [bindings::ENL_GFP_SWEEP, bindings::ENL_GFP_SWEEP | dma32] {
            if self.sweep_zone(gfp, margin, &mut n) {
                return;
            }
        }
    }

    /// One sweep pass with allocation flags `gfp`; true if it stopped for
    /// memory pressure.
    fn sweep_zone(&mut self, gfp: bindings::gfp_t, margin: i64, n: &mut u64) -> bool {
        let held = self.held;
        for order in (0..=bindings::ENL_MAX_PAGE_ORDER).rev() {
            loop {
                if with_held(held, |h| h.released_under_pressure) > 0 {
                    // The shrinker ran: the guest needs memory. Stop.
                    return true;
                }
                // SAFETY: allocation without reclaim; the result is checked.
                let page = unsafe { bindings::alloc_pages(gfp, order) };
                if page.is_null() {
                    break;
                }
                // SAFETY: `page` is ours.
                let room = unsafe { bindings::enl_zone_room(page) } as i64;
                if room < margin {
                    // SAFETY: give the block back as allocated.
                    unsafe { bindings::__free_pages(page, order) };
                    break;
                }
                // SAFETY: a non-compound block of this order that we own;
                // afterwards each page is an order-0 page with its own
                // reference, freed one by one on release.
                let pfn = unsafe {
                    bindings::split_page(page, order);
                    bindings::enl_page_to_pfn(page)
                } as u64;
                let count = 1u64 << order;
                with_held(held, |h| {
                    let frames = h.frames;
                    let map = h.free_map();
                    for p in pfn..pfn + count {
                        if p < frames {
                            let _ = wire::set_free_bit(map, p, true);
                        }
                    }
                    h.held += count;
                });
                *n += 1;
                if *n % 32 == 0 {
                    cond_resched();
                }
            }
        }
        false
    }

    /// Builds the priority map (without the Free class).
    fn classify(&mut self, window_ms: u32) -> Result {
        let (mut ts, mut te, mut ie): (c_ulong, c_ulong, c_ulong) = (0, 0, 0);
        // SAFETY: writes three integers.
        unsafe { bindings::enl_kernel_image(&mut ts, &mut te, &mut ie) };
        let _ = te;
        let (ts, ie) = (ts as u64, ie as u64);
        let maps = self.maps.as_mut().ok_or(EINVAL)?;
        let frames = maps.frames;
        let prio = maps.prio_map();
        let mut pfn = 0u64;
        while pfn < frames {
            // SAFETY: any pfn may be asked about; invalid ones are reported.
            let info = unsafe { bindings::enl_page_info(pfn as c_ulong) };
            if info & pi::BUDDY != 0 {
                let order = (info >> pi::ORDER_SHIFT) & 0x3f;
                let end = (pfn + (1u64 << order.min(20))).min(frames);
                for p in pfn..end {
                    let _ = wire::set_class(prio, p, Class::Other);
                }
                pfn = end;
                continue;
            }
            let class = if info & pi::INVALID != 0 {
                Class::MemoryIo
            } else if pfn >= ts && pfn < ie && info & pi::RESERVED != 0 {
                // The kernel image (still reserved: the parts the kernel
                // freed after boot, init and alignment gaps, are ordinary
                // memory now).
                Class::Kernel
            } else if info & pi::SLAB != 0 {
                Class::KernelAllocated
            } else if info & pi::TABLE != 0 {
                Class::PageTable
            } else if info & pi::RESERVED != 0 {
                Class::KernelAllocated
            } else if info & pi::OFFLINE != 0 {
                Class::Other
            } else if info & pi::LRU != 0 {
                if info & pi::SWAPBACKED != 0 {
                    // Anonymous or shmem: user memory of no active process.
                    Class::Other
                } else if info & pi::ACTIVE != 0 {
                    Class::FileActive
                } else {
                    Class::FileInactive
                }
            } else if info & pi::REFCOUNT != 0 {
                Class::KernelAllocated
            } else {
                Class::Other
            };
            let _ = wire::set_class(prio, pfn, class);
            pfn += 1;
            if pfn % 4096 == 0 {
                cond_resched();
            }
        }
        self.classify_processes(window_ms)
    }

    /// Raises the frames mapped by active processes to User_Code/User_Data.
    fn classify_processes(&mut self, window_ms: u32) -> Result {
        let window_ns = u64::from(window_ms) * 1_000_000;
        let mut mms: KVec<*mut bindings::mm_struct> = KVec::with_capacity(1024, GFP_KERNEL)?;
        let (mut active, mut idle) = (0u64, 0u64);
        let now = now_ns();
        // SAFETY: the process list is walked under RCU; get_task_mm takes a
        // reference we drop with mmput below. No sleeping inside.
        unsafe {
            bindings::enl_rcu_read_lock();
            let mut p = bindings::enl_next_process(ptr::null_mut());
            while !p.is_null() {
                let mut pid: c_int = 0;
                let last = bindings::enl_process_last_ran(p, &mut pid);
                if now.saturating_sub(last) <= window_ns {
                    let mm = bindings::get_task_mm(p);
                    if !mm.is_null() {
                        if mms.push(mm, GFP_NOWAIT).is_err() {
                            bindings::mmput(mm);
                        } else {
                            active += 1;
                        }
                    }
                } else {
                    idle += 1;
                }
                p = bindings::enl_next_process(p);
            }
            bindings::enl_rcu_read_unlock();
        }
        let st = self.stats();
        st.active_processes = active;
        st.idle_processes = idle;
        let maps = self.maps.as_mut().ok_or(EINVAL)?;
        let frames = maps.frames;
        let mut ctx = WalkCtx { prio: maps.prio_map(), frames, class: Class::UserData };
        for &mm in mms.iter() {
            // SAFETY: we hold a reference on `mm` (get_task_mm); the VMA
            // tree is walked under its mmap read lock; the callback only
            // gets `ctx`, which outlives the walk.
            unsafe {
                bindings::enl_mmap_read_lock(mm);
                let mut vma = bindings::find_vma(mm, 0);
                while !vma.is_null() {
                    let (mut start, mut end, mut flags): (c_ulong, c_ulong, c_ulong) = (0, 0, 0);
                    bindings::enl_vma_info(vma, &mut start, &mut end, &mut flags);
                    if flags & (bindings::VM_IO | bindings::VM_PFNMAP) as c_ulong == 0 {
                        ctx.class = if flags & bindings::VM_EXEC as c_ulong != 0 {
                            Class::UserCode
                        } else {
                            Class::UserData
                        };
                        bindings::enl_walk_range(mm, start, end, Some(on_pfn), ptr::addr_of_mut!(ctx).cast::<c_void>());
                    }
                    vma = bindings::find_vma(mm, end);
                }
                bindings::enl_mmap_read_unlock(mm);
                bindings::mmput(mm);
            }
            cond_resched();
        }
        Ok(())
    }

    fn prepare(&mut self, seq: u32, window_ms: u32) {
        let t0 = now_ns();
        // SAFETY: reads a variable.
        let frames = (unsafe { bindings::enl_max_pfn() } as u64).min(wire::MAX_FRAMES);
        let Some(maps) = Maps::alloc(frames) else {
            self.reply_error(seq, wire::error_code::NO_MEMORY);
            return;
        };
        let mut free_ext = KVec::new();
        let mut prio_ext = KVec::new();
        if Maps::extents(maps.free, maps.free_len, &mut free_ext).is_err()
            || Maps::extents(maps.prio, maps.prio_len, &mut prio_ext).is_err()
            || free_ext.len() + prio_ext.len() > wire::MAX_EXTENTS
            || wire::Header::LEN + wire::READY_FIXED + 16 * (free_ext.len() + prio_ext.len()) > REPLY_BUF
        {
            self.reply_error(seq, wire::error_code::NO_MEMORY);
            return;
        }
        let (free, free_len) = (maps.free, maps.free_len);
        self.maps = Some(maps);
        with_held(self.held, |h| {
            h.free = free;
            h.free_len = free_len;
            h.frames = frames;
            h.held = 0;
            h.released_under_pressure = 0;
            h.cursor = 0;
            h.sweeping = true;
        });
        self.sweep();
        let t1 = now_ns();
        let classified = self.classify(window_ms);
        let t2 = now_ns();
        // Freeze: from here on the shrinker leaves the held pages alone.
        // First top the reserve up again if allocations that raced with
        // the sweep and the classification ate into it (back off without
        // waiting for reclaim): the guest keeps its reserve while it holds.
        let (held, released) = with_held(self.held, |h| {
            if let Some(room) = h.reserve_room() {
                if room < h.margin / 2 {
                    h.give_back((h.margin - room) as u64);
                }
            }
            h.sweeping = false;
            (h.held, h.released_under_pressure)
        });
        if classified.is_err() || released > held {
            pr_warn!(
                "Prepare {}: backing off (gave back {} pages under memory pressure, {} still held)\n",
                seq,
                released,
                held
            );
            self.stats().backoffs += 1;
            self.release_all();
            self.reply_error(seq, wire::error_code::BACKED_OFF);
            return;
        }
        if released > 0 {
            self.stats().backoffs += 1;
        }
        // Final pass: held frames are Free; count the classes.
        let mut counts = [0u64; NUM_CLASSES];
        let Some(maps) = self.maps.as_mut() else { return };
        for pfn in 0..frames {
            let free = wire::free_bit(maps.free_map(), pfn).unwrap_or(false);
            let prio = maps.prio_map();
            let c = if free {
                let _ = wire::set_class(prio, pfn, Class::Free);
                Class::Free
            } else {
                match wire::class_of(prio, pfn) {
                    Ok(Class::Free) | Err(_) => {
                        let _ = wire::set_class(prio, pfn, Class::Other);
                        Class::Other
                    }
                    Ok(c) => c,
                }
            };
            counts[c as usize] += 1;
        }
        let (free_ptr, free_len, prio_ptr, prio_len) = (maps.free, maps.free_len, maps.prio, maps.prio_len);
        self.ready_seq = Some(seq);
        let info = ReadyInfo {
            seq,
            frames,
            sweep_us: (t1 - t0) / 1000,
            classify_us: (t2 - t1) / 1000,
            class_counts: counts,
            free_extents: free_ext.len() as u32,
            prio_extents: prio_ext.len() as u32,
        };
        let st = self.stats();
        st.readies += 1;
        st.holding = 1;
        st.frames = frames;
        st.held_pages = held;
        st.pressure_released = released;
        st.sweep_us = info.sweep_us;
        st.classify_us = info.classify_us;
        st.prepare_us = (now_ns() - t0) / 1000;
        st.map_extents = (free_ext.len() + prio_ext.len()) as u64;
        st.class_counts = counts;
        st.free_blob.data = free_ptr.cast::<c_void>();
        st.free_blob.size = free_len as c_ulong;
        st.prio_blob.data = prio_ptr.cast::<c_void>();
        st.prio_blob.size = prio_len as c_ulong;
        pr_info!(
            "Prepare {}: {} frames, {} free held, sweep {} us, classify {} us, {} extents\n",
            seq,
            frames,
            held,
            info.sweep_us,
            info.classify_us,
            st.map_extents
        );
        self.reply(|b| info.encode(&free_ext, &prio_ext, b));
    }
}

/// Context of the page-table walk callback.
struct WalkCtx<'a> {
    prio: &'a mut [u8],
    frames: u64,
    class: Class,
}

/// Called by `enl_walk_range` for each present mapping.
unsafe extern "C" fn on_pfn(ctx: *mut c_void, pfn: c_ulong, nr: c_ulong) {
    // SAFETY: `ctx` is the `WalkCtx` passed to enl_walk_range by
    // classify_processes, alive and not otherwise borrowed during the walk.
    let ctx = unsafe { &mut *ctx.cast::<WalkCtx<'_>>() };
    let pfn = pfn as u64;
    for p in pfn..pfn.saturating_add(nr as u64) {
        if p < ctx.frames {
            let _ = wire::raise_class(ctx.prio, p, ctx.class);
        }
    }
}

unsafe extern "C" fn work_fn(work: *mut bindings::work_struct) {
    // SAFETY: `work` is the first field of a live `Dev` (repr(C)); the
    // work item is cancelled before the Dev is freed, and a work item never
    // runs concurrently with itself.
    let dev = unsafe { &mut *work.cast::<Dev>() };
    dev.run();
}

unsafe extern "C" fn vq_callback(vq: *mut bindings::virtqueue) {
    // SAFETY: the device's priv is its Dev from probe until remove, which
    // resets the device (no more callbacks) before freeing it.
    unsafe {
        let dev = bindings::enl_virtio_get_priv(bindings::enl_virtqueue_vdev(vq)).cast::<Dev>();
        if !dev.is_null() {
            bindings::enl_schedule_work(ptr::addr_of_mut!((*dev).work));
        }
    }
}

unsafe extern "C" fn shrink_count(s: *mut bindings::shrinker, _sc: *mut bindings::shrink_control) -> c_ulong {
    // SAFETY: private_data is the device's Held, freed only after the
    // shrinker.
    let h = unsafe { (*s).private_data.cast::<Held>() };
    with_held(h, |h| if h.sweeping { h.held as c_ulong } else { 0 })
}

unsafe extern "C" fn shrink_scan(s: *mut bindings::shrinker, sc: *mut bindings::shrink_control) -> c_ulong {
    // SAFETY: as in shrink_count; `sc` is the caller's control block.
    let (h, want) = unsafe { ((*s).private_data.cast::<Held>(), (*sc).nr_to_scan as u64) };
    match with_held(h, |h| if h.sweeping { Some(h.give_back(want)) } else { None }) {
        Some(n) => n as c_ulong,
        None => !0, // SHRINK_STOP
    }
}

impl HeldState {
    fn free_map(&mut self) -> &mut [u8] {
        if self.free.is_null() {
            return &mut [];
        }
        // SAFETY: `free` is the live vmalloc'd free bitmap of `free_len`
        // bytes (cleared before the buffer is freed); while the maps are
        // built only code holding the lock touches it.
        unsafe { core::slice::from_raw_parts_mut(self.free, self.free_len) }
    }

    /// Gives up to `want` held pages back (clearing their bits) while the
    /// maps are being built. Returns how many.
    fn give_back(&mut self, want: u64) -> u64 {
        let frames = self.frames;
        let mut cursor = self.cursor;
        let map = self.free_map();
        if map.is_empty() {
            return 0;
        }
        let mut freed = 0u64;
        let mut scanned = 0usize;
        while freed < want && scanned < map.len() {
            let i = cursor % map.len();
            if map[i] != 0 {
                for bit in 0..8u64 {
                    let pfn = i as u64 * 8 + bit;
                    if map[i] & (1 << bit) != 0 && pfn < frames && freed < want {
                        map[i] &= !(1 << bit);
                        // SAFETY: the bit marked a page we hold (order 0).
                        unsafe { bindings::__free_pages(bindings::enl_pfn_to_page(pfn as c_ulong), 0) };
                        freed += 1;
                    }
                }
            }
            if map[i] == 0 {
                cursor += 1;
                scanned += 1;
            }
        }
        self.cursor = cursor % map.len();
        self.held -= freed;
        self.released_under_pressure += freed;
        freed
    }

    /// Free pages above the high watermark in the zone of the first held
    /// page (the sweep stopped there at `margin`).
    fn reserve_room(&mut self) -> Option<i64> {
        let frames = self.frames;
        let map = self.free_map();
        let i = map.iter().position(|b| *b != 0)?;
        let pfn = i as u64 * 8 + u64::from(map[i].trailing_zeros());
        if pfn >= frames {
            return None;
        }
        // SAFETY: `pfn` is a page we hold.
        Some(unsafe { bindings::enl_zone_room(bindings::enl_pfn_to_page(pfn as c_ulong)) } as i64)
    }
}

/// Allocates a zeroed KVec of `n` bytes.
fn zeroed_buf(n: usize) -> Result<KVec<u8>> {
    let mut v = KVec::with_capacity(n, GFP_KERNEL)?;
    v.extend_with(n, 0u8, GFP_KERNEL)?;
    Ok(v)
}

unsafe extern "C" fn probe(vdev: *mut bindings::virtio_device) -> c_int {
    match probe_inner(vdev) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

fn probe_inner(vdev: *mut bindings::virtio_device) -> Result {
    let stats = STATS.load(core::sync::atomic::Ordering::Acquire);
    if stats.is_null() {
        return Err(ENODEV);
    }
    // SAFETY: reads the device's config space (version field).
    let version = unsafe { bindings::enl_virtio_cread32(vdev, wire::config::ABI_VERSION as c_uint) };
    if version != u32::from(wire::VERSION) {
        pr_err!("device speaks ABI version {}, this module {}\n", version, wire::VERSION);
        return Err(EINVAL);
    }
    let mut cmd_bufs = KVec::with_capacity(NCMD, GFP_KERNEL)?;
    for _ in 0..NCMD {
        cmd_bufs.push(zeroed_buf(CMD_BUF)?, GFP_KERNEL)?;
    }
    let mut reply_bufs = KVec::with_capacity(NREPLY, GFP_KERNEL)?;
    for _ in 0..NREPLY {
        reply_bufs.push(zeroed_buf(REPLY_BUF)?, GFP_KERNEL)?;
    }
    let dev = KBox::new(
        Dev {
            // SAFETY: all-zero is a valid initial bit pattern for these C
            // structs; both are initialised below before use.
            work: unsafe { core::mem::zeroed() },
            held: ptr::null_mut(),
            vdev,
            cmd_vq: ptr::null_mut(),
            reply_vq: ptr::null_mut(),
            cmd_bufs,
            reply_bufs,
            reply_busy: [false; NREPLY],
            shrinker: ptr::null_mut(),
            stats,
            maps: None,
            ready_seq: None,
            removing: false,
        },
        GFP_KERNEL,
    )?;
    let held = KBox::new(
        Held {
            // SAFETY: an all-zero spinlock is initialised below before use.
            lock: unsafe { core::mem::zeroed() },
            state: HeldState {
                free: ptr::null_mut(),
                free_len: 0,
                frames: 0,
                sweeping: false,
                held: 0,
                released_under_pressure: 0,
                cursor: 0,
                margin: 0,
            },
        },
        GFP_KERNEL,
    )?;
    let dev = KBox::into_raw(dev);
    // SAFETY: `dev` was just allocated; the Held is owned by it from now on
    // (freed by free_dev).
    unsafe { (*dev).held = KBox::into_raw(held) };
    // SAFETY: `dev` is a fresh allocation we own; the work item, lock,
    // virtqueues and shrinker are set up before the device is made ready,
    // and every failure path undoes what was done.
    unsafe {
        bindings::enl_init_work(ptr::addr_of_mut!((*dev).work), Some(work_fn));
        bindings::enl_spin_lock_init(ptr::addr_of_mut!((*(*dev).held).lock));
        let mut vqs: [*mut bindings::virtqueue; 2] = [ptr::null_mut(); 2];
        let mut info: [bindings::virtqueue_info; 2] = [
            bindings::virtqueue_info { name: kernel::c_str!("cmd").as_char_ptr(), callback: Some(vq_callback), ctx: false },
            bindings::virtqueue_info { name: kernel::c_str!("reply").as_char_ptr(), callback: Some(vq_callback), ctx: false },
        ];
        let r = bindings::enl_virtio_find_vqs(vdev, 2, vqs.as_mut_ptr(), info.as_mut_ptr());
        if r != 0 {
            free_dev(dev);
            return Err(Error::from_errno(r));
        }
        (*dev).cmd_vq = vqs[wire::CMD_QUEUE as usize];
        (*dev).reply_vq = vqs[wire::REPLY_QUEUE as usize];
        let s = bindings::shrinker_alloc(0, kernel::c_str!("enlighten").as_char_ptr());
        if s.is_null() {
            bindings::enl_virtio_del_vqs(vdev);
            free_dev(dev);
            return Err(ENOMEM);
        }
        (*s).count_objects = Some(shrink_count);
        (*s).scan_objects = Some(shrink_scan);
        (*s).seeks = bindings::ENL_DEFAULT_SEEKS;
        (*s).private_data = (*dev).held.cast::<c_void>();
        bindings::shrinker_register(s);
        (*dev).shrinker = s;
        bindings::enl_virtio_set_priv(vdev, dev.cast::<c_void>());
        bindings::enl_virtio_device_ready(vdev);
        for i in 0..NCMD {
            if let Err(e) = (*dev).post_cmd(i) {
                pr_err!("posting command buffer {} failed: {:?}\n", i, e);
            }
        }
        bindings::virtqueue_kick((*dev).cmd_vq);
    }
    pr_info!("device bound (ABI version {})\n", version);
    Ok(())
}

/// Frees a device and its Held.
///
/// # Safety
/// `dev` came from probe's `KBox::into_raw`, and nothing (work item,
/// shrinker, callbacks) can reach it any more.
unsafe fn free_dev(dev: *mut Dev) {
    // SAFETY: per the contract; `held` is null or from KBox::into_raw.
    unsafe {
        let held = (*dev).held;
        drop(KBox::from_raw(dev));
        if !held.is_null() {
            drop(KBox::from_raw(held));
        }
    }
}

unsafe extern "C" fn remove(vdev: *mut bindings::virtio_device) {
    // SAFETY: priv is the Dev set by probe. Reset stops the device and its
    // callbacks; then the work item is cancelled, the shrinker freed (it
    // waits for running callbacks), held pages returned and buffers
    // detached before the Dev is freed.
    unsafe {
        let dev = bindings::enl_virtio_get_priv(vdev).cast::<Dev>();
        if dev.is_null() {
            return;
        }
        (*dev).removing = true;
        bindings::virtio_reset_device(vdev);
        bindings::cancel_work_sync(ptr::addr_of_mut!((*dev).work));
        bindings::shrinker_free((*dev).shrinker);
        (*dev).release_all();
        while !bindings::virtqueue_detach_unused_buf((*dev).cmd_vq).is_null() {}
        while !bindings::virtqueue_detach_unused_buf((*dev).reply_vq).is_null() {}
        bindings::enl_virtio_del_vqs(vdev);
        bindings::enl_virtio_set_priv(vdev, ptr::null_mut());
        free_dev(dev);
    }
    pr_info!("device removed; every held page was given back\n");
}

/// The module's statistics, for probe (set in init, cleared in drop after
/// the driver is unregistered).
static STATS: core::sync::atomic::AtomicPtr<Stats> = core::sync::atomic::AtomicPtr::new(ptr::null_mut());

/// The registered driver with its tables (address stable in a KBox).
#[repr(C)]
struct Driver {
    drv: bindings::virtio_driver,
    ids: [bindings::virtio_device_id; 3],
    features: [c_uint; 2],
}

struct Enlighten {
    driver: *mut Driver,
    stats: *mut Stats,
    debugfs: *mut bindings::dentry,
}

// SAFETY: the raw pointers are owned by the module instance and only used in
// init and drop, which the kernel serialises.
unsafe impl Send for Enlighten {}
// SAFETY: as above; the instance is never accessed concurrently.
unsafe impl Sync for Enlighten {}

/// Encodes a Prepare command with the shared wire code and decodes it back,
/// so that the shared source is not only compiled but also run in the kernel.
fn wire_self_test() -> Result {
    let mut buf = [0u8; wire::Prepare::LEN];
    let sent = wire::Prepare { seq: 1, active_window_ms: wire::DEFAULT_ACTIVE_WINDOW_MS };
    let len = sent.encode(&mut buf).map_err(|_| EINVAL)?;
    match wire::Command::decode(&buf[..len]) {
        Ok(wire::Command::Prepare(got)) if got == sent => Ok(()),
        _ => Err(EINVAL),
    }
}

/// `enlighten.alias_id=N` on the kernel command line: also bind virtio
/// device ID N. QEMU 10 does not let users create its generic
/// `vhost-user-device(-pci)` (not user-creatable), so the tests host the
/// device as `vhost-user-gpio-pci` (ID 41: a vhost-user device with two
/// queues and an 8-byte config, like ours) and boot with
/// `enlighten.alias_id=41`. Without the option only ID 63 is bound.
fn alias_device_id() -> Option<u32> {
    // SAFETY: saved_command_line is a NUL-terminated string that lives for
    // the kernel's lifetime.
    let cmdline = unsafe { kernel::str::CStr::from_char_ptr(bindings::enl_cmdline()) }.as_bytes();
    let key = b"enlighten.alias_id=";
    let pos = cmdline.windows(key.len()).position(|w| w == key)?;
    if pos > 0 && cmdline[pos - 1] != b' ' {
        return None;
    }
    let mut id: u32 = 0;
    let mut digits = 0;
    for &c in &cmdline[pos + key.len()..] {
        if !c.is_ascii_digit() || digits == 5 {
            break;
        }
        id = id * 10 + u32::from(c - b'0');
        digits += 1;
    }
    if digits == 0 || id == 0 || id == wire::DEVICE_ID || id > 0xffff {
        return None;
    }
    Some(id)
}

fn create_debugfs(st: *mut Stats) -> *mut bindings::dentry {
    // SAFETY: debugfs calls with static names and pointers into the Stats
    // block, which outlives the directory (removed first in drop).
    unsafe {
        let dir = bindings::debugfs_create_dir(kernel::c_str!("enlighten").as_char_ptr(), ptr::null_mut());
        macro_rules! u64_file {
            ($name:literal, $field:ident) => {
                bindings::debugfs_create_u64(kernel::c_str!($name).as_char_ptr(), 0o444, dir, ptr::addr_of_mut!((*st).$field));
            };
        }
        u64_file!("prepares", prepares);
        u64_file!("readies", readies);
        u64_file!("dones", dones);
        u64_file!("aborts", aborts);
        u64_file!("errors", errors);
        u64_file!("rejected", rejected);
        u64_file!("backoffs", backoffs);
        u64_file!("pressure_released", pressure_released);
        u64_file!("frames", frames);
        u64_file!("held_pages", held_pages);
        u64_file!("sweep_us", sweep_us);
        u64_file!("classify_us", classify_us);
        u64_file!("prepare_us", prepare_us);
        u64_file!("release_us", release_us);
        u64_file!("active_processes", active_processes);
        u64_file!("idle_processes", idle_processes);
        u64_file!("map_extents", map_extents);
        u64_file!("holding", holding);
        let names = [
            kernel::c_str!("class_kernel"),
            kernel::c_str!("class_kernel_allocated"),
            kernel::c_str!("class_memory_io"),
            kernel::c_str!("class_page_table"),
            kernel::c_str!("class_user_code"),
            kernel::c_str!("class_user_data"),
            kernel::c_str!("class_file_active"),
            kernel::c_str!("class_file_inactive"),
            kernel::c_str!("class_other"),
            kernel::c_str!("class_free"),
        ];
        for (i, n) in names.iter().enumerate() {
            bindings::debugfs_create_u64(n.as_char_ptr(), 0o444, dir, ptr::addr_of_mut!((*st).class_counts[i]));
        }
        bindings::debugfs_create_blob(kernel::c_str!("free_bitmap").as_char_ptr(), 0o400, dir, ptr::addr_of_mut!((*st).free_blob));
        bindings::debugfs_create_blob(
            kernel::c_str!("priority_map").as_char_ptr(),
            0o400,
            dir,
            ptr::addr_of_mut!((*st).prio_blob),
        );
        dir
    }
}

impl kernel::Module for Enlighten {
    fn init(module: &'static ThisModule) -> Result<Self> {
        if let Err(e) = wire_self_test() {
            pr_err!("wire format self-test failed\n");
            return Err(e);
        }
        let stats = KBox::new(
            Stats {
                prepares: 0,
                readies: 0,
                dones: 0,
                aborts: 0,
                errors: 0,
                rejected: 0,
                backoffs: 0,
                pressure_released: 0,
                frames: 0,
                held_pages: 0,
                sweep_us: 0,
                classify_us: 0,
                prepare_us: 0,
                release_us: 0,
                active_processes: 0,
                idle_processes: 0,
                map_extents: 0,
                holding: 0,
                class_counts: [0; NUM_CLASSES],
                free_blob: bindings::debugfs_blob_wrapper { data: ptr::null_mut(), size: 0 },
                prio_blob: bindings::debugfs_blob_wrapper { data: ptr::null_mut(), size: 0 },
            },
            GFP_KERNEL,
        )?;
        let stats = KBox::into_raw(stats);
        STATS.store(stats, core::sync::atomic::Ordering::Release);
        let debugfs = create_debugfs(stats);
        let alias_id = alias_device_id();
        if let Some(id) = alias_id {
            pr_info!("also binding virtio device id {} (enlighten.alias_id)\n", id);
        }
        let driver = KBox::new(
            Driver {
                // SAFETY: all-zero is valid for this C struct (null pointers,
                // no callbacks); the needed fields are filled in below.
                drv: unsafe { core::mem::zeroed() },
                ids: [
                    bindings::virtio_device_id { device: wire::DEVICE_ID, vendor: bindings::ENL_VIRTIO_DEV_ANY_ID },
                    bindings::virtio_device_id {
                        device: alias_id.unwrap_or(0),
                        vendor: if alias_id.is_some() { bindings::ENL_VIRTIO_DEV_ANY_ID } else { 0 },
                    },
                    bindings::virtio_device_id { device: 0, vendor: 0 },
                ],
                features: [0, 1], // F_PRIORITY, F_FREE (bit numbers)
            },
            GFP_KERNEL,
        )?;
        let driver = KBox::into_raw(driver);
        // SAFETY: `driver` is ours and stays allocated until it is
        // unregistered in drop; its tables point into the same allocation.
        let r = unsafe {
            (*driver).drv.driver.name = kernel::c_str!("enlighten").as_char_ptr();
            (*driver).drv.id_table = ptr::addr_of!((*driver).ids).cast::<bindings::virtio_device_id>();
            (*driver).drv.feature_table = ptr::addr_of!((*driver).features).cast::<c_uint>();
            (*driver).drv.feature_table_size = 2;
            (*driver).drv.probe = Some(probe);
            (*driver).drv.remove = Some(remove);
            bindings::__register_virtio_driver(ptr::addr_of_mut!((*driver).drv), module.as_ptr())
        };
        if r != 0 {
            // SAFETY: undo the allocations above (nothing registered).
            unsafe {
                drop(KBox::from_raw(driver));
                bindings::debugfs_remove(debugfs);
                STATS.store(ptr::null_mut(), core::sync::atomic::Ordering::Release);
                drop(KBox::from_raw(stats));
            }
            return Err(Error::from_errno(r));
        }
        pr_info!("loaded, ABI version {}, device id {}\n", wire::VERSION, wire::DEVICE_ID);
        Ok(Enlighten { driver, stats, debugfs })
    }
}

impl Drop for Enlighten {
    fn drop(&mut self) {
        // SAFETY: unregistering removes every bound device (remove() gives
        // back all held pages) before the driver and statistics are freed.
        unsafe {
            bindings::unregister_virtio_driver(ptr::addr_of_mut!((*self.driver).drv));
            drop(KBox::from_raw(self.driver));
            bindings::debugfs_remove(self.debugfs);
            STATS.store(ptr::null_mut(), core::sync::atomic::Ordering::Release);
            drop(KBox::from_raw(self.stats));
        }
        pr_info!("unloaded\n");
    }
}
