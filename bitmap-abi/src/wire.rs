// SPDX-License-Identifier: MIT OR GPL-2.0-only
//! Wire format of the enlightenment device, shared verbatim by the host
//! (crate `bitmap-abi`) and the guest kernel module (`guest-module/`, which
//! includes this file with `#[path]`). It must therefore depend on `core`
//! only, use no allocation, no `unsafe`, and stay compatible with the kernel's
//! Rust (edition 2021, rustc >= 1.78).
//!
//! # Device
//! A virtio device with ID [`DEVICE_ID`] and two virtqueues:
//! - queue [`CMD_QUEUE`]: the driver posts device-writable buffers; the host
//!   completes one with a command ([`Kind::Prepare`], [`Kind::Done`],
//!   [`Kind::Abort`]) when it wants something.
//! - queue [`REPLY_QUEUE`]: the driver posts device-readable buffers with its
//!   replies ([`Kind::Ready`], [`Kind::Ack`], [`Kind::Error`]).
//!
//! Every message starts with a [`Header`] carrying a magic, the ABI version,
//! the kind, a sequence number (a reply echoes its command's) and the payload
//! length. All integers are little-endian. Decoders check every length,
//! range and version and trust neither side.
//!
//! # Maps
//! The *free bitmap* has one bit per guest page frame (bit `pfn % 8` of byte
//! `pfn / 8`; 1 = free: the guest does not use the frame, its content does
//! not matter). The *priority map* has one 4-bit class per frame (low nibble
//! = even frame), values from [`Class`]. Both live in guest memory, described
//! by lists of guest-physical extents whose concatenation is the map.

/// Virtio device ID. VIRTIO 1.3 assigns IDs 1..=45; modern virtio-pci maps
/// an ID to PCI device ID 0x1040 + ID, and Linux's virtio_pci driver claims
/// 0x1000..=0x107f, so an ID must be <= 63 to be reachable over virtio-pci
/// (QEMU's `vhost-user-device-pci`). 63 is the last such ID, the farthest
/// from the spec's growing assignments.
pub const DEVICE_ID: u32 = 63;

/// Command queue index (host -> guest commands, in driver-posted buffers).
pub const CMD_QUEUE: u16 = 0;
/// Reply queue index (guest -> host replies).
pub const REPLY_QUEUE: u16 = 1;
/// Number of virtqueues.
pub const NUM_QUEUES: usize = 2;
/// Queue size both sides use.
pub const QUEUE_SIZE: u16 = 16;

/// Device feature: the guest can build the priority map.
pub const F_PRIORITY: u64 = 1 << 0;
/// Device feature: the guest can report free frames.
pub const F_FREE: u64 = 1 << 1;
/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// Features the device offers.
pub const DEVICE_FEATURES: u64 = F_PRIORITY | F_FREE | F_VERSION_1;

/// "EPCB" (enlightened post-copy bitmaps).
pub const MAGIC: u32 = u32::from_le_bytes(*b"EPCB");
/// ABI version; a peer with another version is refused.
pub const VERSION: u16 = 1;
/// Guest page size the maps describe.
pub const PAGE_SIZE: u64 = 4096;
/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most extents one map may be split into.
pub const MAX_EXTENTS: usize = 1024;
/// Largest guest the maps can describe (frames): 16 TiB of 4 KiB pages.
pub const MAX_FRAMES: u64 = 1 << 32;
/// Default activity window: processes scheduled within it are "active"
/// (16 s, thesis 5.3.1).
pub const DEFAULT_ACTIVE_WINDOW_MS: u32 = 16_000;

/// Byte offset of each device config field (little-endian).
pub mod config {
    /// u32: [`super::VERSION`] of the device's ABI.
    pub const ABI_VERSION: usize = 0;
    /// u32: reserved, zero.
    pub const RESERVED: usize = 4;
    /// Size of the config space.
    pub const SIZE: usize = 8;
}

/// Memory classes, highest priority first (thesis 5.3.1), and Free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Class {
    Kernel = 0,
    KernelAllocated = 1,
    MemoryIo = 2,
    PageTable = 3,
    UserCode = 4,
    UserData = 5,
    FileActive = 6,
    FileInactive = 7,
    Other = 8,
    /// Not in use by the guest: never transferred.
    Free = 9,
}

