//! virtio-blk backed by a raw image file (VIRTIO 1.x, section 5.2).
//!
//! Requests may use any descriptor layout (VIRTIO 1.x drivers need not split
//! header, data and status into separate descriptors): the header is the
//! first 16 device-readable bytes, write data the readable bytes after it,
//! read data the device-writable bytes except the last, and the status the
//! last device-writable byte. Data moves between the image and guest memory
//! with `pread`/`pwrite`-style volatile I/O through vm-memory (no bounce
//! buffer), so the guest memory's dirty bitmap records what the device wrote.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::Path;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, ReadVolatile, WriteVolatile};

use crate::{Processed, ProtocolError, VirtioDevice, VIRTIO_F_VERSION_1};

pub const VIRTIO_ID_BLOCK: u32 = 2;

pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the GET_ID string.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
pub const SECTOR_SIZE: u64 = 512;
/// Size of the (single) request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data segment (`size_max` in the configuration space).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request (`seg_max`): the queue minus header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data transfer of one request; larger ones fail with IOERR.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Most descriptors in one chain (an indirect table could otherwise be
/// 65535 long); longer chains are structural violations.
const MAX_CHAIN: usize = 1024;
const HEADER_LEN: u64 = 16;

/// Per-device request statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounters {
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Requests completed with VIRTIO_BLK_S_IOERR (host I/O errors and
    /// invalid requests).
    pub io_errors: u64,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupported: u64,
}

/// A contiguous piece of guest memory a chain refers to.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// The sub-range `[skip, skip + len)` of a list of segments.
fn sub_range(segs: &[Seg], mut skip: u64, mut len: u64) -> impl Iterator<Item = Seg> + '_ {
    segs.iter().filter_map(move |s| {
        if len == 0 {
            return None;
        }
        if skip >= s.len {
            skip -= s.len;
            return None;
        }
        let n = (s.len - skip).min(len);
        // Segments were checked to lie in guest memory, so this cannot overflow.
        let addr = s.addr.unchecked_add(skip);
        skip = 0;
        len -= n;
        Some(Seg { addr, len: n })
    })
}

/// A request rejected in-band: its status and why (for the guest error log).
struct Reject(u8, String);

/// Makes byte ranges of a lazily populated image present before the device
/// touches them (appliance streaming: the image is a sparse local overlay
/// whose missing chunks are fetched on first access). `for_write`: the range
/// is about to be written; chunks only partly overwritten must be fetched
/// first. Blocking here holds only the request (and its queue).
pub trait Backfill: Send + Sync {
    fn ensure(&self, offset: u64, len: u64, for_write: bool) -> std::io::Result<()>;
}

/// A virtio-blk device backed by a raw image file.
pub struct Block {
    file: File,
    backfill: Option<std::sync::Arc<dyn Backfill>>,
    sectors: u64,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    name: String,
    queue_sizes: [u16; 1],
    /// FLUSH negotiated: the driver flushes, writes may stay in the host page
    /// cache. Otherwise the driver assumes no write cache and every write is
    /// synced before it completes.
    write_back: bool,
    counters: BlockCounters,
    // Scratch lists reused across requests.
    descs: Vec<Descriptor>,
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    /// A device-readable descriptor followed a device-writable one.
    misordered: bool,
}

