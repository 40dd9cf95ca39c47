//! The Linux boot path on real KVM, up to the kernel's first instructions.
//!
//! A real kernel cannot run at speed on PVM hosts (its CPL0 code is
//! emulated), so this boots a synthetic bzImage whose startup_64 checks that
//! RSI points at boot_params (boot_flag 0xaa55) and that the command line is
//! where cmd_line_ptr says, then reports through the exit port. It exercises
//! everything a real kernel relies on at entry: the bzImage loader, the zero
//! page, long mode with paging, __BOOT_CS/__BOOT_DS, and RSI.

mod common;

use std::time::Duration;

use common::{path_str, vmm, TempDir};

fn bzimage(code: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 5 * 512];
    img[0x1f1] = 4;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1;
    img[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    let mut payload = vec![0x90u8; 0x1000];
    payload[0x200..0x200 + code.len()].copy_from_slice(code);
    img.extend_from_slice(&payload);
    img
}

#[test]
fn synthetic_kernel_sees_boot_params_in_long_mode() {
    #[rustfmt::skip]
    let code = [
        0x66, 0x81, 0xbe, 0xfe, 0x01, 0x00, 0x00, 0x55, 0xaa, // cmp word [rsi+0x1fe], 0xaa55
        0xb8, 0x11, 0x00, 0x00, 0x00,                         // mov eax, 0x11 (failed)
        0x75, 0x0f,                                           // jne report
        0x8b, 0x8e, 0x28, 0x02, 0x00, 0x00,                   // mov ecx, [rsi+0x228] (cmd_line_ptr)
        0x81, 0x39, 0x6d, 0x61, 0x72, 0x6b,                   // cmp dword [rcx], "mark"
        0x75, 0x05,                                           // jne report
        0xb8, 0x10, 0x00, 0x00, 0x00,                         // mov eax, 0x10 (done)
        0xba, 0xf4, 0x00, 0x00, 0x00,                         // report: mov edx, 0xf4
        0xef,                                                 // out dx, eax
        0xf4,                                                 // hlt
    ];
    let d = TempDir::new("linux");
    let k = d.path("bzImage");
    std::fs::write(&k, bzimage(&code)).unwrap();
    let rd = d.path("initrd");
    std::fs::write(&rd, vec![7u8; 8192]).unwrap();
    let disk = d.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let o = vmm(
        &[
            "run",
            "--kernel",
            path_str(&k),
            "--initramfs",
            path_str(&rd),
            "--cmdline",
            "mark console=ttyS0",
            "--disk",
            path_str(&disk),
            "--mem",
            "128M",
            "--vcpus",
            "2",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(o.code, Some(0), "{o}");
    assert!(o.stderr.contains("guest exit code 0x10"), "{o}");
}

#[test]
fn i8042_reset_ends_the_vmm_cleanly() {
    // mov al, 0xfe; out 0x64, al (pulse the CPU reset line, as `reboot=k` does); hlt
    let code = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];
    let d = TempDir::new("reset");
    let k = d.path("bzImage");
    std::fs::write(&k, bzimage(&code)).unwrap();
    let o = vmm(&["run", "--kernel", path_str(&k), "--mem", "64M"], Duration::from_secs(60));
    assert_eq!(o.code, Some(0), "{o}");
    assert!(o.stderr.contains("guest requested a reset"), "{o}");
}

#[test]
fn a_halted_guest_leaves_the_vmm_controllable() {
    // cli; hlt: with interrupts off nothing wakes the vCPU, which then sleeps
    // inside KVM (in-kernel LAPIC). The VMM must still answer and shut down.
    let code = [0xfa, 0xf4];
    let d = TempDir::new("hlt");
    let k = d.path("bzImage");
    std::fs::write(&k, bzimage(&code)).unwrap();
    let sock = d.path("api.sock");
    let child = std::process::Command::new(common::vmm_bin())
        .args(["run", "--kernel", path_str(&k), "--mem", "64M", "--api-sock", path_str(&sock)])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "API socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let api = |cmd: &str| {
        let out = std::process::Command::new(common::vmm_bin())
            .args(["api", "--api-sock", path_str(&sock), cmd])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(api("status")["state"], "running");
    assert_eq!(api("pause")["ok"], true, "pausing a halted vCPU must work");
    assert_eq!(api("shutdown")["ok"], true);
    let o = common::wait_output(child, Duration::from_secs(30));
    assert_eq!(o.code, Some(0), "{o}");
}
