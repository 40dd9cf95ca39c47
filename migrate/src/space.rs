//! Guest RAM as the migration engine sees it: one index space of pages over
//! the RAM regions, page bitmaps, per-page content digests (the integrity
//! check of every mode) and `(first_pfn, count)` frame ranges.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::wire::{self, FrameWriter, Kind, WireError};

/// The page size of guest RAM, of the wire's page records and of the pager.
pub const PAGE_SIZE: u64 = pager::PAGE_SIZE;

/// Guest RAM as the VMM maps it: `vm-memory` mmap regions with a dirty
/// bitmap for VMM writes.
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// Ranges per `Zero`/`FreeRanges` frame (1 MiB of payload).
pub const RANGES_PER_FRAME: usize = 64 * 1024;

/// Guest RAM as one index space of pages (regions in address order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSpace {
    /// (base gpa, pages, index of the first page)
    regions: Vec<(u64, u64, u64)>,
    total: u64,
}

impl PageSpace {
    /// The page space of `(base gpa, length in bytes)` regions.
    pub fn new(regions: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut out = Vec::new();
        let mut total = 0;
        for (base, len) in regions {
            let pages = len / PAGE_SIZE;
            out.push((base, pages, total));
            total += pages;
        }
        Self { regions: out, total }
    }

    /// The page space of a guest memory's regions.
    pub fn of<M: GuestMemoryBackend>(mem: &M) -> Self {
        Self::new(mem.iter().map(|r| (r.start_addr().0, r.len())))
    }

    /// Pages in all.
    pub fn pages(&self) -> u64 {
        self.total
    }

    /// The guest-physical address of page `idx` (`u64::MAX` past the end).
    pub fn gpa(&self, idx: u64) -> u64 {
        for &(base, pages, first) in &self.regions {
            if idx < first + pages {
                return base + (idx - first) * PAGE_SIZE;
            }
        }
        u64::MAX
    }

    /// The index of the page at `gpa` (page aligned, inside RAM).
    pub fn index(&self, gpa: u64) -> Option<u64> {
        if gpa % PAGE_SIZE != 0 {
            return None;
        }
        self.regions
            .iter()
            .find(|&&(base, pages, _)| gpa >= base && gpa < base + pages * PAGE_SIZE)
            .map(|&(base, _, first)| first + (gpa - base) / PAGE_SIZE)
    }

    /// The parts of the frame range `[pfn, pfn + count)` that are RAM, as
    /// `(first index, count)`.
    pub fn clip(&self, pfn: u64, count: u64) -> Vec<(u64, u64)> {
        let (lo, hi) = (pfn.saturating_mul(PAGE_SIZE), pfn.saturating_add(count).saturating_mul(PAGE_SIZE));
        let mut out = Vec::new();
        for &(base, pages, first) in &self.regions {
            let (a, b) = (lo.max(base), hi.min(base + pages * PAGE_SIZE));
            if b > a {
                out.push((first + (a - base) / PAGE_SIZE, (b - a) / PAGE_SIZE));
            }
        }
        out
    }
}

/// One bit per page index, shared between threads (vm-memory's
/// [`AtomicBitmap`], one "byte" per page).
pub struct Bits(AtomicBitmap);

impl Bits {
    /// `n` clear bits.
    pub fn new(n: u64) -> Self {
        Self(AtomicBitmap::new(n.max(1) as usize, NonZeroUsize::MIN))
    }
    /// Sets bit `i`; true if it was clear before (a hint when another
    /// thread sets it at the same moment: both may see it clear).
    pub fn set(&self, i: u64) -> bool {
        let was = self.0.is_bit_set(i as usize);
        self.0.set_bit(i as usize);
        !was
    }
    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        self.0.is_bit_set(i as usize)
    }
    /// Clears bit `i`.
    pub fn clear(&self, i: u64) {
        self.0.reset_bit(i as usize);
    }
}

