//! Chunks: 4 KiB of memory or disk, named by the BLAKE3 hash of the
//! uncompressed content.
//!
//! Encoded form (on disk in the store and the cache, and on the wire):
//! one codec byte (`0` raw, `1` lz4 block) followed by the payload. A chunk
//! whose lz4 form is not smaller is kept raw.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// Size of a chunk, the unit of transfer, caching and tracing.
pub const CHUNK_SIZE: usize = 4096;

const CODEC_RAW: u8 = 0;
const CODEC_LZ4: u8 = 1;

/// BLAKE3 hash of a chunk's (uncompressed) content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(content: &[u8]) -> Self {
        Self(*blake3::hash(content).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_hex(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("`{}` is not a 64-digit hex hash", s.chars().take(80).collect::<String>()));
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

impl FromStr for ChunkHash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_hex(s)
    }
}

/// Where a chunk lives in an appliance: guest memory (index = guest physical
/// address / 4 KiB) or the disk (index = byte offset / 4 KiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum ChunkKey {
    Mem(u64),
    Disk(u64),
}

impl ChunkKey {
    pub fn mem_gpa(gpa: u64) -> Self {
        Self::Mem(gpa / CHUNK_SIZE as u64)
    }
    pub fn disk_offset(offset: u64) -> Self {
        Self::Disk(offset / CHUNK_SIZE as u64)
    }
}

/// Compresses a chunk into its encoded form.
pub fn encode(content: &[u8]) -> Vec<u8> {
    let c = lz4_flex::block::compress(content);
    if c.len() + 1 < content.len() {
        let mut out = Vec::with_capacity(c.len() + 1);
        out.push(CODEC_LZ4);
        out.extend_from_slice(&c);
        out
    } else {
        let mut out = Vec::with_capacity(content.len() + 1);
        out.push(CODEC_RAW);
        out.extend_from_slice(content);
        out
    }
}

/// Decodes an encoded chunk and checks that its content hashes to `expected`.
pub fn decode_verified(expected: &ChunkHash, encoded: &[u8]) -> Result<Vec<u8>> {
    let bad = |what: &str| Error::BadChunk(expected.to_hex(), what.to_string());
    let (&codec, payload) = encoded.split_first().ok_or_else(|| bad("empty (truncated)"))?;
    let content = match codec {
        CODEC_RAW => payload.to_vec(),
        CODEC_LZ4 => lz4_flex::block::decompress(payload, CHUNK_SIZE)
            .map_err(|e| bad(&format!("cannot decompress (truncated or corrupted): {e}")))?,
        c => return Err(bad(&format!("unknown codec {c}"))),
    };
    if content.len() != CHUNK_SIZE {
        return Err(bad(&format!("{} bytes instead of {CHUNK_SIZE} (truncated)", content.len())));
    }
    let actual = ChunkHash::of(&content);
    if &actual != expected {
        return Err(Error::HashMismatch { expected: expected.to_hex(), actual: actual.to_hex() });
    }
    Ok(content)
}

/// True when the chunk is all zero bytes.
pub fn is_zero(content: &[u8]) -> bool {
    // Compare 8 bytes at a time; chunk sizes are multiples of 8.
    content.chunks_exact(8).all(|w| w == [0u8; 8]) && content.chunks_exact(8).remainder().iter().all(|&b| b == 0)
}

/// Frames of a batch response: `hash (32) | u32 LE length | encoded chunk`, repeated.
pub fn write_frame(out: &mut Vec<u8>, hash: &ChunkHash, encoded: &[u8]) {
    out.extend_from_slice(&hash.0);
    out.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    out.extend_from_slice(encoded);
}

/// Splits a batch response into (hash, encoded chunk) frames.
pub fn parse_frames(mut body: &[u8]) -> Result<Vec<(ChunkHash, &[u8])>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 36 {
            return Err(Error::Net(format!("batch response truncated ({} stray bytes)", body.len())));
        }
        let hash = ChunkHash(body[..32].try_into().unwrap());
        let len = u32::from_le_bytes(body[32..36].try_into().unwrap()) as usize;
        if len > CHUNK_SIZE + 1 || body.len() < 36 + len {
            return Err(Error::Net(format!("batch frame for chunk {hash} truncated or oversized ({len} bytes)")));
        }
        out.push((hash, &body[36..36 + len]));
        body = &body[36 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let mut c = vec![0u8; CHUNK_SIZE];
        for (i, b) in c.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        let h = ChunkHash::of(&c);
        let e = encode(&c);
        assert_eq!(e[0], CODEC_LZ4);
        assert!(e.len() < 1000);
        assert_eq!(decode_verified(&h, &e).unwrap(), c);
        // Truncated.
        let err = decode_verified(&h, &e[..e.len() - 5]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // Wrong content.
        let mut c2 = c.clone();
        c2[7] ^= 1;
        let err = decode_verified(&h, &encode(&c2)).unwrap_err();
        assert!(matches!(err, Error::HashMismatch { .. }), "{err}");
        assert!(decode_verified(&h, &[]).is_err());
        assert!(decode_verified(&h, &[9, 1, 2]).is_err());
        // Incompressible data stays raw.
        let mut x = 0x1234_5678_9abc_def0u64;
        let r: Vec<u8> = (0..CHUNK_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let e = encode(&r);
        assert_eq!(e[0], CODEC_RAW);
        assert_eq!(decode_verified(&ChunkHash::of(&r), &e).unwrap(), r);
    }

    #[test]
    fn hex_and_frames() {
        let h = ChunkHash::of(b"x");
        assert_eq!(ChunkHash::from_hex(&h.to_hex()).unwrap(), h);
        assert!(ChunkHash::from_hex("zz").is_err());
        assert!(ChunkHash::from_hex(&"g".repeat(64)).is_err());
        let mut out = Vec::new();
        write_frame(&mut out, &h, b"abc");
        write_frame(&mut out, &h, b"");
        let f = parse_frames(&out).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].1, b"abc");
        assert!(parse_frames(&out[..out.len() - 1]).is_err());
        assert!(is_zero(&[0u8; 4096]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
