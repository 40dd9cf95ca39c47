//! Sector patterns for the `disk` workload, shared with host tests.
//!
//! A disk prepared by the host starts with sector 0 = `DISK_MAGIC`, a u64
//! seed and a u64 count of prepared sectors; sectors `1..=count` hold
//! [`sector_pattern`]. The guest verifies them, then writes
//! [`write_pattern`] over its own area (the sectors after the prepared ones),
//! reads them back and verifies, round after round.

use crate::rng::mix;

/// First bytes of a host-prepared disk.
pub const DISK_MAGIC: [u8; 8] = *b"TBDISK01";
/// Sector size.
pub const SECTOR: usize = 512;

fn fill(out: &mut [u8; SECTOR], x: u64) {
    for (i, c) in out.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&mix(x ^ (i as u64) << 56).to_le_bytes());
    }
}

/// Content of host-prepared sector `sector` (>= 1).
pub fn sector_pattern(seed: u64, sector: u64, out: &mut [u8; SECTOR]) {
    fill(out, mix(seed ^ 0x686f_7374) ^ sector);
}

/// Content the guest writes to `sector` in round `round`.
pub fn write_pattern(seed: u64, round: u64, sector: u64, out: &mut [u8; SECTOR]) {
    fill(out, mix(seed ^ 0x6775_6573 ^ round << 40) ^ sector);
}

/// Encodes sector 0 of a host-prepared disk.
pub fn header(seed: u64, count: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    s[..8].copy_from_slice(&DISK_MAGIC);
    s[8..16].copy_from_slice(&seed.to_le_bytes());
    s[16..24].copy_from_slice(&count.to_le_bytes());
    s
}

/// Decodes sector 0: `(seed, count)` if the disk was prepared by the host.
pub fn parse_header(s: &[u8; SECTOR]) -> Option<(u64, u64)> {
    if s[..8] != DISK_MAGIC {
        return None;
    }
    Some((u64::from_le_bytes(s[8..16].try_into().ok()?), u64::from_le_bytes(s[16..24].try_into().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_and_header_round_trips() {
        let (mut a, mut b) = ([0u8; SECTOR], [0u8; SECTOR]);
        sector_pattern(1, 5, &mut a);
        sector_pattern(1, 6, &mut b);
        assert_ne!(a, b);
        write_pattern(1, 0, 5, &mut b);
        assert_ne!(a, b);
        assert_eq!(parse_header(&header(9, 100)), Some((9, 100)));
        assert_eq!(parse_header(&[0u8; SECTOR]), None);
    }
}
