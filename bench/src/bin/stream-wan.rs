//! stream-wan: the appliance library end to end on the thesis' emulated WAN
//! (tbf at 7.2 Mbit/s between two network namespaces plus a user-space relay
//! adding 120 ms of round trip): a synthetic appliance is put in a store and
//! served from one namespace; `--traces` synthetic training sessions are
//! stored and analysed; then one further session is *streamed for real*
//! from the other namespace under each policy (full download, demand only,
//! VMTorrent order, vTube), replaying its access timeline (reads block
//! while their chunk is on its way), and Table 3.2's metrics are printed.
//! Needs root (network namespaces).
//!
//! Usage: stream-wan [--traces N] [--duration S] [--scale X] [--mbit R] [--rtt-ms T] [--skip-full]

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::analysis::{analyze_appliance, AnalysisParams};
use appliance::server::Server;
use appliance::session::{Mode, Session, SessionConfig};
use appliance::store::MemorySource;
use appliance::synth::{Model, SessionParams};
use appliance::{ChunkKey, ChunkRef, Client, Store, CHUNK_SIZE};
use netsim::relay::Relay;
use netsim::{NetnsPair, Side, SRC_IP};

struct Args {
    traces: u64,
    duration: f64,
    scale: f64,
    mbit: f64,
    rtt_ms: u64,
    skip_full: bool,
}

fn usage() -> ! {
    eprintln!("usage: stream-wan [--traces N] [--duration S] [--scale X] [--mbit R] [--rtt-ms T] [--skip-full]");
    std::process::exit(2)
}

fn parse() -> Args {
    let mut a = Args { traces: 6, duration: 45.0, scale: 0.03, mbit: 7.2, rtt_ms: 120, skip_full: false };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--traces" => a.traces = val().parse().unwrap_or_else(|_| usage()),
            "--duration" => a.duration = val().parse().unwrap_or_else(|_| usage()),
            "--scale" => a.scale = val().parse().unwrap_or_else(|_| usage()),
            "--mbit" => a.mbit = val().parse().unwrap_or_else(|_| usage()),
            "--rtt-ms" => a.rtt_ms = val().parse().unwrap_or_else(|_| usage()),
            "--skip-full" => a.skip_full = true,
            _ => usage(),
        }
    }
    a
}

