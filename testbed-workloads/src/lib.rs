//! Testbed workloads (`no_std`), shared by the testbed guest and by host
//! benchmarks, so the same code runs in the VM and as a plain process.
//!
//! Each workload works on a `&mut [u8]` region and is driven in batches by
//! its caller, which owns time keeping and reporting:
//! - [`kv::Kv`]: a key-value store (open addressing, fixed slots) with
//!   Zipfian keys and a checksum on every value, verified on every read;
//! - [`mem::Mem`]: dirties a working set page by page, verifying each page's
//!   previous stamp;
//! - [`app`]: an appliance's user session over a large prefilled state
//!   (streaming's workload);
//! - [`mcd`]: a memcached server core (store with checksums, text protocol);
//! - [`disk`]: the sector patterns the `disk` workload and host tests share.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod app;
pub mod disk;
pub mod kv;
pub mod math;
pub mod mcd;
pub mod mem;
pub mod rng;

/// What one batch of operations did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub ops: u64,
    pub errors: u64,
    /// Order-independent checksum contribution of the data read.
    pub checksum: u64,
}
