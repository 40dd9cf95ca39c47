//! The appliance manifest: everything but chunk contents, itself named by
//! the BLAKE3 hash of its bytes.
//!
//! ```text
//! "VTAPMAN\0" | u32 version | u32 header_len | header (JSON)
//! | u32 n_hashes | n_hashes * 32-byte chunk hash
//! | u32 n_runs | runs: u8 kind (0 zero, 1 free, 2 data) | u64 count | (data only) u32 first hash index
//! ```
//! The runs cover the chunks of every memory region in order, then the disk.
//! A data run of `count` chunks refers to hash indices `first..first+count`
//! (a fresh appliance numbers its unique chunks in scan order, so touched
//! memory compresses to few runs). Zero chunks (all zero bytes) and free
//! chunks (unallocated by the guest: the free-memory list) are never stored
//! nor fetched: the client serves them as zero.

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkHash, ChunkKey, CHUNK_SIZE};
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"VTAPMAN\0";
/// Manifest format version; other versions are refused.
pub const VERSION: u32 = 1;
const ZERO: u32 = u32::MAX;
const FREE: u32 = u32::MAX - 1;
/// Largest header / hash table accepted (a malformed length must not make us allocate terabytes).
const MAX_HEADER: u32 = 64 << 20;
const MAX_CHUNKS: u64 = 1 << 26; // 256 GiB of state

/// What the index says about one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkRef {
    /// All zero bytes: not stored.
    Zero,
    /// Unallocated guest memory (free-memory list): reads as zero, not stored.
    Free,
    /// Stored content.
    Data(ChunkHash),
}

/// A guest memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Header {
    name: String,
    created_unix: u64,
    config: serde_json::Value,
    /// Hex of the opaque device-state blob.
    device_state: String,
    regions: Vec<Region>,
    disk_size: Option<u64>,
}

/// A parsed manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub created_unix: u64,
    /// The VM configuration (opaque JSON to this crate).
    pub config: serde_json::Value,
    /// The device state (opaque bytes to this crate).
    pub device_state: Vec<u8>,
    pub regions: Vec<Region>,
    /// Disk size in bytes (the last chunk is zero-padded).
    pub disk_size: Option<u64>,
    /// Unique chunk hashes.
    pub hashes: Vec<ChunkHash>,
    /// One entry per memory chunk (regions in order): hash index, ZERO or FREE.
    mem: Vec<u32>,
    /// Index of each region's first chunk in `mem`.
    region_start: Vec<usize>,
    disk: Vec<u32>,
}

/// Counts of a manifest's chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ManifestStats {
    pub mem_chunks: u64,
    pub disk_chunks: u64,
    pub data_chunks: u64,
    pub unique_chunks: u64,
    pub zero_chunks: u64,
    pub free_chunks: u64,
}

fn entry(r: u32, hashes: &[ChunkHash]) -> ChunkRef {
    match r {
        ZERO => ChunkRef::Zero,
        FREE => ChunkRef::Free,
        i => ChunkRef::Data(hashes[i as usize]),
    }
}

/// Builds a manifest chunk by chunk.
pub struct ManifestBuilder {
    m: Manifest,
    index: std::collections::HashMap<ChunkHash, u32>,
}

impl ManifestBuilder {
    pub fn new(name: &str, config: serde_json::Value, device_state: Vec<u8>) -> Self {
        let created_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self {
            m: Manifest {
                name: name.to_string(),
                created_unix,
                config,
                device_state,
                regions: Vec::new(),
                disk_size: None,
                hashes: Vec::new(),
                mem: Vec::new(),
                region_start: Vec::new(),
                disk: Vec::new(),
            },
            index: Default::default(),
        }
    }

    /// Starts a memory region; its chunks follow with [`Self::mem_chunk`].
    pub fn begin_region(&mut self, gpa: u64, size: u64) -> Result<()> {
        if gpa % CHUNK_SIZE as u64 != 0 || size % CHUNK_SIZE as u64 != 0 {
            return Err(Error::Invalid(format!("memory region {gpa:#x}+{size:#x} is not 4 KiB aligned")));
        }
        if let Some(last) = self.m.regions.last() {
            if gpa < last.gpa + last.size {
                return Err(Error::Invalid(format!("memory region {gpa:#x} overlaps or precedes the previous one")));
            }
        }
        self.check_region_full()?;
        self.m.region_start.push(self.m.mem.len());
        self.m.regions.push(Region { gpa, size });
        Ok(())
    }

