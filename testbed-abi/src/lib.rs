//! The contract between the VMM and the testbed guest.
//!
//! The testbed guest is a freestanding program that runs entirely at CPL3
//! (see `../shared/PLATFORM.md`: on PVM hosts CPL3 code runs natively). The
//! VMM loads it, builds its page tables, fills a [`BootInfo`] page and enters
//! it in 64-bit mode at CPL3 with RFLAGS.IOPL=3. The guest reports progress in
//! a [`Stats`] page that the VMM reads from guest memory, prints text on the
//! 8250 serial port, and ends the VM by writing to [`EXIT_PORT`].
//!
//! Everything here is plain data with explicit little-endian encoders and
//! decoders, so neither side relies on the other's struct layout and neither
//! needs `unsafe` to exchange it.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod spec;

pub use spec::{
    parse_size, AppParams, DiskParams, KvParams, MemParams, SizeOrPercent, SpecError, Workload, WorkloadSpec,
};

/// Guest page size used throughout the testbed.
pub const PAGE_SIZE: u64 = 4096;

// ---------------------------------------------------------------------------
// Guest-physical layout (identity mapped: guest virtual == guest physical).
// ---------------------------------------------------------------------------

/// GDT (and the 64-bit TSS right after it at [`TSS_GPA`]).
pub const GDT_GPA: u64 = 0x1000;
/// 64-bit TSS with an I/O permission bitmap allowing every port (PVM consults
/// the bitmap even at IOPL=3); it ends before [`BOOT_INFO_GPA`].
pub const TSS_GPA: u64 = 0x1800;
/// Boot information page written by the VMM (or the multiboot stub).
pub const BOOT_INFO_GPA: u64 = 0x7000;
/// Statistics page written by the guest and read by the VMM.
pub const STATS_GPA: u64 = 0x8000;
/// Page tables: PML4 at this address, one PDPT after it, then page
/// directories (2 MiB pages) for each GiB of the identity map.
pub const PAGE_TABLES_GPA: u64 = 0x10000;
/// Maximum number of page-directory pages, i.e. GiB of identity map.
/// 64 GiB of RAM plus the 32-bit MMIO hole.
pub const MAX_PAGE_DIRECTORIES: u64 = 80;
/// Per-vCPU stacks, `STACK_SIZE` each, vCPU `i`'s stack top is
/// `STACKS_GPA + (i + 1) * STACK_SIZE`.
pub const STACKS_GPA: u64 = 0x100000;
/// Size of one vCPU stack.
pub const STACK_SIZE: u64 = 0x10000;
/// Maximum vCPUs the testbed guest supports.
pub const MAX_VCPUS: u32 = 16;
/// Where the guest image is linked and loaded.
pub const IMAGE_GPA: u64 = 0x200000;

/// Start of the 32-bit MMIO hole; RAM above it continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; device `i` is at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First legacy IRQ used for virtio-mmio devices (device `i` uses `VIRTIO_IRQ_BASE + i`).
pub const VIRTIO_IRQ_BASE: u32 = 5;

// ---------------------------------------------------------------------------
// Ports.
// ---------------------------------------------------------------------------

/// 8250 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Exit port, compatible with QEMU's `isa-debug-exit,iobase=0xf4,iosize=4`:
/// a 32-bit `OUT` of an [`ExitCode`] ends the VM. QEMU exits with status
/// `(code << 1) | 1`; our VMM reports the code itself.
pub const EXIT_PORT: u16 = 0xf4;
/// Park port: a vCPU with nothing to do writes here (any value, any size);
/// the VMM stops running that vCPU until the VM ends (instead of it spinning).
pub const PARK_PORT: u16 = 0xf8;
/// Session port: the user's session for an `app` guest (a workload
/// specification such as `app,seed=4,steps=10`, given to the VMM with
/// `--session`). Each `IN` byte returns the next byte of it, 0 past its end
/// or while the VMM has none; an `OUT` of any value starts it over.
pub const SESSION_PORT: u16 = 0xfc;

/// Codes written to [`EXIT_PORT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// The workload finished (its duration elapsed); see the stats page.
    Done = 0x10,
    /// The guest hit an unrecoverable error (a panic, a bad boot info page,
    /// a device that does not work); details were printed on the serial port.
    Failed = 0x11,
}

