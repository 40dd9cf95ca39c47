//! vTube's clustering analysis (thesis 3.2.2, Figure 3.6).
//!
//! 1. **Per-trace clusters**: in each trace, accesses that follow one
//!    another within the *clustering interval* (default 2 s; trace times
//!    already exclude network waits) form a cluster.
//! 2. **Refinement across traces**: overlapping per-trace clusters are split
//!    into their intersection and complements, repeatedly, until the final
//!    clusters are the largest groups of chunks always accessed together.
//!    The fixed point of that process is the partition of chunks by their
//!    *signature* (which per-trace cluster each chunk belongs to in every
//!    trace, or "absent"), which is how it is computed here: two chunks end
//!    in the same final cluster exactly when no intersection or complement
//!    step ever separates them.
//! 3. **Relations**: for each ordered pair of final clusters X, Y, the access
//!    probability P(Y|X) (the fraction of traces containing X in which Y is
//!    accessed at or after X) and the shortest observed interval from X's
//!    first access to Y's. A virtual *start* node relates the session start
//!    to every cluster the same way. Pairs further apart than
//!    `max_interval` are not kept (dynamic streaming never looks that far),
//!    nor are relations that equation 3.1 can never select
//!    (P(Y|X) <= Percentile(Size(Y)), fixed for a knowledge version).
//!
//! Results are serialised as versioned JSON; a file of another format
//! version is refused.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkKey, CHUNK_SIZE};
use crate::trace::Trace;
use crate::{Error, Result};

/// Knowledge file format version; other versions are refused.
pub const FORMAT: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnalysisParams {
    /// Accesses closer than this belong to one per-trace cluster (µs).
    pub clustering_interval_us: u64,
    /// Relations with longer intervals are dropped (µs).
    pub max_interval_us: u64,
    /// Pseudo-count added to the number of traces containing X when
    /// estimating P(Y|X) = n(X then Y) / (n(X) + prior). 0 is the thesis'
    /// plain frequency; 1 keeps a relation seen once in one trace from
    /// looking certain.
    pub prior: f64,
}

impl Default for AnalysisParams {
    fn default() -> Self {
        Self { clustering_interval_us: 2_000_000, max_interval_us: 60_000_000, prior: 0.0 }
    }
}

/// A relation X -> Y. Serialised compactly as `[to, p in 1/65535, interval in ms]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "(u32, u16, u64)", into = "(u32, u16, u64)")]
pub struct Relation {
    pub to: u32,
    /// P(Y|X).
    pub p: f64,
    /// Shortest observed interval from X's first access to Y's (µs).
    pub interval_us: u64,
}

impl Relation {
    /// Rounded to what the file stores.
    pub fn quantized(self) -> Self {
        <(u32, u16, u64)>::from(self).into()
    }
}

impl From<(u32, u16, u64)> for Relation {
    fn from((to, p, ms): (u32, u16, u64)) -> Self {
        Self { to, p: p as f64 / 65535.0, interval_us: ms.saturating_mul(1000) }
    }
}

impl From<Relation> for (u32, u16, u64) {
    fn from(r: Relation) -> Self {
        (r.to, (r.p.clamp(0.0, 1.0) * 65535.0).round() as u16, r.interval_us / 1000)
    }
}

/// One chunk of the VMTorrent profile; serialised as `[kind (0 memory, 1 disk), index, average ms]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u8, u64, u64)", into = "(u8, u64, u64)")]
pub struct ProfileEntry {
    pub key: ChunkKey,
    /// Average first-access time over the traces containing the chunk (µs, ms precision).
    pub avg_us: u64,
}

impl From<(u8, u64, u64)> for ProfileEntry {
    fn from((k, i, ms): (u8, u64, u64)) -> Self {
        let key = if k == 1 { ChunkKey::Disk(i) } else { ChunkKey::Mem(i) };
        Self { key, avg_us: ms.saturating_mul(1000) }
    }
}

