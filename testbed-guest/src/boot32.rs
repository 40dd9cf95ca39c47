//! The multiboot (v1) entry, so that QEMU's `-kernel` boots the same image.
//!
//! QEMU refuses 64-bit ELF multiboot images unless the header carries the
//! load addresses (the "a.out kludge", flag bit 16); it then loads the file
//! bytes from the header's offset, which the linker script keeps a
//! contiguous image of memory. QEMU enters `_start32` in 32-bit protected
//! mode with EBX = the multiboot info. The stub builds the same page tables,
//! GDT and TSS the VMM builds (see `vmm/src/arch.rs` and `testbed-abi`),
//! enters long mode and IRETQs to CPL3 with IOPL=3 (RFLAGS=0x3002) into
//! `_start_multiboot` (RDI = the multiboot info address, RSP = vCPU 0's
//! stack top minus 8, as if called), which writes the boot info page from
//! the multiboot info and continues at the normal entry (vCPU 0). Only
//! these few dozen instructions run at CPL0.

use testbed_abi::{BootInfo, BOOT_INFO_GPA, PAGE_SIZE, STATS_GPA};

core::arch::global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
mb_header:
    .long 0x1BADB002
    .long 0x00010003
    .long -(0x1BADB002 + 0x00010003)
    .long mb_header
    .long __image_start
    .long __load_end
    .long __image_end
    .long _start32

    .section .rodata.boot32, "a"
    .balign 8
gdt_template:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .quad 0x0000890018002068
    .quad 0
gdt_ptr:
    .word 0x37
    .long 0x1000

    .section .text.boot32, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov ebp, ebx

    /* Page tables at 0x10000: PML4, PDPT, four page directories (4 GiB). */
    mov edi, 0x10000
    xor eax, eax
    mov ecx, 6144
    rep stosd
    mov dword ptr [0x10000], 0x11007
    mov dword ptr [0x11000], 0x12007
    mov dword ptr [0x11008], 0x13007
    mov dword ptr [0x11010], 0x14007
    mov dword ptr [0x11018], 0x15007
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x87
    cmp ecx, 1536
    jb 3f
    or eax, 0x18
3:
    mov dword ptr [0x12000 + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jb 2b

    /* GDT at 0x1000, TSS with an all-ports I/O bitmap at 0x1800. */
    lea esi, [gdt_template]
    mov edi, 0x1000
    mov ecx, 14
    rep movsd
    mov edi, 0x1800
    xor eax, eax
    mov ecx, 8297
    rep stosb
    mov word ptr [0x1800 + 102], 104
    mov byte ptr [0x1800 + 104 + 8192], 0xff
    lgdt [gdt_ptr]

    /* PAE, OSFXSR, OSXMMEXCPT; EFER.LME; PE, MP, NE, WP, PG. */
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    mov eax, 0x10000
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0xfffffffb
    or eax, 0x80010023
    mov cr0, eax
    push 0x08
    lea eax, [long_mode]
    push eax
    retf

    .code64
long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov ax, 0x28
    ltr ax
    mov rsp, 0x110000
    mov edi, ebp
    push 0x1b
    push 0x10fff8
    push 0x3002
    push 0x23
    lea rax, [rip + _start_multiboot]
    push rax
    iretq

    .text
"#
);

fn rd32(addr: u64) -> u32 {
    // SAFETY: the multiboot info lies in low RAM, identity mapped, and is
    // only read.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

extern "C" {
    static __image_end: u8;
}

/// The first byte past the loaded image (page aligned, after .bss).
pub fn image_end() -> u64 {
    // Taking the address of a linker-defined symbol reads nothing.
    core::ptr::addr_of!(__image_end) as u64
}

/// Entered at CPL3 from the stub above with the multiboot info pointer.
#[no_mangle]
pub extern "C" fn _start_multiboot(mbi: u64) -> ! {
    let flags = rd32(mbi);
    let mut bi = BootInfo { vcpus: 1, ..Default::default() };
    // mem_upper: KiB of RAM above 1 MiB, contiguous.
    let upper = if flags & 1 != 0 { rd32(mbi + 8) as u64 * 1024 } else { 0 };
    let _ = bi.push_mem_region(0, 0x10_0000 + upper);
    // QEMU passes "<kernel path> <-append string>": skip the path.
    let mut cmd = [0u8; testbed_abi::MAX_CMDLINE];
    let mut len = 0;
    if flags & 4 != 0 {
        let p = rd32(mbi + 16) as u64;
        while len < cmd.len() {
            // SAFETY: a NUL-terminated string in low RAM.
            let c = unsafe { core::ptr::read_volatile((p + len as u64) as *const u8) };
            if c == 0 {
                break;
            }
            cmd[len] = c;
            len += 1;
        }
    }
    let line = core::str::from_utf8(&cmd[..len]).unwrap_or("");
    let spec = line.trim().split_once(' ').map(|(_, rest)| rest.trim()).unwrap_or("");
    let _ = bi.set_cmdline(spec);
    // The multiboot info and command line sit right after the image: start
    // the heap well past them.
    let end = image_end();
    bi.heap_start = (end + 0x10_0000).next_multiple_of(2 << 20);
    let mut page = [0u8; BootInfo::ENCODED_LEN];
    bi.encode(&mut page);
    // SAFETY: the boot info and stats pages are reserved low RAM.
    unsafe {
        core::ptr::copy_nonoverlapping(page.as_ptr(), BOOT_INFO_GPA as *mut u8, page.len());
        core::ptr::write_bytes(STATS_GPA as *mut u8, 0, PAGE_SIZE as usize);
    }
    crate::testbed_main(0, BOOT_INFO_GPA)
}
