//! What to send next: pure decisions, no I/O.
//!
//! - Pre-copy's convergence: iterate while the pages dirtied during a round
//!   would take longer to send (at the rate just measured) than the downtime
//!   target, up to a round and a time limit ([`Precopy::converged`]).
//! - Post-copy's push order: one round in address order (simple post-copy),
//!   or one round per priority class of the guest's map, Kernel first, free
//!   pages left out (enlightened post-copy, thesis 5.3.3) ([`rounds`]).

use std::time::Duration;

use bitmap_abi::{Class, PriorityMap};

use crate::space::{Bits, PageSpace, PAGE_SIZE};

/// One push round: a label, the priority class (if any) and the page
/// indexes it sends, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Round {
    pub name: String,
    pub class: Option<u32>,
    pub pages: Vec<u64>,
}

/// Pre-copy's stopping rule.
#[derive(Clone, Copy, Debug)]
pub struct Precopy {
    /// Stop once the remaining dirty pages would take less than this.
    pub downtime_target_ms: f64,
    pub max_rounds: u32,
    pub max_time: Duration,
}

impl Default for Precopy {
    fn default() -> Self {
        Self { downtime_target_ms: 300.0, max_rounds: 30, max_time: Duration::from_secs(300) }
    }
}

/// What one pre-copy round measured.
#[derive(Clone, Copy, Debug)]
pub struct RoundStats {
    /// Rounds are numbered from 0.
    pub round: u32,
    pub bytes: u64,
    pub secs: f64,
    /// Pages dirtied while the round ran.
    pub dirty_pages: u64,
}

impl RoundStats {
    /// Time to send the dirty pages at this round's rate.
    pub fn expected_downtime_ms(&self) -> f64 {
        let rate = self.bytes as f64 / self.secs.max(1e-6);
        self.dirty_pages as f64 * PAGE_SIZE as f64 / rate.max(1.0) * 1000.0
    }
}

impl Precopy {
    /// Whether to stop iterating after round `r`, `elapsed` into the migration.
    pub fn converged(&self, r: &RoundStats, elapsed: Duration) -> bool {
        r.expected_downtime_ms() < self.downtime_target_ms || r.round + 1 >= self.max_rounds || elapsed > self.max_time
    }
}

/// The guest's maps as the engine needs them (enlightened post-copy).
pub struct GuestMaps {
    /// Free bitmap bytes (bitmap-abi layout).
    pub free: Vec<u8>,
    /// Priority map bytes (bitmap-abi layout).
    pub prio: Vec<u8>,
    /// Frames the maps cover.
    pub frames: u64,
    /// The VM's summary of them for the report.
    pub summary: serde_json::Value,
}

impl GuestMaps {
    /// Checks the maps' sizes against `frames`.
    pub fn new(
        free: Vec<u8>,
        prio: Vec<u8>,
        frames: u64,
        summary: serde_json::Value,
    ) -> Result<Self, bitmap_abi::WireError> {
        bitmap_abi::FreeBitmap::new(&free, frames)?;
        PriorityMap::new(&prio, frames)?;
        Ok(Self { free, prio, frames, summary })
    }
    pub fn free_bitmap(&self) -> bitmap_abi::FreeBitmap<'_> {
        bitmap_abi::FreeBitmap::new(&self.free, self.frames).expect("checked in new")
    }
    pub fn priority_map(&self) -> PriorityMap<'_> {
        PriorityMap::new(&self.prio, self.frames).expect("checked in new")
    }
}

