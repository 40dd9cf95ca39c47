//! The enlightenment device on virtio-mmio, driven through the register
//! interface like a guest driver would, with both rings and all messages and
//! maps in real guest memory (`GuestMemoryMmap<AtomicBitmap>`).

mod common;

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use bitmap_abi::wire::{self, Class, Command, Extent, Kind, ReadyInfo};
use bitmap_abi::FreeBitmap;
use common::{memory, Mem, Rng, F_NEXT, F_WRITE, MEM_END, REGION};
use virtio_devices::enlighten::{deliver, error_code_name};
use virtio_devices::regs::*;
use virtio_devices::status::*;
use virtio_devices::{Enlighten, EnlightenError, EnlightenHandle, EventFdInterrupt, MmioDevice, MmioTransport, Phase};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Transport = MmioTransport<Enlighten, Mem>;

const QSIZE: u16 = wire::QUEUE_SIZE;
/// Rings of queue 0 and 1.
const RINGS: [(u64, u64, u64); 2] = [(0x1000, 0x1200, 0x1400), (0x2000, 0x2200, 0x2400)];
/// Command buffers: QSIZE x 256 bytes.
const CMD_BUFS: u64 = 0x8000;
/// Reply area (up to 128 KiB).
const REPLY: u64 = 0x20000;
/// Maps: 2 MiB of guest memory = 512 frames; the free bitmap in two
/// extents, the priority map straddling the boundary between the regions.
const FRAMES: u64 = MEM_END / wire::PAGE_SIZE;
const FREE_EXTENTS: [Extent; 2] = [Extent { gpa: 0x40000, len: 40 }, Extent { gpa: 0x41000, len: 24 }];
const PRIO_EXTENTS: [Extent; 1] = [Extent { gpa: REGION - 100, len: 256 }];
const LONG: Duration = Duration::from_secs(10);

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_idx: u16,
    next_desc: u16,
}

/// A guest driver for the enlightenment device.
struct Guest {
    t: Arc<Mutex<Transport>>,
    mem: Arc<Mem>,
    irq: EventFd,
    rings: [Ring; 2],
    h: EnlightenHandle,
}

fn lock(t: &Mutex<Transport>) -> MutexGuard<'_, Transport> {
    t.lock().unwrap()
}

impl Guest {
    fn new() -> Self {
        let mem = memory();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = Enlighten::new();
        let h = dev.handle();
        let t = MmioTransport::new(dev, mem.clone(), Arc::new(EventFdInterrupt::new(irq.try_clone().unwrap())));
        let rings =
            RINGS.map(|(desc, avail, used)| Ring { desc, avail, used, avail_idx: 0, used_idx: 0, next_desc: 0 });
        Self { t: Arc::new(Mutex::new(t)), mem, irq, rings, h }
    }

    /// Registers a notifier that delivers queued commands at once (as the
    /// VMM's control thread would).
    fn with_notifier(self) -> Self {
        let t = self.t.clone();
        self.h.set_notifier(move || {
            deliver(&mut lock(&t));
        });
        self
    }

