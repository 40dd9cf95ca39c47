//! Mutation fuzzing on stable Rust, as ordinary tests.
//!
//! A target is a closure over bytes (a decoder, a parser, a state machine
//! fed one input). [`run`] starts from valid seeds and feeds it mutated
//! copies: bit flips, interesting integers (0, 1, -1, 2^31, 2^32, u64::MAX,
//! lengths near the input's) written at any offset in both byte orders,
//! inserted, deleted, duplicated and truncated ranges, splices of two
//! seeds. Every input is checked for a panic and, with [`CountingAlloc`]
//! installed as the test binary's global allocator, for the largest
//! allocation it caused: at most `4 x input + fixed` bytes.
//!
//! A target whose format carries checksums or MACs re-seals each mutated
//! input (`fix` in [`Target`]) so the decoders behind the check are reached.
//!
//! Iterations: `FUZZ_ITERS` (default per target, small enough for
//! `scripts/test`); the documented long run sets `FUZZ_ITERS=1000000`.
//! `FUZZ_SEED` picks the random sequence (a failure prints it and the input).
//!
//! Why not a crate: `bolero` and `arbitrary` on stable generate structured
//! or random values but do not mutate a corpus of valid inputs, and random
//! bytes rarely get past a magic, a version and a CRC; this mutator is
//! deliberately small (a splitmix64 generator and a dozen mutations).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

/// A global allocator that records, per thread and while a target runs,
/// the largest single allocation. Install it in the test binary:
/// `#[global_allocator] static A: fuzz_harness::CountingAlloc = fuzz_harness::CountingAlloc;`
pub struct CountingAlloc;

fn note(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
        }
    });
}

// SAFETY: every call forwards to the system allocator with the caller's own
// layout and pointer; the bookkeeping touches only thread-local cells and
// never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout (GlobalAlloc's contract).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (System) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from System with `layout`; the caller's contract holds.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// splitmix64: small, fast, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Re-seals a mutated input in place.
pub type Fixer = dyn Fn(&mut Vec<u8>);

/// What is fuzzed.
pub struct Target<'a> {
    pub name: &'a str,
    /// Valid inputs to start from (at least one).
    pub seeds: Vec<Vec<u8>>,
    /// Iterations when `FUZZ_ITERS` is not set.
    pub default_iters: u64,
    /// Longest input tried.
    pub max_len: usize,
    /// Largest allocation allowed beyond 4 x the input's length.
    pub alloc_slack: usize,
    /// Re-seals a mutated input (recomputes checksums/MACs); identity if `None`.
    pub fix: Option<&'a Fixer>,
}

