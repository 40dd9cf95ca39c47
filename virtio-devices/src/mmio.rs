//! The virtio-mmio register interface, version 2 (VIRTIO 1.x, section 4.2.2).

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::regs::*;
use crate::status::*;
use crate::{interrupt, Interrupt, MmioDevice, ProtocolError, VirtioDevice, VIRTIO_F_VERSION_1};

/// VendorID register: "VMMU" (no PCI vendor; any value is allowed).
pub const VENDOR_ID_VALUE: u32 = 0x554d_4d56;
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
const STATUS_DRIVER_BITS: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED;
/// How many guest errors are logged in full before logging only every
/// power of two (a hostile driver can cause them at will).
const LOG_FIRST: u64 = 16;

/// Plain-data state of a transport and its queues (for snapshots and
/// migration). The device's own state (e.g. which image a disk uses) is the
/// VMM's configuration; the guest error counters are host-side statistics
/// and not part of it. `virtio_queue::QueueState` is plain data too (all
/// fields public); [`MmioState::encode`] gives a byte encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MmioState {
    /// Status bits set by the driver (DEVICE_NEEDS_RESET is `needs_reset`).
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueState>,
}

/// "VMMIO001": leads an encoded [`MmioState`].
const STATE_MAGIC: u64 = u64::from_le_bytes(*b"VMMIO001");
/// Most queues an encoded state may describe.
const MAX_STATE_QUEUES: usize = 1024;
const QUEUE_ENCODED_LEN: usize = 34;

impl MmioState {
    /// Encodes the state as little-endian plain data (versioned by a magic).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(56 + self.queues.len() * QUEUE_ENCODED_LEN);
        b.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        for v in [self.status, self.device_features_sel, self.driver_features_sel] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.driver_features.to_le_bytes());
        for v in [self.queue_sel, self.interrupt_status, self.config_generation] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(self.needs_reset as u8);
        b.extend_from_slice(&(self.queues.len() as u16).to_le_bytes());
        for q in &self.queues {
            for v in [q.max_size, q.size, q.next_avail, q.next_used] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            for v in [q.desc_table, q.avail_ring, q.used_ring] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.push(q.ready as u8);
            b.push(q.event_idx_enabled as u8);
        }
        b
    }

    /// Decodes [`Self::encode`]'s output. Only the encoding is checked here;
    /// [`MmioTransport::restore`] validates the values.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        struct R<'a>(&'a [u8]);
        impl R<'_> {
            fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
                if self.0.len() < N {
                    return Err("truncated".into());
                }
                let (a, rest) = self.0.split_at(N);
                self.0 = rest;
                let mut out = [0u8; N];
                out.copy_from_slice(a);
                Ok(out)
            }
            fn u16(&mut self) -> Result<u16, String> {
                self.take().map(u16::from_le_bytes)
            }
            fn u32(&mut self) -> Result<u32, String> {
                self.take().map(u32::from_le_bytes)
            }
            fn u64(&mut self) -> Result<u64, String> {
                self.take().map(u64::from_le_bytes)
            }
            fn bool(&mut self) -> Result<bool, String> {
                match self.take::<1>()?[0] {
                    0 => Ok(false),
                    1 => Ok(true),
                    v => Err(format!("boolean {v}")),
                }
            }
        }
        let mut r = R(b);
        if r.u64()? != STATE_MAGIC {
            return Err("bad magic".into());
        }
        let mut s = MmioState {
            status: r.u32()?,
            device_features_sel: r.u32()?,
            driver_features_sel: r.u32()?,
            driver_features: r.u64()?,
            queue_sel: r.u32()?,
            interrupt_status: r.u32()?,
            config_generation: r.u32()?,
            needs_reset: r.bool()?,
            queues: Vec::new(),
        };
        let n = r.u16()? as usize;
        if n > MAX_STATE_QUEUES || r.0.len() != n * QUEUE_ENCODED_LEN {
            return Err(format!("{n} queues in {} bytes", r.0.len()));
        }
        for _ in 0..n {
            let (max_size, size, next_avail, next_used) = (r.u16()?, r.u16()?, r.u16()?, r.u16()?);
            let (desc_table, avail_ring, used_ring) = (r.u64()?, r.u64()?, r.u64()?);
            let (ready, event_idx_enabled) = (r.bool()?, r.bool()?);
            s.queues.push(QueueState {
                max_size,
                size,
                ready,
                desc_table,
                avail_ring,
                used_ring,
                next_avail,
                next_used,
                event_idx_enabled,
            });
        }
        Ok(s)
    }
}

/// A virtio device on the virtio-mmio transport (version 2).
pub struct MmioTransport<D: VirtioDevice, M: GuestMemory> {
    device: D,
    mem: Arc<M>,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    driver_features_invalid: bool,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    needs_reset: bool,
    guest_errors: u64,
    last_error: Option<String>,
}

