//! Session traces: the first access to every memory and disk chunk, time-
//! stamped from session start minus the time spent waiting for the network
//! (buffering and demand fetches), i.e. the idealised trace of thesis 3.3.3
//! step 4.
//!
//! ```text
//! "VTTRACE\0" | u32 version | u32 header_len | header (JSON)
//! | u32 count | count * (u8 kind: 0 memory, 1 disk | u64 chunk index | u64 time in µs)
//! ```

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkKey;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"VTTRACE\0";
/// Trace format version; other versions are refused.
pub const VERSION: u32 = 1;
const MAX_ENTRIES: u32 = 1 << 26;

/// One first access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Idealised time since session start, in microseconds.
    pub t_us: u64,
    pub key: ChunkKey,
}

/// Session facts carried with a trace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceHeader {
    pub appliance: String,
    /// Hex hash of the manifest the session ran.
    pub manifest: String,
    /// Knowledge version the session used, if any.
    pub knowledge_version: Option<u64>,
    /// Wall-clock session duration and the part of it spent waiting for the network.
    pub duration_us: u64,
    pub net_wait_us: u64,
    /// Free-form description (workload parameters).
    #[serde(default)]
    pub params: serde_json::Value,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    pub header: TraceHeader,
    /// Sorted by time; each key at most once.
    pub accesses: Vec<Access>,
}

impl Trace {
    pub fn to_bytes(&self) -> Vec<u8> {
        let h = serde_json::to_vec(&self.header).expect("trace header serialises");
        let mut out = Vec::with_capacity(24 + h.len() + self.accesses.len() * 17);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&(self.accesses.len() as u32).to_le_bytes());
        for a in &self.accesses {
            let (k, i) = match a.key {
                ChunkKey::Mem(i) => (0u8, i),
                ChunkKey::Disk(i) => (1, i),
            };
            out.push(k);
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&a.t_us.to_le_bytes());
        }
        out
    }

    pub fn parse(b: &[u8]) -> Result<Self> {
        let bad = |w: &str| Error::BadTrace(w.to_string());
        if b.len() < 16 {
            return Err(bad("truncated header"));
        }
        if &b[..8] != MAGIC {
            return Err(bad("not a trace (bad magic)"));
        }
        let v = u32::from_le_bytes(b[8..12].try_into().unwrap());
        if v != VERSION {
            return Err(Error::BadVersion { what: "trace", found: v, supported: VERSION });
        }
        let hl = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        let rest = &b[16..];
        if rest.len() < hl + 4 {
            return Err(bad("truncated header"));
        }
        let header: TraceHeader = serde_json::from_slice(&rest[..hl]).map_err(|e| bad(&format!("header: {e}")))?;
        let n = u32::from_le_bytes(rest[hl..hl + 4].try_into().unwrap());
        if n > MAX_ENTRIES {
            return Err(bad(&format!("{n} entries")));
        }
        let body = &rest[hl + 4..];
        if body.len() != n as usize * 17 {
            return Err(bad(&format!("{} bytes of entries for {n} entries (truncated)", body.len())));
        }
        let mut accesses = Vec::with_capacity(n as usize);
        let mut seen = HashSet::with_capacity(n as usize);
        let mut last = 0;
        for e in body.chunks_exact(17) {
            let i = u64::from_le_bytes(e[1..9].try_into().unwrap());
            let t_us = u64::from_le_bytes(e[9..17].try_into().unwrap());
            let key = match e[0] {
                0 => ChunkKey::Mem(i),
                1 => ChunkKey::Disk(i),
                k => return Err(bad(&format!("unknown access kind {k}"))),
            };
            if t_us < last {
                return Err(bad("accesses are not in time order"));
            }
            if !seen.insert(key) {
                return Err(bad(&format!("{key:?} recorded twice")));
            }
            last = t_us;
            accesses.push(Access { t_us, key });
        }
        Ok(Self { header, accesses })
    }

    /// Duration covered by the accesses (time of the last one).
    pub fn span_us(&self) -> u64 {
        self.accesses.last().map(|a| a.t_us).unwrap_or(0)
    }
}

