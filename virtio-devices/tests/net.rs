//! virtio-net against a real TAP interface: a driver laid out in guest
//! memory drives the transport through its registers, and a raw
//! `AF_PACKET` socket on the TAP's host side is the network. Needs root
//! (creating TAPs and packet sockets), as every test run here has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_devices::net::*;
use virtio_devices::regs::*;
use virtio_devices::status::*;
use virtio_devices::{interrupt, EventFdInterrupt, MmioDevice, MmioTransport, VIRTIO_F_VERSION_1};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use netsim::l2::{PacketSocket, TestTap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

/// A local experimental ethertype (IEEE 802 "local experimental 1"): the
/// kernel never sends it, so the test sees only its own frames.
const ETH_TEST: u16 = 0x88b5;
const MEM_SIZE: usize = 4 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QSIZE: u16 = 16;
/// Per queue: descriptor table, driver area, device area.
const RINGS: [(u64, u64, u64); 3] =
    [(0x1_0000, 0x1_1000, 0x1_2000), (0x2_0000, 0x2_1000, 0x2_2000), (0x3_0000, 0x3_1000, 0x3_2000)];
const BUFS: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];

/// A TAP for one test, opened as the device opens it.
fn tap(tag: &str) -> (TestTap, Arc<Tap>) {
    let t = TestTap::new(tag).expect("make a TAP (needs root)");
    let tap = Arc::new(Tap::open(&t.name).expect("open the TAP"));
    (t, tap)
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETH_TEST.to_be_bytes());
    f.extend_from_slice(payload);
    while f.len() < 60 {
        f.push(0);
    }
    f
}

struct Driver {
    t: MmioTransport<Net, Mem>,
    mem: Arc<Mem>,
    irq: EventFd,
    avail: [u16; 3],
    used: [u16; 3],
    next_desc: [u16; 3],
}

