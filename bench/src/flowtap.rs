//! Client-side throughput and latency per 100 ms, measured passively.
//!
//! memslap prints once a second at most, and only min/avg/max latencies.
//! A [`FlowTap`] watches the client's interface (an `AF_PACKET` socket in
//! the client namespace) and pairs each memcached request with its response
//! per TCP connection: the time from the first segment of a request leaving
//! the client to the first segment of the answer coming back is what the
//! client waited (memslap keeps one request in flight per connection, and a
//! retransmitted request counts from its first transmission). Every answer
//! is one operation at its arrival time; [`Samples::buckets`] turns them
//! into throughput and p90/p99 latency per 100 ms for each server.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One answered request: when (ms since the tap's start), which server,
/// and how long the client waited (µs).
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub at_ms: f64,
    pub server: Ipv4Addr,
    pub wait_us: u32,
}

/// Everything a tap saw.
#[derive(Default)]
pub struct Samples {
    pub ops: Vec<Op>,
    /// Unix ms of the tap's start (the zero of `at_ms`).
    pub start_unix_ms: u64,
}

/// Throughput and latency of one server over one interval.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Bucket {
    /// Start of the interval, ms relative to the caller's epoch.
    pub t_ms: i64,
    pub ops_per_sec: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

impl Samples {
    /// Per-`width_ms` buckets for `server` from `from_unix_ms` to
    /// `to_unix_ms`, with times relative to `epoch_unix_ms`.
    pub fn buckets(
        &self,
        server: Ipv4Addr,
        from_unix_ms: u64,
        to_unix_ms: u64,
        epoch_unix_ms: u64,
        width_ms: u64,
    ) -> Vec<Bucket> {
        let base = self.start_unix_ms as f64;
        let mut lat: Vec<Vec<u32>> = vec![Vec::new(); (to_unix_ms.saturating_sub(from_unix_ms) / width_ms) as usize];
        for op in self.ops.iter().filter(|o| o.server == server) {
            let t = base + op.at_ms;
            if t < from_unix_ms as f64 {
                continue;
            }
            let i = ((t - from_unix_ms as f64) / width_ms as f64) as usize;
            if let Some(v) = lat.get_mut(i) {
                v.push(op.wait_us);
            }
        }
        lat.into_iter()
            .enumerate()
            .map(|(i, mut v)| {
                v.sort_unstable();
                Bucket {
                    t_ms: (from_unix_ms + i as u64 * width_ms) as i64 - epoch_unix_ms as i64,
                    ops_per_sec: v.len() as f64 * 1000.0 / width_ms as f64,
                    p90_ms: pct(&v, 0.90),
                    p99_ms: pct(&v, 0.99),
                }
            })
            .collect()
    }

    /// Latency percentile `p` (ms) of `server`'s answers in the interval.
    pub fn percentile(&self, server: Ipv4Addr, from_unix_ms: u64, to_unix_ms: u64, p: f64) -> f64 {
        let base = self.start_unix_ms as f64;
        let mut v: Vec<u32> = self
            .ops
            .iter()
            .filter(|o| {
                o.server == server && base + o.at_ms >= from_unix_ms as f64 && base + o.at_ms < to_unix_ms as f64
            })
            .map(|o| o.wait_us)
            .collect();
        v.sort_unstable();
        pct(&v, p)
    }
}

/// A passive tap on one interface of a network namespace.
pub struct FlowTap {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Samples>>,
    thread: Option<std::thread::JoinHandle<io::Result<io::Result<()>>>>,
}

/// The memcached port the tap pairs requests and answers on.
pub const MEMCACHED_PORT: u16 = 11211;

/// A TCP segment with payload: (src, dst, sport, dport, payload length).
fn parse(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u16, u16, usize)> {
    if frame.len() < 14 + 20 || u16::from_be_bytes([frame[12], frame[13]]) != 0x0800 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ip[9] != 6 || ihl < 20 || ip.len() < ihl + 20 {
        return None;
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let tcp = &ip[ihl..];
    let doff = ((tcp[12] >> 4) as usize) * 4;
    let payload = total.checked_sub(ihl + doff)?;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Some((src, dst, u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]), payload))
}

