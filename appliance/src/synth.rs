//! Synthetic but realistic appliance workloads, for the simulator and the
//! benchmark when no recorded traces are at hand.
//!
//! An appliance (1 GiB of memory, an 8 GiB disk) has *features*: sets of
//! memory pages and disk extents an application touches when the user does
//! one thing (start-up, open a document, a menu, a level of a game), of
//! heavy-tailed size. A session starts with the start-up feature, then
//! invokes features chosen by a per-user preference after think times; each
//! invocation touches most (not all) of the feature's chunks within a short
//! burst, plus some shared library pages and, now and then, user data that
//! no earlier session touched. Chunks compress to between 15% and 100% of
//! their size; part of memory is free and part of the disk is unallocated.

use crate::chunk::{ChunkKey, CHUNK_SIZE};
use crate::planner::Rng;
use crate::trace::{Access, Trace, TraceHeader};

/// Parameters of one user session.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SessionParams {
    pub seed: u64,
    /// Idealised session length, s.
    pub duration_s: f64,
    /// Mean think time between feature invocations, s.
    pub think_s: f64,
    /// Share of a feature's chunks one invocation touches.
    pub coverage: f64,
    /// Probability that an invocation also reads user data nobody read before.
    pub private_data: f64,
    /// Up to this many random shared chunks per invocation (timing-dependent code paths).
    pub noise: u64,
    /// Probability of following the current feature's workflow rather than
    /// jumping to another feature.
    pub follow: f64,
}

impl SessionParams {
    /// The `i`-th of a family of varied sessions.
    pub fn varied(i: u64) -> Self {
        let mut r = Rng::new(1000 + i);
        Self {
            seed: 77 + i * 7919,
            duration_s: 300.0 + r.unit() * 400.0,
            think_s: 3.0 + r.unit() * 6.0,
            coverage: 0.97 + r.unit() * 0.028,
            noise: 6,
            private_data: 0.02 + r.unit() * 0.04,
            follow: 0.6 + r.unit() * 0.3,
        }
    }
}

struct Feature {
    chunks: Vec<ChunkKey>,
    /// Shared (library) chunks this feature's code path always touches.
    libs: Vec<ChunkKey>,
    burst_s: f64,
    /// Likely next features (a workflow), most likely first.
    next: Vec<usize>,
}

/// A synthetic appliance.
pub struct Model {
    pub mem_chunks: u64,
    pub disk_chunks: u64,
    features: Vec<Feature>,
    shared: Vec<ChunkKey>,
    seed: u64,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

impl Model {
    /// `features` features; `scale` multiplies their sizes (1.0: a few hundred MB per session).
    pub fn new(seed: u64, features: usize, scale: f64) -> Self {
        Self::sized(seed, features, scale, 1 << 30, 8 << 30)
    }

    /// A model with `mem_bytes` of memory and a `disk_bytes` disk.
    pub fn sized(seed: u64, features: usize, scale: f64, mem_bytes: u64, disk_bytes: u64) -> Self {
        let mem_chunks = (mem_bytes / CHUNK_SIZE as u64).max(64);
        let disk_chunks = (disk_bytes / CHUNK_SIZE as u64).max(1024);
        let mut r = Rng::new(seed);
        let extent = |r: &mut Rng, n: usize| -> Vec<ChunkKey> {
            let mut v = Vec::with_capacity(n);
            while v.len() < n {
                if r.unit() < 0.55 {
                    let run = 1 + r.below(32);
                    let start = r.below(mem_chunks - run);
                    v.extend((start..start + run).map(ChunkKey::Mem));
                } else {
                    let run = 8 + r.below(248);
                    let start = r.below(disk_chunks / 2 - run);
                    v.extend((start..start + run).map(ChunkKey::Disk));
                }
            }
            v.truncate(n);
            v
        };
        let mut fs = Vec::with_capacity(features);
        for i in 0..features {
            let n = if i == 0 { 9000.0 } else { 150.0 * 2f64.powf(r.unit() * 5.5) } * scale;
            let burst_s = if i == 0 { 6.0 } else { 0.3 + r.unit() * 2.5 };
            let next = (0..3).map(|_| 1 + r.below(features.max(2) as u64 - 1) as usize).collect();
            fs.push(Feature { chunks: extent(&mut r, n.max(1.0) as usize), libs: Vec::new(), burst_s, next });
        }
        let shared = extent(&mut r, (4000.0 * scale) as usize);
        for f in &mut fs {
            f.libs = (0..r.below(60)).map(|_| shared[r.below(shared.len() as u64) as usize]).collect();
        }
        Self { mem_chunks, disk_chunks, features: fs, shared, seed }
    }

