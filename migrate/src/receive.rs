//! The destination side of a migration, for every mode: [`accept`] waits
//! for a source that authenticates and delivers a valid stream up to the
//! switch-over, and hands back the VM's memory and state ([`Incoming`]).
//! The VMM builds the VM from them, then [`Incoming::confirm`]s (or
//! [`Incoming::refuse`]s, and the source keeps its VM). In post-copy the
//! VM runs only after the source's `Go` ([`PostcopyIncoming::wait_go`]);
//! its memory then follows ([`PostcopyIncoming::finish_in_background`]).
//!
//! The stream up to the switch-over (every message a frame, see
//! [`crate::wire`]): `Config`; for post-copy an `Info` with the mode and
//! the resume token (the demand connection follows at once); `Pages`
//! (pre-copy rounds, and the pages sent at the switch-over); `FreeRanges`
//! (enlightened); one or more `State` frames (the VM's opaque state);
//! `Switchover`. The destination answers `Ack` with the digest of the memory
//! it received (all pages in stop-and-copy and pre-copy), or `Abort` with a
//! reason.

use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::dest::Dest;
use crate::error::{Error, Result};
use crate::space::{decode_ranges, page_digest, zero_digest, Digests, GuestMem, PageSpace, PAGE_SIZE};
use crate::transport::{Conn, Credentials};
use crate::vm::IncomingVm;
use crate::wire::{self, control, Channel, FrameReader, FrameWriter, Kind};

/// How long a post-copy destination whose main connection broke before the
/// source's `Go` waits for the source to reconnect (it retries every 0.5 s).
pub const RESUME_WAIT: Duration = Duration::from_secs(60);

/// Most VM state accepted (sum of the `State` frames).
pub const MAX_STATE: usize = 256 << 20;

/// An authenticated incoming migration, read up to the switch-over.
pub struct Incoming {
    pub stream: Conn,
    pub peer: SocketAddr,
    /// The `Config` frame's payload, as the VMM accepted it.
    pub config: Vec<u8>,
    pub mem: Arc<GuestMem>,
    /// The VM's state (the `State` frames).
    pub state: Vec<u8>,
    /// Pages received before the switch-over (pre-copy and stop-and-copy).
    pub pages: u64,
    pub postcopy: Option<PostcopyIncoming>,
    /// Digest of the memory received (stop-and-copy, pre-copy), compared by
    /// the source with its memory at suspension.
    pub integrity: [u8; 32],
}

impl Incoming {
    /// Tells the source the VM is restored here (stop-and-copy, pre-copy:
    /// the source's VM ends; post-copy: the source commits with `Go`).
    pub fn confirm(&mut self) -> Result<()> {
        let mut fw = FrameWriter::new(&mut self.stream);
        fw.send(Kind::Ack, &self.integrity)?;
        fw.flush()?;
        Ok(())
    }

    /// Tells the source the VM could not be built here; it keeps its VM.
    pub fn refuse(&mut self, reason: &str) {
        if let Some(pc) = &self.postcopy {
            pc.discard();
        }
        let mut fw = FrameWriter::new(&mut self.stream);
        if fw.send(Kind::Abort, reason.as_bytes()).and_then(|_| fw.flush()).is_err() {
            log::debug!("receive: the source is gone already");
        }
    }
}

/// Waits for a connection that authenticates and delivers a valid stream up
/// to the switch-over. Strangers and broken streams are logged and refused.
pub fn accept(listener: &TcpListener, creds: &Credentials, vm: &dyn IncomingVm) -> Incoming {
    loop {
        let (tcp, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("receive: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let stream = match creds.accept(tcp, Channel::Main, Duration::from_secs(60)) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("receive: refused connection from {peer}: {e}");
                continue;
            }
        };
        log::info!("receive: authenticated migration from {peer} (protection: {})", creds.describe());
        match receive(&stream, peer, listener, creds, vm) {
            Ok(inc) => {
                log::info!("receive: VM from {peer}, {} pages received before the switch-over", inc.pages);
                return inc;
            }
            Err(e) => {
                log::error!("receive: refused the migration from {peer}: {e}");
                let mut fw = FrameWriter::new(&stream);
                let _ = fw.send(Kind::Abort, e.to_string().as_bytes()).and_then(|_| fw.flush());
            }
        }
    }
}

