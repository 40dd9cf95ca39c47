//! The source side of a migration, for every mode: [`migrate`].
//!
//! - Stop-and-copy: `Config`, pause, every non-zero page (`Pages`), the
//!   state (`State`), `Switchover`, then the destination's `Ack` with the
//!   digest of what it received (or its `Abort`).
//! - Pre-copy: the same after copy rounds over a running VM with dirty
//!   logging on, until [`Precopy::converged`]; the stop-and-copy then sends
//!   only the pages dirtied since the last round.
//! - Post-copy (simple and enlightened): `Config` and `Info` (mode, resume
//!   token), a second authenticated connection for demand requests, for
//!   enlightened post-copy the guest's maps, pause, `FreeRanges`, `State`,
//!   `Switchover`, the destination's `Ack`, `Go` (the commit), then
//!   the push rounds of [`policy::rounds`] while [`Source::serve_demand`]
//!   answers faults, until the destination acknowledges every page. A broken
//!   link is re-established for as long as it takes: after `Go` this VMM holds
//!   the only copy of the pages the destination still lacks.
//!
//! The VM is reached only through [`MigratableVm`].

use std::io::{BufReader, BufWriter};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::policy::{self, GuestMaps, Precopy, Round, RoundStats};
use crate::progress::Mode;
use crate::push::Source;
use crate::report::{ByteCounts, Integrity, PageCounts, Postcopy, Report, Timeline};
use crate::space::{self, Digests, PageSpace, PAGE_SIZE};
use crate::transport::{self, Conn, Credentials, SharedCounting};
use crate::vm::MigratableVm;
use crate::wire::{self, control, Channel, FrameReader, FrameWriter, Kind};
use crate::PUSH_BATCH;

type Writer = FrameWriter<BufWriter<SharedCounting<Conn>>>;
type Reader = FrameReader<BufReader<Conn>>;

/// Largest `State` frame.
const STATE_CHUNK: usize = 8 << 20;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sending(e: wire::WireError) -> Error {
    Error::Protocol(format!("sending: {e}"))
}

fn writer(vm: &dyn MigratableVm, stream: &Conn) -> Result<Writer> {
    let s = stream.try_clone().map_err(|e| e.to_string())?;
    Ok(FrameWriter::new(BufWriter::with_capacity(1 << 20, vm.status().counting(s))))
}

fn check_running(vm: &dyn MigratableVm) -> Result<()> {
    vm.status().check()?;
    match vm.ended() {
        Some(r) => Err(Error::from(format!("the VM ended during the migration ({r})"))),
        None => Ok(()),
    }
}

/// Sends pages as `Pages` frames: those set in `dirty` (one bitmap per
/// region), or without it every page that is not zero; returns how many.
fn send_pages(vm: &dyn MigratableVm, fw: &mut Writer, dirty: Option<&[Vec<u64>]>) -> Result<u64> {
    let mem = vm.memory();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut batch: Vec<u8> = Vec::with_capacity(PUSH_BATCH * wire::PAGE_RECORD);
    let mut sent = 0u64;
    for (ri, region) in mem.iter().enumerate() {
        let base = region.start_addr().raw_value();
        for p in 0..(region.len() / PAGE_SIZE) as usize {
            if let Some(d) = dirty {
                if d[ri][p / 64] & (1 << (p % 64)) == 0 {
                    continue;
                }
            }
            let gpa = base + p as u64 * PAGE_SIZE;
            mem.read_slice(&mut page, GuestAddress(gpa)).map_err(|e| Error::Memory(e.to_string()))?;
            if dirty.is_none() && space::is_zero(&page) {
                continue;
            }
            batch.extend_from_slice(&gpa.to_le_bytes());
            batch.extend_from_slice(&page);
            sent += 1;
            if batch.len() >= PUSH_BATCH * wire::PAGE_RECORD {
                vm.status().check()?;
                fw.send(Kind::Pages, &batch).map_err(sending)?;
                batch.clear();
            }
        }
    }
    if !batch.is_empty() {
        fw.send(Kind::Pages, &batch).map_err(sending)?;
    }
    Ok(sent)
}

