//! The multiboot entry for QEMU's `-kernel` (filled in below).