/// What the frames before the switch-over built.
struct Received {
    pages: u64,
    state: Vec<u8>,
    postcopy: Option<(Arc<Dest>, String)>,
}

fn receive(
    stream: &Conn,
    peer: SocketAddr,
    listener: &TcpListener,
    creds: &Credentials,
    vm: &dyn IncomingVm,
) -> Result<Incoming> {
    let br: Box<dyn Read + Send> = Box::new(BufReader::with_capacity(1 << 20, stream.try_clone()?));
    let mut fr = FrameReader::new(br);
    let first = fr.expect()?;
    if first.kind != Kind::Config {
        return Err(Error::from(format!("expected the VM configuration, got a {:?} frame", first.kind)));
    }
    let mem = vm.memory_for(&first.payload)?;
    let space = PageSpace::of(&mem);
    let digests = Digests::filled(space.pages(), zero_digest());
    let got = frames_until_switchover(&mut fr, stream, peer, listener, creds, &mem, &space, &digests)?;
    let postcopy = match got.postcopy {
        None => None,
        Some((dest, mode)) => {
            Some(PostcopyIncoming { dest, mode, rest: fr, listener: listener.try_clone()?, creds: creds.clone() })
        }
    };
    let integrity = if postcopy.is_none() { digests.summary() } else { [0; 32] };
    Ok(Incoming {
        stream: stream.try_clone()?,
        peer,
        config: first.payload,
        mem: Arc::new(mem),
        state: got.state,
        pages: got.pages,
        postcopy,
        integrity,
    })
}

#[allow(clippy::too_many_arguments)]
fn frames_until_switchover(
    fr: &mut FrameReader<Box<dyn Read + Send>>,
    stream: &Conn,
    peer: SocketAddr,
    listener: &TcpListener,
    creds: &Credentials,
    mem: &GuestMem,
    space: &PageSpace,
    digests: &Digests,
) -> Result<Received> {
    let mut got = Received { pages: 0, state: Vec::new(), postcopy: None };
    loop {
        let f = fr.expect()?;
        match f.kind {
            Kind::Info if got.pages == 0 && got.postcopy.is_none() => {
                let start: control::Start = control::decode(&f.payload, "start message")?;
                if start.mode != "postcopy" && start.mode != "enlightened" {
                    return Err(Error::from(format!("unknown post-copy mode `{}`", start.mode)));
                }
                let dest = start_postcopy(stream, peer, listener, creds, mem)?;
                *dest.token.lock().unwrap_or_else(|e| e.into_inner()) = start.token;
                log::info!("receive: {} post-copy from {peer}; guest RAM registered with userfaultfd", start.mode);
                got.postcopy = Some((dest, start.mode));
            }
            Kind::FreeRanges => {
                let (dest, _) = got.postcopy.as_ref().ok_or("free ranges outside a post-copy migration")?;
                dest.note_free(&decode_ranges(&f.payload, "free ranges")?)?;
            }
            Kind::Pages if got.postcopy.is_none() => {
                for (gpa, page) in wire::page_records(&f.payload)? {
                    if gpa % PAGE_SIZE != 0 {
                        return Err(Error::from(format!("page address {gpa:#x} is not aligned")));
                    }
                    let i = space.index(gpa).ok_or(Error::NotRam(gpa))?;
                    mem.write_slice(page, GuestAddress(gpa)).map_err(|_| Error::NotRam(gpa))?;
                    digests.set(i, page_digest(page));
                    got.pages += 1;
                }
            }
            Kind::State => {
                if got.state.len() + f.payload.len() > MAX_STATE {
                    return Err(Error::from(format!("the VM state exceeds {MAX_STATE} bytes")));
                }
                got.state.extend_from_slice(&f.payload);
            }
            Kind::Switchover if !got.state.is_empty() => return Ok(got),
            Kind::Abort => {
                return Err(Error::Aborted { by: "source", reason: String::from_utf8_lossy(&f.payload).into_owned() })
            }
            other => return Err(Error::from(format!("unexpected {other:?} frame before the switch-over"))),
        }
    }
}