impl Block {
    /// Opens a raw image (read-write unless `read_only`). Its capacity is its
    /// length rounded down to 512-byte sectors; its serial (GET_ID) is the
    /// file name, truncated to 20 bytes.
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let serial = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self::from_file(file, read_only, &serial, &path.display().to_string())
    }

    /// Builds a device over an already open image; `label` names it in logs.
    pub fn from_file(file: File, read_only: bool, serial: &str, label: &str) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let mut b = Self {
            file,
            backfill: None,
            sectors: len / SECTOR_SIZE,
            read_only,
            id: [0; VIRTIO_BLK_ID_BYTES],
            name: format!("virtio-blk({label})"),
            queue_sizes: [QUEUE_SIZE],
            write_back: false,
            counters: BlockCounters::default(),
            descs: Vec::new(),
            readable: Vec::new(),
            writable: Vec::new(),
            misordered: false,
        };
        b.set_serial(serial);
        Ok(b)
    }

    /// Populates ranges through `b` before every transfer (see [`Backfill`]).
    pub fn set_backfill(&mut self, b: std::sync::Arc<dyn Backfill>) {
        self.backfill = Some(b);
    }

    fn backfill(&mut self, sector: u64, len: u64, for_write: bool) -> Result<(), Reject> {
        let Some(b) = &self.backfill else { return Ok(()) };
        b.ensure(sector * SECTOR_SIZE, len, for_write)
            .map_err(|e| self.io_error(format!("fetching {len} bytes at sector {sector}: {e}")))
    }

    /// Sets the GET_ID string (truncated to 20 bytes, NUL-padded).
    pub fn set_serial(&mut self, serial: &str) {
        self.id = [0; VIRTIO_BLK_ID_BYTES];
        let n = serial.len().min(VIRTIO_BLK_ID_BYTES);
        self.id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    }

    /// The GET_ID string, without padding.
    pub fn serial(&self) -> &[u8] {
        let n = self.id.iter().position(|&b| b == 0).unwrap_or(VIRTIO_BLK_ID_BYTES);
        &self.id[..n]
    }

    /// Capacity in 512-byte sectors.
    /// Flushes everything written to the image to stable storage
    /// (`fdatasync`): before a paused VM's state leaves for another host
    /// that opens the same (shared) image.
    pub fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// The configuration space (struct virtio_blk_config, first 24 bytes:
    /// capacity, size_max, seg_max, geometry (zero), blk_size).
    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// Sorts the collected chain into readable and writable segments and
    /// finds the status byte. An error is a structural violation.
    fn shape<M: GuestMemory>(&mut self, mem: &M) -> Result<GuestAddress, String> {
        self.readable.clear();
        self.writable.clear();
        self.misordered = false;
        let Some(last) = self.descs.last() else {
            return Err("empty descriptor chain (head index out of range or unreadable)".into());
        };
        if last.has_next() {
            return Err(format!(
                "descriptor chain truncated after {} descriptors (loop, next index out of range, \
                 bad indirect table or unreadable descriptor)",
                self.descs.len()
            ));
        }
        if !last.is_write_only() || last.len() == 0 {
            return Err("last descriptor of the chain is not a device-writable status byte".into());
        }
        let status = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .filter(|&a| mem.check_range(a, 1, Permissions::Write))
            .ok_or_else(|| format!("status byte at {:#x}+{:#x} is outside guest memory", last.addr().0, last.len()))?;
        for d in &self.descs {
            let seg = Seg { addr: d.addr(), len: u64::from(d.len()) };
            if d.is_write_only() {
                self.writable.push(seg);
            } else {
                self.misordered |= !self.writable.is_empty();
                self.readable.push(seg);
            }
        }
        // The status byte is not data.
        if let Some(s) = self.writable.last_mut() {
            s.len -= 1;
        }
        Ok(status)
    }

    /// Handles the collected chain; returns (status, bytes written into the
    /// chain excluding the status byte), or why the request is rejected.
    fn handle<M: GuestMemory>(&mut self, mem: &M) -> Result<u32, Reject> {
        if self.misordered {
            return Err(Reject(VIRTIO_BLK_S_IOERR, "device-readable descriptor after a device-writable one".into()));
        }
        // Every buffer must lie in guest memory (the status byte was checked).
        for (segs, perm) in [(&self.readable, Permissions::Read), (&self.writable, Permissions::Write)] {
            for s in segs.iter().filter(|s| s.len > 0) {
                if !mem.check_range(s.addr, s.len as usize, perm) {
                    return Err(Reject(
                        VIRTIO_BLK_S_IOERR,
                        format!("buffer {:#x}+{:#x} is outside guest memory", s.addr.0, s.len),
                    ));
                }
            }
        }
        let readable_len: u64 = self.readable.iter().map(|s| s.len).sum();
        let writable_len: u64 = self.writable.iter().map(|s| s.len).sum();
        if readable_len < HEADER_LEN {
            return Err(Reject(VIRTIO_BLK_S_IOERR, format!("request header is {readable_len} bytes, need 16")));
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        let mut off = 0usize;
        for s in sub_range(&self.readable, 0, HEADER_LEN) {
            let n = s.len as usize;
            mem.read_slice(&mut hdr[off..off + n], s.addr)
                .map_err(|e| Reject(VIRTIO_BLK_S_IOERR, format!("reading request header: {e}")))?;
            off += n;
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
        let out_len = readable_len - HEADER_LEN;

        match kind {
            VIRTIO_BLK_T_IN => {
                if out_len != 0 {
                    return Err(Reject(VIRTIO_BLK_S_IOERR, "read request with device-readable data".into()));
                }
                self.check_range(sector, writable_len)?;
                self.read_to_guest(mem, sector, writable_len)?;
                self.counters.reads += 1;
                self.counters.read_bytes += writable_len;
                Ok(writable_len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if writable_len != 0 {
                    return Err(Reject(VIRTIO_BLK_S_IOERR, "write request with device-writable data".into()));
                }
                if self.read_only {
                    log::debug!("{}: write to read-only disk rejected", self.name);
                    self.counters.io_errors += 1;
                    return Err(Reject(VIRTIO_BLK_S_IOERR, String::new()));
                }
                self.check_range(sector, out_len)?;
                self.write_from_guest(mem, sector, out_len)?;
                self.counters.writes += 1;
                self.counters.written_bytes += out_len;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.counters.flushes += 1;
                self.file.sync_data().map_err(|e| self.io_error(format!("flush: {e}")))?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writable_len.min(VIRTIO_BLK_ID_BYTES as u64);
                let mut off = 0usize;
                for s in sub_range(&self.writable, 0, n) {
                    let len = s.len as usize;
                    mem.write_slice(&self.id[off..off + len], s.addr)
                        .map_err(|e| Reject(VIRTIO_BLK_S_IOERR, format!("writing device ID: {e}")))?;
                    off += len;
                }
                Ok(n as u32)
            }
            _ => {
                log::debug!("{}: unsupported request type {kind}", self.name);
                self.counters.unsupported += 1;
                Err(Reject(VIRTIO_BLK_S_UNSUPP, String::new()))
            }
        }
    }

    /// A host-side I/O error (not the guest's fault).
    fn io_error(&mut self, msg: String) -> Reject {
        log::warn!("{}: {msg}", self.name);
        self.counters.io_errors += 1;
        Reject(VIRTIO_BLK_S_IOERR, String::new())
    }

    /// Checks a transfer of `len` bytes at `sector` (in-band IOERR, not a
    /// guest error: the spec lets drivers learn about bad sectors this way).
    fn check_range(&mut self, sector: u64, len: u64) -> Result<(), Reject> {
        let end = sector.checked_mul(SECTOR_SIZE).and_then(|off| off.checked_add(len));
        let ok = len != 0
            && len % SECTOR_SIZE == 0
            && len <= MAX_REQUEST_BYTES
            && end.is_some_and(|end| end <= self.sectors * SECTOR_SIZE);
        if ok {
            return Ok(());
        }
        log::debug!("{}: rejecting transfer of {len} bytes at sector {sector} (capacity {})", self.name, self.sectors);
        self.counters.io_errors += 1;
        Err(Reject(VIRTIO_BLK_S_IOERR, String::new()))
    }

    fn read_to_guest<M: GuestMemory>(&mut self, mem: &M, sector: u64, len: u64) -> Result<(), Reject> {
        self.backfill(sector, len, false)?;
        let mut file = &self.file;
        let res = file.seek(SeekFrom::Start(sector * SECTOR_SIZE)).map_err(|e| e.to_string()).and_then(|_| {
            for s in sub_range(&self.writable, 0, len) {
                let slices = mem.get_slices(s.addr, s.len as usize, Permissions::Write).map_err(|e| e.to_string())?;
                for slice in slices {
                    let mut slice = slice.map_err(|e| e.to_string())?;
                    file.read_exact_volatile(&mut slice).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        });
        res.map_err(|e| self.io_error(format!("reading {len} bytes at sector {sector}: {e}")))
    }

    fn write_from_guest<M: GuestMemory>(&mut self, mem: &M, sector: u64, len: u64) -> Result<(), Reject> {
        self.backfill(sector, len, true)?;
        let mut file = &self.file;
        let res = file.seek(SeekFrom::Start(sector * SECTOR_SIZE)).map_err(|e| e.to_string()).and_then(|_| {
            for s in sub_range(&self.readable, HEADER_LEN, len) {
                let slices = mem.get_slices(s.addr, s.len as usize, Permissions::Read).map_err(|e| e.to_string())?;
                for slice in slices {
                    let slice = slice.map_err(|e| e.to_string())?;
                    file.write_all_volatile(&slice).map_err(|e| e.to_string())?;
                }
            }
            if !self.write_back {
                file.sync_data().map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        res.map_err(|e| self.io_error(format!("writing {len} bytes at sector {sector}: {e}")))
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config();
        crate::read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, features: u64) -> Result<(), ProtocolError> {
        self.write_back = features & VIRTIO_BLK_F_FLUSH != 0;
        Ok(())
    }

    fn process_queue<M: GuestMemory>(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Processed, ProtocolError> {
        let mut out = Processed::default();
        // At most one queue's worth per notification: bounded work. The
        // available index cannot be more than a queue's worth ahead
        // (virtio-queue checks), so nothing is left behind.
        for _ in 0..queue.size() {
            let chain = {
                let mut iter = queue.iter(mem).map_err(|e| ProtocolError(format!("available ring: {e}")))?;
                iter.next()
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            self.descs.clear();
            self.descs.extend(chain.take(MAX_CHAIN + 1));
            if self.descs.len() > MAX_CHAIN {
                return Err(ProtocolError(format!("descriptor chain longer than {MAX_CHAIN} descriptors")));
            }
            let status_addr = self.shape(mem).map_err(|m| ProtocolError(format!("request {head}: {m}")))?;
            self.counters.requests += 1;
            let (status, len) = match self.handle(mem) {
                Ok(len) => (VIRTIO_BLK_S_OK, len),
                Err(Reject(status, why)) => {
                    if !why.is_empty() {
                        if status == VIRTIO_BLK_S_IOERR {
                            self.counters.io_errors += 1;
                        }
                        out.rejected += 1;
                        out.last_rejection = Some(format!("request {head}: {why}"));
                    }
                    (status, 0)
                }
            };
            mem.write_obj(status, status_addr)
                .map_err(|e| ProtocolError(format!("request {head}: writing status: {e}")))?;
            queue
                .add_used(mem, head, len.saturating_add(1))
                .map_err(|e| ProtocolError(format!("request {head}: used ring: {e}")))?;
            out.used = true;
        }
        Ok(out)
    }

    fn reset(&mut self) {
        self.write_back = false;
    }

    fn name(&self) -> &str {
        &self.name
    }
}