impl FlowTap {
    /// Starts watching interface `ifname` of namespace `ns`.
    pub fn start(ns: &str, ifname: &str) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples { ops: Vec::new(), start_unix_ms: crate::migration::unix_ms() }));
        let (s2, st2, name) = (samples.clone(), stop.clone(), ifname.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = netsim::spawn_in_ns(ns, move || -> io::Result<()> {
            let sock = match open(&name) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            capture(&sock, &s2, &st2)
        })?;
        ready_rx.recv_timeout(Duration::from_secs(5)).map_err(|_| io::Error::other("packet tap did not start"))??;
        Ok(Self { stop, samples, thread: Some(thread) })
    }

    /// Stops and returns what it saw.
    pub fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) | Ok(Err(e)) => log::warn!("packet tap: {e}"),
                Err(_) => log::warn!("packet tap: thread panicked"),
            }
        }
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for FlowTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn open(ifname: &str) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor this function owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname).map_err(|_| io::Error::other("bad interface name"))?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface {ifname}")));
    }
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: bind with a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Wake up every 100 ms to check the stop flag.
    let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: setsockopt with a valid timeval of the size passed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(sock)
}

fn capture(sock: &OwnedFd, samples: &Mutex<Samples>, stop: &AtomicBool) -> io::Result<()> {
    let t0 = Instant::now();
    let mut buf = vec![0u8; 2048];
    // (server, client port) -> when the request in flight was first seen.
    let mut flight: HashMap<(Ipv4Addr, u16), Instant> = HashMap::new();
    let mut ops = Vec::with_capacity(1 << 20);
    while !stop.load(Ordering::Acquire) {
        // SAFETY: recv into a live buffer of the length passed.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let now = Instant::now();
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        let Some((src, dst, sport, dport, len)) = parse(&buf[..n as usize]) else { continue };
        if len == 0 {
            continue;
        }
        if dport == MEMCACHED_PORT {
            flight.entry((dst, sport)).or_insert(now);
        } else if sport == MEMCACHED_PORT {
            if let Some(t) = flight.remove(&(src, dport)) {
                ops.push(Op {
                    at_ms: now.duration_since(t0).as_secs_f64() * 1000.0,
                    server: src,
                    wait_us: now.duration_since(t).as_micros().min(u32::MAX as u128) as u32,
                });
            }
        }
    }
    samples.lock().unwrap_or_else(|e| e.into_inner()).ops = ops;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        ip[9] = 6;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let tcp = &mut ip[20..];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 5 << 4;
        f
    }

    #[test]
    fn parses_tcp_payload_and_ignores_the_rest() {
        let f = frame([10, 0, 29, 100], [10, 0, 29, 10], 40000, 11211, 30);
        assert_eq!(parse(&f), Some((Ipv4Addr::new(10, 0, 29, 100), Ipv4Addr::new(10, 0, 29, 10), 40000, 11211, 30)));
        assert_eq!(parse(&f[..20]), None);
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&arp), None);
        let mut bad = f;
        bad[14 + 2..14 + 4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(parse(&bad), None, "an IP length shorter than the headers");
    }

    #[test]
    fn buckets_count_and_rank() {
        let s = Samples {
            start_unix_ms: 1000,
            ops: (0..100)
                .map(|i| Op { at_ms: i as f64 * 2.0, server: Ipv4Addr::new(10, 0, 0, 1), wait_us: (i + 1) * 10 })
                .collect(),
        };
        let b = s.buckets(Ipv4Addr::new(10, 0, 0, 1), 1000, 1200, 1100, 100);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].t_ms, -100);
        assert_eq!(b[0].ops_per_sec, 500.0);
        assert_eq!(b[1].ops_per_sec, 500.0);
        assert_eq!(b[0].p90_ms, 0.45);
        assert!(s.buckets(Ipv4Addr::new(10, 0, 0, 2), 1000, 1200, 1000, 100).iter().all(|b| b.ops_per_sec == 0.0));
        assert_eq!(s.percentile(Ipv4Addr::new(10, 0, 0, 1), 1000, 1200, 0.99), 0.99);
    }
}
