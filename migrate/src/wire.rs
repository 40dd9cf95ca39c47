//! The migration wire protocol: an authenticated handshake, then frames.
//!
//! # Handshake (mutual, shared key)
//! Both VMMs are given the same secret key (32 bytes). On a new connection:
//! 1. the receiver (destination) sends `HELLO`: magic, protocol version,
//!    channel id (0 = main, 1 = demand faults), a 32-byte random nonce;
//! 2. the sender (source) answers with its own magic/version/channel, its
//!    nonce and `MAC(key, "src" | nonce_dst | nonce_src | channel)`;
//! 3. the receiver checks the MAC and answers `MAC(key, "dst" | nonce_src |
//!    nonce_dst | channel)`, which the sender checks.
//!
//! A peer without the key, with another protocol version, or on the wrong
//! channel is refused before a single frame is read. MACs are BLAKE3 keyed
//! hashes, compared in constant time.
//!
//! # Frames
//! `kind u16 | flags u16 | len u32 | seq u64 | crc32 u32` (20 bytes), then
//! `len` payload bytes. `seq` starts at 0 and increases by one per frame on a
//! connection, so a dropped, duplicated or reordered frame is detected; the
//! CRC covers the header fields and the payload, so corruption is detected.
//! `len` is bounded by [`MAX_PAYLOAD`]; unknown kinds are refused.
//!
//! # A migration (protocol version 2: every message a frame)
//! ```text
//!  source                                   destination
//!  ── main connection ─────────────────────────────────────────────────
//!  handshake (Channel::Main)          ⇄
//!  Config {VM shape}                  →     maps guest memory for it
//!  Info {mode, token}  (post-copy)    →     registers it with userfaultfd
//!  ── demand connection (post-copy) ───────────────────────────────────
//!  handshake (Channel::Demand)        ⇄     fault thread starts
//!  ── main ────────────────────────────────────────────────────────────
//!  Pages* (pre-copy rounds, VM running)→    written, digested
//!  · pause the VM ·
//!  Pages* (stop-and-copy / the dirty rest)→ written, digested
//!  FreeRanges* (enlightened)          →     noted: mapped as zero, never fetched
//!  State+ {opaque VM state}           →
//!  Switchover                         →     the VMM builds the VM
//!                                     ←     Ack {digest of memory received}
//!                                           or Abort {reason}: the source resumes
//!  · stop-and-copy, pre-copy: the source's VM ends; the destination runs ·
//!  Go (post-copy: the commit)         →     the VM runs here
//!  Round, Pages*, Zero* (per round)   →     UFFDIO_COPY / UFFDIO_ZEROPAGE
//!  Complete                           →
//!                                     ←     Ack {digest}, Info {statistics}
//!  ── demand connection, meanwhile ────────────────────────────────────
//!                                     ←     Request {gpa...}  (a vCPU faulted)
//!  Pages {the requested pages}        →     UFFDIO_COPY, the vCPU goes on
//!  ── after a broken link (post-copy, after Go) ───────────────────────
//!  handshake, Info {resume: token}    →
//!                                     ←     Info {missing}, Missing*, Complete
//!  handshake (demand), push resumes   →
//! ```

use std::io::{self, Read, Write};

/// "VMMMIGR\0"
pub const MAGIC: [u8; 8] = *b"VMMMIGR\0";
/// Protocol version; peers with another version are refused.
pub const VERSION: u32 = 3;
/// Largest frame payload accepted (a batch of pages plus headers).
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Frame header size.
pub const HEADER_LEN: usize = 20;
/// Key size.
pub const KEY_LEN: usize = 32;

