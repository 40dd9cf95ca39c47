//! virtio-mmio transport (version 2) and virtio devices (block).
//!
//! A [`MmioTransport`] owns a [`VirtioDevice`] and its queues and implements
//! the register interface the VMM's MMIO bus calls ([`MmioDevice`]). Queue
//! notifications are processed synchronously in the calling (vCPU) thread.
//!
//! Nothing the guest writes is trusted: registers are checked, ring and
//! buffer addresses are validated against guest memory (through
//! virtio-queue and vm-memory), lengths are bounded. Violations of the virtio
//! protocol put the device into DEVICE_NEEDS_RESET, are logged with the
//! device's name, and are counted ([`MmioTransport::guest_errors`]); the
//! device stays inert until the driver resets it. Errors the protocol lets a
//! device report (a bad sector, an I/O error) are reported to the driver.
//!
//! All guest memory writes go through vm-memory, so a dirty-tracking bitmap
//! on the guest memory records them (needed by pre-copy migration).

pub mod block;
pub mod mmio;

pub use block::Block;
pub use mmio::{MmioState, MmioTransport};

use std::io;

use virtio_queue::Queue;
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

/// What the VMM's MMIO bus calls; `offset` is relative to the device window.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Raises the device's interrupt.
pub trait Interrupt: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// An interrupt delivered through an eventfd registered as a KVM irqfd.
pub struct EventFdInterrupt(EventFd);

impl EventFdInterrupt {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A violation of the virtio protocol by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (including VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// Reads the device configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Processes what the driver made available on queue `index`. Returns
    /// whether buffers were used (the driver must be interrupted).
    fn process_queue<M: GuestMemory>(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, ProtocolError>;
    /// Forgets any per-session state (the driver reset the device).
    fn reset(&mut self) {}
    /// A short name for logs.
    fn name(&self) -> &str;
}
