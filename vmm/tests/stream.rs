//! Appliance streaming end to end: a testbed `kv` snapshot made into an
//! appliance (`vmm appliance create`), served over HTTP (`vmm appliance
//! serve`), and run by `vmm stream` before its memory has arrived; its
//! checksummed data verifies. A second session with a warm cache fetches
//! nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{api, path_str, snapshot, spawn_piped, vmm, vmm_bin, wait_for_run_phase, wait_output, TempDir};

const T: Duration = Duration::from_secs(300);

/// Boots `vmm run ARGS`, waits for the guest's `phase` (`run`: and half a
/// second of work), snapshots it and shuts it down; returns the snapshot.
fn snapshot_vm(d: &TempDir, run_args: &[&str], phase: &str) -> PathBuf {
    let sock = d.path("api.sock");
    let snap = d.path("vm.snap");
    let mut c = Command::new(vmm_bin());
    c.arg("run").args(run_args).args(["--serial", "/dev/null", "--api-sock", path_str(&sock)]);
    let child = spawn_piped(c);
    if phase == "run" {
        wait_for_run_phase(&sock);
        std::thread::sleep(Duration::from_millis(500));
    } else {
        wait_phase(&sock, phase);
    }
    snapshot(&sock, &snap);
    assert_eq!(api(&sock, "shutdown")["ok"], true);
    assert_eq!(wait_output(child, T).code, Some(0));
    snap
}

/// Makes appliance `name` of `snap` in `store`; returns `vmm appliance create`'s report.
fn create_appliance(snap: &Path, store: &Path, name: &str) -> serde_json::Value {
    let o = vmm(&["appliance", "create", "--snapshot", path_str(snap), "--store", path_str(store), "--name", name], T);
    assert_eq!(o.code, Some(0), "{o}");
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("appliance create report: {e}: {o}"))
}

/// The thesis' WAN: 7.2 Mbit/s between two namespaces (tbf), `vmm appliance
/// serve` in the source one, a relay adding 60 ms each way in the other;
/// clients run in the destination one and reach the server at `url`.
struct Wan {
    pair: netsim::NetnsPair,
    server: Child,
    stop: Option<std::sync::mpsc::Sender<()>>,
    relay: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    url: String,
}

impl Wan {
    fn serve(store: &Path, port: u16) -> Self {
        use netsim::{relay::Relay, NetnsPair, Side, SRC_IP};
        let pair = NetnsPair::create(Some(7_200_000)).unwrap();
        let mut server = pair.command(Side::Src, vmm_bin());
        server.args(["appliance", "serve", "--store", path_str(store), "--listen", &format!("{SRC_IP}:{port}")]);
        let server = spawn_piped(server);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (atx, arx) = std::sync::mpsc::channel();
        let relay = pair
            .spawn_in(Side::Dst, move || {
                let upstream = std::net::SocketAddr::from((SRC_IP, port));
                let r = Relay::bind("127.0.0.1:0", upstream, Duration::from_millis(60)).unwrap();
                atx.send(r.addr()).unwrap();
                let _ = rx.recv();
                drop(r);
            })
            .unwrap();
        let url = format!("http://{}", arx.recv().unwrap());
        std::thread::sleep(Duration::from_millis(300));
        Self { pair, server, stop: Some(tx), relay: Some(relay), url }
    }