impl From<ProfileEntry> for (u8, u64, u64) {
    fn from(e: ProfileEntry) -> Self {
        match e.key {
            ChunkKey::Mem(i) => (0, i, e.avg_us / 1000),
            ChunkKey::Disk(i) => (1, i, e.avg_us / 1000),
        }
    }
}

/// A final cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// Memory chunk indices (guest physical address / 4 KiB).
    pub mem: Vec<u64>,
    /// Disk chunk indices.
    pub disk: Vec<u64>,
    /// Bytes to transfer (encoded chunk sizes; zero and free chunks cost nothing).
    pub bytes: u64,
    /// In how many traces it appears.
    pub traces: u32,
    /// Relations to clusters that follow it, by interval.
    pub next: Vec<Relation>,
}

impl Cluster {
    pub fn keys(&self) -> impl Iterator<Item = ChunkKey> + '_ {
        self.mem.iter().map(|&i| ChunkKey::Mem(i)).chain(self.disk.iter().map(|&i| ChunkKey::Disk(i)))
    }
    pub fn len(&self) -> usize {
        self.mem.len() + self.disk.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The result of an analysis: the access-pattern knowledge of one appliance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Knowledge {
    pub format: u32,
    pub appliance: String,
    /// Hex hash of the manifest the traces were recorded against.
    pub manifest: String,
    pub traces: u32,
    pub clustering_interval_us: u64,
    pub clusters: Vec<Cluster>,
    /// Relations from the session start.
    pub start: Vec<Relation>,
    /// VMTorrent's profile for the baseline: every chunk seen in any trace
    /// with its average first-access time, in that order.
    #[serde(default)]
    pub profile: Vec<ProfileEntry>,
    /// Cluster sizes in ascending order (equation 3.1's percentile).
    #[serde(skip)]
    sorted_sizes: Vec<u64>,
    #[serde(skip)]
    index: HashMap<ChunkKey, u32>,
}

impl Knowledge {
    fn finish(mut self) -> Self {
        self.sorted_sizes = self.clusters.iter().map(|c| c.bytes).collect();
        self.sorted_sizes.sort_unstable();
        self.index = HashMap::new();
        for (i, c) in self.clusters.iter().enumerate() {
            for k in c.keys() {
                self.index.insert(k, i as u32);
            }
        }
        self
    }

    /// The cluster a chunk belongs to, if any.
    pub fn cluster_of(&self, key: ChunkKey) -> Option<u32> {
        self.index.get(&key).copied()
    }

    /// Percentile rank of a cluster size among all cluster sizes (fraction
    /// of clusters strictly smaller), the threshold of equation 3.1.
    pub fn size_percentile(&self, bytes: u64) -> f64 {
        if self.sorted_sizes.is_empty() {
            return 0.0;
        }
        self.sorted_sizes.partition_point(|&s| s < bytes) as f64 / self.sorted_sizes.len() as f64
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("knowledge serialises")
    }

    pub fn parse(b: &[u8]) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_slice(b).map_err(|e| Error::BadKnowledge(format!("not JSON (truncated?): {e}")))?;
        let found =
            v.get("format").and_then(|f| f.as_u64()).ok_or_else(|| Error::BadKnowledge("no format field".into()))?;
        if found != FORMAT as u64 {
            return Err(Error::BadVersion { what: "knowledge", found: found as u32, supported: FORMAT });
        }
        let k: Knowledge = serde_json::from_value(v).map_err(|e| Error::BadKnowledge(e.to_string()))?;
        let n = k.clusters.len() as u32;
        let bad_rel = |r: &Relation| r.to >= n || !(0.0..=1.0).contains(&r.p);
        if k.start.iter().any(bad_rel) || k.clusters.iter().any(|c| c.next.iter().any(bad_rel)) {
            return Err(Error::BadKnowledge("relation to a cluster that does not exist, or p outside [0, 1]".into()));
        }
        Ok(k.finish())
    }
}

