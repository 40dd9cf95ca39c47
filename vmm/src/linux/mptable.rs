//! An Intel MultiProcessor Specification 1.4 table, so Linux finds the
//! vCPUs, the IOAPIC and the legacy IRQ routing without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// The floating pointer goes at the start of the EBDA (where Linux looks
/// for it); the e820 map reserves [EBDA, 1 MiB).
pub const MPTABLE_START: u64 = 0x9fc00;
/// The configuration table goes in the (reserved) BIOS area, which has
/// room for every vCPU's entry.
pub const CONFIG_START: u64 = 0xf0000;
const CONFIG_LIMIT: u64 = 0x100000;
/// Most vCPUs: APIC IDs 0..n-1, the IOAPIC takes ID n, 255 is broadcast.
pub const MAX_CPUS: u32 = 254;

const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature (family 6) and features (FPU | APIC) for processor entries.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const LEGACY_IRQS: u8 = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    #[error("the MP table supports 1 to {MAX_CPUS} vCPUs, not {0}")]
    Cpus(u32),
    #[error("the MP table does not fit in the EBDA")]
    TooBig,
    #[error("writing the MP table to guest memory failed")]
    Write,
}

fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x)).wrapping_neg()
}

/// Builds the floating pointer structure (for [`MPTABLE_START`]) and the
/// configuration table (for [`CONFIG_START`]) for `cpus` vCPUs.
pub fn build(cpus: u32) -> Result<(Vec<u8>, Vec<u8>), MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::Cpus(cpus));
    }
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for cpu in 0..cpus {
        // Processor entry (20 bytes).
        entries.extend_from_slice(&[0, cpu as u8, APIC_VERSION, if cpu == 0 { 3 } else { 1 }]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus entry (8 bytes): ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // IOAPIC entry (8 bytes).
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // I/O interrupt entries (8 bytes each): ISA IRQ i -> IOAPIC pin i.
    for irq in 0..LEGACY_IRQS {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupt entries: LINT0 = ExtINT, LINT1 = NMI, to all LAPICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let hdr_len = 44usize;
    let table_len = hdr_len + entries.len();
    if table_len as u64 > CONFIG_LIMIT - CONFIG_START {
        return Err(MptableError::TooBig);
    }
    // Floating pointer structure.
    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(CONFIG_START as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    // Configuration table header.
    let mut hdr = Vec::with_capacity(hdr_len);
    hdr.extend_from_slice(b"PCMP");
    hdr.extend_from_slice(&(table_len as u16).to_le_bytes());
    hdr.extend_from_slice(&[4, 0]); // spec rev, checksum (below)
    hdr.extend_from_slice(b"VMM     ");
    hdr.extend_from_slice(b"TESTBED VMM ");
    hdr.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    hdr.extend_from_slice(&0u16.to_le_bytes());
    hdr.extend_from_slice(&count.to_le_bytes());
    hdr.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    hdr.extend_from_slice(&[0, 0, 0, 0]); // ext table length, checksum, reserved
    debug_assert_eq!(hdr.len(), hdr_len);
    let mut table = hdr;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    Ok((fp, table))
}

/// Writes the MP table into guest memory.
pub fn write<M: GuestMemory>(mem: &M, cpus: u32) -> Result<(), MptableError> {
    let (fp, table) = build(cpus)?;
    mem.write_slice(&fp, GuestAddress(MPTABLE_START)).map_err(|_| MptableError::Write)?;
    mem.write_slice(&table, GuestAddress(CONFIG_START)).map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_entries() {
        for cpus in [1, 2, 8, 64, MAX_CPUS] {
            let (fp, t) = build(cpus).unwrap();
            assert_eq!(fp.len(), 16);
            assert_eq!(&fp[..4], b"_MP_");
            assert_eq!(sum(&fp), 0, "floating pointer checksum");
            assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64, CONFIG_START);
            let off = 0;
            assert_eq!(&t[off..off + 4], b"PCMP");
            let len = u16::from_le_bytes(t[off + 4..off + 6].try_into().unwrap()) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(&t[off..off + len]), 0, "configuration table checksum");
            let count = u16::from_le_bytes(t[off + 34..off + 36].try_into().unwrap()) as u32;
            assert_eq!(count, cpus + 1 + 1 + 16 + 2);
            // Processor entries: APIC IDs in order, only the first is the BSP.
            let procs = &t[off + 44..];
            for c in 0..cpus as usize {
                let e = &procs[c * 20..c * 20 + 20];
                assert_eq!(e[0], 0);
                assert_eq!(e[1] as usize, c);
                assert_eq!(e[3], if c == 0 { 3 } else { 1 });
            }
        }
        assert_eq!(build(0), Err(MptableError::Cpus(0)));
        assert_eq!(build(255), Err(MptableError::Cpus(255)));
    }
}
