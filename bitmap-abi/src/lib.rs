//! The guest/host ABI of the enlightenment device: free bitmap and priority
//! map (thesis 002, sections 5.2-5.3), and the virtqueue messages that
//! request and describe them.
//!
//! [`wire`] is the single source of truth and is shared verbatim with the
//! guest kernel module (`guest-module/` includes `bitmap-abi/src/wire.rs`
//! with `#[path]`, since a kernel module cannot link a Cargo crate). This
//! crate adds host-side helpers over whole maps: views that check sizes, and
//! iteration in the compact forms the migration engine sends.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod wire;

pub use wire::{Class, Command, Extent, Header, Kind, Prepare, ReadyInfo, WireError, NUM_CLASSES};

/// A free bitmap over `frames` frames.
#[derive(Clone, Copy, Debug)]
pub struct FreeBitmap<'a> {
    bits: &'a [u8],
    frames: u64,
}

impl<'a> FreeBitmap<'a> {
    /// Checks that `bits` is exactly the size `frames` needs; bits past the
    /// last frame must be zero.
    pub fn new(bits: &'a [u8], frames: u64) -> Result<Self, WireError> {
        if bits.len() as u64 != wire::free_bitmap_len(frames) {
            return Err(WireError::BadLength);
        }
        if frames % 8 != 0 {
            let tail = bits[bits.len() - 1] >> (frames % 8);
            if tail != 0 {
                return Err(WireError::OutOfRange);
            }
        }
        Ok(Self { bits, frames })
    }

    pub fn frames(&self) -> u64 {
        self.frames
    }

    pub fn is_free(&self, pfn: u64) -> bool {
        pfn < self.frames && wire::free_bit(self.bits, pfn).unwrap_or(false)
    }

    /// Number of free frames.
    pub fn count_free(&self) -> u64 {
        self.bits.iter().map(|b| b.count_ones() as u64).sum()
    }

    /// Maximal runs of free frames as `(first_pfn, count)`, in order: the
    /// compact form sent to the destination (which then never fetches them).
    pub fn free_runs(&self) -> FreeRuns<'a> {
        FreeRuns { map: *self, pfn: 0 }
    }
}

/// Iterator over runs of free frames.
pub struct FreeRuns<'a> {
    map: FreeBitmap<'a>,
    pfn: u64,
}

impl Iterator for FreeRuns<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let bits = self.map.bits;
        let frames = self.map.frames;
        // Skip used frames, a whole zero byte at a time where possible.
        while self.pfn < frames {
            if self.pfn % 8 == 0 && bits[(self.pfn / 8) as usize] == 0 {
                self.pfn += 8;
                continue;
            }
            if self.map.is_free(self.pfn) {
                break;
            }
            self.pfn += 1;
        }
        if self.pfn >= frames {
            return None;
        }
        let start = self.pfn;
        while self.pfn < frames {
            if self.pfn % 8 == 0 && self.pfn + 8 <= frames && bits[(self.pfn / 8) as usize] == 0xff {
                self.pfn += 8;
                continue;
            }
            if !self.map.is_free(self.pfn) {
                break;
            }
            self.pfn += 1;
        }
        Some((start, self.pfn - start))
    }
}

/// A priority map over `frames` frames.
#[derive(Clone, Copy, Debug)]
pub struct PriorityMap<'a> {
    nibbles: &'a [u8],
    frames: u64,
}

impl<'a> PriorityMap<'a> {
    /// Checks the size and that every class value is valid.
    pub fn new(nibbles: &'a [u8], frames: u64) -> Result<Self, WireError> {
        if nibbles.len() as u64 != wire::priority_map_len(frames) {
            return Err(WireError::BadLength);
        }
        let map = Self { nibbles, frames };
        for pfn in 0..frames {
            wire::class_of(nibbles, pfn)?;
        }
        Ok(map)
    }

    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The class of a frame (validated at construction).
    pub fn class(&self, pfn: u64) -> Class {
        wire::class_of(self.nibbles, pfn).unwrap_or(Class::Other)
    }

    /// Frames per class.
    pub fn counts(&self) -> [u64; NUM_CLASSES] {
        let mut c = [0u64; NUM_CLASSES];
        for pfn in 0..self.frames {
            c[self.class(pfn) as usize] += 1;
        }
        c
    }

    /// Frames of `class`, in address order: one push round.
    pub fn frames_of(&self, class: Class) -> impl Iterator<Item = u64> + 'a {
        let map = *self;
        (0..self.frames).filter(move |&p| map.class(p) == class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn class_order_and_names() {
        assert_eq!(Class::ALL.len(), NUM_CLASSES);
        for (i, c) in Class::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert_eq!(Class::from_u8(i as u8), Some(*c));
        }
        assert_eq!(Class::from_u8(10), None);
        assert_eq!(Class::UserData.max_priority(Class::Kernel), Class::Kernel);
        assert_eq!(Class::Kernel.max_priority(Class::Other), Class::Kernel);
        assert_eq!(Class::PageTable.name(), "page_table");
    }

