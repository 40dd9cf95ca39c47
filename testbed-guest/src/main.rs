//! The testbed guest: a freestanding program whose workloads run at CPL3.
//!
//! Entered by the VMM (or by the multiboot stub in `boot32.rs`) in 64-bit
//! mode at CPL3 with IOPL=3, identity-mapped memory and no IDT, with RDI =
//! vCPU index and RSI = the boot info page (see `testbed-abi`). Every vCPU
//! enters at `_start`, a tiny stub that aligns the stack (so both "RSP = the
//! 16-byte aligned stack top" and "RSP as if just called" work) and calls
//! [`testbed_main`]; vCPU 0 initialises the console and the stats page, then
//! releases the others; all vCPUs run the workload on their own share of
//! RAM and report in the stats page. When the duration ends, vCPU 0 writes
//! the exit code.
#![no_std]
#![no_main]

mod app;
mod boot32;
mod disk;
mod enlighten;
mod hw;
mod mcd;
mod net;
mod virtio;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use testbed_abi::{stats_off as so, BootInfo, ExitCode, Phase, Workload, WorkloadSpec, BOOT_INFO_GPA, PAGE_SIZE};
use testbed_workloads::kv::{Kv, KvConfig};
use testbed_workloads::mem::Mem;
use testbed_workloads::Batch;

use hw::{pause, rdtsc, stat32, stat64};

/// vCPU 0 finished initialisation.
static READY: AtomicU32 = AtomicU32::new(0);
/// vCPUs that finished their fill phase.
static FILLED: AtomicU32 = AtomicU32::new(0);
/// TSC at which the run phase starts (0 = not yet).
static RUN_START: AtomicU64 = AtomicU64::new(0);
/// TSC frequency in kHz, as vCPU 0 determined it.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
/// vCPUs that finished their run phase.
static FINISHED: AtomicU32 = AtomicU32::new(0);
/// First byte of RAM not taken by vCPU 0's boot-time allocations (0 = the
/// boot info's `heap_start`): set before [`READY`], used by every vCPU.
static HEAP_START: AtomicU64 = AtomicU64::new(0);

/// Where the allocatable heap starts (after vCPU 0's boot-time pages).
fn heap_start(bi: &BootInfo) -> u64 {
    bi.heap_start.max(HEAP_START.load(Ordering::Acquire))
}

/// Operations between clock checks and stats updates.
const BATCH: u64 = 64;

// The ELF entry point. Only RDI/RSI (the arguments) and RSP matter; the
// stack top is re-aligned to 16 bytes before the call, so the callee sees
// the System V ABI's alignment whichever convention the loader used.
core::arch::global_asm!(
    r#"
    .section .text._start, "ax"
    .code64
    .global _start
_start:
    cld
    and rsp, -16
    call testbed_main
    ud2
"#
);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("testbed: PANIC: {info}");
    stat32(so::PHASE, Phase::Failed as u32);
    hw::exit(ExitCode::Failed)
}

pub(crate) fn fail(msg: core::fmt::Arguments) -> ! {
    println!("testbed: error: {msg}");
    stat32(so::PHASE, Phase::Failed as u32);
    hw::exit(ExitCode::Failed)
}

fn boot_info() -> BootInfo {
    // SAFETY: the boot info page is identity-mapped RAM written before entry
    // and only read afterwards.
    let page = unsafe { core::slice::from_raw_parts(BOOT_INFO_GPA as *const u8, BootInfo::ENCODED_LEN) };
    match BootInfo::decode(page) {
        Ok(b) => b,
        Err(e) => fail(format_args!("bad boot info: {e}")),
    }
}

/// One reading of PIT channel 2's counter and the TSC at that moment: the
/// counter is latched by an `OUT` bracketed by two TSC reads; of several
/// tries the one with the narrowest bracket wins (a vCPU preempted during
/// the exit gives a wide one). Returns (TSC at the bracket's midpoint, count).
fn pit_sample() -> (u64, u16) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..8 {
        let a = rdtsc();
        hw::outb(0x43, 0x80); // latch channel 2
        let b = rdtsc();
        let lo = hw::inb(0x42) as u16;
        let hi = hw::inb(0x42) as u16;
        if b - a < best.0 {
            best = (b - a, a + (b - a) / 2, lo | hi << 8);
        }
    }
    (best.1, best.2)
}