    /// A `vmm` command in the client's namespace.
    fn client(&self) -> Command {
        self.pair.command(netsim::Side::Dst, vmm_bin())
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(r) = self.relay.take() {
            let _ = r.join();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Streams `kv1` for `secs` seconds of guest run time, checks the guest's
/// own verification, shuts it down; returns its final stats and the
/// session summary.
fn stream_once(d: &TempDir, url: &str, cache: &Path, secs: u64) -> (serde_json::Value, serde_json::Value) {
    stream_named(d, "kv1", url, cache, secs)
}

fn stream_named(d: &TempDir, name: &str, url: &str, cache: &Path, secs: u64) -> (serde_json::Value, serde_json::Value) {
    let sock = d.path("stream.sock");
    let _ = std::fs::remove_file(&sock);
    let mut c = Command::new(vmm_bin());
    c.args(["stream", url, "--name", name, "--cache", path_str(cache), "--serial", "/dev/null"]);
    c.args(["--api-sock", path_str(&sock)]);
    let child = spawn_piped(c);
    let ops0 = wait_for_run_phase(&sock);
    std::thread::sleep(Duration::from_secs(secs));
    let st = api(&sock, "status");
    assert_eq!(st["workload"]["errors"], 0, "{st}");
    assert!(st["workload"]["ops"].as_u64().unwrap() > ops0, "{st}");
    assert_eq!(api(&sock, "shutdown")["ok"], true);
    let o = wait_output(child, T);
    assert_eq!(o.code, Some(0), "{o}");
    let j = o.json();
    assert_eq!(j["errors"], 0, "{o}");
    let line = o.stderr.lines().find_map(|l| l.strip_prefix("stream: {").map(|r| format!("{{{r}"))).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&line).unwrap();
    (j, summary)
}

#[test]
fn kv_appliance_streams_and_its_data_verifies() {
    let d = TempDir::new("stream-kv");
    let snap = snapshot_vm(&d, &["--testbed", "kv,share=20,value=256", "--mem", "256M", "--vcpus", "2"], "run");
    let store = d.path("store");
    create_appliance(&snap, &store, "kv1");
    let (mut server, url) = serve(&store, None);
    let cache = d.path("cache");

    let (j, s) = stream_once(&d, &url, &cache, 3);
    let fetched = s["client"]["chunks_fetched"].as_u64().unwrap();
    // The VM ran (and verified every value it read) having fetched only
    // what it touched: far less than the appliance's 50 MiB of store.
    assert!(fetched > 100, "{s}");
    assert_eq!(s["trace"]["uploaded"], true, "{s}");
    eprintln!("cold: {j}\n{s}");

    // Warm cache: what the first session fetched is read from the cache;
    // only chunks never seen before are fetched (the guest runs on into new
    // keys): each a miss, or read ahead of one, neither of which the cache had.
    let (_, s2) = stream_once(&d, &url, &cache, 1);
    let n = |k: &str| s2["session"][k].as_u64().unwrap();
    assert!(n("cache_reads") > 0, "{s2}");
    let fetched = s2["client"]["chunks_fetched"].as_u64().unwrap();
    assert!(fetched >= n("misses") && fetched <= n("misses") + n("readahead_chunks"), "{s2}");
    assert_eq!(n("accesses"), n("cache_reads") + n("misses") + n("zero_reads") + n("late_reads"), "{s2}");
    eprintln!("warm: {s2}");
    let _ = server.kill();
    let _ = server.wait();
}

/// The disk streams too: the virtio-blk device reads missing chunks of its
/// overlay through the session before it touches them; the guest's `disk`
/// workload verifies everything it reads (data written before the snapshot
/// included) and its writes land in the overlay.
#[test]
fn disk_appliance_streams_through_the_block_device() {
    let d = TempDir::new("stream-disk");
    let disk = d.path("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let snap = snapshot_vm(&d, &["--testbed", "disk,size=4M", "--mem", "256M", "--disk", path_str(&disk)], "run");
    let store = d.path("store");
    create_appliance(&snap, &store, "disk1");
    let (mut server, url) = serve(&store, None);
    let (j, s) = stream_named(&d, "disk1", &url, &d.path("cache"), 2);
    assert_eq!(j["device_errors"], 0, "{j}");
    assert!(j["ops"].as_u64().unwrap() > 0, "{j}");
    assert!(s["client"]["chunks_fetched"].as_u64().unwrap() > 0, "{s}");
    eprintln!("disk stream: {j}\n{s}");
    let _ = server.kill();
    let _ = server.wait();
}

/// Issue 5's link: the thesis' 7.2 Mbit/s WAN with 120 ms of round trip
/// (tbf between two namespaces plus a user-space relay adding the delay).
/// A `kv` appliance with a 1 GiB image streams over it: the VM launches in
/// well under the time a full download would take, runs, and verifies
/// every value it reads.
#[test]
fn kv_appliance_streams_over_the_thesis_wan() {
    let d = TempDir::new("stream-wan");
    let snap = snapshot_vm(&d, &["--testbed", "kv,share=3,value=512", "--mem", "1G"], "run");
    let store = d.path("store");
    let created = create_appliance(&snap, &store, "wan");
    let wan = Wan::serve(&store, 7131);

    let dsock = d.path("stream.sock");
    let mut c = wan.client();
    c.args(["stream", &wan.url, "--name", "wan", "--cache", path_str(&d.path("cache"))]);
    c.args(["--serial", "/dev/null", "--api-sock", path_str(&dsock)]);
    let t0 = std::time::Instant::now();
    let child = spawn_piped(c);
    let ops0 = wait_for_run_phase(&dsock);
    let launch = t0.elapsed();
    // Random keys over a 120 ms round trip: a batch of 64 operations can
    // need dozens of new pages (seconds); run at least 8 s, and until the
    // guest has reported progress.
    std::thread::sleep(Duration::from_secs(8));
    let t1 = std::time::Instant::now();
    let st = loop {
        let st = api(&dsock, "status");
        assert_eq!(st["workload"]["errors"], 0, "{st}");
        if st["workload"]["ops"].as_u64().unwrap() > ops0 || t1.elapsed() > Duration::from_secs(120) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(st["workload"]["ops"].as_u64().unwrap() > ops0, "{st}");
    assert_eq!(api(&dsock, "shutdown")["ok"], true);
    let o = wait_output(child, T);
    assert_eq!(o.code, Some(0), "{o}");
    assert_eq!(o.json()["errors"], 0, "{o}");
    let line = o.stderr.lines().find_map(|l| l.strip_prefix("stream: {").map(|r| format!("{{{r}"))).unwrap();
    let s: serde_json::Value = serde_json::from_str(&line).unwrap();
    // A full download would move every stored chunk of the image first.
    let full_bytes = created["stored_bytes"].as_f64().unwrap();
    let full_s = full_bytes * 8.0 / 7.2e6;
    eprintln!(
        "WAN stream: launch {:.2} s (to the guest's run phase) vs full download {full_s:.1} s ({:.1} MB compressed)\n{s}",
        launch.as_secs_f64(),
        full_bytes / 1e6
    );
    assert!(launch.as_secs_f64() < full_s / 2.0, "launch {launch:?} vs full download {full_s:.1} s");
}

/// Waits until the testbed guest behind `sock` reports `phase`.
fn wait_phase(sock: &Path, phase: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let out = Command::new(vmm_bin()).args(["api", "--api-sock", path_str(sock), "status"]).output().unwrap();
        if serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|s| s["workload"]["phase"] == phase) {
            return;
        }
        assert!(t0.elapsed() < T, "never reached phase {phase}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An `app` appliance (a guest with a large prefilled state, snapshotted
/// idle before its user's session) in `store`, served from a fresh local
/// server; returns the server and its URL.
fn app_appliance(d: &TempDir, store: &Path, port: Option<u16>) -> (Child, String) {
    let created = make_app_appliance(d, store, "app,state=48M,features=16", "512M");
    assert!(created["data_chunks"].as_u64().unwrap() > 12_000, "{created}");
    serve(store, port)
}

/// Boots an `app` guest, snapshots it idle, makes appliance `app` of it;
/// returns `vmm appliance create`'s report.
fn make_app_appliance(d: &TempDir, store: &Path, spec: &str, mem: &str) -> serde_json::Value {
    let snap = snapshot_vm(d, &["--testbed", spec, "--mem", mem], "idle");
    let created = create_appliance(&snap, store, "app");
    let _ = std::fs::remove_file(&snap);
    created
}

fn serve(store: &Path, port: Option<u16>) -> (Child, String) {
    let addr = match port {
        Some(p) => std::net::SocketAddr::from(([127, 0, 0, 1], p)),
        None => std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(),
    };
    let mut c = Command::new(vmm_bin());
    c.args(["appliance", "serve", "--store", path_str(store), "--listen", &addr.to_string()]);
    let server = spawn_piped(c);
    std::thread::sleep(Duration::from_millis(300));
    (server, format!("http://{addr}"))
}

/// One whole `app` session streamed to its end: the guest's final JSON and the stream summary.
fn app_session(url: &str, cache: &Path, mode: &str, session: &str) -> (serde_json::Value, serde_json::Value) {
    let mut c = Command::new(vmm_bin());
    c.args(["stream", url, "--name", "app", "--cache", path_str(cache), "--mode", mode, "--session", session]);
    c.args(["--serial", "/dev/null"]);
    let o = wait_output(spawn_piped(c), T);
    assert_eq!(o.code, Some(0), "{o}");
    let j = o.json();
    assert_eq!(j["errors"], 0, "the guest read wrong data: {o}");
    assert_eq!(j["phase"], "done", "{o}");
    let line = o.stderr.lines().find_map(|l| l.strip_prefix("stream: {").map(|r| format!("{{{r}"))).unwrap();
    (j, serde_json::from_str(&line).unwrap())
}

/// Issue 5's knowledge loop with real VM sessions: five users with
/// different parameters (their choices, how many features they open, how
/// long they think) stream an `app` appliance; their traces are analysed;
/// a sixth user, not among them, streams it with vTube and reads almost
/// everything from chunks that arrived before it asked (the rest comes
/// by sequential read-ahead); demand-only fetching of the same session
/// misses on every chunk. Both verify every page they read.
#[test]
fn app_sessions_train_vtube_and_a_new_user_rarely_misses() {
    let d = TempDir::new("stream-app");
    let store = d.path("store");
    let (mut server, url) = app_appliance(&d, &store, None);
    for (i, (steps, think)) in [(6, 100), (8, 50), (4, 150), (6, 0), (10, 50)].into_iter().enumerate() {
        let session = format!("app,seed={},steps={steps},think={think}", 100 + i);
        let (j, s) = app_session(&url, &d.path(&format!("train{i}")), "demand", &session);
        assert!(j["ops"].as_u64().unwrap() >= 256, "{j}");
        assert_eq!(s["trace"]["uploaded"], true, "{s}");
    }
    let o = vmm(&["appliance", "analyze", "--store", path_str(&store), "app"], T);
    assert_eq!(o.code, Some(0), "{o}");
    let k = o.json();
    assert_eq!((k["version"].as_u64(), k["traces"].as_u64()), (Some(1), Some(5)), "{k}");

    let new_user = "app,seed=999,steps=8,think=100";
    let (jv, v) = app_session(&url, &d.path("vtube"), "vtube", new_user);
    let (jd, dm) = app_session(&url, &d.path("demand"), "demand", new_user);
    assert_eq!(jv["checksum"], jd["checksum"], "both read the same pages, and the same content");
    assert_eq!(v["knowledge_version"], 1, "{v}");
    let n = |s: &serde_json::Value, k: &str| s["session"][k].as_f64().unwrap();
    let accessed = n(&v, "accesses") - n(&v, "zero_reads");
    let miss_rate = n(&v, "misses") / accessed;
    let fetch_ratio = v["client"]["chunks_fetched"].as_f64().unwrap() / accessed;
    eprintln!(
        "new user, vTube: {accessed} chunks accessed, miss rate {:.2}%, fetch ratio {fetch_ratio:.2}, launch {:.2} s, \
         {} late reads, {} read ahead; demand only: {} misses\n{v}",
        miss_rate * 100.0,
        n(&v, "launch_s"),
        n(&v, "late_reads"),
        n(&v, "readahead_chunks"),
        n(&dm, "misses")
    );
    assert_eq!(n(&dm, "misses"), n(&dm, "accesses") - n(&dm, "zero_reads"), "demand only misses every data chunk");
    assert!(miss_rate < 0.05, "vTube missed {:.1}% of its accesses: {v}", miss_rate * 100.0);
    let _ = server.kill();
    let _ = server.wait();
}

/// The server goes away in the middle of a session and comes back: the
/// guest waits for the pages it needs (uncorrupted), then completes.
#[test]
fn a_server_that_goes_away_mid_session_is_waited_for() {
    let d = TempDir::new("stream-away");
    let store = d.path("store");
    let (mut server, url) = app_appliance(&d, &store, None);
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let sock = d.path("stream.sock");
    let mut c = Command::new(vmm_bin());
    c.args(["stream", &url, "--name", "app", "--cache", path_str(&d.path("cache")), "--mode", "demand"]);
    c.args(["--session", "app,seed=5,steps=8,think=400", "--serial", "/dev/null", "--api-sock", path_str(&sock)]);
    let child = spawn_piped(c);
    wait_phase(&sock, "run");
    let _ = server.kill();
    let _ = server.wait();
    let before = api(&sock, "status")["workload"]["ops"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let st = api(&sock, "status");
    assert_eq!(st["workload"]["phase"], "run", "the guest waits for its pages: {st}");
    assert_eq!(st["workload"]["errors"], 0, "{st}");
    let (mut server, _) = serve(&store, Some(port));
    let o = wait_output(child, T);
    assert_eq!(o.code, Some(0), "{o}");
    let j = o.json();
    assert_eq!(j["errors"], 0, "{o}");
    assert_eq!(j["phase"], "done", "{o}");
    assert!(j["ops"].as_u64().unwrap() > before, "{j}");
    assert!(o.stderr.contains("retrying"), "the outage was noticed and waited out: {}", o.stderr);
    let _ = server.kill();
    let _ = server.wait();
}

/// Issue 5's first acceptance point: a testbed appliance with several
/// hundred MiB of touched state (320 MiB of `app` state) in a 2 GiB image
/// streams over the thesis' 7.2 Mbit/s, 120 ms link and completes its
/// session, every page it reads verified; it launches in a small fraction
/// of the full download's time. No training here (vTube without knowledge:
/// demand fetches with sequential read-ahead); `bench stream-vm` measures
/// the trained policies.
#[test]
fn app_appliance_completes_its_session_over_the_thesis_wan() {
    let d = TempDir::new("stream-app-wan");
    let store = d.path("store");
    let created = make_app_appliance(&d, &store, "app,state=320M,features=32", "2G");
    let wan = Wan::serve(&store, 7132);
    let mut c = wan.client();
    c.args(["stream", &wan.url, "--name", "app", "--cache", path_str(&d.path("cache"))]);
    c.args(["--session", "app,seed=7,steps=8,think=100", "--serial", "/dev/null", "--no-upload"]);
    let t0 = std::time::Instant::now();
    let o = wait_output(spawn_piped(c), T);
    let wall = t0.elapsed().as_secs_f64();
    assert_eq!(o.code, Some(0), "{o}");
    let j = o.json();
    assert_eq!((j["errors"].as_u64(), j["phase"].as_str()), (Some(0), Some("done")), "{o}");
    let line = o.stderr.lines().find_map(|l| l.strip_prefix("stream: {").map(|r| format!("{{{r}"))).unwrap();
    let s: serde_json::Value = serde_json::from_str(&line).unwrap();
    let full_s = created["stored_bytes"].as_f64().unwrap() * 8.0 / 7.2e6;
    let launch = s["session"]["launch_s"].as_f64().unwrap();
    eprintln!(
        "app over the WAN: {} pages verified; launch {launch:.2} s, whole session {wall:.1} s; a full download of \
         {:.0} MB takes {full_s:.0} s\n{s}",
        j["ops"],
        created["stored_bytes"].as_f64().unwrap() / 1e6
    );
    assert!(launch < full_s / 10.0, "launch {launch:.1} s vs full download {full_s:.0} s");
}