/// Runs the clustering analysis over traces of one appliance. `bytes(key)`
/// is the transfer cost of a chunk (its encoded size; 0 for zero and free
/// chunks, which are left out of clusters since they are never fetched).
pub fn analyze(traces: &[Trace], bytes: &dyn Fn(ChunkKey) -> u64, params: &AnalysisParams) -> Result<Knowledge> {
    if traces.is_empty() {
        return Err(Error::Invalid("no traces to analyse".into()));
    }
    let (appliance, manifest) = (traces[0].header.appliance.clone(), traces[0].header.manifest.clone());
    if let Some(t) = traces.iter().find(|t| t.header.manifest != manifest) {
        log::warn!(
            "analysis: traces were recorded against different manifests ({} and {}); chunk indices may differ",
            manifest,
            t.header.manifest
        );
    }
    let nt = traces.len();
    // 1. Per-trace clusters; each chunk's signature over all traces.
    let mut sig: HashMap<ChunkKey, Vec<u32>> = HashMap::new();
    // Per trace: the time of each access, by key.
    let mut times: Vec<HashMap<ChunkKey, u64>> = Vec::with_capacity(nt);
    for (ti, t) in traces.iter().enumerate() {
        let mut cid = 0u32;
        let mut last: Option<u64> = None;
        let mut tm = HashMap::new();
        for a in &t.accesses {
            if bytes(a.key) == 0 {
                continue;
            }
            if let Some(l) = last {
                if a.t_us.saturating_sub(l) > params.clustering_interval_us {
                    cid += 1;
                }
            }
            last = Some(a.t_us);
            sig.entry(a.key).or_insert_with(|| vec![u32::MAX; nt])[ti] = cid;
            tm.insert(a.key, a.t_us);
        }
        times.push(tm);
    }
    // 2. Final clusters: chunks with equal signatures.
    let mut by_sig: HashMap<&[u32], u32> = HashMap::new();
    let mut members: Vec<Vec<ChunkKey>> = Vec::new();
    let mut keys: Vec<&ChunkKey> = sig.keys().collect();
    keys.sort();
    for k in keys {
        let s = sig[k].as_slice();
        let id = *by_sig.entry(s).or_insert_with(|| {
            members.push(Vec::new());
            (members.len() - 1) as u32
        });
        members[id as usize].push(*k);
    }
    let nc = members.len();
    // First access time of every cluster in every trace containing it.
    let mut first: Vec<Vec<Option<u64>>> = vec![vec![None; nc]; nt];
    for (ci, m) in members.iter().enumerate() {
        for (ti, tm) in times.iter().enumerate() {
            // All members share the signature: present in this trace iff the first is.
            if tm.contains_key(&m[0]) {
                first[ti][ci] = m.iter().filter_map(|k| tm.get(k)).min().copied();
            }
        }
    }
    // 3. Relations.
    let mut present = vec![0u32; nc];
    let mut pair: HashMap<(u32, u32), (u32, u64)> = HashMap::new();
    let mut start_rel: HashMap<u32, (u32, u64)> = HashMap::new();
    for f in &first {
        let mut order: Vec<(u64, u32)> = f.iter().enumerate().filter_map(|(c, t)| t.map(|t| (t, c as u32))).collect();
        order.sort_unstable();
        for &(t, c) in &order {
            present[c as usize] += 1;
            let e = start_rel.entry(c).or_insert((0, u64::MAX));
            e.0 += 1;
            e.1 = e.1.min(t);
        }
        for (i, &(tx, x)) in order.iter().enumerate() {
            for &(ty, y) in &order[i + 1..] {
                let dt = ty - tx;
                if dt > params.max_interval_us {
                    break;
                }
                let e = pair.entry((x, y)).or_insert((0, u64::MAX));
                e.0 += 1;
                e.1 = e.1.min(dt);
            }
        }
    }
    let mut clusters: Vec<Cluster> = members
        .iter()
        .enumerate()
        .map(|(ci, m)| {
            let mut c = Cluster { mem: vec![], disk: vec![], bytes: 0, traces: present[ci], next: vec![] };
            for &k in m {
                c.bytes += bytes(k);
                match k {
                    ChunkKey::Mem(i) => c.mem.push(i),
                    ChunkKey::Disk(i) => c.disk.push(i),
                }
            }
            c
        })
        .collect();
    let mut sizes: Vec<u64> = clusters.iter().map(|c| c.bytes).collect();
    sizes.sort_unstable();
    let pct = |b: u64| sizes.partition_point(|&s| s < b) as f64 / sizes.len() as f64;
    for ((x, y), (n, dt)) in pair {
        let p = n as f64 / (present[x as usize] as f64 + params.prior.max(0.0));
        if p > pct(clusters[y as usize].bytes) {
            clusters[x as usize].next.push(Relation { to: y, p, interval_us: dt }.quantized());
        }
    }
    for c in &mut clusters {
        c.next.sort_by_key(|r| (r.interval_us, r.to));
    }
    let mut start: Vec<Relation> = start_rel
        .into_iter()
        .filter(|(_, (_, t))| *t <= params.max_interval_us)
        .map(|(c, (n, t))| {
            Relation { to: c, p: n as f64 / (nt as f64 + params.prior.max(0.0)), interval_us: t }.quantized()
        })
        .filter(|r| r.p > pct(clusters[r.to as usize].bytes))
        .collect();
    start.sort_by_key(|r| (r.interval_us, r.to));
    Ok(Knowledge {
        format: FORMAT,
        appliance,
        manifest,
        traces: nt as u32,
        clustering_interval_us: params.clustering_interval_us,
        clusters,
        start,
        profile: vmtorrent_profile(traces, bytes)
            .into_iter()
            .map(|(key, t)| ProfileEntry { key, avg_us: t / 1000 * 1000 })
            .collect(),
        sorted_sizes: vec![],
        index: HashMap::new(),
    }
    .finish())
}