/// Sends the paused VM's state as `State` frames; returns its size.
fn send_state(vm: &dyn MigratableVm, fw: &mut Writer) -> Result<u64> {
    let state = vm.write_state()?;
    for chunk in state.chunks(STATE_CHUNK) {
        fw.send(Kind::State, chunk).map_err(sending)?;
    }
    Ok(state.len() as u64)
}

/// Waits for the destination's answer to the switch-over: `Ack` with the
/// digest of the memory it received, or `Abort`.
fn await_ack(fr: &mut Reader, stream: &Conn) -> Result<[u8; 32]> {
    stream.set_read_timeout(Some(transport::ACK_TIMEOUT))?;
    let f = fr.expect().map_err(|e| format!("the destination did not confirm the restore: {e}"))?;
    match f.kind {
        Kind::Ack if f.payload.len() == 32 => Ok(f.payload[..].try_into().expect("32 bytes")),
        Kind::Abort => {
            Err(Error::Aborted { by: "destination", reason: String::from_utf8_lossy(&f.payload).into_owned() })
        }
        other => Err(Error::from(format!("the destination answered {other:?} instead of confirming the restore"))),
    }
}

/// Migrates `vm` to the destination `to` (host:port) in `mode`. On success
/// the VM runs there, [`MigratableVm::migrated`] was called and the report
/// is returned; on failure before the commit the VM keeps running here.
pub fn migrate(vm: &dyn MigratableVm, to: &str, creds: &Credentials, mode: Mode) -> Result<Report> {
    let status = vm.status();
    if status.json().is_some() {
        return Err(Error::from("a migration is already in progress"));
    }
    if status.committed.load(Ordering::Acquire) {
        return Err(Error::from("this VM was already migrated: it runs at the destination"));
    }
    status.start(mode);
    let t0 = Instant::now();
    let r = transport::connect(to, creds).and_then(|stream| match mode {
        Mode::Postcopy | Mode::Enlightened => postcopy(vm, to, creds, stream, mode, t0),
        Mode::StopAndCopy | Mode::Precopy => copy(vm, to, &stream, mode, t0),
    });
    status.end();
    r
}

/// Stop-and-copy and pre-copy.
fn copy(vm: &dyn MigratableVm, to: &str, stream: &Conn, mode: Mode, t0: Instant) -> Result<Report> {
    let mut paused_here = false;
    let mut logging = false;
    let result = copy_over(vm, stream, mode, t0, &mut paused_here, &mut logging);
    if logging {
        if let Err(e) = vm.set_dirty_log(false) {
            log::warn!("cannot turn dirty logging off: {e}");
        }
    }
    match result {
        Ok(report) => {
            log::info!("migrated to {to}: {}", report.to_json());
            // The VM stays paused here; it ends once the reply is out.
            vm.committed();
            vm.migrated();
            Ok(report)
        }
        Err(e) => {
            if paused_here {
                vm.resume();
            }
            log::error!("migration to {to} failed; the VM keeps running here: {e}");
            Err(e)
        }
    }
}

/// Pre-copy's rounds over the running VM: returns the round reports and the
/// pages dirtied during the last round (one bitmap per region).
fn precopy_rounds(vm: &dyn MigratableVm, fw: &mut Writer, t0: Instant) -> Result<(Vec<Value>, Vec<Vec<u64>>)> {
    let policy = Precopy::default();
    let mut rounds = Vec::new();
    let mut dirty: Option<Vec<Vec<u64>>> = None;
    for round in 0.. {
        check_running(vm)?;
        vm.status().set(Mode::Precopy, &format!("pre-copy round {round}"));
        let t = Instant::now();
        let before = fw.bytes;
        // Round 0 sends every page that is not zero, later rounds the dirty ones.
        let sent = send_pages(vm, fw, dirty.as_deref())?;
        fw.flush().map_err(sending)?;
        let d = vm.take_dirty()?;
        let stats = RoundStats {
            round,
            bytes: fw.bytes - before,
            secs: t.elapsed().as_secs_f64(),
            dirty_pages: d.iter().flatten().map(|w| w.count_ones() as u64).sum(),
        };
        rounds.push(json!({
            "round": round, "pages": sent, "bytes": stats.bytes, "ms": stats.secs * 1000.0,
            "dirty_after": stats.dirty_pages, "expected_downtime_ms": stats.expected_downtime_ms(),
        }));
        log::info!(
            "pre-copy round {round}: {sent} pages in {:.0} ms, {} dirty",
            stats.secs * 1000.0,
            stats.dirty_pages
        );
        dirty = Some(d);
        if policy.converged(&stats, t0.elapsed()) {
            break;
        }
    }
    Ok((rounds, dirty.unwrap_or_default()))
}

