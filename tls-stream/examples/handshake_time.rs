//! Times TLS handshakes on loopback (shared key): `cargo run --release --example handshake_time`.
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn main() {
    let cfg = tls_stream::Config::shared_key(b"0123456789abcdef0123456789abcdef").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let c2 = cfg.clone();
    std::thread::spawn(move || loop {
        let (s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let _ = c2.accept(s).unwrap();
    });
    for _ in 0..5 {
        let t = Instant::now();
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let _c = cfg.connect(s, "127.0.0.1").unwrap();
        println!("handshake {:.2} ms", t.elapsed().as_secs_f64() * 1000.0);
    }
}
