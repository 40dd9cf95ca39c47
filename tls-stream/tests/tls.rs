//! TLS streams over real TCP sockets on loopback: both authentication modes,
//! refusals, concurrent reading and writing on one session, and a relay in
//! the middle that records every byte (no plaintext crosses it) or flips one
//! (the receiver fails instead of reading altered data).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tls_stream::{Config, Stream};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-shared";

/// Accepts one connection on `l` and runs the server handshake.
fn serve(l: TcpListener, cfg: Config) -> thread::JoinHandle<std::io::Result<Stream>> {
    thread::spawn(move || {
        let (s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        cfg.accept(s)
    })
}

fn pair(server: Config, client: Config) -> (std::io::Result<Stream>, std::io::Result<Stream>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = serve(l, server);
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let c = client.connect(c, "127.0.0.1");
    (h.join().unwrap(), c)
}

/// A pattern that differs at every offset of every stream.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn shared_key_carries_both_directions_at_once_on_one_session() {
    let cfg = Config::shared_key(KEY).unwrap();
    let (s, c) = pair(cfg.clone(), cfg);
    let (s, c) = (s.unwrap(), c.unwrap());
    assert!(s.is_tls() && c.is_tls());
    const N: usize = 24 << 20;
    // Each end writes on one thread while another thread reads the same session.
    let run = |st: Stream, seed_out: u64, seed_in: u64| {
        let w = st.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let data = pattern(seed_out, N);
            for part in data.chunks(100_000) {
                (&w).write_all(part).unwrap();
            }
        });
        let mut got = Vec::with_capacity(N);
        let mut buf = vec![0u8; 70_000];
        while got.len() < N {
            let n = (&st).read(&mut buf).unwrap();
            assert!(n > 0, "early end of stream after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        writer.join().unwrap();
        assert!(got == pattern(seed_in, N), "the bytes read are the bytes written");
        st
    };
    let hs = thread::spawn(move || run(s, 1, 2));
    let c = run(c, 2, 1);
    let s = hs.join().unwrap();
    // A clean close: the peer reads the end of the stream.
    c.close_notify().unwrap();
    let mut b = [0u8; 16];
    assert_eq!((&s).read(&mut b).unwrap(), 0);
}

#[test]
fn a_different_shared_key_is_refused_by_both_ends() {
    let (s, c) = pair(
        Config::shared_key(KEY).unwrap(),
        Config::shared_key(b"another key of at least thirty-two bytes").unwrap(),
    );
    assert!(s.is_err(), "the server refused the client");
    assert!(c.is_err(), "the client refused the server");
    let short = Config::shared_key(b"too short").unwrap_err();
    assert!(short.to_string().contains("32"), "{short}");
}

#[test]
fn the_shared_key_identity_is_deterministic() {
    // Two processes with the same key must derive the same certificate: two
    // configurations from one key accept each other (above) and from copies.
    let copy: Vec<u8> = KEY.to_vec();
    let a = Config::shared_key(&copy).unwrap();
    let b = Config::shared_key(KEY).unwrap();
    let (s, c) = pair(a, b);
    assert!(s.is_ok() && c.is_ok());
}

struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    /// A CA, and certificates it signs for `names` (each SAN = its name).
    fn new(tag: &str, names: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("tls-stream-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, format!("{tag} CA"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        for n in names {
            let k = rcgen::KeyPair::generate().unwrap();
            let p = rcgen::CertificateParams::new(vec![n.to_string()]).unwrap();
            let c = p.signed_by(&k, &issuer).unwrap();
            std::fs::write(dir.join(format!("{n}.pem")), c.pem()).unwrap();
            std::fs::write(dir.join(format!("{n}.key")), k.serialize_pem()).unwrap();
        }
        Self { dir }
    }
    fn config(&self, name: &str, ca_of: &Pki, peer: Option<&str>) -> std::io::Result<Config> {
        Config::certificates(
            &self.dir.join(format!("{name}.pem")),
            &self.dir.join(format!("{name}.key")),
            &ca_of.dir.join("ca.pem"),
            peer.map(str::to_string),
        )
    }
}

