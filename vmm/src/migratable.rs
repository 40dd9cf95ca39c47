//! The running VM as the migration engine sees it: [`migrate::vm::MigratableVm`]
//! for [`Shared`]. The engine (`migrate::source`) decides what to send and
//! when; this file only answers its questions with KVM, the devices and the
//! guest's enlightenment device.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use migrate::policy::GuestMaps;
use migrate::progress::Progress;
use migrate::vm::MigratableVm;
use migrate::{Error, Result};

use crate::api::ApiTarget;
use crate::control::ExitReason;
use crate::memory::{self, GuestMem};
use crate::vm::Shared;

impl MigratableVm for Shared {
    fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    fn config(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(&self.config).map_err(|e| Error::from(e.to_string()))
    }

    fn status(&self) -> &Progress {
        &self.migration
    }

    fn pause(&self) -> Result<bool> {
        if self.control.is_paused() {
            return Ok(false);
        }
        ApiTarget::pause(self)?;
        Ok(true)
    }

    fn resume(&self) {
        self.resume_vm();
    }

    fn ended(&self) -> Option<String> {
        self.control.exit_reason().map(|r| format!("{r:?}"))
    }

    fn set_dirty_log(&self, on: bool) -> Result<()> {
        memory::register_slots(&self.fd, &self.mem, on).map_err(|e| Error::Memory(e.to_string()))
    }

    /// The KVM dirty log (guest writes) ORed with the mapping's own bitmap
    /// (device writes through vm-memory).
    fn take_dirty(&self) -> Result<Vec<Vec<u64>>> {
        let mut out = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let mut kvm = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| Error::Memory(format!("KVM_GET_DIRTY_LOG: {e}")))?;
            // The mapping's own bitmap (the region trait only exposes a slice view).
            let dev = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (k, d) in kvm.iter_mut().zip(dev.iter()) {
                *k |= *d;
            }
            out.push(kvm);
        }
        Ok(out)
    }

    fn sync_disks(&self) -> Result<()> {
        Ok(Shared::sync_disks(self)?)
    }

    fn write_state(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.with_snapshot(&mut |snap| {
            out = serde_json::to_vec(snap).map_err(|e| format!("encoding the VM state: {e}"))?;
            Ok(out.len() as u64)
        })?;
        Ok(out)
    }

    fn enlighten_prepare(&self) -> Result<GuestMaps> {
        let e = Shared::enlighten_prepare(self)?;
        let summary = e.summary();
        let frames = e.ready.frames();
        GuestMaps::new(e.free, e.prio, frames, summary).map_err(|e| Error::from(format!("maps: {e}")))
    }

    fn enlighten_release(&self) -> Result<()> {
        Shared::enlighten_release(self)?;
        Ok(())
    }

    fn progress(&self) -> Value {
        self.progress_json()
    }

    fn discard_memory(&self) {
        memory::discard(&self.mem);
    }

    fn committed(&self) {
        self.release_disk_locks();
    }
    fn migrated(&self) {
        debug_assert!(self.migration.committed.load(Ordering::Acquire) || self.control.is_paused());
        *self.exit_after_reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(ExitReason::Migrated);
    }
}