    fn check_region_full(&self) -> Result<()> {
        if let (Some(r), Some(&s)) = (self.m.regions.last(), self.m.region_start.last()) {
            let have = (self.m.mem.len() - s) as u64;
            if have != r.size / CHUNK_SIZE as u64 {
                return Err(Error::Invalid(format!(
                    "memory region {:#x} has {have} chunks, expected {}",
                    r.gpa,
                    r.size / CHUNK_SIZE as u64
                )));
            }
        }
        Ok(())
    }

    fn intern(&mut self, r: ChunkRef) -> u32 {
        match r {
            ChunkRef::Zero => ZERO,
            ChunkRef::Free => FREE,
            ChunkRef::Data(h) => *self.index.entry(h).or_insert_with(|| {
                self.m.hashes.push(h);
                (self.m.hashes.len() - 1) as u32
            }),
        }
    }

    pub fn mem_chunk(&mut self, r: ChunkRef) -> Result<()> {
        let (Some(reg), Some(&s)) = (self.m.regions.last(), self.m.region_start.last()) else {
            return Err(Error::Invalid("memory chunk outside any region".into()));
        };
        if (self.m.mem.len() - s) as u64 >= reg.size / CHUNK_SIZE as u64 {
            return Err(Error::Invalid(format!("too many chunks for memory region {:#x}", reg.gpa)));
        }
        let e = self.intern(r);
        self.m.mem.push(e);
        Ok(())
    }

    pub fn set_disk_size(&mut self, size: u64) {
        self.m.disk_size = Some(size);
    }

    pub fn disk_chunk(&mut self, r: ChunkRef) -> Result<()> {
        let Some(size) = self.m.disk_size else { return Err(Error::Invalid("disk chunk before disk size".into())) };
        if self.m.disk.len() as u64 >= size.div_ceil(CHUNK_SIZE as u64) {
            return Err(Error::Invalid("too many disk chunks".into()));
        }
        let e = self.intern(r);
        self.m.disk.push(e);
        Ok(())
    }

