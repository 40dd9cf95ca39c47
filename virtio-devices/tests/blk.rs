//! virtio-blk on virtio-mmio, driven through the register interface with
//! rings in real guest memory and real image files.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use virtio_devices::block::*;
use virtio_devices::regs::*;
use virtio_devices::status::*;
use virtio_devices::{interrupt, Block, MmioDevice, MmioState, VIRTIO_F_VERSION_1};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const ALL_STATUS: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

// ---------------------------------------------------------------------------
// Registers, feature negotiation, status machine.
// ---------------------------------------------------------------------------

#[test]
fn identification_registers_and_config() {
    let img = image(64);
    let mut d = Driver::open(img.as_path(), false);
    assert_eq!(d.r32(MAGIC_VALUE), 0x7472_6976);
    assert_eq!(&d.r32(MAGIC_VALUE).to_le_bytes(), b"virt");
    assert_eq!(d.r32(VERSION), 2);
    assert_eq!(d.r32(DEVICE_ID), 2);
    assert_ne!(d.r32(VENDOR_ID), 0);
    let f = d.device_features();
    assert_eq!(f & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
    assert_eq!(f & VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_FLUSH);
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    assert_eq!(d.r32(QUEUE_NUM_MAX), QUEUE_SIZE as u32);
    d.w32(QUEUE_SEL, 1);
    assert_eq!(d.r32(QUEUE_NUM_MAX), 0, "only one queue");
    // Capacity (le64) at config offset 0, readable in any access size.
    assert_eq!(d.r32(CONFIG), 64);
    assert_eq!(d.r32(CONFIG + 4), 0);
    let mut b8 = [0u8; 8];
    d.t.read(CONFIG, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), 64);
    let mut b1 = [0u8; 1];
    d.t.read(CONFIG, &mut b1);
    assert_eq!(b1[0], 64);
    assert_eq!(d.r32(CONFIG + 20), 512, "blk_size");
    assert_eq!(d.r32(CONFIG + 12), SEG_MAX);
    d.t.read(CONFIG + 0xe00, &mut b8);
    assert_eq!(b8, [0; 8], "beyond the config space reads as zero");
    d.t.read(u64::MAX, &mut b8);
    assert_eq!(d.t.guest_errors(), 0);
}

