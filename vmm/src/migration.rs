//! Live migration between two VMMs: stop-and-copy and pre-copy so far.
//!
//! The stream, after the authenticated handshake (shared key,
//! `migrate::wire`), is: a `Config` frame (the VM's shape, so the
//! destination can map its memory), zero or more `Pages` frames (pre-copy
//! rounds, sent while the VM runs), a `Switchover` frame, then a snapshot
//! stream (`snapshot.rs`: KVM and device state plus the pages not yet sent
//! or dirtied since, checksummed). The source connects and authenticates
//! *before* touching the VM, so a wrong address, a dead destination or a
//! stranger leaves it running unchanged; after pausing it waits for the
//! destination's acknowledgement, sent only once the VM is fully restored.
//! Until that byte arrives the source resumes on any failure; after it, the
//! source VM ends ("migrated"). The source side lives in `vm.rs`
//! (`Shared::migrate`), which owns the VM; this module holds the transport
//! and the destination side.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use migrate::wire::{self, Channel, FrameReader, Key, Kind};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMem};
use crate::snapshot::{SnapshotConfig, SnapshotReader};
use migrate::dest::Dest;
use migrate::space::{page_digest, Digests, PageSpace};
pub use migrate::transport::{Counting, SharedCounting};

/// Byte the destination sends once the VM is restored.
const ACK: u8 = b'A';
/// How long the source waits for the destination to restore.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// Pages per `Pages` frame (1 MiB of data).
pub const PAGES_PER_FRAME: usize = 256;