impl Driver {
    fn new(tap: Arc<Tap>) -> Self {
        let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Net::new(tap, MAC),
            mem.clone(),
            Arc::new(EventFdInterrupt::new(irq.try_clone().unwrap())),
        );
        Self { t, mem, irq, avail: [0; 3], used: [0; 3], next_desc: [0; 3] }
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn init(&mut self, features: u64) {
        self.w32(STATUS, 0);
        self.w32(STATUS, ACKNOWLEDGE);
        self.w32(STATUS, ACKNOWLEDGE | DRIVER);
        self.w32(DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(DEVICE_FEATURES) as u64;
        self.w32(DEVICE_FEATURES_SEL, 1);
        let offered = lo | (self.r32(DEVICE_FEATURES) as u64) << 32;
        assert_eq!(offered & features, features, "features offered: {offered:#x}");
        self.w32(DRIVER_FEATURES_SEL, 0);
        self.w32(DRIVER_FEATURES, features as u32);
        self.w32(DRIVER_FEATURES_SEL, 1);
        self.w32(DRIVER_FEATURES, (features >> 32) as u32);
        self.w32(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(self.r32(STATUS) & FEATURES_OK, 0);
        let queues = if features & VIRTIO_NET_F_CTRL_VQ != 0 { 3 } else { 2 };
        for (q, &(desc, avail, used)) in RINGS.iter().enumerate().take(queues) {
            self.w32(QUEUE_SEL, q as u32);
            assert_eq!(self.r32(QUEUE_NUM_MAX), QUEUE_SIZE as u32);
            self.w32(QUEUE_NUM, QSIZE as u32);
            self.w32(QUEUE_DESC_LOW, desc as u32);
            self.w32(QUEUE_DRIVER_LOW, avail as u32);
            self.w32(QUEUE_DEVICE_LOW, used as u32);
            self.w32(QUEUE_READY, 1);
        }
        self.w32(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(self.r32(STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    fn put_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(RINGS[q].0 + 16 * i as u64)).unwrap();
    }

    /// Posts a chain of (addr, len, device-writable) on queue `q` and
    /// returns its head; descriptors are used round-robin.
    fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc[q];
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == bufs.len();
            let flags = if last { 0 } else { F_NEXT } | if w { F_WRITE } else { 0 };
            self.put_desc(q, i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.next_desc[q] = (head + bufs.len() as u16) % QSIZE;
        let slot = (self.avail[q] % QSIZE) as u64;
        self.mem.write_obj(head.to_le(), GuestAddress(RINGS[q].1 + 4 + 2 * slot)).unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem.write_obj(self.avail[q].to_le(), GuestAddress(RINGS[q].1 + 2)).unwrap();
        head
    }

    fn notify(&mut self, q: usize) {
        self.w32(QUEUE_NOTIFY, q as u32);
    }

    fn pop_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(RINGS[q].2 + 2)).unwrap();
        if idx == self.used[q] {
            return None;
        }
        let slot = (self.used[q] % QSIZE) as u64;
        let id: u32 = self.mem.read_obj(GuestAddress(RINGS[q].2 + 4 + 8 * slot)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(RINGS[q].2 + 8 + 8 * slot)).unwrap();
        self.used[q] = self.used[q].wrapping_add(1);
        Some((id, len))
    }

    /// Polls the receive queue (as the VMM's RX thread does when the TAP is
    /// readable) until a buffer is used or 2 s pass.
    fn wait_rx(&mut self) -> Option<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            self.t.poll(RX_QUEUE as u32);
            if let Some(u) = self.pop_used(RX_QUEUE) {
                return Some(u);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

const ALL: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_GUEST_ANNOUNCE;

#[test]
fn frames_cross_a_real_tap_both_ways() {
    let (tt, tap) = tap("a");
    let wire = PacketSocket::bind(&tt.name, ETH_TEST, Duration::from_secs(2)).unwrap();
    let mut d = Driver::new(tap);
    d.init(ALL);
    // The MAC and the link status are in the configuration space.
    let mut cfg = [0u8; 8];
    d.t.read(CONFIG, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);

    // Guest -> wire: a header and a frame split over two descriptors.
    let out = frame([0xff; 6], MAC, b"hello from the guest");
    d.mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(BUFS)).unwrap();
    d.mem.write_slice(&out, GuestAddress(BUFS + 0x1000)).unwrap();
    d.post(TX_QUEUE, &[(BUFS, VNET_HDR_LEN as u32, false), (BUFS + 0x1000, out.len() as u32, false)]);
    d.notify(TX_QUEUE);
    assert_eq!(d.pop_used(TX_QUEUE).map(|u| u.1), Some(0));
    assert!(d.irq.read().is_ok(), "a used transmit buffer interrupts");
    assert_eq!(wire.recv().as_deref(), Some(&out[..]), "the frame reaches the wire unchanged");

    // Wire -> guest, into buffers posted before the frame arrived.
    for k in 0..4u64 {
        d.post(RX_QUEUE, &[(BUFS + 0x10_000 + k * 0x1000, 2048, true)]);
    }
    d.notify(RX_QUEUE);
    assert_eq!(d.pop_used(RX_QUEUE), None, "nothing to receive yet");
    let inb = frame(MAC, [0x02, 0, 0, 0, 0, 9], b"hello from the wire");
    wire.send(&inb).unwrap();
    let (id, len) = d.wait_rx().expect("the frame is delivered");
    assert_eq!(len as usize, VNET_HDR_LEN + inb.len());
    let got = d.read(BUFS + 0x10_000 + (id as u64) * 0x1000, len as usize);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[..10], &[0; 10], "no offload in the header");
    assert_eq!(&got[VNET_HDR_LEN..], &inb[..]);
    let c = d.t.device().counters();
    assert_eq!((c.tx_frames, c.rx_frames), (1, 1));
    assert_eq!(d.t.guest_errors(), 0);
}

#[test]
fn a_frame_without_buffers_or_while_paused_waits_and_arrives_once() {
    let (tt, tap) = tap("b");
    let wire = PacketSocket::bind(&tt.name, ETH_TEST, Duration::from_secs(2)).unwrap();
    let mut d = Driver::new(tap);
    d.init(ALL);
    d.notify(RX_QUEUE);

    // No buffer posted: the frame waits in the device.
    let f1 = frame(MAC, [0x02, 0, 0, 0, 0, 1], b"first");
    wire.send(&f1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while d.t.device().rx_stop() != RxStop::NoBuffers && Instant::now() < deadline {
        d.t.poll(RX_QUEUE as u32);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(d.t.device().rx_stop(), RxStop::NoBuffers);

    // Paused: a second frame stays in the TAP, and the pending one in the
    // device, even with buffers posted.
    d.t.device_mut().set_quiesced(true);
    let f2 = frame(MAC, [0x02, 0, 0, 0, 0, 2], b"second");
    wire.send(&f2).unwrap();
    for k in 0..4u64 {
        d.post(RX_QUEUE, &[(BUFS + k * 0x1000, 2048, true)]);
    }
    d.notify(RX_QUEUE);
    std::thread::sleep(Duration::from_millis(50));
    d.t.poll(RX_QUEUE as u32);
    assert_eq!(d.pop_used(RX_QUEUE), None, "nothing is written while paused");
    assert_eq!(d.t.device().rx_stop(), RxStop::Quiesced);

    // Resumed: both arrive, in order, once each.
    d.t.device_mut().set_quiesced(false);
    let mut got = Vec::new();
    while let Some((id, len)) = d.wait_rx() {
        got.push(d.read(BUFS + id as u64 * 0x1000 + VNET_HDR_LEN as u64, len as usize - VNET_HDR_LEN));
    }
    assert_eq!(got, vec![f1, f2]);
    assert_eq!(d.t.device().counters().rx_dropped, 0);
}

#[test]
fn malformed_chains_are_contained() {
    let (tt, tap) = tap("c");
    let wire = PacketSocket::bind(&tt.name, ETH_TEST, Duration::from_secs(2)).unwrap();
    let mut d = Driver::new(tap);
    d.init(ALL);

    // A transmit chain with a device-writable buffer: completed, not sent.
    let out = frame([0xff; 6], MAC, b"never sent");
    d.mem.write_slice(&out, GuestAddress(BUFS + 0x1000 + VNET_HDR_LEN as u64)).unwrap();
    d.post(TX_QUEUE, &[(BUFS + 0x1000, (VNET_HDR_LEN + out.len()) as u32, true)]);
    d.notify(TX_QUEUE);
    assert!(d.pop_used(TX_QUEUE).is_some());
    assert_eq!(d.t.guest_errors(), 1);
    // A transmit buffer outside guest memory: completed, not sent.
    d.post(TX_QUEUE, &[(MEM_SIZE as u64 - 8, 100, false)]);
    d.notify(TX_QUEUE);
    assert!(d.pop_used(TX_QUEUE).is_some());
    assert_eq!(d.t.guest_errors(), 2);
    // A receive chain with a device-readable buffer, and one too small for
    // the frame: both completed empty, the frames dropped and counted.
    d.post(RX_QUEUE, &[(BUFS, 2048, false)]);
    d.post(RX_QUEUE, &[(BUFS + 0x1000, 20, true)]);
    wire.send(&frame(MAC, [0x02, 0, 0, 0, 0, 3], b"x")).unwrap();
    wire.send(&frame(MAC, [0x02, 0, 0, 0, 0, 4], b"y")).unwrap();
    assert_eq!(d.wait_rx().map(|u| u.1), Some(0));
    assert_eq!(d.wait_rx().map(|u| u.1), Some(0));
    assert_eq!(d.t.guest_errors(), 4);
    assert!(!d.t.needs_reset(), "in-band rejections keep the device working");
    // The device still works.
    d.post(RX_QUEUE, &[(BUFS + 0x2000, 2048, true)]);
    let ok = frame(MAC, [0x02, 0, 0, 0, 0, 5], b"fine");
    wire.send(&ok).unwrap();
    let (_, len) = d.wait_rx().expect("delivered after the bad chains");
    assert_eq!(d.read(BUFS + 0x2000 + VNET_HDR_LEN as u64, len as usize - VNET_HDR_LEN), ok);
    assert_eq!(wire.recv(), None, "nothing malformed reached the wire");

    // A descriptor chain that loops: a structural violation, the device
    // needs a reset and does nothing more until it gets one.
    let i = d.next_desc[TX_QUEUE];
    d.put_desc(TX_QUEUE, i, BUFS, 64, F_NEXT, i);
    let slot = (d.avail[TX_QUEUE] % QSIZE) as u64;
    d.mem.write_obj(i, GuestAddress(RINGS[TX_QUEUE].1 + 4 + 2 * slot)).unwrap();
    d.avail[TX_QUEUE] += 1;
    d.mem.write_obj(d.avail[TX_QUEUE], GuestAddress(RINGS[TX_QUEUE].1 + 2)).unwrap();
    d.notify(TX_QUEUE);
    assert!(d.t.needs_reset());
    assert_ne!(d.r32(STATUS) & DEVICE_NEEDS_RESET, 0);
    // After a reset the driver can start over.
    d.avail = [0; 3];
    d.used = [0; 3];
    d.next_desc = [0; 3];
    for ring in RINGS {
        d.mem.write_slice(&[0u8; 0x3000], GuestAddress(ring.0)).unwrap();
    }
    d.init(ALL);
    assert!(!d.t.needs_reset());
}

#[test]
fn announce_reaches_the_wire_and_the_guest() {
    let (tt, tap) = tap("d");
    let rarp = PacketSocket::bind(&tt.name, announce::ETH_P_RARP, Duration::from_secs(2)).unwrap();
    let mut d = Driver::new(tap);
    d.init(ALL);

    // Host side: RARP from the guest's MAC into the TAP.
    d.t.device().announce_frame().unwrap();
    let f = rarp.recv().expect("the RARP announcement is on the wire");
    assert_eq!(&f[..], &announce::rarp_frame(MAC)[..]);

    // Guest side: ANNOUNCE in the status, a configuration interrupt, and
    // the driver's acknowledgement on the control queue clears it.
    let _ = d.irq.read();
    assert!(d.t.device_mut().request_guest_announce());
    d.t.config_changed();
    assert!(d.irq.read().is_ok());
    assert_ne!(d.r32(INTERRUPT_STATUS) & interrupt::CONFIG_CHANGE, 0);
    let mut st = [0u8; 2];
    d.t.read(CONFIG + 6, &mut st);
    assert_eq!(u16::from_le_bytes(st), VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE);
    d.mem.write_slice(&[VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK], GuestAddress(BUFS)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(BUFS + 0x100)).unwrap();
    d.post(CTRL_QUEUE, &[(BUFS, 2, false), (BUFS + 0x100, 1, true)]);
    d.notify(CTRL_QUEUE);
    assert_eq!(d.pop_used(CTRL_QUEUE), Some((0, 1)));
    assert_eq!(d.read(BUFS + 0x100, 1), vec![VIRTIO_NET_OK]);
    d.t.read(CONFIG + 6, &mut st);
    assert_eq!(u16::from_le_bytes(st), VIRTIO_NET_S_LINK_UP);
    // An unknown command is refused in-band.
    d.mem.write_slice(&[0, 0], GuestAddress(BUFS)).unwrap();
    d.post(CTRL_QUEUE, &[(BUFS, 2, false), (BUFS + 0x100, 1, true)]);
    d.notify(CTRL_QUEUE);
    assert_eq!(d.read(BUFS + 0x100, 1), vec![VIRTIO_NET_ERR]);

    // A driver without GUEST_ANNOUNCE is not asked.
    d.init(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
    assert!(!d.t.device_mut().request_guest_announce());
}
