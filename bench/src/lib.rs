//! Benchmark harnesses shared by the `bench` binaries.

pub mod contention;
pub mod flowtap;
pub mod host_memory;
pub mod memslap;
pub mod migration;
pub mod qemu;
