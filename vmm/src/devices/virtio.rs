//! virtio-mmio devices on the VMM's MMIO bus.

use std::path::Path;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAction, BusDevice};
use crate::error::VmError;
use crate::memory::GuestMem;

/// Puts any virtio-mmio transport on the bus.
struct OnBus<T>(Arc<Mutex<T>>);

impl<T: virtio_devices::MmioDevice> BusDevice for OnBus<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
        BusAction::None
    }
}

/// A virtio device on virtio-mmio: the transport shared with the MMIO bus,
/// and what the VMM needs of it (snapshots, error counts).
pub struct VirtioMmio<D: virtio_devices::VirtioDevice> {
    transport: Arc<Mutex<virtio_devices::MmioTransport<D, GuestMem>>>,
}

impl<D: virtio_devices::VirtioDevice + 'static> VirtioMmio<D> {
    /// Puts `device` behind a transport; `irq` is registered as the device's
    /// irqfd by the caller.
    pub fn new(device: D, mem: Arc<GuestMem>, irq: EventFd) -> Self {
        let interrupt = Arc::new(virtio_devices::EventFdInterrupt::new(irq));
        Self { transport: Arc::new(Mutex::new(virtio_devices::MmioTransport::new(device, mem, interrupt))) }
    }

    /// The device as a bus device.
    pub fn bus_device(&self) -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(OnBus(self.transport.clone())))
    }

    /// The transport's state, for snapshots.
    pub fn state(&self) -> virtio_devices::MmioState {
        self.transport.lock().unwrap_or_else(|e| e.into_inner()).state()
    }

    /// Restores a saved transport state.
    pub fn restore(&self, state: &virtio_devices::MmioState) -> Result<(), String> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner()).restore(state)
    }

    /// Guest-caused errors so far and the last message.
    pub fn errors(&self) -> (u64, Option<String>) {
        let t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        (t.guest_errors(), t.last_error().map(str::to_owned))
    }
}

/// A virtio-blk device backed by a raw image file.
pub type VirtioBlockHandle = VirtioMmio<virtio_devices::Block>;

impl VirtioBlockHandle {
    /// Opens `path` read-write and builds the device.
    pub fn open(path: &Path, mem: Arc<GuestMem>, irq: EventFd) -> Result<Self, VmError> {
        let block = virtio_devices::Block::open(path, false)
            .map_err(|e| VmError::Device(format!("disk {}: {e}", path.display())))?;
        Ok(Self::new(block, mem, irq))
    }

    /// `fdatasync`s the image (see [`virtio_devices::Block::sync_data`]).
    pub fn sync_data(&self) -> std::io::Result<()> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner()).device().sync_data()
    }

    /// Makes the disk lazily populated (see [`virtio_devices::block::Backfill`]).
    pub fn set_backfill(&self, b: Arc<dyn virtio_devices::block::Backfill>) {
        self.transport.lock().unwrap_or_else(|e| e.into_inner()).device_mut().set_backfill(b);
    }
}

/// The enlightenment device (ID 63) on virtio-mmio, with its host API handle.
pub struct VirtioEnlightenHandle {
    pub mmio: VirtioMmio<virtio_devices::enlighten::Enlighten>,
    handle: virtio_devices::enlighten::EnlightenHandle,
}

impl VirtioEnlightenHandle {
    /// Builds the device; `irq` is registered as its irqfd by the caller. A
    /// notifier delivers queued commands to buffers the driver posted long
    /// ago (lock order: transport, then the handle's state — the handle calls
    /// the notifier without its own lock held).
    pub fn new(mem: Arc<GuestMem>, irq: EventFd) -> Self {
        let dev = virtio_devices::enlighten::Enlighten::new();
        let handle = dev.handle();
        let mmio = VirtioMmio::new(dev, mem, irq);
        let weak = Arc::downgrade(&mmio.transport);
        handle.set_notifier(move || {
            if let Some(t) = weak.upgrade() {
                virtio_devices::enlighten::deliver(&mut t.lock().unwrap_or_else(|e| e.into_inner()));
            }
        });
        Self { mmio, handle }
    }

    /// The host API of the device.
    pub fn handle(&self) -> &virtio_devices::enlighten::EnlightenHandle {
        &self.handle
    }

    /// Delivers a queued command (e.g. one restored from a snapshot) if the
    /// driver has a buffer posted; returns whether one still waits.
    pub fn deliver_pending(&self) -> bool {
        virtio_devices::enlighten::deliver(&mut self.mmio.transport.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