#[test]
fn feature_negotiation() {
    let img = image(8);
    let mut d = Driver::open(img.as_path(), false);
    // A feature not offered (bit 0, VIRTIO_BLK_F_BARRIER) is refused.
    assert!(!d.negotiate(VIRTIO_F_VERSION_1 | 1));
    assert_eq!(d.status(), ACKNOWLEDGE | DRIVER);
    // A legacy driver (no VERSION_1) is refused.
    assert!(!d.negotiate(VIRTIO_BLK_F_FLUSH));
    // Bits beyond 63 are refused.
    d.w32(STATUS, 0);
    d.w32(STATUS, ACKNOWLEDGE | DRIVER);
    d.w32(DRIVER_FEATURES_SEL, 1);
    d.w32(DRIVER_FEATURES, 1);
    d.w32(DRIVER_FEATURES_SEL, 2);
    d.w32(DRIVER_FEATURES, 1);
    d.w32(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(d.status() & FEATURES_OK, 0);
    // A subset of what is offered is accepted.
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    let all = d.device_features();
    assert!(d.negotiate(all));
    assert!(!d.t.needs_reset());
    // Features cannot change after FEATURES_OK.
    let before = d.t.driver_features();
    d.w32(DRIVER_FEATURES_SEL, 0);
    d.w32(DRIVER_FEATURES, 0);
    assert_eq!(d.t.driver_features(), before);
    assert_eq!(d.t.guest_errors(), 1);
    // Refusal is negotiation, not a guest error; the write above was.
    d.init();
    assert!(d.t.is_active());
    assert_eq!(d.read_sectors(3, DATA, 512), VIRTIO_BLK_S_OK);
}

#[test]
fn status_machine_violations_need_reset() {
    let img = image(8);
    let mut d = Driver::open(img.as_path(), false);
    let cases: &[&[u32]] = &[
        &[DRIVER],                                         // DRIVER without ACKNOWLEDGE
        &[ACKNOWLEDGE, ACKNOWLEDGE | FEATURES_OK],         // FEATURES_OK without DRIVER
        &[ACKNOWLEDGE, ACKNOWLEDGE | DRIVER | DRIVER_OK],  // DRIVER_OK without FEATURES_OK
        &[ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE], // clearing a bit
        &[ACKNOWLEDGE | DEVICE_NEEDS_RESET],               // a device-only bit
        &[ACKNOWLEDGE | 0x100],                            // undefined bits
    ];
    for (n, seq) in cases.iter().enumerate() {
        d.w32(STATUS, 0);
        assert_eq!(d.status(), 0);
        for &s in seq.iter() {
            d.w32(STATUS, s);
        }
        assert!(d.needs_reset(), "case {n}: {seq:x?}");
        assert!(d.t.last_error().unwrap().contains("virtio-blk("), "{:?}", d.t.last_error());
        // Inert until reset: further status writes are ignored.
        d.w32(STATUS, ACKNOWLEDGE | DRIVER);
        assert!(d.needs_reset());
    }
    assert_eq!(d.t.guest_errors(), cases.len() as u64);
    // FAILED is accepted at any time and stops the device.
    d.init();
    d.w32(STATUS, ALL_STATUS | FAILED);
    assert!(!d.t.is_active());
    assert!(!d.needs_reset());
    // Reset brings everything back.
    d.init();
    assert_eq!(d.read_sectors(1, DATA, 512), VIRTIO_BLK_S_OK);
    assert_eq!(d.guest(DATA, 512), vec![1u8; 512]);
}

#[test]
fn interrupt_status_and_ack() {
    let img = image(8);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    assert_eq!(d.interrupts(), 0);
    assert_eq!(d.read_sectors(0, DATA, 512), VIRTIO_BLK_S_OK);
    assert_eq!(d.interrupts(), 1, "the irqfd was signalled");
    assert_eq!(d.r32(INTERRUPT_STATUS), interrupt::USED_RING);
    d.w32(INTERRUPT_ACK, interrupt::USED_RING);
    assert_eq!(d.r32(INTERRUPT_STATUS), 0);
    // VIRTQ_AVAIL_F_NO_INTERRUPT (a polling driver) suppresses the interrupt.
    d.mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
    assert_eq!(d.read_sectors(0, DATA, 512), VIRTIO_BLK_S_OK);
    assert_eq!(d.interrupts(), 0);
    assert_eq!(d.r32(INTERRUPT_STATUS), interrupt::USED_RING);
    // A protocol violation after DRIVER_OK raises a configuration change.
    d.w32(STATUS, ACKNOWLEDGE);
    assert!(d.needs_reset());
    assert_ne!(d.r32(INTERRUPT_STATUS) & interrupt::CONFIG_CHANGE, 0);
    assert_eq!(d.interrupts(), 1);
}

// ---------------------------------------------------------------------------
// I/O round trips.
// ---------------------------------------------------------------------------

#[test]
fn read_write_flush_get_id_round_trip() {
    let img = image(256);
    let mut d = Driver::open(img.as_path(), false);
    d.init();

    // Host-written file data appears in guest memory.
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 5, &[(DATA, 1024)]), (VIRTIO_BLK_S_OK, 1025));
    assert_eq!(d.guest(DATA, 512), vec![5u8; 512]);
    assert_eq!(d.guest(DATA + 512, 512), vec![6u8; 512]);
    img.as_file().write_all_at(&[0xabu8; 512], 7 * 512).unwrap();
    assert_eq!(d.read_sectors(7, DATA, 512), VIRTIO_BLK_S_OK);
    assert_eq!(d.guest(DATA, 512), vec![0xabu8; 512]);

    // Guest data lands in the file.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    d.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(d.request(VIRTIO_BLK_T_OUT, 10, &[(DATA, 4096)]), (VIRTIO_BLK_S_OK, 1));
    let mut back = vec![0u8; 4096];
    img.as_file().read_exact_at(&mut back, 10 * 512).unwrap();
    assert_eq!(back, pattern);
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));

    // Scattered data buffers, one straddling the boundary between the two
    // guest memory regions.
    let a = REGION - 1000;
    let b = DATA + 0x8000;
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 20, &[(a, 1536), (b, 512)]), (VIRTIO_BLK_S_OK, 2049));
    assert_eq!(d.guest(a, 512), vec![20u8; 512]);
    assert_eq!(d.guest(a + 512, 1024), [vec![21u8; 512], vec![22u8; 512]].concat());
    assert_eq!(d.guest(b, 512), vec![23u8; 512]);
    d.mem.write_slice(&[0x5a; 1536], GuestAddress(a)).unwrap();
    assert_eq!(d.request(VIRTIO_BLK_T_OUT, 100, &[(a, 1536)]).0, VIRTIO_BLK_S_OK);
    let mut back = vec![0u8; 1536];
    img.as_file().read_exact_at(&mut back, 100 * 512).unwrap();
    assert_eq!(back, vec![0x5a; 1536]);

    // GET_ID: the file name, truncated to 20 bytes.
    let (st, len) = d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 21));
    let name = img.as_path().file_name().unwrap().to_string_lossy().into_owned();
    let want = &name.as_bytes()[..name.len().min(20)];
    assert_eq!(&d.guest(DATA, want.len())[..], want);

    let c = d.t.device().counters();
    assert_eq!((c.reads, c.writes, c.flushes, c.io_errors), (3, 2, 1, 0));
    assert_eq!(c.read_bytes, 1024 + 512 + 2048);
    assert_eq!(d.t.guest_errors(), 0);
}

