//! The streaming client: HTTP requests to an appliance server and a local
//! content-addressed cache shared across appliances and sessions.
//!
//! - Every chunk that arrives is verified against its hash before it enters
//!   the cache; a chunk the cache has is never fetched again.
//! - Demand fetches and prefetches use separate connections, and a prefetch
//!   batch is not started while a demand fetch waits, so demand fetches go
//!   first (prefetch batches are sized to about 100 ms of transfer). The
//!   demand connection is marked interactive (SO_PRIORITY 6) at both ends
//!   (requests carry `X-Priority: demand`), so a priority queue at the
//!   bottleneck sends its packets ahead of queued prefetch data.
//! - Bandwidth is measured from large responses (bytes over time minus the
//!   smallest observed round trip).
//! - With [`Client::set_retry`], a server that goes away is retried with
//!   backoff until it returns (the guest waits, uncorrupted).

use std::collections::HashSet;
use std::fs;
use std::io::{BufReader, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::chunk::{self, ChunkHash};
use crate::http::{self, set_interactive, ReadError, MAX_BATCH};
use crate::manifest::Manifest;
use crate::store::atomic_write;
use crate::trace::Trace;
use crate::{io_err, Error, Result};

/// The local content-addressed cache: `DIR/chunks/ab/cdef…` (encoded chunks)
/// and `DIR/manifests/<hash>`.
#[derive(Clone, Debug)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        for d in ["chunks", "manifests"] {
            fs::create_dir_all(dir.join(d)).map_err(io_err(dir.join(d)))?;
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, h: &ChunkHash) -> PathBuf {
        let hex = h.to_hex();
        self.dir.join("chunks").join(&hex[..2]).join(&hex[2..])
    }

    pub fn contains(&self, h: &ChunkHash) -> bool {
        self.path(h).exists()
    }

    /// The content of a cached chunk; a cached chunk that fails verification
    /// (disk corruption) is removed and reported as absent.
    pub fn get(&self, h: &ChunkHash) -> Result<Option<Vec<u8>>> {
        let p = self.path(h);
        let enc = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Io { path: p, source: e }),
        };
        match chunk::decode_verified(h, &enc) {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                log::warn!("cache: dropping corrupted {}: {e}", p.display());
                let _ = fs::remove_file(&p);
                Ok(None)
            }
        }
    }

    /// Verifies an encoded chunk and inserts it; returns its content.
    pub fn put_encoded(&self, h: &ChunkHash, enc: &[u8]) -> Result<Vec<u8>> {
        let content = chunk::decode_verified(h, enc)?;
        let p = self.path(h);
        if !p.exists() {
            let d = p.parent().unwrap();
            fs::create_dir_all(d).map_err(io_err(d))?;
            atomic_write(&p, enc, false)?;
        }
        Ok(content)
    }

    pub fn get_manifest(&self, h: &ChunkHash) -> Option<Vec<u8>> {
        let b = fs::read(self.dir.join("manifests").join(h.to_hex())).ok()?;
        (ChunkHash::of(&b) == *h).then_some(b)
    }

    pub fn put_manifest(&self, h: &ChunkHash, b: &[u8]) -> Result<()> {
        atomic_write(&self.dir.join("manifests").join(h.to_hex()), b, false)
    }
}

/// Where [`Client::chunk_from`] found a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    /// A batch under way brought it (the read waited for the batch).
    InFlight,
    /// A demand fetch of its own.
    Fetched,
}

/// Which connection a request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Prefetch,
}

/// Counters of a client.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ClientStats {
    pub requests: u64,
    /// Response body bytes received.
    pub bytes: u64,
    pub chunks_fetched: u64,
    pub demand_chunks: u64,
    pub prefetch_chunks: u64,
    pub cache_hits: u64,
    /// Reads that waited for their chunk's batch already under way.
    pub in_flight_waits: u64,
    /// Smallest round trip seen, seconds.
    pub min_rtt: Option<f64>,
    /// Bandwidth estimate, bytes per second.
    pub bandwidth: Option<f64>,
}

struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

