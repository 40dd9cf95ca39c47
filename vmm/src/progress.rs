//! The testbed guest's progress, sampled for migration timelines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use migrate::report::{every_100ms, unix_ms};

use crate::memory::GuestMem;

/// Samples the testbed guest's completed operations every 100 ms into
/// `out` until `stop` is set.
pub fn sample_progress(mem: Arc<GuestMem>, stop: Arc<AtomicBool>, out: Arc<Mutex<Vec<(u64, u64)>>>) {
    every_100ms(|| {
        if let Some(s) = crate::testbed::read_stats(&mem) {
            out.lock().unwrap_or_else(|e| e.into_inner()).push((unix_ms(), s.ops));
        }
        !stop.load(Ordering::Acquire)
    });
}