/// Migration modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    StopAndCopy,
    Precopy,
    Postcopy,
    Enlightened,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        Ok(match s {
            "stop-and-copy" => Mode::StopAndCopy,
            "precopy" => Mode::Precopy,
            "postcopy" => Mode::Postcopy,
            "enlightened" => Mode::Enlightened,
            other => {
                return Err(format!(
                    "unknown migration mode `{other}`; expected stop-and-copy, precopy, postcopy or enlightened"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::StopAndCopy => "stop-and-copy",
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Enlightened => "enlightened",
        }
    }
}

/// Reads the migration key from a file (any content; a BLAKE3-derived key).
pub fn load_key(path: &Path) -> Result<Key, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    if bytes.len() < 16 {
        return Err(format!("the key file {} holds fewer than 16 bytes; use a random key", path.display()));
    }
    Ok(Key::derive(&bytes))
}

fn resolve(to: &str) -> Result<SocketAddr, String> {
    to.to_socket_addrs()
        .map_err(|e| format!("bad destination `{to}`: {e}"))?
        .next()
        .ok_or_else(|| format!("bad destination `{to}`: no address"))
}

/// Connects to a destination and authenticates (main channel).
pub fn connect(to: &str, key: &Key) -> Result<TcpStream, String> {
    connect_channel(to, key, Channel::Main)
}

/// Connects one channel of a migration and authenticates.
pub fn connect_channel(to: &str, key: &Key, channel: Channel) -> Result<TcpStream, String> {
    let addr = resolve(to)?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to the destination {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    wire::connect_handshake(&mut stream, key, channel)
        .map_err(|e| format!("destination {addr} ({channel:?} channel): {e}"))?;
    Ok(stream)
}

/// Waits for the destination's confirmation that the VM is restored; returns
/// the digest of the memory it received (all zero in post-copy, where the
/// memory follows).
pub fn await_confirmation(stream: &TcpStream) -> Result<[u8; 32], String> {
    stream.set_read_timeout(Some(ACK_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut ack = [0u8; 33];
    let mut s = stream;
    s.read_exact(&mut ack[..1]).map_err(|e| format!("the destination did not confirm the restore: {e}"))?;
    if ack[0] != ACK {
        return Err(format!("the destination answered {:#x} instead of confirming the restore", ack[0]));
    }
    s.read_exact(&mut ack[1..]).map_err(|e| format!("the destination did not confirm the restore: {e}"))?;
    Ok(ack[1..].try_into().expect("32 bytes"))
}

/// Tells the source the VM is restored (it may end its copy), with the
/// digest of the memory received.
pub fn confirm(stream: &mut TcpStream, digest: &[u8; 32]) -> std::io::Result<()> {
    let mut b = [0u8; 33];
    b[0] = ACK;
    b[1..].copy_from_slice(digest);
    stream.write_all(&b)?;
    stream.flush()
}

/// A migration in progress, as `status` shows it.
#[derive(Default)]
pub struct Progress {
    /// (mode, phase, start) of the migration; None when there is none.
    pub phase: std::sync::Mutex<Option<(&'static str, String, std::time::Instant)>>,
    /// Bytes written to the destination so far (all connections).
    pub bytes: Arc<std::sync::atomic::AtomicU64>,
    /// The operator asked to cancel (honoured until the switch-over).
    pub cancel: std::sync::atomic::AtomicBool,
    /// The switch-over is committed: cancelling would lose the VM.
    pub committed: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub fn set(&self, mode: Mode, phase: &str) {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let start = p.as_ref().map(|x| x.2).unwrap_or_else(std::time::Instant::now);
        *p = Some((mode.name(), phase.to_owned(), start));
    }
    pub fn start(&self, mode: Mode) {
        self.bytes.store(0, std::sync::atomic::Ordering::Relaxed);
        self.cancel.store(false, std::sync::atomic::Ordering::Release);
        self.committed.store(false, std::sync::atomic::Ordering::Release);
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((mode.name(), "connecting".into(), std::time::Instant::now()));
    }
    /// Err if the operator cancelled.
    pub fn check(&self) -> Result<(), String> {
        if self.cancel.load(std::sync::atomic::Ordering::Acquire) {
            Err("cancelled by the operator".into())
        } else {
            Ok(())
        }
    }

    /// Asks the migration in progress to stop.
    pub fn request_cancel(&self) -> Result<(), String> {
        if self.phase.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return Err("no migration is in progress".into());
        }
        if self.committed.load(std::sync::atomic::Ordering::Acquire) {
            return Err("too late to cancel: the VM already runs at the destination and this VMM holds the pages it \
                        still needs; the migration ends once they are delivered (restore the link if it is down)"
                .into());
        }
        self.cancel.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    pub fn end(&self) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    pub fn json(&self) -> Option<serde_json::Value> {
        let p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let (mode, phase, start) = p.as_ref()?;
        let secs = start.elapsed().as_secs_f64();
        let bytes = self.bytes.load(std::sync::atomic::Ordering::Relaxed);
        Some(serde_json::json!({
            "mode": mode, "phase": phase, "elapsed_s": secs, "bytes_sent": bytes,
            "mbit_s": bytes as f64 * 8.0 / secs.max(1e-3) / 1e6,
        }))
    }
    /// A writer that counts into [`Self::bytes`].
    pub fn counting<W: Write>(&self, inner: W) -> SharedCounting<W> {
        SharedCounting::new(inner, self.bytes.clone())
    }
}

/// An authenticated incoming migration: memory pre-copied, state read and
/// checked; the rest of memory follows in `reader` (or, post-copy, through
/// `postcopy`).
pub struct Incoming {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub mem: Arc<GuestMem>,
    pub reader: SnapshotReader,
    pub precopied_pages: u64,
    pub postcopy: Option<PostcopyIncoming>,
    /// Digest of the memory received (stop-and-copy, pre-copy), compared by
    /// the source with its memory at suspension.
    pub integrity: [u8; 32],
}

/// The destination's half of a post-copy migration in progress: guest RAM
/// registered with userfaultfd, demand faults already served, the main
/// connection positioned after the VM state.
pub struct PostcopyIncoming {
    pub dest: Arc<Dest>,
    pub mode: String,
    pub rest: FrameReader<Box<dyn Read + Send>>,
    /// The listener, for the source to reconnect on if a connection breaks.
    listener: TcpListener,
    key: Key,
}

impl PostcopyIncoming {
    /// Waits for the source's `Go` (the switch-over is committed).
    pub fn wait_go(&mut self, stream: &TcpStream) -> Result<(), String> {
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let f = self.rest.expect().map_err(|e| format!("waiting for the source to commit: {e}"))?;
        stream.set_read_timeout(None).map_err(|e| e.to_string())?;
        match f.kind {
            Kind::Go => Ok(()),
            Kind::Abort => Err(format!("the source aborted: {}", String::from_utf8_lossy(&f.payload))),
            other => Err(format!("expected the source's commit, got a {other:?} frame")),
        }
    }

    /// Runs the rest of the migration on background threads: pushed pages,
    /// completion, acknowledgement. `mem` is the running VM's memory (for
    /// the progress timeline).
    pub fn finish_in_background(self, stream: &TcpStream, mem: Arc<GuestMem>) -> Result<(), String> {
        let PostcopyIncoming { dest, rest, listener, key, .. } = self;
        *dest.resumed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
        let (m, stop, tl) = (mem, dest.sampling_done.clone(), dest.timeline.clone());
        std::thread::spawn(move || crate::progress::sample_progress(m, stop, tl));
        let main = stream.try_clone().map_err(|e| e.to_string())?;
        let dest2 = dest.clone();
        let d = dest.clone();
        std::thread::Builder::new()
            .name("postcopy-free".into())
            .spawn(move || d.zero_free_pages())
            .map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name("postcopy-main".into())
            .spawn(move || {
                if let Err(e) = dest.main_reader((rest, main, 0)) {
                    log::error!("post-copy: {e}");
                }
                dest.sampling_done.store(true, std::sync::atomic::Ordering::Release);
            })
            .map_err(|e| e.to_string())?;
        let d = dest2;
        std::thread::Builder::new()
            .name("postcopy-resume".into())
            .spawn(move || accept_reconnections(&d, &listener, &key))
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

impl PostcopyIncoming {
    /// Gives up on this migration: ends the fault threads.
    pub fn discard(&self) {
        self.dest.done.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Accepts a post-copy source's reconnections (after a broken connection)
/// until every page is present and a while after.
fn accept_reconnections(dest: &Arc<Dest>, listener: &TcpListener, key: &Key) {
    use std::sync::atomic::Ordering;
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let mut done_since: Option<std::time::Instant> = None;
    loop {
        if dest.done.load(Ordering::Acquire) {
            let t = *done_since.get_or_insert_with(std::time::Instant::now);
            if t.elapsed() > Duration::from_secs(30) {
                return;
            }
        }
        let (mut s, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                log::warn!("post-copy: accepting a reconnection: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = wire::accept_handshake(&mut s, key, Channel::Main) {
            log::warn!("post-copy: refused a connection from {peer}: {e}");
            continue;
        }
        let Ok(r) = s.try_clone() else { continue };
        let mut fr: FrameReader<Box<dyn Read + Send>> =
            FrameReader::new(Box::new(BufReader::with_capacity(1 << 20, r)));
        let token = dest.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match fr.expect() {
            Ok(f) if f.kind == Kind::Info => {
                let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap_or_default();
                if v["resume"].as_str() != Some(token.as_str()) || token.is_empty() {
                    log::warn!("post-copy: {peer} asked to resume another migration");
                    continue;
                }
            }
            Ok(f) => {
                log::warn!("post-copy: {peer} sent {:?} instead of a resume request", f.kind);
                continue;
            }
            Err(e) => {
                log::warn!("post-copy: {peer}: {e}");
                continue;
            }
        }
        let demand = match accept_demand(listener, key, peer) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("post-copy: reconnection from {peer}: {e}");
                continue;
            }
        };
        let _ = listener.set_nonblocking(true);
        let _ = s.set_read_timeout(None);
        if let Err(e) = dest.reattach(fr, s, demand) {
            log::warn!("post-copy: reconnection from {peer}: {e}");
        }
    }
}

/// Accepts the demand connection of a post-copy migration (within 10 s).
fn accept_demand(listener: &TcpListener, key: &Key, peer: SocketAddr) -> Result<TcpStream, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let r = loop {
        if std::time::Instant::now() > deadline {
            break Err(format!("{peer} did not open the demand connection"));
        }
        match listener.accept() {
            Ok((mut s, from)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                match wire::accept_handshake(&mut s, key, Channel::Demand) {
                    Ok(()) => {
                        let _ = s.set_read_timeout(None);
                        migrate::transport::mark_interactive(&s);
                        break Ok(s);
                    }
                    Err(e) => log::warn!("receive: refused a demand connection from {from}: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => break Err(format!("accepting the demand connection: {e}")),
        }
    };
    listener.set_nonblocking(false).map_err(|e| e.to_string())?;
    r
}

/// Receives the pre-switchover part of a migration stream.
fn receive_stream(stream: &TcpStream, peer: SocketAddr, listener: &TcpListener, key: &Key) -> Result<Incoming, String> {
    let mut br = BufReader::with_capacity(1 << 20, stream.try_clone().map_err(|e| e.to_string())?);
    // Frames up to the switch-over; the snapshot stream follows in `br`.
    let mut postcopy: Option<(Arc<Dest>, String)> = None;
    let space;
    let digests;
    let (config, mem, precopied, next_seq) = {
        let mut fr = FrameReader::new(&mut br);
        let first = fr.expect().map_err(|e| e.to_string())?;
        if first.kind != Kind::Config {
            return Err(format!("expected the VM configuration, got a {:?} frame", first.kind));
        }
        let config: SnapshotConfig =
            serde_json::from_slice(&first.payload).map_err(|e| format!("malformed VM configuration: {e}"))?;
        memory::validate_size(config.mem_size).map_err(|e| e.to_string())?;
        if config.vcpus == 0 || config.vcpus > crate::vm::MAX_VCPUS_LINUX {
            return Err(format!("the incoming VM has {} vCPUs", config.vcpus));
        }
        let mem = memory::create(&crate::arch::ram_regions(config.mem_size)).map_err(|e| e.to_string())?;
        space = PageSpace::of(&mem);
        digests = Digests::filled(space.pages(), migrate::space::zero_digest());
        let mut precopied = 0;
        loop {
            let f = fr.expect().map_err(|e| e.to_string())?;
            match f.kind {
                Kind::Info if precopied == 0 && postcopy.is_none() => {
                    let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap_or_default();
                    let mode = v["mode"].as_str().unwrap_or("").to_owned();
                    if mode == "postcopy" || mode == "enlightened" {
                        // Guest RAM is untouched: register it before anything reads it.
                        let dest = Arc::new(Dest::register(&mem)?);
                        *dest.token.lock().unwrap_or_else(|e| e.into_inner()) =
                            v["token"].as_str().unwrap_or("").to_owned();
                        let demand = accept_demand(listener, key, peer)?;
                        dest.set_sockets(vec![
                            stream.try_clone().map_err(|e| e.to_string())?,
                            demand.try_clone().map_err(|e| e.to_string())?,
                        ]);
                        let reader = demand.try_clone().map_err(|e| e.to_string())?;
                        let (d1, d2) = (dest.clone(), dest.clone());
                        std::thread::Builder::new()
                            .name("postcopy-faults".into())
                            .spawn(move || d1.fault_loop(demand))
                            .map_err(|e| e.to_string())?;
                        std::thread::Builder::new()
                            .name("postcopy-demand".into())
                            .spawn(move || d2.demand_reader(reader))
                            .map_err(|e| e.to_string())?;
                        log::info!("receive: {mode} post-copy from {peer}; guest RAM registered with userfaultfd");
                        postcopy = Some((dest, mode));
                    }
                }
                Kind::FreeRanges => {
                    let dest = postcopy.as_ref().ok_or("free ranges outside a post-copy migration")?;
                    dest.0.note_free(
                        &migrate::space::decode_ranges(&f.payload, "free ranges").map_err(|e| e.to_string())?,
                    )?;
                }
                Kind::Pages => {
                    for (gpa, page) in wire::page_records(&f.payload).map_err(|e| e.to_string())? {
                        if gpa % 4096 != 0 {
                            return Err(format!("page address {gpa:#x} is not aligned"));
                        }
                        mem.write_slice(page, GuestAddress(gpa))
                            .map_err(|_| format!("page {gpa:#x} is outside the VM"))?;
                        if let Some(i) = space.index(gpa) {
                            digests.set(i, page_digest(page));
                        }
                        precopied += 1;
                    }
                }
                Kind::Switchover => break,
                Kind::Abort => return Err(format!("the source aborted: {}", String::from_utf8_lossy(&f.payload))),
                other => return Err(format!("unexpected {other:?} frame before switch-over")),
            }
        }
        let next = fr.next_seq();
        (config, mem, precopied, next)
    };
    let mut reader = SnapshotReader::from_stream(Box::new(br), Path::new(&format!("migration stream from {peer}")))
        .map_err(|e| e.to_string())?;
    if reader.snapshot.config != config {
        return Err("the VM state does not match the announced configuration".into());
    }
    let mut integrity = [0u8; 32];
    let postcopy = match postcopy {
        None => {
            let mut on_page = |gpa: u64, page: &[u8]| {
                if let Some(i) = space.index(gpa) {
                    digests.set(i, page_digest(page));
                }
            };
            reader.read_memory_and_take_rest(&mem, &mut on_page).map_err(|e| e.to_string())?;
            integrity = digests.summary();
            None
        }
        Some((dest, mode)) => {
            let (_, rest) = reader.read_memory_and_take_rest(&mem, &mut |_, _| {}).map_err(|e| e.to_string())?;
            Some(PostcopyIncoming {
                dest,
                mode,
                rest: FrameReader::with_seq(rest, next_seq),
                listener: listener.try_clone().map_err(|e| e.to_string())?,
                key: key.clone(),
            })
        }
    };
    let stream = stream.try_clone().map_err(|e| e.to_string())?;
    Ok(Incoming { stream, peer, mem: Arc::new(mem), reader, precopied_pages: precopied, postcopy, integrity })
}

/// Waits for a connection that authenticates and delivers a valid stream up
/// to the VM state. Strangers and broken streams are logged and refused.
pub fn accept(listener: &TcpListener, key: &Key) -> Incoming {
    loop {
        let (mut stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("receive: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        if let Err(e) = wire::accept_handshake(&mut stream, key, Channel::Main) {
            log::warn!("receive: refused connection from {peer}: {e}");
            continue;
        }
        log::info!("receive: authenticated migration from {peer}");
        match receive_stream(&stream, peer, listener, key) {
            Ok(inc) => {
                log::info!(
                    "receive: {}-vCPU VM from {peer}, {} pages pre-copied",
                    inc.reader.snapshot.config.vcpus,
                    inc.precopied_pages
                );
                return inc;
            }
            Err(e) => log::error!("receive: refused the migration from {peer}: {e}"),
        }
    }
}
