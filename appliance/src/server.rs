//! The appliance server: HTTP/1.1 over plain TCP, one thread per connection,
//! keep-alive, stateless per request.
//!
//! | request | response |
//! |---|---|
//! | `GET /v1/appliances/NAME` | hex hash of the current manifest (`no-cache`) |
//! | `GET /v1/manifests/HASH` | manifest bytes (`immutable`) |
//! | `GET /v1/chunks/HASH` | encoded chunk (`immutable`) |
//! | `POST /v1/chunks:batch` | body: concatenated 32-byte hashes (at most 4096); response: frames `hash | u32 len | encoded chunk` |
//! | `GET /v1/appliances/NAME/knowledge` | latest analysis result, version in `X-Knowledge-Version` (`no-cache`) |
//! | `GET /v1/appliances/NAME/knowledge/V` | analysis result version V (`immutable`) |
//! | `POST /v1/appliances/NAME/traces` | body: a trace; stored after validation; `201` with its hash |
//!
//! A request with `X-Priority: demand` marks its connection interactive
//! (SO_PRIORITY 6) so its responses leave ahead of bulk prefetch traffic.
//!
//! Content-addressed URLs never change meaning, so any HTTP cache or CDN can
//! sit in front of one or more servers.

use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::chunk::{self, ChunkHash};
use crate::http::{self, ReadError, MAX_BATCH};
use crate::store::Store;
use crate::trace::Trace;
use crate::{io_err, Error, Result};

const MAX_TRACE: usize = 256 << 20;
const MAX_CONNECTIONS: usize = 512;
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

type Conns = Arc<std::sync::Mutex<std::collections::HashMap<u64, TcpStream>>>;

/// A bound server; [`Server::spawn`] runs it in the background, [`Server::run`] in this thread.
pub struct Server {
    listener: TcpListener,
    store: Store,
}

