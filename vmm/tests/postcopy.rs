//! Post-copy and enlightened post-copy between two namespaces: the
//! destination runs the VM before its memory has arrived.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::{api, migrate_mode, path_str, spawn_piped, vmm_bin, wait_for_run_phase, wait_output, TempDir, TwoHosts};
use netsim::{Side, DST_IP};

const T: Duration = Duration::from_secs(300);

/// Migrates a running guest with `mode`; checks the report, the integrity
/// digests, and that the guest verifies its data and runs on at the
/// destination. Returns the report.
fn migrate_guest(mode: &str, spec: &str, mem: &str, vcpus: &str, rate: u64, port: u16) -> serde_json::Value {
    let h = TwoHosts::new(rate, "mig-post", port);
    let src = h.source(spec, mem, vcpus);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, report, err) = migrate_mode(&h.src_sock, &h.to, &h.key, mode);
    assert!(ok, "{report} {err}");
    assert_eq!(report["mode"], mode);
    assert_eq!(report["integrity"]["match"], true, "{report}");
    assert_eq!(report["free_pages_sent"], 0, "{report}");
    let so = wait_output(src, T);
    assert_eq!(so.code, Some(0), "{so}");
    assert_eq!(so.json()["exit"], "migrated", "{so}");
    let migrated_at = so.json()["ops"].as_u64().unwrap();
    // The destination runs on, without errors, from where the source stopped.
    let ops = wait_for_run_phase(&h.dst_sock);
    std::thread::sleep(Duration::from_millis(1000));
    let st = api(&h.dst_sock, "status");
    assert_eq!(st["workload"]["errors"], 0, "{st}");
    // The guest held its free frames from the source's Prepare on: the
    // destination gives them back (Done) once the VM runs there.
    if mode == "enlightened" {
        let held = report["pages"]["free"].as_u64().unwrap();
        assert!(held > 0, "{report}");
        wait_frames_released(&h.dst_sock);
    }
    assert!(st["workload"]["ops"].as_u64().unwrap() > ops.max(migrated_at), "{st}");
    assert_eq!(api(&h.dst_sock, "shutdown")["ok"], true);
    let d_out = wait_output(h.dst, T);
    assert_eq!(d_out.code, Some(0), "{d_out}");
    assert_eq!(d_out.json()["errors"], 0, "pages were lost or stale after post-copy\n{report}\n{d_out}");
    eprintln!("{mode} report: {report}");
    report
}

