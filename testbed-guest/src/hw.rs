//! The hardware edge: port I/O, the TSC, the serial console, the stats page,
//! and the memory functions a freestanding program must provide.

use core::arch::asm;
use core::fmt;

use testbed_abi::{ExitCode, EXIT_PORT, PARK_PORT, SERIAL_PORT, STATS_GPA};

#[inline]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O is permitted at CPL3 because the VMM/boot stub sets
    // RFLAGS.IOPL=3; it has no memory effects.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

#[inline]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) }
}

#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed at CPL3 (CR4.TSD is clear) and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[inline]
pub fn pause() {
    core::hint::spin_loop();
}

/// Ends the VM with `code` (QEMU's isa-debug-exit or our VMM's exit port).
pub fn exit(code: ExitCode) -> ! {
    outl(EXIT_PORT, code as u32);
    // Only reached if nothing listens on the exit port: park, then spin.
    park()
}

/// Tells the VMM this vCPU has nothing left to do.
pub fn park() -> ! {
    outb(PARK_PORT, 0);
    loop {
        pause();
    }
}

/// Executes an invalid instruction with no IDT: the VM triple-faults.
pub fn triple_fault() -> ! {
    // SAFETY: deliberately raises #UD; with no IDT the CPU shuts down.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// The 8250 UART at COM1, by polling.
pub struct Serial;

impl Serial {
    pub fn init() {
        let p = SERIAL_PORT;
        outb(p + 1, 0x00); // no interrupts
        outb(p + 3, 0x80); // DLAB
        outb(p, 0x01); // 115200 baud
        outb(p + 1, 0x00);
        outb(p + 3, 0x03); // 8N1
        outb(p + 2, 0xc7); // FIFO on, cleared
        outb(p + 4, 0x03); // DTR, RTS
    }

    fn put(b: u8) {
        // Wait (bounded) for the transmitter holding register to be empty.
        for _ in 0..100_000 {
            if inb(SERIAL_PORT + 5) & 0x20 != 0 {
                break;
            }
            pause();
        }
        outb(SERIAL_PORT, b);
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                Serial::put(b'\r');
            }
            Serial::put(b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::hw::Serial, $($arg)*);
    }};
}

/// Writes a u64 field of the stats page.
#[inline]
pub fn stat64(off: usize, v: u64) {
    // SAFETY: the stats page is guest RAM at a fixed, identity-mapped,
    // 8-byte-aligned address reserved for it by the boot contract; a
    // volatile aligned store is never torn for the VMM reading it.
    unsafe { core::ptr::write_volatile((STATS_GPA as usize + off) as *mut u64, v) }
}

/// Reads a u64 field of the stats page (another vCPU's record, say).
#[inline]
pub fn stat_read64(off: usize) -> u64 {
    // SAFETY: as for `stat64`; an aligned volatile load is never torn.
    unsafe { core::ptr::read_volatile((STATS_GPA as usize + off) as *const u64) }
}

/// Writes a u32 field of the stats page.
#[inline]
pub fn stat32(off: usize, v: u32) {
    // SAFETY: as for `stat64`, 4-byte aligned.
    unsafe { core::ptr::write_volatile((STATS_GPA as usize + off) as *mut u32, v) }
}

/// A slice of guest RAM by physical address (identity mapped).
///
/// # Safety
/// `[addr, addr+len)` must be RAM that nothing else uses as another type.
pub unsafe fn ram_words(addr: u64, words: usize) -> &'static mut [u64] {
    // SAFETY: guaranteed by the caller.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, words) }
}

// The memory functions the compiler calls; freestanding programs provide
// their own. `rep movsb`/`rep stosb` are fast on CPUs with ERMSB.

#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees non-overlapping valid ranges (C semantics).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is safe when dst precedes src or they do not overlap.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: backward copy for an overlapping dst after src (DF set and cleared).
        unsafe {
            asm!(
                "std", "rep movsb", "cld",
                inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
        dst
    }
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees a valid range.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are readable.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
