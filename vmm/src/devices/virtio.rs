//! virtio-mmio devices on the VMM's MMIO bus.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
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

/// A virtio-net device on virtio-mmio over a TAP, with its receive thread:
/// it waits (epoll, edge-triggered) for the TAP to become readable or for a
/// wake-up, and then lets the device move frames into the guest's buffers.
pub struct VirtioNetHandle {
    pub mmio: VirtioMmio<virtio_devices::Net>,
    tap_name: String,
    mac: [u8; 6],
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    rx: Mutex<Option<JoinHandle<()>>>,
}

impl VirtioNetHandle {
    /// Opens the TAP `tap` and builds the device with `mac`; `irq` is
    /// registered as its irqfd by the caller. The receive thread starts with
    /// [`Self::start`] (when the VM runs).
    pub fn open(tap: &str, mac: [u8; 6], mem: Arc<GuestMem>, irq: EventFd) -> Result<Self, VmError> {
        let t = virtio_devices::Tap::open(tap).map_err(|e| VmError::Device(format!("net: TAP {tap}: {e}")))?;
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let mut dev = virtio_devices::Net::new(Arc::new(t), mac);
        dev.set_rx_wake(wake.try_clone()?);
        Ok(Self {
            mmio: VirtioMmio::new(dev, mem, irq),
            tap_name: tap.to_string(),
            mac,
            wake,
            stop: Arc::new(AtomicBool::new(false)),
            rx: Mutex::new(None),
        })
    }

    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, virtio_devices::MmioTransport<virtio_devices::Net, GuestMem>> {
        self.mmio.transport.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Traffic counters as JSON (for `status`).
    pub fn status_json(&self) -> serde_json::Value {
        let c = self.lock().device().counters();
        serde_json::json!({
            "tap": self.tap_name,
            "mac": virtio_devices::net::format_mac(self.mac),
            "rx_frames": c.rx_frames, "rx_bytes": c.rx_bytes, "rx_dropped": c.rx_dropped,
            "tx_frames": c.tx_frames, "tx_bytes": c.tx_bytes, "tx_dropped": c.tx_dropped,
            "guest_announces": c.announces, "guest_announce_acks": c.announce_acks,
        })
    }

    /// Starts the receive thread.
    pub fn start(&self) -> Result<(), VmError> {
        let epoll = Epoll::new()?;
        let tap_fd = self.lock().device().tap().as_raw_fd();
        epoll.ctl(ControlOperation::Add, tap_fd, EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0))?;
        epoll.ctl(ControlOperation::Add, self.wake.as_raw_fd(), EpollEvent::new(EventSet::IN, 1))?;
        let (transport, wake, stop) = (self.mmio.transport.clone(), self.wake.clone(), self.stop.clone());
        let name = format!("net-rx-{}", self.tap_name);
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            let mut events = [EpollEvent::default(); 2];
            while !stop.load(Ordering::Acquire) {
                match epoll.wait(-1, &mut events) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("net: receive thread: epoll: {e}; no more frames are received");
                        return;
                    }
                }
                let _ = wake.read();
                if stop.load(Ordering::Acquire) {
                    return;
                }
                loop {
                    let mut t = transport.lock().unwrap_or_else(|e| e.into_inner());
                    t.poll(virtio_devices::net::RX_QUEUE as u32);
                    if t.device().rx_stop() != virtio_devices::net::RxStop::Budget {
                        break;
                    }
                }
            }
        })?;
        *self.rx.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    /// While the VM is paused no frame moves into guest memory (this waits
    /// for a delivery in progress); frames wait in the TAP and arrive, in
    /// order and once each, after the VM resumes.
    pub fn quiesce(&self, on: bool) {
        self.lock().device_mut().set_quiesced(on);
        if !on {
            let _ = self.wake.write(1);
        }
    }

    /// Tells the network the guest is here now: RARP frames from its MAC
    /// into the TAP on QEMU's schedule (so bridges learn its new port), and
    /// a guest announcement (gratuitous ARP from the guest itself) where
    /// the driver supports one. Runs in its own thread.
    pub fn announce(&self) {
        let transport = self.mmio.transport.clone();
        let (tap, mac) = (self.tap_name.clone(), virtio_devices::net::format_mac(self.mac));
        let res = std::thread::Builder::new().name("net-announce".into()).spawn(move || {
            let start = std::time::Instant::now();
            let mut sent = 0;
            for (k, at) in virtio_devices::net::announce::SCHEDULE_MS.iter().enumerate() {
                let due = std::time::Duration::from_millis(*at);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                let mut t = transport.lock().unwrap_or_else(|e| e.into_inner());
                match t.device().announce_frame() {
                    Ok(()) => sent += 1,
                    Err(e) => log::debug!("net {tap}: announce frame: {e}"),
                }
                if k == 0 && t.device_mut().request_guest_announce() {
                    t.config_changed();
                    log::info!("net {tap}: asked the guest to announce {mac}");
                }
            }
            log::info!("net {tap}: announced {mac} ({sent} RARP frames)");
        });
        if let Err(e) = res {
            log::warn!("net {}: cannot start the announcement: {e}", self.tap_name);
        }
    }

    /// Guest-caused errors so far and the last message.
    pub fn errors(&self) -> (u64, Option<String>) {
        self.mmio.errors()
    }
}

impl Drop for VirtioNetHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(h) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}