    /// Transfer size of a chunk: 0 for free memory (15%) and unallocated
    /// disk (the upper half, and 20% of the rest); else 600 to 4097 bytes.
    pub fn bytes(&self, k: ChunkKey) -> u64 {
        let (h, zero) = match k {
            ChunkKey::Mem(i) => {
                let h = mix(i ^ self.seed);
                (h, i >= self.mem_chunks || h % 100 < 15)
            }
            ChunkKey::Disk(i) => {
                let h = mix(i ^ self.seed ^ 0xd15c);
                (h, i >= self.disk_chunks / 2 || h % 100 < 20)
            }
        };
        if zero {
            0
        } else {
            600 + (h >> 8) % 3498
        }
    }

    /// Deterministic content for a chunk whose lz4 form is about
    /// `bytes(k)` long: that many pseudo-random bytes, then zeros.
    pub fn content(&self, k: ChunkKey) -> Vec<u8> {
        let mut v = vec![0u8; CHUNK_SIZE];
        let n = (self.bytes(k) as usize).min(CHUNK_SIZE);
        let seed = match k {
            ChunkKey::Mem(i) => mix(i ^ self.seed ^ 0x006d_656d),
            ChunkKey::Disk(i) => mix(i ^ self.seed ^ 0x6469_736b),
        };
        let mut x = seed | 1;
        for b in v[..n].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        v
    }

    /// Chunks and bytes a full download transfers.
    pub fn image(&self) -> (u64, u64) {
        let (mut n, mut b) = (0, 0);
        let keys = (0..self.mem_chunks).map(ChunkKey::Mem).chain((0..self.disk_chunks).map(ChunkKey::Disk));
        for k in keys {
            let x = self.bytes(k);
            if x > 0 {
                n += 1;
                b += x;
            }
        }
        (n, b)
    }

