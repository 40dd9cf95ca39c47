//! Devices the VMM emulates itself: legacy PIO devices and the adapter that
//! puts virtio-mmio transports on the MMIO bus.

pub mod legacy;
pub mod virtio;