/// Registers guest RAM (untouched so far) with userfaultfd, accepts the
/// demand connection and starts the fault and demand threads.
fn start_postcopy(
    stream: &Conn,
    peer: SocketAddr,
    listener: &TcpListener,
    creds: &Credentials,
    mem: &GuestMem,
) -> Result<Arc<Dest>> {
    let dest = Arc::new(Dest::register(mem)?);
    let demand = accept_demand(listener, creds, peer)?;
    dest.set_sockets(vec![stream.try_clone()?, demand.try_clone()?]);
    let reader = demand.try_clone()?;
    let (d1, d2) = (dest.clone(), dest.clone());
    std::thread::Builder::new().name("postcopy-faults".into()).spawn(move || d1.fault_loop(demand))?;
    std::thread::Builder::new().name("postcopy-demand".into()).spawn(move || d2.demand_reader(reader))?;
    Ok(dest)
}

/// The destination's half of a post-copy migration in progress: guest RAM
/// registered with userfaultfd, demand faults already served, the main
/// connection positioned after the switch-over.
pub struct PostcopyIncoming {
    pub dest: Arc<Dest>,
    pub mode: String,
    rest: FrameReader<Box<dyn Read + Send>>,
    /// The listener, for the source to reconnect on if a connection breaks.
    listener: TcpListener,
    creds: Credentials,
}

/// The guest's progress sampler for the destination's timeline: called on
/// its own thread with the flag that ends it and the samples `(unix ms, ops)`.
pub type Sampler = Box<dyn FnOnce(Arc<AtomicBool>, Arc<Mutex<Vec<(u64, u64)>>>) + Send>;

impl PostcopyIncoming {
    /// Waits for the source's commit: its `Go`, or, if the main connection
    /// broke around it, the source reconnecting with the migration's token
    /// (a source reconnects only once committed) within [`RESUME_WAIT`].
    /// An `Abort`, or neither within the wait, is an error: the source keeps
    /// (or has resumed) its VM, and this copy must not run.
    pub fn wait_go(&mut self, stream: &Conn) -> Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let f = match self.rest.expect() {
            Ok(f) => f,
            Err(e) => {
                log::warn!(
                    "post-copy: no commit on the main connection ({e}); waiting {} s for the source to reconnect",
                    RESUME_WAIT.as_secs()
                );
                return self
                    .wait_resume()
                    .map_err(|r| Error::from(format!("waiting for the source to commit: {e}; {r}")));
            }
        };
        stream.set_read_timeout(None)?;
        match f.kind {
            Kind::Go => Ok(()),
            Kind::Abort => {
                Err(Error::Aborted { by: "source", reason: String::from_utf8_lossy(&f.payload).into_owned() })
            }
            other => Err(Error::from(format!("expected the source's commit, got a {other:?} frame"))),
        }
    }

    /// The source's reconnection after a lost `Go` (see [`Self::wait_go`]).
    fn wait_resume(&mut self) -> Result<()> {
        let deadline = Instant::now() + RESUME_WAIT;
        self.listener.set_nonblocking(true)?;
        let r = loop {
            if Instant::now() > deadline {
                break Err(Error::from("the source did not reconnect: it did not commit"));
            }
            let (tcp, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => break Err(Error::from(format!("accepting the source's reconnection: {e}"))),
            };
            match reattach(&self.dest, &self.listener, &self.creds, tcp, peer) {
                Ok(()) => {
                    log::info!("post-copy: the source reconnected after the commit; resuming the VM here");
                    break Ok(());
                }
                Err(e) => log::warn!("post-copy: a connection from {peer} while waiting for the commit: {e}"),
            }
            let _ = self.listener.set_nonblocking(true);
        };
        self.listener.set_nonblocking(false)?;
        r
    }

    /// Runs the rest of the migration on background threads: pushed pages,
    /// completion, acknowledgement, reconnections; `sample` records the
    /// guest's progress for the report.
    pub fn finish_in_background(self, stream: &Conn, sample: Sampler) -> Result<()> {
        let PostcopyIncoming { dest, rest, listener, creds, .. } = self;
        *dest.resumed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let (stop, tl) = (dest.sampling_done.clone(), dest.timeline.clone());
        std::thread::spawn(move || sample(stop, tl));
        let main = stream.try_clone()?;
        let d = dest.clone();
        std::thread::Builder::new().name("postcopy-main".into()).spawn(move || {
            // The confirmation was frame 0 of this side.
            if let Err(e) = d.main_reader((rest, main, 1)) {
                log::error!("post-copy: {e}");
            }
            d.sampling_done.store(true, Ordering::Release);
        })?;
        std::thread::Builder::new()
            .name("postcopy-resume".into())
            .spawn(move || accept_reconnections(&dest, &listener, &creds))?;
        Ok(())
    }

    /// Gives up on this migration: ends the fault threads.
    pub fn discard(&self) {
        self.dest.done.store(true, Ordering::Release);
    }
}