/// Calibrates the TSC against PIT channel 2 (the QEMU path, where the boot
/// info has no TSC frequency): the counter runs down from 0xffff (mode 0,
/// 55 ms); it is read once at the start and once ~40 ms later.
fn calibrate_tsc_khz() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    let gate = hw::inb(0x61);
    hw::outb(0x61, (gate & !0x02) | 0x01); // gate on, speaker off
    hw::outb(0x43, 0xb0); // channel 2, lo/hi byte, mode 0, binary
    hw::outb(0x42, 0xff);
    hw::outb(0x42, 0xff);
    let (t0, c0) = pit_sample();
    let mut spins = 0u64;
    let (t1, c1) = loop {
        let (t, c) = pit_sample();
        // Stop ~10 ms before the counter reaches zero (and wraps).
        if c < 0x3000 || c > c0 {
            break (t, c);
        }
        spins += 1;
        if spins > 1_000_000 {
            break (t, c);
        }
    };
    hw::outb(0x61, gate);
    if c1 >= c0 || c0 - c1 < 0x4000 || t1 <= t0 {
        println!("testbed: PIT calibration failed (counts {c0:#x} -> {c1:#x}); assuming a 2 GHz TSC");
        return 2_000_000;
    }
    ((t1 - t0) as u128 * PIT_HZ as u128 / (c0 - c1) as u128 / 1000) as u64
}

/// This vCPU's share of the heap: the largest contiguous piece of the
/// `index`-th of `n` equal slices of all RAM above `heap_start`.
pub(crate) fn share(bi: &BootInfo, index: u32, n: u32) -> (u64, u64) {
    let heap = heap_start(bi);
    let pieces = bi.mem_regions().iter().filter_map(move |r| {
        let start = r.start.max(heap);
        let end = r.start + r.len;
        (end > start).then_some((start, end))
    });
    let total: u64 = pieces.clone().map(|(s, e)| e - s).sum();
    let per = total / n as u64 / PAGE_SIZE * PAGE_SIZE;
    let (lo, hi) = (per * index as u64, per * (index as u64 + 1));
    // Walk the heap as one offset space and clip it to [lo, hi).
    let mut best = (0, 0);
    let mut off = 0;
    for (s, e) in pieces {
        let len = e - s;
        let a = lo.max(off);
        let b = hi.min(off + len);
        if b > a && b - a > best.1 {
            best = (s + (a - off), b - a);
        }
        off += len;
    }
    best
}

/// Seconds and TSC helpers for the run loop.
pub(crate) struct Clock {
    pub(crate) ticks_per_sec: u64,
}

impl Clock {
    fn secs(&self, ticks: u64) -> u64 {
        ticks / self.ticks_per_sec.max(1)
    }
}

/// Per-vCPU stats record.
struct Record {
    base: usize,
    ops: u64,
    errors: u64,
    checksum: u64,
}

impl Record {
    fn new(index: u32) -> Self {
        Self { base: so::PER_VCPU + index as usize * so::PER_VCPU_LEN, ops: 0, errors: 0, checksum: 0 }
    }
    fn add(&mut self, b: Batch) {
        self.ops += b.ops;
        self.errors += b.errors;
        self.checksum ^= b.checksum;
        stat64(self.base + so::V_OPS, self.ops);
        stat64(self.base + so::V_ERRORS, self.errors);
        stat64(self.base + so::V_CHECKSUM, self.checksum);
    }
    fn phase(&self, p: Phase) {
        stat32(self.base + so::V_PHASE, p as u32);
    }
}

enum Work<'a> {
    Kv(Kv<'a>),
    Mem(Mem<'a>),
}

/// Bump allocator of whole pages over the RAM region that holds `heap_start`
/// (identity mapped: the address is both virtual and physical).
pub struct PageAlloc {
    next: u64,
    end: u64,
}

impl PageAlloc {
    pub fn new(bi: &BootInfo) -> Self {
        let start = heap_start(bi).next_multiple_of(PAGE_SIZE);
        let end = bi
            .mem_regions()
            .iter()
            .find(|r| r.start <= start && start < r.start + r.len)
            .map(|r| r.start + r.len)
            .unwrap_or(start);
        Self { next: start, end }
    }

    /// The first byte not allocated yet.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// `bytes` rounded up to whole pages, page aligned; `None` when RAM is exhausted.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let len = bytes.max(1).next_multiple_of(PAGE_SIZE);
        let a = self.next;
        (self.end - a >= len).then(|| {
            self.next += len;
            a
        })
    }
}