/// Number of classes.
pub const NUM_CLASSES: usize = 10;

impl Class {
    pub const ALL: [Class; NUM_CLASSES] = [
        Class::Kernel,
        Class::KernelAllocated,
        Class::MemoryIo,
        Class::PageTable,
        Class::UserCode,
        Class::UserData,
        Class::FileActive,
        Class::FileInactive,
        Class::Other,
        Class::Free,
    ];

    pub fn from_u8(v: u8) -> Option<Class> {
        Class::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Kernel => "kernel",
            Class::KernelAllocated => "kernel_allocated",
            Class::MemoryIo => "memory_io",
            Class::PageTable => "page_table",
            Class::UserCode => "user_code",
            Class::UserData => "user_data",
            Class::FileActive => "file_active",
            Class::FileInactive => "file_inactive",
            Class::Other => "other",
            Class::Free => "free",
        }
    }

    /// When a frame belongs to several classes, the highest priority wins.
    pub fn max_priority(self, other: Class) -> Class {
        if (other as u8) < (self as u8) {
            other
        } else {
            self
        }
    }
}

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Host -> guest: build the maps and hold free frames.
    Prepare = 1,
    /// Host -> guest: migration finished; release held frames.
    Done = 2,
    /// Host -> guest: migration abandoned; release held frames.
    Abort = 3,
    /// Guest -> host: maps ready (reply to Prepare).
    Ready = 0x81,
    /// Guest -> host: Done/Abort carried out.
    Ack = 0x82,
    /// Guest -> host: the command failed.
    Error = 0x83,
}

impl Kind {
    pub fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Prepare,
            2 => Kind::Done,
            3 => Kind::Abort,
            0x81 => Kind::Ready,
            0x82 => Kind::Ack,
            0x83 => Kind::Error,
            _ => return None,
        })
    }
}

/// Why a message or map was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than the layout needs.
    Truncated,
    /// More bytes than allowed.
    TooLong,
    BadMagic,
    BadVersion(u16),
    BadKind(u16),
    /// The header's payload length disagrees with the buffer.
    BadLength,
    /// A count, range or address is out of bounds.
    OutOfRange,
    /// A class value that does not exist.
    BadClass(u8),
    /// The output buffer is too small.
    NoSpace,
}

impl core::fmt::Display for WireError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            WireError::Truncated => write!(f, "message truncated"),
            WireError::TooLong => write!(f, "message too long"),
            WireError::BadMagic => write!(f, "bad magic"),
            WireError::BadVersion(v) => write!(f, "ABI version {v}, expected {VERSION}"),
            WireError::BadKind(k) => write!(f, "unknown message kind {k:#x}"),
            WireError::BadLength => write!(f, "payload length disagrees with the message size"),
            WireError::OutOfRange => write!(f, "a count, range or address is out of bounds"),
            WireError::BadClass(c) => write!(f, "unknown memory class {c}"),
            WireError::NoSpace => write!(f, "output buffer too small"),
        }
    }
}

