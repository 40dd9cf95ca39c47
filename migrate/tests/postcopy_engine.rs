//! Post-copy source and destination in one process, with no KVM: guest
//! memory is `vm-memory` mmap regions, the destination's is registered with
//! userfaultfd, the two connections are real TCP sockets on loopback, and a
//! "vCPU" thread reads the destination's memory while the push runs (its
//! faults become demand requests the source answers on the second
//! connection).

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use migrate::dest::Dest;
use migrate::push::{Round, Source};
use migrate::space::{GuestMem, PAGE_SIZE};
use migrate::wire::{FrameReader, FrameWriter, Kind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn memory(regions: &[(u64, u64)]) -> GuestMem {
    let r: Vec<(GuestAddress, usize)> = regions.iter().map(|&(a, l)| (GuestAddress(a), l as usize)).collect();
    GuestMem::from_ranges(&r).expect("guest memory")
}

fn word(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// Pages: every third page zero, the rest a pattern (free pages too: a
/// guest's free memory holds stale data, which the destination never gets).
fn fill(mem: &GuestMem, regions: &[(u64, u64)]) {
    for &(base, len) in regions {
        for gpa in (base..base + len).step_by(PAGE_SIZE as usize) {
            if (gpa / PAGE_SIZE) % 3 != 0 {
                for off in (0..PAGE_SIZE).step_by(512) {
                    mem.write_obj(word(gpa + off), GuestAddress(gpa + off)).unwrap();
                }
            }
        }
    }
}

/// A connected pair of TLS streams (shared key), as a migration's connections.
fn pair() -> (tls_stream::Stream, tls_stream::Stream) {
    let cfg = tls_stream::Config::shared_key(b"postcopy engine test key of 32+ bytes").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = {
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            let (b, _) = l.accept().unwrap();
            b.set_nodelay(true).unwrap();
            cfg.accept(b).unwrap()
        })
    };
    let a = TcpStream::connect(addr).unwrap();
    a.set_nodelay(true).unwrap();
    let a = cfg.connect(a, "127.0.0.1").unwrap();
    (a, server.join().unwrap())
}

struct Outcome {
    dest_stats: serde_json::Value,
    source: Arc<Source>,
    integrity: bool,
    /// AnonHugePages of the destination's guest RAM mappings, in KiB.
    huge_kib: u64,
}

/// AnonHugePages (KiB) of the mapping of this process holding `addr`.
fn anon_huge_kib(addr: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-').filter(|_| !head.ends_with(':')) {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = addr >= a && addr < b;
                continue;
            }
        }
        if inside && line.starts_with("AnonHugePages:") {
            return line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    0
}