struct RecState {
    seen: HashSet<ChunkKey>,
    accesses: Vec<Access>,
    /// Closed network-wait time.
    net_wait: Duration,
    /// Threads waiting now, and since when at least one has been.
    waiting: u32,
    wait_since: Option<Instant>,
}

impl RecState {
    fn waited(&self) -> Duration {
        self.net_wait + self.wait_since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// Marks a network wait in progress; ends it when dropped.
pub struct WaitGuard<'a>(&'a TraceRecorder);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.st.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting = st.waiting.saturating_sub(1);
        if st.waiting == 0 {
            if let Some(t) = st.wait_since.take() {
                st.net_wait += t.elapsed();
            }
        }
    }
}

/// Records first accesses during a session; shared by the vCPU and disk threads.
pub struct TraceRecorder {
    start: Instant,
    st: Mutex<RecState>,
}

impl Default for TraceRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceRecorder {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            st: Mutex::new(RecState {
                seen: HashSet::new(),
                accesses: Vec::new(),
                net_wait: Duration::ZERO,
                waiting: 0,
                wait_since: None,
            }),
        }
    }

    /// Records an access (only the first one per chunk is kept). Call it
    /// after any network wait for this access was added with [`Self::add_net_wait`].
    pub fn record(&self, key: ChunkKey) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if st.seen.insert(key) {
            let t = self.start.elapsed().saturating_sub(st.waited());
            let t_us = (t.as_micros() as u64).max(st.accesses.last().map(|a| a.t_us).unwrap_or(0));
            st.accesses.push(Access { t_us, key });
        }
    }

    /// Whether a chunk was already accessed this session.
    pub fn seen(&self, key: ChunkKey) -> bool {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).seen.contains(&key)
    }

    /// Starts a network wait (a demand fetch, buffering); overlapping waits
    /// of several threads count once (the union of the intervals).
    pub fn waiting(&self) -> WaitGuard<'_> {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if st.waiting == 0 {
            st.wait_since = Some(Instant::now());
        }
        st.waiting += 1;
        WaitGuard(self)
    }

    /// Time the VM spent waiting for the network (removed from later timestamps).
    pub fn add_net_wait(&self, d: Duration) {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).net_wait += d;
    }

    pub fn len(&self) -> usize {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).accesses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn finish(&self, mut header: TraceHeader) -> Trace {
        let st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        header.duration_us = self.start.elapsed().as_micros() as u64;
        header.net_wait_us = st.waited().as_micros() as u64;
        Trace { header, accesses: st.accesses.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_round_trip() {
        let r = TraceRecorder::new();
        r.record(ChunkKey::Mem(5));
        std::thread::sleep(Duration::from_millis(30));
        r.add_net_wait(Duration::from_millis(25));
        r.record(ChunkKey::Disk(5));
        r.record(ChunkKey::Mem(5));
        let t = r.finish(TraceHeader { appliance: "a".into(), ..Default::default() });
        assert_eq!(t.accesses.len(), 2);
        // 30 ms elapsed, 25 ms of which were network waits.
        assert!(t.accesses[1].t_us < 20_000, "{:?}", t.accesses);
        assert!(t.header.net_wait_us >= 25_000);
        let b = t.to_bytes();
        assert_eq!(Trace::parse(&b).unwrap(), t);
        for n in 0..b.len() {
            assert!(Trace::parse(&b[..n]).is_err());
        }
        let mut v = b.clone();
        v[8] = 2;
        assert!(matches!(Trace::parse(&v), Err(Error::BadVersion { found: 2, .. })));
    }

    #[test]
    fn overlapping_waits_count_once() {
        let r = std::sync::Arc::new(TraceRecorder::new());
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    let _w = r.waiting();
                    std::thread::sleep(Duration::from_millis(40));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        r.record(ChunkKey::Mem(1));
        let t = r.finish(TraceHeader::default());
        // Three concurrent 40 ms waits: about 40 ms, not 120.
        assert!(t.header.net_wait_us >= 40_000 && t.header.net_wait_us < 100_000, "{}", t.header.net_wait_us);
        assert!(t.accesses[0].t_us < 30_000, "{:?}", t.accesses);
    }
}
