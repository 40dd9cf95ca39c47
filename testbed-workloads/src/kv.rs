//! An in-memory key-value store with Zipfian keys (YCSB) and a checksum on
//! every value, verified on every read.
//!
//! The store is a hash table with open addressing over fixed-size slots:
//! `[key+1, version, checksum, value words...]` (0 in the first word marks an
//! empty slot). Every key in `0..keys` is inserted by [`Kv::fill`]; after that
//! a GET that finds no key, or a value whose checksum does not match, is an
//! error: a lost or corrupted page cannot go unnoticed.

use crate::math::{ln, pow};
use crate::rng::{checksum_words, mix, Rng};
use crate::Batch;

/// YCSB's Zipfian generator over `0..n` (Gray et al., "Quickly generating
/// billion-record synthetic databases").
#[derive(Clone, Debug)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    half_pow_theta: f64,
}

/// sum_{i=1..n} i^-theta: exact for the first terms, the integral for the tail.
fn zeta(n: u64, theta: f64) -> f64 {
    const EXACT: u64 = 10_000;
    let mut sum = 0.0;
    for i in 1..=n.min(EXACT) {
        sum += pow(i as f64, -theta);
    }
    if n > EXACT {
        let (a, b) = (EXACT as f64 + 0.5, n as f64 + 0.5);
        sum += if (theta - 1.0).abs() < 1e-12 {
            ln(b) - ln(a)
        } else {
            (pow(b, 1.0 - theta) - pow(a, 1.0 - theta)) / (1.0 - theta)
        };
    }
    sum
}

