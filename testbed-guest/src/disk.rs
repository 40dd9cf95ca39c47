//! The `disk` and `virtio-garbage` workloads (vCPU 0 only).

use testbed_abi::{BootInfo, WorkloadSpec, PAGE_SIZE};
use testbed_workloads::disk::{parse_header, sector_pattern, write_pattern, SECTOR};
use testbed_workloads::rng::Rng;
use testbed_workloads::Batch;

use crate::enlighten::{Class, Enlighten};
use crate::hw::rdtsc;
use crate::println;
use crate::virtio::STATUS_NEEDS_RESET;
use crate::virtio::{Blk, Regs, STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, T_GET_ID};
use crate::virtio::{T_FLUSH, T_IN, T_OUT};

pub struct Clock {
    pub ticks_per_sec: u64,
}

/// Driver pages and the data buffer, from the page allocator.
struct Pages {
    ring: u64,
    req: u64,
    buf: u64,
}

fn pages(bi: &BootInfo, buf_bytes: u64) -> Pages {
    let mut heap = crate::PageAlloc::new(bi);
    match (heap.alloc(PAGE_SIZE), heap.alloc(PAGE_SIZE), heap.alloc(buf_bytes)) {
        (Some(ring), Some(req), Some(buf)) => Pages { ring, req, buf },
        _ => crate::fail(format_args!("not enough RAM above heap_start for the virtio-blk driver")),
    }
}

/// Heartbeats (stats page, every ~10 ms) and progress lines (every second)
/// during the run phase.
struct Progress {
    start: u64,
    tps: u64,
    next_beat: u64,
    next_print: u64,
}

impl Progress {
    fn new(tps: u64) -> Self {
        let start = rdtsc();
        Self { start, tps, next_beat: start + tps / 100, next_print: start + tps }
    }

    fn tick(&mut self, b: &Batch, enl: &mut Option<Enlighten>) {
        let now = rdtsc();
        if now < self.next_beat {
            return;
        }
        crate::heartbeat(b.ops, b.errors);
        if let Some(e) = enl {
            e.poll();
        }
        self.next_beat = now + self.tps / 100;
        if now >= self.next_print {
            self.next_print += self.tps;
            println!("testbed: t={}s ops={} errors={}", (now - self.start) / self.tps.max(1), b.ops, b.errors);
        }
    }
}

fn device(bi: &BootInfo) -> u64 {
    match bi.virtio_devices().iter().find(|d| d.device_id == 2) {
        Some(d) => d.base,
        None => crate::fail(format_args!("no virtio-blk device in the boot info (run with --disk FILE)")),
    }
}