impl ExitCode {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0x10 => Some(Self::Done),
            0x11 => Some(Self::Failed),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Little-endian field helpers shared by the encoders and decoders.
// ---------------------------------------------------------------------------

fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------
// Boot information page.
// ---------------------------------------------------------------------------

/// "TBBOOT01"
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"TBBOOT01");
pub const BOOT_INFO_VERSION: u32 = 1;
/// Maximum RAM regions described in the boot info.
pub const MAX_MEM_REGIONS: usize = 4;
/// Maximum virtio-mmio devices described in the boot info.
pub const MAX_VIRTIO_DEVICES: usize = 8;
/// Maximum workload command-line length in bytes.
pub const MAX_CMDLINE: usize = 1024;

/// A range of guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    pub start: u64,
    pub len: u64,
}

/// A virtio-mmio device window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub irq: u32,
    /// Virtio device ID (2 = block).
    pub device_id: u32,
}

/// What the guest learns at boot.
///
/// Byte layout (all little-endian), total [`BootInfo::ENCODED_LEN`] bytes:
/// ```text
/// 0    u64 magic            8    u32 version          12   u32 vcpus
/// 16   u64 tsc_khz (0 = unknown: the guest calibrates with the PIT)
/// 24   u64 heap_start (first byte of RAM the guest may allocate)
/// 32   u32 mem_region_count 36   u32 virtio_count
/// 40   MAX_MEM_REGIONS x { u64 start, u64 len }                (64 bytes)
/// 104  MAX_VIRTIO_DEVICES x { u64 base, u32 irq, u32 device_id } (128 bytes)
/// 232  u32 cmdline_len      236  u32 reserved
/// 240  cmdline bytes (MAX_CMDLINE)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub vcpus: u32,
    pub tsc_khz: u64,
    pub heap_start: u64,
    pub mem_regions: [MemRegion; MAX_MEM_REGIONS],
    pub mem_region_count: u32,
    pub virtio: [VirtioMmioDevice; MAX_VIRTIO_DEVICES],
    pub virtio_count: u32,
    pub cmdline: [u8; MAX_CMDLINE],
    pub cmdline_len: u32,
}

/// Why a boot info page was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    TooShort,
    BadMagic,
    BadVersion(u32),
    BadCount,
    BadCmdline,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooShort => write!(f, "boot info page too short"),
            Self::BadMagic => write!(f, "boot info magic mismatch"),
            Self::BadVersion(v) => write!(f, "boot info version {v}, expected {BOOT_INFO_VERSION}"),
            Self::BadCount => write!(f, "boot info region/device/vcpu count out of range"),
            Self::BadCmdline => write!(f, "boot info command line too long or not UTF-8"),
        }
    }
}

impl Default for BootInfo {
    fn default() -> Self {
        Self {
            vcpus: 1,
            tsc_khz: 0,
            heap_start: 0,
            mem_regions: [MemRegion::default(); MAX_MEM_REGIONS],
            mem_region_count: 0,
            virtio: [VirtioMmioDevice::default(); MAX_VIRTIO_DEVICES],
            virtio_count: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
        }
    }
}

impl BootInfo {
    pub const ENCODED_LEN: usize = 240 + MAX_CMDLINE;

    /// Sets the workload command line; fails if it is too long.
    pub fn set_cmdline(&mut self, s: &str) -> Result<(), BootInfoError> {
        if s.len() > MAX_CMDLINE {
            return Err(BootInfoError::BadCmdline);
        }
        self.cmdline = [0; MAX_CMDLINE];
        self.cmdline[..s.len()].copy_from_slice(s.as_bytes());
        self.cmdline_len = s.len() as u32;
        Ok(())
    }

    /// The workload command line.
    pub fn cmdline_str(&self) -> &str {
        let len = (self.cmdline_len as usize).min(MAX_CMDLINE);
        core::str::from_utf8(&self.cmdline[..len]).unwrap_or("")
    }

    /// Adds a RAM region; fails if the table is full.
    pub fn push_mem_region(&mut self, start: u64, len: u64) -> Result<(), BootInfoError> {
        let i = self.mem_region_count as usize;
        if i >= MAX_MEM_REGIONS {
            return Err(BootInfoError::BadCount);
        }
        self.mem_regions[i] = MemRegion { start, len };
        self.mem_region_count += 1;
        Ok(())
    }

