//! Benchmark harnesses shared by the `bench` binaries.

pub mod contention;
pub mod memslap;
pub mod migration;
pub mod qemu;
