//! The destination side of a migration between two VMMs.
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
//! source VM ends ("migrated"). The source side is the engine's
//! (`migrate::source`, driving the VM through `migratable.rs`); this module
//! accepts a migration and rebuilds the VM's memory and state here.

use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use migrate::wire::{self, Channel, FrameReader, Key, Kind};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMem};
use crate::snapshot::{SnapshotConfig, SnapshotReader};
use migrate::dest::Dest;
pub use migrate::progress::{Mode, Progress};
use migrate::space::{page_digest, Digests, PageSpace};
pub use migrate::transport::{confirm, load_key};

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