/// Waits until the testbed guest behind `sock` holds no frames for the
/// enlightenment device (it holds them from its Ready until Done/Abort).
fn wait_frames_released(sock: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = api(sock, "status");
        let held = st["workload"]["held_frames"].as_u64().unwrap_or(u64::MAX);
        if held == 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the guest still holds {held} frames: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 4's acceptance: a 2 GiB `kv` guest under load, with stale data in
/// its free memory, in every mode at 1 Gbit/s.
fn two_gib(mode: &str, port: u16) -> serde_json::Value {
    let r = migrate_guest(mode, "kv,share=20,value=1024,stale=40", "2G", "2", 1_000_000_000, port);
    let total = r["total_duration_ms"].as_f64().unwrap();
    let bytes: u64 = ["precopy", "stop_and_copy", "push", "demand"].iter().filter_map(|k| r["bytes"][k].as_u64()).sum();
    eprintln!(
        "2 GiB {mode}: execution transfer {:.0} ms, downtime {:.0} ms, total {total:.0} ms, {:.0} MiB sent ({:.0} Mbit/s)",
        r["execution_transfer_ms"].as_f64().unwrap(),
        r["downtime_ms"].as_f64().unwrap(),
        bytes as f64 / 1048576.0,
        bytes as f64 * 8.0 / total / 1000.0,
    );
    r
}

#[test]
fn two_gib_stop_and_copy() {
    two_gib("stop-and-copy", 7111);
}

#[test]
fn two_gib_precopy() {
    two_gib("precopy", 7112);
}

#[test]
fn two_gib_postcopy() {
    let r = two_gib("postcopy", 7113);
    // Simple post-copy sends the stale (free) memory too.
    assert!(r["bytes"]["push"].as_u64().unwrap() + r["bytes"]["demand"].as_u64().unwrap() > 1200 << 20, "{r}");
}

#[test]
fn two_gib_enlightened() {
    let r = two_gib("enlightened", 7114);
    let free = r["pages"]["free"].as_u64().unwrap();
    assert!(free > (2u64 << 30) / 4096 / 2, "{r}");
    // Free pages are never sent: what moves is about the non-free memory.
    let nonfree_bytes = (r["pages"]["total"].as_u64().unwrap() - free) * 4096;
    let sent = r["bytes"]["push"].as_u64().unwrap() + r["bytes"]["demand"].as_u64().unwrap();
    assert!(sent < nonfree_bytes * 12 / 10, "{r}");
    // Execution transfer = enlightenment + suspension + device state (+ the
    // destination's restore and commit round trip).
    let et = r["execution_transfer_ms"].as_f64().unwrap();
    assert!(et >= r["enlightenment_ms"].as_f64().unwrap() + r["state_transfer_ms"].as_f64().unwrap(), "{r}");
    let ideal_ms = nonfree_bytes as f64 * 8.0 / 1e9 * 1000.0;
    eprintln!(
        "2 GiB enlightened: total {:.0} ms vs non-free bytes / link rate {ideal_ms:.0} ms (ratio {:.2})",
        r["total_duration_ms"].as_f64().unwrap(),
        r["total_duration_ms"].as_f64().unwrap() / ideal_ms
    );
}

#[test]
fn postcopy_small() {
    let r = migrate_guest("postcopy", "kv,share=20,value=512,stale=30", "256M", "2", 1_000_000_000, 7101);
    assert!(r["bytes"]["push"].as_u64().unwrap() > 40 << 20, "{r}");
}

#[test]
fn enlightened_small() {
    let r = migrate_guest("enlightened", "kv,share=20,value=512,stale=30", "256M", "2", 1_000_000_000, 7102);
    assert!(r["enlightenment_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["pages"]["free"].as_u64().unwrap() > 0, "{r}");
}

/// A link broken after the switch-over: the destination's faulting vCPUs
/// wait, nothing is lost, and the migration completes once the link is back
/// (TCP keeps both connections through the outage).
#[test]
fn link_break_after_switchover_completes_when_the_link_returns() {
    let mut m = Switched::start("enlightened", 7121, "mig-break");
    std::thread::sleep(Duration::from_millis(200));
    m.hosts.pair.set_link(false).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Still migrating: the source has not finished.
    assert!(m.mig.try_wait().unwrap().is_none(), "the migration ended while the link was down");
    m.hosts.pair.set_link(true).unwrap();
    let report = m.finish();
    assert!(report["total_duration_ms"].as_f64().unwrap() > 2000.0, "{report}");
    eprintln!("link break: total {} ms, faults {}", report["total_duration_ms"], report["fault_latency_ms"]);
}

/// A post-copy of a loaded 1 GiB `kv` guest running in the background
/// (`migrate` as a child process), from the moment the VM runs at the
/// destination.
struct Switched {
    hosts: TwoHosts,
    src: Child,
    mig: Child,
    report_path: std::path::PathBuf,
}

impl Switched {
    fn start(mode: &str, port: u16, tag: &str) -> Self {
        let hosts = TwoHosts::new(1_000_000_000, tag, port);
        let src = hosts.source("kv,share=20,value=1024,stale=40", "1G", "2");
        let report_path = hosts.dir.path("report.json");
        let mig = Command::new(vmm_bin())
            .args(["migrate", "--api-sock", path_str(&hosts.src_sock), "--to", &hosts.to, "--mode", mode])
            .args(["--key-file", path_str(&hosts.key), "--report", path_str(&report_path)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The destination serves its API once the VM runs there.
        let start = std::time::Instant::now();
        while !hosts.dst_sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(60), "the switch-over never happened");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self { hosts, src, mig, report_path }
    }

    /// Waits for the migration; checks its success and integrity, the
    /// source's end and the guest's own verification at the destination.
    fn finish(mut self) -> serde_json::Value {
        let status = self.mig.wait().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&self.report_path).unwrap()).unwrap();
        assert!(status.success(), "{report}");
        assert_eq!(report["integrity"]["match"], true, "{report}");
        let so = wait_output(self.src, T);
        assert_eq!(so.json()["exit"], "migrated", "{so}");
        std::thread::sleep(Duration::from_millis(500));
        let st = api(&self.hosts.dst_sock, "status");
        assert_eq!(st["workload"]["errors"], 0, "{st}");
        assert_eq!(api(&self.hosts.dst_sock, "shutdown")["ok"], true);
        let d_out = wait_output(self.hosts.dst, T);
        assert_eq!(d_out.code, Some(0), "{d_out}");
        assert_eq!(d_out.json()["errors"], 0, "{d_out}");
        report
    }
}

/// A destination that dies after the source suspended the VM and sent its
/// state, before committing: the source resumes the VM unchanged, and the
/// guest gets back the free frames it held for the enlightenment.
#[test]
fn destination_dying_before_the_commit_leaves_the_source_running() {
    use migrate::transport::Credentials;
    use migrate::wire::{Channel, FrameReader, Kind};
    let d = TempDir::new("mig-die");
    let key_file = d.path("key");
    let key_bytes = b"0123456789abcdef-test-migration-key";
    common::write_key(&key_file, key_bytes);
    let sock = d.path("src.sock");
    let src = spawn_piped({
        let mut c = Command::new(vmm_bin());
        c.args(["run", "--testbed", "kv,share=20,stale=20", "--mem", "256M", "--vcpus", "2", "--api-sock"]);
        c.arg(&sock);
        c
    });
    wait_for_run_phase(&sock);
    for mode in ["enlightened", "postcopy"] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = l.local_addr().unwrap().to_string();
        let key = Credentials::shared_key(key_bytes).unwrap();
        // The fake destination: authenticates both connections, reads up to
        // the switch-over and the VM state, then vanishes.
        let fake = std::thread::spawn(move || {
            let (main, _) = l.accept().unwrap();
            let main = key.accept(main, Channel::Main, Duration::from_secs(10)).unwrap();
            let mut fr = FrameReader::new(std::io::BufReader::new(main.try_clone().unwrap()));
            assert_eq!(fr.expect().unwrap().kind, Kind::Config);
            let (demand, _) = l.accept().unwrap();
            let demand = key.accept(demand, Channel::Demand, Duration::from_secs(10)).unwrap();
            let mut kinds = Vec::new();
            loop {
                let f = fr.expect().unwrap();
                kinds.push(f.kind);
                if f.kind == Kind::Switchover {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
            drop(fr);
            drop(main);
            drop(demand);
            kinds
        });
        let (ok, v, err) = migrate_mode(&sock, &to, &key_file, mode);
        let kinds = fake.join().unwrap();
        assert!(!ok, "{v}");
        assert!(v["error"].as_str().unwrap_or("").contains("did not confirm"), "{v} {err}");
        if mode == "enlightened" {
            assert!(kinds.contains(&Kind::FreeRanges), "{kinds:?}");
        }
        // Running again, making progress, and (enlightened) the guest's held
        // frames were given back: a new enlightenment round succeeds.
        let st = api(&sock, "status");
        assert_eq!(st["state"], "running", "{st}");
        wait_frames_released(&sock);
        let before = st["workload"]["ops"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(api(&sock, "status")["workload"]["ops"].as_u64().unwrap() > before);
        let e = api(&sock, "enlighten");
        assert_eq!(e["ok"], true, "{e}");
    }
    assert_eq!(api(&sock, "shutdown")["ok"], true);
    let o = wait_output(src, T);
    assert_eq!(o.code, Some(0), "{o}");
    assert_eq!(o.json()["errors"], 0, "{o}");
}

/// Connections destroyed after the switch-over (as a firewall or a NAT
/// reset would): the source reconnects, the destination says which pages it
/// still lacks, and the migration completes with no page lost.
#[test]
fn connections_reset_after_switchover_are_reestablished() {
    let m = Switched::start("postcopy", 7122, "mig-reset");
    // Twice: destroy every connection between the two hosts.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(700));
        let st = m.hosts.pair.command(Side::Src, "ss").args(["-K", "dst", &DST_IP.to_string()]).status().unwrap();
        assert!(st.success());
    }
    let report = m.finish();
    assert!(report["reconnections"].as_u64().unwrap() >= 1, "{report}");
    eprintln!("reset: {} reconnections, total {} ms", report["reconnections"], report["total_duration_ms"]);
}