/// Digest of one page's content (the first 8 bytes of its BLAKE3 hash).
pub fn page_digest(data: &[u8]) -> u64 {
    u64::from_le_bytes(blake3::hash(data).as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Digest of a zero page.
pub fn zero_digest() -> u64 {
    static Z: OnceLock<u64> = OnceLock::new();
    *Z.get_or_init(|| page_digest(&[0u8; PAGE_SIZE as usize]))
}

/// Whether a page is all zero.
pub fn is_zero(p: &[u8]) -> bool {
    p.chunks_exact(8).all(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")) == 0)
}

/// Per-page digests (0 = free / not sent) and their combined hash.
pub struct Digests(Vec<AtomicU64>);

impl Digests {
    /// `n` pages, none sent.
    pub fn new(n: u64) -> Self {
        Self::filled(n, 0)
    }
    /// `n` pages of digest `v`.
    pub fn filled(n: u64, v: u64) -> Self {
        Self((0..n).map(|_| AtomicU64::new(v)).collect())
    }
    /// Digests of every page of `mem` as it is now.
    pub fn of_memory<M: GuestMemoryBackend>(mem: &M) -> Self {
        let space = PageSpace::of(mem);
        let d = Self::new(space.pages());
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for i in 0..space.pages() {
            if mem.read_slice(&mut page, GuestAddress(space.gpa(i))).is_ok() {
                d.set(i, page_digest(&page));
            }
        }
        d
    }
    /// Records page `i`'s digest.
    pub fn set(&self, i: u64, d: u64) {
        self.0[i as usize].store(d, Ordering::Relaxed);
    }
    /// BLAKE3 over all digests in page order.
    pub fn summary(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        let mut buf = Vec::with_capacity(64 * 1024);
        for d in &self.0 {
            buf.extend_from_slice(&d.load(Ordering::Relaxed).to_le_bytes());
            if buf.len() >= 64 * 1024 {
                h.update(&buf);
                buf.clear();
            }
        }
        h.update(&buf);
        *h.finalize().as_bytes()
    }
}

/// Encodes `(first_pfn, count)` ranges.
pub fn encode_ranges(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ranges.len() * 16);
    for &(a, n) in ranges {
        v.extend_from_slice(&a.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
    }
    v
}

/// Decodes `(first_pfn, count)` ranges.
pub fn decode_ranges(payload: &[u8], what: &'static str) -> Result<Vec<(u64, u64)>, WireError> {
    if payload.len() % 16 != 0 {
        return Err(WireError::Malformed(what));
    }
    let v = wire::u64s(payload, what)?;
    Ok(v.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

/// Sends frame ranges (`(first_pfn, count)`) in as few frames as fit;
/// returns the bytes written.
pub fn send_ranges<W: std::io::Write>(
    fw: &mut FrameWriter<W>,
    kind: Kind,
    ranges: &[(u64, u64)],
) -> Result<u64, WireError> {
    let before = fw.bytes;
    for chunk in ranges.chunks(RANGES_PER_FRAME) {
        fw.send(kind, &encode_ranges(chunk))?;
    }
    Ok(fw.bytes - before)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RAM below the 32-bit hole (3 GiB) and above 4 GiB, as the VMM lays out 4 GiB.
    fn four_gib() -> PageSpace {
        PageSpace::new([(0, 0xC000_0000), (1 << 32, (4u64 << 30) - 0xC000_0000)])
    }

    #[test]
    fn page_space_maps_indexes_across_the_hole() {
        let s = four_gib();
        assert_eq!(s.pages(), (4u64 << 30) / PAGE_SIZE);
        let below = 0xC000_0000 / PAGE_SIZE;
        assert_eq!(s.gpa(below - 1), 0xC000_0000 - PAGE_SIZE);
        assert_eq!(s.gpa(below), 1 << 32);
        assert_eq!(s.gpa(s.pages()), u64::MAX);
        assert_eq!(s.index(1 << 32), Some(below));
        assert_eq!(s.index(0xC000_0000), None);
        assert_eq!(s.index(0x1001), None);
        // A frame range across the hole keeps only RAM.
        let hole = ((1u64 << 32) - 0xC000_0000) / PAGE_SIZE;
        assert_eq!(s.clip(below - 2, hole + 4), vec![(below - 2, 2), (below, 2)]);
    }

    #[test]
    fn page_space_of_guest_memory() {
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let s = PageSpace::of(&mem);
        assert_eq!(s.pages(), 256);
        mem.write_slice(&[1u8; 4096], GuestAddress(0x3000)).unwrap();
        let a = Digests::of_memory(&mem);
        let b = Digests::filled(256, zero_digest());
        assert_ne!(a.summary(), b.summary());
        b.set(3, page_digest(&[1u8; 4096]));
        assert_eq!(a.summary(), b.summary());
    }

    #[test]
    fn bits_and_digests() {
        let b = Bits::new(130);
        assert!(b.set(129));
        assert!(!b.set(129));
        assert!(b.get(129) && !b.get(128));
        b.clear(129);
        assert!(!b.get(129));
        let d = Digests::new(3);
        let e = Digests::new(3);
        d.set(1, zero_digest());
        assert_ne!(d.summary(), e.summary());
        e.set(1, page_digest(&[0u8; 4096]));
        assert_eq!(d.summary(), e.summary());
        assert!(is_zero(&[0u8; 4096]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn ranges_round_trip_and_reject_bad_lengths() {
        let r = vec![(1, 2), (10, 1 << 20)];
        assert_eq!(decode_ranges(&encode_ranges(&r), "zero").unwrap(), r);
        assert!(matches!(decode_ranges(&[0u8; 8], "zero"), Err(WireError::Malformed("zero"))));
        let mut fw = FrameWriter::new(Vec::new());
        let many: Vec<(u64, u64)> = (0..RANGES_PER_FRAME as u64 + 1).map(|i| (i * 2, 1)).collect();
        send_ranges(&mut fw, Kind::Zero, &many).unwrap();
        let bytes = fw.get_mut().clone();
        let mut fr = wire::FrameReader::new(&bytes[..]);
        let (a, b) = (fr.expect().unwrap(), fr.expect().unwrap());
        assert_eq!(
            decode_ranges(&a.payload, "zero").unwrap().len() + decode_ranges(&b.payload, "zero").unwrap().len(),
            many.len()
        );
    }
}