    pub fn finish(self) -> Result<Manifest> {
        self.check_region_full()?;
        if let Some(size) = self.m.disk_size {
            if self.m.disk.len() as u64 != size.div_ceil(CHUNK_SIZE as u64) {
                return Err(Error::Invalid(format!("disk has {} chunks for {size} bytes", self.m.disk.len())));
            }
        }
        Ok(self.m)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(Error::BadManifest(format!("truncated in {what}")));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
}

impl Manifest {
    /// Serialises the manifest; its name is `ChunkHash::of(&bytes)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = Header {
            name: self.name.clone(),
            created_unix: self.created_unix,
            config: self.config.clone(),
            device_state: self.device_state.iter().map(|b| format!("{b:02x}")).collect(),
            regions: self.regions.clone(),
            disk_size: self.disk_size,
        };
        let h = serde_json::to_vec(&header).expect("manifest header serialises");
        let mut out = Vec::with_capacity(64 + h.len() + self.hashes.len() * 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&(self.hashes.len() as u32).to_le_bytes());
        for x in &self.hashes {
            out.extend_from_slice(&x.0);
        }
        // Run-length encode mem then disk.
        let mut runs: Vec<(u8, u64, u32)> = Vec::new();
        for &e in self.mem.iter().chain(self.disk.iter()) {
            let (kind, idx) = match e {
                ZERO => (0u8, 0),
                FREE => (1, 0),
                i => (2, i),
            };
            if let Some(last) = runs.last_mut() {
                if last.0 == kind && (kind != 2 || last.2 as u64 + last.1 == idx as u64) {
                    last.1 += 1;
                    continue;
                }
            }
            runs.push((kind, 1, idx));
        }
        out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        for (kind, count, first) in runs {
            out.push(kind);
            out.extend_from_slice(&count.to_le_bytes());
            if kind == 2 {
                out.extend_from_slice(&first.to_le_bytes());
            }
        }
        out
    }

    /// The manifest's name: BLAKE3 of its bytes.
    pub fn hash(&self) -> ChunkHash {
        ChunkHash::of(&self.to_bytes())
    }

    /// Parses and validates a manifest.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut c = Cursor { b: bytes };
        if c.take(8, "magic").map_err(|_| Error::BadManifest("truncated (no magic)".into()))? != MAGIC {
            return Err(Error::BadManifest("not an appliance manifest (bad magic)".into()));
        }
        let v = c.u32("version")?;
        if v != VERSION {
            return Err(Error::BadVersion { what: "manifest", found: v, supported: VERSION });
        }
        let hl = c.u32("header length")?;
        if hl > MAX_HEADER {
            return Err(Error::BadManifest(format!("header of {hl} bytes")));
        }
        let header: Header = serde_json::from_slice(c.take(hl as usize, "header")?)
            .map_err(|e| Error::BadManifest(format!("header: {e}")))?;
        let device_state = parse_hex(&header.device_state)?;
        let nh = c.u32("hash count")? as usize;
        if nh as u64 * 32 > c.b.len() as u64 {
            return Err(Error::BadManifest("truncated in the hash table".into()));
        }
        let hashes: Vec<ChunkHash> =
            c.take(nh * 32, "hash table")?.chunks_exact(32).map(|h| ChunkHash(h.try_into().unwrap())).collect();
        let mut mem_chunks = 0u64;
        let mut region_start = Vec::new();
        let mut prev_end = 0u64;
        for r in &header.regions {
            if r.gpa % CHUNK_SIZE as u64 != 0 || r.size % CHUNK_SIZE as u64 != 0 || r.gpa < prev_end {
                return Err(Error::BadManifest(format!("bad memory region {:#x}+{:#x}", r.gpa, r.size)));
            }
            prev_end = r.gpa.checked_add(r.size).ok_or_else(|| Error::BadManifest("region overflows".into()))?;
            region_start.push(mem_chunks as usize);
            mem_chunks += r.size / CHUNK_SIZE as u64;
        }
        let disk_chunks = header.disk_size.map(|s| s.div_ceil(CHUNK_SIZE as u64)).unwrap_or(0);
        let total = mem_chunks + disk_chunks;
        if total > MAX_CHUNKS {
            return Err(Error::BadManifest(format!("{total} chunks is implausibly large")));
        }
        let nruns = c.u32("run count")?;
        let mut all: Vec<u32> = Vec::with_capacity(total.min(1 << 24) as usize);
        for _ in 0..nruns {
            let kind = c.u8("run")?;
            let count = c.u64("run")?;
            if count == 0 || all.len() as u64 + count > total {
                return Err(Error::BadManifest("chunk runs do not match the memory and disk sizes".into()));
            }
            match kind {
                0 => all.extend(std::iter::repeat_n(ZERO, count as usize)),
                1 => all.extend(std::iter::repeat_n(FREE, count as usize)),
                2 => {
                    let first = c.u32("run")? as u64;
                    if first + count > nh as u64 {
                        return Err(Error::BadManifest("chunk run refers past the hash table".into()));
                    }
                    all.extend(first as u32..(first + count) as u32);
                }
                k => return Err(Error::BadManifest(format!("unknown run kind {k}"))),
            }
        }
        if all.len() as u64 != total {
            return Err(Error::BadManifest(format!("index covers {} of {total} chunks (truncated)", all.len())));
        }
        if !c.b.is_empty() {
            return Err(Error::BadManifest(format!("{} trailing bytes", c.b.len())));
        }
        let disk = all.split_off(mem_chunks as usize);
        Ok(Self {
            name: header.name,
            created_unix: header.created_unix,
            config: header.config,
            device_state,
            regions: header.regions,
            disk_size: header.disk_size,
            hashes,
            mem: all,
            region_start,
            disk,
        })
    }

    /// The chunk at a guest physical address; `None` outside guest memory.
    pub fn mem_chunk(&self, gpa: u64) -> Option<ChunkRef> {
        let i = self.regions.iter().position(|r| gpa >= r.gpa && gpa - r.gpa < r.size)?;
        let idx = self.region_start[i] + ((gpa - self.regions[i].gpa) / CHUNK_SIZE as u64) as usize;
        Some(entry(self.mem[idx], &self.hashes))
    }

    /// The disk chunk with this index (byte offset / 4 KiB).
    pub fn disk_chunk(&self, index: u64) -> Option<ChunkRef> {
        self.disk.get(usize::try_from(index).ok()?).map(|&e| entry(e, &self.hashes))
    }

    pub fn chunk(&self, key: ChunkKey) -> Option<ChunkRef> {
        match key {
            ChunkKey::Mem(pfn) => self.mem_chunk(pfn.checked_mul(CHUNK_SIZE as u64)?),
            ChunkKey::Disk(i) => self.disk_chunk(i),
        }
    }

    /// Every chunk key with its reference, memory regions first then disk.
    pub fn iter(&self) -> impl Iterator<Item = (ChunkKey, ChunkRef)> + '_ {
        let mem = self.regions.iter().enumerate().flat_map(move |(i, r)| {
            let start = self.region_start[i];
            let n = (r.size / CHUNK_SIZE as u64) as usize;
            (0..n).map(move |k| {
                (ChunkKey::Mem(r.gpa / CHUNK_SIZE as u64 + k as u64), entry(self.mem[start + k], &self.hashes))
            })
        });
        let disk = self.disk.iter().enumerate().map(move |(i, &e)| (ChunkKey::Disk(i as u64), entry(e, &self.hashes)));
        mem.chain(disk)
    }

    pub fn stats(&self) -> ManifestStats {
        let mut s = ManifestStats {
            mem_chunks: self.mem.len() as u64,
            disk_chunks: self.disk.len() as u64,
            unique_chunks: self.hashes.len() as u64,
            ..Default::default()
        };
        for &e in self.mem.iter().chain(&self.disk) {
            match e {
                ZERO => s.zero_chunks += 1,
                FREE => s.free_chunks += 1,
                _ => s.data_chunks += 1,
            }
        }
        s
    }
}