/// Runs post-copy of `regions` (with `free` pfn ranges marked free on both
/// ends when given) while (with `reads`) a reader thread touches the
/// destination's pages in a scattered order. Returns the destination's
/// statistics.
/// With `pool` > 0, that many bytes of huge pages are prepared first (as
/// `vmm receive --prealloc`).
fn run(regions: &[(u64, u64)], free: &[(u64, u64)], reads: bool, pool: u64) -> Outcome {
    // One at a time: the prepared huge-page pool is per process.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if pool > 0 {
        pager::staging::prepare_pool(pool).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let free_v: Vec<(u64, u64)> = free.to_vec();
    let is_free = move |gpa: u64| free_v.iter().any(|&(a, n)| gpa / PAGE_SIZE >= a && gpa / PAGE_SIZE < a + n);
    let expect = move |gpa: u64| {
        let page = gpa - gpa % PAGE_SIZE;
        if is_free(page) || (page / PAGE_SIZE) % 3 == 0 {
            0
        } else {
            word(gpa)
        }
    };
    let src_mem = Arc::new(memory(regions));
    fill(&src_mem, regions);
    let dst_mem = Arc::new(memory(regions));
    let dest =
        Arc::new(Dest::register(&*dst_mem).expect("userfaultfd registration (root or vm.unprivileged_userfaultfd=1)"));
    let source = Arc::new(Source::new(src_mem.clone()));

    // Enlightened: free frames are known on both ends before the switch-over.
    let ranges = source.mark_free(free.iter().copied());
    dest.note_free(&ranges).unwrap();

    let (main_src, main_dst) = pair();
    let (demand_src, demand_dst) = pair();

    // As the VMM does: the destination knows its sockets, to shut them down
    // when replaced or done.
    dest.set_sockets(vec![main_dst.try_clone().unwrap(), demand_dst.try_clone().unwrap()]);
    // Destination threads: fault loop, demand reader, main reader.
    let faults = {
        let (d, c) = (dest.clone(), demand_dst.try_clone().unwrap());
        std::thread::spawn(move || d.fault_loop(c))
    };
    let demand_reader = {
        let (d, c) = (dest.clone(), demand_dst);
        std::thread::spawn(move || d.demand_reader(c))
    };
    let main_reader = {
        let d = dest.clone();
        let reader: Box<dyn std::io::Read + Send> = Box::new(main_dst.try_clone().unwrap());
        std::thread::spawn(move || d.main_reader((FrameReader::new(reader), main_dst, 0)))
    };
    // The "vCPU": reads pages far ahead of the push.
    let pages: Vec<u64> = regions.iter().flat_map(|&(b, l)| (b..b + l).step_by(PAGE_SIZE as usize)).collect();
    let vcpu = {
        let (m, pages, expect) = (dst_mem.clone(), pages.clone(), expect.clone());
        std::thread::spawn(move || {
            let n = if reads { pages.len() } else { 0 };
            let mut bad = 0u64;
            for i in 0..n {
                let gpa = pages[(i * 7919 + n / 2) % n] + 512;
                let v: u64 = m.read_obj(GuestAddress(gpa)).unwrap();
                bad += u64::from(v != expect(gpa));
            }
            bad
        })
    };

    // Source: demand server and push (address order), then Complete.
    let server = {
        let s = source.clone();
        std::thread::spawn(move || s.serve_demand(demand_src, Arc::new(AtomicU64::new(0))))
    };
    let mut fw = FrameWriter::new(std::io::BufWriter::new(main_src.try_clone().unwrap()));
    let n = source.space.pages();
    let rounds = [Round { name: "all".into(), class: None, pages: (0..n).collect() }];
    source.push(&rounds, &mut fw, Instant::now()).unwrap();
    fw.send(Kind::Complete, &[]).unwrap();
    fw.flush().unwrap();
    let mut fr = FrameReader::new(main_src.try_clone().unwrap());
    let ack = fr.expect().unwrap();
    assert_eq!(ack.kind, Kind::Ack);
    let integrity = ack.payload == source.summary();
    let info = fr.expect().unwrap();
    assert_eq!(info.kind, Kind::Info);
    let dest_stats: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    main_reader.join().unwrap().unwrap();

    assert_eq!(vcpu.join().unwrap(), 0, "the destination read wrong content");
    main_src.shutdown(std::net::Shutdown::Both).unwrap();
    dest.set_sockets(Vec::new());
    faults.join().unwrap();
    let _ = demand_reader.join();
    let _ = server.join();
    // Every page as on the source, free pages zero (userfaultfd is
    // unregistered by now: plain reads).
    let zero = vec![0u8; PAGE_SIZE as usize];
    for &gpa in &pages {
        let mut a = vec![0u8; PAGE_SIZE as usize];
        let mut b = vec![0u8; PAGE_SIZE as usize];
        src_mem.read_slice(&mut a, GuestAddress(gpa)).unwrap();
        dst_mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        let want = if expect(gpa + 512) == 0 && (gpa / PAGE_SIZE) % 3 != 0 { &zero } else { &a };
        assert!(&b == want, "page {gpa:#x} differs");
    }
    let huge_kib = regions
        .iter()
        .map(|&(base, _)| anon_huge_kib(dst_mem.get_host_address(GuestAddress(base)).unwrap() as usize))
        .sum();
    Outcome { dest_stats, source, integrity, huge_kib }
}