#[test]
fn any_layout_header_data_status_in_one_descriptor() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    // OUT: header and data in one readable descriptor.
    let mut req = vec![0u8; 16 + 512];
    req[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    req[8..16].copy_from_slice(&3u64.to_le_bytes());
    req[16..].fill(0x77);
    d.mem.write_slice(&req, GuestAddress(DATA)).unwrap();
    let used = d.submit(&[(DATA, 528, false), (STATUS_BYTE, 1, true)]).unwrap();
    assert_eq!(used, (0, 1));
    assert_eq!(d.guest(STATUS_BYTE, 1)[0], VIRTIO_BLK_S_OK);
    let mut back = [0u8; 512];
    img.as_file().read_exact_at(&mut back, 3 * 512).unwrap();
    assert_eq!(back, [0x77; 512]);
    // IN: data and status in one writable descriptor.
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&4u64.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let used = d.submit(&[(HDR, 16, false), (DATA, 513, true)]).unwrap();
    assert_eq!(used, (0, 513));
    assert_eq!(d.guest(DATA, 513), [vec![4u8; 512], vec![VIRTIO_BLK_S_OK]].concat());
}

#[test]
fn bad_requests_complete_with_error_status() {
    let img = image(64);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    // Out of range, partially out of range, overflowing sector numbers.
    assert_eq!(d.read_sectors(64, DATA, 512), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read_sectors(63, DATA, 1024), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read_sectors(u64::MAX, DATA, 512), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read_sectors(u64::MAX / 512, DATA, 512), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.write_sectors(1 << 60, DATA, 512), VIRTIO_BLK_S_IOERR);
    // The last sector is fine.
    assert_eq!(d.read_sectors(63, DATA, 512), VIRTIO_BLK_S_OK);
    // Lengths that are not a multiple of 512, or zero.
    assert_eq!(d.read_sectors(0, DATA, 100), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.write_sectors(0, DATA, 513), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, &[]).0, VIRTIO_BLK_S_IOERR);
    // Unsupported request types (DISCARD, WRITE_ZEROES, garbage).
    for kind in [11, 13, 0xdead_beef] {
        assert_eq!(d.request(kind, 0, &[(DATA, 512)]).0, VIRTIO_BLK_S_UNSUPP);
    }
    // None of these is a protocol violation, and the device still works.
    assert!(!d.needs_reset());
    assert_eq!(d.t.guest_errors(), 0);
    let mut back = [0u8; 512];
    img.as_file().read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, [0u8; 512], "rejected writes changed nothing");
    assert_eq!(d.read_sectors(2, DATA, 512), VIRTIO_BLK_S_OK);
    assert_eq!(d.guest(DATA, 512), vec![2u8; 512]);
}

#[test]
fn read_only_disk() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), true);
    assert!(d.device_features() & VIRTIO_BLK_F_RO != 0);
    d.init_with(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO);
    d.mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(d.write_sectors(1, DATA, 512), VIRTIO_BLK_S_IOERR);
    let mut back = [0u8; 512];
    img.as_file().read_exact_at(&mut back, 512).unwrap();
    assert_eq!(back, [1u8; 512]);
    assert_eq!(d.read_sectors(1, DATA, 512), VIRTIO_BLK_S_OK);
    assert_eq!(d.guest(DATA, 512), vec![1u8; 512]);
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.t.device().counters().io_errors, 1);
}