fn rd_u16(b: &[u8], o: usize) -> Result<u16, WireError> {
    let s = b.get(o..o + 2).ok_or(WireError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn rd_u32(b: &[u8], o: usize) -> Result<u32, WireError> {
    let s = b.get(o..o + 4).ok_or(WireError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn rd_u64(b: &[u8], o: usize) -> Result<u64, WireError> {
    let s = b.get(o..o + 8).ok_or(WireError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn wr(b: &mut [u8], o: usize, v: &[u8]) -> Result<(), WireError> {
    b.get_mut(o..o + v.len()).ok_or(WireError::NoSpace)?.copy_from_slice(v);
    Ok(())
}

/// Every message's first [`Header::LEN`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub seq: u32,
    pub payload_len: u32,
}

impl Header {
    /// magic u32, version u16, kind u16, seq u32, payload_len u32.
    pub const LEN: usize = 16;

    pub fn encode(&self, out: &mut [u8]) -> Result<(), WireError> {
        wr(out, 0, &MAGIC.to_le_bytes())?;
        wr(out, 4, &VERSION.to_le_bytes())?;
        wr(out, 6, &(self.kind as u16).to_le_bytes())?;
        wr(out, 8, &self.seq.to_le_bytes())?;
        wr(out, 12, &self.payload_len.to_le_bytes())
    }

    /// Decodes the header of a complete message `msg` and checks that the
    /// payload length matches the message size exactly.
    pub fn decode(msg: &[u8]) -> Result<Header, WireError> {
        if msg.len() > MAX_MESSAGE {
            return Err(WireError::TooLong);
        }
        if rd_u32(msg, 0)? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = rd_u16(msg, 4)?;
        if version != VERSION {
            return Err(WireError::BadVersion(version));
        }
        let raw_kind = rd_u16(msg, 6)?;
        let kind = Kind::from_u16(raw_kind).ok_or(WireError::BadKind(raw_kind))?;
        let seq = rd_u32(msg, 8)?;
        let payload_len = rd_u32(msg, 12)?;
        if payload_len as usize != msg.len() - Header::LEN {
            return Err(WireError::BadLength);
        }
        Ok(Header { kind, seq, payload_len })
    }
}

/// Host -> guest: build the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepare {
    pub seq: u32,
    /// Processes scheduled within this window are active.
    pub active_window_ms: u32,
}

impl Prepare {
    pub const LEN: usize = Header::LEN + 8;

    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        Header { kind: Kind::Prepare, seq: self.seq, payload_len: 8 }.encode(out)?;
        wr(out, 16, &self.active_window_ms.to_le_bytes())?;
        wr(out, 20, &0u32.to_le_bytes())?;
        Ok(Self::LEN)
    }
}

/// A simple command or acknowledgement without payload (Done, Abort, Ack).
pub fn encode_simple(kind: Kind, seq: u32, out: &mut [u8]) -> Result<usize, WireError> {
    Header { kind, seq, payload_len: 0 }.encode(out)?;
    Ok(Header::LEN)
}

/// A decoded host -> guest command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Prepare(Prepare),
    Done { seq: u32 },
    Abort { seq: u32 },
}

impl Command {
    pub fn decode(msg: &[u8]) -> Result<Command, WireError> {
        let h = Header::decode(msg)?;
        match h.kind {
            Kind::Prepare => {
                if msg.len() != Prepare::LEN {
                    return Err(WireError::BadLength);
                }
                let window = rd_u32(msg, 16)?;
                if window == 0 || window > 3_600_000 {
                    return Err(WireError::OutOfRange);
                }
                Ok(Command::Prepare(Prepare { seq: h.seq, active_window_ms: window }))
            }
            Kind::Done | Kind::Abort if h.payload_len != 0 => Err(WireError::BadLength),
            Kind::Done => Ok(Command::Done { seq: h.seq }),
            Kind::Abort => Ok(Command::Abort { seq: h.seq }),
            other => Err(WireError::BadKind(other as u16)),
        }
    }
}

/// A guest-physical extent of a map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extent {
    pub gpa: u64,
    pub len: u64,
}

/// Fixed part of a Ready reply (after the header):
/// ```text
/// 0   u64 frames          frames covered by both maps (pfn 0..frames)
/// 8   u64 sweep_us        time to collect free frames
/// 16  u64 classify_us     time to build the priority map
/// 24  u32 free_extents    number of extents of the free bitmap
/// 28  u32 prio_extents    number of extents of the priority map
/// 32  NUM_CLASSES x u64   frames per class (Free = frames in the free bitmap)
/// 112 extents: free_extents + prio_extents x { u64 gpa, u64 len }
/// ```
pub const READY_FIXED: usize = 32 + NUM_CLASSES * 8;

/// Guest -> host: the maps are in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadyInfo {
    pub seq: u32,
    pub frames: u64,
    pub sweep_us: u64,
    pub classify_us: u64,
    pub class_counts: [u64; NUM_CLASSES],
    pub free_extents: u32,
    pub prio_extents: u32,
}