    fn w32(&self, off: u64, v: u32) {
        lock(&self.t).write(off, &v.to_le_bytes());
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        lock(&self.t).read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn guest_errors(&self) -> u64 {
        lock(&self.t).guest_errors()
    }

    fn last_error(&self) -> String {
        lock(&self.t).last_error().unwrap_or_default().to_string()
    }

    fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    fn init(&mut self) {
        self.w32(STATUS, 0);
        self.w32(STATUS, ACKNOWLEDGE);
        self.w32(STATUS, ACKNOWLEDGE | DRIVER);
        self.w32(DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(DEVICE_FEATURES) as u64;
        self.w32(DEVICE_FEATURES_SEL, 1);
        let features = lo | (self.r32(DEVICE_FEATURES) as u64) << 32;
        assert_eq!(features, wire::DEVICE_FEATURES);
        self.w32(DRIVER_FEATURES_SEL, 0);
        self.w32(DRIVER_FEATURES, features as u32);
        self.w32(DRIVER_FEATURES_SEL, 1);
        self.w32(DRIVER_FEATURES, (features >> 32) as u32);
        self.w32(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(self.r32(STATUS) & FEATURES_OK, 0);
        self.mem.write_slice(&[0u8; 0x2000], GuestAddress(0x1000)).unwrap();
        for (i, r) in self.rings.iter_mut().enumerate() {
            self.t.lock().unwrap().write(QUEUE_SEL, &(i as u32).to_le_bytes());
            let w = |off: u64, v: u32| lock(&self.t).write(off, &v.to_le_bytes());
            let mut b = [0u8; 4];
            lock(&self.t).read(QUEUE_NUM_MAX, &mut b);
            assert_eq!(u32::from_le_bytes(b), QSIZE as u32);
            w(QUEUE_NUM, QSIZE as u32);
            w(QUEUE_DESC_LOW, r.desc as u32);
            w(QUEUE_DRIVER_LOW, r.avail as u32);
            w(QUEUE_DEVICE_LOW, r.used as u32);
            w(QUEUE_READY, 1);
            (r.avail_idx, r.used_idx, r.next_desc) = (0, 0, 0);
        }
        self.w32(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(lock(&self.t).is_active());
    }

    /// Posts a chain of (addr, len, flags) on queue `q` (without notifying).
    fn post(&mut self, q: usize, bufs: &[(u64, u32, u16)]) -> u16 {
        let r = &mut self.rings[q];
        let head = r.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == bufs.len();
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&(flags | if last { 0 } else { F_NEXT }).to_le_bytes());
            d[14..16].copy_from_slice(&((idx + 1) % QSIZE).to_le_bytes());
            self.mem.write_slice(&d, GuestAddress(r.desc + 16 * idx as u64)).unwrap();
        }
        r.next_desc = (head + bufs.len() as u16) % QSIZE;
        let slot = (r.avail_idx % QSIZE) as u64;
        self.mem.write_obj(head, GuestAddress(r.avail + 4 + 2 * slot)).unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        self.mem.write_obj(r.avail_idx, GuestAddress(r.avail + 2)).unwrap();
        head
    }

    fn notify(&self, q: u16) {
        self.w32(QUEUE_NOTIFY, q as u32);
    }

    /// Posts `n` 256-byte command buffers on queue 0 and notifies.
    fn post_cmd_buffers(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.rings[0].next_desc;
            self.post(0, &[(CMD_BUFS + 256 * i as u64, 256, F_WRITE)]);
        }
        self.notify(wire::CMD_QUEUE);
    }

    fn pop_used(&mut self, q: usize) -> Option<(u16, u32)> {
        let r = &mut self.rings[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(r.used + 2)).unwrap();
        if idx == r.used_idx {
            return None;
        }
        let slot = (r.used_idx % QSIZE) as u64;
        let id: u32 = self.mem.read_obj(GuestAddress(r.used + 4 + 8 * slot)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(r.used + 8 + 8 * slot)).unwrap();
        r.used_idx = r.used_idx.wrapping_add(1);
        Some((id as u16, len))
    }

    /// The next command the device completed on queue 0.
    fn command(&mut self) -> Option<Command> {
        let (id, len) = self.pop_used(0)?;
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(CMD_BUFS + 256 * id as u64)).unwrap();
        Some(Command::decode(&b).expect("the device sent an invalid command"))
    }

    /// Sends `msg` on queue 1 in one readable buffer; asserts it came back.
    fn reply(&mut self, msg: &[u8]) {
        self.mem.write_slice(msg, GuestAddress(REPLY)).unwrap();
        self.reply_chain(&[(REPLY, msg.len() as u32, 0)]);
    }

    fn reply_chain(&mut self, bufs: &[(u64, u32, u16)]) {
        let head = self.post(1, bufs);
        self.notify(wire::REPLY_QUEUE);
        assert_eq!(self.pop_used(1), Some((head, 0)), "reply buffer not returned");
    }

    /// Writes the maps of [`maps`] and returns a valid Ready for `seq`.
    fn write_maps(&self, seq: u32) -> Vec<u8> {
        let (free, prio) = maps();
        write_extents(&self.mem, &FREE_EXTENTS, &free);
        write_extents(&self.mem, &PRIO_EXTENTS, &prio);
        let mut counts = [0u64; wire::NUM_CLASSES];
        for p in 0..FRAMES {
            counts[wire::class_of(&prio, p).unwrap() as usize] += 1;
        }
        ready_msg(&info(seq, counts), &FREE_EXTENTS, &PRIO_EXTENTS)
    }
}

fn write_extents(mem: &Mem, extents: &[Extent], data: &[u8]) {
    let mut off = 0;
    for e in extents {
        mem.write_slice(&data[off..off + e.len as usize], GuestAddress(e.gpa)).unwrap();
        off += e.len as usize;
    }
    assert_eq!(off, data.len());
}

/// The guest's maps: frames 256..400 free; classes by frame number.
fn maps() -> (Vec<u8>, Vec<u8>) {
    let mut free = vec![0u8; wire::free_bitmap_len(FRAMES) as usize];
    let mut prio = vec![0u8; wire::priority_map_len(FRAMES) as usize];
    for p in 0..FRAMES {
        let is_free = (256..400).contains(&p);
        wire::set_free_bit(&mut free, p, is_free).unwrap();
        let c = if is_free { Class::Free } else { Class::ALL[(p % 9) as usize] };
        wire::set_class(&mut prio, p, c).unwrap();
    }
    (free, prio)
}

