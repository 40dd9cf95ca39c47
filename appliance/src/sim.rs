//! Replays a session trace against a link model (bandwidth, round-trip
//! time) under one streaming policy and reports the metrics of thesis
//! Table 3.2: launch time, fetch ratio, buffering ratio, buffering events
//! per minute and miss rate.
//!
//! Model: one server sending over a serial link of `bandwidth` bytes/s;
//! requests take RTT/2 to reach the server and data RTT/2 to come back.
//! Demand fetches and buffered chunks go before queued prefetches (a chunk
//! already on the wire finishes first). The VM executes the trace's
//! idealised timeline; every wait for the network (buffering, demand
//! fetches, chunks still in flight) shifts the rest of it.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::Serialize;

use crate::analysis::Knowledge;
use crate::chunk::{ChunkKey, CHUNK_SIZE};
use crate::planner::{self, Current, PlannerConfig};
use crate::trace::Trace;

/// A network link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Bytes per second.
    pub bandwidth: f64,
    /// Round-trip time, seconds.
    pub rtt: f64,
}

impl Link {
    pub fn new(mbit_per_s: f64, rtt_ms: f64) -> Self {
        Self { bandwidth: mbit_per_s * 1e6 / 8.0, rtt: rtt_ms / 1e3 }
    }
}

/// How state reaches the client.
pub enum Policy<'a> {
    /// Download every stored chunk before starting.
    FullDownload { chunks: u64, bytes: u64 },
    /// Fetch each chunk on first access.
    DemandOnly,
    /// VMTorrent's profile order with window-randomised selection; the
    /// initial buffering decision uses the same rule as vTube.
    VmTorrent { profile: &'a [(ChunkKey, u64)], window: usize, seed: u64 },
    /// vTube's dynamic streaming.
    VTube { knowledge: &'a Knowledge, cfg: PlannerConfig },
}

impl Policy<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Policy::FullDownload { .. } => "full download",
            Policy::DemandOnly => "demand only",
            Policy::VmTorrent { .. } => "VMTorrent order",
            Policy::VTube { .. } => "vTube",
        }
    }
}

/// Thesis Table 3.2 (and 3.3) metrics of one simulated session.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Metrics {
    pub policy: String,
    /// Session start to VM start (metadata plus initial buffering), s.
    pub launch_s: f64,
    /// Session start to the last access, s.
    pub session_s: f64,
    /// The trace's own (idealised) duration, s.
    pub workload_s: f64,
    pub accessed_chunks: u64,
    pub fetched_chunks: u64,
    /// Encoded bytes sent over the link.
    pub fetched_wire_bytes: u64,
    /// Fetched / accessed state.
    pub fetch_ratio: f64,
    /// Time paused for buffering, including the launch, s.
    pub buffering_s: f64,
    pub buffering_ratio: f64,
    pub buffering_events: u64,
    pub buffering_per_min: f64,
    /// Chunks demand-fetched outside buffering.
    pub misses: u64,
    pub miss_rate: f64,
    /// Time the VM waited on demand fetches and late prefetches, s.
    pub stall_s: f64,
    /// Accesses to chunks that were on their way but not yet there.
    pub late: u64,
}

impl Metrics {
    pub fn accessed_mb(&self) -> f64 {
        (self.accessed_chunks * CHUNK_SIZE as u64) as f64 / 1048576.0
    }
    pub fn fetched_mb(&self) -> f64 {
        (self.fetched_chunks * CHUNK_SIZE as u64) as f64 / 1048576.0
    }
}

struct Engine<'a> {
    link: Link,
    bytes: &'a dyn Fn(ChunkKey) -> u64,
    link_free: f64,
    queue: VecDeque<(ChunkKey, f64)>,
    queued: HashSet<ChunkKey>,
    arrival: HashMap<ChunkKey, f64>,
    fetched_chunks: u64,
    fetched_bytes: u64,
    /// vTube: bytes of each cluster not yet at the client or on the way.
    remaining: Vec<u64>,
    cluster_of: &'a dyn Fn(ChunkKey) -> Option<u32>,
}

