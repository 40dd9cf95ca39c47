//! Migration between two hosts on one machine: the source VMM in one network
//! namespace, the destination in another, joined by a rate-limited veth.

mod common;

use std::path::Path;

use std::time::Duration;

use common::{api, migrate_mode, path_str, spawn_in, wait_for_run_phase, wait_output, TempDir, TwoHosts};
use netsim::{NetnsPair, Side, DST_IP};

const T: Duration = Duration::from_secs(180);

fn migrate(sock: &Path, to: &str, key: &Path) -> (bool, serde_json::Value, String) {
    migrate_mode(sock, to, key, "stop-and-copy")
}

#[test]
fn stop_and_copy_between_two_namespaces() {
    let pair = NetnsPair::create(Some(1_000_000_000)).unwrap();
    let d = TempDir::new("mig");
    let key = d.path("key");
    common::write_key(&key, b"0123456789abcdef-test-migration-key");
    let wrong = d.path("wrong");
    common::write_key(&wrong, b"fedcba9876543210-some-other-key!!");
    let loose = d.path("loose");
    std::fs::write(&loose, b"fedcba9876543210-some-other-key!!").unwrap(); // mode 0644
    let src_sock = d.path("src.sock");
    let to = format!("{DST_IP}:7001");

    let dst = spawn_in(&pair, Side::Dst, &["receive", "--listen", &to, "--key-file", path_str(&key)]);
    let src = spawn_in(
        &pair,
        Side::Src,
        &[
            "run",
            "--testbed",
            "kv,duration=4,share=20",
            "--mem",
            "256M",
            "--vcpus",
            "2",
            "--api-sock",
            path_str(&src_sock),
        ],
    );
    wait_for_run_phase(&src_sock);

    // A key file others can read is refused before anything is sent.
    let (ok, v, err) = migrate(&src_sock, &to, &loose);
    assert!(!ok, "{v}");
    assert!(err.contains("chmod 600"), "{v} {err}");
    // A source with the wrong key is refused (its TLS handshake fails), and its VM keeps running.
    let (ok, v, err) = migrate(&src_sock, &to, &wrong);
    assert!(!ok, "migration with a wrong key succeeded: {v}");
    assert!(v["error"].as_str().unwrap_or("").contains("TLS") || err.contains("TLS"), "{v} {err}");
    let st = api(&src_sock, "status");
    assert_eq!(st["state"], "running", "{st}");
    let before = st["workload"]["ops"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        api(&src_sock, "status")["workload"]["ops"].as_u64().unwrap() > before,
        "source stopped after a refused migration"
    );

    // The real migration.
    let (ok, report, err) = migrate(&src_sock, &to, &key);
    assert!(ok, "{report} {err}");
    assert_eq!(report["mode"], "stop-and-copy");
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0);
    assert!(report["bytes"]["stop_and_copy"].as_u64().unwrap() > 50 << 20, "{report}");
    assert_eq!(report["integrity"]["match"], true, "{report}");
    let so = wait_output(src, T);
    assert_eq!(so.code, Some(0), "{so}");
    assert_eq!(so.json()["exit"], "migrated", "{so}");
    let migrated_at = so.json()["ops"].as_u64().unwrap();

    let d_out = wait_output(dst, T);
    assert_eq!(d_out.code, Some(0), "{d_out}");
    let j = d_out.json();
    assert_eq!(j["exit"], "done", "{d_out}");
    assert_eq!(j["errors"], 0, "{d_out}");
    assert_eq!(j["vcpus"], 2, "{d_out}");
    assert!(j["ops"].as_u64().unwrap() > migrated_at, "no progress on the destination\n{d_out}");
}

#[test]
fn dead_destination_leaves_the_source_running() {
    let pair = NetnsPair::create(None).unwrap();
    let d = TempDir::new("mig-dead");
    let key = d.path("key");
    common::write_key(&key, b"0123456789abcdef-test-migration-key");
    let sock = d.path("src.sock");
    let src =
        spawn_in(&pair, Side::Src, &["run", "--testbed", "kv,share=5", "--mem", "128M", "--api-sock", path_str(&sock)]);
    wait_for_run_phase(&sock);
    // Nobody listens on the destination.
    let (ok, v, _) = migrate(&sock, &format!("{DST_IP}:7002"), &key);
    assert!(!ok, "{v}");
    assert!(v["error"].as_str().unwrap().contains("cannot connect"), "{v}");
    // The link is down.
    pair.set_link(false).unwrap();
    let (ok, v, _) = migrate(&sock, &format!("{DST_IP}:7002"), &key);
    assert!(!ok, "{v}");
    pair.set_link(true).unwrap();
    let st = api(&sock, "status");
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(api(&sock, "shutdown")["ok"], true);
    let o = wait_output(src, T);
    assert_eq!(o.code, Some(0), "{o}");
    assert_eq!(o.json()["errors"], 0, "{o}");
}

