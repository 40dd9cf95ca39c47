//! Two hosts on one machine: a pair of network namespaces ("src" and "dst")
//! joined by a veth pair, each end shaped with a `tbf` rate limit.
//!
//! Used by migration tests and benchmarks to put the source VMM in one
//! namespace and the destination in the other. The namespaces are deleted
//! when the [`NetnsPair`] is dropped; if a process dies without dropping it
//! (SIGKILL), the next [`NetnsPair::create`] on the machine reaps namespaces
//! whose owning process is gone, so nothing accumulates.
//!
//! Processes run inside a namespace with [`NetnsPair::command`] (`ip netns
//! exec`); threads of this process can enter one with [`Side::spawn_in`].

pub mod cpu;
pub mod l2;
pub mod lan;
pub mod relay;

use std::io;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "vmmnet";
/// Interface name inside each namespace.
pub const IFNAME: &str = "mig0";
/// Address of the source end.
pub const SRC_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Address of the destination end.
pub const DST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Which end of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

fn run(args: &[&str]) -> io::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run `{}` (is iproute2 installed?): {e}", args[0])))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Deletes namespaces created by processes that no longer exist.
pub fn reap_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.split('-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            log::info!("netsim: removing stale namespace {name} (process {pid} is gone)");
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

/// tbf parameters for a rate: the bucket must hold at least one timer tick
/// of traffic (rate / HZ, HZ >= 100) or the rate cannot be reached.
fn tbf_args(rate_bps: u64) -> Vec<String> {
    let burst = (rate_bps / 8 / 100).max(64 * 1024);
    vec![
        "tbf".into(),
        "rate".into(),
        format!("{rate_bps}bit"),
        "burst".into(),
        format!("{burst}b"),
        "latency".into(),
        "100ms".into(),
    ]
}

/// Two namespaces joined by a shaped veth pair; removed on drop.
pub struct NetnsPair {
    pub src_ns: String,
    pub dst_ns: String,
    rate_bps: Option<u64>,
}

impl NetnsPair {
    /// Creates the pair with an optional rate limit in bits per second,
    /// applied to both directions.
    pub fn create(rate_bps: Option<u64>) -> io::Result<Self> {
        reap_stale();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let pair = Self {
            src_ns: format!("{PREFIX}-{pid}-{n}-src"),
            dst_ns: format!("{PREFIX}-{pid}-{n}-dst"),
            rate_bps: None,
        };
        // From here on, Drop cleans up whatever was created.
        run(&["ip", "netns", "add", &pair.src_ns])?;
        run(&["ip", "netns", "add", &pair.dst_ns])?;
        run(&[
            "ip",
            "link",
            "add",
            IFNAME,
            "netns",
            &pair.src_ns,
            "type",
            "veth",
            "peer",
            "name",
            IFNAME,
            "netns",
            &pair.dst_ns,
        ])?;
        for (ns, ip) in [(&pair.src_ns, SRC_IP), (&pair.dst_ns, DST_IP)] {
            run(&["ip", "-n", ns, "addr", "add", &format!("{ip}/30"), "dev", IFNAME])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", ns, "link", "set", IFNAME, "up"])?;
        }
        let mut pair = pair;
        pair.set_rate(rate_bps)?;
        Ok(pair)
    }

    pub fn ns(&self, side: Side) -> &str {
        match side {
            Side::Src => &self.src_ns,
            Side::Dst => &self.dst_ns,
        }
    }

    pub fn ip(side: Side) -> Ipv4Addr {
        match side {
            Side::Src => SRC_IP,
            Side::Dst => DST_IP,
        }
    }

    /// The current rate limit (None = unlimited).
    pub fn rate_bps(&self) -> Option<u64> {
        self.rate_bps
    }

    /// Changes (or removes) the rate limit on both ends.
    pub fn set_rate(&mut self, rate_bps: Option<u64>) -> io::Result<()> {
        for ns in [&self.src_ns, &self.dst_ns] {
            match rate_bps {
                Some(r) => {
                    let mut args: Vec<String> =
                        ["tc", "-n", ns, "qdisc", "replace", "dev", IFNAME, "root", "handle", "1:"]
                            .iter()
                            .map(|s| s.to_string())
                            .collect();
                    args.extend(tbf_args(r));
                    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                    run(&refs)?;
                    // Inside the shaper, a priority queue instead of one FIFO:
                    // packets of sockets with SO_PRIORITY 6 (interactive; the
                    // post-copy demand channel) leave before bulk traffic, as
                    // with a flow-fair qdisc or DSCP on a real network.
                    run(&[
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "replace",
                        "dev",
                        IFNAME,
                        "parent",
                        "1:1",
                        "handle",
                        "10:",
                        "pfifo_fast",
                    ])?;
                }
                None => {
                    // Deleting the root qdisc of a device that has none fails; ignore.
                    let _ = run(&["tc", "-n", ns, "qdisc", "del", "dev", IFNAME, "root"]);
                }
            }
        }
        self.rate_bps = rate_bps;
        Ok(())
    }

    /// Takes the link down (both ends) or brings it back: a cable pull.
    pub fn set_link(&self, up: bool) -> io::Result<()> {
        for ns in [&self.src_ns, &self.dst_ns] {
            run(&["ip", "-n", ns, "link", "set", IFNAME, if up { "up" } else { "down" }])?;
        }
        Ok(())
    }

    /// A command that runs `program` inside one namespace.
    pub fn command(&self, side: Side, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(side), program]);
        c
    }

    /// Runs `f` on a new thread that has entered the namespace of `side`.
    /// Sockets it creates belong to that namespace and stay usable from any
    /// thread afterwards.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        side: Side,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<std::thread::JoinHandle<io::Result<T>>> {
        spawn_in_ns(self.ns(side), f)
    }
}

