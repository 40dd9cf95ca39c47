//! Streaming decisions: vTube's dynamic streaming (thesis 3.2.2, Figures
//! 3.9 to 3.12) and the baselines' orders. Pure logic: the simulator and
//! the streaming client call the same functions.

use crate::analysis::{Knowledge, Relation};

/// Where the decision starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Current {
    /// Session start (the first decision: initial buffering).
    Start,
    /// The cluster just accessed.
    Cluster(u32),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlannerConfig {
    /// Clusters whose interval from the current one is longer are not considered (µs).
    pub lookout_us: u64,
    /// A floor under equation 3.1's threshold: a cluster is selected only if
    /// `P(Y|X)` also exceeds this (0 = the thesis' rule alone). Trades
    /// misses (content then arrives by demand fetch and read-ahead) for a
    /// lower fetch ratio.
    pub min_probability: f64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self { lookout_us: 60_000_000, min_probability: 0.0 }
    }
}

/// A streaming decision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Clusters to deliver while the VM is paused, in order.
    pub buffer: Vec<u32>,
    /// Clusters to stream while the VM runs, in order, with the interval (µs)
    /// by which each is expected to be accessed.
    pub stream: Vec<(u32, u64)>,
    pub buffer_bytes: u64,
    pub stream_bytes: u64,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty() && self.stream.is_empty()
    }
}

/// vTube's decision on an access to `current`.
///
/// * Candidates: clusters related to `current` within the lookout window
///   that the client still lacks (`remaining(c)` = bytes of cluster `c` not
///   yet at the client or on their way), selected when
///   `P(Y|X) > Percentile(Size(Y))` (equation 3.1).
/// * On a demand fetch (`hint == false`) the current cluster itself is
///   needed now (interval 0). Candidates are ordered by interval; the
///   bandwidth required to deliver the first k of them on time is their
///   cumulative size over the k-th interval. Everything up to the last
///   point where that exceeds `bandwidth` (bytes/s) is buffered (the VM
///   pauses); the rest is streamed.
/// * A streaming hint (`hint == true`: the current cluster arrived in time,
///   no demand fetch) streams the selected clusters and never buffers.
pub fn plan(
    k: &Knowledge,
    current: Current,
    hint: bool,
    remaining: &dyn Fn(u32) -> u64,
    bandwidth: f64,
    cfg: &PlannerConfig,
) -> Plan {
    let rels: &[Relation] = match current {
        Current::Start => &k.start,
        Current::Cluster(c) => match k.clusters.get(c as usize) {
            Some(c) => &c.next,
            None => return Plan::default(),
        },
    };
    let mut cand: Vec<(u64, u32, u64)> = Vec::new();
    if let (Current::Cluster(c), false) = (current, hint) {
        let r = remaining(c);
        if r > 0 {
            cand.push((0, c, r));
        }
    }
    for r in rels {
        if r.interval_us > cfg.lookout_us {
            continue;
        }
        if Current::Cluster(r.to) == current {
            continue;
        }
        let size = k.clusters[r.to as usize].bytes;
        if r.p <= k.size_percentile(size) || r.p <= cfg.min_probability {
            continue;
        }
        let left = remaining(r.to);
        if left > 0 {
            cand.push((r.interval_us, r.to, left));
        }
    }
    cand.sort_by_key(|&(t, c, _)| (t, c));
    // The last point at which the required bandwidth exceeds what we have.
    let mut cum = 0u64;
    let mut last_over: Option<usize> = None;
    if !hint {
        for (i, &(t, _, b)) in cand.iter().enumerate() {
            cum += b;
            let secs = t as f64 / 1e6;
            if secs <= 0.0 || cum as f64 / secs > bandwidth {
                last_over = Some(i);
            }
        }
    }
    let mut p = Plan::default();
    for (i, &(t, c, b)) in cand.iter().enumerate() {
        if last_over.is_some_and(|l| i <= l) {
            p.buffer.push(c);
            p.buffer_bytes += b;
        } else {
            p.stream.push((c, t));
            p.stream_bytes += b;
        }
    }
    p
}

/// A small deterministic PRNG (xorshift64*), enough for window-randomised
/// selection and synthetic workloads.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Window-randomised selection: the next piece is drawn at random from the
/// first `window` pieces not yet taken (VMTorrent's compromise between
/// in-order playback and swarm diversity).
pub fn window_randomized<T: Copy>(order: &[T], window: usize, seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    let mut pool: Vec<T> = Vec::with_capacity(window.max(1));
    let mut it = order.iter();
    let mut out = Vec::with_capacity(order.len());
    loop {
        while pool.len() < window.max(1) {
            match it.next() {
                Some(&x) => pool.push(x),
                None => break,
            }
        }
        if pool.is_empty() {
            return out;
        }
        let i = rng.below(pool.len() as u64) as usize;
        // Keep the pool in order so the window stays the next `window` pieces.
        out.push(pool.remove(i));
    }
}