/// Prints the parsed workload specification.
fn print_spec(spec: &WorkloadSpec, total_ram: u64) {
    let d = spec.duration_s;
    match spec.workload {
        Workload::Kv => println!(
            "testbed: spec: kv share={}% value={} B ratio={}:{} theta=0.{:03} seed={} duration={}s{}",
            spec.kv.share_pct,
            spec.kv.value_size,
            spec.kv.sets,
            spec.kv.gets,
            spec.kv.theta_milli,
            spec.seed,
            d,
            if d == 0 { " (forever)" } else { "" }
        ),
        Workload::Mem => println!(
            "testbed: spec: mem wss={} MiB rate={} pages/s{} seed={} duration={}s{}",
            spec.mem.wss.resolve(total_ram) >> 20,
            spec.mem.rate,
            if spec.mem.rate == 0 { " (unlimited)" } else { "" },
            spec.seed,
            d,
            if d == 0 { " (forever)" } else { "" }
        ),
        Workload::Disk => println!(
            "testbed: spec: disk size={} KiB block={} B seed={} duration={}s{}",
            spec.disk.size >> 10,
            spec.disk.block,
            spec.seed,
            d,
            if d == 0 { " (forever)" } else { "" }
        ),
        Workload::App => println!(
            "testbed: spec: app state={} MiB features={} seed={}",
            spec.app.state.resolve(total_ram) >> 20,
            spec.app.features,
            spec.seed
        ),
        w => println!("testbed: spec: {} seed={}", w.name(), spec.seed),
    }
}

/// Sum of the per-vCPU ops and errors in the stats page.
fn total_ops_errors(n: u32) -> (u64, u64) {
    (0..n as usize).fold((0, 0), |(o, e), v| {
        let base = so::PER_VCPU + v * so::PER_VCPU_LEN;
        (o + hw::stat_read64(base + so::V_OPS), e + hw::stat_read64(base + so::V_ERRORS))
    })
}

/// The Rust entry point, called by `_start` on every vCPU with RDI = vCPU
/// index and RSI = the boot info page address.
#[no_mangle]
pub extern "C" fn testbed_main(vcpu: u64, _boot_info: u64) -> ! {
    let index = vcpu as u32;
    let bi = boot_info();
    let spec = match WorkloadSpec::parse(bi.cmdline_str()) {
        Ok(s) => s,
        Err(e) => fail(format_args!("{e}")),
    };
    let n = bi.vcpus;
    // The enlightenment device's driver (vCPU 0 only).
    let mut enl = None;
    if index == 0 {
        hw::Serial::init();
        let khz = if bi.tsc_khz != 0 { bi.tsc_khz } else { calibrate_tsc_khz() };
        TSC_KHZ.store(khz, Ordering::Relaxed);
        stat64(so::MAGIC, testbed_abi::STATS_MAGIC);
        stat32(so::VERSION, testbed_abi::STATS_VERSION);
        stat32(so::WORKLOAD, spec.workload as u32);
        stat32(so::VCPUS, n);
        stat64(so::TSC_KHZ, khz);
        stat32(so::PHASE, Phase::Fill as u32);
        println!(
            "testbed: {} on {} vCPU(s), {} MiB RAM, TSC {} kHz, spec `{}`",
            spec.workload.name(),
            n,
            bi.total_ram() >> 20,
            khz,
            bi.cmdline_str()
        );
        print_spec(&spec, bi.total_ram());
        let mut heap = PageAlloc::new(&bi);
        enl = enlighten::Enlighten::init(&bi, &mut heap, khz);
        HEAP_START.store(heap.next(), Ordering::Release);
        READY.store(1, Ordering::Release);
    } else {
        while READY.load(Ordering::Acquire) == 0 {
            pause();
        }
    }
    let clock = Clock { ticks_per_sec: TSC_KHZ.load(Ordering::Relaxed) * 1000 };

    match spec.workload {
        Workload::Fault => {
            if index == 0 {
                println!("testbed: executing ud2 with no IDT (triple fault)");
                hw::triple_fault();
            }
            hw::park();
        }
        Workload::Disk | Workload::VirtioGarbage => {
            if index != 0 {
                hw::park();
            }
            let r = if spec.workload == Workload::Disk {
                disk::run(&bi, &spec, &clock_fn(&clock), &mut enl)
            } else {
                disk::garbage(&bi, &spec)
            };
            finish_single(r, &clock)
        }
        Workload::Kv | Workload::Mem => run_memory_workload(index, n, &bi, &spec, &clock, enl),
        Workload::App => {
            if index != 0 {
                hw::park();
            }
            app::run(&bi, &spec, &clock, enl)
        }
        Workload::Mcd => {
            if index != 0 {
                hw::park();
            }
            mcd::run(&bi, &spec, &clock, enl)
        }
    }
}

