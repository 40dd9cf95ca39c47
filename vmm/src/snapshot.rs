//! Snapshot files: the complete state of a paused VM.
//!
//! ```text
//! "VMMSNAP\0" | u32 version | u64 state_len | state (JSON) | BLAKE3(state)
//! then per RAM region, in order:
//!   u64 gpa | u64 len | page bitmap (1 bit per page: stored) | stored pages | BLAKE3(region section)
//! ```
//! The JSON state holds the VM configuration, KVM VM and vCPU state and the
//! device state. Pages that are entirely zero are not stored (a fresh
//! anonymous mapping reads as zero). Every section is checksummed; a
//! truncated, corrupted or foreign file is refused with a clear error before
//! anything is restored.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMem;
use crate::vstate::{VcpuState, VmState};

const MAGIC: &[u8; 8] = b"VMMSNAP\0";
/// Format version; files of another version are refused.
pub const VERSION: u32 = 1;
const PAGE: usize = migrate::space::PAGE_SIZE as usize;
/// Largest JSON state section accepted.
const MAX_STATE: u64 = 64 << 20;

/// The VM's shape, enough to rebuild it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotConfig {
    pub mem_size: u64,
    pub vcpus: u32,
    /// The testbed workload spec, if the guest is the testbed.
    pub testbed: Option<String>,
    pub disks: Vec<PathBuf>,
    /// The enlightenment device's virtio-mmio window and IRQ, if the VM has
    /// one (a restore or migration recreates it at the same place, where the
    /// guest's driver found it). Snapshots from before this field: `None`,
    /// and a testbed VM gets the device on the window after its disks.
    #[serde(default)]
    pub enlighten: Option<DeviceWindow>,
    /// The network devices: where each sits, its MAC (the guest's identity
    /// on the network, kept across a restore or migration) and the TAP it
    /// used (the default for a restore; a destination names its own).
    #[serde(default)]
    pub nets: Vec<NetConfig>,
}

/// One virtio-net device of a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetConfig {
    pub window: DeviceWindow,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub tap: String,
}

/// Where a virtio-mmio device sits: window base and legacy IRQ.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceWindow {
    pub base: u64,
    pub irq: u32,
}

/// vm-superio's serial state, mirrored for serde.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&vm_superio::SerialState> for SerialSnapshot {
    fn from(s: &vm_superio::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Device state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    /// Each virtio-blk transport's state, in `virtio_devices::MmioState`'s
    /// own versioned encoding.
    pub blocks: Vec<Vec<u8>>,
    /// The enlightenment device's transport state (testbed VMs), in the
    /// same encoding; `None` for VMs without the device.
    #[serde(default)]
    pub enlighten: Option<Vec<u8>>,
    /// The enlightenment protocol's state (phase, sequence numbers, the
    /// Ready reply while the guest holds its free frames), in
    /// `virtio_devices::enlighten::EnlightenState`'s encoding.
    #[serde(default)]
    pub enlighten_protocol: Option<Vec<u8>>,
    /// Each virtio-net transport's state (same encoding), in the order of
    /// [`SnapshotConfig::nets`].
    #[serde(default)]
    pub nets: Vec<Vec<u8>>,
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub config: SnapshotConfig,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: not a vmm snapshot (bad magic)")]
    BadMagic(PathBuf),
    #[error("{path}: snapshot format version {found}, this vmm reads version {VERSION}")]
    BadVersion { path: PathBuf, found: u32 },
    #[error("{0}: the snapshot is truncated")]
    Truncated(PathBuf),
    #[error("{path}: {what} checksum mismatch (the file is corrupted)")]
    Checksum { path: PathBuf, what: String },
    #[error("{path}: malformed snapshot: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{0}")]
    Other(String),
}

