//! Reports and timelines: the clock both hosts' timelines share.

use std::time::{Duration, Instant};

/// Milliseconds since the Unix epoch (timelines of both hosts share it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Calls `tick` every 100 ms (on a steady schedule) until it returns false.
pub fn every_100ms(mut tick: impl FnMut() -> bool) {
    let mut next = Instant::now();
    while tick() {
        next += Duration::from_millis(100);
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}