impl Engine<'_> {
    fn claim(&mut self, k: ChunkKey) {
        if let Some(c) = (self.cluster_of)(k) {
            let r = &mut self.remaining[c as usize];
            *r = r.saturating_sub((self.bytes)(k));
        }
    }

    fn known(&self, k: ChunkKey) -> bool {
        self.arrival.contains_key(&k) || self.queued.contains(&k)
    }

    /// Sends queued prefetches that start before `until`.
    fn pump(&mut self, until: f64) {
        while let Some(&(k, avail)) = self.queue.front() {
            if !self.queued.contains(&k) {
                self.queue.pop_front();
                continue;
            }
            let start = self.link_free.max(avail);
            if start >= until {
                break;
            }
            self.queue.pop_front();
            self.queued.remove(&k);
            self.transmit(k, start);
        }
    }

    fn transmit(&mut self, k: ChunkKey, start: f64) -> f64 {
        let b = (self.bytes)(k);
        let end = start + b as f64 / self.link.bandwidth;
        self.link_free = end;
        let at = end + self.link.rtt / 2.0;
        self.arrival.insert(k, at);
        self.fetched_chunks += 1;
        self.fetched_bytes += b;
        at
    }

    /// Sends `k` ahead of queued prefetches; the server learns of it at `at`.
    fn send_now(&mut self, k: ChunkKey, at: f64) -> f64 {
        if let Some(&t) = self.arrival.get(&k) {
            return t;
        }
        if !self.queued.remove(&k) {
            self.claim(k);
        }
        self.pump(at);
        let start = self.link_free.max(at);
        self.transmit(k, start)
    }

    fn enqueue(&mut self, k: ChunkKey, avail: f64) {
        if self.known(k) {
            return;
        }
        self.claim(k);
        self.queued.insert(k);
        self.queue.push_back((k, avail));
    }
}

/// Simulates one session (`trace`) under `policy`. `bytes(key)` is a
/// chunk's transfer size (0: zero or free, served locally); the session
/// first fetches `metadata_bytes` (manifest, knowledge).
pub fn simulate(
    trace: &Trace,
    policy: &Policy,
    link: Link,
    bytes: &dyn Fn(ChunkKey) -> u64,
    metadata_bytes: u64,
) -> Metrics {
    simulate_detailed(trace, policy, link, bytes, metadata_bytes).0
}