/// Bytes of a free bitmap covering `frames` frames.
pub fn free_bitmap_len(frames: u64) -> u64 {
    frames.div_ceil(8)
}

/// Bytes of a priority map covering `frames` frames.
pub fn priority_map_len(frames: u64) -> u64 {
    frames.div_ceil(2)
}

impl ReadyInfo {
    /// Encodes a Ready reply with the given extents into `out`; returns the
    /// message length.
    pub fn encode(&self, free: &[Extent], prio: &[Extent], out: &mut [u8]) -> Result<usize, WireError> {
        if free.len() != self.free_extents as usize || prio.len() != self.prio_extents as usize {
            return Err(WireError::OutOfRange);
        }
        let payload = READY_FIXED + (free.len() + prio.len()) * 16;
        if Header::LEN + payload > MAX_MESSAGE {
            return Err(WireError::TooLong);
        }
        Header { kind: Kind::Ready, seq: self.seq, payload_len: payload as u32 }.encode(out)?;
        let p = Header::LEN;
        wr(out, p, &self.frames.to_le_bytes())?;
        wr(out, p + 8, &self.sweep_us.to_le_bytes())?;
        wr(out, p + 16, &self.classify_us.to_le_bytes())?;
        wr(out, p + 24, &self.free_extents.to_le_bytes())?;
        wr(out, p + 28, &self.prio_extents.to_le_bytes())?;
        for (i, c) in self.class_counts.iter().enumerate() {
            wr(out, p + 32 + i * 8, &c.to_le_bytes())?;
        }
        for (i, e) in free.iter().chain(prio.iter()).enumerate() {
            wr(out, p + READY_FIXED + i * 16, &e.gpa.to_le_bytes())?;
            wr(out, p + READY_FIXED + i * 16 + 8, &e.len.to_le_bytes())?;
        }
        Ok(Header::LEN + payload)
    }

    /// Decodes and validates a Ready reply against the guest's memory size
    /// `guest_bytes`. Extents are checked to lie within `[0, guest_bytes)` and
    /// to add up exactly to the map sizes. `extent(i)` then returns each one.
    pub fn decode(msg: &[u8], guest_bytes: u64) -> Result<ReadyInfo, WireError> {
        let h = Header::decode(msg)?;
        if h.kind != Kind::Ready {
            return Err(WireError::BadKind(h.kind as u16));
        }
        let p = Header::LEN;
        let mut r = ReadyInfo {
            seq: h.seq,
            frames: rd_u64(msg, p)?,
            sweep_us: rd_u64(msg, p + 8)?,
            classify_us: rd_u64(msg, p + 16)?,
            free_extents: rd_u32(msg, p + 24)?,
            prio_extents: rd_u32(msg, p + 28)?,
            class_counts: [0; NUM_CLASSES],
        };
        for i in 0..NUM_CLASSES {
            r.class_counts[i] = rd_u64(msg, p + 32 + i * 8)?;
        }
        let max_frames = (guest_bytes / PAGE_SIZE).min(MAX_FRAMES);
        if r.frames == 0 || r.frames > max_frames {
            return Err(WireError::OutOfRange);
        }
        let n = r.free_extents as usize + r.prio_extents as usize;
        if r.free_extents == 0 || r.prio_extents == 0 || n > MAX_EXTENTS {
            return Err(WireError::OutOfRange);
        }
        if msg.len() != Header::LEN + READY_FIXED + n * 16 {
            return Err(WireError::BadLength);
        }
        let mut total: u64 = 0;
        for c in r.class_counts {
            total = total.checked_add(c).ok_or(WireError::OutOfRange)?;
        }
        if total > r.frames {
            return Err(WireError::OutOfRange);
        }
        let (mut free_sum, mut prio_sum) = (0u64, 0u64);
        for i in 0..n {
            let e = r.extent(msg, i)?;
            let end = e.gpa.checked_add(e.len).ok_or(WireError::OutOfRange)?;
            if e.len == 0 || end > guest_bytes {
                return Err(WireError::OutOfRange);
            }
            if i < r.free_extents as usize {
                free_sum += e.len;
            } else {
                prio_sum += e.len;
            }
        }
        if free_sum != free_bitmap_len(r.frames) || prio_sum != priority_map_len(r.frames) {
            return Err(WireError::OutOfRange);
        }
        Ok(r)
    }