/// A server running in the background; stops when dropped.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Conns,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Stops accepting connections and shuts the open ones down (as a
    /// server that goes away would).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for (_, c) in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Server {
    pub fn bind(store: Store, addr: &str) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(io_err(format!("listen on {addr}")))?;
        Ok(Self { listener, store })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound socket has an address")
    }

    pub fn spawn(self) -> ServerHandle {
        let addr = self.local_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Conns::default();
        let (s2, c2) = (stop.clone(), conns.clone());
        let thread = std::thread::Builder::new()
            .name("appliance-server".into())
            .spawn(move || self.serve(&s2, &c2))
            .expect("spawn server thread");
        ServerHandle { addr, stop, conns, thread: Some(thread) }
    }

    /// Serves forever.
    pub fn run(self) {
        self.serve(&AtomicBool::new(false), &Conns::default())
    }

    fn serve(self, stop: &AtomicBool, conns: &Conns) {
        let live = Arc::new(AtomicUsize::new(0));
        let mut next_id = 0u64;
        for conn in self.listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            if live.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                let mut w = &conn;
                let _ = http::write_response(&mut w, 503, &[], b"too many connections\n", true);
                continue;
            }
            live.fetch_add(1, Ordering::SeqCst);
            next_id += 1;
            let id = next_id;
            if let Ok(c) = conn.try_clone() {
                conns.lock().unwrap_or_else(|e| e.into_inner()).insert(id, c);
            }
            let store = self.store.clone();
            let (live2, conns2) = (live.clone(), conns.clone());
            let spawned = std::thread::Builder::new().name("appliance-conn".into()).spawn(move || {
                handle_connection(&store, conn);
                conns2.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                live2.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                live.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

fn handle_connection(store: &Store, conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = conn.set_nodelay(true);
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let Ok(wconn) = conn.try_clone() else { return };
    let mut r = BufReader::with_capacity(64 << 10, conn);
    let mut w = BufWriter::with_capacity(256 << 10, wconn);
    let mut interactive = false;
    loop {
        let (req, http10) = match http::read_message_with(&mut r, false, &body_limit) {
            Ok(x) => x,
            Err(ReadError::Closed) | Err(ReadError::Io(_)) => return,
            Err(ReadError::Bad(status, why)) => {
                log::debug!("appliance server: {peer}: bad request: {why}");
                let _ = http::write_response(&mut w, status, &[], format!("{why}\n").as_bytes(), true);
                return;
            }
        };
        let close = req.wants_close(http10);
        if !interactive && req.header("x-priority").is_some_and(|v| v.eq_ignore_ascii_case("demand")) {
            http::set_interactive(w.get_ref());
            interactive = true;
        }
        let (status, headers, body) = route(store, &req.first, &req.second, &req.body);
        if status >= 400 {
            log::debug!("appliance server: {peer}: {} {} -> {status}", req.first, req.second);
        }
        if http::write_response(&mut w, status, &headers, &body, close).is_err() || close {
            return;
        }
    }
}

/// Largest request body per route.
fn body_limit(method: &str, path: &str) -> usize {
    match method {
        "POST" if path.starts_with("/v1/chunks:batch") => MAX_BATCH * 32,
        "POST" => MAX_TRACE,
        _ => 4096,
    }
}

type Reply = (u16, Vec<(&'static str, String)>, Vec<u8>);

fn err_reply(e: &Error) -> Reply {
    let status = match e {
        Error::NotFound(_) => 404,
        Error::Invalid(_) | Error::BadTrace(_) | Error::BadVersion { .. } => 400,
        _ => 500,
    };
    (status, vec![("Content-Type", "text/plain".into())], format!("{e}\n").into_bytes())
}

fn ok(body: Vec<u8>, cache: &str) -> Reply {
    (200, vec![("Content-Type", "application/octet-stream".into()), ("Cache-Control", cache.into())], body)
}

fn route(store: &Store, method: &str, path: &str, body: &[u8]) -> Reply {
    let path = path.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let res: Result<Reply> = match (method, segs.as_slice()) {
        ("GET", ["v1", "appliances", name]) => {
            store.appliance(name).map(|h| ok(format!("{h}\n").into_bytes(), "no-cache"))
        }
        ("GET", ["v1", "manifests", h]) => ChunkHash::from_hex(h).and_then(|h| store.get_manifest_bytes(&h)).map(|b| {
            let mut r = ok(b, IMMUTABLE);
            r.1.push(("ETag", format!("\"{h}\"")));
            r
        }),
        ("GET", ["v1", "chunks", h]) => ChunkHash::from_hex(h).and_then(|h| store.get_chunk_encoded(&h)).map(|b| {
            let mut r = ok(b, IMMUTABLE);
            r.1.push(("ETag", format!("\"{h}\"")));
            r
        }),
        ("POST", ["v1", "chunks:batch"]) => batch(store, body),
        ("GET", ["v1", "appliances", name, "knowledge"]) => store.latest_knowledge(name).map(|(v, b)| {
            let mut r = ok(b, "no-cache");
            r.1.push(("X-Knowledge-Version", v.to_string()));
            r
        }),
        ("GET", ["v1", "appliances", name, "knowledge", v]) => match v.parse::<u64>() {
            Ok(v) => knowledge_version(store, name, v),
            Err(_) => Err(Error::Invalid(format!("knowledge version `{v}`"))),
        },
        ("POST", ["v1", "appliances", name, "traces"]) => (|| {
            store.appliance(name)?;
            let t = Trace::parse(body)?;
            if t.header.appliance != *name {
                return Err(Error::Invalid(format!("trace of appliance `{}` posted to `{name}`", t.header.appliance)));
            }
            let h = store.put_trace(name, body)?;
            Ok((201, vec![("Content-Type", "text/plain".into())], format!("{h}\n").into_bytes()))
        })(),
        (_, ["v1", ..]) if !matches!(method, "GET" | "POST") => {
            Ok((405, vec![("Allow", "GET, POST".into())], b"method not allowed\n".to_vec()))
        }
        _ => Err(Error::NotFound(format!("route {method} {}", path.chars().take(200).collect::<String>()))),
    };
    res.unwrap_or_else(|e| err_reply(&e))
}

fn knowledge_version(store: &Store, name: &str, v: u64) -> Result<Reply> {
    let p = store.root().join("appliances").join(name).join("knowledge").join(format!("{v:08}.json"));
    store.appliance(name)?;
    match std::fs::read(&p) {
        Ok(b) => Ok(ok(b, IMMUTABLE)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::NotFound(format!("knowledge version {v} of `{name}`")))
        }
        Err(e) => Err(Error::Io { path: p, source: e }),
    }
}

fn batch(store: &Store, body: &[u8]) -> Result<Reply> {
    if body.len() % 32 != 0 {
        return Err(Error::Invalid("batch body must be concatenated 32-byte hashes".into()));
    }
    let n = body.len() / 32;
    if n > MAX_BATCH {
        return Err(Error::Invalid(format!("batch of {n} chunks (at most {MAX_BATCH})")));
    }
    let mut out = Vec::with_capacity(n * 2048);
    for h in body.chunks_exact(32) {
        let h = ChunkHash(h.try_into().unwrap());
        let enc = store.get_chunk_encoded(&h)?;
        chunk::write_frame(&mut out, &h, &enc);
    }
    Ok((200, vec![("Content-Type", "application/octet-stream".into())], out))
}