/// Accepts a post-copy source's reconnections (after a broken connection)
/// until every page is present and a while after.
fn accept_reconnections(dest: &Arc<Dest>, listener: &TcpListener, creds: &Credentials) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let mut done_since: Option<Instant> = None;
    loop {
        if dest.done.load(Ordering::Acquire) {
            let t = *done_since.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(30) {
                return;
            }
        }
        let (s, peer) = match listener.accept() {
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
        if let Err(e) = reattach(dest, listener, creds, s, peer) {
            log::warn!("post-copy: reconnection from {peer}: {e}");
        }
        let _ = listener.set_nonblocking(true);
    }
}

/// Authenticates a reconnecting source, checks its resume token, accepts its
/// demand connection and hands both to the destination's threads.
fn reattach(
    dest: &Arc<Dest>,
    listener: &TcpListener,
    creds: &Credentials,
    tcp: std::net::TcpStream,
    peer: SocketAddr,
) -> Result<()> {
    let s = creds.accept(tcp, Channel::Main, Duration::from_secs(10))?;
    let mut fr: FrameReader<Box<dyn Read + Send>> =
        FrameReader::new(Box::new(BufReader::with_capacity(1 << 20, s.try_clone()?)));
    let token = dest.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let f = fr.expect()?;
    if f.kind != Kind::Info {
        return Err(Error::from(format!("{:?} instead of a resume request", f.kind)));
    }
    let resume: control::Resume = control::decode(&f.payload, "resume request")?;
    if resume.resume != token || token.is_empty() {
        return Err(Error::from("it asked to resume another migration"));
    }
    let demand = accept_demand(listener, creds, peer)?;
    s.set_read_timeout(None)?;
    dest.reattach(fr, s, demand)
}

/// Accepts the demand connection of a post-copy migration (within 10 s).
fn accept_demand(listener: &TcpListener, creds: &Credentials, peer: SocketAddr) -> Result<Conn> {
    let deadline = Instant::now() + Duration::from_secs(10);
    listener.set_nonblocking(true)?;
    let r = loop {
        if Instant::now() > deadline {
            break Err(Error::from(format!("{peer} did not open the demand connection")));
        }
        match listener.accept() {
            Ok((tcp, from)) => match creds.accept(tcp, Channel::Demand, Duration::from_secs(10)) {
                Ok(s) => {
                    let _ = s.set_read_timeout(None);
                    crate::transport::mark_interactive(&s);
                    break Ok(s);
                }
                Err(e) => log::warn!("receive: refused a demand connection from {from}: {e}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => break Err(Error::from(format!("accepting the demand connection: {e}"))),
        }
    };
    listener.set_nonblocking(false)?;
    r
}
