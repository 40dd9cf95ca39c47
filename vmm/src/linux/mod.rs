//! Booting a Linux kernel with the x86 Linux boot protocol (64-bit entry).
//!
//! For hardware-KVM hosts: on PVM hosts the kernel's CPL0 code is emulated
//! and far too slow (see `../shared/PLATFORM.md`), but every step up to the
//! kernel's first instruction is the same and is tested here.
//!
//! Guest-physical layout:
//! ```text
//! 0x0500  GDT (null, null, __BOOT_CS 0x10, __BOOT_DS 0x18)   0x0520  empty IDT
//! 0x7000  boot_params (zero page)                             0x8ff0  boot stack top
//! 0x10000 identity page tables (2 MiB pages, up to 0x62000)   0x70000 command line (4 KiB)
//! 0x9fc00 MP floating pointer; [0x9fc00, 1 MiB) reserved      0xf0000 MP configuration table
//! 0x100000 bzImage protected-mode kernel (ELF vmlinux: its own physical addresses)
//! initramfs: as high as the kernel allows below the 32-bit MMIO hole
//! ```

pub mod mptable;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use testbed_abi::{VirtioMmioDevice, MMIO_HOLE_START, PAGE_TABLES_GPA, VIRTIO_MMIO_SIZE};

use crate::arch::{self, ArchError};
use crate::error::VmError;
use crate::memory::GuestMem;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
/// Above the largest identity map (PML4, PDPT and MAX_PAGE_DIRECTORIES
/// directories from PAGE_TABLES_GPA) and below the EBDA.
pub const CMDLINE_START: u64 = 0x70000;
const _: () = assert!(
    CMDLINE_START >= PAGE_TABLES_GPA + (2 + testbed_abi::MAX_PAGE_DIRECTORIES) * 0x1000
        && CMDLINE_START + DEFAULT_CMDLINE_MAX as u64 <= mptable::MPTABLE_START
);
/// Where a bzImage's protected-mode kernel is loaded.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the EBDA; [EBDA, 1 MiB) is reserved in the e820 map.
pub const EBDA_START: u64 = mptable::MPTABLE_START;

const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Default initrd_addr_max for kernels that do not state one.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Command-line capacity for kernels that do not state one (ELF vmlinux).
const DEFAULT_CMDLINE_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("the kernel is empty")]
    Empty,
    #[error("not a bzImage or ELF vmlinux: {0}")]
    Load(linux_loader::loader::Error),
    #[error("kernel command line: {0} (the kernel accepts at most {1} bytes)")]
    Cmdline(linux_loader::cmdline::Error, usize),
    #[error("writing the command line: {0}")]
    CmdlineWrite(linux_loader::loader::Error),
    #[error("the initramfs is empty")]
    EmptyInitrd,
    #[error("the initramfs ({size} bytes) does not fit between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooBig { size: u64, kernel_end: u64, limit: u64 },
    #[error("reading the initramfs: {0}")]
    InitrdRead(std::io::Error),
    #[error("writing boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("guest memory write failed")]
    Write,
}

/// Where the kernel starts and what it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxEntry {
    /// 64-bit entry point (startup_64).
    pub entry: u64,
    /// The zero page.
    pub boot_params: u64,
}

