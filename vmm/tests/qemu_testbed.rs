//! The testbed guest boots in QEMU 10 with KVM through its multiboot header
//! and runs its workload there too (so QEMU's own migration can later be
//! measured on the very same guest).
//!
//! CPU model: the guest is built for baseline x86-64 (SSE2) and needs only
//! RDTSC at CPL3, so QEMU's default `qemu64` model suffices. `-cpu host` does
//! not start on PVM hosts (QEMU fails to set MSR 0x10a, ARCH_CAPABILITIES);
//! `pni=off` drops the one `qemu64` feature PVM does not offer, which would
//! otherwise print a warning.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{path_str, wait_output, TempDir};

#[test]
fn testbed_guest_runs_in_qemu_with_kvm() {
    let d = TempDir::new("qemu");
    let serial = d.path("serial.log");
    let elf = env!("TESTBED_GUEST_ELF");
    let child = Command::new("qemu-system-x86_64")
        .args(["-enable-kvm", "-cpu", "qemu64,pni=off", "-m", "512M", "-display", "none", "-no-reboot"])
        .args(["-monitor", "none"])
        .args(["-kernel", elf, "-append", "kv,duration=3"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-serial")
        .arg(format!("file:{}", path_str(&serial)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (QEMU 10) must be installed: run scripts/setup");
    // SeaBIOS is emulated (CPL0) and takes ~4 s; the workload 3 s plus a fill.
    // `wait_output` kills QEMU if it outlives the deadline.
    let o = wait_output(child, Duration::from_secs(120));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    // isa-debug-exit: QEMU exits with (code << 1) | 1; the guest's Done code is 0x10.
    assert_eq!(o.code, Some((0x10 << 1) | 1), "{o}\n--- serial\n{log}");
    assert!(log.contains("testbed: kv on 1 vCPU(s)"), "{log}");
    assert!(log.contains("run phase started"), "{log}");
    let run_lines: Vec<&str> = log.lines().filter(|l| l.starts_with("testbed: t=")).collect();
    assert!(!run_lines.is_empty(), "no progress lines:\n{log}");
    for l in &run_lines {
        assert!(l.ends_with("errors=0"), "{l}");
        let ops: u64 = l.split("ops=").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
        assert!(ops > 0, "{l}");
    }
    let last = log.lines().rev().find(|l| l.starts_with("testbed: done after")).unwrap_or_else(|| panic!("{log}"));
    assert!(last.contains("done after 3 s") && last.contains(" errors=0 "), "{last}");
}
