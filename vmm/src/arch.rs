//! x86-64 boot setup for the testbed guest: identity page tables with
//! user-accessible 2 MiB pages, a GDT with user segments and a 64-bit TSS,
//! the ELF loader, and the vCPU state for entering at CPL3 with IOPL=3.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use testbed_abi::{
    BOOT_INFO_GPA, GDT_GPA, IMAGE_GPA, MAX_PAGE_DIRECTORIES, MMIO_HOLE_END, MMIO_HOLE_START, PAGE_TABLES_GPA,
    STACKS_GPA, STACK_SIZE, TSS_GPA,
};

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("guest memory write at {0:#x} failed")]
    Write(u64),
    #[error("the identity map needs {0} page directories, more than the {MAX_PAGE_DIRECTORIES} reserved")]
    TooMuchMemory(u64),
    #[error("not an ELF file")]
    NotElf,
    #[error("ELF file truncated")]
    Truncated,
    #[error("unsupported ELF: {0}")]
    Unsupported(&'static str),
    #[error("ELF segment {0:#x}+{1:#x} lies outside guest RAM or below the image base")]
    BadSegment(u64, u64),
}

/// RAM layout: [0, MMIO hole) then the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (GuestAddress(MMIO_HOLE_END), (mem_size - MMIO_HOLE_START) as usize),
        ]
    }
}

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_PS: u64 = 1 << 7;

pub(crate) fn write_u64<M: GuestMemory>(mem: &M, addr: u64, v: u64) -> Result<(), ArchError> {
    mem.write_obj(v, GuestAddress(addr)).map_err(|_| ArchError::Write(addr))
}

/// Identity-maps [0, max(ram_end, 4 GiB)) with 2 MiB pages: PML4 at
/// PAGE_TABLES_GPA, one PDPT, then one page directory per GiB. Pages are
/// user-accessible when `user` (the testbed runs at CPL3); the MMIO hole is
/// uncached.
pub fn write_identity_tables<M: GuestMemory>(mem: &M, ram_end: u64, user: bool) -> Result<(), ArchError> {
    let top = ram_end.max(MMIO_HOLE_END);
    let dirs = top.div_ceil(1 << 30);
    if dirs > MAX_PAGE_DIRECTORIES || dirs > 512 {
        return Err(ArchError::TooMuchMemory(dirs));
    }
    let pml4 = PAGE_TABLES_GPA;
    let pdpt = pml4 + 0x1000;
    let pd0 = pdpt + 0x1000;
    let flags = PTE_P | PTE_RW | if user { PTE_US } else { 0 };
    write_u64(mem, pml4, pdpt | flags)?;
    for d in 0..dirs {
        let pd = pd0 + d * 0x1000;
        write_u64(mem, pdpt + d * 8, pd | flags)?;
        for e in 0..512u64 {
            let addr = (d << 30) | (e << 21);
            let mut f = flags | PTE_PS;
            if (MMIO_HOLE_START..MMIO_HOLE_END).contains(&addr) {
                f |= PTE_PCD | PTE_PWT;
            }
            write_u64(mem, pd + e * 8, addr | f)?;
        }
    }
    Ok(())
}

/// Selectors of the testbed GDT.
pub const SEL_KERNEL_CODE: u16 = 0x08;
pub const SEL_KERNEL_DATA: u16 = 0x10;
pub const SEL_USER_DATA: u16 = 0x18 | 3;
pub const SEL_USER_CODE: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;
/// TSS: the 104-byte 64-bit TSS, an I/O permission bitmap allowing every
/// port (8 KiB of zeros), and the terminating 0xff byte. IOPL=3 already
/// grants port access on hardware, but PVM consults the bitmap whenever a
/// TSS is loaded, so both must allow it.
const TSS_LEN: u64 = 104 + 8192 + 1;
const TSS_IOMAP: u16 = 104;