/// Analyses every trace stored for an appliance and stores the result as
/// its next knowledge version; chunk costs are their encoded sizes in the
/// store (zero and free chunks cost nothing). Returns the new version.
pub fn analyze_appliance(store: &crate::store::Store, name: &str, params: &AnalysisParams) -> Result<(u64, Knowledge)> {
    use crate::manifest::ChunkRef;
    let mh = store.appliance(name)?;
    let m = store.get_manifest(&mh)?;
    let mut traces = Vec::new();
    for b in store.traces(name)? {
        match Trace::parse(&b) {
            Ok(t) => traces.push(t),
            Err(e) => log::warn!("analysis of `{name}`: skipping a stored trace: {e}"),
        }
    }
    if traces.is_empty() {
        return Err(Error::Invalid(format!(
            "appliance `{name}` has no stored traces yet; run streaming sessions first"
        )));
    }
    let bytes = |k: ChunkKey| match m.chunk(k) {
        Some(ChunkRef::Data(h)) => {
            std::fs::metadata(store.chunk_path(&h)).map(|md| md.len()).unwrap_or(CHUNK_SIZE as u64)
        }
        _ => 0,
    };
    let mut k = analyze(&traces, &bytes, params)?;
    k.appliance = name.to_string();
    k.manifest = mh.to_hex();
    let v = store.put_knowledge(name, &k.to_bytes())?;
    Ok((v, k))
}

