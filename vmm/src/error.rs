//! The error of building and running a VM, shared by the VM, its devices
//! and the boot code (which must not depend on `vm.rs`).

use std::path::PathBuf;

use crate::memory;

/// Why a VM could not be created, restored or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid testbed workload: {0}")]
    Workload(String),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have permission?)")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM: {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("cannot open {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("boot: {0}")]
    Boot(String),
    #[error("device setup: {0}")]
    Device(String),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("restoring: {0}")]
    Restore(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}