    /// Adds a virtio-mmio device; fails if the table is full.
    pub fn push_virtio(&mut self, dev: VirtioMmioDevice) -> Result<(), BootInfoError> {
        let i = self.virtio_count as usize;
        if i >= MAX_VIRTIO_DEVICES {
            return Err(BootInfoError::BadCount);
        }
        self.virtio[i] = dev;
        self.virtio_count += 1;
        Ok(())
    }

    /// RAM regions in use.
    pub fn mem_regions(&self) -> &[MemRegion] {
        &self.mem_regions[..(self.mem_region_count as usize).min(MAX_MEM_REGIONS)]
    }

    /// Virtio devices in use.
    pub fn virtio_devices(&self) -> &[VirtioMmioDevice] {
        &self.virtio[..(self.virtio_count as usize).min(MAX_VIRTIO_DEVICES)]
    }

    /// Total RAM in bytes.
    pub fn total_ram(&self) -> u64 {
        self.mem_regions().iter().map(|r| r.len).sum()
    }

    pub fn encode(&self, out: &mut [u8; Self::ENCODED_LEN]) {
        out.fill(0);
        put_u64(out, 0, BOOT_INFO_MAGIC);
        put_u32(out, 8, BOOT_INFO_VERSION);
        put_u32(out, 12, self.vcpus);
        put_u64(out, 16, self.tsc_khz);
        put_u64(out, 24, self.heap_start);
        put_u32(out, 32, self.mem_region_count);
        put_u32(out, 36, self.virtio_count);
        for (i, r) in self.mem_regions.iter().enumerate() {
            put_u64(out, 40 + i * 16, r.start);
            put_u64(out, 48 + i * 16, r.len);
        }
        for (i, d) in self.virtio.iter().enumerate() {
            put_u64(out, 104 + i * 16, d.base);
            put_u32(out, 112 + i * 16, d.irq);
            put_u32(out, 116 + i * 16, d.device_id);
        }
        put_u32(out, 232, self.cmdline_len);
        out[240..240 + MAX_CMDLINE].copy_from_slice(&self.cmdline);
    }

    /// Decodes and validates a boot info page.
    pub fn decode(b: &[u8]) -> Result<Self, BootInfoError> {
        if b.len() < Self::ENCODED_LEN {
            return Err(BootInfoError::TooShort);
        }
        if get_u64(b, 0) != BOOT_INFO_MAGIC {
            return Err(BootInfoError::BadMagic);
        }
        let version = get_u32(b, 8);
        if version != BOOT_INFO_VERSION {
            return Err(BootInfoError::BadVersion(version));
        }
        let mut bi = BootInfo {
            vcpus: get_u32(b, 12),
            tsc_khz: get_u64(b, 16),
            heap_start: get_u64(b, 24),
            mem_region_count: get_u32(b, 32),
            virtio_count: get_u32(b, 36),
            cmdline_len: get_u32(b, 232),
            ..Default::default()
        };
        if bi.vcpus == 0
            || bi.vcpus > MAX_VCPUS
            || bi.mem_region_count as usize > MAX_MEM_REGIONS
            || bi.virtio_count as usize > MAX_VIRTIO_DEVICES
        {
            return Err(BootInfoError::BadCount);
        }
        if bi.cmdline_len as usize > MAX_CMDLINE {
            return Err(BootInfoError::BadCmdline);
        }
        for i in 0..MAX_MEM_REGIONS {
            bi.mem_regions[i] = MemRegion { start: get_u64(b, 40 + i * 16), len: get_u64(b, 48 + i * 16) };
        }
        for i in 0..MAX_VIRTIO_DEVICES {
            bi.virtio[i] = VirtioMmioDevice {
                base: get_u64(b, 104 + i * 16),
                irq: get_u32(b, 112 + i * 16),
                device_id: get_u32(b, 116 + i * 16),
            };
        }
        bi.cmdline.copy_from_slice(&b[240..240 + MAX_CMDLINE]);
        if core::str::from_utf8(&bi.cmdline[..bi.cmdline_len as usize]).is_err() {
            return Err(BootInfoError::BadCmdline);
        }
        Ok(bi)
    }
}

// ---------------------------------------------------------------------------
// Statistics page.
// ---------------------------------------------------------------------------

/// "TBSTAT01"
pub const STATS_MAGIC: u64 = u64::from_le_bytes(*b"TBSTAT01");
pub const STATS_VERSION: u32 = 1;

