//! `app`: a virtual appliance's user session over a large, prefilled state.
//!
//! Streaming (thesis 002 chapter 3) is about appliances whose memory holds
//! far more than one session uses: a program's code, its libraries, its
//! assets, caches. This workload models one. At boot it fills `pages` pages
//! of *state* with verifiable content; the state holds a *core* (what every
//! session needs first, like an application's start-up code) and `features`
//! regions spread across it (menus, levels, documents, tools), each loaded
//! page by page when the user first opens it; the rest of the state is
//! cold. A *session* (the user's visit) opens the core and then `steps`
//! features, pausing `think` ms between them. Like an application's
//! workflows, each feature has a usual next one (a property of the
//! appliance, fixed by the boot seed) which the user follows with
//! probability `flow`; otherwise, and for the first, the user jumps to a
//! feature picked by a Zipf popularity (also the appliance's) with this
//! user's own choices (the session seed). Every page read is verified
//! word by word against what the fill wrote.

use crate::kv::Zipf;
use crate::rng::{checksum_words, mix, Rng};
use crate::Batch;

/// u64 words per 4 KiB page.
pub const PAGE_WORDS: usize = 512;
/// Pages of the core (at most; an eighth of a small state).
pub const CORE_PAGES: u64 = 256;
/// Skew of feature popularity.
const FEATURE_THETA: f64 = 0.8;

/// Where the core and the features lie in the state, and what every page holds.
#[derive(Clone, Debug)]
pub struct AppLayout {
    pages: u64,
    features: u32,
    seed: u64,
}

impl AppLayout {
    /// `None` if `pages` cannot hold the core and one page per feature.
    pub fn new(pages: u64, features: u32, seed: u64) -> Option<Self> {
        let l = Self { pages, features: features.max(1), seed };
        (pages > l.core_pages() + l.features as u64).then_some(l)
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn features(&self) -> u32 {
        self.features
    }

    fn core_pages(&self) -> u64 {
        CORE_PAGES.min(self.pages / 8).max(1)
    }

    /// The core: (first page, pages).
    pub fn core(&self) -> (u64, u64) {
        (0, self.core_pages())
    }

    /// Feature `f`: (first page, pages). Features start at equal spacing
    /// across the state after the core; their sizes vary from 256 KiB to
    /// 2 MiB (64 to 512 pages) with the appliance's seed, clipped to the spacing.
    pub fn feature(&self, f: u32) -> (u64, u64) {
        let core = self.core_pages();
        let spacing = (self.pages - core) / self.features as u64;
        let len = 64u64 << (mix(self.seed ^ 0xfea7_u64 ^ (f as u64) << 20) % 4);
        (core + f as u64 * spacing, len.min(spacing).max(1))
    }

    /// Word `i` of page `page`: pseudo-random, each word repeated once (so
    /// the state compresses about as well as program code, not as noise).
    #[inline]
    pub fn word(&self, page: u64, i: usize) -> u64 {
        mix(self.seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 / 2)) | 1
    }

    /// Fills page `page` (a slice of [`PAGE_WORDS`] words).
    pub fn fill_page(&self, page: u64, words: &mut [u64]) {
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.word(page, i);
        }
    }

    /// Verifies page `page`: one operation, an error if any word differs.
    pub fn read_page(&self, page: u64, words: &[u64]) -> Batch {
        let bad = words.iter().enumerate().any(|(i, &w)| w != self.word(page, i));
        Batch { ops: 1, errors: bad as u64, checksum: checksum_words(words) ^ page }
    }

    /// The feature that usually follows feature `f` (a workflow).
    pub fn successor(&self, f: u32) -> u32 {
        let n = self.features as u64;
        let next = (f as u64 + 1 + mix(self.seed ^ 0x5cc ^ (f as u64) << 8) % (n - 1).max(1)) % n;
        next as u32
    }

    /// The feature opened at popularity rank `rank` (0 = most popular): a
    /// permutation fixed by the appliance's seed.
    pub fn feature_at_rank(&self, rank: u32) -> u32 {
        let n = self.features as u64;
        // An affine permutation of 0..n: a multiplier coprime with n.
        let mut a = (mix(self.seed ^ 0xa11) % n) | 1;
        while gcd(a, n) != 1 {
            a += 2;
        }
        let b = mix(self.seed ^ 0xb22) % n;
        ((a * rank as u64 + b) % n) as u32
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A user's session: the sequence of features opened after the core.
pub struct AppSession {
    layout: AppLayout,
    zipf: Zipf,
    rng: Rng,
    left: u32,
    flow_pct: u32,
    current: Option<u32>,
}

impl AppSession {
    /// `steps` features; the usual next feature with probability `flow_pct`%.
    pub fn new(layout: &AppLayout, steps: u32, flow_pct: u32, seed: u64) -> Self {
        Self {
            layout: layout.clone(),
            zipf: Zipf::new(layout.features as u64, FEATURE_THETA),
            rng: Rng::new(seed ^ 0x5e55),
            left: steps,
            flow_pct,
            current: None,
        }
    }

    /// The next feature to open; `None` when the session is over.
    pub fn next_feature(&mut self) -> Option<u32> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let follow = self.rng.below(100) < self.flow_pct as u64;
        let f = match self.current {
            Some(c) if follow => self.layout.successor(c),
            _ => self.layout.feature_at_rank(self.zipf.sample(&mut self.rng) as u32),
        };
        self.current = Some(f);
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::vec;

    #[test]
    fn layout_content_and_sessions() {
        let l = AppLayout::new(80_000, 32, 7).unwrap();
        assert_eq!(l.core(), (0, 256));
        let mut prev_end = 256;
        for f in 0..32 {
            let (s, n) = l.feature(f);
            assert!(s >= prev_end && (64..=512).contains(&n), "feature {f}: {s} {n}");
            prev_end = s + n;
        }
        assert!(prev_end <= l.pages());
        let ranks: HashSet<u32> = (0..32).map(|r| l.feature_at_rank(r)).collect();
        assert_eq!(ranks.len(), 32, "a permutation");

        let mut page = vec![0u64; PAGE_WORDS];
        l.fill_page(9, &mut page);
        assert_eq!(l.read_page(9, &page).errors, 0);
        assert_eq!(l.read_page(10, &page).errors, 1);
        page[100] ^= 4;
        assert_eq!(l.read_page(9, &page).errors, 1);

        // Sessions of different users differ; the same user repeats.
        let picks = |seed| {
            let mut s = AppSession::new(&l, 12, 50, seed);
            std::iter::from_fn(|| s.next_feature()).collect::<vec::Vec<_>>()
        };
        // Always following the workflow: each feature is the last one's successor.
        let mut s = AppSession::new(&l, 6, 100, 1);
        let w: vec::Vec<u32> = std::iter::from_fn(|| s.next_feature()).collect();
        assert!(w.windows(2).all(|p| p[1] == l.successor(p[0]) && p[1] != p[0]), "{w:?}");
        assert_eq!(picks(3).len(), 12);
        assert_eq!(picks(3), picks(3));
        assert_ne!(picks(3), picks(4));
        assert!(AppLayout::new(100, 200, 1).is_none());
    }
}