fn info(seq: u32, class_counts: [u64; wire::NUM_CLASSES]) -> ReadyInfo {
    ReadyInfo {
        seq,
        frames: FRAMES,
        sweep_us: 1234,
        classify_us: 5678,
        class_counts,
        free_extents: FREE_EXTENTS.len() as u32,
        prio_extents: PRIO_EXTENTS.len() as u32,
    }
}

fn ready_msg(info: &ReadyInfo, free: &[Extent], prio: &[Extent]) -> Vec<u8> {
    let mut info = *info;
    info.free_extents = free.len() as u32;
    info.prio_extents = prio.len() as u32;
    let mut b = vec![0u8; wire::MAX_MESSAGE];
    let n = info.encode(free, prio, &mut b).unwrap();
    b.truncate(n);
    b
}

fn simple(kind: Kind, seq: u32) -> Vec<u8> {
    let mut b = vec![0u8; wire::Header::LEN];
    wire::encode_simple(kind, seq, &mut b).unwrap();
    b
}

fn error_msg(seq: u32, code: u32) -> Vec<u8> {
    let mut b = vec![0u8; 24];
    wire::encode_error(seq, code, &mut b).unwrap();
    b
}

/// Prepare until the guest has the command; returns its seq.
fn prepared(g: &mut Guest) -> u32 {
    let seq = g.h.request_prepare(wire::DEFAULT_ACTIVE_WINDOW_MS).unwrap();
    match g.command() {
        Some(Command::Prepare(p)) => {
            assert_eq!(p.seq, seq);
            assert_eq!(p.active_window_ms, wire::DEFAULT_ACTIVE_WINDOW_MS);
        }
        other => panic!("expected Prepare {seq}, got {other:?}"),
    }
    seq
}

/// Releases whatever the guest holds with an Abort the guest acknowledges.
fn abort_and_ack(g: &mut Guest) {
    let a = g.h.send_abort().unwrap();
    assert_eq!(g.command(), Some(Command::Abort { seq: a }));
    g.reply(&simple(Kind::Ack, a));
    assert_eq!(g.h.wait_ack(LONG), Ok(()));
    assert_eq!(g.h.phase(), Phase::Idle);
}

// ---------------------------------------------------------------------------

#[test]
fn identification_and_config() {
    let mut g = Guest::new();
    assert_eq!(g.r32(MAGIC_VALUE), 0x7472_6976);
    assert_eq!(g.r32(DEVICE_ID), 63);
    assert_eq!(g.r32(CONFIG + wire::config::ABI_VERSION as u64), wire::VERSION as u32);
    assert_eq!(g.r32(CONFIG + wire::config::RESERVED as u64), 0);
    g.w32(QUEUE_SEL, 2);
    assert_eq!(g.r32(QUEUE_NUM_MAX), 0, "two queues only");
    g.init();
    assert_eq!(g.guest_errors(), 0);
}