#[test]
fn writes_without_negotiated_flush_are_write_through() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    d.init_with(VIRTIO_F_VERSION_1);
    d.mem.write_slice(&[0x42; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(d.write_sectors(2, DATA, 512), VIRTIO_BLK_S_OK);
    let mut back = [0u8; 512];
    img.as_file().read_exact_at(&mut back, 1024).unwrap();
    assert_eq!(back, [0x42; 512]);
}

#[test]
fn device_writes_mark_the_dirty_bitmap() {
    let img = image(64);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    // Set up the request, then forget everything dirtied so far.
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&8u64.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    for (i, &(a, l, w)) in
        [(HDR, 16u32, false), (REGION + 0x3000, 8192, true), (STATUS_BYTE, 1, true)].iter().enumerate()
    {
        d.put_desc(i as u16, a, l, if i < 2 { F_NEXT } else { 0 } | if w { F_WRITE } else { 0 }, i as u16 + 1);
    }
    d.push_avail(0, 1);
    for r in d.mem.iter() {
        // The region's own AtomicBitmap (MmapRegion::bitmap), not a slice.
        std::ops::Deref::deref(r).bitmap().reset();
    }
    let dirty = |d: &Driver, addr: u64| {
        let r = d.mem.find_region(GuestAddress(addr)).unwrap();
        r.bitmap().dirty_at((addr - r.start_addr().0) as usize)
    };
    assert!(!dirty(&d, REGION + 0x3000));
    d.w32(QUEUE_NOTIFY, 0);
    assert_eq!(d.pop_used(), Some((0, 8193)));
    let want: Vec<u8> = (8..24u8).flat_map(|s| [s; 512]).collect();
    assert!(d.guest(REGION + 0x3000, 8192) == want);
    // The data pages (in the second region), the status byte and the used
    // ring are dirty; untouched pages are not.
    assert!(dirty(&d, REGION + 0x3000));
    assert!(dirty(&d, REGION + 0x4000));
    assert!(dirty(&d, STATUS_BYTE));
    assert!(dirty(&d, USED));
    assert!(!dirty(&d, REGION + 0x2000));
    assert!(!dirty(&d, REGION + 0x5000));
    assert!(!dirty(&d, DESC), "the device only reads descriptors");
    assert!(!dirty(&d, DATA + 0x10000));
}

// ---------------------------------------------------------------------------
// State.
// ---------------------------------------------------------------------------

#[test]
fn state_round_trip_continues_on_a_new_transport() {
    let img = image(32);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    for s in 0..3 {
        assert_eq!(d.read_sectors(s, DATA, 512), VIRTIO_BLK_S_OK);
    }
    let st = d.t.state();
    assert_eq!(st.status, ALL_STATUS);
    assert_eq!(st.queues.len(), 1);
    assert_eq!((st.queues[0].next_avail, st.queues[0].next_used), (3, 3));
    assert_eq!(st.queues[0].desc_table, DESC);
    let bytes = st.encode();
    let decoded = MmioState::decode(&bytes).unwrap();
    assert_eq!(decoded, st);
    for n in 0..bytes.len() {
        assert!(MmioState::decode(&bytes[..n]).is_err());
    }

    // A new transport over the same memory picks up where the old one left.
    let mut d2 = Driver::with_memory(Block::open(img.as_path(), false).unwrap(), d.mem.clone());
    d2.t.restore(&decoded).unwrap();
    assert_eq!(d2.t.state(), st);
    d2.avail_idx = d.avail_idx;
    d2.used_idx = d.used_idx;
    assert!(d2.t.is_active());
    assert_eq!(d2.read_sectors(9, DATA, 512), VIRTIO_BLK_S_OK);
    assert_eq!(d2.guest(DATA, 512), vec![9u8; 512]);
    assert_eq!(d2.interrupts(), 1);

    // Invalid states are refused, not trusted, and change nothing.
    let fresh = || Driver::with_memory(Block::open(img.as_path(), false).unwrap(), d.mem.clone());
    let mut bad = st.clone();
    bad.queues[0].size = 3;
    let mut d3 = fresh();
    assert!(d3.t.restore(&bad).is_err());
    assert_eq!(d3.t.state(), fresh().t.state());
    let mut bad = st.clone();
    bad.queues.push(bad.queues[0]);
    assert!(fresh().t.restore(&bad).is_err());
    let mut bad = st.clone();
    bad.driver_features |= 1;
    assert!(fresh().t.restore(&bad).unwrap_err().contains("not offered"));
    let mut bad = st.clone();
    bad.status |= DEVICE_NEEDS_RESET;
    assert!(fresh().t.restore(&bad).is_err());
    // Rings outside memory: restored, but in DEVICE_NEEDS_RESET.
    let mut bad = st.clone();
    bad.queues[0].used_ring = MEM_END;
    let mut d4 = fresh();
    d4.t.restore(&bad).unwrap();
    assert!(d4.t.needs_reset());
    assert_eq!(d4.t.guest_errors(), 1);
    works_after_reset(&mut d4);
}

// ---------------------------------------------------------------------------
// Garbage from the driver.
// ---------------------------------------------------------------------------

/// Asserts the device recovers after a reset.
fn works_after_reset(d: &mut Driver) {
    d.init();
    assert!(d.t.is_active());
    assert_eq!(d.read_sectors(4, DATA, 512), VIRTIO_BLK_S_OK);
    assert_eq!(d.guest(DATA, 512), vec![4u8; 512]);
}

#[test]
fn queue_size_not_power_of_two() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    d.w32(QUEUE_SEL, 0);
    d.w32(QUEUE_NUM, 3);
    assert!(d.needs_reset());
    assert_eq!(d.t.guest_errors(), 1);
    assert!(d.t.last_error().unwrap().contains("invalid size 3"));
    // Too large, zero.
    for n in [512, 0, 0x1_0000] {
        d.negotiate(VIRTIO_F_VERSION_1);
        d.w32(QUEUE_NUM, n);
        assert!(d.needs_reset(), "size {n}");
    }
    works_after_reset(&mut d);
}