/// Post-copy's push rounds: address order without maps; with them, one
/// round per class in [`Class::ALL`] order (free frames never), then the
/// frames beyond the maps (none for a well-formed guest).
pub fn rounds(space: &PageSpace, free: &Bits, maps: Option<&GuestMaps>) -> Vec<Round> {
    let Some(m) = maps else {
        return vec![Round { name: "address-order".into(), class: None, pages: (0..space.pages()).collect() }];
    };
    let prio = m.priority_map();
    Class::ALL
        .iter()
        .filter(|c| **c != Class::Free)
        .map(|&c| {
            let pages =
                prio.frames_of(c).filter_map(|pfn| space.index(pfn * PAGE_SIZE)).filter(|&i| !free.get(i)).collect();
            Round { name: c.name().to_owned(), class: Some(c as u32), pages }
        })
        .chain(std::iter::once(Round {
            name: "unmapped".into(),
            class: None,
            pages: (0..space.pages()).filter(|&i| space.gpa(i) / PAGE_SIZE >= m.frames).collect(),
        }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(round: u32, mb_per_s: f64, dirty_pages: u64) -> RoundStats {
        RoundStats { round, bytes: (mb_per_s * 1e6) as u64, secs: 1.0, dirty_pages }
    }

    #[test]
    fn precopy_stops_when_the_rest_fits_the_downtime() {
        let p = Precopy::default();
        // 1000 MB/s: 10000 dirty pages (41 MB) take 41 ms.
        let r = stats(0, 1000.0, 10_000);
        assert!((r.expected_downtime_ms() - 40.96).abs() < 0.01);
        assert!(p.converged(&r, Duration::from_secs(1)));
        // 100 MB/s: 100000 dirty pages take 4 s: go on.
        assert!(!p.converged(&stats(0, 100.0, 100_000), Duration::from_secs(1)));
        // ... unless out of rounds or time.
        assert!(p.converged(&stats(29, 100.0, 100_000), Duration::from_secs(1)));
        assert!(p.converged(&stats(3, 100.0, 100_000), Duration::from_secs(301)));
        // A round that sent nothing in no time does not divide by zero.
        let idle = RoundStats { round: 1, bytes: 0, secs: 0.0, dirty_pages: 0 };
        assert!(p.converged(&idle, Duration::ZERO));
    }

    #[test]
    fn simple_postcopy_pushes_in_address_order() {
        let space = PageSpace::new([(0, 16 * PAGE_SIZE)]);
        let r = rounds(&space, &Bits::new(16), None);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].pages, (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn enlightened_rounds_follow_the_classes_and_skip_free_frames() {
        // 8 frames: 0-1 kernel, 2 page table, 3 user code, 4-5 free, 6 other;
        // frame 7 beyond the map (the map covers 7 frames).
        let frames = 7u64;
        let mut prio = vec![0u8; bitmap_abi::wire::priority_map_len(frames) as usize];
        let mut free = vec![0u8; bitmap_abi::wire::free_bitmap_len(frames) as usize];
        for (pfn, c) in [
            (0, Class::Kernel),
            (1, Class::Kernel),
            (2, Class::PageTable),
            (3, Class::UserCode),
            (4, Class::Free),
            (5, Class::Free),
            (6, Class::Other),
        ] {
            bitmap_abi::wire::set_class(&mut prio, pfn, c).unwrap();
            if c == Class::Free {
                bitmap_abi::wire::set_free_bit(&mut free, pfn, true).unwrap();
            }
        }
        let maps = GuestMaps::new(free, prio, frames, serde_json::Value::Null).expect("maps");
        let space = PageSpace::new([(0, 8 * PAGE_SIZE)]);
        let freebits = Bits::new(8);
        freebits.set(4);
        freebits.set(5);
        let r = rounds(&space, &freebits, Some(&maps));
        let by_name = |n: &str| r.iter().find(|x| x.name == n).map(|x| x.pages.clone()).unwrap_or_default();
        assert_eq!(r[0].name, Class::ALL.iter().find(|c| **c != Class::Free).unwrap().name());
        assert_eq!(by_name(Class::Kernel.name()), vec![0, 1]);
        assert_eq!(by_name(Class::PageTable.name()), vec![2]);
        assert_eq!(by_name(Class::UserCode.name()), vec![3]);
        assert_eq!(by_name(Class::Other.name()), vec![6]);
        assert_eq!(by_name("unmapped"), vec![7]);
        let all: Vec<u64> = r.iter().flat_map(|x| x.pages.clone()).collect();
        assert!(!all.contains(&4) && !all.contains(&5), "free frames are never pushed");
        assert_eq!(all.len(), 6);
    }
}