/// Workload phase, written by the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Phase {
    /// Not started (page still zero) or booting.
    Boot = 0,
    /// Populating the working set / key-value store / disk.
    Fill = 1,
    /// Running the measured workload.
    Run = 2,
    /// Finished: the duration elapsed.
    Done = 3,
    /// Failed: see the serial output.
    Failed = 4,
    /// Filled, waiting for a session on [`SESSION_PORT`] (`app`).
    Idle = 5,
}

impl Phase {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Boot,
            1 => Self::Fill,
            2 => Self::Run,
            3 => Self::Done,
            4 => Self::Failed,
            5 => Self::Idle,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::Fill => "fill",
            Self::Run => "run",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Idle => "idle",
        }
    }
}

/// Field offsets in the stats page (little-endian). The guest writes each
/// field with a single aligned volatile store so a concurrent reader (the
/// VMM) never sees a torn 64-bit value.
pub mod stats_off {
    /// u64 [`super::STATS_MAGIC`]
    pub const MAGIC: usize = 0;
    /// u32 [`super::STATS_VERSION`]
    pub const VERSION: usize = 8;
    /// u32 [`super::Phase`] of the whole guest (the slowest vCPU's phase).
    pub const PHASE: usize = 12;
    /// u32 [`super::Workload`] id.
    pub const WORKLOAD: usize = 16;
    /// u32 number of vCPUs running the workload.
    pub const VCPUS: usize = 20;
    /// u64 TSC frequency the guest used, kHz.
    pub const TSC_KHZ: usize = 24;
    /// u64 TSC when the run phase started (all vCPUs filled).
    pub const RUN_START_TSC: usize = 32;
    /// u64 TSC when the run phase ended (0 while running).
    pub const RUN_END_TSC: usize = 40;
    /// u64 TSC at the last heartbeat (updated at least every ~10 ms while running).
    pub const NOW_TSC: usize = 48;
    /// u64 frames the guest holds for the host's enlightenment request: its
    /// free frames from a Ready reply until the host's Done or Abort (0 when
    /// it holds none). A VM that never gets its Done keeps them forever.
    pub const HELD_FRAMES: usize = 56;
    /// Per-vCPU records start here, [`PER_VCPU_LEN`] bytes each.
    pub const PER_VCPU: usize = 64;
    /// Length of a per-vCPU record.
    pub const PER_VCPU_LEN: usize = 64;
    /// Within a per-vCPU record: u64 operations completed in the run phase.
    pub const V_OPS: usize = 0;
    /// u64 errors detected (checksum mismatches, missing keys, bad reads).
    pub const V_ERRORS: usize = 8;
    /// u64 running checksum of the data this vCPU read (order-independent).
    pub const V_CHECKSUM: usize = 16;
    /// u64 operations completed in the fill phase.
    pub const V_FILL_OPS: usize = 24;
    /// u32 phase of this vCPU.
    pub const V_PHASE: usize = 32;
}

/// Errors counted per vCPU; kept in the stats page.
/// A decoded snapshot of the stats page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub phase: u32,
    pub workload: u32,
    pub vcpus: u32,
    pub tsc_khz: u64,
    pub run_start_tsc: u64,
    pub run_end_tsc: u64,
    pub now_tsc: u64,
    pub ops: u64,
    pub errors: u64,
    pub checksum: u64,
    pub fill_ops: u64,
    /// Frames held for the enlightenment device ([`stats_off::HELD_FRAMES`]).
    pub held_frames: u64,
}

impl Stats {
    /// Decodes a stats page (the whole 4 KiB page). Returns `None` if the
    /// guest has not initialised it yet (wrong magic or version).
    pub fn decode(b: &[u8]) -> Option<Self> {
        use stats_off::*;
        if b.len() < PAGE_SIZE as usize || get_u64(b, MAGIC) != STATS_MAGIC || get_u32(b, VERSION) != STATS_VERSION {
            return None;
        }
        let vcpus = get_u32(b, VCPUS).min(MAX_VCPUS);
        let mut s = Stats {
            phase: get_u32(b, PHASE),
            workload: get_u32(b, WORKLOAD),
            vcpus,
            tsc_khz: get_u64(b, TSC_KHZ),
            run_start_tsc: get_u64(b, RUN_START_TSC),
            run_end_tsc: get_u64(b, RUN_END_TSC),
            now_tsc: get_u64(b, NOW_TSC),
            held_frames: get_u64(b, HELD_FRAMES),
            ..Default::default()
        };
        for v in 0..vcpus as usize {
            let base = PER_VCPU + v * PER_VCPU_LEN;
            s.ops = s.ops.wrapping_add(get_u64(b, base + V_OPS));
            s.errors = s.errors.wrapping_add(get_u64(b, base + V_ERRORS));
            s.checksum ^= get_u64(b, base + V_CHECKSUM);
            s.fill_ops = s.fill_ops.wrapping_add(get_u64(b, base + V_FILL_OPS));
        }
        Some(s)
    }