#[test]
fn misaligned_ring_addresses() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    for (reg, addr) in [(QUEUE_DESC_LOW, DESC + 8), (QUEUE_DRIVER_LOW, AVAIL + 1), (QUEUE_DEVICE_LOW, USED + 2)] {
        d.negotiate(VIRTIO_F_VERSION_1);
        d.w32(reg, addr as u32);
        assert!(d.needs_reset(), "{reg:#x}");
    }
    works_after_reset(&mut d);
}

#[test]
fn rings_outside_memory() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    let cases = [
        (MEM_END, AVAIL, USED),
        (DESC, MEM_END - 16, USED),           // avail ring runs past the end
        (DESC, AVAIL, 0xd000_0000),           // MMIO hole
        (DESC, AVAIL, !3),                    // would overflow
        (0xffff_ffff_ffff_fff0, AVAIL, USED), // would overflow
    ];
    for (i, &(desc, avail, used)) in cases.iter().enumerate() {
        assert!(d.negotiate(VIRTIO_F_VERSION_1));
        d.setup_queue(16, desc, avail, used);
        assert!(!d.needs_reset());
        d.w32(STATUS, ALL_STATUS);
        assert!(d.needs_reset(), "case {i}");
        assert!(d.t.last_error().unwrap().contains("outside guest memory"), "{:?}", d.t.last_error());
        // Notifications are ignored until reset.
        d.w32(QUEUE_NOTIFY, 0);
    }
    assert_eq!(d.t.guest_errors(), cases.len() as u64);
    works_after_reset(&mut d);
}

#[test]
fn data_buffer_outside_memory_is_an_io_error() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    for addr in [MEM_END, MEM_END - 256, 0xd000_0000, u64::MAX - 100] {
        assert_eq!(d.read_sectors(0, addr, 512), VIRTIO_BLK_S_IOERR, "{addr:#x}");
        assert_eq!(d.write_sectors(0, addr, 512), VIRTIO_BLK_S_IOERR, "{addr:#x}");
    }
    // Header outside memory: also reported in-band.
    d.mem.write_obj(0xffu8, GuestAddress(STATUS_BYTE)).unwrap();
    assert!(d.submit(&[(MEM_END + 0x1000, 16, false), (DATA, 512, true), (STATUS_BYTE, 1, true)]).is_some());
    assert_eq!(d.guest(STATUS_BYTE, 1)[0], VIRTIO_BLK_S_IOERR);
    assert!(!d.needs_reset());
    assert_eq!(d.t.guest_errors(), 9);
    assert!(d.t.last_error().unwrap().contains("outside guest memory"));
    assert_eq!(d.read_sectors(4, DATA, 512), VIRTIO_BLK_S_OK);
}

#[test]
fn status_byte_outside_memory_needs_reset() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    d.mem.write_slice(&[0u8; 16], GuestAddress(HDR)).unwrap();
    assert!(d.submit(&[(HDR, 16, false), (DATA, 512, true), (MEM_END, 1, true)]).is_none());
    assert!(d.needs_reset());
    works_after_reset(&mut d);
    // Status descriptor not device-writable / zero-length.
    assert!(d.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS_BYTE, 1, false)]).is_none());
    assert!(d.needs_reset());
    works_after_reset(&mut d);
    d.put_desc(0, HDR, 16, F_NEXT, 1);
    d.put_desc(1, STATUS_BYTE, 0, F_WRITE, 0);
    d.push_avail(0, 1);
    d.w32(QUEUE_NOTIFY, 0);
    assert!(d.needs_reset());
    works_after_reset(&mut d);
}