    /// The `i`-th extent (free bitmap extents first, then priority map).
    pub fn extent(&self, msg: &[u8], i: usize) -> Result<Extent, WireError> {
        if i >= self.free_extents as usize + self.prio_extents as usize {
            return Err(WireError::OutOfRange);
        }
        let o = Header::LEN + READY_FIXED + i * 16;
        Ok(Extent { gpa: rd_u64(msg, o)?, len: rd_u64(msg, o + 8)? })
    }
}

/// Error codes in an Error reply.
pub mod error_code {
    /// Not enough memory for the maps.
    pub const NO_MEMORY: u32 = 1;
    /// A command arrived in the wrong state (e.g. Done without Prepare).
    pub const BAD_STATE: u32 = 2;
    /// The command could not be decoded.
    pub const BAD_COMMAND: u32 = 3;
    /// The guest backed off (memory pressure) before finishing.
    pub const BACKED_OFF: u32 = 4;
}

/// Guest -> host: an Error reply (u32 code, u32 reserved).
pub fn encode_error(seq: u32, code: u32, out: &mut [u8]) -> Result<usize, WireError> {
    Header { kind: Kind::Error, seq, payload_len: 8 }.encode(out)?;
    wr(out, 16, &code.to_le_bytes())?;
    wr(out, 20, &0u32.to_le_bytes())?;
    Ok(Header::LEN + 8)
}

/// Decodes an Error reply's code.
pub fn decode_error(msg: &[u8]) -> Result<(u32, u32), WireError> {
    let h = Header::decode(msg)?;
    if h.kind != Kind::Error {
        return Err(WireError::BadKind(h.kind as u16));
    }
    if h.payload_len != 8 {
        return Err(WireError::BadLength);
    }
    Ok((h.seq, rd_u32(msg, 16)?))
}

/// Reads a frame's bit in a free bitmap.
pub fn free_bit(map: &[u8], pfn: u64) -> Option<bool> {
    let byte = *map.get(usize::try_from(pfn / 8).ok()?)?;
    Some(byte & (1 << (pfn % 8)) != 0)
}

/// Sets a frame's bit in a free bitmap.
pub fn set_free_bit(map: &mut [u8], pfn: u64, free: bool) -> Result<(), WireError> {
    let i = usize::try_from(pfn / 8).map_err(|_| WireError::OutOfRange)?;
    let b = map.get_mut(i).ok_or(WireError::OutOfRange)?;
    if free {
        *b |= 1 << (pfn % 8);
    } else {
        *b &= !(1 << (pfn % 8));
    }
    Ok(())
}

/// Reads a frame's class in a priority map.
pub fn class_of(map: &[u8], pfn: u64) -> Result<Class, WireError> {
    let byte = *map.get(usize::try_from(pfn / 2).map_err(|_| WireError::OutOfRange)?).ok_or(WireError::OutOfRange)?;
    let v = if pfn % 2 == 0 { byte & 0xf } else { byte >> 4 };
    Class::from_u8(v).ok_or(WireError::BadClass(v))
}

/// Writes a frame's class in a priority map.
pub fn set_class(map: &mut [u8], pfn: u64, class: Class) -> Result<(), WireError> {
    let i = usize::try_from(pfn / 2).map_err(|_| WireError::OutOfRange)?;
    let b = map.get_mut(i).ok_or(WireError::OutOfRange)?;
    let v = class as u8;
    *b = if pfn % 2 == 0 { (*b & 0xf0) | v } else { (*b & 0x0f) | (v << 4) };
    Ok(())
}

/// Raises a frame's class to `class` if that is a higher priority than what
/// the map holds (the highest class wins).
pub fn raise_class(map: &mut [u8], pfn: u64, class: Class) -> Result<(), WireError> {
    let cur = class_of(map, pfn)?;
    set_class(map, pfn, cur.max_priority(class))
}
