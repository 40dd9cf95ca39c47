//! Snapshot a running testbed VM to a file and restore it in a new VMM: the
//! guest continues where it was, its data verifies, and a damaged snapshot
//! file is refused before anything runs.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::{api, path_str, snapshot, spawn_piped, vmm, vmm_bin, wait_for_run_phase, wait_output, TempDir};

const T: Duration = Duration::from_secs(120);

fn spawn(args: &[&str]) -> Child {
    let mut c = Command::new(vmm_bin());
    c.args(args);
    spawn_piped(c)
}

/// Runs `spec` with an API socket, snapshots it after a second of run phase,
/// shuts it down, and returns the snapshot path and ops at snapshot time.
fn snapshot_of(d: &TempDir, spec: &str, extra: &[&str]) -> (std::path::PathBuf, u64) {
    let sock = d.path("api.sock");
    let snap = d.path("vm.snap");
    let mut args = vec!["run", "--testbed", spec, "--mem", "256M", "--api-sock", path_str(&sock)];
    args.extend_from_slice(extra);
    let child = spawn(&args);
    wait_for_run_phase(&sock);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(api(&sock, "pause")["ok"], true);
    let ops_at_snapshot = api(&sock, "status")["workload"]["ops"].as_u64().unwrap();
    let reply = snapshot(&sock, &snap);
    assert!(reply["pages_stored"].as_u64().unwrap() > 0, "{reply}");
    assert_eq!(api(&sock, "shutdown")["ok"], true);
    let o = wait_output(child, T);
    assert_eq!(o.code, Some(0), "{o}");
    (snap, ops_at_snapshot)
}

#[test]
fn kv_vm_continues_after_restore() {
    let d = TempDir::new("snap-kv");
    let (snap, ops) = snapshot_of(&d, "kv,duration=3,share=20,value=256", &["--vcpus", "2"]);
    let o = vmm(&["restore", "--snapshot", path_str(&snap)], T);
    assert_eq!(o.code, Some(0), "{o}");
    let j = o.json();
    assert_eq!(j["exit"], "done", "{o}");
    assert_eq!(j["errors"], 0, "{o}");
    assert_eq!(j["vcpus"], 2, "{o}");
    assert!(j["ops"].as_u64().unwrap() > ops, "no progress after restore: {ops} -> {}\n{o}", j["ops"]);
}

#[test]
fn disk_vm_continues_after_restore() {
    let d = TempDir::new("snap-disk");
    let disk = d.path("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let (snap, _) = snapshot_of(&d, "disk,duration=3,size=1M", &["--disk", path_str(&disk)]);
    let o = vmm(&["restore", "--snapshot", path_str(&snap)], T);
    assert_eq!(o.code, Some(0), "{o}");
    assert_eq!(o.json()["errors"], 0, "{o}");
    assert_eq!(o.json()["device_errors"], 0, "{o}");
}

#[test]
fn damaged_snapshots_are_refused() {
    let d = TempDir::new("snap-bad");
    let (snap, _) = snapshot_of(&d, "kv,duration=2,share=5", &[]);
    let good = std::fs::read(&snap).unwrap();
    let check = |name: &str, bytes: &[u8], needle: &str| {
        let p = d.path(name);
        std::fs::write(&p, bytes).unwrap();
        let o = vmm(&["restore", "--snapshot", path_str(&p)], T);
        assert_eq!(o.code, Some(2), "{name}\n{o}");
        assert!(o.stderr.contains(needle), "{name}: stderr lacks {needle:?}\n{o}");
    };
    check("truncated", &good[..good.len() / 2], "truncated");
    let mut flipped = good.clone();
    let last = flipped.len() - 100;
    flipped[last] ^= 0x40;
    check("flipped", &flipped, "checksum mismatch");
    check("garbage", b"this is not a snapshot at all, just text", "not a vmm snapshot");
    let mut version = good.clone();
    version[8] = 99;
    check("version", &version, "format version 99");
    let o = vmm(&["restore", "--snapshot", "/nonexistent.snap"], T);
    assert_eq!(o.code, Some(2), "{o}");
}