/// [`simulate`], also returning every chunk sent to the client.
pub fn simulate_detailed(
    trace: &Trace,
    policy: &Policy,
    link: Link,
    bytes: &dyn Fn(ChunkKey) -> u64,
    metadata_bytes: u64,
) -> (Metrics, HashSet<ChunkKey>) {
    let knowledge = match policy {
        Policy::VTube { knowledge, .. } => Some(*knowledge),
        _ => None,
    };
    let cluster_of = |k: ChunkKey| knowledge.and_then(|kn| kn.cluster_of(k));
    let mut e = Engine {
        link,
        bytes,
        link_free: 0.0,
        queue: VecDeque::new(),
        queued: HashSet::new(),
        arrival: HashMap::new(),
        fetched_chunks: 0,
        fetched_bytes: 0,
        remaining: knowledge.map(|k| k.clusters.iter().map(|c| c.bytes).collect()).unwrap_or_default(),
        cluster_of: &cluster_of,
    };
    let mut m = Metrics { policy: policy.name().into(), ..Default::default() };
    // Metadata: one request, then the bytes.
    let meta_done = link.rtt + metadata_bytes as f64 / link.bandwidth;
    e.link_free = meta_done - link.rtt / 2.0;
    let mut w = meta_done;
    let mut all_present = false;
    let mut triggered: HashSet<u32> = HashSet::new();
    match policy {
        Policy::FullDownload { chunks, bytes } => {
            w += *bytes as f64 / link.bandwidth;
            e.fetched_chunks = *chunks;
            e.fetched_bytes = *bytes;
            all_present = true;
            m.buffering_events = 1;
        }
        Policy::DemandOnly => {}
        Policy::VmTorrent { profile, window, seed } => {
            let timed: Vec<(u64, u64)> = profile.iter().map(|&(k, t)| (t, bytes(k))).collect();
            let n = planner::buffer_prefix(&timed, link.bandwidth);
            let req = w + link.rtt / 2.0;
            let mut resume = w;
            for &(k, _) in &profile[..n] {
                resume = resume.max(e.send_now(k, req));
            }
            let rest: Vec<ChunkKey> = profile[n..].iter().map(|p| p.0).collect();
            for k in planner::window_randomized(&rest, *window, *seed) {
                e.enqueue(k, req);
            }
            if n > 0 {
                w = resume;
                m.buffering_events = 1;
            }
        }
        Policy::VTube { knowledge, cfg } => {
            let rem = e.remaining.clone();
            let p = planner::plan(knowledge, Current::Start, false, &|c| rem[c as usize], link.bandwidth, cfg);
            let req = w + link.rtt / 2.0;
            let mut resume = w;
            for &c in &p.buffer {
                for k in knowledge.clusters[c as usize].keys() {
                    if bytes(k) > 0 {
                        resume = resume.max(e.send_now(k, req));
                    }
                }
            }
            for &(c, _) in &p.stream {
                for k in knowledge.clusters[c as usize].keys() {
                    if bytes(k) > 0 {
                        e.enqueue(k, req);
                    }
                }
            }
            if !p.buffer.is_empty() {
                w = resume;
                m.buffering_events = 1;
            }
        }
    }
    m.launch_s = w;
    m.buffering_s = if m.buffering_events > 0 { w } else { 0.0 };
    let mut offset = w;
    for a in &trace.accesses {
        let b = bytes(a.key);
        if b == 0 {
            continue;
        }
        m.accessed_chunks += 1;
        if all_present {
            continue;
        }
        let now = offset + a.t_us as f64 / 1e6;
        let cl = cluster_of(a.key);
        e.pump(now);
        if let Some(&t) = e.arrival.get(&a.key) {
            if t > now {
                m.late += 1;
                m.stall_s += t - now;
                offset += t - now;
            }
            // A streaming hint: the cluster's first access arrived without a demand fetch.
            if let (Some(c), Policy::VTube { knowledge, cfg }) = (cl, policy) {
                if triggered.insert(c) {
                    let now = offset + a.t_us as f64 / 1e6;
                    let rem = e.remaining.clone();
                    let p =
                        planner::plan(knowledge, Current::Cluster(c), true, &|c| rem[c as usize], link.bandwidth, cfg);
                    for &(c2, _) in &p.stream {
                        for k in knowledge.clusters[c2 as usize].keys() {
                            if bytes(k) > 0 {
                                e.enqueue(k, now + link.rtt / 2.0);
                            }
                        }
                    }
                }
            }
            continue;
        }
        // Not here: a demand fetch.
        let req = now + link.rtt / 2.0;
        let got = e.send_now(a.key, req);
        let mut buffered = false;
        if let (Some(c), Policy::VTube { knowledge, cfg }) = (cl, policy) {
            if triggered.insert(c) {
                let rem = e.remaining.clone();
                let p = planner::plan(knowledge, Current::Cluster(c), false, &|c| rem[c as usize], link.bandwidth, cfg);
                let mut resume = got;
                let mut extra = false;
                for &c2 in &p.buffer {
                    for k in knowledge.clusters[c2 as usize].keys() {
                        if bytes(k) > 0 && !e.arrival.contains_key(&k) {
                            resume = resume.max(e.send_now(k, req));
                            extra = true;
                        }
                    }
                }
                for &(c2, _) in &p.stream {
                    for k in knowledge.clusters[c2 as usize].keys() {
                        if bytes(k) > 0 {
                            e.enqueue(k, req);
                        }
                    }
                }
                if extra {
                    buffered = true;
                    m.buffering_events += 1;
                    m.buffering_s += resume - now;
                    offset += resume - now;
                }
            }
        }
        if !buffered {
            m.misses += 1;
            m.stall_s += got - now;
            offset += got - now;
        }
    }
    m.workload_s = trace.span_us() as f64 / 1e6;
    m.session_s = offset + m.workload_s;
    m.fetched_chunks = e.fetched_chunks;
    m.fetched_wire_bytes = e.fetched_bytes;
    let acc = m.accessed_chunks.max(1) as f64;
    m.fetch_ratio = m.fetched_chunks as f64 / acc;
    m.miss_rate = m.misses as f64 / acc;
    m.buffering_ratio = m.buffering_s / m.session_s.max(1e-9);
    m.buffering_per_min = m.buffering_events as f64 / (m.session_s / 60.0).max(1e-9);
    let sent = e.arrival.keys().copied().collect();
    (m, sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{analyze, AnalysisParams};
    use crate::trace::{Access, TraceHeader};

    fn trace(acc: &[(u64, u64)]) -> Trace {
        Trace {
            header: TraceHeader::default(),
            accesses: acc.iter().map(|&(ms, k)| Access { t_us: ms * 1000, key: ChunkKey::Mem(k) }).collect(),
        }
    }

    #[test]
    fn demand_only_costs_a_round_trip_per_chunk() {
        let t = trace(&[(0, 1), (1000, 2), (2000, 3)]);
        let link = Link { bandwidth: 1000.0, rtt: 0.1 };
        let m = simulate(&t, &Policy::DemandOnly, link, &|_| 100, 0);
        assert_eq!((m.accessed_chunks, m.fetched_chunks, m.misses), (3, 3, 3));
        // Each miss: RTT + 100 B at 1000 B/s = 0.2 s.
        assert!((m.stall_s - 0.6).abs() < 1e-9, "{m:?}");
        assert!((m.session_s - (0.1 + 2.0 + 0.6)).abs() < 1e-9, "{m:?}");
        assert_eq!(m.fetch_ratio, 1.0);
        assert_eq!(m.miss_rate, 1.0);
        let full = simulate(&t, &Policy::FullDownload { chunks: 10, bytes: 1000 }, link, &|_| 100, 0);
        assert!((full.launch_s - 1.1).abs() < 1e-9);
        assert_eq!(full.misses, 0);
        assert_eq!(full.fetch_ratio, 10.0 / 3.0);
    }

    #[test]
    fn vtube_prefetches_a_repeated_pattern() {
        // Training and test sessions: A = {0..50} at 0 s, B = {100..150} at 20 s.
        let mk = || {
            let mut v: Vec<(u64, u64)> = (0..50).map(|k| (k * 10, k)).collect();
            v.extend((100..150).map(|k| (20_000 + (k - 100) * 10, k)));
            trace(&v)
        };
        let k = analyze(&[mk(), mk()], &|_| 1000, &AnalysisParams::default()).unwrap();
        let link = Link { bandwidth: 10_000.0, rtt: 0.1 };
        let policy = Policy::VTube { knowledge: &k, cfg: PlannerConfig::default() };
        let m = simulate(&mk(), &policy, link, &|_| 1000, 0);
        // A is buffered (5 s), B streams in the background: no misses, nothing extra.
        assert_eq!(m.misses, 0, "{m:?}");
        assert_eq!(m.fetch_ratio, 1.0);
        assert_eq!(m.buffering_events, 1);
        assert!((m.launch_s - (0.1 + 0.1 + 5.0)).abs() < 1e-6, "{m:?}");
        let d = simulate(&mk(), &Policy::DemandOnly, link, &|_| 1000, 0);
        assert_eq!(d.misses, 100);
        assert!(m.session_s < d.session_s);
        let prof = crate::analysis::vmtorrent_profile(&[mk()], &|_| 1000);
        let v = simulate(&mk(), &Policy::VmTorrent { profile: &prof, window: 8, seed: 1 }, link, &|_| 1000, 0);
        assert_eq!(v.fetch_ratio, 1.0);
        assert!(v.misses < 100, "{v:?}");
    }
}