/// Stop-and-copy's switch-over, after pre-copy's rounds if any.
fn copy_over(
    vm: &dyn MigratableVm,
    stream: &Conn,
    mode: Mode,
    t0: Instant,
    paused_here: &mut bool,
    logging: &mut bool,
) -> Result<Report> {
    let mut fw = writer(vm, stream)?;
    fw.send(Kind::Config, &vm.config()?).map_err(sending)?;
    let (rounds, mut last) = if mode == Mode::Precopy {
        vm.set_dirty_log(true)?;
        *logging = true;
        vm.take_dirty()?; // start from a clean log
        let (rounds, dirty) = precopy_rounds(vm, &mut fw, t0)?;
        (rounds, Some(dirty))
    } else {
        (Vec::new(), None)
    };
    let precopy_bytes = fw.bytes;

    // Switch over: pause, send the state and the remaining pages.
    check_running(vm)?;
    vm.status().set(mode, "stop-and-copy");
    *paused_here = vm.pause()?;
    let t_pause = Instant::now();
    vm.sync_disks()?;
    if let Some(d) = &mut last {
        for (a, b) in d.iter_mut().zip(vm.take_dirty()?) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= y;
            }
        }
    }
    let before = fw.bytes;
    let final_pages = send_pages(vm, &mut fw, last.as_deref())?;
    send_state(vm, &mut fw)?;
    fw.send(Kind::Switchover, &[]).map_err(sending)?;
    fw.flush().map_err(sending)?;
    let final_bytes = fw.bytes - before;
    let mut fr = FrameReader::new(BufReader::new(stream.try_clone()?));
    let dest_digest = await_ack(&mut fr, stream)?;
    let downtime = ms(t_pause.elapsed());
    let total = ms(t0.elapsed());
    // The VM is still paused here: its memory is the memory at suspension.
    let src_digest = Digests::of_memory(&**vm.memory()).summary();
    let integrity_ok = src_digest == dest_digest;
    if !integrity_ok {
        log::error!("migration: destination memory differs from the source's at suspension");
    }
    let execution_transfer = if mode == Mode::Precopy { total } else { downtime };
    Ok(Report {
        mode: mode.name().into(),
        to: stream.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
        execution_transfer_ms: execution_transfer,
        downtime_ms: downtime,
        total_duration_ms: total,
        bytes: ByteCounts { precopy: precopy_bytes, stop_and_copy: final_bytes, ..Default::default() },
        free_pages_sent: 0,
        rounds,
        integrity: Integrity::of(src_digest, dest_digest, PageSpace::of(&**vm.memory()).pages()),
        timeline: Timeline {
            epoch_ms: crate::report::unix_ms() - t0.elapsed().as_millis() as u64,
            source: vm.progress(),
            destination: None,
        },
        pages_at_switchover: Some(final_pages),
        postcopy: None,
    })
}

/// Post-copy's two connections and the thread serving demand requests.
struct Links {
    fw: Writer,
    fr: Reader,
    stream: Conn,
    demand: Conn,
    server: Option<JoinHandle<Result<()>>>,
}

impl Links {
    fn serve(&mut self, vm: &dyn MigratableVm, source: &Arc<Source>) -> Result<()> {
        let (src, conn) = (source.clone(), self.demand.try_clone().map_err(|e| e.to_string())?);
        let counter = vm.status().bytes.clone();
        self.server = Some(std::thread::spawn(move || src.serve_demand(conn, counter)));
        Ok(())
    }

