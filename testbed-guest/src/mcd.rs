//! The `mcd` workload on vCPU 0: a memcached server (the text protocol of
//! `testbed_workloads::mcd`, its checksummed store) on TCP/IP by smoltcp over
//! the VM's virtio-net device, polled; the other vCPUs park. Reports the
//! requests served as `ops` and checksum failures as `errors`.

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use testbed_abi::{BootInfo, WorkloadSpec, PAGE_SIZE};
use testbed_workloads::mcd::{Conn, Counters, SetMode, Store};

use crate::hw::{self, rdtsc};
use crate::net::Nic;
use crate::{enlighten, fail, println, share, Clock, PageAlloc};

/// Connections served at once (memslap's default concurrency is 16).
const SOCKETS: usize = 32;
const RX_BUF: usize = 16 << 10;
const TX_BUF: usize = 32 << 10;

/// `bytes` of fresh RAM from the heap as a byte slice.
fn take(heap: &mut PageAlloc, bytes: usize) -> &'static mut [u8] {
    let Some(a) = heap.alloc(bytes as u64) else { fail(format_args!("mcd: out of memory")) };
    // SAFETY: freshly allocated, page-aligned, identity-mapped RAM that
    // nothing else uses (the bump allocator never hands it out again).
    unsafe { core::slice::from_raw_parts_mut(a as *mut u8, bytes) }
}