    #[test]
    fn header_round_trip_and_rejections() {
        let mut buf = [0u8; 64];
        let n = Prepare { seq: 7, active_window_ms: 16_000 }.encode(&mut buf).unwrap();
        assert_eq!(Command::decode(&buf[..n]), Ok(Command::Prepare(Prepare { seq: 7, active_window_ms: 16_000 })));
        // Truncated, extended, bad magic, bad version, bad kind.
        assert_eq!(Command::decode(&buf[..n - 1]), Err(WireError::BadLength));
        assert_eq!(Command::decode(&buf[..10]), Err(WireError::Truncated));
        assert_eq!(Command::decode(&buf[..n + 4]), Err(WireError::BadLength));
        let mut bad = buf;
        bad[0] ^= 1;
        assert_eq!(Command::decode(&bad[..n]), Err(WireError::BadMagic));
        let mut bad = buf;
        bad[4] = 9;
        assert_eq!(Command::decode(&bad[..n]), Err(WireError::BadVersion(9)));
        let mut bad = buf;
        bad[6] = 0x55;
        assert_eq!(Command::decode(&bad[..n]), Err(WireError::BadKind(0x55)));
        // A zero window is refused.
        let n = Prepare { seq: 1, active_window_ms: 0 }.encode(&mut buf).unwrap();
        assert_eq!(Command::decode(&buf[..n]), Err(WireError::OutOfRange));
        let n = wire::encode_simple(Kind::Done, 3, &mut buf).unwrap();
        assert_eq!(Command::decode(&buf[..n]), Ok(Command::Done { seq: 3 }));
        let n = wire::encode_simple(Kind::Abort, 4, &mut buf).unwrap();
        assert_eq!(Command::decode(&buf[..n]), Ok(Command::Abort { seq: 4 }));
        // A reply kind is not a command.
        let n = wire::encode_simple(Kind::Ack, 4, &mut buf).unwrap();
        assert_eq!(Command::decode(&buf[..n]), Err(WireError::BadKind(Kind::Ack as u16)));
        let n = wire::encode_error(5, wire::error_code::NO_MEMORY, &mut buf).unwrap();
        assert_eq!(wire::decode_error(&buf[..n]), Ok((5, wire::error_code::NO_MEMORY)));
        assert_eq!(Prepare { seq: 1, active_window_ms: 1 }.encode(&mut [0u8; 10]), Err(WireError::NoSpace));
    }