struct Hashing<W> {
    inner: W,
    hash: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hash.update(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a snapshot of a paused VM. Written to `path.tmp` and renamed, so
/// a failure (a full disk) never leaves a partial file under `path`.
pub fn write(path: &Path, snap: &Snapshot, mem: &GuestMem) -> Result<u64, SnapshotError> {
    let tmp = path.with_extension("tmp");
    let io_err = |source| SnapshotError::Io { path: path.to_owned(), source };
    let res = (|| -> io::Result<u64> {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let stored = write_stream(&mut w, snap, mem, &mut |_, _, page| page.iter().any(|&b| b != 0))?;
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(stored)
    })();
    match res {
        Ok(stored) => {
            std::fs::rename(&tmp, path).map_err(io_err)?;
            Ok(stored)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io_err(e))
        }
    }
}

/// Which pages a snapshot stream carries: `(region index, page index, page
/// content) -> include`. A file keeps the non-zero pages; the last step of a
/// pre-copy migration sends only the pages dirtied since its last round.
pub type PageFilter<'a> = dyn FnMut(usize, usize, &[u8]) -> bool + 'a;

/// Writes a snapshot to any stream (a file, a migration connection);
/// returns the number of pages stored.
pub fn write_stream<W: Write + ?Sized>(
    w: &mut W,
    snap: &Snapshot,
    mem: &GuestMem,
    include: &mut PageFilter,
) -> io::Result<u64> {
    write_stream_with(w, snap, mem, Some(include))
}

/// Writes a snapshot stream without any page (post-copy sends memory
/// afterwards); guest memory is not read.
pub fn write_state_only<W: Write + ?Sized>(w: &mut W, snap: &Snapshot, mem: &GuestMem) -> io::Result<u64> {
    write_stream_with(w, snap, mem, None)
}

fn write_stream_with<W: Write + ?Sized>(
    w: &mut W,
    snap: &Snapshot,
    mem: &GuestMem,
    mut include: Option<&mut PageFilter>,
) -> io::Result<u64> {
    {
        let state = serde_json::to_vec(snap).map_err(io::Error::other)?;
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(state.len() as u64).to_le_bytes())?;
        w.write_all(&state)?;
        w.write_all(blake3::hash(&state).as_bytes())?;
        let mut stored = 0u64;
        for (ri, region) in mem.iter().enumerate() {
            let len = region.len() as usize;
            let pages = len / PAGE;
            let base = region.start_addr();
            let mut h = Hashing { inner: &mut *w, hash: blake3::Hasher::new() };
            h.write_all(&base.raw_value().to_le_bytes())?;
            h.write_all(&(len as u64).to_le_bytes())?;
            // Bitmap of the included pages, then those pages.
            let mut bitmap = vec![0u8; pages.div_ceil(8)];
            let mut page = vec![0u8; PAGE];
            if let Some(include) = include.as_mut() {
                for p in 0..pages {
                    mem.read_slice(&mut page, base.unchecked_add((p * PAGE) as u64)).map_err(io::Error::other)?;
                    if include(ri, p, &page) {
                        bitmap[p / 8] |= 1 << (p % 8);
                    }
                }
            }
            h.write_all(&bitmap)?;
            for p in 0..pages {
                if bitmap[p / 8] & (1 << (p % 8)) != 0 {
                    mem.read_slice(&mut page, base.unchecked_add((p * PAGE) as u64)).map_err(io::Error::other)?;
                    h.write_all(&page)?;
                    stored += 1;
                }
            }
            let digest = h.hash.finalize();
            w.write_all(digest.as_bytes())?;
        }
        Ok(stored)
    }
}

/// An opened snapshot: the state is read and verified; memory follows.
pub struct SnapshotReader {
    path: PathBuf,
    r: Box<dyn Read + Send>,
    pub snapshot: Snapshot,
    /// Memory was already read (post-copy): `read_memory` does nothing.
    memory_read: bool,
}

fn read_exact(r: &mut impl Read, b: &mut [u8], path: &Path) -> Result<(), SnapshotError> {
    r.read_exact(b).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            SnapshotError::Truncated(path.to_owned())
        } else {
            SnapshotError::Io { path: path.to_owned(), source: e }
        }
    })
}