fn buf_slice(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: the data buffer is driver-owned heap RAM (after the two driver
    // pages), identity mapped, at most 1 MiB (the largest block size).
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

fn wmem_u8(addr: u64, v: u8) {
    // SAFETY: driver-owned request page, identity mapped.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

fn sector_mut(buf: &mut [u8], i: usize) -> &mut [u8; SECTOR] {
    (&mut buf[i * SECTOR..(i + 1) * SECTOR]).try_into().unwrap()
}

pub fn run(bi: &BootInfo, spec: &WorkloadSpec, clock: &Clock, enl: &mut Option<Enlighten>) -> Batch {
    let block = spec.disk.block as usize;
    let p = pages(bi, block as u64);
    if let Some(e) = enl {
        e.note(p.ring, PAGE_SIZE, Class::MemoryIo);
        e.note(p.req, PAGE_SIZE, Class::MemoryIo);
        e.note(p.buf, block as u64, Class::MemoryIo);
    }
    let mut blk = match Blk::init(device(bi), p.ring, p.req) {
        Ok(b) => b,
        Err(e) => crate::fail(format_args!("virtio-blk: {e}")),
    };
    let per = block / SECTOR;
    let buf = buf_slice(p.buf, block);
    let mut b = Batch::default();
    let mut expect = [0u8; SECTOR];

    if blk.request(T_GET_ID, 0, p.buf, 20).is_ok() {
        let id = &buf[..20];
        let n = id.iter().position(|&c| c == 0).unwrap_or(20);
        println!("testbed: disk id `{}`, {} sectors", core::str::from_utf8(&id[..n]).unwrap_or("?"), blk.capacity);
    }

    // Host-prepared data: verify it.
    if let Err(e) = blk.request(T_IN, 0, p.buf, SECTOR as u32) {
        crate::fail(format_args!("reading sector 0: {e}"));
    }
    let header: [u8; SECTOR] = buf[..SECTOR].try_into().unwrap();
    let mut own_start = 1u64;
    if let Some((seed, count)) = parse_header(&header) {
        // A header without a sector count: the prepared data fills `size`.
        let count = if count == 0 { spec.disk.size / SECTOR as u64 - 1 } else { count };
        let count = count.min(blk.capacity.saturating_sub(1));
        let mut errors = 0u64;
        let mut s = 1u64;
        while s <= count {
            let n = (per as u64).min(count + 1 - s) as usize;
            if blk.request(T_IN, s, p.buf, (n * SECTOR) as u32).is_err() {
                errors += n as u64;
            } else {
                for i in 0..n {
                    sector_pattern(seed, s + i as u64, &mut expect);
                    if buf[i * SECTOR..(i + 1) * SECTOR] != expect {
                        errors += 1;
                    }
                }
            }
            b.ops += 1;
            s += n as u64;
        }
        b.errors += errors;
        println!("testbed: disk verified host data: {count} sectors, {errors} errors");
        own_start = count + 1;
    }

    // Our own area: write rounds, read back, verify.
    let avail = blk.capacity.saturating_sub(own_start);
    let area = ((spec.disk.size / SECTOR as u64).min(avail) / per as u64) * per as u64;
    if area == 0 {
        crate::fail(format_args!("the disk is too small for the workload ({avail} free sectors)"));
    }
    println!("testbed: disk rounds over sectors {}..{} in {} KiB requests", own_start, own_start + area, block / 1024);
    crate::start_run_phase();
    let tps = clock.ticks_per_sec;
    let mut progress = Progress::new(tps);
    let start = progress.start;
    let end = if spec.duration_s == 0 { u64::MAX } else { start + spec.duration_s * tps };
    let mut round = 0u64;
    loop {
        let mut s = own_start;
        while s < own_start + area {
            for i in 0..per {
                write_pattern(spec.seed, round, s + i as u64, sector_mut(buf, i));
            }
            if blk.request(T_OUT, s, p.buf, block as u32).is_err() {
                b.errors += 1;
            }
            b.ops += 1;
            s += per as u64;
            progress.tick(&b, enl);
        }
        if blk.flush && blk.request(T_FLUSH, 0, 0, 0).is_err() {
            b.errors += 1;
        }
        let mut s = own_start;
        while s < own_start + area {
            if blk.request(T_IN, s, p.buf, block as u32).is_err() {
                b.errors += per as u64;
            } else {
                for i in 0..per {
                    write_pattern(spec.seed, round, s + i as u64, &mut expect);
                    if buf[i * SECTOR..(i + 1) * SECTOR] != expect {
                        b.errors += 1;
                    }
                }
            }
            b.ops += 1;
            s += per as u64;
            progress.tick(&b, enl);
        }
        crate::heartbeat(b.ops, b.errors);
        round += 1;
        if rdtsc() >= end {
            break;
        }
    }
    println!("testbed: disk completed {round} rounds, last round {}, {} errors", round - 1, b.errors);
    b
}

/// Misbehaves towards the device on purpose; every loop is bounded.
pub fn garbage(bi: &BootInfo, spec: &WorkloadSpec) -> Batch {
    let p = pages(bi, PAGE_SIZE);
    let base = device(bi);
    let regs = Regs { base };
    let mut rng = Rng::new(spec.seed);
    crate::start_run_phase();
    let mut ops = 0u64;
    let reinit = |ops: &mut u64| -> Option<Blk> {
        *ops += 1;
        Blk::init(base, p.ring, p.req).ok()
    };

    // 1. Random register writes (status, queue registers, notify, unknown offsets).
    for _ in 0..500 {
        let off = rng.below(0x100) & !3;
        regs.w32(off, rng.next_u64() as u32);
        ops += 1;
    }
    // 2. Odd-sized register accesses.
    regs.w8(0x70, 0xff);
    regs.w8(0x51, 1);
    // 3. A descriptor pointing outside guest RAM.
    if let Some(mut blk) = reinit(&mut ops) {
        blk.desc(0, p.req, 16, 1, 1);
        blk.desc(1, 0xffff_ffff_0000, 4096, 3, 2);
        blk.desc(2, p.req + 0x800, 1, 2, 0);
        wmem_u8(p.req + 0x800, 0xff);
        blk.submit(0, 1);
        let completed = blk.wait_spins(1_000_000).is_ok();
        let needs_reset = regs.r32(0x70) & STATUS_NEEDS_RESET != 0;
        println!(
            "testbed: virtio-garbage: out-of-RAM descriptor -> completed: {completed}, status byte {:#x}, \
             device needs reset: {needs_reset}",
            blk.last_status()
        );
    }
    // 4. A huge length and a chain that loops on itself.
    if let Some(mut blk) = reinit(&mut ops) {
        blk.desc(0, p.req, 0xffff_fff0, 1, 0);
        blk.submit(0, 1);
    }
    // 5. The available index jumping far ahead.
    if let Some(mut blk) = reinit(&mut ops) {
        blk.desc(0, p.req, 16, 1, 1);
        blk.desc(1, p.req + 0x800, 1, 2, 0);
        blk.submit(0, 1000);
    }
    // 6. A queue size that is not a power of two, rings in the MMIO hole.
    activate_queue0(&regs, 3, [0xd000_0000, 0xd000_0100, 0xd000_0200]);
    // 7. Notifying a queue that does not exist, and a status regression.
    regs.w32(0x50, 7);
    regs.w32(0x70, STATUS_ACK);
    ops += 3;
    // 8. An absurd queue size with rings far outside RAM (1 TiB, the top of
    //    the address space), then a notify.
    activate_queue0(&regs, 0xffff, [0x100_0000_0000, 0xffff_ffff_ffff_f000, 0x7fff_ffff_ffff_fff0]);
    regs.w32(0x50, 0);
    ops += 1;
    // 9. A two-descriptor loop (0 -> 1 -> 0) with valid buffers.
    if let Some(mut blk) = reinit(&mut ops) {
        blk.desc(0, p.req, 16, 1, 1);
        blk.desc(1, p.req + 0x800, 1, 3, 0);
        blk.submit(0, 1);
    }
    // 10. A data descriptor pointing into the MMIO hole (the device's own
    //     registers) and a head index beyond the queue size.
    if let Some(mut blk) = reinit(&mut ops) {
        blk.desc(0, p.req, 16, 1, 1);
        blk.desc(1, base, 4096, 3, 2);
        blk.desc(2, p.req + 0x800, 1, 2, 0);
        blk.submit(0, 1);
    }
    if let Some(mut blk) = reinit(&mut ops) {
        blk.submit(0xfff0, 1);
    }
    // 11. Queue registers written while the queue is live, and a queue
    //     selector beyond the device's queues.
    if let Some(_blk) = reinit(&mut ops) {
        regs.w32(0x38, 1 << 20);
        regs.w32(0x80, 0x1234_5678);
        regs.w32(0x30, 9);
        regs.w32(0x38, 8);
        regs.w32(0x44, 1);
        regs.w32(0x50, 0);
    }
    // 12. The device still works after a proper reset.
    let works = match reinit(&mut ops) {
        Some(mut blk) => blk.request(T_IN, 0, p.buf, SECTOR as u32).is_ok(),
        None => false,
    };
    println!(
        "testbed: virtio-garbage: {ops} misbehaviours sent; device {} after reset",
        if works { "works" } else { "does NOT work" }
    );
    let _ = rdtsc();
    Batch { ops, errors: (!works) as u64, checksum: 0 }
}

/// Resets the device, negotiates VERSION_1 and activates queue 0 with the
/// given size and (descriptor, driver, device) ring addresses, however wrong.
fn activate_queue0(regs: &Regs, size: u32, rings: [u64; 3]) {
    regs.w32(0x70, 0);
    regs.w32(0x70, STATUS_ACK | STATUS_DRIVER);
    regs.w32(0x24, 1);
    regs.w32(0x20, 1);
    regs.w32(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    regs.w32(0x30, 0);
    regs.w32(0x38, size);
    for (i, addr) in rings.iter().enumerate() {
        regs.w32(0x80 + 0x10 * i as u64, *addr as u32);
        regs.w32(0x84 + 0x10 * i as u64, (*addr >> 32) as u32);
    }
    regs.w32(0x44, 1);
    regs.w32(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}