    /// Closes both connections and waits for the demand server.
    fn close(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        let _ = self.demand.shutdown(Shutdown::Both);
        if let Some(Err(e)) = self.server.take().map(|t| t.join().unwrap_or(Ok(()))) {
            log::debug!("demand thread ended: {e}");
        }
    }
}

/// What the switch-over measured.
struct Switched {
    t_pause: Instant,
    suspension_ms: f64,
    free_info: u64,
    state_bytes: u64,
    t_state: Instant,
}

/// Post-copy and enlightened post-copy.
fn postcopy(
    vm: &dyn MigratableVm,
    to: &str,
    creds: &Credentials,
    stream: Conn,
    mode: Mode,
    t0: Instant,
) -> Result<Report> {
    let mut fw = writer(vm, &stream)?;
    fw.send(Kind::Config, &vm.config()?).map_err(sending)?;
    let token = transport::new_token();
    let start = control::Start { mode: mode.name().into(), token: token.clone() };
    fw.send(Kind::Info, &control::encode(&start)).map_err(sending)?;
    fw.flush().map_err(sending)?;
    let demand = transport::connect_channel(to, creds, Channel::Demand)?;
    transport::mark_interactive(&demand);
    let fr = FrameReader::new(BufReader::new(stream.try_clone().map_err(|e| e.to_string())?));
    let mut links = Links { fw, fr, stream, demand, server: None };

    let source = Arc::new(Source::new(vm.memory().clone()));
    let mut maps = None;
    let mut enlightenment_ms = 0.0;
    if mode == Mode::Enlightened {
        vm.status().set(mode, "enlightenment");
        let t = Instant::now();
        let m = vm.enlighten_prepare().map_err(|e| format!("enlightenment: {e}"))?;
        enlightenment_ms = ms(t.elapsed());
        log::info!("enlightenment: {} ms, {}", enlightenment_ms.round(), m.summary);
        maps = Some(m);
    }

    let mut paused_here = false;
    let switched = match switch_over(vm, mode, &mut links, &source, maps.as_ref(), &mut paused_here) {
        Ok(s) => s,
        Err(e) => {
            links.close();
            if paused_here {
                vm.resume();
            }
            if maps.is_some() {
                if let Err(r) = vm.enlighten_release() {
                    log::warn!("releasing the guest's free frames: {r}");
                }
            }
            log::error!("migration to {to} failed before the switch-over; the VM keeps running here: {e}");
            return Err(e);
        }
    };
    let t_go = Instant::now();
    let (downtime_ms, execution_transfer_ms) = (ms(t_go - switched.t_pause), ms(t_go - t0));
    log::info!(
        "post-copy: the VM runs at {to} after {execution_transfer_ms:.0} ms (downtime {downtime_ms:.0} ms); pushing"
    );

    // From here on the VM lives at the destination: never resume here. This
    // VMM ends only once every page is delivered (and after the reply to this
    // request, not to any other).
    let rounds = policy::rounds(&source.space, &source.free, maps.as_ref());
    vm.status().set(mode, "post-copy push");
    let pushed = push_until_acked(vm, to, creds, &token, mode, &source, &rounds, &mut links, t0);
    links.close();
    let pushed = pushed?;
    vm.discard_memory();
    vm.migrated();

    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let integrity = Integrity::of(source.summary(), pushed.digest, source.space.pages());
    let integrity_ok = integrity.matches;
    let dest = pushed.destination;
    let push_bytes: u64 = pushed.rounds.iter().filter_map(|r| r["bytes"].as_u64()).sum();
    let classes: serde_json::Map<String, Value> = pushed
        .rounds
        .iter()
        .map(|r| {
            let c =
                json!({"pages": r["pages"], "data_pages": r["data_pages"], "start_ms": r["start_ms"], "ms": r["ms"]});
            (r["name"].as_str().unwrap_or("?").to_owned(), c)
        })
        .collect();
    let report = Report {
        mode: mode.name().into(),
        to: to.into(),
        execution_transfer_ms,
        downtime_ms,
        total_duration_ms: pushed.total_ms,
        bytes: ByteCounts {
            state: switched.state_bytes,
            push: push_bytes,
            demand: ld(&source.demand_bytes),
            free_info: switched.free_info,
            ..Default::default()
        },
        free_pages_sent: ld(&source.free_pages_sent),
        rounds: pushed.rounds,
        integrity,
        timeline: Timeline {
            epoch_ms: crate::report::unix_ms() - t0.elapsed().as_millis() as u64,
            source: vm.progress(),
            destination: Some(dest["timeline"].clone()),
        },
        pages_at_switchover: None,
        postcopy: Some(Postcopy {
            enlightenment_ms,
            suspension_ms: switched.suspension_ms,
            state_transfer_ms: ms(switched.t_state - switched.t_pause),
            pages: PageCounts {
                total: source.space.pages(),
                free: maps.as_ref().map(|m| m.free_bitmap().count_free()).unwrap_or(0),
                demand: ld(&source.demand_pages),
                demand_duplicates: ld(&source.demand_duplicates),
            },
            reconnections: pushed.reconnections,
            enlightenment: maps.as_ref().map(|m| m.summary.clone()),
            classes,
            fault_latency_ms: dest["fault_latency_ms"].clone(),
            destination: dest,
        }),
    };
    log::info!(
        "migrated to {to} ({}): total {:.0} ms, integrity {}",
        mode.name(),
        pushed.total_ms,
        if integrity_ok { "ok" } else { "MISMATCH" }
    );
    if !integrity_ok {
        log::error!("post-copy: destination memory differs from the source's at suspension");
        return Err(Error::from(format!("integrity check failed: {}", report.to_json())));
    }
    Ok(report)
}