/// Which connection of a migration this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Channel {
    /// State, pushed pages, control.
    Main = 0,
    /// Demand-fault requests and their pages (post-copy), kept apart so they
    /// never queue behind push traffic.
    Demand = 1,
}

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// VM configuration (JSON).
    Config = 1,
    /// Device and KVM state (serialized).
    State = 2,
    /// A batch of pages: repeated `{u64 gpa, 4096 bytes}`.
    Pages = 3,
    /// Ranges of free pages: repeated `{u64 first_pfn, u64 count}`.
    FreeRanges = 4,
    /// Demand-fault request: repeated `u64 gpa`.
    Request = 5,
    /// A push round starts (`u32 round, u32 class`).
    Round = 6,
    /// Execution switches to the destination (post-copy) / end of stream.
    Switchover = 7,
    /// All pages sent.
    Complete = 8,
    /// Acknowledgement (`u64` value depends on context).
    Ack = 9,
    /// The peer gives up: UTF-8 reason.
    Abort = 10,
    /// Dirty-round statistics and other informational records (JSON).
    Info = 11,
    /// Ranges of pages that are zero at the source (not free, just zero):
    /// repeated `{u64 first_pfn, u64 count}`; the destination maps zero
    /// pages without a transfer.
    Zero = 12,
    /// Post-copy: the destination restored the VM; the source commits the
    /// switch-over by answering with this frame, and only then does the
    /// destination resume it.
    Go = 13,
    /// Answer to a reconnecting post-copy source: ranges of pages the
    /// destination still lacks, `{u64 first_pfn, u64 count}` repeated.
    Missing = 14,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Config,
            2 => State,
            3 => Pages,
            4 => FreeRanges,
            5 => Request,
            6 => Round,
            7 => Switchover,
            8 => Complete,
            9 => Ack,
            10 => Abort,
            11 => Info,
            12 => Zero,
            13 => Go,
            14 => Missing,
            _ => return None,
        })
    }
}

/// The control messages `Info` frames carry (JSON objects).
pub mod control {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Serialize};

    use super::WireError;

    /// Source to destination, after `Config` (post-copy modes): the mode and
    /// the token a reconnecting source presents.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Start {
        pub mode: String,
        pub token: String,
    }

    /// A reconnecting post-copy source: which migration it continues.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Resume {
        pub resume: String,
    }

    /// The destination's answer to [`Resume`]; `Missing` frames follow.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Resumed {
        pub resumed: bool,
        /// Pages the destination still lacks.
        pub missing: u64,
    }

    pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
        serde_json::to_vec(m).expect("control messages serialize")
    }

    pub fn decode<T: DeserializeOwned>(payload: &[u8], what: &'static str) -> Result<T, WireError> {
        serde_json::from_slice(payload).map_err(|_| WireError::Malformed(what))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the peer is not a migration endpoint (bad magic)")]
    BadMagic,
    #[error("the peer speaks protocol version {0}, this VMM speaks {VERSION}")]
    BadVersion(u32),
    #[error("the peer opened channel {got}, expected {expected}")]
    BadChannel { got: u32, expected: u32 },
    #[error("authentication failed: the peer does not hold the migration key")]
    AuthFailed,
    #[error("authentication failed: the peer rejected our key (do both sides use the same key file?)")]
    AuthRejected,
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    Oversized(u32),
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("frame out of order: expected sequence number {expected}, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("frame checksum mismatch (corrupted stream)")]
    Checksum,
    #[error("the stream ended in the middle of a frame")]
    Truncated,
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

/// A 32-byte shared secret.
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn new(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Derives a key from a passphrase or the contents of a key file.
    pub fn derive(material: &[u8]) -> Self {
        Self(blake3::derive_key("vmm migration key v1", material))
    }

    fn mac(&self, role: &[u8], a: &[u8; 32], b: &[u8; 32], channel: Channel) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(role);
        h.update(a);
        h.update(b);
        h.update(&(channel as u32).to_le_bytes());
        *h.finalize().as_bytes()
    }
}

fn random_nonce() -> io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    let mut filled = 0;
    while filled < n.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer.
        let r = unsafe { libc::getrandom(n[filled..].as_mut_ptr().cast(), n.len() - filled, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += r as usize;
    }
    Ok(n)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(buf)
        .map_err(|e| if e.kind() == io::ErrorKind::UnexpectedEof { WireError::Truncated } else { e.into() })
}

/// Reads a peer's hello, checking the magic as soon as it has arrived (a
/// stranger sending a few bytes of something else is told so at once).
fn read_hello(s: &mut impl Read, channel: Channel) -> Result<[u8; 32], WireError> {
    let mut b = [0u8; 48];
    read_exact(s, &mut b[..8])?;
    if b[..8] != MAGIC {
        return Err(WireError::BadMagic);
    }
    read_exact(s, &mut b[8..])?;
    check_hello(&b, channel)
}

fn check_hello(b: &[u8; 48], channel: Channel) -> Result<[u8; 32], WireError> {
    let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(WireError::BadVersion(version));
    }
    let ch = u32::from_le_bytes(b[12..16].try_into().unwrap());
    if ch != channel as u32 {
        return Err(WireError::BadChannel { got: ch, expected: channel as u32 });
    }
    Ok(b[16..48].try_into().unwrap())
}

