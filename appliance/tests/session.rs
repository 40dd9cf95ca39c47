//! Streaming sessions end to end: store, HTTP server, a relay adding round
//! trips, the client cache, traces, analysis and dynamic streaming.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use appliance::analysis::{analyze_appliance, AnalysisParams};
use appliance::overlay::DiskOverlay;
use appliance::server::Server;
use appliance::session::{Mode, Session, SessionConfig};
use appliance::store::MemorySource;
use appliance::{ChunkKey, Client, Store, CHUNK_SIZE};
use netsim::relay::Relay;

static N: AtomicU32 = AtomicU32::new(0);

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "appliance-session-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn page(seed: u64, p: usize) -> Vec<u8> {
    let mut x = seed ^ (p as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut v = vec![0u8; CHUNK_SIZE];
    for w in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&(x & 0x3f3f_3f3f_3f3f_3f3f).to_le_bytes());
    }
    v
}

const MEM_PAGES: usize = 1024;
const DISK_PAGES: usize = 512;

/// Memory: page p has content unless p % 16 == 15 (zero); pages 1000.. are free.
fn memory() -> Vec<u8> {
    let mut m = vec![0u8; MEM_PAGES * CHUNK_SIZE];
    for p in 0..MEM_PAGES {
        if p % 16 != 15 {
            m[p * CHUNK_SIZE..(p + 1) * CHUNK_SIZE].copy_from_slice(&page(1, p));
        }
    }
    m
}

fn disk(dir: &std::path::Path) -> std::fs::File {
    let mut d = Vec::with_capacity(DISK_PAGES * CHUNK_SIZE);
    for p in 0..DISK_PAGES {
        d.extend_from_slice(&page(2, p));
    }
    let path = dir.join("disk.img");
    std::fs::write(&path, &d).unwrap();
    std::fs::File::open(path).unwrap()
}