/// Pre-copy of guests that keep writing: every dirtied page must be resent,
/// or the destination's verification (page stamps, value checksums) fails.
/// The guests run until shut down, so no workload timer races the rounds.
fn precopy(spec: &str, port: u16) {
    let h = TwoHosts::new(1_000_000_000, "mig-pre", port);
    let src = h.source(spec, "256M", "2");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, report, err) = migrate_mode(&h.src_sock, &h.to, &h.key, "precopy");
    assert!(ok, "{report} {err}");
    assert_eq!(report["mode"], "precopy");
    assert!(!report["rounds"].as_array().unwrap().is_empty(), "{report}");
    assert!(report["bytes"]["precopy"].as_u64().unwrap() > 0, "{report}");
    assert!(report["downtime_ms"].as_f64().unwrap() < report["total_duration_ms"].as_f64().unwrap(), "{report}");
    assert_eq!(report["integrity"]["match"], true, "{report}");
    let so = wait_output(src, T);
    assert_eq!(so.code, Some(0), "{so}");
    assert_eq!(so.json()["exit"], "migrated", "{so}");
    let migrated_at = so.json()["ops"].as_u64().unwrap();
    // The destination runs on, without errors, from where the source stopped.
    let ops = wait_for_run_phase(&h.dst_sock);
    std::thread::sleep(Duration::from_millis(1500));
    let st = api(&h.dst_sock, "status");
    assert_eq!(st["workload"]["errors"], 0, "{st}");
    assert!(st["workload"]["ops"].as_u64().unwrap() > ops.max(migrated_at), "{st}");
    assert_eq!(api(&h.dst_sock, "shutdown")["ok"], true);
    let d_out = wait_output(h.dst, T);
    assert_eq!(d_out.code, Some(0), "{d_out}");
    assert_eq!(d_out.json()["errors"], 0, "pages were lost or stale after pre-copy\n{report}\n{d_out}");
    eprintln!("pre-copy report: {report}");
}

#[test]
fn precopy_of_a_page_dirtying_guest() {
    precopy("mem,wss=64M,rate=20000", 7003);
}

#[test]
fn precopy_of_a_kv_guest() {
    precopy("kv,share=20,value=512", 7004);
}

/// The operator cancels a pre-copy that is under way: the VM keeps running
/// on the source, unchanged; a cancel with no migration is refused clearly.
#[test]
fn precopy_cancelled_by_the_operator() {
    let h = TwoHosts::new(100_000_000, "mig-cancel", 7005);
    let src = h.source("kv,share=20", "512M", "1");
    let sock = &h.src_sock;
    let c = api(sock, "migrate-cancel");
    assert_eq!(c["ok"], false, "{c}");
    assert!(c["error"].as_str().unwrap().contains("no migration"), "{c}");
    // 100 MiB of store at 100 Mbit/s: the first round alone takes ~8 s.
    let mig = {
        let (s, t, k) = (sock.clone(), h.to.clone(), h.key.clone());
        std::thread::spawn(move || migrate_mode(&s, &t, &k, "precopy"))
    };
    std::thread::sleep(Duration::from_millis(1500));
    let st = api(sock, "status");
    assert!(st["migration"]["phase"].as_str().unwrap_or("").starts_with("pre-copy"), "{st}");
    assert_eq!(api(sock, "migrate-cancel")["ok"], true);
    let (ok, v, _) = mig.join().unwrap();
    assert!(!ok, "{v}");
    assert!(v["error"].as_str().unwrap().contains("cancelled by the operator"), "{v}");
    let st = api(sock, "status");
    assert_eq!(st["state"], "running", "{st}");
    assert!(st.get("migration").is_none(), "{st}");
    assert_eq!(api(sock, "shutdown")["ok"], true);
    let o = wait_output(src, T);
    assert_eq!(o.code, Some(0), "{o}");
    assert_eq!(o.json()["errors"], 0, "{o}");
}
