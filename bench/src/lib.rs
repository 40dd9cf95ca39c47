//! Benchmark harnesses shared by the `bench` binaries.

pub mod migration;
pub mod qemu;