impl Zipf {
    /// `theta` in [0, 1); 0 is uniform.
    pub fn new(n: u64, theta: f64) -> Self {
        let n = n.max(1);
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - pow(2.0 / n as f64, 1.0 - theta)) / (1.0 - zeta2 / zetan);
        Self { n, theta, alpha, zetan, eta, half_pow_theta: pow(0.5, theta) }
    }

    /// A rank in `0..n`; rank 0 is the most popular.
    #[inline]
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        if self.theta == 0.0 {
            return rng.below(self.n);
        }
        let u = rng.next_f64();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + self.half_pow_theta {
            return 1.min(self.n - 1);
        }
        let r = (self.n as f64 * pow(self.eta * u - self.eta + 1.0, self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

/// Store parameters.
#[derive(Clone, Copy, Debug)]
pub struct KvConfig {
    /// Value size in bytes (rounded up to a multiple of 8).
    pub value_size: usize,
    pub sets: u32,
    pub gets: u32,
    /// Zipf skew in [0, 1).
    pub theta: f64,
    pub seed: u64,
}

const HDR_WORDS: usize = 3;
/// Table load factor: keys = slots * 3 / 4.
const LOAD_NUM: usize = 3;
const LOAD_DEN: usize = 4;

/// The store.
pub struct Kv<'a> {
    table: &'a mut [u64],
    slot_words: usize,
    slots: usize,
    keys: u64,
    zipf: Zipf,
    rng: Rng,
    sets: u64,
    total: u64,
    seed: u64,
    version: u64,
    filled: u64,
}

impl<'a> Kv<'a> {
    /// Lays a store over `table`. Returns `None` if it is too small for a
    /// handful of keys.
    pub fn new(table: &'a mut [u64], cfg: KvConfig) -> Option<Self> {
        let value_words = cfg.value_size.div_ceil(8).max(1);
        let slot_words = HDR_WORDS + value_words;
        let slots = table.len() / slot_words;
        let keys = (slots * LOAD_NUM / LOAD_DEN) as u64;
        if keys < 16 || cfg.sets + cfg.gets == 0 {
            return None;
        }
        Some(Self {
            table,
            slot_words,
            slots,
            keys,
            zipf: Zipf::new(keys, cfg.theta),
            rng: Rng::new(cfg.seed),
            sets: cfg.sets as u64,
            total: (cfg.sets + cfg.gets) as u64,
            seed: cfg.seed,
            version: 1,
            filled: 0,
        })
    }

    /// Number of keys the store holds once filled.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// Whether every key has been inserted.
    pub fn is_filled(&self) -> bool {
        self.filled >= self.keys
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        ((mix(key ^ self.seed) as u128 * self.slots as u128) >> 64) as usize
    }

    #[inline]
    fn value_word(&self, key: u64, version: u64, i: usize) -> u64 {
        mix(self.seed ^ key.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.rotate_left(32) ^ i as u64)
    }

    /// Finds the slot of `key`, or the empty slot where it would go.
    /// `None` if the probe sequence is exhausted (table full or corrupted).
    #[inline]
    fn find(&self, key: u64) -> Option<usize> {
        let mut idx = self.home(key);
        for _ in 0..self.slots {
            let w0 = self.table[idx * self.slot_words];
            if w0 == key + 1 || w0 == 0 {
                return Some(idx);
            }
            idx += 1;
            if idx == self.slots {
                idx = 0;
            }
        }
        None
    }

    fn set(&mut self, key: u64, version: u64) -> bool {
        let Some(idx) = self.find(key) else { return false };
        let base = idx * self.slot_words;
        let vw = self.slot_words - HDR_WORDS;
        for i in 0..vw {
            self.table[base + HDR_WORDS + i] = self.value_word(key, version, i);
        }
        let sum = checksum_words(&self.table[base + HDR_WORDS..base + self.slot_words]) ^ version;
        self.table[base + 1] = version;
        self.table[base + 2] = sum;
        self.table[base] = key + 1;
        true
    }

    /// Returns the value's checksum, or `None` if the key is missing or its
    /// value does not match its checksum.
    fn get(&self, key: u64) -> Option<u64> {
        let idx = self.find(key)?;
        let base = idx * self.slot_words;
        if self.table[base] != key + 1 {
            return None;
        }
        let version = self.table[base + 1];
        let sum = checksum_words(&self.table[base + HDR_WORDS..base + self.slot_words]) ^ version;
        (sum == self.table[base + 2]).then_some(sum)
    }

    /// Inserts up to `n` more keys; returns what was done.
    pub fn fill(&mut self, n: u64) -> Batch {
        let end = (self.filled + n).min(self.keys);
        let mut b = Batch::default();
        for key in self.filled..end {
            if !self.set(key, 0) {
                b.errors += 1;
            }
            b.ops += 1;
        }
        self.filled = end;
        b
    }

    /// Runs `n` requests (SET or GET by the configured ratio, keys Zipfian,
    /// scrambled over the key space as in YCSB).
    #[inline]
    pub fn run(&mut self, n: u64) -> Batch {
        let mut b = Batch::default();
        for _ in 0..n {
            let rank = self.zipf.sample(&mut self.rng);
            let key = ((mix(rank) as u128 * self.keys as u128) >> 64) as u64;
            if self.rng.below(self.total) < self.sets {
                self.version += 1;
                if !self.set(key, self.version) {
                    b.errors += 1;
                }
            } else {
                match self.get(key) {
                    Some(sum) => b.checksum ^= sum,
                    None => b.errors += 1,
                }
            }
            b.ops += 1;
        }
        b
    }

    /// Verifies every key (a full scan); returns the number of bad keys.
    pub fn verify_all(&self) -> u64 {
        (0..self.filled).filter(|&k| self.get(k).is_none()).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    fn cfg() -> KvConfig {
        KvConfig { value_size: 256, sets: 1, gets: 9, theta: 0.99, seed: 7 }
    }

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let n = 100_000;
        let z = Zipf::new(n, 0.99);
        let mut rng = Rng::new(1);
        let mut top = 0;
        let mut top10 = 0;
        for _ in 0..200_000 {
            let r = z.sample(&mut rng);
            assert!(r < n);
            top += (r == 0) as u32;
            top10 += (r < 10) as u32;
        }
        // With theta 0.99 over 1e5 items, rank 0 draws ~8% and the top 10 ~24%.
        assert!(top > 10_000 && top < 22_000, "rank 0 drawn {top} times");
        assert!(top10 > 35_000 && top10 < 65_000, "top 10 drawn {top10} times");
        let u = Zipf::new(1000, 0.0);
        let hits = (0..100_000).filter(|_| u.sample(&mut rng) == 0).count();
        assert!(hits < 300, "uniform rank 0 drawn {hits} times");
    }

    #[test]
    fn zeta_matches_the_exact_sum() {
        for &(n, theta) in &[(100u64, 0.99), (50_000, 0.5), (2_000_000, 0.99), (2_000_000, 0.2)] {
            let exact: f64 = (1..=n).map(|i| (i as f64).powf(-theta)).sum();
            let z = zeta(n, theta);
            assert!((z - exact).abs() <= 1e-9 * exact, "zeta({n}, {theta}) = {z}, exact {exact}");
        }
    }

    #[test]
    fn fill_and_run_without_errors() {
        let mut mem = vec![0u64; 1 << 18];
        let mut kv = Kv::new(&mut mem, cfg()).unwrap();
        while !kv.is_filled() {
            assert_eq!(kv.fill(1000).errors, 0);
        }
        let b = kv.run(100_000);
        assert_eq!(b.ops, 100_000);
        assert_eq!(b.errors, 0);
        assert_eq!(kv.verify_all(), 0);
    }

    #[test]
    fn corruption_and_loss_are_detected() {
        let mut mem = vec![0u64; 1 << 16];
        {
            let mut kv = Kv::new(&mut mem, cfg()).unwrap();
            kv.fill(u64::MAX);
        }
        // Flip one bit in some value, and zero a whole 4 KiB page (a lost page).
        mem[100] ^= 1 << 17;
        for w in &mut mem[4096..4096 + 512] {
            *w = 0;
        }
        let mut kv = Kv::new(&mut mem, cfg()).unwrap();
        kv.filled = kv.keys;
        let bad = kv.verify_all();
        assert!(bad >= 2, "only {bad} bad keys detected");
        let b = kv.run(200_000);
        assert!(b.errors > 0);
    }

    #[test]
    fn too_small_is_refused() {
        let mut mem = vec![0u64; 10];
        assert!(Kv::new(&mut mem, cfg()).is_none());
    }
}