/// Streams a model's region as bytes.
struct ModelReader<'a> {
    model: &'a Model,
    next: u64,
    end: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ModelReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.next == self.end {
                return Ok(0);
            }
            self.buf = self.model.content(ChunkKey::Mem(self.next));
            self.next += 1;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn main() {
    let a = parse();
    let dir = std::env::temp_dir().join(format!("stream-wan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let model = Model::sized(11, 24, a.scale, 64 << 20, 256 << 20);

    // The appliance.
    let t0 = Instant::now();
    let store = Store::open(dir.join("store")).expect("store");
    let disk_path = dir.join("disk.img");
    {
        let f = File::create(&disk_path).expect("disk image");
        f.set_len(model.disk_chunks * CHUNK_SIZE as u64).expect("disk size");
        for i in 0..model.disk_chunks {
            if model.bytes(ChunkKey::Disk(i)) > 0 {
                f.write_all_at(&model.content(ChunkKey::Disk(i)), i * CHUNK_SIZE as u64).expect("disk write");
            }
        }
    }
    let mem_size = model.mem_chunks * CHUNK_SIZE as u64;
    let reader = ModelReader { model: &model, next: 0, end: model.mem_chunks, buf: Vec::new(), pos: 0 };
    let rep = store
        .create_appliance(
            "wan",
            serde_json::json!({"synthetic": true}),
            vec![],
            [MemorySource { gpa: 0, size: mem_size, data: Box::new(reader) }],
            &|_| false,
            Some(&mut File::open(&disk_path).expect("disk")),
        )
        .expect("create appliance");
    println!(
        "Appliance: {} MiB memory + {} MiB disk, {} chunks stored ({:.1} MB compressed) in {:.1} s",
        mem_size >> 20,
        (model.disk_chunks * CHUNK_SIZE as u64) >> 20,
        rep.data_chunks,
        rep.stored_bytes as f64 / 1e6,
        rep.seconds
    );
    let manifest_hash = store.appliance("wan").expect("appliance");
    let manifest = store.get_manifest(&manifest_hash).expect("manifest");

    // Training traces (synthetic sessions) and the analysis.
    for i in 0..a.traces {
        let mut p = SessionParams::varied(i);
        p.duration_s = a.duration;
        let mut t = model.session(&p);
        t.header.appliance = "wan".into();
        t.header.manifest = manifest_hash.to_hex();
        store.put_trace("wan", &t.to_bytes()).expect("trace");
    }
    let (v, k) = analyze_appliance(&store, "wan", &AnalysisParams::default()).expect("analysis");
    let mut tp = SessionParams::varied(500);
    tp.duration_s = a.duration;
    let test = model.session(&tp);
    let accessed: u64 =
        test.accesses.iter().filter(|x| matches!(manifest.chunk(x.key), Some(ChunkRef::Data(_)))).count() as u64;
    let unseen = test
        .accesses
        .iter()
        .filter(|x| matches!(manifest.chunk(x.key), Some(ChunkRef::Data(_))) && k.cluster_of(x.key).is_none())
        .count();
    println!(
        "Knowledge v{v}: {} clusters from {} traces; test session {:.0} s touching {} stored chunks ({:.1} MB), \
         {unseen} of them in no training trace; setup {:.1} s",
        k.clusters.len(),
        a.traces,
        test.span_us() as f64 / 1e6,
        accessed,
        (accessed * CHUNK_SIZE as u64) as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );

    // The link: server in `src`, relay and client in `dst`.
    let pair = NetnsPair::create(Some((a.mbit * 1e6) as u64)).expect("network namespaces (run as root)");
    let st = store.clone();
    let port = pair
        .spawn_in(Side::Src, move || {
            let l = TcpListener::bind((SRC_IP, 0)).expect("bind");
            let port = l.local_addr().expect("addr").port();
            drop(l);
            let server = Server::bind(st, &format!("{SRC_IP}:{port}")).expect("server");
            std::thread::spawn(move || server.run());
            port
        })
        .expect("spawn in src")
        .join()
        .expect("join")
        .expect("src thread");
    let one_way = Duration::from_millis(a.rtt_ms / 2);
    let mut modes = vec![
        ("full download", Mode::FullDownload),
        ("demand only", Mode::DemandOnly),
        ("VMTorrent order", Mode::VmTorrent { window: 64 }),
        ("vTube", Mode::VTube),
    ];
    if a.skip_full {
        modes.remove(0);
    }
    println!("\n### {} Mbit/s, {} ms RTT (tbf + relay), streamed over real sockets\n", a.mbit, a.rtt_ms);
    println!("| policy | launch s | session s | accessed MB | fetched MB | fetch ratio | buffering ratio | buf events/min | misses | miss rate |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, (label, mode)) in modes.into_iter().enumerate() {
        let cache = dir.join(format!("cache{i}"));
        let test = test.clone();
        let res = pair
            .spawn_in(Side::Dst, move || {
                let relay = Relay::bind("127.0.0.1:0", SocketAddr::from((SRC_IP, port)), one_way).expect("relay");
                let client = Arc::new(Client::new(&format!("http://{}", relay.addr()), &cache).expect("client"));
                let t0 = Instant::now();
                let s = Session::start(client.clone(), "wan", SessionConfig { mode, ..Default::default() })
                    .expect("session");
                // Replay the idealised timeline: run for the gap, then access.
                let mut last = 0u64;
                let mut owed = Duration::ZERO;
                for x in &test.accesses {
                    owed += Duration::from_micros(x.t_us - last);
                    last = x.t_us;
                    if owed >= Duration::from_millis(2) {
                        std::thread::sleep(owed);
                        owed = Duration::ZERO;
                    }
                    s.read(x.key).expect("read");
                }
                let wall = t0.elapsed().as_secs_f64();
                let stats = s.stats();
                s.finish(false).expect("finish");
                (wall, stats, client.stats())
            })
            .expect("spawn in dst")
            .join()
            .expect("join")
            .expect("dst thread");
        let (wall, st, cs) = res;
        let fetched = cs.chunks_fetched;
        println!(
            "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {:.2}% |",
            st.launch_s,
            wall,
            (accessed * CHUNK_SIZE as u64) as f64 / 1e6,
            (fetched * CHUNK_SIZE as u64) as f64 / 1e6,
            fetched as f64 / accessed.max(1) as f64,
            st.buffering_s / wall,
            st.buffering_events as f64 / (wall / 60.0),
            st.misses,
            st.misses as f64 / accessed.max(1) as f64 * 100.0
        );
    }
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
}
