//! What the engine needs from a VM, and nothing more.
//!
//! The source side drives a [`MigratableVm`]: it pauses and resumes it,
//! turns dirty logging on and off, reads its memory, asks its guest for the
//! enlightenment maps and writes its state into the stream. The VMM
//! implements the trait over its running VM (`vmm/src/migratable.rs`); the
//! engine's tests implement it over plain `vm-memory` mappings. The
//! destination's VMM is an [`IncomingVm`].

use std::sync::Arc;

use serde_json::Value;

use crate::error::Result;
use crate::policy::GuestMaps;
use crate::progress::Progress;
use crate::space::GuestMem;

/// A running VM that can be migrated away.
pub trait MigratableVm: Sync {
    /// Guest RAM.
    fn memory(&self) -> &Arc<GuestMem>;
    /// The VM's shape for the destination: the `Config` frame's payload.
    fn config(&self) -> Result<Vec<u8>>;
    /// The migration's live status (phase, bytes, cancel, commit).
    fn status(&self) -> &Progress;
    /// Pauses the vCPUs (each saves its state); `false` if it was paused already.
    fn pause(&self) -> Result<bool>;
    /// Resumes a VM this migration paused (a failure before the commit).
    fn resume(&self);
    /// Why the VM ended, if it did.
    fn ended(&self) -> Option<String>;
    /// Turns dirty page logging on or off.
    fn set_dirty_log(&self, on: bool) -> Result<()>;
    /// Pages the guest or a device wrote since the last call, one bitmap
    /// (64 pages per word) per region.
    fn take_dirty(&self) -> Result<Vec<Vec<u64>>>;
    /// Flushes every disk to stable storage (the VM is paused).
    fn sync_disks(&self) -> Result<()>;
    /// The paused VM's state (vCPUs, KVM, devices; no guest memory), opaque
    /// to the engine: the destination's VMM reads it.
    fn write_state(&self) -> Result<Vec<u8>>;
    /// Asks the guest for its free bitmap and priority map; on success it
    /// holds its free frames until [`MigratableVm::enlighten_release`].
    fn enlighten_prepare(&self) -> Result<GuestMaps>;
    /// Gives the guest its free frames back.
    fn enlighten_release(&self) -> Result<()>;
    /// The guest's progress samples `[[unix_ms, ops], ...]` for the report.
    fn progress(&self) -> Value;
    /// Returns guest RAM to the host (every page is at the destination).
    fn discard_memory(&self);
    /// The VM now runs at the destination: end it here once the migration's
    /// reply is out.
    fn migrated(&self);
    /// The switch-over is committed (the destination will run the VM, this
    /// end never again): hand over what exactly one VMM may hold, such as
    /// the disk images' locks. Called once, before the destination is told.
    fn committed(&self) {}
}

/// A VMM waiting for a migration.
pub trait IncomingVm {
    /// Checks the source's `Config` payload (the VM's shape) and maps guest
    /// memory for it, untouched (post-copy registers it with userfaultfd).
    fn memory_for(&self, config: &[u8]) -> Result<GuestMem>;
}