#[test]
fn full_handshake_interrupt_driven() {
    let mut g = Guest::new().with_notifier();
    g.init();
    // Like a Linux driver at probe time: buffers posted long before any
    // command. Nothing is consumed while there is nothing to say.
    g.post_cmd_buffers(4);
    assert_eq!(g.pop_used(0), None);
    assert_eq!(g.interrupts(), 0);

    let seq = g.h.request_prepare(16_000).unwrap();
    // The notifier delivered it into the first posted buffer and raised the
    // interrupt.
    assert!(!g.h.has_undelivered());
    assert_eq!(g.interrupts(), 1);
    assert_ne!(g.r32(INTERRUPT_STATUS) & 1, 0);
    g.w32(INTERRUPT_ACK, 1);
    assert_eq!(g.command(), Some(Command::Prepare(wire::Prepare { seq, active_window_ms: 16_000 })));
    assert_eq!(g.command(), None, "one buffer per command");
    assert_eq!(g.h.phase(), Phase::Preparing);

    let msg = g.write_maps(seq);
    g.reply(&msg);
    assert_eq!(g.interrupts(), 1, "the used reply buffer");
    let ready = g.h.wait_ready(LONG).unwrap();
    assert_eq!(ready.seq(), seq);
    assert_eq!(ready.frames(), FRAMES);
    assert_eq!(ready.free_extents, FREE_EXTENTS);
    assert_eq!(ready.prio_extents, PRIO_EXTENTS);
    assert_eq!(ready.info.sweep_us, 1234);
    assert_eq!(g.h.phase(), Phase::Ready);

    let (free, prio) = g.h.read_maps(&*g.mem, &ready).unwrap();
    assert_eq!((free.clone(), prio.clone()), maps());
    let fb = FreeBitmap::new(&free, FRAMES).unwrap();
    assert_eq!(fb.free_runs().collect::<Vec<_>>(), vec![(256, 144)]);
    let pm = bitmap_abi::PriorityMap::new(&prio, FRAMES).unwrap();
    assert_eq!(pm.counts(), ready.info.class_counts);

    let done = g.h.send_done().unwrap();
    assert_eq!(done, seq + 1);
    assert_eq!(g.interrupts(), 1);
    assert_eq!(g.command(), Some(Command::Done { seq: done }));
    assert_eq!(g.h.phase(), Phase::Releasing);
    g.reply(&simple(Kind::Ack, done));
    assert_eq!(g.h.wait_ack(LONG), Ok(()));
    assert_eq!(g.h.phase(), Phase::Idle);
    // The maps are no longer the guest's promise.
    assert!(matches!(g.h.read_maps(&*g.mem, &ready), Err(EnlightenError::InvalidState(_))));

    let c = g.h.counters();
    assert_eq!((c.commands_requested, c.commands_delivered, c.ready_replies, c.acks), (2, 2, 1, 1));
    assert_eq!((c.protocol_errors, c.error_replies, c.stale_replies), (0, 0, 0));
    assert_eq!((c.last_sweep_us, c.last_classify_us), (1234, 5678));
    assert!(c.last_ready_latency.is_some() && c.last_ack_latency.is_some() && c.last_maps_read.is_some());
    assert_eq!(g.guest_errors(), 0, "{}", g.last_error());
    // Two buffers left posted; a second round uses them.
    let seq2 = prepared(&mut g);
    assert_eq!(seq2, done + 1);
    g.reply(&g.write_maps(seq2));
    g.h.wait_ready(LONG).unwrap();
    abort_and_ack(&mut g);
    assert_eq!(g.guest_errors(), 0);
}

#[test]
fn command_waits_for_a_buffer_or_for_deliver() {
    // No notifier: a command queued before the driver posts a buffer goes
    // out on the driver's next notification of queue 0.
    let mut g = Guest::new();
    let seq = g.h.request_prepare(100).unwrap();
    assert!(g.h.has_undelivered());
    // Not active yet: deliver does nothing (and is no guest error).
    assert!(deliver(&mut lock(&g.t)));
    g.init();
    assert!(g.h.has_undelivered());
    g.post_cmd_buffers(1);
    assert!(!g.h.has_undelivered());
    assert_eq!(g.interrupts(), 1);
    assert_eq!(g.command(), Some(Command::Prepare(wire::Prepare { seq, active_window_ms: 100 })));
    // A timeout leaves the Prepare outstanding: a later Ready still counts.
    assert!(matches!(g.h.wait_ready(Duration::from_millis(10)), Err(EnlightenError::Timeout { .. })));
    g.reply(&g.write_maps(seq));
    assert_eq!(g.h.wait_ready(LONG).unwrap().seq(), seq);
    // Buffers already posted: the command waits until the VMM calls deliver.
    g.post_cmd_buffers(2);
    let a = g.h.send_abort().unwrap();
    assert!(g.h.has_undelivered());
    assert_eq!(g.command(), None);
    assert!(!deliver(&mut lock(&g.t)));
    assert_eq!(g.command(), Some(Command::Abort { seq: a }));
    g.reply(&simple(Kind::Ack, a));
    assert_eq!(g.h.wait_ack(LONG), Ok(()));
    assert_eq!(g.guest_errors(), 0, "{}", g.last_error());
}

#[test]
fn polling_guest_and_host_thread() {
    // The host runs on a control thread; the guest polls its used ring with
    // interrupts suppressed (VIRTQ_AVAIL_F_NO_INTERRUPT) on another thread.
    let mut g = Guest::new().with_notifier();
    g.init();
    g.mem.write_obj(1u16, GuestAddress(RINGS[0].1)).unwrap();
    g.mem.write_obj(1u16, GuestAddress(RINGS[1].1)).unwrap();
    g.post_cmd_buffers(2);
    let h = g.h.clone();
    let mem = g.mem.clone();
    let host = thread::spawn(move || {
        let seq = h.request_prepare(5000)?;
        let ready = h.wait_ready(LONG)?;
        assert_eq!(ready.seq(), seq);
        let maps = h.read_maps(&*mem, &ready)?;
        h.send_done()?;
        h.wait_ack(LONG)?;
        Ok::<_, EnlightenError>((maps, h.counters()))
    });
    let deadline = Instant::now() + LONG;
    let mut acked = false;
    while !acked {
        assert!(Instant::now() < deadline, "guest saw no command");
        match g.command() {
            Some(Command::Prepare(p)) => {
                let m = g.write_maps(p.seq);
                g.reply(&m);
            }
            Some(Command::Done { seq }) => {
                g.reply(&simple(Kind::Ack, seq));
                acked = true;
            }
            Some(c) => panic!("unexpected {c:?}"),
            None => thread::sleep(Duration::from_millis(1)),
        }
    }
    let (maps_read, c) = host.join().unwrap().unwrap();
    assert_eq!(maps_read, maps());
    assert_eq!(g.interrupts(), 0, "the polling guest asked for no interrupts");
    assert_eq!((c.ready_replies, c.acks, c.timeouts), (1, 1, 0));
    assert_eq!(g.guest_errors(), 0);
}