/// A closure-free clock reader for the disk module.
fn clock_fn(clock: &Clock) -> disk::Clock {
    disk::Clock { ticks_per_sec: clock.ticks_per_sec }
}

/// Ends a single-vCPU workload (disk, garbage) that ran on vCPU 0.
pub(crate) fn finish_single(r: Batch, clock: &Clock) -> ! {
    let mut rec = Record::new(0);
    rec.add(r);
    stat64(so::RUN_END_TSC, rdtsc());
    rec.phase(Phase::Done);
    stat32(so::PHASE, Phase::Done as u32);
    let start = RUN_START.load(Ordering::Relaxed);
    println!("testbed: done: ops={} errors={} in {} s", r.ops, r.errors, clock.secs(rdtsc().saturating_sub(start)));
    hw::exit(ExitCode::Done)
}

/// Marks the start of the run phase (single-vCPU workloads).
pub fn start_run_phase() {
    let now = rdtsc();
    RUN_START.store(now, Ordering::Relaxed);
    stat64(so::RUN_START_TSC, now);
    stat64(so::NOW_TSC, now);
    stat32(so::PHASE, Phase::Run as u32);
}

/// Reports a heartbeat (stats page) from a single-vCPU workload.
pub fn heartbeat(ops: u64, errors: u64) {
    let rec = Record::new(0);
    stat64(rec.base + so::V_OPS, ops);
    stat64(rec.base + so::V_ERRORS, errors);
    stat64(so::NOW_TSC, rdtsc());
}

/// The RAM vCPU `index` of `n` uses for a memory workload: (base, bytes).
fn workload_region(bi: &BootInfo, spec: &WorkloadSpec, index: u32, n: u32) -> (u64, u64) {
    let (base, len) = share(bi, index, n);
    let total_ram = bi.total_ram();
    let want = match spec.workload {
        Workload::Kv => total_ram / 100 * spec.kv.share_pct as u64 / n as u64,
        _ => spec.mem.wss.resolve(total_ram) / n as u64,
    };
    (base, want.min(len) / PAGE_SIZE * PAGE_SIZE)
}

/// Writes stale data (`stale=P`) into this vCPU's share after its working
/// set and leaves it there, unused and not noted to the enlightenment
/// device: free memory with old content, as a real OS has.
fn stale_fill(index: u32, n: u32, bi: &BootInfo, spec: &WorkloadSpec, from: u64) {
    if spec.stale_pct == 0 {
        return;
    }
    let (sbase, slen) = share(bi, index, n);
    let end = sbase + slen;
    let want = bi.total_ram() / 100 * spec.stale_pct as u64 / n as u64 / PAGE_SIZE * PAGE_SIZE;
    let len = want.min(end.saturating_sub(from));
    if len == 0 {
        return;
    }
    // SAFETY: [from, from+len) lies in this vCPU's exclusive share, after
    // its working set (clipped to the share's end above).
    let words = unsafe { hw::ram_words(from, (len / 8) as usize) };
    let mut x = spec.seed ^ 0x5eed_57a1e ^ ((index as u64) << 40);
    for w in words.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x | 1;
    }
    if index == 0 {
        println!("testbed: {} MiB of stale (free) memory per vCPU", len >> 20);
    }
}