#[test]
fn huge_lengths() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    // A data buffer of ~4 GiB: outside memory, and over the request cap.
    assert_eq!(d.read_sectors(0, DATA, 0xffff_fe00), VIRTIO_BLK_S_IOERR);
    // Within memory but over the capacity.
    assert_eq!(d.read_sectors(0, 0, (MEM_END as u32) & !511), VIRTIO_BLK_S_IOERR);
    // Many descriptors whose lengths add up beyond u32.
    let mut bufs = vec![(HDR, 16u32, false)];
    bufs.extend((0..8).map(|_| (DATA, 0xffff_fe00u32, true)));
    bufs.push((STATUS_BYTE, 1, true));
    d.mem.write_slice(&[0u8; 16], GuestAddress(HDR)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(STATUS_BYTE)).unwrap();
    // A huge header descriptor.
    d.submit(&[(HDR, 0xffff_fff0, false), (STATUS_BYTE, 1, true)]);
    assert_eq!(d.guest(STATUS_BYTE, 1)[0], VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read_sectors(4, DATA, 512), VIRTIO_BLK_S_OK);
    assert!(!d.needs_reset());
    // A chain longer than 2^32 bytes in total is a protocol violation
    // (VIRTIO 1.x 2.7.5.2) and cannot be parsed: DEVICE_NEEDS_RESET.
    assert!(d.submit(&bufs).is_none());
    assert!(d.needs_reset());
    works_after_reset(&mut d);
}

#[test]
fn looping_and_broken_chains() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    // A descriptor pointing at itself.
    d.init();
    d.put_desc(0, HDR, 16, F_NEXT, 0);
    d.push_avail(0, 1);
    d.w32(QUEUE_NOTIFY, 0);
    assert!(d.needs_reset());
    assert!(d.t.last_error().unwrap().contains("truncated"), "{:?}", d.t.last_error());
    works_after_reset(&mut d);
    // A longer cycle, with writable descriptors (the last one seen is writable).
    d.put_desc(0, HDR, 16, F_NEXT, 1);
    d.put_desc(1, DATA, 512, F_NEXT | F_WRITE, 2);
    d.put_desc(2, STATUS_BYTE, 1, F_NEXT | F_WRITE, 1);
    d.push_avail(0, 1);
    d.w32(QUEUE_NOTIFY, 0);
    assert!(d.needs_reset());
    works_after_reset(&mut d);
    // next index beyond the queue size.
    d.put_desc(0, HDR, 16, F_NEXT, 200);
    d.push_avail(0, 1);
    d.w32(QUEUE_NOTIFY, 0);
    assert!(d.needs_reset());
    works_after_reset(&mut d);
    // Head index beyond the queue size.
    d.push_avail(999, 1);
    d.w32(QUEUE_NOTIFY, 0);
    assert!(d.needs_reset());
    works_after_reset(&mut d);
    // An indirect table that nests another indirect descriptor.
    d.put_desc(0, 0x9000, 32, 4, 0);
    d.mem.write_slice(&[0u8; 32], GuestAddress(0x9000)).unwrap();
    d.mem.write_obj(4u16, GuestAddress(0x9000 + 12)).unwrap();
    d.push_avail(0, 1);
    d.w32(QUEUE_NOTIFY, 0);
    assert!(d.needs_reset());
    works_after_reset(&mut d);
}

#[test]
fn avail_index_jump() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    d.mem.write_slice(&[0u8; 16], GuestAddress(HDR)).unwrap();
    d.put_desc(0, HDR, 16, F_NEXT, 1);
    d.put_desc(1, STATUS_BYTE, 1, F_WRITE, 0);
    d.push_avail(0, 1000);
    d.w32(QUEUE_NOTIFY, 0);
    assert!(d.needs_reset());
    assert!(d.pop_used().is_none());
    assert!(d.t.last_error().unwrap().contains("available ring"), "{:?}", d.t.last_error());
    works_after_reset(&mut d);
    // Exactly a queue's worth ahead is legal (all entries point at one chain).
    d.push_avail(0, d.qsize);
    d.w32(QUEUE_NOTIFY, 0);
    assert!(!d.needs_reset());
    let mut n = 0;
    while d.pop_used().is_some() {
        n += 1;
    }
    assert_eq!(n, d.qsize);
}