    /// One session's idealised trace.
    pub fn session(&self, p: &SessionParams) -> Trace {
        let mut r = Rng::new(p.seed);
        // This user's preference: Zipf-like weights over a per-user permutation
        // that keeps the popular features mostly popular.
        let nf = self.features.len();
        let mut order: Vec<usize> = (1..nf).collect();
        for i in 0..order.len() {
            let j = (i + r.below(4) as usize).min(order.len() - 1);
            order.swap(i, j);
        }
        let weights: Vec<f64> = (0..order.len()).map(|i| 1.0 / (i as f64 + 1.0)).collect();
        let total: f64 = weights.iter().sum();
        let mut seen = std::collections::HashSet::new();
        let mut acc: Vec<Access> = Vec::new();
        let mut push = |acc: &mut Vec<Access>, t: f64, k: ChunkKey| {
            if seen.insert(k) {
                acc.push(Access { t_us: (t * 1e6) as u64, key: k });
            }
        };
        let mut t = 0.0;
        let mut invoke = |acc: &mut Vec<Access>, r: &mut Rng, t: &mut f64, f: &Feature| {
            let n = f.chunks.len().max(1) as f64;
            for (i, &k) in f.chunks.iter().enumerate() {
                if r.unit() < p.coverage {
                    push(acc, *t + f.burst_s * i as f64 / n, k);
                }
            }
            *t += f.burst_s;
            for &k in &f.libs {
                push(acc, *t, k);
                *t += 0.001;
            }
            for _ in 0..r.below(p.noise + 1) {
                let k = self.shared[r.below(self.shared.len() as u64) as usize];
                push(acc, *t, k);
                *t += 0.001;
            }
            if r.unit() < p.private_data {
                let run = 4 + r.below(60);
                let start = self.disk_chunks / 4 + r.below(self.disk_chunks / 4 - run);
                for k in start..start + run {
                    push(acc, *t, ChunkKey::Disk(k));
                    *t += 0.0005;
                }
            }
        };
        invoke(&mut acc, &mut r, &mut t, &self.features[0]);
        let mut cur = 0;
        while t < p.duration_s {
            t += (-p.think_s * (1.0 - r.unit()).ln()).clamp(0.2, 60.0);
            // Mostly follow a workflow (one of the current feature's likely
            // successors); sometimes jump to a feature this user likes.
            let u = r.unit();
            let pick = if u < p.follow {
                let f = &self.features[cur];
                let v = r.unit();
                f.next[if v < 0.6 {
                    0
                } else if v < 0.85 {
                    1
                } else {
                    2
                }]
            } else {
                let mut x = r.unit() * total;
                let mut pick = order[order.len() - 1];
                for (i, w) in weights.iter().enumerate() {
                    if x < *w {
                        pick = order[i];
                        break;
                    }
                    x -= w;
                }
                pick
            };
            invoke(&mut acc, &mut r, &mut t, &self.features[pick]);
            cur = pick;
        }
        acc.sort_by_key(|a| a.t_us);
        Trace {
            header: TraceHeader {
                appliance: "synthetic".into(),
                manifest: format!("model-{}", self.seed),
                params: serde_json::json!({
                    "seed": p.seed, "duration_s": p.duration_s, "think_s": p.think_s,
                    "coverage": p.coverage, "private_data": p.private_data, "follow": p.follow,
                }),
                ..Default::default()
            },
            accesses: acc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::vmtorrent_profile;
    use crate::analysis::{analyze, AnalysisParams};
    use crate::planner::PlannerConfig;
    use crate::sim::{simulate, Link, Policy};

    #[test]
    fn small_model_end_to_end() {
        let m = Model::new(3, 30, 0.05);
        let mut p = SessionParams::varied(0);
        p.duration_s = 120.0;
        let a = m.session(&p);
        assert!(a == m.session(&p), "sessions are deterministic");
        assert!(a.accesses.len() > 500);
        let b = Trace::parse(&a.to_bytes()).unwrap();
        assert!(a.accesses == b.accesses);
        let train: Vec<Trace> = (0..5)
            .map(|i| {
                let mut p = SessionParams::varied(i);
                p.duration_s = 120.0;
                m.session(&p)
            })
            .collect();
        let bytes = |k| m.bytes(k);
        let k = analyze(&train, &bytes, &AnalysisParams::default()).unwrap();
        let mut test = SessionParams::varied(99);
        test.duration_s = 120.0;
        let t = m.session(&test);
        let link = Link::new(7.2, 120.0);
        let v = simulate(&t, &Policy::VTube { knowledge: &k, cfg: PlannerConfig::default() }, link, &bytes, 0);
        let d = simulate(&t, &Policy::DemandOnly, link, &bytes, 0);
        let prof = vmtorrent_profile(&train, &bytes);
        let vt = simulate(&t, &Policy::VmTorrent { profile: &prof, window: 64, seed: 1 }, link, &bytes, 0);
        assert_eq!(v.accessed_chunks, d.accessed_chunks);
        assert_eq!(v.accessed_chunks, vt.accessed_chunks);
        // Knowledge turns most demand fetches into prefetches.
        assert!(v.miss_rate < d.miss_rate / 3.0, "vtube {v:?} demand {d:?}");
        assert!(v.session_s < d.session_s, "vtube {v:?} demand {d:?}");
    }
}
