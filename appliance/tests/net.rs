//! Server and client over real sockets and files.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use appliance::client::Priority;
use appliance::server::Server;
use appliance::store::MemorySource;
use appliance::trace::{Trace, TraceHeader, TraceRecorder};
use appliance::{ChunkHash, ChunkKey, ChunkRef, Client, Error, Store, CHUNK_SIZE};

static N: AtomicU32 = AtomicU32::new(0);

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "appliance-net-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic, poorly compressible-but-not-random memory; `pages` pages, every 4th zero.
fn memory(pages: usize, seed: u64) -> Vec<u8> {
    let mut m = vec![0u8; pages * CHUNK_SIZE];
    for p in 0..pages {
        if p % 4 == 3 {
            continue;
        }
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (p as u64 + 1);
        for w in m[p * CHUNK_SIZE..(p + 1) * CHUNK_SIZE].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&(x & 0x0f0f_0f0f_0f0f_0f0f).to_le_bytes());
        }
    }
    m
}

fn make_app(store: &Store, name: &str, mem: &[u8]) {
    store
        .create_appliance(
            name,
            serde_json::json!({"mem_size": mem.len()}),
            b"device-state".to_vec(),
            [MemorySource { gpa: 0, size: mem.len() as u64, data: Box::new(mem) }],
            &|_| false,
            None,
        )
        .unwrap();
}

fn data_hashes(m: &appliance::Manifest) -> Vec<ChunkHash> {
    m.iter()
        .filter_map(|(_, r)| match r {
            ChunkRef::Data(h) => Some(h),
            _ => None,
        })
        .collect()
}