/// Suspends the VM, sends the free ranges and the device state, starts the
/// demand server, waits for the destination's restore and commits (`Go`).
fn switch_over(
    vm: &dyn MigratableVm,
    mode: Mode,
    links: &mut Links,
    source: &Arc<Source>,
    maps: Option<&GuestMaps>,
    paused_here: &mut bool,
) -> Result<Switched> {
    vm.status().check()?;
    vm.status().set(mode, "switch-over");
    *paused_here = vm.pause()?;
    let t_pause = Instant::now();
    vm.sync_disks()?;
    let mut free_info = 0;
    if let Some(m) = maps {
        let ranges = source.mark_free(m.free_bitmap().free_runs());
        free_info = space::send_ranges(&mut links.fw, Kind::FreeRanges, &ranges)
            .map_err(|e| format!("sending FreeRanges: {e}"))?;
    }
    let suspension_ms = ms(t_pause.elapsed());
    let state_bytes = send_state(vm, &mut links.fw)?;
    links.fw.send(Kind::Switchover, b"postcopy").map_err(sending)?;
    links.fw.flush().map_err(sending)?;
    let t_state = Instant::now();
    links.serve(vm, source)?;
    await_ack(&mut links.fr, &links.stream)?;
    vm.status().check()?;
    vm.status().committed.store(true, Ordering::Release);
    vm.committed();
    // Committed: from here the VM never runs here again, whatever happens to `Go`. If
    // it does not arrive, the push fails and the source reconnects with the migration's
    // token, which the destination takes as the commit.
    if let Err(e) = links.fw.send(Kind::Go, &[]).and_then(|_| links.fw.flush()) {
        log::warn!("post-copy: the commit may not have reached the destination ({e}); it follows on reconnection");
    }
    Ok(Switched { t_pause, suspension_ms, free_info, state_bytes, t_state })
}

/// What the destination acknowledged after the push.
struct Pushed {
    rounds: Vec<Value>,
    digest: [u8; 32],
    destination: Value,
    total_ms: f64,
    reconnections: u64,
}

