//! TEMPORARY STUB
use crate::memory::GuestMem;
use crate::vm::VmError;
use kvm_ioctls::VcpuFd;
use std::path::Path;
use testbed_abi::VirtioMmioDevice;
pub fn boot(
    _mem: &GuestMem,
    _vcpus: &[VcpuFd],
    kernel: &Path,
    initramfs: Option<&Path>,
    _cmdline: &str,
    _virtio: &[VirtioMmioDevice],
) -> Result<(), VmError> {
    std::fs::File::open(kernel).map_err(|source| VmError::File { path: kernel.to_owned(), source })?;
    if let Some(i) = initramfs {
        std::fs::File::open(i).map_err(|source| VmError::File { path: i.to_owned(), source })?;
    }
    Err(VmError::Boot("stub".into()))
}
