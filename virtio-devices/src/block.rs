//! virtio-blk backed by a raw image file (VIRTIO 1.x, section 5.2).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};

use crate::{ProtocolError, VirtioDevice};

pub const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Largest data transfer of one request.
const MAX_REQUEST: u64 = 4 << 20;
const ID_LEN: usize = 20;

/// A virtio-blk device.
pub struct Block {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    name: String,
    queue_sizes: [u16; 1],
}

impl Block {
    /// Opens a raw image (read-write unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let len = file.metadata()?.len();
        let mut id = [0u8; ID_LEN];
        let stem = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let n = stem.len().min(ID_LEN);
        id[..n].copy_from_slice(&stem.as_bytes()[..n]);
        Ok(Self {
            file,
            sectors: len / SECTOR,
            read_only,
            id,
            name: format!("block({})", path.display()),
            queue_sizes: [QUEUE_SIZE],
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Handles one request; returns (status, bytes written into the chain).
    fn request<M: GuestMemory>(&mut self, mem: &M, descs: &[Descriptor]) -> Result<(u8, u32), ProtocolError> {
        // Shape: header (readable, >= 16 bytes), data..., status (writable).
        if descs.len() < 2 {
            return Err(ProtocolError(format!("request chain of {} descriptor(s), need at least 2", descs.len())));
        }
        let (hdr, rest) = descs.split_first().unwrap();
        let (status, data) = rest.split_last().unwrap();
        if hdr.is_write_only() || hdr.len() < 16 {
            return Err(ProtocolError("request header is device-writable or shorter than 16 bytes".into()));
        }
        if !status.is_write_only() || status.len() < 1 {
            return Err(ProtocolError("request status descriptor is not device-writable".into()));
        }
        for d in descs {
            let perm = if d.is_write_only() { Permissions::Write } else { Permissions::Read };
            if !mem.check_range(d.addr(), d.len() as usize, perm) {
                return Err(ProtocolError(format!(
                    "descriptor {:#x}+{:#x} is outside guest memory",
                    d.addr().0,
                    d.len()
                )));
            }
        }
        let mut h = [0u8; 16];
        mem.read_slice(&mut h, hdr.addr()).map_err(|e| ProtocolError(format!("reading request header: {e}")))?;
        let kind = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(h[8..16].try_into().unwrap());

        let total: u64 = data.iter().map(|d| d.len() as u64).sum();
        let (code, written) = match kind {
            T_IN | T_OUT => {
                let writable = kind == T_IN;
                if data.iter().any(|d| d.is_write_only() != writable) {
                    return Err(ProtocolError(format!(
                        "{} request with data buffers of the wrong direction",
                        if writable { "read" } else { "write" }
                    )));
                }
                if kind == T_OUT && self.read_only {
                    (S_IOERR, 0)
                } else {
                    self.transfer(mem, data, sector, total, writable)
                }
            }
            T_FLUSH => (if self.file.sync_data().is_ok() { S_OK } else { S_IOERR }, 0),
            T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = (d.len() as usize).min(ID_LEN);
                    match mem.write_slice(&self.id[..n], d.addr()) {
                        Ok(()) => (S_OK, n as u32),
                        Err(_) => (S_IOERR, 0),
                    }
                }
                _ => (S_IOERR, 0),
            },
            _ => (S_UNSUPP, 0),
        };
        mem.write_obj(code, status.addr()).map_err(|e| ProtocolError(format!("writing request status: {e}")))?;
        Ok((code, written + 1))
    }

    fn transfer<M: GuestMemory>(
        &mut self,
        mem: &M,
        data: &[Descriptor],
        sector: u64,
        total: u64,
        to_guest: bool,
    ) -> (u8, u32) {
        let in_range = sector
            .checked_mul(SECTOR)
            .and_then(|off| off.checked_add(total))
            .is_some_and(|end| end <= self.sectors * SECTOR);
        if total == 0 || total % SECTOR != 0 || total > MAX_REQUEST || !in_range {
            log::debug!("{}: rejecting request: sector {sector}, {total} bytes", self.name);
            return (S_IOERR, 0);
        }
        let mut off = sector * SECTOR;
        let mut buf = Vec::new();
        for d in data {
            buf.resize(d.len() as usize, 0);
            let ok = if to_guest {
                self.file.read_exact_at(&mut buf, off).is_ok() && mem.write_slice(&buf, d.addr()).is_ok()
            } else {
                mem.read_slice(&mut buf, d.addr()).is_ok() && self.file.write_all_at(&buf, off).is_ok()
            };
            if !ok {
                return (S_IOERR, 0);
            }
            off += d.len() as u64;
        }
        (S_OK, if to_guest { total as u32 } else { 0 })
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
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64) at 0; the rest reads as zero.
        let cfg = self.sectors.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue<M: GuestMemory>(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, ProtocolError> {
        let mut used = false;
        // At most one queue's worth per notification: bounded work.
        for _ in 0..queue.size() {
            let chain = {
                let mut iter = queue.iter(mem).map_err(|e| ProtocolError(format!("available ring: {e}")))?;
                iter.next()
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let (_status, len) = self.request(mem, &descs)?;
            queue.add_used(mem, head, len).map_err(|e| ProtocolError(format!("used ring: {e}")))?;
            used = true;
        }
        Ok(used)
    }

    fn name(&self) -> &str {
        &self.name
    }
}