fn run_memory_workload(
    index: u32,
    n: u32,
    bi: &BootInfo,
    spec: &WorkloadSpec,
    clock: &Clock,
    mut enl: Option<enlighten::Enlighten>,
) -> ! {
    let (base, bytes) = workload_region(bi, spec, index, n);
    if let Some(e) = &mut enl {
        for i in 0..n {
            let (b, len) = workload_region(bi, spec, i, n);
            e.note(b, len, enlighten::Class::UserData);
        }
    }
    let mut rec = Record::new(index);
    rec.phase(Phase::Fill);
    stale_fill(index, n, bi, spec, base + bytes);
    // SAFETY: [base, base+bytes) is this vCPU's exclusive share of RAM above
    // the image, stacks and tables (heap_start), per the boot contract.
    let words = unsafe { hw::ram_words(base, (bytes / 8) as usize) };
    let mut work = match spec.workload {
        Workload::Kv => {
            let cfg = KvConfig {
                value_size: spec.kv.value_size as usize,
                sets: spec.kv.sets,
                gets: spec.kv.gets,
                theta: spec.kv.theta_milli as f64 / 1000.0,
                seed: spec.seed ^ (index as u64) << 32,
            };
            match Kv::new(words, cfg) {
                Some(kv) => Work::Kv(kv),
                None => fail(format_args!("vCPU {index}: {bytes} bytes are too few for the kv store")),
            }
        }
        _ => match Mem::new(words, spec.seed ^ (index as u64) << 32) {
            Some(m) => Work::Mem(m),
            None => fail(format_args!("vCPU {index}: empty working set")),
        },
    };

    // Fill phase.
    if let Work::Kv(kv) = &mut work {
        if index == 0 {
            println!("testbed: filling {} MiB per vCPU with {} keys", bytes >> 20, kv.keys());
        }
        let mut filled = 0;
        let keys = kv.keys();
        let mut next_report = 1;
        while !kv.is_filled() {
            let b = kv.fill(4096);
            filled += b.ops;
            rec.errors += b.errors;
            stat64(rec.base + so::V_FILL_OPS, filled);
            stat64(rec.base + so::V_ERRORS, rec.errors);
            if index == 0 && next_report < 4 && filled * 4 >= keys * next_report {
                println!("testbed: fill {}% ({} of {} keys on vCPU 0)", next_report * 25, filled, keys);
                next_report += 1;
            }
        }
        if rec.errors != 0 {
            println!("testbed: vCPU {index}: {} keys could not be inserted", rec.errors);
        }
    }
    FILLED.fetch_add(1, Ordering::AcqRel);
    if index == 0 {
        while FILLED.load(Ordering::Acquire) < n {
            pause();
        }
        start_run_phase();
        println!("testbed: run phase started");
    }
    let start = loop {
        let s = RUN_START.load(Ordering::Acquire);
        if s != 0 {
            break s;
        }
        pause();
    };
    rec.phase(Phase::Run);

    // Run phase.
    let tps = clock.ticks_per_sec;
    let end = if spec.duration_s == 0 { u64::MAX } else { start + spec.duration_s * tps };
    let rate = if spec.workload == Workload::Mem { spec.mem.rate / n as u64 } else { 0 };
    let beat = tps / 100; // 10 ms
    let mut next_beat = start + beat;
    let mut next_print = start + tps;
    let ops_limit = if spec.ops_limit == 0 { u64::MAX } else { spec.ops_limit.div_ceil(n as u64) };
    loop {
        let now = rdtsc();
        if now >= end || rec.ops >= ops_limit {
            break;
        }
        if rate != 0 && rec.ops >= ((now - start) as u128 * rate as u128 / tps.max(1) as u128) as u64 {
            pause();
            continue;
        }
        let b = match &mut work {
            Work::Kv(kv) => kv.run(BATCH),
            Work::Mem(m) => m.run(if rate != 0 { 1 } else { 8 }),
        };
        if b.errors != 0 && rec.errors == 0 {
            println!("testbed: vCPU {index}: data error detected after {} run-phase ops", rec.ops + b.ops);
        }
        rec.add(b);
        if index == 0 && now >= next_beat {
            stat64(so::NOW_TSC, now);
            next_beat = now + beat;
            if let Some(e) = &mut enl {
                e.poll();
            }
            if now >= next_print {
                next_print += tps;
                let (ops, errors) = total_ops_errors(n);
                println!("testbed: t={}s ops={} errors={}", clock.secs(now - start), ops, errors);
            }
        }
    }
    rec.phase(Phase::Done);
    FINISHED.fetch_add(1, Ordering::AcqRel);
    if index != 0 {
        hw::park();
    }
    while FINISHED.load(Ordering::Acquire) < n {
        pause();
    }
    let now = rdtsc();
    stat64(so::NOW_TSC, now);
    stat64(so::RUN_END_TSC, now);
    stat32(so::PHASE, Phase::Done as u32);
    let (ops, errors) = total_ops_errors(n);
    println!(
        "testbed: done after {} s: ops={} errors={} ({} ops/s, {} vCPU(s))",
        clock.secs(now - start),
        ops,
        errors,
        (ops as u128 * tps as u128 / (now - start).max(1) as u128) as u64,
        n
    );
    hw::exit(ExitCode::Done)
}