/// The e820 map for the guest's RAM regions.
pub fn e820_map(regions: &[(u64, u64)]) -> Vec<boot_e820_entry> {
    let mut map = Vec::new();
    for &(start, len) in regions {
        let end = start + len;
        if start == 0 {
            map.push(boot_e820_entry { addr: 0, size: EBDA_START, r#type: E820_RAM });
            map.push(boot_e820_entry { addr: EBDA_START, size: HIMEM_START - EBDA_START, r#type: E820_RESERVED });
            if end > HIMEM_START {
                map.push(boot_e820_entry { addr: HIMEM_START, size: end - HIMEM_START, r#type: E820_RAM });
            }
        } else {
            map.push(boot_e820_entry { addr: start, size: len, r#type: E820_RAM });
        }
    }
    map
}

fn is_elf(f: &mut File) -> Result<bool, LinuxError> {
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(0)).map_err(|_| LinuxError::Empty)?;
    let n = f.read(&mut magic).map_err(|_| LinuxError::Empty)?;
    if n == 0 {
        return Err(LinuxError::Empty);
    }
    f.seek(SeekFrom::Start(0)).map_err(|_| LinuxError::Empty)?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

/// Loads the kernel, command line and initramfs, and writes boot_params,
/// the MP table, the GDT/IDT and page tables. Pure memory setup: no KVM.
pub fn load(
    mem: &GuestMem,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
    cpus: u32,
    virtio: &[VirtioMmioDevice],
) -> Result<LinuxEntry, LinuxError> {
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect();
    let elf = is_elf(kernel)?;
    let res = if elf {
        Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
    } else {
        BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
    }
    .map_err(LinuxError::Load)?;
    let entry = if elf { res.kernel_load.raw_value() } else { res.kernel_load.raw_value() + 0x200 };

    let mut params = boot_params::default();
    if let Some(hdr) = res.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }

    // Command line: the user's, then one virtio_mmio.device= per device.
    let max = if !elf && params.hdr.version >= 0x0206 && params.hdr.cmdline_size > 0 {
        params.hdr.cmdline_size as usize + 1
    } else if elf {
        DEFAULT_CMDLINE_MAX
    } else {
        256
    };
    let mut cl = Cmdline::new(max).map_err(|e| LinuxError::Cmdline(e, max - 1))?;
    cl.insert_str(cmdline).map_err(|e| LinuxError::Cmdline(e, max - 1))?;
    for d in virtio {
        cl.add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(d.base), d.irq, None)
            .map_err(|e| LinuxError::Cmdline(e, max - 1))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(LinuxError::CmdlineWrite)?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cl.as_cstring().map(|c| c.as_bytes().len() as u32).unwrap_or(0);

    // Initramfs: as high as allowed, page aligned, below the MMIO hole.
    if let Some(f) = initrd {
        let size = f.metadata().map_err(LinuxError::InitrdRead)?.len();
        if size == 0 {
            return Err(LinuxError::EmptyInitrd);
        }
        let low_end = regions.iter().find(|r| r.0 == 0).map(|r| r.1).unwrap_or(0).min(MMIO_HOLE_START);
        let addr_max =
            if params.hdr.initrd_addr_max != 0 { params.hdr.initrd_addr_max as u64 } else { DEFAULT_INITRD_ADDR_MAX };
        let limit = low_end.min(addr_max + 1);
        let kernel_end = res.kernel_end.max(HIMEM_START);
        let addr = limit.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel_end);
        let Some(addr) = addr else {
            return Err(LinuxError::InitrdTooBig { size, kernel_end, limit });
        };
        let mut data = Vec::with_capacity(size as usize);
        f.seek(SeekFrom::Start(0)).map_err(LinuxError::InitrdRead)?;
        f.read_to_end(&mut data).map_err(LinuxError::InitrdRead)?;
        mem.write_slice(&data, GuestAddress(addr)).map_err(|_| LinuxError::Write)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = data.len() as u32;
    }

    let e820 = e820_map(&regions);
    for (i, e) in e820.iter().enumerate() {
        params.e820_table[i] = *e;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_START)), mem)
        .map_err(LinuxError::BootParams)?;

    mptable::write(mem, cpus)?;
    write_gdt_idt(mem)?;
    let ram_end = regions.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
    arch::write_identity_tables(mem, ram_end, false)?;
    Ok(LinuxEntry { entry, boot_params: ZERO_PAGE_START })
}

fn segments() -> (kvm_bindings::kvm_segment, kvm_bindings::kvm_segment) {
    (arch::flat(BOOT_CS, 0xb, 0, true), arch::flat(BOOT_DS, 0x3, 0, false))
}

fn write_gdt_idt(mem: &GuestMem) -> Result<(), LinuxError> {
    let (cs, ds) = segments();
    for (i, v) in [0, 0, arch::encode(&cs), arch::encode(&ds)].into_iter().enumerate() {
        arch::write_u64(mem, GDT_START + i as u64 * 8, v)?;
    }
    arch::write_u64(mem, IDT_START, 0)?;
    Ok(())
}

/// The boot CPU's registers for the 64-bit entry: long mode, paging on the
/// identity map, __BOOT_CS/__BOOT_DS, RSI = boot_params.
pub fn vcpu_state(entry: &LinuxEntry, sregs: &mut kvm_sregs) -> (kvm_regs, kvm_fpu) {
    let (cs, ds) = segments();
    sregs.cs = cs;
    for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *s = ds;
    }
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cr0 = 1 | (1 << 4) | (1 << 31); // PE, ET, PG
    sregs.cr3 = PAGE_TABLES_GPA;
    sregs.cr4 = 1 << 5; // PAE
    sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
    let regs = kvm_regs {
        rflags: 2,
        rip: entry.entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: entry.boot_params,
        ..Default::default()
    };
    (regs, kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() })
}

/// MSRs every vCPU starts with (as firmware would leave them).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, 1),          // fast strings
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
}

/// Programs LINT0 as ExtINT and LINT1 as NMI, as the MP table states.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    fn set(lapic: &mut kvm_lapic_state, off: usize, mode: u32) {
        let b: Vec<u8> = lapic.regs[off..off + 4].iter().map(|&x| x as u8).collect();
        let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let v = (v & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    set(lapic, 0x350, 7); // LVT LINT0: ExtINT
    set(lapic, 0x360, 4); // LVT LINT1: NMI
}

fn open(path: &Path) -> Result<File, VmError> {
    File::open(path).map_err(|source| VmError::File { path: path.to_owned(), source })
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Loads everything and sets up every vCPU: the BSP at the 64-bit entry,
/// the APs waiting for INIT/SIPI.
pub fn boot(
    mem: &GuestMem,
    vcpus: &[VcpuFd],
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    virtio: &[VirtioMmioDevice],
) -> Result<(), VmError> {
    let mut kernel_file = open(kernel)?;
    let mut initrd_file = initramfs.map(open).transpose()?;
    let entry = load(mem, &mut kernel_file, initrd_file.as_mut(), cmdline, vcpus.len() as u32, virtio)
        .map_err(|e| VmError::Boot(format!("{}: {e}", kernel.display())))?;
    let msrs = Msrs::from_entries(&boot_msrs()).map_err(|e| VmError::Boot(format!("boot MSRs: {e:?}")))?;
    for (i, v) in vcpus.iter().enumerate() {
        v.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        let mut lapic = v.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        set_lint(&mut lapic);
        v.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        if i == 0 {
            let mut sregs = v.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
            let (regs, fpu) = vcpu_state(&entry, &mut sregs);
            v.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
            v.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
            v.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
            v.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(kvm("KVM_SET_MP_STATE"))?;
        } else {
            v.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_UNINITIALIZED }).map_err(kvm("KVM_SET_MP_STATE"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A synthetic bzImage: a setup header per the boot protocol and a
    /// protected-mode payload whose startup_64 (offset 0x200) is `code`.
    pub(crate) fn bzimage(code: &[u8]) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        let mut payload = vec![0x90u8; 0x1000];
        payload[0x200..0x200 + code.len()].copy_from_slice(code);
        img.extend_from_slice(&payload);
        img
    }

    pub(crate) fn temp_file(name: &str, bytes: &[u8]) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("vmm-linux-{}-{name}", std::process::id()));
        let mut f = File::create(&p).unwrap();
        f.write_all(bytes).unwrap();
        (p.clone(), File::open(&p).unwrap())
    }

    fn mem(size: u64) -> GuestMem {
        crate::memory::create(&crate::arch::ram_regions(size)).unwrap()
    }

    fn params(m: &GuestMem) -> boot_params {
        m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
    }

    #[test]
    fn bzimage_boot_params_follow_the_protocol() {
        let m = mem(256 << 20);
        let (kp, mut k) = temp_file("bz", &bzimage(&[0xf4]));
        let initrd: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let (ip, mut i) = temp_file("initrd", &initrd);
        let virtio = [VirtioMmioDevice { base: 0xd000_0000, irq: 5, device_id: 2 }];
        let e = load(&m, &mut k, Some(&mut i), "console=ttyS0 panic=1", 2, &virtio).unwrap();
        assert_eq!(e, LinuxEntry { entry: 0x100200, boot_params: ZERO_PAGE_START });
        let p = params(&m);
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        let mut cl = vec![0u8; hdr.cmdline_size as usize + 1];
        m.read_slice(&mut cl, GuestAddress(CMDLINE_START)).unwrap();
        let cl = String::from_utf8(cl).unwrap();
        assert_eq!(cl, "console=ttyS0 panic=1 virtio_mmio.device=4K@0xd0000000:5\0");
        // The initramfs: page aligned, below initrd_addr_max and RAM end, intact.
        let (addr, size) = ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64);
        assert_eq!(size, initrd.len() as u64);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 256 << 20 && addr >= HIMEM_START);
        let mut back = vec![0u8; size as usize];
        m.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, initrd);
        // The e820 map: low RAM, the reserved EBDA/BIOS area, RAM above 1 MiB.
        assert_eq!(p.e820_entries, 3);
        let t = p.e820_table;
        assert_eq!((t[0].addr, t[0].size, t[0].r#type), (0, EBDA_START, E820_RAM));
        assert_eq!((t[1].addr, t[1].r#type), (EBDA_START, E820_RESERVED));
        assert_eq!((t[2].addr, t[2].size, t[2].r#type), (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        // The payload landed at 1 MiB.
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x100200)).unwrap(), 0xf4);
        // MP table present.
        let mut fp = [0u8; 4];
        m.read_slice(&mut fp, GuestAddress(mptable::MPTABLE_START)).unwrap();
        assert_eq!(&fp, b"_MP_");
        let _ = (std::fs::remove_file(kp), std::fs::remove_file(ip));
    }

    #[test]
    fn large_guests_keep_their_command_line() {
        // 20 GiB of (unbacked, NORESERVE) RAM needs 21 page directories.
        let m = mem(20 << 30);
        let (kp, mut k) = temp_file("bz-large", &bzimage(&[0xf4]));
        load(&m, &mut k, None, "console=ttyS0 root=/dev/vda", 1, &[]).unwrap();
        let mut cl = [0u8; 27];
        m.read_slice(&mut cl, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cl, b"console=ttyS0 root=/dev/vda");
        let _ = std::fs::remove_file(kp);
    }

    #[test]
    fn e820_with_memory_above_4g() {
        let map = e820_map(&[(0, MMIO_HOLE_START), (1 << 32, 1 << 30)]);
        assert_eq!(map.len(), 4);
        assert_eq!((map[3].addr, map[3].size, map[3].r#type), (1 << 32, 1 << 30, E820_RAM));
        assert!(map.iter().all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= 1 << 32));
    }

    #[test]
    fn bad_kernels_cmdlines_and_initrds_are_refused() {
        let m = mem(64 << 20);
        let (p1, mut empty) = temp_file("empty", b"");
        assert!(matches!(load(&m, &mut empty, None, "", 1, &[]), Err(LinuxError::Empty)));
        let (p2, mut text) = temp_file("text", &b"not a kernel at all ".repeat(100));
        assert!(matches!(load(&m, &mut text, None, "", 1, &[]), Err(LinuxError::Load(_))));
        let (p3, mut trunc) = temp_file("trunc", b"\x7fELF\x02\x01\x01");
        assert!(matches!(load(&m, &mut trunc, None, "", 1, &[]), Err(LinuxError::Load(_))));
        let (p4, mut k) = temp_file("bz2", &bzimage(&[0xf4]));
        let long = "x".repeat(3000);
        let err = load(&m, &mut k, None, &long, 1, &[]).unwrap_err();
        assert!(matches!(err, LinuxError::Cmdline(_, 2047)), "{err}");
        let (p5, mut big) = temp_file("bigrd", &vec![1u8; 70 << 20]);
        let err = load(&m, &mut k, Some(&mut big), "", 1, &[]).unwrap_err();
        assert!(matches!(err, LinuxError::InitrdTooBig { .. }), "{err}");
        let (p6, mut none) = temp_file("nord", b"");
        assert!(matches!(load(&m, &mut k, Some(&mut none), "", 1, &[]), Err(LinuxError::EmptyInitrd)));
        assert!(matches!(load(&m, &mut k, None, "", 255, &[]), Err(LinuxError::Mptable(_))));
        for p in [p1, p2, p3, p4, p5, p6] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn long_mode_entry_state() {
        let mut s = kvm_sregs::default();
        let (r, f) = vcpu_state(&LinuxEntry { entry: 0x100200, boot_params: ZERO_PAGE_START }, &mut s);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl), (BOOT_CS, 1, 0));
        assert_eq!(s.ds.selector, BOOT_DS);
        assert_eq!(s.cr4 & (1 << 5), 1 << 5);
        assert_eq!(s.efer, 0x500);
        assert_eq!(s.cr3, PAGE_TABLES_GPA);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100200, ZERO_PAGE_START, 2));
        assert_eq!(f.fcw, 0x37f);
        let m = mem(64 << 20);
        write_gdt_idt(&m).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(GDT_START + 0x10)).unwrap(), 0x00af_9b00_0000_ffff);
        assert_eq!(m.read_obj::<u64>(GuestAddress(GDT_START + 0x18)).unwrap(), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn lapic_lint_modes() {
        let mut l = kvm_lapic_state::default();
        l.regs[0x350] = 0x10; // keep the other bits
        set_lint(&mut l);
        assert_eq!(l.regs[0x351] as u8 & 0x7, 7);
        assert_eq!(l.regs[0x350] as u8, 0x10);
        assert_eq!(l.regs[0x361] as u8 & 0x7, 4);
        assert!(boot_msrs().iter().any(|m| m.index == 0x1a0 && m.data == 1));
    }
}