fn parse_hex(s: &str) -> Result<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return Err(Error::BadManifest("device state is not hex".into()));
    }
    (0..s.len() / 2)
        .map(|i| {
            u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| Error::BadManifest("device state is not hex".into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut b = ManifestBuilder::new("app", serde_json::json!({"mem_size": 1}), vec![1, 2, 0xff]);
        b.begin_region(0, 8 * 4096).unwrap();
        let h1 = ChunkHash::of(b"1");
        let h2 = ChunkHash::of(b"2");
        for r in [
            ChunkRef::Data(h1),
            ChunkRef::Data(h2),
            ChunkRef::Zero,
            ChunkRef::Zero,
            ChunkRef::Free,
            ChunkRef::Data(h1),
            ChunkRef::Data(h2),
            ChunkRef::Zero,
        ] {
            b.mem_chunk(r).unwrap();
        }
        b.begin_region(1 << 32, 4096).unwrap();
        b.mem_chunk(ChunkRef::Free).unwrap();
        b.set_disk_size(5000);
        b.disk_chunk(ChunkRef::Data(ChunkHash::of(b"3"))).unwrap();
        b.disk_chunk(ChunkRef::Zero).unwrap();
        assert!(b.disk_chunk(ChunkRef::Zero).is_err());
        b.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.to_bytes();
        let p = Manifest::parse(&bytes).unwrap();
        assert_eq!(p, m);
        assert_eq!(p.mem_chunk(4096), Some(ChunkRef::Data(ChunkHash::of(b"2"))));
        assert_eq!(p.mem_chunk(5 * 4096 + 17), Some(ChunkRef::Data(ChunkHash::of(b"1"))));
        assert_eq!(p.mem_chunk(4 * 4096), Some(ChunkRef::Free));
        assert_eq!(p.mem_chunk(1 << 32), Some(ChunkRef::Free));
        assert_eq!(p.mem_chunk(8 * 4096), None);
        assert_eq!(p.disk_chunk(1), Some(ChunkRef::Zero));
        assert_eq!(p.disk_chunk(2), None);
        assert_eq!(p.iter().count(), 11);
        let s = p.stats();
        assert_eq!((s.data_chunks, s.unique_chunks, s.zero_chunks, s.free_chunks), (5, 3, 4, 2));
        assert_eq!(p.device_state, vec![1, 2, 0xff]);
    }

    #[test]
    fn malformed_is_refused() {
        let bytes = sample().to_bytes();
        for n in [0, 5, 12, 20, bytes.len() - 1] {
            let e = Manifest::parse(&bytes[..n]).unwrap_err();
            assert!(matches!(e, Error::BadManifest(_)), "{n}: {e}");
        }
        let mut v = bytes.clone();
        v[8] = 9;
        let e = Manifest::parse(&v).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        let mut v = bytes.clone();
        v[0] = b'X';
        assert!(Manifest::parse(&v).unwrap_err().to_string().contains("magic"));
        let mut v = bytes.clone();
        v.push(0);
        assert!(Manifest::parse(&v).is_err());
        // Garbage in every byte position must never panic.
        for i in 0..bytes.len() {
            let mut v = bytes.clone();
            v[i] ^= 0xa5;
            let _ = Manifest::parse(&v);
        }
    }
}