pub struct Client {
    host: String,
    addr_text: String,
    cache: Cache,
    demand: Mutex<Option<Conn>>,
    prefetch: Mutex<Option<Conn>>,
    demand_waiting: AtomicUsize,
    /// Chunks of batches under way: a read of one waits for its batch
    /// instead of fetching it a second time.
    in_flight: Mutex<HashSet<ChunkHash>>,
    landed: std::sync::Condvar,
    /// Prefetches stop at their next batch ([`Client::stop_prefetching`]).
    prefetch_stopped: std::sync::atomic::AtomicBool,
    stats: Mutex<ClientStats>,
    timeout: Duration,
    retry: Option<Duration>,
}

fn is_transient(e: &Error) -> bool {
    matches!(e, Error::Net(_))
}

impl Client {
    /// `url` is `http://host:port` (a trailing `/` is allowed).
    pub fn new(url: &str, cache_dir: impl Into<PathBuf>) -> Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| Error::Invalid(format!("server URL `{url}` must start with http://")))?;
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(Error::Invalid(format!("server URL `{url}`: expected http://HOST:PORT")));
        }
        let addr_text = if host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        Ok(Self {
            host: host.to_string(),
            addr_text,
            cache: Cache::open(cache_dir)?,
            demand: Mutex::new(None),
            prefetch: Mutex::new(None),
            demand_waiting: AtomicUsize::new(0),
            in_flight: Mutex::new(HashSet::new()),
            landed: std::sync::Condvar::new(),
            prefetch_stopped: std::sync::atomic::AtomicBool::new(false),
            stats: Mutex::new(ClientStats::default()),
            timeout: Duration::from_secs(60),
            retry: None,
        })
    }

    /// Retry network failures (connection refused, reset, timeout) with
    /// backoff for up to `max_wait` (`Duration::MAX`: until the server returns).
    pub fn set_retry(&mut self, max_wait: Option<Duration>) {
        self.retry = max_wait;
    }

    /// Per-request I/O timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn stats(&self) -> ClientStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bandwidth estimate in bytes per second.
    pub fn bandwidth(&self) -> Option<f64> {
        self.stats().bandwidth
    }

    fn connect(&self, prio: Priority) -> Result<Conn> {
        let net = |e: std::io::Error| Error::Net(format!("cannot connect to http://{}: {e}", self.host));
        let addrs: Vec<_> = self.addr_text.to_socket_addrs().map_err(net)?.collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                Ok(s) => {
                    s.set_read_timeout(Some(self.timeout)).map_err(net)?;
                    s.set_write_timeout(Some(self.timeout)).map_err(net)?;
                    let _ = s.set_nodelay(true);
                    if prio == Priority::Demand {
                        set_interactive(&s);
                    }
                    let w = s.try_clone().map_err(net)?;
                    return Ok(Conn { r: BufReader::with_capacity(256 << 10, s), w: BufWriter::new(w) });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(net(last.unwrap_or_else(|| std::io::Error::other("no address"))))
    }

    fn once(&self, prio: Priority, method: &str, path: &str, body: &[u8], max_body: usize) -> Result<http::Message> {
        let slot = match prio {
            Priority::Demand => &self.demand,
            Priority::Prefetch => &self.prefetch,
        };
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        // A kept-alive connection may have been closed by the server: one fresh try.
        for attempt in 0..2 {
            let reused = guard.is_some();
            if guard.is_none() {
                *guard = Some(self.connect(prio)?);
            }
            let c = guard.as_mut().unwrap();
            let extra: &[(&str, &str)] = match prio {
                Priority::Demand => &[("X-Priority", "demand")],
                Priority::Prefetch => &[],
            };
            let res = http::write_request(&mut c.w, method, &self.host, path, body, extra)
                .map_err(ReadError::Io)
                .and_then(|_| http::read_message(&mut c.r, true, max_body));
            match res {
                Ok((m, http10)) => {
                    if m.wants_close(http10) {
                        *guard = None;
                    }
                    self.account(t0.elapsed(), m.body.len());
                    return Ok(m);
                }
                Err(e) => {
                    *guard = None;
                    if reused && attempt == 0 && matches!(e, ReadError::Closed | ReadError::Io(_)) {
                        continue;
                    }
                    return Err(match e {
                        ReadError::Closed => Error::Net(format!("http://{}: connection closed", self.host)),
                        ReadError::Io(e) => Error::Net(format!("http://{}{path}: {e}", self.host)),
                        ReadError::Bad(_, why) => {
                            Error::Net(format!("http://{}{path}: bad response: {why}", self.host))
                        }
                    });
                }
            }
        }
        unreachable!("the loop returns")
    }

    fn account(&self, elapsed: Duration, bytes: usize) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.requests += 1;
        s.bytes += bytes as u64;
        let secs = elapsed.as_secs_f64();
        if bytes < 8192 {
            s.min_rtt = Some(s.min_rtt.map_or(secs, |m| m.min(secs)));
        } else if bytes >= 32 << 10 {
            let rtt = s.min_rtt.unwrap_or(0.0);
            let sample = bytes as f64 / (secs - rtt).max(1e-3);
            s.bandwidth = Some(s.bandwidth.map_or(sample, |b| 0.7 * b + 0.3 * sample));
        }
    }

    /// One request with status checking and (if configured) retries.
    fn request(&self, prio: Priority, method: &str, path: &str, body: &[u8], max_body: usize) -> Result<http::Message> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            let res = self.once(prio, method, path, body, max_body).and_then(|m| match m.first.as_str() {
                "200" | "201" => Ok(m),
                "404" => Err(Error::NotFound(format!(
                    "{path} on http://{}: {}",
                    self.host,
                    String::from_utf8_lossy(&m.body).trim()
                ))),
                s if s.starts_with('5') => Err(Error::Net(format!(
                    "http://{}{path}: server error {s}: {}",
                    self.host,
                    String::from_utf8_lossy(&m.body).trim()
                ))),
                s => Err(Error::Invalid(format!(
                    "http://{}{path}: status {s}: {}",
                    self.host,
                    String::from_utf8_lossy(&m.body).trim()
                ))),
            });
            match (res, self.retry) {
                (Err(e), Some(max)) if is_transient(&e) && start.elapsed() < max => {
                    log::warn!("{e}; retrying in {backoff:?}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                (r, _) => return r,
            }
        }
    }

    /// The manifest hash an appliance name points at.
    pub fn appliance(&self, name: &str) -> Result<ChunkHash> {
        let m = self.request(Priority::Demand, "GET", &format!("/v1/appliances/{name}"), &[], 4096)?;
        ChunkHash::from_hex(String::from_utf8_lossy(&m.body).trim())
    }

    /// A manifest, verified against its hash (from the cache when there).
    pub fn manifest(&self, h: &ChunkHash) -> Result<Manifest> {
        if let Some(b) = self.cache.get_manifest(h) {
            return Manifest::parse(&b);
        }
        let m = self.request(Priority::Demand, "GET", &format!("/v1/manifests/{h}"), &[], 1 << 30)?;
        if ChunkHash::of(&m.body) != *h {
            return Err(Error::BadManifest(format!(
                "manifest {h}: content does not match its hash (truncated or corrupted)"
            )));
        }
        let parsed = Manifest::parse(&m.body)?;
        self.cache.put_manifest(h, &m.body)?;
        Ok(parsed)
    }

    /// One chunk's content: from the cache, or a demand fetch.
    pub fn chunk(&self, h: &ChunkHash) -> Result<Vec<u8>> {
        self.chunk_from(h).map(|(c, _)| c)
    }

    /// One chunk's content and where it came from: the cache, a batch that
    /// was already under way (waited for), or a demand fetch of its own.
    pub fn chunk_from(&self, h: &ChunkHash) -> Result<(Vec<u8>, Source)> {
        let mut waited = false;
        loop {
            if let Some(c) = self.cache.get(h)? {
                let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                if waited {
                    s.in_flight_waits += 1;
                } else {
                    s.cache_hits += 1;
                }
                return Ok((c, if waited { Source::InFlight } else { Source::Cache }));
            }
            let f = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if !f.contains(h) {
                break;
            }
            // Its batch lands (or fails) soon; the timeout is a safety net.
            let _ = self.landed.wait_timeout(f, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner());
            waited = true;
        }
        self.chunk_fetch(h).map(|c| (c, Source::Fetched))
    }

    fn chunk_fetch(&self, h: &ChunkHash) -> Result<Vec<u8>> {
        self.demand_waiting.fetch_add(1, Ordering::SeqCst);
        let res = self.request(Priority::Demand, "GET", &format!("/v1/chunks/{h}"), &[], chunk::CHUNK_SIZE + 1);
        self.demand_waiting.fetch_sub(1, Ordering::SeqCst);
        let c = self.cache.put_encoded(h, &res?.body)?;
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.chunks_fetched += 1;
        s.demand_chunks += 1;
        Ok(c)
    }

    /// Puts every listed chunk into the cache, fetching only the ones it
    /// lacks, in batches; returns the number fetched. Demand batches go on
    /// the demand connection; prefetch batches wait while a demand fetch is
    /// in flight.
    pub fn fetch(&self, hashes: &[ChunkHash], prio: Priority) -> Result<u64> {
        let mut seen = HashSet::new();
        let missing: Vec<ChunkHash> =
            hashes.iter().filter(|h| seen.insert(**h) && !self.cache.contains(h)).copied().collect();
        {
            let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.cache_hits += (seen.len() - missing.len()) as u64;
        }
        let mut done = 0;
        let mut fetched = 0;
        if prio == Priority::Demand {
            self.demand_waiting.fetch_add(1, Ordering::SeqCst);
        }
        let res = (|| -> Result<()> {
            while done < missing.len() {
                let n = match prio {
                    Priority::Demand => MAX_BATCH,
                    Priority::Prefetch => {
                        if self.prefetch_stopped.load(Ordering::Acquire) {
                            return Ok(());
                        }
                        while self.demand_waiting.load(Ordering::SeqCst) > 0 {
                            std::thread::sleep(Duration::from_micros(500));
                        }
                        self.prefetch_batch_len()
                    }
                };
                let part = &missing[done..(done + n).min(missing.len())];
                fetched += self.fetch_batch(part, prio)?;
                done += part.len();
            }
            Ok(())
        })();
        if prio == Priority::Demand {
            self.demand_waiting.fetch_sub(1, Ordering::SeqCst);
        }
        res.map(|_| fetched)
    }

    /// Ends every prefetch at its next batch (the session is over).
    pub fn stop_prefetching(&self) {
        self.prefetch_stopped.store(true, Ordering::Release);
    }

    /// Prefetch batch size: about 100 ms of transfer at the measured bandwidth.
    fn prefetch_batch_len(&self) -> usize {
        match self.bandwidth() {
            Some(bw) => ((bw * 0.1 / 2048.0) as usize).clamp(8, 1024),
            None => 32,
        }
    }

    fn fetch_batch(&self, part: &[ChunkHash], prio: Priority) -> Result<u64> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).extend(part.iter().copied());
        let r = self.fetch_batch_now(part, prio);
        let mut f = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        for h in part {
            f.remove(h);
        }
        drop(f);
        self.landed.notify_all();
        r
    }

    fn fetch_batch_now(&self, part: &[ChunkHash], prio: Priority) -> Result<u64> {
        let mut body = Vec::with_capacity(part.len() * 32);
        for h in part {
            body.extend_from_slice(&h.0);
        }
        let m = self.request(prio, "POST", "/v1/chunks:batch", &body, part.len() * (chunk::CHUNK_SIZE + 40))?;
        let frames = chunk::parse_frames(&m.body)?;
        let want: HashSet<&ChunkHash> = part.iter().collect();
        let mut got = 0u64;
        for (h, enc) in &frames {
            if !want.contains(h) {
                return Err(Error::Net(format!("batch response carries chunk {h} that was not asked for")));
            }
            self.cache.put_encoded(h, enc)?;
            got += 1;
        }
        if got != part.len() as u64 {
            return Err(Error::Net(format!("batch response has {got} of {} chunks", part.len())));
        }
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.chunks_fetched += got;
        match prio {
            Priority::Demand => s.demand_chunks += got,
            Priority::Prefetch => s.prefetch_chunks += got,
        }
        Ok(got)
    }

    /// The latest analysis result of an appliance: (version, bytes).
    pub fn knowledge(&self, name: &str) -> Result<(u64, Vec<u8>)> {
        let m = self.request(Priority::Demand, "GET", &format!("/v1/appliances/{name}/knowledge"), &[], 1 << 30)?;
        let v = m
            .header("x-knowledge-version")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Net("knowledge response without X-Knowledge-Version".into()))?;
        Ok((v, m.body))
    }

    /// Uploads a session trace; returns its hash on the server.
    pub fn upload_trace(&self, t: &Trace) -> Result<ChunkHash> {
        let path = format!("/v1/appliances/{}/traces", t.header.appliance);
        let m = self.request(Priority::Demand, "POST", &path, &t.to_bytes(), 4096)?;
        ChunkHash::from_hex(String::from_utf8_lossy(&m.body).trim())
    }
}
