//! A streaming session: what `vmm stream` calls from its fault paths.
//!
//! [`Session::start`] fetches the manifest and the latest knowledge, makes
//! the initial buffering decision and delivers those clusters before it
//! returns (the launch). Then every first access to a chunk goes through
//! [`Session::read`]: zero and free chunks read as zero with no fetch;
//! cached content is served locally (and, on a cluster's first access,
//! sends a *streaming hint* to the planner); anything else is a demand
//! fetch, which triggers the dynamic streaming decision for its cluster:
//! the clusters to buffer are fetched before `read` returns (while
//! [`Session::buffering`] is true, so other vCPUs can be held with
//! [`Session::wait_resumed`]), the ones to stream go to a background
//! prefetcher that always yields to demand fetches. Chunks outside every
//! cluster are fetched alone. Each first access is recorded with the
//! network wait subtracted; [`Session::finish`] uploads the trace.
//!
//! [`Mode`] selects the baselines instead: demand fetch only, a full
//! download before start, or VMTorrent's profile order (from the same
//! knowledge file).

use std::collections::HashSet;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::analysis::Knowledge;
use crate::chunk::{ChunkHash, ChunkKey, CHUNK_SIZE};
use crate::client::{Client, Priority, Source};
use crate::manifest::{ChunkRef, Manifest};
use crate::planner::{self, Current, PlannerConfig};
use crate::trace::{Trace, TraceHeader, TraceRecorder};
use crate::{Error, Result};

/// How state reaches the client (issue 5's baselines in the same binary).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// vTube's dynamic streaming (demand only when there is no knowledge yet).
    #[default]
    VTube,
    /// Every chunk on its first access.
    DemandOnly,
    /// Everything before the VM starts.
    FullDownload,
    /// VMTorrent's profile order with window-randomised selection after an
    /// initial buffering by the same rule as vTube's.
    VmTorrent { window: usize },
}

#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub mode: Mode,
    pub planner: PlannerConfig,
    /// Bandwidth assumed (bytes/s) until the client has measured it.
    pub initial_bandwidth: f64,
    /// Use the server's knowledge (false: demand fetch only, whatever the mode).
    pub use_knowledge: bool,
    /// Free-form description stored with the trace.
    pub params: serde_json::Value,
    /// Sequential read-ahead for demand misses outside the knowledge
    /// (vTube mode only; the baselines run as published).
    pub readahead: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            mode: Mode::VTube,
            planner: PlannerConfig::default(),
            initial_bandwidth: 900_000.0,
            use_knowledge: true,
            params: serde_json::Value::Null,
            readahead: true,
        }
    }
}

/// What a session did so far.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct SessionStats {
    /// Session start to the end of the initial buffering, s.
    pub launch_s: f64,
    pub accesses: u64,
    pub zero_reads: u64,
    pub cache_reads: u64,
    /// Chunks demand-fetched outside buffering (misses).
    pub misses: u64,
    /// Reads that waited for their chunk's prefetch or read-ahead batch,
    /// already under way (not misses: no request of their own).
    pub late_reads: u64,
    /// Chunks requested by sequential read-ahead.
    pub readahead_chunks: u64,
    pub buffering_events: u64,
    pub buffering_s: f64,
    pub hints: u64,
    /// Time spent waiting for the network on reads, s.
    pub net_wait_s: f64,
}

struct State {
    /// Clusters requested (buffered, queued for streaming, or all cached).
    requested: Vec<bool>,
    /// Clusters whose first access already ran the planner.
    triggered: Vec<bool>,
    stats: SessionStats,
    ra: ReadAhead,
}

/// Sequential read-ahead (as the Linux page cache does for files) for the
/// demand misses vTube's knowledge does not cover: content no training
/// session touched. Two consecutive misses start it with [`RA_INIT`]
/// chunks; reaching the middle of a window requests the next one, twice
/// as large up to [`RA_MAX`], so a sequential reader stops missing. Random
/// misses never start it.
#[derive(Default)]
struct ReadAhead {
    last_miss: Option<ChunkKey>,
    /// First chunk after the current window.
    next: Option<ChunkKey>,
    /// The chunk whose access requests the next window.
    trigger: Option<ChunkKey>,
    window: u64,
}

const RA_INIT: u64 = 16;
const RA_MAX: u64 = 32;

fn key_add(k: ChunkKey, n: u64) -> ChunkKey {
    match k {
        ChunkKey::Mem(i) => ChunkKey::Mem(i + n),
        ChunkKey::Disk(i) => ChunkKey::Disk(i + n),
    }
}

