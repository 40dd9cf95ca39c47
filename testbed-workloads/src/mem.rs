//! Dirties a working set page by page. Each page carries a stamp (page,
//! generation) in its first word, checked before it is rewritten, so a page
//! that lost its content is counted as an error.

use crate::rng::mix;
use crate::Batch;

const PAGE_WORDS: usize = 512;

pub struct Mem<'a> {
    words: &'a mut [u64],
    pages: usize,
    next: usize,
    generation: u64,
    seed: u64,
}

impl<'a> Mem<'a> {
    /// Uses `words` (whole 4 KiB pages) as the working set.
    pub fn new(words: &'a mut [u64], seed: u64) -> Option<Self> {
        let pages = words.len() / PAGE_WORDS;
        (pages > 0).then_some(Self { words, pages, next: 0, generation: 0, seed })
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    #[inline]
    fn stamp(&self, page: usize, generation: u64) -> u64 {
        mix(self.seed ^ (page as u64) << 20 ^ generation) | 1
    }

    /// Dirties the next `n` pages of the sweep.
    pub fn run(&mut self, n: u64) -> Batch {
        let mut b = Batch::default();
        for _ in 0..n {
            let p = self.next;
            let base = p * PAGE_WORDS;
            let expected = if self.generation == 0 { 0 } else { self.stamp(p, self.generation - 1) };
            let found = self.words[base];
            if found != expected || self.words[base + PAGE_WORDS - 1] != expected {
                b.errors += 1;
            }
            b.checksum ^= found;
            let s = self.stamp(p, self.generation);
            for w in &mut self.words[base..base + PAGE_WORDS - 1] {
                *w = s;
            }
            self.words[base + PAGE_WORDS - 1] = s;
            b.ops += 1;
            self.next += 1;
            if self.next == self.pages {
                self.next = 0;
                self.generation += 1;
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    #[test]
    fn sweeps_verify_and_detect_loss() {
        let mut mem = vec![0u64; PAGE_WORDS * 8];
        let mut m = Mem::new(&mut mem, 3).unwrap();
        assert_eq!(m.run(8 * 5).errors, 0);
        m.words[3 * PAGE_WORDS] = 0; // page 3 lost its content
        let b = m.run(8);
        assert_eq!(b.errors, 1);
        assert_eq!(m.run(16).errors, 0);
    }
}