/// How much of a timed order to buffer before start: everything up to the
/// last point where the cumulative size over the expected access time
/// exceeds `bandwidth` (the same rule as [`plan`]). Returns the prefix length.
pub fn buffer_prefix(order: &[(u64, u64)], bandwidth: f64) -> usize {
    let mut cum = 0u64;
    let mut last = 0;
    for (i, &(t_us, b)) in order.iter().enumerate() {
        cum += b;
        let secs = t_us as f64 / 1e6;
        if secs <= 0.0 || cum as f64 / secs > bandwidth {
            last = i + 1;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{analyze, vmtorrent_profile, AnalysisParams};
    use crate::chunk::ChunkKey;
    use crate::trace::{Access, Trace, TraceHeader};

    fn trace(acc: &[(u64, u64)]) -> Trace {
        Trace {
            header: TraceHeader::default(),
            accesses: acc.iter().map(|&(ms, k)| Access { t_us: ms * 1000, key: ChunkKey::Mem(k) }).collect(),
        }
    }

    /// Clusters A = {0..10} at 0 s, B = {100..200} at 5 s, C = {300} at 8 s in
    /// every trace; D = {400..500} at 9 s in one trace of four.
    fn knowledge() -> Knowledge {
        let mk = |with_d: bool| {
            let mut v: Vec<(u64, u64)> = (0..10).map(|k| (k, k)).collect();
            v.extend((100..200).map(|k| (5000 + k - 100, k)));
            v.push((8000, 300));
            if with_d {
                v.extend((400..500).map(|k| (9000 + k - 400, k)));
            }
            trace(&v)
        };
        analyze(&[mk(true), mk(false), mk(false), mk(false)], &|_| 1000, &AnalysisParams::default()).unwrap()
    }

    #[test]
    fn buffer_then_stream_by_bandwidth() {
        let k = knowledge();
        assert_eq!(k.clusters.len(), 4);
        let a = k.cluster_of(ChunkKey::Mem(0)).unwrap();
        let b = k.cluster_of(ChunkKey::Mem(150)).unwrap();
        let c = k.cluster_of(ChunkKey::Mem(300)).unwrap();
        let d = k.cluster_of(ChunkKey::Mem(450)).unwrap();
        let size = |x: u32| k.clusters[x as usize].bytes;
        let cfg = PlannerConfig::default();
        // Start: A (10 kB, t=0) must be buffered. B (100 kB by 5 s) needs 22 kB/s.
        let p = plan(&k, Current::Start, false, &size, 1e6, &cfg);
        assert_eq!(p.buffer, vec![a]);
        assert_eq!(p.stream.iter().map(|s| s.0).collect::<Vec<_>>(), vec![b, c]);
        // D (p = 0.25, the largest cluster) fails equation 3.1.
        assert!(!p.stream.iter().any(|s| s.0 == d));
        // On a slow link, B cannot arrive in time while running: buffer it too.
        let p = plan(&k, Current::Start, false, &size, 15_000.0, &cfg);
        assert_eq!(p.buffer, vec![a, b]);
        assert_eq!(p.stream, vec![(c, 8_000_000)]);
        // What the client already has is not sent again.
        let p = plan(&k, Current::Start, false, &|x| if x == b { 0 } else { size(x) }, 15_000.0, &cfg);
        assert_eq!(p.buffer, vec![a]);
        // Demand fetch in B: B is needed now; C follows 3 s later.
        let p = plan(&k, Current::Cluster(b), false, &size, 1e6, &cfg);
        assert_eq!(p.buffer, vec![b]);
        assert_eq!(p.stream.iter().map(|s| s.0).collect::<Vec<_>>(), vec![c]);
        // A hint never buffers and never sends the current cluster.
        let p = plan(&k, Current::Cluster(b), true, &size, 1.0, &cfg);
        assert!(p.buffer.is_empty());
        assert_eq!(p.stream.iter().map(|s| s.0).collect::<Vec<_>>(), vec![c]);
        // A short lookout window sees nothing past it.
        let p =
            plan(&k, Current::Start, false, &size, 1e6, &PlannerConfig { lookout_us: 6_000_000, ..Default::default() });
        assert_eq!(p.stream.iter().map(|s| s.0).collect::<Vec<_>>(), vec![b]);
    }

    #[test]
    fn vmtorrent_order_and_window() {
        let t1 = trace(&[(0, 1), (10, 2), (20, 3)]);
        let t2 = trace(&[(0, 2), (30, 1), (40, 4)]);
        let p = vmtorrent_profile(&[t1, t2], &|_| 1);
        // Averages: 1 -> 15 ms, 2 -> 5 ms, 3 -> 20 ms, 4 -> 40 ms.
        let keys: Vec<u64> = p
            .iter()
            .map(|(k, _)| match k {
                ChunkKey::Mem(i) => *i,
                ChunkKey::Disk(_) => unreachable!(),
            })
            .collect();
        assert_eq!(keys, vec![2, 1, 3, 4]);
        let order: Vec<u32> = (0..1000).collect();
        let w = window_randomized(&order, 16, 7);
        assert_eq!(w.len(), 1000);
        let mut s = w.clone();
        s.sort();
        assert_eq!(s, order);
        assert_ne!(w, order);
        // Nothing leaves its window: the i-th pick is among the first i+16.
        assert!(w.iter().enumerate().all(|(i, &x)| (x as usize) < i + 16));
        assert_eq!(window_randomized(&order, 1, 7), order);
        // Buffer prefix: 10 pieces of 100 B at 1..10 s on a 50 B/s link.
        let timed: Vec<(u64, u64)> = (1..=10).map(|s| (s * 1_000_000, 100)).collect();
        assert_eq!(buffer_prefix(&timed, 50.0), 10);
        assert_eq!(buffer_prefix(&timed, 150.0), 0);
        assert_eq!(buffer_prefix(&[(0, 1)], 1e9), 1);
    }
}
