//! Port I/O and MMIO buses: address ranges mapped to devices.
//!
//! A device access may ask the VMM to act (end the VM, park the vCPU); those
//! requests come back as a [`BusAction`] so devices never reach into the VM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a device asks of the VMM after an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusAction {
    None,
    /// The guest asked for a reset (i8042 pulse, 0x64 <- 0xfe): end the VM.
    Reset,
    /// The testbed guest wrote an exit code.
    GuestExit(u32),
    /// The vCPU has nothing more to do; stop running it until the VM ends.
    Park,
}

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction;
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// An address space of devices, keyed by range start.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn BusDevice>>) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        let clash = self.devices.range(..end).next_back().is_some_and(|(&b, (l, _))| b + l > base);
        if len == 0 || clash {
            return Err(Overlap { base, len });
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (&base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let off = addr - base;
        (off + size as u64 <= *len).then_some((off, dev))
    }

    /// Reads from the device at `addr`; unclaimed addresses read as all ones,
    /// like an open bus. Returns false if nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns `None` if nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<BusAction> {
        let (off, dev) = self.find(addr, data.len())?;
        Some(dev.lock().unwrap_or_else(|e| e.into_inner()).write(off, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
            self.0 = data[0];
            BusAction::None
        }
    }

    #[test]
    fn ranges_and_open_bus() {
        let mut bus = Bus::default();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Reg(1)))).unwrap();
        bus.insert(0x18, 8, Arc::new(Mutex::new(Reg(2)))).unwrap();
        assert!(bus.insert(0x14, 8, Arc::new(Mutex::new(Reg(3)))).is_err());
        assert!(bus.insert(0x0c, 8, Arc::new(Mutex::new(Reg(3)))).is_err());
        assert!(bus.insert(0x20, 0, Arc::new(Mutex::new(Reg(3)))).is_err());
        let mut b = [0u8; 2];
        assert!(bus.read(0x16, &mut b));
        assert_eq!(b, [1, 1]);
        assert!(!bus.read(0x17, &mut b)); // straddles two devices
        assert_eq!(b, [0xff, 0xff]);
        assert_eq!(bus.write(0x18, &[9]), Some(BusAction::None));
        assert!(bus.read(0x18, &mut b));
        assert_eq!(b, [9, 9]);
        assert_eq!(bus.write(0x100, &[9]), None);
    }
}