#[test]
fn error_reply() {
    let mut g = Guest::new().with_notifier();
    g.init();
    g.post_cmd_buffers(8);
    let seq = prepared(&mut g);
    g.reply(&error_msg(seq, wire::error_code::NO_MEMORY));
    let e = g.h.wait_ready(LONG).unwrap_err();
    assert_eq!(e, EnlightenError::GuestError { seq, code: wire::error_code::NO_MEMORY });
    assert!(e.to_string().contains("no memory"), "{e}");
    assert_eq!(error_code_name(wire::error_code::BACKED_OFF), "backed off");
    assert_eq!(g.h.phase(), Phase::Idle);
    assert_eq!(g.h.counters().error_replies, 1);
    // An Error reply is the protocol working, not a guest error.
    assert_eq!(g.guest_errors(), 0);
    // Error to a Done.
    let seq = prepared(&mut g);
    g.reply(&g.write_maps(seq));
    g.h.wait_ready(LONG).unwrap();
    let d = g.h.send_done().unwrap();
    assert_eq!(g.command(), Some(Command::Done { seq: d }));
    g.reply(&error_msg(d, wire::error_code::BAD_STATE));
    assert_eq!(g.h.wait_ack(LONG), Err(EnlightenError::GuestError { seq: d, code: wire::error_code::BAD_STATE }));
    assert_eq!(g.h.phase(), Phase::Idle);
}

#[test]
fn guest_that_never_answers_times_out() {
    let mut g = Guest::new().with_notifier();
    // Never even initialised: the Prepare cannot be delivered.
    let t = Instant::now();
    let e = g.h.wait_ready(Duration::from_millis(30)).unwrap_err();
    assert!(matches!(e, EnlightenError::InvalidState(_)), "{e}");
    g.h.request_prepare(1000).unwrap();
    let e = g.h.wait_ready(Duration::from_millis(30)).unwrap_err();
    assert_eq!(e, EnlightenError::Timeout { waiting_for: "Ready", after: Duration::from_millis(30) });
    assert!(e.to_string().contains("no Ready"), "{e}");
    // Withdrawn: the guest never saw it.
    g.h.send_abort().unwrap();
    assert_eq!(g.h.wait_ack(Duration::ZERO), Ok(()));

    // Delivered but never answered.
    g.init();
    g.post_cmd_buffers(4);
    let seq = prepared(&mut g);
    assert!(matches!(g.h.wait_ready(Duration::from_millis(30)), Err(EnlightenError::Timeout { .. })));
    assert_eq!(g.h.phase(), Phase::Preparing, "still outstanding after a timeout");
    let a = g.h.send_abort().unwrap();
    assert_eq!(g.h.wait_ready(Duration::ZERO), Err(EnlightenError::Aborted));
    assert_eq!(g.command(), Some(Command::Abort { seq: a }));
    assert!(matches!(g.h.wait_ack(Duration::from_millis(30)), Err(EnlightenError::Timeout { waiting_for: "Ack", .. })));
    assert!(t.elapsed() < Duration::from_secs(5));
    // The guest wakes up: a late Ready and an Error to the superseded
    // Prepare are stale and ignored; then it acknowledges the Abort.
    g.reply(&g.write_maps(seq));
    g.reply(&error_msg(seq, wire::error_code::BACKED_OFF));
    assert_eq!(g.h.phase(), Phase::Releasing);
    g.reply(&simple(Kind::Ack, a));
    assert_eq!(g.h.wait_ack(LONG), Ok(()));
    let c = g.h.counters();
    assert_eq!((c.timeouts, c.stale_replies, c.protocol_errors), (3, 2, 0));
    assert_eq!(g.guest_errors(), 0);
}