#[test]
fn notify_of_nonexistent_queue_and_register_misuse() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    // Before DRIVER_OK.
    d.w32(QUEUE_NOTIFY, 0);
    assert_eq!(d.t.guest_errors(), 1);
    d.init();
    for q in [1, 7, u32::MAX] {
        d.w32(QUEUE_NOTIFY, q);
    }
    assert_eq!(d.t.guest_errors(), 4);
    assert!(d.t.last_error().unwrap().contains("nonexistent queue"));
    // Odd-sized and unaligned register accesses are ignored.
    d.t.write(STATUS, &[0]);
    d.t.write(STATUS, &[0, 0]);
    d.t.write(STATUS, &[0; 8]);
    d.t.write(STATUS + 1, &[0; 4]);
    d.t.write(QUEUE_NOTIFY + 2, &[0; 4]);
    let mut b = [0xffu8; 2];
    d.t.read(MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    d.t.read(MAGIC_VALUE + 2, &mut b);
    assert_eq!(b, [0; 4]);
    d.t.write(STATUS, &[]);
    d.t.read(STATUS, &mut []);
    // Writes to read-only registers, queue registers after DRIVER_OK.
    d.w32(MAGIC_VALUE, 0);
    d.w32(QUEUE_NUM, 4);
    d.w32(QUEUE_SEL, 5);
    assert_eq!(d.r32(QUEUE_NUM_MAX), 0);
    d.w32(QUEUE_SEL, 0);
    assert_eq!(d.t.guest_errors(), 4 + 9 + 2);
    assert_eq!(d.status(), ALL_STATUS, "none of this needs a reset");
    assert_eq!(d.read_sectors(4, DATA, 512), VIRTIO_BLK_S_OK);
}

#[test]
fn wrong_direction_buffers_are_io_errors() {
    let img = image(16);
    let mut d = Driver::open(img.as_path(), false);
    d.init();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    // A read whose data buffer is device-readable.
    d.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS_BYTE, 1, true)]).unwrap();
    assert_eq!(d.guest(STATUS_BYTE, 1)[0], VIRTIO_BLK_S_IOERR);
    // A readable descriptor after a writable one.
    d.submit(&[(HDR, 16, false), (DATA, 512, true), (DATA + 512, 512, false), (STATUS_BYTE, 1, true)]).unwrap();
    assert_eq!(d.guest(STATUS_BYTE, 1)[0], VIRTIO_BLK_S_IOERR);
    // A header shorter than 16 bytes.
    d.submit(&[(HDR, 8, false), (DATA, 512, true), (STATUS_BYTE, 1, true)]).unwrap();
    assert_eq!(d.guest(STATUS_BYTE, 1)[0], VIRTIO_BLK_S_IOERR);
    assert_eq!(d.t.guest_errors(), 3);
    assert!(!d.needs_reset());
}

#[test]
fn random_register_writes() {
    let img = image(64);
    let mut d = Driver::open(img.as_path(), false);
    // Random guest memory, so whatever rings the fuzzing sets up hold garbage.
    let mut rng = Rng::new(0x5eed_0001);
    let junk: Vec<u8> = (0..MEM_END).map(|_| rng.next() as u8).collect();
    d.mem.write_slice(&junk, GuestAddress(0)).unwrap();
    let regs = [
        DEVICE_FEATURES_SEL,
        DRIVER_FEATURES,
        DRIVER_FEATURES_SEL,
        QUEUE_SEL,
        QUEUE_NUM,
        QUEUE_READY,
        QUEUE_NOTIFY,
        INTERRUPT_ACK,
        STATUS,
        QUEUE_DESC_LOW,
        QUEUE_DESC_HIGH,
        QUEUE_DRIVER_LOW,
        QUEUE_DRIVER_HIGH,
        QUEUE_DEVICE_LOW,
        QUEUE_DEVICE_HIGH,
    ];
    let mut activated = 0;
    for i in 0..20_000 {
        match rng.below(10) {
            // A plausible driver bring-up with random ring addresses within
            // memory, so notifications reach request processing.
            0 => {
                d.negotiate(VIRTIO_F_VERSION_1 | (rng.next() & VIRTIO_BLK_F_FLUSH));
                let size = 1 << rng.below(9);
                let a = |r: &mut Rng, align: u64| (r.below(MEM_END + 0x1000)) & !(align - 1);
                let (x, y, z) = (a(&mut rng, 16), a(&mut rng, 2), a(&mut rng, 4));
                d.setup_queue(size, x, y, z);
                d.w32(STATUS, ALL_STATUS);
                activated += d.t.is_active() as u32;
                for _ in 0..rng.below(4) {
                    d.w32(QUEUE_NOTIFY, 0);
                }
            }
            1..=5 => {
                let off = regs[rng.below(regs.len() as u64) as usize];
                let v = match rng.below(4) {
                    0 => rng.below(4) as u32,
                    1 => 1 << rng.below(32),
                    _ => rng.next() as u32,
                };
                d.w32(off, v);
            }
            6 => {
                let off = rng.below(0x200);
                let len = [1, 2, 4, 8][rng.below(4) as usize];
                let v = rng.next().to_le_bytes();
                d.t.write(off, &v[..len]);
            }
            _ => {
                let off = rng.below(0x200);
                let mut b = [0u8; 8];
                let len = [1, 2, 4, 8][rng.below(4) as usize];
                d.t.read(off, &mut b[..len]);
            }
        }
        if i % 1000 == 0 {
            // Random garbage into the rings, too.
            let st = d.t.state();
            let q = st.queues[0];
            for a in [q.desc_table, q.avail_ring, q.used_ring] {
                let _ = d.mem.write_slice(&rng.next().to_le_bytes(), GuestAddress(a.wrapping_add(rng.below(64))));
            }
        }
    }
    assert!(activated > 0, "the fuzzer never activated the device");
    assert!(d.t.guest_errors() > 100, "{}", d.t.guest_errors());
    works_after_reset(&mut d);
}

