//! A polling virtio-net driver (virtio-mmio, VERSION_1 with the MAC from
//! the configuration space; no offloads, no interrupts) and its smoltcp
//! device. Two queues in driver pages laid out like [`SplitQueue`]'s, and
//! [`SLOTS`] receive and transmit buffers of [`BUF`] bytes each: a buffer
//! is a 12-byte virtio-net header followed by one Ethernet frame.

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtio::{Regs, SplitQueue, F_WRITE, STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
use crate::PageAlloc;

const MAGIC: u32 = 0x7472_6976;
const VIRTIO_ID_NET: u32 = 1;
const F_MAC: u32 = 1 << 5;
const HDR: usize = 12;
/// Buffer size: a header and the largest Ethernet frame, rounded up.
const BUF: u64 = 2048;
/// Buffers per queue (the queue size the driver asks for).
pub const SLOTS: u16 = 16;
const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;

/// The receive side: buffers posted to the device.
struct RxSide {
    q: SplitQueue,
    bufs: u64,
    /// A used buffer handed to smoltcp, to post again on the next receive.
    lent: Option<u16>,
}

/// The transmit side: buffers the device has not given back are busy.
pub struct TxSide {
    q: SplitQueue,
    regs: Regs,
    bufs: u64,
    busy: [bool; SLOTS as usize],
    pub frames: u64,
}

/// The device.
pub struct Nic {
    rx: RxSide,
    tx: TxSide,
    pub mac: [u8; 6],
    pub rx_frames: u64,
}

impl Nic {
    /// Finds the first virtio-net device in the boot info and starts it.
    pub fn init(devices: &[testbed_abi::VirtioMmioDevice], heap: &mut PageAlloc) -> Result<Self, &'static str> {
        let dev = devices.iter().find(|d| d.device_id == VIRTIO_ID_NET).ok_or("the VM has no virtio-net device")?;
        let regs = Regs { base: dev.base };
        if regs.r32(0) != MAGIC || regs.r32(4) != 2 || regs.r32(8) != VIRTIO_ID_NET {
            return Err("the virtio-net window holds no virtio-mmio v2 net device");
        }
        regs.w32(0x70, 0);
        regs.w32(0x70, STATUS_ACK | STATUS_DRIVER);
        regs.w32(0x14, 0);
        let has_mac = regs.r32(0x10) & F_MAC != 0;
        regs.w32(0x14, 1);
        if regs.r32(0x10) & 1 == 0 {
            return Err("the device does not offer VIRTIO_F_VERSION_1");
        }
        regs.w32(0x24, 0);
        regs.w32(0x20, if has_mac { F_MAC } else { 0 });
        regs.w32(0x24, 1);
        regs.w32(0x20, 1);
        regs.w32(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if regs.r32(0x70) & STATUS_FEATURES_OK == 0 {
            return Err("the device refused our features");
        }
        let mut mac = [0x02, 0, 0, 0, 0, 1];
        if has_mac {
            for (i, b) in mac.iter_mut().enumerate() {
                let word = regs.r32(0x100 + (i as u64 & !3));
                *b = (word >> ((i % 4) * 8)) as u8;
            }
        }
        let page = |heap: &mut PageAlloc, n: u64| heap.alloc(n).ok_or("out of memory for the virtio-net driver");
        let rx_ring = page(heap, 4096)?;
        let tx_ring = page(heap, 4096)?;
        let rx_bufs = page(heap, BUF * SLOTS as u64)?;
        let tx_bufs = page(heap, BUF * SLOTS as u64)?;
        let mut rxq = SplitQueue::setup(&regs, RX_QUEUE, rx_ring, true).ok_or("no receive queue")?;
        let txq = SplitQueue::setup(&regs, TX_QUEUE, tx_ring, true).ok_or("no transmit queue")?;
        if rxq.size < SLOTS || txq.size < SLOTS {
            return Err("the device's queues are too small");
        }
        for i in 0..SLOTS {
            rxq.desc(i, rx_bufs + i as u64 * BUF, BUF as u32, F_WRITE);
            rxq.push(i);
        }
        regs.w32(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        regs.w32(0x50, RX_QUEUE);
        let tx_regs = Regs { base: dev.base };
        Ok(Self {
            rx: RxSide { q: rxq, bufs: rx_bufs, lent: None },
            tx: TxSide { q: txq, regs: tx_regs, bufs: tx_bufs, busy: [false; SLOTS as usize], frames: 0 },
            mac,
            rx_frames: 0,
        })
    }

    /// Whether the device needs a reset (it found our rings or chains bad).
    pub fn needs_reset(&self) -> bool {
        self.tx.regs.r32(0x70) & crate::virtio::STATUS_NEEDS_RESET != 0
    }

    pub fn tx_frames(&self) -> u64 {
        self.tx.frames
    }
}

impl RxSide {
    /// Posts the buffer smoltcp has finished with.
    fn repost(&mut self, regs: &Regs) {
        if let Some(i) = self.lent.take() {
            self.q.desc(i, self.bufs + i as u64 * BUF, BUF as u32, F_WRITE);
            self.q.push(i);
            regs.w32(0x50, RX_QUEUE);
        }
    }
}

impl TxSide {
    /// Takes back the buffers the device used; returns a free slot.
    fn free_slot(&mut self) -> Option<u16> {
        while let Some((head, _)) = self.q.take_used() {
            if let Some(b) = self.busy.get_mut(head as usize) {
                *b = false;
            }
        }
        self.busy.iter().position(|b| !b).map(|i| i as u16)
    }
}

pub struct RxToken<'a>(&'a [u8]);
pub struct TxToken<'a>(&'a mut TxSide, u16);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let (tx, slot) = (self.0, self.1);
        let addr = tx.bufs + slot as u64 * BUF;
        let len = len.min(BUF as usize - HDR);
        // SAFETY: the slot's buffer is driver-owned RAM (identity mapped) that
        // the device is not using (it is not busy), BUF bytes long.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, HDR + len) };
        buf[..HDR].fill(0);
        let r = f(&mut buf[HDR..]);
        tx.q.desc(slot, addr, (HDR + len) as u32, 0);
        tx.q.push(slot);
        tx.busy[slot as usize] = true;
        tx.regs.w32(0x50, TX_QUEUE);
        tx.frames += 1;
        r
    }
}

impl Device for Nic {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.rx.repost(&self.tx.regs);
        let slot = self.tx.free_slot()?;
        let (head, len) = self.rx.q.take_used()?;
        let head = head % SLOTS;
        let len = (len as usize).clamp(HDR, BUF as usize);
        self.rx.lent = Some(head);
        self.rx_frames += 1;
        let addr = self.rx.bufs + head as u64 * BUF;
        // SAFETY: the device has given this buffer back (it is in the used
        // ring) and it is not posted again until the token is consumed (the
        // next receive); driver-owned RAM, BUF bytes long.
        let frame = unsafe { core::slice::from_raw_parts((addr + HDR as u64) as *const u8, len - HDR) };
        Some((RxToken(frame), TxToken(&mut self.tx, slot)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        let slot = self.tx.free_slot()?;
        Some(TxToken(&mut self.tx, slot))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c.max_burst_size = Some(SLOTS as usize / 2);
        c
    }
}