/// Sends a bad reply to a Prepare; expects a Protocol error mentioning
/// `expect`, then releases with an Abort.
fn rejected(g: &mut Guest, what: &str, expect: &str, send: impl FnOnce(&mut Guest, u32)) {
    let errors = g.guest_errors();
    g.post_cmd_buffers(2);
    let seq = prepared(g);
    send(g, seq);
    match g.h.wait_ready(LONG) {
        Err(EnlightenError::Protocol(m)) => assert!(m.contains(expect), "{what}: {m:?} lacks {expect:?}"),
        other => panic!("{what}: {other:?}"),
    }
    assert_eq!(g.h.phase(), Phase::Failed, "{what}");
    assert!(matches!(g.h.request_prepare(1000), Err(EnlightenError::InvalidState(_))));
    assert_eq!(g.guest_errors(), errors + 1, "{what}");
    assert!(g.last_error().starts_with("virtio-enlighten: queue 1"), "{}", g.last_error());
    assert!(!lock(&g.t).needs_reset(), "{what}: in-band rejection only");
    abort_and_ack(g);
}

#[test]
fn garbage_replies_are_rejected() {
    let mut g = Guest::new().with_notifier();
    g.init();
    let good_info = |seq| info(seq, [0; wire::NUM_CLASSES]);
    let mut rng = Rng::new(3);
    for round in 0..20 {
        let len = 1 + rng.below(300) as usize;
        let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        rejected(&mut g, &format!("random bytes #{round}"), "rejected", |g, _| g.reply(&junk));
    }
    rejected(&mut g, "truncated Ready", "payload length", |g, seq| {
        let m = g.write_maps(seq);
        g.reply(&m[..m.len() - 3]);
    });
    rejected(&mut g, "Ready cut to a header", "truncated", |g, seq| {
        let m = g.write_maps(seq);
        let mut h = m[..20].to_vec();
        h[12..16].copy_from_slice(&4u32.to_le_bytes());
        g.reply(&h);
    });
    rejected(&mut g, "wrong seq", "expected", |g, seq| g.reply(&g.write_maps(seq + 7)));
    rejected(&mut g, "Ack to a Prepare", "Ack reply to the Prepare", |g, seq| g.reply(&simple(Kind::Ack, seq)));
    rejected(&mut g, "a command as reply", "Prepare reply", |g, seq| {
        let mut b = [0u8; wire::Prepare::LEN];
        wire::Prepare { seq, active_window_ms: 5 }.encode(&mut b).unwrap();
        g.reply(&b);
    });
    rejected(&mut g, "bad version", "ABI version", |g, seq| {
        let mut m = g.write_maps(seq);
        m[4] = 2;
        g.reply(&m);
    });
    rejected(&mut g, "extent outside memory", "out of bounds", |g, seq| {
        let prio = [Extent { gpa: MEM_END - 128, len: 256 }];
        g.reply(&ready_msg(&good_info(seq), &FREE_EXTENTS, &prio));
    });
    rejected(&mut g, "extent wrapping around", "out of bounds", |g, seq| {
        let free = [Extent { gpa: u64::MAX - 10, len: 64 }];
        g.reply(&ready_msg(&good_info(seq), &free, &PRIO_EXTENTS));
    });
    rejected(&mut g, "maps of the wrong size", "out of bounds", |g, seq| {
        let free = [Extent { gpa: 0x40000, len: 63 }];
        g.reply(&ready_msg(&good_info(seq), &free, &PRIO_EXTENTS));
    });
    rejected(&mut g, "more frames than memory", "out of bounds", |g, seq| {
        let mut i = good_info(seq);
        i.frames = FRAMES * 2;
        let free = [Extent { gpa: 0x40000, len: 128 }];
        let prio = [Extent { gpa: 0x50000, len: 512 }];
        g.reply(&ready_msg(&i, &free, &prio));
    });
    rejected(&mut g, "class counts above frames", "out of bounds", |g, seq| {
        let mut i = good_info(seq);
        i.class_counts[0] = FRAMES + 1;
        g.reply(&ready_msg(&i, &FREE_EXTENTS, &PRIO_EXTENTS));
    });
    rejected(&mut g, "oversized reply", "exceeds", |g, _| {
        g.reply_chain(&[(REPLY, 0x10000, 0), (REPLY + 0x10000, 0x1000, 0)]);
    });
    rejected(&mut g, "device-writable reply", "device-writable", |g, seq| {
        let m = simple(Kind::Ack, seq);
        g.mem.write_slice(&m, GuestAddress(REPLY)).unwrap();
        g.reply_chain(&[(REPLY, m.len() as u32, F_WRITE)]);
    });
    rejected(&mut g, "reply buffer outside memory", "outside guest memory", |g, _| {
        g.reply_chain(&[(MEM_END - 8, 64, 0)]);
    });
    rejected(&mut g, "Ready split over three descriptors, one bad", "payload length", |g, seq| {
        let m = g.write_maps(seq);
        g.mem.write_slice(&m, GuestAddress(REPLY)).unwrap();
        g.reply_chain(&[(REPLY, 10, 0), (REPLY + 10, 100, 0), (REPLY + 110, m.len() as u32 - 111, 0)]);
    });
    assert_eq!(g.h.counters().protocol_errors, g.guest_errors());
}

