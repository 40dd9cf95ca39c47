//! The `vmm` library: a KVM virtual machine monitor built on rust-vmm crates.
//!
//! - [`memory`]: guest RAM as anonymous NORESERVE mappings, one KVM slot per region.
//! - [`vm`]: creating a VM (KVM, irqchip, PIT, devices, boot) and running it.
//! - [`vcpu`]: one thread per vCPU and the handling of every KVM exit.
//! - [`control`]: pause, resume, park and the reason a VM ended.
//! - [`bus`], [`devices`]: port I/O and MMIO devices.
//! - [`testbed`]: the built-in CPL3 testbed guest.
//! - [`linux`]: the Linux boot protocol (for hardware-KVM hosts).
//! - [`migration`]: live migration (stop-and-copy, pre-copy, post-copy,
//!   enlightened post-copy) between two VMMs; post-copy's two ends are in
//!   the `migrate` crate ([`migrate::push`], [`migrate::dest`]).
//! - [`progress`]: the testbed guest's progress for migration timelines.
//! - [`stream`]: appliances: creating one from a snapshot, streaming a VM from one.
//! - [`api`]: the control socket.
//! - [`console`]: stdin to the guest's serial port.

pub mod api;
pub mod appliance_cmd;
pub mod arch;
pub mod builder;
pub mod bus;
pub mod console;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod disk_lock;
pub mod enlighten;
pub mod error;
pub mod linux;
pub mod memory;
pub mod migratable;
pub mod migration;
pub mod progress;
pub mod snapshot;
pub mod stream;
pub mod testbed;
pub mod vcpu;
pub mod vcpu_cgroup;
pub mod vm;
pub mod vstate;