impl<'a> Target<'a> {
    pub fn new(name: &'a str, seeds: Vec<Vec<u8>>) -> Self {
        Self { name, seeds, default_iters: 20_000, max_len: 1 << 16, alloc_slack: 1 << 20, fix: None }
    }
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// One mutation of `input` (in place), using `other` for splices.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8], max_len: usize) {
    let len = input.len();
    match rng.below(12) {
        0 | 1 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        2 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.next_u64() as u8;
        }
        3 | 4 if len > 0 => {
            // An interesting integer (or one near the input's length), 1/2/4/8 bytes, LE or BE.
            let width = [1usize, 2, 4, 8][rng.below(4)];
            let v = if rng.below(4) == 0 {
                (len as u64).wrapping_add(rng.below(17) as u64).wrapping_sub(8)
            } else {
                INTERESTING[rng.below(INTERESTING.len())]
            };
            let bytes = if rng.below(2) == 0 { v.to_le_bytes() } else { v.to_be_bytes() };
            let bytes =
                if bytes[0] == 0 && width < 8 && rng.below(2) == 0 { &bytes[8 - width..] } else { &bytes[..width] };
            let i = rng.below(len);
            for (k, b) in bytes.iter().enumerate() {
                if i + k < len {
                    input[i + k] = *b;
                }
            }
        }
        5 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            input.drain(i..i + n);
        }
        6 if len > 1 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            let chunk: Vec<u8> = input[i..i + n].to_vec();
            let at = rng.below(len);
            input.splice(at..at, chunk);
        }
        7 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let fill: Vec<u8> = (0..n).map(|_| if rng.below(2) == 0 { rng.next_u64() as u8 } else { 0 }).collect();
            input.splice(at..at, fill);
        }
        8 if len > 0 => input.truncate(rng.below(len)),
        9 if !other.is_empty() && len > 0 => {
            // Splice: a prefix of this input, a suffix of the other.
            let a = rng.below(len);
            let b = rng.below(other.len());
            input.truncate(a);
            input.extend_from_slice(&other[b..]);
        }
        10 if len > 0 => {
            // ASCII digits / text mutations for textual formats.
            let i = rng.below(len);
            input[i] = b"0123456789-+:, \r\n\"{}[]\xc3\xa9\xff"[rng.below(24)];
        }
        _ if len > 0 => {
            let i = rng.below(len);
            input[i] = input[i].wrapping_add(1 + rng.below(3) as u8);
        }
        _ => input.push(rng.next_u64() as u8),
    }
    input.truncate(max_len);
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Report {
    pub iterations: u64,
    /// The largest allocation any input caused, and that input's length.
    pub peak_alloc: (usize, usize),
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn hex(b: &[u8]) -> String {
    b.iter().take(4096).map(|x| format!("{x:02x}")).collect()
}

/// Runs `target.seeds` through `f` and then mutated inputs; panics (with the
/// seed, iteration and input in hex) on the first input that makes `f`
/// panic or allocate more than 4 x its length plus `alloc_slack`.
pub fn run(target: Target<'_>, mut f: impl FnMut(&[u8])) -> Report {
    assert!(!target.seeds.is_empty(), "{}: no seed", target.name);
    let iters = env_u64("FUZZ_ITERS").unwrap_or(target.default_iters);
    let seed = env_u64("FUZZ_SEED").unwrap_or(0x5eed_0000 ^ target.name.len() as u64);
    let mut rng = Rng::new(seed ^ target.name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    let mut peak = (0usize, 0usize);
    let prev_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut one = |input: &[u8], i: u64, peak: &mut (usize, usize)| {
        PEAK.with(|p| p.set(0));
        TRACK.with(|t| t.set(true));
        let r = catch_unwind(AssertUnwindSafe(|| f(input)));
        TRACK.with(|t| t.set(false));
        let got = PEAK.with(|p| p.get());
        if got > peak.0 {
            *peak = (got, input.len());
        }
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(format!(
                "{}: input {i} (FUZZ_SEED={seed}) panicked: {msg}\ninput ({} bytes): {}",
                target.name,
                input.len(),
                hex(input)
            ));
        }
        let bound = 4 * input.len() + target.alloc_slack;
        if got > bound {
            return Err(format!(
                "{}: input {i} (FUZZ_SEED={seed}) allocated {got} bytes at once (bound {bound})\ninput ({} bytes): {}",
                target.name,
                input.len(),
                hex(input)
            ));
        }
        Ok(())
    };
    let mut failure = None;
    for (i, s) in target.seeds.iter().enumerate() {
        if let Err(e) = one(s, i as u64, &mut peak) {
            failure = Some(e);
            break;
        }
    }
    let mut done = 0u64;
    while failure.is_none() && done < iters {
        let a = rng.below(target.seeds.len());
        let b = rng.below(target.seeds.len());
        let mut input = target.seeds[a].clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut input, &target.seeds[b], target.max_len);
        }
        if let Some(fix) = target.fix {
            if rng.below(8) != 0 {
                fix(&mut input);
            }
        }
        if let Err(e) = one(&input, done, &mut peak) {
            failure = Some(e);
        }
        done += 1;
    }
    std::panic::set_hook(prev_hook);
    if let Some(e) = failure {
        panic!("{e}");
    }
    eprintln!("fuzz {}: {done} inputs, largest allocation {} bytes (input of {} bytes)", target.name, peak.0, peak.1);
    Report { iterations: done, peak_alloc: peak }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_within_bounds_and_vary() {
        let mut rng = Rng::new(1);
        let seed = b"hello, fuzzing world".to_vec();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let mut x = seed.clone();
            mutate(&mut rng, &mut x, b"other", 64);
            assert!(x.len() <= 64);
            seen.insert(x);
        }
        assert!(seen.len() > 1000, "{} distinct", seen.len());
    }

    #[test]
    #[should_panic(expected = "panicked: found it")]
    fn a_panicking_target_is_reported_with_its_input() {
        run(Target { default_iters: 100_000, ..Target::new("finds", vec![b"aaaa".to_vec()]) }, |b| {
            if b.first() == Some(&b'b') {
                panic!("found it");
            }
        });
    }
}