#[test]
fn scattered_ready_and_invalid_maps() {
    let mut g = Guest::new().with_notifier();
    g.init();
    g.post_cmd_buffers(8);
    // A valid Ready split over three descriptors is reassembled.
    let seq = prepared(&mut g);
    let m = g.write_maps(seq);
    g.mem.write_slice(&m, GuestAddress(REPLY)).unwrap();
    g.reply_chain(&[(REPLY, 10, 0), (REPLY + 10, 100, 0), (REPLY + 110, m.len() as u32 - 110, 0)]);
    let ready = g.h.wait_ready(LONG).unwrap();
    assert_eq!(g.h.read_maps(&*g.mem, &ready).unwrap(), maps());
    // The guest scribbles an invalid class (15) into its priority map, then
    // stray bits past the last frame into its free bitmap: read_maps refuses.
    g.mem.write_obj(0xf0u8, GuestAddress(PRIO_EXTENTS[0].gpa + 3)).unwrap();
    match g.h.read_maps(&*g.mem, &ready) {
        Err(EnlightenError::Protocol(m)) => assert!(m.contains("priority map") && m.contains("class 15"), "{m}"),
        other => panic!("{other:?}"),
    }
    abort_and_ack(&mut g);
    let seq = prepared(&mut g);
    let (mut free, prio) = maps();
    free[0] = 0xff;
    let m = g.write_maps(seq);
    write_extents(&g.mem, &FREE_EXTENTS, &free);
    write_extents(&g.mem, &PRIO_EXTENTS, &prio);
    g.reply(&m);
    let ready = g.h.wait_ready(LONG).unwrap();
    // Frames 0..8 marked free is allowed; maps whose extents do not match
    // the frame count are not.
    assert!(g.h.read_maps(&*g.mem, &ready).is_ok());
    let mut forged = ready.clone();
    forged.info.frames = FRAMES - 16;
    match g.h.read_maps(&*g.mem, &forged) {
        Err(EnlightenError::Protocol(m)) => assert!(m.contains("add up to"), "{m}"),
        other => panic!("{other:?}"),
    }
    abort_and_ack(&mut g);
    assert_eq!(g.guest_errors(), 0);
    assert_eq!(g.h.counters().protocol_errors, 2);
}

#[test]
fn abort_paths() {
    let mut g = Guest::new().with_notifier();
    g.init();
    g.post_cmd_buffers(8);
    // Abort after Ready.
    let seq = prepared(&mut g);
    g.reply(&g.write_maps(seq));
    let ready = g.h.wait_ready(LONG).unwrap();
    let a = g.h.send_abort().unwrap();
    assert!(matches!(g.h.send_abort(), Err(EnlightenError::InvalidState(_))), "one release at a time");
    assert!(matches!(g.h.send_done(), Err(EnlightenError::InvalidState(_))));
    assert!(matches!(g.h.read_maps(&*g.mem, &ready), Err(EnlightenError::InvalidState(_))));
    assert_eq!(g.command(), Some(Command::Abort { seq: a }));
    g.reply(&simple(Kind::Ack, a));
    assert_eq!(g.h.wait_ack(LONG), Ok(()));
    // Abort while the guest prepares: it backs off (stale Error) and acks.
    let seq = prepared(&mut g);
    let a = g.h.send_abort().unwrap();
    assert_eq!(g.h.wait_ready(Duration::ZERO), Err(EnlightenError::Aborted));
    assert_eq!(g.command(), Some(Command::Abort { seq: a }));
    g.reply(&error_msg(seq, wire::error_code::BACKED_OFF));
    // An Ack with the wrong seq fails the Abort; the guest may still hold
    // frames, so another Abort is allowed.
    g.reply(&simple(Kind::Ack, a + 1));
    assert!(matches!(g.h.wait_ack(LONG), Err(EnlightenError::Protocol(_))));
    assert_eq!(g.h.phase(), Phase::Failed);
    abort_and_ack(&mut g);
    // Abort in Idle is allowed too (e.g. after a restore).
    abort_and_ack(&mut g);
    assert_eq!(g.guest_errors(), 1);
    assert_eq!(g.h.counters().stale_replies, 1);
}