    fn ready(frames: u64, free: &[Extent], prio: &[Extent]) -> Vec<u8> {
        let info = ReadyInfo {
            seq: 9,
            frames,
            sweep_us: 1200,
            classify_us: 3400,
            class_counts: [1, 2, 0, 3, 4, 5, 6, 7, 8, 9],
            free_extents: free.len() as u32,
            prio_extents: prio.len() as u32,
        };
        let mut buf = vec![0u8; wire::MAX_MESSAGE];
        let n = info.encode(free, prio, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn ready_round_trip_and_validation() {
        let frames = 1 << 18; // 1 GiB
        let guest = frames * wire::PAGE_SIZE;
        let free = [Extent { gpa: 0x100000, len: 16384 }, Extent { gpa: 0x200000, len: 16384 }];
        let prio = [Extent { gpa: 0x300000, len: frames / 2 }];
        let msg = ready(frames, &free, &prio);
        let r = ReadyInfo::decode(&msg, guest).unwrap();
        assert_eq!(r.frames, frames);
        assert_eq!(r.class_counts[3], 3);
        assert_eq!(r.extent(&msg, 1).unwrap(), free[1]);
        assert_eq!(r.extent(&msg, 2).unwrap(), prio[0]);
        assert!(r.extent(&msg, 3).is_err());
        // Frames beyond the guest, extents outside it, sizes that do not add up.
        assert_eq!(ReadyInfo::decode(&msg, guest / 2), Err(WireError::OutOfRange));
        let far = [Extent { gpa: guest - 4096, len: frames / 2 }];
        assert_eq!(ReadyInfo::decode(&ready(frames, &free, &far), guest), Err(WireError::OutOfRange));
        let short = [Extent { gpa: 0x100000, len: 100 }];
        assert_eq!(ReadyInfo::decode(&ready(frames, &short, &prio), guest), Err(WireError::OutOfRange));
        let wrap = [Extent { gpa: u64::MAX - 10, len: 32768 }];
        assert_eq!(ReadyInfo::decode(&ready(frames, &wrap, &prio), guest), Err(WireError::OutOfRange));
        // Truncations at every length are rejected, never panic.
        for cut in 0..msg.len() {
            assert!(ReadyInfo::decode(&msg[..cut], guest).is_err());
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Lcg(42);
        let mut buf = [0u8; 256];
        for _ in 0..20_000 {
            let len = (rng.next() % 256) as usize;
            for b in buf[..len].iter_mut() {
                *b = rng.next() as u8;
            }
            // Give some messages a valid prefix so deeper checks run.
            if rng.next() % 2 == 0 && len >= 16 {
                buf[..4].copy_from_slice(&wire::MAGIC.to_le_bytes());
                buf[4..6].copy_from_slice(&wire::VERSION.to_le_bytes());
                buf[12..16].copy_from_slice(&((len - 16) as u32).to_le_bytes());
            }
            let _ = Command::decode(&buf[..len]);
            let _ = ReadyInfo::decode(&buf[..len], 1 << 30);
            let _ = wire::decode_error(&buf[..len]);
        }
    }

    #[test]
    fn free_bitmap_runs() {
        let frames = 100;
        let mut bits = vec![0u8; wire::free_bitmap_len(frames) as usize];
        let mut expect = vec![false; frames as usize];
        for (start, n) in [(0u64, 3u64), (8, 16), (30, 1), (40, 25), (99, 1)] {
            for p in start..start + n {
                wire::set_free_bit(&mut bits, p, true).unwrap();
                expect[p as usize] = true;
            }
        }
        let map = FreeBitmap::new(&bits, frames).unwrap();
        let runs: Vec<_> = map.free_runs().collect();
        assert_eq!(runs, vec![(0, 3), (8, 16), (30, 1), (40, 25), (99, 1)]);
        assert_eq!(map.count_free(), 3 + 16 + 1 + 25 + 1);
        for p in 0..frames {
            assert_eq!(map.is_free(p), expect[p as usize]);
        }
        assert!(!map.is_free(frames + 5));
        assert!(wire::set_free_bit(&mut bits, 800, true).is_err());
        // Wrong size, stray bits past the end.
        assert!(FreeBitmap::new(&bits[..5], frames).is_err());
        let mut stray = bits.clone();
        *stray.last_mut().unwrap() |= 0x80;
        assert_eq!(FreeBitmap::new(&stray, frames).unwrap_err(), WireError::OutOfRange);
    }

    #[test]
    fn free_runs_match_a_naive_scan() {
        let mut rng = Lcg(7);
        for frames in [1u64, 7, 8, 9, 63, 64, 65, 1000, 4099] {
            let mut bits = vec![0u8; wire::free_bitmap_len(frames) as usize];
            for p in 0..frames {
                // Long runs and isolated bits.
                if (p / 37) % 2 == 0 || rng.next() % 5 == 0 {
                    wire::set_free_bit(&mut bits, p, true).unwrap();
                }
            }
            let map = FreeBitmap::new(&bits, frames).unwrap();
            let mut naive = Vec::new();
            let mut p = 0;
            while p < frames {
                if map.is_free(p) {
                    let s = p;
                    while p < frames && map.is_free(p) {
                        p += 1;
                    }
                    naive.push((s, p - s));
                } else {
                    p += 1;
                }
            }
            assert_eq!(map.free_runs().collect::<Vec<_>>(), naive, "frames={frames}");
        }
    }

    #[test]
    fn priority_map_classes() {
        let frames = 11;
        let mut nib = vec![0u8; wire::priority_map_len(frames) as usize];
        for p in 0..frames {
            wire::set_class(&mut nib, p, Class::Other).unwrap();
        }
        wire::set_class(&mut nib, 0, Class::Kernel).unwrap();
        wire::set_class(&mut nib, 1, Class::UserData).unwrap();
        wire::raise_class(&mut nib, 1, Class::PageTable).unwrap(); // higher: wins
        wire::raise_class(&mut nib, 0, Class::Other).unwrap(); // lower: ignored
        wire::set_class(&mut nib, 10, Class::Free).unwrap();
        let map = PriorityMap::new(&nib, frames).unwrap();
        assert_eq!(map.class(0), Class::Kernel);
        assert_eq!(map.class(1), Class::PageTable);
        assert_eq!(map.class(10), Class::Free);
        let c = map.counts();
        assert_eq!(c[Class::Other as usize], 8);
        assert_eq!(map.frames_of(Class::Other).count(), 8);
        assert_eq!(map.frames_of(Class::PageTable).collect::<Vec<_>>(), vec![1]);
        // An invalid class value is rejected at construction.
        let mut bad = nib.clone();
        bad[2] = 0xf0;
        assert_eq!(PriorityMap::new(&bad, frames).unwrap_err(), WireError::BadClass(15));
        assert!(PriorityMap::new(&nib[..3], frames).is_err());
    }
}