/// A flat 4 GiB code or data segment as KVM wants it.
pub fn flat(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    let (l, db) = if long { (1, 0) } else { (0, 1) };
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The GDT descriptor of a code or data segment.
pub fn encode(seg: &kvm_segment) -> u64 {
    let limit = if seg.g == 1 { seg.limit >> 12 } else { seg.limit } as u64;
    let base = seg.base & 0xffff_ffff;
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((seg.type_ as u64 & 0xf) << 40)
        | ((seg.s as u64) << 44)
        | ((seg.dpl as u64 & 3) << 45)
        | ((seg.present as u64) << 47)
        | (((limit >> 16) & 0xf) << 48)
        | ((seg.l as u64) << 53)
        | ((seg.db as u64) << 54)
        | ((seg.g as u64) << 55)
        | (((base >> 24) & 0xff) << 56)
}

fn segments() -> [kvm_segment; 5] {
    [
        flat(SEL_KERNEL_CODE, 0xb, 0, true),
        flat(SEL_KERNEL_DATA, 0x3, 0, false),
        flat(SEL_USER_DATA, 0x3, 3, false),
        flat(SEL_USER_CODE, 0xb, 3, true),
        // 64-bit TSS, busy.
        kvm_segment {
            base: TSS_GPA,
            limit: TSS_LEN as u32 - 1,
            selector: SEL_TSS,
            type_: 0xb,
            present: 1,
            ..Default::default()
        },
    ]
}

/// Writes the page tables, the GDT and the TSS for the testbed guest.
pub fn write_testbed_tables<M: GuestMemory>(mem: &M, ram_end: u64) -> Result<(), ArchError> {
    write_identity_tables(mem, ram_end, true)?;
    let segs = segments();
    write_u64(mem, GDT_GPA, 0)?;
    for s in &segs[..4] {
        write_u64(mem, GDT_GPA + (s.selector & !7) as u64, encode(s))?;
    }
    let tss = &segs[4];
    write_u64(mem, GDT_GPA + SEL_TSS as u64, encode(tss))?;
    write_u64(mem, GDT_GPA + SEL_TSS as u64 + 8, tss.base >> 32)?;
    let mut tss = vec![0u8; TSS_LEN as usize];
    tss[102..104].copy_from_slice(&TSS_IOMAP.to_le_bytes());
    tss[TSS_LEN as usize - 1] = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS_GPA)).map_err(|_| ArchError::Write(TSS_GPA))?;
    Ok(())
}

/// vCPU `index`'s state for entering the testbed at `entry`: 64-bit mode at
/// CPL3 with IOPL=3, interrupts off, SSE enabled, RDI = vCPU index, RSI =
/// boot info, RSP = the top of its stack minus a return-address slot.
pub fn testbed_vcpu_state(index: u32, entry: u64, sregs: &mut kvm_sregs) -> (kvm_regs, kvm_fpu) {
    let segs = segments();
    sregs.cs = segs[3];
    for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *s = segs[2];
    }
    sregs.tr = segs[4];
    sregs.ldt = kvm_segment { unusable: 1, type_: 2, present: 0, ..Default::default() };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = SEL_TSS + 16 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // CR0: PE MP ET NE WP PG; CR4: PAE OSFXSR OSXMMEXCPT; EFER: LME LMA.
    sregs.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
    sregs.efer = (1 << 8) | (1 << 10);
    sregs.cr3 = PAGE_TABLES_GPA;
    let regs = kvm_regs {
        rip: entry,
        rsp: STACKS_GPA + (index as u64 + 1) * STACK_SIZE - 8,
        rdi: index as u64,
        rsi: BOOT_INFO_GPA,
        rflags: 0x3002,
        ..Default::default()
    };
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    (regs, fpu)
}

/// A loaded ELF image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    pub entry: u64,
    /// First byte after the highest loaded segment.
    pub end: u64,
}

fn rd<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], ArchError> {
    b.get(off..off + N).ok_or(ArchError::Truncated)?.try_into().map_err(|_| ArchError::Truncated)
}