#[test]
fn postcopy_moves_every_page_with_demand_faults_served() {
    let regions = [(0, 8 * MIB), (4096 * MIB, 4 * MIB)];
    let t = Instant::now();
    let o = run(&regions, &[], true, 0);
    assert!(o.integrity, "digests differ");
    let d = &o.dest_stats;
    let total = 12 * MIB / PAGE_SIZE;
    let (push, demand, zero) =
        (d["push_pages"].as_u64().unwrap(), d["demand_pages"].as_u64().unwrap(), d["zero_pages"].as_u64().unwrap());
    // Every page arrived once as data or zero (a zero range may also cover a
    // page a demand answer brought first: counted in both).
    assert!(push + demand <= total && push + demand + zero >= total, "{d}");
    assert!(zero >= total / 4, "zero pages travel as ranges: {d}");
    assert_eq!(o.source.free_pages_sent.load(Ordering::Relaxed), 0);
    eprintln!("post-copy of 12 MiB in {:?}: {d}", t.elapsed());
}

#[test]
fn enlightened_free_pages_are_never_sent() {
    // pfns 0x300..0x600 free (the zero every-third pages among them too).
    let regions = [(0, 8 * MIB)];
    let free = [(0x300, 0x300)];
    let o = run(&regions, &free, true, 0);
    assert!(o.integrity, "digests differ");
    let d = &o.dest_stats;
    assert_eq!(d["free_pages"].as_u64().unwrap(), 0x300, "{d}");
    assert_eq!(o.source.free_pages_sent.load(Ordering::Relaxed), 0);
    let sent =
        d["push_pages"].as_u64().unwrap() + d["demand_pages"].as_u64().unwrap() + d["zero_pages"].as_u64().unwrap();
    assert!(sent >= 8 * MIB / PAGE_SIZE - 0x300, "{d}");
    assert!(
        d["push_pages"].as_u64().unwrap() + d["demand_pages"].as_u64().unwrap() <= 8 * MIB / PAGE_SIZE - 0x300,
        "{d}"
    );
}

#[test]
fn pushed_blocks_go_in_as_huge_pages() {
    // 16 MiB, one 2 MiB block all free: the other seven are gathered and
    // moved in whole (UFFDIO_MOVE); the free one stays unbacked.
    let regions = [(0, 16 * MIB)];
    let free = [(0x400, 0x200)];
    let o = run(&regions, &free, false, 0);
    assert!(o.integrity, "digests differ");
    let d = &o.dest_stats;
    assert_eq!(d["huge_blocks_placed"].as_u64().unwrap(), 7, "{d}");
    assert_eq!(d["blocks_broken"].as_u64().unwrap(), 0, "{d}");
    assert_eq!(d["faults"].as_u64().unwrap(), 0, "{d}");
    // Read before the collapse could run: the placed blocks are huge pages.
    assert!(o.huge_kib >= 7 * 2048, "destination guest RAM has {} KiB of huge pages: {d}", o.huge_kib);
}

#[test]
fn blocks_take_prepared_huge_pages_first() {
    // As `vmm receive --prealloc 8M`: four huge pages prepared before the
    // migration; the first four blocks gathered take them.
    let regions = [(0, 16 * MIB)];
    let o = run(&regions, &[], false, 8 * MIB);
    assert!(o.integrity, "digests differ");
    let d = &o.dest_stats;
    assert_eq!(d["huge_blocks_placed"].as_u64().unwrap(), 8, "{d}");
    assert_eq!(d["blocks_from_prepared_pool"].as_u64().unwrap(), 4, "{d}");
    assert!(o.huge_kib >= 8 * 2048, "destination guest RAM has {} KiB of huge pages: {d}", o.huge_kib);
}