impl SnapshotReader {
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let f = File::open(path).map_err(|source| SnapshotError::Io { path: path.to_owned(), source })?;
        Self::from_stream(Box::new(BufReader::with_capacity(1 << 20, f)), path)
    }

    /// Reads a snapshot from a stream; `name` labels errors.
    pub fn from_stream(mut r: Box<dyn Read + Send>, name: &Path) -> Result<Self, SnapshotError> {
        let path = name;
        let mut magic = [0u8; 8];
        read_exact(&mut r, &mut magic, path)?;
        if &magic != MAGIC {
            return Err(SnapshotError::BadMagic(path.to_owned()));
        }
        let mut b4 = [0u8; 4];
        read_exact(&mut r, &mut b4, path)?;
        let found = u32::from_le_bytes(b4);
        if found != VERSION {
            return Err(SnapshotError::BadVersion { path: path.to_owned(), found });
        }
        let mut b8 = [0u8; 8];
        read_exact(&mut r, &mut b8, path)?;
        let len = u64::from_le_bytes(b8);
        if len > MAX_STATE {
            return Err(SnapshotError::Malformed { path: path.to_owned(), what: format!("state of {len} bytes") });
        }
        let mut state = vec![0u8; len as usize];
        read_exact(&mut r, &mut state, path)?;
        let mut digest = [0u8; 32];
        read_exact(&mut r, &mut digest, path)?;
        if blake3::hash(&state).as_bytes() != &digest {
            return Err(SnapshotError::Checksum { path: path.to_owned(), what: "state".into() });
        }
        let snapshot: Snapshot = serde_json::from_slice(&state)
            .map_err(|e| SnapshotError::Malformed { path: path.to_owned(), what: e.to_string() })?;
        if snapshot.vcpus.len() != snapshot.config.vcpus as usize {
            return Err(SnapshotError::Malformed { path: path.to_owned(), what: "vCPU count mismatch".into() });
        }
        Ok(Self { path: path.to_owned(), r, snapshot, memory_read: false })
    }

    /// A snapshot whose memory comes from elsewhere (an appliance streamed
    /// page by page): `read_memory` does nothing.
    pub fn from_state(snapshot: Snapshot, name: &Path) -> Result<Self, SnapshotError> {
        if snapshot.vcpus.len() != snapshot.config.vcpus as usize {
            return Err(SnapshotError::Malformed { path: name.to_owned(), what: "vCPU count mismatch".into() });
        }
        Ok(Self { path: name.to_owned(), r: Box::new(io::empty()), snapshot, memory_read: true })
    }

    /// Reads guest memory into `mem` (which must have the snapshot's
    /// layout), verifying every region's checksum.
    pub fn read_memory(mut self, mem: &GuestMem) -> Result<u64, SnapshotError> {
        self.read_memory_here(mem, &mut |_, _| {})
    }

    /// Reads the memory sections now and hands back the rest of the stream
    /// (a post-copy migration continues with frames after them); a later
    /// `read_memory` does nothing.
    /// `on_page(gpa, content)` sees every page written.
    pub fn read_memory_and_take_rest(
        &mut self,
        mem: &GuestMem,
        on_page: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(u64, Box<dyn Read + Send>), SnapshotError> {
        let n = self.read_memory_here(mem, on_page)?;
        self.memory_read = true;
        Ok((n, std::mem::replace(&mut self.r, Box::new(io::empty()))))
    }

    fn read_memory_here(&mut self, mem: &GuestMem, on_page: &mut dyn FnMut(u64, &[u8])) -> Result<u64, SnapshotError> {
        if self.memory_read {
            return Ok(0);
        }
        let path = self.path.clone();
        let bad = |what: String| SnapshotError::Malformed { path: path.clone(), what };
        let mut loaded = 0;
        for region in mem.iter() {
            let mut hash = blake3::Hasher::new();
            let mut b16 = [0u8; 16];
            read_exact(&mut self.r, &mut b16, &path)?;
            hash.update(&b16);
            let gpa = u64::from_le_bytes(b16[..8].try_into().unwrap());
            let len = u64::from_le_bytes(b16[8..].try_into().unwrap());
            if gpa != region.start_addr().raw_value() || len != region.len() {
                return Err(bad(format!("region {gpa:#x}+{len:#x} does not match the VM's memory layout")));
            }
            let pages = len as usize / PAGE;
            let mut bitmap = vec![0u8; pages.div_ceil(8)];
            read_exact(&mut self.r, &mut bitmap, &path)?;
            hash.update(&bitmap);
            let mut page = vec![0u8; PAGE];
            for p in 0..pages {
                if bitmap[p / 8] & (1 << (p % 8)) != 0 {
                    read_exact(&mut self.r, &mut page, &path)?;
                    hash.update(&page);
                    on_page(gpa + (p * PAGE) as u64, &page);
                    mem.write_slice(&page, GuestAddress(gpa + (p * PAGE) as u64))
                        .map_err(|e| SnapshotError::Other(format!("writing guest memory: {e}")))?;
                    loaded += 1;
                }
            }
            let mut digest = [0u8; 32];
            read_exact(&mut self.r, &mut digest, &path)?;
            if hash.finalize().as_bytes() != &digest {
                return Err(SnapshotError::Checksum { path, what: format!("memory region {gpa:#x}") });
            }
        }
        Ok(loaded)
    }
}
