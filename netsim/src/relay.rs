//! A user-space TCP relay that adds latency (the kernel here has no
//! `netem`): every byte is held for `one_way` in each direction, so a
//! connection through the relay sees `2 * one_way` more round-trip time.
//! Bandwidth is left to `tbf` ([`crate::NetnsPair`]); the relay forwards
//! as fast as bytes arrive, preserving their timing, and keeps at most
//! [`MAX_IN_FLIGHT`] bytes per direction queued (enough for the
//! bandwidth-delay product of the WAN links the thesis emulates: 14.4 Mbit/s
//! with 60 ms is 108 KB).
//!
//! ```no_run
//! # use std::time::Duration;
//! let relay = netsim::relay::Relay::bind("127.0.0.1:0", "10.77.0.1:8080".parse().unwrap(), Duration::from_millis(60))?;
//! // clients connect to relay.addr() instead of the server
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes queued per direction before the relay stops reading.
pub const MAX_IN_FLIGHT: usize = 8 << 20;
const READ_SIZE: usize = 16 << 10;

/// Bytes with the time they may leave the relay.
type Timed = (Instant, Vec<u8>);
type Conns = Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>;

/// A running relay; stops (and cuts its connections) when dropped.
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Conns,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `listen` and relays each connection to `upstream`,
    /// delaying each direction by `one_way` (half the added round trip).
    pub fn bind(listen: &str, upstream: SocketAddr, one_way: Duration) -> io::Result<Self> {
        Self::start(TcpListener::bind(listen)?, upstream, one_way)
    }

    /// Like [`Relay::bind`] with a listener bound by the caller (e.g. in a
    /// network namespace). The relay's threads are created by the calling
    /// thread and so share its network namespace.
    pub fn start(listener: TcpListener, upstream: SocketAddr, one_way: Duration) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let (s2, c2) = (stop.clone(), conns.clone());
        let thread = std::thread::Builder::new().name("relay-accept".into()).spawn(move || {
            let next = AtomicU64::new(0);
            for client in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let id = next.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = connect(id, client, upstream, one_way, &c2) {
                    log::warn!("relay: connection to {upstream}: {e}");
                }
            }
        })?;
        Ok(Self { addr, stop, conns, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and cuts every relayed connection.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for (_, (a, b)) in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

fn connect(id: u64, client: TcpStream, upstream: SocketAddr, one_way: Duration, conns: &Conns) -> io::Result<()> {
    let server = TcpStream::connect_timeout(&upstream, Duration::from_secs(10))?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    conns.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (client.try_clone()?, server.try_clone()?));
    let done = Arc::new(AtomicU64::new(0));
    for (from, to, name) in [(client.try_clone()?, server.try_clone()?, "relay-up"), (server, client, "relay-down")] {
        let (conns, done) = (conns.clone(), done.clone());
        pipe(from, to, one_way, name, move || {
            // The second direction to finish forgets the connection.
            if done.fetch_add(1, Ordering::SeqCst) == 1 {
                conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            }
        })?;
    }
    Ok(())
}

/// One direction: a reader thread stamps each read with its release time; a
/// writer thread sends it then. EOF is forwarded as a half-close, after the
/// delay like the data before it.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    name: &str,
    on_done: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    let (tx, rx): (SyncSender<Timed>, Receiver<Timed>) = sync_channel((MAX_IN_FLIGHT / READ_SIZE).max(1));
    let from2 = from.try_clone()?;
    std::thread::Builder::new().name(format!("{name}-rd")).spawn(move || {
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send((Instant::now() + delay, Vec::new()));
                    return;
                }
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    })?;
    std::thread::Builder::new().name(format!("{name}-wr")).spawn(move || {
        while let Ok((at, data)) = rx.recv() {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if data.is_empty() {
                let _ = to.shutdown(Shutdown::Write);
                break;
            }
            if to.write_all(&data).is_err() {
                // The receiver is gone: stop reading from the sender too.
                let _ = from2.shutdown(Shutdown::Read);
                break;
            }
        }
        on_done();
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NetnsPair, Side, SRC_IP};
    use std::io::BufRead;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = io::copy(&mut r, &mut s);
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        a
    }

    #[test]
    fn adds_round_trip_and_keeps_bytes_intact() {
        let echo = echo_server();
        let relay = Relay::bind("127.0.0.1:0", echo, Duration::from_millis(40)).unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        let mut r = io::BufReader::new(c.try_clone().unwrap());
        // Small messages: each round trip takes 2 * 40 ms more.
        for i in 0..3 {
            let t0 = Instant::now();
            c.write_all(format!("ping {i}\n").as_bytes()).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let rtt = t0.elapsed();
            assert_eq!(line, format!("ping {i}\n"));
            assert!(rtt >= Duration::from_millis(80), "{rtt:?}");
            assert!(rtt < Duration::from_millis(300), "{rtt:?}");
        }
        // Bulk data arrives intact and in order, then EOF passes through.
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let d2 = data.clone();
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&d2).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == data, "relayed bytes differ");
    }

    #[test]
    fn one_way_delay_each_direction() {
        // A server that sends a byte as soon as it accepts: the relay
        // connects upstream at once (SYNs are not delayed), so the client
        // sees the byte one delay after connecting.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(b"x");
                let mut b = [0u8; 1];
                let _ = s.read(&mut b);
            }
        });
        let relay = Relay::bind("127.0.0.1:0", a, Duration::from_millis(50)).unwrap();
        let t0 = Instant::now();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        let t = t0.elapsed();
        assert!(t >= Duration::from_millis(50) && t < Duration::from_millis(200), "{t:?}");
    }

    #[test]
    fn stop_cuts_connections() {
        let echo = echo_server();
        let mut relay = Relay::bind("127.0.0.1:0", echo, Duration::from_millis(1)).unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.write_all(b"a").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        relay.stop();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(b"b");
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    }

    /// The thesis' emulated WAN: 7.2 Mbit/s (tbf) with 120 ms RTT (relay),
    /// server and client in two namespaces. Needs root and iproute2.
    #[test]
    fn wan_with_tbf_and_relay() {
        let Ok(pair) = NetnsPair::create(Some(7_200_000)) else {
            eprintln!("skipping: cannot create network namespaces");
            return;
        };
        // Server in src: sends 900 KB on each connection.
        let server = pair
            .spawn_in(Side::Src, || {
                let l = TcpListener::bind((SRC_IP, 0)).unwrap();
                let port = l.local_addr().unwrap().port();
                std::thread::spawn(move || {
                    for s in l.incoming() {
                        let Ok(mut s) = s else { continue };
                        let mut b = [0u8; 1];
                        if s.read_exact(&mut b).is_ok() {
                            let _ = s.write_all(&vec![7u8; 900_000]);
                        }
                    }
                });
                port
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        // Relay and client in dst.
        let res = pair
            .spawn_in(Side::Dst, move || {
                let relay =
                    Relay::bind("127.0.0.1:0", SocketAddr::from((SRC_IP, server)), Duration::from_millis(60)).unwrap();
                let mut c = TcpStream::connect(relay.addr()).unwrap();
                let t0 = Instant::now();
                c.write_all(b"g").unwrap();
                let mut first = [0u8; 1];
                c.read_exact(&mut first).unwrap();
                let rtt = t0.elapsed();
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).unwrap();
                (rtt, t0.elapsed(), rest.len() + 1)
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        let (first_byte, total, n) = res;
        assert_eq!(n, 900_000);
        assert!(first_byte >= Duration::from_millis(120), "first byte after {first_byte:?}");
        // 900 KB at 7.2 Mbit/s is 1.0 s; plus the round trip.
        assert!(total >= Duration::from_millis(1000), "{total:?}");
        assert!(total < Duration::from_millis(2500), "{total:?}");
        eprintln!("WAN 7.2 Mbit/s + 120 ms: first byte {first_byte:?}, 900 KB in {total:?}");
    }
}