fn hello(channel: Channel, nonce: &[u8; 32]) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(channel as u32).to_le_bytes());
    b[16..].copy_from_slice(nonce);
    b
}

/// Receiver side of the handshake (the destination, which accepted the connection).
pub fn accept_handshake(s: &mut (impl Read + Write), key: &Key, channel: Channel) -> Result<(), WireError> {
    let nd = random_nonce()?;
    s.write_all(&hello(channel, &nd))?;
    s.flush()?;
    let ns = read_hello(s, channel)?;
    let mut mac = [0u8; 32];
    read_exact(s, &mut mac)?;
    if !constant_time_eq(&mac, &key.mac(b"src", &nd, &ns, channel)) {
        return Err(WireError::AuthFailed);
    }
    s.write_all(&key.mac(b"dst", &ns, &nd, channel))?;
    s.flush()?;
    Ok(())
}

/// Sender side of the handshake (the source, which connected).
pub fn connect_handshake(s: &mut (impl Read + Write), key: &Key, channel: Channel) -> Result<(), WireError> {
    let nd = read_hello(s, channel)?;
    let ns = random_nonce()?;
    s.write_all(&hello(channel, &ns))?;
    s.write_all(&key.mac(b"src", &nd, &ns, channel))?;
    s.flush()?;
    let mut mac = [0u8; 32];
    // A receiver that cannot verify our MAC hangs up without a word.
    read_exact(s, &mut mac).map_err(|e| match e {
        WireError::Truncated => WireError::AuthRejected,
        WireError::Io(io) if io.kind() == io::ErrorKind::ConnectionReset => WireError::AuthRejected,
        other => other,
    })?;
    if !constant_time_eq(&mac, &key.mac(b"dst", &ns, &nd, channel)) {
        return Err(WireError::AuthFailed);
    }
    Ok(())
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn crc(kind: u16, flags: u16, len: u32, seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&kind.to_le_bytes());
    h.update(&flags.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Writes frames with increasing sequence numbers.
pub struct FrameWriter<W: Write> {
    inner: W,
    seq: u64,
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, seq: 0, bytes: 0 }
    }

    /// Continues a connection on which `next_seq` frames were written.
    pub fn with_seq(inner: W, next_seq: u64) -> Self {
        Self { inner, seq: next_seq, bytes: 0 }
    }

    /// The sequence number the next frame will carry.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Writes one frame whose payload is the concatenation of `parts`.
    pub fn send_parts(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), WireError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_PAYLOAD as usize {
            return Err(WireError::Oversized(len.min(u32::MAX as usize) as u32));
        }
        let len = len as u32;
        let mut h = crc32fast::Hasher::new();
        h.update(&(kind as u16).to_le_bytes());
        h.update(&0u16.to_le_bytes());
        h.update(&len.to_le_bytes());
        h.update(&self.seq.to_le_bytes());
        for p in parts {
            h.update(p);
        }
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0..2].copy_from_slice(&(kind as u16).to_le_bytes());
        hdr[4..8].copy_from_slice(&len.to_le_bytes());
        hdr[8..16].copy_from_slice(&self.seq.to_le_bytes());
        hdr[16..20].copy_from_slice(&h.finalize().to_le_bytes());
        self.inner.write_all(&hdr)?;
        for p in parts {
            self.inner.write_all(p)?;
        }
        self.seq += 1;
        self.bytes += HEADER_LEN as u64 + len as u64;
        Ok(())
    }

    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
        self.send_parts(kind, &[payload])
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        Ok(self.inner.flush()?)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// A received frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// Reads and validates frames.
pub struct FrameReader<R: Read> {
    inner: R,
    seq: u64,
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, seq: 0, bytes: 0 }
    }

    /// Continues a connection whose frames up to `next_seq` were read
    /// elsewhere (raw sections may sit between frames).
    pub fn with_seq(inner: R, next_seq: u64) -> Self {
        Self { inner, seq: next_seq, bytes: 0 }
    }

    /// The sequence number the next frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Reads the next frame. `Ok(None)` on a clean end of stream between frames.
    pub fn recv(&mut self) -> Result<Option<Frame>, WireError> {
        let mut hdr = [0u8; HEADER_LEN];
        // Distinguish a clean EOF before a frame from one inside it.
        let mut got = 0;
        while got < HEADER_LEN {
            match self.inner.read(&mut hdr[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(WireError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let raw_kind = u16::from_le_bytes([hdr[0], hdr[1]]);
        let flags = u16::from_le_bytes([hdr[2], hdr[3]]);
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let seq = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let sum = u32::from_le_bytes(hdr[16..20].try_into().unwrap());
        if len > MAX_PAYLOAD {
            return Err(WireError::Oversized(len));
        }
        let kind = Kind::from_u16(raw_kind).ok_or(WireError::UnknownKind(raw_kind))?;
        if seq != self.seq {
            return Err(WireError::OutOfOrder { expected: self.seq, got: seq });
        }
        let mut payload = vec![0u8; len as usize];
        read_exact(&mut self.inner, &mut payload)?;
        if crc(raw_kind, flags, len, seq, &payload) != sum {
            return Err(WireError::Checksum);
        }
        self.seq += 1;
        self.bytes += HEADER_LEN as u64 + len as u64;
        Ok(Some(Frame { kind, seq, payload }))
    }

    /// Reads the next frame, which must exist.
    pub fn expect(&mut self) -> Result<Frame, WireError> {
        self.recv()?.ok_or(WireError::Truncated)
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Page records in a [`Kind::Pages`] payload: `{u64 gpa, PAGE bytes}` (the page size is
/// `pager::PAGE_SIZE`, re-exported as `space::PAGE_SIZE`; wire sits below space).
pub const PAGE_RECORD: usize = 8 + pager::PAGE_SIZE as usize;

/// Iterates the `(gpa, page)` records of a Pages payload, validating its shape.
pub fn page_records(payload: &[u8]) -> Result<impl Iterator<Item = (u64, &[u8])>, WireError> {
    if payload.is_empty() || payload.len() % PAGE_RECORD != 0 {
        return Err(WireError::Malformed("pages"));
    }
    Ok(payload.chunks_exact(PAGE_RECORD).map(|r| (u64::from_le_bytes(r[..8].try_into().unwrap()), &r[8..])))
}

/// Decodes a payload of little-endian u64 values (requests, ranges).
pub fn u64s(payload: &[u8], what: &'static str) -> Result<Vec<u64>, WireError> {
    if payload.len() % 8 != 0 {
        return Err(WireError::Malformed(what));
    }
    Ok(payload.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn key(b: u8) -> Key {
        Key::new([b; 32])
    }

    /// Runs a handshake over a real TCP connection on loopback.
    fn handshake(
        dst_key: Key,
        src_key: Key,
        dst_ch: Channel,
        src_ch: Channel,
    ) -> (Result<(), WireError>, Result<(), WireError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept_handshake(&mut s, &dst_key, dst_ch)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let src = connect_handshake(&mut c, &src_key, src_ch);
        drop(c);
        (t.join().unwrap(), src)
    }

    #[test]
    fn control_messages_are_typed() {
        let m = control::Start { mode: "enlightened".into(), token: "t".into() };
        assert_eq!(control::decode::<control::Start>(&control::encode(&m), "start").unwrap(), m);
        assert!(matches!(
            control::decode::<control::Start>(b"{\"mode\": 1}", "start"),
            Err(WireError::Malformed("start"))
        ));
        assert!(control::decode::<control::Resume>(b"\xff", "resume").is_err());
    }

    #[test]
    fn handshake_authenticates_both_ways() {
        let (d, s) = handshake(key(1), key(1), Channel::Main, Channel::Main);
        assert!(d.is_ok() && s.is_ok(), "{d:?} {s:?}");
        let (d, s) = handshake(key(1), key(2), Channel::Main, Channel::Main);
        assert!(matches!(d, Err(WireError::AuthFailed)), "{d:?}");
        assert!(matches!(s, Err(WireError::AuthRejected)), "{s:?}");
        let (d, s) = handshake(key(1), key(1), Channel::Main, Channel::Demand);
        assert!(matches!(s, Err(WireError::BadChannel { got: 0, expected: 1 })), "{s:?}");
        assert!(d.is_err());
        assert_ne!(Key::derive(b"a").0, Key::derive(b"b").0);
    }

    #[test]
    fn strangers_and_old_versions_are_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..3 {
                let (mut s, _) = l.accept().unwrap();
                results.push(accept_handshake(&mut s, &key(1), Channel::Main));
            }
            results
        });
        // An HTTP client.
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let _ = c.read(&mut [0u8; 64]);
        drop(c);
        // Version 1 (before every message was a frame).
        let mut c = TcpStream::connect(addr).unwrap();
        let mut their = [0u8; 48];
        c.read_exact(&mut their).unwrap();
        let mut h = hello(Channel::Main, &[0; 32]);
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        c.write_all(&h).unwrap();
        c.write_all(&[0u8; 32]).unwrap();
        let _ = c.read(&mut [0u8; 64]);
        drop(c);
        // A peer that connects and hangs up.
        drop(TcpStream::connect(addr).unwrap());
        let r = t.join().unwrap();
        assert!(matches!(r[0], Err(WireError::BadMagic)), "{:?}", r[0]);
        assert!(matches!(r[1], Err(WireError::BadVersion(1))), "{:?}", r[1]);
        // Depending on timing the hang-up reads as EOF or as a reset.
        assert!(matches!(r[2], Err(WireError::Truncated) | Err(WireError::Io(_))), "{:?}", r[2]);
    }

    fn encode(frames: &[(Kind, &[u8])]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        for (k, p) in frames {
            w.send(*k, p).unwrap();
        }
        w.inner
    }

    #[test]
    fn frames_round_trip() {
        let page = [7u8; 4096];
        let mut w = FrameWriter::new(Vec::new());
        w.send(Kind::Config, b"{}").unwrap();
        w.send_parts(Kind::Pages, &[&0x1000u64.to_le_bytes(), &page]).unwrap();
        w.send(Kind::Complete, b"").unwrap();
        let bytes = w.inner;
        let mut r = FrameReader::new(&bytes[..]);
        assert_eq!(r.expect().unwrap().kind, Kind::Config);
        let f = r.expect().unwrap();
        let recs: Vec<_> = page_records(&f.payload).unwrap().collect();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].0, 0x1000);
        assert_eq!(recs[0].1, &page[..]);
        assert_eq!(r.expect().unwrap(), Frame { kind: Kind::Complete, seq: 2, payload: vec![] });
        assert!(r.recv().unwrap().is_none());
        assert_eq!(r.bytes, bytes.len() as u64);
    }

    #[test]
    fn bad_streams_are_rejected() {
        let good = encode(&[(Kind::Config, b"hello"), (Kind::Complete, b"")]);
        // Truncated at every point inside a frame.
        for cut in 1..good.len() {
            let mut r = FrameReader::new(&good[..cut]);
            let mut result = Ok(());
            for _ in 0..2 {
                match r.recv() {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let clean_boundary = cut == HEADER_LEN + 5;
            assert_eq!(result.is_err(), !clean_boundary, "cut at {cut}: {result:?}");
        }
        // Reordered: the second frame first.
        let split = HEADER_LEN + 5;
        let mut reordered = good[split..].to_vec();
        reordered.extend_from_slice(&good[..split]);
        assert!(matches!(FrameReader::new(&reordered[..]).recv(), Err(WireError::OutOfOrder { expected: 0, got: 1 })));
        // Oversized length.
        let mut big = good.clone();
        big[4..8].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(FrameReader::new(&big[..]).recv(), Err(WireError::Oversized(_))));
        // Unknown kind.
        let mut unk = good.clone();
        unk[0] = 0xee;
        assert!(matches!(FrameReader::new(&unk[..]).recv(), Err(WireError::UnknownKind(0xee))));
        // A flipped payload bit.
        let mut flip = good.clone();
        flip[HEADER_LEN + 1] ^= 0x20;
        assert!(matches!(FrameReader::new(&flip[..]).recv(), Err(WireError::Checksum)));
        // Garbage never panics.
        let mut x: u64 = 99;
        for _ in 0..2000 {
            let len = (x % 200) as usize;
            let g: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (x >> 56) as u8
                })
                .collect();
            let mut r = FrameReader::new(&g[..]);
            while let Ok(Some(_)) = r.recv() {}
        }
        // Malformed payloads.
        assert!(page_records(&[0u8; 100]).is_err());
        assert!(page_records(&[]).is_err());
        assert!(u64s(&[0u8; 7], "request").is_err());
        assert_eq!(u64s(&5u64.to_le_bytes(), "request").unwrap(), vec![5]);
        // The writer refuses to produce an oversized frame.
        let mut w = FrameWriter::new(Vec::new());
        let huge = vec![0u8; MAX_PAYLOAD as usize + 1];
        assert!(matches!(w.send(Kind::Pages, &huge), Err(WireError::Oversized(_))));
    }
}