/// Loads a static x86-64 ELF executable's PT_LOAD segments at their physical
/// addresses (zero-filling bss), checking each lies in RAM at or above
/// IMAGE_GPA.
pub fn load_elf<M: GuestMemory>(mem: &M, elf: &[u8]) -> Result<Image, ArchError> {
    if elf.len() < 4 || elf[..4] != *b"\x7fELF" {
        return Err(ArchError::NotElf);
    }
    if elf.len() < 64 {
        return Err(ArchError::Truncated);
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err(ArchError::Unsupported("not a little-endian 64-bit ELF"));
    }
    if u16::from_le_bytes(rd(elf, 18)?) != 62 {
        return Err(ArchError::Unsupported("not an x86-64 ELF"));
    }
    let entry = u64::from_le_bytes(rd(elf, 24)?);
    let phoff = u64::from_le_bytes(rd(elf, 32)?) as usize;
    let phentsize = u16::from_le_bytes(rd(elf, 54)?) as usize;
    let phnum = u16::from_le_bytes(rd(elf, 56)?) as usize;
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return Err(ArchError::Unsupported("bad program header table"));
    }
    let mut end = 0;
    for i in 0..phnum {
        let ph = phoff.checked_add(i * phentsize).ok_or(ArchError::Truncated)?;
        if u32::from_le_bytes(rd(elf, ph)?) != 1 {
            continue; // not PT_LOAD
        }
        let offset = u64::from_le_bytes(rd(elf, ph + 8)?);
        let paddr = u64::from_le_bytes(rd(elf, ph + 24)?);
        let filesz = u64::from_le_bytes(rd(elf, ph + 32)?);
        let memsz = u64::from_le_bytes(rd(elf, ph + 40)?);
        let seg_end = paddr.checked_add(memsz).ok_or(ArchError::BadSegment(paddr, memsz))?;
        if filesz > memsz
            || paddr < IMAGE_GPA
            || !mem.check_range(GuestAddress(paddr), memsz as usize, vm_memory::Permissions::ReadWrite)
        {
            return Err(ArchError::BadSegment(paddr, memsz));
        }
        let data = elf
            .get(offset as usize..(offset.checked_add(filesz).ok_or(ArchError::Truncated)?) as usize)
            .ok_or(ArchError::Truncated)?;
        mem.write_slice(data, GuestAddress(paddr)).map_err(|_| ArchError::Write(paddr))?;
        let bss = vec![0u8; (memsz - filesz) as usize];
        mem.write_slice(&bss, GuestAddress(paddr + filesz)).map_err(|_| ArchError::Write(paddr + filesz))?;
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(ArchError::Unsupported("no loadable segment"));
    }
    if entry < IMAGE_GPA || entry >= end {
        return Err(ArchError::Unsupported("entry point outside the image"));
    }
    Ok(Image { entry, end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    #[test]
    fn layout_splits_around_the_hole() {
        assert_eq!(ram_regions(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        let r = ram_regions(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_HOLE_END), (1 << 30) as usize));
    }

    #[test]
    fn descriptors_encode_like_the_manual() {
        let s = segments();
        // The classic flat 64-bit code and data descriptors.
        assert_eq!(encode(&s[0]), 0x00af_9b00_0000_ffff);
        assert_eq!(encode(&s[1]), 0x00cf_9300_0000_ffff);
        assert_eq!(encode(&s[2]), 0x00cf_f300_0000_ffff);
        assert_eq!(encode(&s[3]), 0x00af_fb00_0000_ffff);
    }

    #[test]
    fn tables_map_ram_and_the_hole() {
        let m = mem(256 << 20);
        write_testbed_tables(&m, 256 << 20).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PAGE_TABLES_GPA)).unwrap();
        assert_eq!(pml4, (PAGE_TABLES_GPA + 0x1000) | 7);
        // 4 GiB are mapped (RAM plus the hole): 4 directories.
        let pdpt3: u64 = m.read_obj(GuestAddress(PAGE_TABLES_GPA + 0x1000 + 3 * 8)).unwrap();
        assert_eq!(pdpt3 & !0xfff, PAGE_TABLES_GPA + 0x2000 + 3 * 0x1000);
        let pde_hole: u64 = m.read_obj(GuestAddress(PAGE_TABLES_GPA + 0x2000 + 3 * 0x1000 + 8 * 128)).unwrap();
        assert_eq!(pde_hole & !0xfff, 0xD000_0000);
        assert_eq!(pde_hole & 0x9f, PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_PCD | PTE_PWT);
        assert!(write_identity_tables(&m, 200 << 30, true).is_err());
        write_identity_tables(&m, 256 << 20, false).unwrap();
        let pde0: u64 = m.read_obj(GuestAddress(PAGE_TABLES_GPA + 0x2000)).unwrap();
        assert_eq!(pde0 & PTE_US, 0, "kernel tables are supervisor-only");
        let tss_iomap: u16 = m.read_obj(GuestAddress(TSS_GPA + 102)).unwrap();
        assert_eq!(tss_iomap, 104);
        let port_3f8: u8 = m.read_obj(GuestAddress(TSS_GPA + 104 + 0x3f8 / 8)).unwrap();
        assert_eq!(port_3f8, 0, "port 0x3f8 must be allowed");
        let end: u8 = m.read_obj(GuestAddress(TSS_GPA + TSS_LEN - 1)).unwrap();
        assert_eq!(end, 0xff);
        const { assert!(TSS_GPA + TSS_LEN <= BOOT_INFO_GPA, "the TSS must not overlap the boot info page") };
    }

    fn tiny_elf(paddr: u64, entry: u64, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut e = vec![0u8; 0x100];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes());
        e[18..20].copy_from_slice(&62u16.to_le_bytes());
        e[24..32].copy_from_slice(&entry.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        e[ph + 8..ph + 16].copy_from_slice(&0x80u64.to_le_bytes());
        e[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        e[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        for (i, b) in e[0x80..0x80 + filesz as usize].iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        e
    }

    #[test]
    fn elf_loading_and_rejections() {
        let m = mem(64 << 20);
        let img = load_elf(&m, &tiny_elf(IMAGE_GPA, IMAGE_GPA + 4, 16, 0x2000)).unwrap();
        assert_eq!(img, Image { entry: IMAGE_GPA + 4, end: IMAGE_GPA + 0x2000 });
        let b: u8 = m.read_obj(GuestAddress(IMAGE_GPA + 15)).unwrap();
        assert_eq!(b, 16);
        assert!(matches!(load_elf(&m, b"MZ\x90\0junk"), Err(ArchError::NotElf)));
        assert!(matches!(load_elf(&m, b"\x7fELF\x02\x01"), Err(ArchError::Truncated)));
        let full = tiny_elf(IMAGE_GPA, IMAGE_GPA, 16, 16);
        assert!(matches!(load_elf(&m, &full[..0x84]), Err(ArchError::Truncated)));
        assert!(matches!(load_elf(&m, &tiny_elf(0x1000, 0x1000, 16, 16)), Err(ArchError::BadSegment(..))));
        assert!(matches!(load_elf(&m, &tiny_elf(IMAGE_GPA, IMAGE_GPA, 16, 1 << 30)), Err(ArchError::BadSegment(..))));
        assert!(matches!(load_elf(&m, &tiny_elf(IMAGE_GPA, 0x10, 16, 16)), Err(ArchError::Unsupported(_))));
        let mut i386 = full.clone();
        i386[18] = 3;
        assert!(matches!(load_elf(&m, &i386), Err(ArchError::Unsupported(_))));
    }

    #[test]
    fn vcpu_state_is_cpl3_with_iopl3() {
        let mut s = kvm_sregs::default();
        let (r, f) = testbed_vcpu_state(2, 0x20_1000, &mut s);
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ss.selector, SEL_USER_DATA);
        assert_eq!(r.rflags >> 12 & 3, 3);
        assert_eq!(r.rflags & (1 << 9), 0, "interrupts off");
        assert_eq!(r.rdi, 2);
        assert_eq!(r.rsp % 16, 8);
        assert_eq!(r.rsp, STACKS_GPA + 3 * STACK_SIZE - 8);
        assert_eq!(f.mxcsr, 0x1f80);
        assert_eq!(s.tr.type_, 0xb);
    }
}
