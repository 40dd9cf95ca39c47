//! The destination owns its host resources: `vmm receive` opens only disks
//! it was given (`--disk OLD=NEW`, or `--same-paths`), never a path the
//! stream names; every VMM locks its disk images, so a second VMM cannot
//! open one in use, and a migration hands the lock over at its commit.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{api, migrate_mode, path_str, spawn_piped, vmm, vmm_bin, wait_for_run_phase, wait_output, TempDir};

const T: Duration = Duration::from_secs(120);

fn receive(args: &[&str]) -> std::process::Child {
    let mut c = Command::new(vmm_bin());
    c.arg("receive").args(args);
    spawn_piped(c)
}

#[test]
fn disks_are_locked_and_handed_over_only_to_a_destination_given_them() {
    let d = TempDir::new("disk-own");
    let disk = d.path("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let key = d.path("key");
    common::write_key(&key, b"0123456789abcdef-test-migration-key");
    let sock = d.path("src.sock");
    let src = spawn_piped({
        let mut c = Command::new(vmm_bin());
        c.args(["run", "--testbed", "disk,duration=6,size=1M", "--mem", "256M", "--disk", path_str(&disk)]);
        c.args(["--api-sock", path_str(&sock)]);
        c
    });
    wait_for_run_phase(&sock);

    // A second VMM cannot take the running VM's disk.
    let o = vmm(&["run", "--testbed", "disk,duration=1,size=1M", "--mem", "128M", "--disk", path_str(&disk)], T);
    assert_eq!(o.code, Some(2), "{o}");
    assert!(o.stderr.contains("in use by another VMM"), "{o}");

    // A destination that was not given the disk refuses the VM; the source runs on.
    let to = "127.0.0.1:7481";
    let dst = receive(&["--listen", to, "--key-file", path_str(&key)]);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, v, err) = migrate_mode(&sock, to, &key, "stop-and-copy");
    assert!(!ok, "{v}");
    let msg = format!("{v} {err}");
    assert!(msg.contains("--disk OLD=NEW"), "{msg}");
    assert_eq!(api(&sock, "status")["state"], "running");
    drop(dst);

    // Given the disk (here: shared storage at the same path), the destination takes
    // the lock only at the commit, from the source, and runs the VM.
    let to = "127.0.0.1:7482";
    let map = format!("{}={}", path_str(&disk), path_str(&disk));
    let dst_sock = d.path("dst.sock");
    let dst =
        receive(&["--listen", to, "--key-file", path_str(&key), "--disk", &map, "--api-sock", path_str(&dst_sock)]);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, v, err) = migrate_mode(&sock, to, &key, "stop-and-copy");
    assert!(ok, "{v} {err}");
    let so = wait_output(src, T);
    assert_eq!(so.json()["exit"], "migrated", "{so}");
    // The destination holds it now: a third VMM is refused.
    let o = vmm(&["run", "--testbed", "disk,duration=1,size=1M", "--mem", "128M", "--disk", path_str(&disk)], T);
    assert_eq!(o.code, Some(2), "{o}");
    assert!(o.stderr.contains("in use by another VMM"), "{o}");
    let out = wait_output(dst, T);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.json()["errors"], 0, "{out}");
    assert_eq!(out.json()["device_errors"], 0, "{out}");
}