#[test]
fn certificates_authenticate_both_ends_and_the_client_name() {
    let pki = Pki::new("ok", &["127.0.0.1", "source.example", "intruder.example"]);
    // The server (destination) is 127.0.0.1; it admits only source.example.
    let server = pki.config("127.0.0.1", &pki, Some("source.example")).unwrap();
    let (s, c) = pair(server.clone(), pki.config("source.example", &pki, None).unwrap());
    let (s, c) = (s.unwrap(), c.unwrap());
    (&c).write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    (&s).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    // A certificate from the same CA for another name is refused by the server.
    let (s, _c) = pair(server, pki.config("intruder.example", &pki, None).unwrap());
    let e = s.unwrap_err();
    assert!(e.to_string().contains("source.example"), "{e}");
    // A certificate from another CA is refused (either end).
    let other = Pki::new("other", &["source.example"]);
    let (s, _c) =
        pair(pki.config("127.0.0.1", &pki, None).unwrap(), other.config("source.example", &pki, None).unwrap());
    assert!(s.is_err(), "a client signed by a foreign CA is refused");
    // The client checks the server's name: a server certificate for another name fails.
    let (_s, c) =
        pair(pki.config("intruder.example", &pki, None).unwrap(), pki.config("source.example", &pki, None).unwrap());
    assert!(c.is_err(), "the client refused a server whose certificate is for another name");
    // Missing files are clear errors.
    let e = Config::certificates("/nonexistent.pem".as_ref(), "/nonexistent.key".as_ref(), "/x".as_ref(), None)
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
}

/// A TCP relay between a client and `to` that records every byte from the
/// client and flips the byte at offset `flip` (if any) of that direction.
fn relay(to: std::net::SocketAddr, flip: Option<usize>) -> (std::net::SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(to).unwrap();
        let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        thread::spawn(move || {
            let _ = std::io::copy(&mut &b2, &mut &a2);
            let _ = a2.shutdown(Shutdown::Write);
        });
        let mut buf = vec![0u8; 65536];
        let mut off = 0usize;
        loop {
            let n = match (&a).read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(f) = flip {
                if f >= off && f < off + n {
                    buf[f - off] ^= 0x40;
                }
            }
            seen2.lock().unwrap().extend_from_slice(&buf[..n]);
            off += n;
            if (&b).write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = b.shutdown(Shutdown::Write);
    });
    (addr, seen)
}

fn through_relay(flip: Option<usize>, payload: &[u8]) -> (std::io::Result<Vec<u8>>, Vec<u8>) {
    let cfg = Config::shared_key(KEY).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let srv = serve(l.try_clone().unwrap(), cfg.clone());
    let (addr, seen) = relay(l.local_addr().unwrap(), flip);
    let c = cfg.connect(TcpStream::connect(addr).unwrap(), "127.0.0.1").unwrap();
    (&c).write_all(payload).unwrap();
    c.close_notify().unwrap();
    let s = srv.join().unwrap().unwrap();
    let mut got = Vec::new();
    let r = (&s).read_to_end(&mut got).map(|_| got);
    drop(c);
    let wire = seen.lock().unwrap().clone();
    (r, wire)
}

#[test]
fn no_plaintext_crosses_the_network_and_a_flipped_byte_is_refused() {
    let marker = b"GUEST-PAGE-MARKER-5e1f09c2";
    let mut payload = Vec::new();
    for _ in 0..512 {
        payload.extend_from_slice(marker);
    }
    let (r, seen) = through_relay(None, &payload);
    assert_eq!(r.unwrap(), payload, "the relay passes the stream intact");
    assert!(
        !seen.windows(marker.len()).any(|w| w == marker),
        "the marker appears nowhere in the {} bytes on the wire",
        seen.len()
    );
    // The client's handshake is well under 2 KiB: flip a byte in the data records.
    let (r, seen) = through_relay(Some(seen.len() - 200), &payload);
    assert!(!seen.is_empty());
    let e = r.expect_err("a modified record is refused, not read");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
}

#[test]
fn plain_streams_pass_bytes_as_they_are() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    let (c, s) = (Stream::plain(c), Stream::plain(s));
    assert!(!c.is_tls());
    (&c).write_all(b"clear").unwrap();
    let mut b = [0u8; 5];
    (&s).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"clear");
}