/// A workload: features (ranges of memory and disk chunks) accessed in
/// bursts separated by pauses; `variant` picks which optional features run.
fn run_workload(s: &Session, variant: u64, mem: &[u8]) {
    let features: [(std::ops::Range<u64>, std::ops::Range<u64>); 5] =
        [(0..40, 0..10), (200..220, 100..110), (300..330, 200..205), (500..515, 300..320), (700..720, 400..403)];
    let disk_page = |p: u64| page(2, p as usize);
    let order: Vec<usize> = match variant % 3 {
        0 => vec![0, 1, 2, 4],
        1 => vec![0, 1, 3, 4],
        _ => vec![0, 2, 3, 4],
    };
    for f in order {
        let (m, d) = &features[f];
        for p in m.clone() {
            let got = s.read_mem(p * CHUNK_SIZE as u64).unwrap().unwrap();
            assert!(got[..] == mem[p as usize * CHUNK_SIZE..(p as usize + 1) * CHUNK_SIZE], "memory page {p}");
        }
        for p in d.clone() {
            assert!(s.read_disk(p * CHUNK_SIZE as u64).unwrap().unwrap() == disk_page(p), "disk page {p}");
        }
        // One free page and one zero page: served locally.
        assert!(s.read(ChunkKey::Mem(1001)).unwrap().unwrap().iter().all(|&b| b == 0));
        assert!(s.read(ChunkKey::Mem(15)).unwrap().unwrap().iter().all(|&b| b == 0));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(s.read(ChunkKey::Mem(MEM_PAGES as u64 + 5)).unwrap().is_none());
}

#[test]
fn sessions_traces_knowledge_and_warm_cache() {
    let d = tmpdir("e2e");
    let store = Store::open(d.join("store")).unwrap();
    let mem = memory();
    let mut df = disk(&d);
    store
        .create_appliance(
            "app",
            serde_json::json!({"vcpus": 1}),
            b"devices".to_vec(),
            [MemorySource { gpa: 0, size: mem.len() as u64, data: Box::new(&mem[..]) }],
            &|pfn| pfn >= 1000,
            Some(&mut df),
        )
        .unwrap();
    let server = Server::bind(store.clone(), "127.0.0.1:0").unwrap().spawn();
    // A 4 ms round trip in front of the server.
    let relay = Relay::bind("127.0.0.1:0", server.addr(), Duration::from_millis(2)).unwrap();
    let url = format!("http://{}", relay.addr());
    let params = AnalysisParams { clustering_interval_us: 50_000, ..Default::default() };

    // Three sessions without knowledge (nor read-ahead), each from a fresh
    // client: every content chunk is a demand fetch; their traces go to the server.
    let mut cold_misses = 0;
    for v in 0..3 {
        let c = Arc::new(Client::new(&url, d.join(format!("cache{v}"))).unwrap());
        let s = Session::start(c.clone(), "app", SessionConfig { readahead: false, ..Default::default() }).unwrap();
        assert_eq!(s.knowledge_version(), None);
        assert_eq!(s.manifest().device_state, b"devices");
        run_workload(&s, v, &mem);
        let t = s.finish(true).unwrap();
        assert!(t.accesses.len() > 80);
        // Network waits are taken out of the trace's timeline.
        assert!(t.header.net_wait_us > 0);
        assert!(t.span_us() + t.header.net_wait_us <= t.header.duration_us + 1000);
        cold_misses = s.stats().misses;
        assert_eq!(cold_misses, c.stats().chunks_fetched);
    }
    assert_eq!(store.traces("app").unwrap().len(), 3);
    let (v, k) = analyze_appliance(&store, "app", &params).unwrap();
    assert_eq!(v, 1);
    assert!(k.clusters.len() >= 5, "{} clusters", k.clusters.len());

    // A session with the knowledge: most chunks arrive by buffering and streaming.
    let c = Arc::new(Client::new(&url, d.join("cache-k")).unwrap());
    let s = Session::start(c.clone(), "app", SessionConfig::default()).unwrap();
    assert_eq!(s.knowledge_version(), Some(1));
    run_workload(&s, 1, &mem);
    let st = s.stats();
    s.finish(false).unwrap();
    assert!(st.buffering_events >= 1, "{st:?}");
    assert!(st.misses * 4 < cold_misses, "misses {} with knowledge, {cold_misses} without: {st:?}", st.misses);

    // The same client cache again: nothing is fetched.
    let c2 = Arc::new(Client::new(&url, d.join("cache-k")).unwrap());
    let s2 = Session::start(c2.clone(), "app", SessionConfig::default()).unwrap();
    run_workload(&s2, 1, &mem);
    s2.finish(false).unwrap();
    assert_eq!(c2.stats().chunks_fetched, 0, "{:?}", c2.stats());

    // The baselines in the same session API.
    let total_data = store.get_manifest(&store.appliance("app").unwrap()).unwrap().stats().unique_chunks;
    for (i, mode) in [Mode::FullDownload, Mode::VmTorrent { window: 8 }, Mode::DemandOnly].into_iter().enumerate() {
        let c = Arc::new(Client::new(&url, d.join(format!("cache-mode{i}"))).unwrap());
        let s = Session::start(c.clone(), "app", SessionConfig { mode, ..Default::default() }).unwrap();
        run_workload(&s, 1, &mem);
        let st = s.stats();
        let t = s.finish(false).unwrap();
        assert!(t.accesses.len() > 80);
        match mode {
            Mode::FullDownload => {
                assert_eq!(st.misses, 0, "{st:?}");
                assert_eq!(c.stats().chunks_fetched, total_data);
            }
            Mode::VmTorrent { .. } => {
                assert!(st.misses * 2 < cold_misses, "{st:?}");
                assert_eq!(st.hints, 0);
            }
            _ => assert_eq!(st.misses, c.stats().chunks_fetched),
        }
    }

    // The VMM's own reads (a whole disk before start) are batched and untraced.
    let c3 = Arc::new(Client::new(&url, d.join("cache-disk")).unwrap());
    let s3 = Session::start(
        c3.clone(),
        "app",
        SessionConfig { use_knowledge: false, readahead: false, ..Default::default() },
    )
    .unwrap();
    let n = s3.fetch_keys(&s3.disk_keys(), appliance::client::Priority::Demand).unwrap();
    assert_eq!(n, DISK_PAGES as u64);
    assert!(c3.stats().requests < 10, "{:?}", c3.stats());
    assert!(s3.read_untraced(ChunkKey::Disk(7)).unwrap().unwrap() == page(2, 7));
    assert!(s3.finish(false).unwrap().accesses.is_empty());

    // The disk as an overlay: reads wait for chunks, a partial write to a
    // missing chunk fetches it first, a whole-chunk write does not.
    let c4 = Arc::new(Client::new(&url, d.join("cache-overlay")).unwrap());
    let s4 = Session::start(
        c4.clone(),
        "app",
        SessionConfig { use_knowledge: false, readahead: false, ..Default::default() },
    )
    .unwrap();
    let ov = Arc::new(DiskOverlay::create(s4.clone(), &d.join("overlay.img")).unwrap());
    let mut buf = vec![0u8; 3 * CHUNK_SIZE];
    ov.read_at(&mut buf, 5 * CHUNK_SIZE as u64 + 100).unwrap();
    let want: Vec<u8> = (5..9).flat_map(|p| page(2, p)).collect();
    assert!(buf[..] == want[100..100 + 3 * CHUNK_SIZE]);
    assert_eq!(c4.stats().chunks_fetched, 4);
    ov.write_at(&[0xab; 10], 20 * CHUNK_SIZE as u64 + 7).unwrap();
    assert_eq!(c4.stats().chunks_fetched, 5);
    ov.write_at(&vec![0xcd; 2 * CHUNK_SIZE], 30 * CHUNK_SIZE as u64).unwrap();
    assert_eq!(c4.stats().chunks_fetched, 5);
    let mut one = vec![0u8; CHUNK_SIZE];
    ov.read_at(&mut one, 20 * CHUNK_SIZE as u64).unwrap();
    let mut w = page(2, 20);
    w[7..17].fill(0xab);
    assert!(one == w);
    ov.read_at(&mut one, 31 * CHUNK_SIZE as u64).unwrap();
    assert!(one.iter().all(|&b| b == 0xcd));
    // Four readers of one missing chunk: one fetch.
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let ov = ov.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 512];
                ov.read_at(&mut b, 40 * CHUNK_SIZE as u64).unwrap();
                b
            })
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap()[..] == page(2, 40)[..512]);
    }
    assert_eq!(c4.stats().chunks_fetched, 6);
    assert!(ov.read_at(&mut one, (DISK_PAGES * CHUNK_SIZE) as u64 - 10).is_err());
    assert_eq!(ov.present_chunks(), 8);
    ov.flush().unwrap();
    drop(ov);
    s4.finish(false).unwrap();

    // A knowledge file of another format version is refused clearly.
    let bad = String::from_utf8(k.to_bytes()).unwrap().replacen("\"format\":1", "\"format\":42", 1);
    store.put_knowledge("app", bad.as_bytes()).unwrap();
    let e = Session::start(c2, "app", SessionConfig::default()).err().expect("wrong version refused");
    assert!(e.to_string().contains("knowledge format version 42"), "{e}");
    drop(relay);
    drop(server);
    std::fs::remove_dir_all(&d).unwrap();
}