/// Runs the server until the duration ends (never returns).
pub fn run(bi: &BootInfo, spec: &WorkloadSpec, clock: &Clock, mut enl: Option<enlighten::Enlighten>) -> ! {
    let (base, len) = share(bi, 0, 1);
    let mut heap = PageAlloc::new(bi);
    let mut nic = match Nic::init(bi.virtio_devices(), &mut heap) {
        Ok(n) => n,
        Err(e) => fail(format_args!("mcd: {e}")),
    };
    let tps = clock.ticks_per_sec.max(1);
    let now = || Instant::from_micros((rdtsc() as u128 * 1_000_000 / tps as u128) as i64);

    let storage = take(&mut heap, SOCKETS * core::mem::size_of::<SocketStorage>());
    // SAFETY: the allocation is sized for SOCKETS elements, page aligned (so
    // aligned for SocketStorage), and initialised right here.
    let storage: &'static mut [SocketStorage<'static>] = unsafe {
        let p = storage.as_mut_ptr() as *mut SocketStorage<'static>;
        for i in 0..SOCKETS {
            p.add(i).write(SocketStorage::EMPTY);
        }
        core::slice::from_raw_parts_mut(p, SOCKETS)
    };
    let mut sockets = SocketSet::new(storage);
    let mut handles = [None::<SocketHandle>; SOCKETS];
    for h in handles.iter_mut() {
        let rx = take(&mut heap, RX_BUF);
        let tx = take(&mut heap, TX_BUF);
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        s.set_nagle_enabled(false);
        s.set_timeout(Some(Duration::from_secs(120)));
        *h = Some(sockets.add(s));
    }
    let conns_mem = take(&mut heap, SOCKETS * core::mem::size_of::<Conn>());
    // SAFETY: as for the socket storage: sized, aligned, initialised here.
    let conns: &mut [Conn] = unsafe {
        let p = conns_mem.as_mut_ptr() as *mut Conn;
        for i in 0..SOCKETS {
            p.add(i).write(Conn::new());
        }
        core::slice::from_raw_parts_mut(p, SOCKETS)
    };

    // The driver's rings and buffers, the sockets and connections are in
    // use: never free to the enlightenment device (a migration must send them).
    let start = heap.next();
    if let Some(e) = &mut enl {
        e.note(base, start - base, enlighten::Class::MemoryIo);
    }
    // The store: the rest of vCPU 0's share, up to `share` percent of RAM.
    let end = base + len;
    let want = bi.total_ram() / 100 * spec.mcd.share_pct as u64;
    let bytes = want.min(end.saturating_sub(start)) / PAGE_SIZE * PAGE_SIZE;
    if let Some(e) = &mut enl {
        e.note(start, bytes, enlighten::Class::UserData);
    }
    // SAFETY: [start, start+bytes) is the unallocated rest of vCPU 0's share
    // (the other vCPUs park without touching RAM).
    let words = unsafe { hw::ram_words(start, bytes as usize / 8) };
    let Some(mut store) = Store::new(words, spec.mcd.max_value as usize) else {
        fail(format_args!("mcd: {} KiB are too few for the store", bytes >> 10))
    };

    let m = spec.mcd;
    let filled = fill(&mut store, m.fill_pct, spec.seed);
    let mut iface = Interface::new(Config::new(HardwareAddress::Ethernet(EthernetAddress(nic.mac))), &mut nic, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::v4(m.ip[0], m.ip[1], m.ip[2], m.ip[3]), m.prefix));
    });
    println!(
        "testbed: mcd: {}.{}.{}.{}/{} port {} mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, store {} MiB for {} items of up to {} bytes, {} preloaded",
        m.ip[0], m.ip[1], m.ip[2], m.ip[3], m.prefix, m.port,
        nic.mac[0], nic.mac[1], nic.mac[2], nic.mac[3], nic.mac[4], nic.mac[5],
        bytes >> 20, store.capacity(), store.max_value(), filled
    );
    crate::start_run_phase();
    println!("testbed: run phase started");

    let t0 = rdtsc();
    let end_tsc = if spec.duration_s == 0 { u64::MAX } else { t0 + spec.duration_s * tps };
    let (beat, mut next_beat, mut next_print) = (tps / 100, t0 + tps / 100, t0 + tps);
    let mut counters = Counters::default();
    let mut ops = 0u64;
    loop {
        let t = rdtsc();
        if t >= end_tsc {
            break;
        }
        iface.poll(now(), &mut nic, &mut sockets);
        for (h, conn) in handles.iter().flatten().zip(conns.iter_mut()) {
            let s = sockets.get_mut::<tcp::Socket>(*h);
            if !s.is_open() {
                conn.reset();
                let _ = s.listen(m.port);
                continue;
            }
            if s.can_recv() {
                let space = conn.input_space();
                if let Ok(n) = s.recv_slice(space) {
                    conn.input_filled(n);
                }
            }
            ops += conn.process(&mut store, &mut counters);
            if !conn.output().is_empty() && s.can_send() {
                if let Ok(n) = s.send_slice(conn.output()) {
                    conn.output_sent(n);
                }
            }
            // The client asked to quit, or closed its side and has all its answers.
            if conn.wants_close() || (s.state() == tcp::State::CloseWait && conn.output().is_empty()) {
                s.close();
            }
        }
        if t >= next_beat {
            next_beat = t + beat;
            crate::heartbeat(ops, counters.corrupt);
            if let Some(e) = &mut enl {
                e.poll();
            }
            if nic.needs_reset() {
                fail(format_args!("mcd: the virtio-net device needs a reset"));
            }
            if t >= next_print {
                next_print += tps;

                println!(
                    "testbed: t={}s ops={} errors={} rx={} tx={} gets={} hits={} sets={}",
                    (t - t0) / tps,
                    ops,
                    counters.corrupt,
                    nic.rx_frames,
                    nic.tx_frames(),
                    counters.gets,
                    counters.hits,
                    counters.sets
                );
            }
        }
    }
    crate::finish_single(testbed_workloads::Batch { ops, errors: counters.corrupt, checksum: 0 }, clock)
}

/// Preloads `pct` percent of the store's slots with `fill:N` keys and
/// values of the largest size (pseudo-random bytes from `seed`): a warm
/// cache, whose data a migration has to move. Returns the items stored.
fn fill(store: &mut Store, pct: u32, seed: u64) -> usize {
    let n = store.capacity() / 100 * pct as usize;
    let mut value = [0u8; 4096];
    let value = &mut value[..store.max_value()];
    let mut x = seed | 1;
    let mut key = [0u8; 24];
    let mut stored = 0;
    for i in 0..n {
        for chunk in value.chunks_mut(8) {
            // xorshift64: incompressible, never a zero page.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let k = key_name(&mut key, i);
        if store.set(k, value, 0, SetMode::Set) {
            stored += 1;
        }
    }
    stored
}

/// `fill:<i in hex>` in `buf`.
fn key_name(buf: &mut [u8; 24], mut i: usize) -> &[u8] {
    buf[..5].copy_from_slice(b"fill:");
    let mut digits = [0u8; 16];
    let mut d = 0;
    loop {
        digits[d] = b"0123456789abcdef"[i & 15];
        d += 1;
        i >>= 4;
        if i == 0 {
            break;
        }
    }
    for j in 0..d {
        buf[5 + j] = digits[d - 1 - j];
    }
    &buf[..5 + d]
}
