//! The virtio-mmio register interface, version 2 (VIRTIO 1.x, section 4.2.2).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::{Interrupt, MmioDevice, ProtocolError, VirtioDevice};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x554d_4d56; // "VMMU"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const INT_USED_RING: u32 = 1;

/// Plain-data state of a transport (for snapshots and migration).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MmioState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub needs_reset: bool,
    pub queues: Vec<virtio_queue::QueueState>,
}

/// A virtio device on the virtio-mmio transport.
pub struct MmioTransport<D: VirtioDevice, M: GuestMemory> {
    device: D,
    mem: Arc<M>,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    needs_reset: bool,
    guest_errors: u64,
    last_error: Option<String>,
}

impl<D: VirtioDevice, M: GuestMemory + Send + Sync> MmioTransport<D, M> {
    pub fn new(device: D, mem: Arc<M>, interrupt: Arc<dyn Interrupt>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are valid powers of two"))
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            needs_reset: false,
            guest_errors: 0,
            last_error: None,
        }
    }

    /// Protocol violations by the driver so far.
    pub fn guest_errors(&self) -> u64 {
        self.guest_errors
    }

    /// The last protocol violation.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Whether the driver has activated the device (DRIVER_OK) and it works.
    pub fn is_active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && !self.needs_reset
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The transport's state as plain data.
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

    /// Records a protocol violation. `fatal` ones put the device into
    /// DEVICE_NEEDS_RESET until the driver resets it.
    fn violation(&mut self, fatal: bool, msg: String) {
        let msg = format!("{}: {msg}", self.device.name());
        self.guest_errors += 1;
        // A hostile driver can cause violations at will: log the first ones,
        // then only every power of two.
        if self.guest_errors <= 8 || self.guest_errors.is_power_of_two() {
            log::error!(
                "virtio {msg}{} [violation #{}]",
                if fatal { " (device needs reset)" } else { "" },
                self.guest_errors
            );
        }
        self.last_error = Some(msg);
        if fatal && !self.needs_reset {
            self.needs_reset = true;
            // Tell the driver through a configuration change interrupt.
            self.interrupt_status |= 2;
            let _ = self.interrupt.trigger();
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.needs_reset = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & !(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) != 0
            || v & self.status != self.status
        {
            self.violation(true, format!("invalid status transition {:#x} -> {v:#x}", self.status));
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let unsupported = self.driver_features & !self.device.features();
            if unsupported != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // Not a violation: the driver reads FEATURES_OK back and learns.
                log::warn!(
                    "virtio {}: refusing features {:#x} (unsupported {unsupported:#x} or no VERSION_1)",
                    self.device.name(),
                    self.driver_features
                );
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        if new & STATUS_DRIVER_OK != 0 {
            if self.status & STATUS_FEATURES_OK == 0 {
                self.violation(true, "DRIVER_OK before FEATURES_OK".into());
                return;
            }
            for (i, q) in self.queues.iter().enumerate() {
                if q.ready() && !q.is_valid(&*self.mem) {
                    let msg = format!(
                        "queue {i} activated with invalid rings (size {}, desc {:#x}, avail {:#x}, used {:#x})",
                        q.size(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring()
                    );
                    self.status = v;
                    self.violation(true, msg);
                    return;
                }
            }
        }
        self.status = v;
    }

    fn notify(&mut self, index: u32) {
        if !self.is_active() {
            if self.needs_reset {
                return; // inert until reset
            }
            self.violation(false, format!("queue {index} notified before DRIVER_OK"));
            return;
        }
        let i = index as usize;
        if i >= self.queues.len() || !self.queues[i].ready() {
            self.violation(false, format!("notification for nonexistent or disabled queue {index}"));
            return;
        }
        match self.device.process_queue(i, &mut self.queues[i], &*self.mem) {
            Ok(true) => {
                self.interrupt_status |= INT_USED_RING;
                if let Err(e) = self.interrupt.trigger() {
                    log::warn!("virtio {}: cannot raise interrupt: {e}", self.device.name());
                }
            }
            Ok(false) => {}
            Err(ProtocolError(msg)) => self.violation(true, msg),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if self.status & STATUS_DRIVER_OK != 0 {
            self.violation(false, format!("queue register {offset:#x} written after DRIVER_OK"));
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected() else {
            self.violation(false, format!("queue register {offset:#x} written with invalid QueueSel {sel}"));
            return;
        };
        match offset {
            0x038 => {
                if v == 0 || v > q.max_size() as u32 || !v.is_power_of_two() {
                    let max = q.max_size();
                    self.violation(false, format!("queue {sel}: invalid size {v} (max {max}, power of two)"));
                } else {
                    q.set_size(v as u16);
                }
            }
            0x044 => q.set_ready(v == 1),
            0x080 => q.set_desc_table_address(Some(v), None),
            0x084 => q.set_desc_table_address(None, Some(v)),
            0x090 => q.set_avail_ring_address(Some(v), None),
            0x094 => q.set_avail_ring_address(None, Some(v)),
            0x0a0 => q.set_used_ring_address(Some(v), None),
            0x0a4 => q.set_used_ring_address(None, Some(v)),
            _ => unreachable!(),
        }
    }
}

impl<D: VirtioDevice, M: GuestMemory + Send + Sync> MmioDevice for MmioTransport<D, M> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.violation(false, format!("{}-byte read of register {offset:#x} (must be 32-bit)", data.len()));
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.queues.get(self.queue_sel as usize).map(|q| q.max_size() as u32).unwrap_or(0),
            0x044 => self.queues.get(self.queue_sel as usize).map(|q| q.ready() as u32).unwrap_or(0),
            0x060 => self.interrupt_status,
            0x070 => self.status | if self.needs_reset { STATUS_NEEDS_RESET } else { 0 },
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // Block configuration is read-only; ignore like hardware would.
            log::debug!("virtio {}: ignoring config write at {:#x}", self.device.name(), offset - 0x100);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.violation(false, format!("{}-byte write to register {offset:#x} (must be 32-bit)", data.len()));
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    self.violation(false, "driver features written after FEATURES_OK".into());
                    return;
                }
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v as u64) << 32,
                    s => self.violation(false, format!("driver features written with selector {s}")),
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.write_queue_reg(offset, v),
            0x050 => self.notify(v),
            0x064 => self.interrupt_status &= !v,
            0x070 => self.set_status(v),
            _ => self.violation(false, format!("write of {v:#x} to read-only or unknown register {offset:#x}")),
        }
    }
}
