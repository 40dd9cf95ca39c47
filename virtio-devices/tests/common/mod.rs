//! A minimal virtio-mmio driver for tests: it lays out the rings in real
//! guest memory and drives the transport only through its registers.
#![allow(dead_code)]

use std::io::Write;
use std::sync::Arc;

use virtio_devices::block::*;
use virtio_devices::regs::*;
use virtio_devices::status::*;
use virtio_devices::{Block, EventFdInterrupt, MmioDevice, MmioTransport, VIRTIO_F_VERSION_1};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

pub type Mem = GuestMemoryMmap<AtomicBitmap>;
pub type Transport = MmioTransport<Block, Mem>;

/// Two adjacent 1 MiB regions, so buffers can straddle a region boundary.
pub const REGION: u64 = 0x10_0000;
pub const MEM_END: u64 = 2 * REGION;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x3000;
pub const USED: u64 = 0x4000;
pub const HDR: u64 = 0x8000;
pub const STATUS_BYTE: u64 = 0x8100;
pub const DATA: u64 = 0x10000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

pub fn memory() -> Arc<Mem> {
    Arc::new(Mem::from_ranges(&[(GuestAddress(0), REGION as usize), (GuestAddress(REGION), REGION as usize)]).unwrap())
}

/// A disk image of `sectors` sectors, sector `i` filled with byte `i as u8`.
pub fn image(sectors: u64) -> TempFile {
    let t = TempFile::new().unwrap();
    let mut f = t.as_file();
    for i in 0..sectors {
        f.write_all(&[i as u8; 512]).unwrap();
    }
    t
}

pub struct Driver {
    pub t: Transport,
    pub mem: Arc<Mem>,
    pub irq: EventFd,
    pub qsize: u16,
    pub avail_idx: u16,
    pub used_idx: u16,
}

impl Driver {
    pub fn new(block: Block) -> Self {
        Self::with_memory(block, memory())
    }

    pub fn with_memory(block: Block, mem: Arc<Mem>) -> Self {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(block, mem.clone(), Arc::new(EventFdInterrupt::new(irq.try_clone().unwrap())));
        Self { t, mem, irq, qsize: 16, avail_idx: 0, used_idx: 0 }
    }

    pub fn open(path: &std::path::Path, read_only: bool) -> Self {
        Self::new(Block::open(path, read_only).unwrap())
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn status(&mut self) -> u32 {
        self.r32(STATUS)
    }

    pub fn needs_reset(&mut self) -> bool {
        self.status() & DEVICE_NEEDS_RESET != 0
    }

    /// Interrupts raised since the last call.
    pub fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    pub fn device_features(&mut self) -> u64 {
        self.w32(DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(DEVICE_FEATURES) as u64;
        self.w32(DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(DEVICE_FEATURES) as u64;
        (hi << 32) | lo
    }

    /// Resets the device and negotiates `features`; returns whether the
    /// device accepted them (FEATURES_OK stuck).
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.w32(STATUS, 0);
        self.w32(STATUS, ACKNOWLEDGE);
        self.w32(STATUS, ACKNOWLEDGE | DRIVER);
        self.w32(DRIVER_FEATURES_SEL, 0);
        self.w32(DRIVER_FEATURES, features as u32);
        self.w32(DRIVER_FEATURES_SEL, 1);
        self.w32(DRIVER_FEATURES, (features >> 32) as u32);
        self.w32(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.status() & FEATURES_OK != 0
    }

    /// Sets up queue 0 with the given rings and size and enables it.
    pub fn setup_queue(&mut self, size: u32, desc: u64, avail: u64, used: u64) {
        self.w32(QUEUE_SEL, 0);
        self.w32(QUEUE_NUM, size);
        self.w32(QUEUE_DESC_LOW, desc as u32);
        self.w32(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w32(QUEUE_DRIVER_LOW, avail as u32);
        self.w32(QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w32(QUEUE_DEVICE_LOW, used as u32);
        self.w32(QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.w32(QUEUE_READY, 1);
    }

    /// Full initialisation as a Linux driver would do it.
    pub fn init_with(&mut self, features: u64) {
        // Clear the rings left over from a previous session.
        self.mem.write_slice(&[0u8; 0x4000], GuestAddress(DESC)).unwrap();
        assert!(self.negotiate(features), "features {features:#x} refused");
        assert_eq!(self.r32(QUEUE_NUM_MAX), QUEUE_SIZE as u32);
        self.setup_queue(self.qsize as u32, DESC, AVAIL, USED);
        self.w32(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(self.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        self.avail_idx = 0;
        self.used_idx = 0;
    }

    pub fn init(&mut self) {
        self.init_with(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
    }

    pub fn put_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(DESC + 16 * i as u64)).unwrap();
    }

    /// Makes `head` available, advancing the index by `advance`.
    pub fn push_avail(&mut self, head: u16, advance: u16) {
        let slot = (self.avail_idx % self.qsize) as u64;
        self.mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(advance);
        self.mem.write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    }

    /// The next used element, if the device returned one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        if idx == self.used_idx {
            return None;
        }
        let slot = (self.used_idx % self.qsize) as u64;
        let id: u32 = self.mem.read_obj(GuestAddress(USED + 4 + 8 * slot)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(USED + 8 + 8 * slot)).unwrap();
        self.used_idx = self.used_idx.wrapping_add(1);
        Some((id, len))
    }

    /// Submits a chain of (addr, len, device-writable) buffers at descriptor
    /// 0 onwards and notifies; returns the used element.
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> Option<(u32, u32)> {
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if last { 0 } else { F_NEXT } | if w { F_WRITE } else { 0 };
            self.put_desc(i as u16, addr, len, flags, i as u16 + 1);
        }
        self.push_avail(0, 1);
        self.w32(QUEUE_NOTIFY, 0);
        self.pop_used()
    }

    /// A block request with a separate header, the given data buffers and a
    /// status byte; returns (status, used length).
    pub fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32)]) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS_BYTE)).unwrap();
        let writable = kind != VIRTIO_BLK_T_OUT;
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend(data.iter().map(|&(a, l)| (a, l, writable)));
        bufs.push((STATUS_BYTE, 1, true));
        let (id, len) = self.submit(&bufs).expect("request not completed");
        assert_eq!(id, 0);
        (self.mem.read_obj(GuestAddress(STATUS_BYTE)).unwrap(), len)
    }

    pub fn read_sectors(&mut self, sector: u64, addr: u64, len: u32) -> u8 {
        self.request(VIRTIO_BLK_T_IN, sector, &[(addr, len)]).0
    }

    pub fn write_sectors(&mut self, sector: u64, addr: u64, len: u32) -> u8 {
        self.request(VIRTIO_BLK_T_OUT, sector, &[(addr, len)]).0
    }

    pub fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// xorshift64*: a small seeded generator, so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