/// VMTorrent's profile (Reich et al., CoNEXT 2012; thesis 3.4.6): every
/// chunk seen in any trace, ordered by its average first-access time over
/// the traces that contain it. Chunks with no transfer cost are left out.
pub fn vmtorrent_profile(traces: &[Trace], bytes: &dyn Fn(ChunkKey) -> u64) -> Vec<(ChunkKey, u64)> {
    let mut sum: HashMap<ChunkKey, (u64, u64)> = HashMap::new();
    for t in traces {
        for a in &t.accesses {
            if bytes(a.key) == 0 {
                continue;
            }
            let e = sum.entry(a.key).or_insert((0, 0));
            e.0 += a.t_us;
            e.1 += 1;
        }
    }
    let mut v: Vec<(ChunkKey, u64)> = sum.into_iter().map(|(k, (s, n))| (k, s / n)).collect();
    v.sort_by_key(|&(k, t)| (t, k));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Access, TraceHeader};

    fn trace(acc: &[(u64, u64)]) -> Trace {
        Trace {
            header: TraceHeader { appliance: "a".into(), manifest: "m".into(), ..Default::default() },
            accesses: acc.iter().map(|&(t, k)| Access { t_us: t * 1000, key: ChunkKey::Mem(k) }).collect(),
        }
    }

    #[test]
    fn clusters_refinement_and_relations() {
        // Trace 1: {1,2,3} at 0 s, {4,5} at 10 s. Trace 2: {1,2} at 0 s, {3,4,5,6} at 5 s.
        let t1 = trace(&[(0, 1), (100, 2), (200, 3), (10_000, 4), (10_100, 5)]);
        let t2 = trace(&[(0, 1), (50, 2), (5_000, 3), (5_100, 4), (5_200, 5), (5_300, 6)]);
        let k = analyze(&[t1, t2], &|_| 1000, &AnalysisParams::default()).unwrap();
        // Final clusters: {1,2} (both traces, together), {3} (split), {4,5}, {6} (only trace 2).
        let mut sets: Vec<Vec<u64>> = k.clusters.iter().map(|c| c.mem.clone()).collect();
        sets.sort();
        assert_eq!(sets, vec![vec![1, 2], vec![3], vec![4, 5], vec![6]]);
        let c12 = k.cluster_of(ChunkKey::Mem(1)).unwrap();
        let c3 = k.cluster_of(ChunkKey::Mem(3)).unwrap();
        let c45 = k.cluster_of(ChunkKey::Mem(4)).unwrap();
        let c6 = k.cluster_of(ChunkKey::Mem(6)).unwrap();
        assert_eq!(k.cluster_of(ChunkKey::Mem(5)), Some(c45));
        assert_eq!(k.cluster_of(ChunkKey::Mem(7)), None);
        let rel = |x: u32, y: u32| k.clusters[x as usize].next.iter().find(|r| r.to == y).copied();
        // {1,2} -> {4,5}: in both traces; shortest interval 5.1 s.
        assert_eq!(rel(c12, c45), Some(Relation { to: c45, p: 1.0, interval_us: 5_100_000 }));
        // {1,2} -> {6}: one of two traces.
        assert!((rel(c12, c6).unwrap().p - 0.5).abs() < 1e-4);
        // {3} -> {4,5}: 9.8 s in trace 1, 0.1 s in trace 2.
        assert_eq!(rel(c3, c45).unwrap().interval_us, 100_000);
        assert!(rel(c45, c12).is_none());
        let s6 = k.start.iter().find(|r| r.to == c6).unwrap();
        assert!((s6.p - 0.5).abs() < 1e-4);
        assert_eq!(s6.interval_us, 5_300_000);
        assert_eq!(k.clusters[c12 as usize].bytes, 2000);
        // Equation 3.1's threshold: fraction of clusters strictly smaller.
        assert_eq!(k.size_percentile(1000), 0.0);
        assert_eq!(k.size_percentile(2000), 0.5);
        assert_eq!(k.size_percentile(2001), 1.0);
        // Serialisation round trip; wrong version and garbage are refused.
        let b = k.to_bytes();
        let k2 = Knowledge::parse(&b).unwrap();
        assert_eq!(k2, k);
        assert_eq!(k2.cluster_of(ChunkKey::Mem(4)), Some(c45));
        let wrong = String::from_utf8(b.clone()).unwrap().replacen("\"format\":1", "\"format\":7", 1);
        let e = Knowledge::parse(wrong.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("knowledge format version 7"), "{e}");
        assert!(matches!(Knowledge::parse(&b[..b.len() / 2]), Err(Error::BadKnowledge(_))));
    }

    #[test]
    fn zero_cost_chunks_are_left_out() {
        let t = trace(&[(0, 1), (1, 2), (2, 3)]);
        let k = analyze(&[t], &|k| if k == ChunkKey::Mem(2) { 0 } else { 10 }, &AnalysisParams::default()).unwrap();
        assert_eq!(k.clusters.len(), 1);
        assert_eq!(k.clusters[0].mem, vec![1, 3]);
        assert!(analyze(&[], &|_| 1, &AnalysisParams::default()).is_err());
    }
}