#[test]
fn random_chains() {
    let img = image(64);
    let mut d = Driver::open(img.as_path(), false);
    let mut rng = Rng::new(0x00c4_a145);
    d.init();
    let (mut completed, mut resets) = (0, 0);
    for _ in 0..3000 {
        // Random descriptors, mostly near plausible buffers.
        for i in 0..d.qsize {
            let addr = match rng.below(4) {
                0 => rng.next(),
                1 => MEM_END - rng.below(1024),
                _ => DATA + rng.below(0x10000),
            };
            let len = match rng.below(3) {
                0 => rng.next() as u32,
                1 => 1 + rng.below(16) as u32,
                _ => 512 * rng.below(4) as u32,
            };
            let flags = rng.below(8) as u16;
            let next = rng.below(d.qsize as u64 + 2) as u16;
            d.put_desc(i, addr, len, flags, next);
        }
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&[0u32, 1, 4, 8, 99][rng.below(5) as usize].to_le_bytes());
        h[8..16].copy_from_slice(&rng.below(80).to_le_bytes());
        let _ = d.mem.write_slice(&h, GuestAddress(DATA + rng.below(0x10000)));
        for _ in 0..1 + rng.below(3) {
            let advance = if rng.below(20) == 0 { rng.next() as u16 } else { 1 };
            d.push_avail(rng.below(d.qsize as u64 + 1) as u16, advance);
        }
        d.w32(QUEUE_NOTIFY, 0);
        while d.pop_used().is_some() {
            completed += 1;
        }
        if d.needs_reset() {
            resets += 1;
            d.init();
        }
    }
    assert!(completed > 100 && resets > 100, "completed {completed}, resets {resets}");
    works_after_reset(&mut d);
}

#[test]
fn empty_and_tiny_images() {
    for size in [0u64, 100, 511] {
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        t.as_file().set_len(size).unwrap();
        let mut d = Driver::open(t.as_path(), false);
        d.init();
        assert_eq!(d.r32(CONFIG), 0);
        assert_eq!(d.read_sectors(0, DATA, 512), VIRTIO_BLK_S_IOERR);
        assert_eq!(d.write_sectors(0, DATA, 512), VIRTIO_BLK_S_IOERR);
    }
}

#[test]
fn serial_can_be_set() {
    let img = image(4);
    let mut b = Block::open(img.as_path(), false).unwrap();
    b.set_serial("a-very-long-serial-number-indeed");
    assert_eq!(b.serial(), b"a-very-long-serial-n");
    let mut d = Driver::new(b);
    d.init();
    assert_eq!(d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 512)]), (VIRTIO_BLK_S_OK, 21));
    assert_eq!(d.guest(DATA, 20), b"a-very-long-serial-n");
    // A buffer shorter than 20 bytes gets a prefix.
    assert_eq!(d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 100, 6)]), (VIRTIO_BLK_S_OK, 7));
    assert_eq!(d.guest(DATA + 100, 6), b"a-very");
}
