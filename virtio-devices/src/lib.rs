//! virtio-mmio transport (version 2, "modern") and virtio devices (block,
//! net over a TAP, and the enlightenment device of `bitmap-abi`, see [`enlighten`]).
//!
//! A [`MmioTransport`] owns a [`VirtioDevice`], its queues, the guest memory
//! and the device's [`Interrupt`], and implements the register interface the
//! VMM's MMIO bus calls ([`MmioDevice`]). Queue notifications are processed
//! synchronously in the calling (vCPU) thread.
//!
//! Nothing the guest writes is trusted: registers are checked, ring and
//! buffer addresses are validated against guest memory (through
//! virtio-queue and vm-memory), lengths are bounded, every loop is bounded.
//!
//! Two kinds of guest mistakes are distinguished:
//! - errors the virtio protocol lets a device report in-band (a bad sector,
//!   an unsupported request, a data buffer outside guest memory): the request
//!   completes with `VIRTIO_BLK_S_IOERR` / `VIRTIO_BLK_S_UNSUPP`;
//! - structural violations (bad rings, a chain whose status byte cannot be
//!   written, an available index jumping ahead, an invalid queue size): the
//!   device sets DEVICE_NEEDS_RESET, logs an `error!` naming the device, and
//!   does nothing more until the driver resets it.
//!
//! Both, as well as register misuse (odd-sized accesses, writes to read-only
//! registers, notifications of nonexistent queues), are counted in
//! [`MmioTransport::guest_errors`] with the last message in
//! [`MmioTransport::last_error`].
//!
//! All guest memory writes go through vm-memory, so a dirty-tracking bitmap
//! on the guest memory (`GuestMemoryMmap<AtomicBitmap>`) records them, which
//! pre-copy migration relies on.
//!
//! Wiring a disk onto the VMM's bus (see `vmm/src/devices/virtio.rs`):
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use vm_memory::{bitmap::AtomicBitmap, GuestAddress, GuestMemoryMmap};
//! # use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//! use virtio_devices::{Block, EventFdInterrupt, MmioDevice, MmioTransport};
//! # let mem = Arc::new(GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
//! let irq = EventFd::new(EFD_NONBLOCK).unwrap();
//! // vm_fd.register_irqfd(&irq, 5 + i)?;   // GSI VIRTIO_IRQ_BASE + i
//! let block = Block::open(std::path::Path::new("disk.img"), false).unwrap();
//! let transport = MmioTransport::new(block, mem, Arc::new(EventFdInterrupt::new(irq)));
//! let dev: Arc<Mutex<dyn MmioDevice>> = Arc::new(Mutex::new(transport));
//! // bus.insert(0xD000_0000 + i * 0x1000, 0x1000, dev)?;
//! ```

pub mod block;
pub mod enlighten;
pub mod mmio;
pub mod net;

pub use block::{Block, BlockCounters};
pub use enlighten::{Enlighten, EnlightenCounters, EnlightenError, EnlightenHandle, EnlightenState, Phase, Ready};
pub use mmio::{MmioState, MmioTransport};
pub use net::{Net, NetCounters, Tap};

use std::io;

use virtio_queue::Queue;
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

/// Virtio device status bits (VIRTIO 1.x, section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// virtio-mmio register offsets (VIRTIO 1.x, section 4.2.2).
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Device-specific configuration space starts here.
    pub const CONFIG: u64 = 0x100;

    /// "virt", little-endian.
    pub const MAGIC: u32 = 0x7472_6976;
}

/// Bits of the InterruptStatus register.
pub mod interrupt {
    /// The device used a buffer in at least one virtqueue.
    pub const USED_RING: u32 = 1;
    /// The configuration (or DEVICE_NEEDS_RESET) changed.
    pub const CONFIG_CHANGE: u32 = 2;
}

/// VIRTIO_F_VERSION_1: the only interface this crate implements.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What the VMM's MMIO bus calls on a `KVM_EXIT_MMIO`; `offset` is relative
/// to the device's window. Implementations never panic on any input.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Raises the device's interrupt.
pub trait Interrupt: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// An interrupt delivered through an eventfd that the VMM registered as a KVM
/// irqfd for the device's GSI.
pub struct EventFdInterrupt(EventFd);

impl EventFdInterrupt {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The eventfd (e.g. to register it as an irqfd after construction).
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A structural violation of the virtio protocol by the driver: the device
/// must be reset before it works again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

/// What one [`VirtioDevice::process_queue`] call did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Processed {
    /// Buffers were returned to the driver (it should be interrupted).
    pub used: bool,
    /// Requests that were malformed but could still be completed with an
    /// error status (counted as guest errors, the device keeps working).
    pub rejected: u64,
    /// Why the last of them was rejected.
    pub last_rejection: Option<String>,
}

/// A device behind a transport.
///
/// The transport owns the queues, the guest memory and the interrupt (so the
/// whole transport state is plain data, see [`MmioTransport::state`]) and
/// lends them to the device on each notification.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (each a power of two, at most 32768); the
    /// number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device configuration space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; ignored by default.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!("virtio {}: ignoring {}-byte config write at {offset:#x}", self.name(), data.len());
    }
    /// The driver set DRIVER_OK having negotiated `features` (a subset of
    /// [`Self::features`]). An error puts the device into DEVICE_NEEDS_RESET.
    fn activate(&mut self, features: u64) -> Result<(), ProtocolError> {
        let _ = features;
        Ok(())
    }
    /// Processes what the driver made available on queue `index`; all work
    /// must be bounded (at most one queue's worth of chains). An error is a
    /// structural violation: the transport sets DEVICE_NEEDS_RESET.
    fn process_queue<M: GuestMemory>(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Processed, ProtocolError>;
    /// Forgets any per-session state (the driver reset the device).
    fn reset(&mut self) {}
    /// A short name for logs, e.g. `virtio-blk(disk.img)`.
    fn name(&self) -> &str;
}

/// Copies `data.len()` bytes of a device configuration space `cfg` starting
/// at `offset`; bytes past its end (or an absurd offset) read as zero.
pub(crate) fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)).and_then(|o| cfg.get(o)).copied().unwrap_or(0);
    }
}

/// Collects the next available chain of `queue` into `descs` (at most
/// `max` descriptors); `None` when the ring is empty. A chain that is
/// empty, longer than `max` or truncated (a loop, a bad next index or
/// indirect table) is a structural violation.
pub(crate) fn next_chain<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    descs: &mut Vec<virtio_queue::desc::split::Descriptor>,
    max: usize,
) -> Result<Option<u16>, ProtocolError> {
    use virtio_queue::QueueOwnedT;
    let chain = {
        let mut iter = queue.iter(mem).map_err(|e| ProtocolError(format!("available ring: {e}")))?;
        iter.next()
    };
    let Some(chain) = chain else { return Ok(None) };
    let head = chain.head_index();
    descs.clear();
    descs.extend(chain.take(max + 1));
    if descs.len() > max {
        return Err(ProtocolError(format!("buffer {head}: descriptor chain longer than {max} descriptors")));
    }
    match descs.last() {
        None => Err(ProtocolError(format!("buffer {head}: empty descriptor chain"))),
        Some(d) if d.has_next() => Err(ProtocolError(format!(
            "buffer {head}: descriptor chain truncated after {} descriptors (loop, bad index or indirect table)",
            descs.len()
        ))),
        Some(_) => Ok(Some(head)),
    }
}