fn new_queues(name: &str, max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&max| {
            Queue::new(max).unwrap_or_else(|_| {
                log::error!("virtio {name}: invalid queue size {max} (device bug); using 1");
                // 1 is a power of two: this cannot fail.
                Queue::new(1).unwrap_or_else(|_| unreachable!())
            })
        })
        .collect()
}

impl<D: VirtioDevice, M: GuestMemory + Send + Sync + 'static> MmioTransport<D, M> {
    /// Puts `device` on a virtio-mmio transport. `interrupt` is raised when
    /// buffers are used and when the device needs a reset after DRIVER_OK.
    pub fn new(device: D, mem: Arc<M>, interrupt: Arc<dyn Interrupt>) -> Self {
        let queues = new_queues(device.name(), device.queue_max_sizes());
        Self {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_invalid: false,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            needs_reset: false,
            guest_errors: 0,
            last_error: None,
        }
    }

    /// Restores a [`Self::state`] into this transport (e.g. on a migration
    /// destination: a fresh transport over the same image and the restored
    /// guest memory). The state is untrusted and validated first; on error
    /// nothing changes. If the driver had activated the device it is
    /// activated again; an enabled queue whose rings are not in guest memory
    /// puts the device into DEVICE_NEEDS_RESET (as it would have on the
    /// source). Guest error counters are not part of the state.
    pub fn restore(&mut self, s: &MmioState) -> Result<(), String> {
        let name = self.device.name();
        let max_sizes = self.device.queue_max_sizes();
        if s.queues.len() != max_sizes.len() {
            return Err(format!("{name}: state has {} queues, the device has {}", s.queues.len(), max_sizes.len()));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (q, &max)) in s.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != max {
                return Err(format!("{name}: queue {i}: max size {} in state, {max} in the device", q.max_size));
            }
            queues.push(Queue::try_from(*q).map_err(|e| format!("{name}: queue {i}: {e}"))?);
        }
        if s.status & !STATUS_DRIVER_BITS != 0 {
            return Err(format!("{name}: invalid status {:#x}", s.status));
        }
        let unsupported = s.driver_features & !self.device.features();
        if s.status & FEATURES_OK != 0 && (unsupported != 0 || s.driver_features & VIRTIO_F_VERSION_1 == 0) {
            return Err(format!("{name}: negotiated features {:#x} not offered by the device", s.driver_features));
        }
        self.device.reset();
        self.queues = queues;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.driver_features_invalid = false;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status & (interrupt::USED_RING | interrupt::CONFIG_CHANGE);
        self.config_generation = s.config_generation;
        self.needs_reset = s.needs_reset;
        if self.status & DRIVER_OK != 0 && !self.needs_reset {
            if let Some(msg) = self.invalid_queue() {
                self.violation(true, format!("restored {msg}"));
            } else if let Err(e) = self.device.activate(self.driver_features) {
                self.violation(true, format!("activation of the restored device failed: {e}"));
            }
        }
        Ok(())
    }

    /// The transport's state as plain data (see [`Self::restore`]).
    pub fn state(&self) -> MmioState {
        MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            needs_reset: self.needs_reset,
            queues: self.queues.iter().map(|q| q.state()).collect(),
        }
    }

    /// Guest errors so far (protocol violations, malformed requests, register
    /// misuse); cumulative across device resets.
    pub fn guest_errors(&self) -> u64 {
        self.guest_errors
    }

    /// The last guest error, prefixed with the device's name.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Whether the device is in DEVICE_NEEDS_RESET (inert until the driver
    /// writes 0 to Status).
    pub fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    /// Whether the driver has activated the device (DRIVER_OK) and it works.
    pub fn is_active(&self) -> bool {
        self.status & (DRIVER_OK | FAILED) == DRIVER_OK && !self.needs_reset
    }

    /// The driver features (valid once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Records a guest error. `fatal` ones (structural protocol violations)
    /// put the device into DEVICE_NEEDS_RESET until the driver resets it.
    fn violation(&mut self, fatal: bool, msg: String) {
        let msg = format!("{}: {msg}", self.device.name());
        self.guest_errors = self.guest_errors.saturating_add(1);
        let n = self.guest_errors;
        if n <= LOG_FIRST || n.is_power_of_two() {
            if fatal {
                log::error!("virtio {msg}; device needs reset [guest error #{n}]");
            } else {
                log::warn!("virtio {msg} [guest error #{n}]");
            }
        }
        self.last_error = Some(msg);
        if fatal && !self.needs_reset {
            self.needs_reset = true;
            if self.status & DRIVER_OK != 0 {
                // VIRTIO 1.x 2.1.2: a device that sets DEVICE_NEEDS_RESET after
                // DRIVER_OK sends a configuration change notification.
                self.interrupt_status |= interrupt::CONFIG_CHANGE;
                self.raise();
            }
        }
    }

    fn raise(&self) {
        if let Err(e) = self.interrupt.trigger() {
            log::warn!("virtio {}: cannot raise interrupt: {e}", self.device.name());
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_invalid = false;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.needs_reset = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    /// Why the driver features cannot be accepted, if they cannot.
    fn features_problem(&self) -> Option<String> {
        let unsupported = self.driver_features & !self.device.features();
        if unsupported != 0 {
            Some(format!("feature bits {unsupported:#x} not offered"))
        } else if self.driver_features_invalid {
            Some("feature bits beyond 63 not offered".into())
        } else if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            Some("VIRTIO_F_VERSION_1 not accepted (legacy drivers are not supported)".into())
        } else {
            None
        }
    }

    /// Describes the first ready queue whose rings are not in guest memory.
    fn invalid_queue(&self) -> Option<String> {
        self.queues.iter().enumerate().find(|(_, q)| q.ready() && !q.is_valid(&*self.mem)).map(|(i, q)| {
            format!(
                "queue {i} enabled with rings outside guest memory (size {}, desc {:#x}, driver {:#x}, device {:#x})",
                q.size(),
                q.desc_table(),
                q.avail_ring(),
                q.used_ring()
            )
        })
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if self.needs_reset {
            log::debug!("virtio {}: status {v:#x} ignored: device needs reset", self.device.name());
            return;
        }
        let old = self.status;
        if v & !STATUS_DRIVER_BITS != 0 {
            self.violation(true, format!("invalid status bits in {v:#x}"));
            return;
        }
        if v & old != old {
            self.violation(true, format!("status bits cleared without a reset ({old:#x} -> {v:#x})"));
            return;
        }
        let new = v & !old;
        if new == 0 {
            return;
        }
        if new & FAILED != 0 {
            log::info!("virtio {}: driver set FAILED (status {v:#x})", self.device.name());
            self.status = v;
            return;
        }
        if (v & DRIVER != 0 && v & ACKNOWLEDGE == 0)
            || (v & FEATURES_OK != 0 && v & DRIVER == 0)
            || (v & DRIVER_OK != 0 && v & FEATURES_OK == 0)
        {
            self.violation(true, format!("status bits set out of order ({old:#x} -> {v:#x})"));
            return;
        }
        if new & FEATURES_OK != 0 {
            if let Some(problem) = self.features_problem() {
                // Not a violation: the driver reads FEATURES_OK back and learns.
                log::warn!(
                    "virtio {}: refusing driver features {:#x}: {problem}",
                    self.device.name(),
                    self.driver_features
                );
                self.status = v & !(FEATURES_OK | DRIVER_OK);
                return;
            }
        }
        if new & DRIVER_OK != 0 {
            self.status = v;
            if let Some(msg) = self.invalid_queue() {
                self.violation(true, msg);
                return;
            }
            if let Err(e) = self.device.activate(self.driver_features) {
                self.violation(true, format!("activation failed: {e}"));
            }
            return;
        }
        self.status = v;
    }

    /// Processes queue `index` as if the driver had notified it.
    pub fn notify(&mut self, index: u32) {
        if self.needs_reset {
            log::debug!("virtio {}: notification of queue {index} ignored: device needs reset", self.device.name());
            return;
        }
        if !self.is_active() {
            self.violation(
                false,
                format!("queue {index} notified while the device is not active (status {:#x})", self.status),
            );
            return;
        }
        match self.queues.get(index as usize) {
            None => self.violation(false, format!("notification of nonexistent queue {index}")),
            Some(q) if !q.ready() => self.violation(false, format!("notification of disabled queue {index}")),
            Some(_) => self.process(index),
        }
    }

    /// Processes queue `index` for the device's own reasons (a frame
    /// arrived on a TAP, say): as a notification, but nothing happens, and
    /// nothing is counted against the guest, while the device is not active
    /// or the queue not enabled.
    pub fn poll(&mut self, index: u32) {
        if self.is_active() && self.queues.get(index as usize).is_some_and(|q| q.ready()) {
            self.process(index);
        }
    }

    /// The device's configuration space changed on the device's side (the
    /// net status's ANNOUNCE bit, say): ConfigGeneration moves on and an
    /// active driver gets a configuration change interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.is_active() {
            self.interrupt_status |= interrupt::CONFIG_CHANGE;
            self.raise();
        }
    }

    fn process(&mut self, index: u32) {
        let i = index as usize;
        let Some(queue) = self.queues.get_mut(i) else { return };
        match self.device.process_queue(i, queue, &*self.mem) {
            Ok(p) => {
                if p.rejected > 0 {
                    self.guest_errors = self.guest_errors.saturating_add(p.rejected - 1);
                    let msg = p.last_rejection.unwrap_or_else(|| "malformed request".into());
                    self.violation(false, format!("queue {index}: {msg}"));
                }
                if p.used {
                    self.interrupt_status |= interrupt::USED_RING;
                    if self.wants_interrupt(i) {
                        self.raise();
                    }
                }
            }
            Err(ProtocolError(msg)) => self.violation(true, format!("queue {index}: {msg}")),
        }
    }

    /// Whether the driver wants an interrupt for used buffers on queue `i`:
    /// without VIRTIO_F_EVENT_IDX, VIRTQ_AVAIL_F_NO_INTERRUPT in the driver
    /// area's flags asks the device not to send one (a polling driver).
    fn wants_interrupt(&mut self, i: usize) -> bool {
        let Some(q) = self.queues.get_mut(i) else { return false };
        if q.event_idx_enabled() {
            return q.needs_notification(&*self.mem).unwrap_or(true);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let flags: u16 = self.mem.read_obj(GuestAddress(q.avail_ring())).unwrap_or(0);
        u16::from_le(flags) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if self.needs_reset {
            return;
        }
        if self.status & DRIVER_OK != 0 {
            self.violation(false, format!("queue register {offset:#x} written after DRIVER_OK (ignored)"));
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.queues.get_mut(sel as usize) else {
            self.violation(false, format!("queue register {offset:#x} written with nonexistent QueueSel {sel}"));
            return;
        };
        let lo = |a: u64| (a & !0xffff_ffff) | v as u64;
        let hi = |a: u64| (a & 0xffff_ffff) | (v as u64) << 32;
        let res = match offset {
            QUEUE_NUM => {
                let max = q.max_size();
                match u16::try_from(v).ok().filter(|&n| n <= max && n.is_power_of_two()) {
                    Some(n) => q.try_set_size(n).map_err(|_| String::new()),
                    None => Err(format!("queue {sel}: invalid size {v} (must be a power of two <= {max})")),
                }
            }
            QUEUE_READY => match v {
                0 | 1 => {
                    q.set_ready(v == 1);
                    Ok(())
                }
                _ => {
                    self.violation(false, format!("queue {sel}: QueueReady written with {v:#x} (ignored)"));
                    return;
                }
            },
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH => {
                let a = if offset == QUEUE_DESC_LOW { lo(q.desc_table()) } else { hi(q.desc_table()) };
                q.try_set_desc_table_address(GuestAddress(a))
                    .map_err(|_| format!("queue {sel}: descriptor table address {a:#x} not 16-byte aligned"))
            }
            QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH => {
                let a = if offset == QUEUE_DRIVER_LOW { lo(q.avail_ring()) } else { hi(q.avail_ring()) };
                q.try_set_avail_ring_address(GuestAddress(a))
                    .map_err(|_| format!("queue {sel}: driver area address {a:#x} not 2-byte aligned"))
            }
            QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                let a = if offset == QUEUE_DEVICE_LOW { lo(q.used_ring()) } else { hi(q.used_ring()) };
                q.try_set_used_ring_address(GuestAddress(a))
                    .map_err(|_| format!("queue {sel}: device area address {a:#x} not 4-byte aligned"))
            }
            _ => Ok(()),
        };
        if let Err(msg) = res {
            self.violation(true, msg);
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => 2,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR_ID_VALUE,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status | if self.needs_reset { DEVICE_NEEDS_RESET } else { 0 },
            // No shared memory regions: a nonexistent region has length -1.
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            // Write-only and reserved registers read as zero.
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES => {
                if self.status & FEATURES_OK != 0 || self.needs_reset {
                    self.violation(false, "DriverFeatures written after FEATURES_OK (ignored)".into());
                    return;
                }
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v as u64) << 32,
                    _ => self.driver_features_invalid |= v != 0,
                }
            }
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            QUEUE_NOTIFY => self.notify(v),
            INTERRUPT_ACK => self.interrupt_status &= !v,
            STATUS => self.set_status(v),
            SHM_SEL => {}
            _ => {
                self.violation(false, format!("write of {v:#x} to read-only or unknown register {offset:#x} (ignored)"))
            }
        }
    }
}

impl<D: VirtioDevice, M: GuestMemory + Send + Sync + 'static> MmioDevice for MmioTransport<D, M> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(cfg) = offset.checked_sub(CONFIG) {
            self.device.read_config(cfg, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.violation(false, format!("{}-byte read of register {offset:#x} (must be aligned 32-bit)", data.len()));
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(cfg) = offset.checked_sub(CONFIG) {
            if !self.needs_reset {
                self.device.write_config(cfg, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.violation(
                false,
                format!("{}-byte write to register {offset:#x} (must be 32-bit; ignored)", data.len()),
            );
            return;
        };
        if offset % 4 != 0 {
            self.violation(false, format!("unaligned write to register {offset:#x} (ignored)"));
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}