#[test]
fn unsolicited_replies_and_bad_command_buffers() {
    let mut g = Guest::new().with_notifier();
    g.init();
    // A reply with nothing outstanding: counted, no panic, nothing changes.
    g.reply(&g.write_maps(99));
    assert_eq!(g.guest_errors(), 1);
    assert!(g.last_error().contains("no command outstanding"), "{}", g.last_error());
    assert_eq!(g.h.phase(), Phase::Idle);
    // A too small command buffer and a device-readable one are returned
    // empty; the command goes into the next good one.
    g.post(0, &[(CMD_BUFS, 8, F_WRITE)]);
    g.post(0, &[(CMD_BUFS + 256, 64, 0)]);
    g.post(0, &[(CMD_BUFS + 512, 8, F_WRITE), (CMD_BUFS + 520, 16, F_WRITE)]);
    g.notify(wire::CMD_QUEUE);
    let seq = g.h.request_prepare(77).unwrap();
    assert_eq!(g.pop_used(0), Some((0, 0)));
    assert_eq!(g.pop_used(0), Some((1, 0)));
    assert_eq!(g.pop_used(0), Some((2, wire::Prepare::LEN as u32)));
    let mut b = [0u8; wire::Prepare::LEN];
    g.mem.read_slice(&mut b, GuestAddress(CMD_BUFS + 512)).unwrap();
    assert_eq!(Command::decode(&b), Ok(Command::Prepare(wire::Prepare { seq, active_window_ms: 77 })));
    assert_eq!(g.h.counters().bad_command_buffers, 2);
    assert_eq!(g.guest_errors(), 3);
    assert!(!lock(&g.t).needs_reset());
    // A looping descriptor chain is a structural violation: needs reset.
    let head = g.post(1, &[(REPLY, 16, F_NEXT)]);
    g.mem.write_obj(head, GuestAddress(RINGS[1].0 + 16 * head as u64 + 14)).unwrap();
    g.notify(wire::REPLY_QUEUE);
    assert!(lock(&g.t).needs_reset());
    assert!(g.last_error().contains("truncated") || g.last_error().contains("longer"), "{}", g.last_error());
}

#[test]
fn driver_reset_and_snapshot_state() {
    let mut g = Guest::new().with_notifier();
    g.init();
    g.post_cmd_buffers(2);
    prepared(&mut g);
    // The driver reloads: the delivered Prepare fails, the guest holds nothing.
    g.init();
    assert_eq!(g.h.wait_ready(LONG), Err(EnlightenError::DeviceReset));
    assert_eq!(g.h.phase(), Phase::Idle);
    // An undelivered command survives a reset and goes out once the new
    // driver posts a buffer.
    let seq = g.h.request_prepare(2000).unwrap();
    g.init();
    assert!(g.h.has_undelivered());
    g.post_cmd_buffers(4);
    assert_eq!(g.command(), Some(Command::Prepare(wire::Prepare { seq, active_window_ms: 2000 })));
    g.reply(&g.write_maps(seq));
    let ready = g.h.wait_ready(LONG).unwrap();

    // Snapshot in phase Ready; restore into a new device and transport
    // over the same memory (transport first: its restore resets the device).
    let dev_state = g.h.state();
    let mmio_state = lock(&g.t).state();
    let mut g2 = Guest::new().with_notifier();
    g2.mem = g.mem.clone();
    let dev = Enlighten::new();
    g2.h = dev.handle();
    let irq = g2.irq.try_clone().unwrap();
    *lock(&g2.t) = MmioTransport::new(dev, g.mem.clone(), Arc::new(EventFdInterrupt::new(irq)));
    let t2 = g2.t.clone();
    g2.h.set_notifier(move || {
        deliver(&mut lock(&t2));
    });
    lock(&g2.t).restore(&mmio_state).unwrap();
    g2.h.restore(&dev_state).unwrap();
    assert_eq!(g2.h.state(), dev_state);
    assert_eq!(g2.h.phase(), Phase::Ready);
    assert_eq!(g2.h.wait_ready(Duration::ZERO), Ok(ready.clone()));
    assert_eq!(g2.h.read_maps(&*g2.mem, &ready).unwrap(), maps());
    g2.rings = std::mem::replace(
        &mut g.rings,
        RINGS.map(|(desc, avail, used)| Ring { desc, avail, used, avail_idx: 0, used_idx: 0, next_desc: 0 }),
    );
    let d = g2.h.send_done().unwrap();
    assert_eq!(dev_state.command, None);
    assert_eq!(g2.command(), Some(Command::Done { seq: d }));
    g2.reply(&simple(Kind::Ack, d));
    assert_eq!(g2.h.wait_ack(LONG), Ok(()));
    assert_eq!(g2.guest_errors(), 0, "{}", g2.last_error());
}
