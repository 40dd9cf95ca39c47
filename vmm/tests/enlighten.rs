//! The enlightenment device end to end: a running testbed guest answers the
//! `enlighten` API command with a free bitmap and a priority map that match
//! what it knows about its memory, twice, without disturbing its workload.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{api, path_str, snapshot, spawn_piped, vmm_bin, wait_for_run_phase, wait_output, TempDir};

const T: Duration = Duration::from_secs(120);
const MEM: u64 = 256 << 20;

/// Pages of the testbed image: its PT_LOAD segments' end (after .bss, page
/// aligned by the linker script) minus the load address.
fn image_pages() -> u64 {
    let elf = vmm::testbed::GUEST_ELF;
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    let end = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == 1)
        .map(|ph| u64_at(ph + 0x10) + u64_at(ph + 0x28))
        .max()
        .unwrap();
    (end.next_multiple_of(4096) - testbed_abi::IMAGE_GPA) / 4096
}

fn class(r: &serde_json::Value, name: &str) -> u64 {
    r["classes"][name].as_u64().unwrap_or_else(|| panic!("no class {name}: {r}"))
}

/// Runs `spec`, calls `enlighten` twice in the run phase, checks the
/// summary, and returns the first reply. `user_bytes` is the RAM the
/// workload uses.
fn run(tag: &str, spec: &str, user_bytes: u64, min_free_pct: u64) -> serde_json::Value {
    let d = TempDir::new(tag);
    let sock = d.path("api.sock");
    let mut c = Command::new(vmm_bin());
    c.args(["run", "--testbed", spec, "--mem", "256M", "--api-sock", path_str(&sock)]);
    let child = spawn_piped(c);
    wait_for_run_phase(&sock);
    let frames = MEM / 4096;
    let user_frames = user_bytes / 4096;
    let mut first = None;
    for round in 0..2 {
        let before = api(&sock, "status")["workload"]["ops"].as_u64().unwrap();
        let r = api(&sock, "enlighten");
        assert_eq!(r["ok"], true, "round {round}: {r}");
        eprintln!("{tag} round {round}: {r}");
        assert_eq!(r["frames"], frames, "{r}");
        assert_eq!(r["guest_counts_match"], true, "{r}");
        let user = class(&r, "user_data");
        assert!(user.abs_diff(user_frames) * 100 <= user_frames * 3, "user_data {user} vs {user_frames}: {r}");
        let kernel = class(&r, "kernel");
        assert!(kernel > 0 && kernel.abs_diff(image_pages()) <= 1, "kernel {kernel} vs image {}: {r}", image_pages());
        assert!(class(&r, "kernel_allocated") > 0 && class(&r, "memory_io") > 0, "{r}");
        let free = r["free_pages"].as_u64().unwrap();
        assert!(free * 100 > frames * min_free_pct, "free {free}: {r}");
        assert_eq!(class(&r, "free"), free, "{r}");
        let all: u64 = r["classes"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(all, frames, "{r}");
        assert!(r["free_runs"].as_u64().unwrap() >= 1, "{r}");
        assert!(r["host"]["total_ms"].as_f64().unwrap() > 0.0, "{r}");
        // The workload keeps going, without errors.
        std::thread::sleep(Duration::from_millis(300));
        let st = api(&sock, "status");
        assert!(st["workload"]["ops"].as_u64().unwrap() > before, "{st}");
        assert_eq!(st["workload"]["errors"], 0, "{st}");
        first.get_or_insert(r);
    }
    assert_eq!(api(&sock, "shutdown")["ok"], true);
    let o = wait_output(child, T);
    assert_eq!(o.code, Some(0), "{o}");
    first.unwrap()
}

#[test]
fn enlighten_kv() {
    // kv share=20: 20% of RAM (whole pages) is the store.
    let store = MEM / 100 * 20 / 4096 * 4096;
    run("enl-kv", "kv,share=20", store, 50);
}

#[test]
fn enlighten_mem() {
    run("enl-mem", "mem,wss=32M", 32 << 20, 50);
}

#[test]
fn enlighten_small_vm() {
    // A misspelt command is refused; the real one works on a 128 MiB guest.
    let d = TempDir::new("enl-none");
    let sock = d.path("api.sock");
    let mut c = Command::new(vmm_bin());
    c.args(["run", "--testbed", "kv,share=5", "--mem", "128M", "--api-sock", path_str(&sock)]);
    let child = spawn_piped(c);
    wait_for_run_phase(&sock);
    let r = api(&sock, "enlighten-bogus");
    assert_eq!(r["ok"], false, "{r}");
    let r = api(&sock, "enlighten");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["frames"], (128u64 << 20) / 4096, "{r}");
    assert_eq!(api(&sock, "shutdown")["ok"], true);
    let o = wait_output(child, T);
    assert_eq!(o.code, Some(0), "{o}");
}

#[test]
fn enlighten_after_restore() {
    // The device's transport state travels with a snapshot: the restored
    // guest's driver keeps working with the new VMM's device.
    let d = TempDir::new("enl-restore");
    let (sock, sock2, snap) = (d.path("a.sock"), d.path("b.sock"), d.path("vm.snap"));
    let mut c = Command::new(vmm_bin());
    c.args(["run", "--testbed", "kv,share=10", "--mem", "128M", "--api-sock", path_str(&sock)]);
    let child = spawn_piped(c);
    wait_for_run_phase(&sock);
    assert_eq!(api(&sock, "enlighten")["ok"], true);
    snapshot(&sock, &snap);
    assert_eq!(api(&sock, "shutdown")["ok"], true);
    assert_eq!(wait_output(child, T).code, Some(0));
    let mut c = Command::new(vmm_bin());
    c.args(["restore", "--snapshot", path_str(&snap), "--api-sock", path_str(&sock2)]);
    let child = spawn_piped(c);
    wait_for_run_phase(&sock2);
    let r = api(&sock2, "enlighten");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["frames"], (128u64 << 20) / 4096, "{r}");
    assert_eq!(api(&sock2, "shutdown")["ok"], true);
    let o = wait_output(child, T);
    assert_eq!(o.code, Some(0), "{o}");
}