/// Runs `f` on a new thread that has entered the named network namespace
/// (`ip netns`).
pub fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<io::Result<T>>> {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    Ok(std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns with a valid namespace fd and CLONE_NEWNET only
        // changes this thread's network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    }))
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.src_ns, &self.dst_ns] {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                log::warn!("netsim: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    fn exists(ns: &str) -> bool {
        std::path::Path::new(&format!("/var/run/netns/{ns}")).exists()
    }

    #[test]
    fn pair_connects_and_is_removed_on_drop() {
        let pair = NetnsPair::create(Some(100_000_000)).unwrap();
        let (src, dst) = (pair.src_ns.clone(), pair.dst_ns.clone());
        assert!(exists(&src) && exists(&dst));
        let listener =
            pair.spawn_in(Side::Dst, || TcpListener::bind((DST_IP, 0)).unwrap()).unwrap().join().unwrap().unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = pair
            .spawn_in(Side::Src, move || {
                let mut s = TcpStream::connect((DST_IP, port)).unwrap();
                s.write_all(b"hello").unwrap();
            })
            .unwrap();
        let (mut conn, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), SRC_IP);
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        client.join().unwrap().unwrap();
        // The host namespace cannot reach the pair.
        assert!(TcpStream::connect_timeout(&(DST_IP, port).into(), Duration::from_millis(200)).is_err());
        drop(pair);
        assert!(!exists(&src) && !exists(&dst));
    }

    #[test]
    fn rate_limit_holds_and_link_can_be_cut() {
        let rate = 50_000_000u64; // 50 Mbit/s: quick to measure
        let pair = NetnsPair::create(Some(rate)).unwrap();
        let listener =
            pair.spawn_in(Side::Dst, || TcpListener::bind((DST_IP, 0)).unwrap()).unwrap().join().unwrap().unwrap();
        let port = listener.local_addr().unwrap().port();
        let sender = pair
            .spawn_in(Side::Src, move || {
                let mut s = TcpStream::connect((DST_IP, port)).unwrap();
                let chunk = vec![0u8; 64 * 1024];
                let start = Instant::now();
                let mut sent = 0u64;
                while start.elapsed() < Duration::from_millis(1500) {
                    s.write_all(&chunk).unwrap();
                    sent += chunk.len() as u64;
                }
                sent
            })
            .unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let start = Instant::now();
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) => panic!("{e}"),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        sender.join().unwrap().unwrap();
        let bps = got as f64 * 8.0 / secs;
        // Generous bounds: this checks that shaping is in place, not its precision.
        assert!(bps < rate as f64 * 1.3, "{bps} bit/s exceeds the {rate} limit");
        assert!(bps > rate as f64 * 0.3, "{bps} bit/s is far below the {rate} limit");

        pair.set_link(false).unwrap();
        let r = pair
            .spawn_in(Side::Src, move || TcpStream::connect_timeout(&(DST_IP, port).into(), Duration::from_millis(300)))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(r.is_err(), "connected over a downed link");
        pair.set_link(true).unwrap();
    }
}
