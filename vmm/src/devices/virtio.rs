//! virtio-mmio devices on the VMM's MMIO bus.

use std::path::Path;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAction, BusDevice};
use crate::memory::GuestMem;
use crate::vm::VmError;

type BlockTransport = virtio_devices::MmioTransport<virtio_devices::Block, GuestMem>;

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

/// A virtio-blk device backed by a raw image file, on virtio-mmio.
pub struct VirtioBlockHandle {
    transport: Arc<Mutex<BlockTransport>>,
}

impl VirtioBlockHandle {
    /// Opens `path` read-write and builds the device; `irq` is registered as
    /// the device's irqfd by the caller.
    pub fn new(path: &Path, mem: Arc<GuestMem>, irq: EventFd) -> Result<Self, VmError> {
        let block = virtio_devices::Block::open(path, false)
            .map_err(|e| VmError::Device(format!("disk {}: {e}", path.display())))?;
        let transport =
            virtio_devices::MmioTransport::new(block, mem, Arc::new(virtio_devices::EventFdInterrupt::new(irq)));
        Ok(Self { transport: Arc::new(Mutex::new(transport)) })
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

type EnlightenTransport = virtio_devices::MmioTransport<virtio_devices::enlighten::Enlighten, GuestMem>;

/// The enlightenment device (ID 63) on virtio-mmio, with its host API handle.
pub struct VirtioEnlightenHandle {
    transport: Arc<Mutex<EnlightenTransport>>,
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
        let transport = Arc::new(Mutex::new(virtio_devices::MmioTransport::new(
            dev,
            mem,
            Arc::new(virtio_devices::EventFdInterrupt::new(irq)),
        )));
        let weak = Arc::downgrade(&transport);
        handle.set_notifier(move || {
            if let Some(t) = weak.upgrade() {
                virtio_devices::enlighten::deliver(&mut t.lock().unwrap_or_else(|e| e.into_inner()));
            }
        });
        Self { transport, handle }
    }

    /// The host API of the device.
    pub fn handle(&self) -> &virtio_devices::enlighten::EnlightenHandle {
        &self.handle
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