#[test]
fn stream_with_cache_and_dedup() {
    let d = tmpdir("stream");
    let store = Store::open(d.join("store")).unwrap();
    let mem1 = memory(200, 1);
    let mut mem2 = mem1.clone();
    // The second appliance shares half its content with the first.
    mem2[100 * CHUNK_SIZE..].copy_from_slice(&memory(100, 2)[..]);
    make_app(&store, "one", &mem1);
    make_app(&store, "two", &mem2);
    let server = Server::bind(store.clone(), "127.0.0.1:0").unwrap().spawn();
    let cache = d.join("cache");

    let c = Client::new(&server.url(), &cache).unwrap();
    let m = c.manifest(&c.appliance("one").unwrap()).unwrap();
    assert_eq!(m.device_state, b"device-state");
    // Demand single chunks, then the rest as prefetch batches.
    let hashes = data_hashes(&m);
    assert_eq!(hashes.len(), 150);
    assert_eq!(c.chunk(&hashes[0]).unwrap(), mem1[..CHUNK_SIZE]);
    assert_eq!(c.fetch(&hashes, Priority::Prefetch).unwrap(), 149);
    for (key, r) in m.iter() {
        let ChunkKey::Mem(pfn) = key else { unreachable!() };
        let want = &mem1[pfn as usize * CHUNK_SIZE..(pfn as usize + 1) * CHUNK_SIZE];
        match r {
            ChunkRef::Data(h) => assert_eq!(c.chunk(&h).unwrap(), want),
            _ => assert!(want.iter().all(|&b| b == 0)),
        }
    }
    assert_eq!(c.stats().chunks_fetched, 150);

    // A second session with the warm cache fetches nothing.
    let c2 = Client::new(&server.url(), &cache).unwrap();
    let m2 = c2.manifest(&c2.appliance("one").unwrap()).unwrap();
    assert_eq!(c2.fetch(&data_hashes(&m2), Priority::Demand).unwrap(), 0);
    assert_eq!(c2.stats().chunks_fetched, 0);
    // The second appliance fetches only what it does not share.
    let m3 = c2.manifest(&c2.appliance("two").unwrap()).unwrap();
    assert_eq!(c2.fetch(&data_hashes(&m3), Priority::Demand).unwrap(), 75);

    // Corrupted chunk on the server: the client refuses it and caches nothing.
    let fresh = Client::new(&server.url(), d.join("cache2")).unwrap();
    let h = hashes[5];
    let p = store.root().join("chunks").join(&h.to_hex()[..2]).join(&h.to_hex()[2..]);
    let mut enc = std::fs::read(&p).unwrap();
    enc[3] ^= 0x40;
    std::fs::write(&p, &enc).unwrap();
    let e = fresh.chunk(&h).unwrap_err();
    assert!(matches!(e, Error::HashMismatch { .. } | Error::BadChunk(..)), "{e}");
    assert!(!fresh.cache().contains(&h));
    let e = fresh.fetch(&[h], Priority::Prefetch).unwrap_err();
    assert!(matches!(e, Error::HashMismatch { .. } | Error::BadChunk(..)), "{e}");
    // Truncated manifest on the server.
    let mh = store.appliance("two").unwrap();
    let mp = store.root().join("manifests").join(mh.to_hex());
    let b = std::fs::read(&mp).unwrap();
    std::fs::write(&mp, &b[..b.len() / 2]).unwrap();
    let e = fresh.manifest(&mh).unwrap_err();
    assert!(e.to_string().contains("manifest"), "{e}");
    // Unknown names and hashes.
    assert!(matches!(fresh.appliance("nope"), Err(Error::NotFound(_))));
    assert!(matches!(fresh.chunk(&ChunkHash::of(b"none")), Err(Error::NotFound(_))));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn traces_upload_and_knowledge_endpoint() {
    let d = tmpdir("trace");
    let store = Store::open(d.join("store")).unwrap();
    make_app(&store, "app", &memory(8, 3));
    let server = Server::bind(store.clone(), "127.0.0.1:0").unwrap().spawn();
    let c = Client::new(&server.url(), d.join("cache")).unwrap();
    let r = TraceRecorder::new();
    r.record(ChunkKey::Mem(1));
    r.record(ChunkKey::Disk(7));
    let t = r.finish(TraceHeader { appliance: "app".into(), ..Default::default() });
    c.upload_trace(&t).unwrap();
    let stored = store.traces("app").unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(Trace::parse(&stored[0]).unwrap(), t);
    // A trace for an unknown appliance, and garbage, are refused.
    let mut t2 = t.clone();
    t2.header.appliance = "ghost".into();
    assert!(c.upload_trace(&t2).is_err());
    assert!(matches!(c.knowledge("app"), Err(Error::NotFound(_))));
    store.put_knowledge("app", b"{\"v\":1}").unwrap();
    assert_eq!(c.knowledge("app").unwrap(), (1, b"{\"v\":1}".to_vec()));
    std::fs::remove_dir_all(&d).unwrap();
}

fn raw(addr: std::net::SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = BufReader::new(s).read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_requests_keepalive_and_concurrency() {
    let d = tmpdir("http");
    let store = Store::open(d.join("store")).unwrap();
    let mem = memory(64, 4);
    make_app(&store, "app", &mem);
    let server = Server::bind(store.clone(), "127.0.0.1:0").unwrap().spawn();
    let a = server.addr();
    assert!(raw(a, b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(raw(a, b"GET /v1/appliances/app HTTP/1.1\r\nContent-Length: x\r\n\r\n").starts_with("HTTP/1.1 400"));
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(10000));
    assert!(raw(a, long.as_bytes()).starts_with("HTTP/1.1 431"));
    assert!(raw(a, b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").starts_with("HTTP/1.1 501"));
    assert!(raw(a, b"GET /v1/chunks/xyz HTTP/1.1\r\nConnection: close\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(raw(a, b"POST /v1/chunks:batch HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nabcde")
        .starts_with("HTTP/1.1 400"));
    assert!(raw(a, b"DELETE /v1/appliances/app HTTP/1.1\r\nConnection: close\r\n\r\n").starts_with("HTTP/1.1 405"));
    // Body limits per route: a batch of more than 4096 hashes, a GET with a body.
    assert!(raw(a, b"POST /v1/chunks:batch HTTP/1.1\r\nContent-Length: 200000\r\n\r\n").starts_with("HTTP/1.1 413"));
    assert!(raw(a, b"GET /v1/appliances/app HTTP/1.1\r\nContent-Length: 5000\r\n\r\n").starts_with("HTTP/1.1 413"));
    // A trace announced as 100 MB that never comes: the connection just ends.
    assert_eq!(raw(a, b"POST /v1/appliances/app/traces HTTP/1.1\r\nContent-Length: 100000000\r\n\r\nabc"), "");
    assert!(raw(a, b"GET /v1/appliances/..%2f HTTP/1.1\r\nConnection: close\r\n\r\n").starts_with("HTTP/1.1 400"));
    // A client that sends half a request and goes away does not hurt the server.
    drop(raw(a, b"POST /v1/chunks:batch HTTP/1.1\r\nContent-Length: 64\r\n\r\nshort"));
    // Keep-alive: two requests, two responses on one connection; immutable caching headers.
    let mut s = TcpStream::connect(a).unwrap();
    s.write_all(b"GET /v1/appliances/app HTTP/1.1\r\n\r\nGET /v1/appliances/app HTTP/1.1\r\n\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut hash = String::new();
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        let mut len = 0;
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut b = vec![0; len];
        r.read_exact(&mut b).unwrap();
        hash = String::from_utf8(b).unwrap().trim().to_string();
    }
    let resp = raw(a, format!("GET /v1/manifests/{hash} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes());
    assert!(resp.contains("Cache-Control: public, max-age=31536000, immutable"), "{resp}");

    // Eight concurrent clients.
    let url = server.url();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            let dir = d.join(format!("c{i}"));
            let mem = mem.clone();
            std::thread::spawn(move || {
                let c = Client::new(&url, dir).unwrap();
                let m = c.manifest(&c.appliance("app").unwrap()).unwrap();
                c.fetch(&data_hashes(&m), Priority::Prefetch).unwrap();
                for p in 0..64u64 {
                    if let Some(ChunkRef::Data(h)) = m.mem_chunk(p * 4096) {
                        assert_eq!(c.chunk(&h).unwrap(), mem[p as usize * 4096..(p as usize + 1) * 4096]);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn dead_server_and_server_that_returns() {
    let d = tmpdir("dead");
    let store = Store::open(d.join("store")).unwrap();
    let mem = memory(16, 5);
    make_app(&store, "app", &mem);
    let mut server = Server::bind(store.clone(), "127.0.0.1:0").unwrap().spawn();
    let addr = server.addr();
    let mut c = Client::new(&server.url(), d.join("cache")).unwrap();
    let m = c.manifest(&c.appliance("app").unwrap()).unwrap();
    let hashes = data_hashes(&m);
    c.chunk(&hashes[0]).unwrap();
    server.stop();
    drop(server);
    // Without retries: a clear error.
    let e = c.chunk(&hashes[1]).unwrap_err();
    assert!(matches!(e, Error::Net(_)), "{e}");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
    // With retries: the fetch waits for the server to come back, then succeeds.
    c.set_retry(Some(Duration::from_secs(30)));
    let store2 = store.clone();
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        Server::bind(store2, &addr.to_string()).unwrap().spawn()
    });
    let t0 = std::time::Instant::now();
    assert_eq!(c.chunk(&hashes[1]).unwrap(), mem[4096..8192]);
    assert!(t0.elapsed() >= Duration::from_millis(600));
    let _server = back.join().unwrap();
    let bad = Client::new("http://127.0.0.1:1", d.join("cache")).unwrap();
    assert!(bad.appliance("app").unwrap_err().to_string().contains("cannot connect"));
    assert!(Client::new("ftp://x", d.join("cache")).is_err());
    std::fs::remove_dir_all(&d).unwrap();
}