pub struct Session {
    client: Arc<Client>,
    name: String,
    manifest_hash: ChunkHash,
    manifest: Manifest,
    knowledge: Option<(u64, Knowledge)>,
    cfg: SessionConfig,
    recorder: TraceRecorder,
    state: Mutex<State>,
    buffering: (Mutex<bool>, Condvar),
    /// Streamed clusters and VMTorrent's order.
    prefetcher: Fetcher,
    /// Read-ahead has its own queue: it must not wait behind streamed clusters.
    readahead: Fetcher,
    start: Instant,
}

impl Session {
    /// Opens a session of appliance `name`; returns after the initial buffering.
    pub fn start(client: Arc<Client>, name: &str, cfg: SessionConfig) -> Result<Arc<Self>> {
        let start = Instant::now();
        let manifest_hash = client.appliance(name)?;
        let manifest = client.manifest(&manifest_hash)?;
        let wants_knowledge = cfg.use_knowledge && matches!(cfg.mode, Mode::VTube | Mode::VmTorrent { .. });
        let knowledge = if wants_knowledge {
            match client.knowledge(name) {
                Ok((v, b)) => {
                    let k = Knowledge::parse(&b)?;
                    if k.manifest != manifest_hash.to_hex() {
                        log::warn!(
                            "knowledge version {v} of `{name}` was computed from traces of manifest {}, \
                             not the current {manifest_hash}; using it anyway",
                            k.manifest
                        );
                    }
                    Some((v, k))
                }
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        if matches!(cfg.mode, Mode::VmTorrent { .. }) && knowledge.as_ref().is_some_and(|(_, k)| k.profile.is_empty()) {
            log::warn!("knowledge of `{name}` has no VMTorrent profile (older analysis?): demand fetch only");
        }
        let n = knowledge.as_ref().map_or(0, |(_, k)| k.clusters.len());
        let prefetcher = Fetcher::spawn("prefetch", client.clone())?;
        let readahead = Fetcher::spawn("read-ahead", client.clone())?;
        let s = Arc::new(Self {
            client,
            name: name.to_string(),
            manifest_hash,
            manifest,
            knowledge,
            cfg,
            recorder: TraceRecorder::new(),
            state: Mutex::new(State {
                requested: vec![false; n],
                triggered: vec![false; n],
                stats: Default::default(),
                ra: Default::default(),
            }),
            buffering: (Mutex::new(false), Condvar::new()),
            prefetcher,
            readahead,
            start,
        });
        // Clusters the cache already holds count as delivered.
        if let Some((_, k)) = &s.knowledge {
            let mut st = s.lock();
            for (i, c) in k.clusters.iter().enumerate() {
                st.requested[i] = c.keys().all(|key| match s.manifest.chunk(key) {
                    Some(ChunkRef::Data(h)) => s.client.cache().contains(&h),
                    _ => true,
                });
            }
        }
        match s.cfg.mode {
            Mode::VTube => s.decide(Current::Start, false)?,
            Mode::DemandOnly => {}
            Mode::FullDownload => {
                let all = all_data_hashes(&s.manifest);
                s.buffer(&all)?;
            }
            Mode::VmTorrent { window } => s.start_profile(window)?,
        }
        s.lock().stats.launch_s = start.elapsed().as_secs_f64();
        Ok(s)
    }

    /// Fetches `hashes` with the VM paused (a buffering event).
    fn buffer(&self, hashes: &[ChunkHash]) -> Result<()> {
        let cache = self.client.cache();
        let hashes: Vec<ChunkHash> = hashes.iter().filter(|h| !cache.contains(h)).copied().collect();
        if hashes.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let wait = self.recorder.waiting();
        self.set_buffering(true);
        let res = self.client.fetch(&hashes, Priority::Demand);
        self.set_buffering(false);
        drop(wait);
        let waited = t0.elapsed();
        let mut st = self.lock();
        st.stats.buffering_events += 1;
        st.stats.buffering_s += waited.as_secs_f64();
        st.stats.net_wait_s += waited.as_secs_f64();
        res.map(|_| ())
    }

    /// VMTorrent baseline: buffer the profile's prefix, stream the rest in
    /// window-randomised profile order.
    fn start_profile(&self, window: usize) -> Result<()> {
        let Some((_, k)) = &self.knowledge else { return Ok(()) };
        let hash = |key| match self.manifest.chunk(key) {
            Some(ChunkRef::Data(h)) => Some(h),
            _ => None,
        };
        // Per-chunk transfer sizes are not known client-side: use the
        // clusters' average encoded chunk size.
        let (b, n) = k.clusters.iter().fold((0u64, 0u64), |(b, n), c| (b + c.bytes, n + c.len() as u64));
        let avg = b.checked_div(n).unwrap_or(CHUNK_SIZE as u64 / 2);
        let timed: Vec<(u64, u64)> = k.profile.iter().map(|e| (e.avg_us, avg)).collect();
        let bw = self.client.bandwidth().unwrap_or(self.cfg.initial_bandwidth);
        let cut = planner::buffer_prefix(&timed, bw);
        let prefix: Vec<ChunkHash> = k.profile[..cut].iter().filter_map(|e| hash(e.key)).collect();
        let rest: Vec<ChunkKey> = k.profile[cut..].iter().map(|e| e.key).collect();
        let order: Vec<ChunkHash> = planner::window_randomized(&rest, window, self.start.elapsed().as_nanos() as u64)
            .into_iter()
            .filter_map(hash)
            .collect();
        for part in order.chunks(1024) {
            self.prefetcher.send(part.to_vec());
        }
        self.buffer(&prefix)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn manifest_hash(&self) -> ChunkHash {
        self.manifest_hash
    }

    pub fn knowledge_version(&self) -> Option<u64> {
        self.knowledge.as_ref().map(|(v, _)| *v)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn stats(&self) -> SessionStats {
        self.lock().stats
    }

    /// Whether the VM should be paused (buffering in progress).
    pub fn buffering(&self) -> bool {
        *self.buffering.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks while buffering is in progress (for vCPUs other than the faulting one).
    pub fn wait_resumed(&self) {
        let mut b = self.buffering.0.lock().unwrap_or_else(|e| e.into_inner());
        while *b {
            b = self.buffering.1.wait(b).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn set_buffering(&self, on: bool) {
        *self.buffering.0.lock().unwrap_or_else(|e| e.into_inner()) = on;
        self.buffering.1.notify_all();
    }

    fn hashes_of(&self, cluster: u32) -> Vec<ChunkHash> {
        let Some((_, k)) = &self.knowledge else { return Vec::new() };
        k.clusters[cluster as usize]
            .keys()
            .filter_map(|key| match self.manifest.chunk(key) {
                Some(ChunkRef::Data(h)) => Some(h),
                _ => None,
            })
            .collect()
    }

    /// Runs the dynamic streaming decision; buffers synchronously, queues the rest.
    fn decide(&self, current: Current, hint: bool) -> Result<()> {
        let Some((_, k)) = &self.knowledge else { return Ok(()) };
        if self.cfg.mode != Mode::VTube {
            return Ok(());
        }
        let plan = {
            let mut st = self.lock();
            if let Current::Cluster(c) = current {
                if std::mem::replace(&mut st.triggered[c as usize], true) {
                    return Ok(());
                }
                if hint {
                    st.stats.hints += 1;
                }
            }
            let bw = self.client.bandwidth().unwrap_or(self.cfg.initial_bandwidth);
            let requested = st.requested.clone();
            let p = planner::plan(
                k,
                current,
                hint,
                &|c| if requested[c as usize] { 0 } else { k.clusters[c as usize].bytes.max(1) },
                bw,
                &self.cfg.planner,
            );
            for &c in p.buffer.iter().chain(p.stream.iter().map(|(c, _)| c)) {
                st.requested[c as usize] = true;
            }
            p
        };
        let stream: Vec<ChunkHash> = plan.stream.iter().flat_map(|&(c, _)| self.hashes_of(c)).collect();
        if !stream.is_empty() {
            self.prefetcher.send(stream);
        }
        if !plan.buffer.is_empty() {
            let buffer: Vec<ChunkHash> = plan.buffer.iter().flat_map(|&c| self.hashes_of(c)).collect();
            self.buffer(&buffer)?;
        }
        Ok(())
    }

    /// The content of one chunk (4 KiB) on its access by the guest or a device.
    /// `None` if `key` is outside the appliance.
    pub fn read(&self, key: ChunkKey) -> Result<Option<Vec<u8>>> {
        let Some(r) = self.manifest.chunk(key) else { return Ok(None) };
        self.lock().stats.accesses += 1;
        let h = match r {
            ChunkRef::Zero | ChunkRef::Free => {
                self.lock().stats.zero_reads += 1;
                return Ok(Some(vec![0u8; CHUNK_SIZE]));
            }
            ChunkRef::Data(h) => h,
        };
        let cluster = match self.cfg.mode {
            Mode::VTube => self.knowledge.as_ref().and_then(|(_, k)| k.cluster_of(key)),
            _ => None,
        };
        if let Some(c) = self.client.cache().get(&h)? {
            self.recorder.record(key);
            self.lock().stats.cache_reads += 1;
            self.read_ahead_hit(key);
            if let Some(cl) = cluster {
                self.decide(Current::Cluster(cl), true)?;
            }
            return Ok(Some(c));
        }
        // A demand access to a cluster not decided yet: decide first, so the
        // accessed chunk arrives with its cluster in one buffering request
        // (one round trip, not two).
        if let Some(cl) = cluster {
            let before = self.lock().stats.buffering_events;
            self.decide(Current::Cluster(cl), false)?;
            if self.lock().stats.buffering_events != before {
                if let Some(c) = self.client.cache().get(&h)? {
                    self.recorder.record(key);
                    return Ok(Some(c));
                }
            }
        }
        // Outside every cluster, or its cluster already decided: fetch it
        // alone (or wait for the batch already bringing it).
        let t0 = Instant::now();
        let wait = self.recorder.waiting();
        let content = self.client.chunk_from(&h);
        drop(wait);
        let (content, source) = content?;
        self.recorder.record(key);
        {
            let mut st = self.lock();
            st.stats.net_wait_s += t0.elapsed().as_secs_f64();
            match source {
                Source::Fetched => st.stats.misses += 1,
                Source::InFlight => st.stats.late_reads += 1,
                Source::Cache => st.stats.cache_reads += 1,
            }
        }
        match source {
            Source::Fetched => self.read_ahead_miss(key),
            _ => self.read_ahead_hit(key),
        }
        Ok(Some(content))
    }

    fn read_ahead_enabled(&self) -> bool {
        self.cfg.readahead && self.cfg.mode == Mode::VTube
    }

    /// A demand miss: a second consecutive one (or one just past the
    /// window) starts or grows the read-ahead.
    fn read_ahead_miss(&self, key: ChunkKey) {
        if !self.read_ahead_enabled() {
            return;
        }
        let mut st = self.lock();
        let ra = &mut st.ra;
        let sequential = ra.last_miss.map(|k| key_add(k, 1)) == Some(key) || ra.next == Some(key);
        ra.last_miss = Some(key);
        if !sequential {
            return;
        }
        ra.window = if ra.next == Some(key) { (ra.window * 2).clamp(RA_INIT, RA_MAX) } else { RA_INIT };
        self.queue_read_ahead(&mut st, key_add(key, 1));
    }

    /// A hit on the current window's marker requests the next window.
    fn read_ahead_hit(&self, key: ChunkKey) {
        if !self.read_ahead_enabled() {
            return;
        }
        let mut st = self.lock();
        if st.ra.trigger != Some(key) {
            return;
        }
        let Some(next) = st.ra.next else { return };
        st.ra.window = (st.ra.window * 2).clamp(RA_INIT, RA_MAX);
        self.queue_read_ahead(&mut st, next);
    }

    fn queue_read_ahead(&self, st: &mut State, from: ChunkKey) {
        let w = st.ra.window;
        let cache = self.client.cache();
        let hashes: Vec<ChunkHash> = (0..w)
            .filter_map(|i| match self.manifest.chunk(key_add(from, i)) {
                Some(ChunkRef::Data(h)) if !cache.contains(&h) => Some(h),
                _ => None,
            })
            .collect();
        st.ra.next = Some(key_add(from, w));
        st.ra.trigger = Some(key_add(from, w / 2));
        st.stats.readahead_chunks += hashes.len() as u64;
        if !hashes.is_empty() {
            self.readahead.send(hashes);
        }
    }

    /// Convenience for memory faults: the chunk holding guest physical address `gpa`.
    pub fn read_mem(&self, gpa: u64) -> Result<Option<Vec<u8>>> {
        self.read(ChunkKey::mem_gpa(gpa))
    }

    /// Convenience for the disk: the chunk holding byte `offset`.
    pub fn read_disk(&self, offset: u64) -> Result<Option<Vec<u8>>> {
        self.read(ChunkKey::disk_offset(offset))
    }

    /// The content of a chunk for the VMM's own use (not a guest access):
    /// from the cache or fetched, but neither traced nor fed to the planner.
    pub fn read_untraced(&self, key: ChunkKey) -> Result<Option<Vec<u8>>> {
        match self.manifest.chunk(key) {
            None => Ok(None),
            Some(ChunkRef::Zero | ChunkRef::Free) => Ok(Some(vec![0u8; CHUNK_SIZE])),
            Some(ChunkRef::Data(h)) => self.client.chunk(&h).map(Some),
        }
    }

    /// Puts the content of every listed chunk into the cache with batched
    /// requests (zero, free and cached chunks cost nothing); nothing is
    /// traced. Returns the number of chunks fetched. For a full download,
    /// or a disk wanted whole before the VM starts:
    /// `session.fetch_keys(&session.disk_keys(), Priority::Demand)`.
    pub fn fetch_keys(&self, keys: &[ChunkKey], prio: Priority) -> Result<u64> {
        let hashes: Vec<ChunkHash> = keys
            .iter()
            .filter_map(|&k| match self.manifest.chunk(k) {
                Some(ChunkRef::Data(h)) => Some(h),
                _ => None,
            })
            .collect();
        self.client.fetch(&hashes, prio)
    }

    /// Every disk chunk key, in order.
    pub fn disk_keys(&self) -> Vec<ChunkKey> {
        let n = self.manifest.disk_size.map_or(0, |s| s.div_ceil(CHUNK_SIZE as u64));
        (0..n).map(ChunkKey::Disk).collect()
    }

    /// Ends the session: stops prefetching and returns the trace; uploads it if `upload`.
    pub fn finish(&self, upload: bool) -> Result<Trace> {
        self.client.stop_prefetching();
        // Both end after their current batch.
        self.prefetcher.close();
        self.readahead.close();
        let trace = self.recorder.finish(TraceHeader {
            appliance: self.name.clone(),
            manifest: self.manifest_hash.to_hex(),
            knowledge_version: self.knowledge_version(),
            params: self.cfg.params.clone(),
            ..Default::default()
        });
        if upload && !trace.accesses.is_empty() {
            self.client.upload_trace(&trace)?;
        }
        Ok(trace)
    }

    /// How well the knowledge predicted this session so far: for the
    /// clusters requested (buffered or streamed), their chunks with
    /// content, how many of those the guest read, and the same split for
    /// the clusters requested at the start (the launch decision).
    pub fn prediction(&self) -> serde_json::Value {
        let Some((_, k)) = &self.knowledge else { return serde_json::Value::Null };
        let st = self.lock();
        let data = |key: &ChunkKey| matches!(self.manifest.chunk(*key), Some(ChunkRef::Data(_)));
        let (mut clusters, mut chunks, mut read) = (0u64, 0u64, 0u64);
        for (i, c) in k.clusters.iter().enumerate() {
            if !st.requested[i] {
                continue;
            }
            clusters += 1;
            for key in c.keys().filter(|key| data(key)) {
                chunks += 1;
                read += self.recorder.seen(key) as u64;
            }
        }
        serde_json::json!({
            "clusters": k.clusters.len(),
            "clusters_requested": clusters,
            "requested_chunks": chunks,
            "requested_chunks_read": read,
        })
    }

    /// Time since the session started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A background thread fetching queued lists of chunks into the cache on
/// the prefetch connection (which yields to demand fetches).
struct Fetcher {
    tx: Mutex<Option<Sender<Vec<ChunkHash>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Fetcher {
    fn spawn(what: &'static str, client: Arc<Client>) -> Result<Self> {
        let (tx, rx) = channel::<Vec<ChunkHash>>();
        let thread = std::thread::Builder::new()
            .name(format!("stream-{what}"))
            .spawn(move || {
                while let Ok(hashes) = rx.recv() {
                    if let Err(e) = client.fetch(&hashes, Priority::Prefetch) {
                        log::warn!("{what} of {} chunks: {e}", hashes.len());
                    }
                }
            })
            .map_err(|e| Error::Io { path: format!("{what} thread").into(), source: e })?;
        Ok(Self { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)) })
    }

    fn send(&self, hashes: Vec<ChunkHash>) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(hashes);
        }
    }

    /// Closes the queue and waits for the thread.
    fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Every chunk hash the session may need, in manifest order (for a full download).
pub fn all_data_hashes(m: &Manifest) -> Vec<ChunkHash> {
    let mut seen = HashSet::new();
    m.iter()
        .filter_map(|(_, r)| match r {
            ChunkRef::Data(h) if seen.insert(h) => Some(h),
            _ => None,
        })
        .collect()
}