    /// Seconds spent in the run phase so far (or in total once it ended).
    pub fn run_seconds(&self) -> f64 {
        if self.tsc_khz == 0 || self.run_start_tsc == 0 {
            return 0.0;
        }
        let end = if self.run_end_tsc != 0 { self.run_end_tsc } else { self.now_tsc };
        end.saturating_sub(self.run_start_tsc) as f64 / (self.tsc_khz as f64 * 1000.0)
    }

    /// Operations per second over the run phase.
    pub fn ops_per_sec(&self) -> f64 {
        let s = self.run_seconds();
        if s > 0.0 {
            self.ops as f64 / s
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_round_trip() {
        let mut bi = BootInfo { vcpus: 2, tsc_khz: 2_000_000, heap_start: 0x40_0000, ..Default::default() };
        bi.push_mem_region(0, 0xC000_0000).unwrap();
        bi.push_mem_region(0x1_0000_0000, 0x4000_0000).unwrap();
        bi.push_virtio(VirtioMmioDevice { base: VIRTIO_MMIO_BASE, irq: 5, device_id: 2 }).unwrap();
        bi.set_cmdline("kv,duration=5").unwrap();
        let mut buf = [0u8; BootInfo::ENCODED_LEN];
        bi.encode(&mut buf);
        let back = BootInfo::decode(&buf).unwrap();
        assert_eq!(back, bi);
        assert_eq!(back.cmdline_str(), "kv,duration=5");
        assert_eq!(back.total_ram(), 0xC000_0000 + 0x4000_0000);
    }

    #[test]
    fn boot_info_rejects_garbage() {
        let buf = [0u8; BootInfo::ENCODED_LEN];
        assert_eq!(BootInfo::decode(&buf), Err(BootInfoError::BadMagic));
        assert_eq!(BootInfo::decode(&buf[..10]), Err(BootInfoError::TooShort));
        let bi = BootInfo { vcpus: 0, ..Default::default() };
        let mut buf = [0u8; BootInfo::ENCODED_LEN];
        bi.encode(&mut buf);
        assert_eq!(BootInfo::decode(&buf), Err(BootInfoError::BadCount));
        let bi = BootInfo { cmdline_len: 5000, ..Default::default() };
        bi.encode(&mut buf);
        assert_eq!(BootInfo::decode(&buf), Err(BootInfoError::BadCmdline));
        assert!(BootInfo::default().set_cmdline(&"x".repeat(2000)).is_err());
    }

    #[test]
    fn stats_decode_sums_vcpus() {
        let mut page = [0u8; PAGE_SIZE as usize];
        assert!(Stats::decode(&page).is_none());
        put_u64(&mut page, stats_off::MAGIC, STATS_MAGIC);
        put_u32(&mut page, stats_off::VERSION, STATS_VERSION);
        put_u32(&mut page, stats_off::VCPUS, 2);
        put_u64(&mut page, stats_off::TSC_KHZ, 1_000_000);
        put_u64(&mut page, stats_off::RUN_START_TSC, 1_000_000_000);
        put_u64(&mut page, stats_off::RUN_END_TSC, 3_000_000_000);
        for v in 0..2 {
            let base = stats_off::PER_VCPU + v * stats_off::PER_VCPU_LEN;
            put_u64(&mut page, base + stats_off::V_OPS, 100);
            put_u64(&mut page, base + stats_off::V_ERRORS, v as u64);
        }
        let s = Stats::decode(&page).unwrap();
        assert_eq!(s.ops, 200);
        assert_eq!(s.errors, 1);
        assert!((s.run_seconds() - 2.0).abs() < 1e-9);
        assert!((s.ops_per_sec() - 100.0).abs() < 1e-9);
    }
}