/// Pushes the rounds and waits for the destination's acknowledgement of
/// every page, re-establishing broken links (the destination then says what
/// it still lacks).
#[allow(clippy::too_many_arguments)]
fn push_until_acked(
    vm: &dyn MigratableVm,
    to: &str,
    creds: &Credentials,
    token: &str,
    mode: Mode,
    source: &Arc<Source>,
    rounds: &[Round],
    links: &mut Links,
    t0: Instant,
) -> Result<Pushed> {
    let mut reconnections = 0u64;
    loop {
        match push_once(source, rounds, links, t0) {
            Ok((rounds, digest, destination, total_ms)) => {
                return Ok(Pushed { rounds, digest, destination, total_ms, reconnections })
            }
            Err(e) => {
                log::warn!("post-copy to {to}: {e}; reconnecting (the VM runs there, its pages are here)");
                vm.status().set(mode, "post-copy: reconnecting");
                links.close();
                let mut tries = 0u64;
                *links = loop {
                    std::thread::sleep(Duration::from_millis(500));
                    match reconnect(vm, to, creds, token, source) {
                        Ok(l) => break l,
                        Err(e) => {
                            tries += 1;
                            if tries % 10 == 1 {
                                log::warn!("post-copy: cannot reconnect to {to} yet: {e}");
                            }
                        }
                    }
                };
                links.serve(vm, source)?;
                reconnections += 1;
                vm.status().set(mode, "post-copy push");
                log::info!("post-copy: reconnected to {to}");
            }
        }
    }
}

fn push_once(
    source: &Source,
    rounds: &[Round],
    links: &mut Links,
    t0: Instant,
) -> Result<(Vec<Value>, [u8; 32], Value, f64)> {
    let report = source.push(rounds, &mut links.fw, t0)?;
    links.fw.send(Kind::Complete, &[]).map_err(sending)?;
    links.fw.flush().map_err(sending)?;
    links.stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
    let ack = links.fr.expect().map_err(|e| format!("waiting for the destination's acknowledgement: {e}"))?;
    if ack.kind != Kind::Ack || ack.payload.len() != 32 {
        return Err(Error::from(format!(
            "the destination answered {:?} instead of acknowledging every page",
            ack.kind
        )));
    }
    let total_ms = ms(t0.elapsed());
    let info = links.fr.expect().map_err(|e| format!("waiting for the destination's statistics: {e}"))?;
    let dest = if info.kind == Kind::Info {
        serde_json::from_slice(&info.payload).unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let digest: [u8; 32] = ack.payload[..].try_into().expect("32 bytes");
    let rounds = match report {
        Value::Array(a) => a,
        other => vec![other],
    };
    Ok((rounds, digest, dest, total_ms))
}

/// Re-establishes both connections of a post-copy migration whose
/// connection broke, and marks the pages the destination lacks unsent.
fn reconnect(vm: &dyn MigratableVm, to: &str, creds: &Credentials, token: &str, source: &Source) -> Result<Links> {
    let stream = transport::connect_channel(to, creds, Channel::Main)?;
    let mut fw = writer(vm, &stream)?;
    fw.send(Kind::Info, &control::encode(&control::Resume { resume: token.into() }))?;
    fw.flush()?;
    let demand = transport::connect_channel(to, creds, Channel::Demand)?;
    transport::mark_interactive(&demand);
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let mut fr = FrameReader::new(BufReader::new(stream.try_clone().map_err(|e| e.to_string())?));
    let info = fr.expect()?;
    if info.kind != Kind::Info {
        return Err(Error::from(format!("the destination answered {:?} to the resume request", info.kind)));
    }
    let answer: control::Resumed = control::decode(&info.payload, "resume answer")?;
    log::info!("post-copy: the destination resumes the migration ({} pages missing)", answer.missing);
    let mut missing = 0;
    loop {
        let f = fr.expect()?;
        match f.kind {
            Kind::Missing => {
                for (pfn, count) in space::decode_ranges(&f.payload, "missing ranges")? {
                    for (first, n) in source.space.clip(pfn, count) {
                        for i in first..first + n {
                            source.sent.clear(i);
                        }
                        missing += n;
                    }
                }
            }
            Kind::Complete => break,
            other => return Err(Error::from(format!("unexpected {other:?} frame in the resume answer"))),
        }
    }
    log::info!("post-copy: the destination lacks {missing} pages");
    Ok(Links { fw, fr, stream, demand, server: None })
}
