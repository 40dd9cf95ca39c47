//! Bad input gives a clear error and a non-zero exit, never a panic or a hang.

mod common;

use std::time::Duration;

use common::{path_str, vmm, TempDir};

const T: Duration = Duration::from_secs(60);

fn assert_bad(args: &[&str], code: i32, needle: &str) {
    let o = vmm(args, T);
    assert_eq!(o.code, Some(code), "vmm {args:?}\n{o}");
    assert!(o.stderr.contains(needle), "vmm {args:?}: stderr lacks {needle:?}\n{o}");
    assert!(!o.stderr.contains("panicked"), "vmm {args:?} panicked\n{o}");
}

#[test]
fn missing_kernel() {
    assert_bad(&["run", "--kernel", "/nonexistent/bzImage"], 2, "cannot open /nonexistent/bzImage");
}

#[test]
fn truncated_and_non_elf_kernels() {
    let d = TempDir::new("kernels");
    let truncated = d.path("truncated");
    std::fs::write(&truncated, b"\x7fELF\x02\x01\x01\0\0\0").unwrap();
    assert_bad(&["run", "--kernel", path_str(&truncated)], 2, "boot:");
    let text = d.path("text");
    std::fs::write(&text, b"this is not a kernel, just some text that is long enough to be read as one\n".repeat(20))
        .unwrap();
    assert_bad(&["run", "--kernel", path_str(&text)], 2, "boot:");
    let empty = d.path("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_bad(&["run", "--kernel", path_str(&empty)], 2, "boot:");
    let missing_initrd = d.path("nope.img");
    assert_bad(&["run", "--kernel", path_str(&text), "--initramfs", path_str(&missing_initrd)], 2, "cannot open");
}

#[test]
fn memory_sizes() {
    assert_bad(&["run", "--testbed", "kv", "--mem", "0"], 2, "at least");
    assert_bad(&["run", "--testbed", "kv", "--mem", "100T"], 2, "exceeds this host");
    assert_bad(&["run", "--testbed", "kv", "--mem", "lots"], 2, "not a size");
    assert_bad(&["run", "--testbed", "kv", "--mem", "100000001"], 2, "multiple of 4 KiB");
}

#[test]
fn workload_specs() {
    assert_bad(&["run", "--testbed", "nosuch"], 2, "unknown workload `nosuch`");
    assert_bad(&["run", "--testbed", "kv,colour=blue"], 2, "unknown key `colour`");
    assert_bad(&["run", "--testbed", "kv,duration=soon"], 2, "bad value `soon`");
    assert_bad(&["run", "--testbed", "kv,duration"], 2, "needs a value");
    assert_bad(&["run", "--testbed", "disk"], 2, "needs a disk");
    assert_bad(&["run", "--testbed", "kv", "--vcpus", "17"], 2, "at most 16 vCPUs");
    assert_bad(&["run", "--testbed", "kv", "--vcpus", "0"], 2, "--vcpus");
}

#[test]
fn malformed_command_lines() {
    assert_bad(&["run"], 2, "--kernel");
    assert_bad(&["run", "--testbed", "kv", "--kernel", "x"], 2, "cannot be used with");
    assert_bad(&["run", "--testbed", "kv", "--vcpus", "two"], 2, "invalid value");
    assert_bad(&["run", "--testbed", "kv", "--initramfs", "x"], 2, "cannot be used with");
    assert_bad(&["run", "--testbed", "kv", "--cmdline", "x"], 2, "cannot be used with");
    assert_bad(&["frobnicate"], 2, "unrecognized subcommand");
    assert_bad(&["run", "--testbed", "kv", "--disk", "/nonexistent/disk.img"], 2, "/nonexistent/disk.img");
    assert_bad(&["api", "--api-sock", "/nonexistent/sock", "status"], 2, "cannot connect");
}

#[test]
fn guest_triple_fault_is_reported() {
    let o = vmm(&["run", "--testbed", "fault", "--mem", "64M"], T);
    assert_eq!(o.code, Some(1), "{o}");
    assert!(o.stderr.contains("triple fault"), "{o}");
    assert!(o.stderr.contains("RIP 0x"), "{o}");
    assert!(o.json()["exit"].as_str().unwrap().starts_with("fault"), "{o}");
}

#[test]
fn guest_writing_virtio_garbage_is_contained() {
    let d = TempDir::new("garbage");
    let disk = d.path("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let o = vmm(&["run", "--testbed", "virtio-garbage", "--mem", "64M", "--disk", path_str(&disk)], T);
    assert_eq!(o.code, Some(1), "{o}");
    assert!(o.stderr.contains("violated the virtio protocol"), "{o}");
    assert!(!o.stderr.contains("panicked"), "{o}");
    let j = o.json();
    assert!(j["device_errors"].as_u64().unwrap() > 0, "{o}");
}
